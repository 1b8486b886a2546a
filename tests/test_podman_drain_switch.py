"""A switch waits for the old container's connections to drain, whatever reconcile does
meanwhile; a job cut short by a dead process says which action to run again.

Measured before the fix: a download through a Space's url, restart fired a second in, was cut
(curl exit 18) each time the scheduler ran, because the switch gave up its ownership of the
Space before draining and the next reconcile removed the old container at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading

import pytest
import requests
from conftest import commit, labelled, make_space_repo, wait_for

from appliance import stages
from appliance.config import SETTINGS
from appliance.core import jobs, spaces
from appliance.upkeep import reconcile

pytestmark = pytest.mark.podman

README = "---\ntitle: Slow\nsdk: docker\napp_port: 8080\n---\n"
DOCKERFILE = """FROM localhost/appliance-python:3.11
COPY app.py /srv/app.py
CMD ["python3", "/srv/app.py"]
"""
# /slow sends CHUNKS pieces of 64 KiB, one every 0.1 s (16 s in all), each telling its place
# by its bytes; START_DELAY (a Space variable) holds the app's start back, so that a start can
# be caught half-way.
APP = """import http.server, os, time
CHUNK, CHUNKS = 64 * 1024, 160
time.sleep(float(os.environ.get("START_DELAY", "0")))

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        slow = self.path == "/slow"
        self.send_response(200)
        self.send_header("Content-Length", str(CHUNK * CHUNKS if slow else 2))
        self.end_headers()
        if not slow:
            self.wfile.write(b"ok")
            return
        for number in range(CHUNKS):
            self.wfile.write(bytes([number % 251]) * CHUNK)
            self.wfile.flush()
            time.sleep(0.1)

http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""
CHUNK, CHUNKS = 64 * 1024, 160
WHOLE = hashlib.sha256(b"".join(bytes([n % 251]) * CHUNK for n in range(CHUNKS))).hexdigest()


def deploy_slow(ctx, sources_dir, name: str):
    repo = make_space_repo(sources_dir / name, {"README.md": README, "Dockerfile": DOCKERFILE,
                                                "app.py": APP})
    space_id = f"drain/{name}"
    spaces.add_space(ctx, str(repo), name=space_id)
    view = spaces.deploy(ctx, space_id)
    assert view["stage"] == stages.RUNNING, view["error"]
    return space_id, repo, view


class Download(threading.Thread):
    """Read url whole, counting and hashing what arrives; a cut shows as a short count."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.received, self.failure = url, 0, None
        self.digest = hashlib.sha256()

    def run(self) -> None:
        try:
            with requests.get(self.url, stream=True, timeout=60) as response:
                for piece in response.iter_content(CHUNK):
                    self.digest.update(piece)
                    self.received += len(piece)
        except requests.RequestException as exc:
            self.failure = exc


def no_spawn(ctx, space_id, job, factory=False):
    raise AssertionError(f"reconcile asked for a {job} of {space_id}")


def test_reconcile_during_a_restart_leaves_the_old_container_until_it_has_drained(
        appliance_env):
    ctx, sources_dir = appliance_env
    space_id, _repo, view = deploy_slow(ctx, sources_dir, "restart")
    old = ctx.store.get_space(space_id)["container"]
    # The worker reads its settings from the context that spawns it: a drain long enough for
    # the whole download.
    patient = spaces.Context(ctx.config.with_values(drain_seconds=120), ctx.store,
                             ctx.runtime, "test")
    download = Download(view["url"] + "slow")
    download.start()
    wait_for(lambda: download.received > 0, 60, "the download to start")
    jobs.spawn_job(patient, space_id, "restart")
    removed = []
    # The scheduler's reconcile, as often as it can run, until the download ends.
    while download.is_alive():
        removed += reconcile.reconcile_once(ctx, spawn=no_spawn).removed_containers
        download.join(0.2)
    assert download.failure is None and download.received == CHUNK * CHUNKS, (
        download.failure, download.received, removed)
    assert download.digest.hexdigest() == WHOLE
    assert removed == []
    row = wait_for(lambda: (r := ctx.store.get_space(space_id))["container"] != old
                   and r["worker_pid"] is None and r, 120, "the restart to finish")
    assert row["stage"] == stages.RUNNING
    wait_for(lambda: labelled("container", space_id) == [row["container"]], 60,
             "the old container to go")
    assert requests.get(view["url"], timeout=5).text == "ok"
    assert not reconcile.reconcile_once(ctx, spawn=no_spawn).changed
    spaces.delete(ctx, space_id)


# -- what a cut job says ----------------------------------------------------------------------


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)

    def dead() -> bool:
        jobs.reap_children()
        return not spaces.worker_alive({"worker_pid": pid})

    wait_for(dead, 30, f"process {pid} to die")


def hold_starts_back(ctx, space_id: str) -> None:
    spaces.set_value(ctx, "variables", space_id, "START_DELAY", "600")


def test_a_restart_cut_short_says_to_run_restart_again(appliance_env):
    ctx, sources_dir = appliance_env
    space_id, _repo, _view = deploy_slow(ctx, sources_dir, "cut-restart")
    hold_starts_back(ctx, space_id)
    worker = jobs.spawn_job(ctx, space_id, "restart")
    wait_for(lambda: ctx.store.get_space(space_id)["stage"] == stages.RUNNING_APP_STARTING,
             120, "the restart to start the new container")
    kill(worker)
    report = reconcile.reconcile_once(ctx, spawn=no_spawn)
    assert report.recovered == [space_id]
    view = spaces.describe(ctx, space_id)
    assert view["stage"] == stages.RUNNING  # the old revision serves on
    assert view["error"] == (
        f"The appliance process {worker} ended while the Space was RUNNING_APP_STARTING, "
        f"cutting its restart short; run 'appliance spaces restart {space_id}' to try again")
    spaces.delete(ctx, space_id)


def test_a_start_cut_short_says_to_run_start_again(appliance_env):
    ctx, sources_dir = appliance_env
    space_id, _repo, _view = deploy_slow(ctx, sources_dir, "cut-start")
    spaces.stop(ctx, space_id)
    hold_starts_back(ctx, space_id)
    ctx.store.update_space(space_id, desired="running")  # as the start action does first
    worker = jobs.spawn_job(ctx, space_id, "start")
    wait_for(lambda: ctx.store.get_space(space_id)["stage"] == stages.APP_STARTING, 120,
             "the start to begin")
    kill(worker)
    report = reconcile.reconcile_once(ctx, spawn=no_spawn)
    assert report.recovered == [space_id]
    view = spaces.describe(ctx, space_id)
    assert view["stage"] == stages.RUNTIME_ERROR
    assert view["error"] == (
        f"The appliance process {worker} ended while the Space was APP_STARTING, "
        f"cutting its start short; run 'appliance spaces start {space_id}' to try again")
    spaces.delete(ctx, space_id)


def test_a_rollback_cut_short_says_to_run_that_rollback_again(appliance_env):
    ctx, sources_dir = appliance_env
    space_id, repo, first = deploy_slow(ctx, sources_dir, "cut-rollback")
    commit(repo, {"app.py": APP + "# v2\n"}, "v2")
    spaces.request_update(ctx, space_id)
    assert spaces.deploy(ctx, space_id)["stage"] == stages.RUNNING
    hold_starts_back(ctx, space_id)
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(ctx.config.values[s.name])
                            for s in SETTINGS}}
    rollback = subprocess.Popen([sys.executable, "-m", "appliance.cli", "spaces", "rollback",
                                 space_id], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ctx.store.get_space(space_id)["stage"]
                 == stages.RUNNING_APP_STARTING, 120, "the rollback to start the old image")
    finally:
        rollback.kill()
        rollback.wait(30)
    report = reconcile.reconcile_once(ctx, spawn=no_spawn)
    assert report.recovered == [space_id]
    view = spaces.describe(ctx, space_id)
    assert view["stage"] == stages.RUNNING
    assert view["error"] == (
        f"The appliance process {rollback.pid} ended while the Space was "
        f"RUNNING_APP_STARTING, cutting its rollback short; run 'appliance spaces rollback "
        f"{space_id} --to {first['revision'][:12]}' to try again")
    spaces.delete(ctx, space_id)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_an_update_of_a_stopped_space_cut_short_says_it_is_not_retried(appliance_env):
    ctx, sources_dir = appliance_env
    space_id, repo, _view = deploy_slow(ctx, sources_dir, "cut-stopped")
    spaces.stop(ctx, space_id)
    commit(repo, {"app.py": APP + "# v2\n"}, "v2")
    needed, _ = spaces.request_update(ctx, space_id)
    assert needed
    dead = dead_pid()
    ctx.store.update_space(space_id, worker_pid=dead)  # its worker died mid-build
    asked = []
    report = reconcile.reconcile_once(
        ctx, spawn=lambda c, space, job, factory=False: asked.append((space, job)))
    assert report.recovered == [space_id] and report.retried_builds == [] and asked == []
    row = ctx.store.get_space(space_id)
    assert row["stage"] == stages.BUILD_ERROR and row["desired"] == "stopped"
    assert row["error"] == (
        f"The appliance process {dead} ended while the Space was "
        f"BUILDING, cutting its update short; run 'appliance spaces update {space_id}' to "
        "try again (the Space is stopped, so the scheduler does not retry it)")
    assert labelled("container", space_id) == []  # and it stays stopped
    spaces.delete(ctx, space_id)
