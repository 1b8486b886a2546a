"""The Spaces' proxy: /s/<owner>--<name>/... forwarded to the Space's port, streams and all.

WSGI middleware in front of Flask: a proxied request never goes through Flask's routing,
session or templates (only its error pages do), so it costs little more than a socket hop.
It forwards to the Space's stable port on the front router (appliance/router.py), which picks
whichever container serves the Space now, answers "waking up" for a sleeping one and records
the request for sleeping; the proxy records nothing itself.

Bodies stream both ways (uploads are never held in memory, SSE events pass one by one), and a
WebSocket upgrade becomes a byte tunnel on a thread of its own, so it does not hold one of
gunicorn's request threads. A large body of known length is moved to the visitor with
splice(2), app socket to a kernel pipe to the visitor's socket, never copied through Python.
The Space's app sees the portal as a reverse proxy:
X-Forwarded-Host is the portal's host plus the prefix, which is what Gradio 5 builds its
public URL from, so the same container answers on its own port and under the prefix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import selectors
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from flask import Flask

from . import users
from .errors import InvalidInput, Unauthorized
from .sources import validate_space_id
from .store import Store

PREFIX = "/s/"
OFFLINE_FILES = "/static/offline/"
# RFC 9110 7.6.1, plus the old Proxy-Connection; Upgrade only passes for WebSockets.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "http2-settings",
})
# Set by the proxy itself (a visitor's own values would let them lie to the app), handled
# separately (body framing, cookies, credentials), or meaningless past this hop.
REQUEST_OWN = frozenset({
    "host", "content-length", "content-type", "cookie", "authorization", "expect",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
    "x-forwarded-prefix", "x-forwarded-port", "x-real-ip",
})
# gunicorn writes its own Date and Server.
RESPONSE_OWN = frozenset({"date", "server"})
# The only custom_headers Hugging Face applies (the cross-origin isolation family).
CUSTOM_HEADERS = frozenset({
    "cross-origin-embedder-policy", "cross-origin-opener-policy", "cross-origin-resource-policy",
})
PORTAL_TOKEN = "bearer " + users.TOKEN_PREFIX
CHUNK = 256 * 1024
HEAD_READ = 64 * 1024  # what one read takes while looking for the head's end
# Bodies of known length from this size on are spliced to the visitor (under gunicorn);
# smaller ones pass through Python, where a pipe's set-up would cost more than the copy.
SPLICE_BODY = 128 * 1024
PIPE_BYTES = 256 * 1024  # a spliced body's pipe, held for that response only
SMALL_BODY = 64 * 1024  # request bodies up to this are read first, sent with the head, replayable
REWRITE_LIMIT = 2 << 20  # web_offline.rewrite sees text/html and text/css up to this size
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 60.0
# Idle upstream connections are closed after this: under uvicorn's 5 s keep-alive (so a
# reused one is rarely half-closed) and short, so that a route switch's drain is not held
# up by connections nobody uses.
POOL_IDLE_SECONDS = 2.0
# A kept-alive connection is retired after this, busy or not: the router marks a Space as
# used (for sleeping) when a connection opens, not per request on it.
POOL_MAX_AGE_SECONDS = 30.0
POOL_MAX_IDLE = 32  # idle connections kept per Space port and process
HALF_CLOSE_SECONDS = 30.0  # a tunnel whose one side closed waits this long for the other
MAX_HEAD = 64 * 1024
CACHED_ROWS = 512  # Space rows (and slugs) a thread keeps between requests
# Each system call a request makes lets the worker's other threads take the GIL, and with
# dozens of threads every hand-off costs more CPU than the call itself; so, per request:
# - whether the database changed (a Space's port, visibility, manifest) is asked at most this
#   often per thread: a change reaches the proxy within this much time;
ROW_CHECK_SECONDS = 0.2
# - a pooled connection used this recently is not checked for a close before its reuse: one
#   the app closed just now fails at once, and the request is sent again on a new one.
QUIET_SECONDS = 0.1
_UNSEEN = object()
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_COOKIE_PATH = re.compile(r"(;\s*path\s*=\s*)([^;]*)", re.IGNORECASE)


def space_path(space_id: str) -> str:
    """Return where the portal serves a Space: /s/owner--name/."""
    owner, name = space_id.split("/", 1)
    return f"{PREFIX}{owner}--{name}/"


def space_id_of(slug: str) -> str | None:
    """Read 'owner--name' as a Space id; None for anything else."""
    parts = slug.split("--")
    if len(parts) != 2:
        return None
    try:
        return validate_space_id(f"{parts[0]}/{parts[1]}")
    except InvalidInput:
        return None


def register(app: Flask) -> None:
    """Serve /s/... through the proxy in front of the Flask app."""
    app.wsgi_app = SpaceProxy(app, app.wsgi_app)


# -- upstream connections -------------------------------------------------------------------


class UpstreamClosed(ConnectionError):
    """The app closed the connection; fresh is True when it had not started an answer."""

    def __init__(self, message: str, fresh: bool):
        super().__init__(message)
        self.fresh = fresh


class Upstream:
    """One HTTP/1.1 connection to a Space's port: a request out, a response in, kept alive.

    A few lines of socket code rather than http.client, whose per-request header parsing
    (the email package) and buffering cost more than the rest of the proxy together.
    """

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)  # a stream may be quiet for as long as the app likes
        self.opened = time.monotonic()
        self.buf = b""
        self.version = "HTTP/1.1"
        self.reusable = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def alive(self) -> bool:
        """Tell whether an idle connection is still open (no EOF or stray bytes waiting)."""
        if self.buf:
            return False
        try:
            self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def _fill(self, limit: int) -> None:
        """Read more while looking for a line's end; refuse lines longer than limit."""
        if len(self.buf) > limit:
            raise ValueError(f"the app's response head has a line over {limit} bytes")
        data = self.sock.recv(HEAD_READ)
        if not data:
            raise UpstreamClosed("the app closed the connection", fresh=False)
        self.buf += data

    def read_head(self, upgrade: bool = False) -> tuple[int, str, list[tuple[str, str]]]:
        """Read the response's status line and headers (interim 1xx answers skipped)."""
        first = True
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                try:
                    self._fill(MAX_HEAD)
                except UpstreamClosed:
                    raise UpstreamClosed("the app closed the connection without answering",
                                         fresh=first and not self.buf) from None
                first = False
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
            lines = head.split("\r\n")
            version, _sp, rest = lines[0].partition(" ")
            code, _sp, reason = rest.partition(" ")
            if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
                raise ValueError(f"the app answered {lines[0][:80]!r}, not HTTP/1.x")
            status = int(code)
            if 100 <= status < 200 and not (status == 101 and upgrade):
                continue
            headers = []
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                value = value.strip(" \t")
                # What gunicorn would refuse to send (it answers 500 instead) is dropped here.
                if colon and _TOKEN.fullmatch(name) and _VALUE.fullmatch(value):
                    headers.append((name, value))
            self.version = version
            return status, reason, headers

    def framing(self, method: str, status: int, headers: list[tuple[str, str]]
                ) -> tuple[str, int, bool]:
        """How the response's body ends: ("none" | "length" | "chunked" | "close", length,
        whether the connection may be kept alive after it)."""
        coding = length = None
        connection = ""
        for name, value in headers:
            lower = name.lower()
            if lower == "transfer-encoding":
                coding = value.lower()
            elif lower == "content-length":
                length = value
            elif lower == "connection":
                connection += "," + value.lower()
        keep = "close" not in connection and (
            self.version == "HTTP/1.1" or "keep-alive" in connection)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return "none", 0, keep
        if coding is not None:
            if coding.rsplit(",", 1)[-1].strip() != "chunked":
                return "close", 0, False
            return "chunked", 0, keep
        if length is not None:
            return "length", int(length), keep
        return "close", 0, False

    def body(self, method: str, status: int, headers: list[tuple[str, str]]
             ) -> Iterator[bytes]:
        """Yield the response body as it arrives; afterwards .reusable says keep-alive."""
        self.reusable = False
        kind, left, keep = self.framing(method, status, headers)
        if kind == "close":
            yield from self._until_close()
            return
        if kind == "chunked":
            yield from self._chunked()
        while left > 0:
            data = self._take(left)
            left -= len(data)
            yield data
        self.reusable = keep

    def splice_to(self, client: socket.socket, length: int) -> None:
        """Move a body of length bytes to client, through a kernel pipe (both sockets
        blocking: the calls wait in the kernel, without the GIL)."""
        if self.buf:
            data, self.buf = self.buf[:length], self.buf[length:]
            client.sendall(data)
            length -= len(data)
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                size = fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # over the user's pipe budget: the default size still works
                size = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
            source, sink = self.sock.fileno(), client.fileno()
            while length > 0:
                # Returns as soon as some bytes came (it waits only for the first). Urgent
                # data would stop it for good, but the router never sends any.
                moved = os.splice(source, write, min(length, size))
                if not moved:
                    raise UpstreamClosed("the app closed the connection mid-answer",
                                         fresh=False)
                length -= moved
                while moved:
                    moved -= os.splice(read, sink, moved)
        finally:
            os.close(read)
            os.close(write)

    def _take(self, most: int) -> bytes:
        if self.buf:
            data, self.buf = self.buf[:most], self.buf[most:]
            return data
        data = self.sock.recv(min(most, CHUNK))
        if not data:
            raise UpstreamClosed("the app closed the connection mid-answer", fresh=False)
        return data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill(MAX_HEAD)
        line, self.buf = self.buf[:end], self.buf[end + 2:]
        return line

    def _chunked(self) -> Iterator[bytes]:
        while size := int(self._line().split(b";", 1)[0].strip(), 16):
            while size > 0:
                data = self._take(size)
                size -= len(data)
                yield data
            self._line()
        while self._line():  # trailers, dropped
            pass

    def _until_close(self) -> Iterator[bytes]:
        if self.buf:
            data, self.buf = self.buf, b""
            yield data
        while data := self.sock.recv(CHUNK):
            yield data


class UpstreamPool:
    """Idle keep-alive connections to Space ports, shared by a worker's threads.

    Keyed by the router port and tagged with the backend the Space's row names: after a
    switch the router sends new connections to the new container, but a kept-alive one stays
    on the old container, so connections of an earlier backend are closed, not reused.
    """

    def __init__(self, idle_seconds: float = POOL_IDLE_SECONDS):
        self.idle_seconds = idle_seconds
        self.lock = threading.Lock()
        self.idle: dict[tuple[str, int], tuple[Any, list[tuple[float, Upstream]]]] = {}
        self.reaper: threading.Thread | None = None

    def get(self, host: str, port: int, backend: Any, fresh: bool = False
            ) -> tuple[Upstream, bool]:
        """Return (connection, reused); a new one raises OSError when the port refuses."""
        stale: list[Upstream] = []
        found, found_since, now = None, 0.0, 0.0
        if not fresh:
            now = time.monotonic()
            with self.lock:
                entry = self.idle.get((host, port))
                if entry and entry[0] != backend:
                    stale = [conn for _, conn in self.idle.pop((host, port))[1]]
                elif entry:
                    while entry[1] and found is None:
                        since, conn = entry[1].pop()
                        if now - since < self.idle_seconds:
                            found, found_since = conn, since
                        else:
                            stale.append(conn)
        for conn in stale:
            conn.close()
        if found is not None and (now - found_since < QUIET_SECONDS and not found.buf
                                  or found.alive()):
            return found, True
        if found is not None:
            found.close()
        conn = Upstream(host, port)
        self._start_reaper()
        return conn, False

    def put(self, host: str, port: int, backend: Any, conn: Upstream) -> None:
        """Keep a connection whose response was read to the end for the next request."""
        if time.monotonic() - conn.opened > POOL_MAX_AGE_SECONDS:
            conn.close()
            return
        drop: list[Upstream] = [conn]
        with self.lock:
            entry = self.idle.get((host, port))
            if entry is None or entry[0] != backend:
                if entry:
                    drop.extend(c for _, c in entry[1])
                entry = self.idle[(host, port)] = (backend, [])
            if len(entry[1]) < POOL_MAX_IDLE:
                entry[1].append((time.monotonic(), conn))
                drop.pop(0)
        for old in drop:
            old.close()

    def reap(self) -> None:
        """Close connections idle for longer than idle_seconds."""
        cutoff = time.monotonic() - self.idle_seconds
        drop = []
        with self.lock:
            for key, (backend, conns) in list(self.idle.items()):
                keep = [(since, c) for since, c in conns if since >= cutoff]
                drop.extend(c for since, c in conns if since < cutoff)
                if keep:
                    self.idle[key] = (backend, keep)
                else:
                    del self.idle[key]
        for conn in drop:
            conn.close()

    def _start_reaper(self) -> None:
        # Started on first use, so in each gunicorn worker (threads do not survive the fork
        # of a preloaded app).
        if self.reaper is not None and self.reaper.is_alive():
            return
        with self.lock:
            if self.reaper is not None and self.reaper.is_alive():
                return
            self.reaper = threading.Thread(target=self._reap_forever, name="proxy-pool-reaper",
                                           daemon=True)
            self.reaper.start()

    def _reap_forever(self) -> None:
        while True:
            time.sleep(self.idle_seconds / 2)
            with contextlib.suppress(Exception):
                self.reap()


# -- the middleware -------------------------------------------------------------------------


class SpaceProxy:
    """WSGI middleware: /s/<owner>--<name>/... to the Space's router port; the rest to Flask."""

    def __init__(self, app: Flask, wsgi_app: Callable):
        self.flask = app
        self.wsgi_app = wsgi_app
        self.config = app.extensions["appliance.config"]
        self.router_host = self.config.router_host
        self.portal_public = self.config.portal_public
        self.db_path = self.config.db_path
        self.cookie_name = app.config.get("SESSION_COOKIE_NAME") or "session"
        self.serializer = app.session_interface.get_signing_serializer(app)
        self.session_max_age = int(app.permanent_session_lifetime.total_seconds())
        self.local = threading.local()
        self.pool = UpstreamPool()
        self.plans: dict[str, tuple[frozenset[str], list[tuple[str, str]]]] = {}
        self.slugs: dict[str, str | None] = {}
        self.portal_port = self.config.portal_port
        self.apps_port = self.config.portal_apps_port
        self.apps_domain = self.config.portal_apps_domain.strip(".").lower()
        # Who may frame a Space: its own origin, and the portal's pages on their port.
        self.framers = "'self'" + (f" *:{self.portal_port}" if self.apps_port else "")

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or ""
        if self.apps_port and environ.get("SERVER_PORT") == str(self.apps_port):
            slug = _host_slug(environ, self.apps_domain)
            if slug is not None:  # OWNER--NAME.DOMAIN: the Space at the root of its own host
                environ["appliance.host_slug"] = slug
                return self.serve(environ, start_response, slug, "",
                                  _raw_target(environ))
            # The apps' origin serves the apps (and the files their offline pages load),
            # never a portal page a Space's script could read or post to as its visitor.
            if path.startswith(PREFIX):
                return self.proxy(environ, start_response)
            if path.startswith(OFFLINE_FILES):
                return self.wsgi_app(environ, start_response)
            return self.page(environ, start_response, 404, "This port serves the Spaces' apps",
                             f"the portal is on port {self.portal_port}")
        if not path.startswith(PREFIX):
            return self.wsgi_app(environ, start_response)
        if self.apps_port:  # an old link, or one typed by hand: to the apps' origin
            query = environ.get("QUERY_STRING")
            location = (f"{environ.get('wsgi.url_scheme', 'http')}://"
                        f"{_hostname(environ)}:{self.apps_port}{quote(path)}"
                        + (f"?{query}" if query else ""))
            return _send(start_response, "307 Temporary Redirect", [("Location", location)],
                         b"")
        return self.proxy(environ, start_response)

    # -- one request --------------------------------------------------------------------

    def proxy(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        slug, slash, _rest = path[len(PREFIX):].partition("/")
        space_id = self.slugs.get(slug, _UNSEEN)
        if space_id is _UNSEEN:
            space_id = space_id_of(slug)
            if len(self.slugs) >= CACHED_ROWS:
                self.slugs.clear()
            self.slugs[slug] = space_id
        if space_id is None:
            return self.page(environ, start_response, 404, "Not found", None)
        mount = environ.get("SCRIPT_NAME", "") + PREFIX + slug
        if not slash:
            query = environ.get("QUERY_STRING")
            start_response("308 Permanent Redirect", [
                ("Location", quote(mount) + "/" + (f"?{query}" if query else "")),
                ("Content-Length", "0")])
            return [b""]
        return self.serve(environ, start_response, slug, mount,
                          _upstream_target(environ, slug), space_id)

    def serve(self, environ: dict[str, Any], start_response: Callable, slug: str, mount: str,
              target: str, space_id: str | None = None) -> Iterable[bytes]:
        """Forward to the Space named by slug, mounted at mount ("" for its own host)."""
        space_id = space_id or space_id_of(slug)
        if space_id is None:
            return self.page(environ, start_response, 404, "Not found", None)
        row = self.space_row(space_id)
        if row is None or row["stage"] == "DELETING":
            return self.page(environ, start_response, 404, f"No Space named {space_id}",
                             "see the list of Spaces on the portal's home page")
        refusal = self.check_access(environ, row)
        if refusal is not None:
            return refusal(start_response)
        headers = self.request_headers(environ, mount)
        if _is_websocket(environ):
            return self.tunnel(environ, start_response, row, mount, target, headers)
        return self.forward(environ, start_response, row, mount, target, headers)

    def store(self) -> Store:
        store = getattr(self.local, "store", None)
        if store is None:
            store = self.local.store = Store(self.db_path)
            self.local.rows = {}
            self.local.version = None
            self.local.checked = 0.0
        return store

    def space_row(self, space_id: str) -> dict[str, Any] | None:
        """The Space's row, kept per thread until someone writes to the database (looked for
        at most every ROW_CHECK_SECONDS)."""
        store = self.store()
        local = self.local
        rows = local.rows
        now = time.monotonic()
        if now - local.checked >= ROW_CHECK_SECONDS:
            local.checked = now
            version = store.data_version()
            if version != local.version or len(rows) >= CACHED_ROWS:
                rows.clear()
                local.version = version
        row = rows.get(space_id, _UNSEEN)
        if row is _UNSEEN:
            row = rows[space_id] = store.find_space(space_id)
        return row

    # -- who may see it -----------------------------------------------------------------

    def check_access(self, environ: dict[str, Any], row: dict[str, Any]
                     ) -> Callable[[Callable], Iterable[bytes]] | None:
        """None when the caller may use the Space; else a WSGI responder refusing them."""
        if row.get("visibility") != "private" and self.portal_public:
            return None
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth[:len(PORTAL_TOKEN)].lower() == PORTAL_TOKEN:
            try:
                users.caller_for_token(self.store(), auth[7:].strip())
                return None
            except Unauthorized as exc:
                message, hint = exc.message, exc.hint
                return lambda start: self.page(environ, start, 401, message, hint,
                                               json_too=True)
        if self.session_user(environ) is not None:
            return None
        if "text/html" in environ.get("HTTP_ACCEPT", ""):
            location = self.login_url(environ)
            return lambda start: _send(start, "302 Found", [("Location", location)], b"")
        what = "this Space" if row.get("visibility") == "private" else "Spaces on this portal"
        return lambda start: self.page(
            environ, start, 401, f"Log in to use {what}",
            "log in on the portal, or send 'Authorization: Bearer <token>' with a portal token",
            json_too=True, extra=[("WWW-Authenticate", 'Bearer realm="appliance"')])

    def session_user(self, environ: dict[str, Any]) -> str | None:
        """Return the user of a valid portal session cookie, read the way Flask reads it."""
        value, _rest = _split_cookie(environ.get("HTTP_COOKIE", ""), self.cookie_name)
        if not value or self.serializer is None:
            return None
        try:
            data = self.serializer.loads(value, max_age=self.session_max_age)
        except Exception:  # itsdangerous' BadSignature, expired, or garbage: not logged in
            return None
        name = data.get("user") if isinstance(data, dict) else None
        if not name:
            return None
        found = users.caller_for_user(self.store(), name)
        return found.user if found else None

    def portal_origin(self, environ: dict[str, Any]) -> str:
        """The portal's pages as seen from the apps' origin (or a Space's own host)."""
        host = self.apps_domain if "appliance.host_slug" in environ else _hostname(environ)
        return f"{environ.get('wsgi.url_scheme', 'http')}://{host}:{self.portal_port}"

    def login_url(self, environ: dict[str, Any]) -> str:
        if self.apps_port and environ.get("SERVER_PORT") == str(self.apps_port):
            # Log in on the portal's origin, then land on the Space's page there.
            slug = environ.get("appliance.host_slug") or \
                environ["PATH_INFO"][len(PREFIX):].partition("/")[0]
            owner, _, name = slug.partition("--")
            return (f"{self.portal_origin(environ)}/login?next="
                    + quote(f"/spaces/{owner}/{name}", safe=""))
        query = environ.get("QUERY_STRING")
        back = environ.get("SCRIPT_NAME", "") + environ["PATH_INFO"] + (
            f"?{query}" if query else "")
        try:
            from flask import url_for

            with self.flask.request_context(environ):
                return url_for("pages.login", next=back)
        except Exception:  # the pages are not registered (a bare app in a test)
            return environ.get("SCRIPT_NAME", "") + "/login?next=" + quote(back, safe="")

    # -- headers ------------------------------------------------------------------------

    def request_headers(self, environ: dict[str, Any], mount: str) -> list[tuple[str, str]]:
        """The visitor's end-to-end headers minus portal credentials, plus X-Forwarded-*."""
        connection = environ.get("HTTP_CONNECTION")
        named = {t.strip().lower() for t in connection.split(",")} if connection else ()
        headers = []
        for key, value in environ.items():
            name = _NAMES.get(key, _UNSEEN)
            if name is _UNSEEN:
                name = _forwarded_name(key)
            if name is None or named and name.lower() in named:
                continue
            headers.append((name, value))
        host = environ.get("HTTP_HOST") or (
            f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}")
        headers.append(("Host", host))
        if environ.get("CONTENT_TYPE"):
            headers.append(("Content-Type", environ["CONTENT_TYPE"]))
        _value, cookies = _split_cookie(environ.get("HTTP_COOKIE", ""), self.cookie_name)
        if cookies:
            headers.append(("Cookie", cookies))
        auth = environ.get("HTTP_AUTHORIZATION")
        if auth and auth[:len(PORTAL_TOKEN)].lower() != PORTAL_TOKEN:
            headers.append(("Authorization", auth))
        peer = environ.get("REMOTE_ADDR", "")
        chain = environ.get("HTTP_X_FORWARDED_FOR")
        # Only a proxy on this machine may say who it forwards for; anyone else is the client.
        forwarded_for = f"{chain}, {peer}" if chain and peer in ("127.0.0.1", "::1") else peer
        headers += [
            ("X-Forwarded-For", forwarded_for),
            ("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http")),
            ("X-Forwarded-Host", host + mount),
            *([("X-Forwarded-Prefix", mount)] if mount else []),
        ]
        return headers

    def response_plan(self, manifest: str | None) -> tuple[frozenset[str], list[tuple[str, str]]]:
        """(app headers to drop, headers to add) for a Space's manifest, cached per manifest."""
        key = manifest or ""
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        try:
            data = json.loads(key) if key else {}
        except ValueError:
            data = {}
        custom = data.get("custom_headers") if isinstance(data, dict) else None
        add = [(name, str(value)) for name, value in (custom or {}).items()
               if isinstance(name, str) and name.lower() in CUSTOM_HEADERS]
        drop = {name.lower() for name, _ in add}
        if isinstance(data, dict) and data.get("disable_embedding"):
            drop.add("x-frame-options")
            add += [("X-Frame-Options", "DENY"),
                    ("Content-Security-Policy", "frame-ancestors 'none'")]
        else:
            add.append(("Content-Security-Policy", f"frame-ancestors {self.framers}"))
        plan = (frozenset(drop), add)
        if len(self.plans) > 512:
            self.plans.clear()
        self.plans[key] = plan
        return plan

    def response_headers(self, environ: dict[str, Any], row: dict[str, Any], mount: str,
                         upstream: list[tuple[str, str]]) -> list[tuple[str, str]]:
        drop, add = self.response_plan(row.get("manifest"))
        named = {t.strip().lower() for name, value in upstream
                 if name.lower() == "connection" for t in value.split(",")}
        local = f"{self.router_host}:{row['port']}"
        headers = []
        for name, value in upstream:
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in RESPONSE_OWN or lower in drop or lower in named:
                continue
            if lower == "location":
                value = _rewrite_location(value, mount, environ.get("HTTP_HOST", ""), local)
            elif lower == "set-cookie":
                value = self.rewrite_cookie(value, mount)
                if value is None:
                    continue
            headers.append((name, value))
        return headers + add

    def rewrite_cookie(self, value: str, mount: str) -> str | None:
        """Keep a Space's cookie under its prefix; never let it touch the portal's session."""
        if value.split("=", 1)[0].strip() == self.cookie_name:
            return None

        def under_mount(match: re.Match) -> str:
            path = match.group(2).strip()
            if path.startswith("/") and not (path == mount or path.startswith(mount + "/")):
                path = mount + path
            return match.group(1) + path

        return _COOKIE_PATH.sub(under_mount, value)

    # -- HTTP -----------------------------------------------------------------------------

    def forward(self, environ: dict[str, Any], start_response: Callable, row: dict[str, Any],
                mount: str, target: str, headers: list[tuple[str, str]]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        stream = environ["wsgi.input"]
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self.page(environ, start_response, 400, "Bad Content-Length", None)
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        body = b""
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif length:
            headers.append(("Content-Length", str(length)))
            if length <= SMALL_BODY:
                body = _read_exactly(stream, length)
                if len(body) < length:
                    return self.page(environ, start_response, 400,
                                     "The request body ended early", None)
        head = _request_head(method, target, headers)
        # A streamed body cannot be sent twice, so it gets a fresh connection (a kept-alive
        # one may have been closed by the app just now); the rest may retry once.
        replayable = not chunked and length <= SMALL_BODY
        host, port, backend = self.router_host, row["port"], row["backend_port"]
        for attempt in range(2):
            try:
                conn, reused = self.pool.get(host, port, backend, fresh=not replayable)
            except OSError as exc:
                return self.unreachable(environ, start_response, row, exc)
            try:
                if replayable:
                    conn.sock.sendall(head + body)
                else:
                    conn.sock.sendall(head)
                    _send_body(conn.sock, stream, length, chunked)
                status, reason, upstream = conn.read_head()
                break
            except (OSError, ValueError) as exc:
                conn.close()
                fresh = isinstance(exc, UpstreamClosed) and exc.fresh or isinstance(
                    exc, BrokenPipeError | ConnectionResetError)
                if reused and replayable and attempt == 0 and fresh:
                    continue
                return self.unreachable(environ, start_response, row, exc)
        status_line = f"{status} {reason or _reason(status)}"
        out = self.response_headers(environ, row, mount, upstream)
        kind = ""
        for name, value in upstream:
            if name.lower() == "content-type":
                kind = value.split(";")[0].strip().lower()
        if method != "HEAD" and kind in ("text/html", "text/css"):
            hook = _offline_rewrite()
            if hook is not None:
                rewritten = _rewrite_body(hook, row, kind, upstream,
                                          conn.body(method, status, upstream), out)
                if rewritten is not None:
                    self._finish(host, port, backend, conn)
                    start_response(status_line, rewritten[0])
                    return [rewritten[1]]
        try:
            framing, length, keep = conn.framing(method, status, upstream)
        except ValueError:  # a bad Content-Length: _relay cuts the answer off
            framing, length, keep = "bad", 0, False
        if framing == "none" or framing == "length" and len(conn.buf) >= length:
            # All of it came with the head (most answers): the connection goes back to the
            # pool at once, and gunicorn gets a list, not a generator.
            body, conn.buf = conn.buf[:length], conn.buf[length:]
            conn.reusable = keep
            self._finish(host, port, backend, conn)
            start_response(status_line, out)
            return [body] if body else []
        start_response(status_line, out)
        client = environ.get("gunicorn.socket")
        if framing == "length" and client is not None and method != "HEAD" \
                and length - len(conn.buf) >= SPLICE_BODY \
                and _can_splice(environ, client, conn.sock):
            return self._splice(host, port, backend, conn, client, length, keep)
        return self._relay(host, port, backend, conn, conn.body(method, status, upstream),
                           client)

    def _relay(self, host: str, port: int, backend: Any, conn: Upstream,
               chunks: Iterator[bytes], client: socket.socket | None) -> Iterator[bytes]:
        done = False
        try:
            yield from chunks
            done = True
        except (OSError, ValueError):
            # The app broke off mid-answer. Cut the visitor's connection too, so that the
            # answer does not look complete (gunicorn would end a chunked body cleanly); its
            # write to the closed socket is an EPIPE it ignores.
            if client is not None:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
        finally:
            if done:
                self._finish(host, port, backend, conn)
            else:  # the visitor left mid-stream, or the app broke off: drop the connection
                conn.close()

    def _splice(self, host: str, port: int, backend: Any, conn: Upstream,
                client: socket.socket, length: int, keep: bool) -> Iterator[bytes]:
        done = False
        try:
            # gunicorn sends the status line and headers for the first item, even an empty
            # one; the body then goes straight to its socket, and the connection stays
            # kept-alive (gunicorn counts on the Content-Length it was given).
            yield b""
            conn.splice_to(client, length)
            conn.reusable = keep
            done = True
        except (OSError, ValueError):
            # The app broke off, or the visitor left: the answer is cut short, so the
            # visitor's connection must end too (see _relay).
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        finally:
            if done:
                self._finish(host, port, backend, conn)
            else:
                conn.close()

    def _finish(self, host: str, port: int, backend: Any, conn: Upstream) -> None:
        if conn.reusable:
            self.pool.put(host, port, backend, conn)
        else:
            conn.close()

    def unreachable(self, environ: dict[str, Any], start_response: Callable,
                    row: dict[str, Any], exc: Exception) -> Iterable[bytes]:
        space_id = row["id"]
        if row["desired"] != "running" or row["stage"] in ("STOPPED", "PAUSED"):
            return self.page(environ, start_response, 503, f"Space {space_id} is not running",
                             "start it from its page (or 'appliance spaces start "
                             f"{space_id}')", space=space_id)
        if isinstance(exc, ConnectionRefusedError):
            message = f"Space {space_id} is not answering: its port {row['port']} refused " \
                      "the connection"
        else:
            message = f"Space {space_id} broke off the request ({exc})"
        return self.page(environ, start_response, 502, message,
                         "start or restart it from its page, and look at its logs if it "
                         f"keeps failing (or 'appliance spaces restart {space_id}')",
                         space=space_id)

    # -- WebSockets -----------------------------------------------------------------------

    def tunnel(self, environ: dict[str, Any], start_response: Callable, row: dict[str, Any],
               mount: str, target: str, headers: list[tuple[str, str]]) -> Iterable[bytes]:
        client = environ.get("gunicorn.socket")
        if client is None:
            return self.page(environ, start_response, 501,
                             "WebSockets need the portal as 'appliance serve' runs it", None)
        try:
            conn = Upstream(self.router_host, row["port"])
        except OSError as exc:
            return self.unreachable(environ, start_response, row, exc)
        headers += [("Connection", "Upgrade"), ("Upgrade", environ["HTTP_UPGRADE"])]
        try:
            conn.sock.settimeout(HANDSHAKE_TIMEOUT)
            conn.sock.sendall(_request_head(environ["REQUEST_METHOD"], target, headers))
            status, reason, upstream = conn.read_head(upgrade=True)
            if status != 101:  # the app refused the upgrade: an ordinary answer
                body = b"".join(conn.body(environ["REQUEST_METHOD"], status, upstream))
        except (OSError, ValueError) as exc:
            conn.close()
            return self.unreachable(environ, start_response, row, exc)
        if status != 101:
            conn.close()
            out = [(n, v) for n, v in self.response_headers(environ, row, mount, upstream)
                   if n.lower() != "content-length"]
            return _send(start_response, f"{status} {reason or _reason(status)}", out, body)
        lines = [f"HTTP/1.1 101 {reason or 'Switching Protocols'}"]
        lines += [f"{name}: {value}" for name, value in upstream]
        early = _take_buffered(environ)
        try:
            client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + conn.buf)
        except OSError:
            conn.close()
            raise StopIteration from None
        conn.sock.settimeout(None)
        # Take the visitor's socket away from gunicorn: detached, gunicorn's own close of it
        # is a no-op, and StopIteration is how its workers end a connection without a
        # response and without logging (gthread: handle() closes the connection quietly).
        mine = socket.socket(fileno=client.detach())
        threading.Thread(target=_pump, args=(mine, conn.sock, early),
                         name=f"websocket {row['id']}", daemon=True).start()
        raise StopIteration

    # -- pages ------------------------------------------------------------------------------

    def page(self, environ: dict[str, Any], start_response: Callable, status: int,
             message: str, hint: str | None, json_too: bool = False, space: str | None = None,
             extra: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
        """Answer with the portal's error page (or its JSON envelope for API clients)."""
        line = f"{status} {_reason(status)}"
        headers = [("Cache-Control", "no-store"), *(extra or [])]
        accept = environ.get("HTTP_ACCEPT", "")
        if "text/html" not in accept and (json_too or "application/json" in accept):
            from .web import error_body

            body = json.dumps(error_body(status, message, hint)).encode()
            return _send(start_response, line, [*headers, ("Content-Type", "application/json")],
                         body)
        body = self._render(environ, status, message, hint, space)
        return _send(start_response, line,
                     [*headers, ("Content-Type", "text/html; charset=utf-8")], body)

    def _render(self, environ: dict[str, Any], status: int, message: str, hint: str | None,
                space: str | None) -> bytes:
        from markupsafe import escape

        link = environ.get("SCRIPT_NAME", "") + "/"
        if self.apps_port and environ.get("SERVER_PORT") == str(self.apps_port):
            # On the apps' origin: a plain page (nothing of the portal's, no session in it)
            # whose link leads back to the portal's origin.
            link = f"{self.portal_origin(environ)}/" + (f"spaces/{space}" if space else "")
        else:
            try:
                from flask import render_template, url_for

                with self.flask.request_context(environ):
                    if space:
                        owner, name = space.split("/", 1)
                        with contextlib.suppress(Exception):
                            link = url_for("pages.space", owner=owner, name=name)
                        hint = (hint or "").replace("its page", f"its page ({link})")
                    return render_template("error.html", status=status, message=message,
                                           hint=hint).encode()
            except Exception:  # no templates or pages (a bare app): a page of its own
                pass
        back = "Open its page" if space else "Back to the Spaces"
        return (f"<!doctype html><html lang=en><meta charset=utf-8>"
                f"<title>{status} {escape(message)}</title>"
                "<body style='font-family:sans-serif;margin:10vh auto;max-width:40em'>"
                f"<h1>{status} — {escape(message)}</h1>"
                + (f"<p>{escape(hint)}</p>" if hint else "")
                + f"<p><a href='{escape(link)}'>{back}</a></p>\n").encode()


# -- helpers ----------------------------------------------------------------------------------


def _hostname(environ: dict[str, Any]) -> str:
    """The host the visitor addressed, without its port ("[::1]" stays bracketed)."""
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "localhost")
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _host_slug(environ: dict[str, Any], domain: str) -> str | None:
    """OWNER--NAME when the visitor addressed OWNER--NAME.DOMAIN, else None."""
    if not domain:
        return None
    host = _hostname(environ).lower()
    label, dot, rest = host.partition(".")
    return label if dot and rest == domain.lower() and "--" in label else None


def _raw_target(environ: dict[str, Any]) -> str:
    """The request target as the visitor sent it (path and query)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    query = environ.get("QUERY_STRING")
    target = quote((environ.get("PATH_INFO") or "/").encode("latin-1"), safe="/:@!$&'()*+,;=~")
    return f"{target}?{query}" if query else target


def apps_url(environ: dict[str, Any], config: Any, space_id: str) -> str:
    """Where a visitor's browser reaches a Space's app: its own host under the apps domain,
    the apps' origin, or the portal's."""
    if not config.portal_apps_port:
        return space_path(space_id)
    slug = space_path(space_id)[len(PREFIX):].rstrip("/")
    if config.portal_apps_domain and re.fullmatch(r"[a-z0-9-]{1,63}", slug):
        return (f"{environ.get('wsgi.url_scheme', 'http')}://{slug.lower()}."
                f"{config.portal_apps_domain}:{config.portal_apps_port}/")
    return (f"{environ.get('wsgi.url_scheme', 'http')}://{_hostname(environ)}:"
            f"{config.portal_apps_port}{space_path(space_id)}")


def _send(start_response: Callable, status: str, headers: list[tuple[str, str]],
          body: bytes) -> list[bytes]:
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


def _can_splice(environ: dict[str, Any], client: Any, upstream: socket.socket) -> bool:
    """Whether a body may bypass gunicorn: plain HTTP/1.x on blocking sockets (not TLS,
    whose bytes gunicorn must encrypt, nor HTTP/2, which frames them)."""
    return (type(client) is socket.socket and client.gettimeout() is None
            and upstream.gettimeout() is None
            and environ.get("SERVER_PROTOCOL", "").startswith("HTTP/1."))



def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _is_websocket(environ: dict[str, Any]) -> bool:
    return environ.get("HTTP_UPGRADE", "").lower() == "websocket" and "upgrade" in {
        t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}


_NAMES: dict[str, str | None] = {}


def _forwarded_name(key: str) -> str | None:
    """The header an environ key carries ("HTTP_X_APP" → "X-App"), if the app may see it as
    the visitor sent it; None for anything else. Remembered: the same few keys come each time."""
    name = None
    if key.startswith("HTTP_"):
        lower = key[5:].replace("_", "-").lower()
        if lower not in HOP_BY_HOP and lower not in REQUEST_OWN:
            name = lower.title()
    if len(_NAMES) < 4096:
        _NAMES[key] = name
    return name


def _split_cookie(header: str, name: str) -> tuple[str | None, str]:
    """Return (the named cookie's value, the Cookie header without it)."""
    if name not in header:
        return None, header
    value = None
    kept = []
    for part in header.split(";"):
        key, _eq, val = part.strip().partition("=")
        if key == name:
            value = val
        elif part.strip():
            kept.append(part.strip())
    return value, "; ".join(kept)


def _upstream_target(environ: dict[str, Any], slug: str) -> str:
    """The request target for the app: the part after /s/<slug>, as the visitor sent it."""
    marker = environ.get("SCRIPT_NAME", "") + PREFIX + slug + "/"
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if raw.startswith(marker):
        return raw[len(marker) - 1:]
    rest = environ["PATH_INFO"][len(PREFIX) + len(slug):]
    target = quote(rest.encode("latin-1"), safe="/:@!$&'()*+,;=~")
    query = environ.get("QUERY_STRING")
    return f"{target}?{query}" if query else target


def _rewrite_location(value: str, mount: str, portal_host: str, local: str) -> str:
    """Keep a redirect to the app's own root under the Space's prefix."""
    if value.startswith("/") and not value.startswith("//"):
        if value == mount or value.startswith((mount + "/", mount + "?")):
            return value
        return mount + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or parts.netloc not in (local, portal_host):
        return value
    path = parts.path or "/"
    if not (path == mount or path.startswith(mount + "/")):
        path = mount + path
    if parts.netloc == local:  # the app named its own port: make it relative to the portal
        return urlunsplit(("", "", path, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _read_exactly(stream: Any, length: int) -> bytes:
    parts = []
    while length > 0:
        data = stream.read(min(length, CHUNK))
        if not data:
            break
        parts.append(data)
        length -= len(data)
    return b"".join(parts)


def _request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers
              if "\n" not in value and "\r" not in value]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send_body(sock: socket.socket, stream: Any, length: int, chunked: bool) -> None:
    """Stream the visitor's body to the app, a piece at a time."""
    if chunked:
        while data := stream.read(CHUNK):
            sock.sendall(b"%X\r\n%b\r\n" % (len(data), data))
        sock.sendall(b"0\r\n\r\n")
        return
    while length > 0:
        data = stream.read(min(length, CHUNK))
        if not data:
            raise ConnectionAbortedError("the visitor's upload ended early")
        sock.sendall(data)
        length -= len(data)


_NO_HOOK = object()
_hook: Any = _NO_HOOK


def _offline_rewrite() -> Callable | None:
    """appliance.web_offline.rewrite when that module exists, else None (looked up once)."""
    global _hook
    if _hook is _NO_HOOK:
        try:
            from . import web_offline

            _hook = getattr(web_offline, "rewrite", None)
        except ImportError:
            _hook = None
    return _hook


def _rewrite_body(hook: Callable, row: dict[str, Any], kind: str,
                  upstream: list[tuple[str, str]], chunks: Iterator[bytes],
                  headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bytes] | None:
    """Give a small HTML or CSS body to web_offline.rewrite; None leaves it to stream."""
    values = {name.lower(): value for name, value in upstream}
    declared = values.get("content-length")
    encoding = values.get("content-encoding", "identity").strip().lower()
    if declared is None or "transfer-encoding" in values or not declared.isdigit() \
            or encoding not in ("identity", "gzip", "deflate"):
        return None  # an unknown length may be a page streamed on purpose
    if int(declared) > REWRITE_LIMIT:
        return None
    body = b"".join(chunks)
    try:
        plain = body if encoding == "identity" else zlib.decompress(body, 47)
        result = hook(row, kind, plain)
    except Exception:  # a broken rewrite must not break the Space: send it as it came
        result = None
    drop = {"content-length"} if result is None else {"content-length", "content-encoding"}
    body = body if result is None else result
    kept = [(n, v) for n, v in headers if n.lower() not in drop]
    return [*kept, ("Content-Length", str(len(body)))], body


def _take_buffered(environ: dict[str, Any]) -> bytes:
    """Bytes the visitor sent right behind the upgrade request, already read by gunicorn."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    take = getattr(getattr(reader, "unreader", None), "take_buffered", None)
    try:
        return take() if callable(take) else b""
    except Exception:
        return b""


def _pump(client: socket.socket, upstream: socket.socket, early: bytes) -> None:
    """Relay bytes both ways until both sides have closed (or one breaks)."""
    selector = selectors.DefaultSelector()
    try:
        if early:
            upstream.sendall(early)
        client.settimeout(None)
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        open_sides = 2
        while open_sides:
            events = selector.select(None if open_sides == 2 else HALF_CLOSE_SECONDS)
            if not events:
                return
            for key, _mask in events:
                source, sink = key.fileobj, key.data
                data = source.recv(CHUNK)
                if data:
                    sink.sendall(data)
                    continue
                selector.unregister(source)
                open_sides -= 1
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # one side reset or vanished: nothing to tell anyone
    finally:
        selector.close()
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.close()
