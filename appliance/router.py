"""The front router: a stable port per Space, forwarded to whichever container serves it now.

Each Space keeps one port for its whole life (its `url`); containers come and go on other
ports. The router reads the routes from SQLite (the source of truth, so a restarted router
picks up where it was), forwards TCP, and publishes what it applied and how many connections
each backend still holds in a small state file, so a switch can wait until the new route is
live and the old container has drained before stopping it. It also records when each Space
last saw a request (for sleeping) and, for a sleeping Space, asks for a wake and answers with
a "waking up" page that refreshes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .config import SETTINGS, Config
from .store import Store

POLL_SECONDS = 0.05
WAKING_BODY = (
    b"<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>"
    b"<title>Waking up</title></head><body style='font-family:sans-serif;text-align:center;"
    b"margin-top:20vh'><h1>This Space is waking up&hellip;</h1><p>The page continues by "
    b"itself once the app is ready.</p></body></html>\n"
)
WAKING = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Retry-After: 2\r\nCache-Control: no-store\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(WAKING_BODY)).encode() + b"\r\n\r\n" + WAKING_BODY
)
FLUSH_SECONDS = 2.0
NOT_RUNNING = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: 68\r\n\r\n"
    b"This Space is not running. Start it with 'appliance spaces start'.\r\n"
)


def run_dir(config: Config) -> Path:
    return config.data_path / "run"


def state_path(config: Config) -> Path:
    return run_dir(config) / "router.json"


def pid_path(config: Config) -> Path:
    return run_dir(config) / "router.pid"


class Router:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.db_path)
        self.routes: dict[int, int | None] = {}
        self.servers: dict[int, asyncio.base_events.Server] = {}
        self.connections: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.sleeping: set[int] = set()
        self.last_seen: dict[int, str] = {}
        self.open: dict[int, int] = {}  # open connections per Space port
        self.wakes: set[int] = set()
        self._dirty = True
        self._stopping = asyncio.Event()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    async def _handle(self, port: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        backend = self.routes.get(port)
        self.last_seen[port] = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.open[port] = self.open.get(port, 0) + 1
        upstream = None
        if backend:
            self.connections[backend] = self.connections.get(backend, 0) + 1
            self._dirty = True
            try:
                upstream = await asyncio.open_connection("127.0.0.1", backend)
            except OSError:
                upstream = None
        try:
            if upstream is None:
                if port in self.sleeping:
                    self.wakes.add(port)  # the scheduler starts it; the page refreshes itself
                    writer.write(WAKING)
                else:
                    writer.write(NOT_RUNNING)
                await writer.drain()
                return
            up_reader, up_writer = upstream
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            up_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open[port] -= 1
            if backend:
                self.connections[backend] -= 1
                self._dirty = True
            with contextlib.suppress(Exception):
                writer.close()

    async def _apply(self, wanted: dict[int, int | None]) -> None:
        for port in list(self.servers):
            if port not in wanted:
                self.servers.pop(port).close()
                self.routes.pop(port, None)
                self._dirty = True
        for port, backend in wanted.items():
            if port not in self.servers and port not in self.errors:
                try:
                    self.servers[port] = await asyncio.start_server(
                        lambda r, w, p=port: self._handle(p, r, w),
                        self.config.router_host, port, reuse_address=True)
                except OSError as exc:
                    self.errors[port] = f"cannot listen on {self.config.router_host}:{port}: " \
                                        f"{exc.strerror}"
                self._dirty = True
            if self.routes.get(port, -1) != backend:
                self.routes[port] = backend
                self._dirty = True

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(), "at": time.time(),
            "routes": {str(p): b for p, b in self.routes.items() if p in self.servers},
            "connections": {str(b): n for b, n in self.connections.items() if n},
            "errors": {str(p): e for p, e in self.errors.items()},
        }
        target = state_path(self.config)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, target)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        last_write = last_flush = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                await self._apply(self.store.routes())
                self.sleeping = self.store.sleeping_ports()
            # An open connection is a Space in use (a WebSocket, an SSE stream, the portal's
            # kept-alive requests): it counts as a request at every flush, not only when opened.
            busy = [port for port, count in self.open.items() if count]
            if (self.last_seen or self.wakes or busy) and (
                    self.wakes or time.monotonic() - last_flush > FLUSH_SECONDS):
                stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
                self.last_seen.update(dict.fromkeys(busy, stamp))
                with contextlib.suppress(Exception):
                    self.store.record_requests(self.last_seen, self.wakes)
                    self.last_seen, self.wakes = {}, set()
                last_flush = time.monotonic()
            if self._dirty or time.monotonic() - last_write > 1:
                self._write_state()
                self._dirty = False
                last_write = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), POLL_SECONDS)
        for server in self.servers.values():
            server.close()


def main() -> None:
    """Run the router in the foreground until SIGTERM."""
    from .config import load_config

    config = load_config()
    run_dir(config).mkdir(parents=True, exist_ok=True)
    pid_path(config).write_text(str(os.getpid()))
    try:
        asyncio.run(Router(config).serve())
    finally:
        with contextlib.suppress(OSError):
            pid_path(config).unlink()


# -- client side: used by the services that switch routes ------------------------------------


def read_state(config: Config) -> dict:
    try:
        return json.loads(state_path(config).read_text())
    except (OSError, ValueError):
        return {}


def router_pid(config: Config) -> int | None:
    try:
        pid = int(pid_path(config).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def ensure_router(config: Config) -> int:
    """Start the router in the background unless it runs; return its pid."""
    pid = router_pid(config)
    if pid:
        return pid
    run_dir(config).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS}}
    log = open(run_dir(config) / "router.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "appliance.router"], env=env, cwd="/",
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if router_pid(config) and read_state(config).get("pid") == process.pid:
            return process.pid
        time.sleep(0.05)
    return process.pid


def stop_router(config: Config) -> None:
    pid = router_pid(config)
    if pid:
        os.kill(pid, signal.SIGTERM)


def wait_route(config: Config, port: int, backend: int | None, timeout: float = 10) -> None:
    """Block until the router forwards port to backend (None: serves 'not running')."""
    ensure_router(config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(config)
        if str(port) in state.get("errors", {}):
            from .errors import RuntimeUnavailable

            raise RuntimeUnavailable(
                f"The router {state['errors'][str(port)]}",
                hint="another program holds that port; stop it or narrow APPLIANCE_PORT_RANGE")
        if state.get("routes", {}).get(str(port)) == backend:
            return
        time.sleep(POLL_SECONDS)


def wait_drained(config: Config, backend: int, timeout: float) -> None:
    """Block until no connection through the router still uses backend (or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not read_state(config).get("connections", {}).get(str(backend)):
            return
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    main()
