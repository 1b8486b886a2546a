"""The Hugging Face compatible read side of Spaces' repositories: what `HfApi.list_spaces`,
`list_repo_tree`, `list_repo_files`, `hf_hub_download`, `space_info(revision=...)`,
`list_spaces_hardware` and the `hf spaces` / `hf download` commands call.

Files come from `core.repository` (git objects of the revisions this box keeps). Errors carry
the `X-Error-Code` huggingface_hub maps to its own errors (RepoNotFound, RevisionNotFound,
EntryNotFound); what only the Hub can do (semantic search, templates, ZeroGPU, duplicating)
answers 501 with what to do here instead.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Any
from urllib.parse import quote, urlencode

from flask import Blueprint, Flask, Response, jsonify, request

from ..core import repository, spaces
from ..core.repository import Revision
from ..errors import ApplianceError, InvalidInput, NotFound, Unauthorized
from . import hf
from .base import (
    context,
    csrf_exempt,
    may_see,
    query_int,
    require,
    visible_space,
)

bp = Blueprint("hf_repo", __name__)
SPACE = hf.SPACE
PAGE = 1000  # entries per page, as the Hub pages them
EXPANDED_PAGE = 50  # with expand=true, as the Hub pages them (each entry costs more)
TRUE = ("1", "true", "True", "yes")
SORTS = {"lastModified": "updated_at", "createdAt": "created_at", "id": "id"}
NO_SCORES = ("likes", "trendingScore", "downloads")  # the Hub's counters; the box keeps none
EXPANDABLE = ("author", "cardData", "createdAt", "datasets", "disabled", "lastModified",
              "likes", "models", "private", "region", "resourceGroup", "runtime", "sdk", "sha",
              "siblings", "subdomain", "tags", "trendingScore", "usedStorage")
# Served as themselves: images a browser shows but never runs (no SVG: it can hold script).
SHOWN_IMAGES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"}
TEXT_NAMES = {"Dockerfile", "Makefile", "LICENSE", "Procfile", ".gitattributes", ".gitignore",
              ".dockerignore", "requirements.txt", "packages.txt"}
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".sh",
                 ".json", ".js", ".mjs", ".ts", ".css", ".html", ".htm", ".xml", ".csv",
                 ".tsv", ".rst", ".ipynb", ".lock", ".env", ".r", ".rs", ".go", ".c", ".h",
                 ".cpp", ".java", ".svelte", ".vue", ".jsx", ".tsx", ".sql", ".svg"}


class NotOnThisBox(ApplianceError):
    """A Hub service the box does not have (and will not pretend to)."""

    status = 501


def register(app: Flask) -> None:
    # Registered before `hf`, whose rules it must win where a path could match both.
    app.register_blueprint(bp)
    for endpoint, view in app.view_functions.items():
        if endpoint.startswith(f"{bp.name}."):
            csrf_exempt(view)  # token only (the guard below), as in `hf`


bp.before_request(hf._tokens_only)


# -- errors -----------------------------------------------------------------------------------


bp.register_error_handler(ApplianceError, hf._render_error)


# -- listing Spaces ---------------------------------------------------------------------------


@bp.get("/api/spaces")
@require("read")
def list_spaces():
    """HfApi.list_spaces / `hf spaces ls`: the Spaces the caller may see, filtered, sorted and
    paged (Link header) as the Hub does."""
    args = request.args
    expand = _expand()
    full = args.get("full") in TRUE
    if full and expand:
        raise InvalidInput("Give expand or full, not both")
    found = [s for s in spaces.list_spaces(context()) if may_see(s) and _matches(s)]
    key, descending = _order()
    if key:
        found.sort(key=lambda s: (s.get(key) or "", s["id"]), reverse=descending)
    limit = query_int("limit", 0, 0, 1_000_000)
    cursor = query_int("cursor", 0, 0, 1_000_000)
    end = min(len(found), limit) if limit else len(found)
    page = found[cursor:min(cursor + PAGE, end)]
    items = []
    for space in page:
        info = hf._info(space)
        if full or "siblings" in expand:
            info["siblings"] = _siblings_of_serving(space)
        items.append(_expanded(info, expand))
    response = jsonify(items)
    if cursor + len(page) < end:
        response.headers["Link"] = f'<{_next_url(cursor + len(page))}>; rel="next"'
    return response


def _words(name: str) -> list[str]:
    """A list parameter sent repeated (expand=a&expand=b) or comma-separated."""
    return [word.strip() for value in request.args.getlist(name) for word in value.split(",")
            if word.strip()]


def _matches(space: dict[str, Any]) -> bool:
    args = request.args
    manifest = space.get("manifest") or {}
    tags = {space.get("sdk"), *(t for t in manifest.get("tags") or [] if isinstance(t, str))}
    models = [m for m in _listed(manifest.get("models"))]
    datasets = [d for d in _listed(manifest.get("datasets"))]
    search = args.get("search", "").lower()
    checks = [
        "author" not in args or space["id"].split("/", 1)[0] == args["author"],
        not search or search in f"{space['id']} {space.get('title') or ''}".lower(),
        all(tag in tags for tag in _words("filter")),
        all(model in models for model in _words("models")),
        all(dataset in datasets for dataset in _words("datasets")),
        args.get("linked") not in TRUE or bool(models or datasets),
    ]
    return all(checks)


def _listed(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _order() -> tuple[str | None, bool]:
    sort = request.args.get("sort")
    direction = request.args.get("direction", "-1")
    if direction not in ("-1", "1"):
        raise InvalidInput(f"direction must be -1 (descending) or 1 (ascending), got "
                           f"{direction[:40]!r}")
    if sort is None or sort == "":
        return None, False
    if sort in NO_SCORES:
        raise InvalidInput(f"This box keeps no {sort}: Spaces cannot be sorted by it",
                           hint=f"sort by one of: {', '.join(SORTS)}")
    if sort not in SORTS:
        raise InvalidInput(f"Cannot sort Spaces by {sort[:60]!r}",
                           hint=f"sort by one of: {', '.join(SORTS)}")
    return SORTS[sort], direction == "-1"


def _expand() -> list[str]:
    """The properties asked for with expand=..., each one the Hub knows."""
    expand = _words("expand")
    unknown = [word for word in expand if word not in EXPANDABLE]
    if unknown:
        raise InvalidInput(f"Cannot expand {', '.join(map(repr, unknown))}",
                           hint=f"expand any of: {', '.join(EXPANDABLE)}")
    return expand


def _expanded(info: dict[str, Any], expand: list[str]) -> dict[str, Any]:
    if not expand:
        return info
    return {"id": info["id"], **{word: info.get(word) for word in expand}}


def _next_url(cursor: int) -> str:
    query = [(k, v) for k, v in request.args.items(multi=True) if k != "cursor"]
    return f"{request.base_url}?{urlencode([*query, ('cursor', str(cursor))])}"


# -- reading a repository ---------------------------------------------------------------------


def _space(owner: str, name: str) -> dict[str, Any]:
    """The Space, or RepoNotFound: a private one is as missing to a visitor as no Space."""
    space_id = f"{owner}/{name}"
    try:
        return visible_space(space_id)
    except (NotFound, Unauthorized):
        raise hf.SpaceNotFound(
            f"No Space named {space_id[:200]}",
            hint="check the id; a private Space needs a token: HfApi(token=...) or "
            "HF_TOKEN") from None


def _revision(owner: str, name: str, revision: str | None) -> tuple[dict[str, Any], Revision]:
    space = _space(owner, name)
    return space, repository.resolve(context(), space, revision)


@bp.get(SPACE, defaults={"revision": None})
@bp.get(f"{SPACE}/revision/<path:revision>")
@require("read")
def space_info_at(owner: str, name: str, revision: str | None):
    """HfApi.space_info, repo_info (snapshot_download, `hf download`) and `hf spaces info`:
    the Space at a kept revision (the one it serves when none is named), with its files as
    siblings as the Hub lists them, and only the expand=... properties when asked."""
    expand = _expand()
    if revision is None:
        space = hf._space(owner, name)  # a private Space asks a visitor to log in (401)
        info = hf._info(space)
        info["siblings"] = _siblings_of_serving(space)
        return jsonify(_expanded(info, expand))
    space = _space(owner, name)
    info = hf._info(space)
    try:
        rev = repository.resolve(context(), space, revision)
    except repository.CheckoutGone as exc:
        info["sha"] = exc.sha  # the revision is known, its files are not here to list
        return jsonify(_expanded(info, expand))
    info["sha"] = rev.sha
    info["siblings"] = _siblings(rev)
    return jsonify(_expanded(info, expand))


def _siblings(rev: Revision) -> list[dict[str, Any]]:
    found = []
    for item in repository.files(rev):
        sibling: dict[str, Any] = {"rfilename": item.path, "size": item.size,
                                   "blobId": item.oid}
        if item.lfs:
            sibling["lfs"] = {"sha256": item.lfs.sha256, "size": item.lfs.size,
                              "pointerSize": item.lfs.pointer_size}
        found.append(sibling)
    return found


def _siblings_of_serving(space: dict[str, Any]) -> list[dict[str, Any]] | None:
    try:
        return _siblings(repository.resolve(context(), space, None))
    except NotFound:
        return None  # not fetched yet, or its checkout is gone: no file list to give


@bp.get(f"{SPACE}/tree/<revision>", defaults={"path": ""})
@bp.get(f"{SPACE}/tree/<revision>/<path:path>")
@require("read")
def tree(owner: str, name: str, revision: str, path: str):
    """HfApi.list_repo_tree / list_repo_files / `hf spaces ls ID [-R]`: a folder's entries
    (everything below it with recursive=true), paged with a Link header.

    A symbolic link is listed as type "link" (huggingface_hub reads it as a folder-like entry
    and never downloads it); its target is not read.
    """
    _, rev = _revision(owner, name, revision)
    recursive = request.args.get("recursive") in TRUE
    expand = request.args.get("expand") in TRUE
    entries = repository.list_folder(rev, path, recursive)
    size = EXPANDED_PAGE if expand else PAGE
    limit = query_int("limit", size, 1, size)
    cursor = query_int("cursor", 0, 0, len(entries))
    page = entries[cursor:cursor + limit]
    commits = repository.last_commits(rev, [e.path for e in page]) if expand else {}
    response = jsonify([_tree_entry(item, commits.get(item.path)) for item in page])
    if cursor + len(page) < len(entries):
        response.headers["Link"] = f'<{_next_url(cursor + len(page))}>; rel="next"'
    return response


def _tree_entry(item: repository.Entry, last: repository.Commit | None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": item.kind, "oid": item.oid, "size": item.size,
                            "path": item.path}
    if item.lfs:
        data["lfs"] = {"oid": item.lfs.sha256, "size": item.lfs.size,
                       "pointerSize": item.lfs.pointer_size}
    if last:
        data["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
    return data


@bp.get("/spaces/<owner>/<name>/resolve/<revision>/<path:path>")
@require("read")
def resolve(owner: str, name: str, revision: str, path: str):
    """hf_hub_download / `hf download --repo-type space` (HEAD, then GET): a file's bytes with
    the ETag (git blob id, or the LFS sha256), X-Repo-Commit and Content-Length it checks."""
    _, rev = _revision(owner, name, revision)
    item = repository.readable(rev, path)
    return file_response(rev, item, attachment=request.args.get("download") in TRUE)


def file_response(rev: Revision, item: repository.Entry, attachment: bool) -> Response:
    """A file of a Space's repository, never rendered by the browser as the portal's page."""
    headers = {
        "ETag": f'"{repository.etag(rev, item)}"',
        "X-Repo-Commit": rev.sha,
        "Content-Length": str(repository.content_size(rev, item)),
        "Content-Disposition": _disposition(item.name, attachment),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "private, no-cache",
    }
    # Nothing is read for HEAD: werkzeug never iterates the body of an answer to HEAD.
    body = repository.read(rev, item) if request.method != "HEAD" else iter(())
    return Response(body, headers=headers, content_type=safe_content_type(item.name),
                    direct_passthrough=True)


def safe_content_type(name: str) -> str:
    """text/plain for text (HTML and SVG too: shown, never run), a few images as themselves,
    anything else application/octet-stream."""
    suffix = os.path.splitext(name)[1].lower()
    guessed = mimetypes.guess_type(name)[0] or ""
    if name in TEXT_NAMES or suffix in TEXT_SUFFIXES or guessed.startswith("text/"):
        return "text/plain; charset=utf-8"
    if guessed in SHOWN_IMAGES:
        return guessed
    return "application/octet-stream"


def _disposition(name: str, attachment: bool) -> str:
    plain = "".join(ch if ch.isascii() and ch.isprintable() and ch not in '"\\;' else "_"
                    for ch in name) or "file"
    kind = "attachment" if attachment else "inline"
    return f"{kind}; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


# -- hardware ---------------------------------------------------------------------------------


@bp.get("/api/spaces/hardware")
@require("read")
def hardware():
    """HfApi.list_spaces_hardware / `hf spaces hardware`: what this box can give a Space.

    The names are what `hf spaces settings ID --hardware NAME` (request_space_hardware) takes
    here: cpu-basic, gpu, gpu:N, mig:PROFILE, shared:SIZE. Nothing costs money.
    """
    return jsonify(hardware_offers(context()))


def hardware_offers(ctx: spaces.Context) -> list[dict[str, Any]]:
    cfg = ctx.config
    cpus = max(1, min(os.cpu_count() or 1, int(cfg.space_cpus)))
    base = {"cpu": f"{cpus} vCPU", "ram": f"{cfg.space_memory_mb // 1024} GB",
            "unitCostMicroUSD": 0, "unitCostUSD": 0.0, "unitLabel": "minute"}
    offers = [{"name": "cpu-basic", "prettyName": "CPU (this box's 'cpu')", **base,
               "accelerator": None}]
    inventory = ctx.read_inventory()
    if not inventory.available:
        return offers
    gpus = sorted(inventory.gpus, key=lambda gpu: gpu.index)
    whole = [gpu for gpu in gpus if not gpu.mig_enabled and not gpu.jetson]
    for count in range(1, len(whole) + 1):
        model = _model(whole[:count])
        offers.append({
            "name": "gpu" if count == 1 else f"gpu:{count}",
            "prettyName": f"{count} whole GPU{'s' if count > 1 else ''} ({model})", **base,
            "accelerator": _accelerator(model, count, whole[0].memory_total_mib)})
    profiles: dict[str, tuple[str, int | None]] = {}
    for gpu in gpus:
        if gpu.mig_enabled and not gpu.jetson:
            for mig in gpu.mig_devices:
                profile = mig.profile or _mig_profile(mig.memory_total_mib, gpu.memory_total_mib)
                if profile:
                    profiles.setdefault(profile, (_model([gpu]), mig.memory_total_mib))
    for profile, (model, memory) in sorted(profiles.items()):
        offers.append({"name": f"mig:{profile}", "prettyName": f"MIG {profile} on {model}",
                       **base, "accelerator": _accelerator(model, 1, memory)})
    sizes = [(gpu.memory_total_mib or 0) - cfg.gpu_reserve_mib for gpu in gpus]
    if sizes and max(sizes) >= 1024:
        largest = gpus[sizes.index(max(sizes))]
        gib = max(sizes) // 1024
        offers.append({
            "name": f"shared:{gib}g",
            "prettyName": f"Shared GPU memory: any shared:SIZE up to {gib} GiB "
                          f"({_model([largest])})", **base,
            "accelerator": _accelerator(_model([largest]), 1, gib * 1024)})
    return offers


def _model(gpus: list[Any]) -> str:
    names = {gpu.name.removeprefix("NVIDIA ").strip() or "GPU" for gpu in gpus}
    return names.pop() if len(names) == 1 else "mixed GPUs"


def _accelerator(model: str, count: int, memory_mib: int | None) -> dict[str, Any]:
    vram = f"{round(memory_mib / 1024)} GB" if memory_mib else "unknown"
    return {"type": "gpu", "model": model, "quantity": count, "vram": vram,
            "manufacturer": "Nvidia"}


def _mig_profile(memory_mib: int | None, parent_mib: int | None) -> str | None:
    """A MIG device's profile name from its memory (the box matches MIG requests by memory;
    the slice count is estimated from its share of the GPU)."""
    if not memory_mib:
        return None
    # A device's memory sits a little under its nominal size (A100 1g.10gb: 9728 MiB): take
    # the nominal size whose window (allocation's) holds it with the ratio nearest that.
    fits = [nominal for nominal in range(1, 1025)
            if 0.85 * nominal * 1024 <= memory_mib <= 1.02 * nominal * 1024]
    if not fits:
        return None
    nominal = min(fits, key=lambda size: abs(memory_mib / (size * 1024) - 0.97))
    slices = max(1, min(7, round(7 * memory_mib / parent_mib))) if parent_mib else 1
    return f"{slices}g.{nominal}gb"


# -- what only the Hub does -------------------------------------------------------------------


@bp.get("/api/spaces/semantic-search")
def semantic_search():
    """HfApi.search_spaces: the Hub's embedding search; the box has no index to search."""
    raise NotOnThisBox("Semantic search (search by embedding) is a Hugging Face Hub service; "
                       "this box has no search index",
                       hint="search Space ids and titles by a word: hf spaces ls --search WORD")


@bp.get("/api/spaces/templates")
def templates():
    """HfApi.list_space_templates: the Hub's templates; this box makes Spaces from git."""
    raise NotOnThisBox("Space templates live on the Hugging Face Hub; this box does not copy "
                       "them", hint="add a Space from its git repository: appliance spaces add "
                       "SOURCE (or the portal's New Space page)")


@bp.get("/api/spaces/zero-gpu/quota")
def zero_gpu_quota():
    """HfApi.get_zero_gpu_quota: ZeroGPU is the Hub's pool; this box has no quota."""
    raise NotOnThisBox("ZeroGPU is Hugging Face's shared GPU pool; this box has no ZeroGPU "
                       "quota", hint="see what this box can give a Space: hf spaces hardware")


@bp.post(f"{SPACE}/duplicate")
@require("write")
def duplicate(owner: str, name: str):
    """HfApi.duplicate_repo / duplicate_space: a copy made by the Hub."""
    raise NotOnThisBox(f"This box does not duplicate Spaces through the Hub API ({owner}/{name})",
                       hint="add the same source again under a new name: appliance spaces add "
                       "SOURCE --name OWNER/NEW-NAME")


@bp.post(f"{SPACE}/dev-mode")
@require("write")
def dev_mode(owner: str, name: str):
    """HfApi.enable_space_dev_mode / disable_space_dev_mode."""
    raise NotOnThisBox("Dev mode (SSH or VS Code inside the running Space) is a Hugging Face "
                       "feature this box does not have",
                       hint="read the app's log: hf spaces logs ID; push a change to its "
                       "repository and update it")


@bp.route(f"{SPACE}/volumes", methods=["PUT", "DELETE"])
@require("write")
def volumes(owner: str, name: str):
    """HfApi.set_space_volumes / delete_space_volumes: the Hub's mounted buckets and repos."""
    raise NotOnThisBox("Mounting Hub buckets or repositories into a Space is a Hugging Face "
                       "feature this box does not have",
                       hint="each Space keeps its files in its own /data volume here")
