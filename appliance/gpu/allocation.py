"""Decide whether a Space's hardware request fits this box's GPUs, and where it goes.

Pure logic over data: the GPU inventory and the allocations already made come in as
arguments, a ``Decision`` goes out. Storing allocations, injecting devices (CDI) and
enforcing budgets belong to other modules.

The rules, all of which ``admit`` keeps:

- a whole GPU (``gpu``, ``gpu:N``) is exclusive: it is taken only when nothing at all is
  allocated on it, and once taken it gets no shared budget and no MIG device;
- a GPU in MIG mode hands out only its MIG devices, one Space per device; it is never taken
  whole or shared;
- shared budgets on one GPU add up to at most its memory less a reserve;
- placement is deterministic best-fit: a shared budget goes to the GPU with the least room
  left that still holds it (ties: lowest index), ``gpu:N`` takes the lowest-index free GPUs,
  ``mig`` the first free device of that profile by GPU then MIG index (by its memory where the
  driver names no profile);
- a Jetson's integrated GPU uses the system memory: it takes shared budgets (counted against
  that memory) and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import InvalidInput
from .nvml import Gpu, Inventory, MigDevice

KINDS = ("cpu", "gpu", "mig", "shared")
FORMS = (
    "cpu, gpu, gpu:N (N whole GPUs), mig:PROFILE (e.g. mig:1g.10gb), "
    "shared:SIZE (GPU memory in MiB, or with a unit: shared:8g)"
)

MAX_GPUS = 64  # more whole GPUs than any single box holds: a typo, not a request
MIN_SHARED_MIB = 256  # "shared:8" is nearly always a forgotten "g", not 8 MiB
MAX_SHARED_MIB = 1024 * 1024  # 1 TiB: above any one GPU's (or Jetson's) memory

_COUNT = re.compile(r"gpu:(\d+)")
_SIZE = re.compile(r"shared:(\d+)\s*(m|mb|mib|g|gb|gib)?")
# NVIDIA's GPU-instance profile names: slices of compute, then nominal memory, then a variant
# ("+me" with media extensions, "+me.all", "-me" without, "+gfx" with graphics). A MIG device
# that is one of several compute instances of its GPU instance ("1c.2g.20gb") is not handed
# out for a request: it holds part of the slices the name promises.
_MIG_PROFILE = re.compile(r"([1-8])g\.(\d{1,4})gb(\+me|\+me\.all|-me|\+gfx)?")
_UNIT_MIB = {None: 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024}

# A MIG device's real size sits a little under the nominal size in its profile name (A100
# 1g.10gb: 9728 MiB, 7g.80gb: 80896 MiB; H100 NVL 1g.12gb: about 11 GiB). The window keeps
# neighbouring profiles apart (5/6, 10/12 GB) on every card listed in NVIDIA's MIG guide.
_MIG_LOW, _MIG_HIGH = 0.85, 1.02

# GPU memory per GPU and GPU count of the Hugging Face hardware flavors, for suggestions.
_FLAVORS: dict[str, tuple[int, int] | None] = {
    "cpu-basic": None, "cpu-upgrade": None, "cpu-performance": None, "cpu-xl": None,
    "sprx8": None, "inf2x6": None,  # CPU and AWS Inferentia: no NVIDIA GPU memory
    "t4-small": (16384, 1), "t4-medium": (16384, 1),
    "l4x1": (24576, 1), "l4x4": (24576, 4),
    "l40sx1": (49152, 1), "l40sx4": (49152, 4), "l40sx8": (49152, 8),
    "a10g-small": (24576, 1), "a10g-large": (24576, 1),
    "a10g-largex2": (24576, 2), "a10g-largex4": (24576, 4),
    "a100-large": (81920, 1), "a100x4": (81920, 4), "a100x8": (81920, 8),
    "h100": (81920, 1), "h100x8": (81920, 8),
    "h200": (144384, 1), "h200x2": (144384, 2), "h200x4": (144384, 4), "h200x8": (144384, 8),
    "rtx-pro-6000": (98304, 1), "rtx-pro-6000x2": (98304, 2),
    "rtx-pro-6000x4": (98304, 4), "rtx-pro-6000x8": (98304, 8),
    # ZeroGPU lends a GPU per call; an A10G's memory is the budget its Spaces were written for.
    "zero-a10g": (24576, 1),
}


@dataclass(frozen=True)
class HardwareRequest:
    kind: str  # "cpu" | "gpu" (whole, exclusive) | "mig" | "shared"
    count: int = 1  # whole GPUs, for kind "gpu"
    mig_profile: str | None = None  # e.g. "1g.10gb", for kind "mig"
    memory_mib: int | None = None  # the budget, for kind "shared"

    def __str__(self) -> str:
        if self.kind == "gpu":
            return "gpu" if self.count == 1 else f"gpu:{self.count}"
        if self.kind == "mig":
            return f"mig:{self.mig_profile}"
        if self.kind == "shared":
            return f"shared:{self.memory_mib}"
        return self.kind


@dataclass(frozen=True)
class Allocation:
    """What a Space holds: whole GPUs, one MIG device (on its parent GPU), or a shared budget.

    ``gpu_uuids`` are NVML UUIDs; a Jetson without NVML has none, and its GPU is "index:0".
    """

    space_id: str
    kind: str
    gpu_uuids: tuple[str, ...]
    mig_uuid: str | None
    memory_mib: int | None


@dataclass(frozen=True)
class Decision:
    admitted: bool
    allocation: Allocation | None
    reason: str | None  # when refused: what is taken and what is free


# -- parsing ---------------------------------------------------------------------------------


def parse_hardware(text: str) -> HardwareRequest:
    """Parse a hardware request ("cpu", "gpu:2", "mig:1g.10gb", "shared:8g"); refuse others."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value == "cpu":
        return HardwareRequest("cpu")
    if value == "gpu":
        return HardwareRequest("gpu")
    if found := _COUNT.fullmatch(value):
        count = int(found[1])
        if not 1 <= count <= MAX_GPUS:
            raise InvalidInput(
                f"Hardware {text!r} asks for {count} whole GPUs; a request takes 1 to {MAX_GPUS}",
                hint="use gpu for one GPU or gpu:N for N of them",
            )
        return HardwareRequest("gpu", count=count)
    if value.startswith("mig:"):
        if _MIG_PROFILE.fullmatch(value[4:]) is None:
            raise InvalidInput(
                f"Hardware {text!r} names no MIG profile: expected SLICESg.MEMORYgb",
                hint="use a profile that 'nvidia-smi mig -lgi' lists, e.g. mig:1g.10gb",
            )
        return HardwareRequest("mig", mig_profile=value[4:])
    if found := _SIZE.fullmatch(value):
        mib = int(found[1]) * _UNIT_MIB[found[2]]
        if not MIN_SHARED_MIB <= mib <= MAX_SHARED_MIB:
            raise InvalidInput(
                f"Hardware {text!r} is a budget of {mib} MiB; a shared budget is "
                f"{MIN_SHARED_MIB} MiB to {MAX_SHARED_MIB // 1024} GiB",
                hint="give the size in MiB (shared:8192) or with a unit (shared:8g)",
            )
        return HardwareRequest("shared", memory_mib=mib)
    if value in _FLAVORS:
        raise InvalidInput(
            f"Hardware {text!r} is a Hugging Face flavor, not a request this box understands",
            hint=_flavor_hint(value),
        )
    raise InvalidInput(f"Hardware {text!r} is not a hardware request", hint=f"use one of: {FORMS}")


def flavor_request(flavor: str) -> str | None:
    """Map a Hugging Face hardware flavor to this box's request (whole GPUs or the CPU)."""
    value = flavor.strip().lower()
    if value not in _FLAVORS:
        return None
    spec = _FLAVORS[value]
    if spec is None:
        return "cpu"
    return "gpu" if spec[1] == 1 else f"gpu:{spec[1]}"


def _flavor_hint(flavor: str) -> str:
    spec = _FLAVORS[flavor]
    if spec is None:
        return "use cpu"
    per_gpu, count = spec
    if count == 1:
        return f"use shared:{per_gpu // 1024}g (its GPU memory) or gpu; the forms are: {FORMS}"
    # A shared budget lives on one GPU: the flavor's memory summed over its GPUs fits none.
    return (f"use gpu:{count} (its {count} GPUs), or shared:{per_gpu // 1024}g at most for "
            f"one GPU's share; the forms are: {FORMS}")


def suggested_budget_mib(suggested_hardware: str | None) -> int | None:
    """Return the GPU memory (MiB) of a Hugging Face flavor, to offer as a shared budget.

    A Space's README may name ``suggested_hardware`` (e.g. ``t4-small``). This is only ever a
    suggestion shown to whoever adds the Space; it is never applied silently, since the
    flavor says what Hugging Face rents, not what the Space needs or this box has. A
    multi-GPU flavor counts all its GPUs (``l4x4``: 4 x 24576). CPU flavors, flavors without
    an NVIDIA GPU and unknown names return None.
    """
    if not suggested_hardware:
        return None
    known = _FLAVORS.get(suggested_hardware.strip().lower())
    return None if known is None else known[0] * known[1]


def profile_memory_mib(profile: str) -> int:
    """Return the nominal memory of a MIG profile in MiB ("1g.10gb": 10240)."""
    found = _MIG_PROFILE.fullmatch(profile.strip().lower())
    if found is None:
        raise InvalidInput(f"MIG profile {profile!r} is not SLICESg.MEMORYgb",
                           hint="e.g. 1g.10gb, as 'nvidia-smi mig -lgi' lists them")
    return int(found[2]) * 1024


def _matches_profile(device: MigDevice, profile: str, nominal_mib: int) -> bool:
    if device.profile is not None:
        return device.profile == profile
    # A driver that names no profile leaves the memory alone, which cannot tell profiles of
    # equal memory and different compute apart (H100 1g.20gb and 2g.20gb): the inventory
    # carries a warning saying so.
    size = device.memory_total_mib
    return size is not None and _MIG_LOW * nominal_mib <= size <= _MIG_HIGH * nominal_mib


def _describe_mig(gpu: Gpu, device: MigDevice) -> str:
    what = device.profile or f"{device.memory_total_mib} MiB, profile unknown"
    return f"{_label(gpu)} MIG {device.index} ({what})"


# -- what is in use --------------------------------------------------------------------------


@dataclass
class _Use:
    whole: list[str] = field(default_factory=list)  # Spaces holding the GPU whole
    shared: list[tuple[str, int]] = field(default_factory=list)  # (Space, MiB)
    migs: list[str] = field(default_factory=list)  # Spaces holding one of its MIG devices

    @property
    def shared_mib(self) -> int:
        return sum(mib for _, mib in self.shared)


@dataclass
class _Usage:
    by_gpu: dict[str, _Use]
    by_mig: dict[str, str]  # MIG UUID -> Space

    def of(self, gpu: Gpu) -> _Use:
        key = gpu_key(gpu)
        return _NOTHING if key is None else self.by_gpu.get(key, _NOTHING)

    def is_untouched(self, gpu: Gpu) -> bool:
        use = self.of(gpu)
        return not (use.whole or use.shared or use.migs) and not any(
            mig.uuid in self.by_mig for mig in gpu.mig_devices)


_NOTHING = _Use()


def gpu_key(gpu: Gpu) -> str | None:
    """Name a GPU in allocations: its UUID; "index:N" for a Jetson that has none."""
    if gpu.uuid:
        return gpu.uuid
    return f"index:{gpu.index}" if gpu.jetson else None


def _usage(existing: Iterable[Allocation], space_id: str) -> _Usage:
    by_gpu: dict[str, _Use] = {}
    by_mig: dict[str, str] = {}
    for allocation in existing:
        if allocation.space_id == space_id:
            continue  # re-admission: a Space is weighed against the others only
        for uuid in allocation.gpu_uuids:
            use = by_gpu.setdefault(uuid, _Use())
            if allocation.kind == "gpu":
                use.whole.append(allocation.space_id)
            elif allocation.kind == "shared":
                use.shared.append((allocation.space_id, allocation.memory_mib or 0))
            elif allocation.kind == "mig":
                use.migs.append(allocation.space_id)
        if allocation.kind == "mig" and allocation.mig_uuid:
            by_mig[allocation.mig_uuid] = min(
                allocation.space_id, by_mig.get(allocation.mig_uuid, allocation.space_id))
    return _Usage(by_gpu, by_mig)


# -- admission -------------------------------------------------------------------------------


def admit(request: HardwareRequest, space_id: str, inventory: Inventory,
          existing: list[Allocation], reserve_mib: int = 2048) -> Decision:
    """Decide whether the request fits beside the other Spaces' allocations, and where."""
    _check(request)
    if request.kind == "cpu":
        return Decision(True, None, None)
    if not inventory.available:
        return _refuse(f"This box has no NVIDIA GPU ({inventory.reason or 'NVML is unavailable'})")
    if not inventory.gpus:
        return _refuse("This box has no NVIDIA GPU (NVML found none)")
    gpus = sorted(inventory.gpus, key=lambda gpu: gpu.index)
    usage = _usage(existing, space_id)
    if request.kind == "shared":
        return _admit_shared(request, space_id, gpus, usage, reserve_mib)
    if all(gpu.jetson for gpu in gpus):
        return _refuse(
            f"{_label(gpus[0])} is a Jetson's integrated GPU: it shares the system memory, so "
            f"it has no {'MIG devices' if request.kind == 'mig' else 'whole GPU'} to give; "
            "ask for shared:SIZE (e.g. shared:8g) instead"
        )
    if request.kind == "gpu":
        return _admit_whole(request, space_id, gpus, usage)
    return _admit_mig(request, space_id, gpus, usage)


def _check(request: HardwareRequest) -> None:
    if request.kind not in KINDS:
        raise InvalidInput(f"Hardware kind {request.kind!r} is unknown",
                           hint=f"use one of: {FORMS}")
    if request.kind == "gpu" and not 1 <= request.count <= MAX_GPUS:
        raise InvalidInput(f"A request for {request.count} whole GPUs cannot be met",
                           hint=f"ask for 1 to {MAX_GPUS}")
    if request.kind == "shared" and not (
            request.memory_mib and MIN_SHARED_MIB <= request.memory_mib <= MAX_SHARED_MIB):
        raise InvalidInput(f"A shared budget of {request.memory_mib} MiB cannot be met",
                           hint=f"ask for {MIN_SHARED_MIB} MiB to {MAX_SHARED_MIB // 1024} GiB")
    if request.kind == "mig":
        profile_memory_mib(request.mig_profile or "")


def _refuse(reason: str) -> Decision:
    return Decision(False, None, reason)


def _label(gpu: Gpu) -> str:
    name = gpu.name.removeprefix("NVIDIA ").strip()
    return f"GPU {gpu.index} ({name})" if name else f"GPU {gpu.index}"


def _spaces(names: Iterable[str]) -> str:
    return ", ".join(sorted(set(names)))


def _budgets(shared: list[tuple[str, int]]) -> str:
    """List a GPU's shared budgets; past three, sum them so a busy box's refusal stays short."""
    ordered = sorted(shared)
    if len(ordered) <= 3:
        return "shared budgets of " + ", ".join(f"{mib} MiB ({space})" for space, mib in ordered)
    named = ", ".join(space for space, _ in ordered[:3])
    return (f"{len(ordered)} shared budgets, {sum(mib for _, mib in ordered)} MiB in all "
            f"({named} and {len(ordered) - 3} more)")


def _taken_by(use: _Use) -> str:
    """Say what holds a GPU that is not free ("is given to team/a", "has shared budgets ...")."""
    parts = []
    if use.whole:
        parts.append(f"is given to {_spaces(use.whole)}")
    if use.shared:
        parts.append(f"has {_budgets(use.shared)}")
    if use.migs:
        parts.append(f"has MIG devices given to {_spaces(use.migs)}")
    return " and ".join(parts)


def _whole_state(gpu: Gpu, usage: _Usage) -> str:
    if gpu.jetson:
        return f"{_label(gpu)} is a Jetson's integrated GPU (shared budgets only)"
    if gpu_key(gpu) is None:
        return f"{_label(gpu)} has no readable UUID"
    if gpu.mig_enabled:
        return f"{_label(gpu)} is in MIG mode (only its MIG devices are handed out)"
    if usage.is_untouched(gpu):
        return f"{_label(gpu)} is free"
    return f"{_label(gpu)} {_taken_by(usage.of(gpu)) or 'has MIG devices in use'}"


def _admit_whole(request: HardwareRequest, space_id: str, gpus: list[Gpu],
                 usage: _Usage) -> Decision:
    free = [gpu for gpu in gpus if not gpu.jetson and not gpu.mig_enabled
            and gpu_key(gpu) is not None and usage.is_untouched(gpu)]
    if len(free) >= request.count:
        taken = tuple(gpu_key(gpu) for gpu in free[:request.count])
        return Decision(True, Allocation(space_id, "gpu", taken, None, None), None)
    states = "; ".join(_whole_state(gpu, usage) for gpu in gpus)
    if request.count == 1:
        return _refuse(f"No whole GPU is free: {states}")
    return _refuse(f"{request} needs {request.count} whole GPUs and "
                   f"{len(free)} {'is' if len(free) == 1 else 'are'} free: {states}")


def _room(gpu: Gpu, use: _Use, reserve_mib: int) -> int:
    return (gpu.memory_total_mib or 0) - reserve_mib - use.shared_mib


def _shared_state(gpu: Gpu, usage: _Usage, reserve_mib: int) -> str:
    use = usage.of(gpu)
    if gpu_key(gpu) is None:
        return f"{_label(gpu)} has no readable UUID"
    if gpu.mig_enabled:
        return f"{_label(gpu)} is in MIG mode (ask for mig:PROFILE)"
    if use.whole or use.migs:
        return f"{_label(gpu)} {_taken_by(use)}"
    if gpu.memory_total_mib is None:
        return f"{_label(gpu)} reports no memory size"
    memory = "system memory" if gpu.jetson else "MiB"
    return (f"{_label(gpu)} has {max(_room(gpu, use, reserve_mib), 0)} MiB left of "
            f"{gpu.memory_total_mib} {memory} (reserve {reserve_mib})")


def _admit_shared(request: HardwareRequest, space_id: str, gpus: list[Gpu], usage: _Usage,
                  reserve_mib: int) -> Decision:
    need = request.memory_mib or 0
    fits = []
    for gpu in gpus:
        use = usage.of(gpu)
        if (gpu_key(gpu) is None or gpu.mig_enabled or use.whole or use.migs
                or gpu.memory_total_mib is None):
            continue
        room = _room(gpu, use, reserve_mib)
        if room >= need:
            fits.append((room, gpu.index, gpu))
    if fits:
        _, _, best = min(fits, key=lambda fit: fit[:2])
        return Decision(
            True, Allocation(space_id, "shared", (gpu_key(best),), None, need), None)
    states = "; ".join(_shared_state(gpu, usage, reserve_mib) for gpu in gpus)
    return _refuse(f"Shared budget {need} MiB does not fit: {states}")


def _admit_mig(request: HardwareRequest, space_id: str, gpus: list[Gpu],
               usage: _Usage) -> Decision:
    profile = request.mig_profile or ""
    nominal = profile_memory_mib(profile)
    mig_gpus = [gpu for gpu in gpus if gpu.mig_enabled and not gpu.jetson
                and gpu_key(gpu) is not None]
    if not mig_gpus:
        return _refuse(
            f"No GPU on this box is in MIG mode, so {request} cannot be given: "
            f"{'; '.join(_whole_state(gpu, usage) for gpu in gpus)}. "
            "Enable MIG and create instances (nvidia-smi -mig 1; nvidia-smi mig -cgi ...), "
            "or ask for gpu or shared:SIZE"
        )
    taken, others = [], []
    for gpu in mig_gpus:
        use = usage.of(gpu)
        if use.whole or use.shared:
            taken.append(f"{_label(gpu)} {_taken_by(use)}")
            continue
        for mig in sorted(gpu.mig_devices, key=lambda device: device.index):
            holder = usage.by_mig.get(mig.uuid)
            if not _matches_profile(mig, profile, nominal):
                if holder is None:
                    others.append(_describe_mig(gpu, mig))
            elif holder is None:
                allocation = Allocation(space_id, "mig", (gpu_key(gpu),), mig.uuid, None)
                return Decision(True, allocation, None)
            else:
                taken.append(f"{_label(gpu)} MIG {mig.index} is given to {holder}")
    if taken:
        reason = f"No {profile} MIG device is free: {'; '.join(taken)}"
    else:
        reason = f"No MIG device matches {profile} (about {nominal} MiB) on this box"
    if others:
        reason += f"; free MIG devices of other profiles: {', '.join(others)}"
    return _refuse(reason)


# -- after the inventory changes -------------------------------------------------------------


def reconcile_allocations(existing: list[Allocation], inventory: Inventory,
                          running: set[str] | None = frozenset()
                          ) -> tuple[list[Allocation], list[str]]:
    """Drop allocations whose GPU or MIG device is gone; return those kept and why each went.

    An inventory that could not be read keeps every allocation: a driver that fails to load
    after an upgrade has not taken the GPUs out of the box. So does a Space in ``running``
    (its container still runs): a GPU missing from one reading may come back, still in that
    container's hands. ``running`` None means nobody can say what runs: keep everything.
    """
    if not inventory.available or running is None:
        return list(existing), []
    gpus = {key: gpu for gpu in inventory.gpus if (key := gpu_key(gpu)) is not None}
    migs = {mig.uuid for gpu in inventory.gpus if gpu.mig_enabled for mig in gpu.mig_devices}
    kept, dropped = [], []
    for allocation in existing:
        gone = [uuid for uuid in allocation.gpu_uuids if uuid not in gpus]
        mig_gone = allocation.mig_uuid is not None and allocation.mig_uuid not in migs
        if (gone or mig_gone) and allocation.space_id in running:
            kept.append(allocation)
        elif gone:
            dropped.append(
                f"Dropped the {_what(allocation)} of {allocation.space_id}: "
                f"GPU {', '.join(gone)} is no longer on this box")
        elif mig_gone:
            dropped.append(
                f"Dropped the {_what(allocation)} of {allocation.space_id}: "
                f"MIG device {allocation.mig_uuid} is no longer on this box")
        else:
            kept.append(allocation)
    return kept, dropped


def _what(allocation: Allocation) -> str:
    if allocation.kind == "shared":
        return f"shared budget of {allocation.memory_mib} MiB"
    if allocation.kind == "mig":
        return "MIG device"
    count = len(allocation.gpu_uuids)
    return "whole GPU" if count == 1 else f"{count} whole GPUs"
