"""
Evaluate an HMMC checkpoint on a retrieval benchmark, or search your own videos with free text.

Benchmark (text-to-video and video-to-text R@1/5/10, median and mean rank; table + JSON):
$ python eval.py config/eval_synthetic.py --init_from=out/ckpt.pt
$ python eval.py config/eval_msrvtt.py --init_from=out-finetune-msrvtt/ckpt.pt --dtype=bfloat16 --device=cuda
$ torchrun --standalone --nproc_per_node=8 eval.py config/eval_msrvtt.py --init_from=out/ckpt.pt
Zero-shot baseline straight from OpenAI's CLIP weights (mean pooling over frames, no temporal transformer):
$ python eval.py config/eval_msrvtt.py --init_from=clip --clip_path=ViT-B-32.pt

Search (DIR is a folder of video files, frames are extracted on the way, or a prepared dataset folder; the index
is cached in DIR/.hmmc_index/, so a second query encodes nothing, and a new, changed or removed file is redone alone):
$ python eval.py --init_from=out/ckpt.pt --search=my_videos/ --query="a dog catches a frisbee" --top=5 --html=hits.html
prints one line per hit, best first: `rank video_id score`, the id being the file's path under DIR without its
extension (`sub/bikes` for my_videos/sub/bikes.mp4). A search page over the same folder (serve.py), at
http://127.0.0.1:8000 until Ctrl-C:
$ python eval.py --init_from=out/ckpt.pt --search=my_videos/ --serve

Scores are HMMC's hierarchical similarity: 100*cos(text, video) + frame_match_weight * mean of the top-k
100*cos(text, frame). Dual-softmax re-normalisation ("DSL", --dsl=True) is off by default and every output says
whether it was on, because published numbers often mix it in without saying so.
"""

import base64
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
import unicodedata
from collections import Counter
from html import escape

import numpy as np
import torch
import torch.distributed as dist

import configurator
import model as hmmc_model  # `model` is also the usual name of the network object, so the module gets another
import prepare
from common import autocast, cleanup_compute, init_compute, run_script, set_cpu_threads, unwrap
from tokenizer import UnkWrapped

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
# search mode
search = ""  # a folder of videos or a prepared dataset folder; turns on search mode
query = ""  # free text (English or Chinese, as the checkpoint's text encoder reads)
queries_file = ""  # more queries, one per line
top = 5  # hits printed per query
html = ""  # write a self-contained HTML page of the hits here
index_dir = ""  # where the index cache lives; default DIR/.hmmc_index
frames_per_video = 30  # frames extracted per video file when DIR is a folder of videos
extract_workers = 4  # ffmpeg processes when extracting
retry_failed = False  # extract again the files that failed before even when unchanged (changed files always are)
serve = False  # with --search: serve a search page over DIR (queries typed there) instead of answering --query
host = "127.0.0.1"  # address of the search page; anything but loopback lets other machines see it and the videos
port = 8000  # port of the search page (0: any free one)
config_keys = [k for k in globals() if k not in _keys_before and k != "_keys_before"]
SEARCH_ONLY = config_keys[config_keys.index("search") + 1:]  # the settings below `search`, which only it reads
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
                      frame_match_weight: float, chunk_size: int | None = None, normalized: bool = False) -> np.ndarray:
    """Hierarchical similarity [Q,V] as float32 numpy, computed on the embeddings' device; model.py's
    hierarchical_similarity takes the queries a chunk at a time so the (chunk, V, T) frame scores stay small."""
    top_k = max(1, min(int(top_k_frames), frame_emb.shape[1]))
    sim = hmmc_model.hierarchical_similarity(text_emb, video_emb, frame_emb, top_k=top_k,
                                             frame_match_weight=float(frame_match_weight), chunk_size=chunk_size,
                                             normalized=normalized)
    return sim.float().cpu().numpy()


def evaluate(net, data_dir: str, split: str, *, tokenizer, num_frames: int, image_size: int, context_length: int,
             top_k_frames: int, frame_match_weight: float, batch_size: int = 64, num_workers: int = 0,
             device: str = "cpu", dtype=None, dsl: bool = False, caption_field: str = "captions",
             progress: bool = True) -> dict:
    """Retrieval metrics of `net` on a prepared split: each video and caption encoded once (sharded under DDP),
    similarity and metrics on rank 0, the same dict returned on every rank: {"t2v", "v2t", "dsl", "num_videos",
    "num_texts", "context_length", "top_k_frames", "frame_match_weight", "encode_dtype", "encode_s", "videos_per_s"}.
    `net` may be wrapped in DDP or torch.compile; it is put in eval mode and its training mode restored after."""
    raw = unwrap(net)
    was_training = raw.training
    raw.eval()
    rank, world = _rank_world()
    if not raw.cfg.use_frame_fea:
        frame_match_weight = 0.0  # a model trained without frame features has no business scoring with them
    dataset = prepare.VideoTextDataset(data_dir, split, tokenizer, mode="videos", num_frames=num_frames,
                                       context_length=context_length, image_size=image_size,
                                       caption_field=caption_field, verbose=rank == 0)
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
                      context_length=int(context_length), top_k_frames=int(top_k_frames),
                      frame_match_weight=float(frame_match_weight),
                      encode_dtype=str(dtype or "float32").replace("torch.", ""), encode_s=round(encode_s, 3),
                      videos_per_s=round(len(video_emb) / max(encode_s, 1e-9), 1))
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
        # a training run's captions may be longer (CHVTT titles: 45); the benchmarks are read at their own length
        "context_length": int(cfg.get("context_length") or ckpt_config.get("eval_context_length")
                              or min(32, clip_args.get("context_length") or 32)),  # a toy tower may hold fewer
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


# ----------------------------------------------------------------------------- search: the index cache

INDEX_VERSION = 2  # bump when the layout of index_<key>.pt changes: older files are then ignored, not misread


def _list_videos(source: str, skip: str = "") -> dict:
    """{video id: path} of the video files under `source` (recursive; hidden names, *.lmdb folders and `skip`
    left out). The id is the path relative to `source` without its extension, so `bikes.MP4` and `sub/bikes.mp4`
    are `bikes` and `sub/bikes`; files that share a stem in one folder keep their extension (`a.mp4`, `a.mkv`)."""
    files = []
    for root, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".lmdb")
                         and os.path.realpath(os.path.join(root, d)) != skip)
        files += [os.path.relpath(os.path.join(root, n), source).replace(os.sep, "/") for n in sorted(names)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in prepare.VIDEO_EXTENSIONS]
    stems = Counter(os.path.splitext(f)[0] for f in files)
    return {(os.path.splitext(f)[0] if stems[os.path.splitext(f)[0]] == 1 else f): os.path.join(source, f)
            for f in files}


def _file_sha1(path: str, chunk: int = 1 << 20) -> str:
    """sha1 of a file's size, first and last MiB: a few reads whatever the size, and it tells a replaced video
    from a copy of the same file (a touch or a copy-back does not force a re-extraction)."""
    h = hashlib.sha1(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(0, os.path.getsize(path) - chunk))
        h.update(f.read(chunk))
    return h.hexdigest()


def _extract_video(job):
    """Pool worker: (id, path, frames, size) -> (id, JPEG frames or None, error or None, duration in s or None)."""
    vid, path, num_frames, frame_size = job
    try:  # the duration turns stored frame positions into times in the report
        duration = prepare.probe_video(path)["duration"]
    except Exception:
        duration = None
    _, frames, err = prepare._extract_job((vid, path, num_frames, frame_size, 90))
    return vid, frames, err, duration


def _delete_frames(db, ids) -> None:
    # FrameDB has no delete: the frames of removed or now-broken files go straight through its LMDB environment
    with db.env.begin(write=True) as txn:
        for vid in ids:
            for i in range(db.num_frames):
                txn.delete(f"{vid}_{i}".encode())


def _sync_video_folder(source: str, cache_dir: str, *, frame_size: int, frames_per_video: int, workers: int,
                       retry_failed: bool) -> dict:
    """Bring cache_dir/frames_<T>x<size>.lmdb in line with the video files under `source`: extract new and changed
    files (size or mtime differ and so does the content hash), drop removed ones, retry failed ones that changed
    (all failed ones with retry_failed). The manifest next to the LMDB records each file's size, mtime, hash,
    duration and error. Returns {"lmdb", "ids", "skipped", "paths", "stamps", "durations", "stored_frames",
    "extracted"}."""
    videos = _list_videos(source, skip=os.path.realpath(cache_dir))
    if not videos:
        raise ValueError(f"--search={source}: neither video files nor a frames.lmdb in this folder; nothing to index")
    os.makedirs(cache_dir, exist_ok=True)
    lmdb_path = os.path.join(cache_dir, f"frames_{frames_per_video}x{frame_size}.lmdb")  # one store per setting
    manifest_path = lmdb_path[:-len(".lmdb")] + ".json"
    old = {}
    if os.path.exists(manifest_path) and os.path.exists(lmdb_path):  # without the LMDB every file is new
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
    files, todo = {}, []
    for vid, path in videos.items():
        st = os.stat(path)
        prev = old.get(vid)
        if prev and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
            entry = dict(prev)
        else:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": _file_sha1(path)}
            if prev and prev["sha1"] == entry["sha1"]:  # touched, same bytes: keep the frames and the outcome
                entry = {**prev, **entry}
        entry["path"] = os.path.relpath(path, source)
        files[vid] = entry
        if "error" not in entry or (entry["error"] and retry_failed):
            todo.append(vid)
    removed = [vid for vid in old if vid not in files]

    extracted = []
    if todo or removed:
        with prepare.FrameDB(lmdb_path, readonly=False, num_frames=frames_per_video, frame_size=frame_size) as db:
            _delete_frames(db, removed)
            if todo:
                try:
                    prepare._check_ffmpeg()
                except RuntimeError as e:  # a missing tool is bad input too: one line, not a traceback
                    raise FileNotFoundError(str(e)) from None
                print(f"extracting {frames_per_video} frames from each of {len(todo)} new or changed videos "
                      f"(of {len(videos)}) into {lmdb_path}", flush=True)
            jobs = [(vid, videos[vid], frames_per_video, frame_size) for vid in todo]
            pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 1 else None
            try:
                results = pool.imap_unordered(_extract_video, jobs) if pool else map(_extract_video, jobs)
                t0 = last = time.time()
                for n, (vid, frames, err, duration) in enumerate(results, 1):  # this process is the only writer
                    files[vid].update(error=err, duration=duration)
                    if err is None:
                        db.put_video(vid, frames)
                        extracted.append(vid)
                    else:
                        _delete_frames(db, [vid])  # a file that broke must not keep serving its old frames
                    if time.time() - last >= 10:
                        last = time.time()
                        print(f"extracting: {n}/{len(jobs)} videos, {n / (last - t0):.2g}/s", flush=True)
            finally:
                if pool is not None:
                    pool.terminate()
    if files != old:  # also when files were only touched: their new mtimes spare the hashing next time
        tmp = manifest_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(files, f, ensure_ascii=False, indent=0)
        os.replace(tmp, manifest_path)  # written after the frames: a killed run redoes its videos, nothing worse
    skipped = {vid: e["error"] for vid, e in files.items() if e.get("error")}
    return {"lmdb": lmdb_path, "ids": [v for v in files if v not in skipped], "skipped": skipped, "paths": videos,
            "stamps": {v: e["sha1"] for v, e in files.items()},
            "durations": {v: e.get("duration") for v, e in files.items()}, "stored_frames": frames_per_video,
            "extracted": extracted, "retry_hint": "; a file is tried again when it changes, or with --retry_failed"}


def _read_prepared(source: str) -> dict:
    """A prepared dataset folder, read in place: the videos of all its splits (a video in several is indexed once),
    in the same dict as _sync_video_folder. Its videos are re-encoded together when frames.lmdb changes."""
    lmdb_path = os.path.join(source, "frames.lmdb")
    ids, durations = [], {}
    for name in sorted(os.listdir(source)):
        if name.endswith(".jsonl"):
            with open(os.path.join(source, name), encoding="utf-8") as f:
                for obj in map(json.loads, filter(str.strip, f)):
                    ids.append(str(obj["video_id"]))
                    durations[ids[-1]] = obj.get("duration")
    with prepare.FrameDB(lmdb_path) as db:
        ids = list(dict.fromkeys(ids or db.video_ids()))  # frames without annotations: whatever the LMDB holds
        skipped = {v: r for v, r in db.failed.items() if v in set(ids)}
        skipped.update({v: "no frames in the LMDB" for v in ids if v not in skipped and not db.has_video(v)})
        stored = db.num_frames
    data_file = os.path.join(lmdb_path, "data.mdb") if os.path.isdir(lmdb_path) else lmdb_path
    st = os.stat(data_file)
    return {"lmdb": lmdb_path, "ids": [v for v in ids if v not in skipped], "skipped": skipped, "paths": {},
            "stamps": dict.fromkeys(ids, f"{st.st_size}|{st.st_mtime_ns}"), "durations": durations,
            "stored_frames": stored, "extracted": [], "retry_hint": ""}


def build_index(net, source: str, *, cache_dir: str, model_key: str, num_frames: int, image_size: int,
                batch_size: int = 64, num_workers: int = 0, device: str = "cpu", dtype=None,
                frames_per_video: int = 30, extract_workers: int = 4, retry_failed: bool = False) -> dict:
    """Video and frame embeddings of every video under `source` (a folder of video files, or a prepared dataset
    folder), cached in `cache_dir` per model and settings. Only new and changed videos are extracted and encoded;
    removed ones are dropped. Returns {"video_ids", "video_emb" [V,E], "frame_emb" [V,T,E], "frame_indices" [T]
    (which stored frames were encoded), "stored_frames", "durations" [V] (seconds or None), "lmdb" (where the frames
    live), "skipped" {video: reason}, "key", "extracted" and "encoded" (the ids this call extracted / encoded),
    "paths" {video: its file} (empty for a prepared dataset folder: frames only)}."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--search={source}: no such folder (expected a folder of video files or a prepared "
                                f"dataset folder with frames.lmdb)")
    if os.path.exists(os.path.join(source, "frames.lmdb")):
        src = _read_prepared(source)
    else:
        if num_frames > frames_per_video:
            raise ValueError(f"the model reads {num_frames} frames per video but frames_per_video="
                             f"{frames_per_video}; pass --frames_per_video={max(30, num_frames)}")
        # frames for thumbnails are worth a few more pixels than a tiny model needs
        src = _sync_video_folder(source, cache_dir, frame_size=max(image_size, 112), frames_per_video=frames_per_video,
                                 workers=extract_workers, retry_failed=retry_failed)
    ids, skipped = src["ids"], src["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} video(s): " + "; ".join(f"{v} ({r})" for v, r in skipped.items())
              + src["retry_hint"], flush=True)
    if not ids:
        raise ValueError(f"--search={source}: no usable videos to index ({len(skipped)} skipped)")
    key = hashlib.sha1(json.dumps([INDEX_VERSION, model_key, num_frames, image_size, str(dtype),
                                   os.path.realpath(src["lmdb"])]).encode()).hexdigest()[:16]
    index_path = os.path.join(cache_dir, f"index_{key}.pt")
    old = torch.load(index_path, map_location="cpu", weights_only=True) if os.path.exists(index_path) else None
    # reuse the embeddings of every video whose file (or LMDB) is as it was; freshly extracted frames are encoded
    row = {v: i for i, v in enumerate(old["video_ids"] if old else [])
           if src["stamps"].get(v) == old["stamps"][i] and v not in src["extracted"]}
    todo = [v for v in ids if v not in row]
    video_emb, frame_emb = (old["video_emb"], old["frame_emb"]) if old else (None, None)
    if todo:
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, "encode.jsonl"), "w", encoding="utf-8") as f:
            for v in todo:  # the id as a stand-in caption: never scored, but some loaders want one per video
                f.write(json.dumps({"video_id": v, "captions": [v]}, ensure_ascii=False) + "\n")
        dataset = prepare.VideoTextDataset(cache_dir, "encode", None, mode="videos", num_frames=num_frames,
                                           image_size=image_size, lmdb_path=src["lmdb"])
        assert dataset.video_ids == todo, "the dataset must list the videos in the order given"
        print(f"encoding {len(todo)} videos" + (f" ({len(row)} unchanged ones reused)" if row else ""), flush=True)
        new_video, new_frame = encode_videos(net, dataset, batch_size=batch_size, num_workers=num_workers,
                                             device=device, dtype=dtype)
        if getattr(dataset, "_db", None) is not None:  # free this process's reader: the next sync may write
            dataset._db.close()
        base = len(old["video_ids"]) if old else 0
        row.update({v: base + i for i, v in enumerate(todo)})
        video_emb = torch.cat([video_emb, new_video.cpu()]) if old else new_video.cpu()
        frame_emb = torch.cat([frame_emb, new_frame.cpu()]) if old else new_frame.cpu()
    rows = torch.tensor([row[v] for v in ids], dtype=torch.long)
    index = {"video_ids": ids, "video_emb": video_emb[rows], "frame_emb": frame_emb[rows],
             "stamps": [src["stamps"][v] for v in ids],
             "frame_indices": torch.as_tensor(prepare.sample_frame_indices(src["stored_frames"], num_frames,
                                                                           "uniform"), dtype=torch.long),
             "stored_frames": src["stored_frames"], "durations": [src["durations"].get(v) for v in ids],
             "lmdb": os.path.realpath(src["lmdb"]), "skipped": {str(k): str(v) for k, v in skipped.items()},
             "key": key}
    if old is None or todo or old["video_ids"] != ids or old["skipped"] != index["skipped"]:
        tmp = index_path + ".tmp"
        torch.save(index, tmp)
        os.replace(tmp, index_path)  # a killed run never leaves half an index behind
        print(f"indexed {len(ids)} videos -> {index_path}", flush=True)
    else:
        print(f"loaded the index of {len(ids)} videos from {index_path}", flush=True)
    return {**index, "extracted": src["extracted"], "encoded": todo,
            "paths": {v: src["paths"][v] for v in ids if v in src["paths"]}}


# ----------------------------------------------------------------------------- search: queries, ranking, report

def _check_query(text: str, tokenizer) -> None:
    ids = tokenizer.encode(text)
    unk = getattr(tokenizer, "unk_id", None)
    if not text.strip() or not ids or (unk is not None and all(i == unk for i in ids)):
        raise ValueError(f"query {text!r} tokenizes to nothing the text encoder knows; write some words")


def _script(ch: str) -> str | None:
    """The writing system of a letter or symbol: "latin", "cjk", "emoji", "cyrillic", "hangul"...; None otherwise."""
    cat = unicodedata.category(ch)
    if cat == "So":
        return "emoji"  # pictographs and other symbols
    if not cat.startswith("L"):
        return None  # digits, punctuation, spaces: every script has them
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return "cjk"
    return name.split(" ")[0].lower() or "unknown"


def _quote(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def query_warnings(text: str, tokenizer, context_length: int) -> list[str]:
    """What to know before trusting the scores of `text`, one line each: it was cut to the model's caption length,
    or it is written in a script the text encoder was not trained on (the scores still look confident)."""
    out = []
    n, kept = len(tokenizer.encode(text)), context_length - 2  # each row also holds a start and an end token
    if n > kept:
        out.append(f"query {_quote(text)} is {n} tokens long; the model reads {context_length} per caption, so only "
                   f"the first {kept} were kept")
    scripts = {s for s in map(_script, text) if s}
    if isinstance(tokenizer, prepare.BertTokenizer):
        if "latin" in scripts and "cjk" not in scripts:
            out.append(f"query {_quote(text)} is in Latin script but the text encoder (Chinese BERT) was trained on "
                       f"Chinese captions; its scores will look confident and mean little. Write it in Chinese")
    elif scripts - {"latin"}:
        out.append(f"query {_quote(text)} contains {', '.join(sorted(scripts - {'latin'}))} text, which the CLIP "
                   f"text encoder (trained on English) barely knows; its scores will look confident and mean little")
    return out


@torch.no_grad()
def search_index(net, index: dict, queries: list[str], *, tokenizer, context_length: int, top_k_frames: int,
                 frame_match_weight: float, top: int = 5, device: str = "cpu", dtype=None) -> list[list[dict]]:
    """Rank the indexed videos for each query -> per query a list of hits, best first:
    {"rank", "video_id", "score", "frame_scores" [T] (100*cos per encoded frame), "top_frames" [k positions]}."""
    if not index["video_ids"]:
        raise ValueError("the index is empty: no videos to search")
    if int(top) < 1:
        raise ValueError(f"top={top}: ask for at least one hit per query")
    for q in queries:
        _check_query(q, tokenizer)
    ids, mask = tokenizer(queries, context_length)
    text_emb = encode_texts(net, ids, mask, device=device, dtype=dtype)
    video_emb = index["video_emb"].to(device)
    frame_emb = index["frame_emb"].to(device)
    k = max(1, min(int(top_k_frames), frame_emb.shape[1]))
    sim = similarity_matrix(text_emb, video_emb, frame_emb, top_k_frames=k, frame_match_weight=frame_match_weight,
                            normalized=True)  # (Q, V); encode_texts and the index give unit vectors
    results = []
    for qi in range(len(queries)):
        order = np.argsort(-sim[qi], kind="stable")[:top]
        # frame scores of the hits only: those of every video would cost as much again as the ranking (10k videos)
        frame_sim = 100.0 * torch.einsum("e,hte->ht", text_emb[qi], frame_emb[torch.as_tensor(order)]).cpu()
        results.append([{"rank": h + 1, "video_id": index["video_ids"][vi], "score": float(sim[qi, vi]),
                         "frame_scores": [float(x) for x in frame_sim[h]],
                         "top_frames": sorted(int(x) for x in frame_sim[h].topk(k).indices)}
                        for h, vi in enumerate(order)])
    return results


def thumbnail_jpeg(jpeg: bytes, height: int = 96) -> bytes:
    """A stored frame shrunk to `height` px (and at most 4x as wide), as JPEG: for the report and the search page."""
    from PIL import Image
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    img.thumbnail((height * 4, height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"  # 1:05.3


def frame_time(position: int, duration, stored) -> float | None:
    """Seconds into the video of stored frame `position`; None when the duration is unknown. Extraction takes the
    centre of each of `stored` equal segments of the video."""
    return (position + 0.5) * duration / stored if duration and stored else None


def frame_label(seconds, score: float) -> str:
    """The caption under a frame: its time in the video (when known) and 100 x cosine of the query with it."""
    return f"{_clock(seconds)} \u00b7 {score:.1f}" if seconds is not None else f"{score:.1f}"


_CSS = ("body{font-family:sans-serif;margin:16px}.meta{color:#555}.hit{margin:10px 0}"
        # frames shrink to share the page width (min-width:0 lets a flex item go below its image's width)
        ".strip{display:flex;gap:4px}figure{margin:0;flex:0 1 auto;min-width:0;text-align:center;font-size:11px;"
        "color:#555}img{display:block;max-width:100%;height:auto;box-sizing:border-box;border:3px solid transparent}"
        "figure.top img{border-color:#e8590c}figure.top{color:#e8590c;font-weight:bold}")


def page_head(title: str, *, checkpoint: str = "", skipped: dict | None = None, style: str = "") -> list[str]:
    """The top of a results page, as a list of HTML lines with everything escaped: title, the checkpoint, and the
    files skipped as unreadable with their reasons. `style` is CSS added after the report's."""
    title = escape(title)
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">", f"<title>{title}</title>",
             f"<style>{_CSS}{style}</style>", "</head><body>", f"<h1>{title}</h1>"]
    if checkpoint:
        parts.append(f"<p class=\"meta\">checkpoint: <code>{escape(checkpoint)}</code></p>")
    if skipped:
        parts.append(f"<details class=\"skipped\" open><summary>{len(skipped)} file(s) skipped as "
                     f"unreadable</summary><ul>")
        parts += [f"<li><code>{escape(v)}</code>: {escape(r)}</li>" for v, r in skipped.items()]
        parts.append("</ul></details>")
    return parts


def write_html(path: str, index: dict, queries: list[str], results: list[list[dict]], *, title: str = "",
               checkpoint: str = "") -> None:
    """One self-contained page: the checkpoint and the skipped files first, then for each query its top videos,
    each as a strip of the encoded frames (JPEG thumbnails inlined as base64, shrunk to fit the page width) with the
    top-k matched frames outlined and each frame's time in the video and score under it."""
    positions = [int(p) for p in index["frame_indices"]]
    stored = index.get("stored_frames")
    durations = dict(zip(index["video_ids"], index.get("durations") or []))
    parts = page_head(title or "HMMC search", checkpoint=checkpoint, skipped=index.get("skipped"))
    with prepare.FrameDB(index["lmdb"]) as db:
        for text, hits in zip(queries, results):
            parts.append(f"<section class=\"query\"><h2>{escape(text)}</h2>"
                         f"<p class=\"meta\">outlined: the top-{len(hits[0]['top_frames']) if hits else 0} frames "
                         f"that entered the score; under each frame: its time in the video and 100 x cosine of the "
                         f"query with it</p>")
            for hit in hits:
                vid = hit["video_id"]
                duration = durations.get(vid)
                jpegs = db.get_frames(vid, positions)
                parts.append(f"<div class=\"hit\" data-video-id=\"{escape(vid)}\"><div><b>{hit['rank']}.</b> "
                             f"{escape(vid)} &mdash; score {hit['score']:.2f}"
                             f"{f' ({_clock(duration)} long)' if duration else ''}</div><div class=\"strip\">")
                for t, (p, jpeg, score) in enumerate(zip(positions, jpegs, hit["frame_scores"])):
                    cls = " class=\"top\"" if t in hit["top_frames"] else ""
                    thumb = base64.b64encode(thumbnail_jpeg(jpeg)).decode("ascii")
                    parts.append(f"<figure{cls}><img alt=\"{escape(vid)} frame {p}\" "
                                 f"src=\"data:image/jpeg;base64,{thumb}\"><figcaption>"
                                 f"{escape(frame_label(frame_time(p, duration, stored), score))}</figcaption></figure>")
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
    """Search mode of main: index cfg["search"], print `rank video_id score` per hit, optionally write the report;
    with cfg["serve"], serve the search page instead (returns when it is stopped)."""
    if cfg["top"] < 1:
        raise ValueError(f"--top={cfg['top']}: ask for at least one hit per query (e.g. --top=5)")
    checkpoint = f"zero-shot CLIP from {cfg['clip_path']}" if cfg["init_from"] == "clip" else cfg["init_from"]
    index_args = dict(cache_dir=cfg["index_dir"] or os.path.join(cfg["search"], ".hmmc_index"),
                      model_key=_checkpoint_key(cfg["init_from"], cfg["clip_path"]), num_frames=s["num_frames"],
                      image_size=s["image_size"], batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                      device=device, dtype=dtype, frames_per_video=cfg["frames_per_video"],
                      extract_workers=cfg["extract_workers"], retry_failed=cfg["retry_failed"])
    rank_args = dict(tokenizer=tokenizer, context_length=s["context_length"], top_k_frames=s["top_k_frames"],
                     frame_match_weight=s["frame_match_weight"], device=device, dtype=dtype)
    if cfg["serve"]:
        for key in ("query", "queries_file", "html"):
            if cfg[key]:
                raise ValueError(f"--serve takes its queries in the page; drop --{key}")
        import serve  # here: only this mode needs the server
        # a query is a few small matmuls: spinning OpenMP threads on a shared CPU made them 10x slower (README)
        set_cpu_threads(device)
        serve.serve(net, cfg["search"], index_args=index_args, rank_args=rank_args, host=cfg["host"],
                    port=cfg["port"], top=cfg["top"], checkpoint=checkpoint)
        return []
    queries = [cfg["query"]] if cfg["query"] else []
    if cfg["queries_file"]:
        with open(cfg["queries_file"], encoding="utf-8") as f:
            queries += [line.strip() for line in f if line.strip()]
    if not queries:
        raise ValueError("search mode needs --query=TEXT (or --queries_file=FILE, one query per line), or --serve "
                         "for a search page")
    for q in queries:  # fail on a bad query before spending minutes on an index
        _check_query(q, tokenizer)
        for line in query_warnings(q, tokenizer, s["context_length"]):
            print(f"warning: {line}", flush=True)
    index = build_index(net, cfg["search"], **index_args)
    results = search_index(net, index, queries, top=cfg["top"], **rank_args)
    for q, hits in zip(queries, results):
        if len(queries) > 1:
            print(f"query: {q}")
        for hit in hits:
            print(f"{hit['rank']} {hit['video_id']} {hit['score']:.4f}")
    sys.stdout.flush()
    if cfg["html"]:
        write_html(cfg["html"], index, queries, results, title=f"HMMC search over {cfg['search']}",
                   checkpoint=checkpoint)
        print(f"wrote {cfg['html']}", flush=True)
    return results


def main(argv=None):
    defaults = {k: globals()[k] for k in config_keys}
    cfg = configurator.configure(defaults, sys.argv[1:] if argv is None else argv, prog="eval.py",
                                 descriptions=configurator.describe(__file__))
    misplaced = [f"--{k}" for k in SEARCH_ONLY if cfg[k] != defaults[k]]
    if misplaced and not cfg["search"]:  # else the benchmark evaluation would run and the option be ignored
        raise ValueError(f"{', '.join(misplaced)}: search mode only; add --search=DIR (a folder of videos or a "
                         f"prepared dataset) to search it, or drop {'them' if len(misplaced) > 1 else 'it'} to "
                         f"evaluate on a benchmark split")

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
    if cfg["bert_unk_input"]:
        if s["text_encoder"] != "bert":
            raise ValueError(f"bert_unk_input=True reproduces the original's Chinese VATEX input, but "
                             f"{cfg['init_from']} has a {s['text_encoder']!r} text encoder; drop the setting")
        tokenizer = UnkWrapped(tokenizer)
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
                 f"{result['frame_match_weight']:g}, DSL {'on' if cfg['dsl'] else 'off'}, features encoded in "
                 f"{result['encode_dtype']}{', [UNK]-wrapped captions' if cfg['bert_unk_input'] else ''}, "
                 f"similarity in float32")
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
    run_script(main)
