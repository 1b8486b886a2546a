"""The Spaces service: add, build, start, switch, update, roll back, stop and delete Spaces."""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
import shutil
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from .. import stages
from ..adapters import router
from ..adapters.runtime import (
    LABEL_REVISION,
    LABEL_ROLE,
    LABEL_SPACE,
    ROLE_OFFLINE_NETWORK,
    PortInUse,
)
from ..config import Config
from ..errors import (
    ApplianceError,
    BuildFailed,
    Conflict,
    Forbidden,
    InvalidInput,
    ManifestError,
    NotFound,
    SourceError,
    StartupFailed,
)
from ..gpu import claims
from ..upkeep import housekeeping
from . import builds, packages, sources
from .context import Context, kept_images, space_paths
from .context import open_context as open_context  # the service's entry point, re-exported
from .manifest import Manifest, load_manifest, parse_manifest

HF_CACHE_VOLUME = "appliance-hf-cache"
HF_HOME = "/home/user/.cache/huggingface"  # set in every image by builds.py
# Every Space's processes run as this uid, docker Spaces too, as on Hugging Face.
SPACE_USER = "1000"
_KEY = "[A-Za-z_][A-Za-z0-9_]{0,127}"
SERVING = {stages.RUNNING, stages.RUNNING_BUILDING, stages.RUNNING_APP_STARTING}


# -- reading ----------------------------------------------------------------------------------


def describe(ctx: Context, space_id: str) -> dict[str, Any]:
    """Return the public view of a Space (the `show --json` contract), with the packages
    locked for the revision it serves."""
    row = ctx.store.get_space(space_id)
    view = _public(ctx.config, row)
    lock = ctx.store.get_lock(space_id, row["revision"]) if row["revision"] else None
    view["resolution"] = row.get("resolution") or None
    view["resolution_effective"] = row.get("resolution") or ctx.config.build_resolution
    view["lock"] = None if lock is None else {
        "revision": lock["revision"], "resolution": lock["resolution"],
        "as_of": lock["as_of"], "python": lock["python"], "platform": lock["platform"],
        "created_at": lock["created_at"], "packages": packages.lock_summary(lock["text"]),
    }
    return view


def list_spaces(ctx: Context) -> list[dict[str, Any]]:
    return [_public(ctx.config, row) for row in ctx.store.list_spaces()]


def _public(config: Config, row: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads(row["manifest"]) if row["manifest"] else {}
    return {
        "id": row["id"],
        "stage": row["stage"],
        "sdk": row["sdk"],
        "revision": row["revision"],
        "url": f"http://{config.public_host}:{row['port']}/" if row["backend_port"] else None,
        "error": row["error"],
        "hardware": row["hardware"],
        "visibility": row.get("visibility") or "public",
        "title": row["title"] or row["id"].split("/")[1],
        "emoji": manifest.get("emoji"),
        "short_description": manifest.get("short_description"),
        "source": row["source_display"],
        "requested_revision": row["revision_request"],
        "port": row["port"],
        "desired": row["desired"],
        "previous_revision": row["previous_revision"],
        "sleep_after": row["sleep_after"],
        "update_policy": row["update_policy"],
        "health_path": row.get("health_path"),
        "health_interval": row.get("health_interval"),
        "update_interval": row["update_interval"],
        "last_update_check": row["last_update_check"],
        "failed_revision": row["failed_revision"],
        "warnings": json.loads(row["warnings"] or "[]"),
        "manifest": manifest,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


# -- adding -----------------------------------------------------------------------------------


def add_space(ctx: Context, source_text: str, name: str | None = None,
              revision: str | None = None, hardware: str = "cpu",
              from_bundle: bool = False, check_source: bool = True) -> dict[str, Any]:
    """Record a new Space in BUILDING after checking its source answers; the build follows.

    from_bundle is for the bundle import alone: only its Spaces may have the appliance's copy
    of a bundled repository as their source, which is what makes a Space offline (it reads
    the shared model cache). check_source=False records it without asking the source's
    server (the portal and the API answer at once; the worker's fetch says what failed)."""
    source = sources.parse_source(source_text, ctx.config)
    if source.kind == "local" and not from_bundle \
            and sources.is_imported(source.url, ctx.config):
        raise SourceError(
            f"Source {source.display} is the appliance's copy of a Space imported from a "
            "bundle; it cannot be the source of another Space",
            hint="update that Space by importing a newer bundle, or copy the repository into "
            "a directory of APPLIANCE_LOCAL_SOURCES and add it from there")
    if source.kind == "hosted":
        raise SourceError(f"Source {source.display} is the repository of a Space hosted on this "
                          "box; it cannot be the source of another Space",
                          hint="clone it (git clone http://BOX:8080/spaces/OWNER/NAME) and push "
                          "the clone to a new name")
    space_id = sources.validate_space_id(name or source.default_id)
    check_owner(ctx, space_id)
    revision = sources.validate_revision(revision)
    hardware = claims.check_request(ctx, space_id, hardware)
    if ctx.store.find_space(space_id):
        raise Conflict(f"A Space named {space_id} already exists",
                       hint=f"update it with 'appliance spaces update {space_id}', or pick "
                       "another name with --name")
    if check_source:  # bad URL or revision: refuse, record nothing
        sources.remote_head(source, revision, ctx.config)
    for _ in range(5):
        port = allocate_port(ctx)
        try:
            ctx.store.insert_space({
                "id": space_id, "source": source.url, "source_display": source.display,
                "revision_request": revision, "stage": stages.BUILDING, "port": port,
                "hardware": hardware, "desired": "running", "created_by": ctx.actor,
                "worker_pid": os.getpid(),
            }, ctx.actor)
            break
        except Conflict as exc:
            if "already exists" in exc.message:
                raise
    return describe(ctx, space_id)


def check_owner(ctx: Context, space_id: str) -> None:
    """Refuse a member a Space id whose owner is another portal user's name (any case): it is
    reserved for that user. Admins, and the box's own CLI and jobs, may use any owner."""
    via, _, user = (ctx.actor or "").partition(":")
    if via not in ("session", "token") or not user:
        return
    caller = ctx.store.find_user(user)
    if caller is not None and caller["role"] == "admin":
        return
    owner, name = space_id.split("/", 1)
    taken = [u["name"] for u in ctx.store.list_users()
             if u["name"].lower() == owner.lower() and u["name"] != user]
    if taken:
        raise Forbidden(
            f"The owner {owner!r} of {space_id} is the name of the portal user {taken[0]}: "
            f"only {taken[0]} or an admin may add Spaces under it",
            hint=f"name it {user}/{name} (your own name), or use an owner that is not a portal "
            "user's name, such as the organisation of the source repository")


def allocate_port(ctx: Context, exclude: set[int] | None = None) -> int:
    """Pick the lowest port in the range that no Space holds and nothing listens on."""
    low, high = ctx.config.port_bounds
    taken = ctx.store.used_ports() | (exclude or set())
    for port in range(low, high + 1):
        if port not in taken and _port_free(port):
            return port
    raise ApplianceError(f"No free port left in {ctx.config.port_range}",
                         hint="widen APPLIANCE_PORT_RANGE or delete unused Spaces")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As a listener binds it: a port with connections in TIME_WAIT is still free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# -- building and switching -------------------------------------------------------------------


def deploy(ctx: Context, space_id: str, factory: bool = False) -> dict[str, Any]:
    """Fetch, build and start the Space's requested revision, switching to it when it answers.

    Runs in the worker (or in the CLI with --wait). Whatever fails, a revision that was
    serving keeps serving, and the failure lands in the stage and `error`.
    """
    ctx.store.update_space(space_id, worker_pid=os.getpid())
    row = ctx.store.get_space(space_id)
    serving = row["stage"] in SERVING or bool(row["backend_port"] and row["container"])
    checkouts, logs = space_paths(ctx, space_id)
    log_path = logs / f"build-{int(time.time() * 1000)}.log"
    build_id = ctx.store.start_build(space_id, factory, log_path)
    log = builds.BuildLog(log_path, list(ctx.store.kv("secrets", space_id).values()))
    manifest: Manifest | None = None
    checkout = checkouts
    try:
        housekeeping.assert_room_for_build(ctx.config)
        source = sources.parse_source(row["source"], ctx.config)
        checkouts.mkdir(parents=True, exist_ok=True)
        staging = checkouts / f".incoming-{pysecrets.token_hex(4)}"
        log(f"==> Fetching {source.display} ({row['revision_request'] or 'default branch'})")
        sha = sources.fetch(source, staging, row["revision_request"], ctx.config, log)
        checkout = checkouts / sha
        if checkout.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, checkout)
        log(f"==> Revision {sha}")
        manifest = load_manifest(checkout)
        image, warnings, lock = _build_images(ctx, space_id, sha, checkout, manifest, factory,
                                              log)
        if lock is not None and lock["created_at"] is None:
            ctx.store.save_lock(lock)
        ctx.store.finish_build(build_id, "succeeded", revision=sha, image=image)
    except ManifestError as exc:
        log(f"==> {exc}")
        ctx.store.finish_build(build_id, "failed", error=str(exc))
        return _fail(ctx, space_id, exc.stage, str(exc), serving)
    except (ApplianceError, OSError) as exc:
        bases = builds.dockerfile_bases(checkout) if manifest and manifest.sdk == "docker" \
            else []
        # A failed image build gets its log tail explained; the package steps already say
        # what failed on their first line.
        text = builds.explain_failure(str(exc), log.tail, bases) \
            if isinstance(exc, BuildFailed) and not isinstance(exc, packages.PackagesFailed) \
            else str(exc)
        log(f"==> {text.splitlines()[0]}")
        ctx.store.finish_build(build_id, "failed", error=log.redact(text))
        return _fail(ctx, space_id, stages.BUILD_ERROR, log.redact(text), serving)
    finally:
        log.close()
    ctx.store.update_space(
        space_id, sdk=manifest.sdk, title=manifest.title, manifest=json.dumps(manifest.to_dict()),
        warnings=json.dumps(list(manifest.warnings) + warnings),
    )
    return start_revision(ctx, space_id, sha, image, manifest)


def _fail(ctx: Context, space_id: str, stage: str, message: str, serving: bool
          ) -> dict[str, Any]:
    row = ctx.store.get_space(space_id)
    ctx.store.move(space_id, row["stage"], stage, ctx.actor, error=message[-4000:],
                   detail={"error": message.splitlines()[0][:300], "serving": serving})
    return describe(ctx, space_id)


def _build_images(ctx: Context, space_id: str, sha: str, checkout: Path, manifest: Manifest,
                  factory: bool, log) -> tuple[str, list[str], dict[str, Any] | None]:
    """Build the shared SDK layer (when missing) and the Space's image; return the image, the
    warnings and the lock the build installed (None for docker and static Spaces)."""
    config, runtime = ctx.config, ctx.runtime
    warnings: list[str] = []
    sdk_image = None
    locked = lock = None
    if manifest.sdk != "docker":
        base_image = config.base_image
        python = manifest.python_version
        if not base_image:
            available = [t.rsplit(":", 1)[1]
                         for t in runtime.list_images(builds.BASE_REPOSITORY)]
            python, warning = builds.choose_python(manifest.python_version, available)
            base_image = f"{builds.BASE_REPOSITORY}:{python}"
            if warning and manifest.sdk != "static":  # static Spaces run no Python of theirs
                warnings.append(warning)
                log(f"==> Warning: {warning}")
        if manifest.sdk in ("gradio", "streamlit"):
            lock = _lock_for(ctx, space_id, sha, checkout, manifest, python, log)
            locked = _locked_files(ctx, lock, log)
        plan = builds.sdk_image_plan(manifest, python, base_image, config,
                                     locked.sdk_pins if locked else None,
                                     locked.files if locked else None,
                                     base_id=runtime.image_id(base_image))
        if factory or not runtime.image_exists(plan.tag):
            log(f"==> Building the shared SDK layer {plan.tag}")
            runtime.build(plan.context, plan.containerfile, plan.tag, plan.labels,
                          plan.buildargs, plan.secrets, factory, log, config.build_timeout)
        else:
            log(f"==> Reusing the shared SDK layer {plan.tag}")
        sdk_image = plan.tag
    plan = builds.space_image_plan(
        space_id, sha, checkout, manifest, sdk_image, ctx.store.kv("variables", space_id),
        ctx.store.kv("secrets", space_id), config, locked)
    log(f"==> Building {plan.tag}")
    runtime.build(plan.context, plan.containerfile, plan.tag, plan.labels, plan.buildargs,
                  plan.secrets, factory, log, config.build_timeout)
    return plan.tag, warnings, lock


def resolution_of(ctx: Context, row: dict[str, Any]) -> str:
    """How the Space's next unlocked revision is resolved: its own choice, else the box's."""
    mode = row.get("resolution") or ctx.config.build_resolution
    if mode not in packages.RESOLUTIONS:
        raise InvalidInput(f"Unknown package resolution {mode!r}",
                           hint=f"use one of {', '.join(packages.RESOLUTIONS)} "
                           "(APPLIANCE_BUILD_RESOLUTION)")
    return mode


def _lock_for(ctx: Context, space_id: str, sha: str, checkout: Path, manifest: Manifest,
              python: str, log) -> dict[str, Any]:
    """The revision's recorded lock; else the lock of an earlier revision that asked for the
    same packages (a code-only change keeps its packages); else a new resolution. A new lock
    is recorded once the build succeeds."""
    found = ctx.store.get_lock(space_id, sha)
    if found and found["python"] == python:
        log(f"==> Installing the packages locked for revision {sha[:12]} "
            f"({_lock_words(found)}; locked {found['created_at'][:19]})")
        return found
    row = ctx.store.get_space(space_id)
    mode = resolution_of(ctx, row)
    cache = ctx.config.package_cache_path
    roots, overrides = packages.sdk_roots(manifest.sdk, manifest.sdk_version)
    with tempfile.TemporaryDirectory(prefix="appliance-requirements-") as tmp:
        read: dict[str, bytes] = {}
        files = tuple(packages.sanitise_requirements(checkout / name, checkout, Path(tmp),
                                                     read=read)
                      for name in ("pre-requirements.txt", "requirements.txt")
                      if (checkout / name).is_file())
        inputs = packages.inputs_digest(roots, overrides, read, python, mode)
        for earlier in reversed(ctx.store.locks(space_id)):
            if earlier["inputs"] == inputs:
                log(f"==> The Python requirements are those of revision "
                    f"{earlier['revision'][:12]}: installing its lock ({_lock_words(earlier)}); "
                    f"'appliance spaces relock {space_id}' resolves them again")
                return {**earlier, "revision": sha, "created_at": None}
        as_of = sources.commit_time(checkout) if mode == "dated" else None
        asked = packages.Inputs(roots, files, overrides)
        resolved_at = datetime.now(UTC).isoformat(timespec="seconds")
        text = None
        fresh = _recently_resolved(ctx, inputs)
        if fresh:
            # The same inputs were resolved against the index moments ago: its pages in uv's
            # cache are as fresh as the index's own caching allows (PyPI: max-age 600 s).
            try:
                text = packages.resolve(asked, python, as_of, ctx.config, cache, log,
                                        offline=True)
                resolved_at = fresh
            except packages.PackagesFailed:
                log("==> The cached index pages fall short; asking the index")
        if text is None:
            text = packages.resolve(asked, python, as_of, ctx.config, cache, log)
    pins = packages.parse_lock(text)
    if files:
        # The SDK's closure within this lock: what the shared layer holds. Its index pages
        # were all fetched by the resolution just made.
        pinned = "".join(f"{p.name}=={p.version}\n" for p in pins if not p.direct)
        closure = packages.resolve(packages.Inputs(roots, (), overrides), python, as_of,
                                   ctx.config, cache, lambda _line: None, constraints=pinned,
                                   offline=True)
        sdk_names = sorted({packages.canonical(p.name) for p in packages.parse_lock(closure)})
    else:
        sdk_names = sorted({packages.canonical(p.name) for p in pins})
    return {"space_id": space_id, "revision": sha, "resolution": mode, "as_of": as_of,
            "python": python, "platform": packages.target_platform(), "text": text,
            "sdk_packages": json.dumps(sdk_names), "inputs": inputs,
            "resolved_at": resolved_at, "created_at": None}


def _recently_resolved(ctx: Context, inputs: str) -> str | None:
    """When a lock of any Space with these inputs was last resolved against the index, if
    that is within the index's cache lifetime (else None)."""
    newest = ctx.store.last_resolved(inputs)
    try:
        fresh = newest and datetime.fromisoformat(newest).timestamp() >= (
            time.time() - packages.INDEX_FRESH_SECONDS)
    except ValueError:
        return None
    return newest if fresh else None


def _lock_words(lock: dict[str, Any]) -> str:
    return (f"{lock['resolution']}, as of {lock['as_of']}" if lock["as_of"]
            else f"{lock['resolution']}, newest versions")


def _locked_files(ctx: Context, lock: dict[str, Any], log) -> builds.Locked:
    pins = packages.parse_lock(lock["text"])
    sdk_names = set(json.loads(lock["sdk_packages"] or "[]"))
    files = packages.fetch(pins, ctx.config.package_cache_path, ctx.config, log)
    return builds.Locked(
        text=lock["text"], files=files,
        sdk_pins=[p for p in pins if packages.canonical(p.name) in sdk_names and not p.direct],
        space_pins=[p for p in pins if packages.canonical(p.name) not in sdk_names
                    or p.direct])


# Every Space runs on a LAN that may have no internet: the SDKs' phone-home at startup
# (Gradio's analytics and version check, the Hub's telemetry, Streamlit's usage stats) is
# off, and Gradio serves the page the portal's offline rewrite knows (not its SSR page).
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DO_NOT_TRACK": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
               "GRADIO_SSR_MODE": "False"}


def _container_env(ctx: Context, row: dict[str, Any], manifest: Manifest) -> dict[str, str]:
    owner, name = row["id"].split("/", 1)
    env = {
        **OFFLINE_ENV,
        "SPACE_ID": row["id"], "SPACE_AUTHOR_NAME": owner, "SPACE_REPO_NAME": name,
        "SPACE_TITLE": manifest.title or name,
        "SPACE_HOST": f"{ctx.config.public_host}:{row['port']}",
        "ACCELERATOR": row["hardware"], "CPU_CORES": str(_cpu_cores(ctx.config)),
        "MEMORY": f"{ctx.config.space_memory_mb // 1024}Gi",
    }
    env.update(ctx.store.kv("variables", row["id"]))
    env.update(ctx.store.kv("secrets", row["id"]))
    return env


def _cpu_cores(config: Config) -> int:
    return max(1, min(os.cpu_count() or 1, int(config.space_cpus)))


def data_volume(space_id: str) -> str:
    return builds.image_repository(space_id).split("/", 1)[1] + "-data"


def is_from_bundle(ctx: Context, row: dict[str, Any]) -> bool:
    """Tell whether a Space came from an offline bundle: its recorded source is the
    appliance's own copy of the bundled repository, which only an import records (add_space
    refuses it to everyone else). Never a variable: a member sets those."""
    return sources.is_imported(row["source"], ctx.config)


def offline_network(space_id: str) -> str:
    """Name the internal network an offline Space runs on, alone."""
    return builds.image_repository(space_id).split("/", 1)[1] + "-offline"


def start_revision(ctx: Context, space_id: str, sha: str, image: str,
                   manifest: Manifest) -> dict[str, Any]:
    """Start image beside whatever serves, switch the route once it answers, retire the old."""
    row = ctx.store.get_space(space_id)
    old_container, old_backend = row["container"], row["backend_port"]
    serving = bool(old_container and old_backend)
    ctx.store.move(space_id, row["stage"],
                   stages.RUNNING_APP_STARTING if serving else stages.APP_STARTING, ctx.actor,
                   detail={"revision": sha})
    enforce, reason = ctx.runtime.limits()
    warnings = json.loads(ctx.store.get_space(space_id)["warnings"] or "[]")
    if not enforce and not any(w.startswith("limits not enforceable") for w in warnings):
        ctx.store.update_space(space_id, warnings=json.dumps(
            warnings + [f"limits not enforceable on this host: {reason}"]))
    ctx.runtime.ensure_volume(data_volume(space_id), {LABEL_SPACE: space_id})
    ctx.runtime.ensure_volume(HF_CACHE_VOLUME, {LABEL_ROLE: "hf-cache"})
    name = f"{image.split('/', 1)[1].split(':')[0]}-{sha[:12]}-{pysecrets.token_hex(2)}"
    container_port = manifest.container_port
    backend = None
    try:
        # The router listens on the Space's port before the Space can be RUNNING, so that a
        # visitor who sees RUNNING is never refused (a first deploy may start the router).
        router.wait_route(ctx.config, row["port"], row["backend_port"])
        claim = claims.claim(ctx, space_id, row["hardware"])
        env = {**_container_env(ctx, row, manifest), **claim.env}
        volumes = {data_volume(space_id): "/data"}
        network = None
        if is_from_bundle(ctx, row):
            # An offline Space (one from a bundle) finds its models in the shared cache,
            # which it reads and never writes, and runs with no way out to any network, nor
            # to another Space: its internal network is its own. The cache may hold gated
            # models an admin imported, so HF_HUB_OFFLINE set by a member never opens it.
            volumes[HF_CACHE_VOLUME] = f"{HF_HOME}:ro"
            network = ctx.runtime.ensure_internal_network(
                offline_network(space_id),
                {LABEL_SPACE: space_id, LABEL_ROLE: ROLE_OFFLINE_NETWORK})
        for _ in range(3):
            backend = allocate_port(ctx, exclude={row["port"]})
            try:
                ctx.runtime.run(
                    name, image, backend, container_port, env,
                    {LABEL_SPACE: space_id, LABEL_REVISION: sha, LABEL_ROLE: "app"},
                    volumes, enforce, devices=claim.devices,
                    memory_limit_mib=claim.memory_limit_mib, network=network,
                    user=SPACE_USER)
                break
            except PortInUse:
                continue
        else:
            raise ApplianceError("Could not find a free port to start the app on",
                                 hint="narrow APPLIANCE_PORT_RANGE to ports nothing else uses")
        _wait_ready(ctx, name, backend, manifest)
    except ApplianceError as exc:
        ctx.runtime.remove_container(name)
        current = ctx.store.get_space(space_id)["stage"]
        failure = redactor(ctx, space_id)(str(exc))  # the app's log tail may print a secret
        if serving:
            message = (f"Revision {sha[:12]} did not start, so {row['revision'][:12]} keeps "
                       f"serving: {failure}")
            ctx.store.move(space_id, current, stages.RUNNING, ctx.actor, error=message,
                           event="update-failed", detail={"revision": sha})
        else:
            claims.release(ctx, space_id, "the app did not start")
            ctx.store.move(space_id, current, stages.RUNTIME_ERROR, ctx.actor, error=failure,
                           backend_port=None, container=None)
        return describe(ctx, space_id)
    previous = {}
    if row["image"] and row["image"] != image:
        previous = {"previous_revision": row["revision"], "previous_image": row["image"]}
    retiring = serving and old_container != name
    # The switch owns the Space until the old container is gone: reconcile leaves a Space with
    # a live owner alone, and would otherwise remove the old one mid-drain, cutting downloads.
    ctx.store.move(space_id, ctx.store.get_space(space_id)["stage"], stages.RUNNING, ctx.actor,
                   event="switched", detail={"revision": sha, "from": row["revision"]},
                   error=None, revision=sha, image=image, container=name, backend_port=backend,
                   desired="running", worker_pid=os.getpid() if retiring else None,
                   **previous)
    try:
        router.wait_route(ctx.config, row["port"], backend)
        if retiring:
            router.wait_drained(ctx.config, old_backend, ctx.config.drain_seconds)
            ctx.runtime.remove_container(old_container)
    finally:
        if retiring:
            _release_switch(ctx, space_id)
    _prune_images(ctx, space_id)
    return describe(ctx, space_id)


def _release_switch(ctx: Context, space_id: str) -> None:
    # Compare-and-swap: an action that began during the drain (an update, a stop) owns the
    # Space now, and keeps it.
    with ctx.store.transaction():
        row = ctx.store.find_space(space_id)
        if row and row["worker_pid"] == os.getpid():
            ctx.store.update_space(space_id, worker_pid=None)


def _wait_ready(ctx: Context, name: str, port: int, manifest: Manifest) -> None:
    timeout = manifest.startup_duration_timeout
    if ctx.config.startup_timeout_cap:
        timeout = min(timeout, ctx.config.startup_timeout_cap)
    url = f"http://127.0.0.1:{port}{manifest.base_path}"
    deadline = time.monotonic() + timeout
    polls = 0
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=2, allow_redirects=False)
            if response.status_code < 500:
                return
        except requests.RequestException:
            pass
        polls += 1
        if polls % 4 == 0:
            state = ctx.runtime.state(name)
            if state is None or not state.running:
                code = state.exit_code if state else "?"
                tail = _log_tail(ctx, name)
                raise StartupFailed(
                    f"The app exited (code {code}) before answering on port "
                    f"{manifest.container_port}{_user_note(manifest, tail)}\n"
                    f"--- last lines of the app log ---\n{tail}",
                    hint="fix the app and update the Space")
        time.sleep(ctx.config.startup_poll_interval)
    tail = _log_tail(ctx, name)
    raise StartupFailed(
        f"The app did not answer on port {manifest.container_port} within {timeout} s "
        f"(startup_duration_timeout){_user_note(manifest, tail)}\n"
        f"--- last lines of the app log ---\n{tail}",
        hint="make it listen on 0.0.0.0 at app_port, or raise startup_duration_timeout")


_DENIED = re.compile(r"permission denied|eacces|operation not permitted", re.IGNORECASE)


def _user_note(manifest: Manifest, tail: str) -> str:
    """Explain a docker Space's "permission denied": it runs as user 1000, not root."""
    if manifest.sdk != "docker" or not _DENIED.search(tail):
        return ""
    return ("\nDocker Spaces run as user 1000 (uid 1000), as on Hugging Face, not as root: "
            "create that user and give it what the app writes (RUN useradd -m -u 1000 user, "
            "USER user, WORKDIR /home/user/app, COPY --chown=user . .); /data is writable by "
            "it")


def _log_tail(ctx: Context, name: str) -> str:
    # conmon writes the log file asynchronously: a process that died at once may not be
    # in it yet when Podman already reports the exit.
    # A startup log is small: read it whole and cut it here rather than rely on the log
    # reader's tail, which once came back empty for an app that had printed its error.
    deadline = time.monotonic() + 5
    while True:
        text = ctx.runtime.logs(name, tail=None).strip()
        if text or time.monotonic() > deadline:
            return "\n".join(text.splitlines()[-30:]) or "(the app printed nothing)"
        time.sleep(0.2)


def _prune_images(ctx: Context, space_id: str) -> None:
    """Remove the Space's images no kept revision needs; none while a build runs in any
    process (its layer cache may be reading them: the hourly prune takes them later)."""
    row = ctx.store.get_space(space_id)
    keep = set(kept_images(ctx, row))
    with ctx.runtime.images_alone() as alone:
        if not alone:
            return
        for image_id, tags in ctx.runtime.images_of(space_id).items():
            if not keep.intersection(tags):
                ctx.runtime.remove_image(image_id)


# -- lifecycle --------------------------------------------------------------------------------


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and another user's (root typed the command)
    # A killed worker whose parent has not reaped it yet is a zombie: signals reach it, but
    # it is dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_alive(row: dict[str, Any]) -> bool:
    """Tell whether the process that owns the Space (any, this one included) is alive."""
    return _process_alive(row["worker_pid"])


def worker_alive(row: dict[str, Any]) -> bool:
    """Tell whether another live process (a worker) owns the Space right now."""
    pid = row["worker_pid"]
    return bool(pid) and pid != os.getpid() and _process_alive(pid)


def recover_abandoned(ctx: Context, space_id: str) -> dict[str, Any]:
    """Settle a Space left busy by a process that died (a crash, a kill -9, a reboot).

    A revision that still serves keeps serving (RUNNING); otherwise the Space lands in the
    error stage of what it was doing, with a message, so the next command can retry it.
    """
    row = ctx.store.get_space(space_id)
    if row["stage"] not in stages.BUSY or row["stage"] == stages.DELETING \
            or _process_alive(row["worker_pid"]):
        return row
    for container in ctx.runtime.containers(space_id):
        if container.name != row["container"]:
            ctx.runtime.remove_container(container.name)  # half-started by the dead process
    build = ctx.store.latest_build(space_id)
    if build and build["status"] == "running":
        ctx.store.finish_build(build["id"], "abandoned", error="the building process ended")
    state = ctx.runtime.state(row["container"]) if row["container"] else None
    action, command = _cut_action(ctx, row)
    message = (f"The appliance process {row['worker_pid']} ended while the Space was "
               f"{row['stage']}, cutting its {action} short; run '{command}' to try again")
    if state is not None and state.running and row["backend_port"]:
        return ctx.store.move(space_id, row["stage"], stages.RUNNING, ctx.actor,
                              event="recovered", error=message, worker_pid=None)
    target = stages.RUNTIME_ERROR if row["stage"] == stages.APP_STARTING \
        else stages.BUILD_ERROR
    if row["stage"] == stages.RUNNING_APP_STARTING:
        target = stages.RUNTIME_ERROR
    return ctx.store.move(space_id, row["stage"], target, ctx.actor, event="recovered",
                          error=message, worker_pid=None, backend_port=None, container=None)


def _cut_action(ctx: Context, row: dict[str, Any]) -> tuple[str, str]:
    """Name what a dead process was doing to a busy Space, and the command that does it again.

    A build is an update's (or a first deploy's); a start of a revision is read from the
    events: the stage it started from, and whether a rollback asked for it.
    """
    space_id = row["id"]
    if row["stage"] in (stages.APP_STARTING, stages.RUNNING_APP_STARTING):
        events = ctx.store.events(space_id, limit=50)
        for index, event in enumerate(events):
            if event["kind"] not in ("stage:APP_STARTING", "stage:RUNNING_APP_STARTING"):
                continue
            asked = events[index + 1] if index + 1 < len(events) else None
            if asked and asked["kind"] == "rollback" and asked["detail"].get("to"):
                return "rollback", (f"appliance spaces rollback {space_id} "
                                    f"--to {asked['detail']['to'][:12]}")
            started_from = event["detail"].get("from")
            if started_from in (stages.STOPPED, stages.PAUSED):
                return "start", f"appliance spaces start {space_id}"
            if started_from not in (stages.BUILDING, stages.RUNNING_BUILDING) and row["image"]:
                return "restart", f"appliance spaces restart {space_id}"
            break
    return "update", f"appliance spaces update {space_id}"


def request_update(ctx: Context, space_id: str, factory: bool = False,
                   revision: str | None = None) -> tuple[bool, dict[str, Any]]:
    """Decide whether an update is needed; move the stage so a worker builds. (needed, view)."""
    row = recover_abandoned(ctx, space_id)
    if row["stage"] in stages.BUSY:
        raise Conflict(f"Space {space_id} is busy ({row['stage']})",
                       hint=f"wait for it: 'appliance spaces logs {space_id} --build --follow'")
    if revision is not None:
        ctx.store.update_space(space_id, revision_request=sources.validate_revision(revision))
        row = ctx.store.get_space(space_id)
    source = sources.parse_source(row["source"], ctx.config)
    head = sources.remote_head(source, row["revision_request"], ctx.config)
    serving = bool(row["container"] and row["backend_port"])
    if head == row["revision"] and serving and not factory and row["stage"] == stages.RUNNING:
        return False, describe(ctx, space_id)
    ctx.store.move(space_id, row["stage"],
                   stages.RUNNING_BUILDING if serving else stages.BUILDING, ctx.actor,
                   event="update", detail={"to": head, "factory": factory})
    return True, describe(ctx, space_id)


def restart(ctx: Context, space_id: str) -> dict[str, Any]:
    """Start a fresh container of the current image beside the old one, then switch."""
    row = restart_check(ctx, space_id)
    return start_revision(ctx, space_id, row["revision"], row["image"], _manifest(row))


def restart_check(ctx: Context, space_id: str) -> dict[str, Any]:
    """Refuse a restart that cannot happen (busy, no image); return the Space's row."""
    row = recover_abandoned(ctx, space_id)
    _forget_automatic_restarts(ctx, row)
    if row["stage"] in stages.BUSY:
        raise Conflict(f"Space {space_id} is busy ({row['stage']})")
    if not row["image"] or not ctx.runtime.image_exists(row["image"]):
        raise Conflict(f"Space {space_id} has no built image to restart",
                       hint=f"rebuild it with 'appliance spaces restart {space_id} --factory'")
    return row


def _forget_automatic_restarts(ctx: Context, row: dict[str, Any]) -> None:
    # A person acting on the Space starts its restart budget afresh; the scheduler's own
    # restarts (actor "scheduler") keep counting towards giving up.
    if ctx.actor != "scheduler" and row["restarts"] not in (None, "[]"):
        ctx.store.update_space(row["id"], restarts="[]", health_failures=0)


def rollback(ctx: Context, space_id: str, revision: str | None = None) -> dict[str, Any]:
    """Serve an earlier revision's kept image again (no rebuild): the previous one, or the
    kept revision whose sha starts with `revision`."""
    row = recover_abandoned(ctx, space_id)
    if row["stage"] in stages.BUSY:
        raise Conflict(f"Space {space_id} is busy ({row['stage']})")
    kept = {image: sha for image, sha in kept_images(ctx, row).items()
            if image != row["image"] and ctx.runtime.image_exists(image)}
    if revision is None:
        target = row["previous_image"] if row["previous_image"] in kept else None
        if target is None:
            raise NotFound(f"Space {space_id} has no earlier revision to roll back to",
                           hint="a rollback needs an update that succeeded before")
    else:
        if len(revision) < 7 or not re.fullmatch(r"[0-9a-f]+", revision):
            raise InvalidInput(f"Give at least 7 hex digits of a commit sha, got {revision!r}")
        found = [image for image, sha in kept.items() if sha and sha.startswith(revision)]
        if len(found) != 1:
            shown = ", ".join(sha[:12] for sha in kept.values() if sha) or "none"
            raise NotFound(f"Space {space_id} keeps no single image of revision {revision}",
                           hint=f"revisions kept for rollback: {shown}")
        target = found[0]
    sha = kept[target]
    checkout = space_paths(ctx, space_id)[0] / sha
    manifest = load_manifest(checkout) if checkout.is_dir() else _manifest(row)
    ctx.store.add_event(space_id, "rollback", ctx.actor, {"to": sha})
    return start_revision(ctx, space_id, sha, target, manifest)


def _manifest(row: dict[str, Any]) -> Manifest:
    """Rebuild the Manifest stored with the Space (its to_dict() round-trips)."""
    data = json.loads(row["manifest"] or "{}")
    return parse_manifest("---\n" + json.dumps(data, ensure_ascii=False) + "\n---\n")


def stop(ctx: Context, space_id: str, pause: bool = False, desired: str | None = None,
         event: str | None = None) -> dict[str, Any]:
    """Stop (or pause: never woken by itself) a Space; its image and data stay.

    desired overrides what the Space should do next ("sleeping": a request wakes it); it is
    written in the same move as the stop, so the router never sees it half-way.
    """
    row = recover_abandoned(ctx, space_id)
    target = stages.PAUSED if pause else stages.STOPPED
    ctx.store.move(space_id, row["stage"], target, ctx.actor, event=event, backend_port=None,
                   container=None, desired=desired or ("paused" if pause else "stopped"))
    claims.release(ctx, space_id, event or target.lower())
    router.wait_route(ctx.config, row["port"], None, timeout=5)
    for container in ctx.runtime.containers(space_id):
        ctx.runtime.remove_container(container.name)
    return describe(ctx, space_id)


def start(ctx: Context, space_id: str) -> tuple[bool, dict[str, Any]]:
    """Start a stopped Space from its image; (needs_build, view) when there is none."""
    row = recover_abandoned(ctx, space_id)
    _forget_automatic_restarts(ctx, row)
    router.ensure_router(ctx.config)
    if row["stage"] in SERVING:
        state = ctx.runtime.state(row["container"]) if row["container"] else None
        if state is not None and state.running:
            return False, describe(ctx, space_id)
        # Recorded as serving but its container died (a reboot, a kill): start it afresh.
        ctx.store.update_space(space_id, container=None, backend_port=None)
        if row["container"]:
            ctx.runtime.remove_container(row["container"])
    if row["image"] and ctx.runtime.image_exists(row["image"]):
        ctx.store.update_space(space_id, desired="running")
        return False, start_revision(ctx, space_id, row["revision"], row["image"],
                                     _manifest(row))
    ctx.store.move(space_id, row["stage"], stages.BUILDING, ctx.actor, desired="running")
    return True, describe(ctx, space_id)


def delete(ctx: Context, space_id: str, keep_data: bool = False) -> None:
    """Remove a Space: containers, images, checkouts, logs, rows (and /data unless kept)."""
    row = ctx.store.get_space(space_id)
    if row["stage"] != stages.DELETING:
        ctx.store.move(space_id, row["stage"], stages.DELETING, ctx.actor, backend_port=None)
    for container in ctx.runtime.containers(space_id):
        ctx.runtime.remove_container(container.name)
    for image_id in ctx.runtime.images_of(space_id):
        ctx.runtime.remove_image(image_id, force=True)
    ctx.runtime.remove_network(offline_network(space_id))
    if not keep_data:
        ctx.runtime.remove_volume(data_volume(space_id))
    for path in space_paths(ctx, space_id):
        shutil.rmtree(path, ignore_errors=True)
    if str(row["source"]).startswith(sources.HOSTED_SCHEME):  # pushed to the box: its repository
        shutil.rmtree(sources.hosted_repo_path(ctx.config, space_id), ignore_errors=True)
    ctx.store.delete_space_rows(space_id, ctx.actor)


# -- secrets and variables --------------------------------------------------------------------


def set_value(ctx: Context, kind: str, space_id: str, key: str, value: str) -> None:
    """Store a secret or variable (applied at the next start, build args for docker)."""
    if not re.fullmatch(_KEY, key):
        raise InvalidInput(f"{kind[:-1].capitalize()} name {key!r} is not valid",
                           hint="use letters, digits and _ (not starting with a digit)")
    if key.startswith("SPACE_") or key in {"ACCELERATOR", "CPU_CORES", "MEMORY"}:
        raise InvalidInput(f"{key} is set by the appliance itself and cannot be overridden")
    if len(value.encode()) > 65536:
        raise InvalidInput(f"The value of {key} is larger than 64 KiB")
    ctx.store.set_kv(kind, space_id, key, value, ctx.actor)


def set_hardware(ctx: Context, space_id: str, hardware: str) -> dict[str, Any]:
    """Change the Space's hardware request (checked now; applied at its next start)."""
    ctx.store.get_space(space_id)
    hardware = claims.check_request(ctx, space_id, hardware)
    ctx.store.update_space(space_id, actor=ctx.actor, event="hardware",
                           detail={"hardware": hardware}, hardware=hardware)
    return describe(ctx, space_id)


def set_resolution(ctx: Context, space_id: str, resolution: str | None) -> dict[str, Any]:
    """Choose how the Space's packages are resolved when a revision is first built: "dated",
    "latest", or None (the box's build_resolution). Locked revisions keep their lock."""
    ctx.store.get_space(space_id)
    if resolution is not None and (not isinstance(resolution, str)
                                   or resolution not in packages.RESOLUTIONS):
        shown = repr(resolution)[:40]
        raise InvalidInput(f"Unknown package resolution {shown}",
                           hint=f"use {', '.join(packages.RESOLUTIONS)}, or none for the box's "
                           f"choice (now {ctx.config.build_resolution})")
    ctx.store.update_space(space_id, actor=ctx.actor, event="resolution",
                           detail={"resolution": resolution}, resolution=resolution)
    return describe(ctx, space_id)


def forget_locks(ctx: Context, space_id: str) -> int:
    """Drop the Space's package locks: its next build resolves again (a factory rebuild or an
    update); what runs now is untouched. Return how many locks were dropped."""
    return ctx.store.forget_locks(space_id, ctx.actor)


def redactor(ctx: Context, space_id: str) -> builds.Redactor:
    """What hides the Space's secret values in any text shown to a person (logs, errors)."""
    return builds.Redactor(list(ctx.store.kv("secrets", space_id).values()))


def app_log(ctx: Context, space_id: str, tail: int | None = 200) -> str:
    """The running app's log tail with secret values hidden ("" when nothing runs)."""
    row = ctx.store.get_space(space_id)
    if not row["container"]:
        return ""
    return redactor(ctx, space_id)(ctx.runtime.logs(row["container"], tail=tail))


def build_log_path(ctx: Context, space_id: str) -> Path | None:
    build = ctx.store.latest_build(space_id)
    return Path(build["log_path"]) if build else None
