"""Sleep and wake: idle Spaces stop and free what they hold; a request wakes them again."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime

from .. import stages
from ..adapters import router
from ..core import jobs, spaces
from ..errors import InvalidInput

SLEEPING = "sleeping"  # `desired` of a Space asleep: a request through its url wakes it


@dataclass
class SleepReport:
    slept: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.slept or self.woken)


def set_sleep_time(ctx: spaces.Context, space_id: str, seconds: int | None) -> dict:
    """Set how long a Space may sit idle before it sleeps (None: never)."""
    if seconds is not None and seconds < 60:
        raise InvalidInput(f"Sleep time must be at least 60 seconds, got {seconds}",
                           hint="give 1m or more (30m, 2h, 3600), or never")
    ctx.store.get_space(space_id)
    ctx.store.update_space(space_id, actor=ctx.actor, event="sleep-time",
                           detail={"seconds": seconds}, sleep_after=seconds)
    return spaces.describe(ctx, space_id)


def _seconds_since(stamp: str | None, now: float) -> float:
    if not stamp:
        return float("inf")
    return now - datetime.fromisoformat(stamp).timestamp()


def sleep_once(ctx: spaces.Context, now: float | None = None) -> SleepReport:
    """Put to sleep every running Space idle (no proxied request) for its sleep time."""
    now = time.time() if now is None else now
    report = SleepReport()
    for row in ctx.store.list_spaces():
        if (row["sleep_after"] is None or row["stage"] != stages.RUNNING
                or row["desired"] != "running" or spaces.worker_alive(row)):
            continue
        # Idle since the last request, or since it (re)started serving if none came since.
        idle = min(_seconds_since(row["last_request_at"], now),
                   _seconds_since(row["updated_at"], now))
        if idle >= row["sleep_after"]:
            ctx.store.update_space(row["id"], wake_requested_at=None)
            spaces.stop(ctx, row["id"], desired=SLEEPING, event="sleep")
            report.slept.append(row["id"])
    return report


def wake_once(ctx: spaces.Context, spawn=jobs.spawn_job) -> SleepReport:
    """Start every sleeping Space that a request asked to wake (paused ones never wake)."""
    report = SleepReport()
    router.ensure_router(ctx.config)
    for row in ctx.store.list_spaces():
        if row["desired"] == SLEEPING and row["wake_requested_at"] \
                and _take_wake_request(ctx, row["id"]):
            _spawn_start(ctx, row["id"], spawn)
            report.woken.append(row["id"])
    return report


def wake(ctx: spaces.Context, space_id: str, spawn=None) -> bool:
    """Wake a sleeping Space for someone opening its page: ask for the wake as a request
    through its url does, then start it at once rather than at the scheduler's next pass
    (whichever of the two takes the request starts it). True when asleep or waking."""
    row = ctx.store.get_space(space_id)
    if row["desired"] != SLEEPING or row["stage"] not in (stages.STOPPED, stages.PAUSED):
        return False
    ctx.store.record_requests({}, {row["port"]})
    if _take_wake_request(ctx, space_id):
        _spawn_start(ctx, space_id, spawn or jobs.spawn_job)
    return True


def _take_wake_request(ctx: spaces.Context, space_id: str) -> bool:
    """Clear the Space's wake request if it still has one and no live process owns it, and
    own it; True for the one caller that did (the scheduler and every portal worker wake
    Spaces). The claim holds until the spawned worker's pid replaces it: a visitor who asks
    again meanwhile records a request that nobody takes twice."""
    with ctx.store.transaction():
        row = ctx.store.find_space(space_id)
        if row is None or row["desired"] != SLEEPING or not row["wake_requested_at"] \
                or spaces.owner_alive(row):
            return False
        ctx.store.update_space(space_id, actor=ctx.actor, event="wake",
                               detail={"requested_at": row["wake_requested_at"]},
                               wake_requested_at=None, worker_pid=os.getpid())
    return True


def _spawn_start(ctx: spaces.Context, space_id: str, spawn) -> None:
    """Start the worker that wakes the Space; a spawn that fails gives the claim back."""
    try:
        spawn(ctx, space_id, "start")
    except BaseException:
        with ctx.store.transaction():
            row = ctx.store.find_space(space_id)
            if row and row["worker_pid"] == os.getpid():
                ctx.store.update_space(space_id, worker_pid=None)
        raise
