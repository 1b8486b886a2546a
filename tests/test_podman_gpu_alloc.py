"""GPUs for Spaces on real Podman: admission, CDI injection into a real rootless container,
release on stop, refusal that says what is free. The GPUs are an inventory handed in at the
NVML seam, and a CDI spec of a test kind stands in for the one nvidia-ctk writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from conftest import container_env, make_space_repo

from appliance import stages
from appliance.core import spaces
from appliance.errors import Conflict
from appliance.gpu.nvml import Gpu, Inventory

pytestmark = pytest.mark.podman
KIND = "appliance-test.example/gpu"
SPEC = Path("/etc/cdi/appliance-test-gpu.yaml")


def gpu(index: int) -> Gpu:
    return Gpu(index=index, uuid=f"GPU-test-{index}", name="Test GPU", memory_total_mib=16384,
               memory_used_mib=0, memory_free_mib=16384, utilization_gpu=0,
               utilization_memory=0, temperature_c=30, power_w=20.0, mig_enabled=False,
               mig_devices=(), processes=(), jetson=False)


INVENTORY = Inventory(available=True, reason=None, driver_version="550.54.15",
                      cuda_version="12.4", gpus=(gpu(0), gpu(1)))


@pytest.fixture
def gpu_ctx(appliance_env):
    ctx, sources_dir = appliance_env
    SPEC.parent.mkdir(parents=True, exist_ok=True)
    SPEC.write_text(
        'cdiVersion: "0.5.0"\nkind: "' + KIND + '"\ndevices:\n'
        + "".join(f'- name: "{i}"\n  containerEdits:\n    env:\n    - "TEST_GPU_INDEX={i}"\n'
                  for i in range(2)))
    gpu_ctx = spaces.Context(ctx.config.with_values(cdi_kind=KIND), ctx.store, ctx.runtime,
                             read_inventory=lambda: INVENTORY)
    yield gpu_ctx, sources_dir
    SPEC.unlink()
    for row in ctx.store.list_spaces():
        if row["id"].startswith("gpu/"):
            spaces.delete(ctx, row["id"])


def static(ctx, sources_dir, name: str, hardware: str) -> str:
    repo = sources_dir / f"gpu-{name}"
    if not repo.exists():  # a refused add leaves its repository for the retry
        make_space_repo(repo, {"README.md": "---\nsdk: static\n---\n", "index.html": name})
    spaces.add_space(ctx, str(repo), name=f"gpu/{name}", hardware=hardware)
    return f"gpu/{name}"


def test_whole_gpus_are_injected_through_cdi_and_never_shared(gpu_ctx):
    ctx, sources_dir = gpu_ctx
    first = static(ctx, sources_dir, "one", "gpu")
    view = spaces.deploy(ctx, first)
    assert view["stage"] == stages.RUNNING, view["error"]
    env = container_env(ctx.store.get_space(first)["container"])
    assert env["TEST_GPU_INDEX"] == "0"  # the CDI spec's edit reached the container
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-test-0"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-test-0" and env["ACCELERATOR"] == "gpu"
    second = static(ctx, sources_dir, "two", "gpu")
    assert spaces.deploy(ctx, second)["stage"] == stages.RUNNING
    assert container_env(ctx.store.get_space(second)["container"])["TEST_GPU_INDEX"] == "1"
    with pytest.raises(Conflict, match="Hardware gpu is not available: No whole GPU is free"):
        static(ctx, sources_dir, "three", "gpu")
    held = {a["space_id"]: a["gpu_uuids"] for a in ctx.store.allocations()}
    assert held == {first: ["GPU-test-0"], second: ["GPU-test-1"]}
    spaces.stop(ctx, first)  # releases GPU 0
    assert [a["space_id"] for a in ctx.store.allocations()] == [second]
    third = static(ctx, sources_dir, "three", "gpu")
    assert spaces.deploy(ctx, third)["stage"] == stages.RUNNING
    assert container_env(ctx.store.get_space(third)["container"])["TEST_GPU_INDEX"] == "0"
    kinds = [e["kind"] for e in ctx.store.events(first, 30)]
    assert "gpu:allocated" in kinds and "gpu:released" in kinds


def test_shared_budget_gets_the_cooperative_caps_and_a_start_refused_says_what_is_free(
        gpu_ctx):
    ctx, sources_dir = gpu_ctx
    shared = static(ctx, sources_dir, "shared", "shared:8g")
    view = spaces.deploy(ctx, shared)
    assert view["stage"] == stages.RUNNING and view["hardware"] == "shared:8192"
    env = container_env(ctx.store.get_space(shared)["container"])
    assert env["APPLIANCE_GPU_MEMORY_MIB"] == "8192"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.500"
    assert requests.get(view["url"], timeout=5).text == "shared"
    # Another Space takes both GPUs whole while the shared one is stopped: the shared one's
    # next start is refused with the reason, and it holds nothing.
    spaces.stop(ctx, shared)
    both = static(ctx, sources_dir, "both", "gpu:2")
    assert spaces.deploy(ctx, both)["stage"] == stages.RUNNING
    needs_build, view = spaces.start(ctx, shared)
    assert view["stage"] == stages.RUNTIME_ERROR
    assert "Hardware shared:8192 is not available" in view["error"]
    assert "is given to gpu/both" in view["error"]
    assert [a["space_id"] for a in ctx.store.allocations()] == [both]


def test_changing_hardware_is_checked_and_applied_at_the_next_restart(gpu_ctx):
    ctx, sources_dir = gpu_ctx
    name = static(ctx, sources_dir, "change", "cpu")
    assert spaces.deploy(ctx, name)["stage"] == stages.RUNNING
    assert "NVIDIA_VISIBLE_DEVICES" not in container_env(ctx.store.get_space(name)["container"])
    assert spaces.set_hardware(ctx, name, "gpu:1")["hardware"] == "gpu"
    view = spaces.restart(ctx, name)
    assert view["stage"] == stages.RUNNING
    assert container_env(ctx.store.get_space(name)["container"])["TEST_GPU_INDEX"] == "0"
    with pytest.raises(Exception, match="Hardware .lots. is not a hardware request"):
        spaces.set_hardware(ctx, name, "lots")


def test_reconcile_keeps_a_missing_gpus_allocation_until_its_container_stops(gpu_ctx):
    from appliance.upkeep import reconcile

    ctx, sources_dir = gpu_ctx
    name = static(ctx, sources_dir, "vanish", "gpu")
    assert spaces.deploy(ctx, name)["stage"] == stages.RUNNING
    assert [a["space_id"] for a in ctx.store.allocations()] == [name]
    gone = spaces.Context(ctx.config, ctx.store, ctx.runtime, actor="scheduler",
                          read_inventory=lambda: Inventory(
                              available=True, reason=None, driver_version="550.54.15",
                              cuda_version="12.4", gpus=(gpu(1),)))
    # GPU 0 is missing from this reading, but the container that holds it still runs: it
    # keeps GPU 0, which nobody else may be given when it comes back.
    report = reconcile.reconcile_once(gone, spawn=lambda *a, **k: None)
    assert [a["space_id"] for a in ctx.store.allocations()] == [name]
    assert not any("GPU-test-0" in message for message in report.errors)
    ctx.runtime.remove_container(ctx.store.get_space(name)["container"])
    reconcile.reconcile_once(gone, spawn=lambda *a, **k: None)
    assert ctx.store.allocations() == []
    assert "gpu:released" in [e["kind"] for e in ctx.store.events(name, 20)]
