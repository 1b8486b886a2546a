"""Reconcile: make what Podman runs match what the database says should run, in one pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import stages
from ..adapters import router
from ..adapters.runtime import LABEL_SPACE
from ..core import jobs, spaces
from ..errors import ApplianceError
from ..gpu import claims
from . import health


@dataclass
class ReconcileReport:
    """What one pass did, for the scheduler's log and the tests."""

    recovered: list[str] = field(default_factory=list)
    retried_builds: list[str] = field(default_factory=list)
    restarting: list[str] = field(default_factory=list)
    removed_containers: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.recovered or self.retried_builds or self.restarting
                    or self.removed_containers or self.gave_up)


def reconcile_once(ctx: spaces.Context, spawn=jobs.spawn_job,
                   now: float | None = None) -> ReconcileReport:
    """Compare desired state with Podman once and act; never blocks on an app's start.

    - a Space left busy by a dead process is settled (then retried by the next command);
    - a Space that should serve but whose container is gone or dead is restarted by a worker;
    - a stopped or paused Space has no container left running;
    - containers of a Space other than the one serving it (an interrupted switch) are removed
      unless work on the Space is under way (a switch owns the Space until its old container
      has drained and is gone);
    - containers labelled by the appliance that no Space owns are removed (their images go in
      housekeeping's prune).
    """
    report = ReconcileReport()
    now = time.time() if now is None else now
    jobs.reap_children()
    rows = {row["id"]: row for row in ctx.store.list_spaces()}
    router.ensure_router(ctx.config)
    containers = ctx.runtime.containers()
    by_space: dict[str, list] = {}
    for container in containers:
        owner = container.labels.get(LABEL_SPACE)
        if owner not in rows:
            ctx.runtime.remove_container(container.name)
            report.removed_containers.append(container.name)
        else:
            by_space.setdefault(owner, []).append(container)
    for space_id, row in rows.items():
        try:
            _reconcile_space(ctx, row, by_space.get(space_id, []), report, spawn, now)
        except ApplianceError as exc:  # one Space's trouble never stops the others' pass
            report.errors.append(f"{space_id}: {exc.message}")
    report.errors.extend(claims.reconcile_allocations_once(ctx))
    # Images of Spaces that no longer exist are left to the hourly prune: listing images is
    # the expensive call here, and an orphan image harms nothing but disk space.
    return report


def _reconcile_space(ctx: spaces.Context, row: dict, containers: list,
                     report: ReconcileReport, spawn, now: float) -> None:
    space_id = row["id"]
    if spaces.worker_alive(row):
        return  # a worker owns it: leave its containers and stage alone
    if row["stage"] in stages.BUSY and row["stage"] != stages.DELETING:
        interrupted = row["stage"]
        row = spaces.recover_abandoned(ctx, space_id)
        if row["stage"] in stages.BUSY:
            return  # still owned by a live process (this one)
        report.recovered.append(space_id)
        if _retry_build(ctx, row, interrupted, spawn):
            report.retried_builds.append(space_id)
            return
    if row["stage"] == stages.DELETING:
        spaces.delete(ctx, space_id)  # a delete interrupted half-way: finish it
        return
    serving = row["container"] if row["desired"] == "running" else None
    for container in containers:
        if container.name != serving:
            ctx.runtime.remove_container(container.name)
            report.removed_containers.append(container.name)
    if row["desired"] != "running" or not row["image"]:
        return  # stopped, paused, or given up on ("failed") until a person acts
    current = next((c for c in containers if c.name == serving), None)
    # A recorded container means a revision should be serving, whatever a failed update
    # wrote into the stage. A RUNTIME_ERROR reached during automatic restarts is retried
    # under the same backoff; one that a first start or a person's action led to waits.
    should_serve = bool(row["container"]) or row["stage"] in spaces.SERVING
    retrying = row["stage"] == stages.RUNTIME_ERROR and row["restarts"] not in (None, "[]")
    if (should_serve and (current is None or not current.running)) or retrying:
        reason = "the app did not start" if retrying else "the container exited"
        outcome = health.restart_or_give_up(ctx, row, reason, "start", now, spawn)
        if outcome == "restarting":
            report.restarting.append(space_id)
        elif outcome == "gave_up":
            report.gave_up.append(space_id)


def _retry_build(ctx: spaces.Context, row: dict, interrupted: str, spawn) -> bool:
    """Build once more a Space whose build a crash cut short; a second interruption leaves
    it in the error stage recover_abandoned chose (BUILD_ERROR, or RUNNING on the old
    revision), for a person."""
    if interrupted not in (stages.BUILDING, stages.RUNNING_BUILDING) or row["build_retried"]:
        return False
    if row["desired"] != "running":
        # A retried build ends by starting the Space, and a stopped or paused one stays so
        # until a person acts: the message says that nothing retries it by itself.
        ctx.store.update_space(row["id"], error=(
            f"{row['error']} (the Space is {row['desired']}, so the scheduler does not "
            "retry it)"))
        return False
    ctx.store.update_space(row["id"], actor=ctx.actor, event="build-retry",
                           detail={"interrupted": interrupted}, build_retried=1)
    needed, _view = spaces.request_update(ctx, row["id"], revision=None)
    if needed:
        spawn(ctx, row["id"], "deploy")
    return needed
