"""The scheduler process: APScheduler wired to the one-step jobs (never inside web workers)."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from ..adapters import router
from ..config import Config
from ..core import spaces
from ..errors import ApplianceError
from ..gpu import telemetry, watchdog
from . import health, housekeeping, reconcile, sleep, updates

log = logging.getLogger("appliance.scheduler")


def _sleep_and_wake(ctx: spaces.Context) -> sleep.SleepReport:
    woken, slept = sleep.wake_once(ctx), sleep.sleep_once(ctx)
    return sleep.SleepReport(slept=slept.slept, woken=woken.woken)


# Every scheduled step by job id: a plain one-step function of a Context returning a report.
STEPS = {
    "reconcile": reconcile.reconcile_once,
    "health": health.health_sweep_once,
    "updates": updates.check_updates_once,
    "sleep": _sleep_and_wake,
    "gpu-watchdog": watchdog.enforce_once,
    "gpu-telemetry": telemetry.sample_once,
    "telemetry-downsample": telemetry.downsample_once,
    "backup": housekeeping.backup_once,
    "rotate-logs": housekeeping.rotate_logs_once,
    "prune": housekeeping.prune_once,
    "disk": housekeeping.check_disk_once,
}


def run_step(config: Config, name: str) -> None:
    """Run one scheduled step with a fresh context (its own database handle) and log it."""
    ctx = spaces.open_context(config, actor="scheduler")
    try:
        report = STEPS[name](ctx)
        if getattr(report, "errors", None):
            log.warning("%s: %s", name, report)
        elif (getattr(report, "changed", False) or getattr(report, "unhealthy", None)
              or getattr(report, "deferred", None)):
            log.info("%s: %s", name, report)
    except ApplianceError as exc:
        log.warning("%s failed: %s", name, exc)
    finally:
        ctx.store.close()


def build_scheduler(config: Config) -> BlockingScheduler:
    """Make the scheduler with every step; one worker thread each, no overlapping runs."""
    now = _now()
    schedule = (  # (step, seconds between runs, first run: None waits one interval)
        ("reconcile", config.reconcile_interval, now),
        ("health", config.health_interval, None),
        ("updates", config.update_check_interval, now),
        # Wakes must be quick (a visitor waits); the pass is one small query when none sleeps.
        ("sleep", config.wake_interval, now),
        ("gpu-watchdog", config.gpu_watchdog_interval, now),
        ("gpu-telemetry", config.telemetry_interval, now),
        ("telemetry-downsample", config.housekeeping_interval, now),
        ("backup", config.backup_interval, housekeeping.next_backup_at(config)),
        ("rotate-logs", config.housekeeping_interval, now),
        ("prune", config.housekeeping_interval, now),
        ("disk", config.disk_check_interval, now),
    )
    # One thread per step: a slow reconcile pass never delays the health sweep, and the same
    # step never overlaps itself.
    scheduler = BlockingScheduler(executors={"default": ThreadPoolExecutor(len(schedule))},
                                  job_defaults={"coalesce": True, "max_instances": 1})
    for name, seconds, first in schedule:
        options = {"next_run_time": first} if first is not None else {}
        scheduler.add_job(run_step, "interval", args=[config, name], id=name, seconds=seconds,
                          **options)
    return scheduler


def _now() -> datetime:
    return datetime.now(UTC)


def run(config: Config) -> None:
    """Run until SIGTERM/SIGINT; the step under way finishes before the process exits."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per run is noise
    router.ensure_router(config)
    scheduler = build_scheduler(config)

    def stop(signum, frame):
        # shutdown() waits for the running step; call it off the signal handler's frame.
        threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("scheduler started: reconcile every %s s, health every %s s",
             config.reconcile_interval, config.health_interval)
    scheduler.start()
    log.info("scheduler stopped")
