"""Work longer than a command: run a Space job here, or in a detached worker process."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from . import spaces, updates
from .config import SETTINGS, Config
from .errors import InvalidInput

JOBS = ("deploy", "start", "restart", "update")
# Workers this process started; a long-lived spawner (the scheduler) reaps them so that
# finished or killed ones do not linger as zombies.
_children: list[subprocess.Popen] = []


def reap_children() -> None:
    """Collect the exit status of finished workers."""
    _children[:] = [child for child in _children if child.poll() is None]


def run_job(ctx: spaces.Context, space_id: str, job: str, factory: bool = False
            ) -> dict[str, Any]:
    """Run one job for a Space in this process and return the Space's view."""
    if job == "deploy":
        return spaces.deploy(ctx, space_id, factory=factory)
    if job == "start":
        needs_build, view = spaces.start(ctx, space_id)
        return spaces.deploy(ctx, space_id) if needs_build else view
    if job == "restart":
        return spaces.restart(ctx, space_id)
    if job == "update":
        return updates.run_update(ctx, space_id)
    raise InvalidInput(f"Unknown job {job!r}", hint=f"jobs are {', '.join(JOBS)}")


def spawn_job(ctx: spaces.Context, space_id: str, job: str, factory: bool = False) -> int:
    """Run a job in a detached worker process that owns the Space until it is done."""
    config: Config = ctx.config
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS}, "APPLIANCE_ACTOR": ctx.actor}
    command = [sys.executable, "-m", "appliance.cli", "worker", space_id, "--job", job]
    if factory:
        command.append("--factory")
    log_dir = config.data_path / "run"
    log_dir.mkdir(parents=True, exist_ok=True)
    reap_children()
    with open(log_dir / "worker.log", "ab") as log:
        child = subprocess.Popen(command, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
    _children.append(child)
    pid = child.pid
    # The worker owns the busy stage from now on, so its crash is recognised as one.
    ctx.store.update_space(space_id, worker_pid=pid)
    return pid
