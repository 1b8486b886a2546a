"""Enforce shared GPU memory budgets: NVML only observes, so the appliance acts.

A Space given ``shared:SIZE`` may use SIZE MiB of GPU memory. Few frameworks can be told to
stay under a limit (PyTorch cannot), so each pass reads which processes hold GPU memory,
attributes them to Spaces, and stops a Space that stays over its budget longer than
``gpu_quota_grace`` seconds: RUNTIME_ERROR with the numbers, its allocation released, the
other Spaces untouched. Whole GPUs and MIG devices are bounded by the hardware and never
budget-limited here.

Attribution is by PID namespace. NVML reports host PIDs; a container's processes live in
the container's own PID namespace, which the container's init process (its host PID from
Podman) shares with every process started inside it. Cgroup paths would say the same but
differ between cgroup v1 and v2 and between the cgroupfs and systemd managers (and rootless
v1 has no per-container cgroup at all); the namespace's inode (``/proc/PID/ns/pid``) is the
same everywhere. Processes that belong to no Space are reported, never touched: each is
recorded once as a ``gpu:unattributed-process`` event (per PID and GPU) and marked on the GPU
page.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import stages
from ..adapters import router
from ..adapters.runtime import LABEL_SPACE
from ..core import spaces
from ..errors import ApplianceError
from ..upkeep import health
from . import nvml
from .allocation import gpu_key


@dataclass
class WatchdogReport:
    """What one pass saw and did, for the scheduler's log and the tests."""

    attributed: dict[str, int] = field(default_factory=dict)  # Space -> GPU MiB in use
    over_budget: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    unattributed: list[dict[str, Any]] = field(default_factory=list)  # {pid, used_mib, gpu_uuid}
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.over_budget or self.stopped)


UNATTRIBUTED_EVENT = "gpu:unattributed-process"
# (pid, GPU) of the processes of no Space already recorded, per database file: the scheduler
# runs a pass every few seconds, and one event per process is enough.
_recorded: dict[str, set[tuple[int, str]]] = {}


class _Vanished(Exception):
    """The process ended between NVML's reading and ours."""


def _pid_namespace(pid: int | str) -> str | None:
    """Identify a process's PID namespace; None when its /proc entry may not be read.

    Raises _Vanished for a process that is gone. Reading another account's namespace link
    needs ptrace rights over it; the service account has them over its rootless containers
    (it owns their user namespace), so a refusal means the process is none of ours.
    """
    # The link's text ("pid:[4026531836]") names the namespace; readlink costs a third of a
    # stat here, and a telemetry sample does one per GPU process.
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except (FileNotFoundError, ProcessLookupError):
        raise _Vanished from None
    except OSError:
        return None


def _space_namespaces(ctx: spaces.Context) -> dict[str, str]:
    """Map the PID namespace of each running container of this appliance to its Space."""
    try:
        own = _pid_namespace("self")
    except _Vanished:
        own = None
    found: dict[str, str] = {}
    for container in ctx.runtime.containers():
        space_id = container.labels.get(LABEL_SPACE)
        if not space_id or not container.running:
            continue
        pid = ctx.runtime.init_pid(container.name)
        if not pid:
            continue
        try:
            namespace = _pid_namespace(pid)
        except _Vanished:
            continue  # stopped since it was listed
        # A container sharing the host's PID namespace (--pid=host) would claim every
        # process on the box; the appliance never runs one, and never trusts one.
        if namespace is not None and namespace != own:
            found[namespace] = space_id
    return found


def attribute_processes(ctx: spaces.Context,
                        inventory: nvml.Inventory) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Map the GPU processes NVML lists (host PIDs) to Spaces by PID namespace.

    Returns (MiB in use per Space, summed over every GPU; the processes of no Space as
    {pid, used_mib, gpu_uuid}). A process that ended meanwhile is left out; one whose
    memory NVML cannot read counts 0 MiB.
    """
    per_gpu, unattributed = attribute_by_gpu(ctx, inventory)
    attributed: dict[str, int] = {}
    for used in per_gpu.values():
        for space_id, mib in used.items():
            attributed[space_id] = attributed.get(space_id, 0) + mib
    return attributed, unattributed


def attribute_by_gpu(ctx: spaces.Context, inventory: nvml.Inventory
                     ) -> tuple[dict[int, dict[str, int]], list[dict[str, Any]]]:
    """Like attribute_processes, per GPU: {GPU's index in the inventory: {Space: MiB}}.

    The containers' namespaces are looked up once for every GPU (telemetry samples them all).
    """
    if not any(card.processes for card in inventory.gpus):
        return {}, []  # nothing on the GPUs: spare Podman the question
    namespaces = _space_namespaces(ctx)
    per_gpu: dict[int, dict[str, int]] = {}
    unattributed: list[dict[str, Any]] = []
    for number, card in enumerate(inventory.gpus):
        used: dict[str, int] = {}
        for process in card.processes:
            try:
                namespace = _pid_namespace(process.pid)
            except _Vanished:
                continue
            space_id = namespaces.get(namespace) if namespace is not None else None
            if space_id is None:
                unattributed.append({"pid": process.pid, "used_mib": process.used_mib,
                                     "gpu_uuid": gpu_key(card) or card.uuid})
            else:
                used[space_id] = used.get(space_id, 0) + (process.used_mib or 0)
        if used:
            per_gpu[number] = used
    return per_gpu, unattributed


def record_unattributed(ctx: spaces.Context, processes: list[dict[str, Any]]) -> int:
    """Record an event for each GPU process of no Space not recorded before; return how many."""
    key = str(ctx.store.path)
    seen = _recorded.get(key)
    if seen is None:  # a fresh scheduler: what earlier ones recorded stays recorded
        seen = _recorded[key] = {
            (event["detail"].get("pid"), event["detail"].get("gpu_uuid"))
            for event in ctx.store.events(limit=1000) if event["kind"] == UNATTRIBUTED_EVENT}
    added = 0
    for process in processes:
        ident = (process["pid"], process["gpu_uuid"])
        if ident in seen:
            continue
        seen.add(ident)
        ctx.store.add_event(None, UNATTRIBUTED_EVENT, ctx.actor, dict(process))
        added += 1
    return added


def unattributed_on_gpus(ctx: spaces.Context, inventory: nvml.Inventory
                         ) -> set[tuple[str, int]] | None:
    """Return (GPU UUID, pid) of the GPU processes of no Space; None when Podman cannot say."""
    if ctx.runtime is None:
        return None
    try:
        _, unattributed = attribute_by_gpu(ctx, inventory)
    except ApplianceError:
        return None
    return {(process["gpu_uuid"], process["pid"]) for process in unattributed}


def _stamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")


def _since(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def enforce_once(ctx: spaces.Context, inventory: nvml.Inventory | None = None,
                 now: float | None = None) -> WatchdogReport:
    """Attribute GPU memory to Spaces once; stop those over their shared budget too long."""
    now = time.time() if now is None else now
    inventory = ctx.read_inventory() if inventory is None else inventory
    report = WatchdogReport()
    if not inventory.available:
        return report  # nothing can be measured: no Space is judged on a missing reading
    report.attributed, report.unattributed = attribute_processes(ctx, inventory)
    record_unattributed(ctx, report.unattributed)
    budgets = {row["space_id"]: row["memory_mib"] for row in ctx.store.allocations()
               if row["kind"] == "shared" and row["memory_mib"]}
    for row in ctx.store.list_spaces():
        space_id, budget = row["id"], budgets.get(row["id"])
        used = report.attributed.get(space_id, 0)
        if budget is None or used <= budget:
            if row["gpu_over_since"]:
                ctx.store.update_space(space_id, gpu_over_since=None)
            continue
        report.over_budget.append(space_id)
        since = _since(row["gpu_over_since"])
        if since is None:
            since = now
            ctx.store.update_space(
                space_id, actor=ctx.actor, event="gpu:over-budget",
                detail={"used_mib": used, "budget_mib": budget,
                        "grace_seconds": ctx.config.gpu_quota_grace},
                gpu_over_since=_stamp(now))
        # A worker switching revisions runs two containers for a moment, and owns the
        # stage: the stop waits for it to finish (the grace has then long run out).
        if now - since < ctx.config.gpu_quota_grace or spaces.worker_alive(row):
            continue
        try:
            _stop_over_budget(ctx, row, used, budget)
            report.stopped.append(space_id)
        except ApplianceError as exc:  # one Space's trouble never stops the others' pass
            report.errors.append(f"{space_id}: {exc.message}")
    return report


def _stop_over_budget(ctx: spaces.Context, row: dict[str, Any], used: int, budget: int) -> None:
    """Stop the Space's containers, record why in RUNTIME_ERROR, release its GPU budget."""
    space_id = row["id"]
    message = f"GPU memory quota exceeded: used {used} MiB of {budget} MiB"
    # A failed update's error stage may still serve the older revision; the stage table
    # has no edge from there to RUNTIME_ERROR, so it stops (the error says why).
    target = stages.RUNTIME_ERROR if stages.can_move(row["stage"], stages.RUNTIME_ERROR) \
        else stages.STOPPED
    # desired "failed": left for a person, as after too many restarts; reconcile and the
    # health sweep must not start it again into the same quota.
    ctx.store.move(space_id, row["stage"], target, ctx.actor, event="gpu:quota-exceeded",
                   detail={"used_mib": used, "budget_mib": budget}, error=message,
                   backend_port=None, container=None, desired=health.GAVE_UP,
                   gpu_over_since=None)
    try:
        router.wait_route(ctx.config, row["port"], None, timeout=5)
        for container in ctx.runtime.containers(space_id):
            ctx.runtime.remove_container(container.name)
    finally:
        # The Space no longer holds a budget; a container that survived the removal is
        # no longer its serving one, and reconcile removes it.
        ctx.store.release_allocation(space_id, ctx.actor, message)
