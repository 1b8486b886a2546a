"""Scheduled updates on real Podman: a tracked branch's new commit is served, a broken commit
is tried once and then skipped until a fix lands, pinned and manual Spaces stay put, the
maintenance window defers updates, and an unreachable remote is one event, not one a pass."""

from __future__ import annotations

import shutil
from datetime import datetime

import pytest
import requests
from conftest import commit, make_space_repo

from appliance import stages
from appliance.adapters import router
from appliance.core import jobs, spaces
from appliance.errors import InvalidInput, NotFound, SourceError
from appliance.upkeep import updates

pytestmark = pytest.mark.podman

README = "---\nsdk: static\n---\n"
# Passes are given their time: a Monday at 10:00 local time, far from any real clock.
T0 = datetime(2030, 1, 7, 10, 0).timestamp()


def inline(ctx, space_id, job, factory=False):
    """Run the job the pass asks for here, so the test sees its result at once."""
    if job == "update":
        return jobs.run_update(ctx, space_id)
    return jobs.run_job(ctx, space_id, job, factory)


def deployed(ctx, sources_dir, name: str, text: str = "v1"):
    """A static Space serving `text` from a fresh repository on branch main."""
    repo = make_space_repo(sources_dir / name, {"README.md": README, "index.html": text})
    router.ensure_router(ctx.config)
    spaces.add_space(ctx, str(repo), name=f"upd/{name}")
    view = spaces.deploy(ctx, f"upd/{name}")
    assert view["stage"] == stages.RUNNING, view["error"]
    return repo, f"upd/{name}", view["url"]


def serves(url: str) -> str | None:
    try:
        return requests.get(url, timeout=5).text
    except requests.RequestException:
        return None


def kinds(ctx, space_id: str) -> list[str]:
    return [e["kind"] for e in ctx.store.events(space_id, limit=200)]


def check(ctx, now: float) -> updates.UpdateReport:
    return updates.check_updates_once(ctx, now=now, spawn=inline)


def test_tracking_a_branch_picks_up_a_new_commit_and_serves_it(appliance_env):
    ctx, sources_dir = appliance_env
    repo, space_id, url = deployed(ctx, sources_dir, "tracked")
    view = updates.set_update_policy(ctx, space_id, "track", interval=600)
    assert view["update"]["policy"] == "track" and view["update"]["interval"] == 600
    report = check(ctx, T0)
    assert report.checked == [space_id] and not report.updating  # nothing new
    sha = commit(repo, {"index.html": "v2"}, "v2")
    assert check(ctx, T0 + 300).checked == []  # inside the interval: not even a look
    report = check(ctx, T0 + 600)
    assert report.updating == [space_id], report
    assert serves(url) == "v2"
    row = ctx.store.get_space(space_id)
    assert row["revision"] == sha and row["stage"] == stages.RUNNING
    assert row["failed_revision"] is None and "updated" in kinds(ctx, space_id)
    assert check(ctx, T0 + 1200).updating == []  # served now: nothing more to do
    spaces.delete(ctx, space_id)


def test_a_broken_commit_fails_once_and_is_skipped_until_a_fix_lands(appliance_env):
    ctx, sources_dir = appliance_env
    repo, space_id, url = deployed(ctx, sources_dir, "broken")
    good = ctx.store.get_space(space_id)["revision"]
    updates.set_update_policy(ctx, space_id, "track", interval=60)
    broken = commit(repo, {"index.html": None}, "lose the app file")
    assert check(ctx, T0).updating == [space_id]
    row = ctx.store.get_space(space_id)
    assert row["stage"] == stages.NO_APP_FILE and "index.html" in row["error"]
    assert row["revision"] == good and serves(url) == "v1"  # the old revision keeps serving
    assert row["failed_revision"] == broken
    failed = next(e for e in ctx.store.events(space_id, 50) if e["kind"] == "update-failed")
    assert failed["detail"]["revision"] == broken and "index.html" in failed["detail"]["error"]
    build = ctx.store.latest_build(space_id)["id"]
    for later in (T0 + 60, T0 + 120):
        report = check(ctx, later)
        assert report.skipped == [f"{space_id}: skipped: revision {broken[:12]} failed before"]
        assert not report.updating
    assert ctx.store.latest_build(space_id)["id"] == build  # no rebuild of the broken commit
    fixed = commit(repo, {"index.html": "v3"}, "bring it back")
    assert check(ctx, T0 + 180).updating == [space_id]
    row = ctx.store.get_space(space_id)
    assert row["revision"] == fixed and row["stage"] == stages.RUNNING
    assert row["failed_revision"] is None and serves(url) == "v3"
    spaces.delete(ctx, space_id)


def test_pinned_space_moves_to_its_commit_once_and_ignores_new_commits(appliance_env):
    ctx, sources_dir = appliance_env
    repo, space_id, url = deployed(ctx, sources_dir, "pinned")
    pin = commit(repo, {"index.html": "v2"}, "v2")
    commit(repo, {"index.html": "v3"}, "v3")
    view = updates.set_update_policy(ctx, space_id, "pinned", revision=pin.upper())
    assert view["requested_revision"] == pin  # stored as git writes it
    assert check(ctx, T0).updating == [space_id]
    assert serves(url) == "v2" and ctx.store.get_space(space_id)["revision"] == pin
    commit(repo, {"index.html": "v4"}, "v4")
    report = check(ctx, T0 + 7200)
    assert report.checked == [space_id] and not report.updating
    assert serves(url) == "v2"
    spaces.delete(ctx, space_id)


def test_manual_space_ignores_new_commits(appliance_env):
    ctx, sources_dir = appliance_env
    repo, space_id, url = deployed(ctx, sources_dir, "manual")
    first = ctx.store.get_space(space_id)["revision"]
    commit(repo, {"index.html": "v2"}, "v2")
    report = check(ctx, T0)
    assert space_id not in report.checked and not report.updating
    row = ctx.store.get_space(space_id)
    assert row["update_policy"] == "manual" and row["last_update_check"] is None
    assert row["revision"] == first and serves(url) == "v1"
    spaces.delete(ctx, space_id)


def test_updates_wait_for_the_maintenance_window(appliance_env):
    ctx, sources_dir = appliance_env
    ctx = spaces.Context(ctx.config.with_values(update_window="02:00-05:00"), ctx.store,
                         ctx.runtime, actor="scheduler")
    repo, space_id, url = deployed(ctx, sources_dir, "window")
    updates.set_update_policy(ctx, space_id, "track", interval=86400)
    sha = commit(repo, {"index.html": "v2"}, "v2")
    report = check(ctx, T0)  # 10:00: looked, but no update starts
    assert report.checked == [space_id] and report.deferred == [space_id]
    assert serves(url) == "v1"
    # Tuesday 01:59: the day-long interval is not over and the window is shut.
    assert check(ctx, datetime(2030, 1, 8, 1, 59).timestamp()).checked == []
    # 02:00:30: the window's first pass looks again, though the interval is not over.
    report = check(ctx, datetime(2030, 1, 8, 2, 0, 30).timestamp())
    assert report.updating == [space_id], report
    assert serves(url) == "v2" and ctx.store.get_space(space_id)["revision"] == sha
    assert check(ctx, datetime(2030, 1, 8, 2, 5).timestamp()).checked == []
    spaces.delete(ctx, space_id)


def test_window_spans_midnight_and_a_malformed_one_is_refused(monkeypatch):
    window = updates.parse_window("23:30-01:00")
    assert updates.seconds_into_window(datetime(2030, 1, 7, 23, 45), window) == 15 * 60
    assert updates.seconds_into_window(datetime(2030, 1, 8, 0, 30), window) == 60 * 60
    assert updates.seconds_into_window(datetime(2030, 1, 8, 1, 0), window) is None
    assert updates.seconds_into_window(datetime(2030, 1, 7, 12, 0), window) is None
    assert updates.parse_window("") is None
    for text, says in (("2-5", "must look like 02:00-05:00, got '2-5'"),
                       ("25:00-05:00", "must look like"),
                       ("03:00-03:00", "starts and ends at the same time")):
        with pytest.raises(InvalidInput) as caught:
            updates.parse_window(text)
        assert says in caught.value.message
        assert "APPLIANCE_UPDATE_WINDOW" in caught.value.hint


def test_an_unreachable_remote_is_one_event_not_one_per_check(appliance_env):
    ctx, sources_dir = appliance_env
    repo, space_id, url = deployed(ctx, sources_dir, "gone")
    updates.set_update_policy(ctx, space_id, "track", interval=60)
    shutil.rmtree(repo)
    for index in range(3):
        report = check(ctx, T0 + 60 * index)
        assert report.errors == [f"{space_id}: Local source {repo} is not a directory"]
        assert not report.updating
    assert check(ctx, T0 + 150).errors == []  # within the interval: no look, no error
    assert kinds(ctx, space_id).count("update-check-failed") == 1
    assert serves(url) == "v1"
    # The remote comes back (with new history): one event says so, and the update goes.
    make_space_repo(repo, {"README.md": README, "index.html": "back"})
    assert check(ctx, T0 + 240).updating == [space_id]
    assert kinds(ctx, space_id).count("update-check-ok") == 1 and serves(url) == "back"
    shutil.rmtree(repo)
    check(ctx, T0 + 300)
    assert kinds(ctx, space_id).count("update-check-failed") == 2  # failing again is news
    spaces.delete(ctx, space_id)


def test_set_update_policy_refuses_bad_values_with_clear_messages(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "policy", {"README.md": README, "index.html": "x"})
    space_id = spaces.add_space(ctx, str(repo), name="upd/policy")["id"]
    sha = commit(repo, {"index.html": "y"}, "y")
    refused = {
        ("weekly", None, None): "Unknown update policy 'weekly' for upd/policy",
        ("track", 30, None): "Update interval must be at least 60 seconds, got 30",
        ("track", True, None): "Update interval must be at least 60 seconds, got True",
        ("pinned", 600, sha): "An update interval applies to the track policy only, not pinned",
        ("pinned", None, None): "Pinning upd/policy needs a full 40-character commit sha, got None",
        ("pinned", None, "main"): "needs a full 40-character commit sha, got 'main'",
        ("pinned", None, sha[:12]): f"needs a full 40-character commit sha, got '{sha[:12]}'",
        ("track", None, sha): f"would track commit {sha[:12]}, which never moves",
        ("manual", None, "main"): "The manual policy takes no revision (got 'main')",
        ("track", None, "main~1"): "Invalid revision 'main~1'",
    }
    for (policy, interval, revision), says in refused.items():
        with pytest.raises(InvalidInput) as caught:
            updates.set_update_policy(ctx, space_id, policy, interval, revision)
        assert says in caught.value.message, caught.value.message
    with pytest.raises(SourceError, match="Revision 'nope' not found"):
        updates.set_update_policy(ctx, space_id, "track", revision="nope")
    with pytest.raises(NotFound, match="No Space named upd/absent"):
        updates.set_update_policy(ctx, "upd/absent", "track")
    assert "update-policy" not in kinds(ctx, space_id)  # nothing refused was recorded

    view = updates.set_update_policy(ctx, space_id, "track", interval=120, revision="main")
    assert view["update"] == {"policy": "track", "interval": 120, "revision": "main",
                              "last_check": None, "failed_revision": None}
    view = updates.set_update_policy(ctx, space_id, "pinned", revision=sha)
    assert view["update"]["revision"] == sha and view["requested_revision"] == sha
    with pytest.raises(InvalidInput, match="which never moves"):  # pinned -> track: say which
        updates.set_update_policy(ctx, space_id, "track")
    assert updates.set_update_policy(ctx, space_id, "manual")["update"]["policy"] == "manual"
    events = [e for e in ctx.store.events(space_id, 20) if e["kind"] == "update-policy"]
    assert [e["detail"]["policy"] for e in events] == ["manual", "pinned", "track"]
    spaces.delete(ctx, space_id)
