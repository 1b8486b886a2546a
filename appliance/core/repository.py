"""Read a Space's repository at a revision this box keeps: its tree, a file, the commit.

Each kept revision is a checkout (data/checkouts/SLUG/SHA, a git clone at that commit). All of
it is read from git's objects, never from the working tree: a symbolic link is a blob that
names its target and is never followed, and a path only names entries of the commit's tree,
so no `..` or absolute path reaches the disk. Nothing a caller sends is handed to git: a
revision is matched against names this module knows, a path against the tree git listed, and
git is only given object ids it printed itself. The one exception to "objects only" is a Git
LFS file, whose content `git lfs pull` keeps under .git/lfs/objects by its sha256.

Sources (`sources.py`) runs git to fetch from elsewhere; this module runs it read-only on
checkouts that are already here.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ApplianceError, InvalidInput, NotFound
from .context import Context, space_paths

_GIT = "git"
_TIMEOUT = 60  # seconds for one listing or walk; a checkout is on local disk
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-fA-F]{4,40}")
_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_LFS_POINTER_MAX = 1024  # git-lfs's own limit on a pointer file
_REPO_VARS = {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
              "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_ALTERNATE_OBJECT_DIRECTORIES"}
DEFAULT_NAMES = ("main", "HEAD")  # what huggingface_hub asks for when no revision is given
MAX_PATH = 4096
MAX_REVISION = 255
COMMITS_WALKED = 500  # how far back the last commit of each entry is looked for


class RevisionNotFound(NotFound):
    """The Space has no kept revision by that name or sha."""


class CheckoutGone(RevisionNotFound):
    """The Space names the revision but its checkout is not on disk (pruned, or never kept)."""

    def __init__(self, message: str, hint: str | None = None, sha: str = ""):
        super().__init__(message, hint)
        self.sha = sha


class EntryNotFound(NotFound):
    """The revision has no file (or folder) at that path, or it is not one that is read."""

    def __init__(self, message: str, hint: str | None = None, sha: str | None = None):
        super().__init__(message, hint)
        self.sha = sha


@dataclass(frozen=True)
class Lfs:
    sha256: str
    size: int  # the content's size
    pointer_size: int


@dataclass(frozen=True)
class Entry:
    path: str
    kind: str  # "file", "directory", "link" (a symbolic link, never followed), "submodule"
    oid: str  # git's blob, tree or commit id
    size: int  # bytes of content (an LFS file's real size); 0 for what is not a file
    lfs: Lfs | None = None
    executable: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Commit:
    sha: str
    date: str  # RFC 3339, UTC
    title: str


@dataclass(frozen=True)
class Revision:
    """A kept revision of a Space: the commit and the checkout it is read from."""

    space_id: str
    sha: str
    checkout: Path
    serving: bool


# -- finding the revision ---------------------------------------------------------------------


def kept_shas(ctx: Context, space_id: str) -> list[str]:
    """The commits this box holds a checkout of (newest build first is not known: sorted)."""
    root = space_paths(ctx, space_id)[0]
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(name for name in names
                  if _FULL_SHA.fullmatch(name) and _is_checkout(root / name))


def _is_checkout(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode) and stat.S_ISDIR((path / ".git").lstat().st_mode)
    except OSError:
        return False


def resolve(ctx: Context, space: dict[str, Any], revision: str | None) -> Revision:
    """Name the kept revision `revision` means: main (or HEAD, or the branch the Space follows)
    is the one it serves; a full or short (4+ hex digits) sha is a kept checkout."""
    space_id, serving = space["id"], space.get("revision")
    wanted = revision if revision not in (None, "") else "main"
    followed = space.get("requested_revision") or "main"
    if not isinstance(wanted, str) or len(wanted) > MAX_REVISION or not wanted.isprintable():
        raise _no_revision(ctx, space, wanted)
    if wanted in (*DEFAULT_NAMES, followed):
        if not serving:
            raise RevisionNotFound(f"Space {space_id} has no revision on this box yet",
                                   hint="it has not been fetched: start or rebuild it first")
        sha = serving
    elif _HEX.fullmatch(wanted):
        known = {*kept_shas(ctx, space_id), *([serving] if serving else [])}
        found = [sha for sha in known if sha.startswith(wanted.lower())]
        if len(found) != 1:
            raise _no_revision(ctx, space, wanted, ambiguous=len(found) > 1)
        sha = found[0]
    else:
        raise _no_revision(ctx, space, wanted)
    checkout = space_paths(ctx, space_id)[0] / sha
    if not _is_checkout(checkout):
        raise CheckoutGone(
            f"Revision {sha[:12]} of Space {space_id} is not on this box (its checkout is gone)",
            hint="an update or a factory rebuild fetches it again", sha=sha)
    return Revision(space_id, sha, checkout, sha == serving)


def _no_revision(ctx: Context, space: dict[str, Any], wanted: Any, ambiguous: bool = False
                 ) -> RevisionNotFound:
    shown = wanted if isinstance(wanted, str) and _HEX.fullmatch(wanted) else repr(wanted)
    shown = shown if len(shown) <= 80 else shown[:80] + "…"
    kept = ", ".join(sha[:12] for sha in kept_shas(ctx, space["id"])) or "none"
    names = ", ".join(dict.fromkeys(["main", space.get("requested_revision") or "main"]))
    hint = f"give {names}, or a kept commit sha: {kept}"
    if ambiguous:
        return RevisionNotFound(f"Revision {shown} names more than one kept revision of Space "
                                f"{space['id']}", hint="give more of the sha; " + hint)
    return RevisionNotFound(f"Space {space['id']} serves "
                            f"{space.get('revision') or 'no revision yet'}, not {shown}",
                            hint=hint)


# -- paths ------------------------------------------------------------------------------------


def check_path(text: str) -> str:
    """Return a path inside the repository ("" is its root), or refuse it saying why."""
    if not isinstance(text, str):
        raise InvalidInput("A path in the repository must be text")
    if len(text) > MAX_PATH:
        raise InvalidInput(f"Path is {len(text)} characters long, over the {MAX_PATH} limit")
    shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "…"
    if any(not ch.isprintable() for ch in text) or "\\" in text:
        raise InvalidInput(f"Path {shown} has a control character or a backslash",
                           hint="give the path as it is in the repository, with '/' between "
                           "folders")
    if text.startswith("/"):
        raise InvalidInput(f"Path {shown} is absolute",
                           hint="give it relative to the repository's root, e.g. app.py")
    path = text[:-1] if text.endswith("/") else text
    if path == "":
        return ""
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidInput(f"Path {shown} has an empty, '.' or '..' part",
                           hint="paths stay inside the repository: give e.g. src/app.py")
    return path


# -- the tree ---------------------------------------------------------------------------------


def tree(revision: Revision) -> dict[str, Entry]:
    """Every entry of the revision's tree by path (folders too), in git's order."""
    return _tree(str(revision.checkout), revision.sha)


@lru_cache(maxsize=32)
def _tree(checkout: str, sha: str) -> dict[str, Entry]:
    # A commit's tree never changes, and its checkout is named by its sha: safe to cache.
    out = _git(Path(checkout), "ls-tree", "-r", "-t", "-l", "-z", "--full-tree", sha)
    rows = []
    for record in out.split(b"\0"):
        meta, sep, raw_path = record.partition(b"\t")
        fields = meta.split()
        if not sep or len(fields) != 4:
            continue
        mode, kind, oid, size = (f.decode("ascii", "replace") for f in fields)
        rows.append((raw_path.decode("utf-8", "replace"), mode, kind, oid, size))
    small = [oid for _, mode, kind, oid, size in rows
             if kind == "blob" and mode != "120000" and size.isdigit()
             and int(size) < _LFS_POINTER_MAX]
    pointers = _lfs_pointers(Path(checkout), small)
    entries: dict[str, Entry] = {}
    for path, mode, kind, oid, size in rows:
        if kind == "tree":
            entries[path] = Entry(path, "directory", oid, 0)
        elif kind == "commit":
            entries[path] = Entry(path, "submodule", oid, 0)
        elif mode == "120000":
            entries[path] = Entry(path, "link", oid, 0)
        else:
            blob_size = int(size) if size.isdigit() else 0
            lfs = pointers.get(oid)
            entries[path] = Entry(path, "file", oid, lfs.size if lfs else blob_size, lfs,
                                  mode == "100755")
    return entries


def _lfs_pointers(checkout: Path, oids: list[str]) -> dict[str, Lfs]:
    """Read the small blobs at once; return the ones that are Git LFS pointers."""
    if not oids:
        return {}
    out = _git(checkout, "cat-file", "--batch", stdin=("\n".join(oids) + "\n").encode())
    found, at = {}, 0
    while at < len(out):
        end = out.index(b"\n", at)
        header = out[at:end].split()
        if len(header) != 3 or not header[2].isdigit():
            break  # "<oid> missing": the rest cannot be framed
        size = int(header[2])
        data = out[end + 1:end + 1 + size]
        at = end + 1 + size + 1
        if data.startswith(_LFS_MAGIC):
            oid = re.search(rb"^oid sha256:([0-9a-f]{64})$", data, re.MULTILINE)
            length = re.search(rb"^size (\d+)$", data, re.MULTILINE)
            if oid and length:
                found[header[0].decode()] = Lfs(oid[1].decode(), int(length[1]), size)
    return found


def entry(revision: Revision, path: str) -> Entry:
    """The entry at path, or EntryNotFound."""
    path = check_path(path)
    found = tree(revision).get(path)
    if found is None:
        raise EntryNotFound(f"No file or folder {path!r} in {revision.space_id} at "
                            f"{revision.sha[:12]}", hint="list the files: hf spaces ls "
                            f"{revision.space_id} -R", sha=revision.sha)
    return found


def list_folder(revision: Revision, path: str = "", recursive: bool = False) -> list[Entry]:
    """The entries under a folder ("" is the root): its children, or everything below."""
    path = check_path(path)
    if path and entry(revision, path).kind != "directory":
        raise EntryNotFound(f"{path!r} is not a folder in {revision.space_id} at "
                            f"{revision.sha[:12]}", hint="read it as a file instead",
                            sha=revision.sha)
    prefix = f"{path}/" if path else ""
    found = []
    for name, item in tree(revision).items():
        if not name.startswith(prefix):
            continue
        if recursive or "/" not in name[len(prefix):]:
            found.append(item)
    return found


def files(revision: Revision) -> list[Entry]:
    """The regular files of the revision (what a download of it gets: no links, no folders)."""
    return [item for item in tree(revision).values() if item.kind == "file"]


# -- reading a file ---------------------------------------------------------------------------


def readable(revision: Revision, path: str) -> Entry:
    """The file at path, refusing what is not a regular file with why."""
    found = entry(revision, path)
    if found.kind == "file":
        return found
    why = {"directory": "is a folder: list it instead",
           "link": "is a symbolic link: this box lists links but never follows them",
           "submodule": "is a git submodule: its files live in another repository"}[found.kind]
    raise EntryNotFound(f"{found.path!r} {why}", sha=revision.sha)


def lfs_object(revision: Revision, item: Entry) -> Path | None:
    """Where git-lfs keeps an LFS file's content in the checkout, when it is there."""
    if item.lfs is None or not _OID.fullmatch(item.lfs.sha256):
        return None
    oid = item.lfs.sha256
    path = revision.checkout / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    try:
        info = path.lstat()
    except OSError:
        return None
    return path if stat.S_ISREG(info.st_mode) and info.st_size == item.size else None


def content_size(revision: Revision, item: Entry) -> int:
    """The bytes a read of the file gives: the LFS content when here, else the blob."""
    if item.lfs is not None and lfs_object(revision, item) is None:
        return item.lfs.pointer_size
    return item.size


def etag(revision: Revision, item: Entry) -> str:
    """The file's ETag as the Hub gives it: the LFS sha256, or git's blob id."""
    if item.lfs is not None and lfs_object(revision, item) is not None:
        return item.lfs.sha256
    return item.oid


def read(revision: Revision, item: Entry, chunk: int = 1 << 16) -> Iterator[bytes]:
    """Yield a file's content (an LFS file's real content when the box has it)."""
    if item.kind != "file" or not _OID.fullmatch(item.oid):
        raise EntryNotFound(f"{item.path!r} is not a file", sha=revision.sha)
    stored = lfs_object(revision, item)
    if stored is not None:
        return _read_file(stored, chunk)
    return _read_blob(revision.checkout, item.oid, chunk)


def head(revision: Revision, item: Entry, limit: int) -> bytes:
    """The first `limit` bytes of a file (for showing it)."""
    taken, size = [], 0
    stream = read(revision, item)
    try:
        for piece in stream:
            taken.append(piece)
            size += len(piece)
            if size >= limit:
                break
    finally:
        stream.close()
    return b"".join(taken)[:limit]


def _read_file(path: Path, chunk: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        while piece := handle.read(chunk):
            yield piece


def _read_blob(checkout: Path, oid: str, chunk: int) -> Iterator[bytes]:
    proc = subprocess.Popen([_GIT, *_git_options(checkout), "cat-file", "blob", oid],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=_env())
    try:
        while piece := proc.stdout.read(chunk):
            yield piece
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()  # the reader left early (a closed download): git stops too
        proc.wait()


# -- commits ----------------------------------------------------------------------------------


def commit(revision: Revision) -> Commit:
    """The revision's commit: its sha, date and title."""
    return _commit(str(revision.checkout), revision.sha)


@lru_cache(maxsize=64)
def _commit(checkout: str, sha: str) -> Commit:
    out = _git(Path(checkout), "show", "-s", "--format=%H%x00%ct%x00%s", sha)
    found, stamp, title = (out.decode("utf-8", "replace").strip("\n").split("\0") + ["", ""])[:3]
    return Commit(found or sha, _rfc3339(stamp), title)


def last_commits(revision: Revision, paths: list[str]) -> dict[str, Commit]:
    """The newest commit the checkout holds that touched each path (a folder: anything below).

    Checkouts are mostly shallow: there the revision's own commit is the only one known.
    """
    wanted = set(paths)
    out = _git(revision.checkout, "-c", "core.quotePath=false", "log",
               f"-n{COMMITS_WALKED}", "--format=%x01%H%x00%ct%x00%s", "--name-only",
               revision.sha)
    found: dict[str, Commit] = {}
    for block in out.decode("utf-8", "replace").split("\x01")[1:]:
        head_line, _, names = block.partition("\n")
        sha, stamp, title = (head_line.split("\0") + ["", ""])[:3]
        made = Commit(sha, _rfc3339(stamp), title)
        for name in names.splitlines():
            parts = name.split("/")
            for end in range(1, len(parts) + 1):
                path = "/".join(parts[:end])
                if path in wanted and path not in found:
                    found[path] = made
        if len(found) == len(wanted):
            break
    return found


def _rfc3339(stamp: str) -> str:
    try:
        moment = datetime.fromtimestamp(int(stamp), UTC)
    except ValueError:
        return ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


# -- git --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _REPO_VARS}
    env.update(LC_ALL="C", GIT_CONFIG_NOSYSTEM="1", GIT_NO_REPLACE_OBJECTS="1",
               GIT_TERMINAL_PROMPT="0")
    return env


def _git_options(checkout: Path) -> list[str]:
    return ["-c", f"safe.directory={checkout}", "-C", str(checkout)]


def _git(checkout: Path, *args: str, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run([_GIT, *_git_options(checkout), *args], input=stdin,
                              capture_output=True, env=_env(), timeout=_TIMEOUT,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApplianceError(f"Cannot read the checkout {checkout.name[:12]}: {exc}",
                             hint="see 'appliance doctor'") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise ApplianceError(f"Cannot read the checkout {checkout.name[:12]} "
                             f"(git {args[0]}: {said[0][:200]})",
                             hint="the checkout may be damaged: a factory rebuild fetches it "
                             "again")
    return done.stdout
