"""An offline Space (HF_HUB_OFFLINE=1, as a bundle import sets it) runs on the internal
network appliance-offline: it answers on its published 127.0.0.1 port, yet cannot open a
connection to anything outside, while a normal Space's container can (through slirp4netns)
reach a listener on the host's own non-loopback address."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import requests
from conftest import as_service, make_space_repo

from appliance import spaces, stages
from appliance.runtime import OFFLINE_NETWORK

pytestmark = pytest.mark.podman

FILES = {
    "README.md": "---\nsdk: docker\napp_port: 8000\n---\n",
    "Dockerfile": "FROM localhost/appliance-python:3.11\nWORKDIR /srv\nCOPY v.txt .\n"
                  "CMD [\"python3\", \"-m\", \"http.server\", \"8000\"]\n",
    "v.txt": "hello\n",
}

CONNECT = """\
import socket, sys
try:
    socket.create_connection(({host!r}, {port}), 5).close()
except OSError as exc:
    print(f"failed: {{exc}}")
    sys.exit(1)
print("connected")
"""


def _host_address() -> str:
    """The host's own non-loopback IPv4 address (the source of its default route)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.123", 9))  # UDP: picks a route, sends nothing
        address = probe.getsockname()[0]
    except OSError:
        pytest.fail("this host has no default route: the test needs a non-loopback address")
    finally:
        probe.close()
    assert not address.startswith("127."), address
    return address


@pytest.fixture(scope="module")
def listener():
    """A TCP listener on the host's non-loopback address; yields (host, port, peers)."""
    host = _host_address()
    server = socket.socket()
    server.bind((host, 0))
    server.listen(8)
    server.settimeout(0.5)
    peers: list[str] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peers.append(peer[0])
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield host, server.getsockname()[1], peers
    stop.set()
    thread.join(5)
    server.close()


def _deploy(ctx, sources_dir, space_id: str, offline: bool) -> tuple[str, str]:
    repo = make_space_repo(sources_dir / space_id.replace("/", "-"), FILES)
    spaces.add_space(ctx, str(repo), name=space_id)
    if offline:
        spaces.set_value(ctx, "variables", space_id, "HF_HUB_OFFLINE", "1")
    view = spaces.deploy(ctx, space_id)
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"] + "v.txt", timeout=5).text.strip() == "hello"
    return view["url"], ctx.store.get_space(space_id)["container"]


def _connect(container: str, host: str, port: int):
    return as_service("podman", "exec", container, "python3", "-c",
                      CONNECT.format(host=host, port=port), check=False)


def _networks(container: str) -> dict:
    out = as_service("podman", "inspect", "--format", "{{json .NetworkSettings.Networks}}",
                     container).stdout
    return json.loads(out) or {}


def test_offline_space_is_reachable_but_cannot_connect_out(appliance_env, listener):
    ctx, sources_dir = appliance_env
    host, port, peers = listener

    _, normal = _deploy(ctx, sources_dir, "net/normal", offline=False)
    reached = _connect(normal, host, port)
    assert reached.returncode == 0 and "connected" in reached.stdout, (
        f"a normal Space should reach {host}:{port}: {reached.stdout}{reached.stderr}")
    assert OFFLINE_NETWORK not in _networks(normal)
    seen = len(peers)
    assert seen >= 1

    url, offline = _deploy(ctx, sources_dir, "net/offline", offline=True)
    assert list(_networks(offline)) == [OFFLINE_NETWORK]
    inspected = json.loads(as_service("podman", "network", "inspect", OFFLINE_NETWORK).stdout)
    assert inspected[0]["internal"] is True and inspected[0]["dns_enabled"] is False
    for target in [(host, port), ("1.1.1.1", 443), ("10.0.2.2", port)]:
        blocked = _connect(offline, *target)
        assert blocked.returncode == 1 and "failed" in blocked.stdout, (
            f"an offline Space connected to {target}: {blocked.stdout}{blocked.stderr}")
    assert len(peers) == seen, "the offline Space's connection reached the host listener"

    # Still served through its published port after a restart of the container.
    spaces.stop(ctx, "net/offline")
    _, view = spaces.start(ctx, "net/offline")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(url + "v.txt", timeout=5).text.strip() == "hello"
