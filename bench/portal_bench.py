"""Benchmark the portal's Space proxy: what /s/<owner>--<name>/ adds over the app itself.

Runs anywhere the appliance is installed (no Podman, no root needed):

    .venv/bin/python bench/portal_bench.py              # 5 rounds, about a minute
    .venv/bin/python bench/portal_bench.py --rounds 1 --results /tmp/p   # development

A small app server in this process plays the Space; the portal is a real `appliance serve`
(gunicorn, gthread) subprocess. Three paths to the same app, in the same run, interleaved:

- direct: the app's own port;
- router: the Space's stable port on the front router (what `url` is on a real box);
- portal: /s/<owner>--<name>/ on the portal, which forwards to the router (production path);
- portal-direct: /s/... for a Space whose port is the app's own (the proxy alone).

Figures are medians over rounds of each round's percentiles. "Added" is portal minus router
(what the proxy adds to a visitor's request) and portal-direct minus direct (the proxy alone).
Writes bench/results/portal_bench.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from appliance.adapters import router  # noqa: E402
from appliance.adapters.store import open_store  # noqa: E402
from appliance.config import load_config  # noqa: E402

TARGETS = {"added_p50_ms": 1.0, "throughput_ratio": 0.7, "home_p95_ms": 50.0,
           "idle_memory_mib": 80.0}
HOME_SPACES = 100
HOME_REQUESTS = 200
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MiB = 1 << 20
SMALL = b'{"ok": true, "data": "' + b"x" * 200 + b'"}'
LARGE = os.urandom(MiB)
PATHS = ("direct", "router", "portal", "portal-direct")
POOL_SETTLE_SECONDS = 3.0  # idle upstream connections are reaped before the idle RSS


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- the Space app ----------------------------------------------------------------------------


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        route = urlsplit(self.path)
        if route.path == "/ws":
            return self.websocket()
        if route.path == "/sse":
            return self.sse(parse_qs(route.query))
        body = LARGE if route.path == "/large" else SMALL
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n%b" % (len(body), body))

    def sse(self, query: dict[str, list[str]]) -> None:
        count, gap = int(query["n"][0]), float(query["gap"][0])
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(count):
            event = b"data: %r\n\n" % time.perf_counter()  # this process's clock: comparable
            self.wfile.write(b"%X\r\n%b\r\n" % (len(event), event))
            time.sleep(gap)
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def websocket(self) -> None:
        accept = base64.b64encode(hashlib.sha1(
            (self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: %b\r\n\r\n" % accept)
        while True:
            head = self.rfile.read(2)
            if len(head) < 2 or head[0] & 0x0F == 0x8:
                break
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self.rfile.read(2), "big")
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            self.wfile.write(bytes([0x81, len(data)]) + data if len(data) < 126 else
                             bytes([0x81, 126]) + len(data).to_bytes(2, "big") + data)
        self.close_connection = True


class AppServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def _serve_app(ports: multiprocessing.Queue) -> None:
    server = AppServer(("127.0.0.1", 0), App)
    ports.put(server.server_address[1])
    server.serve_forever()


def start_app() -> tuple[multiprocessing.Process, int]:
    """Run the app in a process of its own (so that it never competes with the clients for
    this process's GIL); return the process and its port."""
    ports: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=_serve_app, args=(ports,),
                                                          daemon=True)
    process.start()
    return process, ports.get(timeout=10)


# -- clients ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_gets(port: int, path: str, count: int) -> list[float]:
    """Request path count times on one kept-alive connection; return each latency in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            times.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise BenchError(f"GET {path} on {port} answered {response.status}: {body[-900:]}")
    finally:
        conn.close()
    return times


def throughput(port: int, path: str, seconds: float, clients: int) -> float:
    """Requests per second from clients kept-alive connections for seconds."""
    deadline = time.perf_counter() + seconds

    def one() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        done = 0
        while time.perf_counter() < deadline:
            conn.request("GET", path)
            conn.getresponse().read()
            done += 1
        conn.close()
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(lambda _: one(), range(clients)))
    return total / (time.perf_counter() - started)


def sse_delays(port: int, path: str, count: int, gap: float) -> list[float]:
    """Open an SSE stream; return each event's delivery delay (app write → client read), ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"{path}?n={count}&gap={gap}")
    response = conn.getresponse()
    delays, buffer = [], b""
    while data := response.read1(65536):
        now = time.perf_counter()
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            delays.append((now - float(event[len(b"data: "):])) * 1000)
    conn.close()
    if len(delays) != count:
        raise BenchError(f"SSE on {port}{path}: {len(delays)} of {count} events arrived")
    return delays


def ws_round_trips(port: int, path: str, count: int) -> list[float]:
    """Echo count small messages over one WebSocket; return each round trip in ms."""
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=30)
    times = []
    try:
        for number in range(count):
            started = time.perf_counter()
            ws.send(f"message {number}")
            if ws.recv() != f"message {number}":
                raise BenchError(f"WebSocket on {port}{path} echoed something else")
            times.append((time.perf_counter() - started) * 1000)
    finally:
        ws.close()
    return times


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# -- the portal -------------------------------------------------------------------------------


def pids_of(master: int) -> list[int]:
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(entry.name))
    return pids


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages (the preloaded app the workers share with the
    master) counted once across the processes, not once per process as RSS does."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_portal(data_dir: Path, port: int, apps_port: int, workers: int,
                 log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--apps-port", str(apps_port), "--workers", str(workers)],
        cwd=REPO_ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**env, "APPLIANCE_DATA_DIR": str(data_dir), "APPLIANCE_CONFIG_FILE": "/nonexistent",
             "APPLIANCE_ROUTER_HOST": "127.0.0.1"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the portal exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                if len(pids_of(process.pid)) > workers:
                    return process
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"the portal did not answer on {port}: {log.read_text()[-2000:]}")


TRIVIAL_APP = f"""
def app(environ, start_response):
    body = b"x" * {len(SMALL)}
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


def start_floor(root: Path, port: int, workers: int, threads: int) -> subprocess.Popen:
    """gunicorn with the portal's worker settings serving a trivial WSGI app: the floor."""
    (root / "trivial_app.py").write_text(TRIVIAL_APP)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(root), "-k", "gthread",
         "--threads", str(threads), "-w", str(workers), "--keep-alive", "75",
         "-b", f"127.0.0.1:{port}", "trivial_app:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            timed_gets(port, "/", 1)
            return process
        except (OSError, BenchError, http.client.HTTPException):
            time.sleep(0.1)
    process.kill()
    raise BenchError("gunicorn with a trivial app did not answer")


def add_home_spaces(config) -> None:
    """Record HOME_SPACES Spaces with manifests like real ones (cards with all they show)."""
    store = open_store(config.db_path)
    colors = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
    for number in range(HOME_SPACES):
        manifest = {"title": f"Demo {number}", "emoji": "🚀", "sdk": "gradio",
                    "colorFrom": colors[number % 8], "colorTo": colors[(number + 3) % 8],
                    "short_description": f"A demo Space number {number} for the home page",
                    "tags": [f"tag{number % 7}", "demo"], "pinned": number % 10 == 0}
        store.insert_space({
            "id": f"home/demo-{number}", "source": "bench", "source_display": "bench",
            "stage": ("RUNNING", "BUILDING", "STOPPED", "RUNTIME_ERROR")[number % 4],
            "sdk": "gradio", "title": manifest["title"], "port": 30000 + number,
            "hardware": "cpu" if number % 3 else "shared:8g", "desired": "running",
            "manifest": json.dumps(manifest)}, "bench")
    store.close()


def home_page_render(portal_port: int, requests: int = HOME_REQUESTS) -> dict[str, Any]:
    """Time GET / (the cards of HOME_SPACES Spaces, server-rendered) from a client."""
    conn = http.client.HTTPConnection("127.0.0.1", portal_port, timeout=30)
    timings, size = [], 0
    for number in range(requests + 10):
        began = time.perf_counter()
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"the home page answered {response.status}")
        if number >= 10:  # the first few warm the templates and the connection
            timings.append((time.perf_counter() - began) * 1000)
            size = len(body)
    conn.close()
    return {"spaces": HOME_SPACES, "requests": requests, "bytes": size,
            "p50_ms": percentile(timings, 50), "p95_ms": percentile(timings, 95)}


# -- the run ------------------------------------------------------------------------------------


def run_round(ports: dict[str, tuple[int, str]], args: argparse.Namespace,
              order: list[str]) -> dict[str, Any]:
    """One round: every figure on every path, in the order given."""
    result: dict[str, Any] = {}
    for name in order:
        port, prefix = ports[name]
        timed_gets(port, prefix + "/small", 50)  # warm the connections and the pool
    floor_port = ports["floor"][0]
    timed_gets(floor_port, "/", 50)
    floor = timed_gets(floor_port, "/", args.requests)
    result["floor"] = {"small_p50_ms": percentile(floor, 50),
                       "small_p99_ms": percentile(floor, 99),
                       "small_rps_concurrent": throughput(floor_port, "/", args.seconds,
                                                          args.clients)}
    for name in order:
        port, prefix = ports[name]
        small = timed_gets(port, prefix + "/small", args.requests)
        large = timed_gets(port, prefix + "/large", args.large_requests)
        result[name] = {
            "small_p50_ms": percentile(small, 50), "small_p99_ms": percentile(small, 99),
            "large_p50_ms": percentile(large, 50), "large_p99_ms": percentile(large, 99),
            "large_mib_s": len(large) / (sum(large) / 1000),
            "small_rps_concurrent": throughput(port, prefix + "/small", args.seconds,
                                               args.clients),
            "sse_delay_p50_ms": statistics.median(sse_delays(port, prefix + "/sse", 20, 0.02)),
            "ws_rtt_p50_ms": statistics.median(ws_round_trips(port, prefix + "/ws", 300)),
        }
    return result


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    medians = {name: {key: statistics.median(r[name][key] for r in rounds)
                      for key in rounds[0][name]} for name in (*PATHS, "floor")}
    added = {}
    for label, proxied, base in (("production", "portal", "router"),
                                 ("proxy_alone", "portal-direct", "direct")):
        p, b = medians[proxied], medians[base]
        added[label] = {
            "small_p50_ms": p["small_p50_ms"] - b["small_p50_ms"],
            "small_p99_ms": p["small_p99_ms"] - b["small_p99_ms"],
            "large_p50_ms": p["large_p50_ms"] - b["large_p50_ms"],
            "large_throughput_ratio": p["large_mib_s"] / b["large_mib_s"],
            "small_rps_ratio": p["small_rps_concurrent"] / b["small_rps_concurrent"],
            "sse_delay_p50_ms": p["sse_delay_p50_ms"] - b["sse_delay_p50_ms"],
            "ws_rtt_p50_ms": p["ws_rtt_p50_ms"] - b["ws_rtt_p50_ms"],
        }
    direct = medians["direct"]
    versus_direct = {"large_throughput_ratio": medians["portal"]["large_mib_s"]
                     / direct["large_mib_s"],
                     "small_rps_ratio": medians["portal"]["small_rps_concurrent"]
                     / direct["small_rps_concurrent"],
                     "floor_small_rps_ratio": medians["floor"]["small_rps_concurrent"]
                     / direct["small_rps_concurrent"]}
    return {"medians": medians, "added": added, "versus_direct": versus_direct}


def machine_info() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               None)
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "appliance"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    import gunicorn

    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "cpu_model": cpu, "mem_gib": round(mem / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version(), "gunicorn": gunicorn.__version__,
            "appliance_commit": commit + ("+dirty" if dirty else "")}


def markdown(result: dict[str, Any]) -> str:
    m, a = result["summary"]["medians"], result["summary"]["added"]
    s = result["settings"]
    lines = [
        f"Portal proxy benchmark, {result['machine']['date'][:10]}: "
        f"{result['machine']['nproc']} CPUs ({result['machine']['cpu_model']}), Python "
        f"{result['machine']['python']}, gunicorn {result['machine']['gunicorn']} gthread "
        f"({s['portal_workers']} workers x {s['portal_threads']} threads); {s['rounds']} rounds, "
        f"medians of each round's figures. Small: a {len(SMALL)}-byte response; large: 1 MiB.",
        "",
        "| figure | direct | router | portal (→ router) | added by the proxy | portal → app "
        "(no router) | added, proxy alone |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(label: str, key: str, unit: str, added_key: str | None, ratio: bool = False) -> None:
        def fmt(v: float) -> str:
            return f"{v:.2f}{unit}" if not ratio else f"{v:,.0f}{unit}"

        extra = ("", "")
        if added_key:
            value_p, value_d = a["production"][added_key], a["proxy_alone"][added_key]
            extra = ((f"{value_p:.2f}×", f"{value_d:.2f}×") if "ratio" in added_key else
                     (f"+{value_p:.2f} ms", f"+{value_d:.2f} ms"))
        lines.append(f"| {label} | {fmt(m['direct'][key])} | {fmt(m['router'][key])} | "
                     f"{fmt(m['portal'][key])} | {extra[0]} | {fmt(m['portal-direct'][key])} "
                     f"| {extra[1]} |")

    row("small GET p50 (ms)", "small_p50_ms", "", "small_p50_ms")
    row("small GET p99 (ms)", "small_p99_ms", "", "small_p99_ms")
    row("1 MiB GET p50 (ms)", "large_p50_ms", "", "large_p50_ms")
    row("1 MiB GET throughput, one connection (MiB/s)", "large_mib_s", "",
        "large_throughput_ratio", ratio=True)
    row(f"small GETs/s, {s['clients']} clients", "small_rps_concurrent", "", "small_rps_ratio",
        ratio=True)
    row("SSE event delivery p50 (ms)", "sse_delay_p50_ms", "", "sse_delay_p50_ms")
    row("WebSocket echo round trip p50 (ms)", "ws_rtt_p50_ms", "", "ws_rtt_p50_ms")
    rss = result["rss_mib"]
    lines += [
        "",
        f"Portal memory (RSS, master + {len(rss['idle_after_start']['workers'])} workers): "
        f"{rss['idle_after_start']['total']:.1f} MiB idle after start "
        f"(master {rss['idle_after_start']['master']:.1f}, workers "
        f"{', '.join(f'{w:.1f}' for w in rss['idle_after_start']['workers'])}); "
        f"{rss['idle_after_load']['total']:.1f} MiB idle after the load. Counting the pages "
        f"the workers share with the master once (PSS): "
        f"{rss['idle_after_start']['pss_total']:.1f} MiB after start, "
        f"{rss['idle_after_load']['pss_total']:.1f} MiB after the load.",
        f"For scale, gunicorn with the portal's worker settings serving a trivial WSGI app "
        f"(no proxy, no Flask) answers the small GET in {m['floor']['small_p50_ms']:.2f} ms "
        f"at p50 and {m['floor']['small_p99_ms']:.2f} ms at p99: that much of any portal "
        f"request is gunicorn's. Load average during the run: "
        f"{result['load_average'][0]:.2f} at the start, {result['load_average'][1]:.2f} at the "
        "end (other work on the box widens p99).",
        f"Target: at most {TARGETS['added_p50_ms']:.0f} ms added at p50 (small GET): "
        f"{'pass' if result['pass'] else 'FAIL'} "
        f"(+{a['production']['small_p50_ms']:.2f} ms through the router, "
        f"+{a['proxy_alone']['small_p50_ms']:.2f} ms proxy alone).",
    ]
    v = result["summary"]["versus_direct"]
    lines.append(
        f"Through the portal (→ router) ÷ straight to the app: 1 MiB throughput "
        f"{v['large_throughput_ratio']:.2f}×, small GETs/s with {s['clients']} clients "
        f"{v['small_rps_ratio']:.2f}× (target ≥ {TARGETS['throughput_ratio']}×). For the "
        f"ceiling: gunicorn serving a trivial app manages {v['floor_small_rps_ratio']:.2f}× "
        f"the direct small GETs/s on this machine.")
    home = result.get("home_page")
    if home:
        lines.append(f"Home page with {home['spaces']} Spaces ({home['bytes']:,} bytes, "
                     f"{home['requests']} requests from one client): p50 {home['p50_ms']:.1f} "
                     f"ms, p95 {home['p95_ms']:.1f} ms (target p95 ≤ "
                     f"{TARGETS['home_p95_ms']:.0f} ms).")
    return "\n".join(lines) + "\n"


def rss_report(master: int) -> dict[str, Any]:
    pids = pids_of(master)
    values = [rss_mib(pid) for pid in pids]
    return {"master": values[0], "workers": values[1:], "total": sum(values),
            "pss_total": sum(pss_mib(pid) for pid in pids)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None,
                        help="portal workers (default: the portal_workers setting)")
    parser.add_argument("--requests", type=int, default=1000, help="small GETs per path/round")
    parser.add_argument("--large-requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="each throughput run")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench/results/portal_bench",
                        help="where to write STEM.json and STEM.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="appliance-portal-bench-"))
    app, app_port = start_app()
    router_port, portal_port, apps_port = free_port(), free_port(), free_port()
    # The portal's database knows both Spaces; the router's own data dir routes just one
    # (so it does not try to listen on the app's port as well).
    portal_config = load_config({}, data_dir=str(root / "portal"), router_host="127.0.0.1")
    router_config = load_config({}, data_dir=str(root / "router"), router_host="127.0.0.1")
    rows = {"bench/app": router_port, "bench/direct": app_port}
    for config, names in ((portal_config, rows), (router_config, {"bench/app": router_port})):
        store = open_store(config.db_path)
        for name, port in names.items():
            store.insert_space({
                "id": name, "source": "bench", "source_display": "bench", "stage": "RUNNING",
                "sdk": "docker", "port": port, "backend_port": app_port, "hardware": "cpu",
                "desired": "running", "manifest": json.dumps({"sdk": "docker"})}, "bench")
        store.close()
    portal = floor = None
    result: dict[str, Any] = {
        "benchmark": "portal_proxy", "machine": machine_info(), "targets": TARGETS,
        "settings": {"rounds": args.rounds, "requests": args.requests,
                     "large_requests": args.large_requests, "clients": args.clients,
                     "throughput_seconds": args.seconds,
                     "portal_workers": portal_config.portal_workers,
                     "portal_threads": portal_config.portal_threads,
                     "small_bytes": len(SMALL), "large_bytes": len(LARGE)},
    }
    try:
        load_start = os.getloadavg()[0]
        floor_port = free_port()
        floor = start_floor(root, floor_port, args.workers or portal_config.portal_workers,
                            portal_config.portal_threads)
        router.ensure_router(router_config)
        router.wait_route(router_config, router_port, app_port)
        add_home_spaces(portal_config)
        workers = args.workers or portal_config.portal_workers
        result["settings"]["portal_workers"] = workers
        portal = start_portal(root / "portal", portal_port, apps_port, workers,
                              root / "portal.log")
        time.sleep(1.0)
        result["rss_mib"] = {"idle_after_start": rss_report(portal.pid)}
        ports = {"direct": (app_port, ""), "router": (router_port, ""),
                 "portal": (apps_port, "/s/bench--app"),
                 "portal-direct": (apps_port, "/s/bench--direct"), "floor": (floor_port, "")}
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1}/{args.rounds}…", flush=True)
            shift = number % len(PATHS)  # each path takes its turn at going first
            rounds.append(run_round(ports, args, [*PATHS[shift:], *PATHS[:shift]]))
        result["load_average"] = [load_start, os.getloadavg()[0]]
        result["rounds"] = rounds
        result["summary"] = summarize(rounds)
        time.sleep(POOL_SETTLE_SECONDS)
        result["rss_mib"]["idle_after_load"] = rss_report(portal.pid)
        result["home_page"] = home_page_render(portal_port)
        result["pass"] = result["summary"]["added"]["production"]["small_p50_ms"] \
            <= TARGETS["added_p50_ms"]
        log = (root / "portal.log").read_text()
        result["portal_log_errors"] = [line for line in log.splitlines()
                                       if "Traceback" in line or "[ERROR]" in line]
    finally:
        if portal is not None:
            portal.send_signal(signal.SIGTERM)
            try:
                portal.wait(20)
            except subprocess.TimeoutExpired:
                portal.kill()
        if floor is not None:
            floor.terminate()
            floor.wait(20)
        router.stop_router(router_config)
        app.terminate()
        shutil.rmtree(root, ignore_errors=True)
    stem = args.results
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"Results: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
