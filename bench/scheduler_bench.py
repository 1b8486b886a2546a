"""Benchmark the scheduler's steady work: health sweeps, reconcile passes, recovery of a dead Space.

Run as root on a box set up by scripts/setup.sh (the service account's Podman API must answer,
and localhost/appliance-python:3.11 must exist):

    .venv/bin/python bench/scheduler_bench.py            # 100 Spaces, 50 running: ~6 minutes
    .venv/bin/python bench/scheduler_bench.py --running 4 --stopped 4 --results /tmp/s  # dev

See bench/README.md for what each figure means and the targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import pwd
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from appliance.adapters import router  # noqa: E402
from appliance.adapters.runtime import LABEL_INSTANCE  # noqa: E402
from appliance.config import Config, load_config  # noqa: E402
from appliance.core import builds, jobs, spaces  # noqa: E402
from appliance.core.manifest import load_manifest  # noqa: E402
from appliance.errors import ApplianceError  # noqa: E402
from appliance.upkeep import health, reconcile, scheduler  # noqa: E402

BASE_IMAGE = "localhost/appliance-python:3.11"
PORT_RANGE = "18300-18599"  # integration tests own 17000-17999, the deploy bench 18000-18199
HEALTH_INTERVAL = 10.0  # the interval the issue's target is stated at (the default)
TARGETS = {"sweep_core_fraction": 0.02, "recovery_intervals": 2}
URL_POLL = 0.05  # recovery: how often the Space's url is polled
APP_POLL = 0.02  # app start: how often the fresh container's port is polled
RECOVERY_DEADLINE = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

README = """---
title: Scheduler bench
sdk: static
---
A tiny static Space for the scheduler benchmark.
"""
INDEX = "<!doctype html><title>scheduler bench</title><p>alive</p>\n"


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- small helpers ---------------------------------------------------------------------------


def now() -> float:
    return time.monotonic()


def stats(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, p95 (nearest rank), min, max and the raw values."""
    if not values:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None, "values": []}
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, -(-95 * len(ordered) // 100) - 1))
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "p95": round(ordered[rank], digits), "min": round(ordered[0], digits),
            "max": round(ordered[-1], digits), "values": [round(v, digits) for v in values]}


def run(cmd: list[str], cwd: Path | None = None, check: bool = True, timeout: float = 300,
        ) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done


@dataclass
class ServiceUser:
    name: str
    uid: int
    home: str

    @classmethod
    def of(cls, config: Config) -> ServiceUser:
        account = pwd.getpwnam(config.service_user)
        return cls(account.pw_name, account.pw_uid, account.pw_dir)

    def podman(self, *args: str, check: bool = True, timeout: float = 300,
               ) -> subprocess.CompletedProcess:
        return run(["runuser", "-u", self.name, "--", "env",
                    f"XDG_RUNTIME_DIR=/run/user/{self.uid}", f"HOME={self.home}", "podman",
                    *args], check=check, timeout=timeout)


def make_repo(dest: Path) -> None:
    """One git repository holding a tiny static Space, committed on main."""
    dest.mkdir(parents=True)
    (dest / "README.md").write_text(README)
    (dest / "index.html").write_text(INDEX)
    run(["git", "init", "-q", "-b", "main"], cwd=dest)
    run(["git", "add", "-A"], cwd=dest)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q",
         "-m", "Initial commit"], cwd=dest)


def proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads, plus reaped children) of a process."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ')' field 3 (state) is index 0, so utime..cstime (14..17) are 11..14.
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def podman_service_pid(config: Config) -> int | None:
    """Find the `podman system service` process serving this appliance's API socket."""
    socket_url = config.podman_socket_url
    uid = config.service_uid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            owner = entry.stat().st_uid
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if (owner == uid and words and os.path.basename(words[0]) == "podman"
                and words[1:3] == ["system", "service"]
                and (socket_url in words or socket_url[len("unix://"):] in words)):
            found.append(int(entry.name))
    return min(found) if found else None


def get_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return requests.get(url, timeout=timeout, allow_redirects=False,
                            headers={"Connection": "close"}).status_code == 200
    except requests.RequestException:
        return False


def parse_at(text: str) -> float:
    """An event's ISO timestamp (the store's) as a time.time() value."""
    return datetime.fromisoformat(text).timestamp()


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Bench:
    config: Config
    user: ServiceUser
    root: Path
    nonce: str
    created_spaces: list[str] = field(default_factory=list)
    created_containers: list[str] = field(default_factory=list)

    def space_id(self, index: int) -> str:
        return f"bench/sched-{self.nonce}-{index:03d}"

    def load(self) -> dict[str, Any]:
        return {"loadavg_1m": round(os.getloadavg()[0], 2), "running_containers": sum(
            1 for line in self.user.podman("ps", "-q", check=False).stdout.splitlines()
            if line.strip())}


def setup_spaces(ctx: spaces.Context, bench: Bench, repo: Path, running: int,
                 stopped: int) -> dict[str, Any]:
    """Deploy running + stopped Spaces one after the other; stop the last `stopped` of them."""
    deploy_s: list[float] = []
    stop_s: list[float] = []
    retried: list[dict[str, str]] = []
    started = now()
    for index in range(running + stopped):
        space_id = bench.space_id(index)
        t0 = now()
        spaces.add_space(ctx, str(repo), name=space_id)
        bench.created_spaces.append(space_id)
        view = deploy_with_retries(ctx, space_id, retried)
        deploy_s.append(now() - t0)
        if view["stage"] != "RUNNING":
            raise BenchError(f"Deploying {space_id} ended in {view['stage']}: {view['error']}")
        if index >= running:
            t0 = now()
            view = spaces.stop(ctx, space_id)
            stop_s.append(now() - t0)
            if view["stage"] != "STOPPED":
                raise BenchError(f"Stopping {space_id} ended in {view['stage']}")
        if (index + 1) % 10 == 0:
            print(f"  {index + 1}/{running + stopped} Spaces deployed "
                  f"({now() - started:.0f} s)", flush=True)
    rows = ctx.store.list_spaces()
    counts = {"registered": len(rows),
              "running": sum(1 for r in rows if r["stage"] == "RUNNING" and r["container"]),
              "stopped": sum(1 for r in rows if r["stage"] == "STOPPED")}
    if counts != {"registered": running + stopped, "running": running, "stopped": stopped}:
        raise BenchError(f"Expected {running} running and {stopped} stopped Spaces, got {counts}")
    return {**counts, "setup_s": round(now() - started, 1), "deploy_s": stats(deploy_s),
            "stop_s": stats(stop_s), "deploys_retried": retried}


def deploy_with_retries(ctx: spaces.Context, space_id: str, retried: list) -> dict[str, Any]:
    """Deploy; on a failure, deploy again (twice at most), noting each retry.

    Others share this Podman: a prune elsewhere can remove an image or layer while a build
    or a listing looks at it ("image not known", "layer not known"), and a crash test kills
    and restarts the API service. Neither says anything about the scheduler.
    """
    for attempt in range(3):
        try:
            view = spaces.deploy(ctx, space_id)
            error = view["error"]
        except ApplianceError as exc:
            view = spaces.describe(ctx, space_id)
            error = f"{type(exc).__name__}: {exc.message}"
            if view["stage"] == "RUNNING" and view["url"]:  # failed after the switch
                retried.append({"space": space_id, "error": error.splitlines()[0],
                                "kept": True})
                return view
        if view["stage"] == "RUNNING":
            return view
        retryable = view["stage"] in ("BUILD_ERROR", "RUNTIME_ERROR")
        if attempt == 2 or not retryable:
            raise BenchError(f"Deploying {space_id} ended in {view['stage']}: {error}")
        retried.append({"space": space_id, "error": (error or "").splitlines()[0][:300]})
        print(f"  {space_id}: {retried[-1]['error']}; deploying again", flush=True)
        time.sleep(2)
    raise AssertionError("unreachable")


def measure_cpu(label: str, step, count: int, config: Config, check,
                pause: float = 0.5) -> dict[str, Any]:
    """Run step() count times; CPU of this process (all threads) and of the Podman service.

    check(result) returns None for a sample that counts, or why it does not (a pass that had
    work to do, a failure caused by others sharing Podman); those are recorded and left out.
    """
    cpu_ms: list[float] = []
    wall_ms: list[float] = []
    podman_ms: list[float] = []
    skipped: list[str] = []
    loads = []
    idle_cpu = idle_s = 0.0
    for _ in range(count):
        # Let the previous step's sockets and threads settle; meanwhile, measure what the
        # Podman service spends on others (it is shared: tests, other appliances).
        pid = podman_service_pid(config)
        i0, t0 = proc_cpu(pid), now()
        time.sleep(pause)
        i1, t1 = proc_cpu(pid), now()
        if i0 is not None and i1 is not None:
            idle_cpu, idle_s = idle_cpu + i1 - i0, idle_s + t1 - t0
        loads.append(os.getloadavg()[0])
        p0 = proc_cpu(pid)
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            result = step()
            reason = None
        except ApplianceError as exc:
            reason = f"{type(exc).__name__}: {exc.message.splitlines()[0][:200]}"
        c1, w1 = time.process_time(), time.perf_counter()
        p1 = proc_cpu(pid)
        if reason is None:
            reason = check(result)
        if reason is not None:
            skipped.append(reason)
            continue
        cpu_ms.append((c1 - c0) * 1000)
        wall_ms.append((w1 - w0) * 1000)
        if p0 is not None and p1 is not None and podman_service_pid(config) == pid:
            podman_ms.append((p1 - p0) * 1000)
    if len(cpu_ms) < max(1, count // 2):
        raise BenchError(f"{label}: only {len(cpu_ms)} of {count} samples counted: {skipped}")
    print(f"  {label}: median {statistics.median(cpu_ms):.1f} ms CPU, "
          f"{statistics.median(wall_ms):.0f} ms wall"
          + (f", podman service {sum(podman_ms) / len(podman_ms):.0f} ms CPU" if podman_ms
             else "")
          + (f" (background {idle_cpu / idle_s * 1000:.0f} ms/s)" if idle_s else "")
          + (f"; {len(skipped)} left out: {skipped}" if skipped else ""),
          flush=True)
    mean = sum(podman_ms) / len(podman_ms) if podman_ms else None
    background = idle_cpu / idle_s if idle_s else None  # CPU seconds per second
    return {
        "cpu_ms": stats(cpu_ms, 2), "wall_ms": stats(wall_ms, 1),
        # /proc counts in clock ticks (10 ms); the mean over the passes is the figure to use.
        # net_mean takes off what the service spent on others between the steps, at the
        # same rate, over the mean wall time of a step.
        "podman_service_cpu_ms": {
            **stats(podman_ms, 1), "mean": None if mean is None else round(mean, 1),
            "background_ms_per_s": None if background is None else round(background * 1000, 1),
            "net_mean": None if mean is None or background is None else round(
                max(0.0, mean - background * statistics.mean(wall_ms)), 1),
            "resolution_ms": round(1000 / CLK_TCK, 1)},
        "loadavg_1m": stats(loads, 2),
        "left_out": skipped,
    }


def reconcile_calls(ctx: spaces.Context, count: int) -> dict[str, Any]:
    """Where a reconcile pass's Podman time goes: its two listings, each timed on its own."""
    calls = {"containers": ctx.runtime.containers,
             "labelled_images": ctx.runtime.labelled_images}
    out: dict[str, Any] = {}
    for name, call in calls.items():
        wall_ms, podman_ms = [], []
        for _ in range(count):
            time.sleep(0.3)
            pid = podman_service_pid(ctx.config)
            p0, w0 = proc_cpu(pid), time.perf_counter()
            call()
            w1, p1 = time.perf_counter(), proc_cpu(pid)
            wall_ms.append((w1 - w0) * 1000)
            if p0 is not None and p1 is not None:
                podman_ms.append((p1 - p0) * 1000)
        out[name] = {"wall_ms": stats(wall_ms, 1), "podman_service_cpu_ms": {
            **stats(podman_ms, 1),
            "mean": round(sum(podman_ms) / len(podman_ms), 1) if podman_ms else None}}
    print("  per call: " + ", ".join(
        f"{n} {v['wall_ms']['median']:.0f} ms wall / {v['podman_service_cpu_ms']['mean']} ms "
        f"podman CPU" for n, v in out.items()), flush=True)
    return out


def podman_store_size(user: ServiceUser) -> dict[str, int]:
    """How many containers and images the shared Podman holds (its listings walk them all)."""
    def count(*args: str) -> int:
        return sum(1 for line in user.podman(*args, check=False).stdout.splitlines()
                   if line.strip())
    return {"containers_all": count("ps", "-a", "-q"), "images_all": count("images", "-a", "-q"),
            "images_tagged": count("images", "-q")}


def check_sweep(expected: int):
    def check(report: health.HealthReport) -> str | None:
        if len(report.healthy) != expected or report.unhealthy:
            return (f"{len(report.healthy)} healthy of {expected}, unhealthy "
                    f"{report.unhealthy}")
        return None
    return check


def check_converged(report) -> str | None:
    if report is not None and (report.changed or report.errors):
        return f"the pass was not idle: {report}"
    return None


class ReconcileLoop(threading.Thread):
    """Run the scheduler's reconcile job every `interval` seconds, at a fixed rate."""

    def __init__(self, config: Config, interval: float):
        super().__init__(daemon=True)
        self.config, self.interval = config, interval
        self.halt = threading.Event()
        self.passes: list[tuple[float, float]] = []  # (start, end), monotonic

    def run(self) -> None:
        due = now()
        while not self.halt.is_set():
            start = now()
            scheduler_step(self.config, "reconcile")  # fresh context, real spawn_job
            self.passes.append((start, now()))
            due += self.interval
            while due < now():  # coalesce missed runs, as APScheduler does
                due += self.interval
            self.halt.wait(max(0.0, due - now()))

    def last_start_before(self, moment: float) -> float | None:
        return max((s for s, _ in self.passes if s <= moment), default=None)

    def first_ending_after(self, moment: float) -> float | None:
        """When the first pass that could see the kill started (it may list after it)."""
        return min((s for s, e in self.passes if e > moment), default=None)


def scheduler_step(config: Config, name: str) -> None:
    """Run one step exactly as the scheduler process does (a fresh context per run)."""
    if hasattr(scheduler, "run_step"):
        scheduler.run_step(config, name)
    else:  # an appliance from before the step table: one wrapper per job
        getattr(scheduler, f"{name}_job")(config)


class StepLog(logging.Handler):
    """Catch what the scheduler's step logs: a warning (a failure) or a report of work done.

    The step swallows errors as the scheduler does, so a sample is judged by its log lines.
    """

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[str] = []
        self.logger = logging.getLogger("appliance.scheduler")
        self.saved_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage()[:300])

    def run(self, config: Config, name: str) -> int:
        mark = len(self.records)
        scheduler_step(config, name)
        return mark

    def check(self, mark: int) -> str | None:
        return "; ".join(self.records[mark:]) or None

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)
        super().close()


def wait_idle(ctx: spaces.Context, space_id: str, deadline: float) -> dict[str, Any]:
    """Wait until no worker owns the Space and it is RUNNING again."""
    while now() < deadline:
        row = ctx.store.get_space(space_id)
        if row["stage"] == "RUNNING" and not spaces.worker_alive(row):
            return row
        time.sleep(0.1)
    raise BenchError(f"{space_id} did not settle: {ctx.store.get_space(space_id)['stage']}")


def measure_recovery(ctx: spaces.Context, bench: Bench, loop: ReconcileLoop, space_id: str,
                     attempt: int) -> dict[str, Any]:
    """Kill a running Space's container; time until its stable url answers 200 again."""
    view = spaces.describe(ctx, space_id)
    row = ctx.store.get_space(space_id)
    url, container = view["url"], row["container"]
    if not get_ok(url):
        raise BenchError(f"{space_id} does not answer on {url} before the kill")
    # Kill at a random moment of the reconcile interval, not always right after a pass.
    time.sleep(random.uniform(0, loop.interval))
    load = bench.load()
    wall_kill = time.time()
    t_issue = now()
    bench.user.podman("kill", container)
    t_kill = now()
    down_seen = None
    answered = None
    polls = 0
    deadline = t_kill + RECOVERY_DEADLINE
    while now() < deadline:
        polls += 1
        ok = get_ok(url, timeout=1.0)
        if not ok and down_seen is None:
            down_seen = now()
        if ok and down_seen is not None:
            answered = now()
            break
        time.sleep(URL_POLL)
    if answered is None:
        raise BenchError(f"{space_id} did not answer again within {RECOVERY_DEADLINE:.0f} s "
                         f"of the kill: {ctx.store.get_space(space_id)['stage']}")
    row = wait_idle(ctx, space_id, now() + 60)
    # The pass that saw the dead container may still be listing images: let it finish.
    pass_deadline = now() + 2 * loop.interval + 30
    while loop.first_ending_after(t_kill) is None and now() < pass_deadline:
        time.sleep(0.05)
    events = [e for e in ctx.store.events(space_id, limit=20)
              if parse_at(e["at"]) >= wall_kill - 0.05]
    restart_at = next((parse_at(e["at"]) for e in reversed(events)
                       if e["kind"] == "auto-restart"), None)
    switched_at = next((parse_at(e["at"]) for e in reversed(events)
                        if e["kind"] == "switched"), None)
    previous_pass = loop.last_start_before(t_kill)
    detecting_pass = loop.first_ending_after(t_kill)

    def since_kill(wall: float | None) -> float | None:
        return None if wall is None else round(wall - wall_kill - (t_kill - t_issue), 3)

    result = {
        "attempt": attempt, "space": space_id, "killed_container": container,
        "new_container": row["container"],
        "recovery_s": round(answered - t_kill, 3),
        "kill_command_s": round(t_kill - t_issue, 3),
        "first_failed_poll_s": round(down_seen - t_kill, 3) if down_seen else None,
        "kill_after_last_pass_s": round(t_kill - previous_pass, 3) if previous_pass else None,
        # Negative when the kill landed while a pass was under way (it listed after it).
        "detecting_pass_after_kill_s": round(detecting_pass - t_kill, 3)
        if detecting_pass else None,
        # From the start of the pass that saw the dead container to the url answering:
        # the recovery with the wait for the next pass taken out.
        "pass_to_answer_s": round(answered - detecting_pass, 3) if detecting_pass else None,
        "auto_restart_event_s": since_kill(restart_at),
        "switched_event_s": since_kill(switched_at),
        "url_polls": polls,
        "events": [{"at": e["at"], "kind": e["kind"], "actor": e["actor"]}
                   for e in reversed(events)],
        "load_before": load,
    }
    print(f"  recovery {attempt}: {result['recovery_s']:.2f} s (pass ran "
          f"{result['detecting_pass_after_kill_s']} s after the kill, switched at "
          f"{result['switched_event_s']} s)", flush=True)
    return result


def measure_app_start(ctx: spaces.Context, bench: Bench, image: str, attempt: int
                      ) -> dict[str, Any]:
    """Start a fresh container of the image as the appliance does; time until it answers."""
    name = f"appliance-sched-bench-appstart-{bench.nonce}-{attempt}"
    low, high = bench.config.port_bounds
    port = next((p for p in range(high, low - 1, -1) if spaces._port_free(p)), None)
    if port is None:
        raise BenchError("No free port for the app-start measurement")
    client = ctx.runtime.client
    bench.created_containers.append(name)
    container = client.containers.create(
        image=image, name=name, detach=True, labels={LABEL_INSTANCE: bench.config.instance_id},
        ports={"7860/tcp": ("127.0.0.1", port)}, cap_drop=["ALL"], no_new_privileges=True,
        init=True)
    url = f"http://127.0.0.1:{port}/"
    t0 = now()
    container.start()
    started = now()
    deadline = t0 + 60
    answered = None
    while now() < deadline:
        if get_ok(url, timeout=1.0):
            answered = now()
            break
        time.sleep(APP_POLL)
    ctx.runtime.remove_container(name)
    bench.created_containers.remove(name)
    if answered is None:
        raise BenchError(f"A fresh container of {image} did not answer within 60 s")
    return {"attempt": attempt, "app_start_s": round(answered - t0, 3),
            "start_call_s": round(started - t0, 3)}


def static_sdk_image(ctx: spaces.Context, repo: Path) -> dict[str, Any]:
    """Name the shared SDK image the Spaces build on, and whether it was there before the run.

    It is shared with every static Space on the box, so the run leaves it in place.
    """
    manifest = load_manifest(repo)
    available = [t.rsplit(":", 1)[1] for t in ctx.runtime.list_images(builds.BASE_REPOSITORY)]
    python, _ = builds.choose_python(manifest.python_version, available)
    base = f"{builds.BASE_REPOSITORY}:{python}"
    tag = builds.sdk_image_plan(manifest, python, base, ctx.config,
                                base_id=ctx.runtime.image_id(base)).tag
    return {"tag": tag, "existed_before": ctx.runtime.image_exists(tag)}


def machine_info(ctx: spaces.Context, user: ServiceUser) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               None)
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    commit_id = run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, check=False).stdout.strip()
    dirty = bool(run(["git", "status", "--porcelain", "--", "appliance"], cwd=REPO_ROOT,
                     check=False).stdout.strip())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem / 2**20, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "podman_version": user.podman("version", "--format", "{{.Client.Version}}",
                                      check=False).stdout.strip(),
        "podman": ctx.runtime.info(),
        "appliance_commit": commit_id + ("+dirty" if dirty else ""),
    }


def figures(result: dict[str, Any]) -> dict[str, Any]:
    sweep, rec = result["health_sweep"], result["reconcile_pass"]
    sweep_cpu_s = sweep["cpu_ms"]["median"] / 1000
    sweep_p95_s = sweep["cpu_ms"]["p95"] / 1000
    job_cpu_s = result["health_step"]["cpu_ms"]["median"] / 1000
    interval = result["settings"]["recovery_interval_s"]
    recovery = statistics.median(r["recovery_s"] for r in result["recovery"])
    app_start = statistics.median(a["app_start_s"] for a in result["app_start"])
    bound = TARGETS["recovery_intervals"] * interval + app_start
    after_pass = [r["pass_to_answer_s"] for r in result["recovery"]
                  if r["pass_to_answer_s"] is not None]
    pass_to_answer = statistics.median(after_pass) if after_pass else None
    fraction = round(sweep_cpu_s / HEALTH_INTERVAL, 5)
    job_fraction = round(job_cpu_s / HEALTH_INTERVAL, 5)
    rec_podman = rec["podman_service_cpu_ms"]["mean"]
    reconcile_interval = result["settings"]["reconcile_interval_s"]
    return {
        "sweep_cpu_ms": sweep["cpu_ms"]["median"],
        "sweep_cpu_ms_p95": sweep["cpu_ms"]["p95"],
        "sweep_wall_ms": sweep["wall_ms"]["median"],
        "sweep_core_fraction": {"value": fraction,
                                "p95": round(sweep_p95_s / HEALTH_INTERVAL, 5),
                                "target": TARGETS["sweep_core_fraction"],
                                "pass": fraction <= TARGETS["sweep_core_fraction"],
                                "interval_s": HEALTH_INTERVAL},
        "health_step_core_fraction": {"value": job_fraction,
                                     "target": TARGETS["sweep_core_fraction"],
                                     "pass": job_fraction <= TARGETS["sweep_core_fraction"],
                                     "note": "the scheduler's health step: fresh context"},
        "reconcile_cpu_ms": rec["cpu_ms"]["median"],
        "reconcile_cpu_ms_p95": rec["cpu_ms"]["p95"],
        "reconcile_wall_ms": rec["wall_ms"]["median"],
        "reconcile_podman_cpu_ms": rec_podman,
        "reconcile_podman_cpu_ms_net": rec["podman_service_cpu_ms"]["net_mean"],
        "podman_background_ms_per_s": rec["podman_service_cpu_ms"]["background_ms_per_s"],
        "reconcile_podman_cpu_ms_median": rec["podman_service_cpu_ms"]["median"],
        # Appliance median + the Podman service's mean net of its background (others' use).
        "reconcile_core_fraction": round(
            (rec["cpu_ms"]["median"] + (rec["podman_service_cpu_ms"]["net_mean"] or 0))
            / 1000 / reconcile_interval, 4),
        "reconcile_core_fraction_gross": round(
            (rec["cpu_ms"]["median"] + (rec_podman or 0)) / 1000 / reconcile_interval, 4),
        "reconcile_step_cpu_ms": result["reconcile_step"]["cpu_ms"]["median"],
        "reconcile_step_podman_cpu_ms": result["reconcile_step"]["podman_service_cpu_ms"]["mean"],
        "recovery_s": {"value": round(recovery, 3), "target": round(bound, 3),
                       "pass": recovery <= bound, "interval_s": interval,
                       "app_start_s": round(app_start, 3),
                       "formula": f"{TARGETS['recovery_intervals']} x interval + app start"},
        "app_start_s": round(app_start, 3),
        "pass_to_answer_s": None if pass_to_answer is None else round(pass_to_answer, 3),
        # A kill right after a pass waits a whole interval for the next one.
        "recovery_worst_case_s": None if pass_to_answer is None else {
            "value": round(interval + pass_to_answer, 3), "target": round(bound, 3),
            "pass": interval + pass_to_answer <= bound,
            "formula": "interval + median(pass_to_answer_s)"},
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def markdown(result: dict[str, Any]) -> str:
    f, m, s = result["figures"], result["machine"], result["settings"]
    sweep_target = f["sweep_core_fraction"]["target"] * 100

    def verdict(entry) -> str:
        return "pass" if entry["pass"] else "**FAIL**"

    def values(entries, key):
        return ", ".join("-" if e[key] is None else f"{e[key]:.2f}" for e in entries)

    rec, sw = result["reconcile_pass"], result["health_sweep"]
    lines = [
        f"Scheduler benchmark, {m['date'][:10]}: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"Podman {m['podman_version']} rootless ({m['podman'].get('runtime')}, "
        f"{m['podman'].get('storage_driver')}, cgroup {m['podman'].get('cgroup_version')}); "
        f"{result['spaces']['registered']} registered Spaces, {result['spaces']['running']} "
        f"running tiny static containers; {s['sweeps']} sweeps, {s['passes']} passes, "
        f"{s['recoveries']} recoveries; 1-min load average "
        f"{sw['loadavg_1m']['median']:.2f} during the sweeps.",
        "",
        "| figure | median | p95 / each | target | result |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| health sweep: CPU of the appliance process (`health_sweep_once`) | "
        f"{_ms(f['sweep_cpu_ms'])} | {_ms(f['sweep_cpu_ms_p95'])} | | |",
        f"| health sweep: wall time | {_ms(f['sweep_wall_ms'])} | "
        f"{_ms(sw['wall_ms']['p95'])} | | |",
        f"| health sweep: share of one core at a {HEALTH_INTERVAL:g} s interval | "
        f"{f['sweep_core_fraction']['value'] * 100:.2f} % | "
        f"{f['sweep_core_fraction']['p95'] * 100:.2f} % | ≤ {sweep_target:g} % | "
        f"{verdict(f['sweep_core_fraction'])} |",
        f"| health sweep as the scheduler runs it (fresh context per run) | "
        f"{f['health_step_core_fraction']['value'] * 100:.2f} % "
        f"({_ms(result['health_step']['cpu_ms']['median'])}) | "
        f"{_ms(result['health_step']['cpu_ms']['p95'])} | ≤ {sweep_target:g} % | "
        f"{verdict(f['health_step_core_fraction'])} |",
        f"| reconcile pass, nothing to do: CPU of the appliance process (`reconcile_once`) | "
        f"{_ms(f['reconcile_cpu_ms'])} | {_ms(f['reconcile_cpu_ms_p95'])} | | |",
        f"| reconcile pass: CPU of the Podman API service (mean "
        f"{_ms(f['reconcile_podman_cpu_ms'])}; net of what it spent on others meanwhile, "
        f"{_ms(f['podman_background_ms_per_s'])}/s: {_ms(f['reconcile_podman_cpu_ms_net'])}) | "
        f"{_ms(f['reconcile_podman_cpu_ms_median'])} | "
        f"{_ms(rec['podman_service_cpu_ms']['p95'])} | | |",
        f"| reconcile pass: wall time | {_ms(f['reconcile_wall_ms'])} | "
        f"{_ms(rec['wall_ms']['p95'])} | | |",
        f"| reconcile: both processes, share of one core at a "
        f"{s['reconcile_interval_s']:g} s interval (Podman net; gross "
        f"{f['reconcile_core_fraction_gross'] * 100:.2f} %) | "
        f"{f['reconcile_core_fraction'] * 100:.2f} % | | | |",
        f"| reconcile as the scheduler runs it (fresh context per run): appliance / "
        f"Podman | {_ms(f['reconcile_step_cpu_ms'])} / {_ms(f['reconcile_step_podman_cpu_ms'])} "
        f"| | | |",
        f"| app's own start (fresh container of the same image, start → HTTP 200) | "
        f"{f['app_start_s']:.2f} s | {values(result['app_start'], 'app_start_s')} | | |",
        f"| recovery: container killed → stable url answers 200 again (reconcile every "
        f"{s['recovery_interval_s']:g} s) | {f['recovery_s']['value']:.2f} s | "
        f"{values(result['recovery'], 'recovery_s')} | ≤ {f['recovery_s']['target']:.2f} s "
        f"(2 × {s['recovery_interval_s']:g} s + app start) | {verdict(f['recovery_s'])} |",
    ]
    worst = f["recovery_worst_case_s"]
    if worst:
        lines.append(
            f"| recovery, worst case: a whole interval + the pass-to-answer time "
            f"({f['pass_to_answer_s']:.2f} s) | {worst['value']:.2f} s | "
            f"{values(result['recovery'], 'pass_to_answer_s')} | ≤ {worst['target']:.2f} s | "
            f"{verdict(worst)} |")
    lines += [
        "",
        "Recovery in detail (seconds after the kill; a negative pass start means the kill "
        "landed while a pass was under way):",
        "",
        "| attempt | kill after last pass start | the pass that saw it started "
        "| auto-restart recorded | new container switched in | url answered |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["recovery"]:
        lines.append(
            f"| {r['attempt']} | {r['kill_after_last_pass_s']} | "
            f"{r['detecting_pass_after_kill_s']} | {r['auto_restart_event_s']} | "
            f"{r['switched_event_s']} | {r['recovery_s']:.2f} |")
    calls, store = result["reconcile_calls"], result["podman_store"]
    lines += ["", "Where a reconcile pass's Podman time goes (each listing on its own, mean "
              "Podman CPU / median wall): " + "; ".join(
                  f"`{n}` {_ms(v['podman_service_cpu_ms']['mean'])} / "
                  f"{_ms(v['wall_ms']['median'])}" for n, v in calls.items())
              + f". The shared Podman held {store['containers_all']} containers and "
              f"{store['images_all']} images ({store['images_tagged']} tagged, all users)."]
    for failure in result.get("recovery_failures", []):
        lines += ["", f"A recovery attempt on {failure['space']} failed and was replaced by "
                  f"another Space: {failure['error'].splitlines()[0]}"]
    left_out = {name: result[name]["left_out"] for name in
                ("health_sweep", "health_step", "reconcile_pass", "reconcile_step")
                if result[name]["left_out"]}
    if left_out:
        lines += ["", "Samples left out (a pass with work to do, or a failure while others "
                  "shared Podman): " + "; ".join(f"{k}: {len(v)}" for k, v in left_out.items())
                  + " (reasons in the JSON)."]
    if result["spaces"]["deploys_retried"]:
        lines += ["", f"{len(result['spaces']['deploys_retried'])} of the setup's deploys were "
                  "retried (reasons in the JSON)."]
    if result["left_behind"]:
        lines += ["", "Left behind: " + ", ".join(result["left_behind"])]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    # The JSON first: a bug in the table must not lose the measurements.
    for suffix, render in ((".json", lambda: json.dumps(result, indent=2) + "\n"),
                           (".md", lambda: markdown(result))):
        text = render()
        target = stem.with_suffix(suffix)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def wait_workers(timeout: float) -> None:
    """Let workers this process spawned finish (a restart under way when the loop stopped)."""
    deadline = now() + timeout
    while jobs._children and now() < deadline:
        jobs.reap_children()
        time.sleep(0.1)


def cleanup(bench: Bench, ctx: spaces.Context, config: Config) -> list[str]:
    """Remove everything the run made; return what could not be removed.

    Deletes are retried with a fresh context: a crash test elsewhere may kill and restart
    the Podman API service under us. The temporary directory (the data dir) is kept when a
    Space is left, so that `appliance spaces delete` can still finish the job.
    """
    wait_workers(60)
    volumes = {spaces.data_volume(s) for s in bench.created_spaces}
    for round_no in range(3):
        if round_no:
            time.sleep(3)
            ctx = spaces.open_context(config, actor="bench")
        for space_id in list(bench.created_spaces):
            try:
                spaces.delete(ctx, space_id)
            except Exception as exc:  # keep cleaning up the rest
                print(f"warning: could not delete {space_id}: {exc}", file=sys.stderr)
            else:
                bench.created_spaces.remove(space_id)
        if not bench.created_spaces:
            break
    for name in bench.created_containers:
        bench.user.podman("rm", "-f", "-t", "0", "--ignore", name, check=False)
    router.stop_router(config)
    deadline = now() + 10
    while router.router_pid(config) and now() < deadline:
        time.sleep(0.1)
    left = [f"Space {s}" for s in bench.created_spaces]
    label = f"label={LABEL_INSTANCE}={config.instance_id}"
    left += [f"container {n}" for n in bench.user.podman(
        "ps", "-a", "--filter", label, "--format", "{{.Names}}", check=False).stdout.split()]
    left += [f"image {i}" for i in bench.user.podman(
        "images", "-q", "--filter", label, check=False).stdout.split()]
    existing = set(bench.user.podman("volume", "ls", "--format", "{{.Name}}",
                                     check=False).stdout.split())
    left += [f"volume {v}" for v in sorted(volumes & existing)]
    if router.router_pid(config):
        left.append(f"router pid {router.router_pid(config)}")
    if bench.created_spaces:
        left.append(f"directory {bench.root} (kept: APPLIANCE_DATA_DIR={config.data_dir} "
                    "appliance spaces delete finishes the job)")
    else:
        shutil.rmtree(bench.root, ignore_errors=True)
        if bench.root.exists():
            left.append(f"directory {bench.root}")
    return left


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--running", type=int, default=50, help="running Spaces")
    parser.add_argument("--stopped", type=int, default=50, help="registered, stopped Spaces")
    parser.add_argument("--sweeps", type=int, default=10, help="health sweeps measured")
    parser.add_argument("--passes", type=int, default=10, help="reconcile passes measured")
    parser.add_argument("--recoveries", type=int, default=3, help="kills to recover from")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between reconcile passes while recovering "
                        "(the default reconcile_interval)")
    parser.add_argument("--results", type=Path,
                        default=REPO_ROOT / "bench" / "results" / "scheduler",
                        help="where to write STEM.json and STEM.md")
    args = parser.parse_args(argv)
    if args.running < max(1, args.recoveries) or args.stopped < 0:
        parser.error("need at least as many running Spaces as recoveries")
    if min(args.sweeps, args.passes, args.recoveries) < 1 or args.interval <= 0:
        parser.error("--sweeps, --passes, --recoveries and --interval must be positive")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("Run the benchmark as root (it runs podman as the service account with runuser).",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="appliance-sched-bench-"))
    os.chmod(root, 0o755)
    (root / "src").mkdir(mode=0o755)
    # An empty environ: the bench must not pick up the integration tests' APPLIANCE_* values.
    # No initial delay: the sweeps measured are of Spaces that have served for a while.
    config = load_config({}, data_dir=str(root / "data"), local_sources=str(root / "src"),
                         port_range=PORT_RANGE, reconcile_interval=args.interval,
                         health_initial_delay=0)
    user = ServiceUser.of(config)
    ctx = spaces.open_context(config, actor="bench")
    bench = Bench(config, user, root, secrets.token_hex(3))
    started = datetime.now(UTC)
    result: dict[str, Any] = {
        "benchmark": "scheduler", "started_at": started.isoformat(timespec="seconds"),
        "settings": {"running": args.running, "stopped": args.stopped, "sweeps": args.sweeps,
                     "passes": args.passes, "recoveries": args.recoveries,
                     "recovery_interval_s": args.interval,
                     "reconcile_interval_s": args.interval,
                     "health_interval_s": HEALTH_INTERVAL, "port_range": PORT_RANGE,
                     "base_image": BASE_IMAGE, "url_poll_s": URL_POLL,
                     "app_poll_s": APP_POLL, "instance_id": config.instance_id,
                     "data_dir": str(root / "data")},
        "targets": TARGETS,
    }
    loop: ReconcileLoop | None = None
    left: list[str] = []
    failed = None
    try:
        result["machine"] = machine_info(ctx, user)
        router.ensure_router(config)  # runs all the time on a real box
        repo = root / "src" / "static-space"
        make_repo(repo)
        result["static_sdk_image"] = static_sdk_image(ctx, repo)
        print(f"setting up {args.running} running + {args.stopped} stopped Spaces…",
              flush=True)
        result["spaces"] = setup_spaces(ctx, bench, repo, args.running, args.stopped)
        router_pid = router.router_pid(config)
        result["settings"]["podman_service_pid"] = podman_service_pid(config)
        # Warm up (first connections, imports) before anything is measured.
        health.health_sweep_once(ctx)
        reconcile.reconcile_once(ctx)
        step_log = StepLog()

        router_cpu0, router_t0 = proc_cpu(router_pid), now()
        print("measuring health sweeps…", flush=True)
        result["health_sweep"] = measure_cpu(
            "health_sweep_once", lambda: health.health_sweep_once(ctx), args.sweeps,
            config, check_sweep(args.running))
        result["health_step"] = measure_cpu(
            "scheduler's health step (fresh context)",
            lambda: step_log.run(config, "health"), args.sweeps, config, step_log.check)
        print("measuring reconcile passes…", flush=True)
        result["reconcile_pass"] = measure_cpu(
            "reconcile_once", lambda: reconcile.reconcile_once(ctx), args.passes, config,
            check_converged)
        result["reconcile_step"] = measure_cpu(
            "scheduler's reconcile step (fresh context)",
            lambda: step_log.run(config, "reconcile"), args.passes, config, step_log.check)
        step_log.close()
        result["reconcile_calls"] = reconcile_calls(ctx, 5)
        result["podman_store"] = podman_store_size(user)
        router_cpu1, router_t1 = proc_cpu(router_pid), now()
        if router_cpu0 is not None and router_cpu1 is not None:
            result["router_core_fraction_idle"] = round(
                (router_cpu1 - router_cpu0) / (router_t1 - router_t0), 4)

        print(f"measuring recovery (reconcile every {args.interval:g} s)…", flush=True)
        running_ids = [bench.space_id(i) for i in range(args.running)]
        image = ctx.store.get_space(running_ids[0])["image"]
        loop = ReconcileLoop(config, args.interval)
        loop.start()
        result["recovery"], result["recovery_failures"] = [], []
        # A different Space each time: one Space's restarts would back off (by design).
        stride = max(1, args.running // (args.recoveries + 2))
        candidates = iter(running_ids[::stride])
        while len(result["recovery"]) < args.recoveries:
            space_id = next(candidates, None)
            if space_id is None or len(result["recovery_failures"]) > 2:
                raise BenchError(f"Recovery failed: {result['recovery_failures']}")
            try:
                result["recovery"].append(measure_recovery(
                    ctx, bench, loop, space_id, len(result["recovery"]) + 1))
            except (BenchError, ApplianceError) as exc:
                # Recorded, not hidden: the table lists failed attempts.
                result["recovery_failures"].append({"space": space_id, "error": str(exc)})
                print(f"  recovery of {space_id} failed: {exc}", flush=True)
        loop.halt.set()
        loop.join(60)
        result["reconcile_loop_passes"] = len(loop.passes)
        print("measuring the app's own start…", flush=True)
        result["app_start"] = [measure_app_start(ctx, bench, image, attempt + 1)
                               for attempt in range(args.recoveries)]
        result["app_start_image"] = image
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        failed = 130
    except (BenchError, ApplianceError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        failed = 1
    finally:
        if loop is not None:
            loop.halt.set()
            loop.join(60)
        print("cleaning up…", flush=True)
        cleanup_start = now()
        left = cleanup(bench, ctx, config)
        result["cleanup_s"] = round(now() - cleanup_start, 1)
        if left:
            print("warning: left behind: " + ", ".join(left), file=sys.stderr)
    if failed:
        return failed
    result["duration_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["left_behind"] = left
    result["figures"] = figures(result)
    write_results(result, args.results)
    print()
    print(markdown(result))
    print(f"Results: {args.results.with_suffix('.json')}, {args.results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
