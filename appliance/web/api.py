"""The JSON API at /api/v1: the CLI's nouns and verbs over the same services, and its OpenAPI.

Each route is declared once in ROUTES (method, path, view, guard, summary); the blueprint and
the OpenAPI document are both made from that table, so they cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, jsonify, request

from .. import doctor, users
from ..core import actions, spaces
from ..errors import Forbidden, InvalidInput
from ..gpu import claims
from .base import (
    caller,
    check,
    check_manage,
    context,
    field,
    json_body,
    may_see,
    may_see_event,
    query_int,
    require,
    visible_space,
)

PREFIX = "/api/v1"
NAME_LENGTH = 200  # names, revisions, hardware requests, policies: short words
SOURCE_LENGTH = 1 << 20  # the services name their own, smaller limits for a new Space


def _space_id(owner: str, name: str) -> str:
    return visible_space(f"{owner}/{name}")["id"]


def _managed(owner: str, name: str) -> str:
    space_id = _space_id(owner, name)
    check_manage(space_id)
    return space_id


# -- views ------------------------------------------------------------------------------------


def list_spaces():
    return jsonify([s for s in spaces.list_spaces(context()) if may_see(s)])


def add_space():
    data = json_body()
    source = field(data, "source", str, max_length=SOURCE_LENGTH)
    if not source:
        raise InvalidInput("'source' is required (a Space URL, hf:// id, git URL or path)")
    space = actions.add(context(), source,
                        name=field(data, "name", str, max_length=SOURCE_LENGTH),
                        revision=field(data, "revision", str, max_length=SOURCE_LENGTH),
                        hardware=field(data, "hardware", str, max_length=NAME_LENGTH) or "cpu")
    return jsonify(space), 202


def show_space(owner: str, name: str):
    return jsonify(visible_space(f"{owner}/{name}"))


def delete_space(owner: str, name: str):
    space_id = _managed(owner, name)
    spaces.delete(context(), space_id, keep_data=bool(request.args.get("keep_data")))
    return jsonify({"ok": True, "deleted": space_id})


def act(owner: str, name: str, action: str):
    space_id = _managed(owner, name)
    view = actions.perform(context(), space_id, action,
                           revision=field(json_body(), "revision", str, max_length=NAME_LENGTH))
    return jsonify(view), 202


def space_logs(owner: str, name: str):
    from .pages import build_log_lines, run_log_lines

    space_id = _space_id(owner, name)
    kind = request.args.get("kind", "run")
    if kind not in ("build", "run"):
        raise InvalidInput(f"kind must be build or run, got {kind!r}")
    lines = build_log_lines if kind == "build" else run_log_lines
    return jsonify({"kind": kind, "lines": list(lines(space_id, follow=False))})


def set_hardware(owner: str, name: str):
    hardware = field(json_body(), "hardware", str, "", max_length=NAME_LENGTH)
    return jsonify(spaces.set_hardware(context(), _managed(owner, name), hardware))


def set_sleep_time(owner: str, name: str):
    data = json_body()
    seconds = data.get("seconds")
    if not isinstance(seconds, str):  # a duration as text ("30m", "never") is read below
        seconds = field(data, "seconds", int, low=0)  # or null: never
    return jsonify(actions.set_sleep_time(context(), _managed(owner, name), seconds))


def set_update_policy(owner: str, name: str):
    data = json_body()
    return jsonify(actions.set_update_policy(
        context(), _managed(owner, name), field(data, "policy", str, "", max_length=NAME_LENGTH),
        field(data, "interval", int, low=0), field(data, "revision", str, max_length=NAME_LENGTH)))


def set_resolution(owner: str, name: str):
    space_id, data = _managed(owner, name), json_body()
    if "resolution" not in data:
        raise InvalidInput("'resolution' is required: dated, latest, default or null",
                           hint='e.g. {"resolution": "dated"}')
    # The service names the choices whatever the type sent (its message beats field()'s).
    value = "default" if data["resolution"] is None else data["resolution"]
    return jsonify(actions.set_resolution(context(), space_id, value))


def forget_locks(owner: str, name: str):
    return jsonify({"ok": True, "forgotten": actions.forget_locks(context(),
                                                                  _managed(owner, name))})


def space_packages(owner: str, name: str):
    return jsonify(visible_space(f"{owner}/{name}")["lock"])


def set_health(owner: str, name: str):
    from ..upkeep import health

    data = json_body()
    return jsonify(health.set_health(context(), _managed(owner, name),
                                     field(data, "path", str, max_length=2048),
                                     field(data, "interval", float, low=0, high=86400 * 365)))


def set_visibility(owner: str, name: str):
    visibility = field(json_body(), "visibility", str, "", max_length=NAME_LENGTH)
    return jsonify(actions.set_visibility(context(), _managed(owner, name), visibility))


def list_kv(owner: str, name: str, kind: str):
    space_id = _space_id(owner, name)
    store = context().store
    if kind == "secrets":  # write-only: names and dates
        return jsonify(store.kv_meta("secrets", space_id))
    check("user")
    return jsonify(store.kv("variables", space_id))


def set_kv(owner: str, name: str, kind: str, key: str):
    space_id = _managed(owner, name)
    value = field(json_body(), "value", str, "", nullable=False)
    spaces.set_value(context(), kind, space_id, key, value)
    return jsonify({"ok": True, "key": key})


def delete_kv(owner: str, name: str, kind: str, key: str):
    space_id = _managed(owner, name)
    ctx = context()
    ctx.store.delete_kv(kind, space_id, key, ctx.actor)
    return jsonify({"ok": True, "key": key})


def list_events():
    ctx = context()
    limit = query_int("limit", 100, 1, 1000)
    space_id = request.args.get("space")
    rows = ctx.store.events(space_id, limit)
    return jsonify([r for r in rows if may_see_event(r)
                    and (not r["space_id"] or _visible_id(r["space_id"]))])


def _visible_id(space_id: str) -> bool:
    row = context().store.find_space(space_id)
    return row is None or may_see({"visibility": row.get("visibility")})


def list_gpus():
    return jsonify(claims.inventory_view(context()))


def run_doctor():
    ctx = context()
    return jsonify([c.__dict__ for c in doctor.run_checks(ctx.config,
                                                          podman_probe=ctx.runtime.info)])


def whoami():
    who = caller()
    return jsonify({"user": who.user, "role": who.role, "scope": who.scope, "via": who.via})


def list_users():
    return jsonify(context().store.list_users())


def add_user():
    data = json_body()
    return jsonify(users.add_user(
        context().store, field(data, "name", str, "", max_length=NAME_LENGTH),
        field(data, "role", str, "member", max_length=NAME_LENGTH),
        field(data, "password", str, "", nullable=False, max_length=1024), caller().actor)), 201


def delete_user(name: str):
    users.delete_user(context().store, name, caller().actor)
    return jsonify({"ok": True, "deleted": name})


def list_tokens():
    who = caller()
    return jsonify(context().store.list_tokens(None if who.is_admin else who.user))


def create_token():
    data, who = json_body(), caller()
    user = field(data, "user", str, max_length=NAME_LENGTH) or who.user
    if user != who.user:
        check("admin")
    scope = field(data, "scope", str, "read", max_length=NAME_LENGTH)
    if scope == "write" and not who.can_write:
        raise Forbidden(f"{who.user} is a {who.role}: only read tokens")
    token_id, token = users.create_token(
        context().store, field(data, "name", str, "", max_length=NAME_LENGTH), user, scope,
        who.actor)
    return jsonify({"id": token_id, "token": token, "user": user, "scope": scope}), 201


def revoke_token(token_id: int):
    who = caller()
    context().store.revoke_token(token_id, who.actor, user=None if who.is_admin else who.user)
    return jsonify({"ok": True, "revoked": token_id})


def openapi():
    return jsonify(openapi_document())


SPACE = "/spaces/<owner>/<name>"
ACTIONS = "<any(" + ", ".join(actions.ACTIONS) + "):action>"
KINDS = "<any(secrets, variables):kind>"
# (method, path under /api/v1, view, guard, summary)
ROUTES: tuple[tuple[str, str, Callable, str, str], ...] = (
    ("GET", "/spaces", list_spaces, "read", "List the Spaces the caller may see"),
    ("POST", "/spaces", add_space, "write", "Add a Space and start building it (202)"),
    ("GET", SPACE, show_space, "read", "Show one Space (the `spaces show --json` contract)"),
    ("DELETE", SPACE, delete_space, "write", "Delete a Space (?keep_data=1 keeps /data)"),
    ("POST", f"{SPACE}/{ACTIONS}", act, "write",
     "Start, stop, pause, restart, factory-rebuild, update or roll back (202)"),
    ("GET", f"{SPACE}/logs", space_logs, "read", "The build or run log (?kind=build|run)"),
    ("PUT", f"{SPACE}/hardware", set_hardware, "write", "Request hardware (cpu, gpu, ...)"),
    ("PUT", f"{SPACE}/sleep-time", set_sleep_time, "write", "Seconds idle before sleeping"),
    ("PUT", f"{SPACE}/update-policy", set_update_policy, "write", "manual, track or pinned"),
    ("PUT", f"{SPACE}/visibility", set_visibility, "write", "public or private"),
    ("PUT", f"{SPACE}/health", set_health, "write", "A health path and interval of its own"),
    ("PUT", f"{SPACE}/resolution", set_resolution, "write",
     "How packages are resolved: dated, latest or default (null)"),
    ("DELETE", f"{SPACE}/lock", forget_locks, "write",
     "Forget the package locks: the next build resolves again"),
    ("GET", f"{SPACE}/packages", space_packages, "read",
     "The packages locked for the serving revision (null: none)"),
    ("GET", f"{SPACE}/{KINDS}", list_kv, "read", "Variables, or secret names and dates"),
    ("PUT", f"{SPACE}/{KINDS}/<key>", set_kv, "write", "Set a secret or variable"),
    ("DELETE", f"{SPACE}/{KINDS}/<key>", delete_kv, "write", "Delete a secret or variable"),
    ("GET", "/events", list_events, "user", "What happened, when, by whom"),
    ("GET", "/gpus", list_gpus, "read", "GPUs, their use and allocations"),
    ("GET", "/doctor", run_doctor, "user", "Host checks with their fixes"),
    ("GET", "/whoami", whoami, "read", "Who the caller is"),
    ("GET", "/users", list_users, "admin", "List users"),
    ("POST", "/users", add_user, "admin", "Add a user"),
    ("DELETE", "/users/<name>", delete_user, "admin", "Delete a user"),
    ("GET", "/tokens", list_tokens, "user", "List tokens (own; every token for admins)"),
    ("POST", "/tokens", create_token, "account", "Create a token; its value is shown once"),
    ("DELETE", "/tokens/<int:token_id>", revoke_token, "account", "Revoke a token"),
    ("GET", "/openapi.json", openapi, "read", "This document"),
)


def register(app: Flask) -> None:
    bp = Blueprint("api", __name__, url_prefix=PREFIX)  # one per app: tests make many apps
    for method, path, view, guard, _summary in ROUTES:
        bp.add_url_rule(path, endpoint=f"{method.lower()}_{view.__name__}",
                        view_func=require(guard)(view), methods=[method])
    app.register_blueprint(bp)


def openapi_path(rule: str) -> str:
    """Turn a Flask rule (<int:x>, <any(a, b):y>) into an OpenAPI path template ({x})."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>:]+)>", r"{\1}", re.sub(r"<any\([^)]*\):", "<", rule))


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, view, guard, summary in ROUTES:
        params = []
        for name in re.findall(r"\{([^}]+)\}", openapi_path(path)):
            schema: dict[str, Any] = {"type": "integer" if name == "token_id" else "string"}
            if name == "action":
                schema["enum"] = list(actions.ACTIONS)
            if name == "kind":
                schema["enum"] = ["secrets", "variables"]
            params.append({"name": name, "in": "path", "required": True, "schema": schema})
        operation: dict[str, Any] = {
            "operationId": f"{method.lower()}_{view.__name__}", "summary": summary,
            "parameters": params,
            "responses": {"200": {"description": "OK"}, "default": {
                "description": "Error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}},
            "x-required-access": guard,
        }
        if guard not in ("read",):
            operation["security"] = [{"token": []}, {"session": []}]
        if method in ("POST", "PUT"):
            operation["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": {"type": "object"}}}}
        paths.setdefault(PREFIX + openapi_path(path), {})[method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "appliance API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "appliance_session"},
            },
            "schemas": {"Error": {"type": "object", "properties": {
                "ok": {"type": "boolean"}, "error": {"type": "string"},
                "hint": {"type": "string", "nullable": True}, "status": {"type": "integer"}}}},
        },
    }
