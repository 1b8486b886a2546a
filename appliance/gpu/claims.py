"""GPUs for Spaces: admit a hardware request, hold the allocation, and say how to inject it.

Injection is through CDI (the names `nvidia-ctk cdi generate` writes: `nvidia.com/gpu=0`,
`=0:1` for a MIG device, its GPU's NVML index then its nvmlDeviceGetMigDeviceHandleByIndex
slot, as nvidia-ctk's "index" names are; the UUIDs with APPLIANCE_CDI_NAMES=uuid; `=all` on a
Jetson), plus the variables CUDA programs read. A shared
request gets a memory budget: frameworks that can cap themselves are told (XLA's memory
fraction, TensorFlow's on-demand growth, MPS's pinned limit when the box runs the MPS daemon);
PyTorch has no such variable, so the GPU watchdog enforces every budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters.runtime import LABEL_SPACE
from ..errors import ApplianceError, Conflict
from . import allocation
from .nvml import Inventory


@dataclass(frozen=True)
class Claim:
    """What a container needs for its allocation: CDI devices, variables, a memory limit."""

    devices: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    memory_limit_mib: int | None = None  # Jetson: the iGPU budget is system memory


def _existing(ctx, space_id: str) -> list[allocation.Allocation]:
    return [allocation.Allocation(r["space_id"], r["kind"], tuple(r["gpu_uuids"]),
                                  r["mig_uuid"], r["memory_mib"])
            for r in ctx.store.allocations() if r["space_id"] != space_id]


def check_request(ctx, space_id: str, hardware: str) -> str:
    """Parse a hardware request and refuse it now, with what is free, when it cannot fit.

    Advisory only: nothing is recorded, so the Space's start (``claim``) decides again.
    """
    request = allocation.parse_hardware(hardware)
    if request.kind == "cpu":
        return "cpu"
    inventory = ctx.read_inventory()
    decision = allocation.admit(request, space_id, inventory, _existing(ctx, space_id),
                                ctx.config.gpu_reserve_mib)
    if not decision.admitted:
        raise _refusal(request, decision, inventory)
    return str(request)


def _refusal(request: allocation.HardwareRequest, decision: allocation.Decision,
             inventory: Inventory) -> Conflict:
    if not inventory.available or not inventory.gpus:
        hint = "this box has no NVIDIA GPU: ask for cpu, or run the Space on a box with one"
    else:
        hint = "free it by stopping a Space that holds it, or ask for less"
    return Conflict(f"Hardware {request} is not available: {decision.reason}", hint=hint)


def claim(ctx, space_id: str, hardware: str) -> Claim:
    """Admit the Space's request against what others hold, record it, return the injection.

    Reading the allocations, deciding and recording are one IMMEDIATE transaction: SQLite
    lets one writer in at a time across every process (CLI, portal workers, scheduler), so
    two Spaces starting at once cannot both be given the last free GPU.
    """
    request = allocation.parse_hardware(hardware)
    if request.kind == "cpu":
        ctx.store.release_allocation(space_id, ctx.actor, "cpu")
        return Claim()
    # NVML is read before the transaction: the GPUs do not change with the allocations, and
    # the write lock is held only for the decision.
    inventory = ctx.read_inventory()
    with ctx.store.transaction():
        decision = allocation.admit(request, space_id, inventory, _existing(ctx, space_id),
                                    ctx.config.gpu_reserve_mib)
        if not decision.admitted:
            raise _refusal(request, decision, inventory)
        held = decision.allocation
        ctx.store.set_allocation(space_id, held.kind, list(held.gpu_uuids), held.mig_uuid,
                                 held.memory_mib, ctx.actor)
    return injection(held, inventory, ctx.config)


def release(ctx, space_id: str, reason: str) -> None:
    ctx.store.release_allocation(space_id, ctx.actor, reason)


def injection(held: allocation.Allocation, inventory: Inventory, config) -> Claim:
    """Turn an allocation into CDI device names and the variables CUDA programs read."""
    kind = config.cdi_kind
    by_key = {allocation.gpu_key(g): g for g in inventory.gpus}
    gpus = [by_key[key] for key in held.gpu_uuids if key in by_key]
    if any(g.jetson for g in gpus):
        budget = held.memory_mib
        return Claim(devices=[f"{kind}=all"],
                     env={"NVIDIA_VISIBLE_DEVICES": "all", **_budget_env(held, gpus, config)},
                     memory_limit_mib=budget)
    if held.mig_uuid:
        parent = gpus[0]
        slot = next(m.index for m in parent.mig_devices if m.uuid == held.mig_uuid)
        name = held.mig_uuid if config.cdi_names == "uuid" else f"{parent.index}:{slot}"
        visible = held.mig_uuid
        devices = [f"{kind}={name}"]
    else:
        devices = [f"{kind}={g.uuid if config.cdi_names == 'uuid' else g.index}" for g in gpus]
        visible = ",".join(g.uuid for g in gpus)
    env = {"NVIDIA_VISIBLE_DEVICES": visible, "CUDA_VISIBLE_DEVICES": visible,
           **_budget_env(held, gpus, config)}
    return Claim(devices=devices, env=env)


def _budget_env(held: allocation.Allocation, gpus: list, config) -> dict[str, str]:
    if held.kind != "shared" or not held.memory_mib:
        return {}
    env = {"APPLIANCE_GPU_MEMORY_MIB": str(held.memory_mib),
           "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    total = gpus[0].memory_total_mib if gpus else None
    if total:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(1.0, held.memory_mib / total):.3f}"
    if config.gpu_mps:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={held.memory_mib}M"
    return env


def reconcile_allocations_once(ctx) -> list[str]:
    """Drop allocations whose GPU or MIG device NVML no longer shows; return the messages.

    An allocation whose GPU is missing from this reading is kept while the Space has a
    container running: a GPU that drops out of one NVML reading (an Xid, a driver hiccup)
    and comes back is still in that container's hands, and must not be handed out twice.
    """
    if not ctx.store.allocations():
        return []  # nothing held: no need to wake NVML (a CPU-only box never does)
    existing = _existing(ctx, "")
    inventory = ctx.read_inventory()
    _, messages = allocation.reconcile_allocations(existing, inventory)
    if messages:
        running = _running_spaces(ctx)
        kept, messages = allocation.reconcile_allocations(existing, inventory, running)
    else:
        kept = existing
    held = {a.space_id for a in kept}
    for row in ctx.store.allocations():
        if row["space_id"] not in held:
            ctx.store.release_allocation(row["space_id"], ctx.actor, "its GPU is gone")
    return messages


def _running_spaces(ctx) -> set[str] | None:
    """Return the Spaces with a running container; None (keep every allocation) when
    Podman cannot say."""
    try:
        return {c.labels.get(LABEL_SPACE) for c in ctx.runtime.containers() if c.running}
    except ApplianceError:
        return None


def inventory_view(ctx, inventory: Inventory | None = None) -> dict:
    """The GPUs as NVML sees them now, with what each Space holds (for the API and pages)."""
    inventory = ctx.read_inventory() if inventory is None else inventory
    return {**inventory.to_dict(), "allocations": ctx.store.allocations()}
