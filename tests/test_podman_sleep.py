"""Sleep and wake on real Podman: an idle Space sleeps, a request through its url wakes it
(the visitor sees a page that continues by itself), requests keep it awake, paused never wakes.
"""

from __future__ import annotations

import time

import pytest
import requests
from conftest import labelled, make_space_repo, wait_for

from appliance import stages
from appliance.adapters import router
from appliance.core import jobs, spaces
from appliance.upkeep import sleep

pytestmark = pytest.mark.podman


def inline(ctx, space_id, job, factory=False):
    return jobs.run_job(ctx, space_id, job, factory)


def static_space(ctx, sources_dir, name: str) -> dict:
    repo = make_space_repo(sources_dir / name, {"README.md": "---\nsdk: static\n---\n",
                                                "index.html": f"{name} is awake"})
    spaces.add_space(ctx, str(repo), name=f"zz/{name}")
    view = spaces.deploy(ctx, f"zz/{name}")
    assert view["stage"] == stages.RUNNING, view["error"]
    return view


def poll(predicate, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_idle_space_sleeps_and_a_request_wakes_it(appliance_env):
    ctx, sources_dir = appliance_env
    view = static_space(ctx, sources_dir, "napper")
    port = ctx.store.get_space("zz/napper")["port"]
    sleep.set_sleep_time(ctx, "zz/napper", 60)
    assert sleep.sleep_once(ctx).slept == []  # just started: not idle yet
    assert sleep.sleep_once(ctx, now=time.time() + 61).slept == ["zz/napper"]
    row = ctx.store.get_space("zz/napper")
    assert row["stage"] == stages.STOPPED and row["desired"] == sleep.SLEEPING
    assert labelled("container", "zz/napper") == []
    page = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert page.status_code == 503 and "waking up" in page.text
    assert 'http-equiv=refresh' in page.text
    poll(lambda: ctx.store.get_space("zz/napper")["wake_requested_at"])
    assert sleep.wake_once(ctx, spawn=inline).woken == ["zz/napper"]
    assert requests.get(view["url"], timeout=5).text == "napper is awake"
    row = ctx.store.get_space("zz/napper")
    assert row["desired"] == "running" and row["wake_requested_at"] is None
    kinds = [e["kind"] for e in ctx.store.events("zz/napper", 30)]
    assert "sleep" in kinds and "wake" in kinds
    spaces.delete(ctx, "zz/napper")


def test_requests_through_the_url_keep_a_space_awake(appliance_env):
    ctx, sources_dir = appliance_env
    view = static_space(ctx, sources_dir, "busy")
    sleep.set_sleep_time(ctx, "zz/busy", 120)
    requests.get(view["url"], timeout=5)
    poll(lambda: ctx.store.get_space("zz/busy")["last_request_at"])
    # 100 s after that request: under the sleep time, even though it started long before.
    assert sleep.sleep_once(ctx, now=time.time() + 100).slept == []
    assert sleep.sleep_once(ctx, now=time.time() + 121).slept == ["zz/busy"]
    spaces.delete(ctx, "zz/busy")


def test_paused_space_never_wakes_by_itself(appliance_env):
    ctx, sources_dir = appliance_env
    static_space(ctx, sources_dir, "paused")
    port = ctx.store.get_space("zz/paused")["port"]
    spaces.stop(ctx, "zz/paused", pause=True)
    page = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert page.status_code == 503 and "not running" in page.text
    # A wake is recorded at the router's next pass, before it next writes its state file:
    # two state writes after the answer, and a wake would be in the store by now.
    answered = time.time()
    first = wait_for(lambda: router.read_state(ctx.config).get("at", 0) > answered and
                     router.read_state(ctx.config)["at"], 30, "the router's next pass")
    wait_for(lambda: router.read_state(ctx.config).get("at", 0) > first, 30,
             "the router's pass after that")
    assert ctx.store.get_space("zz/paused")["wake_requested_at"] is None
    assert sleep.wake_once(ctx, spawn=inline).woken == []
    assert spaces.describe(ctx, "zz/paused")["stage"] == stages.PAUSED
    spaces.delete(ctx, "zz/paused")


def test_sleep_time_below_a_minute_is_refused(appliance_env):
    ctx, sources_dir = appliance_env
    static_space(ctx, sources_dir, "short")
    with pytest.raises(Exception, match="at least 60 seconds, got 5"):
        sleep.set_sleep_time(ctx, "zz/short", 5)
    spaces.delete(ctx, "zz/short")


def test_cli_sets_and_clears_the_sleep_time(appliance_env):
    import json

    from click.testing import CliRunner

    from appliance.cli.main import cli

    ctx, sources_dir = appliance_env
    static_space(ctx, sources_dir, "cli")
    runner = CliRunner()
    result = runner.invoke(cli, ["spaces", "sleep-time", "zz/cli", "3600", "--json"],
                           obj={"ctx": ctx})
    assert result.exit_code == 0 and json.loads(result.output)["sleep_after"] == 3600
    result = runner.invoke(cli, ["spaces", "sleep-time", "zz/cli", "never", "--json"],
                           obj={"ctx": ctx})
    assert json.loads(result.output)["sleep_after"] is None
    result = runner.invoke(cli, ["spaces", "sleep-time", "zz/cli", "soon"], obj={"ctx": ctx})
    assert result.exit_code == 2
    assert ("Sleep time must be a duration like 30m, 2h, 1h30m or 3600 (seconds), or 'never'; "
            "got 'soon'") in result.output
    spaces.delete(ctx, "zz/cli")
