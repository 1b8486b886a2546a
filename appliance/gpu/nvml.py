"""Read which NVIDIA GPUs this box has and how busy they are: NVML, or a Jetson's /proc and sysfs.

The only module that imports ``pynvml``. Every NVML failure becomes a ``None`` field, a
warning, or an ``Inventory(available=False, reason=...)``; none is ever raised.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pynvml

from ..adapters import host

log = logging.getLogger(__name__)

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
# Answers after which the NVML session is closed and opened afresh on the next read: the driver
# was reloaded or upgraded under us, or a GPU fell off the bus and may come back after a reset.
_REOPEN = frozenset({
    pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_RESET_REQUIRED,
})

# The process lists NVML keeps, newest call first: a driver lacks the newer ones (a _v3 came
# with R510, _v2 with R470); the last is the original call. A driver with none of a kind
# cannot show those processes, and the inventory says so rather than reading "no processes".
_PROCESS_CALLS = (
    ("compute", "processes", (
        "nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetComputeRunningProcesses")),
    ("graphics", "graphics processes", (
        "nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2",
        "nvmlDeviceGetGraphicsRunningProcesses")),
    # Under the CUDA MPS daemon the compute list shows its server; the clients (a Space's
    # processes) are listed here.
    ("mps", "MPS processes", (
        "nvmlDeviceGetMPSComputeRunningProcesses_v3",
        "nvmlDeviceGetMPSComputeRunningProcesses_v2",
        "nvmlDeviceGetMPSComputeRunningProcesses")),
)

# devfreq device names of Jetson iGPUs: 17000000.gpu (JetPack 6), 17000000.ga10b, .gv11b, ...
_JETSON_DEVFREQ = re.compile(r"\.(gpu|g[a-z]\d+b)$")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int | None
    # Which of NVML's lists named it: "compute", "graphics", "mps" (a CUDA MPS client), or
    # several joined by "+".
    kind: str = "compute"


@dataclass(frozen=True)
class MigDevice:
    index: int  # its slot: nvmlDeviceGetMigDeviceHandleByIndex, and the N in CDI's "GPU:N"
    uuid: str
    memory_total_mib: int | None
    # The processes on this MIG device, read through its own handle: in MIG mode the parent
    # GPU lists them only to root.
    processes: tuple[GpuProcess, ...] = ()
    # NVIDIA's name for it ("1g.10gb", "2g.20gb", "1c.3g.40gb", as root "1g.10gb+me"); None
    # when the driver cannot say, and then requests are matched by its memory alone.
    profile: str | None = None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


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

    def __init__(self, codes: set[int] | None = None) -> None:
        self.warnings: list[str] = []
        self.codes: set[int] = set() if codes is None else codes  # every failure's code

    def ask(self, what: str, function, *args, quiet: frozenset[int] = frozenset()) -> Any:
        return self.answer(what, function, *args, quiet=quiet)[0]

    def answer(
        self, what: str, function, *args, quiet: frozenset[int] = frozenset()
    ) -> tuple[Any, int | None]:
        """Return (value, None) or (None, the NVML error code)."""
        try:
            return function(*args), None
        except pynvml.NVMLError as err:
            self.codes.add(err.value)
            if err.value not in _ABSENT | quiet:
                self.warnings.append(f"{what}: {_describe(err)}")
            return None, err.value


# -- host files: Jetson detection and its fallbacks -------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


def is_jetson(root: Path = host.ROOT) -> bool:
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


class _ProcessInfo(ctypes.Structure):
    """nvmlProcessInfo_t (the _v2 and _v3 calls) as pynvml lays it out, without its
    per-field lookup hook."""

    _fields_ = pynvml.c_nvmlProcessInfo_v3_t._fields_


class _ProcessInfoV1(ctypes.Structure):
    """nvmlProcessInfo_v1_t, which the original calls (no suffix) fill."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


def _list_processes(function, layout, handle) -> list[tuple[int, int | None]]:
    """Return (pid, bytes used or None) of each process one NVML list call gives.

    The calls pynvml's wrappers make (one for the count, then one with room to spare for
    processes started in between), without their conversion of every entry to a friendly
    object: that conversion was most of a telemetry sample's CPU.
    """
    count = ctypes.c_uint(0)
    status = function(handle, ctypes.byref(count), None)
    if status == pynvml.NVML_SUCCESS:
        return []
    if status != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(status)
    count.value = count.value * 2 + 5
    entries = (layout * count.value)()
    status = function(handle, ctypes.byref(count), entries)
    if status != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(status)
    return [(entry.pid, None if entry.usedGpuMemory == _NOT_AVAILABLE else entry.usedGpuMemory)
            for entry in entries[:count.value]]


def _newest_call(name: str, handle) -> list[tuple[int, int | None]]:
    function = pynvml._nvmlGetFunctionPointer(name)  # FUNCTION_NOT_FOUND on older drivers
    layout = _ProcessInfo if name.endswith(("_v2", "_v3")) else _ProcessInfoV1
    return _list_processes(function, layout, handle)


def _processes(q: _Queries, handle, where: str = "") -> tuple[GpuProcess, ...]:
    """Read every process list of a GPU (or MIG device), newest call each driver has."""
    found: dict[int, GpuProcess] = {}
    blind = []
    for kind, what, names in _PROCESS_CALLS:
        for name in names:
            running, code = q.answer(
                f"{where}{what}", _newest_call, name, handle,
                quiet=frozenset({pynvml.NVML_ERROR_FUNCTION_NOT_FOUND}))
            if code != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                break
        else:
            blind.append(f"{names[0]} (nor _v2, nor v1)")
            continue
        for pid, used in running or []:
            seen = found.get(pid)
            if seen is None:
                found[pid] = GpuProcess(pid, _mib(used), kind)
            elif kind not in seen.kind.split("+"):
                found[pid] = GpuProcess(pid, seen.used_mib if seen.used_mib is not None
                                        else _mib(used), f"{seen.kind}+{kind}")
    if blind:
        q.warnings.append(
            f"{where}processes: this driver has no {', no '.join(blind)}: those processes "
            "cannot be seen, so the GPU watchdog cannot attribute or limit them "
            "(upgrade the NVIDIA driver)")
    return tuple(found.values())


def _merged(lists) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for processes in lists:
        for process in processes:
            found.setdefault(process.pid, process)
    return tuple(found.values())


# A MIG device's profile cannot change while its UUID lives, and reading one as root takes a
# score of calls: each is read once per process. Only names actually read are kept.
_profiles: dict[str, tuple[str, int | None, int | None]] = {}
# GPU instance profile names as NVML gives them ("MIG 1g.10gb+me") and as NVIDIA writes them.
_PROFILE_NAME = re.compile(r"(?:MIG\s+)?((?:\d+c\.)?\d+g\.\d+gb(?:[+-][a-z.,]+)?)")
# Variants a GPU instance profile's index (NVML_GPU_INSTANCE_PROFILE_*) marks, as NVIDIA's
# go-nvlib names them: media extensions added (+me), all of them (+me.all), none (-me), or
# graphics (+gfx). Used only where a driver's profile info has no name of its own.
_PROFILE_SUFFIX = {0x7: "+me", 0x8: "+me", 0xA: "+gfx", 0xB: "+gfx", 0xC: "+gfx",
                   0xD: "-me", 0xE: "-me", 0xF: "+me.all", 0x10: "+me.all", 0x11: "+gfx"}
_UNREADABLE_PROFILE = frozenset({pynvml.NVML_ERROR_NO_PERMISSION,
                                 pynvml.NVML_ERROR_INVALID_ARGUMENT})


def _memory_gb(memory_mb: int, parent_total_mib: int | None) -> int:
    """Return the "10" of "1g.10gb": NVIDIA's rule (go-nvlib's getMigMemorySizeGB) rounds the
    device's share of the GPU's memory up to an eighth, then scales the GPU's size in GB."""
    if not parent_total_mib:
        return math.ceil(memory_mb / 1024)
    eighths = math.ceil(memory_mb / parent_total_mib * 8 - 1e-9)
    return round(eighths / 8 * math.ceil(parent_total_mib / 1024))


def _gpu_instance_profile(q: _Queries, parent, instance_id: int, where: str,
                          parent_total_mib: int | None) -> str | None:
    """Name the profile of a GPU instance through its parent; None where this account may not
    (nvmlDeviceGetGpuInstanceById is for root) or the driver cannot."""
    instance = q.ask(f"{where} GPU instance", pynvml.nvmlDeviceGetGpuInstanceById, parent,
                     instance_id, quiet=_UNREADABLE_PROFILE)
    if instance is None:
        return None
    info = q.ask(f"{where} GPU instance info", pynvml.nvmlGpuInstanceGetInfo, instance)
    if info is None:
        return None
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        profile = q.ask(f"{where} profile {index}", pynvml.nvmlDeviceGetGpuInstanceProfileInfo,
                        parent, index, quiet=_UNREADABLE_PROFILE)
        if profile is None or profile.id != info.profileId:
            continue
        name = profile.name.decode(errors="replace") if isinstance(profile.name, bytes) \
            else str(profile.name)
        if found := _PROFILE_NAME.fullmatch(name.strip().lower()):
            return found[1]
        return (f"{profile.sliceCount}g.{_memory_gb(profile.memorySizeMB, parent_total_mib)}gb"
                f"{_PROFILE_SUFFIX.get(index, '')}")
    return None


def _mig_profile(q: _Queries, parent, mig, slot: int, uuid: str, memory_mib: int | None,
                 parent_total_mib: int | None) -> tuple[str | None, int | None, int | None]:
    """Return (profile name, GPU instance id, compute instance id) of a MIG device.

    Any account can read a MIG device's attributes (its slices and memory) and instance ids;
    only root can reach its GPU instance, whose profile also names the variant (+me). A driver
    that answers none leaves the name None, with a warning: requests are then matched by the
    device's memory, which cannot tell 1g.20gb from 2g.20gb.
    """
    if uuid and uuid in _profiles:
        return _profiles[uuid]
    where = f"MIG device {slot}"
    gpu_instance = q.ask(f"{where} GPU instance id", pynvml.nvmlDeviceGetGpuInstanceId, mig)
    compute_instance = q.ask(f"{where} compute instance id",
                             pynvml.nvmlDeviceGetComputeInstanceId, mig)
    attributes, code = q.answer(f"{where} attributes", pynvml.nvmlDeviceGetAttributes, mig)
    name = None if gpu_instance is None else _gpu_instance_profile(
        q, parent, gpu_instance, where, parent_total_mib)
    if attributes is not None and attributes.gpuInstanceSliceCount:
        slices = attributes.gpuInstanceSliceCount
        name = name or f"{slices}g.{_memory_gb(attributes.memorySizeMB, parent_total_mib)}gb"
        compute = attributes.computeInstanceSliceCount
        if compute and compute != slices:  # one of several compute instances of the GPU instance
            name = f"{compute}c.{name}"
    if name is None:
        why = ("this driver has no MIG profile calls (nvmlDeviceGetAttributes, "
               "nvmlDeviceGetGpuInstanceId; upgrade the NVIDIA driver)"
               if code == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND else
               "NVML gives no profile for it (nvmlDeviceGetAttributes answered "
               f"{'nothing' if code is None else code})")
        q.warnings.append(
            f"{where} profile: {why}: mig:PROFILE requests are matched by its memory alone "
            f"({memory_mib} MiB), which cannot tell profiles of equal memory apart (1g.20gb, "
            "2g.20gb)")
        return None, gpu_instance, compute_instance
    found = (name, gpu_instance, compute_instance)
    if uuid and len(_profiles) < 1000:
        _profiles[uuid] = found
    return found


def _mig_devices(q: _Queries, handle, parent_total_mib: int | None) -> tuple[MigDevice, ...]:
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
        total = None if memory is None else _mib(memory.total)
        profile, gpu_instance, compute_instance = _mig_profile(
            q, handle, mig, slot, uuid, total, parent_total_mib)
        found.append(MigDevice(slot, uuid, total, _processes(q, mig, f"MIG device {slot} "),
                               profile, gpu_instance, compute_instance))
    return tuple(found)


def _read_gpu(index: int, handle, root: Path, on_jetson: bool, codes: set[int]) -> Gpu:
    q = _Queries(codes)
    name = q.ask("name", pynvml.nvmlDeviceGetName, handle)
    uuid = q.ask("UUID", pynvml.nvmlDeviceGetUUID, handle) or ""
    memory, memory_code = _memory(q, handle)
    total, used, free = (None, None, None) if memory is None else (
        _mib(memory.total), _mib(memory.used), _mib(memory.free)
    )
    utilization = q.ask("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
    util_gpu = None if utilization is None else utilization.gpu
    util_memory = None if utilization is None else utilization.memory
    # NVML on JetPack 6 names the iGPU "Orin (nvgpu)" and cannot size its memory: it is the
    # system RAM. The name alone tells a Jetson where its L4T files are out of sight (a
    # container without /etc/nv_tegra_release or /proc/device-tree).
    jetson = "(nvgpu)" in (name or "") or (
        on_jetson and memory_code == pynvml.NVML_ERROR_NOT_SUPPORTED)
    if jetson and memory is None:
        total, used, free = _meminfo(root)
    if jetson:
        name = name or _jetson_model(root)
        if util_gpu is None:
            util_gpu = _jetson_load(root)
    temperature = q.ask(
        "temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
    )
    power_mw = q.ask("power", pynvml.nvmlDeviceGetPowerUsage, handle)
    mode = q.ask("MIG mode", pynvml.nvmlDeviceGetMigMode, handle)
    mig_enabled = mode is not None and mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    mig_devices = _mig_devices(q, handle, total) if mig_enabled else ()
    # In MIG mode the parent lists processes to root only; each MIG device lists its own.
    processes = (_merged(m.processes for m in mig_devices) if mig_enabled
                 else _processes(q, handle))
    return Gpu(
        index=index, uuid=uuid, name=name or "",
        memory_total_mib=total, memory_used_mib=used, memory_free_mib=free,
        utilization_gpu=util_gpu, utilization_memory=util_memory,
        temperature_c=temperature, power_w=None if power_mw is None else power_mw / 1000,
        mig_enabled=mig_enabled, mig_devices=mig_devices,
        processes=processes, jetson=jetson, warnings=tuple(q.warnings),
    )


def _cuda_version(number: int | None) -> str | None:
    """Return CUDA's "12.4" for NVML's 12040."""
    return None if number is None else f"{number // 1000}.{number % 1000 // 10}"


def _read_nvml(root: Path, on_jetson: bool) -> tuple[Inventory, set[int]]:
    """Read every GPU; return the inventory and the codes of the calls that failed."""
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as err:
        reason = f"NVML could not count the GPUs: {_describe(err)}"
        return Inventory(available=False, reason=reason), {err.value} | _REOPEN
    q = _Queries()
    driver = q.ask("driver version", pynvml.nvmlSystemGetDriverVersion)
    cuda = _cuda_version(q.ask("CUDA version", pynvml.nvmlSystemGetCudaDriverVersion_v2))
    gpus = []
    for index in range(count):
        handle = q.ask(f"GPU {index}", pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is not None:
            gpus.append(_read_gpu(index, handle, root, on_jetson, q.codes))
    if driver is None and (on_jetson or any(gpu.jetson for gpu in gpus)):
        driver = _l4t_release(root)  # a Jetson's driver is its L4T release
    inventory = Inventory(
        available=True, driver_version=driver, cuda_version=cuda, gpus=tuple(gpus),
        warnings=tuple(q.warnings),
    )
    return inventory, q.codes


# One NVML session per process, opened at the first read and kept: opening one costs more
# than a whole reading, and telemetry reads every few seconds. After a driver error it is
# closed, and the next read opens a fresh one. A forked child opens its own.
_session_lock = threading.Lock()
_session_pid: int | None = None
_logged: set[str] = set()


def _close_session() -> None:
    global _session_pid
    _session_pid = None
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass  # the session is dropped either way; the next read opens a new one


def _log_new(inventory: Inventory) -> None:
    """Log each warning once per process: telemetry reads every few seconds."""
    found = list(inventory.warnings) + [w for gpu in inventory.gpus for w in gpu.warnings]
    for warning in found:
        if warning not in _logged and len(_logged) < 1000:
            _logged.add(warning)
            log.warning("NVML: %s", warning)


def read_inventory(root: Path = host.ROOT) -> Inventory:
    """Describe the GPUs and their use now; never raise (a box without any says why)."""
    global _session_pid
    on_jetson = is_jetson(root)
    with _session_lock:
        if _session_pid != os.getpid():
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as err:
                reason = _WHY_UNAVAILABLE.get(err.value, f"NVML failed to start: {_describe(err)}")
                if on_jetson:  # JetPack before 6 has no NVML: that alone is no cause for a warning
                    missing = err.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
                    return _jetson_without_nvml(root, () if missing else (reason,))
                return Inventory(available=False, reason=reason)
            _session_pid = os.getpid()
        inventory, codes = _read_nvml(root, on_jetson)
        if codes & _REOPEN:
            _close_session()
    _log_new(inventory)
    return inventory
