"""GPU telemetry against a real SQLite file: samples per GPU and per Space, downsampling by age,
and one sample through the real nvidia-ml-py against the fake libnvidia-ml.so.1.

Inventories are built as nvml.Inventory objects (NVML is the seam); Space attribution runs on
real rootless Podman containers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.adapters.runtime import LABEL_SPACE
from appliance.config import load_config
from appliance.core import spaces
from appliance.errors import NotFound
from appliance.gpu import nvml, telemetry

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_PODMAN = "unix:///nonexistent/podman.sock"
GPU0, GPU1 = "GPU-6b3e0000-0000-0000-0000-000000000000", "GPU-6b3e0000-0000-0000-0000-000000000001"
# Midnight UTC, 5 January 2026: a whole number of hours (and 5-minute buckets) since the epoch.
START = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
DAY = 86400
INTERVAL = 10


def make_context(data_dir: Path, inventory: nvml.Inventory | None = None,
                 **overrides) -> spaces.Context:
    config = load_config({}, data_dir=str(data_dir), podman_url=NO_PODMAN,
                         podman_autostart=False, **overrides)
    ctx = spaces.open_context(config, actor="test")
    if inventory is not None:
        ctx.read_inventory = lambda: inventory
    return ctx


@pytest.fixture
def ctx(tmp_path):
    """A context on a real SQLite file, keeping raw samples a day and everything 30 days."""
    context = make_context(tmp_path / "data", telemetry_raw_hours=24, telemetry_keep_days=30)
    yield context
    context.store.close()


def card(index: int, uuid: str, processes: tuple[nvml.GpuProcess, ...] = (),
         **readings) -> nvml.Gpu:
    values = {"memory_total_mib": 23034, "memory_used_mib": 1024, "memory_free_mib": 22010,
              "utilization_gpu": 12, "utilization_memory": 3, "temperature_c": 41,
              "power_w": 62.5, **readings}
    return nvml.Gpu(index=index, uuid=uuid, name="NVIDIA L4", mig_enabled=False,
                   mig_devices=(), processes=processes, jetson=False, **values)


def inventory(*cards: nvml.Gpu) -> nvml.Inventory:
    return nvml.Inventory(available=True, driver_version="550.54.15", cuda_version="12.4",
                         gpus=cards)


def rows(ctx: spaces.Context, where: str = "1", params=()) -> list[dict]:
    return [dict(r) for r in ctx.store.db.query(
        f"select at, gpu_uuid, space_id, resolution, memory_used_mib, utilization_gpu, "
        f"temperature_c, power_w from gpu_samples where {where} order by at, gpu_uuid, space_id",
        list(params))]


def stamp(seconds: float) -> str:
    return telemetry._stamp(seconds)


# -- sampling -----------------------------------------------------------------------------------


def test_a_sample_writes_one_row_per_gpu_with_its_readings(ctx):
    ctx.read_inventory = lambda: inventory(
        card(0, GPU0), card(1, GPU1, memory_used_mib=0, utilization_gpu=0, temperature_c=30,
                            power_w=16.5))
    report = telemetry.sample_once(ctx, now=START)
    assert (report.gpus, report.space_rows, report.errors, report.reason) == (2, 0, [], None)
    at = "2026-01-05T00:00:00.000+00:00"
    assert report.at == at
    assert rows(ctx) == [
        {"at": at, "gpu_uuid": GPU0, "space_id": None, "resolution": 0, "memory_used_mib": 1024,
         "utilization_gpu": 12, "temperature_c": 41, "power_w": 62.5},
        {"at": at, "gpu_uuid": GPU1, "space_id": None, "resolution": 0, "memory_used_mib": 0,
         "utilization_gpu": 0, "temperature_c": 30, "power_w": 16.5},
    ]


def test_a_cpu_only_box_writes_nothing(ctx):
    ctx.read_inventory = lambda: nvml.Inventory(
        available=False, reason="no NVIDIA driver (libnvidia-ml.so.1 not found)")
    report = telemetry.sample_once(ctx, now=START)
    assert report.reason == "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    assert (report.gpus, report.errors) == (0, [])
    assert rows(ctx) == []


def test_readings_nvml_does_not_support_are_stored_as_null(ctx):
    ctx.read_inventory = lambda: inventory(card(
        0, GPU0, utilization_gpu=None, temperature_c=None, power_w=None))
    telemetry.sample_once(ctx, now=START)
    [row] = rows(ctx)
    assert (row["memory_used_mib"], row["utilization_gpu"], row["temperature_c"],
            row["power_w"]) == (1024, None, None, None)


def test_a_jetson_without_uuid_is_sampled_under_its_index(ctx):
    orin = nvml.Gpu(index=0, uuid="", name="Jetson AGX Orin", memory_total_mib=62828,
                   memory_used_mib=3846, memory_free_mib=58982, utilization_gpu=35,
                   utilization_memory=None, temperature_c=None, power_w=None,
                   mig_enabled=False, mig_devices=(), processes=(), jetson=True)
    telemetry.sample_once(ctx, inventory(orin), now=START)  # an inventory read already
    assert [(r["gpu_uuid"], r["memory_used_mib"]) for r in rows(ctx)] == [("index:0", 3846)]


def test_gpu_rows_are_kept_when_podman_cannot_be_reached(ctx):
    ctx.read_inventory = lambda: inventory(
        card(0, GPU0, processes=(nvml.GpuProcess(os.getpid(), 700),)))
    report = telemetry.sample_once(ctx, now=START)
    assert report.errors == [
        f"cannot attribute GPU memory to Spaces: Cannot reach Podman at {NO_PODMAN} — run "
        "'appliance doctor' for the fix (the Podman API service of the appliance account must "
        "be running)"]
    assert (report.gpus, report.space_rows) == (1, 0)
    assert [(r["gpu_uuid"], r["space_id"]) for r in rows(ctx)] == [(GPU0, None)]


def test_a_sample_that_cannot_be_stored_says_why(ctx):
    ctx.read_inventory = lambda: inventory(card(0, GPU0))
    ctx.store.db.execute("create trigger full before insert on gpu_samples "
                         "begin select raise(abort, 'database or disk is full'); end")
    report = telemetry.sample_once(ctx, now=START)
    assert report.errors == ["cannot store the GPU samples: database or disk is full"]
    assert report.gpus == 0


# -- downsampling -------------------------------------------------------------------------------


def simulate(ctx: spaces.Context, days: float, start: float = START) -> None:
    """Write raw samples every 10 s: GPU0 with a Space on it half of each 5 minutes, GPU1
    without power or utilisation readings."""
    batch = []
    for n in range(int(days * DAY / INTERVAL)):
        at, slot = stamp(start + n * INTERVAL), n % 30  # slot within its 5-minute bucket
        batch += [
            {"at": at, "gpu_uuid": GPU0, "space_id": None, "resolution": 0,
             "memory_used_mib": 1000 + slot, "utilization_gpu": slot % 2 * 100,
             "temperature_c": 40 + n % 360 // 30, "power_w": 60.0 + slot},
            {"at": at, "gpu_uuid": GPU1, "space_id": None, "resolution": 0,
             "memory_used_mib": 500, "utilization_gpu": None, "temperature_c": 35,
             "power_w": None},
        ]
        if slot < 15:
            batch.append({"at": at, "gpu_uuid": GPU0, "space_id": "team/a", "resolution": 0,
                          "memory_used_mib": 600, "utilization_gpu": None,
                          "temperature_c": None, "power_w": None})
    ctx.store.add_gpu_samples(batch)


def counts(ctx: spaces.Context) -> dict[tuple[str, str | None, int], int]:
    return {(r["gpu_uuid"], r["space_id"], r["resolution"]): r["n"] for r in ctx.store.db.query(
        "select gpu_uuid, space_id, resolution, count(*) as n from gpu_samples "
        "group by gpu_uuid, space_id, resolution")}


def test_raw_samples_older_than_a_day_become_five_minute_averages(ctx):
    simulate(ctx, days=2)
    now = START + 2 * DAY + 95  # mid-bucket: the bucket before the cut-off stays raw, whole
    report = telemetry.downsample_once(ctx, now=now)
    raw_before = START + DAY  # now - 24 h, down to a 5-minute boundary
    assert counts(ctx) == {
        (GPU0, None, 0): 8640, (GPU1, None, 0): 8640, (GPU0, "team/a", 0): 4320,
        (GPU0, None, 300): 288, (GPU1, None, 300): 288, (GPU0, "team/a", 300): 288,
    }
    assert (report.raw_averaged, report.five_minute_rows) == (8640 * 2 + 4320, 288 * 3)
    assert (report.deleted, report.five_minute_averaged, report.hourly_rows) == (0, 0, 0)
    assert rows(ctx, "resolution = 0")[0]["at"] == stamp(raw_before)
    # The bucket at 01:10: memory 1000..1029 (mean 1014.5), utilisation 0/100 alternating,
    # temperature 42, power 60..89; GPU1 has no power or utilisation: the averages neither.
    # team/a held 600 MiB in 15 of the 30 samples: 300 MiB on average over the 5 minutes.
    bucket = stamp(START + 3600 + 600)
    assert rows(ctx, "at = ?", [bucket]) == [
        {"at": bucket, "gpu_uuid": GPU0, "space_id": None, "resolution": 300,
         "memory_used_mib": 1014.5, "utilization_gpu": 50.0, "temperature_c": 42.0,
         "power_w": 74.5},
        {"at": bucket, "gpu_uuid": GPU0, "space_id": "team/a", "resolution": 300,
         "memory_used_mib": 300.0, "utilization_gpu": None, "temperature_c": None,
         "power_w": None},
        {"at": bucket, "gpu_uuid": GPU1, "space_id": None, "resolution": 300,
         "memory_used_mib": 500.0, "utilization_gpu": None, "temperature_c": 35.0,
         "power_w": None},
    ]


def test_downsampling_twice_changes_nothing_the_second_time(ctx):
    simulate(ctx, days=2)
    now = START + 2 * DAY + 95
    telemetry.downsample_once(ctx, now=now)
    before = rows(ctx)
    again = telemetry.downsample_once(ctx, now=now)
    assert not again.changed
    assert (again.deleted, again.raw_averaged, again.five_minute_rows,
            again.five_minute_averaged, again.hourly_rows, again.errors) == (0, 0, 0, 0, 0, [])
    assert rows(ctx) == before


def test_five_minute_averages_older_than_a_week_become_hourly_and_a_month_is_kept(ctx):
    simulate(ctx, days=2)
    telemetry.downsample_once(ctx, now=START + 2 * DAY)
    # Eight and a half days on: the first day and a half is older than a week.
    report = telemetry.downsample_once(ctx, now=START + 8.5 * DAY)
    assert (report.raw_averaged, report.five_minute_rows) == (8640 * 2 + 4320, 288 * 3)
    assert (report.five_minute_averaged, report.hourly_rows) == (432 * 3, 36 * 3)
    assert counts(ctx) == {
        (GPU0, None, 300): 144, (GPU1, None, 300): 144, (GPU0, "team/a", 300): 144,
        (GPU0, None, 3600): 36, (GPU1, None, 3600): 36, (GPU0, "team/a", 3600): 36,
    }
    # Each hour of GPU0 averages twelve identical 5-minute rows; the temperature climbs by
    # one degree a 5-minute bucket and starts over every hour: 40..51, mean 45.5.
    hour = rows(ctx, "resolution = 3600 and gpu_uuid = ? and space_id is null", [GPU0])[0]
    assert hour == {"at": stamp(START), "gpu_uuid": GPU0, "space_id": None, "resolution": 3600,
                    "memory_used_mib": 1014.5, "utilization_gpu": 50.0, "temperature_c": 45.5,
                    "power_w": 74.5}
    assert rows(ctx, "resolution = 3600 and space_id = 'team/a'")[0]["memory_used_mib"] == 300
    # A month after the first sample its first day is gone, whatever its resolution; the
    # last 5-minute rows are now over a week old too.
    late = telemetry.downsample_once(ctx, now=START + 31 * DAY)
    assert (late.deleted, late.five_minute_averaged, late.hourly_rows) == (24 * 3, 144 * 3, 36)
    assert rows(ctx)[0]["at"] == stamp(START + DAY)
    assert counts(ctx) == {(GPU0, None, 3600): 24, (GPU1, None, 3600): 24,
                           (GPU0, "team/a", 3600): 24}


def test_a_failed_downsampling_step_changes_nothing_and_the_next_pass_does_it(ctx):
    simulate(ctx, days=1.5)
    before = rows(ctx)
    # The averages are written, then the delete of the raw rows fails (a full disk, say):
    # the transaction takes the averages back with it.
    ctx.store.db.execute("create trigger full before delete on gpu_samples "
                         "begin select raise(abort, 'database or disk is full'); end")
    report = telemetry.downsample_once(ctx, now=START + 1.5 * DAY)
    assert report.errors == ["cannot thin out the GPU samples: database or disk is full"]
    assert rows(ctx) == before
    ctx.store.db.execute("drop trigger full")
    report = telemetry.downsample_once(ctx, now=START + 1.5 * DAY)
    assert (report.raw_averaged, report.five_minute_rows, report.errors) == (
        4320 * 2 + 2160, 144 * 3, [])


# -- reading ------------------------------------------------------------------------------------


def test_history_and_usage_merge_resolutions_oldest_first(ctx):
    simulate(ctx, days=2)
    now = START + 2 * DAY
    telemetry.downsample_once(ctx, now=now)
    history = telemetry.history(ctx, GPU0, hours=25, now=now)
    assert [r["resolution"] for r in history[:12]] == [300] * 12
    assert {r["resolution"] for r in history[12:]} == {0}
    assert len(history) == 12 + 8640
    assert [r["at"] for r in history] == sorted(r["at"] for r in history)
    assert history[0] == {"at": stamp(now - 25 * 3600), "resolution": 300,
                          "memory_used_mib": 1014.5, "utilization_gpu": 50.0,
                          "temperature_c": 40.0, "power_w": 74.5}
    usage = telemetry.usage(ctx, "team/a", hours=25, now=now)
    assert len(usage) == 12 + 4320
    assert usage[0] == {"at": stamp(now - 25 * 3600), "gpu_uuid": GPU0, "resolution": 300,
                        "memory_used_mib": 300.0}
    assert usage[-1] == {"at": stamp(now - 16 * INTERVAL), "gpu_uuid": GPU0, "resolution": 0,
                         "memory_used_mib": 600}
    assert telemetry.usage(ctx, "team/none", now=now) == []
    ctx.read_inventory = lambda: inventory(card(0, GPU0))
    assert telemetry.history(ctx, "0", hours=25, now=now) == history


def test_a_gpu_is_named_by_index_or_uuid(ctx):
    ctx.read_inventory = lambda: inventory(card(0, GPU0), card(1, GPU1))
    assert telemetry.resolve_gpu(ctx, "1") == GPU1
    assert telemetry.resolve_gpu(ctx, "GPU-gone") == "GPU-gone"
    with pytest.raises(NotFound) as missing:
        telemetry.resolve_gpu(ctx, "2")
    assert (missing.value.message, missing.value.hint) == (
        "No GPU with index 2", "see 'appliance gpus list'")
    ctx.read_inventory = lambda: nvml.Inventory(available=False, reason="no NVIDIA driver")
    with pytest.raises(NotFound) as unavailable:
        telemetry.resolve_gpu(ctx, "0")
    assert unavailable.value.message == "Cannot find GPU 0: no NVIDIA driver"


# -- Spaces on real Podman ----------------------------------------------------------------------


@pytest.mark.podman
def test_each_space_gets_a_row_per_gpu_with_the_memory_its_processes_hold(appliance_env):
    env_ctx, _ = appliance_env
    names, ports = {}, set()
    try:
        for space_id in ("tele/a", "tele/b"):
            name = f"telemetry-{space_id.split('/')[1]}-{os.getpid()}"
            ports.add(spaces.allocate_port(env_ctx, exclude=ports))
            names[space_id] = name
            env_ctx.runtime.run(name, "localhost/appliance-python:3.11", max(ports), 8000,
                                env={}, labels={LABEL_SPACE: space_id}, volumes={},
                                enforce_limits=False, command=["sleep", "300"])
        pid = {space_id: env_ctx.runtime.init_pid(name) for space_id, name in names.items()}
        assert all(pid.values()), pid
        seen = inventory(
            card(0, GPU0, processes=(nvml.GpuProcess(pid["tele/a"], 500),
                                     nvml.GpuProcess(pid["tele/b"], 1000),
                                     nvml.GpuProcess(os.getpid(), 700))),  # no Space's
            card(1, GPU1, processes=(nvml.GpuProcess(pid["tele/b"], 300),)))
        ctx = spaces.Context(env_ctx.config, env_ctx.store, env_ctx.runtime, "test",
                             read_inventory=lambda: seen)
        report = telemetry.sample_once(ctx, now=START)
        assert (report.gpus, report.space_rows, report.errors) == (2, 3, [])
        assert [(r["gpu_uuid"], r["space_id"], r["memory_used_mib"]) for r in rows(ctx)] == [
            (GPU0, None, 1024), (GPU0, "tele/a", 500), (GPU0, "tele/b", 1000),
            (GPU1, None, 1024), (GPU1, "tele/b", 300),
        ]
    finally:
        for name in names.values():
            env_ctx.runtime.remove_container(name)


# -- the real pynvml path -----------------------------------------------------------------------


SAMPLE = (
    "import dataclasses, json, sys\n"
    "from appliance.core import spaces\n"
    "from appliance.gpu import telemetry\n"
    "from appliance.config import load_config\n"
    "config = load_config({}, data_dir=sys.argv[1], podman_url=sys.argv[2],\n"
    "                     podman_autostart=False)\n"
    "ctx = spaces.open_context(config, actor='test')\n"
    "print(json.dumps(dataclasses.asdict(telemetry.sample_once(ctx, now=float(sys.argv[3])))))\n"
)


def test_a_sample_through_nvml_lands_in_the_database_file(fake_nvml, tmp_path):
    config = tmp_path / "nvml.conf"
    config.write_text(f"""
driver 550.54.15
cuda 12040
gpu index=0 name="NVIDIA A100-SXM4-40GB" uuid={GPU0} mem_total_mib=40960 mem_used_mib=1024 \
util_gpu=12 temp_c=41 power_mw=62000 mig=0
gpu index=1 name="NVIDIA L4" uuid={GPU1} mem_total_mib=23034 mem_used_mib=0 temp_c=30 \
power_mw=16500
error nvmlDeviceGetPowerUsage NVML_ERROR_NOT_SUPPORTED gpu=1
""")
    env = {**os.environ, "LD_LIBRARY_PATH": str(fake_nvml), "FAKE_NVML_CONFIG": str(config),
           "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SAMPLE, str(tmp_path / "data"), NO_PODMAN, str(START)],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["gpus"], report["space_rows"], report["errors"]) == (2, 0, [])
    db = sqlite3.connect(tmp_path / "data" / "appliance.db")
    found = db.execute("select at, gpu_uuid, space_id, resolution, memory_used_mib, "
                       "utilization_gpu, temperature_c, power_w from gpu_samples "
                       "order by gpu_uuid").fetchall()
    db.close()
    at = "2026-01-05T00:00:00.000+00:00"
    assert found == [
        (at, GPU0, None, 0, 1024, 12, 41, 62.0),
        (at, GPU1, None, 0, 0, None, 30, None),  # no util_gpu line, power NOT_SUPPORTED
    ]


def test_gpus_history_command_shows_samples_and_explains_a_missing_gpu(tmp_path):
    import json as json_module
    from datetime import UTC, datetime

    from click.testing import CliRunner

    from appliance.cli.main import cli
    from appliance.config import load_config

    ctx = spaces.open_context(load_config({}, data_dir=str(tmp_path / "data")))
    at = datetime.now(UTC).isoformat(timespec="seconds")
    ctx.store.add_gpu_samples([{"at": at, "gpu_uuid": "GPU-hist", "space_id": None,
                                "resolution": 0, "memory_used_mib": 1234.0,
                                "utilization_gpu": 56.0, "temperature_c": 40.0,
                                "power_w": 70.0}])
    runner = CliRunner()
    result = runner.invoke(cli, ["gpus", "history", "GPU-hist", "--json"], obj={"ctx": ctx})
    assert result.exit_code == 0, result.output
    assert json_module.loads(result.output)[0]["memory_used_mib"] == 1234.0
    text = runner.invoke(cli, ["gpus", "history", "GPU-hist"], obj={"ctx": ctx}).output
    assert "1234 MiB" in text and "56%" in text
    result = runner.invoke(cli, ["gpus", "history"], obj={"ctx": ctx})
    assert result.exit_code == 2
    assert "Name a GPU (index or UUID) or a Space with --space" in result.output
