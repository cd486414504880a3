# Tests for search.py: the index of a folder of real video files, ranking, the command line and the query warnings. The search page's server is tested in test_serve.py.
import json
import os
import subprocess

import pytest
import torch

import model as hmmc_model
import framestore
import prepare
import search
from tokenizer import BertTokenizer
from test_eval import S, T, _frames, _tok, trained  # noqa: F401 (trained is a fixture)


def _run_main(argv, capsys):
    result = search.main(argv)
    return result, capsys.readouterr().out


def _hits(text):
    """The `rank video_id score` lines of search output (other lines may come first)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            try:
                out.append((int(parts[0]), parts[1], float(parts[2])))
            except ValueError:
                pass
    return out


def _write_mp4(path, frames, fps=8):
    h, w, _ = frames[0].shape
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r",
           str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", path]
    subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), check=True, capture_output=True, timeout=120)


FOLDER_COLOURS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder of four coloured mp4s, searched with --index_dir (the folder stays as it is)."""
    videos = tmp_path_factory.mktemp("clips")
    for i, c in enumerate(FOLDER_COLOURS):
        _write_mp4(str(videos / f"clip_{c}.mp4"), _frames(c, n=12, size=48, seed=10 + i))
    return videos


@pytest.mark.needs("ffmpeg", "ffprobe")
def test_search_video_folder_with_broken_files(trained, tmp_path, capsys):
    path, _, _ = trained
    videos = tmp_path / "my videos"
    videos.mkdir()
    for i, c in enumerate(FOLDER_COLOURS):  # a few real mp4s: ffmpeg is slow on a shared CI machine
        _write_mp4(str(videos / f"clip_{c}.mp4"), _frames(c, n=12, size=48, seed=10 + i))
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    good = (videos / "clip_red.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(good[:len(good) // 3])
    (videos / "notes.txt").write_text("not a video")
    base = [f"--init_from={path}", f"--videos={videos}", "--num_workers=0", "--device=cpu", "--frames_per_video=6",
            "--extract_workers=2"]
    results, text = _run_main(base + ["--query=a blue screen", "--top=3"], capsys)
    assert "skipped" in text and "broken" in text  # broken files are listed, not fatal
    hits = _hits(text)
    assert len(hits) == 3 and hits[0][1] == "clip_blue"
    assert all(h[1] not in ("broken", "notes") for h in hits)
    assert os.path.isdir(videos / ".hmmc_index")  # the cache lives with the videos

    net = hmmc_model.load_model(path)[0].eval()
    index = _index(net, videos)  # the cached index the search used
    assert "broken" in index["skipped"] and "Invalid data" in index["skipped"]["broken"]  # and why
    assert "notes" not in index["skipped"]
    for hit in results:
        frames = search.hit_frames(hit, index["positions"], index["durations"][hit["video_id"]], index["stored_frames"])
        assert len(frames) == T and sum(f["top"] for f in frames) == 2  # top-2 (checkpoint) highlighted
        # each frame's time: stored frame p of 6 is the centre of segment p of the 1.5 s video (12 frames at 8 fps)
        want = [(p + 0.5) * 1.5 / 6 for p in prepare.sample_frame_indices(6, T)]
        assert [f["time"] for f in frames] == pytest.approx(want, abs=0.051), frames

    # a second query does not extract or encode again
    _, text = _run_main(base + ["--query=a green screen", "--top=2"], capsys)
    assert "loaded the index" in text and "extracting" not in text
    assert _hits(text)[0][1] == "clip_green"


def test_search_bad_input(trained, tmp_path, capsys):
    path, data_dir, _ = trained
    base = [f"--init_from={path}", "--num_workers=0", "--device=cpu"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        search.main(base + [f"--videos={tmp_path / 'missing'}", "--query=red"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to index"):
        search.main(base + [f"--videos={empty}", "--query=red"])
    # a prepared dataset (frames.lmdb, no video files) is eval.py's to evaluate
    with pytest.raises(ValueError, match=r"no video files in this folder, nothing to index \(search.py indexes video "
                                         r"files; a prepared dataset is evaluated with eval.py --data_dir="):
        search.main(base + [f"--videos={data_dir}", "--query=red", f"--index_dir={tmp_path / 'p'}"])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        search.main(base + [f"--videos={data_dir}", "--query=   ", f"--index_dir={tmp_path / 'i'}"])
    assert not os.path.exists(tmp_path / "i")  # refused before any work
    for bad in ("", " \n "):
        with pytest.raises(ValueError, match="tokenizes to nothing"):
            search._check_query(bad, _tok())
    # Chinese (WordPiece): a query made only of characters the vocabulary lacks is all [UNK], i.e. nothing
    vocab = os.path.join(os.path.dirname(__file__), "golden", "tok_bert_vocab.txt")
    if os.path.exists(vocab):
        bert = BertTokenizer(vocab)
        with pytest.raises(ValueError, match="tokenizes to nothing"):
            search._check_query("☃☃ ☃", bert)
        search._check_query("红色", bert)  # partly known is fine
    net = hmmc_model.load_model(path)[0].eval()
    index = {"video_ids": [], "video_emb": torch.zeros(0, 32), "frame_emb": torch.zeros(0, T, 32)}
    with pytest.raises(ValueError, match="empty"):
        search.search_index(net, index, ["a red screen"], tokenizer=_tok(), context_length=16,
                        top_k_frames=2, frame_match_weight=1.0)


# ----------------------------------------------------------------------------- search: a changing folder of videos

def _index(net, videos, **kw):
    return search.build_index(net, str(videos), cache_dir=str(videos / ".hmmc_index"), model_key="tiny", num_frames=T,
                          image_size=S, frames_per_video=6, extract_workers=2, **kw)


def _rows(index):
    return {v: (index["video_emb"][i], index["frame_emb"][i]) for i, v in enumerate(index["video_ids"])}


@pytest.mark.needs("ffmpeg", "ffprobe")
def test_search_index_follows_changed_files(trained, tmp_path, capsys):
    path, _, _ = trained
    net = hmmc_model.load_model(path)[0].eval()
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    for i, c in enumerate(("red", "green", "blue")):
        _write_mp4(str(videos / f"clip_{c}.mp4"), _frames(c, n=12, size=48, seed=20 + i))
    _write_mp4(str(videos / "sub" / "clip_green.MP4"), _frames("purple", n=12, size=48, seed=23))  # same stem
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (videos / "broken2.mp4").write_bytes(b"not a video either")
    first = _index(net, videos)
    ids = ["clip_blue", "clip_green", "clip_red", "sub/clip_green"]  # a subfolder's file keeps its own id
    assert first["video_ids"] == ids and sorted(first["encoded"]) == ids and sorted(first["extracted"]) == ids
    assert set(first["skipped"]) == {"broken", "broken2"}
    blue = search.search_index(net, first, ["a blue screen"], tokenizer=_tok(), context_length=16, top_k_frames=2,
                           frame_match_weight=1.0, top=4)[0]
    assert blue[0]["video_id"] == "clip_blue"
    with framestore.FrameDB(first["lmdb"]) as db:
        red_frames = db.get_frames("clip_red", range(6))

    # clip_red becomes a blue video (same name), broken.mp4 a good one, clip_green is touched (same bytes)
    new = str(tmp_path / "new.mp4")
    _write_mp4(new, _frames("blue", n=12, size=48, seed=30))
    os.replace(new, videos / "clip_red.mp4")
    _write_mp4(str(videos / "broken.mp4"), _frames("yellow", n=12, size=48, seed=31))
    os.utime(videos / "clip_green.mp4", ns=(1, 1))
    capsys.readouterr()
    second = _index(net, videos)
    assert sorted(second["extracted"]) == ["broken", "clip_red"]  # not the touched file, not the unchanged failure
    assert sorted(second["encoded"]) == ["broken", "clip_red"]
    assert second["video_ids"] == ["broken"] + ids and set(second["skipped"]) == {"broken2"}
    before, after = _rows(first), _rows(second)
    for v in ("clip_blue", "clip_green", "sub/clip_green"):  # reused, bit for bit
        assert torch.equal(after[v][0], before[v][0]) and torch.equal(after[v][1], before[v][1])
    assert not torch.allclose(after["clip_red"][0], before["clip_red"][0])
    with framestore.FrameDB(second["lmdb"]) as db:
        assert db.get_frames("clip_red", range(6)) != red_frames
        assert db.has_video("broken")
    hits = search.search_index(net, second, ["a blue screen"], tokenizer=_tok(), context_length=16, top_k_frames=2,
                           frame_match_weight=1.0, top=5)[0]
    score = {h["video_id"]: h["score"] for h in hits}
    old_score = {h["video_id"]: h["score"] for h in blue}
    assert score["clip_red"] > old_score["clip_red"] + 1.0  # now blue: it scores like a blue video
    assert {hits[0]["video_id"], hits[1]["video_id"]} == {"clip_blue", "clip_red"}
    text = capsys.readouterr().out
    assert "extracting 6 frames from each of 2 new or changed videos (of 6)" in text
    assert "encoding 2 videos (3 unchanged ones reused)" in text

    # a removed file leaves the index and the frame store; nothing else is redone
    os.remove(videos / "sub" / "clip_green.MP4")
    third = _index(net, videos)
    assert third["video_ids"] == ["broken", "clip_blue", "clip_green", "clip_red"]
    assert third["extracted"] == [] and third["encoded"] == []
    with framestore.FrameDB(third["lmdb"]) as db:
        assert not db.has_video("sub/clip_green")
    # unchanged: nothing to do at all; retry_failed tries the unchanged failure again (and it fails again)
    assert _index(net, videos)["encoded"] == []
    assert "loaded the index of 4 videos" in capsys.readouterr().out
    fourth = _index(net, videos, retry_failed=True)
    assert fourth["extracted"] == [] and set(fourth["skipped"]) == {"broken2"}
    assert "extracting 6 frames from each of 1 new or changed videos" in capsys.readouterr().out


def test_search_ids_are_paths_relative_to_the_folder(tmp_path):
    for name in ("bikes.MP4", "sub/bikes.mp4", "x/a.mp4", "x/a.mkv", "notes.txt", ".hidden.mp4",
                 ".hmmc_index/c.mp4", "frames.lmdb/d.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = search._list_videos(str(tmp_path))
    assert found == {"bikes": str(tmp_path / "bikes.MP4"), "sub/bikes": str(tmp_path / "sub" / "bikes.mp4"),
                     "x/a.mkv": str(tmp_path / "x" / "a.mkv"), "x/a.mp4": str(tmp_path / "x" / "a.mp4")}


# ----------------------------------------------------------------------------- search: options and queries

@pytest.mark.slow
def test_search_top_must_be_positive(trained, tmp_path):
    path, data_dir, _ = trained
    base = [f"--init_from={path}", f"--videos={data_dir}", "--query=a red screen", "--num_workers=0", "--device=cpu",
            f"--index_dir={tmp_path / 'i'}"]
    for top in (0, -1):
        with pytest.raises(ValueError, match=f"^--top={top}: ask for at least one hit per query"):
            search.main(base + [f"--top={top}"])
    assert not os.path.exists(tmp_path / "i")  # refused before any work
    # the script: one `error:` line and exit status 1, no traceback
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([os.sys.executable, os.path.join(root, "search.py"), *base, "--top=-1"], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == ["error: --top=-1: ask for at least one hit per "
                                                                   "query (e.g. --top=5)"], p.stderr


def test_query_warnings():
    tok = _tok()
    assert search.query_warnings("a dog catches a frisbee", tok, 16) == []
    long = "a small brown dog runs across the green park and catches a red frisbee in the air near the lake"
    n = len(tok.encode(long))
    assert n > 14
    want = (f"query {long[:57] + '...'!r} is {n} tokens long; the model reads 16 per caption, so only the first 14 "
            f"were kept")
    assert search.query_warnings(long, tok, 16) == [want]
    ids, mask = tok([long], 16)  # what "kept 14" means: start, the first 14 tokens, end
    assert ids[0].tolist() == [tok.sot_id] + tok.encode(long)[:14] + [tok.eot_id]
    (zh,) = search.query_warnings("红色的屏幕", tok, 16)
    assert "contains cjk text" in zh and "CLIP" in zh
    (emoji,) = search.query_warnings("dog 🐶", tok, 16)
    assert "contains emoji text" in emoji
    vocab = os.path.join(os.path.dirname(__file__), "golden", "tok_bert_vocab.txt")
    if os.path.exists(vocab):
        bert = BertTokenizer(vocab)
        assert search.query_warnings("红色", bert, 32) == []
        (latin,) = search.query_warnings("a red screen", bert, 32)
        assert latin == ("query 'a red screen' contains latin text, which the text encoder (Chinese BERT, trained on "
                         "Chinese) barely knows; its scores will look confident and mean little")


@pytest.mark.needs("ffmpeg", "ffprobe")
def test_search_cli_prints_query_warnings(trained, clips, tmp_path, capsys):
    path, _, _ = trained
    long = "a red screen " * 8
    _, text = _run_main([f"--init_from={path}", f"--videos={clips}", f"--query={long}", "--num_workers=0",
                         "--device=cpu", f"--index_dir={tmp_path / 'i'}", "--top=1", "--frames_per_video=6"], capsys)
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "24 tokens long; the model reads 16 per caption, so only the first 14" in warnings[0]
    assert len(_hits(text)) == 1


def test_every_setting_is_described():
    import configurator
    described = configurator.describe(search.__file__)
    assert [k for k in search.config_keys if not described.get(k)] == []


def test_missing_clip_weights_name_the_download(tmp_path):
    url = ("https://openaipublic.azureedge.net/clip/models/"
           "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
    with pytest.raises(FileNotFoundError, match=f"no CLIP checkpoint at {tmp_path / 'ViT-B-32.pt'}; download "
                                                f"OpenAI's ViT-B/32 weights from {url}$"):
        search.main(["--init_from=clip", f"--clip_path={tmp_path / 'ViT-B-32.pt'}", f"--videos={tmp_path}",
                     "--query=a dog", "--device=cpu"])


def test_words_and_the_training_vocabulary(tmp_path):
    assert search.words("A man, riding a BICYCLE in 2 cities!") == ["a", "man", "riding", "a", "bicycle", "in",
                                                                     "cities"]
    assert search.words("一个人 rides") == ["一", "个", "人", "rides"]  # Chinese: one character per word
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"video_id": "a", "captions": ["a red screen", "The screen is red"]}) + "\n"
                     + json.dumps({"video_id": "b", "title": "x", "captions": "a blue circle"}) + "\n")
    vocab = search.caption_vocabulary(str(jsonl))
    assert vocab == {"a", "red", "screen", "the", "is", "blue", "circle"}
    assert search.training_captions({"data_dir": "d", "train_split": "t", "caption_field": "c"}) == ("d/t.jsonl", "c")
    assert search.training_captions({"dataset": "synthetic"}) == ("data/synthetic/train.jsonl", "captions")
    assert search.training_captions({}) is None  # OpenAI's CLIP: no training captions to compare with
    tok = _tok()
    assert search.query_warnings("the red screen", tok, 16, vocab) == []
    assert search.query_warnings("a blue circle on a bicycle", tok, 16, vocab) == []  # 2 of 5 unknown: not most
    (line,) = search.query_warnings("a man riding a bicycle in the city", tok, 16, vocab)
    assert line.startswith("5 of the 7 words of query 'a man riding a bicycle in the city' never occur in the "
                           "7-word vocabulary of the captions this model was trained on (man, riding, bicycle, in, "
                           "city); its scores will look confident and mean little")


@pytest.mark.needs("ffmpeg", "ffprobe")
def test_search_cli_warns_of_words_the_model_never_saw(trained, clips, tmp_path, capsys):
    path, _, _ = trained
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"]["train_split"] = "test"  # the toy set has one split: its captions stand for the training ones
    own = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, own)
    before = sorted(os.listdir(clips))
    base = [f"--init_from={own}", f"--videos={clips}", "--num_workers=0", "--device=cpu",
            f"--index_dir={tmp_path / 'index'}", "--top=2", "--frames_per_video=6"]
    _, text = _run_main(base + ["--query=a man riding a bicycle in the city"], capsys)
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "never occur in the" in warnings[0] and "(man, riding, bicycle" in warnings[0]
    assert len(_hits(text)) == 2  # still answered
    _, text = _run_main(base + ["--query=a red screen"], capsys)
    hits = _hits(text)
    assert "warning:" not in text and hits[0][1] == "clip_red"
    assert [h[0] for h in hits] == [1, 2] and hits[0][2] >= hits[1][2]  # `top` lines, best first
    # --index_dir: nothing is written into the searched folder
    assert sorted(os.listdir(clips)) == before and os.listdir(tmp_path / "index")
