"""A gradio Space on real rootless Podman: deploy, update, broken commits, rollback, secrets,
stop/start, delete.

The tests share one Space to keep builds few, but none counts on another having run: each
asks a fixture for what it needs (the Space serving, or serving a second revision), which
deploys it only when it is not there yet, so any one test runs alone (`-k`).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import requests
from click.testing import CliRunner
from conftest import (
    REPO,
    as_service,
    commit,
    container_env,
    git,
    labelled,
    make_space_repo,
    wait_for,
)

from appliance import stages, users
from appliance.cli.main import cli
from appliance.core import spaces
from appliance.web.app import create_app

pytestmark = pytest.mark.podman
SPACE = "team/hello"
SECRET_VALUE = "s3cr3t-planted-7f9c"


@pytest.fixture(scope="module")
def space(appliance_env):
    ctx, sources_dir = appliance_env
    files = {p.name: p.read_text() for p in (REPO / "examples" / "hello-gradio").iterdir()}
    # The app prints its secret at start, as careless apps do: the logs must not show it.
    files["app.py"] = ("import os\n\nprint('API_TOKEN is', os.environ.get('API_TOKEN'), "
                       "flush=True)\n" + files["app.py"])
    repo = make_space_repo(sources_dir / "hello", files)
    return ctx, repo


@pytest.fixture
def running(space):
    """The Space serving (added and built first if no test has yet). A failed later build
    leaves it in BUILD_ERROR with its last good revision serving, as on Spaces."""
    ctx, repo = space
    if ctx.store.find_space(SPACE) is None:
        spaces.add_space(ctx, str(repo), name=SPACE)
        spaces.deploy(ctx, SPACE)
    view = spaces.describe(ctx, SPACE)
    if view["stage"] in (stages.STOPPED, stages.PAUSED):
        _, view = spaces.start(ctx, SPACE)
    assert view["url"] and ctx.store.get_space(SPACE)["container"], view["error"]
    return ctx, repo


@pytest.fixture
def two_revisions(running):
    """The Space serving a second revision, so it has one to roll back to."""
    ctx, repo = running
    if spaces.describe(ctx, SPACE)["previous_revision"] is None:
        update_greeting(ctx, repo)
    return ctx, repo


def update_greeting(ctx, repo) -> tuple[str, dict]:
    """Commit a new greeting and deploy it; return the greeting and the Space's view."""
    app = (repo / "app.py").read_text()
    greeting = "Hello, second" if "Hello, second" not in app else f"Hello, {time.time_ns()}"
    commit(repo, {"app.py": re.sub(r'title="[^"]*"', f'title="{greeting}"', app)},
           "code-only change")
    spaces.request_update(ctx, SPACE)
    return greeting, spaces.deploy(ctx, SPACE)


def title_at(repo, sha: str) -> str:
    """The greeting the app of a revision shows (its gradio title)."""
    return re.search(r'title="([^"]*)"', git(repo, "show", f"{sha}:app.py")).group(1)


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=10)


def test_gradio_space_deploys_and_answers_on_its_url(space):
    ctx, repo = space
    if ctx.store.find_space(SPACE) is not None:  # another test deployed it first
        spaces.delete(ctx, SPACE)
    view = spaces.add_space(ctx, str(repo), name=SPACE)
    assert view["stage"] == stages.BUILDING
    view = spaces.deploy(ctx, SPACE)
    assert view["stage"] == stages.RUNNING, view["error"]
    assert view["error"] is None
    assert len(view["revision"]) == 40
    assert view["sdk"] == "gradio"
    assert view["hardware"] == "cpu"
    response = get(view["url"])
    assert response.status_code == 200
    assert title_at(repo, view["revision"]) in response.text


def test_cli_show_json_has_the_contract_fields(running):
    ctx, _ = running
    result = CliRunner().invoke(cli, ["spaces", "show", SPACE, "--json"], obj={"ctx": ctx})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("id", "stage", "sdk", "revision", "url", "error", "hardware"):
        assert key in data
    assert data["id"] == SPACE and data["stage"] == "RUNNING"


def test_run_log_shows_the_app_output(running):
    ctx, _ = running

    def logged() -> str:  # conmon writes the log file asynchronously
        result = CliRunner().invoke(cli, ["spaces", "logs", SPACE], obj={"ctx": ctx})
        assert result.exit_code == 0, result.output
        return result.output if "Running on local URL" in result.output else ""

    assert "Running on local URL" in wait_for(logged, 60, "gradio's first lines in the log")


def test_container_runs_hardened_with_spaces_variables(running):
    ctx, _ = running
    row = ctx.store.get_space(SPACE)
    env = container_env(row["container"])
    assert env["SPACE_ID"] == SPACE
    assert env["SPACE_AUTHOR_NAME"] == "team" and env["SPACE_REPO_NAME"] == "hello"
    assert env["SPACE_TITLE"] == "Hello Gradio"
    assert env["SPACE_HOST"].endswith(f":{row['port']}")
    assert {"ACCELERATOR", "CPU_CORES", "MEMORY", "GRADIO_SERVER_NAME"} <= set(env)
    inspect = json.loads(as_service("podman", "inspect", row["container"]).stdout)[0]
    assert inspect["HostConfig"]["CapDrop"] or inspect["EffectiveCaps"] in (None, [])
    assert "no-new-privileges" in json.dumps(inspect["HostConfig"]["SecurityOpt"])
    uid = as_service("podman", "exec", row["container"], "id", "-u").stdout.strip()
    assert uid == "1000"
    # /data is a per-Space volume the app (uid 1000) can write.
    as_service("podman", "exec", row["container"], "touch", "/data/written")
    bindings = inspect["HostConfig"]["PortBindings"]
    assert all(b["HostIp"] == "127.0.0.1" for v in bindings.values() for b in v)


class RequestLoop:
    """A steady stream of GETs (fresh connection each) that counts what failed."""

    def __init__(self, url: str):
        self.url, self.failures, self.served = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if get(self.url).status_code != 200:
                    self.failures.append("status")
                self.served += 1
            except requests.RequestException as exc:
                self.failures.append(str(exc))
            time.sleep(0.02)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_code_only_update_switches_with_no_failed_requests(running):
    ctx, repo = running
    url = spaces.describe(ctx, SPACE)["url"]
    old = spaces.describe(ctx, SPACE)["revision"]
    with RequestLoop(url) as loop:
        greeting, view = update_greeting(ctx, repo)
    new = git(repo, "rev-parse", "HEAD")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert view["revision"] == new and view["previous_revision"] == old
    assert loop.failures == [] and loop.served > 10
    assert greeting in get(url).text
    log = spaces.build_log_path(ctx, SPACE).read_text()
    assert "Reusing the shared SDK layer" in log
    assert len(labelled("container", SPACE)) == 1


def test_update_when_nothing_changed_is_a_no_op(running):
    ctx, _ = running
    needed, view = spaces.request_update(ctx, SPACE)
    assert not needed and view["stage"] == stages.RUNNING


def test_broken_build_keeps_old_revision_serving(running):
    ctx, repo = running
    before = spaces.describe(ctx, SPACE)
    commit(repo, {"requirements.txt": "this-package-does-not-exist-appliance==0.0.1\n"}, "bad")
    with RequestLoop(before["url"]) as loop:
        spaces.request_update(ctx, SPACE)
        view = spaces.deploy(ctx, SPACE)
    assert loop.failures == [] and loop.served > 10
    assert view["stage"] == stages.BUILD_ERROR
    first = view["error"].splitlines()[0]
    assert first.startswith("The Space's Python requirements cannot be resolved")
    assert "this-package-does-not-exist-appliance" in first
    assert "--- uv said ---" in view["error"]
    assert view["revision"] == before["revision"]
    assert title_at(repo, before["revision"]) in get(before["url"]).text


def test_commit_whose_app_crashes_keeps_old_revision_serving(running):
    ctx, repo = running
    before = spaces.describe(ctx, SPACE)
    commit(repo, {"requirements.txt": None,
                  "app.py": "raise SystemExit('boom: missing model file')\n"}, "crash")
    with RequestLoop(before["url"]) as loop:
        spaces.request_update(ctx, SPACE)
        view = spaces.deploy(ctx, SPACE)
    assert loop.failures == [] and loop.served > 10
    assert view["stage"] == stages.RUNNING
    assert "did not start" in view["error"] and "boom: missing model file" in view["error"]
    assert view["revision"] == before["revision"]
    assert title_at(repo, before["revision"]) in get(before["url"]).text
    assert len(labelled("container", SPACE)) == 1


def test_rollback_serves_the_previous_revision_without_rebuilding(two_revisions):
    ctx, repo = two_revisions
    before = spaces.describe(ctx, SPACE)
    view = spaces.rollback(ctx, SPACE)
    assert view["stage"] == stages.RUNNING
    assert view["revision"] == before["previous_revision"]
    assert title_at(repo, view["revision"]) in get(view["url"]).text


def test_secret_reaches_the_app_but_no_log_view_or_event(running):
    ctx, _ = running
    spaces.set_value(ctx, "secrets", SPACE, "API_TOKEN", SECRET_VALUE)
    spaces.set_value(ctx, "variables", SPACE, "MODE", "demo")
    view = spaces.restart(ctx, SPACE)
    assert view["stage"] == stages.RUNNING
    env = container_env(ctx.store.get_space(SPACE)["container"])
    assert env["API_TOKEN"] == SECRET_VALUE and env["MODE"] == "demo"
    runner = CliRunner()
    for args in (["spaces", "show", SPACE, "--json"], ["spaces", "list", "--json"],
                 ["events", "--json", "--limit", "500"],
                 ["spaces", "secrets", "list", SPACE, "--json"],
                 ["spaces", "logs", SPACE, "--build"]):
        result = runner.invoke(cli, args, obj={"ctx": ctx})
        assert result.exit_code == 0, result.output
        assert SECRET_VALUE not in result.output
    # The app printed the secret at start: each view of its run log shows the marker instead.
    printed = "API_TOKEN is ***"

    def cli_run_log() -> str:
        result = runner.invoke(cli, ["spaces", "logs", SPACE], obj={"ctx": ctx})
        assert result.exit_code == 0, result.output
        return result.output if printed in result.output else ""

    outputs = {"appliance spaces logs": wait_for(cli_run_log, 60, "the app's first line")}
    users.add_user(ctx.store, "auditor", "admin", "a long enough password", "test")
    _, token = users.create_token(ctx.store, "audit", "auditor", "read", "test")
    client = create_app(ctx.config).test_client()
    headers = {"Authorization": f"Bearer {token}"}
    for kind in ("run", "build"):
        response = client.get(f"/api/v1/spaces/{SPACE}/logs?kind={kind}", headers=headers)
        assert response.status_code == 200, response.text
        outputs[f"API logs ({kind})"] = "\n".join(response.json["lines"])
    for url in (f"/spaces/{SPACE}/logs/stream?kind=run", f"/api/spaces/{SPACE}/logs/run",
                f"/spaces/{SPACE}/logs/stream?kind=build", f"/api/spaces/{SPACE}/logs/build"):
        outputs[url] = read_stream(client, url, headers, until=printed if "run" in url else "")
    for path in ctx.config.data_path.rglob("*.log"):
        outputs[str(path)] = path.read_text(errors="replace")
    for where, text in outputs.items():
        assert SECRET_VALUE not in text, f"{where} shows the secret"
    for where in ("appliance spaces logs", "API logs (run)",
                  f"/spaces/{SPACE}/logs/stream?kind=run", f"/api/spaces/{SPACE}/logs/run"):
        assert printed in outputs[where], f"{where} lacks the redacted line:\n{outputs[where]}"


def read_stream(client, url: str, headers: dict, until: str) -> str:
    """Read an event stream until a chunk holds `until` (the whole stream when empty)."""
    response = client.get(url, headers=headers, buffered=False)
    assert response.status_code == 200, url
    text = ""
    try:
        for chunk in response.response:
            text += chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
            if until and until in text.replace('\\"', '"'):
                break
    finally:
        response.close()
    return text


def test_stop_start_and_pause(running):
    ctx, _ = running
    url = spaces.describe(ctx, SPACE)["url"]
    port = ctx.store.get_space(SPACE)["port"]
    as_service("podman", "exec", ctx.store.get_space(SPACE)["container"], "touch",
               "/data/written")
    view = spaces.stop(ctx, SPACE)
    assert view["stage"] == stages.STOPPED and view["url"] is None
    assert labelled("container", SPACE) == []
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 503
    needs_build, view = spaces.start(ctx, SPACE)
    assert not needs_build and view["stage"] == stages.RUNNING and view["url"] == url
    # /data survived the stop.
    name = ctx.store.get_space(SPACE)["container"]
    assert as_service("podman", "exec", name, "test", "-f", "/data/written",
                      check=False).returncode == 0
    view = spaces.stop(ctx, SPACE, pause=True)
    assert view["stage"] == stages.PAUSED


def test_delete_leaves_nothing_behind(running):
    ctx, _ = running
    spaces.delete(ctx, SPACE)
    assert ctx.store.find_space(SPACE) is None
    assert labelled("container", SPACE) == []
    assert labelled("image", SPACE) == []
    assert labelled("volume", SPACE) == []
    assert not any((ctx.config.data_path / "checkouts").iterdir())
    kinds = [e["kind"] for e in ctx.store.events(SPACE, limit=500)]
    assert kinds[0] == "deleted" and "created" in kinds
