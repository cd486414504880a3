# HMMC under DDP: 2 CPU processes with gloo against 1 process holding the whole batch.
# - fine-tuning: gather_with_grad makes every rank compute the global loss and sums gradients back, so the DDP-averaged
#   gradients equal the single-process gradients of the same loss;
# - pre-training: keys are all-gathered before the enqueue, so the queues are identical on both ranks; without the
#   BatchNorm projector (weight_fam=0) the whole run also equals one process with the global batch.
# BatchNorm: SyncBatchNorm needs CUDA, so on CPU the projector keeps plain per-rank BatchNorm (batch statistics over the
# local batch). That changes the FAM values, not the queue bookkeeping; with FAM on we assert only that the ranks agree.
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M

pytestmark = pytest.mark.slow

WORLD, B_LOCAL, T, RES, STEPS = 2, 2, 3, 16, 3
G = WORLD * B_LOCAL


def tiny_cfg(**kw):
    clip = M.CLIPConfig(embed_dim=32, image_resolution=RES, vision_layers=1, vision_width=64, vision_patch_size=8,
                        context_length=12, vocab_size=50, transformer_width=64, transformer_heads=1,
                        transformer_layers=1, eot_id=49)
    return M.HMMCConfig(clip=clip, num_frames=T, max_frames=8, temporal_layers=1, queue_size=2 * G, proj_hidden=16,
                        weight_mlm=0.0, **kw)


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, 49, (G, 8), generator=g)
    ids[:, -1] = 49  # EOT
    tag_ids = torch.randint(1, 49, (G, 5), generator=g)
    tag_ids[:, -1] = 49
    return dict(video=torch.randn(G, T, 3, RES, RES, generator=g), ids=ids, mask=torch.ones_like(ids),
                tag_ids=tag_ids, tag_mask=torch.ones_like(tag_ids))


def shard(batch, rank, world):
    n = batch["video"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def finetune_step(model, batch):
    loss, parts = model(batch)
    loss.backward()
    raw = model.module if isinstance(model, DDP) else model
    return {"loss": loss.detach(), "video": parts["video"], "frame": parts["frame"],
            "grads": {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None}}


def pretrain_run(model, rank, world):
    raw = model.module if isinstance(model, DDP) else model
    opt = raw.configure_optimizers(0.05, 1e-3, 1.0, 1e-3, (0.9, 0.98), 1e-6, "cpu")
    for step in range(STEPS):
        loss, _ = model(shard(global_batch(step), rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw.momentum_update()  # once per optimizer step, as train.py does
    return {k: v.clone() for k, v in raw.state_dict().items() if k.startswith("queue_")}


def wrap(model):
    # queues must not be overwritten by rank 0's at every forward (they are identical anyway; this saves the copy).
    # torch >= 2.13 spells broadcast_buffers=False as forward_sync_buffers=False
    if "forward_sync_buffers" in DDP.__init__.__code__.co_varnames:
        return DDP(model, forward_sync_buffers=False)
    return DDP(model, broadcast_buffers=False)


def close(a, b, rel=1e-5, msg=""):
    # relative to the tensor's largest entry: sums over 2 ranks vs 1 reorder float additions
    assert (a - b).abs().max() <= rel * b.abs().max() + 1e-6, f"{msg}: max diff {(a - b).abs().max():.3g}"


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        torch.manual_seed(0)
        ddp = wrap(M.HMMC(tiny_cfg()))
        out["finetune"] = finetune_step(ddp, shard(global_batch(0), rank, world))
        for name, kw in (("pretrain_nobn", dict(weight_fam=0.0)), ("pretrain_bn", {})):
            torch.manual_seed(0)
            ddp = wrap(M.HMMC(tiny_cfg(pretrain=True, **kw)))
            out[name] = pretrain_run(ddp, rank, world)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.time() + 240
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                pytest.fail("DDP workers did not finish within 240 s")
    finally:  # also when the test is stopped from outside (pytest-timeout, Ctrl-C)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_finetune_loss_and_grads_equal_single_process(ranks):
    torch.manual_seed(0)
    ref = finetune_step(M.HMMC(tiny_cfg()), global_batch(0))
    for r in ranks:
        # every rank computes the loss over the gathered global batch
        torch.testing.assert_close(r["finetune"]["loss"], ref["loss"])
        torch.testing.assert_close(r["finetune"]["frame"], ref["frame"])
        # DDP averaged the per-rank gradients; with the summing gather that is the full-batch gradient
        assert r["finetune"]["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            close(r["finetune"]["grads"][n], g, msg=n)


def test_queues_identical_across_ranks(ranks):
    for name in ("pretrain_bn", "pretrain_nobn"):
        q0, q1 = ranks[0][name], ranks[1][name]
        assert q0.keys() == q1.keys() and "queue_tag" in q0
        for k in q0:
            assert torch.equal(q0[k], q1[k]), (name, k)
        assert int(q0["queue_ptr"]) == (STEPS * G) % (2 * G)


def test_pretraining_equals_single_process_without_bn(ranks):
    torch.manual_seed(0)
    ref = pretrain_run(M.HMMC(tiny_cfg(pretrain=True, weight_fam=0.0)), 0, 1)
    for k, v in ref.items():
        close(ranks[0]["pretrain_nobn"][k], v, rel=1e-4, msg=k)
