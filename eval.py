"""
Evaluate an HMMC checkpoint on a retrieval benchmark: T2V and V2T R@1/5/10, median and mean rank (a table and a JSON
file). Scores are 100 cos(text, video) + frame_match_weight * mean of the top-k 100 cos(text, frame). Dual softmax
(--dsl=True) is off by default and every output says whether it was on: published numbers often mix it in unsaid.

$ python eval.py config/eval_msrvtt.py --init_from=out-finetune-msrvtt/ckpt.pt --dtype=bfloat16 --device=cuda
$ torchrun --standalone --nproc_per_node=8 eval.py config/eval_msrvtt.py --init_from=out/ckpt.pt
$ python eval.py config/eval_msrvtt.py --init_from=clip --clip_path=ViT-B-32.pt   # zero-shot CLIP, mean pooling
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import configurator
import model as hmmc_model  # `model` is also the usual name of the network object, so the module gets another
import prepare
from common import autocast, cleanup_compute, init_compute, run_script
from tokenizer import UnkWrapped, get_tokenizer

_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
# -----------------------------------------------------------------------------
_keys_before = set(globals())
# defaults for `python eval.py`; None means "take it from the checkpoint's training config"
init_from = ""  # a checkpoint written by train.py, an original HMMC state dict, or "clip" (zero-shot baseline)
clip_path = "ViT-B-32.pt"  # OpenAI CLIP weights, for init_from="clip"
bert_path = None  # HF Chinese BERT folder, for init_from="clip" with text_encoder="bert"
dataset = None  # data dir is data/<dataset> unless data_dir is set
data_dir = None  # a prepared dataset folder (frames.lmdb + <split>.jsonl); overrides dataset
split = "test"  # which <split>.jsonl of the dataset to evaluate
caption_field = None  # "captions" (English) or e.g. "captions_zh", whatever the dataset's jsonl uses
text_encoder = None  # "clip" | "bert"; fixed by the checkpoint, only init_from="clip" may choose
bert_vocab = None  # vocab.txt of the Chinese tokenizer
num_frames = None  # frames per video (12 in every paper recipe)
image_size = None  # pixels per frame side the model sees (224 for ViT-B/32)
context_length = None  # text tokens per caption; default the checkpoint's eval_context_length, else 32 (the paper's)
top_k_frames = None  # hierarchical matching: mean of the k best-matching frames (2 MSR-VTT fine-tune, 3 otherwise)
frame_match_weight = None  # weight of the frame term; 0 = video-level similarity only
bert_unk_input = False  # Chinese captions as [UNK] ... [UNK], no [CLS]/[SEP]: the original's VATEX loader
dsl = False  # dual-softmax re-normalisation of the similarity matrix (inference trick; off = the paper's numbers)
batch_size = 256 if torch.cuda.is_available() else 64  # videos per encoding batch
num_workers = min(8, os.cpu_count() or 1)  # data loader processes: JPEG decoding is the bottleneck of eval
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda" or "cuda:N"
dtype = "bfloat16" if _bf16 else "float32"  # autocast on the GPU: "float32", "bfloat16" or "float16"
out = None  # results JSON; default: next to the checkpoint (eval_<dataset>_<split>.json) or out/ for "clip"
config_keys = [k for k in globals() if k not in _keys_before and k != "_keys_before"]
# -----------------------------------------------------------------------------


def retrieval_metrics(sim, video_of_text=None) -> dict:
    """T2V and V2T retrieval metrics of a similarity matrix sim [num_texts, num_videos] (numpy or torch, never
    modified); video_of_text [num_texts]: each text's video, default identity. -> {"t2v": {...}, "v2t": {...}} with
    R1, R5, R10 in percent and MdR, MnR as 1-based ranks. Ties are pessimistic (a constant matrix gets chance-level
    recall) and NaN is the worst score (never dropped, which would flatter). V2T with several captions per video:
    each video with captions is a query, the candidates are the caption groups, each scored by its best caption."""
    if torch.is_tensor(sim):  # any device or dtype (numpy has no bfloat16)
        sim = sim.detach().float().cpu().numpy()
    if torch.is_tensor(video_of_text):
        video_of_text = video_of_text.cpu().numpy()
    sim = np.asarray(sim, dtype=np.float64)  # float32 scores convert exactly: the ranks stay the same
    if sim.ndim != 2:
        raise ValueError(f"sim must be a 2-D [num_texts, num_videos] matrix, got shape {sim.shape}")
    num_texts, num_videos = sim.shape
    sim = np.where(np.isnan(sim), -np.inf, sim)  # a new array: the caller's stays as it was
    if video_of_text is None:
        if num_texts != num_videos:
            raise ValueError(f"sim is {num_texts}x{num_videos}: pass video_of_text for a non-square matrix")
        video_of_text = np.arange(num_texts)
    video_of_text = np.asarray(video_of_text).reshape(-1).astype(np.int64)
    if len(video_of_text) != num_texts:
        raise ValueError(f"video_of_text has {len(video_of_text)} entries for {num_texts} texts")
    if num_texts == 0:
        raise ValueError("no queries to evaluate (empty similarity matrix)")
    if video_of_text.min() < 0 or video_of_text.max() >= num_videos:
        raise ValueError(f"video_of_text must index the {num_videos} videos, "
                         f"got values in [{video_of_text.min()}, {video_of_text.max()}]")

    true_t2v = sim[np.arange(num_texts), video_of_text]  # (Q,)
    ranks_t2v = (sim >= true_t2v[:, None]).sum(axis=1)  # (Q,)

    # V2T: group the captions by video, score each group by its best caption (max over the group's rows)
    order = np.argsort(video_of_text, kind="stable")
    videos, starts = np.unique(video_of_text[order], return_index=True)  # (G,) each
    group_score = np.maximum.reduceat(sim[order], starts, axis=0)  # (G, V) best caption of group g against video v
    if len(videos) != num_videos:  # query = a video with captions; candidates = the G caption groups
        group_score = group_score[:, videos]  # (G, G) [group, query]
    true_v2t = np.diagonal(group_score)  # (G,)
    ranks_v2t = (group_score >= true_v2t[None, :]).sum(axis=0)  # (G,)

    return {"t2v": _rank_summary(ranks_t2v), "v2t": _rank_summary(ranks_v2t)}


def _rank_summary(ranks: np.ndarray) -> dict:
    ranks = ranks.astype(np.float64)
    recalls = {f"R{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    return {**recalls, "MdR": float(np.median(ranks)), "MnR": float(np.mean(ranks))}


def dual_softmax(sim: np.ndarray, axis: int) -> np.ndarray:
    """Dual softmax ("DSL", CAMoE): sim * softmax(sim) along `axis` (our scores are scaled by 100 already). T2V takes
    the prior over texts (axis 0), which discounts a video every caption likes; V2T over videos (axis 1)."""
    sim = np.asarray(sim, dtype=np.float64)
    finite = np.where(np.isfinite(sim), sim, -np.inf)
    weights = np.exp(finite - finite.max(axis=axis, keepdims=True))
    weights /= weights.sum(axis=axis, keepdims=True)
    return sim * weights


def format_table(metrics: dict, title: str) -> str:
    """The original README's layout: a title, then one row per direction, R@1 R@5 R@10 MdR MnR."""
    lines = [title, f"{'':6s}{'R@1':>7s}{'R@5':>7s}{'R@10':>7s}{'MdR':>7s}{'MnR':>7s}"]
    for name, key in (("T2V", "t2v"), ("V2T", "v2t")):
        m = metrics[key]
        lines.append(f"{name:6s}{m['R1']:7.1f}{m['R5']:7.1f}{m['R10']:7.1f}{m['MdR']:7.1f}{m['MnR']:7.1f}")
    return "\n".join(lines)


def _rank_world() -> tuple[int, int]:
    ddp = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)


def _shard(n: int) -> list[int]:
    """This rank's contiguous share of n rows, ceil(n / world) of them: the last rank's is padded with row n - 1, so
    every rank gathers the same shape."""
    rank, world = _rank_world()
    per = math.ceil(n / world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]


def _gather(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n rows of which each rank encoded its `_shard`, in order, on every rank."""
    return hmmc_model.all_gather_rows(x)[:n] if _rank_world()[1] > 1 else x


@torch.no_grad()
def encode_videos(net, dataset, *, batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
                  dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A mode="videos" dataset -> (video_emb [V,E], frame_emb [V,T,E]) fp32, each rank encoding a shard of it."""
    shard = torch.utils.data.Subset(dataset, _shard(len(dataset)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    embs = []  # per batch (video_emb, frame_emb), fp32
    for batch in loader:  # (B, T, 3, S, S) uint8 frames: the model normalises them
        with autocast(device, dtype):
            embs.append(net.encode_video(batch["video"].to(device, non_blocking=True)))
    video_emb, frame_emb = (torch.cat(parts) for parts in zip(*embs))
    return _gather(video_emb, len(dataset)), _gather(frame_emb, len(dataset))


@torch.no_grad()
def encode_texts(net, ids: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 256, device: str = "cpu",
                 dtype=None) -> torch.Tensor:
    """Encode every caption once -> text_emb [N,E] fp32 on device (sharded over ranks like encode_videos)."""
    rows = _shard(len(ids))
    batches = zip(ids[rows].split(batch_size), mask[rows].split(batch_size))
    with autocast(device, dtype):
        text_emb = torch.cat([net.encode_text(i.to(device), m.to(device)) for i, m in batches])  # fp32
    return _gather(text_emb, len(ids))


def evaluate(net, data_dir: str, split: str, *, tokenizer, num_frames: int, image_size: int, context_length: int,
             top_k_frames: int, frame_match_weight: float, batch_size: int = 64, num_workers: int = 0,
             device: str = "cpu", dtype=None, dsl: bool = False, caption_field: str = "captions") -> dict:
    """Retrieval metrics of the (unwrapped) `net` on a prepared split, encoded once (sharded under DDP), scored on
    rank 0 and returned on every rank; its training mode is restored after."""
    was_training = net.training
    net.eval()
    rank, world = _rank_world()
    if not net.cfg.use_frame_fea:
        frame_match_weight = 0.0  # a model trained without frame features has no business scoring with them
    dataset = prepare.VideoTextDataset(data_dir, split, tokenizer, mode="videos", num_frames=num_frames,
                                       context_length=context_length, image_size=image_size,
                                       caption_field=caption_field, verbose=rank == 0)
    ids, mask, video_of_text = dataset.caption_tokens()
    t0 = time.time()
    video_emb, frame_emb = encode_videos(net, dataset, batch_size=batch_size, num_workers=num_workers,
                                         device=device, dtype=dtype)
    text_emb = encode_texts(net, ids, mask, batch_size=max(batch_size, 256), device=device, dtype=dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    encode_s = time.time() - t0
    result = None
    if rank == 0:
        sim = hmmc_model.hierarchical_similarity(text_emb, video_emb, frame_emb, top_k_frames,
                                                 frame_match_weight).cpu().numpy()
        if dsl:  # one prior per direction
            result = {"t2v": retrieval_metrics(dual_softmax(sim, axis=0), video_of_text)["t2v"],
                      "v2t": retrieval_metrics(dual_softmax(sim, axis=1), video_of_text)["v2t"]}
        else:
            result = retrieval_metrics(sim, video_of_text)
        result.update(dsl=bool(dsl), num_videos=len(video_emb), num_texts=len(text_emb),
                      context_length=int(context_length), top_k_frames=int(top_k_frames),
                      frame_match_weight=float(frame_match_weight),
                      encode_dtype=str(dtype or "float32").replace("torch.", ""), encode_s=round(encode_s, 3),
                      videos_per_s=round(len(video_emb) / max(encode_s, 1e-9), 1))
    box = [result]
    if world > 1:  # every rank returns the same dict, so callers need no rank checks
        dist.broadcast_object_list(box, src=0)
    net.train(was_training)
    return box[0]


def _settings(cfg: dict, model_cfg: hmmc_model.HMMCConfig, ckpt_config: dict) -> dict:
    """Eval settings: command line/config file first, then the checkpoint's training config, then defaults."""
    def pick(key, fallback):
        return next((c[key] for c in (cfg, ckpt_config) if c.get(key) is not None), fallback)

    if cfg["text_encoder"] and cfg["text_encoder"] != model_cfg.text_encoder:
        raise ValueError(f"{cfg['init_from']} has a {model_cfg.text_encoder!r} text encoder, but "
                         f"text_encoder={cfg['text_encoder']!r} was asked for; drop the override")
    s = {
        "dataset": pick("dataset", "synthetic"),
        "num_frames": int(pick("num_frames", model_cfg.num_frames)),
        "image_size": int(pick("image_size", model_cfg.clip.image_resolution)),
        # a training run's captions may be longer (CHVTT titles: 45); the benchmarks are read at their own length
        "context_length": int(cfg.get("context_length") or ckpt_config.get("eval_context_length")
                              or min(32, model_cfg.clip.context_length)),  # a toy tower may hold fewer
        "top_k_frames": int(pick("top_k_frames", 3)),
        # the zero-shot CLIP baseline is the plain mean-pooling one unless frames are asked for explicitly
        "frame_match_weight": float(pick("frame_match_weight", 0.0 if cfg["init_from"] == "clip" else 1.0)),
        "caption_field": pick("caption_field", "captions"),
        "text_encoder": model_cfg.text_encoder,
        "bert_vocab": pick("bert_vocab", None),
        "bert_path": pick("bert_path", None),
    }
    s["data_dir"] = cfg.get("data_dir") or (ckpt_config.get("data_dir") if cfg.get("dataset") is None else None) \
        or os.path.join("data", s["dataset"])
    if s["text_encoder"] == "bert" and not s["bert_vocab"]:  # look next to the BERT weights, then the data
        guesses = (os.path.join(s["bert_path"] or "", "vocab.txt"), os.path.join(s["data_dir"], "vocab.txt"))
        s["bert_vocab"] = next((g for g in guesses if os.path.isfile(g)), s["bert_vocab"])
    return s


def load_net(cfg: dict, device: str) -> tuple:
    """(net in eval mode, its settings (see _settings), its tokenizer, its training config) of cfg["init_from"]."""
    if not cfg["init_from"]:
        raise ValueError("no model: pass --init_from=<ckpt.pt> (train.py's checkpoint), an original HMMC state dict, "
                         "or --init_from=clip --clip_path=ViT-B-32.pt")
    zero_shot = None  # a checkpoint brings its own config
    if cfg["init_from"] == "clip":  # the zero-shot baseline: mean pooling of CLIP frame embeddings
        zero_shot = hmmc_model.HMMCConfig(text_encoder=cfg["text_encoder"] or "clip", use_temp=False)
    net, info = hmmc_model.load_model(cfg["init_from"], zero_shot, clip_path=cfg["clip_path"],
                                      bert_path=cfg["bert_path"], device=device)
    net.eval()
    ckpt_config = (info["checkpoint"] or {}).get("config") or {}
    s = _settings(cfg, net.cfg, ckpt_config)
    tokenizer = get_tokenizer(s["text_encoder"], s["bert_vocab"])
    if cfg.get("bert_unk_input"):
        if s["text_encoder"] != "bert":
            raise ValueError(f"bert_unk_input=True reproduces the original's Chinese VATEX input, but "
                             f"{cfg['init_from']} has a {s['text_encoder']!r} text encoder; drop the setting")
        tokenizer = UnkWrapped(tokenizer)
    return net, s, tokenizer, ckpt_config


def main(argv=None):
    defaults = {k: globals()[k] for k in config_keys}
    cfg = configurator.configure(defaults, sys.argv[1:] if argv is None else argv, prog="eval.py",
                                 descriptions=configurator.describe(__file__))

    # under torchrun the encoding is sharded over the processes and the metrics computed on rank 0
    _, rank, _, dev = init_compute(cfg["device"])
    # autocast on the GPU only: CPU bf16 matmuls are slower than fp32 on most CPUs
    dtype = None if cfg["dtype"] == "float32" or not dev.startswith("cuda") else cfg["dtype"]
    is_clip = cfg["init_from"] == "clip"
    net, s, tokenizer, _ = load_net(cfg, dev)

    result = evaluate(net, s["data_dir"], cfg["split"], tokenizer=tokenizer, num_frames=s["num_frames"],
                      image_size=s["image_size"], context_length=s["context_length"], top_k_frames=s["top_k_frames"],
                      frame_match_weight=s["frame_match_weight"], batch_size=cfg["batch_size"],
                      num_workers=cfg["num_workers"], device=dev, dtype=dtype, dsl=cfg["dsl"],
                      caption_field=s["caption_field"])
    if rank == 0:
        label = "zero-shot CLIP (mean pooling)" if is_clip else cfg["init_from"]
        title = (f"{label} on {s['dataset']} {cfg['split']}: {result['num_texts']} captions x "
                 f"{result['num_videos']} videos, top-{s['top_k_frames']} frames, frame_match_weight "
                 f"{result['frame_match_weight']:g}, DSL {'on' if cfg['dsl'] else 'off'}, features encoded in "
                 f"{result['encode_dtype']}{', [UNK]-wrapped captions' if cfg['bert_unk_input'] else ''}, "
                 f"similarity in float32")
        print(f"encoded {result['num_videos']} videos and {result['num_texts']} captions in {result['encode_s']:.1f}s "
              f"({result['videos_per_s']:.0f} videos/s)")
        print(format_table(result, title))
        base = "out" if is_clip else os.path.dirname(cfg["init_from"]) or "."
        name = f"eval_{'clip_' if is_clip else ''}{s['dataset']}_{cfg['split']}{'_dsl' if cfg['dsl'] else ''}"
        out_path = cfg["out"] or os.path.join(base, name + ".json")
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({**result, "split": cfg["split"], "checkpoint": cfg["init_from"], "config": {**cfg, **s},
                       "model_args": net.cfg.to_dict()}, f, indent=2, default=str)
        print(f"wrote {out_path}", flush=True)
    cleanup_compute()  # under torchrun
    return result


if __name__ == "__main__":
    run_script(main)
