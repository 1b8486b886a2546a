"""Reconcile on real Podman: a reboot, orphans, an interrupted switch, an interrupted delete,
and the scheduler process bringing a killed Space back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from conftest import as_service, labelled, make_space_repo

from appliance import stages
from appliance.adapters import router
from appliance.config import SETTINGS
from appliance.core import jobs, spaces
from appliance.upkeep import housekeeping, reconcile

pytestmark = pytest.mark.podman

README = "---\nsdk: static\n---\n"


def inline(ctx, space_id, job, factory=False):
    """Run the job reconcile asks for here, so the test sees its result at once."""
    return jobs.run_job(ctx, space_id, job, factory)


def deploy_static(ctx, sources_dir, name: str, text: str) -> dict:
    repo = make_space_repo(sources_dir / name, {"README.md": README, "index.html": text})
    spaces.add_space(ctx, str(repo), name=f"rec/{name}")
    view = spaces.deploy(ctx, f"rec/{name}")
    assert view["stage"] == stages.RUNNING, view["error"]
    return view


def answers(url: str, text: str) -> bool:
    try:
        return requests.get(url, timeout=3).text == text
    except requests.RequestException:
        return False


def test_simulated_reboot_brings_every_running_space_back(appliance_env):
    ctx, sources_dir = appliance_env
    one = deploy_static(ctx, sources_dir, "one", "one")
    two = deploy_static(ctx, sources_dir, "two", "two")
    spaces.stop(ctx, "rec/two")
    # The "reboot": every container and the router gone, the database as it was.
    as_service("podman", "rm", "-f", ctx.store.get_space("rec/one")["container"])
    router.stop_router(ctx.config)
    report = reconcile.reconcile_once(ctx, spawn=inline)
    assert report.restarting == ["rec/one"]
    assert answers(one["url"], "one")
    assert spaces.describe(ctx, "rec/two")["stage"] == stages.STOPPED  # stays as it was left
    assert labelled("container", "rec/two") == []
    assert not reconcile.reconcile_once(ctx, spawn=inline).changed  # converged
    assert spaces.describe(ctx, "rec/two")["port"] == two["port"]  # its stable port is kept
    for space_id in ("rec/one", "rec/two"):
        spaces.delete(ctx, space_id)


def test_orphans_and_a_second_revision_left_by_an_interrupted_switch_are_removed(
        appliance_env):
    ctx, sources_dir = appliance_env
    view = deploy_static(ctx, sources_dir, "switch", "switch")
    row = ctx.store.get_space("rec/switch")
    # A second container of the Space (a switch killed half-way) and one of a Space that
    # no longer exists.
    for name, owner in (("rec-switch-leftover", "rec/switch"), ("ghost-leftover", "ghost/x")):
        ctx.runtime.run(name, row["image"], spaces.allocate_port(ctx), 7860, {},
                        {"appliance.space": owner, "appliance.role": "app"}, {}, False)
    report = reconcile.reconcile_once(ctx, spawn=inline)
    assert sorted(report.removed_containers) == ["ghost-leftover", "rec-switch-leftover"]
    assert labelled("container", "rec/switch") == [row["container"]]
    assert answers(view["url"], "switch")
    spaces.delete(ctx, "rec/switch")


def test_orphan_images_of_deleted_spaces_are_removed(appliance_env):
    ctx, _ = appliance_env
    ctx.runtime.build({"Containerfile": b"FROM localhost/appliance-python:3.11\n"},
                      "Containerfile", "localhost/space-ghost-test:1",
                      {"appliance.space": "ghost/image",
                       "appliance.instance": ctx.config.instance_id},
                      {}, {}, False, lambda line: None, 120)
    assert labelled("image", "ghost/image")
    # Not in every reconcile pass (listing images is costly): the hourly prune removes them.
    assert not reconcile.reconcile_once(ctx, spawn=inline).changed
    report = housekeeping.prune_once(ctx)
    assert report.removed_images and labelled("image", "ghost/image") == []


def test_an_interrupted_delete_is_finished(appliance_env):
    ctx, sources_dir = appliance_env
    deploy_static(ctx, sources_dir, "gone", "gone")
    row = ctx.store.get_space("rec/gone")
    ctx.store.move("rec/gone", row["stage"], stages.DELETING, "test", worker_pid=None)
    reconcile.reconcile_once(ctx, spawn=inline)
    assert ctx.store.find_space("rec/gone") is None
    assert labelled("container", "rec/gone") == [] and labelled("image", "rec/gone") == []


def test_scheduler_process_restarts_a_killed_space_and_stops_cleanly_on_sigterm(
        appliance_env):
    ctx, sources_dir = appliance_env
    view = deploy_static(ctx, sources_dir, "watched", "watched")
    config = ctx.config.with_values(reconcile_interval=1)
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS}}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "scheduler"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        as_service("podman", "kill", ctx.store.get_space("rec/watched")["container"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not answers(view["url"], "watched"):
            time.sleep(0.3)
        worker_log = ctx.config.data_path / "run" / "worker.log"
        assert answers(view["url"], "watched"), (
            worker_log.read_text() if worker_log.exists() else "no worker ran",
            spaces.describe(ctx, "rec/watched"))
        events = [e["kind"] for e in ctx.store.events("rec/watched", limit=20)]
        assert "switched" in events
        assert ctx.store.events("rec/watched", limit=1)[0]["actor"] == "scheduler"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "scheduler stopped" in output
    assert json.loads(json.dumps(spaces.describe(ctx, "rec/watched")))["stage"] == "RUNNING"
    spaces.delete(ctx, "rec/watched")


def test_containers_of_another_appliance_instance_are_left_alone(appliance_env):
    ctx, sources_dir = appliance_env
    deploy_static(ctx, sources_dir, "mine", "mine")
    image = ctx.store.get_space("rec/mine")["image"]
    other = ctx.config.with_values(data_dir=str(ctx.config.data_path.parent / "other-data"))
    other_runtime = type(ctx.runtime)(other)
    other_runtime.run("other-instance-app", image, spaces.allocate_port(ctx), 7860, {},
                      {"appliance.space": "someone/else", "appliance.role": "app"}, {}, False)
    try:
        report = reconcile.reconcile_once(ctx, spawn=inline)
        assert "other-instance-app" not in report.removed_containers
        assert labelled("container", "someone/else") == ["other-instance-app"]
    finally:
        other_runtime.remove_container("other-instance-app")
        spaces.delete(ctx, "rec/mine")


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_an_interrupted_build_is_retried_once_then_left_in_build_error(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "retry", {"README.md": README, "index.html": "ok"})
    spaces.add_space(ctx, str(repo), name="rec/retry")  # BUILDING: its worker is to come
    ctx.store.update_space("rec/retry", worker_pid=dead_pid())  # ...and died with the build
    asked = []

    def spawn(c, space_id, job, factory=False):
        asked.append((space_id, job))

    report = reconcile.reconcile_once(ctx, spawn=spawn)
    assert report.retried_builds == ["rec/retry"] and asked == [("rec/retry", "deploy")]
    row = ctx.store.get_space("rec/retry")
    assert row["stage"] == stages.BUILDING and row["build_retried"] == 1
    assert "build-retry" in [e["kind"] for e in ctx.store.events("rec/retry")]

    ctx.store.update_space("rec/retry", worker_pid=dead_pid())  # the retry dies as well
    report = reconcile.reconcile_once(ctx, spawn=spawn)
    assert report.recovered == ["rec/retry"] and report.retried_builds == []
    assert len(asked) == 1, "a second interruption is not retried in a loop"
    view = spaces.describe(ctx, "rec/retry")
    assert view["stage"] == stages.BUILD_ERROR
    assert "ended while the Space was BUILDING" in view["error"]
    assert f"appliance spaces update {view['id']}" in view["error"]

    spaces.request_update(ctx, "rec/retry")  # a person tries again: a build that finishes
    assert spaces.deploy(ctx, "rec/retry")["stage"] == stages.RUNNING
    assert ctx.store.get_space("rec/retry")["build_retried"] == 0
    spaces.delete(ctx, "rec/retry")
