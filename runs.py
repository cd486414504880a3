"""
A run lives in its out_dir, and the command that started it continues it (torchrun --max-restarts, requeued jobs):
start_or_resume, checkpoints with a checksum and the one before as a fallback, SIGTERM and Ctrl-C after a step.
"""
import hashlib
import json
import os
import signal
from contextlib import contextmanager

import torch

import eval as hmmc_eval
import model as hmmc_model
from common import print0

PREEMPTED = 75  # exit status after SIGTERM and a checkpoint (EX_TEMPFAIL: rerun the same command to continue)
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT, as a shell reports it), checkpoint saved or not
# settings a resumed run may change: they decide reporting and resources, not the trajectory (max_iters only stops
# early; the schedule comes from epochs)
RESUME_OVERRIDABLE = ("max_iters", "eval_interval", "log_interval", "num_workers", "eval_batch_size", "device",
                      "compile", "activation_checkpointing", "max_bad_fraction", "keep_epoch_checkpoints")
# no part of a run: where it lives, how this command starts it, where a new run's CLIP/BERT files are
NOT_THE_RUN = ("out_dir", "auto_resume", "overwrite", "eval_only", "clip_path", "bert_path", "bert_vocab")
RUN_FILES = ("ckpt.pt", "ckpt.pt.sha256", "ckpt.prev.pt", "ckpt.prev.pt.sha256", "best.pt", "best.pt.sha256",
             "log.jsonl", "results.json")


def start_or_resume(config: dict, given: set, defaults: dict) -> tuple[dict, str | None]:
    """(the run's settings, the checkpoint to resume from or None). init_from="resume" refuses a given setting that
    would change the run; a new run continues a checkpoint of the same settings (auto_resume) and refuses another
    run's unless overwrite=True."""
    folder, forced = config["out_dir"], config["init_from"] == "resume"
    if config["eval_only"] and not forced:  # writes nothing
        return config, None
    # overwrite holds for a command's first start only: torchrun's restarts of it continue the new run
    if config["overwrite"] and not forced and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        removed = [f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))] + sorted(
            f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if f.startswith("ckpt_epoch"))
        if removed and int(os.environ.get("RANK", 0)) == 0:
            for f in removed:
                os.remove(os.path.join(folder, f))
            print0(f"overwrite: deleted {', '.join(removed)} of the run in {folder}/")
        path = None
    else:
        path = latest_checkpoint(folder)
    if path is None:
        if forced:
            raise FileNotFoundError(f"no checkpoint at {os.path.join(folder, 'ckpt.pt')} to resume: --out_dir must be "
                                    f"the folder of an earlier run")
        print0(f"starting a new run in {folder}/")
        return config, None
    ckpt = hmmc_model.read_checkpoint(path, mmap=True)
    saved, iter_num = {**defaults, **ckpt["config"]}, ckpt["iter_num"]
    changed = [f"{k} ({saved[k]!r} -> {config[k]!r})" for k in config if k in (given - {"init_from"} if forced else
               config) and k not in RESUME_OVERRIDABLE + NOT_THE_RUN and config[k] != saved[k]]
    if changed and forced:
        raise SystemExit(f"config error: resuming {path} keeps the run's settings, but this command changes "
                         f"{', '.join(changed)}; drop them, or start a new run with another --out_dir (a resumed run "
                         f"may change only {', '.join(RESUME_OVERRIDABLE)})")
    # what a refused command can do instead: --init_from=resume with the changed settings would be refused too
    instead = (f"start this run with another --out_dir, or with --overwrite=True (deletes that run's files); continue "
               f"that run with python train.py --init_from=resume --out_dir={folder}")
    if changed:
        raise SystemExit(f"{folder} holds the checkpoint of another run (differs in: {', '.join(changed)}); {instead}")
    if not forced and not config["auto_resume"]:
        raise SystemExit(f"{folder} holds a checkpoint of this run (iter {iter_num}) and auto_resume=False; {instead}")
    run = {**{k: saved[k] for k in defaults}, **{k: config[k] for k in NOT_THE_RUN}}
    for k in RESUME_OVERRIDABLE:
        if (k in given or k == "device") and config[k] != run[k]:  # the device is the machine's, not the run's
            print0(f"resume: {k}={config[k]!r} instead of the run's {run[k]!r}")
            run[k] = config[k]
    print0(f"resuming {path} at iter {iter_num}")
    return run, path


def latest_checkpoint(folder: str) -> str | None:
    """ckpt.pt, else ckpt.prev.pt, saying why one is passed over; None where neither is; none usable ends the run."""
    problems = []
    for path in (os.path.join(folder, "ckpt.pt"), os.path.join(folder, "ckpt.prev.pt")):
        if not os.path.exists(path):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(f"{path}: {problem}")
        print0(f"refusing checkpoint {path}: {problem}")
    if problems:
        raise SystemExit(f"no usable checkpoint in {folder}/ ({'; '.join(problems)}); restore one, or start over "
                         f"with --overwrite=True")
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint cannot be resumed from, or None; one without a .sha256 (edited by hand) is trusted."""
    if os.path.exists(path + ".sha256"):
        with open(path + ".sha256") as f:
            if f.read().strip() != sha256_file(path):
                return f"its sha256 does not match {os.path.basename(path)}.sha256 (corrupt or partly written)"
    try:
        ckpt = hmmc_model.read_checkpoint(path, mmap=True)
    except ValueError as e:
        return str(e)
    if "optimizer" not in ckpt and {"config", "iter_num", "model"} <= ckpt.keys():
        return "it holds the weights only (as best.pt does: for evaluation and fine-tuning, not for resuming)"
    if not {"config", "iter_num", "model", "optimizer"} <= ckpt.keys():
        return "it is not a train.py checkpoint (no config, iter_num, model or optimizer)"
    return None


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(path: str, ckpt: dict, keep_previous: bool = True):
    """Write path and path.sha256 through .tmp files, the last ones kept as ckpt.prev.pt(.sha256)."""
    prev = path.replace("ckpt.pt", "ckpt.prev.pt")
    torch.save(ckpt, path + ".tmp")
    with open(path + ".sha256.tmp", "w") as f:
        f.write(sha256_file(path + ".tmp") + "\n")
    if keep_previous and os.path.exists(path):
        if os.path.exists(path + ".sha256"):
            os.replace(path + ".sha256", prev + ".sha256")
        os.replace(path, prev)
    os.replace(path + ".sha256.tmp", path + ".sha256")
    os.replace(path + ".tmp", path)


def checkpoint(model, optimizer, scaler, config: dict, **position) -> dict:
    """Everything an exact resume needs, as plain types and tensors (torch.load(weights_only=True) reads it)."""
    rng = {"torch": torch.get_rng_state()}  # the only RNGs a run draws from: data draws are functions of the index
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": model.state_dict(), "optimizer": pack_zero_rows(optimizer.state_dict()),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "model_args": model.cfg.to_dict(),
            "config": config, **position, "rng": rng}


def restore(ckpt: dict, optimizer, scaler) -> tuple[int, int, int, float]:
    """checkpoint() undone into the optimizer, the scaler and the RNGs -> (iter_num, epoch, step_in_epoch, best_r1)."""
    optimizer.load_state_dict(unpack_zero_rows(ckpt["optimizer"]))
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["iter_num"], ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_r1"]


def pack_zero_rows(optimizer_state: dict) -> dict:
    """Each matrix of the optimizer's state that is zero in most rows as its other rows and their indices: AdamW's
    moments of a token embedding stay zero for every token the data never holds (25 of 44 MB on the synthetic set)."""
    state = {i: dict(tensors) for i, tensors in optimizer_state["state"].items()}
    for tensors in state.values():
        for k, t in tensors.items():
            if torch.is_tensor(t) and t.dim() >= 2 and t.numel():
                # a row is kept when any of its bytes is nonzero (-0.0 too), so the round trip is exact
                kept = t.contiguous().view(torch.uint8).reshape(len(t), -1).any(dim=1).nonzero().flatten()
                if 2 * len(kept) <= len(t):
                    tensors[k] = {"packed_rows": kept.cpu(), "values": t[kept], "shape": list(t.shape)}
    return {**optimizer_state, "state": state}


def unpack_zero_rows(optimizer_state: dict) -> dict:
    """pack_zero_rows undone, bit for bit."""
    state = {i: dict(tensors) for i, tensors in optimizer_state["state"].items()}
    for tensors in state.values():
        for k, t in tensors.items():
            if isinstance(t, dict) and "packed_rows" in t:
                tensors[k] = torch.zeros(t["shape"], dtype=t["values"].dtype, device=t["values"].device)
                tensors[k][t["packed_rows"].to(t["values"].device)] = t["values"]
    return {**optimizer_state, "state": state}


def trim_log(path: str, iter_num: int):
    """Drop the log lines after iter_num: the steps a killed run did after its last checkpoint are done again."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["iter"] <= iter_num]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def show_results(out_dir: str, iter_num: int) -> bool:
    """A finished run started again: print its results.json and return True."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        results = json.load(f)
    if results.get("iter") != iter_num:
        return False
    print0(f"the run in {out_dir}/ is finished (iter {iter_num}, results in {path}); nothing to do")
    for r in filter(None, (results, results.get("best_on_test"))):
        print0(hmmc_eval.format_table(r, f"{r['split']} split, {r['weights']}"))
    return True


stop = {signal.SIGTERM: False, signal.SIGINT: False}  # set by the handler; the loop acts on them after a step
_owner = None  # the training process: its data loader workers inherit the handler, and leave Ctrl-C to it


def _on_signal(signum, frame):
    """SIGTERM and the first Ctrl-C ask for a checkpoint after the current step; a second Ctrl-C stops at once (a
    save it interrupts leaves the previous checkpoint)."""
    if os.getpid() != _owner:  # a data loader worker: a terminal sends Ctrl-C to every process of the job
        return
    if signum == signal.SIGINT and stop[signum]:
        raise KeyboardInterrupt
    if signum == signal.SIGINT and int(os.environ.get("RANK", 0)) == 0:  # to stderr's fd: it may interrupt a print
        os.write(2, b"\nCtrl-C: saving a checkpoint after this step; Ctrl-C again stops at once\n")
    stop[signum] = True


@contextmanager
def catch_signals(*signums):
    global _owner
    _owner = os.getpid()
    before = {s: signal.signal(s, _on_signal) for s in signums}
    stop.update(dict.fromkeys(signums, False))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def fault_injection(rank: int, iter_num: int):
    """For the tests: HMMC_TEST_SIGNAL="rank:iter:SIGNAL[@group]:marker[;...]" makes that rank send the signal to
    itself (or its process group, as a terminal does) at step `iter` once, while the marker file does not exist."""
    for spec in filter(None, os.environ.get("HMMC_TEST_SIGNAL", "").split(";")):
        r, it, name, marker = spec.split(":", 3)
        if int(r) == rank and int(it) == iter_num and not os.path.exists(marker):
            open(marker, "w").close()
            name, _, to = name.partition("@")
            sig = getattr(signal, "SIG" + name)
            os.killpg(os.getpgid(0), sig) if to == "group" else os.kill(os.getpid(), sig)
