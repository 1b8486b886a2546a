"""Crashes leave nothing that blocks a retry: kill -9 the worker mid-build, then try again."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import commit, labelled, make_space_repo, wait_for

from appliance import stages
from appliance.cli.main import cli
from appliance.core import spaces

pytestmark = pytest.mark.podman

README = "---\ntitle: Slow\nsdk: docker\napp_port: 8080\n---\n"
# Unique per run, so the slow step never comes from the layer cache of an earlier run.
SLOW = f"""FROM localhost/appliance-python:3.11
RUN echo "slow step starts {uuid.uuid4().hex}" && sleep 60
CMD ["python3", "-m", "http.server", "8080"]
"""
FAST = """FROM localhost/appliance-python:3.11
RUN echo "fixed" > /srv/index.html
WORKDIR /srv
CMD ["python3", "-m", "http.server", "8080"]
"""



def test_worker_killed_mid_build_leaves_a_space_that_update_recovers(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "slow", {"README.md": README, "Dockerfile": SLOW})
    result = CliRunner().invoke(cli, ["spaces", "add", str(repo), "--name", "team/slow"],
                                obj={"ctx": ctx, "config": ctx.config})
    assert result.exit_code == 0, result.output
    worker = ctx.store.get_space("team/slow")["worker_pid"]
    assert worker and worker != os.getpid()

    def slow_step_running():
        path = spaces.build_log_path(ctx, "team/slow")
        return path and path.exists() and "slow step starts" in path.read_text()

    wait_for(slow_step_running, 120, "the slow build step")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{worker}") or
             open(f"/proc/{worker}/stat").read().split()[2] == "Z", 10, "the worker to die")
    assert ctx.store.get_space("team/slow")["stage"] == stages.BUILDING  # as the crash left it
    assert ctx.store.integrity_ok()

    commit(repo, {"Dockerfile": FAST}, "fix the build")
    needed, view = spaces.request_update(ctx, "team/slow")
    assert needed and view["stage"] == stages.BUILDING
    kinds = [e["kind"] for e in ctx.store.events("team/slow", limit=50)]
    assert "recovered" in kinds
    view = spaces.deploy(ctx, "team/slow")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"], timeout=5).text.strip() == "fixed"
    assert len(labelled("container", "team/slow")) == 1
    assert ctx.store.latest_build("team/slow")["status"] == "succeeded"
    statuses = [b["status"] for b in ctx.store.db.query(
        "select status from builds where space_id = ? order by id", ["team/slow"])]
    assert statuses == ["abandoned", "succeeded"]
    spaces.delete(ctx, "team/slow")


def test_busy_space_with_a_live_worker_is_not_taken_over(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "busy", {"README.md": README, "Dockerfile": FAST})
    spaces.add_space(ctx, str(repo), name="team/busy")  # BUILDING, owned by this live process
    with pytest.raises(Exception) as raised:
        spaces.request_update(ctx, "team/busy")
    assert "busy (BUILDING)" in str(raised.value)
    spaces.delete(ctx, "team/busy")


def test_start_revives_a_space_whose_container_and_router_died(appliance_env):
    from conftest import as_service

    from appliance.adapters import router

    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "revive", {"README.md": README, "Dockerfile": FAST})
    spaces.add_space(ctx, str(repo), name="team/revive")
    view = spaces.deploy(ctx, "team/revive")
    assert view["stage"] == stages.RUNNING, view["error"]
    as_service("podman", "kill", ctx.store.get_space("team/revive")["container"])
    router.stop_router(ctx.config)
    wait_for(lambda: router.router_pid(ctx.config) is None, 10, "the router to stop")
    with pytest.raises(requests.RequestException):
        requests.get(view["url"], timeout=2)
    needs_build, view = spaces.start(ctx, "team/revive")
    assert not needs_build and view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"], timeout=5).text.strip() == "fixed"
    assert len(labelled("container", "team/revive")) == 1
    spaces.delete(ctx, "team/revive")


def podman_service_pids(url: str) -> list[int]:
    """PIDs of `podman system service --time=0 URL` processes, read from /proc (exactly that
    command line: no other process, and no other socket's service, is matched)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if len(argv) == 5 and os.path.basename(argv[0]) == b"podman" and \
                argv[1:] == [b"system", b"service", b"--time=0", url.encode()]:
            found.append(int(entry.name))
    return found


def exited(pid: int) -> bool:
    """Gone, or a zombie (exited, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def answers(socket_path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


def test_runtime_starts_the_podman_api_service_when_it_is_gone(podman_ready):
    from appliance.adapters.runtime import Runtime
    from appliance.config import load_config

    config = load_config({})
    url = config.podman_socket_url
    socket_path = url[len("unix://"):]
    pids = podman_service_pids(url)
    assert pids, f"podman_ready reached {url}, yet no service process serves it"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    # What matters: those processes are gone and nothing answers on the socket any more.
    wait_for(lambda: all(map(exited, pids)), 30, f"the Podman service ({pids}) to exit")
    wait_for(lambda: not answers(socket_path), 30, f"{socket_path} to stop answering")
    with pytest.raises(Exception, match="Cannot reach Podman"):
        Runtime(config.with_values(podman_autostart=False)).info()
    info = Runtime(config).info()
    assert info["rootless"] is True and info["version"]
    assert podman_service_pids(url), "the runtime's own service is not running"


def test_killing_workers_at_random_points_always_converges(appliance_env):
    """kill -9 the worker at random points of add/build/start/switch, many times: after a
    reconcile pass and a retry there is one container serving, no stuck stage, and the
    database is intact."""
    import random

    from appliance.core import jobs
    from appliance.upkeep import reconcile

    ctx, sources_dir = appliance_env
    rng = random.Random(20261126)
    repo = make_space_repo(sources_dir / "victim", {
        "README.md": "---\nsdk: static\n---\n", "index.html": "v0"})
    space_id = "team/victim"
    spaces.add_space(ctx, str(repo), name=space_id)
    pid = jobs.spawn_job(ctx, space_id, "deploy")
    for round_ in range(1, 7):
        time.sleep(rng.uniform(0.05, 2.5))  # a random point in fetch, build, start or switch
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished first: also a point worth covering
        # Not reaped on purpose: a killed worker may linger as a zombie, and must still be
        # recognised as dead. SIGKILL lands asynchronously: wait until it has.
        wait_for(lambda dead=pid: not spaces._process_alive(dead), 10, "the worker to die")
        assert ctx.store.integrity_ok()
        reconcile.reconcile_once(ctx, spawn=lambda c, s, j, factory=False: jobs.run_job(c, s, j))
        view = spaces.describe(ctx, space_id)
        assert view["stage"] not in stages.BUSY, view
        commit(repo, {"index.html": f"v{round_}"}, f"round {round_}")
        needed, _ = spaces.request_update(ctx, space_id)
        assert needed
        pid = jobs.spawn_job(ctx, space_id, "deploy")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             open(f"/proc/{pid}/stat").read().split()[2] == "Z", 120, "the last worker")
    view = spaces.describe(ctx, space_id)
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"], timeout=5).text == "v6"
    assert len(labelled("container", space_id)) == 1
    assert not reconcile.reconcile_once(ctx).changed
    assert ctx.store.integrity_ok()
    spaces.delete(ctx, space_id)
