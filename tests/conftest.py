"""Shared fixtures: real git repositories for Spaces and an appliance context on real Podman."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE_USER = "appliance"


def git(cwd: Path, *args: str, date: str | None = None) -> str:
    """Run git in cwd; date (e.g. "2024-10-15T12:00:00Z") stamps a commit as made then."""
    env = {**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else None
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd, check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()


def make_space_repo(path: Path, files: dict[str, str], date: str | None = None) -> Path:
    """Create a git repository holding files (a Space), committed on branch main."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    commit(path, files, "initial", date=date)
    return path


def commit(path: Path, files: dict[str, str | None], message: str, date: str | None = None
           ) -> str:
    """Write (or delete, with None) files and commit (made at date, when given); return the
    new sha."""
    for name, content in files.items():
        target = path / name
        if content is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message, date=date)
    return git(path, "rev-parse", "HEAD")


def wait_for(predicate, timeout: float, what: str):
    """Poll predicate until it returns something true (returned), or fail saying what."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def as_service(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command as the service account, with its rootless Podman environment."""
    import pwd

    account = pwd.getpwnam(SERVICE_USER)
    return subprocess.run(
        ["runuser", "-u", SERVICE_USER, "--", "env", f"HOME={account.pw_dir}",
         f"XDG_RUNTIME_DIR=/run/user/{account.pw_uid}", *command],
        cwd="/", check=check, capture_output=True, text=True,
    )


@pytest.fixture(scope="session")
def podman_ready() -> None:
    """Fail (not skip) when rootless Podman is not set up: scripts/test.sh sets it up."""
    from appliance.adapters.runtime import Runtime
    from appliance.config import load_config

    Runtime(load_config({})).info()


# The package files builds install, kept between runs on this machine so a second run does
# not download them again (a cache: a fresh machine fills it, nothing depends on it).
PACKAGE_CACHE = Path("/var/cache/appliance/test-packages")


@pytest.fixture(scope="module")
def appliance_env(tmp_path_factory, podman_ready):
    """A fresh data dir and Space sources dir, and a context on the real Podman."""
    from appliance.adapters import router
    from appliance.config import load_config
    from appliance.core import spaces

    root = tmp_path_factory.mktemp("appliance")
    sources_dir = root / "sources"
    sources_dir.mkdir()
    low = 17100 + (uuid.uuid4().int % 20) * 40
    config = load_config(
        {}, data_dir=str(root / "data"), local_sources=str(sources_dir),
        port_range=f"{low}-{low + 39}", startup_timeout_cap=180, drain_seconds=3,
        health_initial_delay=0,  # tests sweep right after a deploy; the delay has its own test
        package_cache_dir=str(PACKAGE_CACHE),
    )
    ctx = spaces.open_context(config, actor="test")
    yield ctx, sources_dir
    for row in ctx.store.list_spaces():
        try:
            spaces.delete(ctx, row["id"])
        except Exception:  # noqa: BLE001 - best-effort cleanup of a failed test
            pass
    router.stop_router(config)
    ctx.store.close()
    shutil.rmtree(root, ignore_errors=True)


def container_env(name: str) -> dict[str, str]:
    """The environment the container's processes really got (CDI edits included), read from
    PID 1; `podman exec env` shows only the stored config."""
    out = as_service("podman", "exec", name, "cat", "/proc/1/environ").stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def labelled(kind: str, space_id: str) -> list[str]:
    """Names of the service account's containers/images/volumes labelled with a Space."""
    label = f"label=appliance.space={space_id}"
    if kind == "container":
        out = as_service("podman", "ps", "-a", "--filter", label, "--format", "{{.Names}}")
    elif kind == "image":
        out = as_service("podman", "images", "--filter", label, "--format", "{{.ID}}")
    else:
        out = as_service("podman", "volume", "ls", "--filter", label, "--format", "{{.Name}}")
    return [line for line in out.stdout.splitlines() if line.strip()]


FAKE_NVML_SOURCE = Path(__file__).resolve().parent / "nvml_fake" / "fake_nvml.c"
FAKE_CUDA_SOURCE = Path(__file__).resolve().parent / "nvml_fake" / "fake_cuda.c"


def _compile_library(source: Path, into: Path, name: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(f"gcc is needed to compile {source} for the GPU tests: apt-get install gcc")
    built = subprocess.run([gcc, "-shared", "-fPIC", "-o", str(into / name), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"compiling {source} failed:\n{built.stderr}"
    return into


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory) -> Path:
    """Compile the fake libnvidia-ml.so.1 once; return the directory that holds it."""
    return _compile_library(FAKE_NVML_SOURCE, tmp_path_factory.mktemp("fake-nvml"),
                            "libnvidia-ml.so.1")


@pytest.fixture(scope="session")
def fake_cuda(tmp_path_factory) -> Path:
    """Compile the fake libcuda.so.1 once (a directory of its own); return that directory."""
    return _compile_library(FAKE_CUDA_SOURCE, tmp_path_factory.mktemp("fake-cuda"),
                            "libcuda.so.1")


os.environ.setdefault("APPLIANCE_CONFIG_FILE", "/nonexistent/appliance.toml")
