# How real runs start and step: train.py --init_from=clip on OpenAI-layout CLIP weights and a HF BERT folder (the
# tiny golden ones of tests/golden), activation checkpointing, which must not change a step, and the gradient a step
# applies under accumulation.
import math
import os

import pytest
import torch

import model as hmmc_model
import prepare
import towers
import train
from tokenizer import get_tokenizer
from conftest import TINY, log

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
CLIP_TINY, BERT_TINY = os.path.join(GOLDEN, "clip_tiny.pt"), os.path.join(GOLDEN, "bert_tiny")
# the towers' sizes in TINY do not matter: init_from=clip reads them off the weights (32-px frames, as TINY's)
FROM_CLIP = [*TINY, "--init_from=clip", "--batch_size=4", "--max_iters=2", "--warmup_proportion=0"]


def golden_clip_sd():
    return {k: v.float() for k, v in torch.load(CLIP_TINY, weights_only=True)["state_dict"].items()}


def test_chinese_run_from_golden_clip_and_bert(synthetic_data, tmp_path, steps, capsys):
    out = tmp_path / "run"
    train.main(["--data_dir=" + synthetic_data, f"--out_dir={out}", *FROM_CLIP, f"--clip_path={CLIP_TINY}",
                "--text_encoder=bert", f"--bert_path={BERT_TINY}", "--caption_field=captions_zh",
                "--bert_vocab=" + os.path.join(synthetic_data, "vocab.txt")])
    assert f"loaded CLIP from {CLIP_TINY} and BERT from {BERT_TINY}" in capsys.readouterr().out
    # the model the optimizer starts from holds the golden weights: the vision tower and the whole BERT
    start, clip_sd = steps[0], golden_clip_sd()
    for k, v in clip_sd.items():
        if k.startswith("visual."):
            assert torch.equal(start["video." + k], v), k
    bert_sd = hmmc_model.load_bert_state_dict(BERT_TINY)
    assert {k for k in bert_sd if k != "embeddings.position_ids"} <= {k[len("text.bert."):] for k in start
                                                                    if k.startswith("text.bert.")}
    for k, v in bert_sd.items():
        if k != "embeddings.position_ids":
            assert torch.equal(start["text.bert." + k], v), k
    # the architecture came from the files, not from the scratch sizes in TINY
    args = torch.load(out / "ckpt.pt", weights_only=True)["model_args"]
    assert (args["clip"]["vision_width"], args["clip"]["embed_dim"]) == (128, 32)
    assert (args["bert"]["hidden_size"], args["bert"]["num_hidden_layers"], args["bert"]["vocab_size"]) == (32, 2, 100)
    records = log(out)
    assert [r["iter"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert not torch.equal(steps[-1]["video.visual.conv1.weight"], start["video.visual.conv1.weight"])  # it trains


def test_english_run_from_golden_clip(synthetic_data, tmp_path, steps):
    # the golden CLIP's 256-token vocabulary grown to the tokenizer's 49,408 ids (OpenAI's layout: the last two are
    # the start and end tokens); every other tensor as made by the reference
    sd = golden_clip_sd()
    vocab = get_tokenizer("clip").vocab_size
    grown = torch.randn(vocab, sd["token_embedding.weight"].shape[1], generator=torch.Generator().manual_seed(0))
    grown[:256] = sd["token_embedding.weight"]
    clip_path = tmp_path / "clip_full_vocab.pt"
    torch.save({**sd, "token_embedding.weight": grown}, clip_path)
    out = tmp_path / "run"
    train.main(["--data_dir=" + synthetic_data, f"--out_dir={out}", *FROM_CLIP, f"--clip_path={clip_path}"])
    text_keys = {k.removeprefix("text.") for k in steps[0] if k.startswith("text.")}
    assert {"token_embedding.weight", "ln_final.weight", "text_projection"} <= text_keys
    assert text_keys <= sd.keys()
    for k in text_keys - {"token_embedding.weight"}:
        assert torch.equal(steps[0]["text." + k], sd[k]), k
    assert torch.equal(steps[0]["text.token_embedding.weight"][:256], sd["token_embedding.weight"])
    assert torch.equal(steps[0]["video.visual.proj"], sd["visual.proj"])
    assert [r["iter"] for r in log(out)] == [1, 2]
    # the golden file itself: too few token embeddings for the tokenizer, said before any step
    with pytest.raises(SystemExit, match=f"the clip text encoder of {CLIP_TINY} has 256 token embeddings, fewer "
                                         f"than the {vocab} ids of the clip tokenizer"):
        train.main(["--data_dir=" + synthetic_data, f"--out_dir={tmp_path / 'small'}", *FROM_CLIP,
                    f"--clip_path={CLIP_TINY}"])


def block_forwards(argv) -> int:
    """Run train.py; how many times a transformer block started a forward (a recomputation in backward counts too:
    it may stop before the block's end once it has the tensors it needs)."""
    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, *_: calls.append(1) if isinstance(module, towers.ResidualAttentionBlock) else None)
    try:
        train.main(argv)
    finally:
        hook.remove()
    return len(calls)


def test_activation_checkpointing_changes_no_step(synthetic_data, tmp_path):
    # pre-training (every tower, online and momentum): the blocks run again in backward, and the losses are the
    # same, step for step (compiled: tests/test_train.py's two-process gloo test)
    common = ["--data_dir=" + synthetic_data, "--batch_size=4", "--queue_size=8", "--max_iters=3", "--pretrain=True",
              "--weight_mlm=0", *TINY]
    plain = block_forwards(common + [f"--out_dir={tmp_path / 'plain'}"])
    recomputed = block_forwards(common + [f"--out_dir={tmp_path / 'ckpt'}", "--activation_checkpointing=True"])
    assert recomputed > plain
    a, b = log(tmp_path / "plain"), log(tmp_path / "ckpt")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert rb["loss"] == ra["loss"], ra["iter"]


def test_accumulated_gradient_is_the_mean_of_the_micro_steps(synthetic_data, tmp_path, steps):
    # two micro-steps of 4 videos per optimizer step: the step applies the mean of their gradients, as the same two
    # batches through the starting weights by hand give (no clipping, which would hide a scale)
    train.main(["--data_dir=" + synthetic_data, f"--out_dir={tmp_path}", "--batch_size=4",
                "--gradient_accumulation_steps=2", "--grad_clip=0", "--max_iters=1", "--seed=4", *TINY])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net = hmmc_model.HMMC(hmmc_model.HMMCConfig.from_dict(ckpt["model_args"]))
    net.load_state_dict(steps[0])
    data = prepare.VideoTextDataset(synthetic_data, "train", get_tokenizer("clip"), mode="train",
                                    num_frames=4, context_length=16, image_size=32, seed=4, verbose=False)
    for indices in train.epoch_batches(len(data), 4, 1, 0, seed=4, epoch=0)[:2]:
        loss, _ = net(torch.utils.data.default_collate([data[i] for i in indices]))
        (loss / 2).backward()
    applied = steps.grads[0]
    assert applied.keys() == {n for n, p in net.named_parameters() if p.grad is not None}
    for n, p in net.named_parameters():
        # observed: bit-identical (gradients up to 103); 1e-5 relative leaves room for another summation order;
        # a sum instead of the mean is 2x
        torch.testing.assert_close(applied[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)
