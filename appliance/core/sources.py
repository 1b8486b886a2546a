"""Vet where a Space's repository comes from and fetch it: the one module that runs git."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ApplianceError, InvalidInput, SourceError

_GIT = "git"  # the binary; tests point it at stand-in scripts
# git's own words about a remote that failed go here (the worker's and the portal's log), not
# to the member: "connection refused" against "timed out" against "not found" would map the
# box's network for whoever can type a URL.
server_log = logging.getLogger("appliance.sources")
_ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_VERIFY = ("rev-parse", "--verify", "--quiet")  # the revision was vetted: no leading "-"
_FULL_SHA = re.compile(r"[0-9a-fA-F]{40}")
_SHORT_SHA = re.compile(r"[0-9a-fA-F]{4,39}")
# Every pattern here sees user input, so none may backtrack (issue 11: one quadratic search
# froze the portal): each is anchored (match/fullmatch) or a set of fixed-length
# alternatives, and a run is possessive (*+) where the character after it cannot be in it.
_HOST = re.compile(r"[A-Za-z0-9](?:[.-]*+[A-Za-z0-9])*+")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*+")
_SCP = re.compile(
    r"(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*+)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*+)"
    r":(?P<path>[^-].*+)"
)
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*+)://")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*+):")
_HELPER = re.compile(r"[A-Za-z0-9][A-Za-z0-9+.-]*+::")
_SCHEME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+.-"
# Roughly `git check-ref-format`: what git could read as an option, a range or a reflog.
_BAD_REV = re.compile(r"^[-/.]|[/.]$|^@$|\.\.|@\{|//|/\.|\.lock(?:/|$)|[\s~^:?*\[\\\x00-\x1f\x7f]")
# Lengths are checked before any pattern runs. A source fits a path (PATH_MAX) or any URL a
# git host hands out; a revision is git's own limit on a ref name's component.
MAX_SOURCE_LENGTH = 4096
MAX_REVISION_LENGTH = 255
MAX_SPACE_ID_LENGTH = 96 + 1 + 96
# The source of a Space whose repository is kept on this box (pushed to, or written by the
# Hugging Face commit endpoint): <data_dir>/hosted/OWNER/NAME.git.
HOSTED_SCHEME = "hosted://"
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_HF_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
# Variables that would point git at some other repository than the one it is cloning.
_REPO_VARS = set(
    "GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_COMMON_DIR GIT_NAMESPACE"
    " GIT_ALTERNATE_OBJECT_DIRECTORIES".split()
)
_FORMS = (
    "give hf://spaces/owner/name, an https:// or ssh git URL (git@host:owner/name.git), "
    "or a local path such as /srv/spaces/name"
)
_HF_HINT = (
    "Space sources look like hf://spaces/owner/name or https://huggingface.co/spaces/owner/name"
)
# How git failures read on stderr (first match wins), and what the user is told.
_FAILURES = {  # kind: (pattern, headline naming the source, hint)
    "unreachable": (
        r"could not resolve host|name or service not known|temporary failure in name resolution"
        r"|failed to connect|connection refused|connection timed out|network is unreachable"
        r"|no route to host",
        "Cannot reach the server of {display}",
        "no network? use an offline bundle or a local mirror (APPLIANCE_LOCAL_SOURCES)",
    ),
    "tls": (
        r"ssl certificate problem|server certificate verification failed",
        "TLS certificate of {display} is not trusted",
        "install its CA on this machine or set GIT_SSL_CAINFO",
    ),
    "revision": (
        r"remote branch \S+ not found|couldn't find remote ref|not our ref|unadvertised object"
        r"|unknown revision|did not match any|needed a single rev|reference is not a tree",
        "Revision {revision!r} not found in {display}",
        "give a branch, tag or commit sha that exists there",
    ),
    "auth": (
        r"repository not found|authentication failed|could not read username|prompts disabled"
        r"|permission denied|\b40[13]\b|not found|does not appear to be a git repository",
        "Repository {display} was not found or needs credentials",
        "check the URL; for a private repository put a token in the URL "
        "(https://USER:TOKEN@host/owner/name) or use an ssh URL with a key the service user holds",
    ),
    "ownership": (
        r"dubious ownership",
        "git refuses {display}: it belongs to another user",
        "run 'git config --global --add safe.directory PATH' as the service user",
    ),
    "other": (
        "",
        "git failed to fetch {display}",
        "check the source and revision; see the build log",
    ),
}


@dataclass(frozen=True)
class Source:
    """Where a Space's repository comes from, vetted and ready to hand to git."""

    kind: str  # "git", "local" or "hosted" (a repository kept on this box, pushed to)
    url: str  # what git is given; may carry credentials
    display: str  # safe to show: no credentials
    default_id: str  # "owner/name" proposed for the Space


def validate_space_id(space_id: str) -> str:
    """Check that a Space id is 'owner/name' in the allowed characters; return it."""
    if isinstance(space_id, str) and len(space_id) > MAX_SPACE_ID_LENGTH:
        raise InvalidInput(
            f"Invalid Space id: {len(space_id)} characters long, over the "
            f"{MAX_SPACE_ID_LENGTH}-character limit",
            hint="use owner/name, each up to 96 letters, digits, '.', '_' or '-'",
        )
    parts = space_id.split("/") if isinstance(space_id, str) else []
    if len(parts) != 2 or ".." in space_id or not all(_ID_PART.fullmatch(p) for p in parts):
        raise InvalidInput(
            f"Invalid Space id {space_id!r}",
            hint="use owner/name, each up to 96 letters, digits, '.', '_' or '-'",
        )
    return space_id


def validate_revision(revision: str | None) -> str | None:
    """Refuse a branch, tag or commit name git could misread; return it (None for none)."""
    if revision is None or revision == "":
        return None
    if isinstance(revision, str) and len(revision) > MAX_REVISION_LENGTH:
        raise InvalidInput(
            f"Invalid revision: {len(revision)} characters long, over the "
            f"{MAX_REVISION_LENGTH}-character limit",
            hint="give a branch, tag or commit sha",
        )
    if not isinstance(revision, str) or _BAD_REV.search(revision):
        raise InvalidInput(
            f"Invalid revision {revision!r}",
            hint="give a branch, tag or commit sha: no spaces, '..', ':', '~', '^', '@{' "
            "or leading '-'",
        )
    return revision


def parse_source(text: str, config) -> Source:
    """Vet a user-typed Space source and say how git should fetch it."""
    source = _parse_source(text, config)
    check_host(source, config)
    return source


def _parse_source(text: str, config) -> Source:
    if not isinstance(text, str | None):
        raise InvalidInput(f"A Space source must be text, got {type(text).__name__}", hint=_FORMS)
    if text and len(text) > MAX_SOURCE_LENGTH:
        raise InvalidInput(
            f"Source is {len(text)} characters long, over the {MAX_SOURCE_LENGTH}-character "
            "limit",
            hint=_FORMS,
        )
    text = (text or "").strip()
    shown = _redact(text)
    if not text:
        raise SourceError("A Space source is required", hint=_FORMS)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise SourceError(f"Source {shown!r} contains control characters", hint=_FORMS)
    if text.startswith("-"):
        raise SourceError(
            f"Source {shown!r} starts with '-', which git would read as an option", hint=_FORMS
        )
    if text.startswith(HOSTED_SCHEME):
        return _hosted_source(text[len(HOSTED_SCHEME):], shown, config)
    if _HELPER.match(text):
        raise SourceError(
            f"Remote-helper sources ({text.split('::', 1)[0]}::...) are refused: {shown!r}",
            hint=_FORMS,
        )
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return _local_source(text, config)
    if text.lower().startswith("file://"):
        return _local_source(_file_url_path(text), config)
    if any(c.isspace() for c in text):
        raise SourceError(f"Source URL {shown!r} contains whitespace", hint=_FORMS)
    scheme = _URL_SCHEME.match(text)
    if scheme:
        name = scheme.group(1).lower()
        if name not in ("hf", "https", "http", "ssh", "git"):
            raise SourceError(f"Unsupported URL scheme {name}:// in {shown!r}", hint=_FORMS)
        if name == "hf":
            if not text[5:].startswith("spaces/"):
                raise SourceError(f"Not a Hugging Face Space: {shown!r}", hint=_HF_HINT)
            return _hf_source(text[12:], "hf://", "", shown, config)
        return _url_source(name + text[len(name) :], name, shown, config)
    scp = _SCP.fullmatch(text)
    if scp and (scp["user"] or "." in scp["host"]) and _HOST.fullmatch(scp["host"]):
        segments = [s for s in scp["path"].split("/") if s]
        return Source("git", text, text, _default_id(segments, scp["host"]))
    scheme = _SCHEME.match(text)
    if scheme:
        raise SourceError(f"Unsupported URL scheme {scheme.group(1)}: in {shown!r}", hint=_FORMS)
    raise SourceError(f"Not a Space source: {shown!r}", hint=_FORMS)


def source_host(source: Source) -> str:
    """The host git contacts for a remote source (lower case; "" for a local one)."""
    if source.kind != "git":
        return ""
    if _URL_SCHEME.match(source.url):
        try:
            return (urlsplit(source.url).hostname or "").rstrip(".").lower()
        except ValueError:
            return ""
    scp = _SCP.fullmatch(source.url)
    return scp["host"].rstrip(".").lower() if scp else ""


def allowed_hosts(config) -> list[str]:
    """The source_hosts setting as a list of patterns (empty: any host)."""
    return [p.strip().rstrip(".").lower() for p in (config.source_hosts or "").split(",")
            if p.strip()]


def _host_allowed(host: str, patterns: list[str]) -> bool:
    # Exact names, or "*.example.com" for any name under example.com: no fnmatch, whose
    # [ranges] and ? would let a typo allow more than meant.
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


def check_host(source: Source, config) -> None:
    """Refuse a remote source whose host is not in the admin's source_hosts (before git runs)."""
    patterns = allowed_hosts(config)
    if source.kind != "git" or not patterns:
        return
    host = source_host(source)
    if not host or not _host_allowed(host, patterns):
        raise SourceError(
            f"Source {source.display} is on host {host or '(none)'!s}, which is not among the "
            f"hosts this box fetches Spaces from: {', '.join(patterns)}",
            hint="use a repository on one of those hosts, or ask an admin to add its host "
            "to APPLIANCE_SOURCE_HOSTS",
        )


def is_imported(path_text: str, config) -> bool:
    """Tell whether a recorded source is the appliance's own copy of a Space imported from an
    offline bundle (only a bundle import records one there)."""
    if not isinstance(path_text, str) or not path_text.startswith("/"):
        return False
    try:
        return Path(path_text).resolve().is_relative_to(config.imported_repos_path)
    except (OSError, RuntimeError, ValueError):
        return False


def _hf_source(path: str, prefix: str, userinfo: str, shown: str, config) -> Source:
    space = path.strip("/").removesuffix("/tree/main").removesuffix(".git")
    try:
        validate_space_id(space)
    except InvalidInput:
        raise SourceError(f"Not a Hugging Face Space: {shown!r}", hint=_HF_HINT) from None
    endpoint = config.hf_endpoint.rstrip("/")
    if userinfo:  # a token for a private Space travels to the configured endpoint
        parts = urlsplit(endpoint)
        endpoint = f"{parts.scheme}://{userinfo}@{parts.netloc}{parts.path}"
    return Source("git", f"{endpoint}/spaces/{space}", f"{prefix}spaces/{space}", space)


def _url_source(text: str, scheme: str, shown: str, config) -> Source:
    try:
        parts = urlsplit(text)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        raise SourceError(f"Malformed URL {shown!r}", hint=_FORMS) from None
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise SourceError(
            f"Source URL {shown!r} has a ?query or #fragment, which git cannot use",
            hint="give the repository's clone URL",
        )
    if not (_HOST.fullmatch(host) or ":" in host and re.fullmatch(r"[0-9a-f:.]+", host)):
        raise SourceError(f"Source URL {shown!r} has no valid host name", hint=_FORMS)
    hostport = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    if scheme in ("https", "http") and host in _HF_HOSTS | {urlsplit(config.hf_endpoint).hostname}:
        if not parts.path.startswith("/spaces/"):
            raise SourceError(
                f"{shown!r} is a Hugging Face model or dataset, not a Space", hint=_HF_HINT
            )
        userinfo = parts.netloc.rpartition("@")[0]
        return _hf_source(parts.path[8:], f"{scheme}://{hostport}/", userinfo, shown, config)
    user = ""
    if scheme == "ssh" and parts.username:  # an ssh user is an account name, not a secret
        if not _USER.fullmatch(parts.username):
            raise SourceError(f"Source URL {shown!r} has an invalid user name", hint=_FORMS)
        user = parts.username + "@"
    segments = [s for s in parts.path.split("/") if s]
    if not segments:
        raise SourceError(f"Source URL {shown!r} names no repository", hint=_FORMS)
    display = f"{scheme}://{user}{hostport}{parts.path}"
    return Source("git", text, display, _default_id(segments, host))


def hosted_repo_path(config, space_id: str) -> Path:
    """Where the box keeps the bare repository of a Space pushed to it (hosted://OWNER/NAME)."""
    owner, name = validate_space_id(space_id).split("/")
    return config.data_path / "hosted" / owner / f"{name}.git"


def _hosted_source(space_id: str, shown: str, config) -> Source:
    try:
        path = hosted_repo_path(config, space_id)
    except InvalidInput:
        raise SourceError(f"Not a Space hosted on this box: {shown!r}",
                          hint="hosted sources look like hosted://owner/name") from None
    return Source("hosted", str(path), f"{HOSTED_SCHEME}{space_id}", space_id)


def _file_url_path(text: str) -> str:
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise SourceError(f"Unsupported file URL {text!r}", hint="use file:///absolute/path")
    return unquote(parts.path)


def _local_source(path_text: str, config) -> Source:
    resolved = _vet_local(path_text, config)
    name = _id_part(resolved.name.removesuffix(".git"))
    return Source("local", str(resolved), str(resolved), f"local/{name}")


def _vet_local(path_text: str, config) -> Path:
    """Resolve a local source and check it is a git repository inside an allowed root."""
    path = os.path.expanduser(path_text)
    roots = config.local_source_roots
    imported = config.imported_repos_path  # the appliance's own copies of bundled Spaces
    if Path(path).resolve().is_relative_to(imported):
        roots = [*roots, imported]
    if not roots:
        raise SourceError(
            f"Local paths are not allowed as Space sources: {path}",
            hint="allow a directory with APPLIANCE_LOCAL_SOURCES=/path/to/dir",
        )
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        where = f" (resolves to {resolved})" if str(resolved) != path else ""
        raise SourceError(
            f"Local source {path}{where} is outside the allowed directories "
            f"{':'.join(map(str, roots))}",
            hint="move it under one of them, or add its directory to APPLIANCE_LOCAL_SOURCES",
        )
    if not resolved.is_dir():
        raise SourceError(f"Local source {resolved} is not a directory", hint=_FORMS)
    bare = (resolved / "HEAD").is_file() and (resolved / "objects").is_dir()
    dot_git = resolved / ".git"
    if not (dot_git.exists() or dot_git.is_symlink()) and not bare:
        raise SourceError(
            f"Local source {resolved} is not a git repository",
            hint="run 'git init' there and commit the Space's files",
        )
    if not bare and (dot_git.is_symlink() or not dot_git.is_dir()):
        raise SourceError(
            f"Local source {resolved} keeps its repository elsewhere (.git is a file or a "
            "link, as in a worktree or a submodule)",
            hint=f"clone it into an allowed directory: git clone --no-local {resolved} DEST",
        )
    _vet_followed(resolved if bare else dot_git, resolved, roots)
    return resolved


def _vet_followed(git_dir: Path, shown: Path, roots: list[Path]) -> None:
    """Refuse a repository whose objects git would read from outside the allowed roots: a
    linked objects folder, a worktree's commondir, or objects/info/alternates."""
    followed = [("its objects folder", git_dir / "objects")]
    for name, base in (("commondir", git_dir), ("objects/info/alternates", git_dir / "objects")):
        path = git_dir / name
        if name == "objects/info/alternates":
            path = git_dir / "objects" / "info" / "alternates"
        if path.is_symlink() or path.exists():
            try:
                lines = path.read_text(errors="replace").splitlines()[:100]
            except OSError:
                lines = []
            followed += [(name, base / line.strip()) for line in lines
                         if line.strip() and not line.startswith("#")]
    for what, target in followed:
        real = target.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise SourceError(
                f"Local source {shown} reads git objects from {real} ({what}), outside the "
                "allowed directories",
                hint=f"make it self-contained: git -C {shown} repack -a -d, then remove "
                "objects/info/alternates (or clone it with --no-local)",
            )


def _id_part(text: str) -> str:
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", text))
    return cleaned.lstrip("._-")[:96] or "space"


def _default_id(segments: list[str], host: str) -> str:
    name = segments[-1].removesuffix(".git")
    owner = segments[-2] if len(segments) > 1 else host
    return f"{_id_part(owner)}/{_id_part(name)}"


def _redact(text: str) -> str:
    """Drop the user:password@ after each scheme:// (up to the first '/' or whitespace).

    Plain string scans rather than a regex search: a search for the scheme restarts at every
    letter of a long run without '://', which is quadratic (issue 11)."""
    pieces = text.split("://")
    for i in range(1, len(pieces)):
        before = pieces[i - 1]
        run = before[len(before.rstrip(_SCHEME_CHARS)) :]
        if not any(c.isalpha() for c in run):  # a scheme starts with a letter
            continue
        piece = pieces[i]
        end = next((j for j, c in enumerate(piece) if c == "/" or c.isspace()), len(piece))
        at = piece.rfind("@", 0, end)
        if at >= 0:
            pieces[i] = piece[at + 1 :]
    return "://".join(pieces)


class _GitFailed(Exception):
    def __init__(self, op: str, lines: list[str], timed_out: bool = False):
        super().__init__(op)
        self.op, self.lines, self.timed_out = op, lines, timed_out

    def tail(self) -> str:
        said = [line for line in self.lines if not line.lower().startswith("hint:")]
        return " / ".join(said[-3:]) or "no output"


class _Git:
    """Run git for one source with prompts off, protocols limited and one deadline for all."""

    def __init__(self, source: Source, config, log: Callable[[str], None]):
        self.display, self.timeout, self.log = source.display, config.git_timeout, log
        self.remote = source.kind == "git"
        self.host = source_host(source)
        self.deadline = time.monotonic() + self.timeout
        self.env = {k: v for k, v in os.environ.items() if k not in _REPO_VARS}
        self.env.update(
            GIT_TERMINAL_PROMPT="0",
            GCM_INTERACTIVE="never",
            GIT_LFS_SKIP_SMUDGE="1",  # LFS content is pulled explicitly, after the size check
            LC_ALL="C",  # failures are recognised by git's English messages
            GIT_ALLOW_PROTOCOL="file" if source.kind in ("local", "hosted")
            else "https:http:ssh:git",
        )
        if "GIT_SSH" not in self.env and "GIT_SSH_COMMAND" not in self.env:
            self.env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
        self.pinned: list[str] = []
        if self.remote and allowed_hosts(config):
            # Only the allowed host is contacted: no redirect elsewhere, and no .lfsconfig in
            # the repository pointing git-lfs at another server.
            self.pinned = ["-c", "http.followRedirects=false"]
            if _URL_SCHEME.match(source.url) and source.url.lower().startswith("http"):
                base = source.url.rstrip("/")
                lfs = base + ("/info/lfs" if base.endswith(".git") else ".git/info/lfs")
                self.pinned += ["-c", f"lfs.url={lfs}"]
        parts = urlsplit(source.url) if source.kind == "git" else None
        secret = parts and parts.scheme in ("https", "http") and (parts.password or parts.username)
        # Tokens are long; a short user name like "git" would blank out ordinary words.
        self.secrets = [unquote(secret), secret] if secret and len(secret) >= 8 else []

    def redact(self, text: str) -> str:
        text = _redact(text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def detail(self, line: str) -> None:
        """Note what git said: in the caller's log for a local source; for a remote one only
        in the server log, since it would tell a member how the box's network answers."""
        if self.remote:
            server_log.info("git %s: %s", self.display, self.redact(line))
        else:
            self.log(line)

    def __call__(self, *args: str) -> str:
        op = args[2] if args[0] == "-C" else args[0]
        cmd = [_GIT, "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never",
               *self.pinned, *args]
        self.log(self.redact("$ git " + " ".join(args)))
        pipe = subprocess.PIPE
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, env=self.env,
                text=True, errors="replace", start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise SourceError(
                f"Cannot run git to fetch {self.display}: {exc.strerror or exc}",
                hint="install git (apt-get install git)",
            ) from None
        with proc:
            try:
                out, err = proc.communicate(timeout=max(0.1, self.deadline - time.monotonic()))
            except BaseException as exc:
                _kill_group(proc)
                # git says "Cloning into ..." before it connects: that is not an answer.
                said = [line for line in "".join(proc.communicate()).splitlines()
                        if line.strip() and not line.startswith("Cloning into")]
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
                if self.remote:
                    server_log.warning("git %s of %s timed out after %s s", op, self.display,
                                       self.timeout)
                    # The host is the one the person typed; what it did in time is all
                    # this says (a server that sent nothing, or a transfer too slow).
                    raise SourceError(
                        f"The git server at {self.host or self.display} did not answer within "
                        f"{self.timeout} s" if not said else
                        f"Fetching {self.display} from {self.host or 'its server'} did not "
                        f"finish within {self.timeout} s",
                        hint="check that the server is up and this box can reach it, then "
                        "retry; an admin can raise APPLIANCE_GIT_TIMEOUT for a slow server",
                    ) from None
                raise SourceError(
                    f"git {op} of {self.display} timed out after {self.timeout} s",
                    hint="the server is slow or unreachable: raise APPLIANCE_GIT_TIMEOUT, "
                    "or use a local mirror",
                ) from None
        lines = [self.redact(line.rstrip()) for line in err.splitlines() if line.strip()]
        for line in lines:
            self.detail(line)
        if proc.returncode != 0:
            raise _GitFailed(op, lines)
        return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:  # git's helpers (remote-https, ssh, upload-pack) share its process group: end all
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(failure: _GitFailed) -> str:
    text = "\n".join(failure.lines).lower()
    return next((kind for kind, (pattern, *_) in _FAILURES.items() if re.search(pattern, text)))


def unreachable(display: str, revision: str | None) -> SourceError:
    """The one message a caller sees for whatever went wrong fetching a remote source."""
    at = f" at revision {revision!r}" if revision else ""
    return SourceError(
        f"Could not fetch {display}{at}",
        hint=f"check the URL{', the revision' if revision else ''} and that this box can reach "
        "the server (and, for a private repository, the credentials in the URL); an admin "
        "finds git's own message in the appliance's server log",
    )


def _explain(failure: _GitFailed, display: str, revision: str | None,
             remote: bool = False) -> SourceError:
    if remote:
        server_log.warning("git %s of %s failed: %s", failure.op, display,
                           " / ".join(failure.lines) or "no output")
        return unreachable(display, revision)
    kind = _classify(failure)
    _, headline, hint = _FAILURES["other" if kind == "revision" and not revision else kind]
    headline = headline.format(display=display, revision=revision)
    return SourceError(f"{headline} (git: {failure.tail()})", hint=hint)


def _quiet(line: str) -> None:
    """Drop a log line: the default when the caller keeps no log."""


def fetch(source: Source, dest: Path, revision: str | None, config, log=_quiet) -> str:
    """Check out `revision` (or the default branch) of `source` into `dest`; return its sha."""
    dest = Path(dest)
    try:
        revision = validate_revision(revision)
    except InvalidInput as exc:
        raise SourceError(exc.message, hint=exc.hint) from None
    if dest.exists() or dest.is_symlink():
        raise SourceError(f"Checkout directory {dest} already exists", hint="remove it first")
    if not dest.parent.is_dir():
        raise SourceError(f"Checkout directory {dest.parent} does not exist", hint="create it")
    check_host(source, config)
    git = _Git(source, config, log)
    try:
        if source.kind == "local":
            _vet_local(source.url, config)
        sha = _check_out(git, source, dest, revision, config)
        _fill_lfs(git, dest, config)
        _check_size(dest, config, source.display)
        return sha
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, _GitFailed):
            raise _explain(exc, source.display, revision, git.remote) from None
        if isinstance(exc, Exception) and not isinstance(exc, ApplianceError):
            raise SourceError(
                f"Cannot fetch {source.display}: {git.redact(str(exc))}",
                hint="see the build log",
            ) from exc
        raise


def _check_out(git: _Git, source: Source, dest: Path, revision: str | None, config) -> str:
    """Fetch the revision's objects, weigh its tree, and only then write the working tree."""
    url, target = source.url, str(dest)
    # --no-local: make a local clone go through upload-pack, so --depth applies and the
    # source's object store is copied, not hard-linked or followed through symlinks.
    # --no-checkout everywhere: the tree's announced sizes are checked before a file is written.
    local = ["--no-local"] * (source.kind in ("local", "hosted"))
    full_clone = ("clone", "--no-checkout", *local)
    shallow = ("clone", "--depth", "1", "--no-checkout", *local)
    commitish = "HEAD"  # what is checked out: the cloned branch, or a commit (detached)
    if revision is None:
        git(*shallow, "--", url, target)
    elif _FULL_SHA.fullmatch(revision):
        try:
            git("init", "-q", "--", target)
            git("-C", target, "remote", "add", "--", "origin", url)
            git("-C", target, "fetch", "--depth", "1", "--", "origin", revision)
        except _GitFailed as exc:
            if exc.timed_out or _classify(exc) in ("unreachable", "auth", "tls"):
                raise
            git.detail("the server refused a shallow fetch of a commit; cloning the full "
                       "history")
            shutil.rmtree(dest, ignore_errors=True)
            git(*full_clone, "--", url, target)
        commitish = revision
    else:
        try:
            git(*shallow, f"--branch={revision}", "--", url, target)
        except _GitFailed as exc:
            if exc.timed_out or not (_SHORT_SHA.fullmatch(revision)
                                     and _classify(exc) == "revision"):
                raise
            shutil.rmtree(dest, ignore_errors=True)
            git(*full_clone, "--", url, target)
            try:
                commit = git("-C", target, *_VERIFY, f"{revision}^{{commit}}").strip()
            except _GitFailed:
                raise _GitFailed("rev-parse", [f"unknown revision {revision}"]) from None
            commitish = commit
    try:
        sha = git("-C", target, *_VERIFY, f"{commitish}^{{commit}}").strip()
    except _GitFailed:
        if commitish != "HEAD":
            raise _GitFailed("rev-parse", [f"unknown revision {revision}"]) from None
        if git.remote:
            raise _GitFailed("rev-parse", ["the repository has no commits"]) from None
        raise SourceError(
            f"Repository {source.display} has no commits", hint="push a commit, then retry"
        ) from None
    if revision and _FULL_SHA.fullmatch(revision) and sha != revision.lower():
        raise SourceError(f"Fetched {sha} instead of {revision} from {source.display}")
    _check_tree_size(git, target, sha, config, source.display)
    if commitish == "HEAD":
        git("-C", target, "checkout", "-q")  # the branch the clone named, left attached
    else:
        git("-C", target, "checkout", "-q", "--detach", sha, "--")
    return sha


def _check_tree_size(git: _Git, target: str, sha: str, config, display: str) -> None:
    """Refuse a tree whose files add up past max_checkout_mb, before any is written: a small
    repository can hold a highly compressible file that expands to gigabytes."""
    listing = git("-C", target, "ls-tree", "-r", "-l", "-z", "--full-tree", sha)
    sizes = []
    for entry in listing.split("\0"):
        meta, _, name = entry.partition("\t")
        fields = meta.split()
        if len(fields) == 4 and fields[1] == "blob" and fields[3].isdigit():
            sizes.append((int(fields[3]), name))
    total = sum(size for size, _ in sizes)
    limit = config.max_checkout_mb
    if total > limit * 1024 * 1024:
        largest = ", ".join(f"{name if name.isprintable() else repr(name)} {size / 2**20:.1f} MiB"
                            for size, name in sorted(sizes, reverse=True)[:3]
                            if size >= 0.05 * 2**20)
        raise SourceError(
            f"Checkout of {display} would be {total / 2**20:.1f} MiB in {len(sizes)} files, "
            f"over the {limit} MiB limit{f' (largest: {largest})' if largest else ''}; nothing "
            "was written",
            hint="raise APPLIANCE_MAX_CHECKOUT_MB or slim the repository",
        )


def _tree_files(root: Path):
    """Yield the working tree's files (symlinks not followed), skipping the .git directory."""
    for here, dirs, files in os.walk(root):
        if here == str(root):
            dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            yield Path(here, name)


def _git_lfs_available() -> bool:
    try:
        done = subprocess.run([_GIT, "lfs", "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _lfs_pointers(root: Path) -> dict[str, tuple[int, str]]:
    """Map each Git LFS pointer file (relative path) to (the size of the content it stands
    for, its sha256 oid)."""
    found = {}
    for path in _tree_files(root):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_size < 1024:
            data = path.read_bytes()
            if data.startswith(_LFS_MAGIC):
                size = re.search(rb"^size (\d+)$", data, re.MULTILINE)
                oid = re.search(rb"^oid sha256:([0-9a-f]{64})$", data, re.MULTILINE)
                found[path.relative_to(root).as_posix()] = (
                    int(size[1]) if size else 0, oid[1].decode() if oid else "")
    return dict(sorted(found.items()))


def _some(names: list[str]) -> str:
    """Name up to ten files, then how many more."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _fill_lfs(git: _Git, dest: Path, config) -> None:
    pointers = _lfs_pointers(dest)
    if not pointers:
        return
    if not _git_lfs_available():
        raise SourceError(
            f"{git.display} keeps files in Git LFS but git-lfs is not installed: "
            f"{_some(list(pointers))}",
            hint="install git-lfs (apt-get install git-lfs) and retry",
        )
    _check_size(dest, config, git.display, extra=sum(size for size, _ in pointers.values()))
    try:
        git("-C", str(dest), "lfs", "pull")
    except _GitFailed as exc:
        said = "\n".join(exc.lines)
        missing = [name for name, (_, oid) in pointers.items() if oid and oid in said]
        if missing and "missing object" in said.lower():
            raise SourceError(
                f"{git.display} keeps files in Git LFS that its server does not have: "
                f"{_some(missing)}",
                hint="push them from a clone that has them ('git lfs push --all origin'), or "
                "pick a revision whose LFS files were pushed",
            ) from None
        raise


def _check_size(root: Path, config, display: str, extra: int = 0) -> None:
    total = sum(path.lstat().st_size for path in _tree_files(root)) + extra
    limit = config.max_checkout_mb
    if total > limit * 1024 * 1024:
        raise SourceError(
            f"Checkout of {display} is {total / 2**20:.1f} MiB, over the {limit} MiB limit",
            hint="raise APPLIANCE_MAX_CHECKOUT_MB or slim the repository",
        )


def commit_time(checkout: Path) -> str:
    """The checked-out commit's committer time in UTC (RFC 3339), which a dated resolution
    takes as "as of"."""
    env = {k: v for k, v in os.environ.items() if k not in _REPO_VARS}
    env["LC_ALL"] = "C"
    try:
        out = subprocess.run(
            [_GIT, "-c", f"safe.directory={checkout}", "-C", str(checkout), "log", "-1",
             "--format=%ct", "HEAD"], capture_output=True, text=True, env=env, timeout=30,
            stdin=subprocess.DEVNULL, check=True).stdout.strip()
        return datetime.fromtimestamp(int(out), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OSError, ValueError, subprocess.SubprocessError):
        raise SourceError(f"Cannot read the commit time of {checkout.name}",
                          hint="the checkout has no git history; set the Space's package "
                          "resolution to latest, or fetch it again") from None


def remote_head(source: Source, revision: str | None, config) -> str:
    """Return the commit sha that `revision` (or the default branch) names on the remote."""
    try:
        revision = validate_revision(revision)
    except InvalidInput as exc:
        raise SourceError(exc.message, hint=exc.hint) from None
    if revision and _FULL_SHA.fullmatch(revision):
        return revision.lower()  # a full commit sha names itself
    if source.kind == "local":
        _vet_local(source.url, config)
    wanted = ["HEAD"]
    if revision:  # a branch wins over a tag of the same name, as with `git clone --branch`
        wanted = [f"refs/heads/{revision}", f"refs/tags/{revision}^{{}}", f"refs/tags/{revision}"]
    check_host(source, config)
    git = _Git(source, config, _quiet)
    try:
        out = git("ls-remote", "--", source.url, *wanted)
    except _GitFailed as exc:
        raise _explain(exc, source.display, revision, git.remote) from None
    refs = {ref: sha for sha, _, ref in (line.partition("\t") for line in out.splitlines())}
    for ref in wanted:
        if ref in refs and _FULL_SHA.fullmatch(refs[ref]):
            return refs[ref].lower()
    if git.remote:
        # An answer naming no such ref would still tell a git server from a closed port.
        server_log.warning("git ls-remote of %s: no ref %s", source.display, " or ".join(wanted))
        raise unreachable(source.display, revision)
    if revision is None:
        raise SourceError(f"Repository {source.display} has no commits", hint="push a commit")
    raise SourceError(
        f"Revision {revision!r} not found in {source.display}",
        hint="give a branch or tag that exists there (or a full 40-character commit sha)",
    )


# -- repositories hosted on the box -----------------------------------------------------------
# A Space pushed to the box (or written by the Hugging Face commit endpoint) keeps a bare
# repository under <data_dir>/hosted; core/hosted.py decides what may happen to it, and these
# are the git commands it needs.


def _hosted_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _REPO_VARS and not k.startswith("GIT_CONFIG")}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_ALLOW_PROTOCOL="file")
    env.update(extra or {})
    return env


def hosted_git(git_dir: Path, *args: str, stdin: bytes | None = None,
               env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run git on a hosted bare repository and return what it printed; SourceError (with
    git's own words: the repository is the box's) when it fails."""
    cmd = [_GIT, "-c", f"safe.directory={git_dir}", "--git-dir", str(git_dir), *args]
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, env=_hosted_env(env),
                              timeout=timeout, cwd="/")
    except OSError as exc:
        raise SourceError(f"Cannot run git: {exc.strerror or exc}",
                          hint="install git (apt-get install git)") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"git {args[0]} in {git_dir.name} timed out after {timeout} s",
                          hint="try again; an admin finds the repository under "
                          "<data_dir>/hosted") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise SourceError(f"git {args[0]} failed in the repository of this box's Space "
                          f"{git_dir.parent.name}/{git_dir.name.removesuffix('.git')}: "
                          f"{' / '.join(said[-3:]) or 'no output'}")
    return done.stdout.decode(errors="replace")


def init_hosted(git_dir: Path, settings: dict[str, str]) -> None:
    """Create an empty bare repository on branch main (no template: no sample hooks) and
    write settings into its config."""
    git_dir.parent.mkdir(parents=True, exist_ok=True)
    hosted_git(git_dir, "init", "-q", "--bare", "--template=", "--initial-branch=main",
               str(git_dir))
    for key, value in settings.items():
        hosted_git(git_dir, "config", key, value)


def start_http_backend(cgi_env: dict[str, str], config_values: dict[str, str]
                       ) -> subprocess.Popen:
    """Start git's smart-HTTP CGI (`git http-backend`) with a request's CGI environment;
    config_values are given as command-line configuration (over the repository's own)."""
    env = _hosted_env(cgi_env)
    env["GIT_CONFIG_COUNT"] = str(len(config_values))
    for index, (key, value) in enumerate(config_values.items()):
        env[f"GIT_CONFIG_KEY_{index}"], env[f"GIT_CONFIG_VALUE_{index}"] = key, value
    try:
        return subprocess.Popen([_GIT, "http-backend"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd="/", start_new_session=True)
    except OSError as exc:
        raise SourceError(f"Cannot run git http-backend: {exc.strerror or exc}",
                          hint="install git (apt-get install git)") from None


def end_process(proc: subprocess.Popen) -> None:
    """Stop a git process and its helpers (the client went, or it ran past its limit)."""
    _kill_group(proc)


def check_hosted_tree(git_dir: Path, sha: str, config, display: str) -> None:
    """Refuse a commit of a hosted repository whose files add up past max_checkout_mb."""
    git = _Git(Source("hosted", str(git_dir), display, ""), config, _quiet)
    git.pinned = ["-c", f"safe.directory={git_dir}"]
    try:
        _check_tree_size(git, str(git_dir), sha, config, display)
    except _GitFailed as exc:
        raise _explain(exc, display, None) from None


# The only settings a repository made elsewhere (a bundle's) keeps: what git needs to read its
# objects. Anything else in its .git/config (core.fsmonitor, core.sshCommand, aliases,
# filters, hooksPath…) would be its author's command run by the box's git; hooks go too.
_GIT_KEEP = ("core.repositoryformatversion", "core.bare", "extensions.objectformat")


def defuse_repository(git_dir: Path) -> None:
    """Give a repository someone else made (a bundle's) a config of our making and no hooks."""
    config = git_dir / "config"
    kept = []
    if config.is_file() and not config.is_symlink():
        listed = subprocess.run(
            ["git", "config", "--file", str(config), "--null", "--list"], capture_output=True,
            check=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                              "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(git_dir)})
        for entry in listed.stdout.decode(errors="replace").split("\0"):
            key, _, value = entry.partition("\n")
            if key.lower() in _GIT_KEEP:
                kept.append((key.lower(), value))
    config.unlink(missing_ok=True)
    lines = ["[core]\n", "\tfilemode = true\n"]
    lines += [f"\t{key.split('.', 1)[1]} = {value}\n" for key, value in kept
              if key.startswith("core.") and value.strip().isalnum()]
    formats = [value for key, value in kept if key == "extensions.objectformat"
               and value in ("sha1", "sha256")]
    if formats:
        lines += ["[extensions]\n", f"\tobjectformat = {formats[-1]}\n"]
    config.write_text("".join(lines))
    hooks = git_dir / "hooks"
    if hooks.is_symlink() or hooks.is_file():
        hooks.unlink()
    elif hooks.is_dir():
        shutil.rmtree(hooks)
