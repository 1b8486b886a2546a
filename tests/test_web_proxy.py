"""The Spaces' proxy through a real portal (`appliance serve`, gunicorn) to a real app server.

The "Space app" is a small threaded HTTP/1.1 server in this process (echo, redirects,
cookies, SSE, a hand-written WebSocket echo, uploads hashed as they stream in); each Space
row's port points straight at one of its listeners, as the router's port would.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import websocket
from conftest import free_port, wait_for

from appliance import users
from appliance.adapters.store import open_store

REPO = Path(__file__).resolve().parents[1]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PASSWORD = "correct horse battery"
MiB = 1 << 20


# -- the Space app ----------------------------------------------------------------------------


BLOCKS = [random.Random(n).randbytes(MiB) for n in range(8)]


def pattern(size: int):
    """size bytes that differ from one MiB to the next (a lost or repeated piece shows)."""
    for number, start in enumerate(range(0, size, MiB)):
        yield BLOCKS[number % len(BLOCKS)][:size - start]


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


def read_chunked(rfile) -> bytes:
    """Yield a chunked request body piece by piece (the app side of a chunked upload)."""
    while True:
        size = int(rfile.readline().split(b";")[0], 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return
        yield rfile.read(size)
        rfile.readline()


def ws_frame(opcode: int, payload: bytes) -> bytes:
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([len(payload)])
    elif len(payload) < 65536:
        head += bytes([126]) + len(payload).to_bytes(2, "big")
    else:
        head += bytes([127]) + len(payload).to_bytes(8, "big")
    return head + payload


def ws_read(rfile) -> tuple[int, bytes]:
    first = rfile.read(2)
    if len(first) < 2:
        return 0x8, b""
    opcode, length = first[0] & 0x0F, first[1] & 0x7F
    if length == 126:
        length = int.from_bytes(rfile.read(2), "big")
    elif length == 127:
        length = int.from_bytes(rfile.read(8), "big")
    mask = rfile.read(4) if first[1] & 0x80 else b"\0\0\0\0"
    data = rfile.read(length)
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class SpaceApp(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.connection = self.server.connections  # this connection's number

    def reply(self, status: int, body: bytes, headers: dict | list = (),
              kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers.items() if isinstance(headers, dict) else headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body_digest(self) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            pieces = read_chunked(self.rfile)
        else:
            left = int(self.headers.get("Content-Length") or 0)

            def counted():
                nonlocal left
                while left:
                    data = self.rfile.read(min(left, MiB))
                    left -= len(data)
                    yield data

            pieces = counted()
        for piece in pieces:
            digest.update(piece)
            size += len(piece)
        return size, digest.hexdigest()

    def do_GET(self) -> None:  # noqa: C901 - one small app, many routes
        route = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(route.query).items()}
        if route.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if route.path == "/redirect":
            return self.reply(int(query.get("status", 302)), b"",
                              {"Location": query["to"]})
        if route.path == "/cookies":
            return self.reply(200, b"{}", [
                ("Set-Cookie", "appliance_session=stolen; Path=/"),
                ("Set-Cookie", "app=1; Path=/; HttpOnly"),
                ("Set-Cookie", "deep=2; Path=/api; SameSite=Lax"),
                ("Set-Cookie", "here=3"),
                ("X-App", "yes"), ("Keep-Alive", "timeout=5"),
                ("Connection", "X-Private"), ("X-Private", "hop"),
            ])
        if route.path == "/framing":
            return self.reply(200, b"<p>hi", {
                "X-Frame-Options": "SAMEORIGIN",
                "Cross-Origin-Opener-Policy": "unsafe-none"}, kind="text/html")
        if route.path == "/page.html":
            return self.reply(200, b"<html><body>http://cdn.example/x.js</body></html>",
                              kind="text/html; charset=utf-8")
        if route.path == "/page.html.gz":
            return self.reply(200, gzip.compress(b"<p>see http://cdn.example/y.css</p>"),
                              {"Content-Encoding": "gzip"}, kind="text/html")
        if route.path == "/until-close":  # no length, no chunks: the body ends with the socket
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"all of it" * 1000)
            self.close_connection = True
            return
        if route.path == "/broken":  # promises a chunked body, then dies half-way
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n")
            self.close_connection = True
            return
        if route.path == "/big":
            return self.reply(200, b"x" * int(query["size"]), kind="application/octet-stream")
        if route.path in ("/bytes", "/short"):  # /short promises size bytes, sends half
            size = int(query["size"])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command == "HEAD":
                return
            sent = 0
            with self.server.lock:
                self.server.streaming += 1
            with contextlib.suppress(OSError):  # the visitor may leave half-way
                for piece in pattern(size if route.path == "/bytes" else size // 2):
                    self.wfile.write(piece)
                    sent += len(piece)
            with self.server.lock:
                self.server.streaming -= 1
            if sent < size:
                self.close_connection = True
            return
        if route.path == "/sse-gated":
            return self.sse_gated(int(query.get("n", 4)))
        if route.path == "/sse":
            return self.sse(int(query.get("n", 5)), float(query.get("gap", 0.3)))
        if route.path == "/close-after":
            self.close_connection = True  # the app drops the kept-alive connection
        self.echo()

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.echo()

    do_PUT = do_DELETE = do_PATCH = do_POST

    def echo(self) -> None:
        size, digest = self.body_digest()
        self.reply(200, json.dumps({
            "method": self.command, "target": self.path, "size": size, "sha256": digest,
            "headers": [[k, v] for k, v in self.headers.items()],
            "connections": self.server.connections, "connection": self.connection,
        }).encode())

    def sse(self, count: int, gap: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number in range(count):
            event = f"data: event {number}\n\n".encode()
            self.wfile.write(b"%X\r\n%b\r\n" % (len(event), event))
            time.sleep(gap)
        self.wfile.write(b"0\r\n\r\n")

    def sse_gated(self, count: int) -> None:
        """Send one event, then wait until the test lets the next one go."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number in range(count):
            if number and not self.server.sse_gate.acquire(timeout=60):
                break
            event = f"data: event {number}\n\n".encode()
            self.wfile.write(b"%X\r\n%b\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def websocket(self) -> None:
        accept = base64.b64encode(hashlib.sha1(
            (self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        cookie = self.headers.get("Cookie", "")
        self.wfile.write(ws_frame(0x1, f"welcome {self.path} cookie={cookie}".encode()))
        while True:
            opcode, payload = ws_read(self.rfile)
            if opcode == 0x8:
                self.wfile.write(ws_frame(0x8, payload[:2]))
                break
            if opcode == 0x9:
                self.wfile.write(ws_frame(0xA, payload))
            elif opcode in (0x1, 0x2):
                self.wfile.write(ws_frame(opcode, b"echo: " + payload))
        self.close_connection = True


class AppServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int = 0):
        super().__init__(("127.0.0.1", port), SpaceApp)
        self.lock = threading.Lock()
        self.connections = 0
        self.streaming = 0  # bodies being sent by /bytes and /short now
        self.sse_gate = threading.Semaphore(0)  # /sse-gated sends its next event on release
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]



# -- the portal -----------------------------------------------------------------------------


def space_row(space_id: str, port: int | None, **extra) -> dict:
    return {"id": space_id, "source": f"https://example.org/{space_id}",
            "source_display": f"https://example.org/{space_id}", "stage": "RUNNING",
            "sdk": "gradio", "port": port, "backend_port": port, "hardware": "cpu",
            "desired": "running", "manifest": json.dumps({"sdk": "gradio"}), **extra}


def portal_pids(master: int) -> list[int]:
    """The gunicorn master and its workers."""
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(entry.name))
    return pids


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Portal:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.apps_port = free_port()  # the Spaces' own origin
        self.apps = f"http://127.0.0.1:{self.apps_port}"
        self.log_path = tmp / "portal.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "2"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "APPLIANCE_DATA_DIR": str(tmp / "data"),
                 "APPLIANCE_CONFIG_FILE": "/nonexistent", "APPLIANCE_ROUTER_HOST": "127.0.0.1",
                 "APPLIANCE_PORTAL_THREADS": "4",
                 "APPLIANCE_PORTAL_APPS_PORT": str(self.apps_port),
                 "APPLIANCE_PORTAL_APPS_DOMAIN": "spaces.test", **(env or {})})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                requests.get(self.url + "/login", timeout=2)
                if len(portal_pids(self.process.pid)) >= 3:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the portal did not answer: {self.log_path.read_text()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def workers(self) -> list[int]:
        return portal_pids(self.process.pid)[1:]


@pytest.fixture(scope="module")
def apps():
    servers = {name: AppServer() for name in ("public", "private", "locked")}
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def portal(tmp_path_factory, apps):
    tmp = tmp_path_factory.mktemp("portal")
    store = open_store(tmp / "data" / "appliance.db")
    store.insert_space(space_row("alice/public", apps["public"].port), "test")
    store.insert_space(space_row("alice/private", apps["private"].port,
                                 visibility="private"), "test")
    store.insert_space(space_row("alice/locked", apps["locked"].port, manifest=json.dumps({
        "sdk": "gradio", "disable_embedding": True, "custom_headers": {
            "cross-origin-embedder-policy": "require-corp",
            "Cross-Origin-Opener-Policy": "same-origin", "x-not-allowed": "1"}})), "test")
    store.insert_space(space_row("alice/down", free_port()), "test")
    late_port = free_port()
    store.insert_space(space_row("alice/late", late_port), "test")
    store.insert_space(space_row("alice/asleep", free_port(), stage="STOPPED",
                                 desired="stopped"), "test")
    users.add_user(store, "admin", "admin", PASSWORD, "test")
    users.add_user(store, "alice", "viewer", PASSWORD, "test")
    _id, token = users.create_token(store, "ci", "alice", "read", "test")
    store.close()
    running = Portal(tmp)
    running.token = token
    running.late_port = late_port
    yield running
    running.stop()


def get(portal, path, **kwargs) -> requests.Response:
    kwargs.setdefault("allow_redirects", False)
    kwargs.setdefault("timeout", 30)
    base = portal.apps if path.startswith("/s/") else portal.url
    return requests.get(base + path, **kwargs)


def seen_headers(response: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.json()["headers"]}


# -- plain HTTP -----------------------------------------------------------------------------


def test_get_reaches_the_app_without_the_prefix_query_string_intact(portal):
    response = get(portal, "/s/alice--public/some/path%20x?q=1&w=a%2Fb&e=")
    assert response.status_code == 200
    body = response.json()
    assert body["method"] == "GET"
    assert body["target"] == "/some/path%20x?q=1&w=a%2Fb&e="


def test_the_root_of_a_space_is_the_apps_root(portal):
    assert get(portal, "/s/alice--public/").json()["target"] == "/"
    assert get(portal, "/s/alice--public/?x=1").json()["target"] == "/?x=1"


def test_post_body_reaches_the_app(portal):
    payload = json.dumps({"hello": "world"}).encode()
    response = requests.post(portal.apps + "/s/alice--public/api/predict?x=1", data=payload,
                             headers={"Content-Type": "application/json"}, timeout=30)
    body = response.json()
    assert body["method"] == "POST" and body["target"] == "/api/predict?x=1"
    assert body["size"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()
    assert seen_headers(response)["content-type"] == "application/json"


def test_other_methods_and_head_pass_through(portal):
    for method in ("PUT", "DELETE", "PATCH"):
        response = requests.request(method, portal.apps + "/s/alice--public/thing",
                                    data=b"abc", timeout=30)
        assert response.json()["method"] == method
    head = requests.head(portal.apps + "/s/alice--public/thing", timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) > 0


def test_a_space_without_trailing_slash_is_redirected_permanently(portal):
    response = get(portal, "/s/alice--public")
    assert response.status_code == 308
    assert response.headers["Location"] == "/s/alice--public/"
    assert get(portal, "/s/alice--public?a=1").headers["Location"] == "/s/alice--public/?a=1"


@pytest.mark.parametrize("path", [
    "/s/alice/", "/s/alice--public--x/", "/s/--public/", "/s/alice--/", "/s/..--x/",
    "/s/alice-public/", "/s/alice%2Fpublic/", "/s/", "/s/-bad--name/",
])
def test_a_bad_slug_is_404_before_any_lookup(portal, path):
    response = get(portal, path, headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "Not found" in response.text


def test_an_unknown_space_is_404_with_a_page_saying_so(portal):
    response = get(portal, "/s/alice--ghost/", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "No Space named alice/ghost" in response.text
    assert "<html" in response.text.lower()
    api = get(portal, "/s/alice--ghost/x", headers={"Accept": "application/json"})
    assert api.status_code == 404
    assert api.json() == {"ok": False, "error": "No Space named alice/ghost",
                          "hint": "see the list of Spaces on the portal's home page",
                          "status": 404}


def test_kept_alive_connections_to_the_app_are_reused(portal, apps):
    before = get(portal, "/s/alice--public/count").json()["connections"]
    for _ in range(30):
        assert get(portal, "/s/alice--public/count").status_code == 200
    after = get(portal, "/s/alice--public/count").json()["connections"]
    # Two workers, each with its own pool; 31 requests, a handful of connections at most.
    assert after - before <= 4


def test_a_connection_the_app_closed_is_not_reused(portal):
    # Back to back: the app's close may not have reached the worker when the next request
    # goes out on the pooled connection; that request must then go again on a new one.
    seen = []
    for _ in range(20):
        response = get(portal, "/s/alice--public/close-after")
        assert response.status_code == 200, response.text
        seen.append(response.json()["connection"])
    # The app closes each connection after one answer, so no two answers share one.
    assert len(set(seen)) == len(seen), f"a connection the app closed was used again: {seen}"


# -- redirects ------------------------------------------------------------------------------


@pytest.mark.parametrize("location, expected", [
    ("/foo?a=1", "/s/alice--public/foo?a=1"),
    ("/", "/s/alice--public/"),
    ("/s/alice--public/already", "/s/alice--public/already"),
    ("relative/path", "relative/path"),
    ("https://example.org/elsewhere", "https://example.org/elsewhere"),
    ("//example.org/x", "//example.org/x"),
])
def test_redirects_to_the_apps_root_stay_under_the_prefix(portal, location, expected):
    response = get(portal, "/s/alice--public/redirect", params={"to": location})
    assert response.status_code == 302
    assert response.headers["Location"] == expected


def test_redirects_naming_the_apps_own_port_or_the_portal_stay_under_the_prefix(portal, apps):
    own = f"http://127.0.0.1:{apps['public'].port}/login?x=1"
    response = get(portal, "/s/alice--public/redirect", params={"to": own})
    assert response.headers["Location"] == "/s/alice--public/login?x=1"
    host = f"127.0.0.1:{portal.apps_port}"  # the origin the visitor's browser addressed
    response = get(portal, "/s/alice--public/redirect", params={"to": f"http://{host}/a"})
    assert response.headers["Location"] == f"http://{host}/s/alice--public/a"


# -- headers --------------------------------------------------------------------------------


def test_portal_credentials_never_reach_the_app(portal):
    response = get(portal, "/s/alice--public/echo", headers={
        "Cookie": "theme=dark; appliance_session=secret-session; lang=en",
        "Authorization": f"Bearer {portal.token}"})
    headers = seen_headers(response)
    assert headers["cookie"] == "theme=dark; lang=en"
    assert "authorization" not in headers
    assert "secret-session" not in response.text and portal.token not in response.text


def test_the_apps_own_authorization_passes(portal):
    response = get(portal, "/s/alice--public/echo",
                   headers={"Authorization": "Bearer hf_not_the_portals"})
    assert seen_headers(response)["authorization"] == "Bearer hf_not_the_portals"


def test_forwarded_headers_tell_the_app_where_it_is_served(portal):
    response = get(portal, "/s/alice--public/echo", headers={
        "X-Forwarded-Host": "evil.example", "X-Forwarded-Prefix": "/evil",
        "Forwarded": "host=evil.example"})
    headers = seen_headers(response)
    host = f"127.0.0.1:{portal.apps_port}"
    assert headers["host"] == host
    assert headers["x-forwarded-host"] == f"{host}/s/alice--public"
    assert headers["x-forwarded-prefix"] == "/s/alice--public"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"
    assert "forwarded" not in headers


def test_hop_by_hop_request_headers_are_dropped(portal):
    response = get(portal, "/s/alice--public/echo", headers={
        "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Upgrade": "h2c", "Proxy-Authorization": "Basic eA==",
        "X-Keep-Me": "2"})
    headers = seen_headers(response)
    for name in ("x-drop-me", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert name not in headers
    assert headers["x-keep-me"] == "2"


def test_app_cookies_stay_under_the_prefix_and_never_replace_the_portals(portal):
    response = get(portal, "/s/alice--public/cookies")
    cookies = response.raw.headers.getlist("Set-Cookie")
    assert cookies == ["app=1; Path=/s/alice--public/; HttpOnly",
                       "deep=2; Path=/s/alice--public/api; SameSite=Lax", "here=3"]
    assert response.headers["X-App"] == "yes"
    assert "X-Private" not in response.headers and "Keep-Alive" not in response.headers


def test_custom_headers_and_disable_embedding_apply(portal):
    response = get(portal, "/s/alice--locked/framing")
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert "X-Not-Allowed" not in response.headers


def test_spaces_may_be_framed_by_the_portal_only(portal):
    response = get(portal, "/s/alice--public/framing")
    assert response.headers["Content-Security-Policy"] == \
        f"frame-ancestors 'self' *:{portal.port}"  # the portal's pages, on their own origin
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"  # the app's own stays
    assert response.headers["Cross-Origin-Opener-Policy"] == "unsafe-none"


# -- streams --------------------------------------------------------------------------------


def test_sse_events_arrive_one_by_one_before_the_stream_ends(portal, apps):
    # The app sends each event only once the one before it has reached the test, so a
    # proxy that buffered the stream would deliver nothing: the read times out instead.
    gate = apps["public"].sse_gate
    conn = http.client.HTTPConnection("127.0.0.1", portal.apps_port, timeout=30)
    conn.request("GET", "/s/alice--public/sse-gated?n=4",
                 headers={"Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    arrivals, buffer = [], b""
    while len(arrivals) < 4:
        data = response.read1(65536)
        assert data, f"the stream ended after {arrivals}"
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            arrivals.append(event.decode())
            gate.release()  # this one arrived while the app held the next: let it go
    assert arrivals == [f"data: event {n}" for n in range(4)]
    assert response.read() == b""  # the end of the stream
    assert not response.will_close
    sock = conn.sock
    conn.request("GET", "/s/alice--public/after")
    assert conn.getresponse().read() and conn.sock is sock  # the same connection, kept alive
    conn.close()


def open_files(pids: list[int]) -> dict[str, int]:
    """Sockets, pipes and threads the processes hold now."""
    counts = {"socket": 0, "pipe": 0, "thread": 0}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                kind = os.readlink(fd).split(":", 1)[0]
                if kind in counts:
                    counts[kind] += 1
        counts["thread"] += len(list(Path(f"/proc/{pid}/task").iterdir()))
    return counts


def test_a_50_mib_response_arrives_intact_and_the_connection_stays_alive(portal):
    size = 50 * MiB + 12345  # spliced to the visitor, past gunicorn
    conn = http.client.HTTPConnection("127.0.0.1", portal.apps_port, timeout=60)
    conn.request("GET", f"/s/alice--public/bytes?size={size}")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == str(size)
    assert response.getheader("Content-Security-Policy")  # the proxy's headers, as always
    digest, got = hashlib.sha256(), 0
    while data := response.read(MiB):
        digest.update(data)
        got += len(data)
    assert got == size and digest.hexdigest() == pattern_digest(size)
    assert not response.will_close
    sock = conn.sock
    conn.request("GET", "/s/alice--public/after")
    assert conn.getresponse().read() and conn.sock is sock  # the same connection, kept alive
    conn.close()


def test_a_visitor_leaving_mid_download_leaves_no_pipe_socket_or_thread(portal, apps):
    workers = portal.workers()
    assert get(portal, "/s/alice--public/warm").status_code == 200
    before = open_files(workers)
    for _ in range(3):
        conn = socket.create_connection(("127.0.0.1", portal.apps_port))
        conn.sendall(b"GET /s/alice--public/bytes?size=%d HTTP/1.1\r\nHost: x\r\n\r\n"
                     % (200 * MiB))
        got = 0
        while got < 2 * MiB:
            got += len(conn.recv(MiB))
        # Gone without a word: a reset, with the rest of the body still on its way.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = open_files(workers)
        if now["pipe"] == before["pipe"] and now["socket"] <= before["socket"] \
                and not apps["public"].streaming:
            break
        time.sleep(0.1)
    assert not apps["public"].streaming, "the portal still holds the app's connection"
    assert now["pipe"] == before["pipe"], (before, now)
    assert now["socket"] <= before["socket"], (before, now)
    # gthread starts its 4 request threads as needed; anything beyond them would be a leak.
    assert now["thread"] <= len(workers) * (4 + 2), (before, now)
    assert get(portal, "/s/alice--public/x").status_code == 200


def test_an_app_breaking_off_a_large_body_is_not_passed_off_as_complete(portal):
    conn = http.client.HTTPConnection("127.0.0.1", portal.apps_port, timeout=30)
    conn.request("GET", f"/s/alice--public/short?size={8 * MiB}")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    assert get(portal, "/s/alice--public/x").status_code == 200


def test_a_body_that_ends_with_the_connection_arrives_whole(portal):
    response = get(portal, "/s/alice--public/until-close")
    assert response.content == b"all of it" * 1000


def test_an_app_breaking_off_mid_answer_is_not_passed_off_as_complete(portal):
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(portal, "/s/alice--public/broken")
    assert get(portal, "/s/alice--public/x").status_code == 200


def test_a_200_mib_upload_streams_through_without_the_portal_holding_it(portal):
    size, piece = 200 * MiB, os.urandom(MiB)
    workers = portal.workers()
    before = {pid: rss_kib(pid) for pid in workers}
    peak = dict(before)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid in workers:
                peak[pid] = max(peak[pid], rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", portal.apps_port, timeout=120)
        conn.putrequest("POST", "/s/alice--public/upload")
        conn.putheader("Content-Length", str(size))
        conn.putheader("Content-Type", "application/octet-stream")
        conn.endheaders()
        for _ in range(size // MiB):
            conn.send(piece)
        body = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        done.set()
        sampler.join()
    expected = hashlib.sha256()
    for _ in range(size // MiB):
        expected.update(piece)
    assert body["size"] == size and body["sha256"] == expected.hexdigest()
    growth = max(peak[pid] - before[pid] for pid in workers) / 1024
    # Liveness bound, not a measurement: streaming costs a worker a few MiB at most; one
    # that held the body would grow by all 200 MiB. 100 MiB tells the two apart anywhere.
    assert growth < 100, f"a portal worker grew by {growth:.0f} MiB during a 200 MiB upload"


def test_a_chunked_upload_streams_through(portal):
    pieces = [os.urandom(100_000) for _ in range(30)] + [b"end"]
    response = requests.post(portal.apps + "/s/alice--public/upload", data=iter(pieces),
                             timeout=60)
    body = response.json()
    assert "chunked" in seen_headers(response)["transfer-encoding"]
    assert body["size"] == sum(map(len, pieces))
    assert body["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


# -- WebSockets -----------------------------------------------------------------------------


def test_a_websocket_echoes_both_ways_through_the_prefix(portal):
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{portal.apps_port}/s/alice--public/ws?room=1", timeout=10,
        cookie="appliance_session=secret; app=1")
    try:
        assert ws.recv() == "welcome /ws?room=1 cookie=app=1"  # the app spoke first
        ws.send("hello")
        assert ws.recv() == "echo: hello"
        ws.send_binary(bytes(range(256)) * 300)
        assert ws.recv() == b"echo: " + bytes(range(256)) * 300
    finally:
        ws.close()
    assert get(portal, "/s/alice--public/after-ws").status_code == 200


def test_websockets_do_not_hold_the_portals_request_threads(portal):
    # 2 workers x 4 threads: a dozen open sockets would starve the portal if each held one.
    sockets = [websocket.create_connection(
        f"ws://127.0.0.1:{portal.apps_port}/s/alice--public/ws", timeout=10) for _ in range(12)]
    try:
        for number, ws in enumerate(sockets):
            ws.recv()
            ws.send(f"n{number}")
        assert get(portal, "/s/alice--public/still-serving", timeout=5).status_code == 200
        for number, ws in enumerate(sockets):
            assert ws.recv() == f"echo: n{number}"
    finally:
        for ws in sockets:
            ws.close()


def test_a_refused_websocket_upgrade_is_an_ordinary_response(portal):
    ws = websocket.WebSocket()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws.connect(f"ws://127.0.0.1:{portal.apps_port}/s/alice--public/not-a-socket", timeout=10)
    assert refused.value.status_code == 200  # the echo route answers; no 101, no tunnel
    assert get(portal, "/s/alice--public/x").status_code == 200


# -- who may use a Space --------------------------------------------------------------------


def log_in(portal) -> requests.Session:
    session = requests.Session()
    page = session.get(portal.url + "/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = session.post(portal.url + "/login", data={
        "username": "alice", "password": PASSWORD, "csrf_token": csrf, "next": "/"},
        allow_redirects=False, timeout=30)
    assert response.status_code == 302, response.text
    assert "appliance_session" in session.cookies
    return session


def test_a_private_space_sends_an_anonymous_browser_to_log_in(portal):
    response = get(portal, "/s/alice--private/page?x=1", headers={"Accept": "text/html"})
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.netloc == f"127.0.0.1:{portal.port}"  # logging in happens on the portal
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": ["/spaces/alice/private"]}


def test_a_private_space_refuses_an_anonymous_api_client_with_401(portal):
    response = get(portal, "/s/alice--private/api", headers={"Accept": "application/json"})
    assert response.status_code == 401
    assert response.json()["error"] == "Log in to use this Space"


def test_a_bad_portal_token_is_refused(portal):
    response = get(portal, "/s/alice--private/api",
                   headers={"Authorization": "Bearer apl_not-a-real-token"})
    assert response.status_code == 401
    assert "not valid" in response.json()["error"]


def test_a_portal_token_opens_a_private_space_and_stays_with_the_portal(portal):
    response = get(portal, "/s/alice--private/api",
                   headers={"Authorization": f"Bearer {portal.token}"})
    assert response.status_code == 200
    assert "authorization" not in seen_headers(response)


def test_a_logged_in_user_uses_a_private_space(portal):
    session = log_in(portal)
    response = session.get(portal.apps + "/s/alice--private/page",
                           headers={"Accept": "text/html"}, allow_redirects=False, timeout=30)
    assert response.status_code == 200
    assert "cookie" not in seen_headers(response)  # the session cookie was the only one
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{portal.apps_port}/s/alice--private/ws", timeout=10,
        cookie=f"appliance_session={session.cookies['appliance_session']}")
    assert ws.recv() == "welcome /ws cookie="
    ws.close()


def test_a_forged_session_cookie_is_anonymous(portal):
    response = get(portal, "/s/alice--private/page", headers={
        "Accept": "text/html", "Cookie": "appliance_session=eyJ1c2VyIjoiYWxpY2UifQ.x.y"})
    assert response.status_code == 302


def test_an_anonymous_websocket_to_a_private_space_is_refused(portal):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{portal.apps_port}/s/alice--private/ws",
                                    timeout=10)
    assert refused.value.status_code == 401


# -- when the app is not there ---------------------------------------------------------------


def test_an_app_that_does_not_answer_gets_a_502_page_saying_what_to_do(portal):
    response = get(portal, "/s/alice--down/", headers={"Accept": "text/html"})
    assert response.status_code == 502
    assert "Space alice/down is not answering" in response.text
    assert "restart it from its page" in response.text
    assert "/spaces/alice/down" in response.text


def test_a_port_that_listens_a_moment_later_is_waited_for_not_a_502(portal):
    # The router starting (a Space's first deploy) or restarting: nothing listens on the
    # Space's port for a moment, and a visitor arriving then must not get a 502.
    late: list[tuple[AppServer, float]] = []

    def listen_later() -> None:
        time.sleep(0.8)  # the scenario: the port opens a moment after the visitor arrives
        server = AppServer(port=portal.late_port)
        late.append((server, time.monotonic()))

    threading.Thread(target=listen_later, daemon=True).start()
    sent = time.monotonic()
    try:
        response = get(portal, "/s/alice--late/")
        assert response.status_code == 200, response.text
        assert response.json()["target"] == "/"
        wait_for(lambda: late, 30, "the late app to listen")
        assert sent < late[0][1], "the request went out after the port listened: no wait shown"
    finally:
        wait_for(lambda: late, 30, "the late app to listen")
        late[0][0].shutdown()
        late[0][0].server_close()


def test_a_stopped_space_gets_a_503_page_saying_to_start_it(portal):
    response = get(portal, "/s/alice--asleep/x", headers={"Accept": "text/html"})
    assert response.status_code == 503
    assert "Space alice/asleep is not running" in response.text
    assert "start it from its page" in response.text
    ws = websocket.WebSocket()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws.connect(f"ws://127.0.0.1:{portal.apps_port}/s/alice--asleep/ws", timeout=10)
    assert refused.value.status_code == 503


def test_the_portal_log_has_no_errors(portal):
    # Runs last: every tunnel handed over, every refused stream, every upload left no trace.
    log = portal.log_path.read_text()
    assert "Traceback" not in log and "[ERROR]" not in log, log


# -- in-process (werkzeug, the Flask test client) ------------------------------------------------


@pytest.fixture
def flask_app(tmp_path, apps):
    from appliance.config import load_config
    from appliance.web.app import create_app

    config = load_config({}, data_dir=str(tmp_path / "data"), router_host="127.0.0.1",
                         portal_apps_port=0)
    store = open_store(config.db_path)
    store.insert_space(space_row("alice/public", apps["public"].port), "test")
    store.close()
    return create_app(config)


def test_websockets_under_the_dev_server_answer_501(flask_app):
    response = flask_app.test_client().get("/s/alice--public/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Accept": "text/html",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    assert response.status_code == 501


def test_other_portal_routes_still_reach_flask(flask_app):
    assert flask_app.test_client().get("/login").status_code in (200, 302)


def test_the_offline_rewrite_hook_gets_small_html(flask_app, monkeypatch):
    from appliance.web import proxy

    calls = []

    def rewrite(row, kind, body):
        calls.append((row["id"], kind))
        return body.replace(b"http://cdn.example/", b"/offline/")

    monkeypatch.setattr(proxy, "_hook", rewrite)
    client = flask_app.test_client()
    response = client.get("/s/alice--public/page.html")
    assert response.data == b"<html><body>/offline/x.js</body></html>"
    assert response.headers["Content-Length"] == str(len(response.data))
    assert calls == [("alice/public", "text/html")]
    assert client.get("/s/alice--public/echo").json["target"] == "/echo"  # JSON: untouched
    assert len(calls) == 1


def test_a_broken_offline_rewrite_leaves_the_page_as_the_app_sent_it(flask_app, monkeypatch):
    from appliance.web import proxy

    def rewrite(row, kind, body):
        raise RuntimeError("boom")

    monkeypatch.setattr(proxy, "_hook", rewrite)
    response = flask_app.test_client().get("/s/alice--public/page.html")
    assert response.data == b"<html><body>http://cdn.example/x.js</body></html>"


def test_the_offline_rewrite_hook_sees_gzipped_html_plain(flask_app, monkeypatch):
    from appliance.web import proxy

    monkeypatch.setattr(proxy, "_hook", lambda row, kind, body: body.upper())
    response = flask_app.test_client().get("/s/alice--public/page.html.gz")
    assert response.data == b"<P>SEE HTTP://CDN.EXAMPLE/Y.CSS</P>"
    assert "Content-Encoding" not in response.headers


def test_without_an_offline_module_nothing_is_rewritten(flask_app, monkeypatch):
    from appliance.web import proxy

    monkeypatch.setattr(proxy, "_hook", None)
    response = flask_app.test_client().get("/s/alice--public/page.html")
    assert b"http://cdn.example/x.js" in response.data


def test_under_gunicorn_a_large_body_goes_to_the_socket_not_through_python(flask_app):
    from werkzeug.test import EnvironBuilder

    size = 3 * MiB + 7
    mine, theirs = socket.socketpair()
    environ = EnvironBuilder(path=f"/s/alice--public/bytes?size={size}").get_environ()
    environ["gunicorn.socket"] = mine
    started = []
    body = flask_app.wsgi_app(environ, lambda status, headers: started.append(status))
    received = []
    reader = threading.Thread(target=lambda: received.extend(iter(lambda: theirs.recv(MiB), b"")))
    reader.start()
    try:
        items = list(body)  # what gunicorn would write (after the status line and headers)
        body.close()
    finally:
        mine.shutdown(socket.SHUT_WR)
        reader.join(10)
        mine.close()
        theirs.close()
    assert started == ["200 OK"] and items == [b""]
    data = b"".join(received)
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == pattern_digest(size)


def test_a_small_body_is_still_handed_to_gunicorn(flask_app):
    from werkzeug.test import EnvironBuilder

    mine, theirs = socket.socketpair()
    environ = EnvironBuilder(path="/s/alice--public/big?size=1000").get_environ()
    environ["gunicorn.socket"] = mine
    try:
        items = list(flask_app.wsgi_app(environ, lambda status, headers: None))
    finally:
        mine.close()
        theirs.close()
    assert b"".join(items) == b"x" * 1000


def test_a_change_to_a_space_reaches_the_proxy_within_moments(flask_app):
    from appliance.web import proxy

    client = flask_app.test_client()

    def answers(status: int) -> bool:
        deadline = time.monotonic() + proxy.ROW_CHECK_SECONDS + 2
        while time.monotonic() < deadline:
            if client.get("/s/alice--public/x", headers={
                    "Accept": "application/json"}).status_code == status:
                return True
            time.sleep(0.02)
        return False

    assert answers(200)
    store = open_store(flask_app.extensions["appliance.config"].db_path)
    try:
        store.update_space("alice/public", visibility="private")
        assert answers(401), "a Space made private stays open"
        store.update_space("alice/public", visibility="public")
        assert answers(200)
        store.delete_space_rows("alice/public", "test")
        assert answers(404), "a deleted Space is still proxied"
    finally:
        store.close()


# -- the connection pool ------------------------------------------------------------------------


def test_pooled_connections_are_reused_only_for_the_same_backend(apps):
    from appliance.web.upstream import UpstreamPool

    pool = UpstreamPool()
    port = apps["public"].port
    first, reused = pool.get("127.0.0.1", port, backend=17001)
    assert not reused
    pool.put("127.0.0.1", port, 17001, first)
    again, reused = pool.get("127.0.0.1", port, backend=17001)
    assert reused and again is first
    pool.put("127.0.0.1", port, 17001, again)
    # The route switched to another container: the old connection is closed, not reused.
    other, reused = pool.get("127.0.0.1", port, backend=17002)
    assert not reused and other is not first
    assert first.sock.fileno() == -1
    other.close()


def test_idle_pooled_connections_are_reaped(apps):
    from appliance.web.upstream import UpstreamPool

    pool = UpstreamPool(idle_seconds=0.05)
    conn, _ = pool.get("127.0.0.1", apps["public"].port, backend=None)
    pool.put("127.0.0.1", apps["public"].port, None, conn)
    wait_for(lambda: pool.reap() or conn.sock.fileno() == -1, 30,
             "the idle connection to be reaped")
    assert not pool.idle


def test_old_connections_are_retired_so_the_router_sees_the_space_in_use(apps, monkeypatch):
    from appliance.web import upstream

    pool = upstream.UpstreamPool()
    conn, _ = pool.get("127.0.0.1", apps["public"].port, backend=None)
    monkeypatch.setattr(upstream, "POOL_MAX_AGE_SECONDS", 0.0)
    pool.put("127.0.0.1", apps["public"].port, None, conn)
    assert conn.sock.fileno() == -1 and not pool.idle


# -- the apps' own origin ---------------------------------------------------------------------


def test_the_apps_origin_serves_no_portal_page_a_space_could_read(portal):
    session = requests.Session()
    for path in ("/login", "/account", "/api/v1/whoami", "/api/v1/tokens", "/"):
        response = session.get(portal.apps + path, timeout=30, allow_redirects=False)
        assert response.status_code == 404, path
        assert "This port serves the Spaces" in response.text
        assert "csrf" not in response.text.lower() and "appliance_session" not in response.text
    offline = session.get(portal.apps + "/static/offline/iframe-resizer/4.3.1/"
                          "iframeResizer.contentWindow.min.js", timeout=30)
    assert offline.status_code == 200 and "iframeResizer" in offline.text


def test_the_portal_sends_space_paths_to_the_apps_origin(portal):
    response = requests.get(portal.url + "/s/alice--public/x?y=1", timeout=30,
                            allow_redirects=False)
    assert response.status_code == 307
    assert response.headers["Location"] == f"{portal.apps}/s/alice--public/x?y=1"


# -- a host of its own per Space (a wildcard DNS name) --------------------------------------


def on_host(portal, host: str, path: str, **kwargs) -> requests.Response:
    """Ask the apps port for path as a browser addressing HOST would (DNS is not needed)."""
    headers = {"Host": f"{host}:{portal.apps_port}", **kwargs.pop("headers", {})}
    return requests.get(portal.apps + path, headers=headers, allow_redirects=False,
                        timeout=30, **kwargs)


def test_a_space_answers_at_the_root_of_its_own_host(portal):
    response = on_host(portal, "alice--public.spaces.test", "/echo?x=1")
    assert response.status_code == 200
    assert response.json()["target"] == "/echo?x=1"
    headers = seen_headers(response)
    assert headers["x-forwarded-host"] == f"alice--public.spaces.test:{portal.apps_port}"
    assert "x-forwarded-prefix" not in headers
    redirect = on_host(portal, "alice--public.spaces.test", "/redirect",
                       params={"to": "/login"})
    assert redirect.headers["Location"] == "/login"  # its root is its own: nothing to add


def test_a_private_space_on_its_own_host_sends_browsers_to_the_portal(portal):
    response = on_host(portal, "alice--private.spaces.test", "/page",
                       headers={"Accept": "text/html"})
    assert response.status_code == 302
    assert response.headers["Location"] == (
        f"http://spaces.test:{portal.port}/login?next=%2Fspaces%2Falice%2Fprivate")


def test_an_unknown_host_under_the_domain_is_not_found(portal):
    assert on_host(portal, "alice--ghost.spaces.test", "/").status_code == 404
    assert on_host(portal, "nodash.spaces.test", "/login").status_code == 404  # no portal page
    assert on_host(portal, "alice--public.other.test", "/echo").status_code == 404
