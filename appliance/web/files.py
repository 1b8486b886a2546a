"""The Space page's Files tab: the serving revision's folders and files, each file shown as
escaped text (with line numbers) or, when it is binary or large, offered as a download.

Everything is read through `core.repository` (git objects, never the working tree); a
download is the same answer the Hugging Face `resolve` endpoint gives, as an attachment.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, render_template, request

from ..core import repository
from ..core.repository import Entry, Revision
from .base import context, may_manage, require, visible_space
from .hf_repo import file_response
from .pages import card

bp = Blueprint("files", __name__)
SHOWN_BYTES = 512 * 1024  # a file is shown up to this much; the rest is a download away
SNIFF_BYTES = 8192  # a NUL byte in the first this many bytes makes a file binary


def register(app: Flask) -> None:
    app.register_blueprint(bp)


def _revision(owner: str, name: str) -> tuple[dict[str, Any], Revision]:
    space = card(visible_space(f"{owner}/{name}"))
    return space, repository.resolve(context(), space, request.args.get("rev") or None)


@bp.get("/spaces/<owner>/<name>/files", defaults={"path": ""})
@bp.get("/spaces/<owner>/<name>/files/<path:path>")
@require("read")
def files_page(owner: str, name: str, path: str):
    """A folder's entries, or one file's text."""
    s, rev = _revision(owner, name)
    path = repository.check_path(path)
    item = repository.entry(rev, path) if path else None
    common = {"s": s, "rev": rev, "path": path, "crumbs": _crumbs(path),
              "can_manage": may_manage(s["id"]), "commit": repository.commit(rev)}
    if item is None or item.kind == "directory":
        entries = sorted(repository.list_folder(rev, path),
                         key=lambda e: (e.kind != "directory", e.name.lower()))
        return render_template("files.html", entries=entries, item=None, **common)
    return render_template("files.html", entries=None, item=item, **common,
                           **_shown(rev, item))


def _shown(rev: Revision, item: Entry) -> dict[str, Any]:
    """What the page says about a file: its lines when it is text, else why not."""
    if item.kind != "file":
        return {"lines": None, "why": {"link": "a symbolic link: listed, never followed",
                                       "submodule": "a git submodule: its files live in "
                                       "another repository"}.get(item.kind, item.kind)}
    data = repository.head(rev, item, SHOWN_BYTES + 1)
    if b"\0" in data[:SNIFF_BYTES]:
        return {"lines": None, "why": "a binary file"}
    truncated = len(data) > SHOWN_BYTES
    text = data[:SHOWN_BYTES].decode("utf-8", "replace")
    return {"lines": text.splitlines(), "why": None, "truncated": truncated}


def _crumbs(path: str) -> list[tuple[str, str]]:
    parts = path.split("/") if path else []
    return [(part, "/".join(parts[:i + 1])) for i, part in enumerate(parts)]


@bp.get("/spaces/<owner>/<name>/download/<path:path>")
@require("read")
def download(owner: str, name: str, path: str):
    """One file as an attachment (text/plain or application/octet-stream, never HTML)."""
    _, rev = _revision(owner, name)
    return file_response(rev, repository.readable(rev, path), attachment=True)
