"""Tests for resolving, locking and caching a Space's Python packages (appliance.core.packages).

The resolutions run the real uv against the real package index (the machines reach PyPI);
the failures point the index at a closed port on this machine.
"""

import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.core import packages
from appliance.errors import BuildFailed, InvalidInput

LOCK = """lock-version = "1.0"
created-by = "uv"
requires-python = ">=3.11"

[[packages]]
name = "Hello_World"
version = "1.0"
sdist = { url = "https://f.example/hello-1.0.tar.gz", hashes = { sha256 = "HASH_A" } }

[[packages.wheels]]
url = "https://f.example/hello-1.0-py3-none-any.whl"
size = 5
hashes = { sha256 = "HASH_B" }

[[packages.wheels]]
url = "https://f.example/hello-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"
size = 7
hashes = { sha256 = "HASH_C" }

[[packages]]
name = "only-sdist"
version = "2.0"
sdist = { url = "https://f.example/only_sdist-2.0.tar.gz", hashes = { sha256 = "HASH_D" } }

[[packages]]
name = "from-git"
version = "0.1"
vcs = { type = "git", url = "https://git.example/from-git", commit-id = "abc123" }
"""
for _letter in "ABCD":
    LOCK = LOCK.replace(f"HASH_{_letter}", _letter.lower() * 64)


def closed_port() -> int:
    """A port nothing listens on: bound (so no one else takes it) but never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed_port.held.append(sock)
    return sock.getsockname()[1]


closed_port.held = []


def config_for(tmp_path: Path, **values):
    return load_config({}, data_dir=str(tmp_path / "data"), **values)


# -- the lock ---------------------------------------------------------------------------------


def test_a_lock_pins_one_file_per_package_preferring_a_cpython_wheel():
    pins = {p.name: p for p in packages.parse_lock(LOCK)}
    assert pins["Hello_World"].filename == "hello-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    assert pins["Hello_World"].sha256 == "c" * 64
    assert pins["only-sdist"].filename == "only_sdist-2.0.tar.gz"
    assert pins["from-git"].direct == "from-git @ git+https://git.example/from-git@abc123"
    text = packages.requirements_text(pins.values())
    assert text == (f"Hello_World==1.0 --hash=sha256:{'c' * 64}\n"
                    f"only-sdist==2.0 --hash=sha256:{'d' * 64}\n")


@pytest.mark.parametrize("filename", ["../../appliance.db", "a/b.whl", ".hidden.whl", "x\n.whl",
                                      ""])
def test_a_lock_naming_a_file_outside_the_cache_is_refused(filename):
    text = LOCK.replace('url = "https://f.example/hello-1.0-cp311-cp311-manylinux_2_17_'
                        'x86_64.whl"', f'name = {filename!r}\nurl = "https://f.example/x"')
    with pytest.raises(BuildFailed, match="unusable file for Hello_World"):
        packages.parse_lock(text)


def test_an_unreadable_lock_says_how_to_resolve_again():
    with pytest.raises(BuildFailed, match="cannot be read") as caught:
        packages.parse_lock("[[packages]\nname=")
    assert "appliance spaces relock" in caught.value.hint


def test_the_summary_lists_every_package_and_survives_a_broken_lock():
    assert packages.lock_summary(LOCK)[0] == {"name": "Hello_World", "version": "1.0"}
    assert packages.lock_summary("not toml [") == []
    assert packages.lock_summary(None) == []


# -- what a Space asks for ------------------------------------------------------------------------


def test_gradio_roots_carry_spaces_preinstalls_and_the_front_matter_pin():
    roots, overrides = packages.sdk_roots("gradio", "4.44.0")
    assert roots[:2] == ("gradio[oauth]==4.44.0", "spaces")
    assert {"datasets", "huggingface_hub", "hf-transfer", "setuptools"} <= set(roots)
    assert overrides == ("gradio==4.44.0",)
    old, _ = packages.sdk_roots("gradio", "3.50.2")
    assert "setuptools<70" in old  # gradio 3 imports pkg_resources
    roots, overrides = packages.sdk_roots("streamlit", None)
    assert roots[0] == "streamlit" and overrides == ()


def test_requirements_are_copied_with_their_includes(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "requirements.txt").write_text(
        "# a comment\nnumpy<2  # trailing\n--extra-index-url https://download.example/whl\n"
        "-r sub/more.txt\nmylib @ git+https://git.example/mylib@v1\n")
    (repo / "sub" / "more.txt").write_text("pandas\n-r ../requirements.txt\n")
    out = packages.sanitise_requirements(repo / "requirements.txt", repo, tmp_path / "out")
    lines = out.read_text().splitlines()
    assert lines[0] == "numpy<2" and lines[1].startswith("--extra-index-url https://")
    included = Path(lines[2].split(" ", 1)[1])
    assert included.parent == tmp_path / "out" and "pandas" in included.read_text()
    assert lines[3] == "mylib @ git+https://git.example/mylib@v1"


@pytest.mark.parametrize("line", [
    "-e .", "/etc/passwd", "./local_pkg", "~/x", "file:///etc/passwd",
    "pkg @ file:///var/lib/appliance/appliance.db", "pkg@file:/etc/shadow",
    "--index-url file:///etc", "-i /srv/mirror", "-r ../../outside.txt",
    "-c /etc/appliance/appliance.toml", "--trusted-host evil", "x" * 5000,
])
def test_requirements_that_could_read_the_box_are_refused_with_the_line(tmp_path, line):
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.txt").write_text("secret\n")
    (repo / "requirements.txt").write_text(f"flask\n{line}\n")
    with pytest.raises(InvalidInput) as caught:
        packages.sanitise_requirements(repo / "requirements.txt", repo, tmp_path / "out")
    message = caught.value.message
    assert "requirements.txt" in message or "inside the repository" in message
    assert "secret" not in message


def test_build_settings_reach_uv_as_its_own_variables(tmp_path):
    config = config_for(tmp_path, pip_index_url="http://mirror.lan/simple",
                        pip_extra_index_url="http://a.lan/simple http://b.lan/simple",
                        pip_trusted_host="mirror.lan", build_https_proxy="http://proxy.lan:3128",
                        build_ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    env = packages.uv_environment(config, tmp_path / "cache")
    assert env["UV_DEFAULT_INDEX"] == "http://mirror.lan/simple"
    assert env["UV_INDEX"] == "http://a.lan/simple http://b.lan/simple"
    assert env["UV_INSECURE_HOST"] == "mirror.lan"
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.lan:3128"
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["UV_CACHE_DIR"] == str(tmp_path / "cache" / "uv")
    assert not any(k.startswith("PIP_") for k in env)


# -- resolving for real -------------------------------------------------------------------------


def test_a_dated_resolution_takes_what_existed_then_and_latest_takes_today(tmp_path):
    """gradio 4.44 with today's huggingface_hub (1.x) fails at import (HfFolder is gone): the
    dated resolution picks the huggingface_hub of the Space's time."""
    config = config_for(tmp_path)
    inputs = packages.Inputs(roots=("gradio==4.44.0",), files=(), overrides=())
    dated = packages.resolve(inputs, "3.11", "2024-10-01T00:00:00Z", config, tmp_path, print)
    versions = {p.name: p.version for p in packages.parse_lock(dated)}
    assert versions["gradio"] == "4.44.0"
    assert versions["huggingface-hub"].startswith("0.")
    latest = packages.resolve(inputs, "3.11", None, config, tmp_path, print)
    newest = {p.name: p.version for p in packages.parse_lock(latest)}
    assert int(newest["huggingface-hub"].split(".")[0]) >= 1
    # Every pinned file is for the base image's Python and platform.
    for pin in packages.parse_lock(dated):
        assert pin.filename.endswith((".whl", ".tar.gz", ".zip"))
        if pin.filename.endswith(".whl"):
            tags = pin.filename[:-4].split("-")[-3:]
            assert tags[0] in ("py3", "cp311", "py2.py3", "cp37", "cp38", "cp39", "cp310") \
                or tags[0].startswith("py"), pin.filename
            assert "win" not in tags[2] and "macosx" not in tags[2], pin.filename


def test_an_unreachable_index_fails_the_resolution_with_a_first_line_a_person_reads(tmp_path):
    port = closed_port()
    config = config_for(tmp_path, pip_index_url=f"http://127.0.0.1:{port}/simple",
                        package_timeout=5)
    inputs = packages.Inputs(roots=("gradio==4.44.0",), files=(), overrides=())
    with pytest.raises(BuildFailed) as caught:
        packages.resolve(inputs, "3.11", None, config, tmp_path, lambda line: None)
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"Could not reach the package index at 127.0.0.1:{port}")
    assert "connection refused" in first and "APPLIANCE_PIP_INDEX_URL" in first


def test_a_requirement_that_does_not_exist_is_named(tmp_path):
    inputs = packages.Inputs(roots=("appliance-no-such-package-xyz==1.0",), files=(),
                             overrides=())
    with pytest.raises(BuildFailed) as caught:
        packages.resolve(inputs, "3.11", None, config_for(tmp_path), tmp_path, lambda _: None)
    first = str(caught.value).splitlines()[0]
    assert first.startswith("The Space's Python requirements cannot be resolved")
    assert "appliance-no-such-package-xyz" in first


# -- the package cache ---------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    served: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        body = self.served.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Files.served, _Files.hits = {}, []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def pin_for(base: str, name: str, body: bytes, sha: str | None = None) -> packages.Pin:
    _Files.served[f"/{name}"] = body
    return packages.Pin(name.split("-")[0], "1.0", name, f"{base}/{name}",
                        sha or hashlib.sha256(body).hexdigest(), len(body))


def test_files_are_fetched_once_then_served_from_the_cache(tmp_path, file_server):
    config = config_for(tmp_path, build_ca_bundle="")
    pins = [pin_for(file_server, f"pkg{i}-1.0-py3-none-any.whl", os.urandom(3000))
            for i in range(5)]
    said = []
    paths = packages.fetch(pins, tmp_path / "cache", config, said.append)
    assert len(_Files.hits) == 5 and "Downloading 5 package files" in said[0]
    assert all(hashlib.sha256(paths[p.filename].read_bytes()).hexdigest() == p.sha256
               for p in pins)
    _Files.hits.clear()
    packages.fetch(pins, tmp_path / "cache", config, said.append)
    assert _Files.hits == [] and "All 5 package files are in" in said[-1]


def test_a_file_whose_hash_differs_from_the_lock_is_refused_and_not_kept(tmp_path, file_server):
    pin = pin_for(file_server, "evil-1.0-py3-none-any.whl", b"tampered", sha="0" * 64)
    with pytest.raises(BuildFailed, match="sha256 does not match the lock"):
        packages.fetch([pin], tmp_path / "cache", config_for(tmp_path, build_ca_bundle=""),
                       lambda _: None)
    assert not list((tmp_path / "cache").rglob("*.whl"))
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_an_unreachable_file_host_names_the_package_and_what_to_do(tmp_path):
    port = closed_port()
    pin = packages.Pin("gradio", "4.44.0", "gradio-4.44.0-py3-none-any.whl",
                       f"http://127.0.0.1:{port}/gradio-4.44.0-py3-none-any.whl", "a" * 64, 10)
    with pytest.raises(BuildFailed) as caught:
        packages.fetch([pin], tmp_path / "cache", config_for(tmp_path, build_ca_bundle=""),
                       lambda _: None)
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"Could not download gradio 4.44.0 "
                            f"(gradio-4.44.0-py3-none-any.whl) from 127.0.0.1:{port}: "
                            "connection refused")
    assert "bundle" in first


def test_the_prune_removes_least_recently_used_files_but_never_a_kept_one(tmp_path):
    cache = tmp_path / "cache"
    made = []
    for index in range(4):
        body = bytes([index]) * 1000
        pin = packages.Pin(f"p{index}", "1", f"p{index}-1-py3-none-any.whl", None,
                           hashlib.sha256(body).hexdigest(), 1000)
        path = packages.cached_path(cache, pin)
        path.parent.mkdir(parents=True)
        path.write_bytes(body)
        os.utime(path, (1000 + index, 1000 + index))
        made.append(pin)
    removed, freed = packages.prune_cache(cache, 2000, keep={made[0].sha256})
    assert (removed, freed) == (2, 2000)
    left = {p.parent.name for p in packages.wheelhouse(cache).glob("*/*/*")}
    assert left == {made[0].sha256, made[3].sha256}  # p0 kept, p3 newest


def test_the_inputs_digest_changes_with_what_the_resolution_is_asked_and_nothing_else(tmp_path):
    roots, overrides = packages.sdk_roots("gradio", "4.44.0")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "requirements.txt").write_text("numpy\n-r more.txt\n")
    (repo / "more.txt").write_text("pandas\n")

    def digest(python="3.11", mode="dated"):
        read: dict[str, bytes] = {}
        packages.sanitise_requirements(repo / "requirements.txt", repo, tmp_path / "out",
                                       read=read)
        return packages.inputs_digest(roots, overrides, read, python, mode)

    first = digest()
    (repo / "app.py").write_text("print('a code-only change')\n")
    assert digest() == first
    assert digest(python="3.10") != first and digest(mode="latest") != first
    (repo / "more.txt").write_text("pandas<2\n")  # an included file counts too
    assert digest() != first


def test_a_second_space_asking_the_same_moments_later_resolves_from_the_cached_index(tmp_path):
    """The index's pages fetched for one Space serve the next one with the same inputs within
    the index's cache lifetime; a Space asking for something else asks the index."""
    from conftest import make_space_repo

    from appliance.core import spaces
    from appliance.core.manifest import load_manifest

    config = load_config({}, data_dir=str(tmp_path / "data"), podman_autostart=False,
                         podman_url="unix:///nonexistent.sock",
                         package_cache_dir=str(tmp_path / "cache"))
    ctx = spaces.open_context(config, actor="test")
    readme = "---\nsdk: gradio\nsdk_version: 4.44.0\npython_version: '3.11'\n---\n"
    logs = {}
    for name, extra in (("first", ""), ("second", ""), ("other", "tqdm\n")):
        repo = make_space_repo(tmp_path / name, {"README.md": readme, "app.py": "",
                                                 "requirements.txt": "numpy\n" + extra},
                               date="2024-10-15T12:00:00Z")
        space_id = f"team/{name}"
        ctx.store.insert_space({"id": space_id, "source": str(repo), "source_display": name,
                                "port": 17990 + len(logs), "stage": "BUILDING",
                                "hardware": "cpu", "desired": "running"}, "test")
        said = []
        lock = spaces._lock_for(ctx, space_id, "a" * 40, repo, load_manifest(repo), "3.11",
                                said.append)
        ctx.store.save_lock(lock)
        logs[name] = (said, lock)
    assert not any("cached moments ago" in line for line in logs["first"][0])
    assert any("cached moments ago" in line for line in logs["second"][0])
    assert logs["second"][1]["text"] == logs["first"][1]["text"]
    assert logs["second"][1]["resolved_at"] == logs["first"][1]["resolved_at"]
    # Other inputs: the index is asked (tqdm's page was never fetched).
    assert not any("cached moments ago" in line for line in logs["other"][0])
    assert "tqdm" in {p.name for p in packages.parse_lock(logs["other"][1]["text"])}
    ctx.store.close()


@pytest.mark.parametrize("sdk, version, files, as_of, breaks", [
    # gradio 3.50 and 4.44 import HfFolder, which huggingface_hub 1.0 removed.
    ("gradio", "3.50.2", "", "2023-11-20T12:00:00Z",
     lambda v: int(v["huggingface-hub"].split(".")[0]) >= 1),
    ("gradio", "4.44.0", "gradio>=4.0\n", "2024-10-15T12:00:00Z",
     lambda v: int(v["huggingface-hub"].split(".")[0]) >= 1),
    # streamlit 1.25 keeps numpy below 2; today's pyarrow is built for numpy 2.
    ("streamlit", "1.25.0", "pandas\npyarrow\n", "2023-08-01T12:00:00Z",
     lambda v: v["numpy"].startswith("1.") and int(v["pyarrow"].split(".")[0]) >= 16),
])
def test_latest_gives_an_old_space_the_packages_it_breaks_on_and_dated_does_not(
        tmp_path, sdk, version, files, as_of, breaks):
    """What each old Space of tests/test_podman_packages.py would get with latest: the
    combination known to fail at import (the gradio 4.44 one is built and run there)."""
    config = config_for(tmp_path)
    roots, overrides = packages.sdk_roots(sdk, version)
    repo = tmp_path / "repo"
    repo.mkdir()
    requirement_files = ()
    if files:
        (repo / "requirements.txt").write_text(files)
        requirement_files = (packages.sanitise_requirements(repo / "requirements.txt", repo,
                                                            tmp_path / "out"),)
    inputs = packages.Inputs(roots, requirement_files, overrides)

    def versions(when):
        text = packages.resolve(inputs, "3.11", when, config, tmp_path, lambda _: None)
        return {p.name: p.version for p in packages.parse_lock(text)}

    latest, dated = versions(None), versions(as_of)
    assert latest[sdk] == dated[sdk] == version  # the front matter's pin wins either way
    assert breaks(latest), latest
    assert not breaks(dated), dated


def test_two_builds_fetching_the_same_files_at_once_leave_one_good_copy(tmp_path, file_server):
    """Two workers building Spaces with the same lock fetch into the one cache together."""
    import threading

    config = config_for(tmp_path, build_ca_bundle="")
    pins = [pin_for(file_server, f"twice{i}-1.0-py3-none-any.whl", os.urandom(200_000))
            for i in range(6)]
    results, errors = [], []

    def build():
        try:
            results.append(packages.fetch(pins, tmp_path / "cache", config, lambda _: None))
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=build) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    for pin in pins:
        assert hashlib.sha256(results[0][pin.filename].read_bytes()).hexdigest() == pin.sha256
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert len(list(packages.wheelhouse(tmp_path / "cache").glob("*/*/*"))) == len(pins)


def test_without_uv_a_build_says_how_to_get_it(monkeypatch):
    import uv

    monkeypatch.setattr(uv, "find_uv_bin", lambda: (_ for _ in ()).throw(FileNotFoundError()))
    monkeypatch.setattr(packages.shutil, "which", lambda name: None)
    with pytest.raises(BuildFailed) as caught:
        packages.uv_binary()
    assert caught.value.message == "uv is not installed in the appliance's environment"
    assert "scripts/setup.sh" in caught.value.hint


def test_a_checkout_without_git_history_cannot_be_dated_and_says_what_to_do(tmp_path):
    from appliance.core import sources
    from appliance.errors import SourceError

    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError) as caught:
        sources.commit_time(tmp_path / "plain")
    assert caught.value.message == "Cannot read the commit time of plain"
    assert "resolution to latest" in caught.value.hint


def test_an_unknown_resolution_setting_names_the_choices(tmp_path):
    from appliance.core import spaces

    ctx = spaces.open_context(config_for(tmp_path, build_resolution="yesterday",
                                         podman_autostart=False), actor="test")
    with pytest.raises(InvalidInput) as caught:
        spaces.resolution_of(ctx, {"resolution": None})
    assert caught.value.message == "Unknown package resolution 'yesterday'"
    assert "dated, latest" in caught.value.hint
    assert "APPLIANCE_BUILD_RESOLUTION" in caught.value.hint
    ctx.store.close()
