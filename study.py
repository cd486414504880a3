"""
Experiments over seeds: run every row of a table (a set of train.py settings) at several seeds, two runs at a time,
and print the mean, standard deviation and range of each metric, and each row's difference to the baseline row,
seed by seed. A researcher's way to tell a change from a seed.

$ python study.py config/study_synthetic.py                    # the README's first table: 5 seeds x 4 rows
$ python study.py --rows="{'base': '', 'lr': '--learning_rate=3e-4'}" --seeds="(1, 2, 3)" --plot=True

A row is one train.py command line (config files and --key=value, as typed after `python train.py`), or a tuple of
them: a chain whose every later stage starts from the stage before's best.pt, the weights its results.json reports
(pre-training, then fine-tuning). Every run is `python train.py ROW --seed=S --out_dir=out_dir/ROW/seedS[/stageN]`
with one CPU thread: the command is printed and written beside its output, so any run can be repeated alone. A run
whose results.json was written by the same command is reused; one that stopped half-way continues (train.py
resumes it).

Writes out_dir/study.json (settings, every run's results) and out_dir/study.md (the table); with plot=True also
out_dir/study_curves.png: training loss and val R@1 against steps, per row, mean over seeds with a band from min to
max. Another `name` writes another table's files beside them, reusing the runs the tables share.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
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
    return [row] if isinstance(row, str) else list(row)


def run_folder(cfg: dict, name: str, seed: int, stage: int, n_stages: int) -> str:
    folder = os.path.join(cfg["out_dir"], name, f"seed{seed}")
    return os.path.join(folder, f"stage{stage + 1}") if n_stages > 1 else folder


def command(args: str, seed: int, folder: str, previous: str | None, extra: str) -> list[str]:
    """The train.py command line of one run (the interpreter and script path left out)."""
    cmd = shlex.split(args)
    if previous:  # a later stage of a chain starts from the weights the stage before reported (results.json)
        cmd.append(f"--init_from={os.path.join(previous, 'best.pt')}")
    return [*cmd, *shlex.split(extra), f"--seed={seed}", f"--out_dir={folder}"]


def run(cmd: list[str], folder: str) -> dict:
    """One train.py run (reused when its results.json came from the same command) -> its results.json, with the
    command and the minutes it took. A failure raises a one-line error naming the run and its log."""
    os.makedirs(folder, exist_ok=True)
    line = "python train.py " + shlex.join(cmd)
    cmd_path, results_path, log_path = (os.path.join(folder, f) for f in ("command.txt", "results.json", "train.log"))
    same = os.path.exists(cmd_path) and open(cmd_path).read().strip() == line
    if same and os.path.exists(results_path):
        with open(results_path) as f:
            return {**json.load(f), "command": line, "folder": folder, "reused": True}
    print("$ " + line, flush=True)
    with open(cmd_path, "w") as f:
        f.write(line + "\n")
    # another command in the folder: its run is replaced; the same command continues a run that stopped half-way
    full = [sys.executable, os.path.join(ROOT, "train.py"), *cmd] + ([] if same else ["--overwrite=True"])
    t0 = time.time()
    with open(log_path, "a" if same else "w") as log:
        done = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode or not os.path.exists(results_path):
        with open(log_path) as f:
            last = ([s for s in f.read().splitlines() if s.strip()] or ["(no output)"])[-1]
        raise RuntimeError(f"{line} failed (exit {done.returncode}): {last.strip()} (log: {log_path})")
    with open(results_path) as f:
        return {**json.load(f), "command": line, "folder": folder, "minutes": round((time.time() - t0) / 60, 2),
                "reused": False}


def run_row_seed(cfg: dict, name: str, seed: int, shared: dict, lock: threading.Lock) -> list[dict]:
    """Every stage of one row at one seed, in order -> their results. Rows that begin with the same stages share
    them (`shared`: (seed, stages so far) -> folder and its lock): one pre-training serves every fine-tuning row."""
    row_stages, previous, out = stages(cfg["rows"][name]), None, []
    for i, args in enumerate(row_stages):
        with lock:
            folder, busy = shared.setdefault((seed, tuple(row_stages[:i + 1])), (
                run_folder(cfg, name, seed, i, len(row_stages)), threading.Lock()))
        with busy:  # another row running the same stage: wait for it, then reuse its results
            out.append(run(command(args, seed, folder, previous, cfg["train_args"]), folder))
        previous = folder
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, sd


def interval(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean of `values` (nan for fewer than 2)."""
    n = len(values)
    if n < 2:
        return float("nan")
    t = T95.get(n - 1) or T95[max(k for k in T95 if k <= n - 1)]
    return t * mean_sd(values)[1] / math.sqrt(n)


def metric(result: dict, key: tuple) -> float:
    return result[key[0]][key[1]]


def summarise(cfg: dict, results: dict) -> dict:
    """results: row -> seed -> [stage results] (a failed run: an error string) -> per row, per metric: values by
    seed, mean, sd, min, max, and the paired difference to the baseline row (mean, 95% t half-width, n)."""
    base = cfg["baseline"] or next(iter(cfg["rows"]))
    out = {}
    for name, by_seed in results.items():
        done = {s: r[-1] for s, r in by_seed.items() if isinstance(r, list)}  # the last stage's results
        row = {"seeds": sorted(done), "failed": {s: r for s, r in by_seed.items() if isinstance(r, str)},
               "stages": len(stages(cfg["rows"][name])), "metrics": {}}
        if done:
            last = [done[s] for s in row["seeds"]]
            row["steps"] = [sum(st["iter"] for st in by_seed[s]) for s in row["seeds"]]
            row["stage_steps"] = [[st["iter"] for st in by_seed[s]] for s in row["seeds"]]
            row["videos"] = [sum(st.get("videos_seen", 0) for st in by_seed[s]) for s in row["seeds"]]
            row["minutes"] = mean_sd([sum(st["time_s"] for st in by_seed[s]) / 60 for s in row["seeds"]])[0]
            if row["stages"] > 1:  # what the first stage alone gives, e.g. a pre-trained checkpoint before fine-tuning
                row["first_stage_t2v_R1"] = mean_sd([by_seed[s][0]["t2v"]["R1"] for s in row["seeds"]])
            for key in METRICS:
                values = [metric(r, key) for r in last]
                m, sd = mean_sd(values)
                entry = {"values": values, "mean": m, "sd": sd, "min": min(values), "max": max(values)}
                paired = [metric(done[s], key) - metric(results[base][s][-1], key) for s in row["seeds"]
                          if isinstance(results[base].get(s), list)]
                if name != base and paired:
                    entry["diff"] = {"mean": mean_sd(paired)[0], "pm": interval(paired), "n": len(paired)}
                row["metrics"]["_".join(key)] = entry
        out[name] = row
    return out


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"  # nan -> "-"


def markdown(cfg: dict, summary: dict) -> str:
    base = cfg["baseline"] or next(iter(cfg["rows"]))
    names = ["_".join(k) for k in METRICS]
    heads = [f"{split.upper()} R@{r[1:]}" for split, r in METRICS]
    # chains: the first stage's own T2V R@1 (e.g. a pre-trained checkpoint before fine-tuning: the weights the next
    # stage starts from), and steps stage by stage ("750+1122")
    chains = any(row["stages"] > 1 for row in summary.values())
    first = " | T2V R@1 after stage 1" if chains else ""
    lines = ["| row | seeds | " + " | ".join(f"{h} mean ± sd (min-max)" for h in heads)
             + f" | T2V R@1 - {base} (95% CI){first} | steps | videos | minutes |",
             "|---|---|" + "---|" * (len(names) + chains) + "---|---|---|---|"]
    for name, row in summary.items():
        if not row["metrics"]:
            lines.append(f"| {name} | 0 | " + " | ".join("failed" for _ in names) + " | -" * (4 + chains) + " |")
            continue
        cells = [f"{fmt(e['mean'])} ± {fmt(e['sd'])} ({fmt(e['min'])}-{fmt(e['max'])})"
                 for e in (row["metrics"][n] for n in names)]
        diff = row["metrics"]["t2v_R1"].get("diff")
        d = f"{diff['mean']:+.1f} ± {fmt(diff['pm'])} (n={diff['n']})" if diff else "-"
        if chains:
            m_sd = row.get("first_stage_t2v_R1")
            d += f" | {fmt(m_sd[0])} ± {fmt(m_sd[1])}" if m_sd else " | -"
        steps = "/".join(sorted({"+".join(map(str, st)) for st in row["stage_steps"]}))
        videos = "/".join(map(str, sorted(set(row["videos"]))))
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) +
                     f" | {d} | {steps} | {videos} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def plot_curves(results: dict, path: str):
    """Training loss and val T2V R@1 against steps: per row the mean over seeds and a band from min to max."""
    try:
        import matplotlib
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); no curves.png", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_seed in results.items():
        done = [r for r in by_seed.values() if isinstance(r, list)]
        curves = {"loss": {}, "r1": {}}  # kind -> iter -> values over seeds
        for stage_results in done:
            offset = 0
            for stage in stage_results:
                last = 0
                with open(os.path.join(stage["folder"], "log.jsonl")) as f:
                    for rec in map(json.loads, f):
                        kind = "r1" if "val" in rec else "loss"
                        value = rec["val"]["t2v"]["R1"] if kind == "r1" else rec["loss"]
                        curves[kind].setdefault(offset + rec["iter"], []).append(value)
                        last = rec["iter"]
                offset += last  # a chain's stages one after the other
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
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    cfg = configurator.configure({k: globals()[k] for k in config_keys}, sys.argv[1:] if argv is None else argv,
                                 prog="study.py", descriptions=configurator.describe(__file__))
    if not cfg["rows"] or not all(isinstance(r, str) or (isinstance(r, tuple) and r and
                                                           all(isinstance(s, str) for s in r))
                                  for r in cfg["rows"].values()):
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

    def job(name_seed):
        try:
            return run_row_seed(cfg, *name_seed, shared, lock)
        except RuntimeError as e:
            print(f"error: row {name_seed[0]} seed {name_seed[1]}: {e}", flush=True)
            return str(e)

    with ThreadPoolExecutor(cfg["workers"]) as pool:  # threads only wait for their train.py processes
        done = dict(zip(jobs, pool.map(job, jobs)))
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
