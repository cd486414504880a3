"""
Search your own videos with free text: an index of a folder (frames extracted by ffmpeg, embeddings cached, a new,
changed or removed file redone alone), ranking by HMMC's hierarchical similarity, and a search page.

$ python search.py --init_from=out/ckpt.pt --videos=my_videos/ --query="a dog catches a frisbee"
prints `rank video_id score` per hit, best first, the id being the file's path under DIR without its extension
(`sub/bikes` for my_videos/sub/bikes.mp4). The page over the same folder, at http://127.0.0.1:8000 until Ctrl-C:
$ python search.py --init_from=out/ckpt.pt --videos=my_videos/ --serve
Real videos want a real model: OpenAI's CLIP, zero-shot (frames mean-pooled, no temporal transformer):
$ python search.py --init_from=clip --clip_path=ViT-B-32.pt --videos=my_videos/ --serve

DIR is a folder of video files, searched recursively (a prepared dataset is evaluated with eval.py). The index lives
in DIR/.hmmc_index/ unless --index_dir says where (a folder you cannot write to needs it). Scores are
100*cos(query, video) + frame_match_weight * mean of the top-k 100*cos(query, frame): higher is closer, comparable
between the videos of one query, not a probability.
"""

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import threading
import time
import traceback
import unicodedata
import urllib.parse
from collections import Counter

import lmdb
import numpy as np
import torch
from PIL import Image

import configurator
import eval as hmmc_eval
import framestore
import model as hmmc_model
import prepare
import serve as hmmc_serve  # `serve` is also a setting
from serve import HTTPError
from common import run_script, set_cpu_threads
from tokenizer import BertTokenizer

# -----------------------------------------------------------------------------
_keys_before = set(globals())
# defaults for `python search.py`; None means "take it from the checkpoint's training config"
init_from = ""  # a checkpoint written by train.py, an original HMMC state dict, or "clip" (OpenAI CLIP, zero-shot)
clip_path = "ViT-B-32.pt"  # OpenAI CLIP weights, for init_from="clip"
bert_path = None  # HF Chinese BERT folder, for init_from="clip" with text_encoder="bert"
text_encoder = None  # "clip" | "bert"; fixed by the checkpoint, only init_from="clip" may choose
bert_vocab = None  # vocab.txt of the Chinese tokenizer
videos = ""  # the folder of video files to search (searched recursively)
query = ""  # free text (English or Chinese, as the checkpoint's text encoder reads)
top = 5  # hits per query
index_dir = ""  # where the index lives; default DIR/.hmmc_index (give one for a folder you cannot write to)
frames_per_video = 30  # frames extracted per video file
extract_workers = 4  # ffmpeg processes when extracting
retry_failed = False  # extract again the files that failed before even when unchanged (changed files always are)
serve = False  # serve a search page over DIR (queries typed there) instead of answering --query
host = "127.0.0.1"  # address of the search page; anything but loopback lets other machines see it and the videos
port = 8000  # port of the search page (0: any free one)
allowed_hosts = ""  # more names (comma-separated) the page answers to besides IP addresses and this machine's name
conn_timeout = 60.0  # seconds a connection of the page may stay silent (idle or half-sent) before it is dropped
max_connections = 64  # connections of the page served at once; more are told to retry
num_frames = None  # frames per video the model reads (the checkpoint's)
image_size = None  # pixels per frame side the model sees
context_length = None  # text tokens per query
top_k_frames = None  # hierarchical matching: mean of the k best-matching frames
frame_match_weight = None  # weight of the frame term; 0 = video-level similarity only
batch_size = 256 if torch.cuda.is_available() else 64  # videos per encoding batch
num_workers = min(8, os.cpu_count() or 1)  # data loader processes for encoding
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda" or "cuda:N"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # GPU autocast
config_keys = [k for k in globals() if k not in _keys_before and k != "_keys_before"]
# ----------------------------------------------------------------------------- the index cache

INDEX_VERSION = 2  # bump when the layout of index_<key>.pt changes: older files are then ignored, not misread


def _list_videos(source: str, skip: str = "") -> dict:
    """{video id: path} under `source`, the id the path without extension (`sub/bikes`), or with it for shared stems."""
    files = [f for f in framestore.walk_files(source, skip) if framestore.is_video(f)]
    stems = Counter(os.path.splitext(f)[0] for f in files)
    return {(os.path.splitext(f)[0] if stems[os.path.splitext(f)[0]] == 1 else f): os.path.join(source, f)
            for f in files}


def _file_sha1(path: str, chunk: int = 1 << 20) -> str:
    """sha1 of a file's size, first and last MiB: cheap at any size, and a touched or copied-back file keeps it."""
    h = hashlib.sha1(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(0, os.path.getsize(path) - chunk))
        h.update(f.read(chunk))
    return h.hexdigest()


def _inside(root: str, path: str) -> bool:  # links resolved; root already is
    return os.path.commonpath([root, os.path.realpath(path)]) == root


# whoever may open the page sees only what lies in the folder: a link out of it is skipped, not half-working
LINK_OUT = "a link to a file outside the folder: not indexed (copy or move the file into the folder)"


def _sync_video_folder(source: str, cache_dir: str, *, frame_size: int, frames_per_video: int, workers: int,
                       retry_failed: bool, progress) -> dict:
    """Bring cache_dir/frames_<T>x<size>.lmdb in line with the videos under `source` (new files, changed content,
    removed ones, failures with retry_failed), keeping each file's size, mtime, hash, duration and error in a
    manifest beside it. Returns the store's path, the usable ids, the skipped files and why, the files' paths,
    hashes and durations, and the ids extracted now."""
    videos = _list_videos(source, skip=os.path.realpath(cache_dir))
    if not videos:
        raise ValueError(f"--videos={source}: no video files in this folder, nothing to index (search.py indexes "
                         f"video files; a prepared dataset is evaluated with eval.py --data_dir={source})")
    root = os.path.realpath(source)
    outside = {vid: LINK_OUT for vid, path in videos.items() if not _inside(root, path)}
    videos = {vid: path for vid, path in videos.items() if vid not in outside}
    os.makedirs(cache_dir, exist_ok=True)
    lmdb_path = os.path.join(cache_dir, f"frames_{frames_per_video}x{frame_size}.lmdb")  # one store per setting
    manifest_path = lmdb_path[:-len(".lmdb")] + ".json"
    old = {}
    if os.path.exists(manifest_path) and os.path.exists(lmdb_path):  # without the LMDB every file is new
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
    files, todo = {}, {}
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
            todo[vid] = path
    removed = [vid for vid in old if vid not in files]
    if todo or removed:
        with framestore.FrameDB(lmdb_path, readonly=False, num_frames=frames_per_video, frame_size=frame_size) as db:
            db.delete(removed)
            if todo:
                framestore.check_ffmpeg()
                print(f"extracting {frames_per_video} frames from each of {len(todo)} new or changed videos "
                      f"(of {len(videos)}) into {lmdb_path}", flush=True)

            def shown(n, total):
                progress(f"extracting frames: {n} of {total} new or changed videos")
            for vid, (err, duration) in framestore.extract_into(db, todo, workers=workers, progress_every=10,
                                                                 on_video=shown).items():
                if err:  # name the file by its path under the folder: ffmpeg's text carries the absolute one
                    rel = os.path.relpath(todo[vid], source)
                    err = err.replace(os.path.abspath(todo[vid]), rel).replace(todo[vid], rel)
                files[vid].update(error=err, duration=duration)
    if files != old:  # also when files were only touched: their new mtimes spare the hashing next time
        tmp = manifest_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(files, f, ensure_ascii=False, indent=0)
        os.replace(tmp, manifest_path)  # written after the frames: a killed run redoes its videos, nothing worse
    skipped = {vid: e["error"] for vid, e in files.items() if e.get("error")}
    ids = [v for v in files if v not in skipped]
    return {"lmdb": lmdb_path, "ids": ids, "skipped": {**skipped, **outside}, "paths": videos,
            "stamps": {v: e["sha1"] for v, e in files.items()},
            "durations": {v: e.get("duration") for v, e in files.items()},
            "extracted": [v for v in todo if v not in skipped]}


def build_index(net, source: str, *, cache_dir: str, model_key: str, num_frames: int, image_size: int,
                batch_size: int = 64, num_workers: int = 0, device: str = "cpu", dtype=None,
                frames_per_video: int = 30, extract_workers: int = 4, retry_failed: bool = False,
                progress=lambda text: None) -> dict:
    """Video [V,E] and frame [V,T,E] embeddings of the video files under `source`, cached in `cache_dir` per model
    and settings: only new and changed videos are extracted and encoded. Also returns the stored frame "positions"
    the model read, "durations" {id: seconds or None}, "lmdb", "skipped", "extracted", "encoded", "paths" and "path"
    (the index file); progress(text) hears how far it got."""
    if num_frames > frames_per_video:
        raise ValueError(f"the model reads {num_frames} frames per video but frames_per_video={frames_per_video}; "
                         f"pass --frames_per_video={max(30, num_frames)}")
    # frames for thumbnails are worth a few more pixels than a tiny model needs
    src = _sync_video_folder(source, cache_dir, frame_size=max(image_size, 112), frames_per_video=frames_per_video,
                             workers=extract_workers, retry_failed=retry_failed, progress=progress)
    ids, skipped = src["ids"], src["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} video(s): " + "; ".join(f"{v} ({r})" for v, r in skipped.items())
              + "; a file is tried again when it changes, or with --retry_failed", flush=True)
    if not ids:
        raise ValueError(f"--videos={source}: no usable videos to index ({len(skipped)} skipped)")
    key = hashlib.sha1(json.dumps([INDEX_VERSION, model_key, num_frames, image_size, str(dtype),
                                   os.path.realpath(src["lmdb"])]).encode()).hexdigest()[:16]
    index_path = os.path.join(cache_dir, f"index_{key}.pt")
    old = torch.load(index_path, map_location="cpu", weights_only=True) if os.path.exists(index_path) else None
    old = old or {"video_ids": []}
    # reuse the embeddings of every video whose file is as it was; freshly extracted frames are encoded
    emb = {v: (old["video_emb"][i], old["frame_emb"][i]) for i, v in enumerate(old["video_ids"])
           if src["stamps"].get(v) == old["stamps"][i] and v not in src["extracted"]}
    todo = [v for v in ids if v not in emb]
    if todo:
        with open(os.path.join(cache_dir, "encode.jsonl"), "w", encoding="utf-8") as f:
            for v in todo:  # the id as a stand-in caption: never scored, but some loaders want one per video
                f.write(json.dumps({"video_id": v, "captions": [v]}, ensure_ascii=False) + "\n")
        dataset = prepare.VideoTextDataset(cache_dir, "encode", None, mode="videos", num_frames=num_frames,
                                           image_size=image_size, lmdb_path=src["lmdb"])
        assert dataset.video_ids == todo, "the dataset must list the videos in the order given"
        print(f"encoding {len(todo)} videos" + (f" ({len(emb)} unchanged ones reused)" if emb else ""), flush=True)
        progress(f"encoding {len(todo)} new or changed videos")
        try:
            new_video, new_frame = hmmc_eval.encode_videos(net, dataset, batch_size=batch_size,
                                                           num_workers=num_workers, device=device, dtype=dtype)
        finally:  # free this process's reader whatever happened: the next sync of this folder may write
            if getattr(dataset, "_db", None) is not None:
                dataset._db.close()
        emb.update(zip(todo, zip(new_video.cpu(), new_frame.cpu())))
    index = {"video_ids": ids, "video_emb": torch.stack([emb[v][0] for v in ids]),
             "frame_emb": torch.stack([emb[v][1] for v in ids]), "stamps": [src["stamps"][v] for v in ids],
             "positions": prepare.sample_frame_indices(frames_per_video, num_frames).tolist(),
             "stored_frames": frames_per_video, "durations": {v: src["durations"][v] for v in ids},
             "lmdb": os.path.realpath(src["lmdb"]), "skipped": skipped}
    if todo or old["video_ids"] != ids or old["skipped"] != index["skipped"]:  # no old index: all is todo
        tmp = index_path + ".tmp"
        torch.save(index, tmp)
        os.replace(tmp, index_path)  # a killed run never leaves half an index behind
        print(f"indexed {len(ids)} videos -> {index_path}", flush=True)
    else:
        print(f"loaded the index of {len(ids)} videos from {index_path}", flush=True)
    return {**index, "extracted": src["extracted"], "encoded": todo, "path": index_path,
            "paths": {v: src["paths"][v] for v in ids}}


# ----------------------------------------------------------------------------- search: queries, ranking, report

def _check_query(text: str, tokenizer):
    ids = tokenizer.encode(text)
    unk = getattr(tokenizer, "unk_id", None)
    if not text.strip() or not ids or (unk is not None and all(i == unk for i in ids)):
        raise ValueError(f"query {text!r} tokenizes to nothing the text encoder knows; write some words")


def _script(ch: str) -> str | None:
    """"latin", "cjk", "emoji", "cyrillic"...; None for what every script has (digits, punctuation, spaces)."""
    cat = unicodedata.category(ch)
    if cat == "So":
        return "emoji"  # pictographs and other symbols
    if not cat.startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return "cjk"
    return name.split(" ")[0].lower() or "unknown"


def words(text: str) -> list[str]:
    """Lower-cased runs of letters, each Chinese character on its own (the Chinese BERT reads one per token)."""
    out = []
    for run in re.findall(r"[^\W\d_]+", text.lower()):
        out += [run] if not any(_script(c) == "cjk" for c in run) else re.findall(r"[^\W\d_]", run)
    return out


def caption_vocabulary(path: str, field: str = "captions") -> set:
    """Every word of the captions of a <split>.jsonl (`field` holds a list of captions or one)."""
    vocab = set()
    with open(path, encoding="utf-8") as f:
        for line in filter(str.strip, f):
            captions = json.loads(line).get(field) or []
            for caption in [captions] if isinstance(captions, str) else captions:
                vocab.update(words(str(caption)))
    return vocab


def training_captions(ckpt_config: dict) -> tuple[str, str] | None:
    """(jsonl path, caption field) a train.py checkpoint learned from; None for OpenAI's CLIP or an original HMMC."""
    if not ckpt_config or not (ckpt_config.get("data_dir") or ckpt_config.get("dataset")):
        return None
    data_dir = ckpt_config.get("data_dir") or os.path.join("data", ckpt_config["dataset"])
    return (os.path.join(data_dir, f"{ckpt_config.get('train_split') or 'train'}.jsonl"),
            ckpt_config.get("caption_field") or "captions")


def query_warnings(text: str, tokenizer, context_length: int, vocabulary: set | None = None) -> list[str]:
    """Why the scores of `text`, which look just as confident, may mean little, one line each: it was cut to the
    model's caption length, its script is not the text encoder's, or most of its words never occur in the captions
    the model was trained on (`vocabulary`)."""
    q = repr(text if len(text) <= 60 else text[:57] + "...")
    out, little = [], "its scores will look confident and mean little"
    n, kept = len(tokenizer.encode(text)), context_length - 2  # each row also holds a start and an end token
    if n > kept:
        out.append(f"query {q} is {n} tokens long; the model reads {context_length} per caption, so only the first "
                   f"{kept} were kept")
    scripts = {s for s in map(_script, text) if s}
    bert = isinstance(tokenizer, BertTokenizer)  # Chinese mixed with other scripts is fine there
    foreign = (set() if "cjk" in scripts else scripts) if bert else scripts - {"latin"}
    if foreign:
        out.append(f"query {q} contains {', '.join(sorted(foreign))} text, which the text encoder "
                   f"({'Chinese BERT, trained on Chinese' if bert else 'CLIP, trained on English'}) barely knows; "
                   f"{little}")
    known = list(dict.fromkeys(words(text)))
    unknown = [w for w in known if vocabulary and w not in vocabulary]
    if 2 * len(unknown) > len(known):
        out.append(f"{len(unknown)} of the {len(known)} words of query {q} never occur in the {len(vocabulary)}-word "
                   f"vocabulary of the captions this model was trained on ({', '.join(unknown[:6])}"
                   f"{', ...' if len(unknown) > 6 else ''}); {little}. Use words it knows, or a model trained on "
                   f"richer captions (e.g. --init_from=clip)")
    return out


@torch.no_grad()
def search_index(net, index: dict, queries: list[str], *, tokenizer, context_length: int, top_k_frames: int,
                 frame_match_weight: float, top: int = 5, device: str = "cpu", dtype=None) -> list[list[dict]]:
    """Per query its hits, best first: {"rank", "video_id", "score", "frame_scores" [T] (100*cos per encoded frame),
    "top_frames" [k positions]}."""
    if not index["video_ids"]:
        raise ValueError("the index is empty: no videos to search")
    for q in queries:
        _check_query(q, tokenizer)
    ids, mask = tokenizer(queries, context_length)
    text_emb = hmmc_eval.encode_texts(net, ids, mask, device=device, dtype=dtype)
    video_emb = index["video_emb"].to(device)
    frame_emb = index["frame_emb"].to(device)
    k = max(1, min(int(top_k_frames), frame_emb.shape[1]))
    sim = hmmc_model.hierarchical_similarity(text_emb, video_emb, frame_emb, k, frame_match_weight,
                                             normalized=True).cpu().numpy()  # unit vectors: (Q, V)
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


def explain_score(hit: dict, frame_match_weight: float) -> str:
    """What a hit's score is made of: the video term and the frame term."""
    k = len(hit["top_frames"])
    frames = sum(hit["frame_scores"][t] for t in hit["top_frames"]) / max(k, 1)
    video = hit["score"] - frame_match_weight * frames
    return (f"score {hit['score']:.2f} = video {video:.2f} + {frame_match_weight:g} \u00d7 mean of the top-{k} "
            f"frames {frames:.2f}, each 100 \u00d7 cosine with the query (at most 100); higher is closer, comparable "
            f"between the videos of one query, not a probability")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"  # 1:05.3


def frame_time(position: int, duration, stored) -> float | None:
    # extraction took the centre of each of `stored` equal segments of the video
    return (position + 0.5) * duration / stored if duration and stored else None


def hit_frames(hit: dict, positions: list, duration, stored) -> list[dict]:
    """Each encoded frame of a hit: position, time (None when unknown), caption, and whether it entered the score."""
    frames = []
    for i, (p, score) in enumerate(zip(positions, hit["frame_scores"])):
        t = frame_time(p, duration, stored)
        label = f"{_clock(t)} \u00b7 {score:.1f}" if t is not None else f"{score:.1f}"
        frames.append({"position": p, "time": t, "label": label, "top": i in hit["top_frames"]})
    return frames


# ----------------------------------------------------------------------------- the engine behind the search page

LANGUAGES = {"clip": "English (CLIP text encoder)", "bert": "Chinese (Chinese BERT text encoder)"}


class Searcher:
    """The model and one folder's index, shared by the page's request threads. `lock` serialises the model calls;
    self.index is only ever replaced whole, so each request takes it once. A rescan builds the next index in a spawned
    process (its LMDB writer must not share this process with the frame reader) while queries keep answering from
    this one, then swaps it in."""

    def __init__(self, net, source: str, *, index_args: dict, rank_args: dict, top: int = 5, checkpoint: str = "",
                 vocabulary: set | None = None):
        self.net, self.source, self.index_args, self.rank_args = net, source, index_args, rank_args
        self.top, self.checkpoint, self.vocabulary = top, checkpoint, vocabulary
        self.lock = threading.Lock()  # the model
        self.frames_lock = threading.Lock()  # self.env, the frame store's reader
        self.rescan_lock = threading.Lock()  # one rescan at a time
        self.env, self.child, self.rescan_state = None, None, {"running": False}
        # a spawned rescan gets the weights through shared memory instead of a pickled copy: moved there now, before
        # any request thread can be using them
        net.share_memory()
        self.index = build_index(net, source, **index_args)

    def rank(self, query: str, top: int) -> dict:
        """search_index's hits with their frames, explained scores and video URLs (at the best frame), and warnings."""
        t0 = time.perf_counter()
        with self.lock:
            index = self.index
            try:
                hits = search_index(self.net, index, [query], top=top, **self.rank_args)[0]
            except ValueError as e:  # a query that tokenizes to nothing
                raise HTTPError(400, str(e)) from None
        seconds = time.perf_counter() - t0
        for hit in hits:
            vid = hit["video_id"]
            duration = index["durations"][vid]
            hit["frames"] = hit_frames(hit, index["positions"], duration, index["stored_frames"])
            for frame in hit["frames"]:
                frame["url"] = "/frame?" + urllib.parse.urlencode({"id": vid, "p": frame["position"]})
            hit["start"] = hit["frames"][int(np.argmax(hit["frame_scores"]))]["time"] or 0.0
            hit["length"] = _clock(duration) if duration else None
            hit["explain"] = explain_score(hit, float(self.rank_args["frame_match_weight"]))
            hit["video_url"] = "/video/" + urllib.parse.quote(vid, safe="")
        warnings = query_warnings(query, self.rank_args["tokenizer"], self.rank_args["context_length"],
                                  self.vocabulary)
        return {"query": query, "hits": hits, "warnings": warnings, "videos": len(index["video_ids"]),
                "seconds": seconds}

    def thumbnail(self, vid: str, position: int) -> bytes:
        index = self.index
        if vid not in index["durations"]:  # every indexed video has an entry there
            raise HTTPError(404, "no such video in the index")
        if position not in index["positions"]:
            raise HTTPError(404, f"frame {position} is not one the model saw")
        key = f"{vid}_{position}".encode()
        with self.frames_lock:
            try:
                jpeg = self._read_frame(index["lmdb"], key)
            except lmdb.Error:  # a rescan's writer may have grown the map: reopen once
                self._close_frames()
                jpeg = self._read_frame(index["lmdb"], key)
        if jpeg is None:  # its file changed or left during a rescan, which has not finished yet
            raise HTTPError(404, "this frame is being replaced by a rescan; search again when it is done")
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        img.thumbnail((4 * 96, 96))  # 96 px high, at most 4x as wide
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        return buf.getvalue()

    def _read_frame(self, path: str, key: bytes) -> bytes | None:
        if self.env is None:  # with the lock table, LMDB keeps every page this reader sees until done, whatever writes
            self.env = lmdb.open(path, readonly=True, lock=True, readahead=False, max_readers=256)
        with self.env.begin() as txn:
            return txn.get(key)

    def _close_frames(self):
        if self.env is not None:
            self.env.close()
            self.env = None

    def video_file(self, vid: str) -> str:
        # the index's rule again: a link out of the folder is neither indexed nor served
        path = self.index["paths"].get(vid)
        if path is None or not _inside(os.path.realpath(self.source), path) or not os.path.isfile(path):
            raise HTTPError(404, "no video file with this id")
        return os.path.realpath(path)

    def rescan(self) -> dict:
        """Build the index again in a spawned process and swap it in; a failure keeps the current one."""
        if not self.rescan_lock.acquire(blocking=False):
            raise HTTPError(409, "a rescan is already running")
        t0 = time.perf_counter()
        try:
            self.rescan_state = {"running": True, "progress": "starting"}
            kind, payload = self._build_elsewhere()
            if kind != "done":
                self.rescan_state = {"running": False, "error": f"rescan failed, the previous index is kept: {payload}"}
                raise HTTPError(409, self.rescan_state["error"])
            new = {**hmmc_model.read_checkpoint(payload["path"]), **payload}
            self.index = new  # a request that took the old one finishes with it
            with self.frames_lock:
                self._close_frames()  # the next thumbnail opens the store of the new index
            result = {"videos": len(new["video_ids"]), "extracted": new["extracted"], "encoded": new["encoded"],
                      "skipped": new["skipped"], "seconds": time.perf_counter() - t0}
            self.rescan_state = {"running": False, "result": result}
            return result
        finally:
            self.rescan_lock.release()

    def _build_elsewhere(self) -> tuple:
        # spawned: nothing of this server (sockets, threads) is inherited, and the child's LMDB handles end with it
        ctx = mp.get_context("spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        child = self.child = ctx.Process(target=_rescan_child, args=(sender, self.net, self.source, self.index_args),
                                         name="hmmc-rescan")
        child.start()
        sender.close()
        try:
            while (answer := receiver.recv())[0] == "progress":
                self.rescan_state = {"running": True, "progress": answer[1]}
        except EOFError:  # the child ended without a word (killed, out of memory)
            answer = None
        finally:
            receiver.close()
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join()
            self.child = None
        return answer or ("error", f"the rescan process ended with exit code {child.exitcode} before finishing")

    def status(self) -> dict:
        return {"videos": len(self.index["video_ids"]), "rescan": dict(self.rescan_state)}

    def info(self) -> dict:  # what the page shows above the search box
        index = self.index
        text_encoder = self.net.cfg.text_encoder
        return {"title": f"HMMC search over {self.source}", "checkpoint": self.checkpoint,
                "language": LANGUAGES.get(text_encoder, text_encoder), "videos": len(index["video_ids"]),
                "skipped": index["skipped"], "top": self.top, "top_k_frames": int(self.rank_args["top_k_frames"]),
                "frame_match_weight": float(self.rank_args["frame_match_weight"])}

    def close(self):  # stops a rescan in progress and lets go of the frame store
        child = self.child
        if child is not None and child.is_alive():
            child.kill()
        with self.frames_lock:
            self._close_frames()


def _rescan_child(conn, net, source: str, index_args: dict):
    """The spawned rescan: build_index, telling the parent how far it got, then where the index file is."""
    torch.set_num_threads(1)  # beside the server, which keeps answering queries meanwhile
    try:
        index = build_index(net, source, progress=lambda text: conn.send(("progress", text)), **index_args)
        conn.send(("done", {k: index[k] for k in ("path", "extracted", "encoded", "paths")}))
    except (ValueError, RuntimeError, OSError) as e:
        traceback.print_exc()
        conn.send(("error", str(e) or type(e).__name__))
    finally:
        conn.close()


def make_server(net, source: str, *, index_args: dict, rank_args: dict, host: str = "127.0.0.1", port: int = 8000,
                top: int = 5, checkpoint: str = "", vocabulary: set | None = None, **server_args):
    """A search page over `source` on host:port, not yet serving. The port is taken before the index is built, so a
    busy port fails before minutes of indexing."""
    server = hmmc_serve.Server(host, port, **server_args)
    try:
        server.search = Searcher(net, source, index_args=index_args, rank_args=rank_args, top=top,
                                 checkpoint=checkpoint, vocabulary=vocabulary)
    except BaseException:
        server.server_close()
        raise
    return server


# ----------------------------------------------------------------------------- the command line

def main(argv=None):
    defaults = {k: globals()[k] for k in config_keys}
    cfg = configurator.configure(defaults, sys.argv[1:] if argv is None else argv, prog="search.py",
                                 descriptions=configurator.describe(__file__))
    source = cfg["videos"]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--videos={source}: no such folder; name the folder of video files to search")
    if cfg["top"] < 1:
        raise ValueError(f"--top={cfg['top']}: ask for at least one hit per query (e.g. --top=5)")
    if cfg["serve"] and cfg["query"]:
        raise ValueError("--serve takes its queries in the page; drop --query")
    if not cfg["serve"] and not cfg["query"]:
        raise ValueError("search.py needs --query=TEXT, or --serve for a search page")
    cache_dir = cfg["index_dir"] or os.path.join(source, ".hmmc_index")
    if not cfg["index_dir"] and not os.access(source, os.W_OK):
        raise ValueError(f"--videos={source}: this folder is not writable, so the index cannot live in it; pass "
                         f"--index_dir=A_WRITABLE_FOLDER")
    dev = cfg["device"]
    dtype = None if cfg["dtype"] == "float32" or not dev.startswith("cuda") else cfg["dtype"]
    net, s, tokenizer, ckpt_config = hmmc_eval.load_net({**cfg, "dataset": None, "data_dir": None,
                                                         "caption_field": None}, dev)
    weights = cfg["clip_path"] if cfg["init_from"] == "clip" else cfg["init_from"]
    checkpoint = f"zero-shot CLIP from {weights}" if cfg["init_from"] == "clip" else weights
    st = os.stat(weights)  # the index cache is per model: these weights as they are now
    model_key = f"{cfg['init_from']}|{os.path.realpath(weights)}|{st.st_size}|{int(st.st_mtime)}"
    vocabulary, captions = None, training_captions(ckpt_config)
    if captions and os.path.isfile(captions[0]):
        vocabulary = caption_vocabulary(*captions)
    elif captions:
        print(f"note: the captions this model was trained on ({captions[0]}) are not here, so queries are not "
              f"checked against its vocabulary", flush=True)
    index_args = dict(cache_dir=cache_dir, model_key=model_key, num_frames=s["num_frames"], image_size=s["image_size"],
                      batch_size=cfg["batch_size"], num_workers=cfg["num_workers"], device=dev, dtype=dtype,
                      frames_per_video=cfg["frames_per_video"], extract_workers=cfg["extract_workers"],
                      retry_failed=cfg["retry_failed"])
    rank_args = dict(tokenizer=tokenizer, context_length=s["context_length"], top_k_frames=s["top_k_frames"],
                     frame_match_weight=s["frame_match_weight"], device=dev, dtype=dtype)
    if cfg["serve"]:
        # a query is a few small matmuls, which spinning OpenMP threads slow on a shared CPU (docs/performance.md)
        set_cpu_threads(dev)
        hosts = [h.strip() for h in cfg["allowed_hosts"].split(",") if h.strip()]
        server = make_server(net, source, index_args=index_args, rank_args=rank_args, host=cfg["host"],
                             port=cfg["port"], top=cfg["top"], checkpoint=checkpoint, vocabulary=vocabulary,
                             allowed_hosts=hosts, conn_timeout=cfg["conn_timeout"],
                             max_connections=cfg["max_connections"])
        hmmc_serve.run(server, source)
        return []
    _check_query(cfg["query"], tokenizer)  # a bad query fails before minutes are spent on an index
    for line in query_warnings(cfg["query"], tokenizer, s["context_length"], vocabulary):
        print(f"warning: {line}", flush=True)
    index = build_index(net, source, **index_args)
    hits = search_index(net, index, [cfg["query"]], top=cfg["top"], **rank_args)[0]
    for hit in hits:
        print(f"{hit['rank']} {hit['video_id']} {hit['score']:.4f}", flush=True)
    return hits


if __name__ == "__main__":
    run_script(main)
