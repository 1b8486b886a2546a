"""Turn a Space checkout into an image: Containerfiles per SDK, shared SDK layers, build logs."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildFailed, InvalidInput
from . import packages
from .manifest import Manifest
from .packages import Pin

BASE_REPOSITORY = "localhost/appliance-python"
STATIC_SERVER = Path(__file__).with_name("static_server.py")
STREAMLIT_PORT = 8501
SPACE_PORT = 7860

# As on Spaces: user 1000 owns its home, and every folder a volume is mounted under exists
# first and belongs to it (a mount point Podman creates is root's: ~/.cache was, so
# matplotlib could not write its cache). PYTHONPATH lets `python app/main.py` import packages
# from the repository's root, as Spaces sets it.
_USER_SETUP = """\
RUN (id -u user >/dev/null 2>&1 || useradd -m -u 1000 user) \\
 && install -d -o 1000 -g 1000 /home/user /home/user/app /data /home/user/.cache \\
    /home/user/.cache/huggingface /home/user/.config /home/user/.local /home/user/.appliance
ENV HOME=/home/user \\
    PATH=/home/user/.venv/bin:/home/user/.local/bin:/usr/local/bin:/usr/bin:/bin \\
    PYTHONPATH=/home/user/app \\
    PYTHONUNBUFFERED=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    HF_HOME=/home/user/.cache/huggingface \\
    HF_HUB_DISABLE_TELEMETRY=1 \\
    GRADIO_ANALYTICS_ENABLED=False \\
    GRADIO_SERVER_NAME=0.0.0.0 \\
    GRADIO_SERVER_PORT=7860 \\
    SYSTEM=spaces
"""


@dataclass
class BuildPlan:
    """Everything one `podman build` needs; secrets travel apart from the context."""

    containerfile: str
    tag: str
    context: dict[str, bytes | Path]
    buildargs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def image_repository(space_id: str) -> str:
    """Name a Space's image repository (lower-case, unique even for ids differing in case)."""
    slug = re.sub(r"[^a-z0-9]+", "-", space_id.lower()).strip("-")[:60]
    digest = hashlib.sha256(space_id.encode()).hexdigest()[:8]
    return f"localhost/space-{slug}-{digest}"


def choose_python(requested: str, available: list[str]) -> tuple[str, str | None]:
    """Pick the base image's Python: exact when available, else the nearest minor (a warning)."""
    def minor(version: str) -> tuple[int, int] | None:
        major, _, rest = version.partition(".")
        try:
            return int(major), int(rest.split(".")[0] or 0)
        except ValueError:
            return None

    numbered = {v: minor(v) for v in available if minor(v) is not None}
    if not numbered:
        raise BuildFailed(
            f"No Python base image is available (looked for {BASE_REPOSITORY}:<version>)",
            hint="run 'sudo scripts/setup.sh' to build it, or 'appliance images load FILE'",
        )
    if requested in numbered:
        return requested, None
    want = minor(requested) or (3, 10)
    same_major = [v for v, m in numbered.items() if m[0] == want[0]] or list(numbered)
    # Nearest minor; on a tie prefer the newer one (wheels exist for it more often).
    chosen = min(same_major,
                 key=lambda v: (abs(numbered[v][1] - want[1]), -numbered[v][1]))
    return chosen, (
        f"python_version {requested} is not available on this box; using {chosen}, the nearest "
        f"(add a base image for {requested} under images/python to match exactly)"
    )


def _ca_mount(config) -> tuple[str, str]:
    if not config.build_ca_bundle:
        return "", ""
    return ("--mount=type=secret,id=cacert,mode=0444 ",
            "PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert ")


# The locked files come in through a bind mount of the context, so they never land in a layer;
# uv installs exactly them (hash-checked, no resolver, no index) into the Space's venv.
_WHEELS = ".appliance-wheels"
# Bytecode is compiled at install, as pip does: otherwise every new container of the Space
# compiles its imports again before it answers (seconds for gradio).
_UV_ENV = "UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 "
_UV_INSTALL = ("uv pip install --python /home/user/.venv/bin/python --no-deps --require-hashes "
               "--find-links /tmp/wheels")
# uv reads its own variables; the index settings builds honour reach it through these.
_UV_ARGS = "ARG UV_DEFAULT_INDEX UV_INDEX UV_INSECURE_HOST"


def _install_step(config, requirements: str, pins: list[Pin]) -> str:
    """One RUN installing a requirements file of locked pins from the mounted package files;
    offline unless a pin is an sdist (its build backend comes from the index)."""
    mount, env = _ca_mount(config)
    offline = not any(pin.filename and not pin.filename.endswith(".whl") for pin in pins)
    return (f"RUN --mount=type=bind,source={_WHEELS},target=/tmp/wheels {mount}{env}{_UV_ENV}"
            f"{_UV_INSTALL}{' --offline --no-index' if offline else ''} -r {requirements}")


def _wheel_context(pins: list[Pin], files: dict[str, Path]) -> dict[str, bytes | Path]:
    return {f"{_WHEELS}/{pin.filename}": files[pin.filename] for pin in pins if not pin.direct}


def sdk_image_plan(manifest: Manifest, python_tag: str, base_image: str, config,
                   pins: list[Pin] | None = None, files: dict[str, Path] | None = None,
                   base_id: str = "") -> BuildPlan:
    """Plan the shared SDK layer: the base, user 1000, and the locked closure of the SDK.

    Its tag names what it holds (the base image's id, the recipe and the exact files), so
    every Space whose lock agrees on the SDK's closure shares it, a different closure never
    reuses it, and a rebuilt base image (new tools) gets new SDK layers.
    """
    sdk, version = manifest.sdk, manifest.sdk_version
    pins = pins or []
    lines = [f"FROM {base_image}", _USER_SETUP]
    context: dict[str, bytes | Path] = {}
    if sdk == "static":  # only the appliance's own file server, no packages
        lines += ["USER user", "WORKDIR /home/user/app", "RUN python3 -m venv /home/user/.venv",
                  "COPY static_server.py /home/user/.static_server.py"]
        context["static_server.py"] = STATIC_SERVER.read_bytes()
    else:
        requirements = packages.requirements_text(pins)
        # No ensurepip (seconds): pip comes locked with the other packages, as uv installs.
        lines += ["COPY .appliance-uv /usr/local/bin/uv", "USER user",
                  "WORKDIR /home/user/app", "RUN python3 -m venv --without-pip /home/user/.venv"]
        context[".appliance-uv"] = packages.uv_binary()
        if requirements:
            lines += [_UV_ARGS, "COPY --chown=1000:1000 .appliance-sdk.txt "
                      "/home/user/.appliance/sdk-requirements.txt",
                      _install_step(config, "/home/user/.appliance/sdk-requirements.txt", pins)]
            context[".appliance-sdk.txt"] = requirements.encode()
            context.update(_wheel_context(pins, files or {}))
    lines.append(_label_line({"appliance.role": "sdk"}))
    containerfile = ("\n".join(lines) + "\n").encode()
    context[".appliance.Containerfile"] = containerfile
    # The tag names the base, the recipe and what it installs (not the file contents: they
    # are named by their sha256 in the requirements), so a changed one builds a new layer.
    recipe = hashlib.sha256(base_id.encode() + containerfile
                            + context.get(".appliance-sdk.txt", b"")
                            + _uv_identity(sdk) + (STATIC_SERVER.read_bytes()
                                                   if sdk == "static" else b"")).hexdigest()[:8]
    # Tags allow [\w.-]: a local version label such as 5.9.1+cpu must not reach one as is.
    shown = re.sub(r"[^\w.-]", "_", version or "latest")
    tag = f"localhost/appliance-sdk:{sdk}-{shown}-py{python_tag}-{recipe}"
    return BuildPlan(
        containerfile=".appliance.Containerfile", tag=tag, context=context,
        buildargs={**build_env(config), **uv_build_env(config)}, secrets=_ca_secret(config),
    )


@functools.cache
def _uv_digest(path: str) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest().encode()


def _uv_identity(sdk: str) -> bytes:
    return b"" if sdk == "static" else _uv_digest(str(packages.uv_binary()))


def _ca_secret(config) -> dict[str, bytes]:
    if not config.build_ca_bundle:
        return {}
    try:
        return {"cacert": Path(config.build_ca_bundle).read_bytes()}
    except OSError as exc:
        raise InvalidInput(
            f"Cannot read the build CA bundle {config.build_ca_bundle}: {exc.strerror}",
            hint="fix APPLIANCE_BUILD_CA_BUNDLE, or set it empty to use the image's own CAs",
        ) from None


def build_env(config) -> dict[str, str]:
    """Build args every build gets: proxies and package index (never cached by buildah)."""
    args = {}
    for name, value in (("HTTP_PROXY", config.build_http_proxy),
                        ("HTTPS_PROXY", config.build_https_proxy),
                        ("NO_PROXY", config.build_no_proxy)):
        if value:
            args[name] = args[name.lower()] = value
    for name, value in (("PIP_INDEX_URL", config.pip_index_url),
                        ("PIP_EXTRA_INDEX_URL", config.pip_extra_index_url),
                        ("PIP_TRUSTED_HOST", config.pip_trusted_host)):
        if value:
            args[name] = value
    return args


def uv_build_env(config) -> dict[str, str]:
    """The index settings as uv's variables, for the install steps that reach the index."""
    env = packages.uv_environment(config, Path("/nonexistent"))
    return {name: env[name] for name in ("UV_DEFAULT_INDEX", "UV_INDEX", "UV_INSECURE_HOST")
            if name in env}


@dataclass
class Locked:
    """A revision's packages as the build installs them: the lock, and how it splits."""

    text: str  # the pylock.toml, recorded for the revision and reused byte-for-byte
    sdk_pins: list[Pin]  # the SDK's closure: the shared layer
    space_pins: list[Pin]  # the rest: the Space's own layer
    files: dict[str, Path]  # file name -> its path in the package cache


def space_image_plan(
    space_id: str,
    revision: str,
    checkout: Path,
    manifest: Manifest,
    sdk_image: str | None,
    variables: dict[str, str],
    secrets: dict[str, str],
    config,
    locked: Locked | None = None,
) -> BuildPlan:
    """Plan a Space's own image on top of its SDK layer (or its Dockerfile for sdk: docker).

    The repository is the context's app/ folder; the appliance's own inputs sit beside it,
    so the final COPY takes the repository and nothing else.
    """
    labels = {"appliance.space": space_id, "appliance.revision": revision,
              "appliance.role": "space", "appliance.instance": config.instance_id}
    tag = f"{image_repository(space_id)}:{revision[:12]}"
    if manifest.sdk == "docker":
        dockerfile = checkout / "Dockerfile"
        if not dockerfile.is_file():
            raise BuildFailed(
                "sdk: docker needs a Dockerfile at the top of the repository, and there is none",
                hint="add a Dockerfile, or set sdk: gradio / streamlit / static in README.md",
            )
        # Variables are build args and secrets build secrets, as on Spaces; neither is baked
        # into a layer unless the Dockerfile itself writes them there.
        return BuildPlan(
            containerfile="Dockerfile", tag=tag, context={".": checkout},
            buildargs={**variables, **build_env(config)},
            secrets={k: v.encode() for k, v in secrets.items()}, labels=labels,
        )
    context: dict[str, bytes | Path] = {"app": checkout}
    lines = [f"FROM {sdk_image}"]
    # Each input file is copied alone right before the step that uses it, so a code-only
    # change reuses every layer up to the final COPY.
    if (checkout / "packages.txt").is_file() and manifest.sdk != "static":
        lines += [
            "USER root",
            "COPY app/packages.txt /tmp/packages.txt",
            "RUN apt-get update && sed -e 's/#.*//' /tmp/packages.txt | xargs -r "
            "env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            "&& rm -rf /var/lib/apt/lists/*",
            "USER user",
        ]
    if locked is not None:
        requirements = packages.requirements_text(locked.space_pins)
        direct = [pin.direct for pin in locked.space_pins if pin.direct]
        if requirements or direct:
            lines.append(_UV_ARGS)
        if requirements:
            context[".appliance-space.txt"] = requirements.encode()
            context.update(_wheel_context(locked.space_pins, locked.files))
            lines += ["COPY --chown=1000:1000 .appliance-space.txt "
                      "/home/user/.appliance/space-requirements.txt",
                      _install_step(config, "/home/user/.appliance/space-requirements.txt",
                                    locked.space_pins)]
        if direct:
            # Packages from git or an archive URL: no index file to lock, so they are
            # fetched by the build itself (at the commit the lock names).
            mount, env = _ca_mount(config)
            context[".appliance-direct.txt"] = "".join(f"{d}\n" for d in direct).encode()
            lines += ["COPY --chown=1000:1000 .appliance-direct.txt "
                      "/home/user/.appliance/direct-requirements.txt",
                      f"RUN {mount}{env}{_UV_ENV}uv pip install --python "
                      "/home/user/.venv/bin/python --no-deps "
                      "-r /home/user/.appliance/direct-requirements.txt"]
        context[".appliance-lock.toml"] = locked.text.encode()
        lines.append("COPY --chown=1000:1000 .appliance-lock.toml "
                     "/home/user/.appliance/pylock.toml")
    lines.append("COPY --chown=1000:1000 app/ /home/user/app/")
    lines.append(_command(manifest))
    # One LABEL line: labels passed to the build API become one committed step each.
    lines.append(_label_line(labels))
    context[".appliance.Containerfile"] = ("\n".join(lines) + "\n").encode()
    return BuildPlan(
        containerfile=".appliance.Containerfile", tag=tag, context=context,
        buildargs={**build_env(config), **uv_build_env(config)}, secrets=_ca_secret(config),
    )


def _command(manifest: Manifest) -> str:
    """The image's CMD, serialised as JSON (never formatted into a string by hand)."""
    if manifest.sdk == "gradio":
        argv = ["python", manifest.app_file]
    elif manifest.sdk == "streamlit":
        argv = ["streamlit", "run", manifest.app_file, f"--server.port={STREAMLIT_PORT}",
                "--server.address=0.0.0.0", "--server.headless=true",
                "--server.enableXsrfProtection=false", "--server.enableCORS=false",
                "--browser.gatherUsageStats=false"]
    else:
        argv = ["python3", "/home/user/.static_server.py", "--root", "/home/user/app",
                "--index", manifest.app_file, "--port", str(SPACE_PORT)]
    return "CMD " + json.dumps(argv)


def _label_line(labels: dict[str, str]) -> str:
    return "LABEL " + " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in labels.items())


class Redactor:
    """Replace every secret value in a text with ***."""

    def __init__(self, secrets: list[str] | tuple[str, ...]):
        # Output arrives a line at a time, so a multi-line secret (a PEM key) is redacted
        # line by line as well as whole.
        pieces = set(secrets) | {line.strip() for s in secrets if "\n" in s
                                 for line in s.splitlines()}
        self._secrets = sorted((s for s in pieces if len(s) >= 3), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def lines(self, chunks: Iterable[str], longest: int = 1 << 20) -> Iterator[str]:
        """Yield a chunked stream's lines, each redacted whole.

        A log stream splits long lines (conmon at 8 KiB), so a chunk redacted alone would
        show a secret that straddles the split. A line longer than `longest` is cut, but
        what follows a cut keeps the text a secret could start in, so none straddles it.
        """
        overlap = max((len(s) for s in self._secrets), default=1) - 1
        partial = ""
        for chunk in chunks:
            *whole, partial = (partial + chunk).split("\n")
            for line in whole:
                yield self(line)
            if len(partial) > longest:
                shown = self(partial)
                cut = max(len(shown) - overlap, 0)
                if cut:
                    yield shown[:cut]
                partial = shown[cut:]
        if partial:
            yield self(partial)


def redact(text: str, secrets: list[str] | tuple[str, ...]) -> str:
    return Redactor(secrets)(text)


class BuildLog:
    """A build log file that never stores a secret value (each is replaced by ***)."""

    def __init__(self, path: Path, secrets: list[str]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.redact = Redactor(secrets)
        self._fh = open(path, "a", encoding="utf-8")
        self.tail: list[str] = []

    def __call__(self, line: str) -> None:
        line = self.redact(line.rstrip("\n"))
        self._fh.write(line + "\n")
        self._fh.flush()
        self.tail = (self.tail + [line])[-40:]

    def close(self) -> None:
        self._fh.close()


def dockerfile_bases(checkout: Path) -> list[str]:
    """List the images a Dockerfile builds FROM (not its own earlier stages)."""
    try:
        text = (checkout / "Dockerfile").read_text(errors="replace")
    except OSError:
        return []
    bases: list[str] = []
    stages_seen: set[str] = set()
    for line in text.lstrip("\ufeff").splitlines():
        words = line.split()
        if len(words) < 2 or words[0].upper() != "FROM":
            continue
        words = [w for w in words[1:] if not w.startswith("--")]
        if not words:
            continue
        if words[0].lower() not in stages_seen:
            bases.append(words[0])
        if len(words) >= 3 and words[1].upper() == "AS":
            stages_seen.add(words[2].lower())
    return bases


_PULL_FAILURE = re.compile(
    r"pinging container registry|dial tcp|no such host|image not known|manifest unknown"
    r"|initializing source|requested access to the resource is denied|unable to pull",
    re.IGNORECASE)


# What pip, apt, uv, curl and git print when a build step cannot reach a host.
_NETWORK_FAILURE = re.compile(
    r"Temporary failure (in name resolution|resolving)|Could not resolve( host)?"
    r"|Name or service not known"
    r"|Failed to establish a new connection|Connection refused|Network is unreachable"
    r"|No route to host|Connection timed out|timed out|Could not fetch URL|Failed to fetch"
    r"|error sending request|Could not connect|unable to access|SSL: CERTIFICATE_VERIFY_FAILED",
    re.IGNORECASE)
_HOST_IN_LINE = re.compile(r"(?:https?|git)://([\w.-]+(?::\d+)?)|host='([\w.-]+)'"
                           r"|resolve (?:host:? )?'?([\w.-]+\.[a-z]{2,})'?", re.IGNORECASE)


def explain_failure(message: str, log_tail: list[str], bases: list[str]) -> str:
    """Turn a raw build failure into the user-facing error (with the log tail)."""
    text = "\n".join(log_tail[-25:])
    if _PULL_FAILURE.search(message):
        for image in bases:
            short = image.split("/")[-1]
            if short in message or short in text:
                return (
                    f"The Dockerfile's base image {image} could not be pulled: "
                    f"{message.strip()[:300]}\n"
                    f"Provide it offline with 'appliance images load IMAGE.tar' (make the "
                    f"archive with 'podman save -o IMAGE.tar {image}' on a connected machine), "
                    f"or configure a registry mirror in the service account's "
                    f"~/.config/containers/registries.conf."
                )
    failing = [line for line in log_tail[-40:] if _NETWORK_FAILURE.search(line)]
    if failing:
        hosts = [(line, next((g for g in m.groups() if g), None))
                 for line in failing if (m := _HOST_IN_LINE.search(line))]
        network, host = hosts[-1] if hosts else (failing[-1], None)
        return (
            f"The build could not reach {host or 'the network'}: {network.strip()[:300]}\n"
            "A step of the build downloads from the network and this box cannot reach it. "
            "Set APPLIANCE_BUILD_HTTPS_PROXY (and APPLIANCE_BUILD_CA_BUNDLE for an "
            "intercepting proxy), point APPLIANCE_PIP_INDEX_URL at a mirror, or build the "
            "image where the network is and bring it as a bundle.\n"
            f"--- last lines of the build log ---\n{text}"
        )
    return f"Build failed: {message.strip()}\n--- last lines of the build log ---\n{text}"
