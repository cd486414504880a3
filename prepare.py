"""
From files on disk to model inputs: frame sampling, decoding, cropping and augmentation, then `VideoTextDataset` and
`collate` (uint8 frames and token ids for train.py and eval.py); after them the annotation converters and the
`python prepare.py <command>` line. Frame store and ffmpeg: framestore.py; synthetic data: synthetic.py.

$ python prepare.py synthetic                                             # data/synthetic, train.py's default data
$ python prepare.py frames --videos=MSRVTT/videos/all --out=data/msrvtt/frames.lmdb --num_frames=30 --workers=8
$ python prepare.py msrvtt --anno=msrvtt_data --out=data/msrvtt
$ python prepare.py vatex --annotations=vatex_data.json --splits_dir=vatex_txt --out=data/vatex
$ python prepare.py chvtt --annotations=chvtt.json --out=data/chvtt
$ python prepare.py frames --help                                         # a command's options and defaults

A dataset is data/<name>/frames.lmdb and data/<name>/<split>.jsonl, one video per line:
  {"video_id": str, "captions": [str, ...], "tags": str or [str, ...] (opt), "duration": float (opt), ...}
Other languages get a suffix (`captions_zh`, `captions_en`/`tags_en`); `caption_field` picks one, tags follow it.
"""
import csv
import io
import json
import os
import sys
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image

import synthetic
from configurator import configure
from framestore import FrameDB, extract_frames, finite_float, print_listed, read_id_list
from tokenizer import tokenize  # noqa: F401  prepare.tokenize(texts) is what users call


# -----------------------------------------------------------------------------------------------------------------
# Frames -> model input: which frames to read, JPEG decode and centre crop, the pre-training augmentation

def sample_frame_indices(n: int, t: int, mode: str = "uniform", rng=None) -> np.ndarray:
    """Which t of the n stored frames to use. uniform: the original's eval sampling; random: t distinct, sorted;
    stratified: one from each of t equal bins over [0, n) (the original's bins of n // t never reached the tail)."""
    if mode == "uniform":
        return np.linspace(0, n, t, endpoint=False).astype(np.int64)
    if t > n:
        raise ValueError(f"cannot sample {t} distinct frames from {n} with frame_sample={mode!r}")
    if mode == "random":
        return np.sort(rng.choice(n, size=t, replace=False)).astype(np.int64)
    if mode == "stratified":
        edges = np.floor(np.linspace(0, n, t + 1)).astype(np.int64)  # every bin is non-empty since n >= t
        return rng.integers(edges[:-1], edges[1:]).astype(np.int64)
    raise ValueError(f"frame_sample must be 'uniform', 'random' or 'stratified', got {mode!r}")


def _open_jpeg(buf, min_short: int):
    """Decode a JPEG, downscaled by libjpeg (draft) when it is at least twice as large as needed."""
    img = Image.open(io.BytesIO(buf))
    w, h = img.size
    short = min(w, h)
    if short >= 2 * min_short and img.format == "JPEG":
        img.draft("RGB", (-(-w * min_short // short), -(-h * min_short // short)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _center_crop_into(img, size: int, out: np.ndarray):
    """Resize the short side to `size` (bicubic) and centre-crop a square, writing CHW uint8 into `out`."""
    w, h = img.size
    if min(w, h) == size:  # stored at the right size (the usual case): just cut the middle out
        x0, y0 = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        out[...] = np.asarray(img)[y0:y0 + size, x0:x0 + size].transpose(2, 0, 1)  # one copy out of Pillow, not two
        return
    # resize only the centre region: same result as resize-then-crop, without resizing pixels thrown away
    scale = min(w, h) / size
    nw, nh = round(w / scale), round(h / scale)
    x0, y0 = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    box = (x0 * scale, y0 * scale, (x0 + size) * scale, (y0 + size) * scale)
    out[...] = np.asarray(img.resize((size, size), Image.BICUBIC, box=box)).transpose(2, 0, 1)


# The original's SimCLR-style pre-training augmentation, drawn first (one draw may serve a whole clip), applied second.

def _draw_augmentation(rng, w: int, h: int) -> dict:
    p = {}
    # RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)): 10 tries, then a centre crop of clamped aspect
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.2, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        ratio = w / h
        if ratio < 3 / 4:
            cw, ch = w, int(round(w / (3 / 4)))
        elif ratio > 4 / 3:
            cw, ch = int(round(h * (4 / 3))), h
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    p["crop"] = (x0, y0, x0 + cw, y0 + ch)
    # ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, the four adjustments in random order
    if rng.random() < 0.8:
        p["jitter"] = [(int(k), float(rng.uniform(0.6, 1.4)) if k < 3 else float(rng.uniform(-0.1, 0.1)))
                       for k in rng.permutation(4)]
    p["gray"] = bool(rng.random() < 0.2)
    p["blur"] = float(rng.uniform(0.1, 2.0)) if rng.random() < 0.5 else None
    p["flip"] = bool(rng.random() < 0.5)
    return p


_GRAY = np.array([0.299, 0.587, 0.114])  # Pillow's RGB -> L weights, used by its ImageEnhance
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


def _jitter_affine(jitter: list) -> tuple:
    """The four jitters in drawn order as one affine map x -> A x + B m (m: the frame's channel mean), returned as
    (A, B): one pass instead of four, without clipping between steps and with hue rotated in YIQ, not HSV."""
    A, B = np.eye(3), np.zeros((3, 3))
    for kind, f in jitter:
        C = np.zeros((3, 3))
        if kind == 0:  # brightness: scale towards black
            M = f * np.eye(3)
        elif kind == 1:  # contrast: blend with the mean grey level of the image as it is at this step
            M, C = f * np.eye(3), (1 - f) * np.outer(np.ones(3), _GRAY) @ (A + B)
        elif kind == 2:  # saturation: blend with the pixel's own grey
            M = f * np.eye(3) + (1 - f) * np.outer(np.ones(3), _GRAY)
        else:  # hue: rotate the chroma plane by f turns (negative angle: the direction HSV hue increases)
            t = -2 * np.pi * f
            R = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
            M = _YIQ_INV @ R @ _YIQ
        A, B = M @ A, M @ B + C
    return A, B


def _crop_resize(img, p: dict, size: int) -> torch.Tensor:
    """The drawn crop resized to uint8 (3, size, size): torch's antialiased bilinear is within a level or two of
    Pillow's and faster."""
    x0, y0, x1, y1 = p["crop"]
    with warnings.catch_warnings():  # Pillow's pixels are read-only, and only read here
        warnings.simplefilter("ignore", UserWarning)
        frame = torch.from_numpy(np.asarray(img))[y0:y1, x0:x1].permute(2, 0, 1)[None]  # HWC seen as (1, 3, h, w)
    return torch.nn.functional.interpolate(frame, size=(size, size), mode="bilinear", antialias=True)[0]


# On the training device: the loader draws the parameters (a function of (seed, epoch, index)) and sends them with
# the cropped frames as AUGMENT_PARAMS floats per frame.
AUGMENT_PARAMS = 21  # colour map A (9) and B (9), grayscale flag, blur sigma (0: none), flip flag


def augment_params(p: dict) -> np.ndarray:
    """One frame's drawn parameters except the crop, as floats."""
    A, B = _jitter_affine(p["jitter"]) if "jitter" in p else (np.eye(3), np.zeros((3, 3)))
    return np.concatenate([A.ravel(), B.ravel(), [float(p["gray"]), p["blur"] or 0.0, float(p["flip"])]])


def _box_blur_weights(sigma: torch.Tensor) -> torch.Tensor:
    """The 5 taps (N, 5) of Pillow's GaussianBlur(sigma (N,)): three passes of an extended box filter of the
    Gaussian's variance, in 24-bit fixed point, computed in float32 as Pillow does (sigma 0: the identity)."""
    var = sigma.float() ** 2 / 3
    l = torch.floor((torch.sqrt(12 * var + 1) - 1) / 2)
    radius = l + (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    full = torch.floor(2.0 ** 24 / (2 * radius + 1)).double()  # the weight of the whole taps
    end = torch.floor((2 ** 24 - (2 * l.double() + 1) * full) / 2)  # of the fractional ones at both ends
    taps = torch.arange(-2, 3, device=sigma.device, dtype=torch.float64).abs()
    l = l.double()[:, None]
    w = torch.where(taps <= l, full[:, None], torch.where(taps == l + 1, end[:, None], 0.0))
    return torch.where(sigma[:, None] > 0, w, (taps == 0).double() * 2 ** 24)


def _box_blur(x: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass of per-frame taps w (N, 5) along `dim` of x (N, 3, H, W), edges repeated, rounded as Pillow does."""
    n = x.shape[dim]
    padded = torch.cat([x.narrow(dim, 0, 1)] * 2 + [x] + [x.narrow(dim, n - 1, 1)] * 2, dim=dim)
    acc = sum(w[:, j, None, None, None] * padded.narrow(dim, j, n) for j in range(5))
    return torch.floor((acc + 2 ** 23) / 2 ** 24)  # exact: the sums stay below 2 ** 33


def augment_frames(video: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The augmentation after the crop, as Pillow's ImageEnhance, grayscale, GaussianBlur and flip do it, on uint8
    frames (..., 3, H, W) with params (..., AUGMENT_PARAMS), on their device without host synchronisation: exact but
    for the colour map (within one level)."""
    shape = video.shape
    x = video.reshape(-1, *shape[-3:]).float()
    p = params.reshape(-1, AUGMENT_PARAMS).float()
    A, B = p[:, :9].view(-1, 3, 3), p[:, 9:18].view(-1, 3, 3)
    mean = x.mean(dim=(2, 3))  # (N, 3)
    x = torch.einsum("nij,njhw->nihw", A, x) + (B @ mean[:, :, None])[..., None]
    x = torch.floor(x + 0.5).clamp(0, 255)
    # grayscale with Pillow's fixed-point weights, exact in float32 (the sum stays below 2 ** 24)
    grey = torch.floor((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536)
    x = torch.where(p[:, 18, None, None, None] > 0, grey[:, None].expand_as(x), x)
    w, blurred = _box_blur_weights(p[:, 19]), x.double()
    for dim in (-1, -2):
        for _ in range(3):
            blurred = _box_blur(blurred, w, dim)
    x = blurred.float()
    x = torch.where(p[:, 20, None, None, None] > 0, x.flip(-1), x)
    return x.to(torch.uint8).reshape(shape)


# -----------------------------------------------------------------------------------------------------------------
# The dataset: <split>.jsonl + frames.lmdb -> uint8 frames and token ids

def json_error(e: json.JSONDecodeError) -> str:
    """The parser's reason with its column: e.msg alone can stop mid-phrase ("Unterminated string starting at")."""
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def _read_jsonl(path, key: str = "video_id", bad: list | None = None):
    """Yield the objects with `key` of a jsonl file. A broken line is an error naming file and line, or, given a
    list `bad`, its message goes there and the line is skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"{path}:{lineno}: invalid JSON ({json_error(e)})"
            else:
                if isinstance(obj, dict) and key in obj:
                    yield obj
                    continue
                problem = f"{path}:{lineno}: no {key!r} (expected a JSON object with one)"
            if bad is None:
                raise ValueError(problem)
            bad.append(problem)


class VideoTextDataset(torch.utils.data.Dataset):
    """A prepared split: data_dir/<split>.jsonl + data_dir/frames.lmdb -> items of uint8 frames and token ids.

    mode="train":    one item per caption  {"video": uint8 [T,3,S,S], "ids", "mask", "video_index"}
    mode="pretrain": one item per video    same keys plus "tag_ids", "tag_mask" (the caption is the first one)
    mode="videos":   one item per video    {"video", "video_index"} (eval encodes each video once)
    Randomness is a function of (seed, epoch, index): set `dataset.epoch` per epoch and any number of workers
    reproduce a run. With augmentation the frames are only cropped: items carry "augment" [T, AUGMENT_PARAMS], the
    rest of it, for augment_frames on the training device.
    replace_bad: an unreadable video is replaced by another drawn sample and named in the item's "bad" string.
    """

    def __init__(self, data_dir, split, tokenizer=None, *, mode="train", num_frames=12, context_length=32,
                 frame_sample="uniform", image_size=224, augment="none", seed=0, caption_field="captions",
                 tag_context_length=25, lmdb_path=None, verbose=True, replace_bad=False):
        for key, value, allowed in (("mode", mode, ("train", "pretrain", "videos")),
                                    ("frame_sample", frame_sample, ("uniform", "random", "stratified")),
                                    ("augment", augment, ("none", "frame", "clip"))):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if mode != "videos" and tokenizer is None:
            raise ValueError(f"mode={mode!r} needs a tokenizer (tokenizer.get_tokenizer('clip') or ('bert', vocab))")
        self.data_dir, self.split, self.tokenizer, self.mode = data_dir, split, tokenizer, mode
        self.num_frames, self.context_length, self.tag_context_length = num_frames, context_length, tag_context_length
        self.frame_sample, self.image_size, self.augment, self.seed = frame_sample, image_size, augment, seed
        self.caption_field, self.replace_bad = caption_field, replace_bad
        self.tag_field = "tags" + caption_field[len("captions"):] if caption_field.startswith("captions") else "tags"
        self.epoch = 0
        self.lmdb_path = lmdb_path or os.path.join(data_dir, "frames.lmdb")

        jsonl = os.path.join(data_dir, f"{split}.jsonl")
        if not os.path.exists(jsonl):
            have = sorted(f[:-6] for f in os.listdir(data_dir) if f.endswith(".jsonl")) if os.path.isdir(
                data_dir) else []
            raise FileNotFoundError(f"no split file {jsonl} (splits there: {have or 'none'}); make it with "
                                    f"`python prepare.py <msrvtt|vatex|chvtt|synthetic> --out={data_dir}`")
        with FrameDB(self.lmdb_path) as db:  # only to check: each worker opens its own (LMDB and fork do not mix)
            self.lmdb_frames = db.num_frames
            if num_frames > db.num_frames:
                raise ValueError(f"{self.lmdb_path} stores {db.num_frames} frames per video but num_frames="
                                 f"{num_frames} was asked; lower num_frames or re-extract with "
                                 f"`python prepare.py frames --num_frames={num_frames} ...`")
            if db.square and augment != "none":
                raise ValueError(f"{self.lmdb_path} stores only the centre squares of the frames (prepare.py frames "
                                 f"--square=True) but augment={augment!r} crops at random from whole frames; use "
                                 f"augment='none' or an LMDB of whole frames")
            if db.frame_size is not None and db.frame_size < image_size:
                raise ValueError(f"{self.lmdb_path} stores frames with a short side of {db.frame_size} px but "
                                 f"image_size={image_size} was asked (frames would be upscaled); lower image_size "
                                 f"or re-extract with `python prepare.py frames --frame_size={image_size} ...`")
            self.video_ids, self.captions, self.tags, self._video_captions = [], [], [], []
            missing, no_caption, total = [], 0, 0
            for obj in _read_jsonl(jsonl):
                total += 1
                vid = str(obj["video_id"])
                caps = [c for c in obj.get(caption_field) or [] if isinstance(c, str) and c.strip()]
                # a video without captions has no place in training or retrieval metrics; only an index of bare
                # videos (mode="videos", no caption field at all) keeps it
                if not caps and (mode != "videos" or caption_field in obj):
                    no_caption += 1
                    continue
                if not db.has_video(vid):
                    missing.append(vid)
                    continue
                vi = len(self.video_ids)
                self.video_ids.append(vid)
                self._video_captions.append(caps)
                self.captions.extend((c, vi) for c in caps)
                tags = obj.get(self.tag_field)
                # a string as written (CHVTT: the raw tag string); None when the field is absent (VATEX)
                self.tags.append(" ".join(tags) if isinstance(tags, list) else tags)
        if verbose and (missing or no_caption):
            msg = f"{jsonl}: using {len(self.video_ids)} of {total} videos"
            if missing:
                msg += f"; {len(missing)} have no frames in {self.lmdb_path} (e.g. {', '.join(missing[:5])})"
            if no_caption:
                msg += f"; {no_caption} have no {caption_field!r}"
            print(msg, flush=True)
        if not self.video_ids:
            raise ValueError(f"{jsonl}: no usable videos ({len(missing)} without frames in {self.lmdb_path}, "
                             f"{no_caption} without {caption_field!r})")
        self._db, self._pid = None, None  # each process opens its own LMDB on first use (_frames)

    def __len__(self):
        return len(self.captions) if self.mode == "train" else len(self.video_ids)

    def __getstate__(self):  # an open LMDB environment must not travel to worker processes
        return {**self.__dict__, "_db": None, "_pid": None}

    def caption_tokens(self):
        """All captions of the split in order: (ids [N, L], mask [N, L], video_of_text Long[N])."""
        ids, mask = self.tokenizer([c for c, _ in self.captions], self.context_length)
        return ids, mask, torch.tensor([vi for _, vi in self.captions], dtype=torch.long)

    def _frames(self, video_id: str, rng, out: np.ndarray) -> np.ndarray | None:
        """The sampled frames, cropped, into out [T, 3, S, S]; returns the rest of the augmentation or None."""
        if self._db is None or self._pid != os.getpid():  # first use in this (worker) process
            self._db, self._pid = FrameDB(self.lmdb_path), os.getpid()
            if torch.utils.data.get_worker_info() is not None:
                _keep_freed_memory()
        idx = sample_frame_indices(self.lmdb_frames, self.num_frames, self.frame_sample, rng)
        bufs = self._db.get_frames(video_id, idx)
        S = self.image_size
        params = np.zeros((len(bufs), AUGMENT_PARAMS), np.float32) if self.augment != "none" else None
        p = None
        for t, buf in enumerate(bufs):
            img = _open_jpeg(buf, S)
            if params is None:
                _center_crop_into(img, S, out[t])
                continue
            if p is None or self.augment == "frame":  # per frame as released, or one draw per clip
                p = _draw_augmentation(rng, *img.size)
            out[t] = _crop_resize(img, p, S).numpy()
            params[t] = augment_params(p)
        return params

    def __getitem__(self, index: int, video: torch.Tensor | None = None) -> dict:
        """One item; its frames are written into `video` [T, 3, S, S] where given (a slot of a batch tensor)."""
        if video is None:
            video = torch.empty((self.num_frames, 3, self.image_size, self.image_size), dtype=torch.uint8)
        faults = []
        while True:
            needs_rng = self.frame_sample != "uniform" or self.augment != "none"
            rng = np.random.default_rng([self.seed, self.epoch, index]) if needs_rng else None
            caption, vi = self.captions[index] if self.mode == "train" else (None, index)
            try:
                params = self._frames(self.video_ids[vi], rng, video.numpy())
                break
            except (KeyError, OSError, SyntaxError, ValueError) as e:  # a missing frame, a JPEG that does not decode
                if not self.replace_bad:
                    raise
                faults.append(f"{self.video_ids[vi]} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
                if len(faults) == 8:
                    raise ValueError(f"{self.lmdb_path}: 8 unreadable videos in a row, is it damaged? "
                                     f"{'; '.join(faults)}") from None
                # another sample, a function of (seed, epoch, index) alone: a resumed run draws the same one
                index = int(np.random.default_rng([self.seed, self.epoch, index, len(faults)]).integers(len(self)))
        item = {"video": video, "video_index": vi}
        if params is not None:
            item["augment"] = torch.from_numpy(params)
        if self.replace_bad:
            item["bad"] = "\n".join(faults)  # a worker process cannot report to rank 0: the training loop does
        if self.mode == "videos":
            return item
        caption = caption if caption is not None else self._video_captions[vi][0]  # pretrain: the first caption
        ids, mask = self.tokenizer([caption], self.context_length)
        item["ids"], item["mask"] = ids[0], mask[0]
        if self.mode == "pretrain":
            # data without a tag field uses the caption as tag text, as the original's VATEX pre-training loader did;
            # a CHVTT video with no tags gets an empty tag ([CLS][SEP]), as the original's CHVTT loader did
            tags = self.tags[vi] if self.tags[vi] is not None else caption
            tids, tmask = self.tokenizer([tags], self.tag_context_length)
            item["tag_ids"], item["tag_mask"] = tids[0], tmask[0]
        return item

    def __getitems__(self, indices: list) -> list:
        """A batch's items, their frames written into one batch tensor (shared memory in a worker, so it reaches the
        training process without a copy) that `collate` hands on."""
        shape = (len(indices), self.num_frames, 3, self.image_size, self.image_size)
        if torch.utils.data.get_worker_info() is not None:
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))  # as default_collate does in a worker
            video = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
        else:
            video = torch.empty(shape, dtype=torch.uint8)
        return [self.__getitem__(i, video[k]) for k, i in enumerate(indices)]


def collate(items: list) -> dict:
    """torch's default_collate, except that the frames __getitems__ wrote into one batch tensor are that tensor."""
    base = items[0]["video"]._base
    if base is None or len(base) != len(items) or any(it["video"]._base is not base or
                                                       it["video"].data_ptr() != base[k].data_ptr()
                                                       for k, it in enumerate(items)):
        return torch.utils.data.default_collate(items)
    rest = torch.utils.data.default_collate([{k: v for k, v in it.items() if k != "video"} for it in items])
    return {k: base if k == "video" else rest[k] for k in items[0]}


def _keep_freed_memory():
    """Let glibc keep freed blocks (a decoded frame, ~0.7 MB, is above its mmap threshold) instead of page-faulting
    fresh memory in for every frame."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MiB of free heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# -----------------------------------------------------------------------------------------------------------------
# Annotation converters: annotation files -> data/<name>/<split>.jsonl (the schema at the top)

def _clean_captions(caps, counter: Counter) -> list:
    """Keep non-empty strings (stripped); count what was dropped."""
    caps = [caps] if isinstance(caps, str) else caps or []
    kept = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
    counter["empty"] += len(caps) - len(kept)
    return kept


def _load_json(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({json_error(e)})") from None


def _listed(name: str, split: str, path: str, read_ids, records: dict, counter: Counter) -> list:
    """The records of the ids the split file lists, in its order; listed ids without captions are counted and named."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: split file {path} does not exist")
    ids = read_ids(path)
    lost = [vid for vid in ids if vid not in records]
    if lost:
        counter["no_caption"] += len(lost)
        print(f"{name}: {split}: {len(lost)} ids of {path} have no captions in the annotations "
              f"(e.g. {', '.join(lost[:5])})", flush=True)
    return [records[vid] for vid in ids if vid in records]


def _finish_conversion(name: str, out: str, splits: dict, frames, counter: Counter) -> dict:
    """Drop videos without frames (when an LMDB is known), write the splits, print one summary line each."""
    frames = frames or os.path.join(out, "frames.lmdb")
    stored = None  # the videos with frames, where an LMDB tells
    if os.path.exists(frames):
        with FrameDB(frames) as db:
            stored = {r["video_id"] for records in splits.values() for r in records if db.has_video(r["video_id"])}
    else:
        print(f"{name}: no frame LMDB at {frames}, so videos are not checked for frames now (the dataset "
              f"leaves out missing ones when it loads); pass --frames=PATH to check", flush=True)
    os.makedirs(out, exist_ok=True)
    summary = {}
    for split, records in splits.items():
        missing = [r["video_id"] for r in records if stored is not None and r["video_id"] not in stored]
        if missing:
            records = [r for r in records if r["video_id"] in stored]
            print(f"{name}: {split}: {len(missing)} videos have no frames in {frames}, left out "
                  f"(e.g. {', '.join(missing[:5])})", flush=True)
        path = os.path.join(out, f"{split}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(path + ".tmp", path)  # never leave a half-written split behind
        n_caps = sum(len(r.get("captions", [])) for r in records)
        print(f"{name}: wrote {path}: {len(records)} videos, {n_caps} captions", flush=True)
        summary[split] = {"videos": len(records), "captions": n_caps, "missing_frames": missing}
    for key, what in (("empty", "empty captions"), ("no_caption", "videos without any caption")):
        if counter[key]:
            print(f"{name}: dropped {counter[key]} {what}", flush=True)
    return summary


def _read_csv_ids(path: str) -> list:
    """The `video_id` column of a CLIP4Clip-style csv."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if "video_id" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no video_id column (expected a csv with a header line, as CLIP4Clip's)")
        ids = [(row["video_id"] or "").strip() for row in reader]
    return [vid for vid in ids if vid]


def convert_msrvtt(anno=None, data_json=None, train_9k=None, train_7k=None, test_csv=None, out="data/msrvtt",
                   frames=None) -> dict:
    """MSR-VTT (CLIP4Clip's msrvtt_data) -> train_9k / train_7k / train (= 9k) / test (1k-A) jsonl: training videos
    get all their captions from MSRVTT_data.json, test videos the `sentence` of MSRVTT_JSFUSION_test.csv."""
    if anno is not None and not os.path.isdir(anno):
        raise FileNotFoundError(f"msrvtt: annotation folder {anno} does not exist")
    optional_7k = train_7k is None  # --anno's folder may lack the 7k list

    def default(path, name):
        return path or (os.path.join(anno, name) if anno else None)
    data_json, test_csv = default(data_json, "MSRVTT_data.json"), default(test_csv, "MSRVTT_JSFUSION_test.csv")
    train_9k, train_7k = default(train_9k, "MSRVTT_train.9k.csv"), default(train_7k, "MSRVTT_train.7k.csv")
    if data_json is None or train_9k is None or test_csv is None:
        raise ValueError("msrvtt needs --anno=DIR (with MSRVTT_data.json, MSRVTT_train.9k.csv, "
                         "MSRVTT_JSFUSION_test.csv) or the files one by one (--data_json= --train_9k= --test_csv=)")
    data = _load_json(data_json)
    counter, caps, extra = Counter(), {}, {}
    for s in data.get("sentences", []):
        caps.setdefault(str(s.get("video_id")), []).extend(_clean_captions([s.get("caption")], counter))
    for v in data.get("videos", []):
        st, en = finite_float(v.get("start time")), finite_float(v.get("end time"))
        if st is not None and en is not None and en > st:
            extra[str(v.get("video_id"))] = {"duration": round(en - st, 3)}

    def record(vid, captions):
        return {"video_id": vid, "captions": captions, **extra.get(vid, {})}
    records = {vid: record(vid, c) for vid, c in caps.items() if c}
    splits = {"train_9k": _listed("msrvtt", "train_9k", train_9k, _read_csv_ids, records, counter)}
    if os.path.exists(train_7k or "") or not optional_7k:
        splits["train_7k"] = _listed("msrvtt", "train_7k", train_7k, _read_csv_ids, records, counter)
    splits["train"] = splits["train_9k"]
    if not os.path.exists(test_csv):
        raise FileNotFoundError(f"msrvtt: test file {test_csv} does not exist")
    test = {}
    with open(test_csv, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            vid = (row.get("video_id") or "").strip()
            if not vid:
                raise ValueError(f"{test_csv}:{lineno}: no video_id (expected columns key, vid_key, video_id, "
                                 f"sentence)")
            test.setdefault(vid, []).extend(_clean_captions([row.get("sentence")], counter))
    splits["test"] = [record(vid, c) for vid, c in test.items() if c]
    return _finish_conversion("msrvtt", out, splits, frames, counter)


def convert_vatex(annotations=None, splits_dir=None, out="data/vatex", frames=None) -> dict:
    """VATEX -> train / val / test jsonl with English `captions` and Chinese `captions_zh`. `annotations`:
    vatex_data.json ({id: {enCap, chCap}}) and/or the official json lists, comma-separated; splits_dir's
    <split>_list.txt hold 25,991 / 1,500 / 1,500 ids (val and test both from the official validation set)."""
    if not annotations:
        raise ValueError("vatex needs --annotations=vatex_data.json (or the official "
                         "vatex_training_v1.0.json,vatex_validation_v1.0.json, comma-separated)")
    if not splits_dir:
        raise ValueError("vatex needs the split lists: --splits_dir=DIR with train_list.txt, val_list.txt, "
                         "test_list.txt")
    counter, records = Counter(), {}
    for path in [p for p in str(annotations).split(",") if p]:
        data = _load_json(path)
        if isinstance(data, dict):  # {video_id: {"enCap": [...], "chCap": [...]}}
            items = list(data.items())
        elif isinstance(data, list):  # official: [{"videoID": ..., "enCap": [...], "chCap": [...]}]
            items = [(d.get("videoID") or d.get("video_id"), d) for d in data if isinstance(d, dict)]
        else:
            raise ValueError(f"{path}: expected a dict of video ids or a list of {{videoID, enCap, chCap}}")
        for vid, d in items:
            if vid and isinstance(d, dict):
                r = records.setdefault(str(vid), {"video_id": str(vid), "captions": [], "captions_zh": []})
                r["captions"].extend(_clean_captions(d.get("enCap"), counter))
                r["captions_zh"].extend(_clean_captions(d.get("chCap"), counter))
    records = {vid: r for vid, r in records.items() if r["captions"] or r["captions_zh"]}
    splits = {split: _listed("vatex", split, os.path.join(splits_dir, f"{split}_list.txt"), read_id_list, records,
                             counter) for split in ("train", "val", "test")}
    return _finish_conversion("vatex", out, splits, frames, counter)


def _raw_tags(tag) -> str:
    """The raw tag string the original tokenized ("" for none: an empty tag, [CLS][SEP]); a list is comma-joined."""
    if isinstance(tag, list):
        return ",".join(str(t).strip() for t in tag if str(t).strip())
    return str(tag or "").strip()


def convert_chvtt(annotations=None, out="data/chvtt", frames=None, split="train") -> dict:
    """CHVTT JSON lines (docid, title, tag, title_eng, tag_eng, duration) -> <split>.jsonl: video_id Video<docid>
    (the original's LMDB keys), `captions` [title], `tags` the raw tag string, English in `captions_en`/`tags_en`."""
    if not annotations:
        raise ValueError("chvtt needs --annotations=FILE.json (JSON lines: docid, title, tag, title_eng, tag_eng, "
                         "duration); several files comma-separated")
    counter, recs, bad, seen = Counter(), [], [], set()
    for path in str(annotations).split(","):
        if not os.path.exists(path):
            raise FileNotFoundError(f"chvtt: annotation file {path} does not exist")
        for d in _read_jsonl(path, "docid", bad):
            vid = f"Video{d['docid']}"
            if vid in seen:
                counter["duplicate"] += 1
                continue
            title = _clean_captions([d.get("title")], counter)
            if not title:
                counter["no_caption"] += 1
                continue
            seen.add(vid)
            r = {"video_id": vid, "captions": title, "tags": _raw_tags(d.get("tag"))}
            title_en = _clean_captions([d.get("title_eng")], Counter())
            if title_en:
                r["captions_en"] = title_en
                r["tags_en"] = _raw_tags(d.get("tag_eng"))
            duration = finite_float(d.get("duration"))
            if duration is not None:
                r["duration"] = duration
            recs.append(r)
    if bad:
        print_listed(f"chvtt: skipped {len(bad)} bad lines:", bad)
    if counter["duplicate"]:
        print(f"chvtt: skipped {counter['duplicate']} repeated docids", flush=True)
    if not recs:
        raise ValueError(f"chvtt: no usable line in {annotations} (see above); expected JSON lines with docid, title, "
                         f"tag, title_eng, tag_eng, duration")
    return _finish_conversion("chvtt", out, {split: recs}, frames, counter)


# -----------------------------------------------------------------------------------------------------------------
# Command line: python prepare.py <command> [--key=value ...], read by configurator.configure

def _frames(videos, out, **kw):
    for key, value in (("videos", videos), ("out", out)):
        if value is None:
            raise ValueError(f"prepare.py frames needs --{key}=...")
    if not out.rstrip("/").endswith(".lmdb"):
        print(f"note: datasets read <data dir>/frames.lmdb; --out={out} does not end in .lmdb", flush=True)
    r = extract_frames(videos, out, **kw)
    if r["stored"] == 0:  # nothing at all could be decoded: let scripts notice
        n = len(r["failed"]) + len(r["failed_before"])
        raise ValueError(f"none of the {n} videos in {videos} could be decoded; the reasons are listed above and "
                         f"kept under __meta__ 'failed' in {out}")


# name -> (what it does, the function the options go to, {option: (default, description)}); a default of None is
# an optional path. The defaults are those of the functions (tests/test_prepare.py checks they agree).
COMMANDS = {
    "frames": ("video files -> frames.lmdb, JPEG frames at the centres of equal time segments", _frames, {
        "videos": (None, "folder of video files, searched recursively (required)"),
        "out": (None, "the LMDB to write or resume; datasets read <data dir>/frames.lmdb (required)"),
        "num_frames": (30, "frames stored per video"),
        "frame_size": (224, "short side of the stored frames in pixels (aspect kept)"),
        "workers": (8, "videos decoded in parallel, one ffmpeg process each"),
        "ids": (None, "file of video ids (file names without extension), one per line: only these videos"),
        "retry_failed": (False, "try again the videos that failed in an earlier run"),
        "quality": (90, "JPEG quality of the stored frames"),
        "id_prefix": ("", "put before each file name to make its key (CHVTT: Video, as in the original LMDBs)"),
        "square": (False, "store only the centre square (side frame_size): less to decode where nothing augments"),
    }),
    "msrvtt": ("MSR-VTT annotations (CLIP4Clip's msrvtt_data) -> train_9k, train_7k, train, test", convert_msrvtt, {
        "anno": (None, "folder of the four files below (or give them one by one)"),
        "data_json": (None, "MSRVTT_data.json, all captions (default: in --anno)"),
        "train_9k": (None, "MSRVTT_train.9k.csv, the training ids (default: in --anno)"),
        "train_7k": (None, "MSRVTT_train.7k.csv, the smaller training split (optional; default: in --anno)"),
        "test_csv": (None, "MSRVTT_JSFUSION_test.csv, the 1k-A test set (default: in --anno)"),
        "out": ("data/msrvtt", "folder for the .jsonl files"),
        "frames": (None, "frame LMDB to check for missing videos (default: <out>/frames.lmdb when it exists)"),
    }),
    "vatex": ("VATEX annotations -> train, val, test with English and Chinese captions", convert_vatex, {
        "annotations": (None, "vatex_data.json, or the official training and validation json, comma-separated"),
        "splits_dir": (None, "folder with train_list.txt, val_list.txt, test_list.txt"),
        "out": ("data/vatex", "folder for the .jsonl files"),
        "frames": (None, "frame LMDB to check for missing videos (default: <out>/frames.lmdb when it exists)"),
    }),
    "chvtt": ("CHVTT annotations -> one split: Chinese titles and tags, their English translations", convert_chvtt, {
        "annotations": (None, "JSON lines of docid, title, tag, title_eng, tag_eng, duration; comma-separated"),
        "out": ("data/chvtt", "folder for the .jsonl file"),
        "frames": (None, "frame LMDB to check for missing videos (default: <out>/frames.lmdb when it exists)"),
        "split": ("train", "name of the split to write"),
    }),
    "synthetic": ("the built-in dataset of moving shapes -> frames.lmdb, train, val, test, vocab.txt",
                  synthetic.prepare_synthetic, {
        "out": ("data/synthetic", "output folder, replaced once the new one is complete"),
        "seed": (0, "random seed: the same seed writes the same bytes"),
        "videos": (None, "also write one .mp4 per video into this folder"),
        "num_frames": (8, "frames per video (even: two-object videos split the clip in halves)"),
        "frame_size": (32, "frame side in pixels"),
        "num_train": (6000, "training videos"),
        "p_two": (0.15, "share of training videos with two objects, one after the other"),
        "test_single": (90, "test confusion groups of one object (2 videos each)"),
        "test_double": (3, "test confusion groups of two objects (8 videos each)"),
        "val_single": (40, "val confusion groups of one object"),
        "val_double": (1, "val confusion groups of two objects"),
        "titles": (False, "pre-training text: titles and loose tags in place of captions (synthetic.py)"),
        "verbose": (True, "print progress"),
    }),
}


_USAGE = "\n".join(["usage: python prepare.py <command> [--key=value ...]   (<command> --help lists its options)",
                    "commands:", *(f"  {name:9s}  {summary}" for name, (summary, _, _) in COMMANDS.items())])


def _quote_path(arg: str, defaults: dict) -> str:
    # configure reads values as Python literals: quoted, a path (default None) stays as typed (--ids=2024 a file)
    key, eq, text = arg[2:].partition("=")
    if arg.startswith("--") and eq and key in defaults and defaults[key] is None:
        return f"--{key}={text!r}"
    return arg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return
    cmd, args = argv[0], argv[1:]
    if cmd not in COMMANDS:
        sys.exit(f"error: unknown command {cmd!r}\n{_USAGE}")
    _, run, options = COMMANDS[cmd]
    defaults = {key: default for key, (default, _) in options.items()}
    try:
        config = configure(defaults, [_quote_path(a, defaults) for a in args], prog=f"prepare.py {cmd}",
                           descriptions={key: text for key, (_, text) in options.items()})
        run(**config)
    except (ValueError, OSError, RuntimeError) as e:  # bad options or inputs: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
