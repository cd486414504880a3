"""
The synthetic dataset: train.py's default data (made on demand) and a CPU-sized learning test of the pipeline.
$ python prepare.py synthetic --out=data/synthetic --seed=0   # frames.lmdb, {train,val,test}.jsonl, vocab.txt

Coloured shapes on a dark background: one object moves straight or turns half-way ("a red circle moves left, then
up"), or two objects follow each other ("a red circle moves left, then a blue square moves up"), captioned in
English and Chinese ("红色圆形向左移动，然后向上移动").

Why this needs temporal modelling: a video and its time reverse are equally likely, so any function of the *set* of
frames (mean pooling, top-k frame matching) cannot tell "left" from "right" or "A then B" from "B then A". The test
split holds whole confusion groups (each caption with its time-reversed twins): a frame-level model stays near
1/group-size there, one that reads frame order can solve them all. --titles=True: pre-training text (below).
"""
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from framestore import FrameDB, encode_jpeg


_SYN_COLOURS = {  # name: (RGB, Chinese)
    "red": ((230, 40, 40), "红色"),
    "green": ((40, 200, 60), "绿色"),
    "blue": ((50, 90, 240), "蓝色"),
    "yellow": ((235, 220, 40), "黄色"),
    "white": ((235, 235, 235), "白色"),
}
_SYN_SHAPES = {"circle": "圆形", "square": "方块", "triangle": "三角形"}
_SYN_DIRECTIONS = {  # name: (unit step in image coordinates (x right, y down), Chinese)
    "left": ((-1, 0), "向左"),
    "right": ((1, 0), "向右"),
    "up": ((0, -1), "向上"),
    "down": ((0, 1), "向下"),
}
_SYN_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_SYN_OBJECTS = [(c, s) for c in _SYN_COLOURS for s in _SYN_SHAPES]
_ZH = {**{k: zh for k, (_, zh) in {**_SYN_COLOURS, **_SYN_DIRECTIONS}.items()}, **_SYN_SHAPES}  # every word's Chinese
_SYN_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# motions of one object: straight, or a turn half-way (never straight on or straight back)
_SYN_MOTIONS = [(d,) for d in _SYN_DIRECTIONS] + [(a, b) for a in _SYN_DIRECTIONS for b in _SYN_DIRECTIONS
                                                   if a != b and b != _SYN_OPPOSITE[a]]


def _syn_reverse(motion: tuple) -> tuple:  # the same path walked backwards
    return tuple(_SYN_OPPOSITE[d] for d in reversed(motion))


def _syn_caption_en(events) -> str:  # events: [(colour, shape, motion)], motion: one or two directions
    return ", then ".join(f"a {c} {s} moves " + ", then ".join(m) for c, s, m in events)


def _syn_caption_zh(events) -> str:
    return "，然后".join(_ZH[c] + _ZH[s] + "，然后".join(_ZH[d] + "移动" for d in m) for c, s, m in events)


def _syn_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside the shape at offsets (dx, dy) from its centre (y down)?"""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    # upward triangle: apex (0, -r), base corners (+-r, 0.8 r)
    return (dy <= 0.8 * r) & (2 * np.abs(dx) <= (dy + r))


def _syn_render(events, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Frames (uint8 [T, size, size, 3]) of a video whose objects share the clip in equal consecutive parts; an
    object that turns spends half of its part on each leg."""
    ss = 2  # 2x2 supersampling: anti-aliased edges make motion smooth rather than jumping whole pixels
    grid = ((np.arange(size * ss) + 0.5) / ss).astype(np.float32)  # sample positions in pixels
    gy, gx = np.meshgrid(grid, grid, indexing="ij")  # (size*ss, size*ss)
    background = rng.integers(0, 30, size=3).astype(np.float32)
    frames = np.full((num_frames, size, size, 3), background, dtype=np.float32)
    per_object = num_frames // len(events)
    for k, (colour, shape, motion) in enumerate(events):
        r = rng.uniform(0.17, 0.21) * size
        first = k * per_object
        last = num_frames if k == len(events) - 1 else first + per_object
        n = last - first
        # legs of the path, then a placement of the whole path drawn uniformly among those that fit the frame: the
        # time reverse of every video is then an equally likely video (see the module docstring)
        lengths = rng.uniform(0.4, 0.55, size=len(motion)) * size / len(motion) ** 0.5
        steps = np.array([_SYN_DIRECTIONS[d][0] for d in motion], dtype=np.float64) * lengths[:, None]
        corners = np.cumsum([np.zeros(2), *steps], axis=0)  # (legs+1, 2) relative to the start
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        start = rng.uniform(r - lo, size - r - hi)  # (2,)
        leg = np.arange(n) * len(motion) // n  # the leg each frame is on
        first_of_leg = np.searchsorted(leg, leg)  # leg never decreases: the index of its first frame
        u = (np.arange(n) - first_of_leg + 0.5) / np.bincount(leg)[leg]  # progress at the centre of the frame's slot
        pos = start + corners[leg] + u[:, None] * steps[leg]
        cx, cy = pos.T.astype(np.float32)
        rgb = np.array(_SYN_COLOURS[colour][0], dtype=np.float32)
        inside = _syn_coverage(shape, gx - cx[:, None, None], gy - cy[:, None, None], r)  # (n, size*ss, size*ss)
        alpha = inside.reshape(-1, size, ss, size, ss).sum(axis=(2, 4), dtype=np.float32)[..., None] / (ss * ss)
        frames[first:last] = frames[first:last] * (1 - alpha) + rgb * alpha  # (n, size, size, 3)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _syn_random_events(rng: np.random.Generator, p_two: float):
    straight = [m for m in _SYN_MOTIONS if len(m) == 1]
    if rng.random() < p_two:  # two objects one after the other, each moving straight
        i, j = rng.choice(len(_SYN_OBJECTS), size=2, replace=False)
        return [(*_SYN_OBJECTS[i], straight[rng.integers(4)]), (*_SYN_OBJECTS[j], straight[rng.integers(4)])]
    c, s = _SYN_OBJECTS[rng.integers(len(_SYN_OBJECTS))]
    return [(c, s, _SYN_MOTIONS[rng.integers(len(_SYN_MOTIONS))])]


def _syn_confusion_groups(rng: np.random.Generator, num_single: int, num_double: int):
    """Event lists of whole confusion groups: `num_single` of one object's motion and its reverse (2 videos),
    `num_double` of two objects in both orders and both directions of their axes (8 videos)."""
    keys = dict.fromkeys(min(m, _syn_reverse(m)) for m in _SYN_MOTIONS)  # one motion of each pair, in order
    pairs = [(key, _syn_reverse(key)) for key in keys]
    singles = [(o, p) for o in _SYN_OBJECTS for p in pairs]
    order = rng.permutation(len(singles))[:num_single]
    out = []
    for i in order:
        (c, s), (m, m_rev) = singles[i]
        out += [[(c, s, m)], [(c, s, m_rev)]]
    seen = set()
    while len(seen) < num_double:
        i, j = rng.choice(len(_SYN_OBJECTS), size=2, replace=False)
        a, b = _SYN_OBJECTS[min(i, j)], _SYN_OBJECTS[max(i, j)]
        axes = (("left", "up")[rng.integers(2)], ("left", "up")[rng.integers(2)])
        if (a, b, axes) in seen:
            continue
        seen.add((a, b, axes))
        for da in (axes[0], _SYN_OPPOSITE[axes[0]]):
            for db in (axes[1], _SYN_OPPOSITE[axes[1]]):
                out += [[(*a, (da,)), (*b, (db,))], [(*b, (db,)), (*a, (da,))]]  # in both orders
    return out


def _syn_write_mp4(path: str, frames: list[np.ndarray], fps: int = 8):
    h, w, _ = frames[0].shape
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-threads", "1", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", path]
    # a few dozen tiny frames take well under a second: a minute means ffmpeg hangs
    proc = subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace').strip()}")


# Pre-training text (titles=True), as CHVTT's titles and tags: less than the caption, so pre-training is transfer,
# not more labels. A title names the objects and at most a turn's first direction ("a red circle moves left, then");
# two objects come in random order. Tags: the colour and shape words, shuffled, each dropped with probability 1/4.
# Neither ever says a straight motion's direction, a turn's second one or which object comes first, and no title
# equals a caption; the characters are the captions' own, so both share vocab.txt.
_TITLE_AND = {"en": " and ", "zh": "，"}
_TITLE_THEN = {"en": ", then", "zh": "，然后"}


def _syn_title(events, order: list[int], lang: str) -> str:
    if len(events) == 1 and len(events[0][2]) == 2:
        c, s, motion = events[0]
        first = [(c, s, motion[:1])]
        return (_syn_caption_en(first) if lang == "en" else _syn_caption_zh(first)) + _TITLE_THEN[lang]
    names = [f"a {c} {s}" if lang == "en" else _ZH[c] + _ZH[s] for c, s, _ in events]
    return _TITLE_AND[lang].join(names[i] for i in order)


def _syn_pretrain_text(events, rng: np.random.Generator) -> dict:
    """One video's title (captions, captions_zh) and loose tags (tags, tags_zh)."""
    order = [int(i) for i in rng.permutation(len(events))]
    words = [w for c, s, _ in events for w in (c, s)]
    keep = rng.random(len(words)) >= 0.25
    if not keep.any():
        keep[rng.integers(len(words))] = True
    tags = [words[i] for i in rng.permutation(len(words)) if keep[i]]
    return {"captions": [_syn_title(events, order, "en")], "tags": tags,
            "captions_zh": [_syn_title(events, order, "zh")], "tags_zh": [_ZH[w] for w in tags]}


# the built-in datasets, made by train.py on first use: data/<name> <- prepare_synthetic(**arguments)
BUILT_IN = {
    "synthetic": {},
    "synthetic_pretrain": dict(seed=1, num_train=12000, titles=True),  # other videos, twice as many, titles
}


def prepare_synthetic(out: str = "data/synthetic", seed: int = 0, videos: str | None = None,
                      num_frames: int = 8, frame_size: int = 32, num_train: int = 6000, p_two: float = 0.15,
                      test_single: int = 90, test_double: int = 3, val_single: int = 40, val_double: int = 1,
                      titles: bool = False, verbose: bool = True) -> str:
    """Write the dataset to `out` (and one .mp4 per video to `videos`), deterministic in `seed`: test has
    2*test_single + 8*test_double videos, val likewise. With `titles` the same videos get the pre-training text,
    the full captions and tags moving to *_full fields."""
    if num_frames % 2:
        raise ValueError(f"num_frames must be even (two-event videos split the clip in halves), got {num_frames}")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "frames.lmdb")):
        # the folder is replaced at the end: only an earlier dataset may be, never a folder of someone's files
        raise ValueError(f"{out} holds files but no frames.lmdb, so it is no dataset this command wrote; it is "
                         f"left as it is: choose another --out")
    rng = np.random.default_rng(seed)
    text_rng = np.random.default_rng([seed, 1])  # the titles' own draws: the videos do not depend on `titles`
    splits = {
        "test": _syn_confusion_groups(rng, test_single, test_double),
        "val": _syn_confusion_groups(rng, val_single, val_double),
        "train": [_syn_random_events(rng, p_two) for _ in range(num_train)],
    }
    tmp_dir = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    mp4_dir = videos
    if videos:
        # a videos folder inside out would go when the finished folder replaces out: write it inside the
        # new folder instead, where it ends up at the path asked for
        rel = os.path.relpath(os.path.realpath(videos), os.path.realpath(out))
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            mp4_dir = os.path.normpath(os.path.join(tmp_dir, rel))
        os.makedirs(mp4_dir, exist_ok=True)
    db = FrameDB(os.path.join(tmp_dir, "frames.lmdb"), readonly=False, num_frames=num_frames, frame_size=frame_size)
    # one ffmpeg process per .mp4: threads suffice to keep every core busy, the encoding runs outside the GIL
    mp4_pool, mp4_jobs = ThreadPoolExecutor(os.cpu_count() or 1), []
    for split, event_lists in splits.items():
        with open(os.path.join(tmp_dir, f"{split}.jsonl"), "w") as f:
            for i, events in enumerate(event_lists):
                vid = f"{split}{i:05d}"
                frames = _syn_render(events, rng, num_frames, frame_size)
                db.put_video(vid, [encode_jpeg(frame, 95) for frame in frames])
                if videos:
                    mp4_jobs.append(mp4_pool.submit(_syn_write_mp4, os.path.join(mp4_dir, f"{vid}.mp4"), frames))
                tags = [w for c, s, m in events for w in (c, s, *m)]  # the objects' words, in caption order
                record = {"video_id": vid, "captions": [_syn_caption_en(events)],
                          "captions_zh": [_syn_caption_zh(events)], "tags": tags, "tags_zh": [_ZH[w] for w in tags],
                          "duration": num_frames / 8.0}
                if titles:  # the full text moves to *_full fields, the weak text takes its place
                    full = {f"{k}_full{lang}": record[k + lang] for k in ("captions", "tags") for lang in ("", "_zh")}
                    record = {"video_id": vid, **_syn_pretrain_text(events, text_rng), **full,
                              "duration": record["duration"]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    db.close()
    t0 = time.time()
    for n, job in enumerate(mp4_jobs, 1):
        job.result()  # re-raises an ffmpeg failure
        if verbose and (n % 1000 == 0 or n == len(mp4_jobs)):
            print(f"synthetic: {n}/{len(mp4_jobs)} .mp4 files in {videos} ({n / (time.time() - t0 + 1e-9):.0f}/s)",
                  flush=True)
    mp4_pool.shutdown()
    with open(os.path.join(tmp_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(_SYN_SPECIALS + sorted(set("，然后移动" + "".join(_ZH.values())))) + "\n")
    # swap in the finished folder at the end, so an interrupted run never leaves a dataset that looks complete
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_dir, out)
    if verbose:
        counts = ", ".join(f"{s} {len(e)}" for s, e in splits.items())
        print(f"wrote synthetic dataset to {out}: {counts} videos, {num_frames} frames of {frame_size} px",
              flush=True)
    return out
