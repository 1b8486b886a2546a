"""The GPU memory watchdog on real rootless Podman: real container processes are attributed to
their Spaces through their PID namespace, and a Space over its shared budget past the grace
is stopped while the others keep serving.

Only NVML is faked: inventories are built as nvml.Inventory objects listing the real host PIDs
of processes inside the containers, and one pass goes through the real nvidia-ml-py against
the fake libnvidia-ml.so.1 (tests/nvml_fake) in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import requests
from conftest import make_space_repo

from appliance import stages
from appliance.config import SETTINGS
from appliance.core import spaces
from appliance.gpu import nvml, watchdog

pytestmark = pytest.mark.podman

GPU0, GPU1 = "GPU-fake-0", "GPU-fake-1"
A, B = "gpuwd/a", "gpuwd/b"
BUDGET = 1000
README = "---\nsdk: docker\napp_port: 8000\n---\n"
DOCKERFILE = ("FROM localhost/appliance-python:3.11\nCOPY index.html /srv/index.html\n"
              'CMD ["python3", "-m", "http.server", "8000", "--directory", "/srv"]\n')


@pytest.fixture(scope="module")
def deployed(appliance_env):
    """Two tiny docker Spaces (an http.server each), built and started once for the module."""
    ctx, sources_dir = appliance_env
    urls = {}
    for space_id in (A, B):
        name = space_id.split("/")[1]
        repo = make_space_repo(sources_dir / f"gpuwd-{name}", {
            "README.md": README, "Dockerfile": DOCKERFILE, "index.html": f"space {name}\n"})
        spaces.add_space(ctx, str(repo), name=space_id)
        view = spaces.deploy(ctx, space_id)
        assert view["stage"] == stages.RUNNING, view["error"]
        urls[space_id] = view["url"]
    yield ctx, urls
    for space_id in (A, B):
        spaces.delete(ctx, space_id)


@pytest.fixture
def gpu_spaces(deployed):
    """Both Spaces serving, each with a shared budget of 1000 MiB on GPU 0, none over it."""
    ctx, urls = deployed
    for space_id in (A, B):
        if spaces.describe(ctx, space_id)["stage"] != stages.RUNNING:
            assert spaces.start(ctx, space_id)[1]["stage"] == stages.RUNNING
        ctx.store.set_allocation(space_id, "shared", [GPU0], None, BUDGET, "test")
        ctx.store.update_space(space_id, gpu_over_since=None)
    return ctx, urls


def init_pid(ctx, space_id: str) -> int:
    pid = ctx.runtime.init_pid(ctx.store.get_space(space_id)["container"])
    assert pid, f"{space_id}'s container reports no init PID"
    return pid


def app_pid(ctx, space_id: str) -> int:
    """The host PID of the app inside the Space's container (the child of its init)."""
    init = init_pid(ctx, space_id)
    children = [int(pid) for task in Path(f"/proc/{init}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    assert children, f"{space_id}'s init process {init} has no child"
    return children[0]


def inventory(*processes: tuple[str, int, int]) -> nvml.Inventory:
    """Two GPUs listing (gpu uuid, host pid, MiB) processes, as NVML would report them."""
    cards = []
    for index, uuid in enumerate((GPU0, GPU1)):
        cards.append(nvml.Gpu(
            index=index, uuid=uuid, name="NVIDIA L4", memory_total_mib=23034,
            memory_used_mib=None, memory_free_mib=None, utilization_gpu=None,
            utilization_memory=None, temperature_c=None, power_w=None, mig_enabled=False,
            mig_devices=(), jetson=False,
            processes=tuple(nvml.GpuProcess(pid, mib) for card, pid, mib in processes
                            if card == uuid)))
    return nvml.Inventory(available=True, driver_version="550.54.15", gpus=tuple(cards))


def answers(url: str) -> str | None:
    """The app's page at url, or None when the router says the Space is not running."""
    response = requests.get(url, timeout=5)
    return response.text if response.status_code == 200 else None


def host_process() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)


def test_gpu_processes_are_attributed_to_their_spaces_by_pid_namespace(gpu_spaces):
    ctx, _ = gpu_spaces
    gone = subprocess.Popen(["true"])
    gone.wait()
    seen = inventory(
        (GPU0, app_pid(ctx, A), 500),
        (GPU0, app_pid(ctx, B), 1000),
        (GPU1, init_pid(ctx, B), 500),  # the same Space on a second GPU: summed
        (GPU1, os.getpid(), 700),
        (GPU1, gone.pid, 900),  # ended between NVML's reading and /proc's: ignored
    )
    attributed, unattributed = watchdog.attribute_processes(ctx, seen)
    assert attributed == {A: 500, B: 1500}
    assert unattributed == [{"pid": os.getpid(), "used_mib": 700, "gpu_uuid": GPU1}]


def test_space_over_budget_is_stopped_after_the_grace_and_the_others_keep_serving(gpu_spaces):
    ctx, urls = gpu_spaces
    grace = ctx.config.gpu_quota_grace
    bystander = host_process()
    try:
        seen = inventory((GPU0, app_pid(ctx, A), 500), (GPU0, app_pid(ctx, B), 1500),
                         (GPU0, bystander.pid, 4000))
        start = time.time()
        first = watchdog.enforce_once(ctx, seen, now=start)
        assert (first.attributed, first.over_budget, first.stopped) == (
            {A: 500, B: 1500}, [B], [])
        assert first.unattributed == [{"pid": bystander.pid, "used_mib": 4000, "gpu_uuid": GPU0}]
        assert ctx.store.get_space(B)["gpu_over_since"] is not None
        assert answers(urls[B]) == "space b\n"
        assert watchdog.enforce_once(ctx, seen, now=start + grace / 2).stopped == []
        assert spaces.describe(ctx, B)["stage"] == stages.RUNNING

        last = watchdog.enforce_once(ctx, seen, now=start + grace + 1)
        assert (last.stopped, last.errors) == ([B], [])
        view = spaces.describe(ctx, B)
        assert view["stage"] == stages.RUNTIME_ERROR and view["url"] is None
        assert view["error"] == "GPU memory quota exceeded: used 1500 MiB of 1000 MiB"
        [event] = [e for e in ctx.store.events(B, 20) if e["kind"] == "gpu:quota-exceeded"]
        assert event["detail"] == {"from": stages.RUNNING, "used_mib": 1500, "budget_mib": 1000}
        assert ctx.store.get_space(B)["gpu_over_since"] is None
        assert [row["space_id"] for row in ctx.store.allocations()] == [A]
        assert ctx.runtime.containers(B) == []
        assert answers(urls[B]) is None
        assert answers(urls[A]) == "space a\n"
        assert spaces.describe(ctx, A)["stage"] == stages.RUNNING
        assert bystander.poll() is None  # a process of no Space is reported, never touched
    finally:
        bystander.kill()
        bystander.wait()


def test_space_back_under_budget_before_the_grace_is_not_stopped(gpu_spaces):
    ctx, urls = gpu_spaces
    grace = ctx.config.gpu_quota_grace
    a, b = app_pid(ctx, A), app_pid(ctx, B)
    start = time.time()
    over = inventory((GPU0, a, 500), (GPU0, b, 1500))
    assert watchdog.enforce_once(ctx, over, now=start).over_budget == [B]
    assert ctx.store.get_space(B)["gpu_over_since"] is not None
    under = inventory((GPU0, a, 500), (GPU0, b, 800))
    report = watchdog.enforce_once(ctx, under, now=start + grace / 2)
    assert (report.over_budget, report.stopped) == ([], [])
    assert ctx.store.get_space(B)["gpu_over_since"] is None
    # Over again: the grace starts afresh, so a pass past the first grace stops nothing.
    again = watchdog.enforce_once(ctx, over, now=start + grace + 1)
    assert (again.over_budget, again.stopped) == ([B], [])
    assert answers(urls[B]) == "space b\n"


def test_whole_gpu_and_mig_allocations_are_not_budget_limited(gpu_spaces):
    ctx, urls = gpu_spaces
    ctx.store.set_allocation(A, "gpu", [GPU0], None, None, "test")
    ctx.store.set_allocation(B, "mig", [GPU1], "MIG-fake-1", None, "test")
    seen = inventory((GPU0, app_pid(ctx, A), 20000), (GPU1, app_pid(ctx, B), 9000))
    start = time.time()
    for now in (start, start + ctx.config.gpu_quota_grace + 1):
        report = watchdog.enforce_once(ctx, seen, now=now)
        assert report.attributed == {A: 20000, B: 9000}
        assert (report.over_budget, report.stopped) == ([], [])
    assert answers(urls[A]) == "space a\n" and answers(urls[B]) == "space b\n"


def test_unreadable_inventory_judges_no_space(gpu_spaces):
    ctx, _ = gpu_spaces
    ctx.store.update_space(B, gpu_over_since="2024-01-01T00:00:00.000+00:00")
    missing = nvml.Inventory(available=False, reason="no NVIDIA driver")
    report = watchdog.enforce_once(ctx, missing, now=time.time())
    assert report == watchdog.WatchdogReport()
    assert ctx.store.get_space(B)["gpu_over_since"] == "2024-01-01T00:00:00.000+00:00"
    assert spaces.describe(ctx, B)["stage"] == stages.RUNNING


ENFORCE = (
    "import json, sys\n"
    "from dataclasses import asdict\n"
    "from appliance.core import spaces\n"
    "from appliance.gpu import watchdog\n"
    "from appliance.config import load_config\n"
    "ctx = spaces.open_context(load_config(), actor='scheduler')\n"
    "print(json.dumps(asdict(watchdog.enforce_once(ctx, now=float(sys.argv[1])))))\n"
)


def test_a_pass_reads_the_gpus_through_nvml_itself(gpu_spaces, fake_nvml, tmp_path):
    ctx, urls = gpu_spaces
    config = tmp_path / "nvml.conf"
    config.write_text(
        f'driver 550.54.15\ngpu index=0 name="NVIDIA L4" uuid={GPU0} mem_total_mib=23034\n'
        f"process gpu=0 pid={app_pid(ctx, A)} used_mib=500\n"
        f"process gpu=0 pid={app_pid(ctx, B)} used_mib=1500\n"
        f"process gpu=0 pid={os.getpid()} used_mib=300\n")
    env = {**os.environ, "LD_LIBRARY_PATH": str(fake_nvml), "FAKE_NVML_CONFIG": str(config),
           **{f"APPLIANCE_{s.name.upper()}": str(ctx.config.values[s.name]) for s in SETTINGS
              if s.name != "config_file"}}
    done = subprocess.run([sys.executable, "-c", ENFORCE, str(time.time())], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == asdict(watchdog.WatchdogReport(
        attributed={A: 500, B: 1500}, over_budget=[B],
        unattributed=[{"pid": os.getpid(), "used_mib": 300, "gpu_uuid": GPU0}]))
    assert ctx.store.get_space(B)["gpu_over_since"] is not None
    assert answers(urls[B]) == "space b\n"
