"""scripts/gpu-check against the fake NVML and a stand-in nvidia-smi: what it compares, what
it says, and its exit codes (the real run needs a GPU host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
CONFIG = """\
driver 550.54.15
cuda 12040
gpu index=0 name="NVIDIA L4" uuid=GPU-aaaa mem_total_mib=23034 mem_used_mib=100
gpu index=1 name="NVIDIA L4" uuid=GPU-bbbb mem_total_mib=23034 mem_used_mib=0
"""


def run(lib_dir: Path, tmp_path: Path, smi_rows: list[str] | None, config: str = CONFIG,
        cuda_dir: Path | None = None, **extra_env: str):
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
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    return done, json.loads(out.read_text()) if out.exists() else None


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
    assert report["checks"][-1]["ok"] is False
