"""The proxy's side toward the Spaces: HTTP/1.1 connections to a Space's port, kept alive in
a pool shared by a worker's threads, and the byte relays (splice for large bodies, a two-way
pump for WebSockets) that web_proxy's middleware drives.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

CHUNK = 256 * 1024
HEAD_READ = 64 * 1024  # what one read takes while looking for the head's end
MAX_HEAD = 64 * 1024
PIPE_BYTES = 256 * 1024  # a spliced body's pipe, held for that response only
CONNECT_TIMEOUT = 5.0
# Idle upstream connections are closed after this: under uvicorn's 5 s keep-alive (so a
# reused one is rarely half-closed) and short, so that a route switch's drain is not held
# up by connections nobody uses.
POOL_IDLE_SECONDS = 2.0
# A kept-alive connection is retired after this, busy or not: the router marks a Space as
# used (for sleeping) when a connection opens, not per request on it.
POOL_MAX_AGE_SECONDS = 30.0
POOL_MAX_IDLE = 32  # idle connections kept per Space port and process
# A pooled connection used this recently is not checked for a close before its reuse (each
# system call lets the worker's other threads take the GIL, a costly hand-off): one the app
# closed just now fails at once, and the request is sent again on a new one.
QUIET_SECONDS = 0.1
HALF_CLOSE_SECONDS = 30.0  # a tunnel whose one side closed waits this long for the other
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")


# -- connections ---------------------------------------------------------------------------------


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


# -- bodies and tunnels ----------------------------------------------------------------------


def read_exactly(stream: Any, length: int) -> bytes:
    parts = []
    while length > 0:
        data = stream.read(min(length, CHUNK))
        if not data:
            break
        parts.append(data)
        length -= len(data)
    return b"".join(parts)


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers
              if "\n" not in value and "\r" not in value]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def send_body(sock: socket.socket, stream: Any, length: int, chunked: bool) -> None:
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


def pump(client: socket.socket, upstream: socket.socket, early: bytes) -> None:
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
