"""Housekeeping steps called directly: backups, log rotation, pruning, the disk space check
(a real full tmpfs included), and pruning dangling images on real Podman."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance import stages
from appliance.config import load_config
from appliance.core import packages, spaces
from appliance.errors import ApplianceError
from appliance.upkeep import housekeeping

GiB = 1024**3
MiB = 1024**2
NO_PODMAN = "unix:///nonexistent/podman.sock"


@pytest.fixture
def ctx(tmp_path):
    """A context on a real SQLite file in tmp_path, and a Podman socket that is not there."""
    context = make_context(tmp_path / "data")
    yield context
    context.store.close()


def make_context(data_dir: Path, **overrides) -> spaces.Context:
    config = load_config({}, data_dir=str(data_dir), podman_url=NO_PODMAN,
                         podman_autostart=False, **overrides)
    return spaces.open_context(config, actor="test")


def with_settings(ctx: spaces.Context, **overrides) -> spaces.Context:
    return spaces.Context(ctx.config.with_values(**overrides), ctx.store, ctx.runtime, "test")


def add_space(ctx: spaces.Context, space_id: str, port: int, **fields) -> None:
    ctx.store.insert_space({
        "id": space_id, "source": "/src", "source_display": "/src", "port": port,
        "stage": fields.pop("stage", stages.RUNNING), "hardware": "cpu", "desired": "running",
    }, "test")
    if fields:
        ctx.store.update_space(space_id, **fields)


def checkouts_of(ctx: spaces.Context, space_id: str) -> Path:
    return spaces.space_paths(ctx, space_id)[0]


def logs_of(ctx: spaces.Context, space_id: str) -> Path:
    return spaces.space_paths(ctx, space_id)[1]


def events(ctx: spaces.Context, kind: str) -> list[dict]:
    return [e for e in ctx.store.events(limit=1000) if e["kind"] == kind]


# -- backups ----------------------------------------------------------------------------------


def test_backup_is_an_intact_copy_taken_while_another_connection_holds_a_write_transaction(
        ctx):
    for number in range(20):
        add_space(ctx, f"owner/space{number}", 17000 + number, revision=f"{number:040x}")
    # Committed rows still sit in the write-ahead log: a file copy of appliance.db would
    # miss them, SQLite's backup API does not.
    wal = ctx.config.db_path.with_name("appliance.db-wal")
    assert wal.stat().st_size > 0
    writer = sqlite3.connect(str(ctx.config.db_path), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("insert into events (at, kind, detail) values ('now', 'uncommitted', '{}')")
    ctx.store.db.execute("PRAGMA busy_timeout=200")  # the backup event waits for the writer
    try:
        report = housekeeping.backup_once(ctx, now=datetime(2026, 11, 27, 3, 0, 5, tzinfo=UTC))
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert report.path == ctx.config.data_path / "backups" / "appliance-20261127T030005Z.db"
    assert report.errors == ["could not record the backup event: database is locked"]
    copy = sqlite3.connect(str(report.path))
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("select id, revision from spaces order by id").fetchall() == [
            (row["id"], row["revision"]) for row in ctx.store.list_spaces()]
        assert copy.execute(
            "select count(*) from events where kind = 'uncommitted'").fetchone()[0] == 0
    finally:
        copy.close()
    assert report.size == report.path.stat().st_size
    assert report.path.stat().st_mode & 0o077 == 0  # it holds the secrets


def test_backup_retention_keeps_the_newest_backups_and_records_each_one(ctx):
    ctx = with_settings(ctx, backup_keep=3)
    start = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
    reports = [housekeeping.backup_once(ctx, now=start + timedelta(days=day))
               for day in range(5)]
    assert all(not r.errors for r in reports)
    left = sorted(p.name for p in (ctx.config.data_path / "backups").iterdir())
    assert left == ["appliance-20261103T020000Z.db", "appliance-20261104T020000Z.db",
                    "appliance-20261105T020000Z.db"]
    assert reports[3].removed == ["appliance-20261101T020000Z.db"]
    assert reports[4].removed == ["appliance-20261102T020000Z.db"]
    recorded = events(ctx, "backup")
    assert len(recorded) == 5
    assert recorded[0]["detail"] == {"path": str(reports[4].path), "bytes": reports[4].size}


def test_backup_after_the_clock_went_back_keeps_the_one_just_taken(ctx):
    ctx = with_settings(ctx, backup_keep=2)
    for day in (10, 11, 12):
        housekeeping.backup_once(ctx, now=datetime(2026, 11, day, tzinfo=UTC))
    report = housekeeping.backup_once(ctx, now=datetime(2026, 11, 1, tzinfo=UTC))
    left = sorted(p.name for p in (ctx.config.data_path / "backups").iterdir())
    assert left == ["appliance-20261101T000000Z.db", "appliance-20261112T000000Z.db"]
    assert report.path.name in left


def test_next_backup_is_due_an_interval_after_the_newest_backup(ctx):
    ctx = with_settings(ctx, backup_interval=86400)
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert housekeeping.next_backup_at(ctx.config, now) == now  # none yet
    housekeeping.backup_once(ctx, now=now - timedelta(hours=3))
    assert housekeeping.next_backup_at(ctx.config, now) == now + timedelta(hours=21)
    housekeeping.backup_once(ctx, now=now - timedelta(days=3))  # older: changes nothing
    assert housekeeping.next_backup_at(ctx.config, now) == now + timedelta(hours=21)
    later = now + timedelta(days=2)  # overdue: at once
    assert housekeeping.next_backup_at(ctx.config, later) == later
    # A backup stamped in the future (a clock set back since) never delays the next one
    # by more than an interval.
    housekeeping.backup_once(ctx, now=now + timedelta(days=30))
    assert housekeeping.next_backup_at(ctx.config, now) == now + timedelta(days=1)


def test_failed_backup_is_reported_not_raised(ctx):
    (ctx.config.data_path / "backups").write_text("a file where the folder should be")
    report = housekeeping.backup_once(ctx, now=datetime(2026, 11, 27, tzinfo=UTC))
    assert report.path is None
    assert len(report.errors) == 1
    assert report.errors[0].startswith(
        f"backup to {ctx.config.data_path}/backups/appliance-20261127T000000Z.db failed: ")
    assert events(ctx, "backup") == []


# -- logs -------------------------------------------------------------------------------------


def test_log_rotation_keeps_the_newest_logs_and_the_latest_builds_log(ctx):
    ctx = with_settings(ctx, build_logs_keep=2)
    add_space(ctx, "owner/app", 17001)
    folder = logs_of(ctx, "owner/app")
    folder.mkdir(parents=True)
    for stamp in range(1000, 1006):
        (folder / f"build-{stamp}.log").write_text(f"log {stamp}\n")
    (folder / "notes.txt").write_text("not a build log")
    # The latest build row names an older log (written under a clock that ran ahead).
    ctx.store.start_build("owner/app", False, folder / "build-1001.log")
    report = housekeeping.rotate_logs_once(ctx)
    assert sorted(p.name for p in folder.iterdir()) == [
        "build-1001.log", "build-1004.log", "build-1005.log", "notes.txt"]
    assert sorted(report.removed) == [str(folder / f"build-{s}.log") for s in (1000, 1002, 1003)]
    assert report.errors == []


def test_log_folders_of_deleted_spaces_are_removed(ctx):
    add_space(ctx, "owner/kept", 17001)
    kept = logs_of(ctx, "owner/kept")
    kept.mkdir(parents=True)
    ghost = ctx.config.data_path / "logs" / "space-owner-ghost-0123abcd"
    ghost.mkdir(parents=True)
    (ghost / "build-1.log").write_text("old")
    report = housekeeping.rotate_logs_once(ctx)
    assert report.removed == [str(ghost)]
    assert kept.is_dir() and not ghost.exists()


def test_big_run_logs_are_cut_to_their_last_mebibyte_and_writers_keep_appending(ctx):
    ctx = with_settings(ctx, run_log_max_mb=2)
    run_dir = ctx.config.data_path / "run"
    run_dir.mkdir(parents=True)
    big, small = run_dir / "worker.log", run_dir / "router.log"
    lines = [f"line {n:07d} {'x' * 50}\n" for n in range(60000)]  # about 3.6 MiB
    big.write_text("".join(lines))
    small.write_text("short\n")
    (run_dir / "router.json").write_text("{}" + " " * 3 * MiB)  # not a log
    writer = open(big, "a")  # a worker holding its log open in append mode
    try:
        report = housekeeping.rotate_logs_once(ctx)
        writer.write("after the cut\n")
        writer.flush()
    finally:
        writer.close()
    assert report.truncated == [str(big)]
    text = big.read_text()
    header, first, *_ = text.splitlines(keepends=True)
    assert header.startswith("[earlier lines (") and "removed by housekeeping]" in header
    assert first in lines  # cut at a line start
    assert text.endswith(lines[-1] + "after the cut\n")
    assert "\0" not in text
    assert MiB - 100 < len(text) - len(header) < MiB + 100
    assert small.read_text() == "short\n"
    assert (run_dir / "router.json").stat().st_size > 3 * MiB


def test_an_unreadable_log_folder_is_reported_and_the_pass_goes_on(ctx, monkeypatch):
    add_space(ctx, "owner/one", 17001)
    add_space(ctx, "owner/two", 17002)
    ctx = with_settings(ctx, build_logs_keep=0)
    for space_id in ("owner/one", "owner/two"):
        logs_of(ctx, space_id).mkdir(parents=True)
        (logs_of(ctx, space_id) / "build-1.log").write_text("x")
    real_iterdir = Path.iterdir

    def iterdir(path):
        if path == logs_of(ctx, "owner/one"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    report = housekeeping.rotate_logs_once(ctx)
    assert report.errors == [
        f"owner/one: cannot rotate the logs in {logs_of(ctx, 'owner/one')}: "
        f"[Errno 13] Permission denied: '{logs_of(ctx, 'owner/one')}'"]
    assert report.removed == [str(logs_of(ctx, "owner/two") / "build-1.log")]


# -- pruning checkouts ------------------------------------------------------------------------


def test_prune_keeps_the_current_and_previous_checkouts_and_removes_the_rest(ctx):
    add_space(ctx, "owner/app", 17001, revision="c" * 40, previous_revision="b" * 40)
    add_space(ctx, "owner/busy", 17002, stage=stages.BUILDING)
    app, busy = checkouts_of(ctx, "owner/app"), checkouts_of(ctx, "owner/busy")
    for name in ("a" * 40, "b" * 40, "c" * 40, "d" * 40, ".incoming-old", ".incoming-new"):
        (app / name / "sub").mkdir(parents=True)
        (app / name / "sub" / "file.txt").write_text(name)
    hour_and_a_bit = time.time() - 3700
    os.utime(app / ".incoming-old", (hour_and_a_bit, hour_and_a_bit))
    (busy / ("e" * 40)).mkdir(parents=True)  # being fetched: in no row yet
    ghost = ctx.config.data_path / "checkouts" / "space-owner-ghost-0123abcd"
    (ghost / ("f" * 40)).mkdir(parents=True)
    report = housekeeping.prune_once(ctx)
    assert sorted(p.name for p in app.iterdir()) == [".incoming-new", "b" * 40, "c" * 40]
    assert sorted(report.removed_checkouts) == sorted(
        [str(app / ("a" * 40)), str(app / ("d" * 40)), str(app / ".incoming-old"), str(ghost)])
    assert (busy / ("e" * 40)).is_dir()
    # Podman is unreachable here: the images part is reported, the checkouts still pruned.
    assert report.errors == [f"cannot list images: Cannot reach Podman at {NO_PODMAN}"]


def _cached_file(ctx, name: str, size: int, used_at: float) -> packages.Pin:
    body = name.encode() * (size // len(name))
    pin = packages.Pin(name, "1.0", f"{name}-1.0-py3-none-any.whl", None,
                       hashlib.sha256(body).hexdigest(), len(body))
    path = packages.cached_path(ctx.config.package_cache_path, pin)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    os.utime(path, (used_at, used_at))
    return pin


def _lock_naming(pins: list[packages.Pin]) -> str:
    return 'lock-version = "1.0"\n' + "".join(
        f'\n[[packages]]\nname = "{p.name}"\nversion = "{p.version}"\n\n[[packages.wheels]]\n'
        f'url = "https://f.example/{p.filename}"\nhashes = {{ sha256 = "{p.sha256}" }}\n'
        for p in pins)


def test_prune_bounds_the_package_cache_but_keeps_what_a_kept_revision_is_locked_to(ctx):
    serving, old = "a" * 40, "b" * 40
    add_space(ctx, "owner/locked", 17001, revision=serving)
    kept = [_cached_file(ctx, "kept", 4096, 1000.0)]  # the oldest, but the serving lock's
    gone = [_cached_file(ctx, f"old{i}", 4096, 2000.0 + i) for i in range(3)]
    fresh = _cached_file(ctx, "fresh", 4096, 9000.0)
    for revision, pins in ((serving, kept), (old, gone)):
        ctx.store.save_lock({"space_id": "owner/locked", "revision": revision,
                             "resolution": "dated", "as_of": None, "python": "3.11",
                             "platform": "x86_64-manylinux_2_36", "text": _lock_naming(pins),
                             "sdk_packages": "[]"})
    limit_gb = 2.5 * 4096 / GiB  # room for two files and a half
    report = housekeeping.prune_once(with_settings(ctx, package_cache_gb=limit_gb))
    left = {p.parent.name for p in packages.wheelhouse(ctx.config.package_cache_path)
            .glob("*/*/*")}
    assert left == {kept[0].sha256, fresh.sha256}
    assert report.removed_package_files == 3 and report.freed_package_bytes >= 3 * 4096
    assert report.changed
    # Under the bound, nothing more goes.
    again = housekeeping.prune_once(with_settings(ctx, package_cache_gb=limit_gb))
    assert again.removed_package_files == 0


def test_prune_reports_a_checkout_it_cannot_remove_and_removes_the_others(ctx, monkeypatch):
    add_space(ctx, "owner/app", 17001, revision="c" * 40)
    app = checkouts_of(ctx, "owner/app")
    for name in ("a" * 40, "b" * 40, "c" * 40):
        (app / name).mkdir(parents=True)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == "a" * 40:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(housekeeping.shutil, "rmtree", rmtree)
    report = housekeeping.prune_once(ctx)
    assert report.removed_checkouts == [str(app / ("b" * 40))]
    assert report.errors[0] == (f"cannot remove {app / ('a' * 40)}: [Errno 13] "
                                f"Permission denied: '{app / ('a' * 40)}'")


# -- disk space -------------------------------------------------------------------------------


def test_disk_check_writes_an_event_only_when_the_state_changes(ctx, monkeypatch):
    free = {"bytes": 50 * GiB}
    monkeypatch.setattr(housekeeping.host, "disk_free_bytes", lambda path: free["bytes"])

    def check(gib: float) -> housekeeping.DiskReport:
        free["bytes"] = int(gib * GiB)
        return housekeeping.check_disk_once(ctx)

    assert (check(50).state, check(50).changed) == ("ok", False)
    assert events(ctx, "disk:low") == []
    first = check(3)
    assert (first.state, first.changed) == ("low", True)
    assert (check(3).changed, check(4.5).changed) == (False, False)
    low = events(ctx, "disk:low")
    assert len(low) == 1
    assert low[0]["detail"] == {"free_gib": 3.0, "state": "low", "min_free_gb": 5.0,
                                "refuse_builds_gb": 2.0, "builds_refused": False}
    assert json.loads((ctx.config.data_path / "run" / "disk.json").read_text())["state"] == "low"
    assert check(1).state == "full"
    assert events(ctx, "disk:low")[0]["detail"]["builds_refused"] is True
    assert check(8).changed and not check(9).changed
    assert len(events(ctx, "disk:low")) == 2
    assert [e["detail"]["free_gib"] for e in events(ctx, "disk:ok")] == [8.0]


def test_disk_check_reports_a_data_dir_it_cannot_measure(ctx, monkeypatch):
    def fail(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(housekeeping.host, "disk_free_bytes", fail)
    report = housekeeping.check_disk_once(ctx)
    assert report.errors == [
        f"cannot measure free space in {ctx.config.data_path}: [Errno 5] Input/output error"]
    assert report.state is None


def test_builds_are_refused_below_the_free_space_limit(ctx, monkeypatch):
    free = {"bytes": int(1.2 * GiB)}
    monkeypatch.setattr(housekeeping.host, "disk_free_bytes", lambda path: free["bytes"])
    with pytest.raises(ApplianceError) as caught:
        housekeeping.assert_room_for_build(ctx.config)
    assert caught.value.message == (
        f"Only 1.2 GiB free in {ctx.config.data_dir}; builds are refused below 2 GiB")
    assert caught.value.hint == (
        "free space (delete unused Spaces; the scheduler prunes old checkouts and images "
        "hourly), or lower APPLIANCE_DISK_REFUSE_BUILDS_GB")
    assert caught.value.status == 507
    free["bytes"] = int(2.5 * GiB)
    housekeeping.assert_room_for_build(ctx.config)
    free["bytes"] = 0
    housekeeping.assert_room_for_build(ctx.config.with_values(disk_refuse_builds_gb=0))


def test_a_really_full_disk_refuses_builds_and_leaves_the_database_intact(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    ctx = None
    try:
        ctx = make_context(mount)
        add_space(ctx, "owner/app", 17001, revision="a" * 40)
        # Leave exactly 1 MiB free (tmpfs counts whole pages, as the filler is).
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(mount).free - MiB))
        assert shutil.disk_usage(mount).free == MiB
        with pytest.raises(ApplianceError) as caught:
            housekeeping.assert_room_for_build(ctx.config)
        assert caught.value.message == (
            f"Only 1.0 MiB free in {mount}; builds are refused below 2 GiB")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            ctx.store.add_event(None, "big", "test", {"blob": "x" * 4 * MiB})
        assert ctx.store.integrity_ok()
        assert ctx.store.get_space("owner/app")["revision"] == "a" * 40
        # Nothing left at all (the failed write's log took most of what was left): the
        # check reports what it could not write, and never raises.
        fill_up(mount / "filler-rest")
        assert shutil.disk_usage(mount).free == 0
        report = housekeeping.check_disk_once(ctx)
        assert report.state == "full" and not report.changed
        assert report.errors == [
            "cannot record the disk state full: [Errno 28] No space left on device"]
        assert events(ctx, "disk:low") == []
        backup = housekeeping.backup_once(ctx)
        assert backup.path is None
        assert backup.errors[0].endswith(" failed: database or disk is full")
        assert not list((mount / "backups").glob("*"))  # no half-written backup left
        (mount / "filler-rest").unlink(missing_ok=True)
        filler.unlink()
        assert housekeeping.check_disk_once(ctx).changed
        assert [e["detail"]["builds_refused"] for e in events(ctx, "disk:low")] == [True]
        fresh = sqlite3.connect(str(ctx.config.db_path))
        try:
            assert fresh.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            fresh.close()
    finally:
        if ctx is not None:
            ctx.store.close()
        subprocess.run(["umount", str(mount)], check=True)


def fill_up(path: Path) -> None:
    """Write to path until the filesystem has no room left."""
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC


# -- pruning images on real Podman ------------------------------------------------------------


@pytest.mark.podman
def test_prune_removes_a_dangling_image_of_a_space_unless_a_container_still_runs_it(
        appliance_env):
    ctx, _ = appliance_env
    space_id = "hk/images"
    tag = "localhost/space-hk-images-test:1"
    add_space(ctx, space_id, spaces.allocate_port(ctx), image=tag)
    base_images = ctx.runtime.list_images("localhost/appliance-python")
    sdk_images = ctx.runtime.list_images("localhost/appliance-sdk")

    def build(revision: str) -> str:
        return ctx.runtime.build(
            {"Containerfile": b"FROM localhost/appliance-python:3.11\n"}, "Containerfile", tag,
            {"appliance.space": space_id, "appliance.revision": revision,
             "appliance.instance": ctx.config.instance_id}, {}, {}, False,
            lambda line: None, 120)

    first = build("1")
    ctx.runtime.run("hk-images-old", first, spaces.allocate_port(ctx), 7860, {},
                    {"appliance.space": space_id, "appliance.role": "app"}, {}, False,
                    command=["sleep", "300"])
    try:
        second = build("2")  # takes the tag: the first image is now untagged
        images = ctx.runtime.images_of(space_id)
        assert images[first] == [] and images[second] == [tag]
        report = housekeeping.prune_once(ctx)
        assert report.removed_images == [] and report.errors == []
        assert first in ctx.runtime.images_of(space_id)  # its container still runs it
    finally:
        ctx.runtime.remove_container("hk-images-old")
    report = housekeeping.prune_once(ctx)
    assert report.removed_images == [first]
    assert list(ctx.runtime.images_of(space_id)) == [second]
    assert ctx.runtime.list_images("localhost/appliance-python") == base_images
    assert ctx.runtime.list_images("localhost/appliance-sdk") == sdk_images
    spaces.delete(ctx, space_id)


def test_deploy_refused_for_a_full_disk_lands_in_build_error_with_the_reason(
        tmp_path, monkeypatch):
    import subprocess

    from appliance.config import load_config

    repo = tmp_path / "allowed" / "repo"
    repo.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"]):
        (repo / "README.md").write_text("---\nsdk: static\n---\n")
        (repo / "index.html").write_text("hi")
        subprocess.run(["git", *args], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   cwd=repo, check=True)
    ctx = spaces.open_context(load_config(
        {}, data_dir=str(tmp_path / "data"), local_sources=str(tmp_path / "allowed"),
        podman_url="unix:///nonexistent.sock", podman_autostart=False))
    spaces.add_space(ctx, str(repo), name="o/app")
    monkeypatch.setattr(housekeeping.host, "disk_free_bytes", lambda path: int(1.2 * 1024**3))
    view = spaces.deploy(ctx, "o/app")
    assert view["stage"] == "BUILD_ERROR"
    assert view["error"].startswith("Only 1.2 GiB free") and "refused below 2 GiB" in view["error"]
    assert ctx.store.latest_build("o/app")["status"] == "failed"
