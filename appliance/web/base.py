"""What every portal request needs: who is calling (session or token), CSRF, role checks,
the request's service Context, reading JSON fields, and the error envelope.

The login cookie holds a random session id, looked up (one indexed read) on every request:
an ended or expired session is anonymous and its cookie is cleared. JSON fields are read
with `field()`, which refuses a wrong type, range or length with a 400 naming the field.

The pages, the JSON API, the Hugging Face compatible API and the proxy all import from here
(and the app factory in `app.py` imports them), so imports only go down. Every view reaches the
service layer through `context()`, whose actor is the caller, so events say who did what.
"""

from __future__ import annotations

import hmac
import math
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import g, request, session

from .. import users
from ..config import Config
from ..core import spaces
from ..errors import Forbidden, InvalidInput, Unauthorized
from ..users import ANONYMOUS, Caller

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


def config() -> Config:
    from flask import current_app

    return current_app.extensions["appliance.config"]


# -- who is calling -------------------------------------------------------------------------


def parse_bearer(header: str | None) -> str | None:
    """The token of an "Authorization: Bearer TOKEN" header, however spaced or cased."""
    parts = (header or "").split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1].strip() or None
    return None


def bearer_token() -> str | None:
    return parse_bearer(request.headers.get("Authorization"))


def identify() -> None:
    g.caller = ANONYMOUS
    if request.endpoint == "static":
        return  # the portal's own CSS and script: nobody to identify, no database to open
    store = context().store
    token = bearer_token()
    if token:
        g.caller = users.caller_for_token(store, token)  # a bad token is an error, not anonymous
        return
    if "sid" in session or "user" in session:  # "user": a cookie from before sessions
        found = users.caller_for_session(store, session.get("sid"))
        if found is None:
            session.clear()  # ended or expired: anonymous, and the cookie goes
        else:
            g.caller = found


def caller() -> Caller:
    return g.get("caller", ANONYMOUS)


def client_address() -> str:
    return request.remote_addr or "unknown"


def from_localhost() -> bool:
    # The portal is reached directly (no proxy in front), so remote_addr is the peer.
    return client_address() in ("127.0.0.1", "::1")


def log_in(found: Caller) -> None:
    """Start a new session for a user (ending the one this browser had, if any)."""
    store = context().store
    users.end_session(store, session.get("sid"))
    session.clear()
    session.permanent = True
    session["sid"] = users.start_session(store, found.user, config().session_hours)
    session["csrf"] = secrets.token_urlsafe(24)


def log_out() -> None:
    """End this browser's session on the server and clear its cookie."""
    users.end_session(context().store, session.get("sid"))
    session.clear()


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def check_csrf() -> None:
    """Refuse an unsafe request made with the session cookie unless it carries the token."""
    if request.method not in UNSAFE or bearer_token():
        return
    if request.path.startswith("/api/") and caller().via != "session":
        return  # no login rides on it: the route's guard answers 401 with what to send
    from flask import current_app

    view = current_app.view_functions.get(request.endpoint or "")
    if view is None or request.endpoint == "static" or getattr(view, "csrf_exempt", False):
        return
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    expected = session.get("csrf", "")
    if not expected or not hmac.compare_digest(str(sent), expected):
        raise Forbidden("The form has expired or did not come from this portal (CSRF check "
                        "failed)", hint="reload the page and try again")


def csrf_exempt(view: Callable) -> Callable:
    """Mark a view that checks its own origin (the proxy: the Space's app owns its forms)."""
    view.csrf_exempt = True
    return view


def require(level: str) -> Callable:
    """Guard a view: "read" (anyone who may look), "user" (anyone logged in), "write"
    (member/admin with a login or a write token), "admin"."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def guarded(*args, **kwargs):
            check(level)
            return view(*args, **kwargs)

        guarded.required = level
        return guarded

    return decorate


def check(level: str) -> None:
    who = caller()
    if level == "read":
        if who.user is None and not config().portal_public:
            raise Unauthorized("Log in to see this portal")
        return
    if level == "user":
        if who.user is None:
            raise Unauthorized("Log in to see this page")
        return
    if level == "account":  # a person's own credentials: any role, never a read-only token
        if who.user is None:
            raise Unauthorized("Log in (or send a write token) to manage tokens",
                               hint="send 'Authorization: Bearer TOKEN' with a write token")
        if who.scope != "write":
            raise Forbidden(_refusal(who, "manage tokens"))
        return
    if who.user is None:
        raise Unauthorized("Log in (or send an API token) to do this",
                           hint="appliance tokens create NAME --user USER --scope write")
    if level == "write" and not who.can_write:
        raise Forbidden(_refusal(who, "change Spaces"))
    if level == "admin" and not who.is_admin:
        raise Forbidden(_refusal(who, "do this (admins only)"))


def _refusal(who: Caller, what: str) -> str:
    if who.scope != "write":
        return f"This token is read-only: it cannot {what}"
    return f"{who.user} is a {who.role} and may not {what}"


def may_manage(space_id: str) -> bool:
    """Admins manage every Space; members the ones they added (portal or API)."""
    who = caller()
    if who.is_admin:
        return True
    if not who.can_write:
        return False
    via, _, user = (context().store.get_space(space_id).get("created_by") or "").partition(":")
    return via in ("session", "token") and user == who.user


def check_manage(space_id: str) -> None:
    check("write")
    if not may_manage(space_id):
        raise Forbidden(f"Only an admin or the member who added {space_id} may change it")


def may_see(space: dict[str, Any]) -> bool:
    """Tell whether the caller may see a Space (login-required Spaces need a login)."""
    if space.get("visibility") == "private":
        return caller().user is not None
    return caller().user is not None or config().portal_public


ACCOUNT_EVENTS = ("user:", "token:")


def may_see_event(event: dict[str, Any]) -> bool:
    """Events about users and tokens are for admins; anyone else sees only their own."""
    if not str(event.get("kind") or "").startswith(ACCOUNT_EVENTS):
        return True
    who = caller()
    if who.is_admin:
        return True
    detail = event.get("detail") if isinstance(event.get("detail"), dict) else {}
    acted_as = str(event.get("actor") or "").partition(":")[2]
    return who.user is not None and who.user in (detail.get("user"), acted_as)


def visible_space(space_id: str) -> dict[str, Any]:
    """The public view of a Space the caller may see; 404 (not 403) for the rest."""
    from ..errors import NotFound

    space = spaces.describe(context(), space_id)
    if not may_see(space):
        if caller().user is None:
            raise Unauthorized(f"Log in to see Space {space_id}")
        raise NotFound(f"No Space named {space_id}")
    return space


MAX_TEXT = 64 * 1024  # characters in one JSON text field unless a route says otherwise
MAX_INT = 2**63 - 1  # what SQLite stores
_KINDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}


def field(data: dict[str, Any], name: str, kind: type, default: Any = None, *,
          required: bool = False, nullable: bool = True, low: float | None = None,
          high: float | None = None, max_length: int = MAX_TEXT) -> Any:
    """Read one JSON field as kind (str, int, float or bool); refuse a wrong type, a number
    out of [low, high] or text over max_length with a 400 naming the field."""
    if name not in data or (data[name] is None and nullable):
        if required:
            raise InvalidInput(f"'{name}' is required", hint=f"send it as {_KINDS[kind]}")
        return default
    value = data[name]
    number = kind in (int, float) and isinstance(value, int) and not isinstance(value, bool)
    if not (number or isinstance(value, kind)) or (kind is not bool and isinstance(value, bool)):
        raise InvalidInput(f"'{name}' must be {_KINDS[kind]}, got {shown(value)}",
                           hint=f"send {name} as {_KINDS[kind]}")
    if kind is str and len(value) > max_length:
        raise InvalidInput(f"'{name}' is {len(value)} characters long, over the "
                           f"{max_length}-character limit")
    if kind in (int, float):
        lowest = -MAX_INT if low is None else low
        highest = MAX_INT if high is None else high
        if not (number or math.isfinite(value)) or not lowest <= value <= highest:
            raise InvalidInput(f"'{name}' must be between {_number(lowest)} and "
                               f"{_number(highest)}, got {shown(value)}")
        value = kind(value)
    return value


def query_int(name: str, default: int, low: int, high: int) -> int:
    """Read a whole-number query parameter in [low, high]; refuse anything else with a 400."""
    text = request.args.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 19 \
            or not low <= int(text) <= high:
        raise InvalidInput(f"?{name}= must be a whole number from {low} to {high}, "
                           f"got {shown(text)}")
    return int(text)


def shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def json_body() -> dict[str, Any]:
    """The request's JSON object ({} when there is no body); refuse anything else clearly."""
    data = request.get_json(silent=True)
    if data is None:
        if request.content_length:
            raise InvalidInput("The request body is not JSON",
                               hint="send Content-Type: application/json")
        return {}
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object")
    return data


# -- the service context --------------------------------------------------------------------


def context() -> spaces.Context:
    """The request's service Context (one database handle per request, actor = caller)."""
    if "ctx" not in g:
        from flask import current_app

        factory = current_app.extensions["appliance.context_factory"]
        g.ctx = factory(config(), "portal")
    g.ctx.actor = caller().actor if "caller" in g else "portal"
    return g.ctx


def close_context(_exc: BaseException | None) -> None:
    ctx = g.pop("ctx", None)
    if ctx is not None:
        ctx.store.close()


# -- errors ---------------------------------------------------------------------------------


def wants_json() -> bool:
    return (request.path.startswith("/api/") or bool(bearer_token())
            or request.accept_mimetypes.best == "application/json")


def error_body(status: int, message: str, hint: str | None) -> dict[str, Any]:
    """The API's one error envelope (its "error" string is also what huggingface_hub shows)."""
    return {"ok": False, "error": message, "hint": hint, "status": status}


