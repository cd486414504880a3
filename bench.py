"""
Benchmark HMMC with random weights at real sizes: the fine-tuning and pre-training steps (videos/s, model FLOPs
utilisation, peak memory), one search query and the data loaders on real clips. Prints one table and writes JSON.

$ python bench.py                                   # GPU: ViT-B/32 and ViT-B/16, T=12, 32 tokens, bf16, fused AdamW
$ python bench.py --compile=True --models="('ViT-B/32',)" --batch_sizes="(128, 256)"
$ python bench.py --size=tiny                       # CI size: seconds on a CPU (the default without a GPU)

MFU = HMMC.flops_per_video * videos/s / the GPU's dense bf16 peak. A shared CPU's load moves absolute rates many-fold,
so there each step row shows the median ratio to a plain baseline (fp32, naive attention, eager) timed in alternation.
"""

import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import framestore
import model as hmmc_model
import prepare
import search
from common import autocast, init_compute, peak_flops, run_script, set_cpu_threads
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
_keys_before = set(globals())
size = "full" if torch.cuda.is_available() else "tiny"  # "full": ViT-B/32 + B/16, 224 px, T=12, L=32 | "tiny": CI
models = ("ViT-B/32", "ViT-B/16")  # which towers to time at size="full"
batch_sizes = (128,)  # videos per training step (one GPU)
num_frames = 12  # frames per video (T)
context_length = 32  # text tokens per caption (L)
steps = 10  # timed steps per measurement (after warm-up)
warmup = 3  # untimed steps before each measurement
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda" | "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # autocast dtype
compile = False  # torch.compile the model for the step measurements
activation_checkpointing = False  # recompute transformer activations in backward (bigger batches fit)
pretrain = True  # also time the pre-training step (momentum encoders, queues)
search_videos = (1000, 10000)  # index sizes of the search rows: one query in, ranked hits out, as the search page
search_model = "ViT-B/32"  # the tower whose text encoder and embedding size the search rows use (cheap on a CPU)
recipe_videos = 96  # the recipe loader rows: distinct videos cut from generated clips by prepare.py frames; 0: none
recipe_workers = 2  # loader processes of those rows: one per core of this machine leaves none idle
recipe_repeats = 3  # alternations of the decode floor and every recipe row: each row shows their median ratio
ratio_repeats = 3  # a ratio's pairs of steps (ours, baseline, in alternation): steps x ratio_repeats
noisy_spread = 0.25  # flag a ratio as NOISY when its 25th-75th percentiles spread by more than this of the median
out = "out/bench.json"  # the JSON of every row; "" writes none
seed = 0  # model init, inputs and data order
config_keys = [k for k in globals() if k not in _keys_before and k != "_keys_before"]
# -----------------------------------------------------------------------------

TOWERS = {  # OpenAI's shapes (clip/model.py build_model of the released checkpoints)
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16),
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 transformer_width=64, transformer_heads=2, transformer_layers=2),
}
# defaults of size="tiny"; --key=value still overrides them
TINY = dict(models=("tiny",), batch_sizes=(4,), num_frames=4, context_length=16, steps=4, warmup=1,
            search_videos=(64,), search_model="tiny", recipe_videos=8, recipe_repeats=2)

CAPTIONS = ["a man is playing a guitar on a stage", "two dogs run across a snowy field",
            "a woman slices tomatoes in a kitchen", "cars drive down a busy street at night",
            "a child rides a red bicycle in the park", "a chef explains how to cook pasta"]
# the units of a row's main figure, the one its baseline and ratio refer to
UNITS = {"videos_per_s": "videos/s", "query_ms": "ms", "videos_per_s_core": "videos/s/core"}


def naive_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """softmax(QK^T / sqrt(d)) V materialised in full, as nn.MultiheadAttention-era code computes it."""
    s = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)  # (B, h, L, L)
    if is_causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s.softmax(dim=-1) @ v


@contextmanager
def plain_attention():
    # the model calls F.scaled_dot_product_attention through the module attribute, so swapping it is enough
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = naive_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def build(tower: str, *, pretrain_: bool, T: int, L: int, batch: int, dev: str) -> "hmmc_model.HMMC":
    # initialised directly on `dev`: random init of 350M floats on a CPU takes seconds
    torch.manual_seed(seed)
    clip = dict(TOWERS[tower], context_length=max(L, 77) if tower != "tiny" else L)
    cfg = hmmc_model.HMMCConfig(clip=hmmc_model.CLIPConfig(**clip), num_frames=T, pretrain=pretrain_,
                                weight_mlm=0.0,  # English pre-training: the CLIP text tower is causal
                                queue_size=max(batch, 1024 // batch * batch),  # a multiple of the batch
                                proj_hidden=4096 if tower != "tiny" else 128)
    return hmmc_model.load_model("scratch", cfg, device=dev)[0]


def train_step(tower, B, *, T, L, dev, dt, pretrain_, compile_, grad_ckpt, tokenizer):
    """(one optimizer step on random weights: forward, backward, clip, AdamW, momentum update; its facts)."""
    net = build(tower, pretrain_=pretrain_, T=T, L=L, batch=B, dev=dev)
    for m in net.modules():  # activation checkpointing: trade ~30% speed for memory (larger batches fit)
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = grad_ckpt
    opt = net.configure_optimizers(weight_decay=0.2, learning_rate=1e-4, clip_lr_scale=1e-3, text_lr=1e-4,
                                   betas=(0.9, 0.98), eps=1e-6, device_type=torch.device(dev).type)
    step_model = net
    if compile_:
        # a fresh, static-shape compile per row: otherwise the second batch size of a run would get a dynamic-shape
        # graph and later rows could hit dynamo's recompile limit and silently run eager
        torch._dynamo.reset()
        step_model = torch.compile(net, dynamic=False)
    ids, mask = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(B)], L)
    S = TOWERS[tower]["image_resolution"]
    video = torch.randint(0, 256, (B, T, 3, S, S), dtype=torch.uint8, device=dev)
    batch = {"video": video, "ids": ids.to(dev), "mask": mask.to(dev)}
    if pretrain_:  # tags: the captions again, only their cost matters
        batch["tag_ids"], batch["tag_mask"] = batch["ids"].clone(), batch["mask"].clone()

    def step():
        with autocast(dev, dt):
            loss, _ = step_model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pretrain_:
            net.momentum_update()

    return step, {"flops_per_video": net.flops_per_video(T, L)}


_clock = time.perf_counter  # the steps' clock (tests/test_bench.py drives a fake one)


def _timed(fn, dev: str) -> float:
    t0 = _clock()
    fn()
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()
    return _clock() - t0


def time_steps(make, B: int, *, dev: str, dt, n_steps: int, n_warmup: int, repeats: int, baseline: bool,
               **kw) -> tuple[dict, dict | None, list | None]:
    """(our row, the baseline's row or None, the paired ratios or None) for the step function that make(...) builds,
    each step timed on its own (synchronised, as train.py syncs once a step to read the loss). With the baseline, its
    step (fp32, naive attention, eager) and ours run in alternation, one each, the order swapped every pair, so that
    both see the same load; a pair's ratio is baseline time / our time."""
    on_cuda = torch.device(dev).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    ours, facts = make(B=B, dev=dev, dt=dt, **kw)
    steps = {"ours": ours}
    if baseline:  # a @contextmanager is also a decorator: the baseline's step runs under plain_attention()
        steps["base"] = plain_attention()(make(B=B, dev=dev, dt="float32", **{**kw, "compile_": False})[0])
    for step in steps.values():
        for _ in range(n_warmup):
            step()
    times = {name: [] for name in steps}
    for i in range(n_steps * (repeats if baseline else 1)):
        for name in reversed(steps) if i % 2 else steps:  # the order swapped every pair
            times[name].append(_timed(steps[name], dev))
    if on_cuda:
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:  # the process's peak resident set (Linux reports KiB); it only grows, so it bounds every row so far
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    row = {**_rates(B, times["ours"]), **facts, "peak_mem_gb": peak_gb}
    if not baseline:
        return row, None, None
    return row, _rates(B, times["base"]), [b / o for o, b in zip(times["ours"], times["base"])]


def _rates(B: int, times: list) -> dict:
    return {"videos_per_s": B / float(np.median(times)), "step_ms": 1000 * float(np.median(times))}


def ratio_summary(ratios: list, noisy_spread: float) -> dict:
    """The median paired ratio and its 25th-75th percentiles, NOISY when those spread by more than noisy_spread of
    the median (the machine's load changed within the row)."""
    median, lo, hi = (float(np.percentile(ratios, q)) for q in (50, 25, 75))
    return {"ratio": median, "ratio_p25": lo, "ratio_p75": hi, "pairs": len(ratios),
            "noisy": (hi - lo) > noisy_spread * median}


@torch.no_grad()
def time_search(net, num: int, T: int, L: int, tokenizer, dev: str, repeats: int = 5) -> dict:
    """The median and the fastest of `repeats` queries (after a warm-up) against an index of num videos x T frames
    of random unit embeddings, as the search page answers them, HTTP aside."""
    g, E = torch.Generator().manual_seed(seed), net.cfg.clip.embed_dim
    index = {"video_ids": [f"v{i:05d}" for i in range(num)],
             "video_emb": F.normalize(torch.randn(num, E, generator=g), dim=-1),
             "frame_emb": F.normalize(torch.randn(num, T, E, generator=g), dim=-1)}
    times = []
    for i in range(repeats + 1):
        t0 = _clock()
        search.search_index(net, index, [f"{CAPTIONS[i % len(CAPTIONS)]} {i}"], tokenizer=tokenizer, context_length=L,
                            top_k_frames=3, frame_match_weight=1.0, top=10, device=dev)  # hits come back to the CPU
        times.append(1000 * (_clock() - t0))
    return {"query_ms": float(np.median(times[1:])), "fastest_ms": min(times[1:]), "of": repeats}


# -----------------------------------------------------------------------------
# The loaders on real videos: ffmpeg clips -> prepare.py frames -> VideoTextDataset through a DataLoader

GOAL = {"finetune": 1370, "pretrain": 1100}  # videos/s per GPU the loaders must feed (the step at full size)
# path name -> (recipe kind, stored short side, centre squares, augment, frames T, batch per GPU, text tokens)
RECIPE_PATHS = {
    "finetune 224px": ("finetune", 224, False, "none", 12, 32, 32),
    "finetune 224px squares": ("finetune", 224, True, "none", 12, 32, 32),
    "pretrain 360px": ("pretrain", 360, False, "frame", 12, 16, 45),
    "pretrain 224px": ("pretrain", 224, False, "frame", 12, 16, 45),
}


def _decode_floor(ds) -> float:
    """Videos per CPU second of Pillow decoding T frames of each video of ds on one thread: what no loader avoids."""
    from PIL import Image
    c0 = time.process_time()
    with framestore.FrameDB(ds.lmdb_path) as db:
        for vid in ds.video_ids:
            for buf in db.get_frames(vid, np.linspace(0, db.num_frames, ds.num_frames, endpoint=False).astype(int)):
                Image.open(io.BytesIO(buf)).load()
    return len(ds.video_ids) / (time.process_time() - c0)


def _loader_rate(ds, workers: int, batch: int) -> float:
    """Videos per CPU second of the workers (this process where workers=0; a busy machine inflates wall-clock time,
    not CPU time) through a DataLoader as train.py builds it, over at least an epoch and 4 batches per worker."""
    need = max(len(ds), (1 + 4 * max(workers, 1)) * batch)
    order = torch.utils.data.RandomSampler(ds, num_samples=need, generator=torch.Generator().manual_seed(seed))
    who = resource.RUSAGE_CHILDREN if workers else resource.RUSAGE_SELF
    before = resource.getrusage(who)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=order, drop_last=True, num_workers=workers,
                                         collate_fn=prepare.collate)
    n = sum(len(b["video"]) for b in loader)  # the workers exit at the end: their CPU time is counted from there
    after = resource.getrusage(who)
    return n / (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def time_recipe_loaders(n_videos: int, workers: int, repeats: int, tokenizer):
    """Yields (row name, ours, decode floor, ratios): each recipe path's loader in videos per CPU second beside the
    decode floor of the same frames, alternated `repeats` times (a shared machine's load drifts), and the cores per GPU
    that the goal then takes. The videos: three generated sources (16:9, 4:3 and 2.35:1 at a short side of 360 px,
    moving test patterns with film grain, so that JPEG sizes are like footage) cut into n_videos files of 2 s."""
    with tempfile.TemporaryDirectory(prefix="hmmc_bench_") as tmp:
        videos = os.path.join(tmp, "videos")
        os.makedirs(videos)
        for s, (name, size) in enumerate([("wide", "640x360"), ("tv", "480x360"), ("scope", "848x360")][:n_videos]):
            duration = 2 * len(range(s, n_videos, 3))  # this source's share of the files
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi",
                            "-i", f"testsrc2=size={size}:rate=25:duration={duration}", "-vf", "noise=alls=12:allf=t",
                            "-c:v", "libx264", "-preset", "ultrafast", "-g", "50",  # a key frame every 2 s
                            "-f", "segment", "-segment_time", "2", "-reset_timestamps", "1",
                            os.path.join(videos, f"{name}%03d.mp4")], check=True)
        with open(os.path.join(tmp, "train.jsonl"), "w") as f:
            ids = sorted(os.path.splitext(file)[0] for file in os.listdir(videos))
            for v, vid in enumerate(ids):  # distinct captions, as in a real set; tags, as CHVTT has them
                caption = f"{CAPTIONS[v % len(CAPTIONS)]} {v}"
                f.write(json.dumps({"video_id": vid, "captions": [caption], "tags": "video,clip,test"}) + "\n")
        datasets = {}
        for name, (kind, size, square, augment, T, batch, L) in RECIPE_PATHS.items():
            lmdb = os.path.join(tmp, f"{size}{'sq' if square else ''}.lmdb")
            if not os.path.exists(lmdb):  # the paths of one frame size share its frames
                framestore.extract_frames(videos, lmdb, num_frames=48 if kind == "pretrain" else 30, frame_size=size,
                                          workers=os.cpu_count() or 1, square=square, progress_every=1e9)
            datasets[name] = prepare.VideoTextDataset(
                tmp, "train", tokenizer, mode="train" if kind == "finetune" else "pretrain", num_frames=T,
                context_length=L, frame_sample="random", image_size=224, augment=augment, seed=seed, lmdb_path=lmdb,
                verbose=False)
        runs = {name: [] for name in datasets}
        for _ in range(max(1, repeats)):
            for name, ds in datasets.items():
                runs[name].append((_loader_rate(ds, workers, RECIPE_PATHS[name][5]), _decode_floor(ds)))
    for name, measured in runs.items():
        ours, floor = zip(*measured)
        rate, goal = float(np.median(ours)), GOAL[RECIPE_PATHS[name][0]]
        yield (f"loader {name}, per core",
               {"videos_per_s_core": rate, "cores_per_gpu": goal / rate, "goal": goal, "workers": workers},
               {"videos_per_s_core": float(np.median(floor)), "label": "decode floor"},
               [o / f for o, f in zip(ours, floor)])


# -----------------------------------------------------------------------------

def _format_row(row: dict) -> str:
    ours = row["ours"]
    key = next(k for k in UNITS if k in ours)
    extra = [f"MFU {100 * row['mfu']:.1f}%" if "mfu" in row else "",
             f"peak mem {ours['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in ours else "",
             f"fastest {ours['fastest_ms']:.1f} ms of {ours['of']}" if "fastest_ms" in ours else "",
             f"{ours['cores_per_gpu']:.1f} cores per GPU at {ours['goal']} videos/s" if "cores_per_gpu" in ours else "",
             "out of memory" if ours.get("oom") else ""]
    if row.get("baseline"):
        extra.append(f"{row['baseline'].get('label', 'baseline')} {row['baseline'][key]:.1f} {UNITS[key]}, "
                     f"ours/baseline {row['ratio']:.2f} "
                     f"[{row['ratio_p25']:.2f}-{row['ratio_p75']:.2f}]{' NOISY' if row['noisy'] else ''}")
    return f"{row['name']:<44s} {ours[key]:>10.1f} {UNITS[key]:<10s} {' | '.join(e for e in extra if e)}"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    given = set()
    cfg = configurator.configure({k: globals()[k] for k in config_keys}, argv, prog="bench.py",
                                 descriptions=configurator.describe(__file__), given=given)
    if cfg["size"] not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {cfg['size']!r}")
    if cfg["size"] == "tiny":  # the tiny presets, under what the arguments set
        cfg.update({k: v for k, v in TINY.items() if k not in given})
    elif torch.device(cfg["device"]).type != "cuda":
        print("warning: --size=full on a CPU: ViT-B/16 at batch 128 takes tens of GB and hours", flush=True)
    print(f"bench: size={cfg['size']} device={cfg['device']} dtype={cfg['dtype']} compile={cfg['compile']}",
          flush=True)

    dev, dt = init_compute(cfg["device"])[3], cfg["dtype"]  # as train.py sets up: TF32 matmuls on CUDA
    set_cpu_threads(dev)  # and one thread on a CPU, as train.py
    on_cuda = torch.device(dev).type == "cuda"
    with_baseline = not on_cuda  # a shared CPU's load moves absolute rates: only the ratios to a baseline compare
    T, L = cfg["num_frames"], cfg["context_length"]
    tokenizer = get_tokenizer("clip")
    peak = peak_flops(torch.device(dev).type)
    rows = []
    print(f"{'measurement':<44s} {'value':>10s} {'unit':<10s} details\n"
          f"  value: the median step, query or loader pass", flush=True)
    if with_baseline:
        print(f"  ours/baseline: our speed over the baseline's (fp32, naive attention, eager) in "
              f"{cfg['steps'] * max(1, cfg['ratio_repeats'])} alternating pairs of steps,\n"
              f"  the median pair [25th-75th percentile]; NOISY: those spread by more than "
              f"{100 * cfg['noisy_spread']:.0f}% of the median. On a shared CPU only the ratios compare", flush=True)

    def add(name, ours, base=None, ratios=None):
        row = {"name": name, "ours": ours, "baseline": base}
        if "flops_per_video" in ours and peak:
            row["mfu"] = ours["flops_per_video"] * ours["videos_per_s"] / peak
        if ratios:
            row.update(ratio_summary(ratios, cfg["noisy_spread"]))
        rows.append(row)
        print(_format_row(row), flush=True)

    timing = dict(T=T, L=L, dev=dev, dt=dt, n_steps=cfg["steps"], n_warmup=cfg["warmup"], compile_=cfg["compile"],
                  repeats=max(1, cfg["ratio_repeats"]), baseline=with_baseline)
    for tower in cfg["models"]:
        for B in cfg["batch_sizes"]:
            for pre in ((False, True) if cfg["pretrain"] else (False,)):
                name = f"{'pretrain' if pre else 'finetune'} step {tower} B={B}"
                try:
                    add(name, *time_steps(train_step, B, tower=tower, pretrain_=pre, tokenizer=tokenizer,
                                          grad_ckpt=cfg["activation_checkpointing"], **timing))
                except torch.cuda.OutOfMemoryError:  # a batch that does not fit is a result too
                    add(name, {"videos_per_s": 0.0, "oom": True})
                if on_cuda:
                    torch.cuda.empty_cache()
    searcher = build(cfg["search_model"], pretrain_=False, T=T, L=L, batch=1, dev=dev).eval()
    for num in cfg["search_videos"]:
        add(f"search query {cfg['search_model']}, {num} videos x {T}",
            time_search(searcher, num, T, L, tokenizer, dev))
    if cfg["recipe_videos"]:
        for row in time_recipe_loaders(cfg["recipe_videos"], cfg["recipe_workers"], cfg["recipe_repeats"], tokenizer):
            add(*row)

    setup = {"device": torch.cuda.get_device_name() if on_cuda else f"cpu ({os.cpu_count()} cores, "
             f"{torch.get_num_threads()} thread(s))", "torch": torch.__version__, "peak_flops": peak,
             "baseline": "fp32, naive attention, eager" if with_baseline else None, "config": cfg}
    print(f"machine: {setup['device']}, torch {setup['torch']}")
    noisy = sum(bool(row.get("noisy")) for row in rows)
    if noisy:
        print(f"warning: {noisy} ratios marked NOISY (the machine's load changed while they were measured): "
              f"rerun them on an idle machine", flush=True)
    result = {"rows": rows, "setup": setup}
    if cfg["out"]:
        os.makedirs(os.path.dirname(cfg["out"]) or ".", exist_ok=True)
        with open(cfg["out"], "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {cfg['out']}")
    return result


if __name__ == "__main__":
    run_script(main)
