"""streamlit, docker and static Spaces on real rootless Podman, and the failures a user can hit
on the way (bad front matter, missing app file, an unpullable FROM image)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import as_service, commit, labelled, make_space_repo, wait_for

from appliance import stages
from appliance.cli.main import cli
from appliance.core import spaces

pytestmark = pytest.mark.podman

STATIC_README = """---
title: Static demo
emoji: 📄
colorFrom: blue
colorTo: green
sdk: static
pinned: false
---
"""

DOCKER_README = """---
title: Docker demo
sdk: docker
app_port: 8080
---
"""

DOCKERFILE = """FROM localhost/appliance-python:3.11
ARG MODE=unset
RUN --mount=type=secret,id=BUILD_TOKEN,mode=0444 \\
    test "$(sha256sum < /run/secrets/BUILD_TOKEN | cut -c1-64)" = \\
    "4ec063d72f94f85b02b3f2576d7f88a9435a8c0573a79c9b9565dbd3f8a1d8cb" \\
    && echo "build secret is there: $(cat /run/secrets/BUILD_TOKEN)"
RUN echo "mode=$MODE" > /build-mode.txt
RUN useradd -m -u 1000 user
USER user
WORKDIR /home/user/app
COPY --chown=user . .
CMD ["sh", "-c", "echo \\"token at start: $BUILD_TOKEN\\"; exec python3 -m http.server 8080"]
"""


def test_static_space_serves_files_and_executes_nothing(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "static", {
        "README.md": STATIC_README,
        "index.html": "<h1>static ok</h1>",
        "app.py": "open('/tmp/executed', 'w')\n",
    })
    os.symlink("/etc/passwd", repo / "leak.txt")
    commit(repo, {}, "add a symlink leading out")
    spaces.add_space(ctx, str(repo), name="team/static")
    view = spaces.deploy(ctx, "team/static")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert "static ok" in requests.get(view["url"], timeout=5).text
    assert requests.get(view["url"] + "leak.txt", timeout=5).status_code == 404
    assert requests.get(view["url"] + "../../etc/passwd", timeout=5).status_code == 404
    assert "open('/tmp/executed'" in requests.get(view["url"] + "app.py", timeout=5).text
    name = ctx.store.get_space("team/static")["container"]
    assert as_service("podman", "exec", name, "test", "-e", "/tmp/executed",
                      check=False).returncode != 0
    spaces.delete(ctx, "team/static")


def test_docker_space_gets_build_args_and_secrets_not_baked_in(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "docker", {
        "README.md": DOCKER_README, "Dockerfile": DOCKERFILE, "hello.txt": "docker ok\n"})
    spaces.add_space(ctx, str(repo), name="team/docker")
    spaces.set_value(ctx, "variables", "team/docker", "MODE", "production")
    spaces.set_value(ctx, "secrets", "team/docker", "BUILD_TOKEN", "tok-9d1e-planted")
    view = spaces.deploy(ctx, "team/docker")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"] + "hello.txt", timeout=5).text == "docker ok\n"
    row = ctx.store.get_space("team/docker")
    assert "mode=production" in as_service("podman", "exec", row["container"], "cat",
                                           "/build-mode.txt").stdout
    # The build step and the app both print the secret: every log shows the marker instead.
    log = spaces.build_log_path(ctx, "team/docker").read_text()
    assert "build secret is there: ***" in log and "tok-9d1e-planted" not in log
    run_log = wait_for(lambda: (text := spaces.app_log(ctx, "team/docker", tail=200))
                       and "token at start:" in text and text, 60, "the app's first line")
    assert "token at start: ***" in run_log and "tok-9d1e-planted" not in run_log
    for args in (["spaces", "logs", "team/docker"], ["spaces", "logs", "team/docker", "--build"]):
        result = CliRunner().invoke(cli, args, obj={"ctx": ctx})
        assert result.exit_code == 0, result.output
        assert "***" in result.output and "tok-9d1e-planted" not in result.output
    history = as_service("podman", "history", "--no-trunc", row["image"]).stdout
    inspect = as_service("podman", "image", "inspect", row["image"]).stdout
    assert "tok-9d1e-planted" not in history + inspect
    leaked = as_service("podman", "exec", row["container"], "grep", "-rl", "tok-9d1e-planted",
                        "/etc", "/home", "/tmp", "/build-mode.txt", check=False)
    assert leaked.stdout == ""
    # Docker Spaces also get a /data volume their own user can write.
    as_service("podman", "exec", row["container"], "touch", "/data/ok")
    spaces.delete(ctx, "team/docker")


def test_docker_space_with_unpullable_base_image_says_how_to_provide_it(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "docker-offline", {
        "README.md": DOCKER_README,
        "Dockerfile": "FROM docker.io/library/appliance-not-a-real-image:1.0\nCMD true\n"})
    spaces.add_space(ctx, str(repo), name="team/offline")
    view = spaces.deploy(ctx, "team/offline")
    assert view["stage"] == stages.BUILD_ERROR
    assert "docker.io/library/appliance-not-a-real-image:1.0" in view["error"]
    assert "appliance images load" in view["error"]
    assert labelled("container", "team/offline") == []
    spaces.delete(ctx, "team/offline")


def test_front_matter_errors_land_in_config_error_and_a_fix_recovers(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "broken", {
        "README.md": "---\nsdk: gradio\napp_port: not-a-port\n---\n", "app.py": "print(1)\n"})
    spaces.add_space(ctx, str(repo), name="team/broken")
    view = spaces.deploy(ctx, "team/broken")
    assert view["stage"] == stages.CONFIG_ERROR
    assert "app_port" in view["error"] and "not-a-port" in view["error"]
    assert labelled("container", "team/broken") == []
    commit(repo, {"README.md": "---\nsdk: static\napp_file: missing.html\n---\n"}, "typo")
    needed, _ = spaces.request_update(ctx, "team/broken")
    assert needed
    view = spaces.deploy(ctx, "team/broken")
    assert view["stage"] == stages.NO_APP_FILE
    assert "missing.html" in view["error"]
    commit(repo, {"missing.html": "<p>fixed</p>"}, "add the app file")
    spaces.request_update(ctx, "team/broken")
    view = spaces.deploy(ctx, "team/broken")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert "fixed" in requests.get(view["url"], timeout=5).text
    spaces.delete(ctx, "team/broken")


def test_add_without_wait_builds_in_a_worker_and_logs_follow_to_the_end(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "worker", {
        "README.md": STATIC_README, "index.html": "<p>from the worker</p>"})
    runner = CliRunner()
    result = runner.invoke(cli, ["spaces", "add", str(repo), "--name", "team/worker",
                                 "--json"], obj={"ctx": ctx, "config": ctx.config})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stage"] == stages.BUILDING
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        view = spaces.describe(ctx, "team/worker")
        if view["stage"] not in stages.BUSY:
            break
        time.sleep(0.5)
    assert view["stage"] == stages.RUNNING, view["error"]
    result = runner.invoke(cli, ["spaces", "logs", "team/worker", "--build", "--follow"],
                           obj={"ctx": ctx})
    assert result.exit_code == 0
    assert "==> Revision" in result.output and "Successfully tagged" in result.output
    spaces.delete(ctx, "team/worker")


def test_root_and_the_service_account_run_the_same_commands(podman_ready, tmp_path):
    account = pwd.getpwnam("appliance")
    data = Path(f"/var/lib/appliance/test-{uuid.uuid4().hex[:8]}")
    data.mkdir()
    os.chown(data, account.pw_uid, account.pw_gid)
    try:
        repo = make_space_repo(data / "sources" / "shared", {
            "README.md": STATIC_README, "index.html": "<p>shared</p>"})
        subprocess.run(["chown", "-R", "appliance:appliance", str(data)], check=True)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "APPLIANCE_DATA_DIR": str(data / "db"),
               "APPLIANCE_LOCAL_SOURCES": str(data / "sources"),
               "APPLIANCE_PORT_RANGE": "17900-17919", "APPLIANCE_CONFIG_FILE": "/nonexistent"}
        (data / "db").mkdir()
        os.chown(data / "db", account.pw_uid, account.pw_gid)
        appliance = "/opt/appliance/venv/bin/appliance"
        added = subprocess.run([appliance, "spaces", "add", str(repo), "--name", "ops/shared",
                                "--wait", "--json"], env=env, capture_output=True, text=True,
                               cwd="/")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["stage"] == stages.RUNNING
        assert (data / "db" / "appliance.db").stat().st_uid == account.pw_uid
        shown = as_service(*[f"{k}={v}" for k, v in env.items()], appliance, "spaces", "show",
                           "ops/shared", "--json")
        assert json.loads(shown.stdout)["stage"] == stages.RUNNING
        events = json.loads(as_service(*[f"{k}={v}" for k, v in env.items()], appliance,
                                       "events", "--json").stdout)
        assert {e["actor"] for e in events} == {"cli:root"}  # who typed it, not the account
        deleted = subprocess.run([appliance, "spaces", "delete", "ops/shared", "--yes"],
                                 env=env, capture_output=True, text=True, cwd="/")
        assert deleted.returncode == 0, deleted.stderr
    finally:
        subprocess.run([appliance, "router", "--stop"], env=env, capture_output=True, cwd="/")
        shutil.rmtree(data, ignore_errors=True)


STREAMLIT_README = """---
title: Streamlit demo
sdk: streamlit
sdk_version: 1.40.1
app_file: main.py
---
"""


def test_streamlit_space_deploys_with_its_pinned_version(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "streamlit", {
        "README.md": STREAMLIT_README,
        "main.py": "import streamlit as st\nst.title('streamlit ok')\n"})
    spaces.add_space(ctx, str(repo), name="team/streamlit")
    view = spaces.deploy(ctx, "team/streamlit")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"], timeout=5).status_code == 200
    assert requests.get(view["url"] + "_stcore/health", timeout=5).text == "ok"
    name = ctx.store.get_space("team/streamlit")["container"]
    version = as_service("podman", "exec", name, "python", "-c",
                         "import streamlit; print(streamlit.__version__)").stdout.strip()
    assert version == "1.40.1"
    spaces.delete(ctx, "team/streamlit")
