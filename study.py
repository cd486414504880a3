"""
Experiments over seeds: every row of a table (train.py arguments) at several seeds, two runs at a time -> each
metric's mean, sd and range, and each row's difference to the baseline row seed by seed.

$ python study.py config/study_synthetic.py                    # the README's first table
$ python study.py --rows="{'base': '', 'lr': '--learning_rate=3e-4'}" --seeds="(1, 2, 3)" --plot=True

A row is a train.py command line, or a tuple of them: a chain whose later stages start from the best.pt of the
stage before. A run, `python train.py ROW --seed=S --out_dir=out_dir/ROW/seedS[/stageN]` on one CPU thread, writes
its command beside its output; the same command reuses its results.json, or continues it where it stopped.
"""

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import configurator
from common import run_script

# -----------------------------------------------------------------------------
out_dir = "out-study"  # one folder per row and seed, and the table's files
name = "study"  # the table's files: out_dir/<name>.md, .json, _curves.png (tables in one out_dir share runs)
rows = {"default": ""}  # row name -> train.py arguments (a string), or a tuple of them for a chain of stages
baseline = ""  # the row the others are compared with, seed by seed; "" = the first row
seeds = (1, 2, 3)  # train.py --seed of every row's runs
workers = 2  # runs at the same time, one CPU thread each
train_args = ""  # appended to every run's arguments, e.g. "--max_iters=20" for a quick look
plot = False  # draw curves.png (needs matplotlib)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, str, tuple, dict))]

ROOT = os.path.dirname(os.path.abspath(__file__))
METRICS = (("t2v", "R1"), ("t2v", "R5"), ("v2t", "R1"))  # the table's columns
# two-sided 95% Student t quantiles by degrees of freedom, for the interval of a mean over a few seeds
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13, 20: 2.09}


def stages(row) -> list[str]:
    return [row] if isinstance(row, str) else list(row)  # a chain is a tuple of stages


def run(cmd: list[str], folder: str) -> dict:
    """One train.py run, reused when its results.json came from the same command -> its results.json; a failure
    raises a one-line error naming the run and its log."""
    os.makedirs(folder, exist_ok=True)
    line = "python train.py " + shlex.join(cmd)
    cmd_path, results_path, log_path = (os.path.join(folder, f) for f in ("command.txt", "results.json", "train.log"))
    same = os.path.exists(cmd_path) and open(cmd_path).read().strip() == line
    reused = same and os.path.exists(results_path)
    if not reused:
        print("$ " + line, flush=True)
        with open(cmd_path, "w") as f:
            f.write(line + "\n")
        # another command in the folder: its run is replaced; the same command continues a run that stopped half-way
        full = [sys.executable, os.path.join(ROOT, "train.py"), *cmd] + ([] if same else ["--overwrite=True"])
        with open(log_path, "a" if same else "w") as log:
            done = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode or not os.path.exists(results_path):
            with open(log_path) as f:
                last = ([s for s in f.read().splitlines() if s.strip()] or ["(no output)"])[-1]
            raise RuntimeError(f"{line} failed (exit {done.returncode}): {last.strip()} (log: {log_path})")
    with open(results_path) as f:
        return {**json.load(f), "command": line, "folder": folder, "reused": reused}


def run_row_seed(cfg: dict, name: str, seed: int, shared: dict, lock: threading.Lock) -> list[dict] | str:
    """Every stage of one row at one seed -> their results, or the error of a failed one. Rows that begin with the same
    stages share them (`shared`: (seed, stages so far) -> folder, lock): one pre-training serves every fine-tuning."""
    row_stages, out = stages(cfg["rows"][name]), []
    for i, args in enumerate(row_stages):
        folder = os.path.join(cfg["out_dir"], name, f"seed{seed}")
        if len(row_stages) > 1:
            folder = os.path.join(folder, f"stage{i + 1}")
        with lock:
            folder, busy = shared.setdefault((seed, tuple(row_stages[:i + 1])), (folder, threading.Lock()))
        cmd = shlex.split(args)
        if out:  # a later stage starts from the weights the stage before reported (results.json)
            cmd.append(f"--init_from={os.path.join(out[-1]['folder'], 'best.pt')}")
        cmd += [*shlex.split(cfg["train_args"]), f"--seed={seed}", f"--out_dir={folder}"]
        try:
            with busy:  # another row running the same stage: wait for it, then reuse its results
                out.append(run(cmd, folder))
        except RuntimeError as e:
            print(f"error: row {name} seed {seed}: {e}", flush=True)
            return str(e)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def interval(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean of `values` (nan for fewer than 2)."""
    n = len(values)
    if n < 2:
        return float("nan")
    return T95[max(k for k in T95 if k < n)] * mean_sd(values)[1] / math.sqrt(n)


def summarise(cfg: dict, results: dict) -> dict:
    """row -> seed -> [stage results] or an error -> per row and metric: values by seed, mean, sd, min, max, and the
    paired difference to the baseline row (mean, 95% t half-width, n)."""
    base = cfg["baseline"] or next(iter(cfg["rows"]))
    base_done = {s: r[-1] for s, r in results[base].items() if isinstance(r, list)}
    out = {}
    for name, by_seed in results.items():
        done = {s: r for s, r in by_seed.items() if isinstance(r, list)}
        seeds = sorted(done)
        row = out[name] = {"seeds": seeds, "failed": {s: r for s, r in by_seed.items() if isinstance(r, str)},
                           "stages": len(stages(cfg["rows"][name])), "metrics": {}}
        if not done:
            continue
        row["steps"] = [sum(st["iter"] for st in done[s]) for s in seeds]
        row["stage_steps"] = [[st["iter"] for st in done[s]] for s in seeds]
        row["videos"] = [sum(st.get("videos_seen", 0) for st in done[s]) for s in seeds]
        row["minutes"] = statistics.mean(sum(st["time_s"] for st in done[s]) / 60 for s in seeds)
        if row["stages"] > 1:  # what the first stage alone gives, e.g. a pre-trained checkpoint before fine-tuning
            row["first_stage_t2v_R1"] = mean_sd([done[s][0]["t2v"]["R1"] for s in seeds])
        for split, r in METRICS:
            values = [done[s][-1][split][r] for s in seeds]
            m, sd = mean_sd(values)
            entry = row["metrics"][f"{split}_{r}"] = {"values": values, "mean": m, "sd": sd, "min": min(values),
                                                      "max": max(values)}
            paired = [done[s][-1][split][r] - base_done[s][split][r] for s in seeds if s in base_done]
            if name != base and paired:
                entry["diff"] = {"mean": mean_sd(paired)[0], "pm": interval(paired), "n": len(paired)}
    return out


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"  # nan -> "-"


def markdown(cfg: dict, summary: dict) -> str:
    # chains also show their first stage's T2V R@1 and their steps stage by stage ("750+1122")
    chains = any(row["stages"] > 1 for row in summary.values())
    heads = [f"{split.upper()} R@{r[1:]} mean ± sd (min-max)" for split, r in METRICS]
    heads += [f"T2V R@1 - {cfg['baseline'] or next(iter(cfg['rows']))} (95% CI)"]
    heads += ["T2V R@1 after stage 1"] * chains + ["steps", "videos", "minutes"]
    lines = ["| row | seeds | " + " | ".join(heads) + " |", "|---" * (2 + len(heads)) + "|"]
    for name, row in summary.items():
        if not row["metrics"]:
            cells = ["failed"] * len(METRICS) + ["-"] * (len(heads) - len(METRICS))
        else:
            cells = [f"{fmt(e['mean'])} ± {fmt(e['sd'])} ({fmt(e['min'])}-{fmt(e['max'])})"
                     for e in row["metrics"].values()]
            diff = row["metrics"]["t2v_R1"].get("diff")
            cells.append(f"{diff['mean']:+.1f} ± {fmt(diff['pm'])} (n={diff['n']})" if diff else "-")
            if chains:
                first = row.get("first_stage_t2v_R1")
                cells.append(f"{fmt(first[0])} ± {fmt(first[1])}" if first else "-")
            cells.append("/".join(sorted({"+".join(map(str, st)) for st in row["stage_steps"]})))
            cells.append("/".join(map(str, sorted(set(row["videos"])))))
            cells.append(f"{row['minutes']:.1f}")
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: dict, path: str):
    """Training loss and val T2V R@1 against steps: per row the mean over seeds and a band from min to max."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure to close
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); no curves.png", flush=True)
        return
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_r1 = fig.subplots(1, 2)
    for name, by_seed in results.items():
        done = [r for r in by_seed.values() if isinstance(r, list)]
        curves = {"loss": {}, "r1": {}}  # kind -> iter -> values over seeds
        for stage_results in done:
            offset = 0
            for stage in stage_results:  # a chain's stages one after the other
                with open(os.path.join(stage["folder"], "log.jsonl")) as f:
                    for rec in map(json.loads, f):
                        kind, value = ("r1", rec["val"]["t2v"]["R1"]) if "val" in rec else ("loss", rec["loss"])
                        curves[kind].setdefault(offset + rec["iter"], []).append(value)
                offset += stage["iter"]
        for ax, kind in ((ax_loss, "loss"), (ax_r1, "r1")):
            steps = sorted(curves[kind])
            if not steps:
                continue
            mean = [sum(curves[kind][s]) / len(curves[kind][s]) for s in steps]
            line, = ax.plot(steps, mean, label=f"{name} ({len(done)} seeds)")
            ax.fill_between(steps, [min(curves[kind][s]) for s in steps], [max(curves[kind][s]) for s in steps],
                            color=line.get_color(), alpha=0.2)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="training loss (mean, min-max band)")
    ax_r1.set(xlabel="optimizer step", ylabel="val T2V R@1", title="val T2V R@1 (mean, min-max band)")
    ax_r1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    cfg = configurator.configure({k: globals()[k] for k in config_keys}, sys.argv[1:] if argv is None else argv,
                                 prog="study.py", descriptions=configurator.describe(__file__))
    valid = [isinstance(r, (str, tuple)) and stages(r) and all(isinstance(s, str) for s in stages(r))
             for r in cfg["rows"].values()]
    if not cfg["rows"] or not all(valid):
        raise ValueError("rows: expected {name: 'train.py arguments'} (or a tuple of argument strings for a chain), "
                         f"got {cfg['rows']!r}")
    if cfg["baseline"] and cfg["baseline"] not in cfg["rows"]:
        raise ValueError(f"baseline: no row {cfg['baseline']!r}; the rows are {list(cfg['rows'])}")
    if not cfg["seeds"]:
        raise ValueError("seeds: give at least one seed")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    # row by row: rows that share their first stages find them done, rather than waiting for them
    jobs = [(name, seed) for name in cfg["rows"] for seed in cfg["seeds"]]
    shared, lock = {}, threading.Lock()
    with ThreadPoolExecutor(cfg["workers"]) as pool:  # threads only wait for their train.py processes
        done = dict(zip(jobs, pool.map(lambda job: run_row_seed(cfg, *job, shared, lock), jobs)))
    results = {name: {seed: done[name, seed] for seed in cfg["seeds"]} for name in cfg["rows"]}
    summary = summarise(cfg, results)
    table = markdown(cfg, summary)
    with open(os.path.join(cfg["out_dir"], cfg["name"] + ".json"), "w") as f:
        json.dump({"settings": cfg, "summary": summary, "runs": results}, f, indent=1)
    with open(os.path.join(cfg["out_dir"], cfg["name"] + ".md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)
    if cfg["plot"]:
        plot_curves(results, os.path.join(cfg["out_dir"], cfg["name"] + "_curves.png"))
    failed = [f"{name} seed {s}" for name, row in summary.items() for s in row["failed"]]
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed: {', '.join(failed)}; their errors are above")
    return summary


if __name__ == "__main__":
    run_script(main)
