"""Reading Spaces' repositories the Hub way, driven by the real huggingface_hub (HfApi,
hf_hub_download, snapshot_download) and the real `hf` CLI against the portal under gunicorn
(`appliance serve`): Space rows written here whose checkouts are real git clones on disk (no
Podman). Hostile paths, revisions and links; private Spaces; what only the Hub does.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from conftest import commit, git, make_space_repo, portal
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from appliance import stages, users
from appliance.adapters.store import open_store
from appliance.config import Config, load_config
from appliance.core.context import Context, space_paths
from appliance.gpu.nvml import Gpu, Inventory, MigDevice
from appliance.web import hf_repo
from appliance.web.app import create_app

PASSWORD = "correct horse battery"
HF = Path(sys.executable).with_name("hf")
BINARY = bytes(range(256)) * 4
WEIGHTS = b"pretend these are model weights\n" * 100
WEIGHTS_SHA = hashlib.sha256(WEIGHTS).hexdigest()
POINTER = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{WEIGHTS_SHA}\n"
           f"size {len(WEIGHTS)}\n")


def keep_checkout(config: Config, space_id: str, source: Path, sha: str) -> Path:
    """Clone source at sha where the appliance keeps that revision's checkout."""
    ctx = Context(config, None, None)  # space_paths reads only the config
    dest = space_paths(ctx, space_id)[0] / sha
    dest.parent.mkdir(parents=True, exist_ok=True)
    git(dest.parent, "clone", "-q", "--no-local", str(source), dest.name)
    git(dest, "checkout", "-q", "--detach", sha)
    return dest


def row(space_id: str, port: int, **extra) -> dict:
    return {"id": space_id, "source": f"https://example.org/{space_id}",
            "source_display": f"https://example.org/{space_id}", "stage": stages.RUNNING,
            "port": port, "hardware": "cpu", "desired": "running", "created_by": "token:alice",
            "sdk": "gradio", **extra}


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """Spaces with kept checkouts (two revisions of alice/demo, one of a private Space),
    served by gunicorn; yields (endpoint, tokens, shas, root)."""
    root = tmp_path_factory.mktemp("hfrepo")
    config = load_config({}, data_dir=str(root / "data"), public_host="box.lan")
    source = make_space_repo(root / "src", {
        "README.md": "---\ntitle: Demo\nsdk: gradio\n---\n# Demo\n",
        "app.py": "import gradio as gr\n",
    }, date="2024-10-15T12:00:00Z")
    first = git(source, "rev-parse", "HEAD")
    (source / "data").mkdir()
    (source / "data" / "blob.bin").write_bytes(BINARY)
    (source / "model.safetensors").write_text(POINTER)
    (source / "escape").symlink_to("/etc/passwd")
    second = commit(source, {"src/util.py": "def helper():\n    return 1\n",
                             "app.py": "import gradio as gr\nprint('v2')\n"}, "second",
                    date="2024-11-20T08:00:00Z")
    keep_checkout(config, "alice/demo", source, first)
    demo = keep_checkout(config, "alice/demo", source, second)
    # What `git lfs pull` leaves: the content under .git/lfs/objects by its sha256.
    stored = demo / ".git" / "lfs" / "objects" / WEIGHTS_SHA[:2] / WEIGHTS_SHA[2:4] / WEIGHTS_SHA
    stored.parent.mkdir(parents=True)
    stored.write_bytes(WEIGHTS)
    hidden_source = make_space_repo(root / "hidden", {"app.py": "SECRET_APP = 1\n"})
    hidden = git(hidden_source, "rev-parse", "HEAD")
    keep_checkout(config, "alice/hidden", hidden_source, hidden)

    store = open_store(config.db_path)
    users.add_user(store, "alice", "admin", PASSWORD, "test")
    tokens = {"write": users.create_token(store, "ci", "alice", "write", "test")[1],
              "read": users.create_token(store, "ro", "alice", "read", "test")[1]}
    manifest = {"title": "Demo", "sdk": "gradio", "tags": ["demo"], "models": ["org/model"]}
    store.insert_space(row("alice/demo", 17911, revision=second, previous_revision=first,
                           manifest=json.dumps(manifest), title="Demo"), "test")
    time.sleep(0.01)  # distinct update times for sorting
    store.insert_space(row("alice/hidden", 17912, revision=hidden, visibility="private"),
                       "test")
    time.sleep(0.01)
    store.insert_space(row("bob/unbuilt", 17913, stage=stages.BUILD_ERROR, sdk="static",
                           created_by="cli:root"), "test")
    store.close()
    log = root / "portal.log"
    with portal(config, log, workers=2) as endpoint:
        yield endpoint, tokens, {"first": first, "second": second, "hidden": hidden}, root
    assert "Traceback" not in log.read_text()


def api(box, who: str | None = None) -> HfApi:
    endpoint, tokens, _, _ = box
    return HfApi(endpoint=endpoint, token=tokens[who] if who else False)


def raw_get(box, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send the path exactly as written (no client normalising '..' away)."""
    parts = urlsplit(box[0])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def hf_cli(box, *args: str, who: str | None = "read", home: Path) -> subprocess.CompletedProcess:
    endpoint, tokens, _, _ = box
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               NO_COLOR="1", HF_HUB_DISABLE_UPDATE_CHECK="1")
    if who:
        env["HF_TOKEN"] = tokens[who]
    return subprocess.run([str(HF), *args], capture_output=True, text=True, env=env,
                          timeout=120)


# -- listing Spaces ---------------------------------------------------------------------------


def test_list_spaces_shows_what_the_caller_may_see(box):
    assert {s.id for s in api(box).list_spaces()} == {"alice/demo", "bob/unbuilt"}
    assert {s.id for s in api(box, "read").list_spaces()} == {"alice/demo", "alice/hidden",
                                                              "bob/unbuilt"}
    demo = next(s for s in api(box).list_spaces(author="alice"))
    assert (demo.id, demo.sdk, demo.sha, demo.private) == ("alice/demo", "gradio",
                                                           box[2]["second"], False)


def test_list_spaces_filters_sorts_limits_and_expands(box):
    hub = api(box, "read")
    assert [s.id for s in hub.list_spaces(search="UNBUIL")] == ["bob/unbuilt"]
    assert [s.id for s in hub.list_spaces(filter="demo")] == ["alice/demo"]
    assert [s.id for s in hub.list_spaces(models="org/model")] == ["alice/demo"]
    newest_first = [s.id for s in hub.list_spaces(sort="last_modified")]
    assert newest_first == ["bob/unbuilt", "alice/hidden", "alice/demo"]
    assert len(list(hub.list_spaces(limit=2))) == 2
    full = next(s for s in hub.list_spaces(author="alice", full=True) if s.id == "alice/demo")
    assert "src/util.py" in {f.rfilename for f in full.siblings}
    only = next(iter(hub.list_spaces(search="demo", expand=["sdk", "sha"])))
    assert (only.sdk, only.sha, only.tags) == ("gradio", box[2]["second"], None)


def test_list_spaces_refuses_sorts_and_expansions_it_cannot_honour(box):
    with pytest.raises(BadRequestError, match="This box keeps no likes"):
        list(api(box).list_spaces(sort="likes"))
    answer = requests.get(f"{box[0]}/api/spaces", params={"sort": "downloadz"}, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"] == "Cannot sort Spaces by 'downloadz'"
    assert "lastModified" in answer.json()["hint"]
    answer = requests.get(f"{box[0]}/api/spaces", params={"expand": "secrets"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"] == "Cannot expand 'secrets'"
    answer = requests.get(f"{box[0]}/api/spaces", params={"direction": "up"}, timeout=10)
    assert answer.status_code == 400 and "direction must be -1" in answer.json()["error"]


# -- the tree and the files -------------------------------------------------------------------


def test_list_repo_files_lists_every_file_but_not_the_link(box):
    files = api(box).list_repo_files("alice/demo", repo_type="space")
    assert sorted(files) == ["README.md", "app.py", "data/blob.bin", "model.safetensors",
                             "src/util.py"]


def test_list_repo_tree_gives_types_sizes_oids_lfs_and_last_commits(box):
    shas = box[2]
    top = {e.path: e for e in api(box).list_repo_tree("alice/demo", repo_type="space",
                                                      expand=True)}
    assert set(top) == {"README.md", "app.py", "data", "escape", "model.safetensors", "src"}
    assert top["app.py"].size == len("import gradio as gr\nprint('v2')\n")
    assert top["app.py"].blob_id == git(Path(box[3] / "src"), "rev-parse",
                                        f"{shas['second']}:app.py")
    assert top["app.py"].last_commit.oid == shas["second"]
    assert top["README.md"].last_commit.oid == shas["first"]
    assert top["README.md"].last_commit.title == "initial"
    weights = top["model.safetensors"]
    assert (weights.size, weights.lfs.sha256, weights.lfs.pointer_size) == (
        len(WEIGHTS), WEIGHTS_SHA, len(POINTER))
    assert type(top["data"]).__name__ == "RepoFolder"
    inside = [e.path for e in api(box).list_repo_tree("alice/demo", "data", repo_type="space")]
    assert inside == ["data/blob.bin"]
    answer = requests.get(f"{box[0]}/api/spaces/alice/demo/tree/main", timeout=10).json()
    assert {e["path"]: e["type"] for e in answer}["escape"] == "link"


def test_tree_pages_follow_the_link_header(box):
    url = f"{box[0]}/api/spaces/alice/demo/tree/main?recursive=true&limit=2"
    seen, pages = [], 0
    while url:
        answer = requests.get(url, timeout=10)
        seen += [e["path"] for e in answer.json()]
        url = answer.links.get("next", {}).get("url")
        pages += 1
    assert pages == 4 and len(seen) == len(set(seen)) == 8  # 6 files and links, 2 folders


def test_hf_hub_download_gets_files_at_branch_and_short_sha(box, tmp_path):
    shas = box[2]
    hub = dict(repo_id="alice/demo", repo_type="space", endpoint=box[0], token=False,
               cache_dir=tmp_path)
    app = Path(hf_hub_download(filename="app.py", **hub))
    assert app.read_text() == "import gradio as gr\nprint('v2')\n"
    old = Path(hf_hub_download(filename="app.py", revision=shas["first"][:7], **hub))
    assert old.read_text() == "import gradio as gr\n"
    assert Path(hf_hub_download(filename="data/blob.bin", **hub)).read_bytes() == BINARY
    assert Path(hf_hub_download(filename="model.safetensors", **hub)).read_bytes() == WEIGHTS


def test_resolve_headers_are_the_ones_hf_hub_download_checks(box):
    shas = box[2]
    status, headers, body = raw_get(box, "/spaces/alice/demo/resolve/main/app.py", "HEAD")
    blob = git(Path(box[3] / "src"), "rev-parse", f"{shas['second']}:app.py")
    assert status == 200 and body == b""
    assert headers["ETag"] == f'"{blob}"' and headers["X-Repo-Commit"] == shas["second"]
    assert headers["Content-Length"] == str(len("import gradio as gr\nprint('v2')\n"))
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    _, lfs, _ = raw_get(box, "/spaces/alice/demo/resolve/main/model.safetensors", "HEAD")
    assert lfs["ETag"] == f'"{WEIGHTS_SHA}"' and lfs["Content-Length"] == str(len(WEIGHTS))
    assert lfs["Content-Type"] == "application/octet-stream"


def test_snapshot_download_and_space_info_at_a_revision(box, tmp_path):
    shas = box[2]
    info = api(box).space_info("alice/demo", revision="main")
    assert info.sha == shas["second"]
    assert {s.rfilename for s in info.siblings} == {"README.md", "app.py", "data/blob.bin",
                                                    "model.safetensors", "src/util.py"}
    assert api(box).space_info("alice/demo", revision=shas["first"][:8]).sha == shas["first"]
    folder = Path(snapshot_download("alice/demo", repo_type="space", endpoint=box[0],
                                    token=False, cache_dir=tmp_path))
    assert (folder / "src" / "util.py").read_text() == "def helper():\n    return 1\n"
    assert not (folder / "escape").exists()


# -- hostile values ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd",
                                  "src/..%2f..%2fapp.py", "./app.py"])
def test_a_path_leaving_the_repository_is_refused(box, path):
    status, headers, body = raw_get(box, f"/spaces/alice/demo/resolve/main/{path}")
    assert status == 400, body
    assert "has an empty, '.' or '..' part" in json.loads(body)["error"]
    assert b"root:" not in body


@pytest.mark.parametrize("path", ["/etc/passwd", "%2Fetc%2Fpasswd"])
def test_an_absolute_path_reads_nothing_outside(box, path):
    status, _, body = raw_get(box, f"/spaces/alice/demo/resolve/main/{path}")
    assert status in (308, 400, 404) and b"root:" not in body


def test_a_symlink_out_of_the_tree_is_listed_but_never_read(box, tmp_path):
    with pytest.raises(EntryNotFoundError) as caught:
        hf_hub_download("alice/demo", "escape", repo_type="space", endpoint=box[0],
                        token=False, cache_dir=tmp_path)
    assert "symbolic link" in str(caught.value)
    status, headers, body = raw_get(box, "/spaces/alice/demo/resolve/main/escape")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and b"root:" not in body
    assert json.loads(body)["error"] == ("'escape' is a symbolic link: this box lists links but "
                                         "never follows them")


@pytest.mark.parametrize("revision", ["--output=x", "-n", "main~1", "HEAD^", "deadbeefcafe",
                                      "a" * 300, "refs%2Fheads%2Fmain"])
def test_a_revision_that_is_an_option_or_not_kept_is_not_found(box, revision):
    status, headers, body = raw_get(box, f"/api/spaces/alice/demo/tree/{revision}")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound", body
    error = json.loads(body)
    assert error["error"].startswith(f"Space alice/demo serves {box[2]['second']}, not ")
    assert box[2]["first"][:12] in error["hint"]


def test_unknown_revision_and_file_map_to_huggingface_hub_errors(box, tmp_path):
    with pytest.raises(RevisionNotFoundError) as caught:
        api(box).space_info("alice/demo", revision="--output=x")
    assert f"Space alice/demo serves {box[2]['second']}, not '--output=x'" in str(caught.value)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/demo", "nope.txt", repo_type="space", endpoint=box[0],
                        token=False, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError, match="no revision on this box yet"):
        api(box).list_repo_files("bob/unbuilt", repo_type="space")


def test_a_private_space_is_missing_to_visitors_and_there_for_tokens(box, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        api(box).list_repo_files("alice/hidden", repo_type="space")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/hidden", "app.py", repo_type="space", endpoint=box[0],
                        token=False, cache_dir=tmp_path)
    status, headers, body = raw_get(box, "/spaces/alice/hidden/resolve/main/app.py")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    assert b"SECRET_APP" not in body
    assert json.loads(body)["error"] == "No Space named alice/hidden"
    _, _, missing = raw_get(box, "/spaces/alice/nothing/resolve/main/app.py")
    assert json.loads(missing)["error"] == "No Space named alice/nothing"  # the same words
    assert api(box, "read").list_repo_files("alice/hidden", repo_type="space") == ["app.py"]


# -- hardware and what only the Hub does ------------------------------------------------------


def test_list_spaces_hardware_names_what_settings_accepts(box):
    offers = api(box).list_spaces_hardware()
    assert offers[0].name == "cpu-basic" and offers[0].accelerator is None
    assert offers[0].unit_cost_usd == 0
    assert all(o.name == "cpu-basic" or o.name.split(":")[0] in ("gpu", "mig", "shared")
               for o in offers)


def test_hardware_lists_whole_gpus_mig_profiles_and_a_shared_budget(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    gpu = dict(memory_used_mib=0, memory_free_mib=0, utilization_gpu=0, utilization_memory=0,
               temperature_c=40, power_w=50.0, processes=(), jetson=False)
    inventory = Inventory(available=True, gpus=(
        Gpu(0, "GPU-0", "NVIDIA L4", 23034, mig_enabled=False, mig_devices=(), **gpu),
        Gpu(1, "GPU-1", "NVIDIA L4", 23034, mig_enabled=False, mig_devices=(), **gpu),
        Gpu(2, "GPU-2", "NVIDIA A100 80GB PCIe", 81920, mig_enabled=True,
            mig_devices=(MigDevice(0, "MIG-a", 9728), MigDevice(1, "MIG-b", 40192)), **gpu)))
    app = create_app(config, context_factory=lambda cfg, actor: Context(
        cfg, open_store(cfg.db_path), None, actor, read_inventory=lambda: inventory))
    offers = app.test_client().get("/api/spaces/hardware").json
    assert [o["name"] for o in offers] == ["cpu-basic", "gpu", "gpu:2", "mig:1g.10gb",
                                           "mig:3g.40gb", "shared:78g"]
    assert offers[2]["accelerator"] == {"type": "gpu", "model": "L4", "quantity": 2,
                                        "vram": "22 GB", "manufacturer": "Nvidia"}


def test_list_spaces_pages_with_a_link_header(tmp_path, monkeypatch):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    app = create_app(config)
    store = open_store(config.db_path)
    for i in range(3):
        store.insert_space(row(f"o/s{i}", 17920 + i), "test")
    store.close()
    monkeypatch.setattr(hf_repo, "PAGE", 2)
    first = app.test_client().get("/api/spaces?sort=id&direction=1")
    assert [s["id"] for s in first.json] == ["o/s0", "o/s1"]
    next_url = first.headers["Link"].split(";")[0].strip("<>")
    second = app.test_client().get(next_url)
    assert [s["id"] for s in second.json] == ["o/s2"] and "Link" not in second.headers


def test_hub_only_services_say_so_with_501(box):
    with pytest.raises(HfHubHTTPError, match="this box has no search index") as caught:
        list(api(box).search_spaces("make an image"))
    assert caught.value.response.status_code == 501
    with pytest.raises(HfHubHTTPError, match="Space templates live on the Hugging Face Hub"):
        api(box).list_space_templates()
    with pytest.raises(HfHubHTTPError, match="this box has no ZeroGPU quota"):
        api(box).get_zero_gpu_quota()
    with pytest.raises(HfHubHTTPError, match="does not duplicate Spaces") as caught:
        api(box, "write").duplicate_repo("alice/demo", to_id="alice/copy", repo_type="space")
    assert caught.value.response.status_code == 501
    with pytest.raises(HfHubHTTPError, match="Dev mode"):
        api(box, "write").enable_space_dev_mode("alice/demo")


# -- the hf CLI -------------------------------------------------------------------------------


def test_hf_cli_lists_spaces_files_and_hardware(box, tmp_path):
    listed = hf_cli(box, "spaces", "ls", "--format", "json", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {s["id"] for s in json.loads(listed.stdout)} == {"alice/demo", "alice/hidden",
                                                             "bob/unbuilt"}
    files = hf_cli(box, "spaces", "ls", "alice/demo", "-R", home=tmp_path)
    assert files.returncode == 0, files.stderr
    assert "src/util.py" in files.stdout and "model.safetensors" in files.stdout
    hardware = hf_cli(box, "spaces", "hardware", home=tmp_path)
    assert hardware.returncode == 0 and "cpu-basic" in hardware.stdout, hardware.stderr
    search = hf_cli(box, "spaces", "search", "make an image", home=tmp_path)
    assert search.returncode != 0 and "no search index" in search.stdout + search.stderr


def test_hf_cli_downloads_a_space_and_changes_its_settings(box, tmp_path):
    target = tmp_path / "out"
    done = hf_cli(box, "download", "--repo-type", "space", "alice/demo", "--local-dir",
                  str(target), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (target / "app.py").read_text() == "import gradio as gr\nprint('v2')\n"
    assert (target / "data" / "blob.bin").read_bytes() == BINARY
    one = hf_cli(box, "download", "--repo-type", "space", "alice/demo", "README.md",
                 "--revision", box[2]["first"], "--local-dir", str(tmp_path / "old"),
                 home=tmp_path)
    assert one.returncode == 0 and (tmp_path / "old" / "README.md").exists(), one.stderr
    settings = hf_cli(box, "spaces", "settings", "alice/demo", "--sleep-time", "300",
                      who="write", home=tmp_path)
    assert settings.returncode == 0, settings.stderr
    assert api(box, "read").get_space_runtime("alice/demo").sleep_time == 300
