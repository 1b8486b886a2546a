"""The portal's GPU page and Prometheus /metrics, read from a GPU inventory and real samples."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from appliance import users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.gpu.nvml import Gpu, GpuProcess, Inventory
from appliance.web.app import create_app

UUID = "GPU-11111111-2222-3333-4444-555555555555"
CARD = Gpu(index=0, uuid=UUID, name="NVIDIA L4", memory_total_mib=23034, memory_used_mib=6144,
           memory_free_mib=16890, utilization_gpu=37, utilization_memory=10, temperature_c=51,
           power_w=31.5, mig_enabled=False, mig_devices=(),
           processes=(GpuProcess(pid=4242, used_mib=6000),), jetson=False)


def stamp(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat(timespec="seconds")


@pytest.fixture
def app(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    inventory = Inventory(available=True, driver_version="550.54", cuda_version="12.4",
                          gpus=(CARD,))

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), None, actor, read_inventory=lambda: inventory)

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    for space_id, visibility in (("lab/chat", "public"), ("lab/secret-model", "private")):
        store.insert_space({"id": space_id, "source": "/s", "source_display": "/s",
                            "stage": "RUNNING", "port": 18100 + len(visibility),
                            "hardware": "shared:8g", "desired": "running", "sdk": "gradio",
                            "visibility": visibility, "manifest": json.dumps({})}, "test")
        store.set_allocation(space_id, "shared", [UUID], None, 8192, "test")
    store.add_gpu_samples(
        [{"at": stamp(600 - 60 * i), "gpu_uuid": UUID, "resolution": 0,
          "memory_used_mib": 1000.0 + 500 * i, "utilization_gpu": 10.0 * i,
          "temperature_c": 50.0, "power_w": 30.0} for i in range(10)]
        + [{"at": stamp(600 - 60 * i), "gpu_uuid": UUID, "space_id": "lab/chat",
            "resolution": 0, "memory_used_mib": 900.0 + 100 * i} for i in range(10)])
    users.add_user(store, "ann", "viewer", "long enough password", "test")
    _, token = users.create_token(store, "scrape", "ann", "read", "test")
    store.close()
    app.config["token"] = token
    return app


def test_gpu_page_shows_readings_charts_and_public_allocations(app):
    page = app.test_client().get("/gpus").data.decode()
    assert "NVIDIA L4" in page and "6144 / 23034 MiB" in page and "37 %" in page
    assert "<code>4242</code> 6000 MiB" in page
    assert page.count("<polyline") == 2  # memory and utilisation over the last hours
    assert "lab/chat" in page and "lab/secret-model" not in page


def test_space_page_shows_its_gpu_memory(app):
    page = app.test_client().get("/spaces/lab/chat").data.decode()
    assert "1800 MiB" in page and "gpu-usage" in page


def test_metrics_are_prometheus_text_and_hide_private_spaces_from_visitors(app):
    response = app.test_client().get("/metrics")
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert f'appliance_gpu_memory_used_bytes{{gpu="0",uuid="{UUID}",name="NVIDIA L4"}} ' \
           f"{6144 * 2**20}" in text
    assert 'appliance_gpu_utilization_ratio{gpu="0"' in text and "} 0.37" in text
    assert f'appliance_space_gpu_memory_allocated_bytes{{space="lab/chat"}} {8192 * 2**20}' in text
    assert f'appliance_space_gpu_memory_used_bytes{{space="lab/chat"}} {1800 * 2**20}' in text
    assert 'appliance_spaces{stage="RUNNING"} 1' in text
    assert "secret-model" not in text
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE or NAME VALUE
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    scraped = app.test_client().get(
        "/metrics", headers={"Authorization": f"Bearer {app.config['token']}"})
    assert 'appliance_space_up{space="lab/secret-model"} 1' in scraped.get_data(as_text=True)


def test_cpu_only_box_says_so(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), None, actor,
                       read_inventory=lambda: Inventory(available=False,
                                                        reason="NVML is not installed"))

    app = create_app(config, context_factory=context)
    page = app.test_client().get("/gpus").data.decode()
    assert "No NVIDIA GPU here: NVML is not installed" in page
    assert "appliance_gpus_available 0" in app.test_client().get("/metrics").get_data(
        as_text=True)


def test_gpu_page_lists_each_mig_device_with_its_profile(tmp_path):
    from appliance.gpu.nvml import MigDevice

    migs = (MigDevice(index=0, uuid="MIG-a", memory_total_mib=19968, profile="2g.20gb"),
            MigDevice(index=1, uuid="MIG-b", memory_total_mib=19968, profile="1g.20gb"),
            MigDevice(index=2, uuid="MIG-c", memory_total_mib=9728))
    card = Gpu(index=0, uuid=UUID, name="NVIDIA H100 80GB HBM3", memory_total_mib=81559,
               memory_used_mib=0, memory_free_mib=81559, utilization_gpu=None,
               utilization_memory=None, temperature_c=40, power_w=70.0, mig_enabled=True,
               mig_devices=migs, processes=(), jetson=False)
    inventory = Inventory(available=True, driver_version="550.54", cuda_version="12.4",
                          gpus=(card,))
    config = load_config({}, data_dir=str(tmp_path / "data"))

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), None, actor, read_inventory=lambda: inventory)

    page = create_app(config, context_factory=context).test_client().get("/gpus").data.decode()
    assert ("MIG 0: 2g.20gb · 19968 MiB</span>, <span class=\"mig\">MIG 1: 1g.20gb · 19968 MiB"
            "</span>, <span class=\"mig\">MIG 2: profile unknown · 9728 MiB") in page
