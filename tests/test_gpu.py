"""GPU inventory through the real nvidia-ml-py, against a fake libnvidia-ml.so.1 and fake roots.

pynvml dlopens libnvidia-ml.so.1 once per process, so each read runs in a child Python whose
LD_LIBRARY_PATH names the compiled fake (tests/nvml_fake) and FAKE_NVML_CONFIG its config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

READ = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from appliance.gpu.nvml import read_inventory\n"
    "print(json.dumps(read_inventory(Path(sys.argv[1])).to_dict()))\n"
)

A100 = 'name="NVIDIA A100-SXM4-40GB" mem_total_mib=40960 util_gpu=12 temp_c=41 power_mw=62000'

# Recorded from a Jetson AGX Orin 64GB on JetPack 6.0 (L4T R36.3.0).
ORIN_MEMINFO = """\
MemTotal:       64335836 kB
MemFree:        58163452 kB
MemAvailable:   60398472 kB
Buffers:           30164 kB
Cached:          2573236 kB
"""
ORIN_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
    "DATE: Mon May  6 17:34:21 UTC 2024\n"
)
ORIN_MODEL = "NVIDIA Jetson AGX Orin Developer Kit\0"
ORIN_COMPATIBLE = "nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0"


def run_python(lib_dir: Path, config: Path, code: str, *args: str) -> str:
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir), "FAKE_NVML_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def read(lib_dir: Path, tmp_path: Path, config: str | None, root: Path | None = None) -> dict:
    """Read the inventory in a child process; config None leaves FAKE_NVML_CONFIG missing."""
    config_file = tmp_path / "nvml.conf"
    if config is not None:
        config_file.write_text(config)
    if root is None:
        root = tmp_path / "root"  # not a Jetson: no /etc/nv_tegra_release, no device tree
        root.mkdir(exist_ok=True)
    return json.loads(run_python(lib_dir, config_file, READ, str(root)))


def without_nvml(tmp_path: Path) -> Path:
    """Return an empty library directory; skip where the loader would find a real NVML anyway."""
    empty = tmp_path / "no-nvml"
    empty.mkdir()
    probe = "import ctypes; ctypes.CDLL('libnvidia-ml.so.1')"
    env = {**os.environ, "LD_LIBRARY_PATH": str(empty)}
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0:
        pytest.skip("this box has a real libnvidia-ml.so.1 on its loader path")
    return empty


def jetson_root(tmp_path: Path, load: str | None = "347\n") -> Path:
    root = tmp_path / "jetson"
    files = {
        "etc/nv_tegra_release": ORIN_RELEASE,
        "proc/meminfo": ORIN_MEMINFO,
        "proc/device-tree/model": ORIN_MODEL,
        "proc/device-tree/compatible": ORIN_COMPATIBLE,
    }
    if load is not None:
        files["sys/class/devfreq/17000000.gpu/device/load"] = load
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "sys/class/devfreq/3d00000.pcie").mkdir(parents=True)  # not the GPU: ignored
    return root


def test_two_gpus_are_listed_with_telemetry_and_processes(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
driver 550.54.15
cuda 12040
gpu index=0 {A100} uuid=GPU-aaaa mem_used_mib=1024 mem_reserved_mib=300 util_mem=3 mig=0
gpu index=1 name="NVIDIA L4" uuid=GPU-bbbb mem_total_mib=23034 mem_used_mib=0 util_gpu=0 \
temp_c=30 power_mw=16500
process gpu=0 pid=1234 used_mib=512
process gpu=0 pid=1300
process gpu=1 pid=4321 used_mib=2048
""")
    assert inventory["available"] is True
    assert inventory["reason"] is None
    assert (inventory["driver_version"], inventory["cuda_version"]) == ("550.54.15", "12.4")
    first, second = inventory["gpus"]
    assert first == {
        "index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA A100-SXM4-40GB",
        "memory_total_mib": 40960, "memory_used_mib": 1024, "memory_free_mib": 40960 - 1324,
        "utilization_gpu": 12, "utilization_memory": 3, "temperature_c": 41, "power_w": 62.0,
        "mig_enabled": False, "mig_devices": [],
        "processes": [{"pid": 1234, "used_mib": 512, "kind": "compute"},
                      {"pid": 1300, "used_mib": None, "kind": "compute"}],
        "jetson": False, "warnings": [],
    }
    assert (second["name"], second["uuid"], second["power_w"]) == ("NVIDIA L4", "GPU-bbbb", 16.5)
    assert second["processes"] == [{"pid": 4321, "used_mib": 2048, "kind": "compute"}]
    assert inventory["warnings"] == []


def test_mig_enabled_gpu_lists_its_mig_devices(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100} uuid=GPU-aaaa mig=1
mig parent=0 index=0 uuid=MIG-0000 profile=2g.20gb gi=3
mig parent=0 index=2 uuid=MIG-2222 profile=1g.10gb gi=9 mem_total_mib=9856 mem_used_mib=13
""")
    gpu = inventory["gpus"][0]
    assert gpu["mig_enabled"] is True
    assert gpu["mig_devices"] == [
        {"index": 0, "uuid": "MIG-0000", "memory_total_mib": 19968, "processes": [],
         "profile": "2g.20gb", "gpu_instance_id": 3, "compute_instance_id": 0},
        {"index": 2, "uuid": "MIG-2222", "memory_total_mib": 9856, "processes": [],
         "profile": "1g.10gb", "gpu_instance_id": 9, "compute_instance_id": 0},
    ]
    # NVML gives no whole-GPU utilisation in MIG mode; empty slots are not failures.
    assert gpu["utilization_gpu"] is None
    assert gpu["warnings"] == []


def test_gpu_capable_of_mig_but_not_in_mig_mode_lists_no_mig_devices(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"gpu index=0 {A100} mig=0\n")
    assert inventory["gpus"][0]["mig_enabled"] is False
    assert inventory["gpus"][0]["mig_devices"] == []


def test_power_reading_not_supported_is_none_without_a_warning(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100}
error nvmlDeviceGetPowerUsage NVML_ERROR_NOT_SUPPORTED
""")
    gpu = inventory["gpus"][0]
    assert gpu["power_w"] is None
    assert gpu["temperature_c"] == 41
    assert gpu["warnings"] == []


def test_unknown_error_on_one_gpus_temperature_is_none_and_a_warning(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100}
gpu index=1 {A100}
error nvmlDeviceGetTemperature NVML_ERROR_UNKNOWN gpu=1
""")
    first, second = inventory["gpus"]
    assert first["temperature_c"] == 41 and first["warnings"] == []
    assert second["temperature_c"] is None
    assert second["warnings"] == ["temperature: Unknown Error (NVML error 999)"]
    assert second["power_w"] == 62.0


def test_lost_gpu_is_left_out_with_a_warning(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100}
gpu index=1 {A100}
error nvmlDeviceGetHandleByIndex_v2 NVML_ERROR_GPU_IS_LOST gpu=1
""")
    assert [gpu["index"] for gpu in inventory["gpus"]] == [0]
    assert inventory["warnings"] == ["GPU 1: GPU is lost (NVML error 15)"]


def test_driver_without_memory_info_v2_falls_back_to_v1(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100} mem_used_mib=1024 mem_reserved_mib=300
error nvmlDeviceGetMemoryInfo_v2 NVML_ERROR_FUNCTION_NOT_FOUND
""")
    gpu = inventory["gpus"][0]
    # Version 1 counts the driver's reserved memory as used.
    assert (gpu["memory_used_mib"], gpu["memory_free_mib"]) == (1324, 40960 - 1324)
    assert gpu["warnings"] == []


def test_gpu_with_more_than_64_processes_lists_them_all(fake_nvml, tmp_path):
    processes = "".join(f"process gpu=0 pid={1000 + n} used_mib={n}\n" for n in range(150))
    inventory = read(fake_nvml, tmp_path, f"gpu index=0 {A100}\n" + processes)
    listed = inventory["gpus"][0]["processes"]
    assert [p["pid"] for p in listed] == list(range(1000, 1150))
    assert listed[149] == {"pid": 1149, "used_mib": 149, "kind": "compute"}


def test_process_list_refused_is_empty_with_a_warning_and_the_rest_read(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100}
process gpu=0 pid=1234 used_mib=512
error nvmlDeviceGetComputeRunningProcesses_v3 NVML_ERROR_NO_PERMISSION
""")
    gpu = inventory["gpus"][0]
    assert gpu["processes"] == []
    assert gpu["warnings"] == ["processes: Insufficient Permissions (NVML error 4)"]
    assert gpu["temperature_c"] == 41


def test_box_without_nvml_library_is_unavailable_with_the_reason(tmp_path):
    inventory = read(without_nvml(tmp_path), tmp_path, "gpu index=0\n")
    assert inventory == {
        "available": False, "reason": "no NVIDIA driver (libnvidia-ml.so.1 not found)",
        "driver_version": None, "cuda_version": None, "gpus": [], "warnings": [],
    }


@pytest.mark.parametrize("config", [
    "driver 550.54.15\ngpu index=0\nerror nvmlInit_v2 NVML_ERROR_DRIVER_NOT_LOADED\n",
    None,  # the library answers without a driver behind it
])
def test_driver_not_loaded_makes_the_inventory_unavailable(fake_nvml, tmp_path, config):
    inventory = read(fake_nvml, tmp_path, config)
    assert inventory["available"] is False
    assert inventory["gpus"] == []
    assert inventory["reason"].startswith("NVIDIA driver not loaded")


def test_gpu_count_failure_makes_the_inventory_unavailable(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, "gpu index=0\nerror nvmlDeviceGetCount_v2 999\n")
    assert inventory["available"] is False
    assert inventory["reason"] == "NVML could not count the GPUs: Unknown Error (NVML error 999)"


def test_other_init_failure_is_reported_in_the_reason(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, "error nvmlInitWithFlags NVML_ERROR_UNKNOWN\n")
    assert inventory["available"] is False
    assert inventory["reason"] == "NVML failed to start: Unknown Error (NVML error 999)"


def test_jetson_on_jetpack_6_takes_memory_from_meminfo_and_load_from_devfreq(
    fake_nvml, tmp_path
):
    root = jetson_root(tmp_path)
    inventory = read(fake_nvml, tmp_path, """
cuda 12020
jetson
gpu index=0 uuid=6a8e4f3b-5c1d-5e2f-8a9b-0c1d2e3f4a5b
""", root)
    assert inventory["available"] is True
    # NVML on JetPack 6 reports no driver version; the L4T release is the driver.
    assert (inventory["driver_version"], inventory["cuda_version"]) == ("L4T R36.3.0", "12.2")
    total, available = 64335836 // 1024, 60398472 // 1024
    assert inventory["gpus"] == [{
        "index": 0, "uuid": "6a8e4f3b-5c1d-5e2f-8a9b-0c1d2e3f4a5b", "name": "Orin (nvgpu)",
        "memory_total_mib": total, "memory_used_mib": total - available,
        "memory_free_mib": available, "utilization_gpu": 35, "utilization_memory": None,
        "temperature_c": None, "power_w": None, "mig_enabled": False, "mig_devices": [],
        "processes": [], "jetson": True, "warnings": [],
    }]


def test_jetson_without_nvml_is_read_from_sysfs_alone(tmp_path):
    empty = without_nvml(tmp_path)
    root = tmp_path / "jetson"
    for name, text in {
        "etc/nv_tegra_release": ORIN_RELEASE.replace("R36", "R35").replace("3.0", "4.1"),
        "proc/meminfo": ORIN_MEMINFO,
        "proc/device-tree/model": ORIN_MODEL,
        "sys/devices/platform/gpu.0/load": "1000\n",  # JetPack 5 on Orin
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    inventory = read(empty, tmp_path, None, root)
    assert inventory["available"] is True
    assert inventory["driver_version"] == "L4T R35.4.1"
    [gpu] = inventory["gpus"]
    assert gpu["name"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert (gpu["uuid"], gpu["jetson"], gpu["utilization_gpu"]) == ("", True, 100)
    assert gpu["memory_total_mib"] == 64335836 // 1024
    assert inventory["warnings"] == []


def test_jetson_whose_nvml_fails_is_read_from_sysfs_with_a_warning(fake_nvml, tmp_path):
    root = jetson_root(tmp_path)
    config = "error nvmlInitWithFlags NVML_ERROR_NO_PERMISSION\n"
    inventory = read(fake_nvml, tmp_path, config, root)
    assert inventory["available"] is True
    assert inventory["gpus"][0]["utilization_gpu"] == 35
    assert inventory["warnings"] == ["no permission to open the NVIDIA devices (/dev/nvidia*)"]


def test_jetson_detected_by_device_tree_alone_without_a_load_file(fake_nvml, tmp_path):
    root = jetson_root(tmp_path, load=None)
    (root / "etc/nv_tegra_release").unlink()
    inventory = read(fake_nvml, tmp_path, "jetson\ngpu index=0\n", root)
    [gpu] = inventory["gpus"]
    assert gpu["jetson"] is True
    assert gpu["memory_free_mib"] == 60398472 // 1024
    assert gpu["utilization_gpu"] is None
    assert inventory["driver_version"] is None


def test_each_read_sees_the_gpus_as_they_are_now(fake_nvml, tmp_path):
    config = tmp_path / "nvml.conf"
    config.write_text(f"gpu index=0 {A100}\n")
    code = READ.replace(
        "print(json.dumps(read_inventory(Path(sys.argv[1])).to_dict()))\n",
        "first = read_inventory(Path(sys.argv[1]))\n"
        "Path(sys.argv[2]).write_text(Path(sys.argv[2]).read_text() + 'process gpu=0 pid=7\\n')\n"
        "second = read_inventory(Path(sys.argv[1]))\n"
        "print(json.dumps([first.to_dict(), second.to_dict()]))\n",
    )
    first, second = json.loads(run_python(fake_nvml, config, code, str(tmp_path), str(config)))
    assert first["gpus"][0]["processes"] == []
    assert second["gpus"][0]["processes"] == [{"pid": 7, "used_mib": None, "kind": "compute"}]


def test_gpus_list_command_prints_the_fake_inventory(fake_nvml, tmp_path):
    config = tmp_path / "nvml.conf"
    config.write_text(
        "driver 550.54.15\ncuda 12040\n"
        'gpu index=0 name="NVIDIA L4" uuid=GPU-aaaa mem_total_mib=23034 mem_used_mib=512 '
        "util_gpu=7 util_mem=1 temp_c=40 power_mw=16000 mig=0\n"
        "process gpu=0 pid=4242 used_mib=500\n")
    code = "from appliance.cli.main import cli; cli(obj={})"
    text = run_python(fake_nvml, config, code, "gpus", "list")
    assert "driver 550.54.15, CUDA 12.4" in text
    assert "NVIDIA L4" in text and "512/23034 MiB" in text and "1 processes" in text
    shown = json.loads(run_python(fake_nvml, config, code, "gpus", "show", "0", "--json"))
    assert shown["processes"] == [{"pid": 4242, "used_mib": 500, "kind": "compute"}]
