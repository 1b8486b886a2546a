"""Shared fixtures: real git repositories for Spaces and an appliance context on real Podman."""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE_USER = "appliance"


def git(cwd: Path, *args: str, date: str | None = None) -> str:
    """Run git in cwd; date (e.g. "2024-10-15T12:00:00Z") stamps a commit as made then."""
    env = {**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else None
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd, check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()


def make_space_repo(path: Path, files: dict[str, str], date: str | None = None) -> Path:
    """Create a git repository holding files (a Space), committed on branch main."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    commit(path, files, "initial", date=date)
    return path


def commit(path: Path, files: dict[str, str | None], message: str, date: str | None = None
           ) -> str:
    """Write (or delete, with None) files and commit (made at date, when given); return the
    new sha."""
    for name, content in files.items():
        target = path / name
        if content is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message, date=date)
    return git(path, "rev-parse", "HEAD")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll predicate until it returns something true (returned), or fail saying what.

    The timeout is a liveness bound, not a measurement: give it ten times what the wait
    usually takes, so a slow machine never fails a test that a broken one would.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# Ports the tests hand out to servers they start: below the kernel's ephemeral range
# (32768-60999, where bind-to-0 and outgoing connections land) and clear of the appliance's
# own port_range (17000-17999 by default, where the box's own appliance may serve), so a port
# picked here is not taken a moment later by a connection or a Space.
TEST_PORTS = range(20000, 30000)
# The Spaces the tests deploy take their ports from blocks of 40 above those and below the
# ephemeral range: never the box's own appliance's ports, never a server a test started.
SPACE_PORT_BLOCKS = range(30000, 32760, 40)


def space_port_range() -> str:
    """A port_range for a test appliance: a block of 40 ports picked at random."""
    low = random.choice(SPACE_PORT_BLOCKS)
    return f"{low}-{low + 39}"
_handed_out: set[int] = set()
_pick = random.Random(os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port in TEST_PORTS that nothing is bound to now and this run never handed out.

    The port is free when returned, not reserved: a server that cannot bind it (EADDRINUSE:
    another program took it since) should ask again; start_on_free_port does that.
    """
    for _ in range(500):
        port = _pick.choice(TEST_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port in {TEST_PORTS} after 500 tries")


def start_on_free_port(start, attempts: int = 5):
    """Call start(port) on a fresh free port until it does not fail with EADDRINUSE."""
    for _ in range(attempts - 1):
        try:
            return start(free_port())
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    return start(free_port())


def held_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a port (never listening) that the caller holds and hands over: no
    one else can take the port while it is open; connections to it are refused."""
    sock = socket.socket()
    sock.bind((host, 0))
    return sock


def as_service(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command as the service account, with its rootless Podman environment."""
    import pwd

    account = pwd.getpwnam(SERVICE_USER)
    return subprocess.run(
        ["runuser", "-u", SERVICE_USER, "--", "env", f"HOME={account.pw_dir}",
         f"XDG_RUNTIME_DIR=/run/user/{account.pw_uid}", *command],
        cwd="/", check=check, capture_output=True, text=True,
    )


def copy_from_container(name: str, path: str, into: Path) -> Path:
    """Copy a directory out of the service account's running container into a local one
    (through tar, so no file on the way needs to be readable by the service account)."""
    import pwd

    account = pwd.getpwnam(SERVICE_USER)
    parent, base = path.rstrip("/").rsplit("/", 1)
    into.mkdir(parents=True, exist_ok=True)
    pack = subprocess.Popen(
        ["runuser", "-u", SERVICE_USER, "--", "env", f"HOME={account.pw_dir}",
         f"XDG_RUNTIME_DIR=/run/user/{account.pw_uid}", "podman", "exec", name,
         "tar", "-C", parent or "/", "-c", base],
        cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    unpacked = subprocess.run(["tar", "-x", "-C", str(into)], stdin=pack.stdout,
                              capture_output=True, text=True)
    pack.stdout.close()
    error = pack.stderr.read().decode(errors="replace")
    assert pack.wait() == 0 and unpacked.returncode == 0, \
        f"copying {path} out of {name} failed: {error}{unpacked.stderr}"
    return into / base


@pytest.fixture(scope="session")
def podman_ready() -> None:
    """Fail (not skip) when rootless Podman is not set up: scripts/test.sh sets it up."""
    from appliance.adapters.runtime import Runtime
    from appliance.config import load_config

    Runtime(load_config({})).info()


# The package files builds install, kept between runs on this machine so a second run does
# not download them again (a cache: a fresh machine fills it, nothing depends on it).
PACKAGE_CACHE = Path("/var/cache/appliance/test-packages")


@pytest.fixture(scope="module")
def appliance_env(tmp_path_factory, podman_ready):
    """A fresh data dir and Space sources dir, and a context on the real Podman."""
    from appliance.adapters import router
    from appliance.config import load_config
    from appliance.core import spaces

    root = tmp_path_factory.mktemp("appliance")
    sources_dir = root / "sources"
    sources_dir.mkdir()
    config = load_config(
        {}, data_dir=str(root / "data"), local_sources=str(sources_dir),
        port_range=space_port_range(), startup_timeout_cap=180, drain_seconds=3,
        health_initial_delay=0,  # tests sweep right after a deploy; the delay has its own test
        package_cache_dir=str(PACKAGE_CACHE),
    )
    ctx = spaces.open_context(config, actor="test")
    yield ctx, sources_dir
    for row in ctx.store.list_spaces():
        try:
            spaces.delete(ctx, row["id"])
        except Exception:  # noqa: BLE001 - best-effort cleanup of a failed test
            pass
    router.stop_router(config)
    ctx.store.close()
    shutil.rmtree(root, ignore_errors=True)


def container_env(name: str) -> dict[str, str]:
    """The environment the container's processes really got (CDI edits included), read from
    PID 1; `podman exec env` shows only the stored config."""
    out = as_service("podman", "exec", name, "cat", "/proc/1/environ").stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def labelled(kind: str, space_id: str) -> list[str]:
    """Names of the service account's containers/images/volumes labelled with a Space."""
    label = f"label=appliance.space={space_id}"
    if kind == "container":
        out = as_service("podman", "ps", "-a", "--filter", label, "--format", "{{.Names}}")
    elif kind == "image":
        out = as_service("podman", "images", "--filter", label, "--format", "{{.ID}}")
    else:
        out = as_service("podman", "volume", "ls", "--filter", label, "--format", "{{.Name}}")
    return [line for line in out.stdout.splitlines() if line.strip()]


FAKE_NVML_SOURCE = Path(__file__).resolve().parent / "nvml_fake" / "fake_nvml.c"
FAKE_CUDA_SOURCE = Path(__file__).resolve().parent / "nvml_fake" / "fake_cuda.c"


def _compile_library(source: Path, into: Path, name: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(f"gcc is needed to compile {source} for the GPU tests: apt-get install gcc")
    built = subprocess.run([gcc, "-shared", "-fPIC", "-o", str(into / name), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"compiling {source} failed:\n{built.stderr}"
    return into


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory) -> Path:
    """Compile the fake libnvidia-ml.so.1 once; return the directory that holds it."""
    return _compile_library(FAKE_NVML_SOURCE, tmp_path_factory.mktemp("fake-nvml"),
                            "libnvidia-ml.so.1")


@pytest.fixture(scope="session")
def fake_cuda(tmp_path_factory) -> Path:
    """Compile the fake libcuda.so.1 once (a directory of its own); return that directory."""
    return _compile_library(FAKE_CUDA_SOURCE, tmp_path_factory.mktemp("fake-cuda"),
                            "libcuda.so.1")


def pytest_terminal_summary(terminalreporter) -> None:
    """List every skipped test with its reason, so a skip is seen, not only counted."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} skipped, and why")
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
            report.longrepr)
        terminalreporter.write_line(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")


os.environ.setdefault("APPLIANCE_CONFIG_FILE", "/nonexistent/appliance.toml")


@contextmanager
def portal(config, log: Path, workers: int = 1) -> Iterator[str]:
    """Run `appliance serve` (gunicorn) on the config's data dir; yield its endpoint."""
    import requests

    from appliance.config import SETTINGS

    port = free_port()
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS},
           "APPLIANCE_CONFIG_FILE": "/nonexistent/appliance.toml",
           "APPLIANCE_PORTAL_APPS_PORT": "0"}  # no Space app is opened here
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(workers)],
            cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, f"the portal exited:\n{log.read_text()}"
            try:
                requests.get(f"{endpoint}/api/whoami-v2", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"no portal on {port}:\n{log.read_text()}"
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextmanager
def silent_listener(backlog: int = 16) -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung server); yield it."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@contextmanager
def http_server(handler) -> Iterator[int]:
    """Serve a BaseHTTPRequestHandler class on a thread at a free localhost port; yield it."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
