import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch

import eval as hmmc_eval
import model as hmmc_model
import prepare
import runs
import study
import synthetic
import train
from conftest import TINY, log, run_group
from synthetic import prepare_synthetic
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "synthetic")
    prepare_synthetic(out, seed=0, num_train=96, test_single=4, test_double=1, val_single=2, val_double=0,
                      verbose=False)
    return out


def run(argv):
    train.main(argv)


# ----------------------------------------------------------------------------- schedule and sampler

def test_get_lr_matches_hmmc_warmup_cosine():
    # f(x) = x / w below the warm-up fraction, 0.5 (1 + cos(pi x)) after it, x = step / t_total
    assert train.get_lr(0, 100, 0.1) == 0.0  # the first step runs at lr 0
    assert train.get_lr(5, 100, 0.1) == pytest.approx(0.5)
    assert train.get_lr(9, 100, 0.1) == pytest.approx(0.9)
    assert train.get_lr(10, 100, 0.1) == pytest.approx(0.9755282581475768)  # the drop at the end of warm-up
    assert train.get_lr(50, 100, 0.1) == pytest.approx(0.5)
    assert train.get_lr(75, 100, 0.1) == pytest.approx(0.14644660940672627)
    assert train.get_lr(20, 100, 0.2) == pytest.approx(0.9045084971874737)  # 0.5 (1 + cos 0.2 pi)
    # MSR-VTT fine-tuning: 703 steps x 5 epochs, warm-up 351.5 steps
    t_total = train.schedule_length(703, 1, 5)
    assert t_total == 3515
    assert train.get_lr(351, t_total, 0.1) == pytest.approx(351 / 351.5)
    assert train.get_lr(352, t_total, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 352 / 3515)))
    assert train.get_lr(3514, t_total, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3514 / 3515)))
    # accumulation: int(len + GA - 1) / GA * epochs, a float division as in the original
    assert train.schedule_length(10, 4, 3) == pytest.approx(13 / 4 * 3)


def test_epoch_batches_deterministic_and_rank_independent():
    one = train.epoch_batches(50, 8, 1, 0, seed=3, epoch=2)
    assert one == train.epoch_batches(50, 8, 1, 0, seed=3, epoch=2)
    assert one != train.epoch_batches(50, 8, 1, 0, seed=3, epoch=3)
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    two = [train.epoch_batches(50, 8, 2, r, seed=3, epoch=2) for r in range(2)]
    # the two ranks' halves put together are exactly the one-process batches
    assert [a + b for a, b in zip(*two)] == one


# ----------------------------------------------------------------------------- runs

# 96 training captions / batch 8 = 12 steps per epoch: stop mid-epoch, and exactly at the end of an epoch (the
# loader already holds the next epoch's first batch then, one copy ahead)
@pytest.mark.parametrize("stop, total", [(6, 12), (12, 15)])
def test_exact_resume(data, tmp_path, stop, total):
    common = ["--data_dir=" + data, "--batch_size=8", "--epochs=3", "--seed=5", *TINY]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(common + [f"--out_dir={straight}", f"--max_iters={total}"])
    run(common + [f"--out_dir={split}", f"--max_iters={stop}"])
    assert torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["step_in_epoch"] == stop
    run(common + [f"--out_dir={split}", f"--max_iters={total}", "--init_from=resume"])
    a, b = log(straight), log(split)
    assert [r["iter"] for r in b] == list(range(1, total + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    sb = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert sa["iter_num"] == sb["iter_num"] == total
    assert (sa["epoch"], sa["step_in_epoch"]) == ((total - 1) // 12, (total - 1) % 12 + 1)  # the last batch used
    assert (sb["epoch"], sb["step_in_epoch"]) == (sa["epoch"], sa["step_in_epoch"])
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    results = json.load(open(os.path.join(split, "results.json")))
    assert set(results["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"} and "v2t" in results


# compiled: torch.compile around DDP, through the gradient-summing all-gather of the loss and the checkpointed
# (recomputed) transformer blocks
@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_two_process_gloo_matches_one_process(data, tmp_path, compiled):
    common = ["train.py", "--data_dir=" + data, "--batch_size=8", "--epochs=2", "--max_iters=4", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p1 = run_group([sys.executable, *common, f"--out_dir={one}"], timeout=240, cwd=ROOT, env=env)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                    f"--out_dir={two}", f"--compile={compiled}", f"--activation_checkpointing={compiled}"],
                   timeout=240, cwd=ROOT, env=env)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-3000:]
    assert ("compiling the model" in p2.stdout) == compiled
    a, b = log(one), log(two)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5)
    ra = json.load(open(os.path.join(one, "results.json")))
    rb = json.load(open(os.path.join(two, "results.json")))
    assert rb["num_videos"] == ra["num_videos"]


# what common.cleanup_compute leaves: a rank whose gloo threads outlive it can abort in interpreter shutdown
# ("terminate called without an active exception") when a thread frees a collective's tensors there
GLOO_EXIT = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
from common import cleanup_compute, init_compute

def gloo_threads():
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)

def steps(fail):
    init_compute("cpu")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4), gradient_as_bucket_view=True)
    model(torch.ones(2, 4)).sum().backward()
    print(f"rank {os.environ['RANK']} before: {gloo_threads()}", flush=True)
    if fail:
        raise SystemExit(3)  # the DDP wrapper stays a local of this frame, in the traceback

try:
    steps(sys.argv[2] == "fail")
finally:
    cleanup_compute()
    print(f"rank {os.environ['RANK']} after: {gloo_threads()}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["return", "fail"])
def test_cleanup_ends_the_gloo_threads(tmp_path, how):
    script = tmp_path / "gloo_exit.py"
    script.write_text(GLOO_EXIT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), ROOT, how], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == (0 if how == "return" else 1), p.stdout[-2000:] + p.stderr[-3000:]
    for rank in (0, 1):
        assert "pt_gloo_runloop" in re.search(f"rank {rank} before: (.*)", p.stdout).group(1)
        assert f"rank {rank} after: []" in p.stdout


# training recipes: every file in config/ except eval.py's (eval_*.py) and study.py's (study_*.py)
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "config", "*.py"))
                 if not os.path.basename(p).startswith(("eval_", "study_")))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke(recipe, data, tmp_path):
    # every recipe at toy size: scratch towers, the synthetic data, two steps, so none of them rots
    argv = [os.path.join(ROOT, "config", recipe), "--init_from=scratch", "--data_dir=" + data,
            "--eval_dataset=None", "--eval_caption_field=None", f"--out_dir={tmp_path}", "--max_iters=2",
            "--batch_size=4", "--queue_size=8", "--bert_path=None", "--bert_vocab=" + os.path.join(data, "vocab.txt"),
            "--gradient_accumulation_steps=1", *TINY]
    config = train.configure(train.DEFAULTS, argv)
    argv.append("--caption_field=" + ("captions_zh" if config["text_encoder"] == "bert" else "captions"))
    run(argv)
    assert len(log(str(tmp_path))) == 2
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "ckpt.pt")


def test_finetune_from_pretrained_checkpoint(data, tmp_path):
    common = ["--data_dir=" + data, "--batch_size=4", "--max_iters=1", "--queue_size=8", *TINY]
    run(common + [f"--out_dir={tmp_path / 'pre'}", "--pretrain=True", "--weight_mlm=0"])
    run(common + [f"--out_dir={tmp_path / 'ft'}", f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}"])
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert not any(k.startswith(("video_m.", "queue_")) for k in ckpt["model"])
    assert ckpt["model_args"]["pretrain"] is False and ckpt["config"]["init_from"].endswith("ckpt.pt")


# ----------------------------------------------------------------------------- bad input

def test_bad_config_errors(data, tmp_path):
    base = ["--data_dir=" + data, f"--out_dir={tmp_path}", *TINY]
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'.*learning_rate"):
        run(base + ["--learning_rat=1e-3"])
    with pytest.raises(ValueError, match="queue_size=10 must be a multiple of the global batch"):
        run(base + ["--pretrain=True", "--weight_mlm=0", "--batch_size=4", "--queue_size=10"])
    with pytest.raises(ValueError, match="MLM pre-training needs the bidirectional BERT text encoder"):
        run(base + ["--pretrain=True", "--weight_mlm=0.05"])
    with pytest.raises(FileNotFoundError, match="python prepare.py msrvtt"):
        run([f"--out_dir={tmp_path}", "--dataset=msrvtt", "--data_dir=" + str(tmp_path / "nothing"), *TINY])


def tree(folder) -> dict:
    """Every file and folder under `folder`: relative path -> bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(folder).rglob("*"))}


def test_a_users_data_folder_is_never_written(data, tmp_path, monkeypatch):
    # the user's own folder without frames.lmdb (`dataset` is "synthetic" by default): refused with what is missing
    # and how to make it, and not a byte of it changes
    mine = tmp_path / "mydata"
    mine.mkdir()
    for split in ("train", "test"):
        (mine / f"{split}.jsonl").write_text(Path(data, f"{split}.jsonl").read_text().splitlines()[0] + "\n")
    (mine / "NOTES.txt").write_text("my notes\n")
    before = tree(mine)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"dataset 'synthetic' is not prepared: frames.lmdb missing in {mine}; python prepare.py frames "
            f"--videos=VIDEO_DIR --out={mine}/frames.lmdb makes the frames")):
        run([f"--data_dir={mine}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1", *TINY])
    assert tree(mine) == before and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=f"{mine} holds files but no frames.lmdb"):  # nor does prepare.py
        prepare_synthetic(str(mine), num_train=4, test_single=1, test_double=0, val_single=1, val_double=0)
    assert tree(mine) == before
    # the built-in set is written where nothing is: its own data/synthetic, a new folder, an empty one
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(synthetic.BUILT_IN, "synthetic", dict(num_train=16, test_single=2, test_double=0,
                                                              val_single=1, val_double=0))
    (mine / "empty").mkdir()
    for i, where in enumerate(([], ["--data_dir=new"], ["--data_dir=mydata/empty"])):
        run(where + ["--batch_size=8", "--max_iters=1", f"--out_dir=out{i}", *TINY])
    for folder in ("data/synthetic", "new", "mydata/empty"):
        assert sorted(os.listdir(folder)) == ["frames.lmdb", "test.jsonl", "train.jsonl", "val.jsonl", "vocab.txt"]
    # its own place, holding someone else's files: refused too
    shutil.rmtree("data/synthetic")
    os.makedirs("data/synthetic")
    Path("data/synthetic/NOTES.txt").write_text("mine\n")
    with pytest.raises(FileNotFoundError, match="holds files of another dataset; move them away"):
        run(["--max_iters=1", "--out_dir=out-again", *TINY])
    assert os.listdir("data/synthetic") == ["NOTES.txt"]


def test_start_up_says_what_differs_from_the_defaults_in_one_line(data, tmp_path, capsys):
    run(["--data_dir=" + data, f"--out_dir={tmp_path}", "--batch_size=4", "--max_iters=1", "--seed=3"])
    out = capsys.readouterr().out.splitlines()
    head = out[:next(i for i, line in enumerate(out) if line.startswith("iter 1/"))]
    assert f"settings: out_dir='{tmp_path}', seed=3, data_dir='{data}', batch_size=4, max_iters=1; the rest as in " \
           "train.py --help" in head
    assert not any(line.startswith(("config: ", "param group")) for line in head)
    # a config that is all defaults
    assert train.settings_line({**train.DEFAULTS, "out_dir": "out-synthetic"}) == "settings: all as in train.py --help"


def test_checkpoint_of_another_architecture(data, tmp_path):
    base = ["--data_dir=" + data, f"--out_dir={tmp_path}", "--batch_size=4", *TINY]
    run(base + ["--max_iters=1"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["temporal_layers"] = 2  # the tensors hold one layer
    torch.save(ckpt, tmp_path / "ckpt.pt")
    os.remove(tmp_path / "ckpt.pt.sha256")  # edited by hand: no checksum (trusted when it opens, as older ones)
    with pytest.raises(ValueError, match=r"ckpt\.pt holds another architecture.*missing \[video\.temporal\.resblocks\.1"):
        run(base + ["--max_iters=2", "--init_from=resume"])
    # fine-tuning from it with a deeper temporal module than it has: the missing keys are listed
    ckpt["model_args"]["temporal_layers"] = 1
    torch.save(ckpt, tmp_path / "pre.pt")
    with pytest.raises(ValueError, match=r"pre\.pt holds another architecture.*video\.temporal\.resblocks\.1"):
        run(base + ["--max_iters=2", f"--init_from={tmp_path / 'pre.pt'}", "--temporal_layers=2",
                    f"--out_dir={tmp_path / 'ft'}"])


def test_nan_loss_stops_with_step(data, tmp_path):
    cfg = tmp_path / "nan.py"
    cfg.write_text("sim_scale = float('nan')\n")
    with pytest.raises(SystemExit, match="loss is nan at iter 0"):
        run([str(cfg), "--data_dir=" + data, f"--out_dir={tmp_path}", "--batch_size=4", *TINY])


# ----------------------------------------------------------------------------- run folders and long runs

def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_new_run_refuses_another_runs_folder(data, tmp_path, capsys):
    base = ["--data_dir=" + data, f"--out_dir={tmp_path}", "--batch_size=8", "--max_iters=2", *TINY]
    run(base)
    before = files(tmp_path)
    assert {"ckpt.pt", "ckpt.pt.sha256", "best.pt", "log.jsonl", "results.json"} <= set(before)
    advice = (f"start this run with another --out_dir, or with --overwrite=True (deletes that run's files); "
              f"continue that run with python train.py --init_from=resume --out_dir={tmp_path}")
    with pytest.raises(SystemExit, match=re.escape(
            f"{tmp_path} holds the checkpoint of another run (differs in: use_temp (True -> False), batch_size "
            f"(8 -> 4)); {advice}")):
        run(base + ["--use_temp=False", "--batch_size=4"])
    assert files(tmp_path) == before  # not a byte touched
    # the advice works: the command it gives continues that run (finished: it shows its results)
    capsys.readouterr()
    run(advice.split("python train.py ")[1].split())
    out = capsys.readouterr().out
    assert f"the run in {tmp_path}/ is finished (iter 2" in out and "nothing to do" in out
    results = json.load(open(tmp_path / "results.json"))
    assert hmmc_eval.format_table(results, f"test split, {results['weights']}") in out
    assert files(tmp_path) == before
    with pytest.raises(SystemExit, match=re.escape(f"holds a checkpoint of this run (iter 2) and auto_resume=False; "
                                                   f"{advice}")):
        run(base + ["--auto_resume=False"])
    assert files(tmp_path) == before
    capsys.readouterr()
    run(base + ["--use_temp=False", "--overwrite=True"])
    assert "overwrite: deleted ckpt.pt, ckpt.pt.sha256, best.pt" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["use_temp"] is False
    assert len(log(tmp_path)) == 2


def test_default_out_dir_per_dataset_and_given_keys(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(["--data_dir=" + data, "--dataset=toy", "--batch_size=8", *TINY, "--max_iters=1"])
    assert (tmp_path / "out-toy" / "ckpt.pt").exists() and not (tmp_path / "out-synthetic").exists()
    # what a command sets itself: a resume compares only these with the run's settings; a config file's assignments
    # count even where they repeat the default
    recipe = tmp_path / "recipe.py"
    recipe.write_text("out_dir = 'out-x'\nuse_temp = True\nnum_workers = 0\n")
    given = set()
    train.configure(train.DEFAULTS, [str(recipe), "--batch_size=4", "--compile"], given=given)
    assert given == {"out_dir", "use_temp", "num_workers", "batch_size", "compile"}


def test_resume_keeps_the_runs_settings(data, tmp_path, capsys):
    run(["--data_dir=" + data, f"--out_dir={tmp_path}", "--batch_size=8", *TINY, "--eval_interval=2",
         "--max_iters=2"])
    # a resume takes the run's settings from its checkpoint: the command line needs none of them...
    resume = ["--data_dir=" + data, f"--out_dir={tmp_path}", "--init_from=resume"]
    with pytest.raises(SystemExit, match=r"this command changes num_frames \(4 -> 2\), batch_size \(8 -> 16\), "
                                         r"learning_rate \(0.001 -> 0.5\); drop them"):
        run(resume + ["--batch_size=16", "--num_frames=2", "--learning_rate=0.5", "--max_iters=4"])
    capsys.readouterr()
    run(resume + ["--max_iters=6"])
    assert "resume: max_iters=6 instead of the run's 2" in capsys.readouterr().out
    # ...and keeps the run's eval_interval=2: checkpoints at 4 and 6, not only at the end
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["iter_num"] == 4
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["iter_num"], ckpt["config"]["eval_interval"], ckpt["config"]["num_frames"]) == (6, 2, 4)
    assert ckpt["config"]["init_from"] == "scratch"  # the run's origin, not the resume
    # reporting settings may change, and the log says so
    run(resume + ["--max_iters=8", "--eval_interval=1"])
    assert "resume: eval_interval=1 instead of the run's 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["iter_num"] == 7
    assert [r["iter"] for r in log(tmp_path)] == list(range(1, 9))
    before = files(tmp_path)
    run(resume + ["--eval_only=True"])  # evaluates the run's checkpoint, writes nothing
    assert f"test split, initial weights ({tmp_path}/ckpt.pt)" in capsys.readouterr().out
    assert files(tmp_path) == before


def test_auto_resume_continues_the_same_command(data, tmp_path, monkeypatch, capsys):
    # one process, SIGTERM to itself at the start of step 4 (the test hook): the step ends, a checkpoint is
    # written and the run exits with the preemption status; the same command continues it, exactly
    cmd = ["--data_dir=" + data, "--batch_size=8", "--seed=3", *TINY, "--max_iters=6", "--eval_interval=4"]
    run(cmd + [f"--out_dir={tmp_path / 'straight'}"])
    cut = cmd + [f"--out_dir={tmp_path / 'cut'}"]
    monkeypatch.setenv("HMMC_TEST_SIGNAL", f"0:3:TERM:{tmp_path / 'marker'}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run(cut)
    assert stopped.value.code == runs.PREEMPTED == 75
    out = capsys.readouterr().out
    assert f"starting a new run in {tmp_path / 'cut'}/" in out
    assert f"SIGTERM: saved {tmp_path / 'cut'}/ckpt.pt at iter 4 and stopped (exit status 75)" in out
    run(cut)
    assert f"resuming {tmp_path / 'cut'}/ckpt.pt at iter 4" in capsys.readouterr().out
    assert [r["loss"] for r in log(tmp_path / "cut")] == [r["loss"] for r in log(tmp_path / "straight")]
    # a finished run rerun: nothing is trained or rewritten
    before = files(tmp_path / "cut")
    run(cut)
    assert "is finished (iter 6" in capsys.readouterr().out
    assert files(tmp_path / "cut") == before


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_the_same_command_continues(data, tmp_path):
    # a real process gets Ctrl-C at the start of step 6 (checkpoint at 4), sent to its process group as a terminal
    # does, so its data loader worker gets it too: the step ends, ckpt.pt at 6 is written, exit status 130; the same
    # command continues the run and ends as an uninterrupted one
    cmd = ["--data_dir=" + data, "--batch_size=8", "--seed=3", *TINY, "--max_iters=8", "--eval_interval=4",
           "--num_workers=1"]
    run(cmd + [f"--out_dir={tmp_path / 'straight'}"])
    cut = tmp_path / "cut"
    same = dict(args=[sys.executable, "train.py", *cmd, f"--out_dir={cut}"], cwd=ROOT, capture_output=True,
                text=True, timeout=300, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "HMMC_TEST_SIGNAL": f"0:5:INT@group:{tmp_path / 'marker'}"})
    p = subprocess.run(**same)
    assert p.returncode == runs.INTERRUPTED == 130, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("Ctrl-C: saving a checkpoint after this step; Ctrl-C again stops at once") == 1
    assert (f"Ctrl-C: saved {cut}/ckpt.pt at iter 6 and stopped (exit status 130); the same command continues "
            f"the run") in p.stdout
    assert torch.load(cut / "ckpt.pt", weights_only=True)["iter_num"] == 6
    assert torch.load(cut / "ckpt.prev.pt", weights_only=True)["iter_num"] == 4  # the last periodic one
    p = subprocess.run(**same)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert f"resuming {cut}/ckpt.pt at iter 6" in p.stdout
    assert [r["loss"] for r in log(cut)] == [r["loss"] for r in log(tmp_path / "straight")]
    results = [json.load(open(d / "results.json")) for d in (cut, tmp_path / "straight")]
    assert [(r["iter"], r["t2v"], r["v2t"]) for r in results] == [(8, results[1]["t2v"], results[1]["v2t"])] * 2


def test_a_second_ctrl_c_stops_at_once(data, tmp_path, monkeypatch, capsys):
    # two Ctrl-C at the start of step 4 (checkpoint at 2): the second stops the run at once, without a traceback and
    # without saving; the checkpoint at 2 is left, and the handler of before is back
    out = tmp_path / "run"
    monkeypatch.setenv("HMMC_TEST_SIGNAL", f"0:3:INT:{tmp_path / 'once'};0:3:INT:{tmp_path / 'twice'}")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run(["--data_dir=" + data, "--batch_size=8", *TINY, "--max_iters=6", "--eval_interval=2", f"--out_dir={out}"])
    assert stopped.value.code == runs.INTERRUPTED
    assert (f"Ctrl-C: stopped at once; the same command continues from {out}/ckpt.pt, the last checkpoint"
            in capsys.readouterr().out)
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2 and log(out)[-1]["iter"] == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_optimizer_rows_that_stay_zero_are_packed_exactly():
    # an embedding whose gradient reaches 3 of its 100 rows: AdamW's moments are zero elsewhere and are stored as the
    # 3 rows; a -0.0 counts as a value (kept), and a dense matrix is stored as it is
    table, dense = torch.nn.Parameter(torch.randn(100, 8)), torch.nn.Parameter(torch.randn(4, 8))
    optimizer = torch.optim.AdamW([table, dense], weight_decay=0.2)
    (table[[3, 50, 97]].sum() * 2 + dense.square().sum()).backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["exp_avg"][10, 2] = -0.0
    packed = runs.pack_zero_rows(state)
    assert packed["state"][0]["exp_avg"]["packed_rows"].tolist() == [3, 10, 50, 97]
    assert packed["state"][0]["exp_avg_sq"]["packed_rows"].tolist() == [3, 50, 97]
    assert torch.is_tensor(packed["state"][1]["exp_avg"])  # dense: left as it is
    restored = runs.unpack_zero_rows(packed)
    for i in (0, 1):
        for k, t in state["state"][i].items():
            bits = restored["state"][i][k].reshape(-1).view(torch.uint8)
            assert torch.equal(t.reshape(-1).view(torch.uint8), bits), (i, k)  # bit for bit
    assert runs.unpack_zero_rows(state) == state  # an older checkpoint's state, nothing packed
    optimizer.load_state_dict(restored)


def test_best_pt_holds_the_weights_only(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data_dir=" + data, "--batch_size=8", *TINY]
    run(base + [f"--out_dir={out}", "--max_iters=2", "--eval_interval=1"])
    best, ckpt = (torch.load(out / name, weights_only=True) for name in ("best.pt", "ckpt.pt"))
    assert set(ckpt) - set(best) == {"optimizer", "scaler", "rng"} and best["iter_num"] in (1, 2)
    assert runs.sha256_file(str(out / "best.pt")) == (out / "best.pt.sha256").read_text().strip()
    model_bytes = sum(t.numel() * t.element_size() for t in ckpt["model"].values())
    # ckpt.pt: the weights and AdamW's two moments, less the token rows that no caption holds (most of CLIP's 49,408):
    # 1.6x the weights instead of 3x
    tokenizer = get_tokenizer("clip", None)
    with open(os.path.join(data, "train.jsonl")) as f:
        words = {i for line in f for c in json.loads(line)["captions"] for i in tokenizer.encode(c)}
    token_rows = [t for s in ckpt["optimizer"]["state"].values() for t in s.values()
                  if isinstance(t, dict) and t["shape"][0] == 49408]
    assert len(token_rows) == 2 and all(0 < len(t["packed_rows"]) for t in token_rows)
    assert all(set(t["packed_rows"].tolist()) <= words | {49406, 49407} for t in token_rows)  # + start, end
    assert os.path.getsize(out / "best.pt") < 1.05 * model_bytes
    assert os.path.getsize(out / "ckpt.pt") < 1.2 * model_bytes
    # what best.pt is for: eval.py, fine-tuning from it, and the final test (a run with a val split reads it)
    metrics = hmmc_eval.main([f"--init_from={out / 'best.pt'}", "--device=cpu", "--num_workers=0",
                              f"--out={tmp_path / 'eval.json'}"])
    assert set(metrics["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"}
    run(base + [f"--out_dir={tmp_path / 'ft'}", "--max_iters=1", f"--init_from={out / 'best.pt'}"])
    assert json.load(open(tmp_path / "ft" / "results.json"))["iter"] == 1
    # and not for resuming: as ckpt.pt it is refused with why
    shutil.copy(out / "best.pt", out / "ckpt.pt")
    os.remove(out / "ckpt.pt.sha256")
    assert runs.checkpoint_problem(str(out / "ckpt.pt")).startswith("it holds the weights only (as best.pt does")


def test_truncated_checkpoint_is_one_short_reason(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"config": {}, "iter_num": 1, "model": {"w": torch.zeros(1000)}, "optimizer": {}}, path)
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
    assert runs.checkpoint_problem(path) == f"could not read checkpoint {path} (truncated or corrupt file?): " \
                                            "RuntimeError: PytorchStreamReader failed reading zip archive: failed " \
                                            "finding central directory"
    with pytest.raises(ValueError) as e:
        hmmc_model.read_checkpoint(path)
    assert str(e.value) == f"could not read checkpoint {path} (truncated or corrupt file?): RuntimeError: " \
                           "PytorchStreamReader failed reading zip archive: failed finding central directory"


def test_corrupt_checkpoint_falls_back_to_previous(data, tmp_path, capsys):
    base = ["--data_dir=" + data, f"--out_dir={tmp_path}", "--batch_size=8", *TINY, "--eval_interval=2",
            "--max_iters=4"]
    run(base)
    losses = [r["loss"] for r in log(tmp_path)]
    good = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    raw = bytearray((tmp_path / "ckpt.pt").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = bytes(255 - b for b in raw[len(raw) // 2: len(raw) // 2 + 16])
    (tmp_path / "ckpt.pt").write_bytes(bytes(raw))
    capsys.readouterr()
    run(base + ["--init_from=resume"])
    out = capsys.readouterr().out
    assert f"refusing checkpoint {tmp_path}/ckpt.pt: its sha256 does not match ckpt.pt.sha256" in out
    assert f"resuming {tmp_path}/ckpt.prev.pt at iter 2" in out
    assert [r["loss"] for r in log(tmp_path)] == losses  # steps 3 and 4 again, the same
    again = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, again["model"][k]) for k, v in good["model"].items())
    # the refused file was replaced, the good previous one kept
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["iter_num"] == 2
    assert runs.checkpoint_problem(str(tmp_path / "ckpt.pt")) is None
    # nothing usable at all: the run stops and names both
    (tmp_path / "ckpt.pt").write_bytes(b"junk")
    (tmp_path / "ckpt.prev.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"no usable checkpoint in .*ckpt\.pt: its sha256.*ckpt\.prev\.pt: its sha256"):
        run(base)


def damaged_copy(data: str, root: Path) -> tuple[str, list]:
    """The synthetic data with unreadable videos: garbage JPEGs, truncated JPEGs, a missing frame; and one video
    not in the LMDB at all. Returns (data dir, the three damaged video ids)."""
    out = root / "damaged"
    shutil.copytree(data, out)
    sampled = prepare.sample_frame_indices(8, 4, "uniform", None)  # the frames a 4-frame run reads
    env = lmdb.open(str(out / "frames.lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        for i in range(8):
            txn.put(f"train00003_{i}".encode(), b"not a jpeg")
            txn.put(f"train00007_{i}".encode(), bytes(txn.get(f"train00007_{i}".encode()))[:200])
            txn.delete(f"train00015_{i}".encode())
        txn.delete(f"train00011_{int(sampled[1])}".encode())
    env.close()
    return str(out), ["train00003", "train00007", "train00011"]


def test_unreadable_videos_are_replaced(data, tmp_path, capsys):
    damaged, bad = damaged_copy(data, tmp_path)
    # 95 readable-at-start videos / 8 = 11 steps per epoch: 14 steps see every video at least once
    base = ["--data_dir=" + damaged, "--batch_size=8", "--epochs=2", *TINY]
    run(base + [f"--out_dir={tmp_path / 'straight'}", "--max_iters=14"])
    out = capsys.readouterr().out
    assert "using 95 of 96 videos; 1 have no frames" in out  # the video missing from the LMDB
    for video in bad:
        assert len(re.findall(rf"unreadable video {video} \(", out)) == 1, video
    assert "unreadable video train00011 (KeyError" in out and "unreadable video train00003 (UnidentifiedImageError" in out
    assert json.load(open(tmp_path / "straight" / "results.json"))["iter"] == 14
    split = [f"--out_dir={tmp_path / 'split'}"]
    run(base + split + ["--max_iters=7"])
    run(base + split + ["--max_iters=14", "--init_from=resume"])
    assert [r["loss"] for r in log(tmp_path / "split")] == [r["loss"] for r in log(tmp_path / "straight")]
    with pytest.raises(SystemExit, match=r"could not be read, more than max_bad_fraction=0.0; check the frames"):
        run(base + [f"--out_dir={tmp_path / 'strict'}", "--max_bad_fraction=0"])


# 2 processes, 2 epochs of 11 steps at batch 8 on the damaged data, a checkpoint every 3 steps, stopping at 8
LONG = ["train.py", "--batch_size=8", "--epochs=2", "--seed=7", *TINY, "--eval_interval=3", "--max_iters=8"]


def torchrun(args: list, env: dict, restarts: int = 0) -> subprocess.CompletedProcess:
    return run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      f"--max-restarts={restarts}", *args], timeout=240, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def damaged(data, tmp_path_factory):
    return damaged_copy(data, tmp_path_factory.mktemp("damaged"))[0]


@pytest.fixture(scope="module")
def uninterrupted(damaged, tmp_path_factory):
    """The out_dir of an uninterrupted 2-process run of LONG."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    p = torchrun(LONG + ["--data_dir=" + damaged, f"--out_dir={out}"], {**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # the first 8 batches of seed 7 hold two damaged videos, on either rank: rank 0 reports each, once
    for video in ("train00007", "train00011"):
        assert p.stdout.count(f"unreadable video {video} (") == 1, video
    return out


def assert_same_run(a: str, b: str):
    assert [r["iter"] for r in log(b)] == list(range(1, 9))
    assert [r["loss"] for r in log(a)] == [r["loss"] for r in log(b)]
    sa, sb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert sa["iter_num"] == sb["iter_num"] == 8
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (a, b))
    assert (ra["t2v"], ra["v2t"]) == (rb["t2v"], rb["v2t"])


@pytest.mark.slow
def test_torchrun_restart_after_sigkill_continues_exactly(damaged, tmp_path, uninterrupted):
    # rank 1 is SIGKILLed at the start of step 5 (checkpoint at 3); torchrun reruns the same command, which resumes
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMMC_TEST_SIGNAL": f"1:4:KILL:{tmp_path / 'marker'}"}
    p = torchrun(LONG + ["--data_dir=" + damaged, f"--out_dir={out}"], env, restarts=1)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert os.path.exists(tmp_path / "marker")
    assert f"starting a new run in {out}/" in p.stdout and f"resuming {out}/ckpt.pt at iter 3" in p.stdout
    assert_same_run(uninterrupted, out)


def meeting_store():
    """The TCP store two hand-started ranks meet at (as torchrun's agent store): the test holds it, on a port the
    system picked, so no other process can take the port between its choice and the ranks' start."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_preemption_status(damaged, tmp_path, uninterrupted):
    # the two ranks started by hand (as a cluster launcher does) to read each one's exit status; only rank 1 gets
    # SIGTERM (at the start of step 5): both finish that step and stop together, rank 0 saves
    out, store = str(tmp_path / "run"), meeting_store()
    args = LONG + ["--data_dir=" + damaged, f"--out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMMC_TEST_SIGNAL": f"1:4:TERM:{tmp_path / 'marker'}",
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    procs = []
    try:
        for r in range(2):
            with open(tmp_path / f"out{r}", "w") as log_file:
                procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log_file,
                                              stderr=subprocess.STDOUT,
                                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:  # a rank left behind by a failure would keep a core busy
            if p.poll() is None:
                p.kill()
                p.wait()
    out0 = (tmp_path / "out0").read_text()
    assert codes == [runs.PREEMPTED, runs.PREEMPTED], out0[-3000:] + (tmp_path / "out1").read_text()[-3000:]
    assert f"SIGTERM: saved {out}/ckpt.pt at iter 5 and stopped (exit status 75)" in out0
    assert runs.checkpoint_problem(os.path.join(out, "ckpt.pt")) is None
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert (ckpt["iter_num"], ckpt["epoch"], ckpt["step_in_epoch"]) == (5, 0, 5)  # mid-epoch
    assert torch.load(os.path.join(out, "ckpt.prev.pt"), weights_only=True)["iter_num"] == 3
    p = torchrun(args, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert f"resuming {out}/ckpt.pt at iter 5" in p.stdout
    assert_same_run(uninterrupted, out)


def test_evaluation_uses_eval_context_length(data, tmp_path, capsys):
    # a pre-training-style run trains on longer captions (CHVTT titles: 45) than the benchmarks are read at (32):
    # the periodic, the final and the eval_only evaluation all read captions at eval_context_length
    out = str(tmp_path / "run")
    run(["--data_dir=" + data, "--batch_size=8", "--epochs=1", "--max_iters=2", *TINY, f"--out_dir={out}",
         "--context_length=20", "--eval_context_length=12", "--eval_interval=1"])
    printed = capsys.readouterr().out
    assert re.search(r"iter 1: val T2V .*\(captions of 12 tokens\)", printed)
    assert json.load(open(os.path.join(out, "results.json")))["context_length"] == 12
    config = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert (config["context_length"], config["eval_context_length"]) == (20, 12)
    run([f"--out_dir={out}", "--init_from=resume", "--eval_only=True", "--device=cpu"])
    assert "captions of 12 tokens" in capsys.readouterr().out


def test_results_without_val_split_report_final_and_best_on_test(data, tmp_path):
    # no val split (MSR-VTT): the final weights' metrics, and the original's best-chosen-on-test row, each labelled
    out = str(tmp_path / "run")
    run(["--data_dir=" + data, "--batch_size=8", "--epochs=1", "--max_iters=3", *TINY, f"--out_dir={out}",
         "--val_split=none", "--eval_interval=1"])
    results = json.load(open(os.path.join(out, "results.json")))
    best_iter = torch.load(os.path.join(out, "best.pt"), weights_only=True)["iter_num"]
    assert results["weights"] == "final weights (iter 3)" and results["iter"] == 3
    best = results["best_on_test"]
    assert best["iter"] == best_iter and "original's protocol, optimistic" in best["weights"]
    assert set(best["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"} and "v2t" in best
    # a run with a val split reports the best-by-val weights only: there is no test-chosen row
    out_val = str(tmp_path / "val")
    run(["--data_dir=" + data, "--batch_size=8", "--epochs=1", "--max_iters=2", *TINY, f"--out_dir={out_val}"])
    assert "best_on_test" not in json.load(open(os.path.join(out_val, "results.json")))


@pytest.mark.parametrize("recipe, text", [("finetune_vatex_en.py", 3e-5), ("finetune_vatex_zh.py", 1e-5)])
def test_vatex_recipes_train_the_clip_towers(recipe, text):
    # the original README's VATEX command carries --text_lr 3e-5 --coef_lr 8e-1: CLIP vision at 1e-4 x 0.8, not
    # MSR-VTT's effectively frozen 1e-7; the Chinese BERT keeps its own 1e-5
    from configurator import configure
    cfg = configure(train.DEFAULTS, [os.path.join(ROOT, "config", recipe)])
    assert cfg["learning_rate"] * cfg["clip_lr_scale"] == pytest.approx(8e-5)
    assert cfg["text_lr"] == pytest.approx(text)
    assert not cfg["freeze_clip_vision"] and not cfg["freeze_clip_text"]


def test_epoch_checkpoints(data, tmp_path):
    # 96 captions / batch 8 = 12 micro-steps per epoch; with 5 micro-steps per optimizer step the epoch ends inside
    # a step: ckpt_epoch{N}.pt is written after the step that finished the N-th epoch, complete and resumable
    out = str(tmp_path / "run")
    run(["--data_dir=" + data, "--batch_size=8", "--epochs=3", "--gradient_accumulation_steps=5", *TINY,
         f"--out_dir={out}", "--keep_epoch_checkpoints=True"])
    names = sorted(f for f in os.listdir(out) if f.startswith("ckpt_epoch"))
    assert names == ["ckpt_epoch1.pt", "ckpt_epoch1.pt.sha256", "ckpt_epoch2.pt", "ckpt_epoch2.pt.sha256"]
    for n, it in ((1, 3), (2, 5)):  # 36 micro-steps / 5 = 7 optimizer steps; epoch 3 ends in the dropped tail
        path = os.path.join(out, f"ckpt_epoch{n}.pt")
        assert runs.checkpoint_problem(path) is None
        assert torch.load(path, weights_only=True)["iter_num"] == it
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    plain = str(tmp_path / "plain")
    run(["--data_dir=" + data, "--batch_size=8", "--epochs=1", *TINY, f"--out_dir={plain}"])
    assert not [f for f in os.listdir(plain) if f.startswith("ckpt_epoch")]


def test_captions_cut_by_context_length_are_reported(data, tmp_path, capsys):
    vocab = os.path.join(data, "vocab.txt")
    base = ["--data_dir=" + data, "--batch_size=8", "--max_iters=1", *TINY, "--caption_field=captions_zh",
            "--text_encoder=bert", "--bert_vocab=" + vocab]
    tokenizer = get_tokenizer("bert", vocab)
    with open(os.path.join(data, "train.jsonl"), encoding="utf-8") as f:
        sizes = [len(tokenizer.encode(c)) + 2 for line in f for c in json.loads(line)["captions_zh"]]
    run(base + [f"--out_dir={tmp_path / 'short'}", "--context_length=12"])
    cut = sum(n > 12 for n in sizes)
    assert 0 < cut < len(sizes)
    out = capsys.readouterr().out
    assert (f"warning: {cut} of {len(sizes)} train captions are longer than context_length=12 tokens and are cut "
            f"(the longest needs {max(sizes)}); pass --context_length={max(sizes)}") in out
    assert "warning: a BERT trained from scratch with bert_pooling='cls'" in out  # the default pooling
    run(base + [f"--out_dir={tmp_path / 'whole'}", f"--context_length={max(sizes)}", "--bert_pooling=mean"])
    out = capsys.readouterr().out
    assert "are cut" not in out and "bert_pooling='cls'" not in out


@pytest.mark.slow
def test_pretrain_then_finetune_chain(data, tmp_path, capsys):
    # the pre-training study's chain (config/study_pretrain.py) at a tiny budget: pre-training, the hand-over of
    # its checkpoint, fine-tuning, evaluation
    args = ["--data_dir=" + data, "--eval_dataset=None", "--bert_vocab=" + os.path.join(data, "vocab.txt"),
            "--batch_size=4", "--queue_size=8", *TINY, "--context_length=24", "--max_iters=2"]
    out = tmp_path / "study"
    summary = study.main([os.path.join(ROOT, "config", "study_pretrain.py"), f"--out_dir={out}", "--seeds=(1,)",
                          "--baseline=scratch_short",
                          "--rows=" + repr({k: v for k, v in study_rows().items() if k in ("scratch_short",
                                                                                           "pretrained_short")}),
                          "--train_args=" + " ".join(args)])
    assert summary["scratch_short"]["stages"] == 1 and summary["pretrained_short"]["stages"] == 2
    fine = out / "pretrained_short" / "seed1" / "stage2"
    log_text = (fine / "train.log").read_text()
    handover = re.search(r"loaded \d+ tensors from .*pretrained_short/seed1/stage1/best.pt; dropped \d+ this model "
                         r"has no use for \((.*)\)", log_text)
    assert handover, log_text
    for part in ("mlm_head", "projector", "queue_video", "text_m", "video_m"):
        assert part in handover.group(1).split(", ")
    ckpt = str(fine / "ckpt.pt")
    assert torch.load(ckpt, weights_only=True)["model_args"]["bert_pooling"] == "mean"  # from the pre-training
    for weights in (fine.parent / "stage1" / "best.pt", ckpt):  # each stage's reported metrics are eval.py's
        metrics = hmmc_eval.main([f"--init_from={weights}", "--device=cpu", "--num_workers=0",
                                  f"--out={tmp_path / 'eval.json'}"])
        reported = json.load(open(os.path.join(os.path.dirname(weights), "results.json")))
        assert (metrics["t2v"], metrics["v2t"]) == (reported["t2v"], reported["v2t"]), weights
    assert summary["pretrained_short"]["metrics"]["t2v_R1"]["values"] == [metrics["t2v"]["R1"]]
    assert "| pretrained_short | 1 |" in capsys.readouterr().out


def study_rows(name: str = "study_pretrain") -> dict:
    namespace = {}
    exec(open(os.path.join(ROOT, "config", f"{name}.py")).read(), namespace)
    return namespace["rows"]


def test_study_configs_rows_are_the_runs_they_say(monkeypatch):
    # every stage of every row is a valid train.py command line, and the rows are the comparisons their files name
    monkeypatch.chdir(ROOT)
    settings = {name: {row: [train.configure(train.DEFAULTS, shlex.split(stage)) for stage in study.stages(args)]
                       for row, args in study_rows(name).items()} for name in ("study_pretrain", "study_queue")}
    pretrain = settings["study_pretrain"]
    for row, stages in pretrain.items():
        fine = stages[-1]
        assert not fine["pretrain"] and fine["caption_field"] == "captions_zh" and fine["dataset"] == "synthetic"
        assert fine["epochs"] == (9 if row.endswith("_full") else 1)  # the full schedule (1,683 steps) or one epoch
        assert len(stages) == (1 if row.startswith("scratch") else 2)
        if len(stages) == 2:
            assert stages[0]["pretrain"] and stages[0]["dataset"] == "synthetic_pretrain" and stages[0]["epochs"] == 2
    assert {r for r in pretrain if r.endswith("_full")} == {"scratch_full", "pretrained_full"}
    weights = {r: tuple(st[0][f"weight_{k}"] for k in ("fam", "vtm", "ftm", "mlm")) for r, st in pretrain.items()
               if len(st) == 2}
    assert weights.pop("pretrained_full") == weights.pop("pretrained_short") == (0.05, 0.45, 0.45, 0.05)
    assert sorted(w.count(0) for w in weights.values()) == [1, 1, 1, 1] and len(set(weights.values())) == 4
    queue = {row: stages for row, stages in settings["study_queue"].items()}
    for row, (cfg,) in queue.items():
        assert cfg["pretrain"] and cfg["epochs"] == 1 and cfg["queue_size"] == int(row.split("_")[1])
        assert cfg["queue_size"] % cfg["batch_size"] == 0
        probe = row.split("_", 2)[2:]  # each probe is a pair of queue lengths with one setting changed
        assert f"queue_{1024 if cfg['queue_size'] == 32 else 32}{'_' + probe[0] if probe else ''}" in queue
        changes = probe[0].split("_") if probe else []  # captions_m0999: the stale-key probe on the full captions
        assert (cfg["momentum"] == 0.999) == ("m0999" in changes)
        assert (cfg["learning_rate"] == cfg["text_lr"] == 3e-4) == ("lr3e-4" in changes)
        assert cfg["caption_field"] == ("captions_full_zh" if "captions" in changes else "captions_zh")
        assert (cfg["eval_caption_field"] or cfg["caption_field"]) == "captions_zh"
