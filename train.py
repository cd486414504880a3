"""
Train HMMC: fine-tune from CLIP or a pre-trained checkpoint on text-video pairs, or pre-train with momentum
contrast on CHVTT. With no arguments it prepares the built-in synthetic dataset and trains a tiny model on CPU in a
few minutes, then prints retrieval metrics.

$ python train.py                                                  # the embedded default (config/synthetic.py)
$ python train.py config/finetune_msrvtt.py --batch_size=64 --gradient_accumulation_steps=4
$ torchrun --standalone --nproc_per_node=8 train.py config/pretrain_chvtt.py
$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py config/...
$ python train.py --init_from=resume --out_dir=out-synthetic      # continue where a run stopped, exactly

Writes out_dir/ckpt.pt (latest, with its sha256 in ckpt.pt.sha256; the one before is ckpt.prev.pt), best.pt (best
val R@1, the weights only), log.jsonl (one JSON line per log interval) and results.json (test metrics at the end); with
keep_epoch_checkpoints also ckpt_epoch{N}.pt at the end of the N-th epoch. The same command
run again continues its run from the last checkpoint (torchrun --max-restarts, requeued jobs) and refuses a folder
that holds another run's; SIGTERM saves a checkpoint after the current step and exits with status 75, Ctrl-C
does the same with status 130 (a second Ctrl-C stops at once).
`python train.py --help` lists every setting with its default.
"""

import ast
import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as hmmc_eval  # `eval` would shadow the builtin
import model as hmmc_model  # `model` is the usual name of the network object
import prepare
import synthetic
import towers
from common import autocast, cleanup_compute, init_compute, peak_flops, print0, run_script, set_cpu_threads
from configurator import configure, describe

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
train_split = "train"  # <split>.jsonl to train on
val_split = "val"  # best checkpoint by val R@1; the test split is used when this one does not exist
test_split = "test"  # the final metrics (results.json)
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
epochs = 6  # length of training: sets the schedule
max_iters = 0  # stop after this many optimizer steps (0 = train all epochs); never changes the schedule
learning_rate = 1e-3  # new modules (temporal transformer, heads); scratch towers too
clip_lr_scale = 1.0  # CLIP vision tower lr = learning_rate * clip_lr_scale
text_lr = 1e-4  # text encoder (from scratch: 10x slower than the video towers, see config/synthetic.py)
weight_decay = 0.2  # AdamW decay of matrices (biases, norms and other 1-D tensors are not decayed)
warmup_proportion = 0.1  # of the configured training length
betas = (0.9, 0.98)  # AdamW
eps = 1e-6  # AdamW
grad_clip = 1.0  # global gradient norm; 0 = off
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" | "cuda" (torchrun gives each rank its GPU)
_gpu_dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
dtype = _gpu_dtype if torch.cuda.is_available() else "float32"  # autocast: "float32" | "bfloat16" | "float16"
compile = False  # torch.compile the model
activation_checkpointing = False  # recompute transformer activations in backward: larger batches, ~30% slower
config_keys = [k for k, v in globals().items() if not k.startswith("_") and
               isinstance(v, (int, float, bool, str, tuple, type(None))) and k not in ("config_keys",)]
_DEFAULTS = {k: globals()[k] for k in config_keys}  # kept apart: main() overwrites the globals with the config
# -----------------------------------------------------------------------------

def get_lr(it: int, t_total: float, warmup: float) -> float:
    """HMMC's warmup_cosine factor for optimizer step `it` (0-based): x = it / t_total, f = x / w during warm-up,
    then 0.5 (1 + cos(pi x)) over the whole range (not rescaled after warm-up, so it drops from 1 to
    0.5 (1 + cos(pi w)) when warm-up ends, as released). The first step gets 0."""
    x = it / t_total
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


def schedule_length(steps_per_epoch: int, gradient_accumulation_steps: int, epochs: int) -> float:
    """t_total of the original: int(micro-steps per epoch + GA - 1) / GA * epochs, a float division."""
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
    """Every RNG the run draws from, as tensors and lists only so that torch.load(weights_only=True) reads it."""
    py, np_state = random.getstate(), np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    py, np_state = state["python"], state["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((np_state[0], np_state[1].numpy(), np_state[2], np_state[3], np_state[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# the run folder: checkpoints that can be verified, resume with the run's own settings, preemption

PREEMPTED = 75  # exit status after SIGTERM and a checkpoint (EX_TEMPFAIL: rerun the same command to continue)
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT, as a shell reports it), checkpoint saved or not
# settings a resumed run may change: they decide reporting and resources, not the trajectory (max_iters only stops
# early; the schedule comes from epochs)
RESUME_OVERRIDABLE = ("max_iters", "eval_interval", "log_interval", "num_workers", "eval_batch_size", "device",
                      "compile", "activation_checkpointing", "max_bad_fraction", "keep_epoch_checkpoints")
# no part of a run: where it lives, how this command starts it, where a new run's CLIP/BERT files are
NOT_THE_RUN = ("out_dir", "auto_resume", "overwrite", "eval_only", "clip_path", "bert_path", "bert_vocab")
RUN_FILES = ("ckpt.pt", "ckpt.pt.sha256", "ckpt.prev.pt", "ckpt.prev.pt.sha256", "best.pt", "best.pt.sha256",
             "log.jsonl", "results.json")
_sigterm = False  # set by the handler only: the loop acts on it at the end of a step, on every rank at once
_sigint = False  # the same for Ctrl-C, during the training loop
_loop_pid = None  # the training process: its data loader workers inherit the handler, and leave Ctrl-C to it


def _on_sigterm(signum, frame):
    global _sigterm
    _sigterm = True  # nothing else here: a second SIGTERM during the save must not interrupt it


def _on_sigint(signum, frame):
    """Ctrl-C: the first one asks for a checkpoint after the current step, a second one stops at once (a save it
    interrupts leaves the previous checkpoint: files are written to .tmp and renamed)."""
    global _sigint
    if os.getpid() != _loop_pid:  # a data loader worker: a terminal sends Ctrl-C to every process of the job
        return
    if _sigint:
        raise KeyboardInterrupt
    _sigint = True
    if int(os.environ.get("RANK", 0)) == 0:  # straight to stderr's fd: the signal may come in the middle of a print
        os.write(2, b"\nCtrl-C: saving a checkpoint after this step; Ctrl-C again stops at once\n")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str, ckpt: dict, keep_previous: bool = True):
    """Write path and path.sha256, moving the last one to ckpt.prev.pt. Everything goes to .tmp first and the
    renames leave at any moment at least one complete checkpoint whose checksum matches."""
    prev = path.replace("ckpt.pt", "ckpt.prev.pt")
    torch.save(ckpt, path + ".tmp")
    with open(path + ".sha256.tmp", "w") as f:
        f.write(sha256_file(path + ".tmp") + "\n")
    if keep_previous and os.path.exists(path):
        if os.path.exists(path + ".sha256"):
            os.replace(path + ".sha256", prev + ".sha256")
        os.replace(path, prev)
    os.replace(path + ".sha256.tmp", path + ".sha256")
    os.replace(path + ".tmp", path)


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at path cannot be resumed from, or None. The file is hashed and opened (memory-mapped, so
    the tensors are not read); one without a .sha256 (an older train.py's) is trusted when it opens."""
    if os.path.exists(path + ".sha256"):
        with open(path + ".sha256") as f:
            if f.read().strip() != sha256_file(path):
                return f"its sha256 does not match {os.path.basename(path)}.sha256 (corrupt or partly written)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        return f"it cannot be read ({towers.load_error(e)})"
    if isinstance(ckpt, dict) and "optimizer" not in ckpt and {"config", "iter_num", "model"} <= ckpt.keys():
        return "it holds the weights only (as best.pt does: for evaluation and fine-tuning, not for resuming)"
    if not isinstance(ckpt, dict) or not {"config", "iter_num", "model", "optimizer"} <= ckpt.keys():
        return "it is not a train.py checkpoint (no config, iter_num, model or optimizer)"
    return None


def latest_checkpoint(folder: str) -> str | None:
    """The newest usable checkpoint in the folder (ckpt.pt, else ckpt.prev.pt), saying why one is passed over;
    None when there is none. Checkpoints that are all unusable end the run: that needs a person."""
    paths = [p for p in (os.path.join(folder, "ckpt.pt"), os.path.join(folder, "ckpt.prev.pt")) if os.path.exists(p)]
    problems = []
    for path in paths:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(f"{path}: {problem}")
        print0(f"refusing checkpoint {path}: {problem}")
    if problems:
        raise SystemExit(f"no usable checkpoint in {folder}/ ({'; '.join(problems)}); restore one, or start over "
                         f"with --overwrite=True")
    return None


def given_keys(argv: list) -> set:
    """The settings a command line sets itself: its --key=value and the names its config files assign."""
    keys = set()
    for arg in argv:
        if arg.startswith("--"):
            keys.add(arg[2:].partition("=")[0])
        elif os.path.isfile(arg):
            with open(arg) as f:
                tree = ast.parse(f.read())
            keys |= {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                     for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)}
    return keys


def run_differences(saved: dict, config: dict, keys) -> list:
    """The keys among `keys` whose value in config would change the run that saved `saved`."""
    return [k for k in config if k in keys and k not in RESUME_OVERRIDABLE + NOT_THE_RUN
            and config[k] != saved.get(k, _DEFAULTS[k])]


def start_or_resume(config: dict, given: set) -> tuple[dict, str | None]:
    """(the run's settings, the checkpoint to resume from or None for a new run), from out_dir's state:
    - init_from="resume": the checkpoint's settings; a setting this command gives that would change the run is
      refused, the RESUME_OVERRIDABLE ones are taken (and said);
    - a new run: auto_resume continues a checkpoint of the same settings instead, and another run's checkpoint is
      refused unless overwrite=True (which deletes that run's files)."""
    folder, forced = config["out_dir"], config["init_from"] == "resume"
    if config["eval_only"] and not forced:  # writes nothing
        return config, None
    # overwrite holds for a command's first start only: torchrun's restarts of it continue the new run
    if config["overwrite"] and not forced and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        removed = [f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))] + sorted(
            f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if f.startswith("ckpt_epoch"))
        if removed and int(os.environ.get("RANK", 0)) == 0:
            for f in removed:
                os.remove(os.path.join(folder, f))
            print0(f"overwrite: deleted {', '.join(removed)} of the run in {folder}/")
        print0(f"starting a new run in {folder}/")
        return config, None
    path = latest_checkpoint(folder)
    if path is None:
        if forced:
            raise FileNotFoundError(f"no checkpoint at {os.path.join(folder, 'ckpt.pt')} to resume: --out_dir must be "
                                    f"the folder of an earlier run")
        print0(f"starting a new run in {folder}/")
        return config, None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved, iter_num = ckpt["config"], ckpt["iter_num"]
    changed = run_differences(saved, config, given - {"init_from"} if forced else config)
    if changed and forced:
        raise SystemExit(f"config error: resuming {path} keeps the run's settings, but this command changes "
                         + ", ".join(f"{k} ({saved.get(k, _DEFAULTS[k])!r} -> {config[k]!r})" for k in changed)
                         + f"; drop them, or start a new run with another --out_dir (a resumed run may change "
                         f"only {', '.join(RESUME_OVERRIDABLE)})")
    # what a refused command can do instead: --init_from=resume with the changed settings would be refused too
    instead = (f"start this run with another --out_dir, or with --overwrite=True (deletes that run's files); continue "
               f"that run with python train.py --init_from=resume --out_dir={folder}")
    if changed:
        raise SystemExit(f"{folder} holds the checkpoint of another run (differs in: "
                         + ", ".join(f"{k} ({saved.get(k, _DEFAULTS[k])!r} -> {config[k]!r})" for k in changed)
                         + f"); {instead}")
    if not forced and not config["auto_resume"]:
        raise SystemExit(f"{folder} holds a checkpoint of this run (iter {iter_num}) and auto_resume=False; {instead}")
    run = {**_DEFAULTS, **{k: v for k, v in saved.items() if k in _DEFAULTS}, **{k: config[k] for k in NOT_THE_RUN}}
    if "eval_context_length" not in saved:  # a run from before the setting: it evaluated at its training length
        run["eval_context_length"] = run["context_length"]
    for k in RESUME_OVERRIDABLE:
        if (k in given or k == "device") and config[k] != run[k]:  # the device is the machine's, not the run's
            print0(f"resume: {k}={config[k]!r} instead of the run's {run[k]!r}")
            run[k] = config[k]
    print0(f"resuming {path} at iter {iter_num}")
    return run, path


def trim_log(path: str, iter_num: int):
    """Drop the log lines after iter_num: the steps a killed run did after its last checkpoint are done again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["iter"] <= iter_num]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def fault_injection(rank: int, iter_num: int):
    """For tests/test_train.py only: HMMC_TEST_SIGNAL="rank:iter:SIGNAL:marker" makes that rank send itself the
    signal (KILL, TERM, INT) at the start of optimizer step `iter` when the marker file is absent, creating it first,
    so that a restarted run goes through. SIGNAL@group sends it to the process group, as a terminal sends Ctrl-C to
    every process of its job (data loader workers too); several specs are separated by ";"."""
    for spec in filter(None, os.environ.get("HMMC_TEST_SIGNAL", "").split(";")):
        r, it, name, marker = spec.split(":", 3)
        if int(r) == rank and int(it) == iter_num and not os.path.exists(marker):
            open(marker, "w").close()
            name, _, to = name.partition("@")
            sig = getattr(signal, "SIG" + name)
            os.killpg(os.getpgid(0), sig) if to == "group" else os.kill(os.getpid(), sig)


def check_data(data_dir: str, splits: list, dataset_name: str):
    """Stop, naming what is missing and the command that makes it, where data_dir is not a prepared dataset."""
    missing = [p for p in ["frames.lmdb"] + [f"{s}.jsonl" for s in splits]
               if not os.path.exists(os.path.join(data_dir, p))]
    if not missing:
        return
    own = os.path.normpath(data_dir) == os.path.join("data", dataset_name)
    generic = (f"python prepare.py frames --videos=VIDEO_DIR --out={data_dir}/frames.lmdb makes the frames and "
               f"python prepare.py <msrvtt|vatex|chvtt> ... --out={data_dir} the splits")
    if dataset_name not in synthetic.BUILT_IN:
        how = generic.replace("<msrvtt|vatex|chvtt>", dataset_name)
    elif own and "frames.lmdb" not in missing:  # a built-in set that lost a split: write it again
        args = "".join(f" --{k}={v}" for k, v in synthetic.BUILT_IN[dataset_name].items())
        how = f"python prepare.py synthetic --out={data_dir}{args} writes it anew"
    elif own:
        how = f"{data_dir} holds files of another dataset; move them away and train.py writes the built-in set there"
    else:  # the user's own folder: train.py writes a built-in set only where nothing is
        how = f"{generic}; or leave --data_dir out to train on the built-in set in data/{dataset_name}"
    raise FileNotFoundError(f"dataset {dataset_name!r} is not prepared: {', '.join(missing)} missing in "
                            f"{data_dir}; {how}")


def batch_stream(dataset, start_epoch: int, start_step: int, rank: int, world_size: int, run_device: str):
    """(micro-batch on the device, (epoch, step_in_epoch) after it, the descriptions of the videos replaced in it
    because they could not be read) from a data position on, across epochs.
    Frames travel as uint8 (4x less than floats; the model normalises them), written by the workers into one
    shared-memory tensor per batch (prepare.collate). On CUDA the next batch is pinned and copied on a side stream
    while the current step runs (~230 MB per 128 videos: several ms of PCIe per step). The augmentation after the
    crop (colour jitter, grayscale, blur, flip) runs here on the device, with the parameters the loader drew."""
    copy_stream = torch.cuda.Stream() if run_device.startswith("cuda") else None
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
            moved = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            with torch.cuda.stream(copy_stream) if copy_stream else nullcontext():
                moved = {k: v.to(run_device, non_blocking=copy_stream is not None) for k, v in moved.items()}
                done = torch.cuda.Event() if copy_stream else None
                if done:
                    done.record()
            if ahead is not None:
                yield ahead
            ahead = (_wait_for_copy(moved, done), (epoch, step), [b for b in batch.get("bad", []) if b])
        epoch, step = epoch + 1, 0
    if ahead is not None:
        yield ahead


def _wait_for_copy(moved: dict, done) -> dict:
    if done is not None:
        compute = torch.cuda.current_stream()
        compute.wait_event(done)  # this batch's copy only, not the next one's that is under way
        for v in moved.values():
            v.record_stream(compute)  # memory allocated on the copy stream stays ours until the step is done
    if "augment" in moved:
        moved["video"] = prepare.augment_frames(moved["video"], moved.pop("augment"))
    return moved


def evaluate(model, data_dir: str, split: str, tokenizer, caption_field: str, run_device: str) -> dict:
    """Retrieval metrics with this run's settings. The training RNG is left where it was, so that a run that
    evaluates continues exactly like one that does not."""
    state = rng_state()
    metrics = hmmc_eval.evaluate(model, data_dir, split, tokenizer=tokenizer, num_frames=num_frames,
                                 image_size=image_size, context_length=eval_context_length, top_k_frames=top_k_frames,
                                 frame_match_weight=frame_match_weight, batch_size=eval_batch_size,
                                 num_workers=num_workers, device=run_device,
                                 dtype=None if dtype == "float32" else dtype, caption_field=caption_field,
                                 progress=False)
    set_rng_state(state)
    return metrics


def load_data(config: dict, master: bool, ddp: bool):
    """(training set, tokenizer, (eval data dir, eval split, eval caption field)). A built-in synthetic set is made
    on demand, only into a folder that does not exist or is empty (never over anyone's files); every other dataset
    by prepare.py."""
    ddir = data_dir or os.path.join("data", dataset)
    edir = os.path.join("data", eval_dataset) if eval_dataset else ddir
    for name, folder in ((dataset, ddir), (eval_dataset, edir)):
        if name in synthetic.BUILT_IN and not os.path.exists(os.path.join(folder, "frames.lmdb")) and \
                not (os.path.isdir(folder) and os.listdir(folder)):  # never into a folder that holds anything
            if master:
                synthetic.prepare_synthetic(folder, **synthetic.BUILT_IN[name])
            if ddp:
                dist.barrier()
        if name in synthetic.BUILT_IN and os.path.normpath(folder) == os.path.join("data", name):
            problem = synthetic.stale(name, folder)
            if problem:
                raise ValueError(f"dataset {name!r}: {problem}")
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
        caption_field=caption_field, tag_context_length=tag_context_length, verbose=master, replace_bad=True,
        device_augment=True)
    if master:
        warn_cut_captions([c for c, _ in train_set.captions], tokenizer, context_length, train_split)
    return train_set, tokenizer, (edir, eval_split, eval_caption_field or caption_field)


def warn_cut_captions(captions: list[str], tokenizer, length: int, split: str, sample: int = 10_000) -> None:
    """Say when the captions do not fit context_length: the cut-off words never reach the model, and nothing
    else would tell (a Chinese caption takes a token per character, about twice its English translation's count)."""
    picked = captions if len(captions) <= sample else random.Random(0).sample(captions, sample)
    sizes = [len(tokenizer.encode(c)) + 2 for c in picked]  # + start and end tokens
    cut = sum(n > length for n in sizes)
    if cut:
        where = f"{cut} of {len(picked)}" + (" sampled" if len(picked) < len(captions) else "")
        print(f"warning: {where} {split} captions are longer than context_length={length} tokens and are cut "
              f"(the longest needs {max(sizes)}); pass --context_length={max(sizes)} to keep them whole", flush=True)


def final_test(model, tokenizer, edir: str, eval_split: str, ecaption: str, iter_num: int, master: bool,
         run_device: str, t0: float):
    """The final metrics on the test split -> results.json: with the best-by-val weights where the run has a val
    split, else with the final weights, plus (under "best_on_test") the checkpoint that scored best on the test
    split itself. That second row is how the original reported MSR-VTT (no val split): the best epoch chosen on
    test, an optimistic number; the final weights' row is the unbiased one."""
    best_path = os.path.join(out_dir, "best.pt")
    used = f"final weights (iter {iter_num})"
    on_test = eval_split == test_split
    best = hmmc_model.read_checkpoint(best_path) if os.path.exists(best_path) else None
    if not on_test and best is not None and best["iter_num"] != iter_num:
        model.load_state_dict(best["model"])
        used = f"best {eval_split} weights (iter {best['iter_num']})"
    metrics = evaluate(model, edir, test_split, tokenizer, ecaption, run_device)
    chance = f"chance R@1 {100 / max(metrics.get('num_videos', 1), 1):.2f}%"
    print0(hmmc_eval.format_table(metrics, f"{test_split} split, {used}, {chance}"))
    result = {**metrics, "split": test_split, "weights": used, "iter": iter_num,
              "videos_seen": iter_num * batch_size * gradient_accumulation_steps, "time_s": time.time() - t0}
    if on_test and best is not None:
        best_used = f"best {test_split} weights (iter {best['iter_num']}), chosen on the {test_split} split itself: " \
                    f"the original's protocol, optimistic"
        if best["iter_num"] != iter_num:
            model.load_state_dict(best["model"])
            best_metrics = evaluate(model, edir, test_split, tokenizer, ecaption, run_device)
        else:
            best_metrics = metrics
        print0(hmmc_eval.format_table(best_metrics, f"{test_split} split, {best_used}"))
        result["best_on_test"] = {**best_metrics, "split": test_split, "weights": best_used,
                                  "iter": best["iter_num"]}
    if master:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print0(f"wrote {out_dir}/results.json; training took {(time.time() - t0) / 60:.1f} min")


def build_model(tokenizer, resume_path: str | None):
    """(model on the CPU, the checkpoint dict when resuming). Every HMMCConfig setting is passed here, explicitly;
    a resumed run takes its checkpoint's own. Built on the CPU and moved later, so that a GPU run starts from the
    same weights as a CPU run."""
    clip_args = hmmc_model.CLIPConfig(
        embed_dim=embed_dim, image_resolution=image_size, vision_layers=vision_layers, vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=max(context_length, tag_context_length, eval_context_length),
        vocab_size=tokenizer.vocab_size, transformer_width=transformer_width, transformer_heads=transformer_heads,
        transformer_layers=transformer_layers, eot_id=getattr(tokenizer, "eot_id", None) or 49407)
    bert_args, mlm_ids = None, {}
    if text_encoder == "bert":
        bert_args = hmmc_model.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=bert_hidden_size, num_hidden_layers=bert_layers,
            num_attention_heads=bert_heads, intermediate_size=4 * bert_hidden_size,
            max_position_embeddings=max(64, context_length, tag_context_length, eval_context_length),
            pad_token_id=tokenizer.pad_id, hidden_dropout_prob=bert_dropout, attention_probs_dropout_prob=bert_dropout)
        mlm_ids = dict(mlm_mask_id=tokenizer.mask_id, mlm_special_ids=(tokenizer.pad_id, tokenizer.cls_id,
                                                                      tokenizer.sep_id))
    model_args = dict(
        clip=clip_args, bert=bert_args, text_encoder=text_encoder, bert_pooling=bert_pooling, use_temp=use_temp,
        temporal_layers=temporal_layers, temporal_heads=temporal_heads, max_frames=max_frames,
        temporal_init=temporal_init, use_frame_fea=use_frame_fea,
        weight_video=weight_video, weight_frame=weight_frame, sim_scale=sim_scale, learn_sim_scale=learn_sim_scale,
        pretrain=pretrain, use_tags=use_tags, num_frames=num_frames, queue_size=queue_size, momentum=momentum,
        temperature=temperature, proj_hidden=proj_hidden, weight_fam=weight_fam, weight_vtm=weight_vtm,
        weight_ftm=weight_ftm, weight_mlm=weight_mlm, mlm_prob=mlm_prob, freeze_clip_vision=freeze_clip_vision,
        freeze_clip_text=freeze_clip_text, **mlm_ids)
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
    return model, info["checkpoint"]


def checkpoint_state(raw_model, optimizer, scaler, config: dict, iter_num: int, epoch: int, step_in_epoch: int,
                     best_r1: float) -> dict:
    """Everything a resumed run needs to continue exactly; plain types and tensors only (weights_only=True)."""
    return {"model": raw_model.state_dict(), "optimizer": pack_zero_rows(optimizer.state_dict()),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "model_args": raw_model.cfg.to_dict(),
            "config": config, "iter_num": iter_num, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "best_r1": best_r1, "rng": rng_state()}


def pack_zero_rows(optimizer_state: dict) -> dict:
    """The optimizer's state dict with every matrix that is zero in most of its rows stored as its other rows and
    their indices. AdamW's moments of a token embedding stay exactly zero in the row of every token the data never
    holds: 49,390 of CLIP's 49,408 on the synthetic captions, 25 of the 44 MB a checkpoint took. unpack_zero_rows
    restores it bit for bit."""
    state = {}
    for i, tensors in optimizer_state["state"].items():
        state[i] = dict(tensors)
        for k, t in tensors.items():
            if torch.is_tensor(t) and t.dim() >= 2 and t.numel():
                # a row is kept when any of its bytes is nonzero (-0.0 too), so the round trip is exact
                kept = t.contiguous().view(torch.uint8).reshape(len(t), -1).any(dim=1).nonzero().flatten()
                if 2 * len(kept) <= len(t):
                    state[i][k] = {"packed_rows": kept.cpu(), "values": t[kept], "shape": list(t.shape)}
    return {**optimizer_state, "state": state}


def unpack_zero_rows(optimizer_state: dict) -> dict:
    """pack_zero_rows undone; a state dict with nothing packed (an older checkpoint's) is returned as it is."""
    state = {}
    for i, tensors in optimizer_state["state"].items():
        state[i] = dict(tensors)
        for k, t in tensors.items():
            if isinstance(t, dict) and "packed_rows" in t:
                full = torch.zeros(t["shape"], dtype=t["values"].dtype, device=t["values"].device)
                full[t["packed_rows"].to(full.device)] = t["values"]
                state[i][k] = full
    return {**optimizer_state, "state": state}


def results_iter(folder: str) -> int | None:
    """The iteration whose weights folder/results.json reports, or None when it is missing."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("iter")


def report_bad_videos(bad: list, seen: set, iter_num: int, ddp: bool, world_size: int):
    """Print each unreadable video once, on rank 0. Called by every rank when the step's stats say some rank met
    one, so the one gather it needs happens only then."""
    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, bad)
        bad = [b for rank_bad in gathered for b in rank_bad]
    for fault in (f for item in bad for f in item.split("\n")):
        video = fault.split(" ", 1)[0]
        if video not in seen:
            seen.add(video)
            print0(f"unreadable video {fault} at iter {iter_num}: replaced by another sample")


def check_config(config: dict, world_size: int):
    """Settings that cannot work together, refused before anything slow happens."""
    if config["batch_size"] % world_size:
        raise SystemExit(f"config error: batch_size={config['batch_size']} (videos per micro-step over all ranks) "
                         f"must be divisible by the {world_size} ranks")
    if config["pretrain"] and config["queue_size"] % config["batch_size"]:
        raise SystemExit(f"config error: queue_size={config['queue_size']} must be a multiple of the global batch "
                         f"batch_size={config['batch_size']} (the queue advances by one global batch per micro-step)")
    if config["pretrain"] and config["text_encoder"] == "clip" and config["weight_mlm"] > 0:
        raise SystemExit("config error: English MLM is not supported (the CLIP text tower is causal); set "
                         "weight_mlm=0 for English pre-training, as the released English run did")
    if config["dtype"] not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"config error: dtype must be float32, bfloat16 or float16, got {config['dtype']!r}")


def settings_line(config: dict) -> str:
    """The settings that differ from the defaults block, on one line (`python train.py --help` lists them all)."""
    defaults = {**_DEFAULTS, "out_dir": f"out-{config['dataset']}"}
    same = lambda a, b: (tuple(a) if isinstance(a, list) else a) == b  # a checkpoint's config holds lists
    changed = [f"{k}={v!r}" for k, v in config.items() if k in defaults and not same(v, defaults[k])]
    return "settings: " + (", ".join(changed) + "; the rest" if changed else "all") + " as in train.py --help"


def optimizer_line(groups: list) -> str:
    """One line for the param groups: the lr and size of each part of the model, and what is decayed."""
    parts = {}
    for g in groups:
        part = g["name"].split("_")[0]  # vision, text or new (model.configure_optimizers)
        lr, n = parts.get(part, (g["base_lr"], 0))
        parts[part] = (lr, n + sum(p.numel() for p in g["params"]))
    decay = max(g["weight_decay"] for g in groups)
    return ("optimizer: AdamW, " + ", ".join(f"{part} lr {lr:.3g} ({n / 1e6:.2f}M)" for part, (lr, n) in parts.items())
            + f"; weight decay {decay:g} on matrices, none on 1-D tensors")


# -----------------------------------------------------------------------------

def main(argv=None):
    try:
        config = configure(_DEFAULTS, sys.argv[1:] if argv is None else argv, prog="train.py",
                           descriptions=describe(__file__))
    except ValueError as e:
        raise SystemExit(f"config error: {e}")
    config["out_dir"] = config["out_dir"] or f"out-{config['dataset']}"
    config, resume_path = start_or_resume(config, given_keys(sys.argv[1:] if argv is None else argv))
    globals().update(config)  # the settings are plain names from here on, nanoGPT style
    ddp, rank, world_size, run_device = init_compute(device)
    set_cpu_threads(run_device)
    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        train(config, ddp, rank, world_size, run_device, resume_path)
    except KeyboardInterrupt:  # a second Ctrl-C in the loop, or one outside it: one line instead of a traceback
        last = os.path.join(out_dir, "ckpt.pt")
        print0("Ctrl-C: stopped at once; " + (f"the same command continues from {last}, the last checkpoint"
                                               if os.path.exists(last) else "no checkpoint was written"))
        raise SystemExit(INTERRUPTED)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        cleanup_compute()


def train(config: dict, ddp: bool, rank: int, world_size: int, run_device: str, resume_path: str | None):
    """Setup, the training loop, the final test."""
    global _sigterm, _sigint, _loop_pid
    _sigterm = _sigint = False
    _loop_pid = os.getpid()
    master = rank == 0
    device_type = "cuda" if run_device.startswith("cuda") else "cpu"
    check_config(config, world_size)
    print0(settings_line(config))
    if config["text_encoder"] == "bert" and config["init_from"] == "scratch" and config["bert_pooling"] == "cls":
        print0("warning: a BERT trained from scratch with bert_pooling='cls' starts with every caption embedded alike "
               "and learns slowly; bert_pooling='mean' learns (config/synthetic_zh.py)")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    ctx = autocast(device_type, dtype)

    train_set, tokenizer, (edir, eval_split, ecaption) = load_data(config, master, ddp)
    steps_per_epoch = len(train_set) // batch_size  # micro-steps
    if steps_per_epoch == 0:
        raise SystemExit(f"config error: the {train_split} split has {len(train_set)} samples, fewer than one "
                         f"batch of {batch_size}")
    t_total = schedule_length(steps_per_epoch, gradient_accumulation_steps, epochs)
    total_iters = steps_per_epoch * epochs // gradient_accumulation_steps
    stop_iter = min(total_iters, max_iters) if max_iters > 0 else total_iters

    resume = resume_path is not None
    model, ckpt = build_model(tokenizer, resume_path)
    iter_num, epoch, step_in_epoch, best_r1 = 0, 0, 0, -1.0
    if resume:
        iter_num, epoch, step_in_epoch, best_r1 = (ckpt[k] for k in ("iter_num", "epoch", "step_in_epoch", "best_r1"))
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
    print0(optimizer_line(optimizer.param_groups))
    base_lrs = [g["base_lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if resume:
        optimizer.load_state_dict(unpack_zero_rows(ckpt["optimizer"]))
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    ckpt = None  # free the memory
    if resume and not eval_only and iter_num >= stop_iter and results_iter(out_dir) == iter_num:
        print0(f"the run in {out_dir}/ is finished (iter {iter_num}, results in {out_dir}/results.json); nothing to do")
        with open(os.path.join(out_dir, "results.json")) as f:
            results = json.load(f)
        for r in (results, results.get("best_on_test")):
            if r:
                print0(hmmc_eval.format_table(r, f"{r['split']} split, {r['weights']}"))
        return

    if ddp:
        # queues and BN statistics are kept identical by the model itself: rank 0 must not overwrite them at every
        # forward; gradients live in the all-reduce buckets (one copy fewer)
        model = DDP(model, device_ids=[int(run_device.split(":")[1])] if device_type == "cuda" else None,
                    gradient_as_bucket_view=True, forward_sync_buffers=False)
    if compile:
        # compiled around DDP, so that the graph is split at gradient buckets and all-reduces overlap the backward
        print0("compiling the model (takes a minute)")
        model = torch.compile(model)

    if eval_only:
        metrics = evaluate(raw_model, edir, test_split, tokenizer, ecaption, run_device)
        print0(hmmc_eval.format_table(metrics, f"{test_split} split, initial weights ({resume_path or init_from}), "
                                               f"captions of {metrics['context_length']} tokens"))
        return
    if master:
        os.makedirs(out_dir, exist_ok=True)
        if resume:
            trim_log(os.path.join(out_dir, "log.jsonl"), iter_num)
        elif os.path.exists(os.path.join(out_dir, "log.jsonl")):
            os.remove(os.path.join(out_dir, "log.jsonl"))  # a fresh run starts a fresh log
    peak = peak_flops(device_type)

    # the training loop
    stream = batch_stream(train_set, epoch, step_in_epoch, rank, world_size, run_device)
    start_iter = iter_num
    t0 = t_log = time.time()
    videos_since_log, losses_since_log, parts_since_log, steps_since_log = 0, 0.0, {}, 0
    last_good = resume_path
    # after falling back to ckpt.prev.pt, the next save replaces the refused ckpt.pt instead of keeping it
    keep_previous = not (resume_path or "").endswith("ckpt.prev.pt")
    bad_seen = set()  # videos reported unreadable (once each)
    epochs_done = epoch + (step_in_epoch == steps_per_epoch)  # ckpt_epoch{N}.pt is written when this grows
    model.train()
    previous_sigint = signal.signal(signal.SIGINT, _on_sigint)  # in the loop only: elsewhere there is no step to save
    while iter_num < stop_iter:
        fault_injection(rank, iter_num)
        lr_factor = get_lr(iter_num, t_total, warmup_proportion)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor
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
                raise SystemExit(f"out of GPU memory at iter {iter_num} with {batch_size // world_size} videos per "
                                 f"rank: lower batch_size and raise gradient_accumulation_steps, or set "
                                 f"activation_checkpointing=True (note batch_size is also the contrastive batch)")
            step_stats.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]))
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        raw_model.momentum_update()  # once per optimizer step (the original: every micro-step)

        # the step's only host sync, after all of its work is queued: the loss and its parts of every micro-step,
        # this rank's share of replaced (unreadable) videos and its SIGTERM and Ctrl-C flags, averaged over ranks so
        # that every rank sees the same values and all stop at the same step (on NaN, a signal or too many bad videos;
        # pre-training losses are per-rank). A NaN step has already been applied, but nothing is saved after it.
        flags = torch.tensor([len(bad) / (gradient_accumulation_steps * batch_size // world_size), float(_sigterm),
                              float(_sigint)])
        stats = torch.cat([torch.stack(step_stats).mean(dim=0), flags.to(run_device, non_blocking=True)])
        if ddp:
            dist.all_reduce(stats)
            stats /= world_size
        step_loss, *part_values, bad_share, term, interrupt = stats.tolist()
        if not math.isfinite(step_loss):
            good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            raise SystemExit(f"loss is {step_loss} at iter {iter_num} (epoch {epoch}, step {step_in_epoch}); "
                             f"stopping, {good}. Try a lower learning_rate or dtype=bfloat16/float32")
        if bad_share > 0:
            report_bad_videos(bad, bad_seen, iter_num, ddp, world_size)
            if bad_share > max_bad_fraction:
                raise SystemExit(f"{100 * bad_share:.0f}% of the videos of iter {iter_num} could not be read, more "
                                 f"than max_bad_fraction={max_bad_fraction}; check the frames in {train_set.lmdb_path}")
        iter_num += 1

        videos_since_log += batch_size * gradient_accumulation_steps
        losses_since_log += step_loss
        steps_since_log += 1
        for k, v in zip(parts, part_values):
            parts_since_log[k] = parts_since_log.get(k, 0.0) + v
        if iter_num % log_interval == 0 or iter_num == stop_iter:
            now = time.time()
            vps = videos_since_log / max(now - t_log, 1e-9)
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

        saved = False
        if (eval_interval > 0 and iter_num % eval_interval == 0) or iter_num == stop_iter:
            # the state is taken before eval (which runs no forward through the queues and restores the RNG), so a
            # run resumed from it continues exactly
            state = checkpoint_state(raw_model, optimizer, scaler, config, iter_num, epoch, step_in_epoch, best_r1)
            metrics = evaluate(raw_model, edir, eval_split, tokenizer, ecaption, run_device)
            r1 = metrics["t2v"]["R1"]
            print0(f"iter {iter_num}: {eval_split} T2V R@1 {r1:.1f} R@5 {metrics['t2v']['R5']:.1f}, "
                   f"V2T R@1 {metrics['v2t']['R1']:.1f} (captions of {metrics['context_length']} tokens)")
            improved = r1 > best_r1
            best_r1 = state["best_r1"] = max(best_r1, r1)
            if master:  # the curve of val metrics, beside the losses
                with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"iter": iter_num, "epoch": epoch, "val": {k: metrics[k] for k in
                                                                                 ("t2v", "v2t")}}) + "\n")
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state, keep_previous)
                if improved:  # the weights only: best.pt is for evaluation and fine-tuning, ckpt.pt for resuming
                    save_checkpoint(os.path.join(out_dir, "best.pt"), {k: v for k, v in state.items() if k not in (
                        "optimizer", "scaler", "rng")}, keep_previous=False)
                print0(f"saved checkpoint to {out_dir}/ckpt.pt (iter {iter_num}, {eval_split} R@1 {r1:.1f}"
                       f"{', new best' if improved else ''})")
            last_good, keep_previous, saved = os.path.join(out_dir, "ckpt.pt"), True, True
            model.train()

        if keep_epoch_checkpoints and epoch + (step_in_epoch == steps_per_epoch) > epochs_done:
            epochs_done = epoch + (step_in_epoch == steps_per_epoch)
            if master:  # a complete, resumable checkpoint: fine-tuning may start from any epoch's
                save_checkpoint(os.path.join(out_dir, f"ckpt_epoch{epochs_done}.pt"), checkpoint_state(
                    raw_model, optimizer, scaler, config, iter_num, epoch, step_in_epoch, best_r1), keep_previous=False)
                print0(f"saved {out_dir}/ckpt_epoch{epochs_done}.pt (end of epoch {epochs_done}, iter {iter_num})")

        if term or interrupt:  # SIGTERM (preemption) or Ctrl-C: this step is done on every rank; save it and leave
            if master and not saved:
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), checkpoint_state(
                    raw_model, optimizer, scaler, config, iter_num, epoch, step_in_epoch, best_r1), keep_previous)
            # the same command resumes unless it starts its run anew (overwrite) or refuses to resume
            same = resume_path is not None or (config["auto_resume"] and not config["overwrite"])
            how = "the same command continues the run" if same else \
                f"python train.py --init_from=resume --out_dir={out_dir} continues the run"
            code, name = (PREEMPTED, "SIGTERM") if term else (INTERRUPTED, "Ctrl-C")
            print0(f"{name}: saved {out_dir}/ckpt.pt at iter {iter_num} and stopped (exit status {code}); {how}")
            raise SystemExit(code)
    signal.signal(signal.SIGINT, previous_sigint)

    if ddp:
        dist.barrier()  # best.pt is complete before any rank reads it
    final_test(raw_model, tokenizer, edir, eval_split, ecaption, iter_num, master, run_device, t0)

if __name__ == "__main__":
    run_script(main)
