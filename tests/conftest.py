import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def require(*programs):
    """Skip the calling test where one of the programs (names on PATH, or paths) is missing, but fail it where CI
    is set: .ci/run installs them, and a CI job without them must not pass by skipping."""
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    why = f"needs {', '.join(missing)} (not installed)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, but this test {why}", pytrace=False)
    pytest.skip(why)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*programs): the test runs these programs; see conftest.require")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        require(*mark.args)


def run_group(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a process group of its own, killed as a whole when
    the command times out or the test is stopped (pytest-timeout, Ctrl-C): torchrun's ranks would outlive torchrun
    alone and wait for each other for half an hour."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:  # the whole group, even after the launcher exited: a rank may be left behind
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


# ----------------------------------------------------------------------------- train.py runs

# a model small enough that a train.py step takes well under a second on one core
TINY = ["--embed_dim=32", "--vision_width=32", "--vision_layers=1", "--vision_patch_size=8", "--transformer_width=32",
        "--transformer_heads=1", "--transformer_layers=1", "--temporal_layers=1", "--bert_hidden_size=32",
        "--bert_layers=1", "--bert_heads=1", "--proj_hidden=32", "--image_size=32", "--num_frames=4",
        "--context_length=16", "--tag_context_length=8", "--eval_batch_size=16", "--num_workers=0", "--device=cpu",
        "--dtype=float32", "--compile=False", "--log_interval=1", "--eval_interval=0"]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small built-in synthetic dataset (48 training videos, English and Chinese captions and tags)."""
    from synthetic import prepare_synthetic
    out = str(tmp_path_factory.mktemp("synthetic") / "synthetic")
    prepare_synthetic(out, seed=0, num_train=48, test_single=4, test_double=1, val_single=2, val_double=0,
                      verbose=False)
    return out


def log(out_dir, kind="train"):
    """A run's log.jsonl: its training records (a loss per log interval), or with kind="val" its evaluations."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if ("val" in r) == (kind == "val")]


class StateLog(list):
    def __init__(self):
        super().__init__()
        self.params, self.grads = set(), []  # parameter names; the gradients each step applied


@pytest.fixture
def steps(monkeypatch):
    """Watches train.py's optimizer: a list that gets a copy of the model's state dict at the start, then right after
    each optimizer.step() (before anything else of that iteration runs). Its `params` names the model's
    parameters (the rest of the state dict is buffers: queues, BN statistics), its `grads` holds the gradients each
    step applied."""
    import model as hmmc_model
    seen = StateLog()
    configure = hmmc_model.HMMC.configure_optimizers

    def watched(self, *args, **kwargs):
        optimizer = configure(self, *args, **kwargs)
        seen.params = {n for n, _ in self.named_parameters()}
        seen.append({k: v.clone() for k, v in self.state_dict().items()})

        def after_step(*_):
            seen.append({k: v.clone() for k, v in self.state_dict().items()})
            seen.grads.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(hmmc_model.HMMC, "configure_optimizers", watched)
    return seen
