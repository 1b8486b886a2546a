"""The portal's pages: Space cards, a Space's page, live logs, settings, adding a Space, system."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)

from .. import doctor, stages, users
from ..core import actions, spaces
from ..errors import ApplianceError, Conflict, Forbidden, NotFound, Unauthorized
from ..upkeep import housekeeping, sleep
from .base import (
    caller,
    check_manage,
    client_address,
    config,
    context,
    from_localhost,
    log_in,
    log_out,
    may_manage,
    may_see,
    may_see_event,
    require,
    visible_space,
)

bp = Blueprint("pages", __name__)
STAGE_CLASS = {"RUNNING": "running", "RUNNING_BUILDING": "running",
               "RUNNING_APP_STARTING": "running", "BUILDING": "building",
               "APP_STARTING": "building", "STOPPED": "stopped", "PAUSED": "stopped",
               "DELETING": "stopped"}
STAGE_LABEL = {"RUNNING_BUILDING": "running · building", "RUNNING_APP_STARTING":
               "running · starting", "APP_STARTING": "starting", "NO_APP_FILE": "no app file"}
# (action, label, confirmation or None): the destructive ones ask first.
ACTIONS = (
    ("restart", "Restart", None),
    ("factory", "Factory rebuild", "Rebuild from scratch, ignoring every cache?"),
    ("update", "Update now", None),
    ("rollback", "Roll back", "Serve the previous revision again?"),
    ("start", "Start", None),
    ("stop", "Stop", "Stop this Space?"),
    ("pause", "Pause", "Pause this Space? It stays stopped until someone starts it."),
    ("delete", "Delete…", "Delete this Space, its images and its /data? This cannot be undone."),
)
LOG_TAIL = 200
BUILD_START_WAIT = 30  # seconds a log stream waits for a requested build's worker


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    app.jinja_env.filters["stage_class"] = stage_class
    app.jinja_env.filters["stage_label"] = lambda s: STAGE_LABEL.get(s, s.lower().replace(
        "_", " "))

    @app.context_processor
    def banners() -> dict[str, Any]:
        warning = housekeeping.disk_warning(config())
        return {"banners": [warning] if warning and caller().user else []}


def stage_class(space: dict[str, Any] | str) -> str:
    stage = space if isinstance(space, str) else space["stage"]
    if not isinstance(space, str) and space.get("desired") == "sleeping" \
            and stage in (stages.STOPPED, stages.PAUSED):
        return "sleeping"
    return STAGE_CLASS.get(stage, "error")


def card(space: dict[str, Any]) -> dict[str, Any]:
    """A Space's view with what its card and header draw."""
    manifest = space.get("manifest") or {}
    owner, name = space["id"].split("/", 1)
    color_from = manifest.get("colorFrom") if manifest.get("colorFrom") in CARD_HEX else "gray"
    color_to = manifest.get("colorTo") if manifest.get("colorTo") in CARD_HEX else "gray"
    return {**space, "owner": owner, "name": name, "color_from": color_from,
            "color_to": color_to, "paint": card_paint(color_from, color_to),
            "pinned": bool(manifest.get("pinned")), "tags": manifest.get("tags") or [],
            "gpu": space["hardware"] not in (None, "", "cpu"), "state": stage_class(space)}


# -- colours: text readable on any card gradient (WCAG AA, 4.5:1) -------------------------------

# Hugging Face's card colours (manifest.CARD_COLORS), as portal.css draws them.
CARD_HEX = {"red": "#ef4444", "yellow": "#eab308", "green": "#22c55e", "blue": "#3b82f6",
            "indigo": "#6366f1", "purple": "#a855f7", "pink": "#ec4899", "gray": "#6b7280"}
DARK_INK, LIGHT_INK = "#111827", "#ffffff"
HEADER_TINT = 0.18  # a page header is the card's colours at 18% on white
AA = 4.5


def _rgb(color: str) -> tuple[float, float, float]:
    return tuple(int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))


def luminance(color: str) -> float:
    """WCAG relative luminance of a #rrggbb colour."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in _rgb(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two #rrggbb colours (1 to 21)."""
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def mix(color: str, other: str, weight: float) -> str:
    """color with `weight` of other mixed in (sRGB, as CSS color-mix does)."""
    return "#" + "".join(f"{round(255 * (a * (1 - weight) + b * weight)):02x}"
                         for a, b in zip(_rgb(color), _rgb(other), strict=True))


@cache
def card_paint(color_from: str, color_to: str) -> dict[str, str]:
    """The card's gradient stops and the text colour to draw on them: dark or white, which
    ever contrasts more with both stops; where neither reaches 4.5:1 the stops are darkened
    until white does. The page header's lighter stops keep the dark text."""
    stops = [CARD_HEX[color_from], CARD_HEX[color_to]]
    ink = max((DARK_INK, LIGHT_INK), key=lambda i: min(contrast(i, c) for c in stops))
    shade = 0.0
    while min(contrast(ink, c) for c in stops) < AA:
        ink, shade = LIGHT_INK, shade + 0.05
        stops = [mix(CARD_HEX[color_from], "#000000", shade),
                 mix(CARD_HEX[color_to], "#000000", shade)]
    head = [mix(CARD_HEX[c], "#ffffff", 1 - HEADER_TINT) for c in (color_from, color_to)]
    return {"from": stops[0], "to": stops[1], "ink": ink, "head_from": head[0],
            "head_to": head[1]}


# -- home -------------------------------------------------------------------------------------


@bp.get("/")
@require("read")
def home():
    q = request.args.get("q", "").strip().lower()
    stage, sdk, tag = (request.args.get(k, "") for k in ("stage", "sdk", "tag"))
    cards = [card(s) for s in spaces.list_spaces(context()) if may_see(s)]
    tags = sorted({t for c in cards for t in c["tags"]})
    shown = [c for c in cards
             if (not q or q in f"{c['id']} {c['title']} {c['short_description'] or ''}".lower())
             and (not stage or c["state"] == stage) and (not sdk or c["sdk"] == sdk)
             and (not tag or tag in c["tags"])]
    shown.sort(key=lambda c: (not c["pinned"], c["title"].lower()))
    return render_template("home.html", cards=shown, q=q, stage=stage, sdk=sdk, tag=tag,
                           tags=tags)


# -- one Space --------------------------------------------------------------------------------


def _space(owner: str, name: str) -> dict[str, Any]:
    return card(visible_space(f"{owner}/{name}"))


def app_url(space: dict[str, Any]) -> str:
    """The Space's app through the proxy, at its base_path (what the page embeds)."""
    from .proxy import apps_url

    base = (space.get("manifest") or {}).get("base_path") or "/"
    return apps_url(request.environ, config(), space["id"]) + base.lstrip("/")


@bp.get("/spaces/<owner>/<name>")
@require("read")
def space(owner: str, name: str):
    s = _space(owner, name)
    # Opening a sleeping Space's page wakes it, as a request through its url does.
    woke = s["desired"] == sleep.SLEEPING and s["stage"] in (stages.STOPPED, stages.PAUSED) \
        and sleep.wake(context(), s["id"])
    state = state_of(s, woke)
    log_tail = "" if state["serving"] else _log_tail(s)
    from .gpus import space_gpu_usage

    gpu_usage = space_gpu_usage(context(), s["id"]) if s["gpu"] else None
    return render_template("space.html", s=s, serving=state["serving"], busy=state["busy"],
                           state=state, log_tail=log_tail, app_url=app_url(s),
                           can_manage=may_manage(s["id"]), gpu_usage=gpu_usage,
                           mini=(s["manifest"] or {}).get("header") == "mini")


def state_of(s: dict[str, Any], woke: bool = False) -> dict[str, Any]:
    """What the page says about where the Space is: serving, busy (building, starting or
    waking: the page follows it), settled otherwise; an error split into what and fix."""
    stage = s["stage"]
    row = context().store.get_space(s["id"])
    waking = (s["desired"] == sleep.SLEEPING and stage in (stages.STOPPED, stages.PAUSED)
              and (woke or bool(row["wake_requested_at"] or spaces.worker_alive(row))))
    serving = stage in spaces.SERVING
    busy = waking or (stage in stages.BUSY and not serving)
    what, fix, detail = error_parts(s["error"]) if stages.is_error(stage) else ("", "", "")
    return {"stage": stage, "serving": serving, "busy": busy, "waking": waking,
            "settled": not busy and stage not in stages.BUSY, "error": what, "fix": fix,
            "detail": detail, "label": STAGE_LABEL.get(stage, stage.lower().replace("_", " ")),
            "class": stage_class(s)}


def error_parts(error: str | None) -> tuple[str, str, str]:
    """Split a stored error ("what — fix", then detail lines) for the page."""
    first, _, rest = (error or "").partition("\n")
    what, _, fix = first.partition(" — ")
    return what.strip(), web_hint(fix.strip()), rest.strip()


@bp.get("/spaces/<owner>/<name>/stage")
@require("read")
def stage_view(owner: str, name: str):
    """The Space's stage for the page's script, with the state panel drawn afresh."""
    s = _space(owner, name)
    state = state_of(s)
    where = "logs" if request.args.get("where") == "logs" else "space"
    html = render_template("_state.html", s=s, state=state, where=where,
                           log_tail="" if where == "logs" or state["serving"] else _log_tail(s),
                           can_manage=may_manage(s["id"]))
    return jsonify({**{k: v for k, v in state.items()}, "id": s["id"], "html": html,
                    "app": url_for("pages.space", owner=s["owner"], name=s["name"])},
                   ), 200, {"Cache-Control": "no-store"}


def _log_tail(s: dict[str, Any], lines: int = 40) -> str:
    ctx = context()
    try:
        if ctx.store.get_space(s["id"])["container"]:
            return spaces.app_log(ctx, s["id"], tail=lines)
    except ApplianceError:
        pass
    path = spaces.build_log_path(ctx, s["id"])
    if path and path.exists():
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@bp.get("/spaces/<owner>/<name>/logs")
@require("read")
def logs(owner: str, name: str):
    s = _space(owner, name)
    kind = request.args.get("kind") or ("build" if s["stage"] in stages.BUSY else "run")
    if kind not in ("build", "run"):
        kind = "build"
    tail = ""  # the stream sends the tail first; this is for browsers without EventSource
    return render_template("logs.html", s=s, kind=kind, tail=tail, state=state_of(s),
                           can_manage=may_manage(s["id"]))


@bp.get("/spaces/<owner>/<name>/logs/stream")
@require("read")
def log_stream(owner: str, name: str):
    """Server-sent events: the log's tail, then each new line as it is written."""
    s = _space(owner, name)
    kind = request.args.get("kind", "build")
    lines = build_log_lines(s["id"]) if kind == "build" else run_log_lines(s["id"])

    def events() -> Iterator[str]:
        for line in lines:
            yield f"event: line\ndata: {json.dumps({'line': line})}\n\n"
        yield f"event: end\ndata: {json.dumps({'message': 'The log ended.'})}\n\n"

    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def build_log_lines(space_id: str, follow: bool = True) -> Iterator[str]:
    """The latest build log, line by line, following it while the build runs."""
    ctx = context()
    latest = ctx.store.latest_build(space_id)
    # A build asked for a moment ago is started by its worker a second later: wait for it
    # rather than end the stream on "no build log yet" (or on the previous build's log).
    deadline = time.monotonic() + BUILD_START_WAIT
    while (follow and (latest is None or latest["status"] != "running")
           and ctx.store.get_space(space_id)["stage"] in (stages.BUILDING,
                                                          stages.RUNNING_BUILDING)
           and time.monotonic() < deadline):
        time.sleep(0.25)
        latest = ctx.store.latest_build(space_id)
    path = Path(latest["log_path"]) if latest else None
    if path is None or not path.exists():
        yield "(no build log yet)"
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        while True:
            line = fh.readline()
            if line:
                yield line.rstrip("\n")
                continue
            latest = ctx.store.latest_build(space_id)
            if not follow or not latest or latest["status"] != "running":
                return
            time.sleep(0.25)


def run_log_lines(space_id: str, follow: bool = True) -> Iterator[str]:
    """The app's log: its tail, then (following) new lines until the container goes."""
    ctx = context()
    row = ctx.store.get_space(space_id)
    if not row["container"]:
        yield f"(no running app: the Space is {row['stage']})"
        return
    redact = spaces.redactor(ctx, space_id)
    try:
        if not follow:
            yield from spaces.app_log(ctx, space_id, tail=LOG_TAIL).splitlines()
            return
        for line in redact.lines(ctx.runtime.follow_logs(row["container"], tail=LOG_TAIL)):
            yield from line.splitlines() or [line]
    except ApplianceError as exc:
        yield f"(log unavailable: {exc.message})"


# -- what the web says instead of a command line ------------------------------------------------

# A hint written for the CLI, as the same thing said with what to click (first match wins).
WEB_HINTS = (
    (re.compile(r"'appliance spaces logs [^']*'"), "the Logs tab"),
    (re.compile(r"'appliance spaces restart [^']*--factory'"), "Factory rebuild in Settings"),
    (re.compile(r"'appliance spaces update [^']*'"), "Update now in Settings"),
    (re.compile(r"'appliance spaces (start|restart|stop) [^']*'"),
     lambda m: f"the {m.group(1).capitalize()} button in Settings"),
    (re.compile(r"'appliance spaces show [^']*'"), "the Space's page"),
    (re.compile(r"'appliance doctor'"), "the System page"),
    (re.compile(r"with --name\b"), "in the Name field"),
)


def web_hint(hint: str | None) -> str:
    """A hint as the portal says it: what to click, not which command to type."""
    text = hint or ""
    for pattern, said in WEB_HINTS:
        text = pattern.sub(said, text)
    return text


# -- settings and actions ---------------------------------------------------------------------


@bp.get("/spaces/<owner>/<name>/settings")
@require("write")
def settings(owner: str, name: str, errors: dict[str, str] | None = None,
             typed: dict[str, dict[str, str]] | None = None):
    """The settings page; errors (form -> message) are shown next to their form, which keeps
    what was typed (typed: form -> its fields)."""
    s = _space(owner, name)
    check_manage(s["id"])
    ctx = context()
    manifest = s["manifest"] or {}
    return render_template(
        "settings.html", s=s, actions=ACTIONS, variables=ctx.store.kv("variables", s["id"]),
        secrets=ctx.store.kv_meta("secrets", s["id"]),
        hardware_choices=("cpu", "gpu", "gpu:2", "shared:4g", "shared:8g", "shared:16g"),
        suggested=manifest.get("suggested_hardware"), gpu_present=_gpu_present(),
        box_resolution=config().build_resolution, errors=errors or {}, typed=typed or {},
        duration=actions.format_duration)


def _settings_error(owner: str, name: str, form: str, exc: ApplianceError):
    """The settings page again, with the refusal beside the form it came from."""
    hint = web_hint(exc.hint)
    typed = {form: {k: v for k, v in request.form.items()
                    if k != "csrf_token" and not (form == "secrets" and k == "value")}}
    return settings(owner, name, errors={form: exc.message + (f" — {hint}" if hint else "")},
                    typed=typed), exc.status


def _gpu_present() -> bool:
    return bool(context().read_inventory().gpus)


def _back(s_id: str, where: str = "settings"):
    owner, name = s_id.split("/", 1)
    return redirect(url_for(f"pages.{where}", owner=owner, name=name))


@bp.post("/spaces/<owner>/<name>/actions/<action>")
@require("write")
def action(owner: str, name: str, action: str):
    space_id = visible_space(f"{owner}/{name}")["id"]
    check_manage(space_id)
    ctx = context()
    if action == "delete":
        spaces.delete(ctx, space_id, keep_data=bool(request.form.get("keep_data")))
        flash(f"Deleted {space_id}", "ok")
        return redirect(url_for("pages.home"))
    try:
        actions.perform(ctx, space_id, action, revision=request.form.get("revision"))
    except ApplianceError as exc:
        # Said where the button was, in the portal's words.
        hint = web_hint(exc.hint)
        flash(f"{action.capitalize()} failed: {exc.message}" + (f" — {hint}" if hint else ""),
              "error")
        came = request.form.get("from")
        return _back(space_id, came if came in ("space", "logs", "settings") else "settings")
    flash(f"{action.capitalize()}: done or under way for {space_id}", "ok")
    where = "logs" if action in ("factory", "update") else "space"
    return _back(space_id, where)


@bp.post("/spaces/<owner>/<name>/<any(secrets, variables):kind>")
@require("write")
def kv_set(owner: str, name: str, kind: str):
    space_id = visible_space(f"{owner}/{name}")["id"]
    check_manage(space_id)
    key = request.form.get("key", "").strip()
    try:
        spaces.set_value(context(), kind, space_id, key, request.form.get("value", ""))
    except ApplianceError as exc:
        return _settings_error(owner, name, kind, exc)
    flash(f"Set {kind[:-1]} {key}; restart the Space to apply it", "ok")
    return _back(space_id)


@bp.post("/spaces/<owner>/<name>/<any(secrets, variables):kind>/<key>/delete")
@require("write")
def kv_delete(owner: str, name: str, kind: str, key: str):
    space_id = visible_space(f"{owner}/{name}")["id"]
    check_manage(space_id)
    ctx = context()
    ctx.store.delete_kv(kind, space_id, key, ctx.actor)
    flash(f"Deleted {kind[:-1]} {key}", "ok")
    return _back(space_id)


@bp.post("/spaces/<owner>/<name>/settings/<what>")
@require("write")
def setting(owner: str, name: str, what: str):
    space_id = visible_space(f"{owner}/{name}")["id"]
    check_manage(space_id)
    ctx, form = context(), request.form
    if what not in SETTING_FORMS:
        raise NotFound(f"No setting named {what}")
    try:
        saved = _save_setting(ctx, space_id, what, form)
    except ApplianceError as exc:
        return _settings_error(owner, name, what, exc)
    flash(saved, "ok")
    return _back(space_id)


SETTING_FORMS = ("hardware", "sleep", "update-policy", "visibility", "resolution", "relock",
                 "health")


def _save_setting(ctx, space_id: str, what: str, form) -> str:
    """Apply one settings form; return what to say about it."""
    if what == "hardware":
        spaces.set_hardware(ctx, space_id, form.get("hardware", "cpu").strip())
    elif what == "sleep":
        actions.set_sleep_time(ctx, space_id, form.get("seconds", "").strip())
    elif what == "update-policy":
        interval = actions.parse_duration(form.get("interval", "").strip(), "Update interval")
        actions.set_update_policy(ctx, space_id, form.get("policy", "manual"), interval,
                                  form.get("revision", "").strip())
    elif what == "visibility":
        actions.set_visibility(ctx, space_id, form.get("visibility", ""))
    elif what == "resolution":
        actions.set_resolution(ctx, space_id, form.get("resolution", ""))
    elif what == "relock":
        count = actions.forget_locks(ctx, space_id)
        return (f"Forgot {count} package lock{'' if count == 1 else 's'}: the next build "
                "resolves the packages again (Factory rebuild builds now)")
    elif what == "health":
        from ..upkeep import health

        seconds = actions.parse_duration(form.get("interval", "").strip(), "Health interval")
        health.set_health(ctx, space_id, form.get("path", "").strip() or None, seconds)
    return "Saved"


# -- adding a Space ---------------------------------------------------------------------------


NEW_FIELDS = ("source", "name", "revision", "hardware")


@bp.route("/new", methods=["GET", "POST"])
@require("write")
def new_space():
    """Add a Space: the answer comes at once (the worker fetches and builds), and a refusal
    is shown beside the field it is about, with what was typed kept."""
    roots = [str(root) for root in config().local_source_roots]
    if request.method == "GET":
        return render_template("new.html", form={}, errors={}, roots=roots)
    form = {k: request.form.get(k, "").strip() for k in NEW_FIELDS}
    try:
        s = actions.add(context(), form["source"], name=form["name"],
                        revision=form["revision"], hardware=form["hardware"] or "cpu")
    except ApplianceError as exc:
        field = getattr(exc, "field", "source")
        hint = web_hint(exc.hint)
        if isinstance(getattr(exc, "cause", exc), Conflict) and field == "name":
            hint = "open it from the Spaces page (Update now is in its Settings), or type " \
                   "another owner/name in the Name field"
        return render_template("new.html", form=form, roots=roots, errors={
            field: exc.message + (f" — {hint}" if hint else "")}), exc.status
    return _back(s["id"], "logs")


@bp.get("/favicon.ico")
def favicon():
    """The portal's icon, for browsers that ask for it by this name."""
    return redirect(url_for("static", filename="favicon.svg"), code=301)


# -- system -----------------------------------------------------------------------------------


@bp.get("/system")
@require("user")
def system():
    ctx = context()
    try:
        podman = ctx.runtime.info()
    except ApplianceError:
        podman = None
    checks = doctor.run_checks(ctx.config, podman_probe=lambda: podman or ctx.runtime.info())
    usage = shutil.disk_usage(ctx.config.data_path)
    events = [{**e, "detail_text": json.dumps(e["detail"]) if e["detail"] else ""}
              for e in ctx.store.events(limit=100) if may_see_event(e)]
    return render_template(
        "system.html", checks=checks, events=events,
        podman_version=podman and podman.get("version"),
        space_count=len(ctx.store.list_spaces()),
        disk={"free_gb": round(usage.free / 2**30, 1), "total_gb": round(usage.total / 2**30, 1),
              "used_pct": round(100 * usage.used / usage.total)})


# -- login, setup, account --------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Follow ?next= only within the portal (no //host or scheme: no open redirect)."""
    if _is_portal_path(target):
        return target
    return url_for("pages.home")


def _is_portal_path(target: str | None) -> bool:
    # Browsers drop tabs and newlines from a URL and read '\\' as '/', so '/\t/evil.example'
    # and '/\\evil.example' lead off the portal (issue 11): refuse them anywhere, as written
    # and once percent-decoded, along with anything that urlsplit reads a host or scheme in.
    if not isinstance(target, str) or len(target) > 2048:
        return False
    for text in (target, unquote(target)):
        if any(c == "\\" or ord(c) < 32 or ord(c) == 127 for c in text):
            return False
        if not text.startswith("/") or text.startswith("//"):
            return False
        try:
            parts = urlsplit(text)
        except ValueError:
            return False
        if parts.scheme or parts.netloc:
            return False
    return True


@bp.route("/login", methods=["GET", "POST"])
def login():
    store = context().store
    if store.count_admins() == 0:
        return redirect(url_for("pages.setup"))
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("login.html", setup=False, next=next_url)
    try:
        found = users.login(store, request.form.get("username", ""),
                            request.form.get("password", ""), client_address(),
                            config().login_attempts)
    except ApplianceError as exc:
        flash(exc.message + (f" — {exc.hint}" if exc.hint else ""), "error")
        return render_template("login.html", setup=False, next=next_url), exc.status
    log_in(found)
    return redirect(next_url)


@bp.post("/logout")
def logout():
    log_out()
    return redirect(url_for("pages.home"))


@bp.route("/setup", methods=["GET", "POST"])
def setup():
    """Create the first admin: only from the box itself, and only while there is none."""
    store = context().store
    if store.count_admins() > 0:
        return redirect(url_for("pages.login"))
    if not from_localhost():
        raise Forbidden("The first admin can only be created from the box itself",
                              hint="open http://127.0.0.1:PORT/setup there, or run "
                              "'appliance users add NAME --role admin'")
    if request.method == "GET":
        return render_template("login.html", setup=True, next="/")
    try:
        users.add_user(store, request.form.get("username", ""), "admin",
                       request.form.get("password", ""), "setup")
    except ApplianceError as exc:
        flash(exc.message, "error")
        return render_template("login.html", setup=True, next="/"), exc.status
    log_in(users.caller_for_user(store, request.form["username"]))
    return redirect(url_for("pages.home"))


@bp.get("/account")
@require("user")
def account(new_token: str | None = None):
    who = caller()
    store = context().store
    return render_template("account.html", tokens=store.list_tokens(who.user),
                           users=store.list_users() if who.is_admin else [],
                           new_token=new_token)


@bp.post("/account/password")
@require("user")
def password_change():
    """Change one's own password: every session of the user ends, this one starts afresh."""
    who = caller()
    if who.via != "session":
        raise Unauthorized("Log in to change your password")
    form = request.form
    try:
        users.change_password(context().store, who.user, form.get("current", ""),
                              form.get("password", ""), who.actor, client_address(),
                              config().login_attempts)
    except ApplianceError as exc:
        flash(exc.message + (f" — {exc.hint}" if exc.hint else ""), "error")
        return redirect(url_for("pages.account"))
    log_in(who)
    flash("Password changed; every other login of yours has ended", "ok")
    return redirect(url_for("pages.account"))


@bp.post("/account/tokens")
@require("user")
def token_create():
    who = caller()
    if who.user is None or who.via != "session":
        raise Unauthorized("Log in to create tokens")
    scope = request.form.get("scope", "read")
    if scope == "write" and not who.can_write:
        raise Forbidden(f"{who.user} is a {who.role}: only read tokens")
    _, token = users.create_token(context().store, request.form.get("name", "").strip(),
                                  who.user, scope, who.actor)
    return account(new_token=token)


@bp.post("/account/tokens/<int:token_id>/revoke")
@require("user")
def token_revoke(token_id: int):
    who = caller()
    if who.user is None or who.via != "session":
        raise Unauthorized("Log in to revoke tokens")
    context().store.revoke_token(token_id, who.actor, user=None if who.is_admin else who.user)
    flash(f"Revoked token {token_id}", "ok")
    return redirect(url_for("pages.account"))


@bp.post("/admin/users")
@require("admin")
def user_add():
    form = request.form
    users.add_user(context().store, form.get("username", "").strip(), form.get("role", ""),
                   form.get("password", ""), caller().actor)
    flash(f"Added {form.get('username')}", "ok")
    return redirect(url_for("pages.account"))


@bp.post("/admin/users/<name>/delete")
@require("admin")
def user_delete(name: str):
    users.delete_user(context().store, name, caller().actor)
    flash(f"Deleted {name}", "ok")
    return redirect(url_for("pages.account"))
