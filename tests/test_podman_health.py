"""Health checks and automatic restarts on real Podman: a Space that turns sick is replaced, a
crash loop backs off then gives up into RUNTIME_ERROR, and a hung Space never delays the
others' checks."""

from __future__ import annotations

import json
import time

import pytest
import requests
from conftest import as_service, make_space_repo

from appliance import stages
from appliance.core import jobs, spaces
from appliance.upkeep import health, reconcile

pytestmark = pytest.mark.podman

README = "---\nsdk: docker\napp_port: 8000\n---\n"
# Answers 200 until /tmp/sick exists inside the container, then 500.
SICKABLE = '''import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if os.path.exists("/tmp/sick") else 200
        self.send_response(code); self.end_headers()
        self.wfile.write(b"ok" if code == 200 else b"sick")
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
'''
# Answers for about two seconds, then the process dies.
SHORT_LIVED = '''import http.server, threading, os
threading.Timer(2.0, lambda: os._exit(3)).start()
print("serving briefly", flush=True)
handler = http.server.SimpleHTTPRequestHandler
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), handler).serve_forever()
'''
# Accepts connections and never answers them.
HUNG = '''import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000)); s.listen(64)
held = []
first = True
while True:
    conn, _ = s.accept()
    if first:  # answer the readiness probe once, then hang every later request
        conn.recv(1024); conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nok"); conn.close(); first = False
    else:
        held.append(conn)
'''


def docker_space(ctx, sources_dir, name: str, program: str) -> dict:
    dockerfile = ("FROM localhost/appliance-python:3.11\nCOPY app.py /app.py\n"
                  'CMD ["python3", "/app.py"]\n')
    repo = make_space_repo(sources_dir / name, {"README.md": README, "Dockerfile": dockerfile,
                                                "app.py": program})
    spaces.add_space(ctx, str(repo), name=f"health/{name}")
    view = spaces.deploy(ctx, f"health/{name}")
    assert view["stage"] == stages.RUNNING, view["error"]
    return view


def inline(ctx, space_id, job, factory=False):
    return jobs.run_job(ctx, space_id, job, factory)


def test_space_failing_its_health_checks_is_replaced_by_a_healthy_container(appliance_env):
    ctx, sources_dir = appliance_env
    view = docker_space(ctx, sources_dir, "sickable", SICKABLE)
    first = ctx.store.get_space("health/sickable")["container"]
    assert health.health_sweep_once(ctx, spawn=inline).healthy == ["health/sickable"]
    as_service("podman", "exec", first, "touch", "/tmp/sick")
    attempts = ctx.config.health_attempts
    for _ in range(attempts - 1):
        report = health.health_sweep_once(ctx, spawn=inline)
        assert report.unhealthy == ["health/sickable"] and not report.restarting
    report = health.health_sweep_once(ctx, spawn=inline)
    assert report.restarting == ["health/sickable"]
    row = ctx.store.get_space("health/sickable")
    assert row["container"] != first and row["stage"] == stages.RUNNING
    assert requests.get(view["url"], timeout=5).text == "ok"
    assert "auto-restart" in [e["kind"] for e in ctx.store.events("health/sickable", 20)]
    spaces.delete(ctx, "health/sickable")


def wait_exited(ctx, space_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        name = ctx.store.get_space(space_id)["container"]
        state = ctx.runtime.state(name) if name else None
        if state is None or not state.running:
            return
        time.sleep(0.2)
    raise AssertionError(f"{space_id}'s container kept running")


def test_crash_loop_backs_off_then_gives_up_with_the_log_tail(appliance_env):
    ctx, sources_dir = appliance_env
    ctx = spaces.Context(ctx.config.with_values(restart_limit=2, restart_backoff=30),
                         ctx.store, ctx.runtime, actor="scheduler")
    docker_space(ctx, sources_dir, "crashy", SHORT_LIVED)
    space_id = "health/crashy"
    start = time.time()
    wait_exited(ctx, space_id)
    assert reconcile.reconcile_once(ctx, spawn=inline, now=start).restarting == [space_id]
    wait_exited(ctx, space_id)
    # The second restart must wait out the backoff (30 s after the first).
    assert reconcile.reconcile_once(ctx, spawn=inline, now=start + 5).restarting == []
    assert reconcile.reconcile_once(ctx, spawn=inline, now=start + 31).restarting == [space_id]
    wait_exited(ctx, space_id)
    report = reconcile.reconcile_once(ctx, spawn=inline, now=start + 200)
    assert report.gave_up == [space_id]
    view = spaces.describe(ctx, space_id)
    assert view["stage"] == stages.RUNTIME_ERROR and view["url"] is None
    assert "restarted 2 times" in view["error"] and "serving briefly" in view["error"]
    assert ctx.store.get_space(space_id)["desired"] == health.GAVE_UP
    # Left for a person: later passes do nothing.
    assert not reconcile.reconcile_once(ctx, spawn=inline, now=start + 400).changed
    kinds = [e["kind"] for e in ctx.store.events(space_id, 50)]
    assert kinds.count("auto-restart") == 2 and "gave-up" in kinds
    spaces.delete(ctx, space_id)


def test_a_hung_space_never_delays_the_other_spaces_checks(appliance_env):
    ctx, sources_dir = appliance_env
    ctx = spaces.Context(ctx.config.with_values(health_timeout=2), ctx.store, ctx.runtime)
    docker_space(ctx, sources_dir, "hung", HUNG)
    for index in range(3):
        docker_space(ctx, sources_dir, f"fine{index}", SICKABLE)
    spans: dict[str, tuple[float, float]] = {}  # Space -> (probe began, probe ended)
    probe = health.probe_space

    def timed_probe(row, *args, **kwargs):
        began = time.monotonic()
        try:
            return probe(row, *args, **kwargs)
        finally:
            spans[row["id"]] = (began, time.monotonic())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(health, "probe_space", timed_probe)
        report = health.health_sweep_once(ctx, spawn=inline)
    assert report.unhealthy == ["health/hung"]
    assert sorted(report.healthy) == [f"health/fine{i}" for i in range(3)]
    # An order, not a duration: every other Space's answer was in while the hung one's probe
    # was still waiting out its timeout (probed after it, one by one, they would come later).
    _, hung_ended = spans.pop("health/hung")
    assert all(ended < hung_ended for _, ended in spans.values()), spans
    failures = ctx.store.get_space("health/hung")["health_failures"]
    assert failures == 1 and json.loads(ctx.store.get_space("health/hung")["restarts"]) == []
    for row in ctx.store.list_spaces():
        if row["id"].startswith("health/"):
            spaces.delete(ctx, row["id"])
