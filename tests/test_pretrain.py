# Pre-training bookkeeping through real train.py runs: the momentum encoders' EMA after each optimizer step, and an
# exact resume of a Chinese pre-training run (MLM masks, dropout, tags, random frames and augmentation all draw
# from the RNGs a checkpoint must carry).
import os

import torch

import train
from conftest import TINY, log

ONLINE_TO_MOMENTUM = {"video": "video_m", "text": "text_m", "projector": "projector_m"}


def test_momentum_encoders_are_the_ema_of_the_weights_after_each_step(synthetic_data, tmp_path, steps):
    # theta_m <- m theta_m + (1 - m) theta, once per optimizer step and with the weights that step produced: with
    # two micro-steps per step, m = 0.5 and no warm-up, a missing, early or per-micro-step update is far off
    out = tmp_path / "run"
    train.main(["--data_dir=" + synthetic_data, f"--out_dir={out}", "--pretrain=True", "--weight_mlm=0",
                "--batch_size=4", "--queue_size=8", "--gradient_accumulation_steps=2", "--momentum=0.5",
                "--warmup_proportion=0", "--max_iters=4", *TINY])
    assert len(steps) == 1 + 4
    final = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    # the EMA covers parameters; BN running statistics of the momentum projector come from its own forwards
    online = sorted(k for k in steps.params if k.split(".")[0] in ONLINE_TO_MOMENTUM)
    momentum_of = {k: ONLINE_TO_MOMENTUM[k.split(".")[0]] + k[k.index("."):] for k in online}
    assert len(online) > 20 and all(m in final for m in momentum_of.values())
    ema = {k: steps[0][k] for k in online}  # the momentum encoders start as copies
    for i, state in enumerate(steps):
        if i > 0:
            assert not all(torch.equal(state[k], steps[i - 1][k]) for k in online)  # the weights did move
        for k in online:
            # before step i's update they still hold the EMA of the weights up to step i - 1
            # (observed: 1.2e-10 apart, torch's lerp against the formula; 1e-7 is one fp32 rounding of the LayerNorm
            # weights near 1, for another CPU's lerp kernel; a misplaced update is ~1e-4 off)
            torch.testing.assert_close(state[momentum_of[k]], ema[k], rtol=0, atol=1e-7, msg=f"step {i}: {k}")
        ema = {k: 0.5 * ema[k] + 0.5 * state[k] for k in online}
    for k in online:
        torch.testing.assert_close(final[momentum_of[k]], ema[k], rtol=0, atol=1e-7, msg=k)


def test_pretraining_resumes_exactly(synthetic_data, tmp_path, steps):
    # Chinese pre-training with every random draw on: MLM masking, BERT dropout, tags, random frame sampling and
    # per-frame augmentation. Evaluated after every step, stopped after step 2 and resumed, it makes the same
    # losses and the same weights, queues and momentum encoders as an uninterrupted run that never evaluates, step
    # for step: a checkpoint carries every RNG, and an evaluation leaves them as they were.
    common = ["--data_dir=" + synthetic_data, "--pretrain=True", "--text_encoder=bert", "--caption_field=captions_zh",
              "--bert_vocab=" + os.path.join(synthetic_data, "vocab.txt"), "--bert_pooling=mean", "--bert_dropout=0.1",
              "--weight_mlm=0.5", "--use_tags=True", "--frame_sample=random", "--augment=frame", "--batch_size=4",
              "--queue_size=8", "--seed=11", *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(common + [f"--out_dir={straight}", "--max_iters=4"])
    straight_steps = steps[1:]
    steps.clear()
    train.main(common + [f"--out_dir={split}", "--max_iters=2", "--eval_interval=1"])
    split_steps = steps[1:]
    steps.clear()
    train.main(common + [f"--out_dir={split}", "--max_iters=4", "--init_from=resume"])
    split_steps += steps[1:]
    a, b = log(straight), log(split)
    assert [r["iter"] for r in b] == [1, 2, 3, 4]
    assert all(r["loss_mlm"] > 0 for r in a)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k.startswith("loss")} == \
               {k: v for k, v in rb.items() if k.startswith("loss")}, ra["iter"]
    assert len(straight_steps) == len(split_steps) == 4
    for i, (want, got) in enumerate(zip(straight_steps, split_steps), start=1):
        for k, v in want.items():
            assert torch.equal(v, got[k]), f"step {i}: {k}"
    sa = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    sb = torch.load(split / "ckpt.pt", weights_only=True)["model"]
    assert {"queue_tag", "queue_frame", "mlm_head.decoder.weight", "text_m.bert.embeddings.word_embeddings.weight"} \
        <= sa.keys()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k
