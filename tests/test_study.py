# study.py, the experiments-over-seeds command, at a tiny budget: its table against values computed by hand from
# the runs' own results.json, finished runs reused, chains, and one-line errors.
import json
import math
import os
import statistics

import pytest

import study
from conftest import TINY

pytestmark = pytest.mark.slow  # every run is a train.py subprocess: seconds apiece


def results(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def tiny(data: str, steps: int, eval_interval: int) -> str:
    """train_args of a few steps of the tiny model on `data` (later arguments win, so TINY comes first)."""
    return f"{' '.join(TINY)} --data_dir={data} --batch_size=8 --max_iters={steps} --eval_interval={eval_interval}"


def test_table_equals_values_by_hand_and_runs_are_reused(synthetic_data, tmp_path, capsys):
    data = synthetic_data
    rows = {"base": "--learning_rate=1e-3", "slow": "--learning_rate=1e-4"}
    args = [f"--out_dir={tmp_path}", f"--rows={rows!r}", "--seeds=(1, 2)", "--plot=True",
            f"--train_args={tiny(data, 4, 2)}"]
    summary = study.main(args)
    printed = capsys.readouterr().out
    assert printed.count("$ python train.py") == 4  # 2 rows x 2 seeds
    by_hand = {name: [results(tmp_path / name / f"seed{s}") for s in (1, 2)] for name in rows}
    for name in rows:
        assert summary[name]["seeds"] == [1, 2] and summary[name]["steps"] == [4, 4]
        assert summary[name]["videos"] == [32, 32]
        for split, r in study.METRICS:
            values = [res[split][r] for res in by_hand[name]]
            entry = summary[name]["metrics"][f"{split}_{r}"]
            assert entry["values"] == values
            assert entry["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert entry["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert (entry["min"], entry["max"]) == (min(values), max(values))
    for split, r in study.METRICS:
        paired = [s[split][r] - b[split][r] for s, b in zip(by_hand["slow"], by_hand["base"])]
        diff = summary["slow"]["metrics"][f"{split}_{r}"]["diff"]
        assert diff["n"] == 2 and diff["mean"] == pytest.approx(statistics.mean(paired), abs=1e-12)
        # two seeds: one degree of freedom, t = 12.71
        assert diff["pm"] == pytest.approx(12.71 * statistics.stdev(paired) / math.sqrt(2), abs=1e-12)
        assert "diff" not in summary["base"]["metrics"][f"{split}_{r}"]  # the baseline row
    # the markdown table: a header, a rule and one line per row, in the files and on stdout
    table = (tmp_path / "study.md").read_text().strip().splitlines()
    assert len(table) == 4 and table[0].startswith("| row | seeds | T2V R@1") and table[2].startswith("| base | 2 |")
    assert table[3].startswith("| slow | 2 |") and "\n".join(table) in printed
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["summary"]["slow"]["metrics"]["t2v_R1"]["diff"]["mean"] == \
        summary["slow"]["metrics"]["t2v_R1"]["diff"]["mean"]
    assert (tmp_path / "study_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib: requirements-dev.txt
    # val metrics are in each run's log.jsonl, beside the losses
    with open(tmp_path / "base" / "seed1" / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["iter"] for r in records if "val" in r] == [2, 4]
    assert all(set(r["val"]["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"} for r in records if "val" in r)

    # the same command again: every run is reused, nothing is trained, the table is the same
    mtimes = {p: os.path.getmtime(p) for p in tmp_path.glob("*/seed*/results.json")}
    again = study.main(args)
    assert "$ python train.py" not in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes and again == summary
    # another setting for one row reruns that row only (its folder's run is replaced)
    rows["slow"] = "--learning_rate=3e-4"
    study.main([f"--rows={rows!r}", *args[:1], *args[2:]])
    assert capsys.readouterr().out.count("$ python train.py") == 2
    assert all(os.path.getmtime(p) == mtimes[p] for p in mtimes if "/base/" in str(p))


def test_a_chain_starts_each_stage_from_the_one_before(synthetic_data, tmp_path, capsys):
    # two chains with the same first stage: it runs once and both fine-tune its weights
    rows = {"two_stages": ("--learning_rate=1e-3", "--learning_rate=1e-4"),
            "same_start": ("--learning_rate=1e-3", "--learning_rate=3e-4")}
    summary = study.main([f"--out_dir={tmp_path}", f"--rows={rows!r}", "--seeds=(3,)",
                          f"--train_args={tiny(synthetic_data, 2, 0)}"])
    assert capsys.readouterr().out.count("$ python train.py") == 3
    assert not (tmp_path / "same_start" / "seed3" / "stage1").exists()
    assert f"--init_from={tmp_path / 'two_stages' / 'seed3' / 'stage1' / 'best.pt'}" in \
        (tmp_path / "same_start" / "seed3" / "stage2" / "command.txt").read_text()
    assert summary["same_start"]["first_stage_t2v_R1"][0] == summary["two_stages"]["first_stage_t2v_R1"][0]
    first, second = (tmp_path / "two_stages" / "seed3" / f"stage{i}" for i in (1, 2))
    assert f"--init_from={first / 'best.pt'}" in (second / "command.txt").read_text()
    log = (second / "train.log").read_text()
    assert "loaded" in log and str(first / "best.pt") in log
    row = summary["two_stages"]
    assert row["steps"] == [4] and row["first_stage_t2v_R1"][0] == results(first)["t2v"]["R1"]
    assert row["metrics"]["t2v_R1"]["values"] == [results(second)["t2v"]["R1"]]
    # the table: each stage's steps, the videos seen in all, and the first stage's own R@1 (the weights handed on)
    header, _, line, _ = (tmp_path / "study.md").read_text().strip().splitlines()
    assert header.endswith("| T2V R@1 after stage 1 | steps | videos | minutes |")
    assert line.startswith("| two_stages | 1 |")
    assert f"| {results(first)['t2v']['R1']:.1f} ± - | 2+2 | 32 |" in line
