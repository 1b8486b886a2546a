"""Spaces whose repository is kept on the box: created by a push or `create_repo`, written by
`git push` or the Hugging Face commit endpoint, deployed like `appliance spaces update`.

Each has one bare repository, <data_dir>/hosted/OWNER/NAME.git, and the source
hosted://OWNER/NAME. A repository never runs a hook of its own: its core.hooksPath is an
empty directory, and git http-backend runs only the appliance's pre-receive step (below),
which keeps pushes to the tracked branch and the tree within max_checkout_mb.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import stages
from ..errors import Conflict, Forbidden, InvalidInput, NotFound, SourceError
from ..gpu import claims
from . import actions, sources, spaces
from .context import Context, space_paths

BRANCH = "main"  # what a hosted Space serves, as on Hugging Face
ZERO = "0" * 40
MAX_PATH = 1024  # characters in a file path of a commit
EMPTY_ERROR = ("No commits yet: push the Space's files (git push to this Space's URL) or "
               "upload them (huggingface_hub's upload_folder)")
# git runs this for every push (as the appliance's, never a repository's, hook): only the
# tracked branch changes, and its files must fit max_checkout_mb before any ref moves (the
# objects are still in git's quarantine). What it prints reaches the pusher as "remote:".
PRE_RECEIVE = r"""#!/bin/sh
# Written by the appliance (core/hosted.py); rewritten at every push.
status=0
while read -r old new ref; do
    if [ "$ref" != "refs/heads/$APPLIANCE_BRANCH" ]; then
        echo "error: $ref refused: this box keeps only the branch $APPLIANCE_BRANCH of" \
             "$APPLIANCE_SPACE (the one the Space serves); push to $APPLIANCE_BRANCH" >&2
        status=1
        continue
    fi
    [ "$new" = "0000000000000000000000000000000000000000" ] && continue
    total=$(git ls-tree -r -l --full-tree "$new" |
            awk '$2 == "blob" { s += $4 } END { printf "%.0f", s }') || exit 1
    if [ "$total" -gt "$APPLIANCE_MAX_TREE_BYTES" ]; then
        largest=$(git ls-tree -r -l --full-tree "$new" | awk '$2 == "blob"' |
                  sort -k4,4nr | head -3 |
                  awk -F '\t' '{ split($1, f, " "); if (f[4] >= 52429) {
                                 printf "%s%s %.1f MiB", sep, $2, f[4] / 1048576;
                                 sep = ", " } }')
        mib=$(awk -v t="$total" 'BEGIN { printf "%.1f", t / 1048576 }')
        echo "error: $APPLIANCE_SPACE: the files of $new add up to $mib MiB, over the" \
             "$APPLIANCE_MAX_CHECKOUT_MB MiB limit (largest: $largest); nothing was changed." \
             "Slim the repository, or ask an admin to raise APPLIANCE_MAX_CHECKOUT_MB" >&2
        status=1
    fi
done
exit $status
"""


def is_hosted(row: dict[str, Any]) -> bool:
    """Tell whether a Space's repository is kept on this box (pushed to)."""
    return str(row.get("source") or "").startswith(sources.HOSTED_SCHEME)


def repo_path(config, space_id: str) -> Path:
    return sources.hosted_repo_path(config, space_id)


def hooks_dir(config, empty: bool = False) -> Path:
    """The appliance's own hooks (the pre-receive step), or the empty directory every hosted
    repository's core.hooksPath names, so that git run there by hand runs nothing."""
    path = config.data_path / ("git-no-hooks" if empty else "git-hooks")
    path.mkdir(parents=True, exist_ok=True)
    if not empty:
        hook = path / "pre-receive"
        if not hook.is_file() or hook.read_text() != PRE_RECEIVE:
            tmp = path / f".pre-receive.{os.getpid()}"
            tmp.write_text(PRE_RECEIVE)
            tmp.chmod(0o755)
            os.replace(tmp, hook)
    return path


def push_settings(config) -> dict[str, str]:
    """The git settings a push runs under (given on the command line, over the repository's):
    the appliance's hooks, no rewriting or deleting the branch unless an admin allows it, the
    pack no larger than max_push_mb, every object checked."""
    force = bool(config.allow_force_push)
    return {
        "core.hooksPath": str(hooks_dir(config)),
        "receive.denyNonFastForwards": "false" if force else "true",
        "receive.denyDeletes": "false" if force else "true",
        "receive.maxInputSize": str(config.max_push_mb * 1024 * 1024),
        "receive.fsckObjects": "true",
        "http.receivepack": "true",
        "http.uploadpack": "true",
        "http.getanyfile": "false",
        "uploadpack.allowAnySHA1InWant": "false",
    }


def push_environment(config, space_id: str) -> dict[str, str]:
    """What the pre-receive step reads."""
    return {"APPLIANCE_BRANCH": BRANCH, "APPLIANCE_SPACE": space_id,
            "APPLIANCE_MAX_TREE_BYTES": str(config.max_checkout_mb * 1024 * 1024),
            "APPLIANCE_MAX_CHECKOUT_MB": str(config.max_checkout_mb)}


def ensure_repo(config, space_id: str) -> Path:
    """The Space's bare repository, made (empty, on main) when missing."""
    path = repo_path(config, space_id)
    if not (path / "HEAD").is_file():
        sources.init_hosted(path, {
            "core.hooksPath": str(hooks_dir(config, empty=True)),
            "receive.denyNonFastForwards": "true", "receive.denyDeletes": "true",
            "receive.fsckObjects": "true",
        })
    return path


# -- creating ---------------------------------------------------------------------------------


def create(ctx: Context, space_id: str, sdk: str | None = None, private: bool = False,
           hardware: str = "cpu") -> dict[str, Any]:
    """Record a new, empty Space hosted on this box (NO_APP_FILE until a commit arrives)."""
    space_id = sources.validate_space_id(space_id)
    spaces.check_owner(ctx, space_id)
    hardware = claims.check_request(ctx, space_id, hardware)
    if sdk is not None and sdk not in ("gradio", "streamlit", "docker", "static"):
        raise InvalidInput(f"Unknown Space SDK {sdk!r}",
                           hint="use gradio, streamlit, docker or static")
    if ctx.store.find_space(space_id):
        raise Conflict(f"A Space named {space_id} already exists",
                       hint="push to it, or pick another name")
    ensure_repo(ctx.config, space_id)
    for _ in range(5):
        port = spaces.allocate_port(ctx)
        try:
            ctx.store.insert_space({
                "id": space_id, "source": f"{sources.HOSTED_SCHEME}{space_id}",
                "source_display": f"{sources.HOSTED_SCHEME}{space_id}",
                "revision_request": None, "stage": stages.NO_APP_FILE, "port": port,
                "hardware": hardware, "desired": "running", "created_by": ctx.actor,
                "sdk": sdk, "error": EMPTY_ERROR,
                "visibility": "private" if private else "public",
            }, ctx.actor)
            break
        except Conflict as exc:
            if "already exists" in exc.message:
                raise
    return spaces.describe(ctx, space_id)


# -- pushing ----------------------------------------------------------------------------------


def check_pushable(ctx: Context, row: dict[str, Any]) -> Path:
    """Refuse a push to a Space that follows a URL; return the hosted repository."""
    if not is_hosted(row):
        raise Forbidden(
            f"Space {row['id']} follows {row['source_display']}; pushing to this box is "
            "refused",
            hint=f"push there, then run 'appliance spaces update {row['id']}' (or let its "
            "update policy track the branch); or push to a new name on this box to host a "
            "Space here")
    return ensure_repo(ctx.config, row["id"])


def head(config, space_id: str) -> str | None:
    """The tracked branch's commit in the Space's repository (None: no commits)."""
    path = repo_path(config, space_id)
    if not (path / "HEAD").is_file():
        return None
    try:
        out = sources.hosted_git(path, "rev-parse", "--verify", "--quiet",
                                 f"refs/heads/{BRANCH}^{{commit}}").strip()
    except SourceError:
        return None
    return out or None


def deploy(ctx: Context, space_id: str, sha: str, page_url: str) -> list[str]:
    """Deploy the branch's new commit as `appliance spaces update` does; say what happened
    in lines for the pusher."""
    follow = (f"follow it at {page_url} or with 'appliance spaces logs {space_id} --build "
              "--follow'")
    try:
        view = actions.perform(ctx, space_id, "update")
    except Conflict as exc:
        return [f"{sha[:12]} is stored, but {space_id} is not deployed now: {exc.message}",
                f"deploy it once that ends: 'appliance spaces update {space_id}'"]
    if view["revision"] == sha and view["stage"] == stages.RUNNING:
        return [f"{space_id} already serves {sha[:12]}"]
    serving = view["revision"]
    keeps = f"; {serving[:12]} keeps serving until it is ready" if serving else ""
    return [f"Building {space_id} at {sha[:12]}{keeps}", follow]


# -- committing (the Hugging Face commit endpoint) ----------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One change of a commit: add (content) or delete a file, or delete a folder."""

    kind: str  # "file", "deletedFile", "deletedFolder"
    path: str
    content: bytes = b""


_BAD_PATH = re.compile(r"[\x00-\x1f\x7f\\]")


def check_path(path: Any) -> str:
    """Refuse a file path git or a checkout could misread: absolute, '..', '.git', control
    characters; return it."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise InvalidInput(f"Invalid file path {str(path)[:80]!r}",
                           hint=f"give a relative path of 1 to {MAX_PATH} characters")
    parts = path.strip("/").split("/")
    if path.startswith("/") or _BAD_PATH.search(path) or any(
            p in ("", ".", "..") or p.lower() == ".git" for p in parts):
        raise InvalidInput(f"Invalid file path {path[:80]!r}",
                           hint="paths are relative, with no '..', '.git', '\\\\' or control "
                           "characters")
    return "/".join(parts)


def decode(value: dict[str, Any]) -> bytes:
    """The content of a "file" line of the commit payload."""
    content = value.get("content")
    encoding = value.get("encoding", "base64")
    if not isinstance(content, str) or encoding != "base64":
        raise InvalidInput(f"File {str(value.get('path'))[:80]!r} has no base64 content",
                           hint='send {"content": BASE64, "encoding": "base64"}')
    try:
        return base64.b64decode(content, validate=True)
    except ValueError:
        raise InvalidInput(f"The content of {str(value.get('path'))[:80]!r} is not valid "
                           "base64") from None


def commit(ctx: Context, space_id: str, operations: Iterable[Operation], summary: str,
           description: str = "", parent: str | None = None, author: str = "appliance"
           ) -> str:
    """Make a commit on the Space's branch from operations (on top of its head); return its
    sha. Refuses a parent that is not the head (someone committed since) and a tree past
    max_checkout_mb, before the branch moves."""
    path = repo_path(ctx.config, space_id)
    before = head(ctx.config, space_id)
    if parent and parent != before:
        raise Conflict(f"The branch {BRANCH} of {space_id} is at "
                       f"{(before or 'no commit')[:12]}, not {parent[:12]}",
                       hint="someone committed since: fetch the new head and commit again")
    display = f"{sources.HOSTED_SCHEME}{space_id}"
    with tempfile.TemporaryDirectory(prefix="appliance-commit-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if before:
            sources.hosted_git(path, "read-tree", before, env=env)
        changed = 0
        for op in operations:
            if op.kind == "file":
                blob = sources.hosted_git(path, "hash-object", "-w", "--stdin",
                                          stdin=op.content).strip()
                sources.hosted_git(path, "update-index", "--add", "--cacheinfo",
                                   f"100644,{blob},{op.path}", env=env)
            else:
                listed = sources.hosted_git(path, "ls-files", "-z", "--", op.path, env=env)
                names = [n for n in listed.split("\0") if n and (
                    n == op.path if op.kind == "deletedFile" else n.startswith(op.path + "/"))]
                if not names:
                    raise NotFound(f"No {'file' if op.kind == 'deletedFile' else 'folder'} "
                                   f"{op.path!r} in {space_id} to delete",
                                   hint="A file with this name doesn't exist")
                removals = "".join(f"0 {ZERO}\t{n}\0" for n in names)  # mode 0: remove
                sources.hosted_git(path, "update-index", "-z", "--index-info",
                                   stdin=removals.encode(), env=env)
            changed += 1
        if not changed:
            raise InvalidInput("The commit changes nothing", hint="send at least one file")
        tree = sources.hosted_git(path, "write-tree", env=env).strip()
    sources.check_hosted_tree(path, tree, ctx.config, display)
    who = {"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": f"{author}@appliance",
           "GIT_COMMITTER_NAME": author, "GIT_COMMITTER_EMAIL": f"{author}@appliance"}
    message = summary.strip() + (f"\n\n{description.strip()}" if description.strip() else "")
    args = ["commit-tree", tree, *(["-p", before] if before else []), "-F", "-"]
    sha = sources.hosted_git(path, *args, stdin=message.encode() + b"\n", env=who).strip()
    try:  # compare-and-swap: a push or commit that came in meanwhile wins, this one is refused
        sources.hosted_git(path, "update-ref", f"refs/heads/{BRANCH}", sha, before or ZERO)
    except SourceError:
        raise Conflict(f"The branch {BRANCH} of {space_id} moved while committing",
                       hint="someone pushed at the same time: commit again") from None
    return sha


def serving_checkout(ctx: Context, row: dict[str, Any]) -> Path | None:
    """The checkout of the revision a Space (from a URL) serves, which its clone URL gives."""
    if not row["revision"]:
        return None
    path = space_paths(ctx, row["id"])[0] / row["revision"]
    return path if (path / ".git").is_dir() else None
