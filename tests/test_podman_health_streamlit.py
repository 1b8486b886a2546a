"""The Streamlit probe on a real Streamlit 1.40.1 Space on Podman: it sees the exception a
browser would see where the HTTP probe sees nothing wrong, and a fixed script as healthy."""

from __future__ import annotations

import json
import time

import pytest
from conftest import commit, make_space_repo

from appliance import stages
from appliance.core import spaces
from appliance.upkeep import health, health_streamlit
from appliance.upkeep.health_streamlit import probe_streamlit

pytestmark = pytest.mark.podman

SPACE = "sthealth/app"
FILES = {
    "README.md": "---\nsdk: streamlit\nsdk_version: 1.40.1\n---\n",
    "app.py": "import streamlit as st\nst.write('hello')\nst.write(undefined_name)\n",
    "pages/typo.py": "x = = 1\n",
    "pages/slow.py": "import time\nimport streamlit as st\nst.write('loading')\ntime.sleep(60)\n",
}
GOOD = "import streamlit as st\nst.write('fine')\n"


def _socket(ctx) -> tuple[int, str]:
    row = ctx.store.get_space(SPACE)
    return row["backend_port"], json.loads(row["manifest"] or "{}").get("base_path") or "/"


def test_streamlit_probe_reports_the_exception_the_http_probe_misses(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "st-health", FILES)
    spaces.add_space(ctx, str(repo), name=SPACE)
    view = spaces.deploy(ctx, SPACE)
    assert view["stage"] == stages.RUNNING, view["error"]
    port, base_path = _socket(ctx)

    assert health.probe(view["url"], 5) is None
    assert health.probe(view["url"] + "_stcore/health", 5) is None
    assert probe_streamlit("127.0.0.1", port, base_path, 10) == \
        "the script raised NameError: name 'undefined_name' is not defined"
    assert probe_streamlit("127.0.0.1", port, "/typo", 10) == \
        "the script does not compile: SyntaxError: invalid syntax (pages/typo.py, line 1)"
    # The health sweep's probe runs the script at most once per interval; a slow script is
    # not counted as broken (its HTTP side answered).
    row = ctx.store.get_space(SPACE)
    now = time.time()
    assert health.probe_space(row, 10, script_interval=60, now=now).startswith(
        "the script raised NameError")
    assert health.probe_space(row, 10, script_interval=60, now=now + 30) is None
    assert health.probe_space(row, 10, script_interval=0, now=now + 90) is None
    assert health.probe_space({**row, "manifest": json.dumps({"base_path": "/slow"})}, 1.5,
                              script_interval=60, now=now + 200) is None
    began = time.monotonic()
    assert probe_streamlit("127.0.0.1", port, "/slow", 1.5) == \
        "the script did not finish within 1.5 s"
    # Liveness bound: about 2 s expected (the timeout and CLOSE_WAIT); the page sleeps 60 s,
    # so a probe that waited for it would take 60 s.
    assert time.monotonic() - began < 10 * (1.5 + health_streamlit.CLOSE_WAIT) / 2

    commit(repo, {"app.py": GOOD}, "define the name")
    spaces.request_update(ctx, SPACE)
    view = spaces.deploy(ctx, SPACE)
    assert view["stage"] == stages.RUNNING, view["error"]
    port, base_path = _socket(ctx)
    assert probe_streamlit("127.0.0.1", port, base_path, 10) is None

    # Later probes resume the first probe's session instead of leaving one more behind.
    key = ("127.0.0.1", port, "/_stcore/stream")
    session = health_streamlit._sessions[key]
    timings = []
    for _ in range(5):
        began = time.monotonic()
        assert probe_streamlit("127.0.0.1", port, base_path, 10) is None
        timings.append(time.monotonic() - began)
    assert health_streamlit._sessions[key] == session
    print(f"probe of a healthy Streamlit Space: {min(timings) * 1000:.0f}-"
          f"{max(timings) * 1000:.0f} ms")
    spaces.delete(ctx, SPACE)
