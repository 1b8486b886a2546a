"""What a person can do to a Space from the portal or the API, as one call each: the slow part
(build, wait for the app) goes to a background worker so a request returns at once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from .. import stages
from ..errors import ApplianceError, Conflict, Forbidden, InvalidInput
from ..gpu import claims
from ..upkeep import sleep, updates
from . import jobs, packages, sources, spaces

ACTIONS = ("start", "stop", "pause", "restart", "factory", "update", "rollback")
# What a person may choose for a Space's package resolution; "default": the box's setting.
RESOLUTION_CHOICES = (*packages.RESOLUTIONS, "default")


# Seconds a git call made while a request waits may take (deciding whether an update is
# needed); the fetch itself runs in the worker under git_timeout.
REQUEST_GIT_SECONDS = 20
# Durations a person types: "90", "30m", "2h", "1h30m", "1d"; "never" (or nothing): none.
_DURATION = re.compile(r"(?:(\d{1,6})d)?(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,9})s?)?")
_UNIT_SECONDS = (86400, 3600, 60, 1)
MAX_DURATION = 10 * 365 * 86400


def parse_duration(value: object, what: str = "Duration") -> int | None:
    """Read a duration as a person types it: plain seconds (3600), 90s, 30m, 2h, 1h30m, 1d,
    or "never"/empty (None). The one parser the CLI, the API and the pages use."""
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise InvalidInput(f"{what} must be a duration, got {value!r}", hint=DURATION_HINT)
    if isinstance(value, int):
        seconds = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        if text in ("", "never", "off", "none"):
            return None
        found = _DURATION.fullmatch(text) if len(text) <= 40 and text.isascii() else None
        if not found or not any(found.groups()):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "…"
            raise InvalidInput(f"{what} must be a duration like 30m, 2h, 1h30m or 3600 "
                               f"(seconds), or 'never'; got {shown}", hint=DURATION_HINT)
        days, hours, minutes, rest = found.groups()
        if hours and not minutes and rest and not text.endswith("s"):
            minutes, rest = rest, None  # "1h30" is said for 1h30m
        seconds = sum(int(part) * unit for part, unit in zip(
            (days, hours, minutes, rest), _UNIT_SECONDS, strict=True) if part)
    if seconds < 0 or seconds > MAX_DURATION:
        raise InvalidInput(f"{what} must be between 0 and 10 years, got {seconds} s",
                           hint=DURATION_HINT)
    return seconds


DURATION_HINT = "write 3600, 90s, 30m, 2h, 1h30m or 1d — or never"


def format_duration(seconds: int | float | None) -> str:
    """Write seconds the way parse_duration reads them back: 5400 -> "1h30m"; None: never."""
    if seconds is None:
        return "never"
    seconds, parts = int(seconds), []
    for unit, label in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= unit:
            parts.append(f"{seconds // unit}{label}")
            seconds %= unit
    if seconds or not parts:
        parts.append(f"{seconds}s" if parts else str(seconds))
    return "".join(parts)


class FieldError(ApplianceError):
    """A refusal that belongs to one field of a form (the page shows it next to it)."""

    def __init__(self, error: ApplianceError, field: str):
        super().__init__(error.message, error.hint)
        self.status, self.field, self.cause = error.status, field, error


def _field(field: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except FieldError:
        raise
    except ApplianceError as exc:
        raise FieldError(exc, field) from exc


def local_space_id(ctx: spaces.Context, path: str) -> str:
    """Name a local folder's Space after its place: ROOT/OWNER/NAME becomes OWNER/NAME, a
    folder right under an allowed root local/NAME (as a URL's last two parts name it)."""
    resolved = Path(path)
    for root in ctx.config.local_source_roots:
        if resolved.is_relative_to(root):
            parts = resolved.relative_to(root).parts
            name = resolved.name.removesuffix(".git")
            owner = parts[-2] if len(parts) >= 2 else "local"
            cleaned = [re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", p)).lstrip("._-")
                       [:96] for p in (owner, name)]
            candidate = f"{cleaned[0] or 'local'}/{cleaned[1] or 'space'}"
            try:
                return sources.validate_space_id(candidate)
            except InvalidInput:
                break
    return f"local/{Path(path).name}"


def add(ctx: spaces.Context, source: str, name: str | None = None, revision: str | None = None,
        hardware: str = "cpu") -> dict[str, Any]:
    """Record a new Space and start its build in a worker; answer at once.

    Nothing here waits on the source's server: the worker fetches it (its progress in the
    build log), and a source that does not answer lands the Space in BUILD_ERROR saying so.
    A refusal is a FieldError naming the form field it is about."""
    parsed = _field("source", sources.parse_source, source, ctx.config)
    if not name and parsed.kind == "local":
        name = local_space_id(ctx, parsed.url)
    space_id = _field("name", sources.validate_space_id, name or parsed.default_id)
    _field("revision", sources.validate_revision, revision or None)
    hardware = _field("hardware", claims.check_request, ctx, space_id, hardware or "cpu")
    try:
        space = spaces.add_space(ctx, source, name=space_id, revision=revision or None,
                                 hardware=hardware, check_source=False)
    except (Conflict, Forbidden) as exc:
        raise FieldError(exc, "name") from exc
    except ApplianceError as exc:
        raise FieldError(exc, "source") from exc
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
        # Whether an update is needed asks the git server while the request waits: bound it.
        quick = dataclasses.replace(ctx, config=ctx.config.with_values(
            git_timeout=min(ctx.config.git_timeout, REQUEST_GIT_SECONDS)))
        needed, view = spaces.request_update(quick, space_id, factory=action == "factory",
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
    """Set the idle time before sleeping from user input: a duration (30m, 2h, 3600) or
    "never"/empty."""
    return sleep.set_sleep_time(ctx, space_id, parse_duration(seconds, "Sleep time"))


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
