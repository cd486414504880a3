import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from synthetic import prepare_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a model small enough that a few steps take well under a second on one core
TINY = ["--embed_dim=32", "--vision_width=32", "--vision_layers=1", "--vision_patch_size=8", "--transformer_width=32",
        "--transformer_heads=1", "--transformer_layers=1", "--temporal_layers=1", "--bert_hidden_size=32",
        "--bert_layers=1", "--bert_heads=1", "--proj_hidden=32", "--image_size=32", "--num_frames=4",
        "--context_length=16", "--tag_context_length=8", "--eval_batch_size=16", "--num_workers=0", "--device=cpu",
        "--dtype=float32", "--compile=False", "--log_interval=1", "--eval_interval=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "synthetic")
    prepare_synthetic(out, seed=0, num_train=96, test_single=4, test_double=1, val_single=2, val_double=0,
                      verbose=False)
    return out


def run(argv):
    train.main(argv)


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


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


# compiled: torch.compile around DDP, through the gradient-summing all-gather of the loss
@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_two_process_gloo_matches_one_process(data, tmp_path, compiled):
    common = ["train.py", "--data_dir=" + data, "--batch_size=8", "--epochs=2", "--max_iters=4", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p1 = subprocess.run([sys.executable, *common, f"--out_dir={one}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         *common, f"--out_dir={two}", f"--compile={compiled}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-3000:]
    assert ("compiling the model" in p2.stdout) == compiled
    a, b = log(one), log(two)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5)
    ra = json.load(open(os.path.join(one, "results.json")))
    rb = json.load(open(os.path.join(two, "results.json")))
    assert rb["num_videos"] == ra["num_videos"]


# training recipes: every file in config/ except eval.py's (eval_*.py)
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "config", "*.py"))
                 if not os.path.basename(p).startswith("eval_"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke(recipe, data, tmp_path):
    # every recipe at toy size: scratch towers, the synthetic data, two steps, so none of them rots
    argv = [os.path.join(ROOT, "config", recipe), "--init_from=scratch", "--data_dir=" + data,
            "--eval_dataset=None", "--eval_caption_field=None", f"--out_dir={tmp_path}", "--max_iters=2",
            "--batch_size=4", "--queue_size=8", "--bert_path=None", "--bert_vocab=" + os.path.join(data, "vocab.txt"),
            "--gradient_accumulation_steps=1", *TINY]
    config = train.configure(train._DEFAULTS, argv)
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
    with pytest.raises(SystemExit, match="unknown config key 'learning_rat'.*learning_rate"):
        run(base + ["--learning_rat=1e-3"])
    with pytest.raises(SystemExit, match="queue_size=10 must be a multiple of the global batch"):
        run(base + ["--pretrain=True", "--batch_size=4", "--queue_size=10"])
    with pytest.raises(SystemExit, match="English MLM is not supported"):
        run(base + ["--pretrain=True", "--weight_mlm=0.05"])
    with pytest.raises(FileNotFoundError, match="python prepare.py msrvtt"):
        run([f"--out_dir={tmp_path}", "--dataset=msrvtt", "--data_dir=" + str(tmp_path / "nothing"), *TINY])


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
