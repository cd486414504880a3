"""
Train HMMC: fine-tune from CLIP or a pre-trained checkpoint on text-video pairs, or pre-train with momentum
contrast on CHVTT. With no arguments it prepares the built-in synthetic dataset and trains a tiny model on CPU in a
few minutes, then prints retrieval metrics.

$ python train.py                                                  # the embedded default (config/synthetic.py)
$ python train.py config/finetune_msrvtt.py --batch_size=64 --gradient_accumulation_steps=4
$ torchrun --standalone --nproc_per_node=8 train.py config/pretrain_chvtt.py
$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py config/...
$ python train.py --init_from=resume --out_dir=out-synthetic      # continue where a run stopped, exactly

Writes out_dir/ckpt.pt (latest), best.pt (best val R@1), log.jsonl (one JSON line per log interval) and
results.json (test metrics at the end). `python train.py --help` lists every setting with its default.
"""

import inspect
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as hmmc_eval  # `eval` would shadow the builtin
import model as hmmc_model  # `model` is the usual name of the network object
import prepare
from configurator import configure

# -----------------------------------------------------------------------------
# defaults: the embedded synthetic run; every recipe in config/ overrides some of these
# I/O
out_dir = "out-synthetic"
init_from = "scratch"  # "scratch" | "clip" (OpenAI CLIP + HF BERT) | "resume" (out_dir/ckpt.pt) | path to a checkpoint
eval_interval = 300  # optimizer steps between val evaluations and checkpoints; 0 = only at the end
log_interval = 25  # optimizer steps between log lines
eval_only = False  # evaluate the initial weights on the test split and exit
seed = 1337
# data (data_dir = data/<dataset> unless set)
dataset = "synthetic"
data_dir = None
train_split = "train"
val_split = "val"  # best checkpoint by val R@1; the test split is used when this one does not exist
test_split = "test"
caption_field = "captions"  # jsonl field holding the captions ("captions_zh" for Chinese synthetic/VATEX)
eval_dataset = None  # evaluate on data/<eval_dataset> instead of the training data (CHVTT pre-training: VATEX)
eval_caption_field = None  # caption field of the eval data; default caption_field
num_frames = 8  # frames per video (T); also sizes the pre-training frame queues
image_size = 32  # frames are centre-cropped to this
context_length = 16  # text tokens per caption (the synthetic captions need at most 14)
tag_context_length = 25  # text tokens per tag string (pre-training with tags)
frame_sample = "uniform"  # training frame sampling: "uniform" | "random" | "stratified" (eval is always uniform)
augment = "none"  # "none" | "frame" (per-frame, as released) | "clip" (the same augmentation for every frame)
num_workers = 0  # data loader processes per rank (0: load in the training process, best for the tiny CPU run)
eval_batch_size = 64  # videos per encoding batch at eval
# text
text_encoder = "clip"  # "clip" (English, CLIP text tower) | "bert" (Chinese BERT)
bert_vocab = None  # vocab.txt of the Chinese tokenizer; default <bert_path>/vocab.txt, else <data_dir>/vocab.txt
clip_path = "ViT-B-32.pt"  # OpenAI CLIP weights for init_from="clip"
bert_path = None  # HF BERT folder (config.json + weights) for init_from="clip" with text_encoder="bert"
# tower sizes for init_from="scratch" (CLIP's names; "clip" reads the architecture off the checkpoint)
embed_dim = 64
vision_width = 64
vision_layers = 2
vision_patch_size = 32  # one patch per 32-px frame: the patch embedding sees exact object positions
transformer_width = 64
transformer_heads = 2
transformer_layers = 2
bert_hidden_size = 64  # scratch BERT (text_encoder="bert", init_from="scratch")
bert_layers = 2
bert_heads = 2
# HMMC (HMMCConfig fields, same names)
use_temp = True  # temporal transformer over frame embeddings
temporal_layers = 2
temporal_heads = 0  # 0 -> embed_dim // 64
max_frames = 48  # rows of the frame position table
temporal_init = "default"  # "default" (as released) | "clip" (CLIP4Clip: from CLIP's text layers)
use_frame_fea = True  # frame-text matching in training, top-k frame term at eval
weight_video = 0.85  # fine-tuning loss weights
weight_frame = 0.15
logit_scale = 100.0  # similarity scale (constant, as released)
learn_logit_scale = False
pretrain = False  # momentum-contrast pre-training (FAM/VTM/FTM/MLM) instead of fine-tuning
use_tags = True  # pre-training with tags (the paper; the released code ran title-only)
queue_size = 1024  # momentum queue length; a multiple of the global batch
momentum = 0.99
temperature = 0.07
proj_hidden = 4096
weight_fam = 0.05
weight_vtm = 0.45
weight_ftm = 0.45
weight_mlm = 0.05  # Chinese only: the CLIP text tower is causal, English pre-training must set 0
mlm_prob = 0.15
freeze_clip_vision = False  # reproduce the original's effectively frozen fp16 CLIP matrices
freeze_clip_text = False
# eval scoring: 100 cos(t, v) + frame_weight * mean of the top-k 100 cos(t, frame)
top_k_frames = 3
frame_weight = 1.0
# optimisation; global batch per optimizer step = batch_size x gradient_accumulation_steps on any number of ranks
batch_size = 32  # videos per micro-step over all ranks (the contrastive batch); each rank gets batch_size / world
gradient_accumulation_steps = 1
epochs = 6  # length of training: sets the schedule (spec §11.2)
max_iters = 0  # stop after this many optimizer steps (0 = train all epochs); never changes the schedule
learning_rate = 1e-3  # new modules (temporal transformer, heads); scratch towers too
clip_lr_scale = 1.0  # CLIP vision tower lr = learning_rate * clip_lr_scale
text_lr = 1e-3  # text encoder
weight_decay = 0.2
warmup_proportion = 0.1  # of the configured training length
betas = (0.9, 0.98)
eps = 1e-6
grad_clip = 1.0  # global gradient norm; 0 = off
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else \
    "float16" if torch.cuda.is_available() else "float32"
compile = False  # torch.compile the model
activation_checkpointing = False  # recompute transformer activations in backward: larger batches, ~30% slower
config_keys = [k for k, v in globals().items() if not k.startswith("_") and
               isinstance(v, (int, float, bool, str, tuple, type(None))) and k not in ("config_keys",)]
_DEFAULTS = {k: globals()[k] for k in config_keys}  # kept apart: main() overwrites the globals with the config
# -----------------------------------------------------------------------------

_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
               "4090": 165e12, "3090": 71e12, "V100": 125e12, "A6000": 155e12}  # dense bf16/fp16 tensor-core peaks


def get_lr(it: int, t_total: float, warmup: float) -> float:
    """HMMC's warmup_cosine factor (spec §11.2) for optimizer step `it` (0-based): x = it / t_total,
    f = x / w during warm-up, then 0.5 (1 + cos(pi x)) over the whole range (not rescaled after warm-up, so it drops
    from 1 to 0.5 (1 + cos(pi w)) when warm-up ends, as released). The first step gets 0."""
    x = it / t_total
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


def schedule_length(steps_per_epoch: int, gradient_accumulation_steps: int, epochs: int) -> float:
    """t_total of the original (spec §11.2): int(micro-steps per epoch + GA - 1) / GA * epochs, a float division."""
    return (steps_per_epoch + gradient_accumulation_steps - 1) / gradient_accumulation_steps * epochs


def epoch_batches(num_items: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int) -> list:
    """This rank's index lists for one epoch. The permutation depends only on seed + epoch, so every rank (and a
    resumed run) sees the same order; each global batch is cut into world_size contiguous slices, so W ranks x B/W
    videos are exactly the one-process batch of B and results do not depend on the number of ranks. The tail that
    does not fill a global batch is dropped (every rank must contribute equal rows to the all-gather)."""
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = batch_size // world_size
    return [perm[s * batch_size + rank * per_rank: s * batch_size + (rank + 1) * per_rank]
            for s in range(num_items // batch_size)]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(state: dict) -> dict:
    # RNG states as tensors and lists only, so torch.load(weights_only=True) can read them back
    py = state["python"]
    np_state = state["numpy"]
    out = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                            int(np_state[2]), int(np_state[3]), float(np_state[4])],
           "torch": state["torch"]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _unplain(state: dict) -> dict:
    py, np_state = state["python"], state["numpy"]
    out = {"python": (py[0], tuple(py[1]), py[2]),
           "numpy": (np_state[0], np_state[1].numpy(), np_state[2], np_state[3], np_state[4]), "torch": state["torch"]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def save_checkpoint(path: str, ckpt: dict):
    """Write to path.tmp and rename: a run killed mid-write never destroys the previous checkpoint."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_state_dict(model: torch.nn.Module, sd: dict, path: str):
    """Raise a ValueError listing missing, unexpected and differently shaped tensors (another architecture)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and
              sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        show = lambda xs: ", ".join(xs[:10]) + (f" ... ({len(xs)} in all)" if len(xs) > 10 else "") or "none"
        raise ValueError(f"{path} holds another architecture than this config builds: missing {show(missing)}; "
                         f"unexpected {show(unexpected)}; shape mismatches {show(shapes)}")


def build_config(config: dict, tokenizer) -> "hmmc_model.HMMCConfig":
    """HMMCConfig for a fresh model: HMMC fields by name from the train config, tower sizes from the scratch keys,
    vocabulary and special ids from the tokenizer."""
    names = {f.name for f in fields(hmmc_model.HMMCConfig)} - {"clip", "bert"}
    args = {k: config[k] for k in names if k in config}
    clip = hmmc_model.CLIPConfig(
        embed_dim=config["embed_dim"], image_resolution=config["image_size"], vision_layers=config["vision_layers"],
        vision_width=config["vision_width"], vision_patch_size=config["vision_patch_size"],
        context_length=max(config["context_length"], config["tag_context_length"]),
        vocab_size=tokenizer.vocab_size, transformer_width=config["transformer_width"],
        transformer_heads=config["transformer_heads"], transformer_layers=config["transformer_layers"],
        eot_id=getattr(tokenizer, "eot_id", None) or 49407)
    bert = None
    if config["text_encoder"] == "bert":
        bert = hmmc_model.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=config["bert_hidden_size"],
            num_hidden_layers=config["bert_layers"], num_attention_heads=config["bert_heads"],
            intermediate_size=4 * config["bert_hidden_size"],
            max_position_embeddings=max(64, config["context_length"], config["tag_context_length"]),
            pad_token_id=tokenizer.pad_id)
        args["mlm_mask_id"] = tokenizer.mask_id
        args["mlm_special_ids"] = (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id)
    return hmmc_model.HMMCConfig(clip=clip, bert=bert, **args)


def peak_flops(device_type: str) -> float | None:
    if device_type != "cuda":
        return None  # no meaningful peak for CPUs: MFU is left out
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def check_data(data_dir: str, splits: list, dataset_name: str):
    missing = [p for p in ["frames.lmdb"] + [f"{s}.jsonl" for s in splits]
               if not os.path.exists(os.path.join(data_dir, p))]
    if missing:
        how = {"synthetic": "python prepare.py synthetic --out={d}"}.get(
            dataset_name, "python prepare.py frames --videos=VIDEO_DIR --out={d}/frames.lmdb for the frames and "
                          "python prepare.py " + dataset_name + " ... --out={d} for the annotations")
        raise FileNotFoundError(f"dataset {dataset_name!r} is not prepared: {', '.join(missing)} missing in "
                                f"{data_dir}; run {how.format(d=data_dir)}")


# -----------------------------------------------------------------------------

def main(argv=None):
    try:
        config = configure(_DEFAULTS, sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        raise SystemExit(f"config error: {e}")
    globals().update(config)  # the rest of main reads the settings as plain names, nanoGPT style

    # distributed setup: a run is DDP when torchrun set RANK
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), \
            int(os.environ["WORLD_SIZE"])
        run_device = f"cuda:{local_rank}" if device.startswith("cuda") else device
        if run_device.startswith("cuda"):
            torch.cuda.set_device(run_device)
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
        if run_device == "cpu":
            # the CPU cores are shared by the local ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    else:
        rank, local_rank, world_size, run_device = 0, 0, 1, device
    master = rank == 0
    try:
        _train(config, ddp, rank, world_size, run_device, master)
    finally:
        if ddp and dist.is_initialized():
            # tear down while every rank is still alive and in step; gloo can abort at interpreter exit otherwise
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()


def _train(config: dict, ddp: bool, rank: int, world_size: int, run_device: str, master: bool):
    print0 = (lambda *a, **k: print(*a, **k, flush=True)) if master else (lambda *a, **k: None)
    device_type = "cuda" if run_device.startswith("cuda") else "cpu"

    # checks that need no data or model, before anything slow happens
    if batch_size % world_size:
        raise SystemExit(f"config error: batch_size={batch_size} (videos per micro-step over all ranks) must be "
                         f"divisible by the {world_size} ranks")
    if pretrain and queue_size % batch_size:
        raise SystemExit(f"config error: queue_size={queue_size} must be a multiple of the global batch "
                         f"batch_size={batch_size} (the queue advances by one global batch per micro-step)")
    if pretrain and text_encoder == "clip" and weight_mlm > 0:
        raise SystemExit("config error: English MLM is not supported (the CLIP text tower is causal); set "
                         "weight_mlm=0 for English pre-training, as the released English run did")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"config error: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    print0("config: " + json.dumps(config))

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.amp.autocast(device_type, dtype=ptdtype)
    eval_dtype = None if ptdtype == torch.float32 else dtype

    # data: the built-in synthetic dataset is made on demand, every other one by prepare.py
    ddir = data_dir or os.path.join("data", dataset)
    if dataset == "synthetic" and not os.path.exists(os.path.join(ddir, "frames.lmdb")):
        if master:
            prepare.prepare_synthetic(ddir, seed=0)
        if ddp:
            dist.barrier()
    edir = os.path.join("data", eval_dataset) if eval_dataset else ddir
    ecaption = eval_caption_field or caption_field
    eval_split = val_split if val_split and os.path.exists(os.path.join(edir, f"{val_split}.jsonl")) else test_split
    check_data(ddir, [train_split], dataset)
    check_data(edir, [eval_split, test_split], eval_dataset or dataset)
    vocab = bert_vocab
    if text_encoder == "bert" and not vocab:
        vocab = os.path.join(bert_path, "vocab.txt") if bert_path else os.path.join(ddir, "vocab.txt")
    tokenizer = prepare.get_tokenizer(text_encoder, vocab)
    config["bert_vocab"] = vocab  # saved with the checkpoint, so eval.py finds the same tokenizer
    train_set = prepare.VideoTextDataset(
        ddir, train_split, tokenizer, mode="pretrain" if pretrain else "train", num_frames=num_frames,
        context_length=context_length, frame_sample=frame_sample, image_size=image_size, augment=augment, seed=seed,
        caption_field=caption_field, tag_context_length=tag_context_length)
    steps_per_epoch = len(train_set) // batch_size  # micro-steps
    if steps_per_epoch == 0:
        raise SystemExit(f"config error: the {train_split} split has {len(train_set)} samples, fewer than one "
                         f"batch of {batch_size}")
    t_total = schedule_length(steps_per_epoch, gradient_accumulation_steps, epochs)
    total_iters = steps_per_epoch * epochs // gradient_accumulation_steps
    stop_iter = min(total_iters, max_iters) if max_iters > 0 else total_iters

    # model
    iter_num, epoch, step_in_epoch, best_r1, ckpt = 0, 0, 0, -1.0, None
    if init_from == "resume":
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        model = hmmc_model.HMMC(hmmc_model.HMMCConfig.from_dict(ckpt["model_args"]))
        check_state_dict(model, ckpt["model"], os.path.join(out_dir, "ckpt.pt"))
        model.load_state_dict(ckpt["model"])
        iter_num, epoch, step_in_epoch, best_r1 = ckpt["iter_num"], ckpt["epoch"], ckpt["step_in_epoch"], \
            ckpt["best_r1"]
        print0(f"resuming from {out_dir}/ckpt.pt at iter {iter_num} (epoch {epoch}, step {step_in_epoch})")
    elif init_from == "scratch":
        model = hmmc_model.HMMC(build_config(config, tokenizer))
    elif init_from == "clip":
        cfg = build_config(config, tokenizer)
        clip_sd = hmmc_model.load_clip_state_dict(clip_path)
        bert_sd = None
        if text_encoder == "bert":
            if not bert_path:
                raise SystemExit("config error: init_from='clip' with text_encoder='bert' needs bert_path "
                                 "(a HF folder such as hfl/chinese-roberta-wwm-ext)")
            cfg.bert = hmmc_model.BertConfig.from_json(os.path.join(bert_path, "config.json"))
            bert_sd = hmmc_model.load_bert_state_dict(bert_path)
        model = hmmc_model.HMMC.from_clip(cfg, clip_sd, bert_sd)
    else:
        # a pre-trained (or fine-tuned) checkpoint: its towers, this config's losses; pre-training parts dropped
        src = load_checkpoint(init_from)
        if "model_args" in src:
            args = hmmc_model.HMMCConfig.from_dict(src["model_args"]).to_dict()
            # the towers come from the checkpoint; the temporal module is what this config asks for, so a mismatch
            # (say 2 temporal layers pre-trained, 4 asked) is reported key by key instead of silently re-initialised
            arch = ("clip", "bert", "text_encoder")
            cfg = build_config(config, tokenizer).to_dict()
            cfg.update({k: args[k] for k in arch})
            model = hmmc_model.HMMC(hmmc_model.HMMCConfig.from_dict(cfg))
            try:
                hmmc_model.load_hmmc_weights(model, src["model"])
            except ValueError as e:
                raise SystemExit(f"{init_from}: {e}")
        else:  # a state dict of the original code
            keep = {k: config[k] for k in ("use_frame_fea", "weight_video", "weight_frame", "num_frames")}
            model = hmmc_model.HMMC.from_original(src, **keep)
        src = None
    mcfg = model.cfg
    model.to(run_device)
    if activation_checkpointing:
        for m in model.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = True
    if ddp and device_type == "cuda" and pretrain:
        # projector/predictor batch statistics over the global batch, as the original's SyncBN
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    print0(f"model: {n_params / 1e6:.2f}M trainable parameters; {len(train_set)} training samples, "
           f"{steps_per_epoch} micro-steps per epoch, {total_iters} optimizer steps in {epochs} epochs, "
           f"stopping at {stop_iter}")

    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, clip_lr_scale, text_lr, betas, eps,
                                               device_type)
    base_lrs = [g["base_lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(_unplain(ckpt["rng"]))
    ckpt = None  # free the memory

    if ddp:
        # queues and BN statistics are kept identical by the model itself: rank 0 must not overwrite them at every
        # forward (torch 2.13 renamed broadcast_buffers=False to forward_sync_buffers=False and warns on the old name)
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        model = DDP(model, device_ids=[int(run_device.split(":")[1])] if device_type == "cuda" else None,
                    gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy fewer
                    **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    if compile:
        # compiled around DDP, so that the graph is split at gradient buckets and all-reduces overlap the backward
        print0("compiling the model (takes a minute)")
        model = torch.compile(model)

    def evaluate(split: str) -> dict:
        # eval must not move the training RNG, or a run that evaluates would differ from one that does not
        state = rng_state()
        metrics = hmmc_eval.evaluate(raw_model, edir, split, tokenizer=tokenizer, num_frames=num_frames,
                                     image_size=image_size, context_length=context_length, top_k=top_k_frames,
                                     frame_weight=frame_weight, batch_size=eval_batch_size, num_workers=num_workers,
                                     device=run_device, dtype=eval_dtype, caption_field=ecaption,
                                     progress=False)
        set_rng_state(state)
        return metrics

    def checkpoint_dict() -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "model_args": mcfg.to_dict(),
                "config": config, "iter_num": iter_num, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "best_r1": best_r1, "rng": _plain(rng_state())}

    if eval_only:
        metrics = evaluate(test_split)
        print0(hmmc_eval.format_table(metrics, f"{test_split} split, initial weights ({init_from})"))
        return

    if master:
        os.makedirs(out_dir, exist_ok=True)
        if init_from != "resume" and os.path.exists(os.path.join(out_dir, "log.jsonl")):
            os.remove(os.path.join(out_dir, "log.jsonl"))  # a fresh run starts a fresh log
    peak = peak_flops(device_type)
    per_rank = batch_size // world_size

    def batches():
        """(micro-batch, (epoch, step_in_epoch) after it), from the current position on, across epochs."""
        e, s = epoch, step_in_epoch
        while e < epochs:
            train_set.epoch = e  # augmentation and frame sampling are functions of (seed, epoch, index)
            index_lists = epoch_batches(len(train_set), batch_size, world_size, rank, seed, e)[s:]
            loader = torch.utils.data.DataLoader(
                train_set, batch_sampler=index_lists, num_workers=num_workers, pin_memory=(device_type == "cuda"),
                # the loader's own generator: creating an iterator must not draw from the training RNG
                generator=torch.Generator().manual_seed(seed + 1000 * e + rank),
                worker_init_fn=getattr(prepare, "worker_init_fn", None))
            for batch in loader:
                s += 1
                yield batch, (e, s)
            e, s = e + 1, 0

    # uint8 frames travel to the device (4x less than floats) and are normalised there. On CUDA the copy runs on a
    # side stream, one batch ahead, so that it overlaps the step before it instead of stalling the GPU (~230 MB per
    # 128 videos: several ms of PCIe per step).
    copy_stream = torch.cuda.Stream() if device_type == "cuda" else None

    def start_copy(batch: dict):
        tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        if copy_stream is None:
            return {k: v.to(run_device) for k, v in tensors.items()}, None
        with torch.cuda.stream(copy_stream):
            moved = {k: v.to(run_device, non_blocking=True) for k, v in tensors.items()}
            done = torch.cuda.Event()
            done.record()
        return moved, done

    def finish_copy(moved: dict, done) -> dict:
        if done is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(done)  # this batch's copy only, not the next one's that is under way
            for v in moved.values():
                v.record_stream(compute)  # memory allocated on the copy stream stays ours until the step is done
        return {**moved, "video": prepare.normalize(moved["video"])}

    def device_batches():
        """(moved batch, copy-done event, data position after it); the next batch's copy starts before this one is
        handed out."""
        ahead = None
        for batch, position in batches():
            started = (*start_copy(batch), position)
            if ahead is not None:
                yield ahead
            ahead = started
        if ahead is not None:
            yield ahead

    stream = device_batches()
    start_iter = iter_num
    t0 = t_log = time.time()
    videos_since_log, losses_since_log, parts_since_log, steps_since_log = 0, 0.0, {}, 0
    last_good = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else None
    model.train()
    while iter_num < stop_iter:
        lr_factor = get_lr(iter_num, t_total, warmup_proportion)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor
        step_stats = []
        for micro in range(gradient_accumulation_steps):
            moved, done, (epoch, step_in_epoch) = next(stream)  # the position a checkpoint records
            batch = finish_copy(moved, done)
            # all-reduce gradients only on the last micro-step; the others accumulate locally
            sync = nullcontext() if not ddp or micro == gradient_accumulation_steps - 1 else model.no_sync()
            try:
                with sync:
                    with autocast:
                        loss, parts = model(batch)
                    # accumulated gradients add up: divide so the step sees the mean over micro-steps
                    scaler.scale(loss / gradient_accumulation_steps).backward()
            except torch.OutOfMemoryError:
                raise SystemExit(f"out of GPU memory at iter {iter_num} with {per_rank} videos per rank: lower "
                                 f"batch_size and raise gradient_accumulation_steps, or set "
                                 f"activation_checkpointing=True (note batch_size is also the contrastive batch)")
            step_stats.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]))
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        raw_model.momentum_update()  # once per optimizer step (the original: every micro-step, documented)

        # the step's only host sync, after all of its work is queued: the loss and its parts of every micro-step,
        # averaged over ranks so that every rank sees the same value and stops together on NaN (pre-training losses
        # are per-rank). A NaN step has already been applied, but nothing is saved after it.
        stats = torch.stack(step_stats).mean(dim=0)
        if ddp:
            dist.all_reduce(stats)
            stats /= world_size
        step_loss, *part_values = stats.tolist()
        step_parts = dict(zip(parts, part_values))
        if not math.isfinite(step_loss):
            good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            raise SystemExit(f"loss is {step_loss} at iter {iter_num} (epoch {epoch}, step {step_in_epoch}); "
                             f"stopping, {good}. Try a lower learning_rate or dtype=bfloat16/float32")
        iter_num += 1

        videos_since_log += batch_size * gradient_accumulation_steps
        losses_since_log += step_loss
        steps_since_log += 1
        for k, v in step_parts.items():
            parts_since_log[k] = parts_since_log.get(k, 0.0) + v
        if iter_num % log_interval == 0 or iter_num == stop_iter:
            now = time.time()
            dt = now - t_log
            vps = videos_since_log / max(dt, 1e-9)
            mfu = raw_model.estimate_mfu(vps, peak, num_frames, context_length, tag_context_length) if peak else None
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device_type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            eta = (stop_iter - iter_num) * (now - t0) / (iter_num - start_iter)  # this run's average pace
            record = {"iter": iter_num, "epoch": epoch, "loss": losses_since_log / steps_since_log,
                      **{f"loss_{k}": v / steps_since_log for k, v in parts_since_log.items()},
                      "lr": lr_factor * learning_rate, "videos_per_s": vps, "mfu": mfu, "mem_gb": mem,
                      "time": now - t0}
            parts_txt = " ".join(f"{k} {v / steps_since_log:.4f}" for k, v in parts_since_log.items())
            print0(f"iter {iter_num}/{stop_iter} epoch {epoch}: loss {record['loss']:.4f} ({parts_txt}), "
                   f"lr {record['lr']:.2e}, {vps:.1f} videos/s, mfu {f'{100 * mfu:.1f}%' if mfu else '-'}, "
                   f"mem {mem:.2f} GB, eta {eta / 60:.1f} min")
            if master:
                with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            videos_since_log, losses_since_log, parts_since_log, steps_since_log, t_log = 0, 0.0, {}, 0, now

        last = iter_num == stop_iter
        if (eval_interval > 0 and iter_num % eval_interval == 0) or last:
            state = checkpoint_dict()  # RNG captured here, before eval, so a resumed run continues identically
            metrics = evaluate(eval_split)
            r1 = metrics["t2v"]["R1"]
            print0(f"iter {iter_num}: {eval_split} T2V R@1 {r1:.1f} R@5 {metrics['t2v']['R5']:.1f}, "
                   f"V2T R@1 {metrics['v2t']['R1']:.1f}")
            improved = r1 > best_r1
            best_r1 = max(best_r1, r1)
            state["best_r1"] = best_r1
            if master:
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state)
                last_good = os.path.join(out_dir, "ckpt.pt")
                if improved:
                    shutil.copyfile(os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt.tmp"))
                    os.replace(os.path.join(out_dir, "best.pt.tmp"), os.path.join(out_dir, "best.pt"))
                print0(f"saved checkpoint to {out_dir}/ckpt.pt (iter {iter_num}, {eval_split} R@1 {r1:.1f}"
                       f"{', new best' if improved else ''})")
            model.train()

    # final test metrics with the best-by-val weights (the original's practice)
    if ddp:
        dist.barrier()  # best.pt is complete before any rank reads it
    best_path = os.path.join(out_dir, "best.pt")
    used = f"final weights (iter {iter_num})"
    if eval_split != test_split and os.path.exists(best_path):
        best = load_checkpoint(best_path)
        if best["iter_num"] != iter_num:
            raw_model.load_state_dict(best["model"])
            used = f"best {eval_split} weights (iter {best['iter_num']})"
        best = None
    metrics = evaluate(test_split)
    print0(hmmc_eval.format_table(metrics, f"{test_split} split, {used}, chance R@1 "
                                           f"{100 / max(metrics.get('num_videos', 1), 1):.2f}%"))
    if master:
        result = {**metrics, "split": test_split, "weights": used, "iter": iter_num, "time_s": time.time() - t0}
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print0(f"wrote {out_dir}/results.json; training took {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
