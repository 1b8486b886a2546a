"""NVML reads that must never be silent: older drivers' process calls, graphics and MPS
clients, MIG devices' own process lists, one NVML session per process, and a Jetson told
by NVML itself. Each read runs in a child Python against the fake libnvidia-ml.so.1, built
here in the variants an older driver has (tests/nvml_fake/README.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FAKE_NVML_SOURCE
from test_gpu import A100, ORIN_MEMINFO, read, run_python

from appliance.gpu import nvml

PROCESSES = """
gpu index=0 {A100} uuid=GPU-aaaa
process gpu=0 pid=1234 used_mib=512
process gpu=0 pid=1300
"""


def build(into: Path, *defines: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to compile the fake NVML: apt-get install gcc")
    into.mkdir(parents=True, exist_ok=True)
    flags = [f"-D{name}" for name in defines]
    done = subprocess.run([gcc, "-shared", "-fPIC", *flags, "-o",
                           str(into / "libnvidia-ml.so.1"), str(FAKE_NVML_SOURCE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return into


@pytest.fixture(scope="module")
def older_drivers(tmp_path_factory) -> dict[str, Path]:
    """Fake NVMLs as older drivers: without the _v3 process calls, without _v3 and _v2,
    and without any."""
    root = tmp_path_factory.mktemp("older-nvml")
    return {
        "v2": build(root / "v2", "FAKE_NVML_NO_V3"),
        "v1": build(root / "v1", "FAKE_NVML_NO_V3", "FAKE_NVML_NO_V2"),
        "none": build(root / "none", "FAKE_NVML_NO_V3", "FAKE_NVML_NO_V2", "FAKE_NVML_NO_V1"),
    }


@pytest.mark.parametrize("driver", ["v2", "v1"])
def test_a_driver_without_the_newest_process_call_is_read_with_the_one_it_has(
        older_drivers, tmp_path, driver):
    inventory = read(older_drivers[driver], tmp_path, PROCESSES.format(A100=A100))
    gpu = inventory["gpus"][0]
    assert gpu["processes"] == [{"pid": 1234, "used_mib": 512, "kind": "compute"},
                                {"pid": 1300, "used_mib": None, "kind": "compute"}]
    assert gpu["warnings"] == []


def test_a_driver_with_no_process_call_at_all_says_the_watchdog_is_blind(older_drivers,
                                                                         tmp_path):
    inventory = read(older_drivers["none"], tmp_path, PROCESSES.format(A100=A100))
    gpu = inventory["gpus"][0]
    assert gpu["processes"] == []
    [warning] = gpu["warnings"]
    assert warning.startswith(
        "processes: this driver has no nvmlDeviceGetComputeRunningProcesses_v3 (nor _v2, nor "
        "v1), no nvmlDeviceGetGraphicsRunningProcesses_v3 (nor _v2, nor v1), no "
        "nvmlDeviceGetMPSComputeRunningProcesses_v3 (nor _v2, nor v1)")
    assert "the GPU watchdog cannot attribute or limit them" in warning


def test_gpus_show_prints_the_warning_of_a_blind_driver(older_drivers, tmp_path):
    config = tmp_path / "nvml.conf"
    config.write_text(PROCESSES.format(A100=A100))
    code = "from appliance.cli.main import cli; cli(obj={})"
    shown = json.loads(run_python(older_drivers["none"], config, code, "gpus", "show", "0",
                                  "--json"))
    assert "this driver has no nvmlDeviceGetComputeRunningProcesses_v3" in shown["warnings"][0]


def test_graphics_processes_and_mps_clients_are_listed_with_their_kind(fake_nvml, tmp_path):
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100} uuid=GPU-aaaa
process gpu=0 pid=100 used_mib=300
process gpu=0 pid=100 used_mib=300 type=graphics
process gpu=0 pid=200 used_mib=64 type=graphics
process gpu=0 pid=300 used_mib=2048 type=mps
process gpu=0 pid=301 type=mps
""")
    gpu = inventory["gpus"][0]
    assert gpu["processes"] == [
        {"pid": 100, "used_mib": 300, "kind": "compute+graphics"},
        {"pid": 200, "used_mib": 64, "kind": "graphics"},
        {"pid": 300, "used_mib": 2048, "kind": "mps"},
        {"pid": 301, "used_mib": None, "kind": "mps"},
    ]
    assert gpu["warnings"] == []


def test_a_gpu_in_mig_mode_lists_each_mig_devices_processes(fake_nvml, tmp_path):
    # The parent of MIG devices lists processes to root only (the fake answers
    # NO_PERMISSION there): the processes come from each MIG device's own handle.
    inventory = read(fake_nvml, tmp_path, f"""
gpu index=0 {A100} uuid=GPU-aaaa mig=1
mig parent=0 index=0 uuid=MIG-0000 profile=1g.10gb mem_total_mib=9856
mig parent=0 index=1 uuid=MIG-1111 profile=1g.10gb mem_total_mib=9856
process gpu=0 mig=0 pid=4000 used_mib=1000
process gpu=0 mig=1 pid=4100 used_mib=2000
process gpu=0 mig=1 pid=4101 used_mib=50 type=mps
""")
    gpu = inventory["gpus"][0]
    first, second = gpu["mig_devices"]
    assert first["processes"] == [{"pid": 4000, "used_mib": 1000, "kind": "compute"}]
    assert second["processes"] == [{"pid": 4100, "used_mib": 2000, "kind": "compute"},
                                   {"pid": 4101, "used_mib": 50, "kind": "mps"}]
    assert [p["pid"] for p in gpu["processes"]] == [4000, 4100, 4101]
    assert gpu["warnings"] == []


SESSIONS = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "import pynvml\n"
    "from appliance.gpu import nvml\n"
    "opened = []\n"
    "real_init = pynvml.nvmlInit\n"
    "pynvml.nvmlInit = lambda: (opened.append(1), real_init())[1]\n"
    "config = Path(sys.argv[2])\n"
    "good = config.read_text()\n"
    "seen = []\n"
    "for step in range(3):\n"
    "    seen.append([nvml.read_inventory(Path(sys.argv[1])).available, len(opened)])\n"
    "config.write_text(good + 'error nvmlDeviceGetCount_v2 NVML_ERROR_DRIVER_NOT_LOADED\\n')\n"
    "seen.append([nvml.read_inventory(Path(sys.argv[1])).available, len(opened)])\n"
    "config.write_text(good)\n"
    "for step in range(2):\n"
    "    seen.append([nvml.read_inventory(Path(sys.argv[1])).available, len(opened)])\n"
    "print(json.dumps(seen))\n"
)


def test_nvml_is_opened_once_per_process_and_again_after_a_driver_error(fake_nvml, tmp_path):
    config = tmp_path / "nvml.conf"
    config.write_text(f"gpu index=0 {A100}\n")
    seen = json.loads(run_python(fake_nvml, config, SESSIONS, str(tmp_path), str(config)))
    # [available, NVML sessions opened so far] after each read
    assert seen == [[True, 1], [True, 1], [True, 1], [False, 1], [True, 2], [True, 2]]


def test_a_jetson_is_told_by_its_nvml_name_without_any_l4t_file(fake_nvml, tmp_path):
    root = tmp_path / "container-root"  # no /etc/nv_tegra_release, no /proc/device-tree
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text(ORIN_MEMINFO)
    inventory = read(fake_nvml, tmp_path, "cuda 12060\njetson\ngpu index=0\n", root)
    [gpu] = inventory["gpus"]
    assert (gpu["name"], gpu["jetson"]) == ("Orin (nvgpu)", True)
    assert gpu["memory_total_mib"] == 64335836 // 1024
    assert gpu["memory_free_mib"] == 60398472 // 1024


# An H100 80GB in MIG mode: 1g.20gb and 2g.20gb have the same memory and differ in compute;
# MIG 3 is one of two compute instances of a 3g.40gb GPU instance.
H100_MIG = """
gpu index=0 name="NVIDIA H100 80GB HBM3" uuid=GPU-aaaa mem_total_mib=81559 mig=1
mig parent=0 index=0 uuid=MIG-a profile=1g.20gb gi=9
mig parent=0 index=1 uuid=MIG-b profile=2g.20gb gi=3
mig parent=0 index=2 uuid=MIG-c profile=1g.10gb+me gi=11
mig parent=0 index=3 uuid=MIG-d profile=3g.40gb gi=2 ci=1 ci_slices=1
"""
PLACE = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from types import SimpleNamespace\n"
    "from appliance.gpu import allocation, claims\n"
    "from appliance.gpu.nvml import read_inventory\n"
    "inventory = read_inventory(Path(sys.argv[1]))\n"
    "placed = {}\n"
    "for profile in sys.argv[2:]:\n"
    "    decision = allocation.admit(allocation.parse_hardware(profile), 'team/a', inventory, [])\n"
    "    held = decision.allocation\n"
    "    config = SimpleNamespace(cdi_kind='nvidia.com/gpu', cdi_names='index', gpu_mps=False)\n"
    "    placed[profile] = held and claims.injection(held, inventory, config).devices\n"
    "print(json.dumps({'inventory': inventory.to_dict(), 'placed': placed}))\n"
)


def place(lib_dir: Path, tmp_path: Path, config: str, *requests: str) -> dict:
    (tmp_path / "nvml.conf").write_text(config)
    (tmp_path / "root").mkdir(exist_ok=True)
    return json.loads(run_python(lib_dir, tmp_path / "nvml.conf", PLACE, str(tmp_path / "root"),
                                 *requests))


def test_mig_devices_of_equal_memory_are_told_apart_by_profile_and_placed_by_name(fake_nvml,
                                                                                  tmp_path):
    seen = place(fake_nvml, tmp_path, H100_MIG, "mig:2g.20gb", "mig:1g.20gb", "mig:1g.10gb+me",
                 "mig:3g.40gb")
    gpu = seen["inventory"]["gpus"][0]
    assert [(m["profile"], m["memory_total_mib"], m["gpu_instance_id"],
             m["compute_instance_id"]) for m in gpu["mig_devices"]] == [
        ("1g.20gb", 19968, 9, 0), ("2g.20gb", 19968, 3, 0), ("1g.10gb+me", 9728, 11, 0),
        ("1c.3g.40gb", 40192, 2, 1)]
    assert gpu["warnings"] == []
    # CDI names as `nvidia-ctk cdi generate` writes them: GPU index, then the MIG device's index.
    assert seen["placed"] == {"mig:2g.20gb": ["nvidia.com/gpu=0:1"],
                              "mig:1g.20gb": ["nvidia.com/gpu=0:0"],
                              "mig:1g.10gb+me": ["nvidia.com/gpu=0:2"],
                              "mig:3g.40gb": None}  # a share of one is not the whole instance


def test_the_service_account_names_profiles_from_attributes_without_the_variant(fake_nvml,
                                                                                tmp_path):
    # A GPU instance is reachable by root only: the service account reads each MIG device's
    # attributes (slices, memory), which name it but cannot say "+me".
    config = H100_MIG + "error nvmlDeviceGetGpuInstanceById NVML_ERROR_NO_PERMISSION\n"
    seen = place(fake_nvml, tmp_path, config, "mig:2g.20gb", "mig:1g.10gb")
    gpu = seen["inventory"]["gpus"][0]
    assert [m["profile"] for m in gpu["mig_devices"]] == [
        "1g.20gb", "2g.20gb", "1g.10gb", "1c.3g.40gb"]
    assert gpu["warnings"] == []
    assert seen["placed"] == {"mig:2g.20gb": ["nvidia.com/gpu=0:1"],
                              "mig:1g.10gb": ["nvidia.com/gpu=0:2"]}


def test_a_driver_without_the_mig_profile_calls_falls_back_to_memory_with_a_warning(tmp_path):
    old = build(tmp_path / "no-mig-profile", "FAKE_NVML_NO_MIG_PROFILE")
    seen = place(old, tmp_path, H100_MIG, "mig:2g.20gb", "mig:3g.40gb")
    gpu = seen["inventory"]["gpus"][0]
    assert [m["profile"] for m in gpu["mig_devices"]] == [None, None, None, None]
    assert gpu["warnings"][0] == (
        "MIG device 0 profile: this driver has no MIG profile calls (nvmlDeviceGetAttributes, "
        "nvmlDeviceGetGpuInstanceId; upgrade the NVIDIA driver): mig:PROFILE requests are "
        "matched by its memory alone (19968 MiB), which cannot tell profiles of equal memory "
        "apart (1g.20gb, 2g.20gb)")
    assert len(gpu["warnings"]) == 4
    # By memory alone the first 20 GB device is taken: the 1g.20gb, not the 2g.20gb asked for.
    assert seen["placed"] == {"mig:2g.20gb": ["nvidia.com/gpu=0:0"],
                              "mig:3g.40gb": ["nvidia.com/gpu=0:3"]}


@pytest.mark.parametrize(("memory_mb", "gpu_mib", "gb"), [
    (4864, 40960, 5),  # A100-SXM4-40GB 1g.5gb
    (5952, 24576, 6),  # A30 1g.6gb
    (9728, 81920, 10), (19968, 81920, 20), (40192, 81920, 40), (80896, 81920, 80),  # A100 80GB
    (11008, 95830, 12),  # H100 NVL 1g.12gb: not its memory rounded (11), NVIDIA's eighths
])
def test_a_profile_names_its_memory_as_nvidia_does(memory_mb, gpu_mib, gb):
    assert nvml._memory_gb(memory_mb, gpu_mib) == gb
