"""
Evaluate an HMMC checkpoint on a retrieval benchmark, or search your own videos with free text.

Benchmark (text-to-video and video-to-text R@1/5/10, median and mean rank; table + JSON):
$ python eval.py config/eval_synthetic.py --init_from=out/ckpt.pt
$ python eval.py config/eval_msrvtt.py --init_from=out-finetune-msrvtt/ckpt.pt --dtype=bfloat16 --device=cuda
$ torchrun --standalone --nproc_per_node=8 eval.py config/eval_msrvtt.py --init_from=out/ckpt.pt
Zero-shot baseline straight from OpenAI's CLIP weights (mean pooling over frames, no temporal transformer):
$ python eval.py config/eval_msrvtt.py --init_from=clip --clip_path=ViT-B-32.pt

Search (DIR is a folder of video files, frames are extracted on the way, or a prepared dataset folder; the index
is cached in DIR/.hmmc_index/ so a second query does not encode anything again):
$ python eval.py --init_from=out/ckpt.pt --search=my_videos/ --query="a dog catches a frisbee" --top=5 --html=hits.html
prints one line per hit, best first: `rank video_id score`.

Scores are HMMC's hierarchical similarity: 100*cos(text, video) + frame_match_weight * mean of the top-k
100*cos(text, frame). Dual-softmax re-normalisation ("DSL", --dsl=True) is off by default and every output says
whether it was on, because published numbers often mix it in without saying so.
"""

import base64
import hashlib
import io
import json
import math
import os
import sys
import time
from html import escape

import numpy as np
import torch
import torch.distributed as dist

import configurator
import model as hmmc_model  # `model` is also the usual name of the network object, so the module gets another
import prepare
from common import autocast, cleanup_compute, init_compute, unwrap

# -----------------------------------------------------------------------------
_keys_before = set(globals())
# defaults for `python eval.py`; None means "take it from the checkpoint's training config"
init_from = ""  # a checkpoint written by train.py, an original HMMC state dict, or "clip" (zero-shot baseline)
clip_path = "ViT-B-32.pt"  # OpenAI CLIP weights, for init_from="clip"
bert_path = None  # HF Chinese BERT folder, for init_from="clip" with text_encoder="bert"
dataset = None  # data dir is data/<dataset> unless data_dir is set
data_dir = None
split = "test"
caption_field = None  # "captions" (English) or e.g. "captions_zh", whatever the dataset's jsonl uses
text_encoder = None  # "clip" | "bert"; fixed by the checkpoint, only init_from="clip" may choose
bert_vocab = None  # vocab.txt of the Chinese tokenizer
num_frames = None  # frames per video (12 in every paper recipe)
image_size = None
context_length = None  # text tokens per caption (32 in the paper)
top_k_frames = None  # hierarchical matching: mean of the k best-matching frames (2 MSR-VTT fine-tune, 3 otherwise)
frame_match_weight = None  # weight of the frame term; 0 = video-level similarity only
dsl = False  # dual-softmax re-normalisation of the similarity matrix (inference trick; off = the paper's numbers)
batch_size = 256 if torch.cuda.is_available() else 64  # videos per encoding batch
num_workers = min(8, os.cpu_count() or 1)  # data loader processes: JPEG decoding is the bottleneck of eval
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
out = None  # results JSON; default: next to the checkpoint (eval_<dataset>_<split>.json) or out/ for "clip"
# search mode
search = ""  # a folder of videos or a prepared dataset folder; turns on search mode
query = ""  # free text (English or Chinese, as the checkpoint's text encoder reads)
queries_file = ""  # more queries, one per line
top = 5  # hits printed per query
html = ""  # write a self-contained HTML page of the hits here
index_dir = ""  # where the index cache lives; default DIR/.hmmc_index
frames_per_video = 30  # frames extracted per video file when DIR is a folder of videos
extract_workers = 4  # ffmpeg processes when extracting
config_keys = [k for k in globals() if k not in _keys_before and k != "_keys_before"]
# -----------------------------------------------------------------------------


def retrieval_metrics(sim, video_of_text=None) -> dict:
    """Text-to-video and video-to-text retrieval metrics of a similarity matrix (higher = more similar).

    sim: [num_texts, num_videos], numpy or torch, never modified; video_of_text: [num_texts] index of each text's
    video, default identity (square). Returns {"t2v": {...}, "v2t": {...}} with R1, R5, R10 in percent and MdR, MnR
    as 1-based ranks. Ties are pessimistic (a query's rank counts every candidate scoring at least as high as the
    true one), so a constant matrix gets chance-level recall, never a perfect one. NaN scores count as the worst
    score, so a query whose true score is NaN gets the worst rank instead of being dropped (which would flatter).
    V2T with several captions per video: each video with captions is a query, the candidates are the caption groups,
    each scored by its best caption.
    """
    if torch.is_tensor(sim):  # any device or dtype (numpy has no bfloat16)
        sim = sim.detach().float().cpu().numpy()
    if torch.is_tensor(video_of_text):
        video_of_text = video_of_text.cpu().numpy()
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must be a 2-D [num_texts, num_videos] matrix, got shape {sim.shape}")
    num_texts, num_videos = sim.shape
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    if np.isnan(sim).any():
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

    # T2V: every caption ranks all videos
    true_t2v = sim[np.arange(num_texts), video_of_text]  # (Q,)
    ranks_t2v = (sim >= true_t2v[:, None]).sum(axis=1)  # (Q,)

    # V2T: group the captions by video, score each group by its best caption (max over the group's rows)
    order = np.argsort(video_of_text, kind="stable")
    videos, starts, counts = np.unique(video_of_text[order], return_index=True, return_counts=True)  # (G,) each
    # group_score[g, v] = best caption of group g against video v, built one caption slot at a time: a few
    # (G, V) maxima (slots = the largest group, 10-20 in practice), much faster than np.maximum.reduceat on rows
    group_score = sim[order[starts]]  # (G, V) first caption of every group (a copy)
    for j in range(1, int(counts.max())):
        more = np.nonzero(counts > j)[0]
        if len(more) == len(counts):  # every group has a j-th caption (equal group sizes): no scatter needed
            np.maximum(group_score, sim[order[starts + j]], out=group_score)
        else:
            group_score[more] = np.maximum(group_score[more], sim[order[starts[more] + j]])
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
    """Dual-softmax ("DSL", CAMoE, Cheng et al. 2021): sim * softmax(sim) along `axis` (temperature 1: our scores are
    already scaled by 100, like CAMoE's logits). T2V takes the prior over texts (axis 0), which discounts a video that
    every caption likes; V2T over videos (axis 1). It uses the whole test set at once: opt-in, and labelled everywhere.
    """
    sim = np.asarray(sim, dtype=np.float64)
    finite = np.where(np.isfinite(sim), sim, -np.inf)
    weights = np.exp(finite - finite.max(axis=axis, keepdims=True))
    weights /= weights.sum(axis=axis, keepdims=True)
    return sim * weights


def metrics_with_dsl(sim: np.ndarray, video_of_text=None, dsl: bool = False) -> dict:
    """retrieval_metrics, optionally on the dual-softmax matrices (one prior per direction)."""
    if not dsl:
        return retrieval_metrics(sim, video_of_text)
    return {"t2v": retrieval_metrics(dual_softmax(sim, axis=0), video_of_text)["t2v"],
            "v2t": retrieval_metrics(dual_softmax(sim, axis=1), video_of_text)["v2t"]}


def format_table(metrics: dict, title: str = "") -> str:
    """The original README's layout: one row per direction, R@1 R@5 R@10 MdR MnR."""
    lines = [title] if title else []
    lines.append(f"{'':6s}{'R@1':>7s}{'R@5':>7s}{'R@10':>7s}{'MdR':>7s}{'MnR':>7s}")
    for name, key in (("T2V", "t2v"), ("V2T", "v2t")):
        m = metrics[key]
        lines.append(f"{name:6s}{m['R1']:7.1f}{m['R5']:7.1f}{m['R10']:7.1f}{m['MdR']:7.1f}{m['MnR']:7.1f}")
    return "\n".join(lines)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(n: int, rank: int, world: int) -> range:
    """Contiguous equal shards (the last may be shorter or empty), so gathering is a plain concatenation."""
    per = math.ceil(n / world) if n else 0
    return range(min(rank * per, n), min((rank + 1) * per, n))


def _gather_rows(batches: list[torch.Tensor], n: int, row_shape: tuple, device: str) -> torch.Tensor:
    """Concatenate this rank's batches, then every rank's shard of the n rows (shards from `_shard`), on every rank."""
    # an empty shard (more ranks than rows) still takes part in the gather
    x = torch.cat(batches) if batches else torch.zeros((0, *row_shape), device=device)
    world = _rank_world()[1]
    if world == 1:
        return x
    padded = x.new_zeros((math.ceil(n / world), *x.shape[1:]))  # all_gather needs equal shapes: pad the last shard
    padded[:len(x)] = x
    return hmmc_model.all_gather_rows(padded)[:n]


@torch.no_grad()
def encode_videos(net, dataset, *, batch_size: int = 64, num_workers: int = 0, device: str = "cpu", dtype=None,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every video of a mode="videos" dataset once -> (video_emb [V,E], frame_emb [V,T,E]) in fp32 on device.
    Under torch.distributed each rank encodes a contiguous shard and every rank gets all rows back."""
    net = unwrap(net)
    rank, world = _rank_world()
    shard = torch.utils.data.Subset(dataset, _shard(len(dataset), rank, world))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    video_embs, frame_embs, done = [], [], 0
    t0 = last_print = time.time()
    for batch in loader:
        frames = batch["video"].to(device, non_blocking=True)  # (B, T, 3, S, S) uint8: the model normalises them
        with autocast(device, dtype):
            video_emb, frame_emb = net.encode_video(frames)
        video_embs.append(video_emb.float())
        frame_embs.append(frame_emb.float())
        done, now = done + len(frames), time.time()
        if progress and rank == 0 and (now - last_print >= 10 or done == len(shard)):  # every 10 s, and the last
            rate = done / max(now - t0, 1e-9)
            print(f"encoding videos: {done}/{len(shard)}, {rate:.1f}/s, eta {(len(shard) - done) / rate:.0f}s",
                  flush=True)
            last_print = now
    E = net.cfg.clip.embed_dim
    return (_gather_rows(video_embs, len(dataset), (E,), device),
            _gather_rows(frame_embs, len(dataset), (dataset.num_frames, E), device))


@torch.no_grad()
def encode_texts(net, ids: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 256, device: str = "cpu",
                 dtype=None) -> torch.Tensor:
    """Encode every caption once -> text_emb [N,E] fp32 on device (sharded over ranks like encode_videos)."""
    net = unwrap(net)
    shard = _shard(len(ids), *_rank_world())
    text_embs = []
    for i in range(shard.start, shard.stop, batch_size):
        j = min(i + batch_size, shard.stop)
        with autocast(device, dtype):
            text_embs.append(net.encode_text(ids[i:j].to(device), mask[i:j].to(device)).float())
    return _gather_rows(text_embs, len(ids), (net.cfg.clip.embed_dim,), device)


@torch.no_grad()
def similarity_matrix(text_emb: torch.Tensor, video_emb: torch.Tensor, frame_emb: torch.Tensor, *, top_k_frames: int,
                      frame_match_weight: float, chunk_size: int | None = None) -> np.ndarray:
    """Hierarchical similarity [Q,V] as float32 numpy, computed on the embeddings' device; model.py's
    hierarchical_similarity takes the queries a chunk at a time so the (chunk, V, T) frame scores stay small."""
    top_k = max(1, min(int(top_k_frames), frame_emb.shape[1]))
    sim = hmmc_model.hierarchical_similarity(text_emb, video_emb, frame_emb, top_k=top_k,
                                             frame_match_weight=float(frame_match_weight), chunk_size=chunk_size)
    return sim.float().cpu().numpy()


def evaluate(net, data_dir: str, split: str, *, tokenizer, num_frames: int, image_size: int, context_length: int,
             top_k_frames: int, frame_match_weight: float, batch_size: int = 64, num_workers: int = 0,
             device: str = "cpu", dtype=None, dsl: bool = False, caption_field: str = "captions",
             progress: bool = True) -> dict:
    """Retrieval metrics of `net` on a prepared split: each video and caption encoded once (sharded under DDP),
    similarity and metrics on rank 0, the same dict returned on every rank: {"t2v", "v2t", "dsl", "num_videos",
    "num_texts", "top_k_frames", "frame_match_weight", "encode_s", "videos_per_s"}. `net` may be wrapped in DDP or
    torch.compile; it is put in eval mode and its training mode restored after."""
    raw = unwrap(net)
    was_training = raw.training
    raw.eval()
    rank, world = _rank_world()
    if not raw.cfg.use_frame_fea:
        frame_match_weight = 0.0  # a model trained without frame features has no business scoring with them
    dataset = prepare.VideoTextDataset(data_dir, split, tokenizer, mode="videos", num_frames=num_frames,
                                       context_length=context_length, image_size=image_size,
                                       caption_field=caption_field)
    ids, mask, video_of_text = dataset.caption_tokens()
    t0 = time.time()
    video_emb, frame_emb = encode_videos(raw, dataset, batch_size=batch_size, num_workers=num_workers,
                                         device=device, dtype=dtype, progress=progress)
    text_emb = encode_texts(raw, ids, mask, batch_size=max(batch_size, 256), device=device, dtype=dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    encode_s = time.time() - t0
    result = None
    if rank == 0:
        sim = similarity_matrix(text_emb, video_emb, frame_emb, top_k_frames=top_k_frames,
                                frame_match_weight=frame_match_weight)
        result = metrics_with_dsl(sim, video_of_text, dsl=dsl)
        result.update(dsl=bool(dsl), num_videos=len(video_emb), num_texts=len(text_emb),
                      top_k_frames=int(top_k_frames), frame_match_weight=float(frame_match_weight),
                      encode_s=round(encode_s, 3), videos_per_s=round(len(video_emb) / max(encode_s, 1e-9), 1))
    if world > 1:  # every rank returns the same dict, so callers need no rank checks
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    raw.train(was_training)
    return result


def _settings(cfg: dict, model_args: dict, ckpt_config: dict) -> dict:
    """Eval settings: command line/config file first, then the checkpoint's training config, then defaults. The
    text encoder is fixed by the checkpoint."""
    def pick(key, fallback):
        return next((c[key] for c in (cfg, ckpt_config) if c.get(key) is not None), fallback)

    if cfg["text_encoder"] and cfg["text_encoder"] != model_args["text_encoder"]:
        raise ValueError(f"{cfg['init_from']} has a {model_args['text_encoder']!r} text encoder, but "
                         f"text_encoder={cfg['text_encoder']!r} was asked for; drop the override")
    is_clip = cfg["init_from"] == "clip"
    clip_args = model_args.get("clip") or {}
    s = {
        "dataset": pick("dataset", "synthetic"),
        "num_frames": int(pick("num_frames", model_args.get("num_frames", 12))),
        "image_size": int(pick("image_size", clip_args.get("image_resolution", 224))),
        "context_length": int(pick("context_length", 32)),
        "top_k_frames": int(pick("top_k_frames", 3)),
        # the zero-shot CLIP baseline is the plain mean-pooling one unless frames are asked for explicitly
        "frame_match_weight": float(pick("frame_match_weight", 0.0 if is_clip else 1.0)),
        "caption_field": pick("caption_field", "captions"),
        "text_encoder": model_args.get("text_encoder", "clip"),
        "bert_vocab": pick("bert_vocab", None),
        "bert_path": pick("bert_path", None),
    }
    s["data_dir"] = cfg.get("data_dir") or (ckpt_config.get("data_dir") if cfg.get("dataset") is None else None) \
        or os.path.join("data", s["dataset"])
    if s["text_encoder"] == "bert" and not s["bert_vocab"]:  # look next to the BERT weights, then the data
        guesses = (os.path.join(s["bert_path"] or "", "vocab.txt"), os.path.join(s["data_dir"], "vocab.txt"))
        s["bert_vocab"] = next((g for g in guesses if os.path.isfile(g)), s["bert_vocab"])
    return s


def _files_stamp(paths: list[str], *settings) -> str:
    h = hashlib.sha1(json.dumps(settings).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _prepare_search_source(source: str, cache_dir: str, *, frame_size: int, frames_per_video: int,
                           workers: int) -> tuple[str, list[str], dict]:
    """Turn `source` into a frame LMDB plus `cache_dir/index.jsonl` listing its videos -> (lmdb path, video ids,
    {video: why it was skipped}). A folder of video files (searched recursively) is extracted into
    cache_dir/frames_<T>x<size>.lmdb when its files changed (extraction itself is resumable, so only new videos are
    decoded); a prepared dataset folder is read in place and indexes the union of its splits."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--search={source}: no such folder (expected a folder of video files or a prepared "
                                f"dataset folder with frames.lmdb)")
    lmdb_path = os.path.join(source, "frames.lmdb")
    ids = []
    if os.path.exists(lmdb_path):  # a prepared dataset: the videos of all its splits
        for name in sorted(os.listdir(source)):
            if name.endswith(".jsonl"):
                with open(os.path.join(source, name), encoding="utf-8") as f:
                    ids += [str(json.loads(line)["video_id"]) for line in f if line.strip()]
    else:
        videos = prepare.find_videos(source)  # {video id (file stem): path}, recursive, skips hidden folders
        if not videos:
            raise ValueError(f"--search={source}: neither video files nor a frames.lmdb in this folder; "
                             f"nothing to index")
        os.makedirs(cache_dir, exist_ok=True)
        # one LMDB per extraction setting: a store never mixes frame counts or sizes
        lmdb_path = os.path.join(cache_dir, f"frames_{frames_per_video}x{frame_size}.lmdb")
        stamp_path = lmdb_path + ".sha1"
        stamp = _files_stamp(list(videos.values()), frame_size, frames_per_video)
        if not (os.path.exists(stamp_path) and open(stamp_path).read() == stamp):
            print(f"extracting {frames_per_video} frames from each of {len(videos)} videos into {lmdb_path}",
                  flush=True)
            prepare.extract_frames(source, lmdb_path, num_frames=frames_per_video, frame_size=frame_size,
                                   workers=workers)
            with open(stamp_path, "w") as f:
                f.write(stamp)
        ids = list(videos)
    db = prepare.FrameDB(lmdb_path)
    # frames without annotations: index whatever the LMDB holds; a video in several splits is indexed once
    ids = list(dict.fromkeys(ids or db.video_ids()))
    skipped = {v: r for v, r in db.failed.items() if v in set(ids)}
    skipped.update({v: "no frames in the LMDB" for v in ids if v not in skipped and not db.has_video(v)})
    db.close()
    ids = [v for v in ids if v not in skipped]
    if skipped:
        print(f"skipped {len(skipped)} video(s): " + "; ".join(f"{v} ({r})" for v, r in skipped.items()), flush=True)
    if not ids:
        raise ValueError(f"--search={source}: no usable videos to index ({len(skipped)} skipped)")
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, "index.jsonl"), "w", encoding="utf-8") as f:
        for v in ids:  # the id as a stand-in caption: never scored, but some loaders want one per video
            f.write(json.dumps({"video_id": v, "captions": [v]}, ensure_ascii=False) + "\n")
    return lmdb_path, ids, skipped


def build_index(net, source: str, *, cache_dir: str, model_key: str, num_frames: int, image_size: int,
                batch_size: int = 64, num_workers: int = 0, device: str = "cpu", dtype=None,
                frames_per_video: int = 30, extract_workers: int = 4) -> dict:
    """Video and frame embeddings of every video under `source`, cached in `cache_dir` and keyed by the model, the
    settings and the videos, so a second search with the same checkpoint encodes nothing. Returns {"video_ids",
    "video_emb" [V,E], "frame_emb" [V,T,E], "frame_indices" [T] (which stored frames were encoded), "lmdb" (where
    the frames live), "skipped" {video: reason}, "key"}."""
    # frames for thumbnails are worth a few more pixels than a tiny model needs
    lmdb_path, ids, skipped = _prepare_search_source(source, cache_dir, frame_size=max(image_size, 112),
                                                     frames_per_video=frames_per_video, workers=extract_workers)
    lmdb_file = os.path.join(lmdb_path, "data.mdb") if os.path.isdir(lmdb_path) else lmdb_path
    key = hashlib.sha1(json.dumps([model_key, num_frames, image_size, str(dtype), ids, os.path.realpath(lmdb_path),
                                   os.stat(lmdb_file).st_mtime_ns]).encode()).hexdigest()[:16]
    index_path = os.path.join(cache_dir, f"index_{key}.pt")
    if os.path.exists(index_path):
        index = torch.load(index_path, map_location="cpu", weights_only=True)
        print(f"loaded the index of {len(index['video_ids'])} videos from {index_path}", flush=True)
        return index
    dataset = prepare.VideoTextDataset(cache_dir, "index", None, mode="videos", num_frames=num_frames,
                                       image_size=image_size, lmdb_path=lmdb_path)
    assert dataset.video_ids == ids, "the dataset must list the videos in index order"
    print(f"encoding {len(ids)} videos", flush=True)
    video_emb, frame_emb = encode_videos(net, dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                                         dtype=dtype)
    positions = prepare.sample_frame_indices(dataset.lmdb_frames, num_frames, "uniform")  # what the dataset reads
    index = {"video_ids": ids, "video_emb": video_emb.cpu(), "frame_emb": frame_emb.cpu(),
             "frame_indices": torch.as_tensor(positions, dtype=torch.long), "lmdb": os.path.realpath(lmdb_path),
             "skipped": {str(k): str(v) for k, v in skipped.items()}, "key": key}
    tmp = index_path + ".tmp"
    torch.save(index, tmp)
    os.replace(tmp, index_path)  # a killed run never leaves half an index behind
    print(f"indexed {len(ids)} videos -> {index_path}", flush=True)
    return index


def _check_query(text: str, tokenizer) -> None:
    ids = tokenizer.encode(text)
    unk = getattr(tokenizer, "unk_id", None)
    if not text.strip() or not ids or (unk is not None and all(i == unk for i in ids)):
        raise ValueError(f"query {text!r} tokenizes to nothing the text encoder knows; write some words")


@torch.no_grad()
def search_index(net, index: dict, queries: list[str], *, tokenizer, context_length: int, top_k_frames: int,
                 frame_match_weight: float, top: int = 5, device: str = "cpu", dtype=None) -> list[list[dict]]:
    """Rank the indexed videos for each query -> per query a list of hits, best first:
    {"rank", "video_id", "score", "frame_scores" [T] (100*cos per encoded frame), "top_frames" [k positions]}."""
    if not index["video_ids"]:
        raise ValueError("the index is empty: no videos to search")
    for q in queries:
        _check_query(q, tokenizer)
    ids, mask = tokenizer(queries, context_length)
    text_emb = encode_texts(net, ids, mask, device=device, dtype=dtype)
    video_emb = index["video_emb"].to(device)
    frame_emb = index["frame_emb"].to(device)
    k = max(1, min(int(top_k_frames), frame_emb.shape[1]))
    sim = similarity_matrix(text_emb, video_emb, frame_emb, top_k_frames=k,
                            frame_match_weight=frame_match_weight)  # (Q, V)
    frame_sim = 100.0 * torch.einsum("qe,vte->qvt", text_emb, frame_emb).cpu()  # (Q, V, T) for the report
    results = []
    for qi in range(len(queries)):
        order = np.argsort(-sim[qi], kind="stable")[:top]
        results.append([{"rank": rank, "video_id": index["video_ids"][vi], "score": float(sim[qi, vi]),
                         "frame_scores": [float(x) for x in frame_sim[qi, vi]],
                         "top_frames": sorted(int(x) for x in frame_sim[qi, vi].topk(k).indices)}
                        for rank, vi in enumerate(order, 1)])
    return results


def _thumbnail_b64(jpeg: bytes, height: int = 96) -> str:
    from PIL import Image
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    img.thumbnail((height * 4, height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(path: str, index: dict, queries: list[str], results: list[list[dict]], *, title: str = "") -> None:
    """One self-contained page: for each query its top videos, each as a strip of the encoded frames (JPEG
    thumbnails inlined as base64) with the top-k matched frames outlined and every frame's score under it."""
    positions = [int(p) for p in index["frame_indices"]]
    title = escape(title or "HMMC search")
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{title}</title>",
             "<style>body{font-family:sans-serif;margin:16px}.hit{margin:10px 0}.strip{display:flex;gap:4px}"
             "figure{margin:0;text-align:center;font-size:11px;color:#555}img{border:3px solid transparent}"
             "figure.top img{border-color:#e8590c}figure.top{color:#e8590c;font-weight:bold}</style>",
             "</head><body>", f"<h1>{title}</h1>"]
    with prepare.FrameDB(index["lmdb"]) as db:
        for text, hits in zip(queries, results):
            parts.append(f"<section class=\"query\"><h2>{escape(text)}</h2>"
                         f"<p>outlined: the top-{len(hits[0]['top_frames']) if hits else 0} frames that entered the "
                         f"score; numbers: 100 x cosine of the query with each frame</p>")
            for hit in hits:
                vid = hit["video_id"]
                jpegs = db.get_frames(vid, positions)
                parts.append(f"<div class=\"hit\" data-video-id=\"{escape(vid)}\"><div><b>{hit['rank']}.</b> "
                             f"{escape(vid)} &mdash; score {hit['score']:.2f}</div><div class=\"strip\">")
                for t, (p, jpeg, score) in enumerate(zip(positions, jpegs, hit["frame_scores"])):
                    cls = " class=\"top\"" if t in hit["top_frames"] else ""
                    parts.append(f"<figure{cls}><img alt=\"{escape(vid)} frame {p}\" "
                                 f"src=\"data:image/jpeg;base64,{_thumbnail_b64(jpeg)}\">"
                                 f"<figcaption>{score:.1f}</figcaption></figure>")
                parts.append("</div></div>")
            parts.append("</section>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def _checkpoint_key(init_from: str, clip_path: str) -> str:
    path = clip_path if init_from == "clip" else init_from
    st = os.stat(path)
    return f"{init_from}|{os.path.realpath(path)}|{st.st_size}|{int(st.st_mtime)}"


def _search(net, cfg: dict, s: dict, tokenizer, device: str, dtype) -> list[list[dict]]:
    """Search mode of main: index cfg["search"], print `rank video_id score` per hit, optionally write the report."""
    queries = [cfg["query"]] if cfg["query"] else []
    if cfg["queries_file"]:
        with open(cfg["queries_file"], encoding="utf-8") as f:
            queries += [line.strip() for line in f if line.strip()]
    if not queries:
        raise ValueError("search mode needs --query=TEXT (or --queries_file=FILE, one query per line)")
    for q in queries:  # fail on a bad query before spending minutes on an index
        _check_query(q, tokenizer)
    index = build_index(net, cfg["search"], cache_dir=cfg["index_dir"] or os.path.join(cfg["search"], ".hmmc_index"),
                        model_key=_checkpoint_key(cfg["init_from"], cfg["clip_path"]), num_frames=s["num_frames"],
                        image_size=s["image_size"], batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                        device=device, dtype=dtype, frames_per_video=cfg["frames_per_video"],
                        extract_workers=cfg["extract_workers"])
    results = search_index(net, index, queries, tokenizer=tokenizer, context_length=s["context_length"],
                           top_k_frames=s["top_k_frames"], frame_match_weight=s["frame_match_weight"],
                           top=cfg["top"], device=device, dtype=dtype)
    for q, hits in zip(queries, results):
        if len(queries) > 1:
            print(f"query: {q}")
        for hit in hits:
            print(f"{hit['rank']} {hit['video_id']} {hit['score']:.4f}")
    sys.stdout.flush()
    if cfg["html"]:
        write_html(cfg["html"], index, queries, results, title=f"HMMC search over {cfg['search']}")
        print(f"wrote {cfg['html']}", flush=True)
    return results


def main(argv=None):
    defaults = {k: globals()[k] for k in config_keys}
    cfg = configurator.configure(defaults, sys.argv[1:] if argv is None else argv, prog="eval.py",
                                 descriptions=configurator.describe(__file__))

    # under torchrun the encoding is sharded over the processes and the metrics computed on rank 0
    ddp, rank, _, dev = init_compute(cfg["device"]) if not cfg["search"] else (False, 0, 1, cfg["device"])
    # autocast on the GPU only: CPU bf16 matmuls are slower than fp32 on most CPUs
    dtype = None if cfg["dtype"] == "float32" or not dev.startswith("cuda") else cfg["dtype"]

    is_clip = cfg["init_from"] == "clip"
    if is_clip:  # the zero-shot baseline: mean pooling of CLIP frame embeddings
        zero_shot = hmmc_model.HMMCConfig(text_encoder=cfg["text_encoder"] or "clip", use_temp=False)
        net, info = hmmc_model.load_model("clip", zero_shot, clip_path=cfg["clip_path"], bert_path=cfg["bert_path"],
                                          device=dev)
    elif cfg["init_from"]:
        net, info = hmmc_model.load_model(cfg["init_from"], device=dev)
    else:
        raise ValueError("nothing to evaluate: pass --init_from=<ckpt.pt> (train.py's checkpoint), an original HMMC "
                         "state dict, or --init_from=clip --clip_path=ViT-B-32.pt")
    net.eval()
    model_args = net.cfg.to_dict()
    ckpt_config = (info["checkpoint"] or {}).get("config") or {}
    info = None  # the checkpoint's tensors are in the model now
    s = _settings(cfg, model_args, ckpt_config)
    tokenizer = prepare.get_tokenizer(s["text_encoder"], s["bert_vocab"])
    if cfg["search"]:
        return _search(net, cfg, s, tokenizer, dev, dtype)

    result = evaluate(net, s["data_dir"], cfg["split"], tokenizer=tokenizer, num_frames=s["num_frames"],
                      image_size=s["image_size"], context_length=s["context_length"], top_k_frames=s["top_k_frames"],
                      frame_match_weight=s["frame_match_weight"], batch_size=cfg["batch_size"],
                      num_workers=cfg["num_workers"], device=dev, dtype=dtype, dsl=cfg["dsl"],
                      caption_field=s["caption_field"])
    if rank == 0:
        label = "zero-shot CLIP (mean pooling)" if is_clip else cfg["init_from"]
        title = (f"{label} on {s['dataset']} {cfg['split']}: {result['num_texts']} captions x "
                 f"{result['num_videos']} videos, top-{s['top_k_frames']} frames, frame_match_weight "
                 f"{result['frame_match_weight']:g}, DSL {'on' if cfg['dsl'] else 'off'}")
        print(f"encoded {result['num_videos']} videos and {result['num_texts']} captions in {result['encode_s']:.1f}s "
              f"({result['videos_per_s']:.0f} videos/s)")
        print(format_table(result, title))
        out_path = cfg["out"]
        if not out_path:
            base = "out" if is_clip else os.path.dirname(cfg["init_from"]) or "."
            name = f"eval_{'clip_' if is_clip else ''}{s['dataset']}_{cfg['split']}{'_dsl' if cfg['dsl'] else ''}"
            out_path = os.path.join(base, name + ".json")
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({**result, "split": cfg["split"], "checkpoint": cfg["init_from"], "config": {**cfg, **s},
                       "model_args": model_args}, f, indent=2, default=str)
        print(f"wrote {out_path}", flush=True)
    if ddp:
        cleanup_compute()
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input or config: the message says what to fix
        sys.exit(f"error: {e}")
