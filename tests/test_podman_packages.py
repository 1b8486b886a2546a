"""Spaces written years ago build and answer: their packages are resolved as of their commit,
locked per revision, installed from the box's package cache (no network for a locked
rebuild), and their image carries what Spaces' images carry. Real uv, real PyPI, real
rootless Podman."""

from __future__ import annotations

import socket

import pytest
import requests
from conftest import commit, make_space_repo

from appliance import stages
from appliance.core import spaces
from appliance.core.context import Context

pytestmark = pytest.mark.podman


def readme(sdk: str, version: str, app_file: str = "app.py", title: str = "old") -> str:
    return (f"---\ntitle: {title}\nsdk: {sdk}\nsdk_version: {version}\n"
            f"python_version: '3.11'\napp_file: {app_file}\n---\n")


GRADIO_3_APP = """import gradio as gr

def greet(name):
    return "Hello " + name

gr.Interface(fn=greet, inputs="text", outputs="text", title="gradio three answers").launch()
"""

GRADIO_4_APP = """import gradio as gr

with gr.Blocks() as demo:
    gr.Markdown("gradio four answers")
demo.launch()
"""

STREAMLIT_APP = """import pandas as pd
import pyarrow
import streamlit as st

st.title("streamlit 1.25 answers")
st.dataframe(pd.DataFrame({"a": [1, 2]}))
"""

# One Space that does what real Spaces do at start and died on the box before: run make,
# start as app/sub.py and import a package at the repository's root, write matplotlib's
# cache, import datasets without listing it.
PARITY_FILES = {
    "README.md": readme("gradio", "5.9.1", app_file="app/sub.py", title="parity"),
    "Makefile": "hello:\n\techo made-it > /tmp/made.txt\n",
    "src/__init__.py": "",
    "src/config.py": "GREETING = 'root-package'\n",
    "requirements.txt": "matplotlib\n",
    "app/sub.py": """import os
import subprocess

subprocess.run(["make", "hello"], check=True, cwd="/home/user/app")
from src.config import GREETING
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.plot([1, 2])
plt.savefig("/tmp/plot.png")
import datasets
import gradio as gr

checks = (f"make={open('/tmp/made.txt').read().strip()} greeting={GREETING} "
          f"mplcache={matplotlib.get_cachedir()} "
          f"cache_owner={os.stat('/home/user/.cache').st_uid} "
          f"datasets={datasets.__version__} system={os.environ.get('SYSTEM')}")
with gr.Blocks() as demo:
    gr.Markdown(checks)
demo.launch()
""",
}


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed_port.held.append(sock)  # bound, never listening: connections are refused
    return sock.getsockname()[1]


closed_port.held = []


def offline(ctx: Context) -> Context:
    """The same appliance with its package index at a closed port (no network for packages)."""
    port = closed_port()
    return Context(ctx.config.with_values(pip_index_url=f"http://127.0.0.1:{port}/simple",
                                          package_timeout=5),
                   ctx.store, ctx.runtime, ctx.actor), port


def page(view: dict, path: str = "") -> str:
    response = requests.get(view["url"] + path, timeout=30)
    assert response.status_code == 200, response.text[:500]
    return response.text


def build_log(ctx, space_id: str) -> str:
    return spaces.build_log_path(ctx, space_id).read_text()


def test_a_gradio_3_space_from_2023_builds_and_answers(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "g3", {
        "README.md": readme("gradio", "3.50.2"), "app.py": GRADIO_3_APP,
    }, date="2023-11-20T12:00:00Z")
    spaces.add_space(ctx, str(repo), name="old/gradio3")
    view = spaces.deploy(ctx, "old/gradio3")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert "gradio three answers" in page(view, "config")
    lock = view["lock"]
    assert lock["resolution"] == "dated" and lock["as_of"] == "2023-11-20T12:00:00Z"
    versions = {p["name"]: p["version"] for p in lock["packages"]}
    assert versions["gradio"] == "3.50.2"
    assert versions["gradio-client"].startswith("0.6")  # the one gradio 3.50 was made with
    assert int(versions["setuptools"].split(".")[0]) < 70  # pkg_resources, as then
    log = build_log(ctx, "old/gradio3")
    assert "Resolving Python packages with uv as of 2023-11-20T12:00:00Z" in log
    spaces.delete(ctx, "old/gradio3")


def test_a_gradio_4_space_with_loose_requirements_is_locked_and_rebuilds_offline(
        appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "g4", {
        "README.md": readme("gradio", "4.44.0"), "app.py": GRADIO_4_APP,
        "requirements.txt": "gradio>=4.0\ntransformers\n",
    }, date="2024-10-15T12:00:00Z")
    spaces.add_space(ctx, str(repo), name="old/gradio4")
    view = spaces.deploy(ctx, "old/gradio4")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert "gradio four answers" in page(view, "config")
    first = ctx.store.get_lock("old/gradio4", view["revision"])
    versions = {p["name"]: p["version"] for p in view["lock"]["packages"]}
    assert versions["gradio"] == "4.44.0" and versions["huggingface-hub"].startswith("0.")
    assert "transformers" in versions

    # A factory rebuild of the locked revision needs no index: the same files, from the cache.
    cut_off, port = offline(ctx)
    view = spaces.deploy(cut_off, "old/gradio4", factory=True)
    assert view["stage"] == stages.RUNNING, view["error"]
    assert "gradio four answers" in page(view, "config")
    again = ctx.store.get_lock("old/gradio4", view["revision"])
    assert again["text"] == first["text"]  # byte for byte
    log = build_log(ctx, "old/gradio4")
    assert f"Installing the packages locked for revision {view['revision'][:12]}" in log
    assert "Resolving Python packages" not in log

    # A code-only commit asks for the same packages: it keeps the lock, so it needs no index.
    commit(repo, {"app.py": GRADIO_4_APP.replace("four", "4b")}, "code only",
           date="2024-11-01T12:00:00Z")
    needed, _ = spaces.request_update(cut_off, "old/gradio4")
    assert needed
    view = spaces.deploy(cut_off, "old/gradio4")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert "gradio 4b answers" in page(view, "config")
    carried = ctx.store.get_lock("old/gradio4", view["revision"])
    assert carried["text"] == first["text"] and carried["as_of"] == "2024-10-15T12:00:00Z"
    assert "are those of revision" in build_log(ctx, "old/gradio4")

    # Changed requirements resolve again: that needs the index, and the failure says so first.
    serving = view["revision"]
    commit(repo, {"requirements.txt": "gradio>=4.0\ntransformers\ntqdm\n"}, "new needs",
           date="2024-11-02T12:00:00Z")
    needed, _ = spaces.request_update(cut_off, "old/gradio4")
    assert needed
    view = spaces.deploy(cut_off, "old/gradio4")
    assert view["stage"] == stages.BUILD_ERROR
    first_line = ctx.store.latest_build("old/gradio4")["error"].splitlines()[0]
    assert first_line.startswith(f"Could not reach the package index at 127.0.0.1:{port}")
    assert "connection refused" in first_line and "bundle" in first_line
    assert view["revision"] == serving  # the old revision keeps serving
    assert "gradio 4b answers" in page(view, "config")

    # Relock: the same revision resolves again (with the index back), as of its commit.
    assert spaces.forget_locks(ctx, "old/gradio4") >= 2
    needed, _ = spaces.request_update(ctx, "old/gradio4")
    view = spaces.deploy(ctx, "old/gradio4")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert view["lock"]["as_of"] == "2024-11-02T12:00:00Z"
    assert "tqdm" in {p["name"] for p in view["lock"]["packages"]}
    spaces.delete(ctx, "old/gradio4")


def test_with_latest_the_same_gradio_4_space_fails_as_it_would_on_spaces(appliance_env):
    """The setting is real: today's huggingface_hub has no HfFolder, which gradio 4.44
    imports; the dated default is what keeps the Space alive."""
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "g4-latest", {
        "README.md": readme("gradio", "4.44.0"), "app.py": GRADIO_4_APP,
    }, date="2024-10-15T12:00:00Z")
    spaces.add_space(ctx, str(repo), name="old/gradio4-latest")
    spaces.set_resolution(ctx, "old/gradio4-latest", "latest")
    view = spaces.deploy(ctx, "old/gradio4-latest")
    assert view["stage"] != stages.RUNNING
    assert "HfFolder" in (view["error"] or "")
    assert spaces.describe(ctx, "old/gradio4-latest")["resolution"] == "latest"
    spaces.delete(ctx, "old/gradio4-latest")


def test_a_streamlit_1_25_space_with_loose_pandas_and_pyarrow_answers(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "st", {
        "README.md": readme("streamlit", "1.25.0"), "app.py": STREAMLIT_APP,
        "requirements.txt": "pandas\npyarrow\n",
    }, date="2023-08-01T12:00:00Z")
    spaces.add_space(ctx, str(repo), name="old/streamlit")
    view = spaces.deploy(ctx, "old/streamlit")
    assert view["stage"] == stages.RUNNING, view["error"]
    page(view)
    versions = {p["name"]: p["version"] for p in view["lock"]["packages"]}
    assert versions["streamlit"] == "1.25.0" and versions["numpy"].startswith("1.")
    spaces.delete(ctx, "old/streamlit")


def test_a_space_gets_what_spaces_images_give_it(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "parity", PARITY_FILES, date="2026-01-01T00:00:00Z")
    spaces.add_space(ctx, str(repo), name="old/parity")
    view = spaces.deploy(ctx, "old/parity")
    assert view["stage"] == stages.RUNNING, view["error"]
    text = page(view, "config")
    assert "make=made-it" in text
    assert "greeting=root-package" in text
    assert "mplcache=/home/user/.cache/matplotlib" in text
    assert "cache_owner=1000" in text
    assert "datasets=" in text and "system=spaces" in text
    spaces.delete(ctx, "old/parity")
