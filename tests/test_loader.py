# The training loader's path: augmentation split between the loader (crop) and the training device (the rest),
# batches written into one tensor, and runs that stay exactly resumable with the augmentation on the device.
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import framestore
import prepare
import train
from conftest import log
from synthetic import prepare_synthetic
from tokenizer import get_tokenizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _jpeg(arr, quality=90):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _textured(rng, h, w):
    """Smooth colour gradients, edges and noise: every step of the augmentation has something to change."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5.0) * 80 + 120, yy * 200.0 / h, (xx > w // 2) * 150 + 50], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """8 videos of 12 JPEG frames at 48x64 (a 4:3 source stored at short side 48)."""
    root = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    with framestore.FrameDB(str(root / "frames.lmdb"), readonly=False, num_frames=12, frame_size=48) as db:
        for v in range(8):
            db.put_video(f"v{v}", [_jpeg(_textured(rng, 48, 64)) for _ in range(12)])
    with open(root / "train.jsonl", "w") as f:
        for v in range(8):
            f.write(json.dumps({"video_id": f"v{v}", "captions": [f"video {v}", f"clip {v}"]}) + "\n")
    return str(root)


def _jitter_matrix(jitter: list, channel_mean: np.ndarray) -> tuple:
    """The colour jitter as the 12-number matrix of Pillow's Image.convert("RGB", matrix)."""
    A, B = prepare._jitter_affine(jitter)
    return tuple(float(v) for row in np.concatenate([A, (B @ channel_mean)[:, None]], axis=1) for v in row)


def pillow_augmentation(img, p: dict, size: int) -> np.ndarray:
    """The reference: the whole augmentation in Pillow after the loader's crop, HWC uint8."""
    img = Image.fromarray(prepare._crop_resize(img, p, size).permute(1, 2, 0).numpy())
    if "jitter" in p:
        mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        img = img.convert("RGB", _jitter_matrix(p["jitter"], mean))
    if p["gray"]:
        img = img.convert("L").convert("RGB")
    if p["blur"] is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=p["blur"]))
    if p["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def pillow_video(ds, index: int) -> torch.Tensor:
    """Item `index` of a mode="videos" dataset augmented wholly in Pillow, from the draws the dataset makes."""
    rng = np.random.default_rng([ds.seed, ds.epoch, index])
    positions = prepare.sample_frame_indices(ds.lmdb_frames, ds.num_frames, ds.frame_sample, rng)
    frames, p = [], None
    with framestore.FrameDB(ds.lmdb_path) as db:
        for buf in db.get_frames(ds.video_ids[index], positions):
            img = prepare._open_jpeg(buf, ds.image_size)
            if p is None or ds.augment == "frame":
                p = prepare._draw_augmentation(rng, *img.size)
            frames.append(pillow_augmentation(img, p, ds.image_size).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(frames))


def test_colour_jitter_matrix_matches_pillow_enhance():
    from PIL import ImageEnhance
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((32, 32, 3)) * 155 + 50).astype(np.uint8))
    mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    for kind, enhance in ((0, ImageEnhance.Brightness), (1, ImageEnhance.Contrast), (2, ImageEnhance.Color)):
        ours = np.asarray(img.convert("RGB", _jitter_matrix([(kind, 1.2)], mean))).astype(int)
        ref = np.asarray(enhance(img).enhance(1.2)).astype(int)
        assert np.abs(ours - ref).max() <= 2, kind
    same = img.convert("RGB", _jitter_matrix([(3, 0.0)], mean))
    assert np.abs(np.asarray(same).astype(int) - np.asarray(img).astype(int)).max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_device_augmentation_matches_the_pillow_reference(textured, device):
    # the same (seed, epoch, index) through both paths: Pillow does everything, or the loader crops and
    # augment_frames does the rest on the device. Grayscale, blur and flip are Pillow's exactly; the colour map
    # rounds a few pixels the other way (observed: at most 1 level apart, in under 0.1% of the values).
    kw = dict(mode="videos", num_frames=12, image_size=32, frame_sample="random", augment="frame", seed=4)
    dev = prepare.VideoTextDataset(textured, "train", **kw)
    seen, diffs = np.zeros(4), []
    for epoch in range(2):
        dev.epoch = epoch
        for i in range(len(dev)):
            want, item = pillow_video(dev, i), dev[i]
            p = item["augment"]
            assert item["video"].shape == want.shape and p.shape == (12, prepare.AUGMENT_PARAMS)
            got = prepare.augment_frames(item["video"].to(device), p.to(device)).cpu()
            assert got.dtype == torch.uint8 and got.shape == want.shape
            diffs.append((got.int() - want.int()).abs())
            jitter = (p[:, :9] != torch.eye(3).flatten()).any(dim=1)
            seen += torch.stack([jitter, p[:, 18] > 0, p[:, 19] > 0, p[:, 20] > 0], 1).sum(0).numpy()
    diff = torch.stack(diffs)
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())
    assert (seen > 0).all(), seen  # jitter, grayscale, blur and flip were all drawn and checked


def test_device_augmentation_steps_one_by_one():
    # each step alone against Pillow on a 224-px frame, blur over the whole range of sigma
    rng = np.random.default_rng(1)
    img = Image.fromarray(_textured(rng, 224, 224))
    base = {"crop": (0, 0, 224, 224), "gray": False, "blur": None, "flip": False}
    cases = [{"jitter": [(k, f) for k, f in zip(rng.permutation(4), (1.3, 0.7, 1.2, 0.05))]}, {"gray": True},
             {"flip": True}] + [{"blur": s} for s in (0.1, 0.5, 1.0, 1.5, 2.0)]
    x = prepare._crop_resize(img, base, 224)
    assert torch.equal(x, torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))  # a whole-frame crop at size
    for case in cases:
        p = {**base, **case}
        want = torch.from_numpy(pillow_augmentation(img, p, 224).transpose(2, 0, 1).copy())
        got = prepare.augment_frames(x, torch.from_numpy(prepare.augment_params(p)).float())
        assert torch.equal(want, x) == (case.get("blur") == 0.1), case  # the step changes the frame (but 0.1 px)
        assert (got.int() - want.int()).abs().max() <= ("jitter" in case), case  # the colour map within a level
    same = prepare.augment_frames(x, torch.from_numpy(prepare.augment_params(base)).float())
    assert torch.equal(same, x)  # nothing drawn: the frame comes back as it was


def test_batches_are_written_into_one_tensor(textured):
    kw = dict(mode="train", num_frames=4, image_size=32, frame_sample="random", augment="frame", seed=1)
    ds = prepare.VideoTextDataset(textured, "train", get_tokenizer("clip"), **kw)
    items = ds.__getitems__([3, 0, 7])
    batch = prepare.collate(items)
    assert batch["video"].data_ptr() == items[0]["video"].data_ptr()  # no copy: the tensor the items were written to
    for k, i in enumerate([3, 0, 7]):
        one = ds[i]
        for key in one:
            assert torch.equal(batch[key][k], one[key]) if torch.is_tensor(one[key]) else batch[key][k] == one[key]
    assert list(batch) == list(ds[0])
    # through worker processes (shared memory), and with torch's default collate, the same batches
    sampler = [[3, 0, 7], [1, 2, 4, 5]]
    ours = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=prepare.collate))
    plain = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0))
    for a, b in zip(ours, plain):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    # items that are not one batch's slots are stacked as usual
    loose = [ds[1], ds[2]]
    assert torch.equal(prepare.collate(loose)["video"], torch.stack([it["video"] for it in loose]))


TINY = ["--embed_dim=32", "--vision_width=32", "--vision_layers=1", "--vision_patch_size=8", "--transformer_width=32",
        "--transformer_heads=1", "--transformer_layers=1", "--temporal_layers=1", "--bert_hidden_size=32",
        "--bert_layers=1", "--bert_heads=1", "--proj_hidden=32", "--image_size=32", "--num_frames=4",
        "--tag_context_length=8", "--eval_batch_size=16", "--num_workers=0", "--device=cpu", "--dtype=float32",
        "--compile=False", "--log_interval=1", "--eval_interval=0"]


def test_pretraining_with_device_augmentation_resumes_exactly(tmp_path):
    data = str(tmp_path / "synthetic")
    prepare_synthetic(data, seed=0, num_train=48, test_single=4, test_double=1, val_single=2, val_double=0,
                      verbose=False)
    common = ["--data_dir=" + data, "--batch_size=8", "--epochs=2", "--seed=5", "--pretrain=True", "--queue_size=16",
              "--text_encoder=bert", "--caption_field=captions_zh", "--bert_pooling=mean", "--context_length=24",
              "--bert_vocab=" + os.path.join(data, "vocab.txt"), "--augment=frame", "--frame_sample=random", *TINY]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(common + [f"--out_dir={straight}", "--max_iters=9"])
    train.main(common + [f"--out_dir={split}", "--max_iters=4"])
    train.main(common + [f"--out_dir={split}", "--max_iters=9", "--init_from=resume"])
    logs = [log(d) for d in (straight, split)]
    assert [r["iter"] for r in logs[1]] == list(range(1, 10))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (straight, split))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # the augmentation ran: without it the same run takes other steps
    train.main([*common, f"--out_dir={tmp_path / 'plain'}", "--max_iters=2", "--augment=none"])
    plain = log(tmp_path / "plain")
    assert plain[1]["loss"] != logs[0][1]["loss"]


def _first_video(data):
    ds = prepare.VideoTextDataset(str(data), "train", mode="videos", num_frames=4, image_size=64)
    video = ds[0]["video"].int()
    ds._db.close()  # the LMDB is written again below
    return video


@pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="ffmpeg not installed")
def test_centre_squares_decode_to_the_centre_crop(tmp_path, capsys):
    # a 16:9 video: the stored centre squares give the frames the centre crop of whole frames gives, less to decode
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=256x144:rate=10:duration=2", "-threads", "1", "-c:v", "libx264", "-qp", "0",
                    str(tmp_path / "wide.mp4")], check=True)
    whole, square = tmp_path / "whole", tmp_path / "square"
    for out, sq in ((whole, False), (square, True)):
        framestore.extract_frames(str(tmp_path), str(out / "frames.lmdb"), num_frames=4, frame_size=64, workers=1,
                                  square=sq, quality=95, progress_every=1e9)
        (out / "train.jsonl").write_text('{"video_id": "wide", "captions": ["a test pattern"]}\n')
    with framestore.FrameDB(str(square / "frames.lmdb")) as db:
        assert db.square and Image.open(io.BytesIO(db.get_frames("wide", [0])[0])).size == (64, 64)
    with framestore.FrameDB(str(whole / "frames.lmdb")) as db:
        assert not db.square and Image.open(io.BytesIO(db.get_frames("wide", [0])[0])).size == (114, 64)
    a, b = (_first_video(d) for d in (whole, square))
    # the same pixels, each through its own JPEG encoding (observed 3.6 levels on average); one pixel off is far worse
    assert (a - b).abs().float().mean() < 5
    assert (a[..., 1:] - b[..., :-1]).abs().float().mean() > 8 and (a[..., :-1] - b[..., 1:]).abs().float().mean() > 8
    with pytest.raises(ValueError, match=r"square.*frames.lmdb|frames.lmdb.*square"):
        framestore.extract_frames(str(tmp_path), str(whole / "frames.lmdb"), num_frames=4, frame_size=64, workers=1,
                                  square=True, progress_every=1e9)
    with pytest.raises(ValueError, match="centre squares.*augment='frame'"):
        prepare.VideoTextDataset(str(square), "train", mode="videos", num_frames=4, image_size=64, augment="frame")
    with pytest.raises(SystemExit):
        prepare.main(["frames", "--help"])
    assert "--square" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_with_device_augmentation_match_one(tmp_path):
    # each rank augments its half of the batch on its device with the parameters drawn from (seed, epoch, index)
    data = str(tmp_path / "synthetic")
    prepare_synthetic(data, seed=0, num_train=48, test_single=4, test_double=1, val_single=2, val_double=0,
                      verbose=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["train.py", "--data_dir=" + data, "--batch_size=8", "--epochs=2", "--max_iters=4", "--augment=frame",
              "--frame_sample=random", "--context_length=16", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    runs = {}
    for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        p = subprocess.run([sys.executable, *launch, *common, f"--out_dir={tmp_path / name}"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        runs[name] = [r["loss"] for r in log(tmp_path / name)]
    assert len(runs["one"]) == 4 and runs["two"] == pytest.approx(runs["one"], rel=1e-4, abs=1e-5)
