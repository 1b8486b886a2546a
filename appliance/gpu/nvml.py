"""Read which NVIDIA GPUs this box has and how busy they are: NVML, or a Jetson's /proc and sysfs.

The only module that imports ``pynvml``. Every NVML failure becomes a ``None`` field, a
warning, or an ``Inventory(available=False, reason=...)``; none is ever raised.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pynvml

from ..adapters import host

MIB = 1024 * 1024
# What NVML reports as a process's memory when it cannot know it (WDDM on Windows, MPS).
_NOT_AVAILABLE = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value

# Answers that mean "this device or driver has no such reading" (a Jetson's shared memory, a
# card without a power sensor, a driver older than the call): the field is unknown, not wrong.
_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})

_WHY_UNAVAILABLE = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "no NVIDIA driver (libnvidia-ml.so.1 not found)",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
        "NVIDIA driver not loaded (libnvidia-ml.so.1 is installed but the nvidia kernel module "
        "is not running; check 'nvidia-smi' and 'lsmod | grep nvidia')"
    ),
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission to open the NVIDIA devices (/dev/nvidia*)",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "NVIDIA driver and libnvidia-ml.so.1 versions differ (reboot after a driver upgrade)"
    ),
}

# Where L4T exposes the iGPU's devfreq load, in per-mille: Xavier/TX2, then Orin (JetPack 5).
_JETSON_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
# devfreq device names of Jetson iGPUs: 17000000.gpu (JetPack 6), 17000000.ga10b, .gv11b, ...
_JETSON_DEVFREQ = re.compile(r"\.(gpu|g[a-z]\d+b)$")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int | None


@dataclass(frozen=True)
class MigDevice:
    index: int
    uuid: str
    memory_total_mib: int | None


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    utilization_gpu: int | None
    utilization_memory: int | None
    temperature_c: int | None
    power_w: float | None
    mig_enabled: bool
    mig_devices: tuple[MigDevice, ...]
    processes: tuple[GpuProcess, ...]
    # A Jetson's integrated GPU: its memory is the system RAM, read from /proc/meminfo.
    jetson: bool
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inventory:
    available: bool
    reason: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: tuple[Gpu, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Return the inventory as plain JSON-ready data (lists, dicts, numbers, strings)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _describe(err: pynvml.NVMLError) -> str:
    return f"{err} (NVML error {err.value})"


class _Queries:
    """Call NVML, turning each failure into None plus (unless it is merely absent) a warning."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def ask(self, what: str, function, *args, quiet: frozenset[int] = frozenset()) -> Any:
        return self.answer(what, function, *args, quiet=quiet)[0]

    def answer(
        self, what: str, function, *args, quiet: frozenset[int] = frozenset()
    ) -> tuple[Any, int | None]:
        """Return (value, None) or (None, the NVML error code)."""
        try:
            return function(*args), None
        except pynvml.NVMLError as err:
            if err.value not in _ABSENT | quiet:
                self.warnings.append(f"{what}: {_describe(err)}")
            return None, err.value


# -- host files: Jetson detection and its fallbacks -------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


def _is_jetson(root: Path) -> bool:
    """Tell whether this is a Jetson (L4T release file or a Tegra/Orin device tree)."""
    if host.is_jetson(root):
        return True
    compatible = _read(root / "proc/device-tree/compatible") or ""
    return "nvidia,tegra" in compatible or "nvidia,orin" in compatible


def _jetson_model(root: Path) -> str | None:
    model = (_read(root / "proc/device-tree/model") or "").strip("\0 \n")
    return model or None


def _l4t_release(root: Path) -> str | None:
    """Return e.g. "L4T R36.3.0" from /etc/nv_tegra_release: a Jetson's driver is its BSP."""
    text = _read(root / "etc/nv_tegra_release") or ""
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"L4T R{found[1]}.{found[2]}" if found else None


def _meminfo(root: Path) -> tuple[int | None, int | None, int | None]:
    """Return (total, used, free) MiB of system RAM, which a Jetson's iGPU shares."""
    fields = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        if rest.split() and rest.split()[0].isdigit():
            fields[name] = int(rest.split()[0]) // 1024  # kB
    total, free = fields.get("MemTotal"), fields.get("MemAvailable")
    if total is None or free is None:
        return total, None, None
    return total, total - free, free


def _jetson_load(root: Path) -> int | None:
    """Return the iGPU's load in percent from devfreq (which counts in per-mille)."""
    devfreq = root / "sys/class/devfreq"
    candidates = [root / path for path in _JETSON_LOAD_FILES]
    if devfreq.is_dir():
        candidates += [
            entry / "device/load"
            for entry in sorted(devfreq.iterdir())
            if _JETSON_DEVFREQ.search(entry.name)
        ]
    for path in candidates:
        text = (_read(path) or "").strip()
        if text.isdigit():
            return round(int(text) / 10)
    return None


def _jetson_without_nvml(root: Path, warnings: tuple[str, ...] = ()) -> Inventory:
    """Describe a Jetson's iGPU from /proc and sysfs alone (JetPack before 6 has no NVML)."""
    total, used, free = _meminfo(root)
    gpu = Gpu(
        index=0, uuid="", name=_jetson_model(root) or "Jetson GPU",
        memory_total_mib=total, memory_used_mib=used, memory_free_mib=free,
        utilization_gpu=_jetson_load(root), utilization_memory=None,
        temperature_c=None, power_w=None, mig_enabled=False, mig_devices=(), processes=(),
        jetson=True,
    )
    return Inventory(
        available=True, driver_version=_l4t_release(root), gpus=(gpu,), warnings=warnings
    )


# -- NVML ----------------------------------------------------------------------------------


def _memory(q: _Queries, handle) -> tuple[Any, int | None]:
    """Return NVML's memory info (v2, or v1 on drivers without it) and the error code if any."""
    info, code = q.answer(
        "memory", pynvml.nvmlDeviceGetMemoryInfo, handle, pynvml.nvmlMemory_v2,
        quiet=frozenset({pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH}),
    )
    if code in (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH):
        info, code = q.answer("memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
    return info, code


def _mib(value: int | None) -> int | None:
    return None if value is None else value // MIB


def _mig_devices(q: _Queries, handle) -> tuple[MigDevice, ...]:
    found = []
    slots = q.ask("MIG device count", pynvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
    for slot in range(slots):
        mig = q.ask(
            f"MIG device {slot}", pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot,
            quiet=frozenset({pynvml.NVML_ERROR_NOT_FOUND}),  # an empty slot
        )
        if mig is None:
            continue
        uuid = q.ask(f"MIG device {slot} UUID", pynvml.nvmlDeviceGetUUID, mig) or ""
        memory, _ = _memory(q, mig)
        found.append(MigDevice(slot, uuid, None if memory is None else _mib(memory.total)))
    return tuple(found)


class _ProcessInfo(ctypes.Structure):
    """nvmlProcessInfo_v3_t as pynvml lays it out, without its per-field lookup hook."""

    _fields_ = pynvml.c_nvmlProcessInfo_v3_t._fields_


def _compute_processes(handle) -> list[tuple[int, int | None]]:
    """Return (pid, bytes used or None) of each compute process on a GPU; NVMLError on failure.

    The calls pynvml.nvmlDeviceGetComputeRunningProcesses_v3 makes (one for the count, then
    one with room to spare for processes started in between), without its conversion of every
    entry to a friendly object: that conversion was most of a telemetry sample's CPU.
    """
    function = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses_v3")
    count = ctypes.c_uint(0)
    status = function(handle, ctypes.byref(count), None)
    if status == pynvml.NVML_SUCCESS:
        return []
    if status != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(status)
    count.value = count.value * 2 + 5
    entries = (_ProcessInfo * count.value)()
    status = function(handle, ctypes.byref(count), entries)
    if status != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(status)
    return [(entry.pid, None if entry.usedGpuMemory == _NOT_AVAILABLE else entry.usedGpuMemory)
            for entry in entries[:count.value]]


def _processes(q: _Queries, handle) -> tuple[GpuProcess, ...]:
    running = q.ask("processes", _compute_processes, handle) or []
    return tuple(GpuProcess(pid, _mib(used)) for pid, used in running)


def _read_gpu(index: int, handle, root: Path, on_jetson: bool) -> Gpu:
    q = _Queries()
    name = q.ask("name", pynvml.nvmlDeviceGetName, handle)
    uuid = q.ask("UUID", pynvml.nvmlDeviceGetUUID, handle) or ""
    memory, memory_code = _memory(q, handle)
    total, used, free = (None, None, None) if memory is None else (
        _mib(memory.total), _mib(memory.used), _mib(memory.free)
    )
    utilization = q.ask("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
    util_gpu = None if utilization is None else utilization.gpu
    util_memory = None if utilization is None else utilization.memory
    # NVML on JetPack 6 cannot size the iGPU's memory: it is the system RAM.
    jetson = on_jetson and memory_code == pynvml.NVML_ERROR_NOT_SUPPORTED
    if jetson:
        total, used, free = _meminfo(root)
        name = name or _jetson_model(root)
        if util_gpu is None:
            util_gpu = _jetson_load(root)
    temperature = q.ask(
        "temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
    )
    power_mw = q.ask("power", pynvml.nvmlDeviceGetPowerUsage, handle)
    mode = q.ask("MIG mode", pynvml.nvmlDeviceGetMigMode, handle)
    mig_enabled = mode is not None and mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    return Gpu(
        index=index, uuid=uuid, name=name or "",
        memory_total_mib=total, memory_used_mib=used, memory_free_mib=free,
        utilization_gpu=util_gpu, utilization_memory=util_memory,
        temperature_c=temperature, power_w=None if power_mw is None else power_mw / 1000,
        mig_enabled=mig_enabled,
        mig_devices=_mig_devices(q, handle) if mig_enabled else (),
        processes=_processes(q, handle), jetson=jetson, warnings=tuple(q.warnings),
    )


def _cuda_version(number: int | None) -> str | None:
    """Return CUDA's "12.4" for NVML's 12040."""
    return None if number is None else f"{number // 1000}.{number % 1000 // 10}"


def _read_nvml(root: Path, on_jetson: bool) -> Inventory:
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as err:
        return Inventory(available=False, reason=f"NVML could not count the GPUs: {_describe(err)}")
    q = _Queries()
    driver = q.ask("driver version", pynvml.nvmlSystemGetDriverVersion)
    if driver is None and on_jetson:
        driver = _l4t_release(root)
    cuda = _cuda_version(q.ask("CUDA version", pynvml.nvmlSystemGetCudaDriverVersion_v2))
    gpus = []
    for index in range(count):
        handle = q.ask(f"GPU {index}", pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is not None:
            gpus.append(_read_gpu(index, handle, root, on_jetson))
    return Inventory(
        available=True, driver_version=driver, cuda_version=cuda, gpus=tuple(gpus),
        warnings=tuple(q.warnings),
    )


def read_inventory(root: Path = host.ROOT) -> Inventory:
    """Describe the GPUs and their use now; never raise (a box without any says why)."""
    on_jetson = _is_jetson(root)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        reason = _WHY_UNAVAILABLE.get(err.value, f"NVML failed to start: {_describe(err)}")
        if on_jetson:  # JetPack before 6 ships no NVML: that alone is no cause for a warning
            missing = err.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
            return _jetson_without_nvml(root, () if missing else (reason,))
        return Inventory(available=False, reason=reason)
    try:
        return _read_nvml(root, on_jetson)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # the reading is done; a failed release changes nothing the caller can use
