"""The front router: a stable port per Space, forwarded to whichever container serves it now.

Each Space keeps one port for its whole life (its `url`); containers come and go on other
ports. The router reads the routes from SQLite (the source of truth, so a restarted router
picks up where it was), forwards TCP, and publishes what it applied and how many connections
each backend still holds in a small state file, so a switch can wait until the new route is
live and the old container has drained before stopping it. It also records when each Space
last saw a request (for sleeping) and, for a sleeping Space, asks for a wake and answers with
a "waking up" page that refreshes itself.

Bytes are relayed with splice(2), socket to a kernel pipe to socket, so that the router never
copies a body through Python: on a small box the router, the portal, the app and the visitor
share the same cores, and copying was most of what the router cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ..config import SETTINGS, Config
from .store import Store

POLL_SECONDS = 0.05
LISTEN_RETRY_SECONDS = 5.0  # a port another program held is tried again this often
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
BACKLOG = 100
# A pipe is lent to a connection only while bytes move through it, so idle connections (the
# portal's kept-alive ones, quiet WebSockets) hold none. Pipe capacity counts against the
# user's pipe-user-pages-soft budget, which the Spaces' containers share: 256 KiB moves a
# large body in few calls without taking much of it.
PIPE_BYTES = 256 * 1024
IDLE_PIPES = 8
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
RECV_BYTES = 65536
LINGER_SECONDS = 2.0
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


def lock_path(config: Config) -> Path:
    """The file the serving router holds locked for as long as it runs."""
    return run_dir(config) / "router.lock"


def start_lock_path(config: Config) -> Path:
    """The file held while a process checks for a router and starts one."""
    return run_dir(config) / "router-start.lock"


@contextlib.contextmanager
def _flocked(path: Path, operation: int):
    """Hold an flock on path (its own open file, so threads of one process exclude each
    other too); raises BlockingIOError where operation has LOCK_NB and it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield fd
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


class Router:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.db_path)
        self.routes: dict[int, int | None] = {}
        self.servers: dict[int, Listener] = {}
        self.connections: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.failed_at: dict[int, float] = {}  # when listening on an errored port last failed
        self.sleeping: set[int] = set()
        self.last_seen: dict[int, str] = {}
        self.open: dict[int, int] = {}  # open connections per Space port
        self.wakes: set[int] = set()
        self._dirty = True
        self._stopping = asyncio.Event()
        self.pipes = Pipes()
        self.tasks: set[asyncio.Task] = set()

    async def _handle(self, port: int, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backend = self.routes.get(port)
        self.last_seen[port] = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.open[port] = self.open.get(port, 0) + 1
        upstream = None
        relays: tuple[Relay, ...] = ()
        if backend:
            self.connections[backend] = self.connections.get(backend, 0) + 1
            self._dirty = True
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            try:
                await loop.sock_connect(upstream, ("127.0.0.1", backend))
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                upstream.close()
                upstream = None
        try:
            if upstream is None:
                if port in self.sleeping:
                    self.wakes.add(port)  # the scheduler starts it; the page refreshes itself
                    await loop.sock_sendall(client, WAKING)
                else:
                    await loop.sock_sendall(client, NOT_RUNNING)
                await _linger(loop, client)
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relays = (Relay(loop, self.pipes, client, upstream),
                      Relay(loop, self.pipes, upstream, client))
            await asyncio.gather(*(relay.done for relay in relays))
        except OSError:
            pass
        finally:
            for relay in relays:
                relay.stop()
            self.open[port] -= 1
            if backend:
                self.connections[backend] -= 1
                self._dirty = True
            for sock in (client, upstream):
                if sock is not None:
                    sock.close()

    async def _accept(self, port: int, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _address = await loop.sock_accept(listener)
            except OSError:  # out of file descriptors, say: try again shortly
                await asyncio.sleep(POLL_SECONDS)
                continue
            task = asyncio.create_task(self._handle(port, client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _apply(self, wanted: dict[int, int | None]) -> None:
        for port in list(self.servers):
            if port not in wanted:
                self.servers.pop(port).close()
                self.routes.pop(port, None)
                self._dirty = True
        for port in [p for p in self.errors if p not in wanted]:
            del self.errors[port], self.failed_at[port]
            self._dirty = True
        now = time.monotonic()
        for port, backend in wanted.items():
            # A port another program held is tried again now and then: it may have let go.
            if port not in self.servers and (
                    port not in self.errors
                    or now - self.failed_at[port] >= LISTEN_RETRY_SECONDS):
                try:
                    sockets = _listen(self.config.router_host, port)
                except OSError as exc:
                    self.errors[port] = f"cannot listen on {self.config.router_host}:{port}: " \
                                        f"{exc.strerror}"
                    self.failed_at[port] = now
                else:
                    self.servers[port] = Listener(sockets, [
                        asyncio.create_task(self._accept(port, sock)) for sock in sockets])
                    self.errors.pop(port, None)
                    self.failed_at.pop(port, None)
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
        # A name of this process's own: a router starting while another stops must not
        # rename the other's half-written file.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
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
        self.pipes.close()


class Listener:
    """A Space port's listening sockets and the tasks accepting on them."""

    def __init__(self, sockets: list[socket.socket], tasks: list[asyncio.Task]):
        self.sockets = sockets
        self.tasks = tasks

    def close(self) -> None:
        """Stop accepting; connections already made carry on."""
        loop = asyncio.get_running_loop()
        for task in self.tasks:
            task.cancel()
        for sock in self.sockets:
            # Unregistered now, not when the cancelled task next runs: by then a new listener
            # may have been given the same file descriptor number.
            loop.remove_reader(sock.fileno())
            sock.close()


class Relay:
    """One direction of a connection: bytes from source to sink through a borrowed pipe.

    Driven by the event loop's callbacks rather than a coroutine: while the sink keeps up,
    source stays registered for reading, so a request or a response costs one wake-up and
    two splice calls, with no registration changes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pipes: Pipes, source: socket.socket,
                 sink: socket.socket):
        self.loop = loop
        self.pipes = pipes
        self.source, self.sink = source, sink
        self.src, self.dst = source.fileno(), sink.fileno()
        self.pipe: tuple[int, int, int] | None = None
        self.held = 0  # bytes in the pipe, not yet passed on
        self.blocked = False  # waiting for the sink to take more, not for the source
        self.stopped = False
        self.done = loop.create_future()
        loop.add_reader(self.src, self._readable)

    def _readable(self) -> None:
        try:
            if self.pipe is None:
                self.pipe = self.pipes.take()
            _read, write, size = self.pipe
            try:
                moved = os.splice(self.src, write, size, flags=SPLICE)
            except BlockingIOError:
                # Readable, yet nothing to splice: TCP urgent data stops splice at its mark
                # and leaves the socket readable; recv() steps past it.
                data = self.source.recv(size)
                moved = os.write(write, data) if data else 0
            if not moved:
                self.stop()
                return
            self.held = moved
            self._flush()
        except BlockingIOError:  # woken for nothing
            self.pipes.give(self.pipe)
            self.pipe = None
        except OSError:  # a reset, or the other side vanished
            self.stop()

    def _writable(self) -> None:
        try:
            self._flush()
        except OSError:
            self.stop()

    def _flush(self) -> None:
        read = self.pipe[0]
        while self.held:
            try:
                self.held -= os.splice(read, self.dst, self.held, flags=SPLICE)
            except BlockingIOError:
                if not self.blocked:
                    self.blocked = True
                    self.loop.remove_reader(self.src)
                    self.loop.add_writer(self.dst, self._writable)
                return
        self.pipes.give(self.pipe)
        self.pipe = None
        if self.blocked:
            self.blocked = False
            self.loop.remove_writer(self.dst)
            self.loop.add_reader(self.src, self._readable)

    def stop(self) -> None:
        """End this direction (at the source's end, on an error, or when the connection
        closes): unregister, return the pipe and end the sink's side too."""
        if self.stopped:
            return
        self.stopped = True
        if self.blocked:
            self.loop.remove_writer(self.dst)
        else:
            self.loop.remove_reader(self.src)
        if self.pipe is not None:
            if self.held:
                self.pipes.discard(self.pipe)
            else:
                self.pipes.give(self.pipe)
            self.pipe = None
        with contextlib.suppress(OSError):
            self.sink.shutdown(socket.SHUT_WR)
        if not self.done.done():  # a cancelled wait (the router stopping) leaves it done
            self.done.set_result(None)


class Pipes:
    """Kernel pipes for splice(2), lent to a connection while bytes move through it."""

    def __init__(self, size: int = PIPE_BYTES, keep: int = IDLE_PIPES):
        self.size = size
        self.keep = keep
        self.idle: list[tuple[int, int, int]] = []

    def take(self) -> tuple[int, int, int]:
        """Return (read end, write end, capacity) of an empty pipe."""
        if self.idle:
            return self.idle.pop()
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:  # over the user's pipe budget: the default size still works
            size = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
        return read, write, size

    def give(self, pipe: tuple[int, int, int]) -> None:
        """Take back an empty pipe."""
        if len(self.idle) < self.keep:
            self.idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int, int]) -> None:
        """Close a pipe that may still hold bytes."""
        for fd in pipe[:2]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        while self.idle:
            self.discard(self.idle.pop())


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address host names (as asyncio.start_server makes them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _linger(loop: asyncio.AbstractEventLoop, client: socket.socket) -> None:
    """End our side, then read what the visitor still sends until they close: closing with
    their request unread would reset the connection, and might lose the answer with it."""
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        client.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(LINGER_SECONDS):
            while await loop.sock_recv(client, RECV_BYTES):
                pass


def main() -> None:
    """Run the router in the foreground until SIGTERM."""
    from ..config import load_config

    config = load_config()
    run_dir(config).mkdir(parents=True, exist_ok=True)
    # One router per data directory: two would fight over every Space's port ("Address
    # already in use"). A second one (systemd's, while one started on demand serves) waits,
    # and takes over when the first stops. The lock goes with this process, after the pid
    # file: a router that takes over writes its pid after this one removed its own.
    holder = os.open(lock_path(config), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if not _try_lock(holder, seconds=1.0):  # router_pid() peeks at the lock for an instant
        print(f"another router (pid {router_pid(config)}) serves {config.data_path}; "
              "waiting for it to stop", file=sys.stderr, flush=True)
        fcntl.flock(holder, fcntl.LOCK_EX)
    pid_path(config).write_text(str(os.getpid()))
    try:
        asyncio.run(Router(config).serve())
    finally:
        with contextlib.suppress(OSError):
            pid_path(config).unlink()


def _try_lock(fd: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_SECONDS)


# -- client side: used by the services that switch routes ------------------------------------


def read_state(config: Config) -> dict:
    try:
        return json.loads(state_path(config).read_text())
    except (OSError, ValueError):
        return {}


def router_pid(config: Config) -> int | None:
    """The serving router's pid, or None when none runs (a pid file left by a router that
    died, its number maybe reused since, does not count: the live router holds its lock)."""
    try:
        pid = int(pid_path(config).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    try:
        with _flocked(lock_path(config), fcntl.LOCK_SH | fcntl.LOCK_NB):
            return None  # nobody holds it: no router runs
    except BlockingIOError:
        return pid
    except OSError:
        return pid  # the lock cannot be read (permissions): trust the pid file


def ensure_router(config: Config) -> int:
    """Start the router in the background unless it runs; return its pid.

    Processes (the portal, the CLI, workers, the scheduler) and threads that call this at
    once start one router between them: the check and the start are made under a lock.
    """
    pid = router_pid(config)
    if pid:
        return pid
    run_dir(config).mkdir(parents=True, exist_ok=True)
    with _flocked(start_lock_path(config), fcntl.LOCK_EX):
        pid = router_pid(config)
        if pid:
            return pid  # another caller started it while this one waited
        env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                                for s in SETTINGS}}
        with open(run_dir(config) / "router.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "appliance.adapters.router"],
                                       env=env, cwd="/", stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if router_pid(config) == process.pid and \
                    read_state(config).get("pid") == process.pid:
                return process.pid
            if process.poll() is not None:
                break  # it failed to start: its log says why
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
            from ..errors import RuntimeUnavailable

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
