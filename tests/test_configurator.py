import pytest

from configurator import configure, describe

DEFAULTS = {
    "batch_size": 32,
    "learning_rate": 1e-4,
    "compile": False,
    "dataset": "synthetic",
    "init_from": "scratch",
    "bert_path": None,
    "betas": (0.9, 0.98),
}


def test_defaults_untouched_without_arguments():
    config = configure(DEFAULTS, [])
    assert config == DEFAULTS and config is not DEFAULTS


def test_overrides_parse_types():
    config = configure(DEFAULTS, ["--batch_size=8", "--learning_rate=3e-5", "--compile=True",
                                  "--dataset=msrvtt", "--betas=(0.9, 0.999)"])
    assert config["batch_size"] == 8 and config["learning_rate"] == 3e-5 and config["compile"] is True
    assert config["dataset"] == "msrvtt" and config["betas"] == (0.9, 0.999)


def test_int_for_float_and_lowercase_bools():
    config = configure(DEFAULTS, ["--learning_rate=1", "--compile=true"])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)
    assert config["compile"] is True
    assert configure(DEFAULTS, ["--compile=false"])["compile"] is False


def test_split_on_first_equals_and_numeric_looking_strings():
    config = configure(DEFAULTS, ["--init_from=out/a=b/ckpt.pt", "--dataset=2024"])
    assert config["init_from"] == "out/a=b/ckpt.pt"
    assert config["dataset"] == "2024"


def test_none_default_takes_anything():
    assert configure(DEFAULTS, ["--bert_path=/models/bert"])["bert_path"] == "/models/bert"


def test_unknown_key_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown config key 'batchsize'.*batch_size"):
        configure(DEFAULTS, ["--batchsize=8"])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ValueError) as e:
        configure(DEFAULTS, ["--batch_size=0.5"])
    msg = str(e.value)
    assert "batch_size" in msg and "int" in msg and "0.5" in msg
    with pytest.raises(ValueError, match="compile expects bool"):
        configure(DEFAULTS, ["--compile=1"])
    with pytest.raises(ValueError, match="learning_rate expects float"):
        configure(DEFAULTS, ["--learning_rate=fast"])


def test_missing_value_and_bad_argument():
    with pytest.raises(ValueError, match="no value"):
        configure(DEFAULTS, ["--batch_size"])
    with pytest.raises(ValueError, match="no config file"):
        configure(DEFAULTS, ["nonexistent_config.py"])


def test_missing_config_file_names_close_matches(tmp_path):
    (tmp_path / "config").mkdir()
    for name in ("synthetic.py", "finetune_msrvtt.py"):
        (tmp_path / "config" / name).write_text("batch_size = 4\n")
    typo = "config/synthetc.py"
    with pytest.raises(ValueError) as refused:
        configure(DEFAULTS, [str(tmp_path / typo)])
    assert str(refused.value) == (f"no config file '{tmp_path / typo}' (a bare argument is a config file; "
                                  f"overrides are written --key=value); did you mean "
                                  f"{tmp_path / 'config' / 'synthetic.py'}?")
    with pytest.raises(ValueError, match=r"--key=value\)$"):  # nothing close: no guess
        configure(DEFAULTS, [str(tmp_path / "config" / "zzz.py")])


def test_config_file_and_order(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text("import math\n# a comment\nbatch_size = 4 * 4\nlearning_rate = 2e-4\n"
                    "_helper = 3\ndef f():\n    return 1\ncompile = math.pi > 3\n")
    config = configure(DEFAULTS, [str(path), "--batch_size=2"])
    assert config["batch_size"] == 2 and config["learning_rate"] == 2e-4 and config["compile"] is True
    # the file sees earlier values, and a later file overrides an earlier override
    config = configure(DEFAULTS, ["--batch_size=3", str(path)])
    assert config["batch_size"] == 16


def test_config_file_refuses_unknown_and_mistyped_keys(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ValueError, match=r"typo.py: unknown config key 'learning_rat'.*learning_rate"):
        configure(DEFAULTS, [str(path)])
    path.write_text("batch_size = '16'\n")
    with pytest.raises(ValueError, match="batch_size expects int"):
        configure(DEFAULTS, [str(path)])


def test_help_on_stdout_with_descriptions(capsys, tmp_path):
    script = tmp_path / "script.py"
    script.write_text("batch_size = 32  # videos per step\nlearning_rate = 1e-4  # new modules\n")
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ["--help"], prog="eval.py", descriptions=describe(str(script)))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python eval.py") and "--batch_size=32" in out and "videos per step" in out


def test_bare_flag_switches_a_bool_on():
    assert configure(DEFAULTS, ["--compile"])["compile"] is True
