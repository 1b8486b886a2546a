"""Writing Spaces through the Hugging Face API: `HfApi.create_repo(repo_type="space")`,
`upload_folder`, `upload_file` and `create_commit` against the box.

huggingface_hub 2.x first asks `/preupload/{revision}` how each file travels ("regular": in the
commit itself, base64; "lfs": to LFS storage, which this box does not keep), checks a README's
metadata with `/api/validate-yaml`, then posts the commit as NDJSON: a "header" line (summary,
description, parentCommit) and one line per "file", "deletedFile" or "deletedFolder". The
commit lands on the Space's branch main in its repository on the box (core/hosted.py) and is
deployed as a push is.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from flask import Blueprint, Flask, jsonify, request

from ..core import actions, hosted, spaces
from ..core.manifest import parse_manifest
from ..errors import ApplianceError, Conflict, Forbidden, InvalidInput, ManifestError
from . import hf
from .base import caller, check_manage, context, csrf_exempt, field, json_body, require

bp = Blueprint("hf_write", __name__)
SPACE = "/api/spaces/<owner>/<name>"
# Files up to this size travel in the commit itself, as on the Hub (which sends larger ones
# to LFS storage; this box keeps none: those are pushed with git).
REGULAR_MAX_BYTES = 10 * 1024 * 1024
MAX_FILES = 10_000
MAX_YAML = 1024 * 1024
GIT_HINT = ("commit it with git and push it, without git-lfs: git push "
            "http://USER:TOKEN@BOX:8080/spaces/OWNER/NAME main")


class TooLarge(ApplianceError):
    status = 413


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    # Under /api/spaces/ the login cookie is refused outright (hf._tokens_only), as in the
    # rest of the Hugging Face API; /api/repos/create keeps the portal's CSRF check too.
    for endpoint in ("preupload", "commit"):
        csrf_exempt(app.view_functions[f"{bp.name}.{endpoint}"])


# The same refusals and error answers as the rest of the Hugging Face API.
bp.before_request(hf._tokens_only)
bp.register_error_handler(ApplianceError, hf._render_error)


@bp.post("/api/repos/create")
@require("write")
def create_repo():
    """HfApi.create_repo(repo_type="space", space_sdk=...): an empty Space hosted on this box,
    which a git push or upload_folder then fills."""
    data = json_body()
    kind = field(data, "type", str, "model", max_length=20)
    if kind != "space":
        raise InvalidInput(f"This box hosts Spaces only, not {kind} repositories",
                           hint="create_repo(NAME, repo_type='space', space_sdk='gradio')")
    name = field(data, "name", str, required=True, max_length=96)
    owner = field(data, "organization", str, None, max_length=96) or caller().user
    sdk = field(data, "sdk", str, None, max_length=20)
    visibility = field(data, "visibility", str, None, max_length=20)
    private = field(data, "private", bool, None)
    if visibility not in (None, "public", "private"):
        raise InvalidInput(f"Visibility must be public or private, got {visibility!r}")
    if "template" in data:
        raise InvalidInput("Space templates are not kept on this box",
                           hint="create the Space empty, then upload or push its files")
    hardware = "cpu"
    if data.get("hardware") is not None:
        hardware = hf.hardware_request(data["hardware"])
    ctx = context()
    space_id = f"{owner}/{name}"
    try:
        space = hosted.create(ctx, space_id, sdk=sdk, hardware=hardware,
                              private=bool(private) or visibility == "private")
    except Conflict as exc:
        # huggingface_hub's create_repo(exist_ok=True) reads the url from the 409 too.
        response = hf._render_error(exc)
        response.set_data(json.dumps({**json.loads(response.get_data()),
                                      "url": f"{request.host_url}spaces/{space_id}"}))
        return response
    for kind_, items in (("secrets", data.get("secrets")), ("variables", data.get("variables"))):
        for item in items or []:
            if not isinstance(item, dict):
                raise InvalidInput(f"Each of {kind_} must be {{\"key\": NAME, \"value\": TEXT}}")
            spaces.set_value(ctx, kind_, space["id"], *hf._key_value(item))
    if data.get("sleepTimeSeconds") is not None:
        actions.set_sleep_time(ctx, space["id"], hf._sleep_seconds(data["sleepTimeSeconds"]))
    return jsonify({"url": f"{request.host_url}spaces/{space['id']}", "name": space["id"],
                    "id": space["id"]})


@bp.post("/api/validate-yaml")
@require("write")
def validate_yaml():
    """What upload_folder asks before committing a README.md: its front matter as this box
    reads a Space's (errors refuse the commit; warnings are shown)."""
    data = json_body()
    content = field(data, "content", str, required=True, max_length=MAX_YAML)
    if data.get("repoType") not in (None, "space"):
        return jsonify({"errors": [], "warnings": []})
    try:
        manifest = parse_manifest(content)
    except ManifestError as exc:
        message = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return jsonify({"ok": False, "error": message, "errors": [{"message": message}],
                        "warnings": [], "status": 400}), 400
    return jsonify({"errors": [], "warnings": [{"message": w} for w in manifest.warnings]})


@bp.post(f"{SPACE}/preupload/<path:revision>")
@require("write")
def preupload(owner: str, name: str, revision: str):
    """How each file travels: "regular" (in the commit) up to 10 MiB; larger ones are
    refused, naming git push (this box keeps no LFS storage)."""
    space = _committable(owner, name, revision)
    files = json_body().get("files")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise InvalidInput(f"Send the files as JSON {{\"files\": [{{\"path\", \"size\"}}]}}, up "
                           f"to {MAX_FILES} at once")
    answer = []
    for item in files:
        if not isinstance(item, dict):
            raise InvalidInput("Each file must be {\"path\": PATH, \"size\": BYTES}")
        path = hosted.check_path(item.get("path"))
        size = field(item, "size", int, 0, low=0)
        if size > REGULAR_MAX_BYTES:
            raise TooLarge(f"{path} is {size / 2**20:.1f} MiB: this box takes files up to "
                           f"{REGULAR_MAX_BYTES // 2**20} MiB through the Hugging Face API "
                           f"(it keeps no LFS storage), so {space['id']} was not changed",
                           hint=GIT_HINT)
        answer.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                       "oid": None})
    return jsonify({"files": answer, "commitOid": hosted.head(context().config, space["id"])})


@bp.post(f"{SPACE}/commit/<path:revision>")
@require("write")
def commit(owner: str, name: str, revision: str):
    """HfApi.create_commit: the NDJSON payload becomes a commit on main, then deploys."""
    space = _committable(owner, name, revision)
    if request.args.get("create_pr", "").lower() in ("1", "true"):
        raise InvalidInput("Pull requests are not kept on this box",
                           hint="commit to main (create_pr=False)")
    ctx = context()
    limit = ctx.config.max_push_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"The commit is {request.content_length / 2**20:.1f} MiB, over the "
                       f"{ctx.config.max_push_mb} MiB this box accepts",
                       hint="upload fewer files at once, or ask an admin to raise "
                       "APPLIANCE_MAX_PUSH_MB")
    request.max_content_length = limit
    header, operations = _read_payload(request.stream)
    summary = header.get("summary")
    description = header.get("description") or ""
    parent = header.get("parentCommit")
    if not isinstance(summary, str) or not summary.strip() or len(summary) > 4096:
        raise InvalidInput("The commit needs a summary (commit_message) of up to 4096 "
                           "characters", hint=f"got {str(summary)[:60]!r}")
    if not isinstance(description, str) or len(description) > 65536 or (
            parent is not None and not isinstance(parent, str)):
        raise InvalidInput("The commit's description or parentCommit is not text")
    sha = hosted.commit(ctx, space["id"], operations, summary, description, parent,
                        author=caller().user or "appliance")
    hosted.deploy(ctx, space["id"], sha, f"{request.host_url}spaces/{space['id']}")
    return jsonify({"commitUrl": f"{request.host_url}spaces/{space['id']}/commit/{sha}",
                    "commitOid": sha, "pullRequestUrl": None, "success": True})


def _committable(owner: str, name: str, revision: str) -> dict[str, Any]:
    space = hf._space(owner, name)
    check_manage(space["id"])
    row = context().store.get_space(space["id"])
    if not hosted.is_hosted(row):
        raise Forbidden(f"Space {space['id']} follows {row['source_display']}; uploading to "
                        "this box is refused",
                        hint=f"commit there, then run 'appliance spaces update {space['id']}'; "
                        "or create a Space hosted here (create_repo) and upload to it")
    if unquote(revision) != hosted.BRANCH:
        raise InvalidInput(f"This box keeps only the branch {hosted.BRANCH} of {space['id']}, "
                           f"not {unquote(revision)[:100]!r}", hint="upload with revision='main'")
    hosted.ensure_repo(context().config, space["id"])
    return space


def _read_payload(stream) -> tuple[dict[str, Any], list[hosted.Operation]]:
    """Read the NDJSON commit line by line (one file's content at a time in memory)."""
    longest = REGULAR_MAX_BYTES * 4 // 3 + 64 * 1024
    header: dict[str, Any] | None = None
    operations: list[hosted.Operation] = []
    while True:
        line = stream.readline(longest + 1)
        if not line:
            break
        if len(line) > longest:
            raise TooLarge(f"A line of the commit is over {longest // 2**20} MiB: a file over "
                           f"{REGULAR_MAX_BYTES // 2**20} MiB", hint=GIT_HINT)
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise InvalidInput("The commit is not NDJSON (one JSON object a line)",
                               hint="send it as huggingface_hub's create_commit does") from None
        key = item.get("key") if isinstance(item, dict) else None
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            raise InvalidInput(f"A commit line has no object value: {str(item)[:80]}")
        if key == "header":
            header = value
        elif key == "file":
            operations.append(hosted.Operation("file", hosted.check_path(value.get("path")),
                                               hosted.decode(value)))
        elif key in ("deletedFile", "deletedFolder"):
            operations.append(hosted.Operation(key, hosted.check_path(value.get("path"))))
        elif key in ("lfsFile", "copyFile"):
            raise InvalidInput(f"{'LFS files' if key == 'lfsFile' else 'Copies of files'} are "
                               f"not kept on this box: {str(value.get('path'))[:80]!r}",
                               hint=GIT_HINT)
        else:
            raise InvalidInput(f"Unknown commit line {str(key)[:40]!r}",
                               hint="lines are header, file, deletedFile or deletedFolder")
    if header is None:
        raise InvalidInput("The commit has no header line",
                           hint='send {"key": "header", "value": {"summary": ...}} first')
    if len(operations) > MAX_FILES:
        raise InvalidInput(f"The commit has {len(operations)} changes, over {MAX_FILES}")
    return header, operations
