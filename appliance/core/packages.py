"""A Space's Python packages: resolved by uv as of its commit, locked per revision, wheels cached.

The resolution runs on the box (uv, for the base image's Python and platform), never inside a
build: it writes a lock (PEP 751 `pylock.toml`, each package's exact version, file and sha256),
the wheels it names are fetched into the box's package cache, and the build installs exactly
those files with no network. A rebuild of a locked revision needs neither the index nor the
resolver, so an imported bundle (which carries its Spaces' wheels) rebuilds on a box that has
no network at all.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from ..errors import BuildFailed, InvalidInput

RESOLUTIONS = ("dated", "latest")


class PackagesFailed(BuildFailed):
    """Resolving or fetching a Space's packages failed; the message already says why first."""

# What Spaces' gradio and streamlit images carry beyond the SDK (huggingface.co/docs/hub,
# "Spaces dependencies"); pip and setuptools as the python:3.x images ship them.
PREINSTALLED = ("datasets", "huggingface_hub", "hf-transfer", "pip", "setuptools")
# glibc of the base image (Debian bookworm): wheels tagged for a newer one would not load.
BASE_GLIBC = "2_36"
_NAME = re.compile(r"[-_.]+")
_FETCH_THREADS = 8
_CHUNK = 1 << 20


def canonical(name: str) -> str:
    """PEP 503 name: lower-case, runs of -_. as one dash."""
    return _NAME.sub("-", name).lower()


def uv_binary() -> Path:
    """The uv executable that ships with the appliance (the `uv` package from PyPI)."""
    try:
        from uv import find_uv_bin
        return Path(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return Path(found)
    raise PackagesFailed("uv is not installed in the appliance's environment",
                      hint="reinstall the appliance (sudo scripts/setup.sh), which installs uv")


def target_platform() -> str:
    """uv's name for the base image's platform: this machine's CPU, Debian bookworm's glibc."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{arch}-manylinux_{BASE_GLIBC}"


# -- the lock --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """One locked package and the one file of it that is installed."""

    name: str
    version: str
    filename: str | None  # None: a direct reference (git, URL) installed from its source
    url: str | None
    sha256: str | None
    size: int | None
    direct: str | None = None  # "name @ git+https://…@sha" for packages with no index file

    @property
    def requirement(self) -> str:
        if self.direct:
            return self.direct
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def parse_lock(text: str) -> list[Pin]:
    """Read the packages of a pylock.toml (as uv writes it) into pins."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PackagesFailed(f"The package lock cannot be read: {exc}",
                          hint="resolve the Space again: appliance spaces relock NAME"
                          ) from None
    pins = []
    for package in data.get("packages", []):
        name, version = package.get("name"), str(package.get("version", ""))
        if not isinstance(name, str) or not name:
            continue
        chosen = _choose_file(package)
        if chosen is None:
            pins.append(Pin(name, version, None, None, None, None,
                            direct=_direct_reference(name, package)))
            continue
        url = chosen.get("url") or ""
        filename = chosen["name"] if "name" in chosen else unquote(
            urlsplit(url).path.rsplit("/", 1)[-1])
        sha = (chosen.get("hashes") or {}).get("sha256")
        if not (isinstance(filename, str) and safe_filename(filename) and isinstance(sha, str)
                and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise PackagesFailed(f"The package lock names an unusable file for {name}: "
                              f"{filename!r}", hint="resolve the Space again: appliance "
                              "spaces relock NAME")
        pins.append(Pin(name, version, filename, url, sha, chosen.get("size")))
    return pins


def _choose_file(package: dict) -> dict | None:
    wheels = package.get("wheels") or []
    # uv lists only the wheels that fit the target; prefer a CPython build over a pure one.
    for wheel in sorted(wheels, key=lambda w: "-none-any.whl" in (w.get("url") or
                                                                      w.get("name") or "")):
        return wheel
    return package.get("sdist")


def _direct_reference(name: str, package: dict) -> str:
    vcs = package.get("vcs")
    if isinstance(vcs, dict) and vcs.get("url"):
        commit = vcs.get("commit-id") or vcs.get("requested-revision") or ""
        return f"{name} @ git+{vcs['url']}" + (f"@{commit}" if commit else "")
    archive = package.get("archive")
    if isinstance(archive, dict) and str(archive.get("url", "")).startswith(("https://",
                                                                            "http://")):
        return f"{name} @ {archive['url']}"
    raise PackagesFailed(f"{name} comes from a local path, which a build cannot install",
                      hint="list it by name and version, or as a git URL, in requirements.txt")


def safe_filename(name: str) -> bool:
    """Whether a package file name is one plain name (no path, no "..") a cache can hold."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+!-]{0,250}", name)) and ".." not in name


def requirements_text(pins: Iterable[Pin]) -> str:
    """The pins uv installs with --require-hashes (one file each), sorted by name."""
    return "".join(f"{pin.requirement}\n" for pin in sorted(pins, key=lambda p: canonical(p.name))
                   if not pin.direct)


def lock_summary(text: str | None) -> list[dict[str, str]]:
    """name and version of every locked package, for `spaces show` and the Space page."""
    if not text:
        return []
    try:
        return [{"name": p.name, "version": p.version} for p in parse_lock(text)]
    except BuildFailed:
        return []


# -- resolving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What a Space asks for: the SDK's own requirements and the repository's files."""

    roots: tuple[str, ...]  # the SDK pin, spaces, Spaces' pre-installed packages
    files: tuple[Path, ...]  # pre-requirements.txt, requirements.txt (sanitised copies)
    overrides: tuple[str, ...]  # the SDK version from the front matter wins over requirements


def sdk_roots(sdk: str, version: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(roots, overrides) for a gradio or streamlit Space, as Spaces installs them."""
    pin = f"=={version}" if version else ""
    if sdk == "gradio":
        roots = [f"gradio[oauth]{pin}", "spaces", *PREINSTALLED]
        if version and version.split(".")[0].isdigit() and int(version.split(".")[0]) < 4:
            # gradio 3 imports pkg_resources; Spaces' images then had a setuptools with it.
            roots[roots.index("setuptools")] = "setuptools<70"
        overrides = [f"gradio{pin}"] if version else []
    else:
        roots = [f"streamlit{pin}", *PREINSTALLED]
        overrides = [f"streamlit{pin}"] if version else []
    return tuple(roots), tuple(overrides)


# Options a Space's requirements file may use: package indexes and links (http/https only).
_INDEX_OPTION = re.compile(r"^(--index-url|-i|--extra-index-url|--find-links|-f)(?:\s+|=)(\S+)$")
_INCLUDE_OPTION = re.compile(r"^(-r|--requirement|-c|--constraint)(?:\s+|=)(\S+)$")


def sanitise_requirements(path: Path, root: Path, into: Path, seen: set[Path] | None = None,
                          read: dict[str, bytes] | None = None) -> Path:
    """Copy a requirements file for the resolver, refusing what could read the box's files.

    The resolver runs on the box, so a line naming a local path (`-e .`, `/etc/…`, `file:`)
    or including a file outside the repository is refused with the line that did it.
    """
    seen = set() if seen is None else seen
    real = path.resolve()
    if real in seen:
        return into / f"{hashlib.sha256(str(real).encode()).hexdigest()[:12]}.txt"
    seen.add(real)
    if not real.is_relative_to(root.resolve()) or not real.is_file():
        raise InvalidInput(f"{path.name} is not a file inside the repository",
                           hint="requirements files may include only files of the repository")
    out_lines = []
    content = real.read_bytes()
    if read is not None:
        read[str(real.relative_to(root.resolve()))] = content
    for number, raw in enumerate(content.decode(errors="replace").splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        where = f"{path.relative_to(root) if path.is_relative_to(root) else path.name}:{number}"
        if not line:
            continue
        if len(line) > 4096:
            raise InvalidInput(f"{where}: the line is longer than 4096 characters")
        if match := _INDEX_OPTION.match(line):
            if not match.group(2).startswith(("https://", "http://")):
                raise InvalidInput(f"{where}: {match.group(1)} must be an http(s) URL, not "
                                   f"{match.group(2)[:80]!r}")
            out_lines.append(line)
            continue
        if match := _INCLUDE_OPTION.match(line):
            included = (real.parent / match.group(2))
            copy = sanitise_requirements(included, root, into, seen, read)
            out_lines.append(f"{match.group(1)} {copy}")
            continue
        if line.startswith(("-", ".", "/", "~", "file:")) or re.search(r"@\s*file:", line):
            raise InvalidInput(
                f"{where}: {line[:80]!r} is not supported in a Space's requirements",
                hint="list packages by name and version, a git+https URL or an https archive; "
                "options allowed: --index-url, --extra-index-url, --find-links, -r, -c")
        out_lines.append(line)
    into.mkdir(parents=True, exist_ok=True)
    out = into / f"{hashlib.sha256(str(real).encode()).hexdigest()[:12]}.txt"
    out.write_text("".join(f"{line}\n" for line in out_lines))
    return out


def inputs_digest(roots: tuple[str, ...], overrides: tuple[str, ...], files: dict[str, bytes],
                  python: str, resolution: str) -> str:
    """Name what a resolution was asked: two revisions with the same digest ask the same."""
    digest = hashlib.sha256()
    for part in (*roots, "|", *overrides, "|", python, resolution, target_platform()):
        digest.update(part.encode() + b"\0")
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def uv_environment(config, cache_dir: Path) -> dict[str, str]:
    """The environment uv runs with: the build settings mapped to uv's own variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UV_", "PIP_", "VIRTUAL_ENV", "CONDA"))}
    env.update(UV_CACHE_DIR=str(cache_dir / "uv"), UV_NO_PROGRESS="1", NO_COLOR="1",
               UV_PYTHON_DOWNLOADS="never", UV_HTTP_TIMEOUT=str(config.package_timeout))
    if config.build_ca_bundle:
        env["SSL_CERT_FILE"] = config.build_ca_bundle
    for name, value in (("HTTP_PROXY", config.build_http_proxy),
                        ("HTTPS_PROXY", config.build_https_proxy),
                        ("NO_PROXY", config.build_no_proxy)):
        if value:
            env[name] = env[name.lower()] = value
    if config.pip_index_url:
        env["UV_DEFAULT_INDEX"] = config.pip_index_url
    if config.pip_extra_index_url:
        env["UV_INDEX"] = " ".join(config.pip_extra_index_url.split())
    if config.pip_trusted_host:
        env["UV_INSECURE_HOST"] = " ".join(config.pip_trusted_host.split())
    return env


def resolve(inputs: Inputs, python: str, as_of: str | None, config, cache_dir: Path,
            log: Callable[[str], None], constraints: str | None = None,
            offline: bool = False) -> str:
    """Resolve the inputs with uv for the base image; return the pylock.toml text.

    as_of (an ISO time) leaves out every file uploaded after it; None takes the newest.
    constraints (a requirements text) keeps the resolution inside an earlier one. offline
    uses only the index pages in uv's cache (fails if they fall short).
    """
    with tempfile.TemporaryDirectory(prefix="appliance-resolve-") as tmp:
        work = Path(tmp)
        roots = work / "roots.in"
        roots.write_text("".join(f"{r}\n" for r in inputs.roots))
        out = work / "pylock.toml"
        command = [str(uv_binary()), "pip", "compile", "--quiet", "--format", "pylock.toml",
                   "--python-version", python, "--python-platform", target_platform(),
                   "--no-header", "--no-annotate",
                   "-o", str(out), str(roots), *map(str, inputs.files)]
        if as_of:
            command += ["--exclude-newer", as_of]
        if offline:
            command.append("--offline")
        if inputs.overrides:
            overrides = work / "overrides.txt"
            overrides.write_text("".join(f"{o}\n" for o in inputs.overrides))
            command += ["--override", str(overrides)]
        if constraints:
            constraint_file = work / "constraints.txt"
            constraint_file.write_text(constraints)
            command += ["--constraint", str(constraint_file)]
        log("==> Resolving Python packages with uv" +
            (f" as of {as_of}" if as_of else " (newest versions)") +
            (" from the index pages cached moments ago" if offline else ""))
        try:
            proc = subprocess.run(command, env=uv_environment(config, cache_dir), cwd=tmp,
                                  capture_output=True, text=True, errors="replace",
                                  timeout=config.build_timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PackagesFailed(f"Resolving the Space's Python packages took longer than "
                              f"{config.build_timeout} s", hint=_NETWORK_HINT) from None
        for line in proc.stderr.splitlines():
            if line.strip() and not (offline and proc.returncode):
                log(line)
        if proc.returncode != 0:
            raise PackagesFailed(explain_resolve_failure(proc.stderr), hint=None)
        return out.read_text()


# How long index pages fetched by one resolution serve another with the same inputs without
# asking the index again: PyPI's own Cache-Control max-age for its simple pages.
INDEX_FRESH_SECONDS = 600

_NETWORK_HINT = ("set APPLIANCE_PIP_INDEX_URL to a mirror the box can reach, set "
                 "APPLIANCE_BUILD_HTTPS_PROXY, or import a bundle that carries the Space's "
                 "packages (appliance bundle import)")
_URL = re.compile(r"https?://[^\s`'\")]+")
_NETWORK_WORDS = re.compile(
    r"connection refused|dns error|failed to lookup|name or service not known|timed out|"
    r"network is unreachable|error sending request|tcp connect error|certificate|"
    r"operation timed out|no route to host", re.IGNORECASE)


def explain_resolve_failure(stderr: str) -> str:
    """A first line a person understands for a failed `uv pip compile`, then uv's own words."""
    said = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    detail = "\n".join(said[-25:])
    lowered = stderr.lower()
    if _NETWORK_WORDS.search(stderr):
        url = _URL.search(stderr)
        host = urlsplit(url.group(0)).netloc if url else "the package index"
        package = re.search(r"/simple/([^/\s`]+)/", stderr)
        what = f" (looking up {package.group(1)})" if package else ""
        reason = ("connection refused" if "refused" in lowered else
                  "timed out" if "timed out" in lowered else
                  "certificate problem" if "certificate" in lowered else
                  "name not found" if "dns" in lowered or "lookup" in lowered else "unreachable")
        return (f"Could not reach the package index at {host}{what}: {reason}. To build "
                f"this Space the box needs the index: {_NETWORK_HINT}\n--- uv said ---\n"
                f"{detail}")
    head = next((line.strip() for line in said if line.lower().startswith("error")), "")
    cause = next((line.strip() for line in said if line.strip().lower().startswith("cause:")),
                 "")
    reason = (cause.removeprefix("cause:").strip() or head.removeprefix("error:").strip()
              or "uv failed without a message")
    return (f"The Space's Python requirements cannot be resolved: {reason}\n"
            f"--- uv said ---\n{detail}")


# -- the package cache -------------------------------------------------------------------------


def wheelhouse(cache_dir: Path) -> Path:
    return cache_dir / "files"


def cached_path(cache_dir: Path, pin: Pin) -> Path:
    """Where a pin's file lives in the cache (named by its hash: two indexes cannot clash)."""
    assert pin.sha256 and pin.filename
    return wheelhouse(cache_dir) / pin.sha256[:2] / pin.sha256 / pin.filename


def _file_ok(path: Path, sha256: str) -> bool:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == sha256


def fetch(pins: Iterable[Pin], cache_dir: Path, config, log: Callable[[str], None]
          ) -> dict[str, Path]:
    """Make sure every pinned file is in the cache (sha256 checked); return name -> path."""
    wanted = [pin for pin in pins if not pin.direct]
    missing = [pin for pin in wanted if not _file_ok(cached_path(cache_dir, pin), pin.sha256)]
    if missing:
        total = sum(pin.size or 0 for pin in missing)
        log(f"==> Downloading {len(missing)} package files ({total / 2**20:.1f} MiB) into the "
            f"box's package cache ({len(wanted) - len(missing)} already there)")
        session = requests.Session()
        session.trust_env = True
        if config.build_ca_bundle:
            session.verify = config.build_ca_bundle
        proxies = {scheme: value for scheme, value in (("http", config.build_http_proxy),
                                                       ("https", config.build_https_proxy))
                   if value}
        if proxies:
            session.proxies.update(proxies)
        with ThreadPoolExecutor(_FETCH_THREADS) as pool:
            failures = [f for f in pool.map(lambda p: _download(session, p, cache_dir, config),
                                            missing) if f]
        if failures:
            pin, reason = failures[0]
            host = urlsplit(pin.url or "").netloc or "the package index"
            raise PackagesFailed(
                f"Could not download {pin.name} {pin.version} ({pin.filename}) from {host}: "
                f"{reason}" + (f" (and {len(failures) - 1} more files)" if len(failures) > 1
                               else "") + f". The box needs the package files: {_NETWORK_HINT}",
                hint=None)
    else:
        log(f"==> All {len(wanted)} package files are in the box's package cache")
    now = time.time()
    paths = {}
    for pin in wanted:
        path = cached_path(cache_dir, pin)
        try:
            os.utime(path, (now, path.stat().st_mtime))  # last use, for the prune
        except OSError:
            pass
        paths[pin.filename] = path
    return paths


def _download(session: requests.Session, pin: Pin, cache_dir: Path, config
              ) -> tuple[Pin, str] | None:
    if not pin.url or not pin.url.startswith(("https://", "http://")):
        return pin, f"no downloadable URL in the lock ({pin.url!r})"
    dest = cached_path(cache_dir, pin)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per download: two builds (threads or workers) may fetch one file at
    # once; each writes its own partial file and the last rename wins with the same bytes.
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    partial = Path(name)
    try:
        with session.get(pin.url, stream=True, timeout=config.package_timeout) as response:
            if response.status_code != 200:
                return pin, f"HTTP {response.status_code}"
            digest = hashlib.sha256()
            with open(partial, "wb") as handle:
                for chunk in response.iter_content(_CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
        if digest.hexdigest() != pin.sha256:
            return pin, "the file's sha256 does not match the lock"
        os.replace(partial, dest)
        return None
    except requests.exceptions.SSLError:
        return pin, "certificate problem"
    except requests.exceptions.ConnectionError as exc:
        text = str(exc).lower()
        return pin, "connection refused" if "refused" in text else "unreachable"
    except requests.exceptions.Timeout:
        return pin, "timed out"
    except (requests.RequestException, OSError) as exc:
        return pin, str(exc)[:200]
    finally:
        partial.unlink(missing_ok=True)


def cache_size(cache_dir: Path) -> int:
    total = 0
    for path in wheelhouse(cache_dir).rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def prune_cache(cache_dir: Path, limit_bytes: int, keep: set[str]) -> tuple[int, int]:
    """Remove cached files, least recently used first, until the cache is under limit_bytes;
    never one whose sha256 is in keep (a kept revision's lock names it). Return (files,
    bytes) removed. uv's own index cache is cleared when it grows past a tenth of the limit."""
    files = []
    for path in wheelhouse(cache_dir).glob("*/*/*"):
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append((stat.st_atime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = freed = 0
    for _, size, path in sorted(files):
        if total <= limit_bytes:
            break
        if path.parent.name in keep:
            continue
        shutil.rmtree(path.parent, ignore_errors=True)
        total -= size
        removed += 1
        freed += size
    uv_cache = cache_dir / "uv"
    if uv_cache.is_dir():
        used = sum(p.stat().st_size for p in uv_cache.rglob("*") if p.is_file())
        if used > limit_bytes // 10:
            shutil.rmtree(uv_cache, ignore_errors=True)
            freed += used
    return removed, freed
