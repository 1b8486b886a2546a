"""Routers started at once: two Spaces added at the same moment started two router processes,
one Space landed in RUNTIME_ERROR "Address already in use" and a router was left orphaned.
Starting it from many threads or processes at once now gives one router that serves every
route."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from appliance.adapters import router
from appliance.adapters.store import open_store
from appliance.config import SETTINGS, load_config

CALLERS = 6


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def routers_of(config) -> list[int]:
    """Pids of the router processes serving this data directory (the ones this test made)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"appliance.adapters.router" in command and state != "Z" and \
                f"APPLIANCE_DATA_DIR={config.values['data_dir']}".encode() in environ:
            found.append(int(entry.name))
    return sorted(found)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def backend_server() -> socket.socket:
    """An app that answers each connection with the port it listens on, then closes."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                client.sendall(str(port).encode())

    threading.Thread(target=serve, daemon=True).start()
    return server


def two_spaces(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    store = open_store(config.db_path)
    backends = [backend_server(), backend_server()]
    ports = []
    for number, backend in enumerate(backends):
        port = free_port()
        store.insert_space({"id": f"lab/at-once-{number}", "source": "/s",
                            "source_display": "/s", "stage": "RUNNING", "port": port,
                            "hardware": "cpu", "desired": "running",
                            "backend_port": backend.getsockname()[1], "container": "c"},
                           "test")
        ports.append((port, backend.getsockname()[1]))
    store.close()
    return config, backends, ports


def relayed(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        chunks = []
        while data := client.recv(100):
            chunks.append(data)
    return b"".join(chunks).decode()


def stop_all(config) -> None:
    router.stop_router(config)
    for pid in routers_of(config):  # any second router the code under test left behind
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not routers_of(config), 15, "the routers to stop")


def assert_one_router_serving_every_route(config, ports, pids):
    assert len(set(pids)) == 1, f"callers got different routers: {pids}"
    assert routers_of(config) == [pids[0]]
    assert router.router_pid(config) == pids[0]
    for port, backend in ports:
        router.wait_route(config, port, backend, timeout=10)
        assert relayed(port) == str(backend)
    log = (router.run_dir(config) / "router.log").read_text()
    assert "Address already in use" not in log and "Traceback" not in log, log
    assert router.read_state(config)["errors"] == {}


def test_routers_started_from_many_threads_at_once_are_one(tmp_path):
    config, backends, ports = two_spaces(tmp_path)
    barrier = threading.Barrier(CALLERS)
    pids: list[int] = []
    failures: list[BaseException] = []

    def start():
        try:
            barrier.wait()
            pids.append(router.ensure_router(config))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(CALLERS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == [] and len(pids) == CALLERS
        assert_one_router_serving_every_route(config, ports, pids)
    finally:
        stop_all(config)
        for backend in backends:
            backend.close()


ENSURE = """
import sys, time
from pathlib import Path
from appliance.adapters import router
from appliance.config import load_config
go = Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
print(router.ensure_router(load_config()))
"""


def test_routers_started_from_many_processes_at_once_are_one(tmp_path):
    config, backends, ports = two_spaces(tmp_path)
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS}}
    go = tmp_path / "go"
    callers = [subprocess.Popen([sys.executable, "-c", ENSURE, str(go)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(CALLERS)]
    try:
        for caller in callers:  # each has loaded the appliance and waits for the go file
            assert caller.stdout.readline() == "ready\n", caller.communicate(timeout=60)
        go.touch()  # every caller asks for a router at the same moment
        outputs = [caller.communicate(timeout=60) for caller in callers]
        assert all(caller.returncode == 0 for caller in callers), outputs
        pids = [int(out) for out, _err in outputs]
        assert_one_router_serving_every_route(config, ports, pids)
    finally:
        for caller in callers:
            if caller.poll() is None:
                caller.kill()
        stop_all(config)
        for backend in backends:
            backend.close()


def test_a_router_started_while_one_serves_waits_and_takes_over_when_it_stops(tmp_path):
    config, backends, ports = two_spaces(tmp_path)
    first = router.ensure_router(config)
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS}}
    output = tmp_path / "second.log"
    with open(output, "w") as sink:
        second = subprocess.Popen([sys.executable, "-m", "appliance.adapters.router"],
                                  env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # It says that it waits, serves nothing meanwhile and leaves the first one's state be.
        said = (f"another router (pid {first}) serves {config.data_path}; waiting for it to "
                "stop\n")
        wait_until(lambda: output.read_text() or second.poll() is not None, 20,
                   "the second router to say something")
        assert output.read_text() == said
        assert router.router_pid(config) == first
        for port, backend in ports:
            router.wait_route(config, port, backend, timeout=10)
            assert relayed(port) == str(backend)
        assert router.read_state(config)["pid"] == first
        router.stop_router(config)
        wait_until(lambda: router.router_pid(config) == second.pid, 20, "the takeover")
        wait_until(lambda: router.read_state(config).get("pid") == second.pid, 20,
                   "the second router's state")
        for port, backend in ports:
            router.wait_route(config, port, backend, timeout=10)
            assert relayed(port) == str(backend)
        assert routers_of(config) == [second.pid]
    finally:
        stop_all(config)
        second.wait(20)
        for backend in backends:
            backend.close()


def test_a_pid_file_left_by_a_dead_router_names_no_router(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    router.run_dir(config).mkdir(parents=True)
    # The number of a live process that is no router (this test's own), as after a reboot
    # that gave the dead router's pid to another program.
    router.pid_path(config).write_text(str(os.getpid()))
    assert router.router_pid(config) is None
