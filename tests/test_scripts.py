# What a user meets first, run as they run it: bad input to each script ends with exit status 1 and one
# `error: ...` line that names the file (no traceback), and the CPU thread default.
import os
import re
import subprocess
import sys

import pytest
import torch

import common
import model
import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # each test starts a Python with torch: seconds apiece


def _run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def _assert_one_error(p, *names):
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: "), p.stderr
    assert p.stderr.strip().splitlines()[-1] == errors[0], p.stderr  # nothing after it
    assert all(name in errors[0] for name in names), (errors[0], names)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.prepare_synthetic(str(root / "syn"), num_train=4, test_single=1, test_double=0, val_single=1,
                                val_double=0, verbose=False)
    return root


@pytest.fixture(scope="module")
def truncated_checkpoint(tiny_data):
    # a real model's weights, cut in half as an interrupted copy would leave them
    net = model.load_model("scratch", model.HMMCConfig(clip=model.CLIPConfig(
        embed_dim=16, image_resolution=32, vision_layers=1, vision_width=16, vision_patch_size=32, context_length=16,
        transformer_width=16, transformer_heads=1, transformer_layers=1), num_frames=8))[0]
    path = tiny_data / "ckpt.pt"
    torch.save({"model": net.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


def test_train_resume_from_a_folder_without_checkpoint(tmp_path):
    p = _run("train.py", "--init_from=resume", f"--out_dir={tmp_path / 'nowhere'}")
    _assert_one_error(p, os.path.join(str(tmp_path / "nowhere"), "ckpt.pt"), "--out_dir")


def test_train_missing_dataset(tmp_path):
    p = _run("train.py", "--dataset=no_such_set", f"--out_dir={tmp_path / 'out'}")
    _assert_one_error(p, os.path.join("data", "no_such_set"), "prepare.py")


def test_train_malformed_json_line_in_a_split(tiny_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        (bad / name).write_text((tiny_data / "syn" / name).read_text())
    (bad / "frames.lmdb").symlink_to(tiny_data / "syn" / "frames.lmdb")
    lines = (bad / "train.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut off the end of the second record
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    p = _run("train.py", f"--data_dir={bad}", f"--out_dir={tmp_path / 'out'}", "--batch_size=2")
    _assert_one_error(p, f"{bad / 'train.jsonl'}:2", "invalid JSON")
    assert re.search(r"invalid JSON \(.+ at column \d+\)$", p.stderr.strip())  # the parser's whole reason


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_truncated_checkpoint(script, truncated_checkpoint, tiny_data, tmp_path):
    out = [f"--out_dir={tmp_path / 'out'}", "--batch_size=2"] if script == "train.py" else []
    p = _run(script, f"--init_from={truncated_checkpoint}", f"--data_dir={tiny_data / 'syn'}", *out)
    _assert_one_error(p, str(truncated_checkpoint), "truncated or corrupt")
    assert p.stderr.strip().endswith(": PytorchStreamReader failed reading zip archive: failed finding central "
                                     "directory")  # torch's reason, without its paragraph of advice


def test_study_bad_baseline_and_a_failing_run(tiny_data, tmp_path):
    p = _run("study.py", "--rows={'a': '', 'b': ''}", "--baseline=c", f"--out_dir={tmp_path}")
    _assert_one_error(p, "baseline", "'c'", "['a', 'b']")  # the bad row and the ones there are
    # a train.py run that fails: its row and seed are named with train.py's own error and its log; the study ends
    # with one error line naming the failed runs
    p = _run("study.py", "--rows={'bad': '--context_length=many'}", "--seeds=(4,)", f"--out_dir={tmp_path}")
    _assert_one_error(p, "1 run(s) failed", "bad seed 4")
    log = os.path.join(str(tmp_path), "bad", "seed4", "train.log")
    assert f"error: row bad seed 4: python train.py --context_length=many --seed=4" in p.stdout
    assert "context_length expects int" in p.stdout and log in p.stdout
    assert "context_length expects int" in open(log).read()


def test_prepare_annotations_without_a_usable_line(tmp_path):
    anno = tmp_path / "chvtt.json"
    anno.write_text('{"title": "no docid"}\n{"docid": 1, "title": \n')
    p = _run("prepare.py", "chvtt", f"--annotations={anno}", f"--out={tmp_path / 'out'}")
    _assert_one_error(p, str(anno), "no usable line")
    assert f"{anno}:1: no 'docid'" in p.stdout and f"{anno}:2: invalid JSON" in p.stdout


def test_cpu_threads_default_to_one_unless_asked(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        assert common.set_cpu_threads("cuda") == 2  # GPU runs keep torch's choice
        assert common.set_cpu_threads("cpu") == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # waiting threads sleep: every core is safe to use
        assert common.set_cpu_threads("cpu") == 2
        monkeypatch.delenv("OMP_WAIT_POLICY")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit choice wins
        assert common.set_cpu_threads("cpu") == 2
    finally:
        torch.set_num_threads(before)
