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

import base64
import binascii
import contextlib
import functools
import ipaddress
import json
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from flask import Flask

from .. import users
from ..adapters.store import Store
from ..core.sources import validate_space_id
from ..errors import InvalidInput, Unauthorized
from .base import parse_bearer
from .upstream import (
    Upstream,
    UpstreamClosed,
    UpstreamPool,
    pump,
    read_exactly,
    request_head,
    send_body,
)

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
# Bodies of known length from this size on are spliced to the visitor (under gunicorn);
# smaller ones pass through Python, where a pipe's set-up would cost more than the copy.
SPLICE_BODY = 128 * 1024
SMALL_BODY = 64 * 1024  # request bodies up to this are read first, sent with the head, replayable
REWRITE_LIMIT = 2 << 20  # offline.rewrite sees text/html and text/css up to this size
HANDSHAKE_TIMEOUT = 60.0
# A Space's port that refuses a connection is tried again for this long before the 502: the
# router is starting (a Space's first deploy) or being restarted, which takes a moment.
REFUSED_GRACE_SECONDS = 2.0
CACHED_ROWS = 512  # Space rows (and slugs) a thread keeps between requests
# Each system call a request makes lets the worker's other threads take the GIL, and with
# dozens of threads every hand-off costs more CPU than the call itself; so whether the
# database changed (a Space's port, visibility, manifest) is asked at most this often per
# thread: a change reaches the proxy within this much time. (The pool's QUIET_SECONDS in
# web_upstream is the same economy.)
ROW_CHECK_SECONDS = 0.2
_UNSEEN = object()
_HOST_SYNTAX = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_COOKIE_PATH = re.compile(r"(;\s*path\s*=\s*)([^;]*)", re.IGNORECASE)
_COOKIE_DOMAIN = re.compile(r";\s*domain\s*=[^;]*", re.IGNORECASE)


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
                        f"{_hostname(environ, self.config)}:{self.apps_port}{quote(path)}"
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
        token = parse_bearer(environ.get("HTTP_AUTHORIZATION"))
        if token and token.startswith(users.TOKEN_PREFIX):
            try:
                users.caller_for_token(self.store(), token)
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
        sid = data.get("sid") if isinstance(data, dict) else None
        found = users.caller_for_session(self.store(), sid)  # ended or expired: anonymous
        return found.user if found else None

    def portal_origin(self, environ: dict[str, Any]) -> str:
        """The portal's pages as seen from the apps' origin (or a Space's own host)."""
        host = (self.apps_domain if "appliance.host_slug" in environ
                else _hostname(environ, self.config))
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
        cookies = _without_cookie(environ.get("HTTP_COOKIE", ""), self.cookie_name)
        if cookies:
            headers.append(("Cookie", cookies))
        auth = environ.get("HTTP_AUTHORIZATION")
        if auth and not _carries_portal_token(auth):
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
        """Keep a Space's cookie on its own host and under its prefix; never let it touch the
        portal's session.

        A cookie with no name ("=x=1" or "x") is dropped: a browser sends it back as its bare
        value, so "=appliance_session=forged" would come back as the portal's cookie. Domain
        goes, so the cookie stays host-only: a Space on its own host (OWNER--NAME.DOMAIN)
        cannot set cookies for the portal's host or another Space's.
        """
        pair = value.split(";", 1)[0]
        name, equals, _ = pair.partition("=")
        name = name.strip()
        if not equals or not name or name.lower() == self.cookie_name.lower():
            return None
        value = _COOKIE_DOMAIN.sub("", value)

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
                body = read_exactly(stream, length)
                if len(body) < length:
                    return self.page(environ, start_response, 400,
                                     "The request body ended early", None)
        head = request_head(method, target, headers)
        # A streamed body cannot be sent twice, so it gets a fresh connection (a kept-alive
        # one may have been closed by the app just now); the rest may retry once.
        replayable = not chunked and length <= SMALL_BODY
        host, port, backend = self.router_host, row["port"], row["backend_port"]
        for attempt in range(2):
            try:
                conn, reused = self.connect(host, port, backend, fresh=not replayable)
            except OSError as exc:
                return self.unreachable(environ, start_response, row, exc)
            try:
                if replayable:
                    conn.sock.sendall(head + body)
                else:
                    conn.sock.sendall(head)
                    send_body(conn.sock, stream, length, chunked)
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

    def connect(self, host: str, port: int, backend: Any, fresh: bool) -> tuple[Upstream, bool]:
        """The pool's connection to a Space's port, trying a refused one again for
        REFUSED_GRACE_SECONDS before giving up (OSError)."""
        deadline = time.monotonic() + REFUSED_GRACE_SECONDS
        while True:
            try:
                return self.pool.get(host, port, backend, fresh=fresh)
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

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
            conn, _ = self.connect(self.router_host, row["port"], row["backend_port"],
                                   fresh=True)
        except OSError as exc:
            return self.unreachable(environ, start_response, row, exc)
        headers += [("Connection", "Upgrade"), ("Upgrade", environ["HTTP_UPGRADE"])]
        try:
            conn.sock.settimeout(HANDSHAKE_TIMEOUT)
            conn.sock.sendall(request_head(environ["REQUEST_METHOD"], target, headers))
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
        threading.Thread(target=pump, args=(mine, conn.sock, early),
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
            from .base import error_body

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


def _host_header(environ: dict[str, Any]) -> str:
    """The host the visitor addressed, without its port ("[::1]" stays bracketed)."""
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "localhost")
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _hostname(environ: dict[str, Any], config: Any) -> str:
    """The host to write into links, redirects and the Space page's iframe: the one the
    visitor addressed when it is one of the portal's own names or addresses, else the address
    the connection came in on (or public_host), so a forged Host header is never reflected."""
    host = _host_header(environ)
    if _is_own_host(host, environ, config):
        return host
    return _local_address(environ) or config.public_host


@functools.cache
def _machine_names() -> frozenset[str]:
    name = socket.gethostname().lower()
    return frozenset({"localhost", name, f"{name}.local"})


def _is_own_host(host: str, environ: dict[str, Any], config: Any) -> bool:
    name = host.strip("[]").lower().rstrip(".")
    if not name or not _HOST_SYNTAX.fullmatch(host):
        return False
    domain = config.portal_apps_domain.strip(".").lower()
    if domain and (name == domain or name.endswith("." + domain)):
        return True
    if name == config.public_host.strip("[]").lower() or name in _machine_names():
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    local = _local_address(environ)
    if local is None:  # no socket to ask (a test client): the address the server was given
        return address.is_loopback or name == environ.get("SERVER_NAME", "").strip("[]")
    return address.is_loopback or name == local.strip("[]").lower()


def _local_address(environ: dict[str, Any]) -> str | None:
    """The address of this machine the visitor's connection arrived on (bracketed IPv6)."""
    for key in ("gunicorn.socket", "werkzeug.socket"):
        sock = environ.get(key)
        if sock is None:
            continue
        try:
            address = ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            continue
        mapped = getattr(address, "ipv4_mapped", None)
        address = mapped or address
        return f"[{address}]" if address.version == 6 else str(address)
    return None


def _host_slug(environ: dict[str, Any], domain: str) -> str | None:
    """OWNER--NAME when the visitor addressed OWNER--NAME.DOMAIN, else None."""
    if not domain:
        return None
    host = _host_header(environ).lower()
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
    return (f"{environ.get('wsgi.url_scheme', 'http')}://{_hostname(environ, config)}:"
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
    """Return (the named cookie's value as Flask reads it: the first, split on ';', and the
    Cookie header without it)."""
    if name not in header:
        return None, header
    value = None
    for part in header.split(";"):
        key, _eq, val = part.strip().partition("=")
        if key == name and value is None:
            value = val
    return value, _without_cookie(header, name)


def _without_cookie(header: str, name: str) -> str:
    """The Cookie header(s) without every copy of the named cookie. A server joins repeated
    Cookie headers with ',' (gunicorn does), so a ',' ends the portal's cookie as ';' does
    (the app's own values keep their commas)."""
    if name not in header:
        return header
    kept = []
    for part in header.split(";"):
        pieces = [p for p in part.split(",") if p.strip().partition("=")[0].strip() != name]
        text = ",".join(pieces).strip()
        if text:
            kept.append(text)
    return "; ".join(kept)


def _carries_portal_token(header: str) -> bool:
    """Whether an Authorization header holds a portal token in any form: Bearer however
    spaced or cased, one of several joined headers, or inside Basic credentials."""
    if users.TOKEN_PREFIX in header:
        return True
    for value in header.split(","):
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(rest.strip() + "==", validate=False)
            except (ValueError, binascii.Error):
                continue
            if users.TOKEN_PREFIX.encode() in decoded:
                return True
    return False


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


_NO_HOOK = object()
_hook: Any = _NO_HOOK


def _offline_rewrite() -> Callable | None:
    """appliance.offline.rewrite when that module exists, else None (looked up once)."""
    global _hook
    if _hook is _NO_HOOK:
        try:
            from . import offline

            _hook = getattr(offline, "rewrite", None)
        except ImportError:
            _hook = None
    return _hook


def _rewrite_body(hook: Callable, row: dict[str, Any], kind: str,
                  upstream: list[tuple[str, str]], chunks: Iterator[bytes],
                  headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bytes] | None:
    """Give a small HTML or CSS body to offline.rewrite; None leaves it to stream."""
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
