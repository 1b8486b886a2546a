"""scripts/gpu-check against the fake NVML and a stand-in nvidia-smi: what it compares, what
it says, and its exit codes (the real run needs a GPU host)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_allocation import box, gpu, mig

from appliance.gpu.nvml import Inventory

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
CONFIG = """\
driver 550.54.15
cuda 12040
gpu index=0 name="NVIDIA L4" uuid=GPU-aaaa mem_total_mib=23034 mem_used_mib=100
gpu index=1 name="NVIDIA L4" uuid=GPU-bbbb mem_total_mib=23034 mem_used_mib=0
"""


def run(lib_dir: Path, tmp_path: Path, smi_rows: list[str] | None, config: str = CONFIG,
        cuda_dir: Path | None = None, args: tuple[str, ...] = ("--service-user", ""),
        out: Path | None = None, **extra_env: str):
    (tmp_path / "nvml.conf").write_text(config)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi_rows is not None:  # a stand-in nvidia-smi answering the query gpu-check makes
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(smi_rows) + "\nEOF\n")
        smi.chmod(0o755)
    libraries = f"{lib_dir}:{cuda_dir}" if cuda_dir else str(lib_dir)
    env = {**os.environ, **extra_env, "LD_LIBRARY_PATH": libraries,
           "FAKE_NVML_CONFIG": str(tmp_path / "nvml.conf"), "APPLIANCE_GPU_CHECK_CHILD": "1",
           "PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = out or tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    report = out.with_suffix(".json")
    return done, json.loads(report.read_text()) if report.exists() else None


def test_matching_gpus_pass_and_the_cuda_check_is_skipped_without_cuda(fake_nvml, tmp_path):
    done, report = run(fake_nvml, tmp_path, ["0, GPU-aaaa, NVIDIA L4, 23034",
                                             "1, GPU-bbbb, NVIDIA L4, 23034"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   GPU count: appliance 2, nvidia-smi 2" in done.stdout
    assert "ok   GPU 1 uuid" in done.stdout
    assert ("skip CUDA process: neither PyTorch nor the CUDA driver library (libcuda.so.1) is "
            "installed: the CUDA process check was skipped") in done.stdout
    assert report["inventory"]["driver_version"] == "550.54.15"


def test_a_difference_fails_and_says_which(fake_nvml, tmp_path):
    done, report = run(fake_nvml, tmp_path, ["0, GPU-zzzz, NVIDIA L4, 23034"])
    assert done.returncode == 1
    assert "FAIL GPU count: appliance 2, nvidia-smi 1" in done.stdout
    assert "FAIL GPU 0 uuid: appliance 'GPU-aaaa', nvidia-smi 'GPU-zzzz'" in done.stdout
    assert [c for c in report["checks"] if c["ok"] is False]


def test_no_gpu_exits_2_with_the_reason(tmp_path):
    empty = tmp_path / "no-nvml"
    empty.mkdir()
    done, report = run(empty, tmp_path, None)
    assert done.returncode == 2
    assert done.stdout.startswith("No GPU to check:")
    assert report["inventory"]["available"] is False


SMI_ROWS = ["0, GPU-aaaa, NVIDIA L4, 23034", "1, GPU-bbbb, NVIDIA L4, 23034"]


def test_a_cuda_process_through_the_driver_api_is_listed_and_attributed(fake_nvml, fake_cuda,
                                                                        tmp_path):
    # The fake libcuda.so.1 makes the holder show up in the fake NVML when it allocates, with
    # the allocation plus its context's memory, as the real driver does.
    done, report = run(fake_nvml, tmp_path, SMI_ROWS, cuda_dir=fake_cuda,
                       FAKE_CUDA_CONTEXT_MIB="300")
    assert done.returncode == 0, done.stdout + done.stderr
    started = next(c for c in report["checks"] if c["check"] == "CUDA process")
    pid = int(started["detail"].split()[1])
    assert (f"ok   CUDA process: pid {pid} allocated 512 MiB with the CUDA driver API "
            "(libcuda.so.1)") in done.stdout
    assert f"ok   CUDA process listed: pid {pid} on GPU 0" in done.stdout
    assert "ok   its memory: 812 MiB listed, 512 MiB allocated (plus the CUDA context)" \
        in done.stdout
    assert "ok   attribution sees the PID" in done.stdout
    assert f"pid={pid} used_mib=812" in (tmp_path / "nvml.conf").read_text()


def test_a_cuda_process_that_cannot_allocate_fails_with_the_drivers_error(fake_nvml, fake_cuda,
                                                                         tmp_path):
    done, report = run(fake_nvml, tmp_path, SMI_ROWS, cuda_dir=fake_cuda,
                       FAKE_CUDA_FAIL="cuMemAlloc_v2")
    assert done.returncode == 1
    assert ("FAIL CUDA process: it did not start with the CUDA driver API (libcuda.so.1): "
            "cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY") in done.stdout
    assert "CUDA process listed" not in done.stdout
    assert next(c for c in report["checks"] if c["check"] == "CUDA process")["ok"] is False


def no_real_gpu() -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this box has a real NVIDIA driver: the container check would run")


def test_the_report_is_written_as_json_and_markdown_and_the_container_check_needs_a_gpu(
        fake_nvml, tmp_path):
    no_real_gpu()
    out = tmp_path / "results" / "gpu-check.md"
    done, report = run(fake_nvml, tmp_path, SMI_ROWS, out=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("skip container: skipped: no GPU (/dev/nvidiactl is missing: NVML answers, but no "
            "NVIDIA driver runs here)") in done.stdout
    assert "skip service account pass: skipped: no service account named (--service-user '')" \
        in done.stdout
    markdown = out.read_text()
    assert markdown.startswith("# GPU check\n")
    assert "Driver 550.54.15, CUDA 12.4." in markdown
    assert "- GPU 1: NVIDIA L4 GPU-bbbb, 23034 MiB\n" in markdown
    assert "| ok | GPU count | appliance 2, nvidia-smi 2 |" in markdown
    assert "| skip | container | skipped: no GPU (/dev/nvidiactl is missing" in markdown
    assert report["accounts"] == ["root"] if os.geteuid() == 0 else len(report["accounts"]) == 1


MIG_CONFIG = """\
driver 550.54.15
gpu index=0 name="NVIDIA H100 80GB HBM3" uuid=GPU-aaaa mem_total_mib=81559 mig=1
mig parent=0 index=0 uuid=MIG-a profile=1g.20gb gi=9
mig parent=0 index=1 uuid=MIG-b profile=2g.20gb gi=3
mig parent=0 index=2 uuid=MIG-c mem_total_mib=9856
"""


def test_mig_devices_are_listed_with_their_profiles_and_one_without_fails(fake_nvml, tmp_path):
    out = tmp_path / "gpu-check.md"
    done, report = run(fake_nvml, tmp_path, ["0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559"],
                       config=MIG_CONFIG, out=out)
    assert done.returncode == 1
    assert ("ok   GPU 0 MIG 1 profile: 2g.20gb, 19968 MiB, MIG-b, CDI nvidia.com/gpu=0:1, GPU "
            "instance 3, compute instance 0") in done.stdout
    assert "ok   GPU 0 MIG 0 profile: 1g.20gb, 19968 MiB, MIG-a, CDI nvidia.com/gpu=0:0" \
        in done.stdout
    assert "FAIL GPU 0 MIG 2 profile: no profile, 9856 MiB, MIG-c" in done.stdout
    assert "  - MIG 1: 2g.20gb, 19968 MiB, MIG-b, CDI nvidia.com/gpu=0:1\n" in out.read_text()
    assert [c["ok"] for c in report["checks"] if "MIG" in c["check"]] == [True, True, False]


def test_run_as_root_the_checks_run_again_as_the_service_account(fake_nvml, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the second pass is made by root only")
    # A stand-in runuser that records how it was called and runs the rest as this account:
    # the test checks the plumbing; a real account switch needs files it may read.
    (tmp_path / "bin").mkdir()
    runuser = tmp_path / "bin" / "runuser"
    runuser.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/runuser.log\nshift 3\nexec "$@"\n')
    runuser.chmod(0o755)
    done, report = run(fake_nvml, tmp_path, SMI_ROWS, args=("--service-user", "root"))
    assert done.returncode == 0, done.stdout + done.stderr
    called = (tmp_path / "runuser.log").read_text()
    assert called.startswith("-u root -- env HOME=/root XDG_RUNTIME_DIR=/run/user/0 ")
    assert "--service-pass --mib 512 --out " in called
    assert "ok   as root: GPUs seen: root 2, service account 2" in done.stdout
    assert "ok   as root: GPU count: appliance 2, nvidia-smi 2" in done.stdout
    assert "as root: service account pass" not in done.stdout  # the second pass makes no third
    assert report["accounts"] == ["root", "root"]
    assert report["service_account"]["inventory"]["gpus"][1]["uuid"] == "GPU-bbbb"


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """The script as a module, for its branch-selection functions."""
    os.environ.setdefault("APPLIANCE_GPU_CHECK_CHILD", "1")
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_container_check_runs_only_where_a_real_gpu_podman_cdi_and_an_image_are(
        gpu_check, tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    card = box(gpu(0, name="NVIDIA L4"))
    cdi = {"nvidia.com/gpu=0"}

    def reason(inventory=card, euid=999, podman="/usr/bin/podman", names=cdi, image="img"):
        return gpu_check.container_skip_reason(inventory, euid, podman, names, image, dev)

    assert reason(Inventory(available=False, reason="no driver")) == "skipped: no GPU"
    assert reason(box()) == "skipped: no GPU"
    assert reason() == (f"skipped: no GPU ({dev}/nvidiactl is missing: NVML answers, but no "
                        "NVIDIA driver runs here)")
    (dev / "nvidiactl").touch()
    assert reason(euid=0).startswith("skipped as root: Spaces run in the service account's "
                                     "rootless Podman")
    assert reason(podman=None) == "skipped: podman is not installed"
    assert reason(names=set()) == (
        "skipped: no CDI spec in /etc/cdi, /var/run/cdi names nvidia.com/gpu=0 "
        "(sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml)")
    assert reason(image=None) == "skipped: no image to run (pass --image, one with python3)"
    assert reason() is None
    # A GPU in MIG mode goes in by its first MIG device, named as nvidia-ctk names it.
    mig_box = box(gpu(0, migs=(mig(0, 2, 9728),)))
    assert gpu_check.cdi_target(mig_box) == "nvidia.com/gpu=0:2"
    assert reason(mig_box, names=cdi).endswith("names nvidia.com/gpu=0:2 (sudo nvidia-ctk cdi "
                                               "generate --output=/etc/cdi/nvidia.yaml)")
    assert reason(mig_box, names={"nvidia.com/gpu=0:2"}) is None
    assert reason(box(gpu(0, jetson=True, uuid=""))).startswith("skipped: a Jetson")


def test_the_second_pass_needs_root_the_account_and_runuser(gpu_check):
    assert gpu_check.service_skip_reason(0, "", "/usr/sbin/runuser") == (
        "skipped: no service account named (--service-user '')")
    assert gpu_check.service_skip_reason(65534, "appliance", "/usr/sbin/runuser").startswith(
        "skipped: not root (this pass ran as ")
    assert gpu_check.service_skip_reason(0, "no-such-user\n..", "/usr/sbin/runuser") == (
        "skipped: no account 'no-such-user\\n..' on this box")
    assert gpu_check.service_skip_reason(0, "root", None) == "skipped: runuser is not installed"
    assert gpu_check.service_skip_reason(0, "root", "/usr/sbin/runuser") is None


def test_cdi_names_are_read_from_the_specs_nvidia_ctk_writes(gpu_check, tmp_path):
    (tmp_path / "nvidia.yaml").write_text(
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: \"0\"\n- name: \"0:1\"\n"
        "- name: MIG-1c2d\n- name: all\n")
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "other.json").write_text('{"kind": "vendor.com/x", "devices": [{"name": "a"}]}')
    assert gpu_check.cdi_devices([tmp_path, tmp_path / "missing"]) == {
        "nvidia.com/gpu=0", "nvidia.com/gpu=0:1", "nvidia.com/gpu=MIG-1c2d",
        "nvidia.com/gpu=all", "vendor.com/x=a"}
