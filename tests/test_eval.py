# Tests for eval.py: retrieval metrics against a brute-force loop, chunked similarity, evaluate(), search + report.
import functools
import io
import json
import math
import os

import numpy as np
import pytest
import torch

import eval as ev
import model as hmmc_model
import framestore
import prepare
from tokenizer import get_tokenizer
import towers


# ----------------------------------------------------------------------------- brute-force reference

def _reference_metrics(sim, video_of_text=None):
    """Plain loops written from the metric definitions; no vectorisation, no shared code with eval.py."""
    sim = [[(-math.inf if math.isnan(x) else float(x)) for x in row] for row in np.asarray(sim).tolist()]
    num_texts, num_videos = len(sim), len(sim[0])
    if video_of_text is None:
        video_of_text = list(range(num_texts))
    video_of_text = [int(v) for v in video_of_text]

    def summary(ranks):
        ranks = sorted(ranks)
        n = len(ranks)
        median = ranks[n // 2] if n % 2 else (ranks[n // 2 - 1] + ranks[n // 2]) / 2
        return {"R1": 100 * sum(r <= 1 for r in ranks) / n, "R5": 100 * sum(r <= 5 for r in ranks) / n,
                "R10": 100 * sum(r <= 10 for r in ranks) / n, "MdR": median, "MnR": sum(ranks) / n}

    t2v = []
    for i in range(num_texts):
        true = sim[i][video_of_text[i]]
        t2v.append(sum(1 for j in range(num_videos) if sim[i][j] >= true))
    groups = {}
    for i, v in enumerate(video_of_text):
        groups.setdefault(v, []).append(i)
    queries = sorted(groups)
    v2t = []
    for q in queries:
        def group_score(g):  # best caption of group g against query video q
            return max(sim[i][q] for i in groups[g])
        true = group_score(q)
        v2t.append(sum(1 for g in queries if group_score(g) >= true))
    return {"t2v": summary(t2v), "v2t": summary(v2t)}


def _assert_same(got, want):
    assert set(got) == {"t2v", "v2t"}
    for direction in ("t2v", "v2t"):
        assert set(got[direction]) == {"R1", "R5", "R10", "MdR", "MnR"}
        for key, value in want[direction].items():
            assert got[direction][key] == pytest.approx(value, abs=1e-9), (direction, key)
            assert isinstance(got[direction][key], float)


# ----------------------------------------------------------------------------- metrics

def test_identity_is_perfect():
    m = ev.retrieval_metrics(np.eye(20))
    for d in ("t2v", "v2t"):
        assert m[d] == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_square_random_matches_reference():
    rng = np.random.default_rng(0)
    for n in (1, 7, 30, 64):
        sim = rng.normal(size=(n, n))
        sim += 1.5 * np.eye(n)  # better than chance, so ranks spread over 1..n
        _assert_same(ev.retrieval_metrics(sim), _reference_metrics(sim))


def test_permuted_rows():
    # text i describes video perm[i]; a similarity that peaks at the right video is perfect in both directions
    rng = np.random.default_rng(1)
    perm = rng.permutation(12)
    sim = rng.normal(size=(12, 12)) * 0.1
    sim[np.arange(12), perm] = 5.0
    m = ev.retrieval_metrics(sim, perm)
    assert m["t2v"]["R1"] == 100.0 and m["v2t"]["R1"] == 100.0
    # without video_of_text the diagonal is taken as the truth, which is now mostly wrong
    assert ev.retrieval_metrics(sim)["t2v"]["R1"] < 100.0


def test_hand_made_ranks():
    # text 0: true video scores 0.5, beaten by one -> rank 2; text 1: rank 1; text 2: beaten by two -> rank 3
    sim = np.array([[0.5, 0.9, 0.1],
                    [0.0, 0.8, 0.3],
                    [0.7, 0.6, 0.2]])
    m = ev.retrieval_metrics(sim)
    assert m["t2v"]["R1"] == pytest.approx(100 / 3)
    assert m["t2v"]["MdR"] == 2.0 and m["t2v"]["MnR"] == 2.0
    # V2T: columns; video 0: 0.5 vs 0.0, 0.7 -> rank 2; video 1: 0.8 vs 0.9, 0.6 -> 2; video 2: 0.2 vs 0.1, 0.3 -> 2
    assert m["v2t"]["R1"] == 0.0 and m["v2t"]["MdR"] == 2.0 and m["v2t"]["MnR"] == 2.0


def test_even_count_median_averages():
    sim = np.array([[1.0, 0.0], [1.0, 0.5]])  # ranks 1 and 2
    assert ev.retrieval_metrics(sim)["t2v"]["MdR"] == 1.5


def test_multi_caption_uneven_groups_matches_reference():
    rng = np.random.default_rng(2)
    num_videos = 25
    counts = rng.integers(1, 6, size=num_videos)  # 1..5 captions per video
    video_of_text = np.repeat(np.arange(num_videos), counts)
    rng.shuffle(video_of_text)  # captions need not be ordered by video
    sim = rng.normal(size=(len(video_of_text), num_videos))
    sim[np.arange(len(video_of_text)), video_of_text] += 1.0
    _assert_same(ev.retrieval_metrics(sim, video_of_text), _reference_metrics(sim, video_of_text))


def test_multi_caption_v2t_uses_best_caption():
    # video 0 has two captions; only the second one matches it well. V2T for video 0 must see that one.
    sim = np.array([[0.1, 0.5],   # caption a of video 0
                    [0.9, 0.0],   # caption b of video 0
                    [0.2, 0.8]])  # caption of video 1
    m = ev.retrieval_metrics(sim, [0, 0, 1])
    assert m["v2t"]["R1"] == 100.0
    assert m["t2v"]["R1"] == pytest.approx(200 / 3)  # caption a prefers video 1


def test_video_without_captions_is_a_candidate_only_for_t2v():
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(6, 4))
    video_of_text = [0, 0, 1, 1, 3, 3]  # video 2 has no caption
    _assert_same(ev.retrieval_metrics(sim, video_of_text), _reference_metrics(sim, video_of_text))


def test_ties_are_pessimistic():
    n = 50
    m = ev.retrieval_metrics(np.zeros((n, n)))
    for d in ("t2v", "v2t"):
        # every candidate ties with the true one: rank n for everybody, never a perfect score
        assert m[d]["R1"] == 0.0 and m[d]["R10"] == 0.0
        assert m[d]["MdR"] == n and m[d]["MnR"] == n
    # partial ties against the reference, multi-caption too
    rng = np.random.default_rng(4)
    sim = rng.integers(0, 3, size=(40, 20)).astype(np.float32)
    video_of_text = np.repeat(np.arange(20), 2)
    _assert_same(ev.retrieval_metrics(sim, video_of_text), _reference_metrics(sim, video_of_text))
    sim = rng.integers(0, 4, size=(15, 15))  # integer input
    _assert_same(ev.retrieval_metrics(sim), _reference_metrics(sim))


def test_constant_matrix_is_chance_level_in_expectation():
    # a random order of all-equal scores would give 1/n R@1; ties resolved pessimistically put every true match last
    m = ev.retrieval_metrics(np.ones((10, 10)) * 3.0)
    last = {"R1": 0.0, "R5": 0.0, "R10": 100.0, "MdR": 10.0, "MnR": 10.0}
    assert m["t2v"] == last and m["v2t"] == last


def test_nan_counts_as_worst_and_input_untouched():
    rng = np.random.default_rng(5)
    sim = rng.normal(size=(8, 8)) + 3 * np.eye(8)
    sim[0, 0] = np.nan  # true score missing: worst rank, not dropped
    sim[1, 5] = np.nan  # a NaN competitor never beats anybody
    before = sim.copy()
    m = ev.retrieval_metrics(sim)
    _assert_same(m, _reference_metrics(sim))
    assert np.array_equal(np.isnan(sim), np.isnan(before)) and np.allclose(np.nan_to_num(sim), np.nan_to_num(before))
    assert m["t2v"]["MnR"] == pytest.approx((8 + 7) / 8)


def test_input_not_modified_and_accepts_torch():
    rng = np.random.default_rng(6)
    sim = rng.normal(size=(9, 3)).astype(np.float32)
    vot = np.repeat(np.arange(3), 3)
    copy = sim.copy()
    a = ev.retrieval_metrics(sim, vot)
    assert np.array_equal(sim, copy)
    b = ev.retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(vot))
    assert a == b


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="video_of_text"):
        ev.retrieval_metrics(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="entries"):
        ev.retrieval_metrics(np.zeros((4, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="index"):
        ev.retrieval_metrics(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="2-D"):
        ev.retrieval_metrics(np.zeros(3))


def test_equal_groups_match_reference():
    # every video has the same number of captions (VATEX): the V2T maxima take the no-scatter path
    rng = np.random.default_rng(7)
    sim = rng.random(size=(1500, 150), dtype=np.float32)
    vot = np.repeat(np.arange(150), 10)
    _assert_same(ev.retrieval_metrics(sim, vot), _reference_metrics(sim, vot))


def test_dsl_is_sane():
    # evaluate(dsl=True) scores each direction on its own dual-softmax matrix: test_evaluate_applies_dsl
    rng = np.random.default_rng(8)
    sim = rng.normal(size=(30, 30)) + 2 * np.eye(30)
    # the prior is a softmax along one axis: columns of the T2V weights sum to one
    w = ev.dual_softmax(sim, axis=0) / sim
    assert np.allclose(w.sum(axis=0), 1.0)


def test_format_table_layout():
    table = ev.format_table(ev.retrieval_metrics(np.eye(3)), title="x")
    lines = table.splitlines()
    assert lines[1].split() == ["R@1", "R@5", "R@10", "MdR", "MnR"]
    assert lines[2].split()[0] == "T2V" and lines[3].split()[0] == "V2T"


# ----------------------------------------------------------------------------- similarity

def test_hierarchical_similarity_chunked_equals_full_and_loop():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(23, 16, generator=g), dim=-1)
    video = F.normalize(torch.randn(11, 16, generator=g), dim=-1)
    frames = F.normalize(torch.randn(11, 5, 16, generator=g), dim=-1)
    full = hmmc_model.hierarchical_similarity(text, video, frames, 2, 1.0, chunk_size=10_000).numpy()
    chunked = hmmc_model.hierarchical_similarity(text, video, frames, 2, 1.0, chunk_size=4).numpy()
    np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-5)
    ref = np.zeros((23, 11))
    for q in range(23):
        for v in range(11):
            per_frame = sorted((100 * float(text[q] @ frames[v, t]) for t in range(5)), reverse=True)
            ref[q, v] = 100 * float(text[q] @ video[v]) + 1.0 * sum(per_frame[:2]) / 2
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-3)
    video_only = hmmc_model.hierarchical_similarity(text, video, frames, 2, 0.0).numpy()
    np.testing.assert_allclose(video_only, 100 * (text @ video.T).numpy(), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- a tiny trained model on a toy dataset
# Eight videos, each a differently coloured screen with a grey square moving across; caption "a <colour> screen". A
# tiny HMMC trained for a few seconds tells them apart, which is enough to check evaluate(), the CLI and search.

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (235, 220, 30),
           "purple": (140, 40, 180), "orange": (250, 140, 20), "white": (240, 240, 240), "black": (12, 12, 12)}
T_STORED, T, S = 6, 4, 32


def _frames(colour, n=T_STORED, size=S, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = COLOURS[colour]
        x = 2 + t * (size - 10) // max(n - 1, 1)
        img[10:18, x:x + 8] = 128  # a grey square moving right: frames differ, as in a real clip
        img += rng.normal(0, 4, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _jpeg(frame):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def make_dataset(root, captions_per_video=1, colours=tuple(COLOURS)):
    """A prepared dataset folder (frames.lmdb + test.jsonl) through DATA's public writer."""
    os.makedirs(root, exist_ok=True)
    with framestore.FrameDB(os.path.join(root, "frames.lmdb"), readonly=False, num_frames=T_STORED,
                            frame_size=S) as db:
        for i, c in enumerate(colours):
            db.put_video(f"vid_{c}", [_jpeg(f) for f in _frames(c, seed=i)])
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        for c in colours:
            caps = [f"a {c} screen", f"the screen is {c}", f"{c} colour everywhere"][:captions_per_video]
            f.write(json.dumps({"video_id": f"vid_{c}", "captions": caps}) + "\n")
    return root


@functools.lru_cache(maxsize=None)
def _tok():
    return get_tokenizer("clip")  # building the BPE tables takes a moment: once per test session


def tiny_config():
    clip = hmmc_model.CLIPConfig(embed_dim=32, image_resolution=S, vision_layers=1, vision_width=32,
                                 vision_patch_size=16, context_length=16, transformer_width=32, transformer_heads=1,
                                 transformer_layers=1)
    return hmmc_model.HMMCConfig(clip=clip, temporal_layers=1, num_frames=T, max_frames=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, dataset dir): a tiny HMMC trained on the toy set, saved in train.py's checkpoint format."""
    root = tmp_path_factory.mktemp("toy")
    data_dir = make_dataset(str(root / "data"))
    torch.manual_seed(0)
    tok = _tok()
    ds = prepare.VideoTextDataset(data_dir, "test", tok, mode="train", num_frames=T, context_length=16, image_size=S)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    net = hmmc_model.HMMC(tiny_config())
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.0)
    video = batch["video"]  # uint8: the model normalises it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only fight over a shared CPU
    try:
        for step in range(90):
            loss, _ = net({"video": video, "ids": batch["ids"], "mask": batch["mask"]})
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    config = {"dataset": "toy", "data_dir": data_dir, "num_frames": T, "image_size": S, "context_length": 16,
              "top_k_frames": 2, "frame_match_weight": 1.0, "text_encoder": "clip", "caption_field": "captions"}
    ckpt = {"model": net.state_dict(), "model_args": net.cfg.to_dict(), "config": config, "iter_num": 90}
    path = str(root / "ckpt.pt")
    torch.save(ckpt, path)
    return path, data_dir, loss.item()


def _evaluate(net, data_dir, **kw):
    args = dict(tokenizer=_tok(), num_frames=T, image_size=S, context_length=16, top_k_frames=2,
                frame_match_weight=1.0, batch_size=3)
    args.update(kw)
    return ev.evaluate(net, data_dir, "test", **args)


def test_evaluate_trained_model(trained):
    path, data_dir, loss = trained
    net = hmmc_model.load_model(path)[0].eval()
    m = _evaluate(net, data_dir)
    assert m["num_videos"] == 8 and m["num_texts"] == 8 and m["dsl"] is False
    assert m["t2v"]["R1"] >= 75.0, (m, loss)
    assert m["v2t"]["R1"] >= 75.0, (m, loss)
    assert not net.training
    # dual softmax: labelled, and the same counts
    m_dsl = _evaluate(net, data_dir, dsl=True)
    assert m_dsl["dsl"] is True and m_dsl["num_texts"] == 8


def test_evaluate_matches_manual_pipeline(trained, tmp_path):
    # evaluate() == encode by hand + hierarchical_similarity + retrieval_metrics, multi-caption included
    path, _, _ = trained
    data_dir = make_dataset(str(tmp_path / "multi"), captions_per_video=3)
    net = hmmc_model.load_model(path)[0].eval()
    tok = _tok()
    m = _evaluate(net, data_dir, batch_size=5)
    assert m["num_texts"] == 24 and m["num_videos"] == 8
    ds = prepare.VideoTextDataset(data_dir, "test", tok, mode="videos", num_frames=T, context_length=16,
                                  image_size=S)
    ids, mask, vot = ds.caption_tokens()
    with torch.no_grad():
        video = torch.stack([ds[i]["video"] for i in range(len(ds))])
        v, f = net.encode_video(video)
        t = net.encode_text(ids, mask)
        sim = hmmc_model.hierarchical_similarity(t, v, f, top_k=2, frame_match_weight=1.0).numpy()
    want = ev.retrieval_metrics(sim, vot.numpy())
    for d in ("t2v", "v2t"):
        for k in want[d]:
            assert m[d][k] == pytest.approx(want[d][k])


def _by_hand(net, data_dir, frame_match_weight, dsl):
    """Metrics of `net` on data_dir's test split: every step written out, DSL applied to the matrix by hand."""
    ds = prepare.VideoTextDataset(data_dir, "test", _tok(), mode="videos", num_frames=T, context_length=16,
                                  image_size=S)
    ids, mask, vot = ds.caption_tokens()
    with torch.no_grad():
        v, f = net.encode_video(torch.stack([ds[i]["video"] for i in range(len(ds))]))
        sim = hmmc_model.hierarchical_similarity(net.encode_text(ids, mask), v, f, top_k=2,
                                                 frame_match_weight=frame_match_weight).numpy()
    if not dsl:
        return ev.retrieval_metrics(sim, vot.numpy())
    return {"t2v": ev.retrieval_metrics(ev.dual_softmax(sim, axis=0), vot.numpy())["t2v"],
            "v2t": ev.retrieval_metrics(ev.dual_softmax(sim, axis=1), vot.numpy())["v2t"]}


def _same_metrics(got, want):
    for d in ("t2v", "v2t"):
        assert got[d] == pytest.approx(want[d]), d


@pytest.fixture(scope="module")
def untrained_data(tmp_path_factory):
    # an untrained model ranks 3 captions x 8 videos almost at random: DSL and the frame term reorder them
    return make_dataset(str(tmp_path_factory.mktemp("multi") / "data"), captions_per_video=3)


def test_evaluate_applies_dsl(untrained_data):
    torch.manual_seed(3)
    net = hmmc_model.HMMC(tiny_config()).eval()
    plain, dsl = _evaluate(net, untrained_data), _evaluate(net, untrained_data, dsl=True)
    assert (plain["dsl"], dsl["dsl"]) == (False, True)
    want_plain, want_dsl = _by_hand(net, untrained_data, 1.0, False), _by_hand(net, untrained_data, 1.0, True)
    assert (want_plain["t2v"], want_plain["v2t"]) != (want_dsl["t2v"], want_dsl["v2t"])  # DSL does change them
    _same_metrics(plain, want_plain)
    _same_metrics(dsl, want_dsl)


def test_evaluate_scores_without_frames_when_trained_without(untrained_data):
    # a model trained with use_frame_fea=False scores by video similarity alone, whatever frame_match_weight says
    cfg = tiny_config()
    torch.manual_seed(3)
    with_frames = hmmc_model.HMMC(cfg).eval()
    torch.manual_seed(3)
    without = hmmc_model.HMMC(hmmc_model.HMMCConfig.from_dict({**cfg.to_dict(), "use_frame_fea": False})).eval()
    video_only, frames_too = (_by_hand(without, untrained_data, w, False) for w in (0.0, 1.0))
    assert (video_only["t2v"], video_only["v2t"]) != (frames_too["t2v"], frames_too["v2t"])  # the term matters
    got = _evaluate(without, untrained_data, frame_match_weight=1.0)
    assert got["frame_match_weight"] == 0.0
    _same_metrics(got, video_only)
    # the same weights trained with frame features: the frame term counts
    _same_metrics(_evaluate(with_frames, untrained_data, frame_match_weight=1.0),
                  _by_hand(with_frames, untrained_data, 1.0, False))


def _run_main(argv, capsys):
    result = ev.main(argv)
    return result, capsys.readouterr().out


def test_cli_eval_table_and_json(trained, tmp_path, capsys):
    path, data_dir, _ = trained
    out = str(tmp_path / "res.json")
    result, text = _run_main([f"--init_from={path}", "--num_workers=0", "--device=cpu", f"--out={out}"], capsys)
    assert "T2V" in text and "V2T" in text and "R@1" in text and "DSL off" in text
    saved = json.load(open(out))
    assert saved["t2v"] == result["t2v"] and saved["v2t"] == result["v2t"]
    assert saved["checkpoint"] == path and saved["dsl"] is False
    assert saved["config"]["top_k_frames"] == 2  # taken from the checkpoint's training config
    # an override beats the checkpoint's config
    result, _ = _run_main([f"--init_from={path}", "--num_workers=0", "--device=cpu", f"--out={out}",
                           "--top_k_frames=1", "--dsl=True"], capsys)
    assert json.load(open(out))["config"]["top_k_frames"] == 1 and result["dsl"] is True


def test_cli_mismatched_checkpoint(trained, tmp_path):
    path, _, _ = trained
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"].pop(next(iter(ckpt["model"])))
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    bad = str(tmp_path / "bad.pt")
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="missing .*unexpected \\[extra.weight\\]"):
        hmmc_model.load_model(bad)
    torch.save({"foo": 1, "bar": [2]}, bad)
    with pytest.raises(ValueError, match="top-level keys"):
        hmmc_model.load_model(bad)
    with pytest.raises(FileNotFoundError):
        hmmc_model.load_model(str(tmp_path / "nope.pt"))


def _rank_main(rank, world, init_file, path, data_dir, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = hmmc_model.load_model(path)[0].eval()
        queue.put((rank, _evaluate(net, data_dir, batch_size=2)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(trained, tmp_path, capfd):
    """Two gloo ranks shard uneven video and caption lists, gather, and every rank returns exactly the
    single-process metrics; a hang fails the test through the timeout. (Forked, so no second torch import.)"""
    import multiprocessing as mp
    path, _, _ = trained
    data_dir = make_dataset(str(tmp_path / "seven"), captions_per_video=2, colours=tuple(COLOURS)[:7])
    with open(os.path.join(data_dir, "test.jsonl"), "a") as f:  # a video without frames: noticed once, not per rank
        f.write(json.dumps({"video_id": "vid_gone", "captions": ["a gone screen"]}) + "\n")
    capfd.readouterr()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    # the ranks meet through a file: no port to pick and lose to another process before they bind it
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), path, data_dir, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert capfd.readouterr().out.count("1 have no frames in") == 1
    net = hmmc_model.load_model(path)[0].eval()
    single = _evaluate(net, data_dir)
    assert results[0] == results[1]  # the same dict on every rank
    assert results[0]["num_videos"] == 7 and results[0]["num_texts"] == 14
    for d in ("t2v", "v2t"):
        for k, v in single[d].items():
            assert results[0][d][k] == pytest.approx(v), (d, k)


def test_zero_shot_clip_baseline(tmp_path, capsys):
    # --init_from=clip: OpenAI-layout CLIP weights (here a tiny random plain state dict), mean pooling, no temporal
    data_dir = make_dataset(str(tmp_path / "data"))
    clip = towers.CLIP(tiny_config().clip)
    clip_path = str(tmp_path / "tiny_clip.pt")
    torch.save(clip.state_dict(), clip_path)
    out = str(tmp_path / "zs.json")
    result, text = _run_main(["--init_from=clip", f"--clip_path={clip_path}", f"--data_dir={data_dir}",
                              "--num_frames=4", "--context_length=16", "--num_workers=0", "--device=cpu",
                              f"--out={out}"], capsys)
    assert "zero-shot CLIP" in text and result["num_videos"] == 8
    saved = json.load(open(out))
    assert saved["model_args"]["use_temp"] is False and saved["frame_match_weight"] == 0.0  # plain mean pooling
    assert saved["config"]["image_size"] == S  # read off the CLIP weights
    net = hmmc_model.load_model("clip", hmmc_model.HMMCConfig(use_temp=False), clip_path=clip_path)[0]
    torch.testing.assert_close(net.video.visual.conv1.weight, clip.visual.conv1.weight)


def test_every_setting_is_described():
    import configurator
    described = configurator.describe(ev.__file__)
    assert [k for k in ev.config_keys if not described.get(k)] == []


def test_checkpoint_eval_caption_length():
    # a pre-training checkpoint (45-token CHVTT titles) is evaluated at its eval_context_length, not at 45;
    # a checkpoint saved before that setting existed gets the benchmarks' 32; the command line beats both
    cfg = {**{k: getattr(ev, k) for k in ev.config_keys}, "init_from": "ckpt.pt"}
    model_cfg = hmmc_model.HMMCConfig()  # CLIP's 77-token text tower
    assert ev._settings(cfg, model_cfg, {"context_length": 45, "eval_context_length": 40})["context_length"] == 40
    assert ev._settings(cfg, model_cfg, {"context_length": 45})["context_length"] == 32
    assert ev._settings({**cfg, "context_length": 20}, model_cfg, {"context_length": 45})["context_length"] == 20


def test_bert_unk_input_needs_the_bert_text_encoder(trained, tmp_path):
    # the [UNK] ... [UNK] input reproduces the original's Chinese VATEX loader: refused for a CLIP-text checkpoint
    path, _, _ = trained
    with pytest.raises(ValueError, match="bert_unk_input=True"):
        ev.main([f"--init_from={path}", "--num_workers=0", "--device=cpu", "--bert_unk_input=True",
                 f"--out={tmp_path / 'r.json'}"])

