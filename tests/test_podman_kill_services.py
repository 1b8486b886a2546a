"""kill -9 the portal (gunicorn, master and workers) and the scheduler at random points while
Spaces are added and updated through the API: after they come back, everything converges."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import REPO, commit, free_port, labelled, make_space_repo, wait_for

from appliance import stages, users
from appliance.config import SETTINGS
from appliance.core import actions, jobs, spaces
from appliance.upkeep import reconcile

pytestmark = pytest.mark.podman
PASSWORD = "a long enough password"



def service_env(config) -> dict[str, str]:
    return {**os.environ,
            **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name]) for s in SETTINGS},
            "APPLIANCE_CONFIG_FILE": "/nonexistent", "APPLIANCE_PORTAL_APPS_PORT": "0",
            "APPLIANCE_RECONCILE_INTERVAL": "1", "APPLIANCE_HEALTH_INTERVAL": "3600"}


def start(env: dict[str, str], *args: str, log) -> subprocess.Popen:
    # A session of its own, so kill -9 of the group takes gunicorn's master and workers at
    # once (the build workers they spawn run in sessions of their own, as in production).
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", *args], env=env, cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)



def settled(ctx, space_id: str) -> bool:
    row = ctx.store.find_space(space_id)
    return row is not None and row["stage"] not in stages.BUSY and not spaces.worker_alive(row)


def test_killing_the_portal_and_the_scheduler_at_random_points_converges(appliance_env,
                                                                         tmp_path):
    ctx, sources_dir = appliance_env
    config = ctx.config
    env = service_env(config)
    users.add_user(ctx.store, "ops", "admin", PASSWORD, "test")
    _, token = users.create_token(ctx.store, "ops", "ops", "write", "test")
    headers = {"Authorization": f"Bearer {token}"}
    repo = make_space_repo(sources_dir / "kill", {"README.md": "---\nsdk: static\n---\n",
                                                  "index.html": "v0"})
    space_id = "team/kill"
    contents = {_head(repo): "v0"}  # revision -> what it serves
    rng = random.Random(20261126)
    log = open(tmp_path / "services.log", "ab")
    scheduler = start(env, "scheduler", log=log)
    portal = None
    try:
        for round_ in range(8):
            port = free_port()
            portal = start(env, "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "2", log=log)
            base = f"http://127.0.0.1:{port}/api/v1"
            wait_for(lambda b=base: _answers(b), 30, "the portal")
            if round_ == 0:
                url, body = f"{base}/spaces", {"source": str(repo), "name": space_id}
            else:
                contents[commit(repo, {"index.html": f"v{round_}"}, f"round {round_}")] = \
                    f"v{round_}"
                url, body = f"{base}/spaces/{space_id}/update", {}
            threading.Thread(target=_post, args=(url, body, headers), daemon=True).start()
            # Early (before the change is recorded) or late (a worker building, switching).
            delay = rng.uniform(0.0, 0.12) if round_ % 2 else rng.uniform(0.12, 0.6)
            time.sleep(delay)  # parsing, recording, spawning, answering
            kill(portal)
            stage_at_kill = (ctx.store.find_space(space_id) or {}).get("stage")
            if also_scheduler := rng.random() < 0.5:
                kill(scheduler)
                assert ctx.store.integrity_ok()
                scheduler = start(env, "scheduler", log=log)
            assert ctx.store.integrity_ok()
            if round_ == 0 and ctx.store.find_space(space_id) is None:
                # Killed before the Space was recorded: nothing half-made; add it for real.
                assert not labelled("container", space_id)
                actions.add(ctx, str(repo), name=space_id)
            wait_for(lambda: settled(ctx, space_id), 240, f"{space_id} to settle (round {round_})")
            view = spaces.describe(ctx, space_id)
            assert view["stage"] not in stages.BUSY, view
            print(f"round {round_}: portal killed after {delay:.2f} s at {stage_at_kill}"
                  f"{' with the scheduler' if also_scheduler else ''} -> {view['stage']} "
                  f"{(view['revision'] or '-')[:8]}")
        # The scheduler stops cleanly now, so a last pass here sees what it left.
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(60)
        # What the services did by themselves: settled on a revision they serve whole. (An
        # update killed before it was recorded is lost, as a request to a dead server is; so
        # the revision may be an earlier one, but it must be the one served.)
        view = spaces.describe(ctx, space_id)
        assert view["stage"] == stages.RUNNING, view["error"]
        assert view["revision"] in contents, view
        assert requests.get(view["url"], timeout=5).text == contents[view["revision"]]
        assert len(labelled("container", space_id)) == 1
        assert not reconcile.reconcile_once(ctx).changed
        assert ctx.store.integrity_ok()
        assert [row["id"] for row in ctx.store.list_spaces()] == [space_id]  # nothing lost
        # Recovery is a separate step: asking again brings the Space to the last commit.
        head = _head(repo)
        needed, _ = spaces.request_update(ctx, space_id)
        assert needed == (view["revision"] != head)
        if needed:
            jobs.run_job(ctx, space_id, "deploy")
        view = spaces.describe(ctx, space_id)
        assert view["stage"] == stages.RUNNING and view["revision"] == head, view["error"]
        assert requests.get(view["url"], timeout=5).text == "v7"
        assert len(labelled("container", space_id)) == 1
    finally:
        for process in (portal, scheduler):
            if process is not None and process.poll() is None:
                kill(process)
        log.close()
        if ctx.store.find_space(space_id):
            spaces.delete(ctx, space_id)


def _answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/whoami", timeout=2).ok
    except requests.RequestException:
        return False


def _post(url: str, body: dict, headers: dict) -> None:
    try:
        requests.post(url, json=body, headers=headers, timeout=60)
    except requests.RequestException:
        pass  # the portal was killed under it: that is the point


def _head(repo) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
