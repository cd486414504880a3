"""
What pre-training is worth, measured on the built-in data: pre-train the tiny Chinese model with momentum contrast
(config/pretrain_synthetic.py: FAM + VTM + FTM + MLM with tags and queues) and each ablation of it, fine-tune every
checkpoint on the synthetic set with the same short budget, fine-tune from scratch with that budget too, and print
one table of test metrics. Every run is a plain `python train.py ...` whose command is printed with its result, so
any row can be rerun alone.

$ python study.py                          # every row: about half an hour on 2 CPU cores
$ python study.py --rows="('scratch', 'full')"

Writes out_dir/<row>-pretrain/, out_dir/<row>-finetune/ (each a train.py run folder) and out_dir/study.json.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import configurator
from common import run_script

# -----------------------------------------------------------------------------
out_dir = "out-study"  # one train.py run folder per row and stage, and study.json with the table
rows = ("scratch", "full", "no_fam", "no_vtm", "no_ftm", "no_mlm", "queue_256", "queue_1024")  # which rows to run
finetune_epochs = 1  # the fine-tuning budget of every row (the synthetic set has 187 steps per epoch)
pretrain_epochs = 2  # the pre-training budget of every pre-trained row (synthetic_pretrain: 375 steps per epoch)
workers = 2  # rows run at the same time (each train.py uses one CPU thread)
train_args = ()  # more train.py arguments for every run, e.g. "('--max_iters=2',)" for a quick check of the chain
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, str, tuple))]

ROOT = os.path.dirname(os.path.abspath(__file__))

# the pre-training settings of each row on top of config/pretrain_synthetic.py; "scratch" has no pre-training
ROWS = {
    "scratch": None,
    "full": [],
    "no_fam": ["--weight_fam=0"],
    "no_vtm": ["--weight_vtm=0"],
    "no_ftm": ["--weight_ftm=0"],
    "no_mlm": ["--weight_mlm=0"],
    "queue_256": ["--queue_size=256"],  # the recipe's queue holds one batch (32)
    "queue_1024": ["--queue_size=1024"],  # the full-size recipe's
}


def recipe(name: str) -> str:
    return os.path.relpath(os.path.join(ROOT, "config", name))  # as a user would type it


def train(args: list[str], folder: str) -> dict:
    """Run train.py with `args` into `folder` (its output goes to folder/train.log) -> its results.json."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--out_dir={folder}", "--overwrite=True"]
    print("$ python train.py " + " ".join(cmd[2:]), flush=True)
    os.makedirs(folder, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(folder, "train.log"), "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise ValueError(f"train.py {' '.join(cmd[2:])} failed (exit {done.returncode}); see {folder}/train.log")
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    return results


def run_row(row: str, cfg: dict) -> dict:
    """Pre-train (unless the row is "scratch"), then fine-tune -> {"pretrain": results or None, "finetune": ...}."""
    base = os.path.join(cfg["out_dir"], row)
    init, pre = "scratch", None
    if ROWS[row] is not None:
        pre = train([recipe("pretrain_synthetic.py"), f"--epochs={cfg['pretrain_epochs']}", *ROWS[row],
                     *cfg["train_args"]], base + "-pretrain")
        init = os.path.join(base + "-pretrain", "ckpt.pt")
    fine = train([recipe("synthetic_zh.py"), f"--init_from={init}", f"--epochs={cfg['finetune_epochs']}",
                  *cfg["train_args"]], base + "-finetune")
    zero_shot = f"{pre['t2v']['R1']:.1f}" if pre else "-"
    print(f"{row}: after pre-training T2V R@1 {zero_shot}; after fine-tuning T2V R@1 {fine['t2v']['R1']:.1f} "
          f"R@5 {fine['t2v']['R5']:.1f} V2T R@1 {fine['v2t']['R1']:.1f}", flush=True)
    return {"pretrain": pre, "finetune": fine}


def main(argv=None):
    cfg = configurator.configure({k: globals()[k] for k in config_keys}, sys.argv[1:] if argv is None else argv,
                                 prog="study.py", descriptions=configurator.describe(__file__))
    unknown = [r for r in cfg["rows"] if r not in ROWS]
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; choose from {list(ROWS)}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with ThreadPoolExecutor(cfg["workers"]) as pool:  # threads only wait for their train.py processes
        table = dict(zip(cfg["rows"], pool.map(lambda row: run_row(row, cfg), cfg["rows"])))
    with open(os.path.join(cfg["out_dir"], "study.json"), "w") as f:
        json.dump({"settings": cfg, "rows": table}, f, indent=1)

    print("\n| row | pre-training | T2V R@1 after pre-training | T2V R@1 | T2V R@5 | V2T R@1 |")
    print("|---|---|---|---|---|---|")
    for row, r in table.items():
        pre, fine = r["pretrain"], r["finetune"]
        what = "none" if ROWS[row] is None else " ".join(ROWS[row]) or "all four losses"
        zero_shot = f"{pre['t2v']['R1']:.1f}" if pre else "-"
        print(f"| {row} | {what} | {zero_shot} | {fine['t2v']['R1']:.1f} | {fine['t2v']['R5']:.1f} | "
              f"{fine['v2t']['R1']:.1f} |")
    return table


if __name__ == "__main__":
    run_script(main)
