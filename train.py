"""
Train HMMC: fine-tune from CLIP or a pre-trained checkpoint, or pre-train with momentum contrast on CHVTT. With no
arguments it trains a tiny model on the built-in synthetic data on CPU in minutes; --help lists every setting.

$ python train.py                                                  # the embedded default (config/synthetic.py)
$ python train.py config/finetune_msrvtt.py --batch_size=64 --gradient_accumulation_steps=4
$ torchrun --standalone --nproc_per_node=8 train.py config/pretrain_chvtt.py
$ python train.py --init_from=resume --out_dir=out-synthetic      # continue where a run stopped, exactly

Writes out_dir/ckpt.pt (to resume), best.pt (best val R@1, weights only), log.jsonl and results.json (test
metrics); the same command continues its run (runs.py).
"""

import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as hmmc_eval  # `eval` would shadow the builtin
import model as hmmc_model  # `model` is the usual name of the network object
import prepare
import runs
import synthetic
from common import autocast, cleanup_compute, init_compute, is_master, peak_flops, print0, run_script, set_cpu_threads
from configurator import configure, describe
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# defaults: the embedded synthetic run; every recipe in config/ overrides some of these
# I/O
out_dir = None  # checkpoints, log.jsonl and results.json go here; default out-<dataset>
init_from = "scratch"  # a new run's weights: "scratch" | "clip" (OpenAI CLIP + HF BERT) | a checkpoint; or "resume"
auto_resume = True  # where out_dir holds a checkpoint of this run (same settings), continue it instead of starting anew
overwrite = False  # start a new run even where out_dir holds another run's checkpoint (that run's files are deleted)
eval_interval = 300  # optimizer steps between val evaluations and checkpoints; 0 = only at the end
log_interval = 25  # optimizer steps between log lines
eval_only = False  # evaluate the initial weights on the test split and exit
keep_epoch_checkpoints = False  # also keep out_dir/ckpt_epoch{N}.pt after the N-th epoch, as the original did
seed = 1337  # seeds the model init, data order, frame sampling and augmentation
# data (data_dir = data/<dataset> unless set)
dataset = "synthetic"  # the prepared folder data/<dataset> (a built-in set is made on first use, where nothing is)
data_dir = None  # another folder than data/<dataset>
val_split = "val"  # best checkpoint by val R@1; the test split is used when this one does not exist
caption_field = "captions"  # jsonl field holding the captions ("captions_zh" for Chinese synthetic/VATEX)
eval_dataset = None  # evaluate on data/<eval_dataset> instead of the training data (CHVTT pre-training: VATEX)
eval_caption_field = None  # caption field of the eval data; default caption_field
num_frames = 8  # frames per video (T); also sizes the pre-training frame queues
image_size = 32  # frames are centre-cropped to this
context_length = 16  # text tokens per caption (the synthetic captions need at most 14)
tag_context_length = 25  # text tokens per tag string (pre-training with tags)
eval_context_length = 16  # text tokens per caption at every evaluation (MSR-VTT and VATEX recipes: 32)
frame_sample = "uniform"  # training frame sampling: "uniform" | "random" | "stratified" (eval is always uniform)
augment = "none"  # "none" | "frame" (per-frame, as released) | "clip" (the same augmentation for every frame)
num_workers = 0  # data loader processes per rank (0: load in the training process, best for the tiny CPU run)
eval_batch_size = 64  # videos per encoding batch at eval
max_bad_fraction = 0.5  # unreadable videos are replaced by other samples; stop when more of a step's are bad
# text
text_encoder = "clip"  # "clip" (English, CLIP text tower) | "bert" (Chinese BERT)
bert_vocab = None  # vocab.txt of the Chinese tokenizer; default <bert_path>/vocab.txt, else <data_dir>/vocab.txt
clip_path = "ViT-B-32.pt"  # OpenAI CLIP weights for init_from="clip"
bert_path = None  # HF BERT folder (config.json + weights) for init_from="clip" with text_encoder="bert"
# tower sizes for init_from="scratch" (CLIP's names; "clip" reads the architecture off the checkpoint)
embed_dim = 64  # joint embedding width E
vision_width = 64  # ViT width
vision_layers = 2  # ViT blocks
vision_patch_size = 32  # one patch per 32-px frame: the patch embedding sees exact object positions
transformer_width = 64  # CLIP text tower width
transformer_heads = 2  # CLIP text tower heads
transformer_layers = 2  # CLIP text tower blocks
bert_hidden_size = 64  # scratch BERT (text_encoder="bert", init_from="scratch")
bert_layers = 2  # scratch BERT layers
bert_heads = 2  # scratch BERT heads
bert_dropout = 0.1  # scratch BERT's dropout (hidden and attention); a loaded BERT keeps its config.json's
bert_pooling = "cls"  # caption embedding: "cls" (tanh pooler on [CLS], as released) | "mean" (of the token states)
# HMMC (model.HMMCConfig; passed explicitly in model_args below)
use_temp = True  # temporal transformer over frame embeddings
temporal_layers = 2  # temporal transformer blocks
temporal_heads = 0  # 0 -> embed_dim // 64
max_frames = 48  # rows of the frame position table
temporal_init = "default"  # "default" (as released) | "clip" (CLIP4Clip: from CLIP's text layers)
use_frame_fea = True  # frame-text matching in training, top-k frame term at eval
weight_video = 0.85  # fine-tuning loss weight of video-text matching
weight_frame = 0.15  # fine-tuning loss weight of frame-text matching
sim_scale = 100.0  # similarity scale s in s*cos (a constant, as released)
learn_sim_scale = False  # learn log(s), clamped to s <= 100 (CLIP4Clip style)
pretrain = False  # momentum-contrast pre-training (FAM/VTM/FTM/MLM) instead of fine-tuning
use_tags = True  # pre-training with tags (the paper; the released code ran title-only)
queue_size = 1024  # momentum queue length; a multiple of the global batch
momentum = 0.99  # momentum encoders: theta_m <- m theta_m + (1 - m) theta per optimizer step
temperature = 0.07  # of the queue contrastive losses
proj_hidden = 4096  # hidden width of the FAM projector/predictor MLPs
weight_fam = 0.05  # pre-training loss weights: frame adjacency matching
weight_vtm = 0.45  # video-text matching
weight_ftm = 0.45  # frame-text matching
weight_mlm = 0.05  # masked language modelling; Chinese only (the CLIP text tower is causal): English must set 0
mlm_prob = 0.15  # share of caption tokens masked for MLM
freeze_clip_vision = False  # reproduce the original's effectively frozen fp16 CLIP matrices
freeze_clip_text = False  # the same for the CLIP text tower
# eval scoring: s cos(t, v) + frame_match_weight * mean of the top-k s cos(t, frame)
top_k_frames = 3  # hierarchical matching: the k best-matching frames of each video
frame_match_weight = 1.0  # weight of the frame term; 0 = video-level similarity only
# optimisation; global batch per optimizer step = batch_size x gradient_accumulation_steps on any number of ranks
batch_size = 32  # videos per micro-step over all ranks (the contrastive batch); each rank gets batch_size / world
gradient_accumulation_steps = 1  # micro-steps per optimizer step
epochs = 9  # length of training: sets the schedule
max_iters = 0  # stop after this many optimizer steps (0 = train all epochs); never changes the schedule
learning_rate = 1e-3  # new modules (temporal transformer, heads); scratch towers too
clip_lr_scale = 1.0  # CLIP vision tower lr = learning_rate * clip_lr_scale
text_lr = 1e-4  # text encoder (from scratch: 10x slower than the video towers, see config/synthetic.py)
weight_decay = 0.2  # AdamW decay of matrices (biases, norms and other 1-D tensors are not decayed)
warmup_proportion = 0.1  # of the configured training length
grad_clip = 1.0  # global gradient norm; 0 = off
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" | "cuda" (torchrun gives each rank its GPU)
_gpu_dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
dtype = _gpu_dtype if torch.cuda.is_available() else "float32"  # autocast: "float32" | "bfloat16" | "float16"
compile = False  # torch.compile the model
activation_checkpointing = False  # recompute transformer activations in backward: larger batches, ~30% slower
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and
            isinstance(v, (int, float, bool, str, tuple, type(None)))}  # main() overwrites the globals with the run's
# -----------------------------------------------------------------------------
TRAIN_SPLIT, TEST_SPLIT = "train", "test"  # <split>.jsonl of data_dir: training, and the final metrics
BETAS, EPS = (0.9, 0.98), 1e-6  # CLIP's AdamW


def get_lr(it: int, t_total: float, warmup: float) -> float:
    """HMMC's warmup_cosine: x / warmup, then 0.5 (1 + cos(pi x)) not rescaled after warm-up (a drop), as released."""
    x = it / t_total
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


def schedule_length(steps_per_epoch: int, gradient_accumulation_steps: int, epochs: int) -> float:
    """t_total of the original: int(micro-steps per epoch + GA - 1) / GA * epochs, a float division."""
    return (steps_per_epoch + gradient_accumulation_steps - 1) / gradient_accumulation_steps * epochs


def epoch_batches(num_items: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int) -> list:
    """This rank's index lists for one epoch: its slice of each global batch of one permutation of seed + epoch, so
    W ranks x B/W videos are the one-process batch of B; the tail short of a global batch is dropped."""
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = batch_size // world_size
    return [perm[s * batch_size + rank * per_rank: s * batch_size + (rank + 1) * per_rank]
            for s in range(num_items // batch_size)]


def batch_stream(dataset, start_epoch: int, start_step: int, rank: int, world_size: int):
    """(micro-batch on the device, (epoch, step_in_epoch) after it, its unreadable videos) from a data position on.
    On CUDA the next batch is copied on a side stream while the current step runs."""
    copy_stream = torch.cuda.Stream() if device.startswith("cuda") else None
    ahead, epoch, step = None, start_epoch, start_step
    while epoch < epochs:
        dataset.epoch = epoch  # augmentation and frame sampling are functions of (seed, epoch, index)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=epoch_batches(len(dataset), batch_size, world_size, rank, seed, epoch)[step:],
            num_workers=num_workers, pin_memory=copy_stream is not None, collate_fn=prepare.collate,
            # the loader's own generator: creating an iterator must not draw from the training RNG
            generator=torch.Generator().manual_seed(seed + 1000 * epoch + rank))
        for batch in loader:
            step += 1
            with torch.cuda.stream(copy_stream) if copy_stream else nullcontext():
                moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            if ahead is not None:
                yield ahead
            if copy_stream:  # the step before is queued: the compute stream waits for this copy, the only one issued
                torch.cuda.current_stream().wait_stream(copy_stream)
                for v in moved.values():
                    v.record_stream(torch.cuda.current_stream())  # the copy stream's memory is ours until the step
            if "augment" in moved:
                moved["video"] = prepare.augment_frames(moved["video"], moved.pop("augment"))
            ahead = (moved, (epoch, step), [b for b in batch.get("bad", []) if b])
        epoch, step = epoch + 1, 0
    if ahead is not None:
        yield ahead


def evaluate(model, data_dir: str, split: str, tokenizer, caption_field: str) -> dict:
    """Retrieval metrics with this run's settings; the RNG is left as it was (a run evaluating or not is the same)."""
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
        return hmmc_eval.evaluate(model, data_dir, split, tokenizer=tokenizer, num_frames=num_frames,
                                  image_size=image_size, context_length=eval_context_length, top_k_frames=top_k_frames,
                                  frame_match_weight=frame_match_weight, batch_size=eval_batch_size,
                                  num_workers=num_workers, device=device, dtype=dtype, caption_field=caption_field)


def check_data(data_dir: str, splits: list, dataset_name: str):
    """Stop, naming what is missing and the command that makes it, where data_dir is not a prepared dataset."""
    missing = [p for p in ["frames.lmdb"] + [f"{s}.jsonl" for s in splits]
               if not os.path.exists(os.path.join(data_dir, p))]
    if not missing:
        return
    built_in = dataset_name in synthetic.BUILT_IN
    how = (f"python prepare.py frames --videos=VIDEO_DIR --out={data_dir}/frames.lmdb makes the frames and python "
           f"prepare.py {'<msrvtt|vatex|chvtt>' if built_in else dataset_name} ... --out={data_dir} the splits")
    if built_in and os.path.normpath(data_dir) == os.path.join("data", dataset_name):
        how = f"{data_dir} holds files of another dataset; move them away and train.py writes the built-in set there"
    elif built_in:  # the user's own folder: train.py writes a built-in set only where nothing is
        how += f"; or leave --data_dir out to train on the built-in set in data/{dataset_name}"
    raise FileNotFoundError(f"dataset {dataset_name!r} is not prepared: {', '.join(missing)} missing in "
                            f"{data_dir}; {how}")


def load_data(master: bool, ddp: bool):
    """(training set, tokenizer, (eval data dir, eval split, eval caption field)); a built-in set is made on demand,
    never over anyone's files."""
    global bert_vocab
    ddir = data_dir or os.path.join("data", dataset)
    edir = os.path.join("data", eval_dataset) if eval_dataset else ddir
    for name, folder in ((dataset, ddir), (eval_dataset, edir)):
        if name in synthetic.BUILT_IN and not (os.path.isdir(folder) and os.listdir(folder)):  # only where nothing is
            if master:
                synthetic.prepare_synthetic(folder, **synthetic.BUILT_IN[name])
            if ddp:
                dist.barrier()
    eval_split = val_split if val_split and os.path.exists(os.path.join(edir, f"{val_split}.jsonl")) else TEST_SPLIT
    check_data(ddir, [TRAIN_SPLIT], dataset)
    check_data(edir, [eval_split, TEST_SPLIT], eval_dataset or dataset)
    if text_encoder == "bert" and not bert_vocab:  # saved with the checkpoint, so eval.py finds the same tokenizer
        bert_vocab = os.path.join(bert_path, "vocab.txt") if bert_path else os.path.join(ddir, "vocab.txt")
    tokenizer = get_tokenizer(text_encoder, bert_vocab)
    train_set = prepare.VideoTextDataset(
        ddir, TRAIN_SPLIT, tokenizer, mode="pretrain" if pretrain else "train", num_frames=num_frames,
        context_length=context_length, frame_sample=frame_sample, image_size=image_size, augment=augment, seed=seed,
        caption_field=caption_field, tag_context_length=tag_context_length, verbose=master, replace_bad=True)
    sizes = [len(tokenizer.encode(c)) + 2 for c, _ in train_set.captions]  # + start and end tokens
    cut = sum(n > context_length for n in sizes)
    if master and cut:  # a Chinese caption takes a token per character
        print(f"warning: {cut} of {len(sizes)} {TRAIN_SPLIT} captions are longer than context_length="
              f"{context_length} tokens and are cut (the longest needs {max(sizes)}); pass --context_length="
              f"{max(sizes)} to keep them whole")
    return train_set, tokenizer, (edir, eval_split, eval_caption_field or caption_field)


def build_model(tokenizer, resume_path: str | None, sync_bn: bool):
    """(model on the device, the checkpoint when resuming), built on the CPU: GPU runs start from CPU runs' weights."""
    # every HMMCConfig field named like a setting is that setting; the towers' and the token ids are set here
    model_args = {f.name: globals()[f.name] for f in dataclasses.fields(hmmc_model.HMMCConfig) if f.name in DEFAULTS}
    model_args["clip"] = hmmc_model.CLIPConfig(
        embed_dim=embed_dim, image_resolution=image_size, vision_layers=vision_layers, vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=max(context_length, tag_context_length, eval_context_length),
        vocab_size=tokenizer.vocab_size, transformer_width=transformer_width, transformer_heads=transformer_heads,
        transformer_layers=transformer_layers, eot_id=getattr(tokenizer, "eot_id", 49407))
    if text_encoder == "bert":
        model_args["bert"] = hmmc_model.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=bert_hidden_size, num_hidden_layers=bert_layers,
            num_attention_heads=bert_heads, intermediate_size=4 * bert_hidden_size,
            max_position_embeddings=max(64, context_length, tag_context_length, eval_context_length),
            pad_token_id=tokenizer.pad_id, hidden_dropout_prob=bert_dropout, attention_probs_dropout_prob=bert_dropout)
        model_args.update(mlm_mask_id=tokenizer.mask_id,
                          mlm_special_ids=(tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id))
    model, info = hmmc_model.load_model(
        resume_path or init_from, None if resume_path else hmmc_model.HMMCConfig(**model_args),
        clip_path=clip_path, bert_path=bert_path)
    print0(info["message"])
    # a token id past the embedding table would stop the first step with a bare IndexError deep in the text tower
    table = (model.cfg.clip if text_encoder == "clip" else model.cfg.bert).vocab_size
    if table < tokenizer.vocab_size:
        source = resume_path or init_from
        if source == "clip":
            source = clip_path if text_encoder == "clip" else bert_path
        raise SystemExit(f"config error: the {text_encoder} text encoder of {source} has {table} token embeddings, "
                         f"fewer than the {tokenizer.vocab_size} ids of the {text_encoder} tokenizer; use weights made "
                         f"for that tokenizer")
    model.to(device)
    if activation_checkpointing:
        for m in model.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = True
    if sync_bn:  # projector/predictor batch statistics over the global batch, as the original's SyncBN
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, info["checkpoint"]


def settings_line(config: dict) -> str:
    """The settings that differ from the defaults block, on one line (`python train.py --help` lists them all)."""
    defaults = {**DEFAULTS, "out_dir": f"out-{config['dataset']}"}
    changed = [f"{k}={v!r}" for k, v in config.items() if v != defaults[k]]
    return "settings: " + (", ".join(changed) + "; the rest" if changed else "all") + " as in train.py --help"


def log_step(logged: list, names: list, iter_num: int, stop_iter: int, epoch: int, lr: float, t0: float,
             t_log: float, start_iter: int, raw_model) -> float:
    """Print and log the mean loss and its parts over the steps since the last line -> the time of this line."""
    now = time.time()
    vps = len(logged) * batch_size * gradient_accumulation_steps / max(now - t_log, 1e-9)
    peak = peak_flops(torch.device(device).type)
    mfu = raw_model.flops_per_video(num_frames, context_length, tag_context_length) * vps / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    eta = (stop_iter - iter_num) * (now - t0) / (iter_num - start_iter)  # this run's average pace
    loss, *parts = (sum(values) / len(logged) for values in zip(*logged))
    print0(f"iter {iter_num}/{stop_iter} epoch {epoch}: loss {loss:.4f} ("
           + " ".join(f"{k} {v:.4f}" for k, v in zip(names, parts)) + f"), lr {lr:.2e}, {vps:.1f} videos/s, "
           f"mfu {f'{100 * mfu:.1f}%' if mfu else '-'}, mem {mem:.2f} GB, eta {eta / 60:.1f} min")
    append_log({"iter": iter_num, "epoch": epoch, "loss": loss, **{f"loss_{k}": v for k, v in zip(names, parts)},
                "lr": lr, "videos_per_s": vps, "mfu": mfu, "mem_gb": mem, "time": now - t0})
    return now


def append_log(record: dict):
    if is_master():
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def check_step(loss: float, bad_share: float, bad: list, bad_seen: set, iter_num: int, last_good: str | None,
               lmdb_path: str):
    """Stop on a NaN loss or too many unreadable videos (all ranks see the same averages); name each bad one once."""
    if not math.isfinite(loss):
        good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        raise SystemExit(f"loss is {loss} at iter {iter_num}; stopping, {good}. Try a lower learning_rate or "
                         f"dtype=bfloat16/float32")
    if bad_share > 0:
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, bad)
            bad = [b for rank_bad in gathered for b in rank_bad]
        for fault in (f for item in bad for f in item.split("\n")):
            video = fault.split(" ", 1)[0]
            if video not in bad_seen:
                bad_seen.add(video)
                print0(f"unreadable video {fault} at iter {iter_num}: replaced by another sample")
        if bad_share > max_bad_fraction:
            raise SystemExit(f"{100 * bad_share:.0f}% of the videos of iter {iter_num} could not be read, more than "
                             f"max_bad_fraction={max_bad_fraction}; check the frames in {lmdb_path}")


def eval_and_save(raw_model, tokenizer, evaldata: tuple, state: dict, keep_previous: bool) -> float:
    """Evaluate, log, save `state` as ckpt.pt and its weights as best.pt where R@1 improved -> the best R@1. `state`
    is taken before eval, which leaves the queues and the RNG as they were: a run resumed from it continues exactly."""
    edir, split, caption_field = evaldata
    metrics = evaluate(raw_model, edir, split, tokenizer, caption_field)
    r1, it = metrics["t2v"]["R1"], state["iter_num"]
    print0(f"iter {it}: {split} T2V R@1 {r1:.1f} R@5 {metrics['t2v']['R5']:.1f}, V2T R@1 {metrics['v2t']['R1']:.1f} "
           f"(captions of {metrics['context_length']} tokens)")
    improved = r1 > state["best_r1"]
    state["best_r1"] = max(state["best_r1"], r1)
    append_log({"iter": it, "epoch": state["epoch"], "val": {k: metrics[k] for k in ("t2v", "v2t")}})
    if is_master():
        runs.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state, keep_previous)
        if improved:  # the weights only: best.pt is for evaluation and fine-tuning, ckpt.pt for resuming
            runs.save_checkpoint(os.path.join(out_dir, "best.pt"), {k: v for k, v in state.items() if k not in (
                "optimizer", "scaler", "rng")}, keep_previous=False)
        print0(f"saved checkpoint to {out_dir}/ckpt.pt (iter {it}, {split} R@1 {r1:.1f}"
               f"{', new best' if improved else ''})")
    return state["best_r1"]


def final_test(model, tokenizer, evaldata: tuple, iter_num: int, t0: float):
    """Test metrics -> results.json: of the best-by-val weights, or without a val split of the final weights plus,
    under "best_on_test", of the weights best on the test split itself (the original's protocol on MSR-VTT)."""
    edir, eval_split, caption_field = evaldata
    best_path = os.path.join(out_dir, "best.pt")
    best = hmmc_model.read_checkpoint(best_path) if os.path.exists(best_path) else None
    used = f"final weights (iter {iter_num})"
    if eval_split != TEST_SPLIT and best is not None and best["iter_num"] != iter_num:
        model.load_state_dict(best["model"])
        used = f"best {eval_split} weights (iter {best['iter_num']})"
    metrics = evaluate(model, edir, TEST_SPLIT, tokenizer, caption_field)
    chance = f"chance R@1 {100 / max(metrics['num_videos'], 1):.2f}%"
    print0(hmmc_eval.format_table(metrics, f"{TEST_SPLIT} split, {used}, {chance}"))
    result = {**metrics, "split": TEST_SPLIT, "weights": used, "iter": iter_num,
              "videos_seen": iter_num * batch_size * gradient_accumulation_steps, "time_s": time.time() - t0}
    if eval_split == TEST_SPLIT and best is not None:
        used = (f"best {TEST_SPLIT} weights (iter {best['iter_num']}), chosen on the {TEST_SPLIT} split itself: the "
                f"original's protocol, optimistic")
        if best["iter_num"] != iter_num:
            model.load_state_dict(best["model"])
            metrics = evaluate(model, edir, TEST_SPLIT, tokenizer, caption_field)
        print0(hmmc_eval.format_table(metrics, f"{TEST_SPLIT} split, {used}"))
        result["best_on_test"] = {**metrics, "split": TEST_SPLIT, "weights": used, "iter": best["iter_num"]}
    if is_master():
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print0(f"wrote {out_dir}/results.json; training took {(time.time() - t0) / 60:.1f} min")


# -----------------------------------------------------------------------------

def main(argv=None):
    global device
    given = set()  # the keys this command sets: a resume compares only these with the run's settings
    config = configure(DEFAULTS, sys.argv[1:] if argv is None else argv, prog="train.py",
                       descriptions=describe(__file__), given=given)
    config["out_dir"] = config["out_dir"] or f"out-{config['dataset']}"
    config, resume_path = runs.start_or_resume(config, given, DEFAULTS)
    globals().update(config)  # the settings are plain names from here on, nanoGPT style
    ddp, rank, world_size, device = init_compute(device)
    set_cpu_threads(device)
    try:
        with runs.catch_signals(signal.SIGTERM):
            train(config, ddp, rank, world_size, resume_path)
    except KeyboardInterrupt:  # a second Ctrl-C in the loop, or one outside it: one line instead of a traceback
        last = os.path.join(out_dir, "ckpt.pt")
        print0("Ctrl-C: stopped at once; " + (f"the same command continues from {last}, the last checkpoint"
                                               if os.path.exists(last) else "no checkpoint was written"))
        raise SystemExit(runs.INTERRUPTED)
    finally:
        cleanup_compute()


def train(config: dict, ddp: bool, rank: int, world_size: int, resume_path: str | None):
    """Setup, the training loop, the final test. `config` is the run's settings, as its checkpoints record them."""
    master, device_type = rank == 0, torch.device(device).type
    if batch_size % world_size:  # settings that cannot work, refused before anything slow happens
        raise SystemExit(f"config error: batch_size={batch_size} (videos per micro-step over all ranks) must be "
                         f"divisible by the {world_size} ranks")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"config error: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    print0(settings_line(config))
    if text_encoder == "bert" and init_from == "scratch" and bert_pooling == "cls":
        print0("warning: a BERT trained from scratch with bert_pooling='cls' starts with every caption embedded alike "
               "and learns slowly; bert_pooling='mean' learns (config/synthetic_zh.py)")
    torch.manual_seed(seed)  # the only RNG the run draws from (saved by runs.checkpoint)
    ctx = autocast(device_type, dtype)

    train_set, tokenizer, evaldata = load_data(master, ddp)
    config["bert_vocab"] = bert_vocab
    steps_per_epoch = len(train_set) // batch_size  # micro-steps
    if steps_per_epoch == 0:
        raise SystemExit(f"config error: the {TRAIN_SPLIT} split has {len(train_set)} samples, fewer than one "
                         f"batch of {batch_size}")
    t_total = schedule_length(steps_per_epoch, gradient_accumulation_steps, epochs)
    total_iters = steps_per_epoch * epochs // gradient_accumulation_steps
    stop_iter = min(total_iters, max_iters) if max_iters > 0 else total_iters

    model, ckpt = build_model(tokenizer, resume_path, sync_bn=ddp and device_type == "cuda" and pretrain)
    raw_model = model
    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    print0(f"model: {n_params / 1e6:.2f}M trainable parameters; {len(train_set)} training samples, "
           f"{steps_per_epoch} micro-steps per epoch, {total_iters} optimizer steps in {epochs} epochs, "
           f"stopping at {stop_iter}")
    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, clip_lr_scale, text_lr, BETAS, EPS,
                                               device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    iter_num, epoch, step_in_epoch, best_r1 = runs.restore(ckpt, optimizer, scaler) if resume_path else (0, 0, 0, -1.0)
    ckpt = None  # free the memory
    if resume_path and not eval_only and iter_num >= stop_iter and runs.show_results(out_dir, iter_num):
        return

    if ddp:
        # the model keeps its queues and BN statistics in step itself; gradients live in the all-reduce buckets
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None,
                    gradient_as_bucket_view=True, forward_sync_buffers=False)
    if compile:
        # compiled around DDP, so that the graph is split at gradient buckets and all-reduces overlap the backward
        print0("compiling the model (takes a minute)")
        model = torch.compile(model)
    if eval_only:
        metrics = evaluate(raw_model, evaldata[0], TEST_SPLIT, tokenizer, evaldata[2])
        print0(hmmc_eval.format_table(metrics, f"{TEST_SPLIT} split, initial weights ({resume_path or init_from}), "
                                               f"captions of {metrics['context_length']} tokens"))
        return
    if master:
        os.makedirs(out_dir, exist_ok=True)
        runs.trim_log(os.path.join(out_dir, "log.jsonl"), iter_num)  # a new run (iter 0) starts a new log

    def snapshot():
        return runs.checkpoint(raw_model, optimizer, scaler, config, iter_num=iter_num, epoch=epoch,
                               step_in_epoch=step_in_epoch, best_r1=best_r1)

    # the training loop
    stream = batch_stream(train_set, epoch, step_in_epoch, rank, world_size)
    start_iter, t0 = iter_num, time.time()
    t_log, logged = t0, []  # each step's loss and loss parts since the last log line
    last_good = resume_path
    # after falling back to ckpt.prev.pt, the next save replaces the refused ckpt.pt instead of keeping it
    keep_previous = not (resume_path or "").endswith("ckpt.prev.pt")
    bad_seen = set()  # videos reported unreadable (once each)
    epochs_done = epoch + (step_in_epoch == steps_per_epoch)  # ckpt_epoch{N}.pt is written when this grows
    model.train()
    with runs.catch_signals(signal.SIGINT):  # in the loop only: elsewhere there is no step to save
        while iter_num < stop_iter:
            runs.fault_injection(rank, iter_num)
            lr_factor = get_lr(iter_num, t_total, warmup_proportion)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor
            step_stats, bad = [], []
            for micro in range(gradient_accumulation_steps):
                batch, (epoch, step_in_epoch), faults = next(stream)  # the position a checkpoint records
                bad += faults
                # all-reduce gradients only on the last micro-step; the others accumulate locally
                sync = nullcontext() if not ddp or micro == gradient_accumulation_steps - 1 else model.no_sync()
                try:
                    with sync:
                        with ctx:
                            loss, parts = model(batch)
                        # accumulated gradients add up: divide so the step sees the mean over micro-steps
                        scaler.scale(loss / gradient_accumulation_steps).backward()
                except torch.OutOfMemoryError:
                    raise SystemExit(f"out of GPU memory at iter {iter_num} with {batch_size // world_size} videos "
                                     f"per rank: lower batch_size and raise gradient_accumulation_steps, or set "
                                     f"activation_checkpointing=True (note batch_size is also the contrastive batch)")
                step_stats.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]))
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            raw_model.momentum_update()  # once per optimizer step (the original: every micro-step)

            # the step's only host sync, once its work is queued: losses, the share of unreadable videos and the
            # SIGTERM and Ctrl-C flags, averaged over ranks so that all stop at the same step
            flags = torch.tensor([len(bad) / (gradient_accumulation_steps * batch_size // world_size),
                                  float(runs.stop[signal.SIGTERM]), float(runs.stop[signal.SIGINT])])
            stats = torch.cat([torch.stack(step_stats).mean(dim=0), flags.to(device, non_blocking=True)])
            if ddp:
                dist.all_reduce(stats)
                stats /= world_size
            *losses, bad_share, term, interrupt = stats.tolist()
            check_step(losses[0], bad_share, bad, bad_seen, iter_num, last_good, train_set.lmdb_path)
            iter_num += 1

            logged.append(losses)
            if iter_num % log_interval == 0 or iter_num == stop_iter:
                t_log, logged = log_step(logged, list(parts), iter_num, stop_iter, epoch, lr_factor * learning_rate,
                                         t0, t_log, start_iter, raw_model), []
            saved = (eval_interval > 0 and iter_num % eval_interval == 0) or iter_num == stop_iter
            if saved:
                best_r1 = eval_and_save(raw_model, tokenizer, evaldata, snapshot(), keep_previous)
                last_good, keep_previous = os.path.join(out_dir, "ckpt.pt"), True
            finished = epoch + (step_in_epoch == steps_per_epoch)  # epochs whose every batch is used
            if keep_epoch_checkpoints and master and finished > epochs_done:  # fine-tuning may start from any epoch
                epochs_done = finished
                runs.save_checkpoint(os.path.join(out_dir, f"ckpt_epoch{finished}.pt"), snapshot(), False)
                print0(f"saved {out_dir}/ckpt_epoch{finished}.pt (end of epoch {finished}, iter {iter_num})")
            if term or interrupt:  # SIGTERM (preemption) or Ctrl-C: this step is done on every rank; save and leave
                if master and not saved:
                    runs.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), snapshot(), keep_previous)
                # the same command resumes unless it starts its run anew (overwrite) or refuses to resume
                how = "the same command continues the run" if resume_path or (auto_resume and not overwrite) else \
                    f"python train.py --init_from=resume --out_dir={out_dir} continues the run"
                code, name = (runs.PREEMPTED, "SIGTERM") if term else (runs.INTERRUPTED, "Ctrl-C")
                print0(f"{name}: saved {out_dir}/ckpt.pt at iter {iter_num} and stopped (exit status {code}); {how}")
                raise SystemExit(code)

    if ddp:
        dist.barrier()  # best.pt is complete before any rank reads it
    final_test(raw_model, tokenizer, evaldata, iter_num, t0)


if __name__ == "__main__":
    run_script(main)
