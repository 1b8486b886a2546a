"""What a person can do to a Space from the portal or the API, as one call each: the slow part
(build, wait for the app) goes to a background worker so a request returns at once."""

from __future__ import annotations

from typing import Any

from .. import stages
from ..errors import InvalidInput
from ..upkeep import sleep, updates
from . import jobs, packages, spaces

ACTIONS = ("start", "stop", "pause", "restart", "factory", "update", "rollback")
# What a person may choose for a Space's package resolution; "default": the box's setting.
RESOLUTION_CHOICES = (*packages.RESOLUTIONS, "default")


def add(ctx: spaces.Context, source: str, name: str | None = None, revision: str | None = None,
        hardware: str = "cpu") -> dict[str, Any]:
    """Record a new Space and start its build in a worker."""
    space = spaces.add_space(ctx, source, name=name or None, revision=revision or None,
                             hardware=hardware or "cpu")
    jobs.spawn_job(ctx, space["id"], "deploy")
    return spaces.describe(ctx, space["id"])


def perform(ctx: spaces.Context, space_id: str, action: str,
            revision: str | None = None) -> dict[str, Any]:
    """Do one action; return the Space's view (a worker carries on where it takes time)."""
    if action == "stop":
        return spaces.stop(ctx, space_id)
    if action == "pause":
        return spaces.stop(ctx, space_id, pause=True)
    if action == "start":
        row = spaces.recover_abandoned(ctx, space_id)
        if row["stage"] in stages.BUSY:
            return spaces.describe(ctx, space_id)
        ctx.store.update_space(space_id, desired="running")
        jobs.spawn_job(ctx, space_id, "start")
        return spaces.describe(ctx, space_id)
    if action == "restart":
        spaces.restart_check(ctx, space_id)
        jobs.spawn_job(ctx, space_id, "restart")
        return spaces.describe(ctx, space_id)
    if action in ("update", "factory"):
        needed, view = spaces.request_update(ctx, space_id, factory=action == "factory",
                                             revision=revision or None)
        if needed:
            jobs.spawn_job(ctx, space_id, "deploy", factory=action == "factory")
            view = spaces.describe(ctx, space_id)
        return view
    if action == "rollback":
        return spaces.rollback(ctx, space_id, revision or None)
    raise InvalidInput(f"Unknown action {action!r}", hint=f"actions are {', '.join(ACTIONS)}")


def set_sleep_time(ctx: spaces.Context, space_id: str, seconds: str | int | None
                   ) -> dict[str, Any]:
    """Set the idle time before sleeping from user input: seconds, or "never"/empty."""
    if seconds in (None, "", "never"):
        value = None
    elif isinstance(seconds, int) or str(seconds).isdigit():
        value = int(seconds)
    else:
        raise InvalidInput(f"Sleep time must be a number of seconds or 'never', got {seconds!r}")
    return sleep.set_sleep_time(ctx, space_id, value)


def set_update_policy(ctx: spaces.Context, space_id: str, policy: str,
                      interval: int | None = None, revision: str | None = None
                      ) -> dict[str, Any]:
    return updates.set_update_policy(ctx, space_id, policy, interval, revision or None)


def set_resolution(ctx: spaces.Context, space_id: str, value: object) -> dict[str, Any]:
    """Choose how the Space's packages are resolved from user input: "dated", "latest", or
    "default" (the box's build_resolution); any case, surrounding spaces ignored."""
    choice = value.strip(" ").lower() if isinstance(value, str) else None
    if choice not in RESOLUTION_CHOICES:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "…"
        raise InvalidInput(f"Package resolution must be one of {', '.join(RESOLUTION_CHOICES)}"
                           f", got {shown}",
                           hint="dated: as of the revision's commit time; latest: today's "
                           "packages; default: the box's build_resolution (now "
                           f"{ctx.config.build_resolution})")
    return spaces.set_resolution(ctx, space_id, None if choice == "default" else choice)


def forget_locks(ctx: spaces.Context, space_id: str) -> int:
    """Drop the Space's package locks so its next build resolves again; return how many."""
    return spaces.forget_locks(ctx, space_id)


def set_visibility(ctx: spaces.Context, space_id: str, visibility: str) -> dict[str, Any]:
    """LAN-public (anyone on the LAN may open it) or private (login required)."""
    if visibility not in ("public", "private"):
        raise InvalidInput(f"Visibility must be public or private, got {visibility!r}")
    ctx.store.get_space(space_id)
    ctx.store.update_space(space_id, actor=ctx.actor, event="visibility",
                           detail={"visibility": visibility}, visibility=visibility)
    return spaces.describe(ctx, space_id)
