"""Housekeeping: database backups, log rotation, pruning old checkouts and images, disk space.

Each job is a plain one-step function taking a Context and returning a report; the scheduler
runs them on a timer, tests call them directly. One bad file, directory or image is reported
and the pass goes on: nothing a job meets on disk escapes as a raw OSError.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import stages
from ..adapters import host
from ..adapters.runtime import ROLE_OFFLINE_NETWORK
from ..adapters.store import MIGRATIONS, Store, open_store
from ..config import Config
from ..core import packages
from ..core.context import Context, kept_images, space_paths
from ..errors import ApplianceError

GiB = 1024**3
MiB = 1024**2
RUN_LOG_TAIL = MiB
STAGING_MIN_AGE = 3600.0
BACKUP_NAME = re.compile(r"appliance-\d{8}T\d{6}Z\.db")
BUILD_LOG_NAME = re.compile(r"build-(\d+)\.log")

# What a step can meet per item. The store passes sqlite3 errors through untranslated (a full
# disk surfaces as sqlite3.OperationalError "database or disk is full"), so they are caught
# here too, to be reported like any other failure.
FAILURES = (OSError, sqlite3.Error, ApplianceError)


class DiskFull(ApplianceError):
    """Too little free space in the data directory to start a build."""

    status = 507


def _say(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ApplianceError) else str(exc)


# -- backups ----------------------------------------------------------------------------------


@dataclass
class BackupReport:
    path: Path | None = None
    size: int = 0
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.path is not None


def backups_dir(config: Config) -> Path:
    return config.data_path / "backups"


def migrate_with_backup(config: Config) -> tuple[Path | None, list[str]]:
    """Apply pending migrations, after an online backup of the database when there are any
    (an upgrade's first step). Returns (the backup or None, the migrations applied)."""
    backup, pending = None, [name for name, _ in MIGRATIONS]
    if config.db_path.exists():
        store = Store(config.db_path)
        try:
            pending = store.pending_migrations()
            if pending:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
                backup = backups_dir(config) / f"pre-migrate-{stamp}.db"
                store.backup(backup)
        finally:
            store.close()
    open_store(config.db_path).close()
    return backup, pending


def next_backup_at(config: Config, now: datetime | None = None) -> datetime:
    """Say when a backup is due: backup_interval after the newest one, or now if none is.

    The scheduler starts its backup timer here, so a process restarted more often than
    backup_interval (upgrades, reboots) still takes its backups.
    """
    now = now or datetime.now(UTC)
    try:
        names = [p.name for p in backups_dir(config).iterdir() if BACKUP_NAME.fullmatch(p.name)]
    except OSError:
        names = []
    if not names:
        return now
    newest = datetime.strptime(max(names), "appliance-%Y%m%dT%H%M%SZ.db").replace(tzinfo=UTC)
    return min(max(now, newest + timedelta(seconds=config.backup_interval)),
               now + timedelta(seconds=config.backup_interval))


def backup_once(ctx: Context, now: datetime | None = None) -> BackupReport:
    """Take an online backup of the database and keep only the newest backup_keep ones."""
    report = BackupReport()
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    destination = backups_dir(ctx.config) / f"appliance-{stamp}.db"
    try:
        ctx.store.backup(destination)
        report.path, report.size = destination, destination.stat().st_size
    except FAILURES as exc:
        report.errors.append(f"backup to {destination} failed: {_say(exc)}")
        # Store.backup writes NAME.partial first; a failed one (a full disk) leaves it behind.
        partial = destination.with_name(destination.name + ".partial")
        if partial.is_file():
            _unlink(partial, report.errors)
        return report
    try:
        ctx.store.add_event(None, "backup", ctx.actor,
                            {"path": str(destination), "bytes": report.size})
    except FAILURES as exc:
        report.errors.append(f"could not record the backup event: {_say(exc)}")
    keep = max(1, ctx.config.backup_keep)
    try:
        found = sorted(p for p in backups_dir(ctx.config).iterdir()
                       if BACKUP_NAME.fullmatch(p.name) and p != destination)
    except OSError as exc:
        report.errors.append(f"cannot list {backups_dir(ctx.config)}: {exc}")
        return report
    # The backup just taken counts first, whatever the clock did; then the newest by name
    # (timestamped names sort in time order).
    for path in sorted(found, reverse=True)[keep - 1:]:
        if _unlink(path, report.errors):
            report.removed.append(path.name)
    return report


# -- logs -------------------------------------------------------------------------------------


@dataclass
class LogReport:
    removed: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.truncated)


def rotate_logs_once(ctx: Context) -> LogReport:
    """Keep each Space's newest build logs, drop deleted Spaces' logs, cut big run/ logs."""
    report = LogReport()
    logs_root = ctx.config.data_path / "logs"
    # Listed before the Spaces are read: a directory made after this belongs to a Space
    # whose row already exists, so a new Space's logs are never taken for an orphan's.
    folders = _subdirectories(logs_root, report.errors)
    known = _read_spaces(ctx, report.errors)
    if known is not None:
        owners = known[1]
        for folder in folders:
            space_id = owners.get(folder.name)
            if space_id is None:
                if _remove_tree(folder, report.errors):
                    report.removed.append(str(folder))
            else:
                _rotate_build_logs(ctx, space_id, folder, report)
    _truncate_run_logs(ctx.config, report)
    return report


def _rotate_build_logs(ctx: Context, space_id: str, folder: Path,
                       report: LogReport) -> None:
    try:
        logs = [p for p in folder.iterdir() if BUILD_LOG_NAME.fullmatch(p.name)]
        latest = ctx.store.latest_build(space_id)
    except FAILURES as exc:
        report.errors.append(f"{space_id}: cannot rotate the logs in {folder}: {_say(exc)}")
        return
    keep_path = Path(latest["log_path"]) if latest and latest["log_path"] else None
    logs.sort(key=lambda p: int(BUILD_LOG_NAME.fullmatch(p.name).group(1)), reverse=True)
    for path in logs[ctx.config.build_logs_keep:]:
        if keep_path and path.resolve() == keep_path.resolve():
            continue  # the log `appliance spaces logs --build` shows, however old
        if _unlink(path, report.errors):
            report.removed.append(str(path))


def _truncate_run_logs(config: Config, report: LogReport) -> None:
    run_dir = config.data_path / "run"
    limit = config.run_log_max_mb * MiB
    try:
        paths = sorted(run_dir.glob("*.log")) if run_dir.is_dir() else []
    except OSError as exc:
        report.errors.append(f"cannot list {run_dir}: {exc}")
        return
    for path in paths:
        try:
            if path.is_file() and path.stat().st_size > limit:
                _keep_tail(path, RUN_LOG_TAIL)
                report.truncated.append(str(path))
        except OSError as exc:
            report.errors.append(f"cannot truncate {path}: {exc}")


def _keep_tail(path: Path, tail: int) -> None:
    """Cut a log down to its last ``tail`` bytes (from a line start), in place.

    In place, as logrotate's copytruncate does: the worker and router hold these files open
    in append mode, so a renamed or replaced file would go on growing unseen. Lines a writer
    appends between the read and the truncate are lost; that window is a few milliseconds.
    """
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - tail))
        data = fh.read()
        cut = data.find(b"\n")
        if 0 <= cut < len(data) - 1:
            data = data[cut + 1:]
        marker = f"[earlier lines ({size - len(data)} bytes) removed by housekeeping]\n"
        data = marker.encode() + data
        fh.seek(0)
        fh.write(data)
        fh.truncate(len(data))


# -- pruning ----------------------------------------------------------------------------------


@dataclass
class PruneReport:
    removed_checkouts: list[str] = field(default_factory=list)
    removed_images: list[str] = field(default_factory=list)
    removed_networks: list[str] = field(default_factory=list)
    removed_package_files: int = 0
    freed_package_bytes: int = 0
    deferred: list[str] = field(default_factory=list)  # left for the next pass, and why
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.removed_checkouts or self.removed_images or self.removed_networks
                    or self.freed_package_bytes)


def prune_once(ctx: Context) -> PruneReport:
    """Remove checkouts and untagged images no Space can use (rollback's revision is kept),
    the offline networks of Spaces that are gone, and package files past the cache's bound
    (least recently used first; never one a kept revision's lock names).

    A Space with work under way (a build, a start) keeps its checkouts and images: the
    revision it is fetching or starting is in no row yet. No image goes while any build runs,
    in any process: Podman's layer cache reads every image, and a build that met one removed
    under it failed with "layer not known".
    """
    report = PruneReport()
    checkouts_root = ctx.config.data_path / "checkouts"
    folders = _subdirectories(checkouts_root, report.errors)  # before the rows: see logs
    known = _read_spaces(ctx, report.errors)
    if known is None:
        return report
    rows, owners = known
    for folder in folders:
        space_id = owners.get(folder.name)
        if space_id is None:
            if _remove_tree(folder, report.errors):
                report.removed_checkouts.append(str(folder))
        else:
            _prune_checkouts(ctx, space_id, folder, report)
    _prune_packages(ctx, rows, report)  # the package cache needs no Podman
    with ctx.runtime.images_alone() as alone:
        if not alone:
            report.deferred.append("images: a build is under way; the next pass prunes them")
            _prune_networks(ctx, rows, report)
            return report
        try:
            images = ctx.runtime.labelled_images()  # one listing for every Space: costly
        except ApplianceError as exc:
            report.errors.append(f"cannot list images: {exc.message}")
            return report
        for image_id, (owner, _tags) in images.items():
            if owner not in rows and _fresh_row(ctx, owner, report.errors) is None:
                _remove_images(ctx, owner, [image_id], report, force=True)  # Space gone
        _prune_networks(ctx, rows, report)
        for space_id in rows:
            row = _fresh_row(ctx, space_id, report.errors)
            if row and row["stage"] not in stages.BUSY:
                _prune_images(ctx, row, images, report)
    return report


def _prune_packages(ctx: Context, rows: dict, report: PruneReport) -> None:
    keep: set[str] = set()
    for space_id, row in rows.items():
        revisions = {row["revision"], row["previous_revision"], *kept_images(ctx, row).values()}
        for lock in ctx.store.locks(space_id):
            if lock["revision"] in revisions:
                try:
                    keep.update(p.sha256 for p in packages.parse_lock(lock["text"]) if p.sha256)
                except ApplianceError as exc:
                    report.errors.append(f"{space_id}: {exc.message}")
    try:
        removed, freed = packages.prune_cache(
            ctx.config.package_cache_path, int(ctx.config.package_cache_gb * GiB), keep)
    except OSError as exc:
        report.errors.append(f"cannot prune the package cache: {exc}")
        return
    report.removed_package_files += removed
    report.freed_package_bytes += freed


def _prune_networks(ctx: Context, rows: dict, report: PruneReport) -> None:
    # A Space's network outlives it only when its delete was cut short; the network all
    # offline Spaces once shared names no Space, and goes once its last container has.
    try:
        networks = ctx.runtime.labelled_networks(ROLE_OFFLINE_NETWORK)
        for name, owner in networks.items():
            if owner in rows or (owner and _fresh_row(ctx, owner, report.errors)):
                continue
            if ctx.runtime.remove_network(name):
                report.removed_networks.append(name)
    except ApplianceError as exc:
        report.errors.append(f"cannot prune networks: {exc.message}")


def _fresh_row(ctx: Context, space_id: str, errors: list[str]) -> dict[str, Any] | None:
    # Read again right before acting: a build may have started since the pass began.
    try:
        return ctx.store.find_space(space_id)
    except FAILURES as exc:
        errors.append(f"{space_id}: cannot read the Space: {_say(exc)}")
        return None


def _prune_checkouts(ctx: Context, space_id: str, folder: Path,
                     report: PruneReport) -> None:
    # A fetch slower than an hour (a huge repository, a raised git_timeout) is still alive.
    stale_before = time.time() - max(STAGING_MIN_AGE, float(ctx.config.git_timeout))
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        report.errors.append(f"{space_id}: cannot list {folder}: {exc}")
        return
    # The row is read after the listing: a checkout listed here was fetched by a build that
    # is still busy, or has finished (its revision is in the row), or failed (prunable).
    row = _fresh_row(ctx, space_id, report.errors)
    if row is None:
        return  # deleted meanwhile: the next pass removes the folder as an orphan's
    keep = {row["revision"], row["previous_revision"], *kept_images(ctx, row).values()}
    busy = row["stage"] in stages.BUSY
    for entry in entries:
        try:
            if entry.name.startswith(".incoming-"):
                remove = entry.lstat().st_mtime < stale_before
            else:
                remove = not busy and entry.name not in keep
        except OSError as exc:
            report.errors.append(f"{space_id}: cannot inspect {entry}: {exc}")
            continue
        if remove and _remove_tree(entry, report.errors):
            report.removed_checkouts.append(str(entry))


def _prune_images(ctx: Context, row: dict[str, Any],
                  images: dict[str, tuple[str, list[str]]], report: PruneReport) -> None:
    keep = set(kept_images(ctx, row))
    # Untagged only: a tag names a revision some Space may switch or roll back to.
    dangling = [image_id for image_id, (owner, tags) in images.items()
                if owner == row["id"] and not tags and image_id not in keep]
    if dangling:
        # Not forced: an image a container still runs (a rebuilt revision not yet switched
        # to) is refused by Podman and stays.
        _remove_images(ctx, row["id"], dangling, report, force=False)


def _remove_images(ctx: Context, space_id: str, image_ids: list[str],
                   report: PruneReport, force: bool) -> None:
    try:
        for image_id in image_ids:
            ctx.runtime.remove_image(image_id, force=force)
        left = ctx.runtime.images_of(space_id)
    except ApplianceError as exc:
        report.errors.append(f"{space_id}: cannot prune images: {exc.message}")
        return
    report.removed_images += [image_id for image_id in image_ids if image_id not in left]


# -- disk space -------------------------------------------------------------------------------


@dataclass
class DiskReport:
    free_bytes: int | None = None
    state: str | None = None  # ok, low (below disk_min_free_gb), full (builds refused)
    changed: bool = False
    errors: list[str] = field(default_factory=list)


def disk_state_path(config: Config) -> Path:
    return config.data_path / "run" / "disk.json"


def check_disk_once(ctx: Context) -> DiskReport:
    """Measure the data directory's free space; write an event only when its state changes."""
    report = DiskReport()
    config = ctx.config
    try:
        free = host.disk_free_bytes(_existing(config.data_path))
    except OSError as exc:
        report.errors.append(f"cannot measure free space in {config.data_path}: {exc}")
        return report
    report.free_bytes = free
    if free < config.disk_refuse_builds_gb * GiB:
        report.state = "full"
    elif free < config.disk_min_free_gb * GiB:
        report.state = "low"
    else:
        report.state = "ok"
    if report.state == _saved_disk_state(config):
        return report
    detail = {"free_gib": round(free / GiB, 2), "state": report.state,
              "min_free_gb": config.disk_min_free_gb,
              "refuse_builds_gb": config.disk_refuse_builds_gb,
              "builds_refused": report.state == "full"}
    # The new state is written aside first and put in place only once its event is recorded,
    # so a full disk costs neither a lost event nor a repeated one: the next pass retries.
    path = disk_state_path(config)
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"state": report.state, "free_bytes": free,
                                       "at": datetime.now(UTC).isoformat(timespec="seconds")}))
        ctx.store.add_event(None, "disk:ok" if report.state == "ok" else "disk:low",
                            ctx.actor, detail)
        os.replace(partial, path)
        report.changed = True
    except FAILURES as exc:
        report.errors.append(f"cannot record the disk state {report.state}: {_say(exc)}")
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass  # overwritten by the next pass's attempt
    return report


def assert_room_for_build(config: Config) -> None:
    """Refuse to start a build when the data directory has under disk_refuse_builds_gb free."""
    limit = config.disk_refuse_builds_gb * GiB
    if not limit:
        return
    try:
        free = host.disk_free_bytes(_existing(config.data_path))
    except OSError:
        return  # unmeasurable: the build itself reports what fails
    if free < limit:
        raise DiskFull(
            f"Only {format_size(free)} free in {config.data_dir}; builds are refused below "
            f"{config.disk_refuse_builds_gb:g} GiB",
            hint="free space (delete unused Spaces; the scheduler prunes old checkouts and "
            "images hourly), or lower APPLIANCE_DISK_REFUSE_BUILDS_GB",
        )


def format_size(size: int) -> str:
    """Write a byte count for people: GiB from 1 GiB up, MiB below."""
    return f"{size / GiB:.1f} GiB" if size >= GiB else f"{size / MiB:.1f} MiB"


def disk_warning(config: Config) -> str | None:
    """Say what the portal's banner shows while the data disk is low or full (else None)."""
    state = _saved_disk_state(config)
    if state == "full":
        return (f"The data disk ({config.data_dir}) is almost full: new builds are refused "
                f"until more than {config.disk_refuse_builds_gb:g} GiB is free.")
    if state == "low":
        return (f"The data disk ({config.data_dir}) has less than {config.disk_min_free_gb:g} "
                "GiB free.")
    return None


def _saved_disk_state(config: Config) -> str:
    try:
        return json.loads(disk_state_path(config).read_text()).get("state") or "ok"
    except (OSError, ValueError, AttributeError):
        return "ok"  # never measured (or unreadable): ok, so a low disk is reported


def _existing(path: Path) -> Path:
    """Return path, or its nearest existing parent (a data dir not made yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


# -- shared -----------------------------------------------------------------------------------


def _read_spaces(ctx: Context, errors: list[str]
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, str]] | None:
    """Return the Space rows by id and a map of directory name (checkouts/, logs/) to id."""
    try:
        rows = {row["id"]: row for row in ctx.store.list_spaces()}
    except FAILURES as exc:
        errors.append(f"cannot read the Spaces: {_say(exc)}")
        return None  # never take every directory for an orphan's because a read failed
    return rows, {space_paths(ctx, space_id)[0].name: space_id for space_id in rows}


def _subdirectories(root: Path, errors: list[str]) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()) \
            if root.is_dir() else []
    except OSError as exc:
        errors.append(f"cannot list {root}: {exc}")
        return []


def _remove_tree(path: Path, errors: list[str]) -> bool:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
        return True
    except OSError as exc:
        errors.append(f"cannot remove {path}: {exc}")
        return False


def _unlink(path: Path, errors: list[str]) -> bool:
    try:
        path.unlink(missing_ok=True)
        return True
    except OSError as exc:
        errors.append(f"cannot remove {path}: {exc}")
        return False
