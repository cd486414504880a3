"""
A search page over a folder of your own videos, served by the project itself: type a query, get the best videos
first, each with its strip of frames (the top-k matched frames outlined, each with its time and score) and the video,
playable from its best-matching frame.

$ python eval.py --init_from=out-synthetic/ckpt.pt --search=my_videos/ --serve     # then open http://127.0.0.1:8000

The index is built once at start (cached in DIR/.hmmc_index/, as the command-line search does) and kept in memory
with the model, so a query is one text encoding and one similarity. "Rescan" runs build_index again, which extracts
and encodes only new and changed files; while it runs, queries and frames answer 503 (the frame store is being
written). Only the indexed videos are served, looked up by their id, never by a path taken from the URL.
Standard library only: http.server and one page of plain JavaScript.
"""

import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import eval as hmmc_eval
import prepare

MAX_QUERY = 1000  # characters: the model reads a few dozen tokens, a longer query is a mistake or an attack
MAX_TOP = 100  # hits per query the page may ask for
LANGUAGES = {"clip": "English (CLIP text encoder)", "bert": "Chinese (Chinese BERT text encoder)"}
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
               ".mkv": "video/x-matroska", ".ogv": "video/ogg", ".ogg": "video/ogg", ".avi": "video/x-msvideo",
               ".mpg": "video/mpeg", ".mpeg": "video/mpeg", ".3gp": "video/3gpp", ".ts": "video/mp2t",
               ".gif": "image/gif"}  # the rest go out as application/octet-stream (browsers play few of them)


class HTTPError(Exception):
    """A request the server refuses: the status and a short message for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Search:
    """The model, one folder's index and its video files, shared by the request threads. One lock serialises the
    model calls and guards the index; `rescanning` turns queries away while build_index rewrites the frame store."""

    def __init__(self, net, source: str, *, index_args: dict, rank_args: dict, top: int = 5, checkpoint: str = ""):
        self.net, self.source, self.index_args, self.rank_args = net, source, index_args, rank_args
        self.top, self.checkpoint = top, checkpoint
        self.language = LANGUAGES.get(net.cfg.text_encoder, net.cfg.text_encoder)
        self.lock = threading.Lock()
        self.rescanning = False
        self.db = None  # the frame store's reader, opened on the first thumbnail and closed before a rescan
        self.index = self._build()

    def _build(self) -> dict:
        """build_index's answer plus what the requests look up (its "paths" are the files that may be served)."""
        index = hmmc_eval.build_index(self.net, self.source, **self.index_args)
        return {**index, "known": set(index["video_ids"]), "positions": [int(p) for p in index["frame_indices"]]}

    def _check_ready(self):
        if self.rescanning:
            raise HTTPError(503, "the index is being rebuilt (Rescan); try again in a moment",
                            {"Retry-After": "5"})

    def rank(self, query: str, top: int) -> dict:
        """The page's answer to a query: the hits of eval.search_index with their frames' URLs, times and labels,
        the URL of each video file with the time of its best-matching frame, and the query's warnings."""
        if not query.strip():
            raise HTTPError(400, "empty query: type a few words")
        if len(query) > MAX_QUERY:
            raise HTTPError(400, f"the query is {len(query)} characters long; at most {MAX_QUERY} are read")
        t0 = time.perf_counter()
        with self.lock:
            self._check_ready()
            index = self.index
            try:
                hits = hmmc_eval.search_index(self.net, index, [query], top=top, **self.rank_args)[0]
            except ValueError as e:  # a query that tokenizes to nothing
                raise HTTPError(400, str(e)) from None
        seconds = time.perf_counter() - t0
        positions = index["positions"]
        durations = dict(zip(index["video_ids"], index["durations"]))
        for hit in hits:
            vid, duration = hit["video_id"], durations.get(hit["video_id"])
            times = [hmmc_eval.frame_time(p, duration, index["stored_frames"]) for p in positions]
            hit["frames"] = [{"position": p, "url": "/frame?" + urllib.parse.urlencode({"id": vid, "p": p}),
                              "time": t, "label": hmmc_eval.frame_label(t, score), "top": i in hit["top_frames"]}
                             for i, (p, t, score) in enumerate(zip(positions, times, hit["frame_scores"]))]
            best = max(range(len(positions)), key=hit["frame_scores"].__getitem__)
            hit["start"] = times[best] or 0.0
            hit["video_url"] = "/video/" + urllib.parse.quote(vid, safe="") if vid in index["paths"] else None
        warnings = hmmc_eval.query_warnings(query, self.rank_args["tokenizer"], self.rank_args["context_length"])
        return {"query": query, "hits": hits, "warnings": warnings, "videos": len(index["video_ids"]),
                "seconds": seconds}

    def thumbnail(self, vid: str, position: int) -> bytes:
        with self.lock:
            self._check_ready()
            if vid not in self.index["known"]:
                raise HTTPError(404, "no such video in the index")
            if position not in self.index["positions"]:
                raise HTTPError(404, f"frame {position} is not one the model saw")
            if self.db is None:
                self.db = prepare.FrameDB(self.index["lmdb"])
            jpeg = self.db.get_frames(vid, [position])[0]
        return hmmc_eval.thumbnail_jpeg(jpeg)

    def video_file(self, vid: str) -> str:
        """The file of an indexed video, if it still lies inside the folder once links are resolved."""
        with self.lock:
            path = self.index["paths"].get(vid)
        if path is None:
            raise HTTPError(404, "no video file with this id")
        root, real = os.path.realpath(self.source), os.path.realpath(path)
        if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
            raise HTTPError(404, "no video file with this id")
        return real

    def rescan(self) -> dict:
        """build_index again: new and changed files are extracted and encoded, removed ones dropped."""
        with self.lock:
            if self.rescanning:
                raise HTTPError(409, "a rescan is already running")
            self.rescanning = True
            if self.db is not None:  # FrameDB refuses to write while this process holds a reader
                self.db.close()
                self.db = None
        t0, index = time.perf_counter(), None
        try:
            index = self._build()
        except (ValueError, FileNotFoundError) as e:  # e.g. the folder was emptied: keep answering from the old one
            raise HTTPError(409, f"rescan failed, the previous index is kept: {e}") from None
        finally:
            with self.lock:
                if index is not None:
                    self.index = index
                self.rescanning = False
        return {"videos": len(index["video_ids"]), "extracted": index["extracted"], "encoded": index["encoded"],
                "skipped": index["skipped"], "seconds": time.perf_counter() - t0}

    def page(self) -> str:
        with self.lock:
            index = self.index
        parts = hmmc_eval.page_head(f"HMMC search over {self.source}", checkpoint=self.checkpoint,
                                    skipped=index["skipped"], style=_CSS)
        parts.append(f"<p class=\"meta\">{len(index['video_ids'])} videos indexed. Queries in "
                     f"<b id=\"language\">{escape(self.language)}</b>: that is the language this model was "
                     f"trained on.</p>")
        parts.append(f"<form id=\"search\"><input id=\"q\" name=\"q\" maxlength=\"{MAX_QUERY}\" autofocus "
                     f"placeholder=\"describe a scene\" aria-label=\"query\"><input id=\"top\" type=\"number\" "
                     f"min=\"1\" max=\"{MAX_TOP}\" value=\"{int(self.top)}\" aria-label=\"hits\">"
                     f"<button>Search</button><button type=\"button\" id=\"rescan\">Rescan</button></form>")
        parts += ["<p id=\"status\" class=\"meta\"></p><ul id=\"warnings\"></ul><div id=\"results\"></div>",
                  f"<script>{_JS}</script></body></html>"]
        return "\n".join(parts)


# added to the report's CSS (eval._CSS, which outlines the top frames): the form, the warnings, the player
_CSS = ("form{display:flex;gap:6px;margin:12px 0}#q{flex:1;font-size:16px;padding:4px}#top{width:4em}"
        "#warnings{color:#b45309}.row{display:flex;gap:10px;align-items:flex-start}.row video{width:200px;"
        "flex:none;background:#000}.row .strip{flex:1;min-width:0}figure img{cursor:pointer}")

# Every piece of data goes into the page as text (textContent, append of strings), never as HTML.
_JS = r"""
const $ = (id) => document.getElementById(id);
const NO_ANSWER = "no answer from the server (is it still running?): ";
function el(tag, props, ...children) {
  const e = Object.assign(document.createElement(tag), props || {});
  e.append(...children);
  return e;
}
function hitView(hit) {
  const video = hit.video_url && el("video", {controls: true, preload: "metadata",
                                              src: hit.video_url + "#t=" + hit.start});
  const figures = hit.frames.map((f) => {
    const img = el("img", {src: f.url, alt: hit.video_id + " frame " + f.position, title: "frame " + f.position});
    if (video && f.time !== null) img.onclick = () => { video.currentTime = f.time; video.play(); };
    return el("figure", {className: f.top ? "top" : ""}, img, el("figcaption", {textContent: f.label}));
  });
  const title = el("div", {}, el("b", {textContent: hit.rank + ". "}), hit.video_id,
                   " \u2014 score " + hit.score.toFixed(2));
  const row = el("div", {className: "row"}, ...(video ? [video] : []), el("div", {className: "strip"}, ...figures));
  const div = el("div", {className: "hit"}, title, row);
  div.dataset.videoId = hit.video_id;
  return div;
}
async function search(q) {
  $("status").textContent = "searching\u2026";
  $("warnings").replaceChildren();
  let r, data;
  try {
    r = await fetch("/api/search?" + new URLSearchParams({q: q, top: $("top").value}));
    data = await r.json();
  } catch (e) {
    $("status").textContent = NO_ANSWER + e;
    return;
  }
  if (!r.ok) { $("status").textContent = data.error; $("results").replaceChildren(); return; }
  history.replaceState(null, "", "?" + new URLSearchParams({q: q}));
  $("warnings").append(...data.warnings.map((w) => el("li", {textContent: w})));
  $("status").textContent = data.hits.length + " of " + data.videos + " videos, best first (" +
                            (1000 * data.seconds).toFixed(0) + " ms)";
  $("results").replaceChildren(...data.hits.map(hitView));
}
$("search").onsubmit = (e) => { e.preventDefault(); search($("q").value); };
$("rescan").onclick = async () => {
  $("rescan").disabled = true;
  $("status").textContent = "rescanning the folder: new and changed videos are extracted and encoded\u2026";
  let done;
  try {
    const r = await fetch("/api/rescan", {method: "POST", headers: {"X-Requested-By": "hmmc"}});
    const data = await r.json();
    done = r.ok ? "rescanned: " + data.videos + " videos, " + data.extracted.length + " extracted, " +
                  data.encoded.length + " encoded, in " + data.seconds.toFixed(1) + " s" : data.error;
  } catch (e) {
    done = NO_ANSWER + e;
  }
  sessionStorage.setItem("rescanned", done);
  location.reload();  // the counts and the skipped files come with the page; the query stays in the URL
};
const first = new URLSearchParams(location.search).get("q");
const rescanned = sessionStorage.getItem("rescanned");
sessionStorage.removeItem("rescanned");
if (first) { $("q").value = first; search(first).then(() => { if (rescanned) $("status").textContent = rescanned; }); }
else if (rescanned) $("status").textContent = rescanned;
"""


def _params(query: str, allowed: tuple) -> dict:
    """The query string as {name: value}: unknown, repeated or too many parameters are refused."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8,
                                       errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "malformed query string") from None
    out = {}
    for name, value in pairs:
        if name not in allowed:
            raise HTTPError(400, f"unknown parameter {name!r}; this address takes {', '.join(allowed) or 'none'}")
        if name in out:
            raise HTTPError(400, f"parameter {name!r} given twice")
        out[name] = value
    return out


def _number(text: str, name: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d{1,6}", text, flags=re.ASCII) or not low <= int(text) <= high:
        raise HTTPError(400, f"{name}={text[:20]!r}: a whole number from {low} to {high}")
    return int(text)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a Range header: `bytes=A-B`, `bytes=A-` or `bytes=-N`; None without one."""
    if header is None:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip(), flags=re.ASCII)
    if not m or not (m[1] or m[2]) or (m[1] and m[2] and int(m[2]) < int(m[1])):
        raise HTTPError(400, f"malformed Range header {header[:80]!r}; one range of the form bytes=START-END")
    if m[1]:
        first, last = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    else:  # the last N bytes
        first, last = max(0, size - int(m[2])), size - 1
        if int(m[2]) == 0:
            first = size  # nothing to send
    if first >= size:
        raise HTTPError(416, f"the range starts past the end of the file ({size} bytes)",
                        {"Content-Range": f"bytes */{size}"})
    return first, last


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a browser's video seeks reuse the connection
    # headers and body go out as two writes: with Nagle's algorithm the second waited for the client's delayed ACK,
    # 40 ms added to every answer on a kept-alive connection
    disable_nagle_algorithm = True
    server_version = "hmmc-search"

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        # nothing here reads a body, but one left unread would be taken for the next request on this connection
        length = self.headers.get("Content-Length", "0")
        if not re.fullmatch(r"\d{1,5}", length, flags=re.ASCII):
            self.close_connection = True
            self._send_json(413 if length.isdigit() else 400, {"error": "no request body is expected here"})
            return
        self.rfile.read(int(length))
        self._answer("POST")

    def _answer(self, method: str):
        try:
            self._check_host()
            url = urllib.parse.urlsplit(self.path)
            search = self.server.search
            if url.path == "/" and method == "GET":
                _params(url.query, ("q",))  # ?q=TEXT: the page runs that query when it opens
                self._send(200, search.page().encode("utf-8"), "text/html; charset=utf-8")
            elif url.path == "/api/search" and method == "GET":
                p = _params(url.query, ("q", "top"))
                top = _number(p.get("top", str(search.top)), "top", 1, MAX_TOP)
                self._send_json(200, search.rank(p.get("q", ""), top))
            elif url.path == "/frame" and method == "GET":
                p = _params(url.query, ("id", "p"))
                if "id" not in p or "p" not in p:
                    raise HTTPError(400, "a frame is /frame?id=VIDEO_ID&p=FRAME_POSITION")
                jpeg = search.thumbnail(p["id"], _number(p["p"], "p", 0, 99999))
                self._send(200, jpeg, "image/jpeg", {"Cache-Control": "no-store"})
            elif url.path.startswith("/video/") and method == "GET":
                _params(url.query, ())
                self._send_video(search.video_file(urllib.parse.unquote(url.path[len("/video/"):], errors="strict")))
            elif url.path == "/api/rescan" and method == "POST":
                # a header a plain HTML form or a cross-site request cannot send: another web page cannot trigger it
                if self.headers.get("X-Requested-By") != "hmmc":
                    raise HTTPError(403, "a rescan needs the header X-Requested-By: hmmc (the page's button sends it)")
                self._send_json(200, search.rescan())
            elif url.path in ("/", "/api/search", "/frame", "/api/rescan") or url.path.startswith("/video/"):
                raise HTTPError(405, f"{method} is not allowed here", {"Allow": "POST" if "rescan" in url.path
                                                                       else "GET"})
            else:
                raise HTTPError(404, "not found")
        except HTTPError as e:
            self._send_json(e.status, {"error": e.message}, e.headers)
        except UnicodeDecodeError:
            self._send_json(400, {"error": "the address is not valid UTF-8"})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser stopped reading (a video seek does that): nothing to say
        except Exception as e:  # a bug: one line on the console, a short 500 to the client, the server stays up
            print(f"serve: {self.command} {self.path[:200]!r} failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            self._send_json(500, {"error": f"internal error ({type(e).__name__}); see the server's console"})

    def _check_host(self):
        # on loopback, a page on another site that re-points its own name at 127.0.0.1 (DNS rebinding) sends its
        # own name in Host: answer only to the names of this machine
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise HTTPError(403, "unexpected Host header; open the page as http://127.0.0.1:PORT")

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, obj: dict, headers: dict | None = None):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8",
                   headers)

    def _send_video(self, path: str):
        try:
            f = open(path, "rb")  # opened before any header goes out: a file gone meanwhile is still a clean 404
        except OSError:
            raise HTTPError(404, "no video file with this id") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            span = _byte_range(self.headers.get("Range"), size)
            first, last = span or (0, size - 1)
            self.send_response(206 if span else 200)
            self.send_header("Content-Type", VIDEO_TYPES.get(os.path.splitext(path)[1].lower(),
                                                             "application/octet-stream"))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(last - first + 1))
            if span:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            f.seek(first)
            left = last - first + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:  # the file shrank meanwhile: the length sent is now a lie, so end the connection
                    self.close_connection = True
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def send_error(self, code, message=None, explain=None):
        # what http.server itself refuses (a garbled request line, an unknown method): short text, no HTML page
        self.close_connection = True
        body = f"{code} {message or self.responses.get(code, ('',))[0]}\n".encode("utf-8", "replace")
        self.send_response(code, message)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:  # successes stay off the console
            self.log_message("%s -> %d", self.requestline[:120], code)

    def log_message(self, format, *args):
        print(f"serve: {format % args}", file=sys.stderr, flush=True)


class Server(ThreadingHTTPServer):  # one thread per connection, daemon threads: Ctrl-C does not wait for them
    def __init__(self, address, loopback: bool):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.loopback = loopback
        self.search = None
        super().__init__(address, Handler)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_server(net, source: str, *, index_args: dict, rank_args: dict, host: str = "127.0.0.1", port: int = 8000,
                top: int = 5, checkpoint: str = "") -> Server:
    """A search server over `source`, listening on host:port (port 0: any free one; see server.server_address) but
    not yet serving: call serve_forever(), in a thread for tests. The port is taken first, then the index built,
    so a busy port fails before minutes of indexing."""
    try:
        server = Server((host, int(port)), loopback=is_loopback(host))
    except OSError as e:
        raise ValueError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e}); "
                         f"pick another --port") from None
    try:
        server.search = Search(net, source, index_args=index_args, rank_args=rank_args, top=top,
                               checkpoint=checkpoint)
    except BaseException:
        server.server_close()
        raise
    return server


def url_of(server: Server) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(net, source: str, *, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """eval.py --serve: build the index, print the address, answer until Ctrl-C."""
    server = make_server(net, source, host=host, port=port, **kw)
    if not server.loopback:
        print(f"warning: --host={host} is not a loopback address: other machines that can reach this one can open "
              f"the search page and play every video in {source}", flush=True)
    print(f"search page: {url_of(server)} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
