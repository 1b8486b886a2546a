"""Health checks from the host side, and the automatic-restart policy reconcile shares.

A Space is probed over HTTP at its base_path on the port its container publishes (no curl
needed in the image); a Streamlit Space's script is also run now and then over its WebSocket,
as a browser does (health_streamlit), since its HTTP answers stay 200 when the script fails.
Probes run side by side with a timeout, so one hung Space never delays the others' checks.
A Space that fails `health_attempts` probes in a row, or whose container died, is restarted
with exponential backoff; after `restart_limit` automatic restarts within `restart_window` it
lands in RUNTIME_ERROR with the log tail and is left for a person.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests

from .. import stages
from ..core import jobs, spaces
from ..errors import InvalidInput
from .health_streamlit import probe_streamlit

GAVE_UP = "failed"  # `desired` once the appliance stopped restarting a Space by itself


@dataclass
class HealthReport:
    healthy: list[str] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    restarting: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)


def probe(url: str, timeout: float) -> str | None:
    """Return None when the app answers below HTTP 500, else what went wrong."""
    try:
        response = requests.get(url, timeout=timeout, allow_redirects=False)
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.RequestException as exc:
        return f"no answer ({exc.__class__.__name__})"
    return f"answered HTTP {response.status_code}" if response.status_code >= 500 else None


def _probe_url(row: dict[str, Any]) -> str:
    path = row.get("health_path") or json.loads(row["manifest"] or "{}").get("base_path") or "/"
    return f"http://127.0.0.1:{row['backend_port']}{path}"


# When each Space was last probed, for Spaces with an interval of their own (kept by the
# scheduler's long-lived process; a restart of it only probes them once more, sooner).
_last_probe: dict[str, float] = {}
MIN_HEALTH_INTERVAL = 5.0


# When the scheduler first saw each serving container: probes wait out the initial delay.
_first_seen: dict[str, float] = {}


def settled_in(row: dict[str, Any], now: float, delay: float) -> bool:
    """Tell whether the Space's container has served for the initial delay already."""
    first = _first_seen.setdefault(row["container"], now)
    if len(_first_seen) > 4096:  # containers come and go: forget the long-gone ones
        _first_seen.clear()
        _first_seen[row["container"]] = first
    return now - first >= delay


def due(row: dict[str, Any], now: float) -> bool:
    """Tell whether a Space's own health interval (if it has one) has passed."""
    interval = row.get("health_interval")
    if not interval:
        return True
    if now - _last_probe.get(row["id"], 0.0) < interval:
        return False
    _last_probe[row["id"]] = now
    return True


def set_health(ctx: spaces.Context, space_id: str, path: str | None,
               interval: float | None) -> dict[str, Any]:
    """Give a Space a health path and interval of its own (None: back to the defaults)."""
    ctx.store.get_space(space_id)
    if path is not None and (not path.startswith("/") or any(c in path for c in " \r\n#")):
        raise InvalidInput(f"Health path must be an absolute URL path, got {path!r}",
                           hint="e.g. /healthz or /api/health (no spaces, no fragment)")
    if interval is not None and interval < MIN_HEALTH_INTERVAL:
        raise InvalidInput(f"Health interval must be at least {MIN_HEALTH_INTERVAL:g} seconds, "
                           f"got {interval:g}", hint="e.g. 30; leave it out for the default")
    ctx.store.update_space(space_id, actor=ctx.actor, event="health-settings",
                           detail={"path": path, "interval": interval},
                           health_path=path, health_interval=interval)
    return spaces.describe(ctx, space_id)


# When each Streamlit Space's script was last run by the check (the scheduler's process
# lives long; a restart of it only runs the scripts once more, sooner).
_script_checked: dict[str, float] = {}


def probe_space(row: dict[str, Any], timeout: float, script_interval: float = 0,
                now: float | None = None) -> str | None:
    """Probe one running Space: HTTP, and for Streamlit its script every script_interval."""
    problem = probe(_probe_url(row), timeout)
    if problem or row["sdk"] != "streamlit" or not script_interval:
        return problem
    now = time.time() if now is None else now
    if now - _script_checked.get(row["id"], 0.0) < script_interval:
        return None
    _script_checked[row["id"]] = now
    base_path = json.loads(row["manifest"] or "{}").get("base_path") or "/"
    problem = probe_streamlit("127.0.0.1", row["backend_port"], base_path, timeout)
    if problem and problem.startswith("the script did not finish"):
        return None  # slow (a model loading) is not broken: the HTTP side answered
    return problem


def restart_or_give_up(ctx: spaces.Context, row: dict[str, Any], reason: str, job: str,
                       now: float, spawn=jobs.spawn_job) -> str:
    """Restart a failing Space when its backoff allows; give up after too many restarts.

    Returns "restarting", "waiting" (backoff not over) or "gave_up".
    """
    config = ctx.config
    recent = [t for t in json.loads(row["restarts"] or "[]") if now - t < config.restart_window]
    if len(recent) >= config.restart_limit:
        _give_up(ctx, row, reason, len(recent))
        return "gave_up"
    if recent and now - recent[-1] < config.restart_backoff * 2 ** (len(recent) - 1):
        return "waiting"
    ctx.store.update_space(row["id"], actor=ctx.actor, event="auto-restart",
                           detail={"reason": reason, "attempt": len(recent) + 1},
                           restarts=json.dumps(recent + [now]), health_failures=0)
    spawn(ctx, row["id"], job)
    return "restarting"


def _give_up(ctx: spaces.Context, row: dict[str, Any], reason: str, count: int) -> None:
    tail = spaces.app_log(ctx, row["id"], tail=30).strip()
    minutes = ctx.config.restart_window / 60
    message = (f"{reason}; restarted {count} times in {minutes:g} minutes, so the appliance "
               f"stopped restarting it. Fix the app, then 'appliance spaces restart "
               f"{row['id']}'" + (f"\n--- last lines of the app log ---\n{tail}" if tail else ""))
    if row["container"]:
        ctx.runtime.remove_container(row["container"])
    ctx.store.move(row["id"], row["stage"], stages.RUNTIME_ERROR, ctx.actor, event="gave-up",
                   detail={"reason": reason, "restarts": count}, error=message,
                   container=None, backend_port=None, desired=GAVE_UP, restarts="[]")


def health_sweep_once(ctx: spaces.Context, now: float | None = None,
                      spawn=jobs.spawn_job) -> HealthReport:
    """Probe every running Space once (side by side) and act on repeated failures."""
    now = time.time() if now is None else now
    report = HealthReport()
    rows = [row for row in ctx.store.list_spaces()
            if row["stage"] == stages.RUNNING and row["backend_port"] and row["container"]
            and not spaces.worker_alive(row)
            and settled_in(row, now, ctx.config.health_initial_delay) and due(row, now)]
    if not rows:
        return report
    timeout = ctx.config.health_timeout
    with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
        interval = ctx.config.streamlit_script_interval
        problems = list(pool.map(lambda r: probe_space(r, timeout, interval, now), rows))
    checked_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
    for row, problem in zip(rows, problems, strict=True):
        if problem is None:
            report.healthy.append(row["id"])
            if row["health_failures"]:
                ctx.store.update_space(row["id"], health_failures=0,
                                       health_checked_at=checked_at)
            continue
        report.unhealthy.append(row["id"])
        failures = row["health_failures"] + 1
        ctx.store.update_space(row["id"], health_failures=failures,
                               health_checked_at=checked_at)
        if failures >= ctx.config.health_attempts:
            row = ctx.store.get_space(row["id"])
            outcome = restart_or_give_up(
                ctx, row, f"health check failed {failures} times ({problem})", "restart", now,
                spawn)
            getattr(report, {"restarting": "restarting", "waiting": "waiting",
                             "gave_up": "gave_up"}[outcome]).append(row["id"])
    return report
