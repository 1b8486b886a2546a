"""The scheduler process: APScheduler wired to the one-step jobs (never inside web workers)."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from . import health, housekeeping, reconcile, router, sleep, spaces, updates
from .config import Config
from .errors import ApplianceError

log = logging.getLogger("appliance.scheduler")


def reconcile_job(config: Config) -> None:
    """Run one reconcile pass with a fresh context (its own database handle)."""
    ctx = spaces.open_context(config, actor="scheduler")
    try:
        report = reconcile.reconcile_once(ctx)
        if report.changed or report.errors:
            log.info("reconcile: %s", report)
    except ApplianceError as exc:
        log.warning("reconcile failed: %s", exc)
    finally:
        ctx.store.close()


def health_job(config: Config) -> None:
    """Run one health sweep with a fresh context."""
    ctx = spaces.open_context(config, actor="scheduler")
    try:
        report = health.health_sweep_once(ctx)
        if report.unhealthy:
            log.info("health: %s", report)
    except ApplianceError as exc:
        log.warning("health sweep failed: %s", exc)
    finally:
        ctx.store.close()


def sleep_job(config: Config) -> None:
    """Put idle Spaces to sleep and wake the ones a request asked for."""
    ctx = spaces.open_context(config, actor="scheduler")
    try:
        woken = sleep.wake_once(ctx)
        slept = sleep.sleep_once(ctx)
        if woken.changed or slept.changed:
            log.info("sleep: woke %s, put to sleep %s", woken.woken, slept.slept)
    except ApplianceError as exc:
        log.warning("sleep/wake failed: %s", exc)
    finally:
        ctx.store.close()


def updates_job(config: Config) -> None:
    """Look for new commits of tracking and pinned Spaces once; start their updates."""
    ctx = spaces.open_context(config, actor="scheduler")
    try:
        report = updates.check_updates_once(ctx)
        if report.errors:
            log.warning("updates: %s", report)
        elif report.changed:
            log.info("updates: %s", report)
    except ApplianceError as exc:
        log.warning("update check failed: %s", exc)
    finally:
        ctx.store.close()


# Housekeeping steps by job id; each returns a report with .changed and .errors.
HOUSEKEEPING = {
    "backup": housekeeping.backup_once,
    "rotate-logs": housekeeping.rotate_logs_once,
    "prune": housekeeping.prune_once,
    "disk": housekeeping.check_disk_once,
}


def housekeeping_job(config: Config, name: str) -> None:
    """Run one housekeeping step (backup, rotate-logs, prune, disk) with a fresh context."""
    ctx = spaces.open_context(config, actor="scheduler")
    try:
        report = HOUSEKEEPING[name](ctx)
        if report.errors:
            log.warning("%s: %s", name, report)
        elif report.changed:
            log.info("%s: %s", name, report)
    except ApplianceError as exc:
        log.warning("%s failed: %s", name, exc)
    finally:
        ctx.store.close()


def build_scheduler(config: Config) -> BlockingScheduler:
    """Make the scheduler with every job; one worker thread each, no overlapping runs."""
    # One thread per job: a slow reconcile pass never delays the health sweep, and the same
    # job never overlaps itself.
    scheduler = BlockingScheduler(executors={"default": ThreadPoolExecutor(9)},
                                  job_defaults={"coalesce": True, "max_instances": 1})
    scheduler.add_job(reconcile_job, "interval", args=[config], id="reconcile",
                      seconds=config.reconcile_interval, next_run_time=_now())
    scheduler.add_job(health_job, "interval", args=[config], id="health",
                      seconds=config.health_interval)
    scheduler.add_job(updates_job, "interval", args=[config], id="updates",
                      seconds=config.update_check_interval, next_run_time=_now())
    # Wakes must be quick (a visitor waits): the pass is one small query when nothing sleeps.
    scheduler.add_job(sleep_job, "interval", args=[config], id="sleep",
                      seconds=config.wake_interval, next_run_time=_now())
    scheduler.add_job(housekeeping_job, "interval", args=[config, "backup"], id="backup",
                      seconds=config.backup_interval,
                      next_run_time=housekeeping.next_backup_at(config))
    for name, seconds in (("rotate-logs", config.housekeeping_interval),
                          ("prune", config.housekeeping_interval),
                          ("disk", config.disk_check_interval)):
        scheduler.add_job(housekeeping_job, "interval", args=[config, name], id=name,
                          seconds=seconds, next_run_time=_now())
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
