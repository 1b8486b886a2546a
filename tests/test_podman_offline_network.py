"""An offline Space (one imported from a bundle: its source is the appliance's copy of the
bundled repository, under <data_dir>/repos, as bundle import records it) runs on an internal network
of its own: it answers on its published 127.0.0.1 port, yet cannot open a connection to
anything outside nor to another offline Space, while a normal Space's container can (through
slirp4netns) reach a listener on the host's own non-loopback address. Deleting the Space
removes its network; housekeeping removes the networks of Spaces that are gone."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import requests
from conftest import as_service, make_space_repo

from appliance import stages
from appliance.adapters.runtime import LABEL_INSTANCE, LABEL_ROLE, LABEL_SPACE, ROLE_OFFLINE_NETWORK
from appliance.core import spaces
from appliance.upkeep import housekeeping

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


def _add(ctx, sources_dir, space_id: str, offline: bool) -> None:
    """Add a Space; an offline one the way bundle import does (HF_HUB_OFFLINE alone is not
    enough: a member can set that)."""
    where = ctx.config.imported_repos_path if offline else sources_dir
    repo = make_space_repo(where / space_id.replace("/", "-"), FILES)
    spaces.add_space(ctx, str(repo), name=space_id, from_bundle=offline)
    if offline:
        spaces.set_value(ctx, "variables", space_id, "HF_HUB_OFFLINE", "1")


def _deploy(ctx, sources_dir, space_id: str, offline: bool) -> tuple[str, str]:
    _add(ctx, sources_dir, space_id, offline)
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
    assert list(_networks(normal)) in ([], ["slirp4netns"]), _networks(normal)
    seen = len(peers)
    assert seen >= 1

    url, offline = _deploy(ctx, sources_dir, "net/offline", offline=True)
    network = spaces.offline_network("net/offline")
    assert list(_networks(offline)) == [network]
    inspected = json.loads(as_service("podman", "network", "inspect", network).stdout)
    assert inspected[0]["internal"] is True and inspected[0]["dns_enabled"] is False
    for target in [(host, port), ("1.1.1.1", 443), ("10.0.2.2", port)]:
        blocked = _connect(offline, *target)
        assert blocked.returncode == 1 and "failed" in blocked.stdout, (
            f"an offline Space connected to {target}: {blocked.stdout}{blocked.stderr}")
    assert len(peers) == seen, "the offline Space's connection reached the host listener"

    # A second offline Space has a network of its own: neither reaches the other's app.
    _, other = _deploy(ctx, sources_dir, "net/other", offline=True)
    other_network = spaces.offline_network("net/other")
    assert list(_networks(other)) == [other_network] and other_network != network
    other_address = _networks(other)[other_network]["IPAddress"]
    own_address = _networks(offline)[network]["IPAddress"]
    assert _connect(other, other_address, 8000).returncode == 0, "the app listens on 8000"
    blocked = _connect(offline, other_address, 8000)
    assert blocked.returncode == 1 and "failed" in blocked.stdout, blocked.stdout
    assert _connect(other, own_address, 8000).returncode == 1

    # Still served through its published port after a restart of the container.
    spaces.stop(ctx, "net/offline")
    _, view = spaces.start(ctx, "net/offline")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(url + "v.txt", timeout=5).text.strip() == "hello"

    # Deleting a Space removes its network; the other keeps its own.
    spaces.delete(ctx, "net/other")
    assert as_service("podman", "network", "exists", other_network, check=False).returncode == 1
    assert as_service("podman", "network", "exists", network, check=False).returncode == 0


def test_housekeeping_removes_the_offline_networks_of_spaces_that_are_gone(appliance_env):
    ctx, _ = appliance_env
    instance = f"{LABEL_INSTANCE}={ctx.config.instance_id}"
    role = f"{LABEL_ROLE}={ROLE_OFFLINE_NETWORK}"
    made = {
        # a Space deleted while its delete was cut short
        "gone": ["--label", f"{LABEL_SPACE}=net/gone", "--label", instance],
        # the network all offline Spaces shared before (no Space label)
        "shared": ["--label", instance],
        # another instance's: never touched
        "foreign": ["--label", f"{LABEL_SPACE}=net/gone", "--label",
                    f"{LABEL_INSTANCE}=someone-else"],
        # the old shared one with a Space of an earlier version still running on it
        "busy": ["--label", instance],
    }
    names = {key: f"test-{key}-{ctx.config.instance_id}" for key in made}
    holder = f"test-holder-{ctx.config.instance_id}"
    for key, labels in made.items():
        as_service("podman", "network", "create", "--internal", "--label", role, *labels,
                   names[key])
    as_service("podman", "run", "-d", "--name", holder, "--network", names["busy"],
               "localhost/appliance-python:3.11", "sleep", "300")
    try:
        report = housekeeping.prune_once(ctx)
        assert sorted(report.removed_networks) == sorted([names["gone"], names["shared"]])
        assert not report.errors, report.errors
        for key in ("gone", "shared"):
            assert as_service("podman", "network", "exists", names[key],
                              check=False).returncode == 1
        for key in ("foreign", "busy"):
            assert as_service("podman", "network", "exists", names[key],
                              check=False).returncode == 0
        # Once nothing runs on it, the next pass takes it.
        as_service("podman", "rm", "-f", "-t", "0", holder)
        assert housekeeping.prune_once(ctx).removed_networks == [names["busy"]]
    finally:
        as_service("podman", "rm", "-f", "-t", "0", holder, check=False)
        for name in names.values():
            as_service("podman", "network", "rm", "-f", name, check=False)


def test_an_offline_space_refuses_a_network_of_its_name_that_is_not_internal(appliance_env):
    ctx, sources_dir = appliance_env
    name = spaces.offline_network("net/leaky")
    as_service("podman", "network", "create", name)  # a way out: not internal
    try:
        _add(ctx, sources_dir, "net/leaky", offline=True)
        view = spaces.deploy(ctx, "net/leaky")
        assert view["stage"] == stages.RUNTIME_ERROR
        assert view["error"] == (
            f"The Podman network {name} is not internal, or resolves names, so the Space "
            f"would reach the outside through it — remove it ('podman network rm {name}' as "
            "the service account, once no container uses it); the appliance makes it again")
        assert ctx.runtime.containers("net/leaky") == []
    finally:
        spaces.delete(ctx, "net/leaky")
        as_service("podman", "network", "rm", "-f", name, check=False)
