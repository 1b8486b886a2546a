"""The whole lifecycle for the streamlit, docker and static SDKs on real Podman (gradio has its
own, longer flow in test_podman_gradio.py): add, answer, code-only update, broken commit
(old keeps serving), rollback, stop, delete."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import requests
from conftest import commit, labelled, make_space_repo

from appliance import stages
from appliance.core import spaces

pytestmark = pytest.mark.podman


@dataclass(frozen=True)
class Case:
    sdk: str
    files: dict
    changed: dict
    broken: dict
    broken_stage: str
    path: str = ""


def _streamlit(text: str) -> str:
    return f"import streamlit as st\nst.write('{text}')\n"


CASES = [
    Case(
        "streamlit",
        {"README.md": "---\nsdk: streamlit\nsdk_version: 1.40.1\n---\n",
         "app.py": _streamlit("v1")},
        {"app.py": _streamlit("v2")},
        {"requirements.txt": "no-such-package-appliance-test==9.9\n"},
        stages.BUILD_ERROR,
        path="_stcore/health",
    ),
    Case(
        "docker",
        {"README.md": "---\nsdk: docker\napp_port: 8000\n---\n",
         "Dockerfile": "FROM localhost/appliance-python:3.11\nWORKDIR /srv\nCOPY v.txt .\n"
                       "CMD [\"python3\", \"-m\", \"http.server\", \"8000\"]\n",
         "v.txt": "v1\n"},
        {"v.txt": "v2\n"},
        {"Dockerfile": "FROM localhost/appliance-python:3.11\nRUN exit 3\n"},
        stages.BUILD_ERROR,
        path="v.txt",
    ),
    Case(
        "static",
        {"README.md": "---\nsdk: static\n---\n", "index.html": "v1"},
        {"index.html": "v2"},
        {"README.md": "---\nsdk: static\napp_file: gone.html\n---\n"},
        stages.NO_APP_FILE,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.sdk for c in CASES])
def test_space_lifecycle_keeps_serving_through_every_step(appliance_env, case):
    ctx, sources_dir = appliance_env
    space_id = f"life/{case.sdk}"
    repo = make_space_repo(sources_dir / f"life-{case.sdk}", case.files)
    spaces.add_space(ctx, str(repo), name=space_id)
    view = spaces.deploy(ctx, space_id)
    assert view["stage"] == stages.RUNNING, view["error"]
    url = view["url"]
    if case.path:  # streamlit renders in the browser: its health endpoint proves it runs
        assert requests.get(url + case.path, timeout=5).status_code == 200
    if case.sdk != "streamlit":
        assert requests.get(url + case.path, timeout=5).text.strip() == "v1"

    first = view["revision"]
    second = commit(repo, case.changed, "code-only change")
    spaces.request_update(ctx, space_id)
    view = spaces.deploy(ctx, space_id)
    assert view["stage"] == stages.RUNNING and view["revision"] == second, view["error"]
    assert view["url"] == url
    if case.sdk != "streamlit":
        assert requests.get(url + case.path, timeout=5).text.strip() == "v2"

    commit(repo, case.broken, "broken")
    spaces.request_update(ctx, space_id)
    view = spaces.deploy(ctx, space_id)
    assert view["stage"] == case.broken_stage and view["error"]
    assert view["revision"] == second and view["url"] == url
    assert requests.get(url + case.path, timeout=5).status_code == 200

    view = spaces.rollback(ctx, space_id)
    assert view["stage"] == stages.RUNNING and view["revision"] == first
    if case.sdk != "streamlit":
        assert requests.get(url + case.path, timeout=5).text.strip() == "v1"

    view = spaces.stop(ctx, space_id)
    assert view["stage"] == stages.STOPPED and labelled("container", space_id) == []
    spaces.delete(ctx, space_id)
    assert ctx.store.find_space(space_id) is None
    assert labelled("image", space_id) == [] and labelled("volume", space_id) == []
