# The gradient-keeping all-gather of the fine-tuning loss on 2 gloo processes (forked: no second torch import, about
# a second): after DDP's averaging, each parameter's gradient is the one-process gradient of the global batch.
import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M

WORLD, ROWS, DIM, WIDTH = 2, 6, 5, 8


def setup():
    """(encoder, inputs, targets) shared by every rank and the one-process reference."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(DIM, WIDTH)
    x = torch.randn(WORLD * ROWS, DIM)
    targets = torch.randn(WORLD * ROWS, WIDTH)
    return encoder, x, targets


def loss_of(emb, targets):
    # a contrastive loss over the global batch, as fine-tuning's: every row's logits involve every other row
    logits = 10 * F.normalize(emb, dim=-1) @ F.normalize(targets, dim=-1).T
    labels = torch.arange(len(emb))
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


def rank_main(rank, init_file, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        encoder, x, targets = setup()
        emb = M.gather_with_grad(encoder(x[rank * ROWS:(rank + 1) * ROWS]))  # this rank's rows, then everyone's
        loss = loss_of(emb, targets)
        loss.backward()
        grads = [p.grad.clone() for p in encoder.parameters()]
        for g in grads:  # what DDP does with parameter gradients
            dist.all_reduce(g)
            g /= WORLD
        # plain lists: a tensor would travel as a shared-memory handle that dies with this process
        queue.put((rank, emb.tolist(), loss.item(), [g.tolist() for g in grads]))
    finally:
        dist.destroy_process_group()


def test_gather_gives_the_one_process_gradient(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, str(tmp_path / "init"), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict((r, rest) for r, *rest in (queue.get(timeout=60) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    encoder, x, targets = setup()
    emb = encoder(x)
    loss = loss_of(emb, targets)
    loss.backward()
    for rank in range(WORLD):
        got_emb, got_loss, grads = results[rank]
        torch.testing.assert_close(torch.tensor(got_emb), emb.detach())  # every rank's rows, in rank order
        torch.testing.assert_close(torch.tensor(got_loss), loss.detach())
        for g, p in zip(map(torch.tensor, grads), encoder.parameters()):
            # observed: up to 2.4e-7 apart on gradients up to 3.2 (summation order); one scaled by 1/2 is ~1 off
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-6)
    assert all(p.exitcode == 0 for p in procs)


def test_gather_is_the_identity_on_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert M.gather_with_grad(x) is x
