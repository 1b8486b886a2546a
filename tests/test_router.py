"""The front router as a real process: what it relays, what it counts, what it answers."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from appliance.adapters import router
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.errors import RuntimeUnavailable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def routed_space(config, space_id: str, port: int, backend: int):
    """Record a running Space on port served by backend, and start the router as the services
    do (wait_route would start a second one if the first had not written its pid yet)."""
    store = open_store(config.db_path)
    store.insert_space({"id": space_id, "source": "/s", "source_display": "/s",
                        "stage": "RUNNING", "port": port, "hardware": "cpu",
                        "desired": "running", "backend_port": backend, "container": "c"},
                       "test")
    router.ensure_router(config)
    return store


def test_a_long_lived_connection_counts_as_use_at_every_flush(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    backend = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(backend.accept()), daemon=True).start()
    port = free_port()
    store = routed_space(config, "lab/ws", port, backend.getsockname()[1])
    try:
        router.wait_route(config, port, backend.getsockname()[1], timeout=10)
        client = socket.create_connection(("127.0.0.1", port))  # a WebSocket, say: no bytes
        seen = []
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and len(set(seen)) < 3:
            at = store.get_space("lab/ws")["last_request_at"]
            if at:
                seen.append(at)
            time.sleep(0.5)
        assert len(set(seen)) >= 3, f"last_request_at did not move while open: {seen}"
        client.close()
        held[0][0].close()  # the app answers the visitor's close with its own
        time.sleep(router.FLUSH_SECONDS + 1.5)
        closed_at = store.get_space("lab/ws")["last_request_at"]
        time.sleep(router.FLUSH_SECONDS + 1)
        assert store.get_space("lab/ws")["last_request_at"] == closed_at, "idle must stay idle"
    finally:
        router.stop_router(config)
        backend.close()


def test_a_port_another_program_held_is_served_once_it_lets_go(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    backend = socket.create_server(("127.0.0.1", 0))
    holder = socket.create_server(("127.0.0.1", 0))  # another program on the Space's port
    port = holder.getsockname()[1]
    store = routed_space(config, "lab/held", port, backend.getsockname()[1])
    try:
        with pytest.raises(RuntimeUnavailable) as caught:
            router.wait_route(config, port, backend.getsockname()[1], timeout=10)
        assert caught.value.message == (
            f"The router cannot listen on 127.0.0.1:{port}: Address already in use")
        assert caught.value.hint == (
            "another program holds that port; stop it or narrow APPLIANCE_PORT_RANGE")
        holder.close()
        deadline = time.monotonic() + router.LISTEN_RETRY_SECONDS + 5
        while str(port) in router.read_state(config).get("errors", {}):
            assert time.monotonic() < deadline, "the router never tried the port again"
            time.sleep(0.1)
        router.wait_route(config, port, backend.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            relayed, _ = backend.accept()  # the router passed the visitor on to the app
            relayed.close()
    finally:
        router.stop_router(config)
        backend.close()
        holder.close()
        store.close()


# -- relaying bytes ---------------------------------------------------------------------------

MiB = 1 << 20
BLOCKS = [random.Random(n).randbytes(MiB) for n in range(8)]


def pattern(size: int):
    """size bytes that differ from one MiB to the next (a lost or repeated piece shows)."""
    for number, start in enumerate(range(0, size, MiB)):
        yield BLOCKS[number % len(BLOCKS)][:size - start]


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        route = urlsplit(self.path)
        size = int(parse_qs(route.query).get("size", ["0"])[0])
        body = route.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(size if route.path == "/bytes" else len(body)))
        self.end_headers()
        if route.path != "/bytes":
            self.wfile.write(body)
            return
        with contextlib.suppress(OSError):  # the visitor may leave half-way
            for piece in pattern(size):
                self.wfile.write(piece)

    def do_POST(self) -> None:
        digest, left = hashlib.sha256(), int(self.headers["Content-Length"])
        while left:
            data = self.rfile.read(min(left, MiB))
            digest.update(data)
            left -= len(data)
        body = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class AppServer(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A real router process with three Spaces: one served, one asleep, one stopped."""
    config = load_config({}, data_dir=str(tmp_path_factory.mktemp("router") / "data"))
    app = AppServer(("127.0.0.1", 0), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    ports = {"app": free_port(), "asleep": free_port(), "stopped": free_port()}
    backends = {"app": app.server_address[1], "asleep": None, "stopped": None}
    store = open_store(config.db_path)
    for name, port in ports.items():
        store.insert_space({
            "id": f"lab/{name}", "source": "/s", "source_display": "/s", "stage": "RUNNING"
            if name == "app" else "STOPPED", "port": port, "hardware": "cpu",
            "desired": {"app": "running", "asleep": "sleeping"}.get(name, "stopped"),
            "backend_port": backends[name], "container": "c"}, "test")
    pid = router.ensure_router(config)
    for name, port in ports.items():
        router.wait_route(config, port, backends[name], timeout=10)
    # wait_route returns at its timeout too: the routes are checked, not assumed.
    routes = router.read_state(config).get("routes", {})
    assert {name: routes.get(str(port), "none") for name, port in ports.items()} == backends
    yield SimpleNamespace(config=config, store=store, ports=ports, pid=pid,
                          backend=backends["app"])
    router.stop_router(config)
    deadline = time.monotonic() + 10
    while router.router_pid(config) and time.monotonic() < deadline:
        time.sleep(0.05)
    app.shutdown()
    app.server_close()
    log = (router.run_dir(config) / "router.log").read_text()
    assert "Traceback" not in log and "Exception" not in log, log
    store.close()


def router_files(pid: int) -> dict[str, int]:
    counts = {"socket": 0, "pipe": 0}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            kind = os.readlink(fd).split(":", 1)[0]
            if kind in counts:
                counts[kind] += 1
    return counts


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(check, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def test_a_50_mib_response_arrives_intact_and_is_counted_until_the_connection_closes(routed):
    size = 50 * MiB + 12345
    conn = http.client.HTTPConnection("127.0.0.1", routed.ports["app"], timeout=60)
    conn.request("GET", f"/bytes?size={size}")
    response = conn.getresponse()
    assert wait_until(lambda: router.read_state(routed.config)["connections"].get(
        str(routed.backend)) == 1), "an open connection is counted against its backend"
    digest, expected = hashlib.sha256(), hashlib.sha256()
    while data := response.read(MiB):
        digest.update(data)
    for piece in pattern(size):
        expected.update(piece)
    assert digest.hexdigest() == expected.hexdigest()
    conn.request("GET", "/again")  # kept alive through the router
    assert conn.getresponse().read() == b"/again"
    conn.close()
    assert wait_until(lambda: not router.read_state(routed.config)["connections"]), \
        "a closed connection no longer holds its backend (a switch waits for that)"


def test_an_upload_streams_through_to_the_app(routed):
    body = b"".join(pattern(20 * MiB + 1))
    conn = http.client.HTTPConnection("127.0.0.1", routed.ports["app"], timeout=60)
    conn.request("POST", "/upload", body=body)
    assert conn.getresponse().read() == hashlib.sha256(body).hexdigest().encode()
    conn.close()


def test_a_visitor_leaving_mid_body_leaves_no_socket_or_pipe_behind(routed):
    conn = http.client.HTTPConnection("127.0.0.1", routed.ports["app"], timeout=10)
    conn.request("GET", "/warm")
    conn.getresponse().read()
    conn.close()
    assert wait_until(lambda: not router.read_state(routed.config)["connections"])
    samples = []
    for _ in range(10):  # the warm-up connection may still be closing: the least is idle
        samples.append(router_files(routed.pid)["socket"])
        time.sleep(0.05)
    idle = min(samples)
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", routed.ports["app"]))
        sock.sendall(b"GET /bytes?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (200 * MiB))
        got = 0
        while got < 2 * MiB:
            got += len(sock.recv(MiB))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()  # a reset, with most of the body still to come
    assert wait_until(lambda: router_files(routed.pid)["socket"] <= idle), \
        (idle, router_files(routed.pid))
    # Idle pipes are kept for the next connections, up to a few; none is lost.
    assert router_files(routed.pid)["pipe"] <= 2 * router.IDLE_PIPES
    assert wait_until(lambda: not router.read_state(routed.config)["connections"])


def test_a_half_closed_request_still_gets_its_whole_answer(routed):
    sock = socket.create_connection(("127.0.0.1", routed.ports["app"]))
    sock.sendall(b"GET /bytes?size=3000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.shutdown(socket.SHUT_WR)  # the visitor says it has nothing more to send
    data = b"".join(iter(lambda: sock.recv(MiB), b""))
    sock.close()
    head, _sep, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"".join(pattern(3000000))


def test_urgent_data_neither_stops_the_relay_nor_makes_the_router_spin(routed):
    sock = socket.create_connection(("127.0.0.1", routed.ports["app"]))
    sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.send(b"!", socket.MSG_OOB)  # splice stops at the urgent mark; the router steps over
    sock.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    data = b""
    while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"/second"):
        data += sock.recv(65536)
    spent = cpu_seconds(routed.pid)
    time.sleep(1)
    assert cpu_seconds(routed.pid) - spent < 0.5, "the router spins on the urgent byte"
    sock.close()


def test_a_sleeping_space_answers_waking_up_and_asks_for_a_wake(routed):
    conn = http.client.HTTPConnection("127.0.0.1", routed.ports["asleep"], timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 503 and response.getheader("Retry-After") == "2"
    assert b"waking up" in response.read()
    conn.close()
    assert wait_until(lambda: routed.store.get_space("lab/asleep")["wake_requested_at"])


def test_a_stopped_space_answers_that_it_is_not_running(routed):
    sock = socket.create_connection(("127.0.0.1", routed.ports["stopped"]))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    data = b"".join(iter(lambda: sock.recv(65536), b""))  # then the router closes, cleanly
    sock.close()
    assert data.startswith(b"HTTP/1.1 503") and data.endswith(b"not running. Start it with "
                                                              b"'appliance spaces start'.\r\n")
