# Data part of prepare.py: frame LMDB, sampling, the dataset, ffmpeg extraction on real files, converters, CLI.
# Videos are made by ffmpeg inside the tests (tiny: 64x48, a few frames, -threads 1) so the file runs in seconds.
import csv
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import framestore
import prepare
from tokenizer import get_tokenizer
from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_ffmpeg = pytest.mark.needs("ffmpeg", "ffprobe")  # skipped without them, failed in CI


class WordTokenizer:
    """Stand-in for get_tokenizer(...): word ids from a growing table, [1] ... [2], zero padding."""

    def __init__(self):
        self.table = {}

    def __call__(self, texts, context_length):
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)
        for n, text in enumerate(texts):
            words = [self.table.setdefault(w, 3 + len(self.table)) for w in text.split()]
            row = ([1] + words)[:context_length - 1] + [2]
            ids[n, :len(row)] = torch.tensor(row)
        return ids, (ids > 0).long()


def _jpeg(rgb, quality=90):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _make_dataset(root, n_videos=6, n_frames=8, size=(48, 36), missing=(), tags=True):
    """A prepared dataset dir: frames.lmdb (frame i of video v is a flat grey 10*i + v) and train.jsonl."""
    db = framestore.FrameDB(str(root / "frames.lmdb"), readonly=False, num_frames=n_frames, frame_size=min(size))
    recs = []
    for v in range(n_videos):
        vid = f"video{v}"
        if vid not in missing:
            db.put_video(vid, [_jpeg(np.full((size[1], size[0], 3), 10 * i + v, np.uint8), 95)
                               for i in range(n_frames)])
        r = {"video_id": vid, "captions": [f"caption {v} a", f"caption {v} b"]}
        if tags:
            r["tags"] = [f"tag{v}", "common"]
        recs.append(r)
    db.close()
    with open(root / "train.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------------
# FrameDB

def test_framedb_roundtrip_growth_and_meta(tmp_path):
    path = str(tmp_path / "f.lmdb")
    db = framestore.FrameDB(path, readonly=False, num_frames=3, frame_size=16, map_size=1 << 20, commit_every=4)
    rng = np.random.default_rng(0)
    blobs = {f"v{k}": [rng.bytes(20_000) for _ in range(3)] for k in range(40)}  # 2.4 MB > the 1 MiB map
    for vid, frames in blobs.items():
        db.put_video(vid, frames)
    db.mark_failed("broken", "no video stream")
    db.close()
    r = framestore.FrameDB(path)
    assert r.meta["num_frames"] == 3 and r.meta["frame_size"] == 16 and r.meta["count"] == 40
    assert r.meta["version"] == framestore.FRAMEDB_VERSION and r.failed == {"broken": "no video stream"}
    assert r.has_video("v7") and not r.has_video("broken") and r.get_frames("v7", [2])[0] == blobs["v7"][2]
    assert sorted(r.video_ids()) == sorted(blobs)
    with pytest.raises(KeyError, match="v7_5"):
        r.get_frames("v7", [0, 5])
    with pytest.raises(KeyError, match="v7_3 is not in"):
        r.get_frames("v7", [3])
    r2 = framestore.FrameDB(path)  # a second reader in the same process shares the environment
    assert r2.get_frames("v1", [0])[0] == blobs["v1"][0]
    r.close(), r2.close()
    # the writer refuses other settings, and a later success clears an earlier failure
    with pytest.raises(ValueError, match="num_frames=3"):
        framestore.FrameDB(path, readonly=False, num_frames=5, frame_size=16)
    w = framestore.FrameDB(path, readonly=False, num_frames=3, frame_size=16)
    w.put_video("broken", [b"x", b"y", b"z"])
    w.close()
    r = framestore.FrameDB(path)
    assert r.failed == {} and r.meta["count"] == 41
    r.close()


def test_framedb_missing_path_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py frames"):
        framestore.FrameDB(str(tmp_path / "nope.lmdb"))


def test_framedb_reads_original_hmmc_layout(tmp_path):
    # tools/frame2lmdb.py: keys f"{video_id}_{i}", no __meta__
    env = lmdb.open(str(tmp_path / "orig.lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for vid in ("video0", "video1", "video2"):
            for i in range(5):
                txn.put(f"{vid}_{i}".encode(), _jpeg(np.full((40, 60, 3), 50, np.uint8)))
    env.close()
    db = framestore.FrameDB(str(tmp_path / "orig.lmdb"))
    assert db.num_frames == 5 and len(db) == 3 and db.frame_size is None and db.has_video("video2")
    db.close()


# ---------------------------------------------------------------------------------------------------------------
# frame sampling

def test_uniform_sampling_matches_the_original():
    assert prepare.sample_frame_indices(30, 12).tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert prepare.sample_frame_indices(48, 12).tolist() == list(range(0, 48, 4))


def test_stratified_and_random_sampling_cover_the_clip():
    seen_s, seen_r = set(), set()
    for s in range(200):
        st = prepare.sample_frame_indices(30, 12, "stratified", np.random.default_rng(s))
        rd = prepare.sample_frame_indices(30, 12, "random", np.random.default_rng(s))
        edges = np.floor(np.linspace(0, 30, 13)).astype(int)
        assert ((st >= edges[:-1]) & (st < edges[1:])).all()  # one frame per bin
        assert len(set(rd.tolist())) == 12 and (np.diff(rd) > 0).all()
        seen_s.update(st.tolist()), seen_r.update(rd.tolist())
    assert seen_s == set(range(30)) and seen_r == set(range(30))  # the tail (24..29) is reachable
    a = prepare.sample_frame_indices(30, 12, "stratified", np.random.default_rng([0, 1, 2]))
    b = prepare.sample_frame_indices(30, 12, "stratified", np.random.default_rng([0, 1, 2]))
    assert a.tolist() == b.tolist()
    with pytest.raises(ValueError):
        prepare.sample_frame_indices(4, 8, "random", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------
# VideoTextDataset

@pytest.mark.parametrize("line, reason", [
    ('{"video_id": "v1", "captions": ["a red', "Unterminated string starting at column 33"),
    ('{"video_id": "v1" "captions": []}', "Expecting ',' delimiter at column 19"),
])
def test_a_broken_jsonl_line_is_named_with_its_whole_reason(tmp_path, line, reason):
    path = tmp_path / "train.jsonl"
    path.write_text('{"video_id": "v0", "captions": ["a"]}\n' + line)  # the last line, cut off
    with pytest.raises(ValueError) as e:
        list(prepare._read_jsonl(str(path)))
    assert str(e.value) == f"{path}:2: invalid JSON ({reason})"


def test_dataset_modes_shapes_and_caption_tokens(tmp_path):
    root = _make_dataset(tmp_path, n_videos=4, n_frames=8, size=(48, 36))
    tok = WordTokenizer()
    ds = prepare.VideoTextDataset(str(root), "train", tok, num_frames=4, image_size=32, context_length=8)
    assert len(ds) == 8 and len(ds.video_ids) == 4 and ds.video_ids == [f"video{v}" for v in range(4)]
    item = ds[3]
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.uint8
    assert item["video_index"] == 1 and item["ids"].shape == (8,) and item["mask"].sum() == 5
    # uniform frames 0, 2, 4, 6 of video1: grey 10*i + 1 (JPEG may move a flat grey by a level or two)
    means = item["video"].float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.tensor([1.0, 21.0, 41.0, 61.0]), atol=2.5, rtol=0)
    ids, mask, vot = ds.caption_tokens()
    assert ids.shape == (8, 8) and vot.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(ids[3], item["ids"])
    assert ds.captions[3] == ("caption 1 b", 1)

    pre = prepare.VideoTextDataset(str(root), "train", tok, mode="pretrain", num_frames=4, image_size=32,
                                   context_length=8, tag_context_length=5)
    item = pre[2]
    assert len(pre) == 4 and set(item) == {"video", "ids", "mask", "video_index", "tag_ids", "tag_mask"}
    assert item["tag_ids"].shape == (5,) and item["tag_mask"].sum() == 4  # [1] tag2 common [2]
    vids = prepare.VideoTextDataset(str(root), "train", mode="videos", num_frames=4, image_size=32)
    assert len(vids) == 4 and set(vids[0]) == {"video", "video_index"}
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["video"].shape == (3, 4, 3, 32, 32) and batch["video"].is_contiguous()


def test_dataset_resizes_frames_stored_at_another_size(tmp_path):
    root = _make_dataset(tmp_path, n_videos=2, n_frames=4, size=(96, 64))  # short side 64, asked 32
    ds = prepare.VideoTextDataset(str(root), "train", mode="videos", num_frames=2, image_size=32)
    assert ds[0]["video"].shape == (2, 3, 32, 32)


def test_dataset_reports_missing_videos_once_and_leaves_them_out(tmp_path, capsys):
    root = _make_dataset(tmp_path, n_videos=5, missing=("video1", "video3"))
    ds = prepare.VideoTextDataset(str(root), "train", WordTokenizer(), num_frames=4, image_size=32)
    out = capsys.readouterr().out
    assert "2 have no frames" in out and "video1" in out and "video3" in out
    assert ds.video_ids == ["video0", "video2", "video4"] and len(ds) == 6
    for i in range(len(ds)):
        ds[i]  # never a crash later


def test_dataset_errors_on_mismatch_and_missing_split(tmp_path):
    root = _make_dataset(tmp_path, n_videos=2, n_frames=4, size=(48, 36))
    with pytest.raises(ValueError, match="stores 4 frames"):
        prepare.VideoTextDataset(str(root), "train", mode="videos", num_frames=8, image_size=32)
    with pytest.raises(ValueError, match="short side of 36"):
        prepare.VideoTextDataset(str(root), "train", mode="videos", num_frames=4, image_size=64)
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        prepare.VideoTextDataset(str(root), "test", mode="videos")
    with pytest.raises(ValueError, match="frame_sample"):
        prepare.VideoTextDataset(str(root), "train", mode="videos", frame_sample="uniform_random")
    with open(root / "bad.jsonl", "w") as f:
        f.write('{"video_id": "video0", "captions": ["a"]}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare.VideoTextDataset(str(root), "bad", mode="videos", num_frames=4, image_size=32)


def test_dataset_randomness_is_a_function_of_seed_epoch_index(tmp_path):
    root = _make_dataset(tmp_path, n_videos=3, n_frames=16, size=(48, 36))
    kw = dict(mode="videos", num_frames=4, image_size=32, frame_sample="stratified", augment="frame")
    a = prepare.VideoTextDataset(str(root), "train", seed=3, **kw)
    b = prepare.VideoTextDataset(str(root), "train", seed=3, **kw)
    assert torch.equal(a[1]["video"], b[1]["video"])
    b.epoch = 1
    assert not torch.equal(a[1]["video"], b[1]["video"])
    # the same through DataLoader workers (each opens the LMDB itself)
    loader = torch.utils.data.DataLoader(a, batch_size=3, num_workers=2)
    assert torch.equal(next(iter(loader))["video"][1], a[1]["video"])


def test_augmentation_ranges_shapes_and_clip_consistency(tmp_path):
    # all frames identical: per-clip augmentation must give identical frames, per-frame must not
    root = tmp_path
    rng = np.random.default_rng(0)
    img = _jpeg((rng.random((40, 56, 3)) * 255).astype(np.uint8), 95)
    db = framestore.FrameDB(str(root / "frames.lmdb"), readonly=False, num_frames=6, frame_size=40)
    db.put_video("v", [img] * 6)
    db.close()
    (root / "train.jsonl").write_text('{"video_id": "v", "captions": ["x"]}\n')
    kw = dict(mode="videos", num_frames=6, image_size=32)
    clip = prepare.VideoTextDataset(str(root), "train", augment="clip", **kw)
    frame = prepare.VideoTextDataset(str(root), "train", augment="frame", **kw)
    for epoch in range(3):
        clip.epoch = frame.epoch = epoch
        c, f = (prepare.augment_frames(item["video"], item["augment"]) for item in (clip[0], frame[0]))
        assert c.shape == f.shape == (6, 3, 32, 32) and c.dtype == f.dtype == torch.uint8
        assert all(torch.equal(c[0], c[t]) for t in range(6))
        assert not all(torch.equal(f[0], f[t]) for t in range(6))
    p = prepare._draw_augmentation(np.random.default_rng(1), 56, 40)
    x0, y0, x1, y1 = p["crop"]
    assert 0 <= x0 < x1 <= 56 and 0 <= y0 < y1 <= 40
    area = (x1 - x0) * (y1 - y0) / (56 * 40)
    assert 0.15 <= area <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# frame extraction with ffmpeg, on real files of several containers and codecs

def _ff(*args, stdin=None):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], input=stdin, check=True,
                   stdout=subprocess.DEVNULL if stdin is None else None, timeout=120)


def _grey_raw(n, w=64, h=48):
    return b"".join(bytes([8 * k]) * (w * h * 3) for k in range(n))  # frame k is grey 8*k: its index is visible


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    require("ffmpeg", "ffprobe")
    d = tmp_path_factory.mktemp("videos")
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48", "-r", "10", "-i", "pipe:0", "-threads", "1"]
    lossless = ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p"]
    src = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1", "-threads", "1"]
    _ff(*raw, *lossless, str(d / "grey.mp4"), stdin=_grey_raw(30))
    # variable frame rate: 20 frames, the first 10 every 0.1 s, the rest every 0.3 s
    _ff(*raw, "-vf", "setpts='if(lt(N,10),N,10+(N-10)*3)/10/TB'", "-fps_mode", "vfr", *lossless,
        "-video_track_timescale", "1000", str(d / "vfr.mp4"), stdin=_grey_raw(20))
    _ff(*src, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k", str(d / "vp9.webm"))
    _ff(*src, "-c:v", "libx264", str(d / "h264.mkv"))
    _ff(*src, "-c:v", "mpeg4", str(d / "mpeg4.avi"))
    _ff(*src, "-c:v", "mjpeg", str(d / "mjpeg.mov"))
    _ff(*src, "-frames:v", "1", "-c:v", "libx264", str(d / "one.mp4"))
    _ff("-i", str(d / "h264.mkv"), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(d / "rotated.mp4"))
    _ff("-f", "lavfi", "-i", "sine=duration=0.5", "-c:a", "aac", str(d / "audio.mp4"))
    (d / "empty.mp4").write_bytes(b"")
    # truncated: an mp4 whose index (moov, at the end) is cut off is undecodable; a cut mkv keeps its first part
    (d / "cut.mp4").write_bytes((d / "grey.mp4").read_bytes()[:2000])
    _ff("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=3", "-threads", "1", "-c:v", "libx264", "-g", "5",
        str(d / "long.mkv"))
    mkv = (d / "long.mkv").read_bytes()
    (d / "long.mkv").unlink()
    (d / "cutmkv.mkv").write_bytes(mkv[:len(mkv) * 6 // 10])
    # a raw H.264 stream (no container duration) whose frame size changes half way
    _ff(*src, "-c:v", "libx264", str(d / "a.h264"))
    _ff("-f", "lavfi", "-i", "testsrc=size=48x80:rate=10:duration=1", "-threads", "1", "-c:v", "libx264",
        str(d / "b.h264"))
    (d / "mixed.h264").write_bytes((d / "a.h264").read_bytes() + (d / "b.h264").read_bytes())
    (d / "a.h264").unlink(), (d / "b.h264").unlink()
    (d / "notes.txt").write_text("not a video")
    return d


GOOD = {"grey", "vfr", "vp9", "h264", "mpeg4", "mjpeg", "one", "rotated", "cutmkv", "mixed"}
BAD = {"audio": "no video stream", "empty": "empty file", "cut": "unreadable"}


def _frame_pts(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [float(x.split(",")[0]) for x in out.split()]


def _grey_levels(frames):
    return [round(float(np.asarray(Image.open(io.BytesIO(b))).mean()) / 8) for b in frames]


@needs_ffmpeg
def test_extract_frames_all_formats_failures_and_resume(video_dir, tmp_path, capsys):
    out = str(tmp_path / "frames.lmdb")
    r = framestore.extract_frames(str(video_dir), out, num_frames=6, frame_size=32, workers=2, progress_every=0)
    log = capsys.readouterr().out
    assert set(r["failed"]) == set(BAD), r["failed"]
    reasons = r["failed"]
    for vid, why in BAD.items():
        assert why in r["failed"][vid], (vid, r["failed"][vid])
    assert r["done"] == len(GOOD) and "videos/s" in log and "3 videos failed" in log
    db = framestore.FrameDB(out)
    assert db.num_frames == 6 and db.frame_size == 32 and len(db) == len(GOOD) and set(db.failed) == set(BAD)
    for vid in GOOD:
        sizes = {Image.open(io.BytesIO(db.get_frames(vid, [i])[0])).size for i in range(6)}
        assert sizes == ({(32, 43)} if vid == "rotated" else {(43, 32)}), (vid, sizes)
    # frames are the ones on screen at the centres of 6 equal segments, by timestamp (constant and variable rate;
    # frame k of both videos is grey 8*k)
    for vid in ("grey", "vfr"):
        pts = _frame_pts(video_dir / f"{vid}.mp4")
        duration = framestore.probe_video(str(video_dir / f"{vid}.mp4"))["duration"]
        want = [max(k for k, p in enumerate(pts) if p <= (i + 0.5) * duration / 6 + 1e-6) for i in range(6)]
        assert _grey_levels(db.get_frames(vid, range(6))) == want, vid
    assert len(set(db.get_frames("one", range(6)))) == 1  # a 1-frame video repeats its frame
    db.close()

    # rerun: nothing to do; failed ones are retried only when asked
    r = framestore.extract_frames(str(video_dir), out, num_frames=6, frame_size=32, workers=1)
    assert r["done"] == 0 and r["skipped"] == len(GOOD) + len(BAD) and not r["failed"]
    assert r["failed_before"] == reasons and r["stored"] == len(GOOD)
    log = capsys.readouterr().out  # listed again, with the way to retry them
    assert f"{len(BAD)} videos failed in an earlier run and were skipped" in log and "--retry_failed" in log
    assert all(f"  {vid}: " in log for vid in BAD)
    r = framestore.extract_frames(str(video_dir), out, num_frames=6, frame_size=32, workers=1, retry_failed=True)
    assert r["done"] == 0 and set(r["failed"]) == set(BAD)
    with pytest.raises(ValueError, match="frame_size=32"):
        framestore.extract_frames(str(video_dir), out, num_frames=6, frame_size=64, workers=1)


@needs_ffmpeg
def test_frames_cli_with_id_list_and_missing_video(video_dir, tmp_path, capsys):
    vids = tmp_path / "videos"
    vids.mkdir()
    shutil.copy(video_dir / "grey.mp4", vids / "grey.mp4")
    shutil.copy(video_dir / "vp9.webm", vids / "vp9.webm")
    shutil.copy(video_dir / "h264.mkv", vids / "other.mkv")  # not in the list
    ids = tmp_path / "ids.txt"
    ids.write_text("grey\nvp9\nghost\n")
    out = tmp_path / "f.lmdb"
    argv = ["frames", f"--videos={vids}", f"--out={out}", "--num_frames=4", "--frame_size=24", "--workers=1",
            f"--ids={ids}"]
    prepare.main(argv)
    db = framestore.FrameDB(str(out))
    assert sorted(db.video_ids()) == ["grey", "vp9"] and "missing" in db.failed["ghost"]
    db.close()
    assert "ghost" in capsys.readouterr().out
    # the missing video turns up: a rerun picks it up without --retry_failed
    shutil.copy(video_dir / "mpeg4.avi", vids / "ghost.avi")
    prepare.main(argv)
    db = framestore.FrameDB(str(out))
    assert sorted(db.video_ids()) == ["ghost", "grey", "vp9"] and db.failed == {}
    db.close()
    # CHVTT: files named <docid>, keys Video<docid>_<i> like the original's LMDBs
    r = framestore.extract_frames(str(vids), str(tmp_path / "chvtt.lmdb"), num_frames=2, frame_size=16, workers=1,
                                  ids=["grey"], id_prefix="Video")
    assert r["done"] == 1 and framestore.FrameDB(str(tmp_path / "chvtt.lmdb")).has_video("Videogrey")


def _one_error_line(p, *parts):
    # exit status 1, one `error: ...` line naming what it should, nothing after it, no traceback
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr
    assert all(part in errors[0] for part in parts), (errors[0], parts)
    return errors[0]


@pytest.mark.slow
@needs_ffmpeg
def test_frames_cli_refuses_a_folder_without_videos(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "notes.txt").write_text("not a video")
    out = tmp_path / "frames.lmdb"
    p = _run_cli("frames", f"--videos={tmp_path / 'videos'}", f"--out={out}", "--workers=1")
    _one_error_line(p, "no video files", str(tmp_path / "videos"), "nothing written")
    assert not out.exists()


@pytest.mark.slow
@needs_ffmpeg
def test_frames_cli_when_nothing_decodes_and_on_rerun(video_dir, tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    for name in ("empty.mp4", "cut.mp4"):
        shutil.copy(video_dir / name, vids / name)
    out = tmp_path / "frames.lmdb"
    argv = ["frames", f"--videos={vids}", f"--out={out}", "--num_frames=2", "--frame_size=16", "--workers=1"]
    p = _run_cli(*argv)
    _one_error_line(p, "none of the 2 videos", str(vids), "could be decoded", "listed above", str(out))
    assert "empty: empty file" in p.stdout and "cut: " in p.stdout
    # a rerun lists the earlier failures again and says how to retry; the hint works as printed
    p = _run_cli(*argv)
    _one_error_line(p, "none of the 2 videos")
    assert "2 videos failed in an earlier run and were skipped" in p.stdout and "rerun with --retry_failed" in p.stdout
    assert "empty: empty file" in p.stdout and "0 to extract" in p.stdout
    p = _run_cli(*argv, "--retry_failed")
    _one_error_line(p, "none of the 2 videos")
    assert "(2 failed ones retried), 2 to extract" in p.stdout and "2 videos failed (" in p.stdout
    # one good video: success, and the broken ones are still listed
    shutil.copy(video_dir / "grey.mp4", vids / "grey.mp4")
    p = _run_cli(*argv)
    assert p.returncode == 0 and "error" not in p.stderr, p.stderr
    assert "1 to extract" in p.stdout and "2 videos failed in an earlier run and were skipped" in p.stdout


@needs_ffmpeg
def test_synthetic_videos_folder_inside_out_survives(tmp_path):
    # the dataset is built next to --out and then replaces it: a --videos folder inside --out must end up there
    import synthetic
    small = dict(seed=3, num_train=2, test_single=1, test_double=0, val_single=1, val_double=0, verbose=False,
                 num_frames=4, frame_size=16)
    out, inside, outside = tmp_path / "syn", tmp_path / "syn" / "mp4", tmp_path / "mp4"
    for _ in range(2):  # the second run replaces a dataset that already holds the videos
        synthetic.prepare_synthetic(str(out), videos=str(inside), **small)
        assert sorted(p.name for p in inside.iterdir()) == sorted(f"{s}0000{i}.mp4" for s in ("test", "train", "val")
                                                                  for i in (0, 1))
        assert (out / "frames.lmdb").is_dir() and (out / "test.jsonl").is_file() and not (tmp_path / "syn.tmp").exists()
    synthetic.prepare_synthetic(str(tmp_path / "other"), videos=str(outside), **small)
    assert sorted(p.name for p in outside.iterdir()) == sorted(p.name for p in inside.iterdir())
    assert framestore.probe_video(str(inside / "val00001.mp4"))["nb_frames"] == 4

def test_cli_refuses_unknown_options_and_commands(capsys):
    with pytest.raises(SystemExit, match="unknown config key 'frames'"):
        prepare.main(["frames", "--videos=x", "--out=y", "--frames=30"])
    with pytest.raises(SystemExit, match="unknown command"):
        prepare.main(["msvd"])
    with pytest.raises(SystemExit, match="needs --videos"):
        prepare.main(["frames", "--out=y"])
    with pytest.raises(SystemExit, match="workers expects int"):
        prepare.main(["frames", "--videos=x", "--out=y", "--workers=many"])
    prepare.main([])
    assert "msrvtt" in capsys.readouterr().out


def _run_cli(*args):
    return subprocess.run([sys.executable, "prepare.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_cli_help_lists_commands_and_options():
    p = _run_cli()
    assert p.returncode == 0 and all(cmd in p.stdout for cmd in prepare.COMMANDS)
    p = _run_cli("frames", "--help")
    assert p.returncode == 0
    line = next(l for l in p.stdout.splitlines() if "--num_frames=30" in l)
    assert prepare.COMMANDS["frames"][2]["num_frames"][1] in line  # its description, on the same line


@pytest.mark.slow
@pytest.mark.parametrize("args, option", [(["--videos=x", "--out=y", "--num_frame=8"], "num_frame"),
                                          (["--out=y"], "--videos")])
def test_cli_error_is_one_line_naming_the_option(args, option):
    p = _run_cli("frames", *args)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and option in errors[0], p.stderr
    assert p.stderr.strip().splitlines()[-1] == errors[0]  # nothing after it (no usage dump, no traceback)


def test_cli_passes_options_to_extract_frames(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(prepare, "extract_frames", lambda *a, **kw: calls.append((a, kw)) or
                        {"done": 1, "failed": {}, "failed_before": {}, "skipped": 0, "stored": 1})
    prepare.main(["frames", "--videos=v", f"--out={tmp_path}/f.lmdb", "--retry_failed", "--ids=2024",
                  "--quality=80", "--id_prefix=Video"])
    (args, kw), = calls
    assert args == ("v", f"{tmp_path}/f.lmdb")
    assert kw == dict(num_frames=30, frame_size=224, workers=8, ids="2024", retry_failed=True, quality=80,
                      id_prefix="Video", square=False)  # a path stays the text typed, even when it reads as a number


def test_cli_defaults_are_the_functions_defaults():
    import synthetic
    targets = {"frames": framestore.extract_frames, "msrvtt": prepare.convert_msrvtt, "vatex": prepare.convert_vatex,
               "chvtt": prepare.convert_chvtt, "synthetic": synthetic.prepare_synthetic}
    renamed = {"frames": {"videos": "videos_dir", "out": "out_path"}}
    for cmd, fn in targets.items():
        params = inspect.signature(fn).parameters
        for key, (default, description) in prepare.COMMANDS[cmd][2].items():
            p = params[renamed.get(cmd, {}).get(key, key)]
            assert description and (p.default is p.empty if "(required)" in description else p.default == default), \
                (cmd, key)
        assert set(params) - {"progress_every"} == {renamed.get(cmd, {}).get(k, k) for k in prepare.COMMANDS[cmd][2]}


def test_synthetic_command_writes_the_dataset(tmp_path):
    import synthetic
    small = dict(seed=3, num_train=4, test_single=1, test_double=0, val_single=1, val_double=0, verbose=False)
    synthetic.prepare_synthetic(str(tmp_path / "a"), **small)
    prepare.main(["synthetic", f"--out={tmp_path / 'b'}", *(f"--{k}={v}" for k, v in small.items())])
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "vocab.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a, b = (framestore.FrameDB(str(tmp_path / d / "frames.lmdb")) for d in ("a", "b"))
    assert len(a) == len(b) == 8
    assert all(a.get_frames(v, range(8)) == b.get_frames(v, range(8)) for v in a.video_ids())
    a.close(), b.close()


def _synthetic_digest(out: str) -> str:
    h = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "vocab.txt"):
        h.update(open(os.path.join(out, name), "rb").read())
    db = framestore.FrameDB(os.path.join(out, "frames.lmdb"))
    for v in sorted(db.video_ids()):
        h.update(v.encode())
        for frame in db.get_frames(v, range(8)):
            h.update(frame)
    db.close()
    return h.hexdigest()


SMALL = dict(seed=3, num_train=8, p_two=0.5, test_single=2, test_double=1, val_single=1, val_double=0, verbose=False)


def test_synthetic_is_the_same_as_before_titles(tmp_path):
    # the default run's data: these bytes (jsonl files, vocab.txt and every stored frame) were written by the
    # generator before pre-training titles existed, so the default run's numbers stand
    from synthetic import prepare_synthetic
    assert _synthetic_digest(prepare_synthetic(str(tmp_path / "s"), **SMALL)) == \
        "0dd7fea655d02e5d9e45468cdcc38d261c2c2a47144eb15d39d8a31e1272ffe6"


def _records(folder) -> dict:
    return {split: [json.loads(line) for line in open(os.path.join(folder, f"{split}.jsonl"), encoding="utf-8")]
            for split in ("train", "val", "test")}


def _facts(caption: str) -> list[tuple]:
    """(colour, shape, directions) of each object an English full caption names."""
    return [(c, s, tuple(d.split(", then "))) for c, s, d in
            re.findall(r"a (\w+) (\w+) moves ((?:left|right|up|down)(?:, then (?:left|right|up|down))?)(?!\w)",
                       caption)]


@pytest.fixture(scope="module")
def titled(tmp_path_factory):
    from synthetic import prepare_synthetic
    root = tmp_path_factory.mktemp("titles")
    kw = dict(seed=2, num_train=160, p_two=0.3, test_single=3, test_double=1, val_single=1, val_double=0,
              verbose=False)
    return {"with": prepare_synthetic(str(root / "with"), titles=True, **kw),
            "again": prepare_synthetic(str(root / "again"), titles=True, **kw),
            "without": prepare_synthetic(str(root / "without"), **kw),
            "seed5": prepare_synthetic(str(root / "seed5"), titles=True, **{**kw, "seed": 5})}


def test_pretrain_titles_say_less_than_captions(titled):
    from synthetic import _SYN_COLOURS, _SYN_DIRECTIONS, _SYN_SHAPES
    zh = {**{k: v[1] for k, v in _SYN_COLOURS.items()}, **_SYN_SHAPES, **{k: v[1] for k, v in _SYN_DIRECTIONS.items()}}
    directions = set(_SYN_DIRECTIONS)
    plain, titled_records = _records(titled["without"]), _records(titled["with"])
    captions = {c for split in plain.values() for r in split for c in r["captions"] + r["captions_zh"]}
    kinds = {"turn": 0, "straight": 0, "two": 0}
    for split in ("train", "val", "test"):
        assert len(titled_records[split]) == len(plain[split])
        for r, p in zip(titled_records[split], plain[split]):
            # the full text moves aside unchanged: the same videos, the same captions as without titles
            assert (r["captions_full"], r["captions_full_zh"], r["tags_full"], r["tags_full_zh"]) == \
                (p["captions"], p["captions_zh"], p["tags"], p["tags_zh"])
            (title,), (title_zh,), (caption,) = r["captions"], r["captions_zh"], p["captions"]
            assert title not in captions and title_zh not in captions  # never any caption of the set
            facts = _facts(caption)
            assert " then ".join(f"a {c} {s} moves {', then '.join(m)}" for c, s, m in facts) == \
                caption.replace(", then a", " then a")  # the parse covers the whole caption
            named = re.findall(r"\w+", title)
            said = [w for w in named if w in directions]
            if len(facts) == 1 and len(facts[0][2]) == 2:  # a turn: its first direction, never the second
                (c, s, (first, second)), = facts
                kinds["turn"] += 1
                assert said == [first] and title == f"a {c} {s} moves {first}, then"
                assert title_zh == f"{zh[c]}{zh[s]}{zh[first]}移动，然后" and zh[second] not in title_zh
            elif len(facts) == 1:  # straight: the object alone
                (c, s, _), = facts
                kinds["straight"] += 1
                assert said == [] and title == f"a {c} {s}" and title_zh == zh[c] + zh[s]
            else:  # two objects: both, in either order, neither direction
                kinds["two"] += 1
                names = [f"a {c} {s}" for c, s, _ in facts]
                assert said == [] and title in (" and ".join(names), " and ".join(names[::-1]))
                names_zh = [zh[c] + zh[s] for c, s, _ in facts]
                assert title_zh in ("，".join(names_zh), "，".join(names_zh[::-1]))
                assert (title == " and ".join(names)) == (title_zh == "，".join(names_zh))
            # fewer facts than the caption: colours, shapes and directions named
            assert len([w for w in named if w in zh]) < sum(2 + len(m) for _, _, m in facts)
            # tags: loose nouns, at least one, no direction; the Chinese ones translate the English ones
            words = [w for c, s, _ in facts for w in (c, s)]
            assert 1 <= len(r["tags"]) <= len(words) and not set(r["tags"]) & directions
            assert all(r["tags"].count(w) <= words.count(w) for w in r["tags"])
            assert r["tags_zh"] == [zh[w] for w in r["tags"]]
    assert all(kinds.values()), kinds  # every rule was exercised
    words = [[w for c, s, _ in _facts(r["captions_full"][0]) for w in (c, s)] for r in titled_records["train"]]
    tags = [r["tags"] for r in titled_records["train"]]
    assert any(len(t) < len(w) for t, w in zip(tags, words))  # some dropped
    assert any(t != w and sorted(t) == sorted(w) for t, w in zip(tags, words))  # some whole but shuffled


def test_pretrain_titles_are_deterministic_and_keep_the_videos(titled):
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "vocab.txt"):
        assert (Path(titled["with"]) / name).read_bytes() == (Path(titled["again"]) / name).read_bytes()
    assert (Path(titled["with"]) / "vocab.txt").read_bytes() == (Path(titled["without"]) / "vocab.txt").read_bytes()
    assert _records(titled["with"])["train"] != _records(titled["seed5"])["train"]
    a, b = (framestore.FrameDB(os.path.join(titled[k], "frames.lmdb")) for k in ("with", "without"))
    assert sorted(a.video_ids()) == sorted(b.video_ids())
    assert all(a.get_frames(v, range(8)) == b.get_frames(v, range(8)) for v in a.video_ids())
    a.close(), b.close()


def _queue_copies(texts: list, queue_size: int) -> float:
    """Mean copies of a video's own text among `queue_size` random others (the queue's false negatives)."""
    n = len(texts)
    return queue_size * sum(k * (k - 1) for k in Counter(texts).values()) / (n * (n - 1))


def test_built_in_pretrain_titles_never_a_test_caption_and_their_copies_in_a_queue(tmp_path):
    # docs/results.md, "The paper's long queue", quotes this test's figures
    import synthetic
    # 4 texts, a queue of 3 of the other three: "a" finds its twin with probability 1, the others never
    assert _queue_copies(["a", "a", "b", "c"], 3) == pytest.approx(0.5)
    # the test split is the first draw of the seed: num_train=0 writes the built-in set's test split
    fine = _records(synthetic.prepare_synthetic(str(tmp_path / "fine"), **{**synthetic.BUILT_IN["synthetic"],
                                                "num_train": 0, "verbose": False}))["test"]
    pre = _records(synthetic.prepare_synthetic(str(tmp_path / "pre"), **synthetic.BUILT_IN["synthetic_pretrain"],
                                               verbose=False))
    for lang in ("", "_zh"):  # no title of the pre-training set is a test caption, in English or Chinese
        test = {r["captions" + lang][0] for r in fine}
        assert len(test) == 204 and not test & {r["captions" + lang][0] for split in pre.values() for r in split}
    titles = [r["captions_zh"][0] for r in pre["train"]]
    full = [r["captions_full_zh"][0] for r in pre["train"]]
    assert len(titles) == 12000 and len(set(titles)) == 285 and len(set(full)) == 1596
    # the data are a function of the seed, so the figures are exact: the tolerance is their rounding here
    assert _queue_copies(titles, 1024) == pytest.approx(11.22, abs=0.005)
    assert _queue_copies(full, 1024) == pytest.approx(4.11, abs=0.005)


# ---------------------------------------------------------------------------------------------------------------
# annotation converters on small files in the real formats

def _read(path):
    return [json.loads(l) for l in open(path, encoding="utf-8")]


def test_msrvtt_converter(tmp_path, capsys):
    anno = tmp_path / "msrvtt_data"
    anno.mkdir()
    sentences = [{"caption": f"video {v} caption {k}", "video_id": f"video{v}", "sen_id": 10 * v + k}
                 for v in range(6) for k in range(3)]
    sentences.append({"caption": "   ", "video_id": "video0", "sen_id": 999})
    videos = [{"video_id": f"video{v}", "start time": 1.5, "end time": 11.5, "split": "train"} for v in range(6)]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    (anno / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\nvideo3\n")
    (anno / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\nvideo1\n")
    with open(anno / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "key", "vid_key", "video_id", "sentence"])
        w.writerow([0, "ret0", "msr4", "video4", "a man is talking"])
        w.writerow([1, "ret1", "msr5", "video5", "a cat, jumping"])
    out = tmp_path / "msrvtt"
    # frames for every video but video3 and video5: those are reported and left out
    db = framestore.FrameDB(str(out / "frames.lmdb"), readonly=False, num_frames=2, frame_size=8)
    for v in (0, 1, 2, 4):
        db.put_video(f"video{v}", [b"a", b"b"])
    db.close()
    prepare.main(["msrvtt", f"--anno={anno}", f"--out={out}"])
    log = capsys.readouterr().out
    train = _read(out / "train_9k.jsonl")
    assert [r["video_id"] for r in train] == ["video0", "video1", "video2"]
    assert train[1] == {"video_id": "video1", "captions": [f"video 1 caption {k}" for k in range(3)],
                        "duration": 10.0}
    assert _read(out / "train.jsonl") == train and len(_read(out / "train_7k.jsonl")) == 2
    assert _read(out / "test.jsonl") == [{"video_id": "video4", "captions": ["a man is talking"], "duration": 10.0}]
    assert "video3" in log and "video5" in log and "dropped 1 empty" in log
    # the 7k list is optional in --anno, not when named
    (anno / "MSRVTT_train.7k.csv").unlink()
    summary = prepare.convert_msrvtt(str(anno), out=str(tmp_path / "no7k"))
    assert set(summary) == {"train_9k", "train", "test"} and not (tmp_path / "no7k" / "train_7k.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="msrvtt: split file"):
        prepare.convert_msrvtt(str(anno), train_7k=str(anno / "MSRVTT_train.7k.csv"), out=str(tmp_path / "x"))


def test_vatex_converter_both_formats(tmp_path, capsys):
    ids = [f"vid{k}_000001_000011" for k in range(5)]
    split_dir = tmp_path / "vatex_txt"
    split_dir.mkdir()
    (split_dir / "train_list.txt").write_text("\n".join(ids[:3] + ["uncaptioned"]) + "\n")
    (split_dir / "val_list.txt").write_text(ids[3] + "\n")
    (split_dir / "test_list.txt").write_text(ids[4] + "\n")
    caps = {v: {"enCap": [f"en {v} {k}" for k in range(2)], "chCap": [f"中文 {v} {k}" for k in range(2)]}
            for v in ids}
    (tmp_path / "vatex_data.json").write_text(json.dumps({**caps, "uncaptioned": {"enCap": [" "]}}))
    out1 = tmp_path / "a"
    prepare.convert_vatex(str(tmp_path / "vatex_data.json"), str(split_dir), out=str(out1))
    log = capsys.readouterr().out  # a listed video whose captions are all empty is left out and counted
    assert "1 ids of" in log and "dropped 1 empty captions" in log and "dropped 1 videos without any caption" in log
    # the official files: lists of {videoID, enCap, chCap}, train and validation separate
    official = [{"videoID": v, **c} for v, c in caps.items()]
    (tmp_path / "train.json").write_text(json.dumps(official[:3], ensure_ascii=False))
    (tmp_path / "val.json").write_text(json.dumps(official[3:], ensure_ascii=False))
    out2 = tmp_path / "b"
    prepare.main(["vatex", f"--annotations={tmp_path / 'train.json'},{tmp_path / 'val.json'}",
                  f"--splits_dir={split_dir}", f"--out={out2}"])
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        a, b = _read(out1 / f"{split}.jsonl"), _read(out2 / f"{split}.jsonl")
        assert a == b and len(a) == n
    assert _read(out1 / "test.jsonl")[0] == {"video_id": ids[4], "captions": [f"en {ids[4]} 0", f"en {ids[4]} 1"],
                                             "captions_zh": [f"中文 {ids[4]} 0", f"中文 {ids[4]} 1"]}


def test_chvtt_converter_reports_bad_lines(tmp_path, capsys):
    lines = [json.dumps({"docid": 101, "title": "猫在跳舞", "tag": "猫,宠物，搞笑", "title_eng": "a cat dances",
                         "tag_eng": "cat,pet", "duration": 12.5}, ensure_ascii=False),
             "{not json",
             json.dumps({"docid": 102, "title": "", "tag": "x"}),
             json.dumps({"docid": 103, "title": "做饭", "tag": ["美食", "厨房"], "duration": "7"}, ensure_ascii=False)]
    src = tmp_path / "chvtt.json"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare.main(["chvtt", f"--annotations={src}", f"--out={tmp_path / 'chvtt'}"])
    log = capsys.readouterr().out
    recs = _read(tmp_path / "chvtt" / "train.jsonl")
    # the raw tag string, separators and all, as the original tokenized it
    assert recs[0] == {"video_id": "Video101", "captions": ["猫在跳舞"], "tags": "猫,宠物，搞笑",
                       "captions_en": ["a cat dances"], "tags_en": "cat,pet", "duration": 12.5}
    assert recs[1] == {"video_id": "Video103", "captions": ["做饭"], "tags": "美食,厨房", "duration": 7.0}
    assert "chvtt.json:2: invalid JSON" in log and "1 videos without any caption" in log


def test_chvtt_tags_reach_the_tokenizer_raw_and_empty_when_missing(tmp_path):
    # the original tokenized the raw tag string and gave a video without tags an empty tag ([CLS][SEP]); data with no
    # tag field at all (VATEX pre-training) uses the caption, as the original's VATEX loader
    src = tmp_path / "chvtt.json"
    src.write_text("\n".join(json.dumps(d) for d in (
        {"docid": 1, "title": "t1", "tag": "x", "title_eng": "a cat dances", "tag_eng": "cat,pet"},
        {"docid": 2, "title": "t2", "tag": "", "title_eng": "a dog runs"})) + "\n", encoding="utf-8")
    root = tmp_path / "chvtt"
    prepare.main(["chvtt", f"--annotations={src}", f"--out={root}"])
    db = framestore.FrameDB(str(root / "frames.lmdb"), readonly=False, num_frames=4, frame_size=32)
    for vid in ("Video1", "Video2"):
        db.put_video(vid, [_jpeg(np.full((32, 32, 3), 10 * i, np.uint8)) for i in range(4)])
    db.close()
    tok = get_tokenizer("clip")
    pre = prepare.VideoTextDataset(str(root), "train", tok, mode="pretrain", num_frames=4, image_size=32,
                                   context_length=8, tag_context_length=6, caption_field="captions_en")
    want = {i: tok([t], 6)[0][0].tolist() for i, t in enumerate(("cat,pet", ""))}
    assert pre[0]["tag_ids"].tolist() == want[0] != tok(["cat pet"], 6)[0][0].tolist()  # the comma is a token
    assert pre[1]["tag_ids"].tolist() == want[1] == [tok.sot_id, tok.eot_id, 0, 0, 0, 0]
    untagged = _make_dataset(tmp_path / "vatex", n_videos=2, tags=False)
    item = prepare.VideoTextDataset(str(untagged), "train", tok, mode="pretrain", num_frames=4, image_size=32,
                                    context_length=8, tag_context_length=8)[0]
    assert torch.equal(item["tag_ids"], item["ids"])
