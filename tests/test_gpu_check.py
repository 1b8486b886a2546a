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


def run(lib_dir: Path, tmp_path: Path, smi_rows: list[str] | None, config: str = CONFIG):
    (tmp_path / "nvml.conf").write_text(config)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi_rows is not None:  # a stand-in nvidia-smi answering the query gpu-check makes
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(smi_rows) + "\nEOF\n")
        smi.chmod(0o755)
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir),
           "FAKE_NVML_CONFIG": str(tmp_path / "nvml.conf"), "APPLIANCE_GPU_CHECK_CHILD": "1",
           "PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    return done, json.loads(out.read_text()) if out.exists() else None


def test_matching_gpus_pass_and_the_cuda_check_says_why_it_was_skipped(fake_nvml, tmp_path):
    done, report = run(fake_nvml, tmp_path, ["0, GPU-aaaa, NVIDIA L4, 23034",
                                             "1, GPU-bbbb, NVIDIA L4, 23034"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   GPU count: appliance 2, nvidia-smi 2" in done.stdout
    assert "ok   GPU 1 uuid" in done.stdout
    assert "skip CUDA process: PyTorch is not installed" in done.stdout
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
