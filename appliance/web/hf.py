"""The Hugging Face compatible Spaces API: what `huggingface_hub.HfApi(endpoint=...)` calls.

Paths, bodies and answers are the ones huggingface_hub 2.x sends and reads (`hf_api.py`,
`_space_api.py`); each view maps one call onto the same services the CLI and /api/v1 use.
Errors keep the API's envelope; huggingface_hub prints its "error" string, then the hint
(given as `errors[].message`, which it prints too).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from .. import stages
from ..adapters.store import open_store
from ..core import actions, builds, repository, spaces
from ..errors import ApplianceError, Conflict, InvalidInput, NotFound, Unauthorized
from ..gpu import allocation
from .base import (
    MAX_INT,
    UNSAFE,
    bearer_token,
    caller,
    check,
    check_manage,
    config,
    context,
    csrf_exempt,
    error_body,
    json_body,
    query_int,
    require,
    shown,
    visible_space,
)

bp = Blueprint("hf", __name__)
Line = tuple[str, bool] | None  # (text, came after the request), or None: a silence
SPACE = "/api/spaces/<owner>/<name>"
NEVER = -1  # huggingface_hub's sleep time for "never sleep"
RUN_LOG_TAIL = 1000
# Comments keep a followed log stream open through silences; huggingface_hub waits 120 s for a
# line when following and 5 s when not, so a gap longer than 5 s lets a one-shot read end (and
# the next comment tells the server it left, freeing the portal's thread).
KEEPALIVE_SECONDS = 10.0
POLL_SECONDS = 0.25



class SpaceNotFound(NotFound):
    """A Space the caller asked for by id does not exist (or is hidden from them)."""


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    # huggingface_hub authenticates with a bearer token, which a browser never sends by
    # itself; _tokens_only refuses the login cookie on changes, so no CSRF token is needed.
    for endpoint, view in app.view_functions.items():
        if endpoint.startswith(f"{bp.name}."):
            csrf_exempt(view)


@bp.before_request
def _tokens_only() -> None:
    if request.method in UNSAFE and caller().via == "session":
        raise Unauthorized("The Hugging Face API takes an API token, not the portal's login",
                           hint="send 'Authorization: Bearer TOKEN'; make one with 'appliance "
                           "tokens create NAME --user USER --scope write'")


# -- errors -----------------------------------------------------------------------------------


# The X-Error-Code huggingface_hub maps to its own exceptions (RepositoryNotFoundError…).
HUB_ERROR_CODES: tuple[tuple[type[ApplianceError], str], ...] = (
    (SpaceNotFound, "RepoNotFound"), (repository.RevisionNotFound, "RevisionNotFound"),
    (repository.EntryNotFound, "EntryNotFound"))


@bp.errorhandler(ApplianceError)
def _render_error(exc: ApplianceError):
    """An error as the Hub answers it: the envelope, with the headers its client reads."""
    body = error_body(exc.status, exc.message, exc.hint)
    if exc.hint:
        body["errors"] = [{"message": exc.hint}]
    response = jsonify(body)
    response.status_code = exc.status
    for kind, code in HUB_ERROR_CODES:
        if isinstance(exc, kind):
            response.headers["X-Error-Code"] = code
    if getattr(exc, "sha", None):
        # huggingface_hub caches "no such file at this commit" with it.
        response.headers["X-Repo-Commit"] = exc.sha
    if isinstance(exc, Unauthorized) and bearer_token():
        # Its exact words make huggingface_hub report a bad token, not a missing repository.
        response.headers["X-Error-Message"] = "Invalid credentials in Authorization header"
    elif exc.message.isascii() and exc.message.isprintable() and len(exc.message) < 500:
        response.headers["X-Error-Message"] = exc.message  # shown in its "403 Forbidden: ..."
    return response


# -- who am I ---------------------------------------------------------------------------------


@bp.get("/api/whoami-v2")
def whoami():
    """HfApi.whoami: the token's (or login's) user; HfApi reads its "name" as the namespace."""
    who = caller()
    if who.user is None:
        raise Unauthorized("Send an API token to see who you are",
                           hint="appliance tokens create NAME --user USER --scope read")
    return jsonify({
        "type": "user", "id": who.user, "name": who.user, "fullname": who.user,
        "isPro": False, "canPay": False, "orgs": [], "role": who.role,
        "auth": {"type": "access_token" if who.via == "token" else "session",
                 "accessToken": {"displayName": None,
                                 "role": "write" if who.can_write else "read"}},
    })


# -- reading a Space --------------------------------------------------------------------------


# HfApi.space_info (with or without a revision) is answered by hf_repo.space_info_at, which
# lists the files too.


@bp.get(f"{SPACE}/runtime")
@require("read")
def space_runtime(owner: str, name: str):
    """HfApi.get_space_runtime."""
    return jsonify(_runtime(_space(owner, name)))


# -- acting on a Space ------------------------------------------------------------------------


@bp.post(f"{SPACE}/restart")
@require("write")
def restart_space(owner: str, name: str):
    """HfApi.restart_space: restart, start a stopped or paused Space, or (?factory=true)
    rebuild from scratch. The work goes to a worker; follow it with get_space_runtime."""
    space = _managed(owner, name)
    if request.args.get("factory", "").lower() == "true":
        action = "factory"
    elif space["stage"] in (stages.STOPPED, stages.PAUSED):
        action = "start"  # on Hugging Face, restart is how a paused Space comes back
    else:
        action = "restart"
    return jsonify(_runtime(actions.perform(context(), space["id"], action))), 202


@bp.post(f"{SPACE}/pause")
@require("write")
def pause_space(owner: str, name: str):
    """HfApi.pause_space: stopped until someone restarts it; never woken by a request."""
    space = _managed(owner, name)
    return jsonify(_runtime(actions.perform(context(), space["id"], "pause")))


@bp.post(f"{SPACE}/sleeptime")
@require("write")
def set_sleep_time(owner: str, name: str):
    """HfApi.set_space_sleep_time: seconds idle before sleeping; -1 never sleeps."""
    space = _managed(owner, name)
    view = actions.set_sleep_time(context(), space["id"],
                                        _sleep_seconds(json_body().get("seconds")))
    return jsonify(_runtime(view))


@bp.post(f"{SPACE}/hardware")
@require("write")
def request_hardware(owner: str, name: str):
    """HfApi.request_space_hardware: a flavor (or this box's own request), applied at the
    next restart; "sleepTimeSeconds" sets the sleep time too."""
    space = _managed(owner, name)
    data = json_body()
    ctx = context()
    view = spaces.set_hardware(ctx, space["id"], hardware_request(data.get("flavor")))
    if "sleepTimeSeconds" in data:
        view = actions.set_sleep_time(ctx, space["id"],
                                            _sleep_seconds(data["sleepTimeSeconds"]))
    return jsonify(_runtime(view))


def hardware_request(flavor: Any) -> str:
    """Map a Hugging Face flavor to this box's request; pass this box's own forms through."""
    if not isinstance(flavor, str) or not flavor.strip():
        raise InvalidInput("Send the hardware as JSON {\"flavor\": NAME}",
                           hint="e.g. cpu-basic, t4-small, or this box's gpu, gpu:2, shared:8g")
    return allocation.flavor_request(flavor) or flavor


# -- secrets and variables --------------------------------------------------------------------


@bp.get(f"{SPACE}/secrets")
@require("read")
def get_secrets(owner: str, name: str):
    """HfApi.get_space_secrets: names and dates only; values are write-only."""
    space = _space(owner, name)
    rows = context().store.kv_meta("secrets", space["id"])
    return jsonify({r["key"]: {"description": None, "updatedAt": _hf_time(r["updated_at"])}
                    for r in rows})


@bp.post(f"{SPACE}/secrets")
@require("write")
def add_secret(owner: str, name: str):
    """HfApi.add_space_secret (the description is not kept); applied at the next start."""
    space = _managed(owner, name)
    key, value = _key_value(json_body())
    spaces.set_value(context(), "secrets", space["id"], key, value)
    return jsonify({})


@bp.delete(f"{SPACE}/secrets")
@require("write")
def delete_secret(owner: str, name: str):
    """HfApi.delete_space_secret."""
    space = _managed(owner, name)
    ctx = context()
    ctx.store.delete_kv("secrets", space["id"], _key(json_body()), ctx.actor)
    return jsonify({})


@bp.get(f"{SPACE}/variables")
@require("read")
def get_variables(owner: str, name: str):
    """HfApi.get_space_variables."""
    space = _space(owner, name)
    check("user")
    return jsonify(_variables(space["id"]))


@bp.post(f"{SPACE}/variables")
@require("write")
def add_variable(owner: str, name: str):
    """HfApi.add_space_variable (the description is not kept); answers every variable."""
    space = _managed(owner, name)
    key, value = _key_value(json_body())
    spaces.set_value(context(), "variables", space["id"], key, value)
    return jsonify(_variables(space["id"]))


@bp.delete(f"{SPACE}/variables")
@require("write")
def delete_variable(owner: str, name: str):
    """HfApi.delete_space_variable; answers the variables left."""
    space = _managed(owner, name)
    ctx = context()
    ctx.store.delete_kv("variables", space["id"], _key(json_body()), ctx.actor)
    return jsonify(_variables(space["id"]))


# -- logs -------------------------------------------------------------------------------------


@bp.get(f"{SPACE}/logs/<any(build, run):kind>")
@require("read")
def space_logs(owner: str, name: str, kind: str):
    """HfApi.fetch_space_logs: Server-Sent Events, one `data: {"data", "timestamp"}` per line.

    The latest build log is followed while that build runs; the app's log is its tail, then
    new lines until the container goes. huggingface_hub tells following from a one-shot read
    by itself (a one-shot read stops at the first line newer than the answer's Date).
    """
    space = _space(owner, name)
    ctx = context()
    redact = _redactor(space["id"])
    if kind == "build":
        lines = _build_lines(ctx, space["id"])
    else:
        tail = query_int("tail", RUN_LOG_TAIL, 0, 100_000) or RUN_LOG_TAIL
        lines = _run_lines(ctx, space, tail)
    return Response(_events(lines, redact, _hf_now()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _events(lines: Iterator[Line], redact: Callable[[str], str], asked_at: str
            ) -> Iterator[str]:
    """Turn lines into SSE events and silences into keep-alive comments.

    Lines that were there when asked are stamped with that time, new ones with their own:
    a one-shot read keeps the first and stops at the first of the others.
    """
    for line in lines:
        if line is None:
            yield ": keep-alive\n\n"
            continue
        text, new = line
        event = {"data": redact(text) + "\n", "timestamp": _hf_now() if new else asked_at}
        yield f"data: {json.dumps(event)}\n\n"


def _build_lines(ctx: spaces.Context, space_id: str) -> Iterator[Line]:
    path = spaces.build_log_path(ctx, space_id)
    if path is None or not path.exists():
        raise NotFound(f"Space {space_id} has no build log yet",
                       hint="it has not been built; restart it with factory_reboot=True")

    db_path = ctx.config.db_path

    def follow() -> Iterator[Line]:
        # The request's store is closed once the view returns (teardown runs before the
        # stream does), so the stream watches the build through a handle of its own.
        store = open_store(db_path)

        def running() -> bool:
            latest = store.latest_build(space_id)
            return bool(latest and latest["status"] == "running"
                        and latest["log_path"] == str(path))

        with closing(store), open(path, encoding="utf-8", errors="replace") as fh:
            quiet_since, new = time.monotonic(), False
            while True:
                start = fh.tell()
                line = fh.readline()
                if line.endswith("\n"):
                    quiet_since = time.monotonic()
                    yield line[:-1], new
                    continue
                if not running():
                    rest = line + fh.read()
                    yield from ((text, new) for text in rest.splitlines())
                    return
                new = True  # everything after the first end of file came while streaming
                fh.seek(start)  # a line half written: read it again once it is whole
                if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield None
                time.sleep(POLL_SECONDS)

    return follow()


def _run_lines(ctx: spaces.Context, space: dict[str, Any], tail: int) -> Iterator[Line]:
    container = ctx.store.get_space(space["id"])["container"]
    if not container:
        raise Conflict(f"Space {space['id']} has no running app ({space['stage']})",
                       hint="see its build log: fetch_space_logs(..., build=True)")
    # The whole log is read once to know where "now" is: following starts from the first
    # line, and the lines up to now are skipped (the runtime cannot follow from a point yet).
    seen = _split_lines(ctx.runtime.logs(container, tail=None))
    chunks: queue.Queue = queue.Queue(maxsize=1000)
    stop = threading.Event()

    def offer(item: str | None) -> None:
        while not stop.is_set():  # a reader never outlives the stream by blocking here
            try:
                chunks.put(item, timeout=1)
                return
            except queue.Full:
                continue

    def read() -> None:
        try:
            for chunk in ctx.runtime.follow_logs(container):
                offer(chunk)
                if stop.is_set():
                    return
        except Exception:  # noqa: BLE001 - the container went: the stream simply ends
            pass
        offer(None)

    def follow() -> Iterator[Line]:
        yield from ((text, False) for text in seen[-tail:])
        reader = threading.Thread(target=read, name=f"hf-logs-{space['id']}", daemon=True)
        reader.start()
        skip, partial = len(seen), ""
        try:
            while True:
                try:
                    chunk = chunks.get(timeout=KEEPALIVE_SECONDS)
                except queue.Empty:
                    yield None
                    continue
                if chunk is None:
                    if partial and skip <= 0:
                        yield partial, True
                    return
                *whole, partial = (partial + chunk).split("\n")
                for text in whole:
                    if skip > 0:
                        skip -= 1
                    else:
                        yield text, True
        finally:
            stop.set()

    return follow()


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _redactor(space_id: str) -> Callable[[str], str]:
    """Replace each of the Space's secret values with *** (as build logs do)."""
    return builds.Redactor(list(context().store.kv("secrets", space_id).values()))


# -- helpers ----------------------------------------------------------------------------------


def _space(owner: str, name: str) -> dict[str, Any]:
    try:
        return visible_space(f"{owner}/{name}")
    except NotFound as exc:
        raise SpaceNotFound(exc.message, exc.hint) from None


def _managed(owner: str, name: str) -> dict[str, Any]:
    space = _space(owner, name)
    check_manage(space["id"])
    return space



def _key(data: dict[str, Any]) -> str:
    key = data.get("key")
    if not isinstance(key, str) or not key or len(key) > 256:
        raise InvalidInput("Send the name as JSON {\"key\": NAME}",
                           hint=f"got {shown(key)}")
    return key


def _key_value(data: dict[str, Any]) -> tuple[str, str]:
    value = data.get("value")
    if not isinstance(value, str):
        raise InvalidInput("Send the value as a JSON string {\"key\": NAME, \"value\": TEXT}",
                           hint=f"'value' was {shown(value)}")
    return _key(data), value


def _sleep_seconds(value: Any) -> int | None:
    if value == NEVER:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise InvalidInput(f"Sleep time must be a whole number of seconds (or -1: never), "
                           f"got {shown(value)}")
    return value


def _variables(space_id: str) -> dict[str, Any]:
    store = context().store
    values = store.kv("variables", space_id)
    return {r["key"]: {"value": values[r["key"]], "description": None,
                       "updatedAt": _hf_time(r["updated_at"])}
            for r in store.kv_meta("variables", space_id) if r["key"] in values}


def hf_stage(space: dict[str, Any]) -> str:
    """The stage as Hugging Face names it: a Space asleep (woken by a request) is SLEEPING."""
    if space["stage"] == stages.STOPPED and space["desired"] == "sleeping":
        return "SLEEPING"
    return space["stage"]


def hf_hardware(hardware: str | None) -> str | None:
    """This box's request as Hugging Face shows it: the CPU is "cpu-basic", GPUs as asked."""
    return "cpu-basic" if hardware == "cpu" else hardware


def _runtime(space: dict[str, Any]) -> dict[str, Any]:
    serving = space["url"] is not None
    hardware = hf_hardware(space["hardware"])
    error = _redactor(space["id"])(space["error"]) if space["error"] else None
    return {
        "stage": hf_stage(space),
        "hardware": {"current": hardware if serving else None, "requested": hardware},
        "storage": None,
        "gcTimeout": space["sleep_after"],
        "replicas": {"current": 1 if serving else 0, "requested": 1},
        "devMode": False,
        "domains": [{"domain": f"{config().public_host}:{space['port']}",
                     "stage": "READY" if serving else "PENDING"}],
        "errorMessage": error,
        "sha": space["revision"],
    }


def _info(space: dict[str, Any]) -> dict[str, Any]:
    manifest = space["manifest"] or {}
    owner = space["id"].split("/", 1)[0]
    tags = [t for t in [space["sdk"], *(manifest.get("tags") or [])] if isinstance(t, str)]
    return {
        "id": space["id"],
        "author": owner,
        "sha": space["revision"],
        "createdAt": _hf_time(space["created_at"]),
        "lastModified": _hf_time(space["updated_at"]),
        "private": space.get("visibility") == "private",
        "gated": False,
        "disabled": False,
        "host": f"http://{config().public_host}:{space['port']}",
        "subdomain": None,
        "likes": 0,
        "sdk": space["sdk"],
        "tags": list(dict.fromkeys(tags)),
        "cardData": manifest,
        "runtime": _runtime(space),
        "models": manifest.get("models"),
        "datasets": manifest.get("datasets"),
    }


def _hf_time(stamp: str | None) -> str | None:
    """A stored ISO time as huggingface_hub parses it ("2026-01-02T03:04:05.678Z")."""
    if not stamp:
        return None
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _format_time(moment)


def _hf_now() -> str:
    return _format_time(datetime.now(UTC))


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
