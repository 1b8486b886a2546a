"""Benchmark deploys: cold deploy against hand-written podman, code-only update, second Space.

Run as root on a box set up by scripts/setup.sh (the service account's Podman API must answer):

    .venv/bin/python bench/deploy_bench.py            # 3 rounds, writes bench/results/deploy.*
    .venv/bin/python bench/deploy_bench.py --quick    # 1 round, SDK layer kept: development only

See bench/README.md for what each figure means and the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import re
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
from appliance.config import Config, load_config  # noqa: E402
from appliance.core import packages, sources, spaces  # noqa: E402

EXAMPLE = REPO_ROOT / "examples" / "hello-gradio"
BASE_IMAGE = "localhost/appliance-python:3.11"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PORT_RANGE = "18000-18199"  # integration tests own 17000-17999
TARGETS = {"cold_ratio": 0.35, "update_s": 3.5, "update_failed_requests": 0,
           "second_fraction": 0.10}
HTTP_DEADLINE = 300.0
PROBE_INTERVAL = 0.02
STEP_LINE = re.compile(r"^STEP (\d+)/(\d+): (.*)")

# The hand-written baseline: what someone would type without the appliance. The CA bundle is
# a build secret exactly as builds._ca_mount does it; the ENV line carries only what Gradio
# needs to answer through a published port and to start without phoning home, as the
# appliance's image does.
BASELINE_CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin PYTHONUNBUFFERED=1 \\
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 GRADIO_ANALYTICS_ENABLED=False
RUN --mount=type=secret,id=cacert,mode=0444 PIP_CERT=/run/secrets/cacert \\
    SSL_CERT_FILE=/run/secrets/cacert pip install --no-cache-dir "gradio[oauth]==5.9.1" spaces
WORKDIR /app
COPY . /app
CMD ["python", "app.py"]
"""

SECOND_APP = '''\
import gradio as gr

with gr.Blocks(title="Second bench Space") as demo:
    gr.Markdown("# Shout it")
    name = gr.Textbox(label="name")
    shouted = gr.Textbox(label="shouted")
    name.submit(lambda text: (text or "world").upper() + "!", name, shouted)

if __name__ == "__main__":
    demo.launch()
'''

# Instrumented calls, grouped into the phases the README table shows.
PHASES = {
    "fetch": ("git ls-remote", "git clone"),
    "packages": ("resolve packages", "fetch package files"),
    "build": ("read manifest", "podman image query", "build sdk image", "build space image"),
    "start": ("limits check", "ensure volumes", "create+start container"),
    "ready": ("wait until app answers",),
    "switch": ("switch route",),
    "retire": ("drain old backend", "remove old container", "prune images"),
}


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- small helpers ---------------------------------------------------------------------------


def now() -> float:
    return time.monotonic()


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run(cmd: list[str], cwd: Path | None = None, check: bool = True, timeout: float = 900,
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
    gid: int
    home: str

    @classmethod
    def of(cls, config: Config) -> ServiceUser:
        account = pwd.getpwnam(config.service_user)
        return cls(account.pw_name, account.pw_uid, account.pw_gid, account.pw_dir)

    def command(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.name, "--", "env", f"XDG_RUNTIME_DIR=/run/user/{self.uid}",
                f"HOME={self.home}", *args]

    def podman(self, *args: str, cwd: Path | None = None, check: bool = True,
               timeout: float = 900) -> subprocess.CompletedProcess:
        return run(self.command("podman", *args), cwd=cwd, check=check, timeout=timeout)


def make_repo(dest: Path, files: dict[str, str], owner: ServiceUser | None = None) -> None:
    """Create a fresh git repository holding files, committed on main."""
    dest.mkdir(parents=True)
    for name, text in files.items():
        (dest / name).write_text(text)
    run(["git", "init", "-q", "-b", "main"], cwd=dest)
    commit(dest, "Initial commit")
    if owner:
        run(["chown", "-R", f"{owner.uid}:{owner.gid}", str(dest)])


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q",
         "-m", message], cwd=repo)


def example_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in EXAMPLE.iterdir() if p.is_file()}


def wait_http(url: str, deadline: float, marker: str | None = None) -> float:
    """Poll url until it answers 200 (with marker in the body); return when it did."""
    while now() < deadline:
        try:
            response = requests.get(url, timeout=5, headers={"Connection": "close"})
            if response.status_code == 200 and (marker is None or marker in response.text):
                return now()
        except requests.RequestException:
            pass
        time.sleep(PROBE_INTERVAL)
    raise BenchError(f"{url} did not answer 200{' with ' + marker if marker else ''} in time")


def free_port(low: int, high: int) -> int:
    """Pick a free port from the top of the range (the appliance allocates from the bottom)."""
    for port in range(high, low - 1, -1):
        if spaces._port_free(port):
            return port
    raise BenchError(f"No free port in {low}-{high} for the baseline")


def build_steps(lines: list[tuple[float, str]], start: float, end: float) -> dict[str, Any]:
    """Split a build log (timestamped lines) into per-STEP durations (each includes its commit)."""
    marks = [(t, m.group(3)) for t, line in lines if (m := STEP_LINE.match(line))]
    final = next((t for t, line in lines if line.startswith("COMMIT")), None)
    steps = []
    for index, (t, text) in enumerate(marks):
        until = marks[index + 1][0] if index + 1 < len(marks) else (final or end)
        steps.append({"step": text[:90], "s": round(until - t, 3)})
    return {
        "before_first_step_s": round(marks[0][0] - start, 3) if marks else None,
        "steps": steps,
        "final_commit_s": round(end - final, 3) if final else None,
        "cache_hits": sum("Using cache" in line for _, line in lines),
    }


# -- timing the appliance's own calls --------------------------------------------------------


@dataclass
class Timeline:
    """Spans of the appliance's adapter calls during one measured operation."""

    t0: float = field(default_factory=now)
    spans: list[dict[str, Any]] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    depth: int = 0

    def at(self, moment: float) -> float:
        return round(moment - self.t0, 3)

    def mark(self, label: str, moment: float | None = None) -> None:
        self.marks.setdefault(label, self.at(moment or now()))

    def readiness(self) -> dict[str, float | None]:
        """Split 'ready' into the app's own start and the lag of the appliance's probe."""
        started = self.marks.get("container started")
        answered = self.marks.get("app first answered on its backend port")
        probed = next((s["start"] + s["s"] for s in self.spans
                       if s["label"] == "wait until app answers"), None)
        if started is None or answered is None or probed is None:
            return {"app_start_s": None, "probe_lag_s": None}
        return {"app_start_s": round(answered - started, 3),
                # The two probes race; a negative lag is jitter, not a probe ahead of the app.
                "probe_lag_s": round(max(0.0, probed - answered), 3)}

    def phases(self, end: float) -> dict[str, float]:
        """Sum top-level spans per phase up to end; 'other' is the rest (store, service)."""
        totals = {phase: 0.0 for phase in PHASES}
        cut = self.at(end)
        for span in self.spans:
            if span["depth"] == 0:
                phase = next(p for p, labels in PHASES.items() if span["label"] in labels)
                totals[phase] += max(0.0, min(span["start"] + span["s"], cut) - span["start"])
        totals["other"] = self.at(end) - sum(totals.values())
        return {k: round(v, 3) for k, v in totals.items()}


def _watch_backend(timeline: Timeline, port: int, stop: threading.Event) -> None:
    # Polls faster than the appliance's own readiness probe, to show how much of 'ready' is
    # the app starting and how much is the probe's interval.
    url = f"http://127.0.0.1:{port}/"
    deadline = now() + HTTP_DEADLINE
    while not stop.is_set() and now() < deadline:
        try:
            if requests.get(url, timeout=2, allow_redirects=False).status_code < 500:
                timeline.mark("app first answered on its backend port")
                return
        except requests.RequestException:
            pass
        time.sleep(PROBE_INTERVAL)


@contextlib.contextmanager
def instrument(ctx: spaces.Context, timeline: Timeline):
    """Time the appliance's adapter calls by wrapping them for the length of the block."""
    restore: list[tuple[Any, str, Any]] = []
    watchers: list[threading.Event] = []

    def timed(label: str, original, before=None, after=None):
        def wrapper(*args, **kwargs):
            if before:
                args, kwargs, extra = before(args, kwargs)
            else:
                extra = None
            start, depth = now(), timeline.depth
            timeline.depth += 1
            try:
                result = original(*args, **kwargs)
            finally:
                timeline.depth -= 1
                end = now()
                timeline.spans.append({"label": label, "start": timeline.at(start),
                                       "s": round(end - start, 3), "depth": depth})
            if after:
                after(args, kwargs, extra, start, end)
            return result
        return wrapper

    def patch_module(module, name: str, label: str) -> None:
        original = getattr(module, name)
        restore.append((module, name, original))
        setattr(module, name, timed(label, original))

    def patch_runtime(name: str, label: str, **hooks) -> None:
        original = getattr(ctx.runtime, name)
        restore.append((ctx.runtime, name, None))
        setattr(ctx.runtime, name, timed(label, original, **hooks))

    def build_before(args, kwargs):
        args = list(args)
        lines: list[tuple[float, str]] = []
        sink = kwargs["log"] if "log" in kwargs else args[7]

        def log(line: str) -> None:
            lines.append((now(), line))
            sink(line)

        if "log" in kwargs:
            kwargs["log"] = log
        else:
            args[7] = log
        return tuple(args), kwargs, lines

    def build_after(args, kwargs, lines, start, end):
        tag = kwargs.get("tag", args[2] if len(args) > 2 else "")
        timeline.builds.append({"kind": "sdk" if "appliance-sdk" in tag else "space",
                                "tag": tag, "start": timeline.at(start),
                                "s": round(end - start, 3), **build_steps(lines, start, end)})

    def run_after(args, kwargs, _extra, _start, end):
        timeline.mark("container started", end)
        port = kwargs.get("host_port", args[2] if len(args) > 2 else None)
        stop = threading.Event()
        watchers.append(stop)
        threading.Thread(target=_watch_backend, args=(timeline, port, stop), daemon=True).start()

    # The label of a runtime.build span depends on its tag; two wrappers keep it simple.
    original_build = ctx.runtime.build

    def build(*args, **kwargs):
        tag = kwargs.get("tag", args[2] if len(args) > 2 else "")
        label = "build sdk image" if "appliance-sdk" in tag else "build space image"
        return timed(label, original_build, build_before, build_after)(*args, **kwargs)

    restore.append((ctx.runtime, "build", None))
    ctx.runtime.build = build
    patch_module(sources, "remote_head", "git ls-remote")
    patch_module(sources, "fetch", "git clone")
    patch_module(spaces, "load_manifest", "read manifest")
    patch_module(packages, "resolve", "resolve packages")
    patch_module(packages, "fetch", "fetch package files")
    patch_module(spaces, "_wait_ready", "wait until app answers")
    patch_module(spaces, "_prune_images", "prune images")
    patch_module(router, "wait_route", "switch route")
    patch_module(router, "wait_drained", "drain old backend")
    patch_runtime("image_exists", "podman image query")
    patch_runtime("list_images", "podman image query")
    patch_runtime("image_id", "podman image query")
    patch_runtime("limits", "limits check")
    patch_runtime("ensure_volume", "ensure volumes")
    patch_runtime("run", "create+start container", after=run_after)
    patch_runtime("remove_container", "remove old container")
    try:
        yield timeline
    finally:
        for stop in watchers:
            stop.set()
        for owner, name, original in reversed(restore):
            if original is None:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)
            else:
                setattr(owner, name, original)


# -- a steady request loop -------------------------------------------------------------------


@dataclass
class Probe:
    start: float
    end: float
    ok: bool
    new: bool
    error: str | None = None


class RequestLoop(threading.Thread):
    """GET url every ~20 ms on a fresh connection; remember what each request got."""

    def __init__(self, url: str, marker: str):
        super().__init__(daemon=True)
        self.url, self.marker = url, marker
        self.probes: list[Probe] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            start = now()
            try:
                response = requests.get(self.url, timeout=5, headers={"Connection": "close"})
                ok = response.status_code == 200
                self.probes.append(Probe(start, now(), ok, ok and self.marker in response.text,
                                         None if ok else f"HTTP {response.status_code}"))
            except requests.RequestException as exc:
                self.probes.append(Probe(start, now(), False, False, type(exc).__name__))
            time.sleep(PROBE_INTERVAL)

    def first_new(self) -> float | None:
        return next((p.end for p in self.probes if p.new), None)


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Bench:
    config: Config
    user: ServiceUser
    root: Path
    nonce: str
    cold: bool
    created_spaces: list[str] = field(default_factory=list)
    created_containers: list[str] = field(default_factory=list)
    created_images: list[str] = field(default_factory=list)

    @property
    def sources_dir(self) -> Path:
        return self.root / "src"

    def load(self) -> dict[str, Any]:
        return {"loadavg_1m": round(os.getloadavg()[0], 2), "other_containers": sum(
            1 for line in self.user.podman("ps", "-q").stdout.splitlines() if line.strip())}


def nonce_base(bench: Bench, round_no: int) -> str:
    """Tag the base image plus a unique label, so no cached SDK layer can match it.

    Removing the SDK image by name only untags it while other Spaces' images sit on top of it,
    and buildah would then find every SDK step in its layer cache. A base image with a new ID
    changes the parent of the first step, so the appliance's SDK build runs every step. Since
    the SDK tag carries a digest of its recipe (FROM line included), it also gets an SDK tag
    of its own, and the box's shared SDK image is left alone.
    """
    tag = f"localhost/appliance-bench-base:{bench.nonce}-r{round_no}"
    work = bench.root / f"base-r{round_no}"
    work.mkdir()
    (work / "Containerfile").write_text(
        f"FROM {BASE_IMAGE}\nLABEL appliance-bench.nonce={bench.nonce}-r{round_no}\n")
    os.chmod(work, 0o755)
    bench.created_images.append(tag)
    bench.user.podman("build", "-q", "-t", tag, "-f", str(work / "Containerfile"), str(work))
    return tag


def deploy_appliance(ctx: spaces.Context, bench: Bench, repo: Path, space_id: str
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Add and deploy a Space in-process; time until its stable url answers 200."""
    load = bench.load()
    timeline = Timeline()
    with instrument(ctx, timeline):
        space = spaces.add_space(ctx, str(repo), name=space_id)
        bench.created_spaces.append(space_id)
        added = now()
        space = spaces.deploy(ctx, space_id)
        returned = now()
    if space["stage"] != "RUNNING" or not space["url"]:
        raise BenchError(f"Deploying {space_id} ended in {space['stage']}: {space['error']}")
    served = wait_http(space["url"], now() + HTTP_DEADLINE)
    timeline.mark("deploy returned", returned)
    timeline.mark("stable url answered 200", served)
    sdk_builds = [b for b in timeline.builds if b["kind"] == "sdk"]
    return space, {
        "space": space_id,
        "total_s": timeline.at(served),
        "add_s": timeline.at(added),
        "deploy_s": round(returned - added, 3),
        "phases": timeline.phases(served),
        "marks": timeline.marks,
        "spans": timeline.spans,
        "builds": timeline.builds,
        **timeline.readiness(),
        "sdk_built": bool(sdk_builds),
        "sdk_cache_hits": sum(b["cache_hits"] for b in sdk_builds),
        "load_before": load,
    }


def deploy_baseline(bench: Bench, repo: Path, round_no: int) -> dict[str, Any]:
    """Do by hand what a deploy does: clone, build with podman, run, poll until it answers."""
    tag = f"localhost/appliance-bench-baseline:{bench.nonce}-r{round_no}"
    name = f"appliance-bench-baseline-{bench.nonce}-r{round_no}"
    work = bench.root / f"baseline-r{round_no}"
    work.mkdir()
    (work / "Containerfile").write_text(BASELINE_CONTAINERFILE)
    os.chown(work, bench.user.uid, bench.user.gid)
    port = free_port(*bench.config.port_bounds)
    load = bench.load()
    bench.created_images.append(tag)
    t0 = now()
    run(bench.user.command("git", "clone", "-q", str(repo), str(work / "app")), cwd=work)
    cloned = now()
    lines: list[tuple[float, str]] = []
    cmd = bench.user.command(
        "podman", "build", *(["--no-cache"] if bench.cold else []),
        "--secret", f"id=cacert,src={CA_BUNDLE}", "-t", tag,
        "-f", str(work / "Containerfile"), str(work / "app"))
    with subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            lines.append((now(), line.rstrip("\n")))
    built = now()
    if proc.returncode != 0:
        raise BenchError("Baseline build failed:\n" + "\n".join(text for _, text in lines[-25:]))
    bench.created_containers.append(name)
    bench.user.podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:7860", tag, cwd=work)
    started = now()
    served = wait_http(f"http://127.0.0.1:{port}/", now() + HTTP_DEADLINE)
    return {
        "total_s": round(served - t0, 3),
        "phases": {"fetch": round(cloned - t0, 3), "build": round(built - cloned, 3),
                   "start": round(started - built, 3), "ready": round(served - started, 3)},
        "build": build_steps(lines, cloned, built),
        "load_before": load,
    }


def remove_baseline(bench: Bench, round_no: int) -> None:
    name = f"appliance-bench-baseline-{bench.nonce}-r{round_no}"
    bench.user.podman("rm", "-f", "-t", "0", "--ignore", name, check=False)
    bench.user.podman("rmi", f"localhost/appliance-bench-baseline:{bench.nonce}-r{round_no}",
                      check=False)


def measure_update(ctx: spaces.Context, bench: Bench, repo: Path, space: dict[str, Any],
                   round_no: int) -> dict[str, Any]:
    """Commit a one-line change, update, and time until the stable url serves the new code."""
    marker = f"revision 2 of round {round_no} ({bench.nonce})"
    app = repo / "app.py"
    old = 'title="Hello from the appliance"'
    app.write_text(app.read_text().replace(old, f'title="Hello from the appliance, {marker}"'))
    commit(repo, "Change the title")
    loop = RequestLoop(space["url"], marker)
    loop.start()
    time.sleep(1.0)  # a second of steady traffic before the update shows the loop is clean
    load = bench.load()
    timeline = Timeline()
    with instrument(ctx, timeline):
        needed, _ = spaces.request_update(ctx, space["id"])
        view = spaces.deploy(ctx, space["id"])
        returned = now()
    deadline = now() + 30
    while loop.first_new() is None and now() < deadline:
        time.sleep(PROBE_INTERVAL)
    time.sleep(1.0)  # keep the loop going past the old container's removal
    loop.halt.set()
    loop.join(10)
    if not needed or view["stage"] != "RUNNING" or loop.first_new() is None:
        raise BenchError(f"Update of {space['id']} did not serve the new revision: "
                         f"{view['stage']} {view['error']}")
    answered = loop.first_new()
    window = [p for p in loop.probes if p.start >= timeline.t0]
    failures = [p for p in window if not p.ok]
    timeline.mark("new revision answered on the stable url", answered)
    timeline.mark("deploy returned", returned)
    old_served_after = [p for p in window if p.ok and not p.new and p.start > answered]
    return {
        "space": space["id"],
        "update_s": timeline.at(answered),
        "deploy_returned_s": timeline.at(returned),
        "requests": len(window),
        "failed_requests": len(failures),
        "failures": [{"at": timeline.at(p.start), "error": p.error} for p in failures[:20]],
        "failed_before_update": sum(1 for p in loop.probes if p.start < timeline.t0 and not p.ok),
        "old_revision_after_switch": len(old_served_after),
        **timeline.readiness(),
        "phases_until_answered": timeline.phases(answered),
        "phases_until_returned": timeline.phases(returned),
        "marks": timeline.marks,
        "spans": timeline.spans,
        "builds": timeline.builds,
        "load_before": load,
    }


def delete_space(ctx: spaces.Context, bench: Bench, space_id: str) -> None:
    try:
        spaces.delete(ctx, space_id)
    except Exception as exc:  # keep cleaning up the rest
        print(f"warning: could not delete {space_id}: {exc}", file=sys.stderr)
    else:
        bench.created_spaces.remove(space_id)


def run_round(ctx_for, bench: Bench, round_no: int) -> dict[str, Any]:
    order = ("appliance", "baseline") if round_no % 2 == 0 else ("baseline", "appliance")
    result: dict[str, Any] = {"round": round_no + 1, "order": list(order)}
    base = nonce_base(bench, round_no) if bench.cold else ""
    ctx = ctx_for(base)
    hello = bench.sources_dir / f"hello-r{round_no}"
    make_repo(hello, example_files())
    baseline_repo = bench.sources_dir / f"baseline-r{round_no}"
    make_repo(baseline_repo, example_files(), owner=bench.user)
    first_id = f"bench/hello-{bench.nonce}-r{round_no}"
    space = None
    for side in order:
        if side == "appliance":
            print(f"round {round_no + 1}: (a) cold deploy through the appliance…", flush=True)
            space, result["appliance"] = deploy_appliance(ctx, bench, hello, first_id)
            sdk_builds = [b["tag"] for b in result["appliance"]["builds"] if b["kind"] == "sdk"]
            result["sdk_image"] = sdk_builds[0] if sdk_builds else None
            if base and sdk_builds:
                bench.created_images.append(sdk_builds[0])  # named by the round's own base
            cold_ok = result["appliance"]["sdk_built"] and not result["appliance"][
                "sdk_cache_hits"]
            result["appliance"]["cold_verified"] = bool(bench.cold and cold_ok)
        else:
            print(f"round {round_no + 1}: (a) cold deploy by hand with podman…", flush=True)
            try:
                result["baseline"] = deploy_baseline(bench, baseline_repo, round_no)
            finally:
                remove_baseline(bench, round_no)
    print(f"round {round_no + 1}: (b) code-only update under a request loop…", flush=True)
    result["update"] = measure_update(ctx, bench, hello, space, round_no)
    print(f"round {round_no + 1}: (c) second Space with the same SDK…", flush=True)
    second = bench.sources_dir / f"second-r{round_no}"
    readme = (EXAMPLE / "README.md").read_text().replace("title: Hello Gradio",
                                                          "title: Second Bench Space")
    make_repo(second, {"README.md": readme, "app.py": SECOND_APP})
    _, result["second"] = deploy_appliance(ctx, bench, second,
                                           f"bench/second-{bench.nonce}-r{round_no}")
    result["second"]["fraction_of_cold"] = round(
        result["second"]["total_s"] / result["appliance"]["total_s"], 3)
    result["cold_ratio"] = round(
        result["appliance"]["total_s"] / result["baseline"]["total_s"], 3)
    for space_id in list(bench.created_spaces):
        delete_space(ctx, bench, space_id)
    if base and result.get("sdk_image"):
        bench.user.podman("rmi", result["sdk_image"], check=False)
    if base:
        bench.user.podman("rmi", base, check=False)  # only untags it while an SDK sits on it
    return result


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


def figures(rounds: list[dict[str, Any]], cold: bool) -> dict[str, Any]:
    """Medians over rounds, the headline ratios, and pass/fail against the targets."""
    verified = [r for r in rounds if r["appliance"]["cold_verified"]]
    counted = verified or rounds  # a round that reused SDK layers says nothing about cold
    appliance = median([r["appliance"]["total_s"] for r in counted])
    baseline = median([r["baseline"]["total_s"] for r in rounds])
    update = median([r["update"]["update_s"] for r in rounds])
    failed = max(r["update"]["failed_requests"] for r in rounds)
    second = median([r["second"]["total_s"] for r in rounds])
    cold_ratio = round(appliance / baseline, 3)
    fraction = round(second / appliance, 3)
    phase_names = list(PHASES) + ["other"]
    return {
        "cold": cold,
        "rounds_verified_cold": len(verified),
        "appliance_cold_s": appliance,
        "baseline_cold_s": baseline,
        "cold_ratio": {"value": cold_ratio, "target": TARGETS["cold_ratio"],
                       "pass": cold_ratio <= TARGETS["cold_ratio"],
                       "median_of_round_ratios": median([r["cold_ratio"] for r in counted])},
        "update_s": {"value": update, "target": TARGETS["update_s"],
                     "pass": update <= TARGETS["update_s"]},
        "update_failed_requests": {"value": failed, "target": 0, "pass": failed == 0,
                                   "note": "worst round"},
        "second_s": second,
        "second_fraction": {"value": fraction, "target": TARGETS["second_fraction"],
                            "pass": fraction <= TARGETS["second_fraction"],
                            "median_of_round_fractions": median(
                                [r["second"]["fraction_of_cold"] for r in counted])},
        "update_phases_until_answered": {
            p: median([r["update"]["phases_until_answered"][p] for r in rounds])
            for p in phase_names},
        "update_phases_until_returned": {
            p: median([r["update"]["phases_until_returned"][p] for r in rounds])
            for p in phase_names},
        "update_detail": {
            "app_start_s": median([r["update"]["app_start_s"] for r in rounds
                                   if r["update"]["app_start_s"] is not None]),
            "probe_lag_s": median([r["update"]["probe_lag_s"] for r in rounds
                                   if r["update"]["probe_lag_s"] is not None]),
            "space_build_s": median([b["s"] for r in rounds for b in r["update"]["builds"]]),
            "space_build_metadata_steps_s": median([
                sum(step["s"] for step in b["steps"]
                    if step["step"].startswith(("LABEL", "CMD")))
                for r in rounds for b in r["update"]["builds"]]),
            "remove_old_container_s": median([
                s["s"] for r in rounds for s in r["update"]["spans"]
                if s["label"] == "remove old container" and s["depth"] == 0]),
        },
        "appliance_cold_phases": {
            p: median([r["appliance"]["phases"][p] for r in counted]) for p in phase_names},
        "baseline_cold_phases": {
            p: median([r["baseline"]["phases"][p] for r in rounds])
            for p in ("fetch", "build", "start", "ready")},
        "second_phases": {
            p: median([r["second"]["phases"][p] for r in rounds]) for p in phase_names},
    }


def _fmt(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def markdown(result: dict[str, Any]) -> str:
    f, rounds, m = result["figures"], result["rounds"], result["machine"]

    def each(path) -> str:
        return ", ".join(f"{path(r):.2f}" for r in rounds)

    def verdict(entry) -> str:
        return "pass" if entry["pass"] else "**FAIL**"

    lines = [
        f"Deploy benchmark, {m['date'][:10]}: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"Podman {m['podman_version']} rootless ({m['podman'].get('runtime')}, "
        f"{m['podman'].get('storage_driver')}, cgroup {m['podman'].get('cgroup_version')}); "
        f"median of {len(rounds)} round(s)"
        + ("" if result["cold"] else " — **--quick: SDK layer not removed, not a cold figure**")
        + ".",
        "",
        "| figure | median | rounds | target | result |",
        "| --- | ---: | --- | ---: | --- |",
        f"| (a) cold deploy of hello-gradio through the appliance | "
        f"{_fmt(f['appliance_cold_s'])} | {each(lambda r: r['appliance']['total_s'])} | | |",
        f"| (a) the same by hand with the podman CLI | {_fmt(f['baseline_cold_s'])} | "
        f"{each(lambda r: r['baseline']['total_s'])} | | |",
        f"| (a) appliance / by hand | {f['cold_ratio']['value']:.2f} | "
        f"{each(lambda r: r['cold_ratio'])} | ≤ {TARGETS['cold_ratio']:.2f} | "
        f"{verdict(f['cold_ratio'])} |",
        f"| (b) code-only update until the new revision answers | {_fmt(f['update_s']['value'])} | "
        f"{each(lambda r: r['update']['update_s'])} | ≤ {TARGETS['update_s']:g} s | "
        f"{verdict(f['update_s'])} |",
        f"| (b) failed requests during the update (worst round) | "
        f"{f['update_failed_requests']['value']} | "
        + ", ".join(f"{r['update']['failed_requests']}/{r['update']['requests']}"
                    for r in rounds)
        + f" | 0 | {verdict(f['update_failed_requests'])} |",
        f"| (c) second Space, same SDK | {_fmt(f['second_s'])} | "
        f"{each(lambda r: r['second']['total_s'])} | | |",
        f"| (c) second Space / cold deploy | {f['second_fraction']['value']:.2f} | "
        f"{each(lambda r: r['second']['fraction_of_cold'])} | "
        f"≤ {TARGETS['second_fraction']:.2f} | {verdict(f['second_fraction'])} |",
        "",
        "Where the time goes (medians, seconds; *other* is the service's own bookkeeping):",
        "",
        "| phase | (a) appliance | (a) by hand | (b) until new revision answers "
        "| (b) until deploy returns | (c) second Space |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in list(PHASES) + ["other"]:
        lines.append(
            f"| {phase} | {_fmt(f['appliance_cold_phases'][phase], '')} | "
            f"{_fmt(f['baseline_cold_phases'].get(phase), '')} | "
            f"{_fmt(f['update_phases_until_answered'][phase], '')} | "
            f"{_fmt(f['update_phases_until_returned'][phase], '')} | "
            f"{_fmt(f['second_phases'][phase], '')} |")
    d = f["update_detail"]
    lines += [
        "",
        f"(b) in detail: the app takes {_fmt(d['app_start_s'])} to answer once its container "
        f"runs, the appliance notices {_fmt(d['probe_lag_s'])} later; the space image builds "
        f"in {_fmt(d['space_build_s'])}, {_fmt(d['space_build_metadata_steps_s'])} of it "
        f"committing the CMD and LABEL steps; removing the old container takes "
        f"{_fmt(d['remove_old_container_s'])} (after the switch, so not in the figure).",
    ]
    if result["cold"] and f["rounds_verified_cold"] < len(rounds):
        lines += ["", f"Only {f['rounds_verified_cold']} of {len(rounds)} rounds built the "
                  "SDK layer from scratch; (a) counts those."]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    # The JSON first: a bug in the table must not lose ten minutes of measurements.
    for suffix, render in ((".json", lambda: json.dumps(result, indent=2) + "\n"),
                           (".md", lambda: markdown(result))):
        text = render()
        target = stem.with_suffix(suffix)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def cleanup(bench: Bench, ctx: spaces.Context, config: Config) -> list[str]:
    """Remove everything the run made; return what could not be removed."""
    for space_id in list(bench.created_spaces):
        delete_space(ctx, bench, space_id)
    for name in bench.created_containers:
        bench.user.podman("rm", "-f", "-t", "0", "--ignore", name, check=False)
    for tag in reversed(bench.created_images):
        bench.user.podman("rmi", tag, check=False)
    router.stop_router(config)
    deadline = now() + 10
    while router.router_pid(config) and now() < deadline:
        time.sleep(0.1)
    left = [f"Space {s}" for s in bench.created_spaces]
    names = set(bench.user.podman("ps", "-a", "--format", "{{.Names}}",
                                  check=False).stdout.split())
    left += [f"container {n}" for n in names if bench.nonce in n]
    if router.router_pid(config):
        left.append(f"router pid {router.router_pid(config)}")
    shutil.rmtree(bench.root, ignore_errors=True)
    return left


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds to take medians over")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, keep the shared SDK image (not a cold figure)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to write STEM.json and STEM.md (default "
                        "bench/results/deploy, or bench/results/deploy-quick with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    if args.results is None:
        args.results = REPO_ROOT / "bench" / "results" / ("deploy-quick" if args.quick
                                                          else "deploy")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
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
    root = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    os.chmod(root, 0o755)
    (root / "src").mkdir(mode=0o755)
    # An empty environ: the bench must not pick up the integration tests' APPLIANCE_* values.
    config = load_config({}, data_dir=str(root / "data"), local_sources=str(root / "src"),
                         port_range=PORT_RANGE)
    user = ServiceUser.of(config)
    ctx = spaces.open_context(config, actor="bench")
    bench = Bench(config, user, root, secrets.token_hex(3), not args.quick)
    contexts: dict[str, spaces.Context] = {"": ctx}

    def ctx_for(base: str) -> spaces.Context:
        # A cold round starts with an empty package cache (and uv cache) of its own, as the
        # baseline's pip downloads everything; --quick shares one.
        if base not in contexts:
            cache = root / f"packages-{base.rsplit(':', 1)[-1] if base else 'shared'}"
            contexts[base] = spaces.open_context(
                config.with_values(base_image=base, package_cache_dir=str(cache)),
                actor="bench")
        return contexts[base]

    started = datetime.now(UTC)
    rounds: list[dict[str, Any]] = []
    left: list[str] = []
    try:
        info = machine_info(ctx, user)
        # The router runs all the time on a real box; start it before anything is timed.
        router.ensure_router(config)
        for round_no in range(args.rounds):
            rounds.append(run_round(ctx_for, bench, round_no))
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        left = cleanup(bench, ctx, config)
        if left:
            print("warning: left behind: " + ", ".join(left), file=sys.stderr)
    result = {
        "benchmark": "deploy", "quick": args.quick, "cold": bench.cold,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "machine": info,
        "settings": {
            "rounds": args.rounds, "port_range": PORT_RANGE, "base_image": BASE_IMAGE,
            "ca_bundle": CA_BUNDLE,
            "probe_interval_s": PROBE_INTERVAL,
            "baseline_containerfile": BASELINE_CONTAINERFILE,
        },
        "targets": TARGETS,
        "figures": figures(rounds, bench.cold),
        "rounds": rounds,
        "left_behind": left,
    }
    write_results(result, args.results)
    print()
    print(markdown(result))
    print(f"Results: {args.results.with_suffix('.json')}, {args.results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
