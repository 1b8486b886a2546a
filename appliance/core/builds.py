"""Turn a Space checkout into an image: Containerfiles per SDK, shared SDK layers, build logs."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildFailed, InvalidInput
from .manifest import Manifest

BASE_REPOSITORY = "localhost/appliance-python"
STATIC_SERVER = Path(__file__).with_name("static_server.py")
STREAMLIT_PORT = 8501
SPACE_PORT = 7860

_USER_SETUP = """\
RUN (id -u user >/dev/null 2>&1 || useradd -m -u 1000 user) \\
 && install -d -o 1000 -g 1000 /home/user/app /data /home/user/.cache/huggingface
ENV HOME=/home/user \\
    PATH=/home/user/.venv/bin:/home/user/.local/bin:/usr/local/bin:/usr/bin:/bin \\
    PYTHONUNBUFFERED=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    HF_HOME=/home/user/.cache/huggingface \\
    HF_HUB_DISABLE_TELEMETRY=1 \\
    GRADIO_ANALYTICS_ENABLED=False \\
    GRADIO_SERVER_NAME=0.0.0.0 \\
    GRADIO_SERVER_PORT=7860 \\
    SYSTEM=spaces
"""


# Proxy variables are predefined build args; these are not, so they are declared for pip to
# see them. ARG values reach RUN steps only, never the image's environment.
_BUILD_ARGS = "ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST"


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


def sdk_image_plan(manifest: Manifest, python_tag: str, base_image: str, config) -> BuildPlan:
    """Plan the shared SDK layer for (python, sdk, sdk_version): reused by every such Space."""
    mount, env = _ca_mount(config)
    sdk, version = manifest.sdk, manifest.sdk_version
    if sdk == "gradio":
        packages = f'"gradio[oauth]{"==" + version if version else ""}" spaces'
    elif sdk == "streamlit":
        packages = f'"streamlit{"==" + version if version else ""}"'
    else:  # static: only the appliance's own file server, no packages
        packages = ""
    lines = [f"FROM {base_image}", _USER_SETUP, "USER user",
             "WORKDIR /home/user/app", "RUN python3 -m venv /home/user/.venv"]
    if packages:
        lines += [_BUILD_ARGS, f"RUN {mount}{env}pip install --no-cache-dir {packages}"]
    if sdk == "static":
        lines.append("COPY static_server.py /home/user/.static_server.py")
    context: dict[str, bytes | Path] = {}
    if sdk == "static":
        context["static_server.py"] = STATIC_SERVER.read_bytes()
    lines.append(_label_line({"appliance.role": "sdk"}))
    context[".appliance.Containerfile"] = ("\n".join(lines) + "\n").encode()
    # The tag names what the layer holds, so a changed recipe (a new appliance release, a
    # CA bundle switched on) builds a new layer instead of reusing a stale one.
    recipe = hashlib.sha256(b"".join(context[k] for k in sorted(context))).hexdigest()[:8]
    # Tags allow [\w.-]: a local version label such as 5.9.1+cpu must not reach one as is.
    shown = re.sub(r"[^\w.-]", "_", version or "latest")
    tag = f"localhost/appliance-sdk:{sdk}-{shown}-py{python_tag}-{recipe}"
    return BuildPlan(
        containerfile=".appliance.Containerfile", tag=tag, context=context,
        buildargs=build_env(config), secrets=_ca_secret(config),
    )


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


def space_image_plan(
    space_id: str,
    revision: str,
    checkout: Path,
    manifest: Manifest,
    sdk_image: str | None,
    variables: dict[str, str],
    secrets: dict[str, str],
    config,
) -> BuildPlan:
    """Plan a Space's own image on top of its SDK layer (or its Dockerfile for sdk: docker)."""
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
    mount, env = _ca_mount(config)
    lines = [f"FROM {sdk_image}"]
    # Each input file is copied alone right before the step that uses it, so a code-only
    # change reuses every layer up to the final COPY.
    if (checkout / "packages.txt").is_file() and manifest.sdk != "static":
        lines += [
            "USER root",
            "COPY packages.txt /tmp/packages.txt",
            "RUN apt-get update && sed -e 's/#.*//' /tmp/packages.txt | xargs -r "
            "env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            "&& rm -rf /var/lib/apt/lists/*",
            "USER user",
        ]
    pip_inputs = [name for name in ("pre-requirements.txt", "requirements.txt")
                  if (checkout / name).is_file() and manifest.sdk != "static"]
    if pip_inputs:
        lines.append(_BUILD_ARGS)
    for name in pip_inputs:
        lines += [f"COPY --chown=1000:1000 {name} /tmp/{name}",
                  f"RUN {mount}{env}pip install --no-cache-dir -r /tmp/{name}"]
    if "requirements.txt" in pip_inputs and manifest.sdk in ("gradio", "streamlit"):
        # The front matter decides the SDK version, as on Spaces, whatever requirements said.
        pin = f"=={manifest.sdk_version}" if manifest.sdk_version else ""
        extra = "[oauth]" if manifest.sdk == "gradio" else ""
        lines.append(
            f'RUN {mount}{env}pip install --no-cache-dir "{manifest.sdk}{extra}{pin}"')
    lines.append("COPY --chown=1000:1000 . /home/user/app")
    if manifest.sdk == "gradio":
        lines.append(f'CMD ["python", "{manifest.app_file}"]')
    elif manifest.sdk == "streamlit":
        lines.append(
            f'CMD ["streamlit", "run", "{manifest.app_file}", "--server.port={STREAMLIT_PORT}", '
            '"--server.address=0.0.0.0", "--server.headless=true", '
            '"--server.enableXsrfProtection=false", "--server.enableCORS=false", '
            '"--browser.gatherUsageStats=false"]'
        )
    else:
        lines.append(
            'CMD ["python3", "/home/user/.static_server.py", "--root", "/home/user/app", '
            f'"--index", "{manifest.app_file}", "--port", "{SPACE_PORT}"]'
        )
    # One LABEL line: labels passed to the build API become one committed step each.
    lines.append(_label_line(labels))
    return BuildPlan(
        containerfile=".appliance.Containerfile", tag=tag,
        context={".": checkout, ".appliance.Containerfile": ("\n".join(lines) + "\n").encode()},
        buildargs=build_env(config), secrets=_ca_secret(config),
    )


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
    return f"Build failed: {message.strip()}\n--- last lines of the build log ---\n{text}"


