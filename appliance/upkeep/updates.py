"""Scheduled updates: Spaces that track a branch or are pinned to a commit update themselves.

A Space's update policy is "manual" (only a person updates it), "track" (follow the branch in
its requested revision, or the default branch, looking every `update_interval` seconds) or
"pinned" (serve one commit; moved there once when it serves another). A look is a cheap
`git ls-remote`; a new head is built by a worker while the old revision serves, as a person's
update would be. A commit whose update did not end serving it is remembered in
`failed_revision` and skipped, so a broken commit is never rebuilt in a loop; the next commit
after it is tried. Updates start only inside the maintenance window (`update_window`) when one
is set; looks still happen outside it, and the first pass after the window opens looks again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import stages
from ..core import jobs, sources, spaces
from ..errors import ApplianceError, InvalidInput

POLICIES = ("manual", "track", "pinned")
MIN_INTERVAL = 60
_FULL_SHA = re.compile(r"[0-9a-fA-F]{40}")
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
_DAY_MINUTES = 24 * 60


@dataclass
class UpdateReport:
    """What one pass did, for the scheduler's log and the tests."""

    checked: list[str] = field(default_factory=list)
    updating: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.updating or self.deferred or self.skipped)


# -- the policy -------------------------------------------------------------------------------


def describe_updates(ctx: spaces.Context, space_id: str) -> dict[str, Any]:
    """Return a Space's update policy and what the last looks found."""
    row = ctx.store.get_space(space_id)
    return {
        "policy": row["update_policy"],
        "interval": row["update_interval"],
        "revision": row["revision_request"],
        "last_check": row["last_update_check"],
        "failed_revision": row["failed_revision"],
    }


def set_update_policy(ctx: spaces.Context, space_id: str, policy: str,
                      interval: int | None = None, revision: str | None = None
                      ) -> dict[str, Any]:
    """Choose how a Space is updated: by hand, tracking a branch, or pinned to a commit."""
    row = ctx.store.get_space(space_id)
    if policy not in POLICIES:
        raise InvalidInput(f"Unknown update policy {policy!r} for {space_id}",
                           hint="use manual, track or pinned")
    if interval is not None:
        if policy != "track":
            raise InvalidInput(
                f"An update interval applies to the track policy only, not {policy}",
                hint=f"drop --interval, or use 'track' to look for new commits every "
                f"{interval} seconds")
        if isinstance(interval, bool) or not isinstance(interval, int) \
                or interval < MIN_INTERVAL:
            raise InvalidInput(
                f"Update interval must be at least {MIN_INTERVAL} seconds, got {interval!r}",
                hint="give whole seconds, e.g. --interval 3600 to look every hour")
    # A new policy is looked at by the next pass, whatever the old interval.
    fields: dict[str, Any] = {"update_policy": policy, "last_update_check": None}
    if policy == "manual" and revision:
        raise InvalidInput(
            f"The manual policy takes no revision (got {revision!r})",
            hint=f"switch revision with 'appliance spaces update {space_id} --revision "
            f"{revision}'")
    if policy == "pinned":
        if not revision or not _FULL_SHA.fullmatch(revision):
            raise InvalidInput(
                f"Pinning {space_id} needs a full 40-character commit sha, got {revision!r}",
                hint="find it with 'git rev-parse BRANCH' in the Space's repository, or use "
                "'track' to follow a branch")
        fields["revision_request"] = revision.lower()
    if policy == "track":
        branch = sources.validate_revision(revision) or row["revision_request"]
        if branch and _FULL_SHA.fullmatch(branch):
            raise InvalidInput(
                f"Space {space_id} would track commit {branch[:12]}, which never moves",
                hint="give the branch to follow with --revision BRANCH, or use 'pinned'")
        if revision:
            # A mistyped branch is refused now, not found missing at every later look.
            sources.remote_head(sources.parse_source(row["source"], ctx.config), revision,
                                ctx.config)
            fields["revision_request"] = revision
        if interval is not None:
            fields["update_interval"] = interval
    ctx.store.update_space(space_id, actor=ctx.actor, event="update-policy",
                           detail={"policy": policy, "interval": interval,
                                   "revision": fields.get("revision_request")}, **fields)
    return {**spaces.describe(ctx, space_id), "update": describe_updates(ctx, space_id)}


# -- the maintenance window -------------------------------------------------------------------


def local_time(now: float) -> datetime:
    """Return the wall-clock time of `now` on this machine (the window is in local time)."""
    return datetime.fromtimestamp(now)


def parse_window(text: str) -> tuple[int, int] | None:
    """Read "HH:MM-HH:MM" into minutes after midnight (start, end); None for an empty one."""
    text = (text or "").replace(" ", "")
    if not text:
        return None
    match = _WINDOW.fullmatch(text)
    hint = "write local times like 02:00-05:00 (it may span midnight: 23:00-04:00), " \
        "or leave APPLIANCE_UPDATE_WINDOW empty to update at any time"
    if not match or int(match[1]) > 23 or int(match[3]) > 23 \
            or int(match[2]) > 59 or int(match[4]) > 59:
        raise InvalidInput(f"Setting update_window must look like 02:00-05:00, got {text!r}",
                           hint=hint)
    start = int(match[1]) * 60 + int(match[2])
    end = int(match[3]) * 60 + int(match[4])
    if start == end:
        raise InvalidInput(f"Setting update_window {text!r} starts and ends at the same time",
                           hint=hint)
    return start, end


def seconds_into_window(moment: datetime, window: tuple[int, int]) -> float | None:
    """Return how long ago the window opened when `moment` is inside it, else None."""
    start, end = window
    minutes = moment.hour * 60 + moment.minute
    into = ((minutes - start) % _DAY_MINUTES) * 60 + moment.second + moment.microsecond / 1e6
    return into if into < ((end - start) % _DAY_MINUTES) * 60 else None


# -- the scheduled pass -----------------------------------------------------------------------


def _stamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")


def _seconds(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


def _due(row: dict[str, Any], now: float, into_window: float | None) -> bool:
    last = _seconds(row["last_update_check"])
    if last is None or now - last >= row["update_interval"]:
        return True
    # An update deferred before the window opened starts in the window's first pass, even
    # when the interval (a day, say) is longer than the time left until the window closes.
    return into_window is not None and last < now - into_window


def check_updates_once(ctx: spaces.Context, now: float | None = None,
                       spawn=None) -> UpdateReport:
    """Look once for new commits of Spaces that track or pin a revision; start updates."""
    now = time.time() if now is None else now
    spawn = spawn or jobs.spawn_job
    window = parse_window(ctx.config.update_window)
    into_window = seconds_into_window(local_time(now), window) if window else None
    may_start = window is None or into_window is not None
    report = UpdateReport()
    for row in ctx.store.list_spaces():
        if (row["update_policy"] not in ("track", "pinned") or row["desired"] != "running"
                or row["stage"] in stages.BUSY or spaces.worker_alive(row)
                or not _due(row, now, into_window)):
            continue
        try:
            _check_space(ctx, row, now, may_start, spawn, report)
        except ApplianceError as exc:  # one Space's trouble never stops the others' looks
            report.errors.append(f"{row['id']}: {exc.message}")
    return report


def _check_space(ctx: spaces.Context, row: dict[str, Any], now: float, may_start: bool,
                 spawn, report: UpdateReport) -> None:
    space_id = row["id"]
    wanted = row["revision_request"]
    if row["update_policy"] == "pinned" and not _FULL_SHA.fullmatch(wanted or ""):
        # `spaces update --revision BRANCH` after pinning: follow neither silently.
        raise InvalidInput(
            f"Space {space_id} is pinned but requests {wanted or 'the default branch'!r}, "
            "not a commit",
            hint=f"pin it again: 'appliance spaces update-policy {space_id} pinned "
            "--revision SHA'")
    try:
        head = sources.remote_head(sources.parse_source(row["source"], ctx.config), wanted,
                                   ctx.config)
    except ApplianceError as exc:
        ctx.store.update_space(space_id, last_update_check=_stamp(now))
        _record_check_problem(ctx, space_id, exc.message)
        raise
    ctx.store.update_space(space_id, last_update_check=_stamp(now))
    _record_check_problem(ctx, space_id, None)
    report.checked.append(space_id)
    if head == row["revision"]:
        if row["failed_revision"] == head:  # a person's update made it serve after all
            ctx.store.update_space(space_id, failed_revision=None)
        return
    if head == row["failed_revision"]:
        report.skipped.append(f"{space_id}: skipped: revision {head[:12]} failed before")
        return
    if not may_start:
        report.deferred.append(space_id)
        return
    needed, _ = spaces.request_update(ctx, space_id)
    if needed:
        spawn(ctx, space_id, "update")
        report.updating.append(space_id)


def _record_check_problem(ctx: spaces.Context, space_id: str, message: str | None) -> None:
    """Write an event when a look starts failing, fails differently, or works again.

    The same failure at every look (a remote down for a week) is one event, not thousands.
    """
    last = next((e for e in ctx.store.events(space_id, limit=200)
                 if e["kind"] in ("update-check-failed", "update-check-ok")), None)
    said = last["detail"].get("error") if last and last["kind"] == "update-check-failed" \
        else None
    if message == said:
        return
    if message is None:
        ctx.store.add_event(space_id, "update-check-ok", ctx.actor, {})
    else:
        ctx.store.add_event(space_id, "update-check-failed", ctx.actor, {"error": message})
