"""
`FrameDB`, the JPEG frames of videos in one LMDB, and the resumable ffmpeg extraction that fills it, shared by
`prepare.py frames` (datasets) and search.py (folders of videos).

LMDB layout: key f"{video_id}_{i}" -> JPEG of frame i, at the centre of the i-th of T equal time segments, short side
frame_size; `__meta__` -> JSON {"version", "num_frames", "frame_size", "count", "failed": {id: reason}[, "square"]}.
"""
import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import lmdb
import numpy as np
from PIL import Image

FRAMEDB_VERSION = 1
_META_KEY = b"__meta__"

# py-lmdb opens a path once per process, yet a train and an eval set may both read it: readers share a counted one.
_SHARED_ENVS = {}  # realpath -> (env, readers, pid)


def _open_shared_env(path):
    key = os.path.realpath(path)
    env, readers, pid = _SHARED_ENVS.get(key, (None, 0, os.getpid()))
    if pid != os.getpid():  # inherited through fork (a DataLoader worker): unusable here, closed without a lock file
        with contextlib.suppress(lmdb.Error):
            env.close()
        env, readers = None, 0
    if env is None:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                        subdir=os.path.isdir(path), max_readers=2048, max_spare_txns=1)
    _SHARED_ENVS[key] = (env, readers + 1, os.getpid())
    return env


def _release_shared_env(path):
    key = os.path.realpath(path)
    env, readers, pid = _SHARED_ENVS.get(key, (None, 0, None))
    if pid == os.getpid():
        _SHARED_ENVS[key] = (env, readers - 1, pid)
        if readers == 1:  # the last reader
            env.close()
            del _SHARED_ENVS[key]


class FrameDB:
    """JPEG frames of videos in an LMDB. FrameDB(path) reads (no lock file, no readahead: cheap in many workers);
    FrameDB(path, readonly=False, num_frames=, frame_size=) writes `commit_every` videos per transaction, so a crash
    never leaves half a video. The original HMMC's LMDBs (no `__meta__`) are read too."""

    def __init__(self, path, readonly=True, map_size=1 << 30, num_frames=None, frame_size=None, commit_every=64,
                 square=False):
        self.path, self.readonly, self.commit_every = path, readonly, commit_every
        self._pending, self._pending_failed = {}, {}  # video_id -> JPEG frames / failure reason, not yet committed
        if readonly:
            if not os.path.exists(path):
                raise FileNotFoundError(f"no frame LMDB at {path}; make it with "
                                        f"`python prepare.py frames --videos=DIR --out={path}`")
            self.env = _open_shared_env(path)
        else:
            if os.path.realpath(path) in _SHARED_ENVS:
                raise RuntimeError(f"{path} is open for reading in this process; close its readers before writing")
            os.makedirs(path, exist_ok=True)
            data_file = os.path.join(path, "data.mdb")
            existing = os.path.getsize(data_file) if os.path.exists(data_file) else 0  # never shrink a map
            self.env = lmdb.open(path, map_size=max(map_size, 2 * existing, 1 << 20), subdir=True,
                                 readahead=False, meminit=False, max_dbs=0)
        self.meta = self._read_meta()
        if self.meta is None:  # a fresh store
            if readonly:
                raise ValueError(f"{path} holds no frames (empty LMDB)")
            if num_frames is None or frame_size is None:
                raise ValueError(f"creating {path} needs num_frames and frame_size")
            self.meta = {"version": FRAMEDB_VERSION, "num_frames": int(num_frames), "frame_size": int(frame_size),
                         "count": 0, "failed": {}}
            if square:
                self.meta["square"] = True
            self._write_batch({})
        elif not readonly:
            for k, v in (("num_frames", num_frames), ("frame_size", frame_size), ("square", bool(square))):
                if v is not None and self.meta.get(k, False if k == "square" else None) not in (None, v):
                    raise ValueError(f"{path} was made with {k}={self.meta.get(k, False)} but {k}={v} was asked; "
                                     f"use the same settings or another --out")
        # fixed once the store exists; square: centre squares (prepare.py frames --square=True), not whole frames
        self.num_frames, self.frame_size = self.meta["num_frames"], self.meta.get("frame_size")
        self.square = bool(self.meta.get("square"))

    def _read_meta(self):
        with self.env.begin() as txn:
            raw = txn.get(_META_KEY)
            if raw is not None:
                return {"failed": {}, **json.loads(bytes(raw).decode("utf-8"))}
            cur = txn.cursor()
            if not cur.first():
                return None  # a fresh store
            # no __meta__: an LMDB of the original tools/frame2lmdb.py, whose first key is <video_id>_0
            key = bytes(cur.key()).decode("utf-8", "replace")
            vid = key.rpartition("_")[0]
            n = 0
            while vid and txn.get(f"{vid}_{n}".encode()) is not None:
                n += 1
            if n == 0:
                raise ValueError(f"{self.path}: no __meta__ entry and the first key {key!r} is not <video_id>_0; "
                                 f"is this a frame LMDB?")
            return {"version": 0, "num_frames": n, "frame_size": None, "count": txn.stat()["entries"] // n,
                    "failed": {}}

    @property
    def failed(self) -> dict:
        return {**self.meta["failed"], **self._pending_failed}

    def __len__(self):
        return self.meta["count"]

    def has_video(self, video_id: str) -> bool:
        """Whether the video is stored (writes are per video: its last key suffices)."""
        if video_id in self._pending:
            return True
        with self.env.begin() as txn:
            return txn.get(f"{video_id}_{self.num_frames - 1}".encode()) is not None

    def get_frames(self, video_id: str, indices) -> list:
        """JPEG bytes of several frames of one video, read in one transaction."""
        out = []
        with self.env.begin() as txn:
            for i in indices:
                raw = txn.get(f"{video_id}_{int(i)}".encode())
                if raw is None:
                    raise KeyError(f"frame {video_id}_{int(i)} is not in {self.path} "
                                   f"({self.num_frames} frames per video stored)")
                out.append(raw)
        return out

    def video_ids(self) -> list:
        """All stored video ids (a full key scan: for tools and tests, not for the training loop)."""
        with self.env.begin() as txn:
            keys = txn.cursor().iternext(keys=True, values=False)
            return [bytes(key[:-2]).decode("utf-8", "replace") for key in keys if key.endswith(b"_0")]

    def put_video(self, video_id: str, frames: list):
        if len(frames) != self.num_frames:
            raise ValueError(f"video {video_id}: {len(frames)} frames given, the store holds {self.num_frames}")
        self._pending[video_id] = [bytes(f) for f in frames]
        self._pending_failed.pop(video_id, None)
        if len(self._pending) >= self.commit_every:
            self.commit()

    def mark_failed(self, video_id: str, reason: str):
        """Record why a video has no frames; any stored before go (a broken file must not serve its old ones)."""
        self._pending.pop(video_id, None)
        self._pending_failed[video_id] = str(reason)

    def delete(self, video_ids):
        self._write_batch({}, drop=set(video_ids))

    def commit(self):
        if self.readonly or (not self._pending and not self._pending_failed):
            return
        self._write_batch(self._pending)
        self._pending, self._pending_failed = {}, {}

    def _write_batch(self, videos, drop=frozenset()):
        # a video written now is no longer a failure, whatever an earlier run recorded
        failed = {vid: why for vid, why in self.failed.items() if vid not in videos and vid not in drop}
        meta = {**self.meta, "failed": failed}
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for vid in drop | set(self._pending_failed):
                        for i in range(meta["num_frames"]):
                            txn.delete(f"{vid}_{i}".encode())
                    for vid, frames in videos.items():
                        for i, jpg in enumerate(frames):
                            txn.put(f"{vid}_{i}".encode(), jpg)
                    entries = txn.stat()["entries"] - (txn.get(_META_KEY) is not None)
                    meta["count"] = entries // meta["num_frames"]
                    txn.put(_META_KEY, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                break
            except lmdb.MapFullError:  # the transaction was aborted, nothing is lost: grow the map and write again
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:  # LMDB is copy-on-write: a failed commit leaves the previous state intact
                nbytes = sum(len(f) for frames in videos.values() for f in frames)
                free = shutil.disk_usage(self.path).free
                full = "No space" in str(e) or free < max(2 * nbytes, 16 << 20)
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              f"{'disk full' if full else 'write error'} while writing {self.path} ({e}; "
                              f"{free >> 20} MiB free): the {len(videos)} videos of this batch were not written, the "
                              f"{self.meta['count']} committed before are safe. "
                              f"{'Free some space and r' if full else 'R'}erun the same command to resume") from e
        self.meta = meta

    def close(self):
        if self.env is None:
            return
        try:
            if self.readonly:
                _release_shared_env(self.path)
            else:
                self.commit()
        finally:
            if not self.readonly:
                self.env.close()
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -----------------------------------------------------------------------------------------------------------------
# Finding videos: one walk of a folder for both datasets and search

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".wmv",
                    ".ts", ".mts", ".m2ts", ".ogv", ".ogg", ".gif", ".vob", ".f4v", ".asf", ".divx", ".rm", ".rmvb",
                    ".h264", ".264", ".h265", ".hevc", ".y4m", ".mxf", ".nut", ".ivf", ".mjpeg", ".dv")


def is_video(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def walk_files(folder: str, skip: str = "") -> list:
    """The files under `folder`, '/'-separated and sorted, without hidden names, *.lmdb folders and the real path
    `skip` (an index kept inside the folder)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"videos folder {folder} does not exist")
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".lmdb")
                         and os.path.realpath(os.path.join(root, d)) != skip)
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        out += [n if rel == "." else f"{rel}/{n}" for n in sorted(names) if not n.startswith(".")]
    return out


def find_videos(videos_dir: str, ids=None) -> dict:
    """{file name without extension: path} of the videos under videos_dir; with `ids`, those ids (any extension,
    None for no file)."""
    wanted = set(ids) if ids is not None else None
    found = {}
    # known video extensions first, then by path: of two files with one name, the first is used
    for rel in sorted(walk_files(videos_dir), key=lambda rel: (not is_video(rel), rel)):
        stem = os.path.splitext(os.path.basename(rel))[0]
        if stem not in wanted if wanted is not None else not is_video(rel):
            continue
        path = os.path.join(videos_dir, rel)
        if stem in found:
            print(f"warning: two files for video id {stem!r}: {found[stem]} and {path}; using {found[stem]}",
                  flush=True)
        else:
            found[stem] = path
    return found if ids is None else {vid: found.get(vid) for vid in dict.fromkeys(ids)}


def read_id_list(path) -> list:
    """Video ids, one per line; blank lines and # comments are skipped."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


# -----------------------------------------------------------------------------------------------------------------
# Decoding one video with the system ffprobe/ffmpeg

def check_ffmpeg():
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} not found on PATH; install FFmpeg (e.g. `apt-get install ffmpeg`, "
                               f"`brew install ffmpeg`, `conda install -c conda-forge ffmpeg`)")


def _last_line(text: bytes) -> str:
    lines = [l.strip() for l in text.decode("utf-8", "replace").splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def finite_float(x):
    """float(x) when x reads as a finite number, else None."""
    try:
        v = float(x)
        return v if np.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _rate(x):
    """ffprobe's "30000/1001" -> 29.97 (None for 0/0 or junk)."""
    num, _, den = str(x).partition("/")
    v, d = finite_float(num), finite_float(den or 1)
    return v / d if v and d and v / d > 0 else None


def probe_video(path: str) -> dict:
    """Display width and height (rotation and pixel aspect applied), duration in seconds, fps, frame count; a
    ValueError with a short reason when there is no decodable video stream."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
           "stream=width,height,duration,nb_frames,avg_frame_rate,r_frame_rate,sample_aspect_ratio:"
           "stream_tags=rotate:stream_side_data=rotation:format=duration", "-of", "json", path]
    p = subprocess.run(cmd, capture_output=True, timeout=120)
    if p.returncode != 0:
        raise ValueError(f"unreadable ({_last_line(p.stderr) or 'ffprobe failed'})")
    info = json.loads(p.stdout.decode("utf-8", "replace") or "{}")
    if not info.get("streams"):
        raise ValueError("no video stream (audio-only or not a video)")
    s = info["streams"][0]
    w, h = int(s.get("width") or 0), int(s.get("height") or 0)
    if w <= 0 or h <= 0:
        raise ValueError("video stream without a frame size")
    sar = _rate(str(s.get("sample_aspect_ratio", "1/1")).replace(":", "/")) or 1.0
    w = max(1, int(round(w * sar)))  # non-square pixels: store what a player shows
    rotation = finite_float((s.get("tags") or {}).get("rotate")) or 0.0
    for sd in s.get("side_data_list") or []:
        if "rotation" in sd:
            rotation = finite_float(sd["rotation"]) or 0.0
    if int(round(rotation / 90)) % 2 == 1:  # ffmpeg auto-rotates while decoding: a 90/270 degree video is portrait
        w, h = h, w
    fps = _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
    nb = int(s["nb_frames"]) if str(s.get("nb_frames", "")).isdigit() else None
    duration = finite_float(s.get("duration")) or finite_float((info.get("format") or {}).get("duration"))
    if (duration is None or duration <= 0) and fps:
        if not nb:  # no duration and no frame count in the header (raw streams): count packets, a demux-only pass
            p = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
                                "stream=nb_read_packets", "-of", "csv=p=0", path], capture_output=True, timeout=300)
            text = p.stdout.decode("ascii", "replace").strip().strip(",")
            nb = int(text) if text.isdigit() else None
        duration = nb / fps if nb else None
    if duration is None or duration <= 0:
        raise ValueError("unknown duration (neither the container nor the stream tells it)")
    return {"width": w, "height": h, "duration": duration, "fps": fps, "nb_frames": nb, "rotation": rotation}


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_video(path, num_frames, frame_size, quality=90, square=False) -> tuple:
    """One ffmpeg pass -> (num_frames JPEGs at the centres of equal time segments, duration in seconds).
    The fps filter resamples by timestamp (variable frame rates too) to 2*num_frames/duration, so the odd slots are
    the centres; round=up shows the frame on screen at each slot's time."""
    info = probe_video(path)
    w, h = info["width"], info["height"]
    short = min(w, h)  # scaled to frame_size
    W, H = max(1, round(w * frame_size / short)), max(1, round(h * frame_size / short))
    # the centre square, placed where the dataset's centre crop takes it
    crop = f",crop={frame_size}:{frame_size}:{int(round((W - frame_size) / 2))}:{int(round((H - frame_size) / 2))}" \
        if square else ""
    duration = info["duration"]
    vf = f"fps={2 * num_frames / duration:.6f}:round=up,select='mod(n\\,2)',scale={W}:{H}:flags=bicubic{crop}"
    if square:
        W = H = frame_size
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", path, "-map", "0:v:0", "-an", "-sn", "-dn",
           "-vf", vf, "-vsync", "0", "-frames:v", str(num_frames + 1), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    # generous: single-threaded decoding of a long high-resolution video can run slower than real time
    p = subprocess.run(cmd, capture_output=True, timeout=300 + 5 * duration)
    m = len(p.stdout) // (W * H * 3)
    if m == 0:
        raise ValueError(f"no frame could be decoded ({_last_line(p.stderr) or f'ffmpeg exit code {p.returncode}'})")
    frames = np.frombuffer(p.stdout, dtype=np.uint8, count=m * W * H * 3).reshape(m, H, W, 3)
    if m >= num_frames - 1:
        picks = [min(i, m - 1) for i in range(num_frames)]  # the normal case (the last slot may round away)
    else:  # fewer frames than the header promised (a truncated file, a wrong duration): spread over what decoded
        picks = [min(int((i + 0.5) * m / num_frames), m - 1) for i in range(num_frames)]
    encoded = {k: encode_jpeg(frames[k], quality) for k in set(picks)}  # a repeated frame is encoded once
    return [encoded[k] for k in picks], duration


def _decode_job(job):
    """-> (video_id, frames, duration, error): a bad video is a reason, never the end of the run."""
    vid, path, *settings = job
    try:
        if path is None:
            return vid, None, None, "missing: no video file with this id"
        if os.path.getsize(path) == 0:
            return vid, None, None, "empty file (0 bytes)"
        return vid, *decode_video(path, *settings), None
    except subprocess.TimeoutExpired:
        return vid, None, None, "timed out while decoding"
    except Exception as e:
        return vid, None, None, str(e) or type(e).__name__


# -----------------------------------------------------------------------------------------------------------------
# The extraction loop: videos -> FrameDB, resumable

def _clock(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def extract_into(db: FrameDB, videos: dict, *, workers: int, quality: int = 90, square: bool = False,
                 progress_every: float = 5.0, on_video=None) -> dict:
    """Decode {video_id: path or None} into `db`, `workers` ffmpeg processes at a time (threads, no fork: a server
    or CUDA process may call this), committing and printing progress every `progress_every` seconds.
    Returns {video_id: (error or None, duration or None)}."""
    jobs = [(vid, path, db.num_frames, db.frame_size, quality, square) for vid, path in videos.items()]
    results, failed, t0, last = {}, 0, time.time(), time.time()

    def report(final=False):
        el = time.time() - t0
        rate = len(results) / el if el > 0 else 0.0
        eta = _clock((len(jobs) - len(results)) / rate) if rate > 0 else "?"
        print(f"frames: {len(results)}/{len(jobs)} videos, {rate:.3g} videos/s, "
              f"{'took ' + _clock(el) if final else 'eta ' + eta}, {failed} failed", flush=True)

    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for vid, frames, duration, err in pool.map(_decode_job, jobs):  # this thread is the only LMDB writer
            if err is None:
                db.put_video(vid, frames)
            else:
                db.mark_failed(vid, err)
                failed += 1
            results[vid] = (err, duration)
            if on_video:
                on_video(len(results), len(jobs))
            if time.time() - last >= progress_every:
                db.commit()
                report()
                last = time.time()
    except KeyboardInterrupt:
        print(f"frames: interrupted; {len(results) - failed} videos written, rerun the same command to resume",
              flush=True)
        raise
    finally:
        pool.shutdown(cancel_futures=True)
        db.commit()
    report(final=True)
    return results


def print_listed(header: str, lines: list, limit: int = 20):
    """The header, then the first `limit` lines indented and how many more there are."""
    print(header, flush=True)
    for line in lines[:limit]:
        print(f"  {line}", flush=True)
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more", flush=True)


def _list_failures(listed: dict, what: str, out_path: str):
    if listed:
        print_listed(f"frames: {len(listed)} videos {what} (recorded under __meta__ 'failed' in {out_path}; "
                     f"rerun with --retry_failed to try them again):", [f"{vid}: {err}" for vid, err in listed.items()])


def extract_frames(videos_dir, out_path, num_frames=30, frame_size=224, workers=8, ids=None, retry_failed=False,
                   quality=90, id_prefix="", square=False, progress_every=5.0) -> dict:
    """`prepare.py frames`: the videos under videos_dir (or the `ids`, a list or a file) into the LMDB out_path,
    keyed id_prefix + file stem, skipping stored ones and earlier failures (retry_failed retries them). Returns
    {"done", "skipped", "failed", "failed_before", "stored" (of these videos, in the LMDB now), "seconds"}."""
    check_ffmpeg()
    if isinstance(ids, str):
        ids = read_id_list(ids)
    videos = {id_prefix + stem: path for stem, path in find_videos(videos_dir, ids).items()}
    if not videos:  # before the LMDB is created: an empty folder or id list must not leave an empty dataset behind
        raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS[:4])}, ...) in {videos_dir}; nothing written"
                         if ids is None else "the id list is empty; nothing written")
    t0 = time.time()
    with FrameDB(out_path, readonly=False, num_frames=num_frames, frame_size=frame_size, square=square) as db:
        old_failed = db.failed
        have = {vid for vid in videos if db.has_video(vid)}
        # a failure is retried on request, or when its file has appeared since
        todo = {vid: path for vid, path in videos.items() if vid not in have and (
            vid not in old_failed or retry_failed or (path is not None and old_failed[vid].startswith("missing")))}
        failed_before = {vid: old_failed[vid] for vid in videos if vid in old_failed and vid not in todo}
        n_retry = sum(vid in old_failed for vid in todo)
        print(f"frames: {len(videos)} videos in {videos_dir}, {len(videos) - len(todo)} already done or failed "
              f"before{f' ({n_retry} failed ones retried)' if n_retry else ''}, {len(todo)} to extract -> "
              f"{out_path} ({num_frames} frames, {'centre squares of' if square else 'short side'} {frame_size} px, "
              f"{workers} workers)", flush=True)
        results = extract_into(db, todo, workers=workers, quality=quality, square=square,
                               progress_every=progress_every)
    failed = {vid: err for vid, (err, _) in results.items() if err is not None}
    _list_failures(failed, "failed", out_path)
    _list_failures(failed_before, "failed in an earlier run and were skipped", out_path)
    done = len(results) - len(failed)
    return {"done": done, "skipped": len(videos) - len(todo), "failed": failed, "failed_before": failed_before,
            "stored": len(have) + done, "seconds": time.time() - t0}
