"""Each Space's git remote: `git clone|push http://BOX:8080/spaces/OWNER/NAME`.

git's own smart-HTTP backend (`git http-backend`, a CGI) does the protocol; this module
decides who may do what, runs it with the request's CGI environment, and streams both bodies
through (a pack is never held in memory). Clients log in as the Hub takes a token: HTTP Basic
with any user name and an API token as the password, or a Bearer token.

Reading (clone, fetch) follows the Space's visibility, as its page does. Pushing needs a write
token of a user who may manage the Space; a push to a name that does not exist creates a Space
hosted on this box (core/hosted.py). After a push that moved the branch, the Space is updated
as by `appliance spaces update`, and what happened is told to the pusher as "remote:" lines
(side-band messages added before the answer's last packet).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, g, request, stream_with_context
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.wsgi import get_input_stream

from .. import users
from ..core import hosted, sources
from ..errors import ApplianceError, Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from .base import caller, check, config, context, csrf_exempt, may_manage, visible_space

bp = Blueprint("githttp", __name__)
REPO = "/spaces/<owner>/<name>"
UPLOAD, RECEIVE = "git-upload-pack", "git-receive-pack"
CHUNK = 64 * 1024
REALM = 'Basic realm="appliance", charset="UTF-8"'
TOKEN_HINT = ("give any user name and an API token as the password: git push "
              "http://USER:TOKEN@BOX:8080/spaces/OWNER/NAME (make one with 'appliance tokens "
              "create NAME --user USER --scope write')")
_PROTOCOL = re.compile(r"[A-Za-z0-9=:._-]{1,100}")
server_log = logging.getLogger("appliance.githttp")


class TooLarge(ApplianceError):
    status = 413


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    # git sends no cookie and no CSRF token; a push needs a token (never the login cookie).
    for endpoint, view in app.view_functions.items():
        if endpoint.startswith(f"{bp.name}."):
            csrf_exempt(view)


def basic_token(header: str | None) -> str | None:
    """The token of an "Authorization: Basic" header: its password (any user name), or the
    user name when the password is empty (a token given as the user)."""
    parts = (header or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(parts[1].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise Unauthorized("The Authorization header is not valid Basic credentials",
                           hint=TOKEN_HINT) from None
    user, _, password = decoded.partition(":")
    return password or user or None


@bp.before_request
def _identify_basic() -> None:
    token = basic_token(request.headers.get("Authorization"))
    if token:
        g.caller = users.caller_for_token(context().store, token)
    if request.method == "POST" and caller().via == "session":
        # git never sends the portal's cookie: a POST riding on it came from a web page.
        raise Forbidden("git's endpoints do not take the portal's login (CSRF protection)",
                        hint=TOKEN_HINT)


@bp.errorhandler(ApplianceError)
def _render_error(exc: ApplianceError):
    """git shows a text/plain answer's lines as "remote: ..."; a 401 asks for credentials."""
    text = exc.message + (f"\n{exc.hint}" if exc.hint else "") + "\n"
    response = Response(text, status=exc.status, mimetype="text/plain")
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = REALM
    return response


# -- the routes -------------------------------------------------------------------------------


@bp.get(f"{REPO}/info/refs")
def info_refs(owner: str, name: str):
    """The refs advertisement that starts a clone, fetch or push."""
    service = request.args.get("service")
    if service not in (UPLOAD, RECEIVE):
        raise Forbidden("This box serves git's smart HTTP protocol only",
                        hint="use git 1.6.6 or newer")
    space_id = _space_id(owner, name)
    row = _pushable(space_id, create=True) if service == RECEIVE else _readable(space_id)
    return _run_backend(row, "/info/refs", service)


@bp.post(f"{REPO}/git-upload-pack")
def upload_pack(owner: str, name: str):
    """The fetch negotiation of a clone or fetch: a read, though git sends it as a POST."""
    return _run_backend(_readable(_space_id(owner, name)), f"/{UPLOAD}", UPLOAD)


@bp.post(f"{REPO}/git-receive-pack")
def receive_pack(owner: str, name: str):
    """The push itself: the ref updates and the pack."""
    return _run_backend(_pushable(_space_id(owner, name), create=False), f"/{RECEIVE}", RECEIVE)


# -- who may do what --------------------------------------------------------------------------


def _space_id(owner: str, name: str) -> str:
    space_id = f"{owner}/{name.removesuffix('.git')}"
    try:
        return sources.validate_space_id(space_id)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc.message}: not a Space's git URL",
                           hint="clone http://BOX:8080/spaces/OWNER/NAME, each part letters, "
                           "digits, '.', '_' or '-'") from None


def _readable(space_id: str) -> dict[str, Any]:
    check("read")
    visible_space(space_id)  # 404 for a Space the caller may not see; 401 asks for a login
    return context().store.get_space(space_id)


def _pushable(space_id: str, create: bool) -> dict[str, Any]:
    who = caller()
    if who.user is None:
        raise Unauthorized(f"Pushing to {space_id} needs an API token", hint=TOKEN_HINT)
    if who.via != "token":
        raise Unauthorized("A push takes an API token, not the portal's login", hint=TOKEN_HINT)
    if who.scope != "write":
        raise Forbidden(f"This token is read-only: it cannot push to {space_id}",
                        hint="make a write token: 'appliance tokens create NAME --user "
                        f"{who.user} --scope write'")
    ctx = context()
    row = ctx.store.find_space(space_id)
    if row is None:
        if not create:
            raise NotFound(f"No Space named {space_id}",
                           hint="push with git, which asks for the refs first and creates it")
        check("write")
        try:
            hosted.create(ctx, space_id)
        except Conflict:
            pass  # created a moment ago by another push: that Space's rules apply
        row = ctx.store.get_space(space_id)
    else:
        visible_space(space_id)
    if not may_manage(space_id):
        raise Forbidden(f"Only an admin or the member who added {space_id} may push to it",
                        hint=f"push to a Space under your own name, e.g. {who.user}/"
                        f"{space_id.split('/')[1]}")
    hosted.check_pushable(ctx, row)
    return row


# -- running git http-backend -----------------------------------------------------------------


def _run_backend(row: dict[str, Any], suffix: str, service: str) -> Response:
    cfg, ctx, who = config(), context(), caller()
    space_id = row["id"]
    owner, name = space_id.split("/")
    if hosted.is_hosted(row):
        repo = hosted.ensure_repo(cfg, space_id)
        root, path_info = repo.parent.parent, f"/{owner}/{name}.git{suffix}"
    else:
        checkout = hosted.serving_checkout(ctx, row)
        if checkout is None:
            raise NotFound(f"Space {space_id} serves no revision yet, so there is nothing to "
                           "clone", hint=f"clone its source, {row['source_display']}")
        repo, root, path_info = checkout / ".git", checkout.parent, f"/{checkout.name}{suffix}"
    env = {
        "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path_info,
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": f"service={service}" if suffix == "/info/refs" else "",
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "REMOTE_USER": who.user or "anonymous", "REMOTE_ADDR": request.remote_addr or "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GIT_COMMITTER_NAME": who.user or "anonymous",
        "GIT_COMMITTER_EMAIL": f"{who.user or 'anonymous'}@appliance",
    }
    protocol = request.headers.get("Git-Protocol", "")
    if _PROTOCOL.fullmatch(protocol):
        env["GIT_PROTOCOL"] = protocol
    encoding = request.headers.get("Content-Encoding", "")
    if encoding in ("gzip", "x-gzip"):
        env["HTTP_CONTENT_ENCODING"] = encoding
    settings = {**hosted.push_settings(cfg), "safe.directory": str(repo)}
    limit = cfg.max_push_mb * 1024 * 1024 + 1024 * 1024  # the pack, and the commands before it
    stream = None
    if request.method == "POST":
        if request.content_length is not None and request.content_length > limit:
            raise TooLarge(f"The push is {request.content_length / 2**20:.1f} MiB, over the "
                           f"{cfg.max_push_mb} MiB this box accepts",
                           hint="push fewer or smaller files, or ask an admin to raise "
                           "APPLIANCE_MAX_PUSH_MB")
        stream = get_input_stream(request.environ, safe_fallback=False,
                                  max_content_length=limit)
    first, sideband, before = b"", False, None
    if service == RECEIVE and request.method == "POST":
        env.update(hosted.push_environment(cfg, space_id))
        before = hosted.head(cfg, space_id)
        if not encoding:
            first = _first_packet(stream)
            sideband = b"side-band" in first.partition(b"\0")[2]
    proc = sources.start_http_backend(env, settings)
    pump = threading.Thread(target=_pump, args=(proc, first, stream), daemon=True,
                            name=f"git-push-{space_id}")
    pump.start()
    errors = threading.Thread(target=_log_stderr, args=(proc, space_id), daemon=True)
    errors.start()
    status, headers = _cgi_headers(proc)
    if status >= 400 or service != RECEIVE or request.method != "POST":
        body = _relay(proc, pump, errors)
    else:
        page = f"{request.host_url}spaces/{space_id}"
        body = _relay_push(proc, pump, errors, sideband, space_id, before, page)
    return Response(stream_with_context(body), status=status, headers=headers,
                    direct_passthrough=True)


def _first_packet(stream) -> bytes:
    """The push's first pkt-line (a ref update and the client's capabilities), read before
    git gets the body, to learn whether the client reads side-band messages."""
    head = stream.read(4)
    try:
        size = int(head, 16) if len(head) == 4 else 0
    except ValueError:
        return head
    return head + (stream.read(size - 4) if size > 4 else b"")


def _pump(proc, first: bytes, stream) -> None:
    """Copy the request body into git; once git stops reading (it refused the push), read the
    rest of the body anyway so the client gets git's answer rather than a broken pipe."""
    sink = proc.stdin
    try:
        if first:
            sink.write(first)
        while stream is not None:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            if sink is not None:
                try:
                    sink.write(chunk)
                except (BrokenPipeError, OSError):
                    sink = None
    except (BrokenPipeError, OSError):
        pass
    except (RequestEntityTooLarge, ClientDisconnected, ValueError) as exc:
        server_log.warning("git push body cut: %s", exc)
        sources.end_process(proc)
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _log_stderr(proc, space_id: str) -> None:
    for line in proc.stderr:
        server_log.info("git http-backend (%s): %s", space_id,
                        line.decode(errors="replace").rstrip()[:500])


def _cgi_headers(proc) -> tuple[int, dict[str, str]]:
    status, headers = 200, {}
    while True:
        line = proc.stdout.readline(8192)
        if not line:
            sources.end_process(proc)
            raise ApplianceError("git http-backend ended without an answer",
                                 hint="the portal's log has git's own words")
        line = line.rstrip(b"\r\n").decode("latin-1")
        if not line:
            return status, headers
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.split()[0]) if value.split() and value.split()[0].isdigit() \
                else 500
        elif key.lower() in ("content-type", "cache-control", "expires", "pragma"):
            headers[key] = value.strip()


def _relay(proc, pump: threading.Thread, errors: threading.Thread) -> Iterator[bytes]:
    try:
        while chunk := proc.stdout.read1(CHUNK):
            yield chunk
    finally:
        _finish(proc, pump, errors)


def _finish(proc, pump: threading.Thread, errors: threading.Thread) -> None:
    if proc.poll() is None:
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - the client went mid-answer: stop git
            sources.end_process(proc)
            proc.wait()
    pump.join(timeout=5)
    errors.join(timeout=5)
    proc.stdout.close()


def _relay_push(proc, pump: threading.Thread, errors: threading.Thread, sideband: bool,
                space_id: str, before: str | None, page: str) -> Iterator[bytes]:
    """Pass git's answer through, holding its last packet (the final flush) back; once git is
    done, deploy a moved branch and put what happened before that flush."""
    held, lines = b"", []
    try:
        while chunk := proc.stdout.read1(CHUNK):
            data = held + chunk
            held, out = data[-4:], data[:-4]
            if out:
                yield out
    finally:
        _finish(proc, pump, errors)
        # Even when the client left mid-answer: the branch moved, so the Space follows it.
        lines = _after_push(space_id, before, page)
    if sideband and held == b"0000":
        for line in lines:
            payload = b"\x02" + line.encode("utf-8", "replace")[:900] + b"\n"
            yield f"{len(payload) + 4:04x}".encode() + payload
    yield held


def _after_push(space_id: str, before: str | None, page: str) -> list[str]:
    cfg, ctx = config(), context()
    after = hosted.head(cfg, space_id)
    if after is None or after == before:
        return []
    try:
        return hosted.deploy(ctx, space_id, after, page)
    except ApplianceError as exc:
        return [f"{after[:12]} is stored, but deploying it failed: {exc.message}",
                *([exc.hint] if exc.hint else [])]
