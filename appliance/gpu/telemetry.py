"""GPU telemetry: sample each GPU's use, and each Space's share of it, and thin it out with age.

Every ``telemetry_interval`` seconds one inventory read becomes one row per GPU (memory used,
utilisation, temperature, power; NULL where NVML has no such reading) and one row per Space
per GPU with the memory its processes hold there, attributed by PID namespace as the GPU
watchdog does; a Space holding an allocation on a GPU but no memory there gets a 0 row, so
its last reading is never an old one. A CPU-only box writes nothing.

Raw rows are kept ``telemetry_raw_hours``, then become 5-minute averages; those become hourly
averages after a week; nothing is kept past ``telemetry_keep_days``. At the defaults (10 s,
12 h, 30 days) each GPU, and each Space on a GPU, keeps 4,320 raw rows, 288 rows a day for
the rest of the week and 24 a day after that: some 40 MB for 8 GPUs and 16 Spaces
(bench/gpu_telemetry_bench.py).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..core import spaces
from ..errors import ApplianceError, NotFound
from . import allocation, nvml, watchdog

RAW = 0
FIVE_MINUTES = 300
HOUR = 3600
DAY = 86400
FIVE_MINUTE_DAYS = 7  # 5-minute averages older than this become hourly ones

# What writing or thinning the samples can meet: the store passes sqlite3 errors through (a
# full disk is sqlite3.OperationalError), and Podman's are ApplianceErrors.
FAILURES = (sqlite3.Error, ApplianceError)

_GPU_READINGS = ("memory_used_mib", "utilization_gpu", "temperature_c", "power_w")


@dataclass
class SampleReport:
    """What one sample wrote, for the scheduler's log and the tests."""

    at: str
    gpus: int = 0
    space_rows: int = 0
    reason: str | None = None  # why nothing was sampled (no GPU, no driver)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return False  # a sample every few seconds is routine, never worth a log line


@dataclass
class DownsampleReport:
    """How many rows one pass deleted and averaged."""

    deleted: int = 0
    raw_averaged: int = 0  # raw rows replaced by ...
    five_minute_rows: int = 0  # ... these 5-minute averages
    five_minute_averaged: int = 0  # 5-minute rows replaced by ...
    hourly_rows: int = 0  # ... these hourly averages
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.deleted or self.raw_averaged or self.five_minute_averaged)


def _stamp(seconds: float) -> str:
    """Write a time as the store does (the rows compare and sort as text)."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _say(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ApplianceError) else str(exc)


def gpu_name(card: nvml.Gpu) -> str:
    """Name a GPU in the samples: its UUID, as allocations name it ("index:N" without one)."""
    return allocation.gpu_key(card) or f"index:{card.index}"


# -- sampling -----------------------------------------------------------------------------------


def _space_rows(ctx: spaces.Context, inventory: nvml.Inventory, at: str,
                report: SampleReport) -> list[dict[str, Any]]:
    try:
        per_gpu, _ = watchdog.attribute_by_gpu(ctx, inventory)
    except ApplianceError as exc:
        # The GPUs' own rows are still worth having; the next sample tries Podman again.
        report.errors.append(f"cannot attribute GPU memory to Spaces: {exc}")
        return []
    used_by = {(gpu_name(inventory.gpus[number]), space_id): used
               for number in sorted(per_gpu) for space_id, used in per_gpu[number].items()}
    # A Space that holds an allocation and no memory reads 0 now, not what it held last.
    present = {gpu_name(card) for card in inventory.gpus}
    for held in ctx.store.allocations():
        for uuid in held["gpu_uuids"]:
            if uuid in present:
                used_by.setdefault((uuid, held["space_id"]), 0)
    return [{"at": at, "gpu_uuid": uuid, "space_id": space_id, "resolution": RAW,
             "memory_used_mib": used, "utilization_gpu": None, "temperature_c": None,
             "power_w": None}
            for (uuid, space_id), used in sorted(used_by.items())]


def sample_once(ctx: spaces.Context, inventory: nvml.Inventory | None = None,
                now: float | None = None) -> SampleReport:
    """Read the GPUs once; store a row per GPU and per Space using it, at resolution 0."""
    now = time.time() if now is None else now
    report = SampleReport(at=_stamp(now))
    inventory = ctx.read_inventory() if inventory is None else inventory
    if not inventory.available or not inventory.gpus:
        report.reason = inventory.reason or "no GPU found"
        return report
    rows = [{"at": report.at, "gpu_uuid": gpu_name(card), "space_id": None,
             "resolution": RAW, **{name: getattr(card, name) for name in _GPU_READINGS}}
            for card in inventory.gpus]
    space_rows = _space_rows(ctx, inventory, report.at, report)
    try:
        ctx.store.add_gpu_samples(rows + space_rows)
    except FAILURES as exc:
        report.errors.append(f"cannot store the GPU samples: {_say(exc)}")
        return report
    report.gpus, report.space_rows = len(rows), len(space_rows)
    return report


# -- thinning out ---------------------------------------------------------------------------


def _floor(seconds: float, span: int) -> int:
    return int(seconds // span * span)


def downsample_once(ctx: spaces.Context, now: float | None = None) -> DownsampleReport:
    """Delete samples past telemetry_keep_days, average old raw rows to 5 minutes, and
    5-minute rows older than a week to hours. Running it again at once changes nothing."""
    now = time.time() if now is None else now
    config = ctx.config
    report = DownsampleReport()
    # Cut-offs fall on bucket boundaries, so a bucket is averaged whole, in one pass; the
    # hourly one never passes the raw one (a 5-minute row yet to come would split an hour).
    raw_before = _floor(now - config.telemetry_raw_hours * HOUR, FIVE_MINUTES)
    five_minute_before = _floor(min(now - FIVE_MINUTE_DAYS * DAY, raw_before), HOUR)
    try:
        report.deleted = ctx.store.delete_gpu_samples(_stamp(now - config.telemetry_keep_days
                                                             * DAY))
        report.raw_averaged, report.five_minute_rows = ctx.store.rollup_gpu_samples(
            RAW, FIVE_MINUTES, _stamp(raw_before))
        report.five_minute_averaged, report.hourly_rows = ctx.store.rollup_gpu_samples(
            FIVE_MINUTES, HOUR, _stamp(five_minute_before))
    except FAILURES as exc:
        # Each step is its own transaction: what is done stays done; the next pass does the
        # rest.
        report.errors.append(f"cannot thin out the GPU samples: {_say(exc)}")
    return report


# -- reading --------------------------------------------------------------------------------


def _since(hours: float, now: float | None) -> str:
    return _stamp((time.time() if now is None else now) - hours * HOUR)


def usage(ctx: spaces.Context, space_id: str, hours: float = 24,
          now: float | None = None) -> list[dict[str, Any]]:
    """Return the GPU memory the Space held over the last hours, oldest first.

    One row per GPU the Space used per sample time: averages over ``resolution`` seconds
    from ``at`` further back, raw samples (resolution 0) lately. A sample without a row for
    the Space means it held no memory then.
    """
    rows = ctx.store.gpu_samples(space_id=space_id, since=_since(hours, now))
    return [{"at": r["at"], "gpu_uuid": r["gpu_uuid"], "resolution": r["resolution"],
             "memory_used_mib": r["memory_used_mib"]} for r in rows]


def current_mib(ctx: spaces.Context, space: dict[str, Any], hours: float = 0.1) -> float | None:
    """Return the GPU memory the Space holds now, summed over its GPUs at the last sample.

    A Space that is not serving holds none, whatever its last sample said: it reads 0 the
    moment it stops. None: no sample in the last ``hours``.
    """
    if space["stage"] not in spaces.SERVING:
        return 0
    rows = usage(ctx, space["id"], hours)
    if not rows:
        return None
    last = rows[-1]["at"]
    readings = [r["memory_used_mib"] for r in rows if r["at"] == last]
    known = [value for value in readings if value is not None]
    return sum(known) if known else None


def history(ctx: spaces.Context, gpu_ref: str, hours: float = 24,
            now: float | None = None) -> list[dict[str, Any]]:
    """Return one GPU's readings over the last hours, oldest first (None: not supported).

    gpu_ref is its UUID or its index now; averages over ``resolution`` seconds from ``at``
    further back, raw samples (resolution 0) lately.
    """
    rows = ctx.store.gpu_samples(gpu_uuid=resolve_gpu(ctx, gpu_ref), since=_since(hours, now),
                                 whole_gpu=True)
    return [{"at": r["at"], "resolution": r["resolution"],
             **{name: r[name] for name in _GPU_READINGS}} for r in rows]


def resolve_gpu(ctx: spaces.Context, text: str) -> str:
    """Turn a GPU index ("0") or UUID into the name its samples carry."""
    if not text.isdigit():
        return text  # a UUID: a GPU taken out since still has its history
    inventory = ctx.read_inventory()
    for card in inventory.gpus:
        if card.index == int(text):
            return gpu_name(card)
    if not inventory.available:
        raise NotFound(f"Cannot find GPU {text}: {inventory.reason}",
                       hint="name the GPU by its UUID, or see 'appliance doctor'")
    raise NotFound(f"No GPU with index {text}", hint="see 'appliance gpus list'")
