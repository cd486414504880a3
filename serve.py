"""
The search page and its web server, which search.py --serve starts with its engine (search.Searcher). Only indexed
videos are served, by id, never by a path from the URL. Against hostile clients and pages: a time limit on every
connection and a cap on how many are served at once, bounded headers and numbers, no unexpected request bodies, a Host
allow-list (DNS rebinding), an Origin check on the one POST, and headers that keep other sites from framing or probing.
"""

import base64
import contextlib
import hashlib
import ipaddress
import json
import mimetypes
import os
import re
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_QUERY = 1000  # characters: the model reads a few dozen tokens, a longer query is a mistake or an attack
MAX_TOP = 100  # hits per query the page may ask for
MAX_HEADER_BYTES = 16384  # all request headers together; a browser sends well under 2 KiB
MAX_DIGITS = 18  # in a number of a Range header: larger ones address no file (and int() refuses 4,300 digits)


class HTTPError(Exception):
    """A refused request: its status and a short message for the client (the engine raises them too)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ----------------------------------------------------------------------------- the page

# a page file a web developer edits; page() fills in its {{name}} markers
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "search.html"), encoding="utf-8") as f:
    PAGE = f.read()


def _sha256(tag: str) -> str:  # of the page's inline <script> or <style>, as a CSP names it
    text = re.search(f"<{tag}>(.*)</{tag}>", PAGE, re.S)[1]
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# the page runs its own script and style and nothing else, loads images, videos and JSON from this server only, and
# may not be framed by another site
CSP = (f"default-src 'none'; script-src {_sha256('script')}; style-src {_sha256('style')}; img-src 'self'; "
       f"media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cross-Origin-Resource-Policy": "same-origin",
                    "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def page(info: dict) -> str:
    """The search page: title, checkpoint, the skipped files, the search box; the script fills in the hits. Every
    value goes in escaped, in one pass (a marker inside a value stays text)."""
    checkpoint = skipped = ""
    if info["checkpoint"]:
        checkpoint = f"<p class=\"meta\">checkpoint: <code>{escape(info['checkpoint'])}</code></p>"
    if info["skipped"]:
        items = "".join(f"<li><code>{escape(v)}</code>: {escape(r[:300])}</li>" for v, r in info["skipped"].items())
        skipped = (f"<details class=\"skipped\"><summary>{len(info['skipped'])} file(s) skipped as unreadable"
                   f"</summary><ul>{items}</ul></details>")
    values = {"title": escape(info["title"]), "checkpoint": checkpoint, "skipped": skipped, "videos": info["videos"],
              "language": escape(info["language"]), "frame_match_weight": f"{info['frame_match_weight']:g}",
              "top_k_frames": info["top_k_frames"], "max_query": MAX_QUERY, "max_top": MAX_TOP, "top": int(info["top"])}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m[1]]), PAGE)


# ----------------------------------------------------------------------------- requests

# path -> (its method, the names its query string may hold); "/?q=TEXT" opens the page with that query run
ROUTES = {"/": ("GET", ("q",)), "/api/search": ("GET", ("q", "top")), "/frame": ("GET", ("id", "p")),
          "/video/": ("GET", ()), "/api/status": ("GET", ()), "/api/rescan": ("POST", ())}


def _params(query: str, allowed: tuple) -> dict:
    """The query string as {name: value}, refusing unknown, repeated or too many parameters."""
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
    unsatisfiable = HTTPError(416, f"the range lies past the end of the file ({size} bytes)",
                              {"Content-Range": f"bytes */{size}"})
    if m and max(len(m[1]), len(m[2])) > MAX_DIGITS:
        raise unsatisfiable  # a position of 19 digits or more is past the end of any file
    if not m or not (m[1] or m[2]) or (m[1] and m[2] and int(m[2]) < int(m[1])):
        raise HTTPError(400, f"malformed Range header {header[:80]!r}; one range of the form bytes=START-END")
    if m[1]:
        first, last = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    else:  # the last N bytes (none for N = 0: first = size)
        first, last = size - min(int(m[2]), size), size - 1
    if first >= size:
        raise unsatisfiable
    return first, last


def _printable(text: str, limit: int = 300) -> str:
    # control characters (a terminal's escape sequences) become \x.. escapes
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a browser's video seeks reuse the connection
    # headers and body go out as two writes: with Nagle's algorithm the second waited for the client's delayed ACK,
    # 40 ms added to every answer on a kept-alive connection
    disable_nagle_algorithm = True
    server_version = "hmmc-search"

    def setup(self):
        self.timeout = self.server.conn_timeout  # a silent connection (idle or half-sent) is dropped after this
        super().setup()

    def parse_request(self):
        self.started = time.perf_counter()
        if not super().parse_request():
            return False
        if sum(len(k) + len(v) + 4 for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self.send_error(431, "Request Header Fields Too Large")
            return False
        return True

    def do_GET(self):
        # a body on a GET would be read as the next request on this connection
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            return self._send_json(400, {"error": "a GET takes no request body"})
        self._answer("GET")

    def do_POST(self):
        # nothing here reads a body, but one left unread would be taken for the next request on this connection
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not re.fullmatch(r"\d{1,5}", length, flags=re.ASCII):
            self.close_connection = True
            return self._send_json(413 if length.isdigit() else 400, {"error": "no request body is expected here"})
        self.rfile.read(int(length))
        self._answer("POST")

    def _answer(self, method: str):
        try:
            # a page on another site that points its own name at this machine (DNS rebinding) sends its own name in
            # Host: answer only to an IP address, localhost, this machine's name, and the names given in allowed_hosts
            host = _host_name(self.headers.get("Host") or "")
            if not (_is_ip(host) or host in self.server.allowed_hosts):
                raise HTTPError(403, "unexpected Host header; open the page by this machine's address or name "
                                     "(or add the name to --allowed_hosts)")
            url = urllib.parse.urlsplit(self.path)
            route = "/video/" if url.path.startswith("/video/") else url.path
            if route not in ROUTES:
                raise HTTPError(404, "not found")
            allowed, names = ROUTES[route]
            if method != allowed:
                raise HTTPError(405, f"{method} is not allowed here", {"Allow": allowed})
            p, search = _params(url.query, names), self.server.search
            if route == "/":
                self._send(200, page(search.info()).encode("utf-8"), "text/html; charset=utf-8")
            elif route == "/api/search":
                top = _number(p.get("top", str(search.top)), "top", 1, MAX_TOP)
                q = p.get("q", "")
                if not q.strip():
                    raise HTTPError(400, "empty query: type a few words")
                if len(q) > MAX_QUERY:
                    raise HTTPError(400, f"the query is {len(q)} characters long; at most {MAX_QUERY} are read")
                self._send_json(200, search.rank(q, top))
            elif route == "/frame":
                if "id" not in p or "p" not in p:
                    raise HTTPError(400, "a frame is /frame?id=VIDEO_ID&p=FRAME_POSITION")
                jpeg = search.thumbnail(p["id"], _number(p["p"], "p", 0, 99999))
                self._send(200, jpeg, "image/jpeg", {"Cache-Control": "no-store"})
            elif route == "/video/":
                self._send_video(search.video_file(urllib.parse.unquote(url.path[len("/video/"):], errors="strict")))
            elif route == "/api/status":
                self._send_json(200, search.status())
            else:
                # a header a plain HTML form or a cross-site request cannot send, and the page's own origin when the
                # browser names one: another web page cannot start a rescan
                if self.headers.get("X-Requested-By") != "hmmc":
                    raise HTTPError(403, "a rescan needs the header X-Requested-By: hmmc (the page's button sends it)")
                origin = self.headers.get("Origin")
                if origin is not None and origin != f"http://{(self.headers.get('Host') or '').strip()}":
                    raise HTTPError(403, f"a rescan from another origin ({_printable(origin, 80)}) is refused")
                self._send_json(200, search.rescan())
        except HTTPError as e:
            self._send_json(e.status, {"error": e.message}, e.headers)
        except UnicodeDecodeError:
            self._send_json(400, {"error": "the address is not valid UTF-8"})

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away (a video seek does that): nothing to say
        except Exception:  # a bug: a traceback on the console, a short 500 to the client, the server stays up
            print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {_printable(self.requestline)} failed:\n"
                  f"{traceback.format_exc().rstrip()}", file=self.server.log, flush=True)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(500, {"error": "internal error; see the server's console"})

    def _head(self, status: int, ctype: str, length: int, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        if self.close_connection:  # tell the client not to send more on this connection
            self.send_header("Connection", "close")
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self._head(status, ctype, len(body), headers)
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
            ranged = {"Content-Range": f"bytes {first}-{last}/{size}"} if span else {}
            self._head(206 if span else 200, mimetypes.guess_type(path)[0] or "application/octet-stream",
                       last - first + 1, {"Accept-Ranges": "bytes", **ranged})
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
        # what http.server itself refuses (a garbled request line, an unknown method, a timeout): short text
        self.close_connection = True
        body = f"{code} {message or self.responses.get(code, ('',))[0]}\n".encode("utf-8", "replace")
        self._head(code, "text/plain; charset=utf-8", len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        # one line per answer: who, what, the status and how long it took
        ms = 1000 * (time.perf_counter() - getattr(self, "started", time.perf_counter()))
        self.log_message("%s %s %.1f ms", self.requestline, code, ms)

    def log_message(self, format, *args):
        # the request line comes from the client: its escape bytes must not reach a terminal as they are
        print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {_printable(format % args, 1000)}",
              file=self.server.log, flush=True)


class Server(ThreadingHTTPServer):
    """Bound to host:port (0: any free one). One daemon thread per connection (Ctrl-C does not wait for them), at most
    max_connections: one more gets a 503 at once."""
    request_queue_size = 128  # the standard library's 5 turned bursts of connections away into client retries
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, allowed_hosts=(), conn_timeout: float = 60.0,
                 max_connections: int = 64, log=None):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.conn_timeout = float(conn_timeout)
        self.slots = threading.BoundedSemaphore(int(max_connections))
        self.allowed_hosts = {"localhost", socket.gethostname().lower(), *(h.lower() for h in allowed_hosts)}
        self.log = log or sys.stderr
        self.search = None  # the engine (search.Searcher), set before serve_forever()
        try:
            super().__init__((host, int(port)), Handler)
        except OSError as e:
            raise ValueError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e}); "
                             f"pick another --port") from None

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            super().process_request(request, client_address)  # a thread of its own, which frees the slot when done
        else:
            self._turn_away(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _turn_away(self, request):
        body = b'{"error": "the server is busy with other connections; try again in a moment"}'
        head = "".join(f"{k}: {v}\r\n" for k, v in {**SECURITY_HEADERS, "Retry-After": "1"}.items())
        with contextlib.suppress(OSError):
            request.settimeout(1)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(body)}\r\nConnection: close\r\n{head}\r\n".encode() + body)
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # a client that went away or fell silent: its business
        print(f"{time.strftime('%H:%M:%S')} {client_address[0]} connection failed:\n{traceback.format_exc()}",
              file=self.log, flush=True)


def _is_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) is not None
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    return host == "localhost" or _is_ip(host) and ipaddress.ip_address(host).is_loopback


def url_of(server: Server) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(server: Server, source: str) -> None:
    if not is_loopback(server.server_address[0]):
        print(f"warning: --host={server.server_address[0]} is not a loopback address: other machines that can reach "
              f"this one can open the search page and play every video in {source}", flush=True)
    print(f"search page: {url_of(server)} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.search.close()
        server.server_close()
