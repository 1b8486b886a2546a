"""GPU admission under concurrency and NVML flicker, through the real claims path: several
processes, each with its own store on one SQLite file, claim at the same moment against the
fake libnvidia-ml.so.1; a GPU that drops out of one NVML reading keeps its allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.errors import Conflict
from appliance.gpu import claims
from appliance.gpu.allocation import parse_hardware
from appliance.gpu.nvml import Gpu, Inventory

REPO = Path(__file__).resolve().parents[1]
RESERVE = 2048
L4 = 'name="NVIDIA L4" mem_total_mib=23034 util_gpu=0 temp_c=30 power_mw=16000'
A100 = 'name="NVIDIA A100-SXM4-40GB" mem_total_mib=40960 util_gpu=0 temp_c=30 power_mw=50000'

CLAIM = """\
import json, sys, time
from pathlib import Path
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.errors import Conflict
from appliance.gpu import claims, nvml

data, space, hardware, ready, go = sys.argv[1:6]
config = load_config({}, data_dir=data)
store = open_store(config.db_path)
real_allocations = store.allocations


def slow_allocations():
    # A store that answers slowly (a busy disk): it widens any gap between reading the
    # allocations and recording one, where two claims could both see a GPU free.
    rows = real_allocations()
    time.sleep(0.05)
    return rows


store.allocations = slow_allocations
ctx = Context(config, store, None, "test")
nvml.read_inventory()  # NVML opened before the start line, as in a long-running worker
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
try:
    held = claims.claim(ctx, space, hardware)
    print(json.dumps({"space": space, "ok": True, "devices": held.devices}))
except Conflict as exc:
    print(json.dumps({"space": space, "ok": False, "error": exc.message}))
"""


def child_env(fake_nvml: Path, config: Path) -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": str(fake_nvml), "FAKE_NVML_CONFIG": str(config),
            "PYTHONPATH": str(REPO)}


def add_spaces(data: Path, names: list[str]) -> None:
    store = open_store(load_config({}, data_dir=str(data)).db_path)
    for number, space_id in enumerate(names):
        store.insert_space({"id": space_id, "source": "/s", "source_display": "/s",
                            "stage": "STOPPED", "port": 18200 + number, "hardware": "cpu",
                            "desired": "running", "sdk": "gradio", "visibility": "public",
                            "manifest": json.dumps({})}, "test")
    store.close()


def claim_at_once(fake_nvml: Path, tmp_path: Path, requests: list[tuple[str, str]]
                  ) -> list[dict]:
    """Start a process per (Space, hardware); let them all claim at the same moment."""
    data, config = tmp_path / "data", tmp_path / "nvml.conf"
    add_spaces(data, [space for space, _ in requests])
    go = tmp_path / "go"
    children = []
    for number, (space, hardware) in enumerate(requests):
        ready = tmp_path / f"ready-{number}"
        children.append((ready, subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(data), space, hardware, str(ready), str(go)],
            env=child_env(fake_nvml, config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)))
    try:
        wait_for(lambda: all(ready.exists() or child.poll() is not None
                             for ready, child in children), 120, "the claimers to start")
        go.touch()
        results = []
        for _, child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for _, child in children:
            if child.poll() is None:
                child.kill()
    return results


def assert_never_overbooked(allocations: list[dict], sizes: dict[str, int]) -> None:
    """No whole GPU shared with anything, budgets within memory less the reserve, one Space
    per MIG device."""
    for uuid, total in sizes.items():
        on_gpu = [a for a in allocations if uuid in a["gpu_uuids"]]
        whole = [a for a in on_gpu if a["kind"] == "gpu"]
        assert len(whole) <= 1, f"{uuid} given whole to {[a['space_id'] for a in whole]}"
        if whole:
            assert on_gpu == whole, f"{uuid} is given whole and shared: {on_gpu}"
        assert sum(a["memory_mib"] or 0 for a in on_gpu if a["kind"] == "shared") \
            <= total - RESERVE
    migs = [a["mig_uuid"] for a in allocations if a["kind"] == "mig"]
    assert len(migs) == len(set(migs)), f"a MIG device is given twice: {migs}"


def stored_allocations(tmp_path: Path) -> list[dict]:
    store = open_store(load_config({}, data_dir=str(tmp_path / "data")).db_path)
    try:
        return store.allocations()
    finally:
        store.close()


@pytest.mark.parametrize(("config", "sizes", "requests", "admitted"), [
    pytest.param(
        f"gpu index=0 uuid=GPU-0 {L4}\ngpu index=1 uuid=GPU-1 {L4}\n",
        {"GPU-0": 23034, "GPU-1": 23034},
        [(f"race/w{n}", "gpu") for n in range(6)], 2, id="whole-gpus"),
    pytest.param(
        "".join(f"gpu index={n} uuid=GPU-{n} {L4}\n" for n in range(3)),
        {f"GPU-{n}": 23034 for n in range(3)},
        [(f"race/n{n}", "gpu:2") for n in range(4)], 1, id="gpu-n"),
    pytest.param(
        f"gpu index=0 uuid=GPU-0 {A100} mig=1\n"
        + "".join(f"mig parent=0 index={n} uuid=MIG-{n} mem_total_mib=9856\n" for n in range(3)),
        {"GPU-0": 40960},
        [(f"race/m{n}", "mig:1g.10gb") for n in range(6)], 3, id="mig"),
    pytest.param(
        f"gpu index=0 uuid=GPU-0 {A100}\n", {"GPU-0": 40960},
        [(f"race/s{n}", "shared:10g") for n in range(6)], 3, id="shared-budgets"),
    pytest.param(
        f"gpu index=0 uuid=GPU-0 {A100}\n", {"GPU-0": 40960},
        [(f"race/x{n}", "gpu" if n % 2 else "shared:4g") for n in range(6)], None,
        id="whole-and-shared"),
])
def test_claims_made_at_the_same_moment_never_overbook_a_gpu(fake_nvml, tmp_path, config,
                                                             sizes, requests, admitted):
    (tmp_path / "nvml.conf").write_text(config)
    results = claim_at_once(fake_nvml, tmp_path, requests)
    allocations = stored_allocations(tmp_path)
    assert_never_overbooked(allocations, sizes)
    granted = sorted(r["space"] for r in results if r["ok"])
    assert granted == [a["space_id"] for a in allocations]
    if admitted is not None:
        assert len(granted) == admitted, results
    refused = [r["error"] for r in results if not r["ok"]]
    assert all(e.startswith("Hardware ") and " is not available: " in e for e in refused)
    hardware = dict(requests)
    devices = [d for r in results if r["ok"] and not hardware[r["space"]].startswith("shared")
               for d in r["devices"]]
    assert len(devices) == len(set(devices)), f"a CDI device was injected twice: {devices}"


# -- a GPU that drops out of one NVML reading -----------------------------------------------

FLICKER = """\
import json, sys
from pathlib import Path
from types import SimpleNamespace
from appliance.adapters.runtime import LABEL_SPACE
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.errors import Conflict
from appliance.gpu import claims
from appliance.gpu.allocation import parse_hardware


class Runtime:
    running = {"flicker/a"}

    def containers(self, space_id=None):
        return [SimpleNamespace(name=space, labels={LABEL_SPACE: space}, running=True)
                for space in sorted(self.running)]


data, config_path = sys.argv[1:3]
config = load_config({}, data_dir=data)
ctx = Context(config, open_store(config.db_path), Runtime(), "test")
nvml_config = Path(config_path)
both = nvml_config.read_text()
seen = {"first": claims.claim(ctx, "flicker/a", "gpu").devices}
nvml_config.write_text(both.split("\\n", 1)[1])  # GPU 0 gone from this reading
seen["while_gone"] = claims.reconcile_allocations_once(ctx)
seen["held_while_gone"] = [a["gpu_uuids"] for a in ctx.store.allocations()]
nvml_config.write_text(both)  # and back
try:
    seen["second"] = claims.claim(ctx, "flicker/b", "gpu:2").devices
except Conflict as exc:
    seen["second"] = exc.message
seen["third"] = claims.claim(ctx, "flicker/c", "gpu").devices
nvml_config.write_text(both.split("\\n", 1)[1])
Runtime.running = set()  # flicker/a's container has stopped while its GPU is gone
seen["after_stop"] = claims.reconcile_allocations_once(ctx)
seen["held_after_stop"] = sorted(a["space_id"] for a in ctx.store.allocations())
print(json.dumps(seen))
"""


def test_an_allocation_survives_its_gpu_missing_from_one_reading_while_its_container_runs(
        fake_nvml, tmp_path):
    config = tmp_path / "nvml.conf"
    config.write_text(f"gpu index=0 uuid=GPU-0 {L4}\ngpu index=1 uuid=GPU-1 {L4}\n")
    add_spaces(tmp_path / "data", ["flicker/a", "flicker/b", "flicker/c"])
    done = subprocess.run([sys.executable, "-c", FLICKER, str(tmp_path / "data"), str(config)],
                          env=child_env(fake_nvml, config), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["first"] == ["nvidia.com/gpu=0"]
    assert seen["while_gone"] == []
    assert seen["held_while_gone"] == [["GPU-0"]]
    # Back in the next reading, GPU 0 is still flicker/a's: nobody else gets it.
    assert seen["second"] == (
        "Hardware gpu:2 is not available: gpu:2 needs 2 whole GPUs and 1 is free: "
        "GPU 0 (L4) is given to flicker/a; GPU 1 (L4) is free")
    assert seen["third"] == ["nvidia.com/gpu=1"]
    # Once its container has stopped, a GPU still missing is let go.
    assert seen["after_stop"] == [
        "Dropped the whole GPU of flicker/a: GPU GPU-0 is no longer on this box"]
    assert seen["held_after_stop"] == ["flicker/c"]


# -- refusals --------------------------------------------------------------------------------


def context(tmp_path: Path, inventory: Inventory) -> Context:
    config = load_config({}, data_dir=str(tmp_path / "data"))
    return Context(config, open_store(config.db_path), None, "test",
                   read_inventory=lambda: inventory)


@pytest.mark.parametrize("hardware", ["gpu", "shared:8g", "mig:1g.10gb"])
def test_a_cpu_only_box_says_it_has_no_gpu_instead_of_asking_to_stop_a_space(tmp_path,
                                                                              hardware):
    """A box with a GPU that is taken still says how to free it."""
    ctx = context(tmp_path, Inventory(available=False,
                                      reason="no NVIDIA driver (libnvidia-ml.so.1 not found)"))
    for attempt in (claims.check_request, claims.claim):
        with pytest.raises(Conflict) as refused:
            attempt(ctx, "team/a", hardware)
        assert refused.value.message == (
            f"Hardware {parse_hardware(hardware)} is not available: This box has no NVIDIA GPU "
            "(no NVIDIA driver (libnvidia-ml.so.1 not found))")
        assert refused.value.hint == (
            "this box has no NVIDIA GPU: ask for cpu, or run the Space on a box with one")
        assert "stopping a Space" not in refused.value.hint
    ctx.store.close()
    card = Gpu(index=0, uuid="GPU-0", name="NVIDIA L4", memory_total_mib=23034,
               memory_used_mib=0, memory_free_mib=23034, utilization_gpu=0,
               utilization_memory=0, temperature_c=30, power_w=16.0, mig_enabled=False,
               mig_devices=(), processes=(), jetson=False)
    busy = context(tmp_path, Inventory(available=True, gpus=(card,)))
    add_spaces(tmp_path / "data", ["team/a", "team/b"])
    claims.claim(busy, "team/a", "gpu")
    with pytest.raises(Conflict) as refused:
        claims.claim(busy, "team/b", "gpu")
    assert refused.value.hint == "free it by stopping a Space that holds it, or ask for less"
    busy.store.close()
