"""Benchmark GPU admission: how long one `allocation.admit` decision takes on a busy box.

    .venv/bin/python bench/admission_bench.py               # 2000 decisions
    .venv/bin/python bench/admission_bench.py --decisions 10000

The box has 8 GPUs and 100 Spaces already allocated: 2 A100s in MIG mode (7 MIG devices
each, 13 given out), 2 GPUs held whole, 4 GPUs carrying 85 shared budgets. The decisions
cycle through requests that are admitted and refused, of every kind, including a Space
re-admitted over its own allocation. Pure Python, no GPU needed. Target: median and p95
at most 1 ms. Writes bench/results/admission.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from appliance.gpu.allocation import Allocation, admit, parse_hardware  # noqa: E402
from appliance.gpu.nvml import Gpu, Inventory, MigDevice  # noqa: E402

TARGET_MS = 1.0
RESULTS = REPO_ROOT / "bench" / "results" / "admission.json"
# 1g.10gb devices of an A100-80GB, as nvidia-smi reports them.
MIG_1G_10GB_MIB = 9728


def _gpu(index: int, mig_devices: int = 0) -> Gpu:
    migs = tuple(MigDevice(slot, f"MIG-{index}-{slot}", MIG_1G_10GB_MIB)
                 for slot in range(mig_devices))
    return Gpu(
        index=index, uuid=f"GPU-{index}", name="NVIDIA A100-SXM4-80GB",
        memory_total_mib=81920, memory_used_mib=0, memory_free_mib=81920,
        utilization_gpu=0, utilization_memory=0, temperature_c=40, power_w=60.0,
        mig_enabled=mig_devices > 0, mig_devices=migs, processes=(), jetson=False,
    )


def busy_box() -> tuple[Inventory, list[Allocation]]:
    """Return 8 GPUs and 100 allocations: 13 MIG, 2 whole, 85 shared."""
    gpus = tuple(_gpu(index, mig_devices=7 if index < 2 else 0) for index in range(8))
    inventory = Inventory(available=True, driver_version="550.54", cuda_version="12.4",
                          gpus=gpus)
    allocations = []
    for slot in range(13):
        gpu, device = divmod(slot, 7)
        allocations.append(Allocation(f"team/mig-{slot}", "mig", (f"GPU-{gpu}",),
                                      f"MIG-{gpu}-{device}", None))
    allocations += [Allocation(f"team/whole-{i}", "gpu", (f"GPU-{i}",), None, None)
                    for i in (2, 3)]
    for slot in range(85):  # leaves 23552, 20736, 15360 and 9984 MiB on GPUs 4-7
        allocations.append(Allocation(f"team/shared-{slot}", "shared", (f"GPU-{4 + slot % 4}",),
                                      None, 2560 + 256 * (slot % 4)))
    assert len(allocations) == 100
    return inventory, allocations


REQUESTS = [
    ("team/new", "shared:8g"),        # admitted: best fit among four shared GPUs
    ("team/new", "shared:40g"),       # refused: says what is left on each GPU
    ("team/new", "gpu"),              # refused: lists what holds each of the 8 GPUs
    ("team/new", "gpu:2"),            # refused
    ("team/new", "mig:1g.10gb"),      # admitted: the one free MIG device
    ("team/new", "mig:3g.40gb"),      # refused: no device of that size
    ("team/mig-3", "mig:1g.10gb"),    # re-admitted over its own device
    ("team/shared-7", "shared:1g"),   # re-admitted over its own budget
    ("team/new", "cpu"),
]


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


def run(decisions: int) -> dict:
    inventory, existing = busy_box()
    parsed = [(space, parse_hardware(text)) for space, text in REQUESTS]
    for space, request in parsed * 20:  # warm up
        admit(request, space, inventory, existing)
    timings_ns = []
    outcomes: dict[str, bool] = {}
    for n in range(decisions):
        space, request = parsed[n % len(parsed)]
        start = time.perf_counter_ns()
        decision = admit(request, space, inventory, existing)
        timings_ns.append(time.perf_counter_ns() - start)
        outcomes[f"{space} {request}"] = decision.admitted
    ms = sorted(t / 1e6 for t in timings_ns)
    median = statistics.median(ms)
    p95 = ms[min(len(ms) - 1, round(0.95 * len(ms)) - 1)]
    return {
        "benchmark": "admission",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.machine(), "cpus": os.cpu_count()},
        "setup": {"gpus": len(inventory.gpus), "allocations": len(existing),
                  "by_kind": {kind: sum(a.kind == kind for a in existing)
                              for kind in ("gpu", "shared", "mig")},
                  "requests": [f"{space} {text}" for space, text in REQUESTS]},
        "decisions": decisions,
        "admitted": outcomes,
        "median_ms": round(median, 4),
        "p95_ms": round(p95, 4),
        "max_ms": round(ms[-1], 4),
        "target_ms": TARGET_MS,
        "pass": median <= TARGET_MS and p95 <= TARGET_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.decisions)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "pass" if result["pass"] else "FAIL"
    print(f"admit() over {result['setup']['allocations']} allocations on "
          f"{result['setup']['gpus']} GPUs, {result['decisions']} decisions: "
          f"median {result['median_ms']:.4f} ms, p95 {result['p95_ms']:.4f} ms, "
          f"max {result['max_ms']:.4f} ms (target <= {TARGET_MS} ms: {verdict})")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
