"""The portal's Flask app: the factory, the session cookie, error rendering, the views.

Pages (`pages`), the JSON API (`api`), the Hugging Face compatible API (`hf`), the GPU page
(`gpus`) and the Spaces' proxy (`proxy`) are registered here; they share the request helpers
of `base`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, current_app, jsonify, render_template, request
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException

from ..adapters.runtime import Runtime
from ..adapters.store import Store, open_store
from ..config import Config, load_config
from ..core import spaces
from ..errors import ApplianceError
from . import api, files, githttp, gpus, hf, hf_repo, hf_write, pages, proxy
from .base import caller, check_csrf, close_context, csrf_token, error_body, identify, wants_json


def secret_key(config: Config) -> bytes:
    """Return the key that signs session cookies, made once (0600) in the data dir."""
    path = config.data_path / "portal.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # the first worker to get here wins; the others read its key
        except FileExistsError:
            pass
        tmp.unlink()
        return path.read_bytes()


class PortalSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions; opened at the apps domain, the cookie covers the
    Spaces' hosts too (OWNER--NAME.DOMAIN, for login-required Spaces: the proxy never passes
    it on to an app); opened any other way (an IP address), it stays with the host."""

    def get_cookie_domain(self, app: Flask) -> str | None:
        domain = app.extensions["appliance.config"].portal_apps_domain.strip(".").lower()
        host = request.host.rsplit(":", 1)[0].lower()
        return domain if domain and host == domain else None


def create_app(config: Config | None = None, context_factory: Callable[..., Any] | None = None
               ) -> Flask:
    """Build the portal. context_factory(config, actor) makes the service Context (tests
    hand in one with a fake GPU inventory)."""
    config = config or load_config()
    app = Flask(__name__, template_folder="templates", static_folder="static",
                static_url_path="/static")
    app.config.update(
        SECRET_KEY=secret_key(config),
        SESSION_COOKIE_NAME="appliance_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=config.session_hours),
        MAX_CONTENT_LENGTH=16 << 20,
        SEND_FILE_MAX_AGE_DEFAULT=3600,
    )
    app.json.sort_keys = False
    app.session_interface = PortalSessions()
    app.extensions["appliance.config"] = config
    # The schema is brought up to date once here; a request only opens a connection (running
    # the migration check per request took SQLite's write lock on every page view).
    open_store(config.db_path).close()
    app.extensions["appliance.context_factory"] = context_factory or (
        lambda cfg, actor: spaces.Context(cfg, Store(cfg.db_path), Runtime(cfg), actor))

    app.before_request(identify)
    app.before_request(check_csrf)
    app.teardown_appcontext(close_context)
    app.register_error_handler(ApplianceError, _render_error)
    app.register_error_handler(HTTPException, _render_http_error)
    # Flask logs an unexpected exception (with its traceback) before it calls this.
    app.register_error_handler(500, _render_unexpected_error)
    app.context_processor(lambda: {"caller": caller(), "csrf_token": csrf_token,
                                   "config": config})

    app.after_request(_add_content_security_policy)

    # hf_repo first: see there
    for module in (pages, api, hf_repo, hf, hf_write, githttp, gpus, files, proxy):
        module.register(app)
    return app


# The portal's own pages load nothing from elsewhere; they only frame the Spaces' apps. The
# proxy wraps Flask, so the apps' responses (with their own frame-ancestors) never get this.
PORTAL_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
              "script-src 'self'; frame-src {frames}; frame-ancestors 'self'; "
              "base-uri 'none'; form-action 'self'")
_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


def _add_content_security_policy(response):
    config = current_app.extensions["appliance.config"]
    if config.portal_apps_port and request.environ.get("SERVER_PORT") == str(
            config.portal_apps_port):
        return response  # the apps' origin: the offline files Spaces load, not the portal
    response.headers.setdefault("Content-Security-Policy",
                                PORTAL_CSP.format(frames=_app_frames(request.environ, config)))
    return response


def _app_frames(environ: dict[str, Any], config: Config) -> str:
    """The origins proxy.apps_url gives the Space page's iframe (and nothing else)."""
    if not config.portal_apps_port:
        return "'self'"
    scheme, port = environ.get("wsgi.url_scheme", "http"), config.portal_apps_port
    hostname = proxy._hostname(environ, config)  # exactly the host proxy.apps_url uses
    # A Host header that is not a host name must not write directives into the header.
    frames = [f"{scheme}://{hostname}:{port}"] if _HOST.fullmatch(hostname) else []
    domain = config.portal_apps_domain
    if domain and _HOST.fullmatch(domain):
        frames.append(f"{scheme}://*.{domain}:{port}")
    return " ".join(frames) or "'none'"


def _render_error(exc: ApplianceError):
    if wants_json():
        return jsonify(error_body(exc.status, exc.message, exc.hint)), exc.status
    if exc.status == 401 and request.method == "GET":
        from flask import redirect, url_for

        return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))
    return render_template("error.html", status=exc.status, message=exc.message,
                           hint=exc.hint), exc.status


def _render_http_error(exc: HTTPException):
    status = exc.code or 500
    message = {404: "Not found", 405: "Method not allowed",
               413: "The upload is larger than the portal accepts"}.get(status, exc.name)
    if wants_json():
        return jsonify(error_body(status, message, None)), status
    if not _can_link():
        return exc
    return render_template("error.html", status=status, message=message, hint=None), status


def _can_link() -> bool:
    """Whether the error page can be drawn: an unreadable Host header leaves no URL adapter
    for its links, and then werkzeug's own plain page answers."""
    from flask.globals import request_ctx

    return request_ctx.url_adapter is not None


def _render_unexpected_error(exc: HTTPException):
    """A bug (already logged with its traceback): the API's envelope, or the error page."""
    message = "The portal failed unexpectedly (a bug in the appliance)"
    hint = "the details are in the portal's log ('journalctl -u appliance-portal')"
    if wants_json():
        return jsonify(error_body(500, message, hint)), 500
    if not _can_link():
        return exc
    return render_template("error.html", status=500, message=message, hint=hint), 500


def static_root() -> Path:
    return Path(__file__).parent / "static"
