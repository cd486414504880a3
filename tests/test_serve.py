# The search page's server (serve.py, started by search.py) over real HTTP on 127.0.0.1: its ranking is
# search.search_index's, it serves the indexed videos and nothing else, escapes file names, refuses bad requests with
# a 4xx, sends its security headers on every answer, drops silent connections, logs one line per request, rescans a
# changed folder in another process while queries keep answering, and stays up under a burst of concurrent queries.
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import model as hmmc_model
import framestore
import search
import serve
from test_eval import S, T, _frames, _tok, trained  # noqa: F401 (trained is a fixture)
from test_search import _write_mp4

pytestmark = pytest.mark.needs("ffmpeg", "ffprobe")  # fails where CI is set and they are missing

COLOURS = ("red", "green", "blue", "yellow")
XSS = "<img src=x onerror=alert(1)>"  # a legal file name on Linux; it must reach the page as text
BAD_NAME = "<svg onload=alert(2)>"  # a broken file (a name cannot hold "/"): listed among the skipped files


def _args(videos):
    """build_index's and search_index's settings, as test_search's searches use them."""
    index_args = dict(cache_dir=str(videos / ".hmmc_index"), model_key="tiny", num_frames=T, image_size=S,
                      frames_per_video=6, extract_workers=2, num_workers=0)
    return index_args, _rank_args()


def _rank_args():
    return dict(tokenizer=_tok(), context_length=16, top_k_frames=2, frame_match_weight=1.0)


def _start(net, videos, **server_args):
    index_args, rank_args = _args(videos)
    server = search.make_server(net, str(videos), index_args=index_args, rank_args=rank_args, host="127.0.0.1",
                                port=0, top=3, checkpoint="ckpt.pt", **{"log": io.StringIO(), **server_args})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server):
    server.shutdown()
    server.search.close()
    server.server_close()


def request(server, path, method="GET", headers=None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    try:
        headers = headers or {}
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def query(server, text, top=None, conn=None):
    params = {"q": text, **({"top": top} if top else {})}
    path = "/api/search?" + urllib.parse.urlencode(params)
    if conn is None:
        status, _, body = request(server, path)
    else:
        conn.request("GET", path)
        r = conn.getresponse()
        status, body = r.status, r.read()
    return status, json.loads(body)


@pytest.fixture(scope="module")
def net(trained):
    return hmmc_model.load_model(trained[0])[0].eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    videos = root / "my videos"
    videos.mkdir()
    for i, c in enumerate(COLOURS):
        _write_mp4(str(videos / f"clip_{c}.mp4"), _frames(c, n=12, size=48, seed=50 + i))
    _write_mp4(str(videos / f"{XSS}.mp4"), _frames("purple", n=12, size=48, seed=55))
    (videos / f"{BAD_NAME}.mp4").write_bytes(b"not a video")
    # a link inside the folder to a video outside it: neither indexed nor served, listed among the skipped files
    _write_mp4(str(root / "outside.mp4"), _frames("white", n=12, size=48, seed=56))
    (videos / "outside.mp4").symlink_to(root / "outside.mp4")
    return videos


@pytest.fixture(scope="module")
def server(net, folder):
    s = _start(net, folder)
    yield s
    _stop(s)


def _reference(net, server, text, top):
    return search.search_index(net, server.search.index, [text], top=top, **_rank_args())[0]


def test_ranking_equals_search_index(net, server):
    n = len(server.search.index["video_ids"])
    assert n == 5  # four colours and the oddly named one; the broken file and the link out are skipped
    firsts = []
    for c in COLOURS:
        status, data = query(server, f"a {c} screen", top=n)
        assert status == 200, data
        want = _reference(net, server, f"a {c} screen", n)
        assert [h["video_id"] for h in data["hits"]] == [h["video_id"] for h in want]
        assert [h["score"] for h in data["hits"]] == [h["score"] for h in want]  # JSON floats round-trip exactly
        assert [h["top_frames"] for h in data["hits"]] == [h["top_frames"] for h in want]
        firsts.append(data["hits"][0]["video_id"])
        for hit in data["hits"]:
            assert len(hit["frames"]) == T and sum(f["top"] for f in hit["frames"]) == 2
            assert [i for i, f in enumerate(hit["frames"]) if f["top"]] == hit["top_frames"]
            best = max(range(T), key=hit["frame_scores"].__getitem__)
            assert hit["start"] == hit["frames"][best]["time"] and 0 < hit["start"] < 1.5  # 12 frames at 8 fps
        assert data["videos"] == n and data["warnings"] == []
    assert sum(f == f"clip_{c}" for f, c in zip(firsts, COLOURS)) >= 3, firsts
    # the page's default number of hits is the server's `top`
    assert len(query(server, "a red screen")[1]["hits"]) == 3


def test_page_names_language_and_escapes_file_names(server, folder):
    status, headers, body = request(server, "/")
    page = body.decode("utf-8")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "English (CLIP text encoder)" in page and "5 videos indexed" in page
    assert '<details class="skipped"><summary>2 file(s) skipped' in page  # folded away, not open
    assert f"<code>outside</code>: {search.LINK_OUT}" in page and str(folder) not in page.split("</h1>", 1)[1]
    assert "&lt;svg onload=alert(2)&gt;" in page  # the broken file, listed as skipped, as text
    assert BAD_NAME not in page and XSS not in page
    # the file named like an <img> tag is an ordinary hit: its id goes out as JSON data (the page sets it as text)
    status, data = query(server, "a purple screen", top=6)
    hit = next(h for h in data["hits"] if h["video_id"] == XSS)
    assert hit["video_url"] == "/video/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"
    status, headers, body = request(server, hit["video_url"])
    assert status == 200 and body == (folder / f"{XSS}.mp4").read_bytes()
    status, headers, body = request(server, hit["frames"][0]["url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"


def test_only_indexed_videos_are_served(server, folder):
    red = (folder / "clip_red.mp4").read_bytes()
    status, headers, body = request(server, "/video/clip_red")
    assert status == 200 and body == red and headers["Content-Type"] == "video/mp4"
    assert headers["Accept-Ranges"] == "bytes"
    absolute = "/video/" + urllib.parse.quote(str(folder / "clip_red.mp4"), safe="")
    attempts = ["/video/../../../../etc/passwd", "/video/..%2F..%2F..%2Fetc%2Fpasswd",
                "/video/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/video/%252e%252e%252fetc%252fpasswd",
                "/video/%2Fetc%2Fpasswd", "/video//etc/passwd", absolute,
                "/video/clip_red.mp4", "/video/.hmmc_index", "/video/outside",  # a link leading out of the folder
                "/../../etc/passwd", "/etc/passwd", "/my%20videos/clip_red.mp4", "/clip_red.mp4",
                "/frame?id=..%2F..%2Fetc%2Fpasswd&p=0", f"/frame?id={urllib.parse.quote(str(folder))}&p=0"]
    for path in attempts:
        status, _, body = request(server, path)
        assert status == 404, (path, status, body[:200])
        assert b"root:" not in body and body[:4] != red[:4]
    # one policy for the link out of the folder: no frames, no file, not searchable; listed as skipped
    assert request(server, "/frame?id=outside&p=0")[0] == 404
    assert "outside" not in server.search.index["video_ids"]
    assert server.search.index["skipped"]["outside"] == search.LINK_OUT


def test_bad_requests_get_a_clear_4xx(server):
    cases = [
        ("/api/search?q=", 400, "empty query"),
        ("/api/search?q=%20%20", 400, "empty query"),
        ("/api/search", 400, "empty query"),
        ("/api/search?" + urllib.parse.urlencode({"q": "red " * 250 + "x"}), 400, "1001 characters long; at most 1000"),
        ("/api/search?q=red&colour=blue", 400, "unknown parameter 'colour'; this address takes q, top"),
        ("/api/search?q=red&q=blue", 400, "parameter 'q' given twice"),
        ("/api/search?q=red&top=0", 400, "top='0': a whole number from 1 to 100"),
        ("/api/search?q=red&top=many", 400, "top='many'"),
        ("/api/search?q=red&top=101", 400, "from 1 to 100"),
        ("/api/search?q=red&top=%C2%B2", 400, "top='\u00b2'"),  # a digit to str.isdigit, not to int()
        ("/api/search?q=red&top=" + "9" * 5000, 400, "a whole number from 1 to 100"),
        ("/api/search?q=%ff%fe", 400, "malformed query string"),
        ("/frame?id=clip_red", 400, "/frame?id=VIDEO_ID&p=FRAME_POSITION"),
        ("/frame?id=nope&p=0", 404, "no such video in the index"),
        ("/frame?id=clip_red&p=99", 404, "frame 99 is not one the model saw"),
        ("/frame?id=clip_red&p=-1", 400, "p='-1': a whole number"),
        ("/video/no_such_video", 404, "no video file with this id"),
        ("/video/clip_red?download=1", 400, "unknown parameter 'download'"),
        ("/video/%ff", 400, "not valid UTF-8"),
        ("/?x=1", 400, "unknown parameter 'x'"),
    ]
    for path, code, message in cases:
        status, headers, body = request(server, path)
        assert status == code and headers["Content-Type"].startswith("application/json"), (path, status, body)
        assert message in json.loads(body)["error"], (path, body)
        assert b"Traceback" not in body
    for path, method, code, message in [("/api/search?q=red", "POST", 405, "POST is not allowed here"),
                                        ("/api/rescan", "GET", 405, "GET is not allowed here"),
                                        ("/api/rescan", "POST", 403, "X-Requested-By: hmmc")]:
        status, headers, body = request(server, path, method)
        assert status == code and message in json.loads(body)["error"], (path, body)
    assert request(server, "/api/rescan", "POST")[1].get("Allow") is None
    assert request(server, "/api/rescan", "GET")[1]["Allow"] == "POST"
    # another site's name pointed at 127.0.0.1 (DNS rebinding) gets nothing; an address or localhost is fine
    status, _, body = request(server, "/api/search?q=red", headers={"Host": "evil.example:80"})
    assert status == 403 and "Host" in json.loads(body)["error"]
    for host in ("127.0.0.2:8000", "localhost", "[::1]:80"):
        assert request(server, "/api/search?q=red", headers={"Host": host})[0] == 200, host
    # a rescan asked for by another origin, even with the page's header
    status, _, body = request(server, "/api/rescan", "POST", headers={"X-Requested-By": "hmmc",
                                                                      "Origin": "http://evil.example"})
    assert status == 403 and "another origin" in json.loads(body)["error"]
    # a body on a GET would be read as the next request: refused, and the connection closed
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    conn.request("GET", "/api/search?q=red", body=b"GET /etc/passwd HTTP/1.1\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 400 and "a GET takes no request body" in json.loads(r.read())["error"]
    assert r.getheader("Connection") == "close"
    conn.close()
    # headers beyond any browser's: refused before anything is looked up
    status, _, body = request(server, "/", headers={f"X-Filler-{i}": "x" * 400 for i in range(50)})
    assert status == 431 and b"<" not in body
    # what http.server refuses itself: short text, no HTML page
    status, headers, body = request(server, "/", method="DELETE")
    assert status == 501 and headers["Content-Type"].startswith("text/plain") and b"<" not in body
    for bad in ("bytes=abc", "bytes=5-2", "bytes=1-2,4-5", "items=0-1", "bytes=-"):
        status, _, body = request(server, "/video/clip_red", headers={"Range": bad})
        assert status == 400 and "malformed Range header" in json.loads(body)["error"], bad
    size = os.path.getsize(server.search.index["paths"]["clip_red"])
    status, headers, body = request(server, "/video/clip_red", headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    for huge in ("bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000, "bytes=1" + "0" * 18
                 + "-"):  # past the end of any file; int() refuses more than 4,300 digits
        status, headers, body = request(server, "/video/clip_red", headers={"Range": huge})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}", (huge[:30], status, body)
    # a body sent with a POST is read and dropped: the next request on the same connection is answered as itself
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    conn.request("POST", "/api/search", body=b"GET /etc/passwd HTTP/1.1\r\n\r\n")
    assert conn.getresponse().read() and query(server, "a red screen", conn=conn)[0] == 200
    conn.close()
    status, _, body = request(server, "/api/rescan", "POST", headers={"Content-Length": "99999999"})
    assert status == 413 and "no request body" in json.loads(body)["error"]
    # and the server is still up, answering correctly
    assert query(server, "a red screen")[0] == 200


def test_range_requests(server):
    data = open(server.search.index["paths"]["clip_green"], "rb").read()
    size = len(data)
    for header, first, last in [("bytes=10-99", 10, 99), ("bytes=100-", 100, size - 1),
                                ("bytes=-50", size - 50, size - 1), ("bytes=0-0", 0, 0),
                                (f"bytes=5-{10 * size}", 5, size - 1), (f"bytes=-{2 * size}", 0, size - 1)]:
        status, headers, body = request(server, "/video/clip_green", headers={"Range": header})
        assert status == 206, header
        assert body == data[first:last + 1] and headers["Content-Length"] == str(last - first + 1), header
        assert headers["Content-Range"] == f"bytes {first}-{last}/{size}" and headers["Content-Type"] == "video/mp4"


def test_burst_of_concurrent_queries(net, server):
    texts = [f"a {c} screen" for c in COLOURS]
    want = {t: [(h["video_id"], h["score"]) for h in _reference(net, server, t, 3)] for t in texts}
    got, errors = [], []

    def worker(k):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)  # keep-alive, as a browser
        try:
            for i in range(50):
                text = texts[(k + i) % len(texts)]
                status, data = query(server, text, conn=conn)
                got.append((status, text, [(h["video_id"], h["score"]) for h in data.get("hits", [])]))
        except Exception as e:  # reported below: a thread's exception is otherwise lost
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 200
    assert all(status == 200 and hits == want[text] for status, text, hits in got)


def _rescan(server, headers=None):
    status, _, body = request(server, "/api/rescan", "POST", headers={"X-Requested-By": "hmmc", **(headers or {})})
    return status, json.loads(body)


def test_rescan_beside_queries(net, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, c in enumerate(("red", "green")):
        _write_mp4(str(videos / f"clip_{c}.mp4"), _frames(c, n=12, size=48, seed=60 + i))
    _write_mp4(str(tmp_path / "clip_blue.mp4"), _frames("blue", n=12, size=48, seed=62))
    server = _start(net, videos)
    try:
        hits = query(server, "a blue screen")[1]["hits"]
        assert "clip_blue" not in [h["video_id"] for h in hits]
        assert request(server, "/frame?id=clip_red&p=0")[0] == 200  # the frame store's reader is now open
        shutil.copy(tmp_path / "clip_blue.mp4", videos / "clip_blue.mp4")
        status, result = _rescan(server)
        assert status == 200, result
        assert result["extracted"] == ["clip_blue"] and result["encoded"] == ["clip_blue"] and result["videos"] == 3
        hits = query(server, "a blue screen")[1]["hits"]
        assert hits[0]["video_id"] == "clip_blue"
        assert request(server, hits[0]["video_url"])[2] == (videos / "clip_blue.mp4").read_bytes()
        assert request(server, hits[0]["frames"][0]["url"])[0] == 200  # the new index's frames
        assert server.search.status()["rescan"] == {"running": False, "result": result}

        # a rescan racing with queries (it runs in another process): every query is answered, from the old index
        # until the new one is swapped in, and the rescan ends with exactly the new file added
        _write_mp4(str(videos / "clip_yellow.mp4"), _frames("yellow", n=12, size=48, seed=63))
        old = {"clip_blue", "clip_green", "clip_red"}
        answers, seen = [], []
        rescan = threading.Thread(target=lambda: answers.append(_rescan(server)))
        rescan.start()
        while not server.search.status()["rescan"]["running"]:
            time.sleep(0.01)
        status, data = _rescan(server)  # one rescan at a time
        assert status == 409 and "already running" in data["error"] and rescan.is_alive()
        while rescan.is_alive():
            status, data = query(server, "a yellow screen", top=10)
            assert status == 200, data
            seen.append({h["video_id"] for h in data["hits"]})
            assert request(server, "/frame?id=clip_red&p=0")[0] == 200  # unchanged files keep their frames
        rescan.join()
        assert answers[0][0] == 200 and answers[0][1]["encoded"] == ["clip_yellow"], answers
        assert seen and seen[0] == old and all(ids in (old, old | {"clip_yellow"}) for ids in seen)
        ids = [h["video_id"] for h in query(server, "a yellow screen", top=10)[1]["hits"]]
        assert set(ids) == old | {"clip_yellow"} and ids[0] == "clip_yellow"

        # a rescan of a folder that lost every video fails and keeps the last index; the next one works
        moved = tmp_path / "moved"
        moved.mkdir()
        for f in videos.glob("*.mp4"):
            f.rename(moved / f.name)
        status, data = _rescan(server)
        assert status == 409 and "the previous index is kept" in data["error"] and "nothing to index" in data["error"]
        assert server.search.status()["rescan"] == {"running": False, "error": data["error"]}
        assert query(server, "a red screen")[0] == 200 and len(server.search.index["video_ids"]) == 4
        for name in ("clip_red.mp4", "clip_green.mp4"):
            (moved / name).rename(videos / name)
        status, result = _rescan(server)
        assert status == 200 and result["videos"] == 2 and result["extracted"] == [], result
        assert sorted(server.search.index["video_ids"]) == ["clip_green", "clip_red"]
        assert sorted(h["video_id"] for h in query(server, "a red screen")[1]["hits"]) == ["clip_green", "clip_red"]
    finally:
        _stop(server)


def test_failed_encoding_closes_the_frame_store(net, tmp_path):
    # build_index fails while encoding (settings the model cannot read: 48-px frames for a 32-px model); the frame
    # store's reader is closed all the same, so the next build of the folder (which writes the store) works
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_mp4(str(videos / "clip_red.mp4"), _frames("red", n=12, size=48, seed=64))
    index_args = {**_args(videos)[0], "image_size": 48, "frames_per_video": 6}
    progress = []
    with pytest.raises(ValueError, match="expected images of 32x32 pixels"):
        search.build_index(net, str(videos), progress=progress.append, **index_args)
    # what the page shows during a rescan
    assert progress == ["extracting frames: 1 of 1 new or changed videos", "encoding 1 new or changed videos"]
    assert not [p for p in framestore._SHARED_ENVS if p.startswith(str(videos))]
    _write_mp4(str(videos / "clip_blue.mp4"), _frames("blue", n=12, size=48, seed=65))
    index = search.build_index(net, str(videos), **_args(videos)[0])
    assert index["video_ids"] == ["clip_blue", "clip_red"] and sorted(index["encoded"]) == ["clip_blue", "clip_red"]


def test_security_headers_on_every_answer(server):
    status, _, body = request(server, "/")
    script = body.decode("utf-8").split("<script>")[1].split("</script>")[0]
    style = body.decode("utf-8").split("<style>")[1].split("</style>")[0]
    digest = lambda text: "'sha256-" + __import__("base64").b64encode(
        __import__("hashlib").sha256(text.encode()).digest()).decode() + "'"
    red = query(server, "a red screen")[1]["hits"][0]
    for path, method, code in [("/", "GET", 200), ("/api/search?q=red", "GET", 200),
                               (red["frames"][0]["url"], "GET", 200), (red["video_url"], "GET", 200),
                               ("/api/status", "GET", 200), ("/nope", "GET", 404),
                               ("/api/search?q=", "GET", 400), ("/api/rescan", "POST", 403), ("/", "DELETE", 501)]:
        status, headers, _ = request(server, path, method)
        assert status == code, (path, status)
        assert headers["Cross-Origin-Resource-Policy"] == "same-origin", path
        assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Content-Type-Options"] == "nosniff", path
        csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
        assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'", path
        # the page's own script and style are the only ones allowed to run
        assert csp["script-src"] == digest(script) and csp["style-src"] == digest(style), path


def _silent(server, half_sent):
    s = socket.create_connection(server.server_address[:2], timeout=60)
    if half_sent:  # a request line and a header, never the blank line that ends the request
        s.sendall(b"GET /api/search?q=red HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return s


def test_silent_connections_neither_starve_queries_nor_stay(net, server, folder):
    # beside the shared server's 64 slots, ten idle and ten half-sent connections leave a query its answer
    silent = [_silent(server, half_sent=i % 2 == 1) for i in range(20)]
    try:
        status, data = query(server, "a red screen")
        assert status == 200 and data["hits"][0]["video_id"] == "clip_red"
    finally:
        for s in silent:
            s.close()
    # a server with 4 slots and a 1 s time limit: 4 silent connections fill it, a fifth is told to come back at
    # once, and the silent ones are dropped (the server closes them) so that the query after them is answered
    small = _start(net, folder, conn_timeout=1, max_connections=4)
    try:
        silent = [_silent(small, half_sent=i % 2 == 1) for i in range(4)]
        time.sleep(0.2)  # let the server take them up (a thread each)
        status, headers, body = request(small, "/api/search?q=red")
        assert status == 503 and "busy" in json.loads(body)["error"] and headers["Retry-After"] == "1"
        assert headers["Cross-Origin-Resource-Policy"] == "same-origin"
        for s in silent:
            assert s.recv(100) == b""  # closed by the server (the client waits up to 60 s)
            s.close()
        for _ in range(20):  # the freed slots: a thread releases its slot just after closing the connection
            status, data = query(small, "a red screen")
            if status != 503:
                break
            time.sleep(0.1)
        assert status == 200 and data["hits"][0]["video_id"] == "clip_red"
    finally:
        _stop(small)


def test_log_lines(net, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_mp4(str(videos / "clip_red.mp4"), _frames("red", n=12, size=48, seed=66))
    _write_mp4(str(videos / "clip_blue.mp4"), _frames("blue", n=12, size=48, seed=67))
    # a frame that is no JPEG, written into the store before the server reads it: a bug-like failure (500)
    lmdb_path = os.path.join(videos, ".hmmc_index", "frames_6x112.lmdb")
    small = _start(net, videos)
    log = small.log
    try:
        positions = small.search.index["positions"]
        with framestore.FrameDB(lmdb_path, readonly=False) as db, db.env.begin(write=True) as txn:
            txn.put(f"clip_blue_{positions[0]}".encode(), b"not a jpeg")
        assert query(small, "a red screen")[0] == 200
        # a request line with a terminal escape sequence in it: logged with the escape written out
        with socket.create_connection(small.server_address[:2], timeout=60) as s:
            s.sendall(b"GET /nope\x1b[2J HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 404")
        status, _, body = request(small, f"/frame?id=clip_blue&p={positions[0]}")
        assert status == 500 and b"Traceback" not in body and "internal error" in json.loads(body)["error"]
        # a client that resets its connection in the middle of a video
        s = socket.create_connection(small.server_address[:2], timeout=60)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(b"GET /video/clip_red HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.close()
        assert query(small, "a blue screen")[0] == 200  # still up
    finally:
        _stop(small)
    lines = log.getvalue().splitlines()
    assert "\x1b" not in log.getvalue()
    assert [line for line in lines if "GET /nope\\x1b[2J HTTP/1.1 404" in line]
    ok = [line for line in lines if "GET /api/search?q=a+red+screen HTTP/1.1 200" in line]
    assert len(ok) == 1 and ok[0].endswith(" ms") and ok[0].split()[1] == "127.0.0.1"  # time, client, request
    failed = log.getvalue().split(f"GET /frame?id=clip_blue&p={positions[0]} HTTP/1.1 failed:")
    assert len(failed) == 2 and failed[1].lstrip().startswith("Traceback") and "UnidentifiedImageError" in failed[1]
    assert log.getvalue().count("Traceback") == 1  # the 500's; the reset made none


def test_loopback_and_busy_port(net, server, folder):
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.20")
    assert serve.url_of(server) == f"http://127.0.0.1:{server.server_address[1]}"
    index_args, rank_args = _args(folder)
    with pytest.raises(ValueError, match=rf"--port={server.server_address[1]}: cannot listen there"):
        search.make_server(net, str(folder), index_args=index_args, rank_args=rank_args, port=server.server_address[1])


def test_serve_refuses_cli_queries(trained, folder):
    with pytest.raises(ValueError, match="--serve takes its queries in the page; drop --query"):
        search.main([f"--init_from={trained[0]}", f"--videos={folder}", "--serve", "--query=red", "--device=cpu"])


@pytest.mark.slow
def test_search_serve_command(trained, folder):
    # as a user runs it: the index, the address on stdout, a query over HTTP, then Ctrl-C
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "search.py", f"--init_from={trained[0]}", f"--videos={folder}", "--serve", "--port=0",
           "--num_workers=0", "--device=cpu", "--frames_per_video=6", "--extract_workers=2"]
    p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("search page: "):
                break
        url = lines[-1].split()[2]
        assert url.startswith("http://127.0.0.1:") and "indexed 5 videos" in "".join(lines), lines
        host, port = urllib.parse.urlsplit(url).netloc.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("GET", "/api/search?q=a+red+screen")
        data = json.loads(conn.getresponse().read())
        conn.close()
        assert data["hits"][0]["video_id"] == "clip_red" and len(data["hits"]) == 5  # search.py's --top default
    finally:
        p.send_signal(__import__("signal").SIGINT)
        out = p.communicate(timeout=60)[0]
    assert p.returncode == 0 and "stopped" in out and "Traceback" not in out, out
