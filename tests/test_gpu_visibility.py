"""What the GPUs show must be true now: processes of no Space are recorded and marked, a
stopped Space reads 0 GPU memory at once, `gpus show` says why NVML is missing, and doctor
judges CDI (and a Jetson's) by what NVML reads."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import doctor
from appliance.adapters.store import open_store
from appliance.cli.main import cli
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.gpu import nvml, telemetry, watchdog
from appliance.gpu.nvml import Gpu, GpuProcess, Inventory
from appliance.web.app import create_app

UUID = "GPU-11111111-2222-3333-4444-555555555555"


class NoContainers:
    """A Podman with no container running: every GPU process is no Space's."""

    def containers(self, space_id=None):
        return []


def card(*processes: GpuProcess, **fields) -> Gpu:
    values = {"index": 0, "uuid": UUID, "name": "NVIDIA L4", "memory_total_mib": 23034,
              "memory_used_mib": 6144, "memory_free_mib": 16890, "utilization_gpu": 37,
              "utilization_memory": 10, "temperature_c": 51, "power_w": 31.5,
              "mig_enabled": False, "mig_devices": (), "processes": processes,
              "jetson": False, **fields}
    return Gpu(**values)


def box(*cards: Gpu, warnings: tuple[str, ...] = ()) -> Inventory:
    return Inventory(available=True, driver_version="550.54", cuda_version="12.4", gpus=cards,
                     warnings=warnings)


def stamp(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat(timespec="seconds")


def add_space(store, space_id: str, stage: str = "RUNNING") -> None:
    store.insert_space({"id": space_id, "source": "/s", "source_display": "/s", "stage": stage,
                        "port": 18300 + len(store.list_spaces()), "hardware": "shared:8g",
                        "desired": "running", "sdk": "gradio", "visibility": "public",
                        "manifest": json.dumps({})}, "test")


# -- processes of no Space ---------------------------------------------------------------------


def test_a_process_of_no_space_is_recorded_once_per_pid_and_gpu(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    mine = GpuProcess(os.getpid(), 700)  # this test's own process: in no container
    inventory = box(card(mine), card(mine, index=1, uuid="GPU-other"))
    ctx = Context(config, open_store(config.db_path), NoContainers(), "test",
                  read_inventory=lambda: inventory)
    for _ in range(3):
        report = watchdog.enforce_once(ctx, now=1000.0)
        assert len(report.unattributed) == 2
    events = [e for e in ctx.store.events() if e["kind"] == "gpu:unattributed-process"]
    assert sorted((e["detail"]["pid"], e["detail"]["gpu_uuid"], e["detail"]["used_mib"])
                  for e in events) == [(os.getpid(), UUID, 700), (os.getpid(), "GPU-other", 700)]
    assert all(e["space_id"] is None for e in events)
    # A scheduler started afresh remembers what the last one recorded.
    watchdog._recorded.clear()
    watchdog.enforce_once(ctx, now=1010.0)
    assert len([e for e in ctx.store.events() if e["kind"] == "gpu:unattributed-process"]) == 2
    ctx.store.close()


@pytest.fixture
def portal(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    state = {"inventory": box(card(GpuProcess(os.getpid(), 6000)),
                              warnings=("processes: this driver has no "
                                        "nvmlDeviceGetComputeRunningProcesses_v3",))}

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), NoContainers(), actor,
                       read_inventory=lambda: state["inventory"])

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    add_space(store, "lab/chat")
    store.set_allocation("lab/chat", "shared", [UUID], None, 8192, "test")
    store.add_gpu_samples(
        [{"at": stamp(60 - 10 * i), "gpu_uuid": UUID, "space_id": "lab/chat",
          "resolution": 0, "memory_used_mib": 900.0 + 100 * i} for i in range(5)])
    store.close()
    app.config["data"] = config
    return app


def test_gpu_page_marks_processes_of_no_space_and_shows_nvml_warnings(portal):
    page = portal.test_client().get("/gpus").data.decode()
    assert f"<code>{os.getpid()}</code> 6000 MiB" in page
    assert "no Space&#39;s</span>" in page or "no Space's</span>" in page
    assert "NVML: processes: this driver has no nvmlDeviceGetComputeRunningProcesses_v3" in page


def test_a_space_that_stops_reads_zero_gpu_memory_at_once(portal):
    metric = 'appliance_space_gpu_memory_used_bytes{space="lab/chat"}'
    text = portal.test_client().get("/metrics").get_data(as_text=True)
    assert f"{metric} {1300 * 2**20}" in text
    assert "1300 MiB" in portal.test_client().get("/spaces/lab/chat").data.decode()
    store = open_store(portal.config["data"].db_path)
    store.move("lab/chat", "RUNNING", "STOPPED", "test")
    store.release_allocation("lab/chat", "test", "stopped")
    store.close()
    text = portal.test_client().get("/metrics").get_data(as_text=True)
    assert f"{metric} 0\n" in text
    assert "1300 MiB" not in portal.test_client().get("/spaces/lab/chat").data.decode()


def test_a_running_space_holding_no_gpu_memory_gets_a_zero_sample(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"), podman_autostart=False,
                         podman_url="unix:///nonexistent/podman.sock")
    ctx = Context(config, open_store(config.db_path), NoContainers(), "test",
                  read_inventory=lambda: box(card()))
    add_space(ctx.store, "lab/idle")
    ctx.store.set_allocation("lab/idle", "shared", [UUID], None, 8192, "test")
    ctx.store.add_gpu_samples([{"at": telemetry._stamp(990.0), "gpu_uuid": UUID,
                                "space_id": "lab/idle", "resolution": 0,
                                "memory_used_mib": 4000}])
    report = telemetry.sample_once(ctx, now=1000.0)
    assert (report.gpus, report.space_rows, report.errors) == (1, 1, [])
    rows = ctx.store.gpu_samples(space_id="lab/idle")
    assert [(r["at"], r["memory_used_mib"]) for r in rows] == [
        (telemetry._stamp(990.0), 4000), (telemetry._stamp(1000.0), 0)]
    space = ctx.store.get_space("lab/idle")
    assert telemetry.current_mib(ctx, space, hours=1e6) == 0
    ctx.store.close()


# -- the CLI -----------------------------------------------------------------------------------


def test_gpus_show_says_why_nvml_is_unavailable(monkeypatch):
    reason = "NVIDIA driver not loaded (libnvidia-ml.so.1 is installed but ...)"
    monkeypatch.setattr(nvml, "read_inventory",
                        lambda: Inventory(available=False, reason=reason))
    result = CliRunner().invoke(cli, ["gpus", "show", "0"], obj={})
    assert result.exit_code != 0
    assert f"No GPU with index 0: {reason}" in result.output
    assert "appliance doctor" in result.output


# -- doctor ------------------------------------------------------------------------------------


def doctor_checks(root: Path, inventory: Inventory) -> dict[str, doctor.Check]:
    config = load_config({}, data_dir="/var/lib/appliance")
    return {c.name: c for c in doctor.run_checks(config, root, read_inventory=lambda: inventory)}


def test_doctor_sees_a_gpu_through_nvml_without_dev_nvidia0(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.host, "which", lambda name: f"/usr/bin/{name}")
    found = doctor_checks(tmp_path, box(card()))  # no /dev/nvidia0 in this root
    assert found["cdi"].status == "fail"
    assert found["cdi"].fix == "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
    assert found["gpus"].status == "ok" and "NVIDIA L4" in found["gpus"].detail


def test_doctor_trusts_nvml_over_a_stale_dev_nvidia0(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidia0").write_text("")
    found = doctor_checks(tmp_path, box())
    assert (found["cdi"].status, found["cdi"].detail) == (
        "ok", "CPU-only box: no NVIDIA GPU found")


def test_doctor_explains_cdi_on_jetpack_6_for_a_jetson_nvml_names(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.host, "which", lambda name: f"/usr/bin/{name}")
    orin = card(name="Orin (nvgpu)", uuid="6a8e4f3b", jetson=True)
    found = doctor_checks(tmp_path, box(orin))  # no /etc/nv_tegra_release in this root
    assert found["cdi"].status == "fail"
    assert found["cdi"].fix == "nvidia-ctk cdi generate --mode=csv --output=/etc/cdi/nvidia.yaml"
    assert "on JetPack 6" in found["cdi"].detail
    assert "nvidia-ctk cdi generate --mode=csv --output=/etc/cdi/nvidia.yaml" in \
        found["cdi"].detail


def test_doctor_shows_nvml_warnings(tmp_path):
    blind = card(warnings=("processes: this driver has no "
                           "nvmlDeviceGetComputeRunningProcesses_v3 (nor _v2, nor v1)",))
    found = doctor_checks(tmp_path, box(blind))
    assert found["gpus"].status == "warn"
    assert "GPU 0: processes: this driver has no nvmlDeviceGetComputeRunningProcesses_v3" in \
        found["gpus"].detail
    assert found["gpus"].fix == "upgrade the NVIDIA driver"


def test_doctor_on_a_tegra_device_tree_without_l4t_release_uses_csv_mode(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(doctor.host, "which", lambda name: f"/usr/bin/{name}")
    tree = tmp_path / "proc/device-tree"
    tree.mkdir(parents=True)
    (tree / "compatible").write_text("nvidia,p3768-0000\0nvidia,tegra234\0")
    found = doctor_checks(tmp_path, Inventory(available=False, reason="no NVIDIA driver"))
    assert found["cdi"].status == "ok"  # NVML answers for the GPUs; it found none
    jetson = card(name="NVIDIA Orin", jetson=False, memory_total_mib=None)
    found = doctor_checks(tmp_path, box(jetson))
    assert found["cdi"].fix == "nvidia-ctk cdi generate --mode=csv --output=/etc/cdi/nvidia.yaml"
