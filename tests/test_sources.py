"""Source parsing and fetching, against real git repositories made in tmp_path."""

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.core import sources
from appliance.core.sources import (
    Source,
    fetch,
    parse_source,
    remote_head,
    validate_revision,
    validate_space_id,
)
from appliance.errors import InvalidInput, SourceError

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345\n"
)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def commit(repo: Path, files: dict[str, str | bytes], message: str = "change") -> str:
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def cfg(tmp_path):
    return load_config({}, local_sources=str(tmp_path), data_dir=str(tmp_path / "data"))


@pytest.fixture
def repo(tmp_path):
    """A repository with main (two commits, tag v1 on the first) and a branch 'dev'."""
    path = tmp_path / "remote" / "my-space"
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    first = commit(path, {"app.py": "print('one')\n", "README.md": "# one\n"}, "one")
    git(path, "tag", "-a", "v1", "-m", "release one")
    git(path, "tag", "light", first)
    git(path, "branch", "dev")
    git(path, "checkout", "-q", "dev")
    commit(path, {"app.py": "print('dev')\n"}, "dev work")
    git(path, "checkout", "-q", "main")
    commit(path, {"app.py": "print('two')\n"}, "two")
    return path


def sha_of(repo: Path, rev: str) -> str:
    return git(repo, "rev-parse", f"{rev}^{{commit}}")


# parse_source: accepted forms


@pytest.mark.parametrize(
    "text",
    [
        "hf://spaces/alice/demo",
        "hf://spaces/alice/demo/",
        "hf://spaces/alice/demo.git",
        "hf://spaces/alice/demo/tree/main",
        "https://huggingface.co/spaces/alice/demo",
        "https://huggingface.co/spaces/alice/demo/",
        "https://huggingface.co/spaces/alice/demo.git",
        "https://huggingface.co/spaces/alice/demo/tree/main",
        "  https://hf.co/spaces/alice/demo  ",
    ],
)
def test_parse_hf_forms_resolve_to_the_configured_endpoint(text, cfg):
    source = parse_source(text, cfg)
    assert source == Source(
        "git", "https://huggingface.co/spaces/alice/demo", source.display, "alice/demo"
    )
    assert source.display.endswith("spaces/alice/demo")


def test_parse_hf_uses_a_mirror_endpoint(cfg):
    mirror = cfg.with_values(hf_endpoint="http://mirror.lan:8080/")
    source = parse_source("hf://spaces/alice/demo", mirror)
    assert source.url == "http://mirror.lan:8080/spaces/alice/demo"
    assert source.display == "hf://spaces/alice/demo"


def test_parse_hf_url_keeps_token_for_git_but_not_for_display(cfg):
    source = parse_source("https://alice:hf_secret123@huggingface.co/spaces/alice/demo", cfg)
    assert source.url == "https://alice:hf_secret123@huggingface.co/spaces/alice/demo"
    assert source.display == "https://huggingface.co/spaces/alice/demo"
    assert "secret" not in source.display


@pytest.mark.parametrize(
    ("text", "url", "display", "default_id"),
    [
        (
            "https://github.com/owner/name.git",
            "https://github.com/owner/name.git",
            "https://github.com/owner/name.git",
            "owner/name",
        ),
        (
            "HTTPS://github.com/owner/name",
            "https://github.com/owner/name",
            "https://github.com/owner/name",
            "owner/name",
        ),
        (
            "http://git.lan:3000/group/sub/name/",
            "http://git.lan:3000/group/sub/name/",
            "http://git.lan:3000/group/sub/name/",
            "sub/name",
        ),
        (
            "https://user:p%40ss@git.example.com/team/app.git",
            "https://user:p%40ss@git.example.com/team/app.git",
            "https://git.example.com/team/app.git",
            "team/app",
        ),
        (
            "https://ghp_token123@github.com/o/n",
            "https://ghp_token123@github.com/o/n",
            "https://github.com/o/n",
            "o/n",
        ),
        (
            "https://git.lan/solo.git",
            "https://git.lan/solo.git",
            "https://git.lan/solo.git",
            "git.lan/solo",
        ),
        (
            "ssh://git@git.lan:2222/owner/name.git",
            "ssh://git@git.lan:2222/owner/name.git",
            "ssh://git@git.lan:2222/owner/name.git",
            "owner/name",
        ),
        (
            "ssh://git:pw@git.lan/owner/name",
            "ssh://git:pw@git.lan/owner/name",
            "ssh://git@git.lan/owner/name",
            "owner/name",
        ),
        (
            "git://git.lan/owner/name",
            "git://git.lan/owner/name",
            "git://git.lan/owner/name",
            "owner/name",
        ),
        (
            "git@github.com:owner/name.git",
            "git@github.com:owner/name.git",
            "git@github.com:owner/name.git",
            "owner/name",
        ),
        ("git.lan:name", "git.lan:name", "git.lan:name", "git.lan/name"),
        ("https://[::1]:8443/o/n", "https://[::1]:8443/o/n", "https://[::1]:8443/o/n", "o/n"),
    ],
)
def test_parse_git_urls(text, url, display, default_id, cfg):
    assert parse_source(text, cfg) == Source("git", url, display, default_id)


def test_parse_local_absolute_path(repo, cfg):
    source = parse_source(str(repo), cfg)
    assert source == Source("local", str(repo), str(repo), "local/my-space")


def test_parse_local_relative_home_and_file_url_forms(repo, cfg, monkeypatch):
    monkeypatch.chdir(repo.parent)
    monkeypatch.setenv("HOME", str(repo.parent))
    for text in ["./my-space", "../my-space", "~/my-space", f"file://{repo}"]:
        if text.startswith("../"):
            monkeypatch.chdir(repo)
        assert parse_source(text, cfg).url == str(repo), text


def test_parse_local_bare_repository_and_sanitised_id(tmp_path, cfg):
    bare = tmp_path / "My Space!.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    source = parse_source(str(bare), cfg)
    assert source.url == str(bare)
    assert source.default_id == "local/My-Space-"
    validate_space_id(source.default_id)


# parse_source: refused forms


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "A Space source is required"),
        ("   ", "A Space source is required"),
        ("ext::sh -c touch% /tmp/pwned", "Remote-helper sources (ext::...) are refused"),
        ("fd::3", "Remote-helper sources (fd::...) are refused"),
        ("foo+bar::https://x/y", "Remote-helper sources (foo+bar::...) are refused"),
        ("--upload-pack=touch /tmp/x", "starts with '-', which git would read as an option"),
        ("-oProxyCommand=x", "starts with '-'"),
        ("ftp://host/owner/name", "Unsupported URL scheme ftp://"),
        ("git+ssh://host/owner/name", "Unsupported URL scheme git+ssh://"),
        ("javascript:alert(1)", "Unsupported URL scheme javascript:"),
        ("data:text/plain,hello", "Unsupported URL scheme data:"),
        ("https://host/own er/name", "contains whitespace"),
        ("https://host/owner/name\n", None),  # stripped: accepted
        ("https://host/owner\n/name", "contains control characters"),
        ("https://host/owner/\x00name", "contains control characters"),
        ("git@host.lan:owner name", "contains whitespace"),
        ("https://host/owner/name?x=1", "has a ?query or #fragment"),
        ("https://host/owner/name#frag", "has a ?query or #fragment"),
        ("https://-bad.host/o/n", "has no valid host name"),
        ("https:///o/n", "has no valid host name"),
        ("https://host:99999/o/n", "Malformed URL"),
        ("ssh://-oProxyCommand=touch%20x/o/n", "has no valid host name"),
        ("ssh://-x@host/o/n", "has an invalid user name"),
        ("https://host", "names no repository"),
        ("git@host.lan:-oProxyCommand", "Not a Space source"),
        ("hf://models/alice/demo", "Not a Hugging Face Space"),
        ("hf://spaces/alice", "Not a Hugging Face Space"),
        ("hf://spaces/al..ice/demo", "Not a Hugging Face Space"),
        ("hf://spaces/alice/demo/tree/dev", "Not a Hugging Face Space"),
        ("https://huggingface.co/alice/model", "is a Hugging Face model or dataset, not a Space"),
        ("owner/name", "Not a Space source"),
    ],
)
def test_parse_refuses_with_a_clear_message(text, message, cfg):
    if message is None:
        assert parse_source(text, cfg).url == text.strip()
        return
    with pytest.raises(SourceError) as caught:
        parse_source(text, cfg)
    assert message in caught.value.message
    assert caught.value.hint


def test_parse_refusal_does_not_echo_credentials(cfg):
    with pytest.raises(SourceError) as caught:
        parse_source("https://user:s3cret@host/own er/name", cfg)
    assert "s3cret" not in str(caught.value)
    assert "https://host/own er/name" in caught.value.message


def test_parse_local_refused_when_no_local_sources_configured(repo, tmp_path):
    cfg = load_config({}, local_sources="", data_dir=str(tmp_path / "data"))
    with pytest.raises(SourceError) as caught:
        parse_source(str(repo), cfg)
    assert caught.value.message == f"Local paths are not allowed as Space sources: {repo}"
    assert caught.value.hint == "allow a directory with APPLIANCE_LOCAL_SOURCES=/path/to/dir"


def test_a_bundled_spaces_own_repository_is_always_a_local_source(tmp_path):
    cfg = load_config({}, local_sources="", data_dir=str(tmp_path / "data"))
    imported = cfg.data_path / "repos" / "team-demo"
    imported.mkdir(parents=True)
    git(imported, "init", "-q", "-b", "main")
    commit(imported, {"app.py": "print('bundled')\n"}, "bundled")
    assert parse_source(str(imported), cfg).url == str(imported.resolve())
    climbing = str(cfg.data_path / "repos" / ".." / "elsewhere")
    with pytest.raises(SourceError, match="Local paths are not allowed"):
        parse_source(climbing, cfg)


def test_parse_local_refused_outside_allowed_roots(repo, tmp_path):
    cfg = load_config({}, local_sources=str(tmp_path / "allowed"), data_dir=str(tmp_path / "d"))
    with pytest.raises(SourceError) as caught:
        parse_source(str(repo), cfg)
    assert f"Local source {repo} is outside the allowed directories" in caught.value.message
    assert "APPLIANCE_LOCAL_SOURCES" in caught.value.hint


def test_parse_local_refuses_symlink_escaping_the_allowed_root(repo, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "sneaky").symlink_to(repo)
    cfg = load_config({}, local_sources=str(allowed), data_dir=str(tmp_path / "d"))
    with pytest.raises(SourceError) as caught:
        parse_source(str(allowed / "sneaky"), cfg)
    assert f"(resolves to {repo}) is outside the allowed directories" in caught.value.message


def test_parse_local_refuses_dotdot_escape(repo, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    cfg = load_config({}, local_sources=str(allowed), data_dir=str(tmp_path / "d"))
    with pytest.raises(SourceError, match="is outside the allowed directories"):
        parse_source(f"{allowed}/../remote/my-space", cfg)


def _allowed_and_outside(repo, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    cfg = load_config({}, local_sources=str(allowed), data_dir=str(tmp_path / "d"))
    return allowed, cfg


def test_a_git_file_pointing_at_another_repository_is_refused(repo, tmp_path):
    """A member cannot check out another repository on the box through a .git file
    (gitdir: elsewhere), as a worktree or submodule has."""
    allowed, cfg = _allowed_and_outside(repo, tmp_path)
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    (sneaky / ".git").write_text(f"gitdir: {repo / '.git'}\n")
    with pytest.raises(SourceError) as caught:
        parse_source(str(sneaky), cfg)
    assert "keeps its repository elsewhere (.git is a file or a link" in caught.value.message
    (sneaky / ".git").unlink()
    (sneaky / ".git").symlink_to(repo / ".git")
    with pytest.raises(SourceError, match="keeps its repository elsewhere"):
        parse_source(str(sneaky), cfg)


@pytest.mark.parametrize("how", ["alternates", "objects link", "commondir"])
def test_a_repository_reading_objects_from_outside_is_refused(repo, tmp_path, how):
    allowed, cfg = _allowed_and_outside(repo, tmp_path)
    inside = allowed / "inside"
    git(tmp_path, "init", "-q", str(inside))
    git_dir = inside / ".git"
    if how == "alternates":
        (git_dir / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (git_dir / "objects" / "info" / "alternates").write_text(f"{repo / '.git' / 'objects'}\n")
    elif how == "objects link":
        shutil.rmtree(git_dir / "objects")
        (git_dir / "objects").symlink_to(repo / ".git" / "objects")
    else:
        (git_dir / "commondir").write_text(str(repo / ".git") + "\n")
    with pytest.raises(SourceError) as caught:
        parse_source(str(inside), cfg)
    assert "reads git objects from" in caught.value.message
    assert "outside the allowed directories" in caught.value.message
    assert "repack -a -d" in caught.value.hint
    # fetch re-vets, so a repository changed after it was added is refused there too
    with pytest.raises(SourceError, match="reads git objects from"):
        fetch(Source("local", str(inside), "inside", "local/inside"), tmp_path / "out", None,
              cfg)


def test_alternates_inside_the_allowed_directories_are_fine(repo, tmp_path):
    allowed, cfg = _allowed_and_outside(repo, tmp_path)
    original = allowed / "original"
    git(tmp_path, "clone", "-q", str(repo), str(original))
    shared = allowed / "shared"
    git(tmp_path, "clone", "-q", "--shared", str(original), str(shared))
    assert (shared / ".git" / "objects" / "info" / "alternates").exists()
    assert parse_source(str(shared), cfg).kind == "local"


def test_parse_local_refuses_missing_and_non_repository_directories(tmp_path, cfg):
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError, match=r"plain is not a git repository"):
        parse_source(str(tmp_path / "plain"), cfg)
    with pytest.raises(SourceError, match=r"missing is not a directory"):
        parse_source(str(tmp_path / "missing"), cfg)


# validators


@pytest.mark.parametrize("space_id", ["alice/demo", "A1/b.c_d-e", "a/" + "b" * 96])
def test_validate_space_id_accepts(space_id):
    assert validate_space_id(space_id) == space_id


@pytest.mark.parametrize(
    "space_id",
    ["", "alice", "a/b/c", "/demo", "alice/", "-a/b", "a/.b", "a/b..c", "a b/c", "a/" + "b" * 97],
)
def test_validate_space_id_refuses(space_id):
    with pytest.raises(InvalidInput, match="Invalid Space id"):
        validate_space_id(space_id)


@pytest.mark.parametrize(
    "revision", ["main", "v1.0", "feature/x", "release-2024_01", "deadbeef", "a" * 40]
)
def test_validate_revision_accepts(revision):
    assert validate_revision(revision) == revision


def test_validate_revision_passes_none_through():
    assert validate_revision(None) is None
    assert validate_revision("") is None


@pytest.mark.parametrize(
    "revision",
    [
        "-b",
        "--upload-pack=x",
        "a b",
        "a\tb",
        "a\x00b",
        "main..dev",
        "HEAD@{1}",
        "HEAD~1",
        "HEAD^",
        "a:b",
        "a?",
        "a*",
        "a[b",
        "a\\b",
        "/main",
        "main/",
        "main.",
        "a//b",
        "a/.b",
        ".hidden",
        "x.lock",
        "@",
        "x" * 256,
    ],
)
def test_validate_revision_refuses(revision):
    with pytest.raises(InvalidInput, match="Invalid revision"):
        validate_revision(revision)


# fetch


def fetch_local(repo, tmp_path, cfg, revision=None, log=None):
    dest = tmp_path / "checkout"
    source = parse_source(str(repo), cfg)
    return dest, fetch(source, dest, revision, cfg, log=log or (lambda line: None))


def test_fetch_default_branch_is_shallow(repo, tmp_path, cfg):
    lines = []
    dest, sha = fetch_local(repo, tmp_path, cfg, log=lines.append)
    assert sha == sha_of(repo, "main")
    assert (dest / "app.py").read_text() == "print('two')\n"
    assert git(dest, "rev-list", "--count", "HEAD") == "1"
    assert any(line.startswith("$ git clone") for line in lines)


def test_fetch_default_branch_follows_remote_head(repo, tmp_path, cfg):
    git(repo, "symbolic-ref", "HEAD", "refs/heads/dev")
    dest, sha = fetch_local(repo, tmp_path, cfg)
    assert sha == sha_of(repo, "dev")


@pytest.mark.parametrize("revision", ["dev", "v1", "light"])
def test_fetch_branch_or_tag(revision, repo, tmp_path, cfg):
    dest, sha = fetch_local(repo, tmp_path, cfg, revision)
    assert sha == sha_of(repo, revision)
    assert len(sha) == 40
    expected = "print('dev')\n" if revision == "dev" else "print('one')\n"
    assert (dest / "app.py").read_text() == expected


def test_fetch_full_sha_of_an_older_commit_is_shallow(repo, tmp_path, cfg):
    old = sha_of(repo, "main")
    commit(repo, {"app.py": "print('three')\n"}, "three")
    dest, sha = fetch_local(repo, tmp_path, cfg, old.upper())
    assert sha == old
    assert (dest / "app.py").read_text() == "print('two')\n"
    assert git(dest, "rev-list", "--count", "HEAD") == "1"


def test_fetch_full_sha_falls_back_to_full_clone_when_server_refuses(
    repo, tmp_path, cfg, monkeypatch
):
    # Protocol v2 serves any reachable commit; v0 refuses unadvertised ones, like many hosts.
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "protocol.version")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "0")
    old = sha_of(repo, "main")
    commit(repo, {"app.py": "print('three')\n"}, "three")
    lines = []
    dest = tmp_path / "checkout"
    sha = fetch(parse_source(str(repo), cfg), dest, old, cfg, log=lines.append)
    assert sha == old
    assert (dest / "app.py").read_text() == "print('two')\n"
    assert any("cloning the full history" in line for line in lines)


@pytest.mark.parametrize("length", [7, 12])
def test_fetch_short_sha(length, repo, tmp_path, cfg):
    dev = sha_of(repo, "dev")
    dest, sha = fetch_local(repo, tmp_path, cfg, dev[:length])
    assert sha == dev
    assert (dest / "app.py").read_text() == "print('dev')\n"


@pytest.mark.parametrize("revision", ["no-such-branch", "abcdef1", "a" * 40])
def test_fetch_unknown_revision_names_it_and_removes_dest(revision, repo, tmp_path, cfg):
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError) as caught:
        fetch(parse_source(str(repo), cfg), dest, revision, cfg)
    assert caught.value.message.startswith(f"Revision {revision!r} not found in {repo} (git: ")
    assert "branch, tag or commit sha" in caught.value.hint
    assert not dest.exists()


def test_fetch_refuses_a_bad_revision_before_running_git(repo, tmp_path, cfg):
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError, match="Invalid revision '--upload-pack=x'"):
        fetch(parse_source(str(repo), cfg), dest, "--upload-pack=x", cfg)
    assert not dest.exists()


def test_fetch_refuses_an_existing_dest_and_leaves_it_alone(repo, tmp_path, cfg):
    dest = tmp_path / "checkout"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(SourceError, match="already exists"):
        fetch(parse_source(str(repo), cfg), dest, None, cfg)
    assert (dest / "keep").read_text() == "mine"


def test_fetch_refuses_a_dest_whose_parent_is_missing(repo, tmp_path, cfg):
    dest = tmp_path / "nowhere" / "checkout"
    with pytest.raises(SourceError, match=f"Checkout directory {dest.parent} does not exist"):
        fetch(parse_source(str(repo), cfg), dest, None, cfg)


def test_fetch_over_size_limit_is_removed_and_refused(repo, tmp_path, cfg):
    commit(repo, {"weights.bin": os.urandom(2 * 1024 * 1024)}, "big")
    small = cfg.with_values(max_checkout_mb=1)
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError) as caught:
        fetch(parse_source(str(repo), small), dest, None, small)
    assert caught.value.message == (
        f"Checkout of {repo} would be 2.0 MiB in 3 files, over the 1 MiB limit (largest: "
        "weights.bin 2.0 MiB); nothing was written")
    assert "APPLIANCE_MAX_CHECKOUT_MB" in caught.value.hint
    assert not dest.exists()


def _ran(lines: list[str], op: str) -> list[str]:
    return [line for line in lines if line.startswith("$ git") and f" {op}" in line]


@pytest.mark.parametrize("revision", [None, "main", "full sha", "short sha"])
def test_a_small_repository_that_expands_past_the_limit_is_refused_before_checkout(
        revision, repo, tmp_path, cfg):
    # 3 MiB of zeros: a few KiB on the wire and in .git, 3 MiB once written out.
    sha = commit(repo, {"zeros.bin": bytes(3 * 2**20), "sub/ok.txt": "fine\n"}, "bomb")
    revision = {"full sha": sha, "short sha": sha[:10]}.get(revision, revision)
    small = cfg.with_values(max_checkout_mb=1)
    dest, lines = tmp_path / "checkout", []
    with pytest.raises(SourceError) as caught:
        fetch(parse_source(str(repo), small), dest, revision, small, log=lines.append)
    assert caught.value.message == (
        f"Checkout of {repo} would be 3.0 MiB in 4 files, over the 1 MiB limit (largest: "
        "zeros.bin 3.0 MiB); nothing was written")
    assert _ran(lines, "ls-tree") and not _ran(lines, "checkout"), lines
    assert all("--no-checkout" in line for line in _ran(lines, "clone")), lines
    assert not dest.exists()


def test_a_tree_just_under_the_limit_is_checked_out(repo, tmp_path, cfg):
    commit(repo, {"zeros.bin": bytes(2**20 - 4096)}, "fits")
    small = cfg.with_values(max_checkout_mb=1)
    dest, lines = tmp_path / "checkout", []
    fetch(parse_source(str(repo), small), dest, None, small, log=lines.append)
    assert (dest / "zeros.bin").stat().st_size == 2**20 - 4096
    assert git(dest, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert _ran(lines, "ls-tree") and _ran(lines, "checkout")


def test_fetch_lfs_pointers_without_git_lfs_are_refused(repo, tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(sources, "_git_lfs_available", lambda: False)
    commit(repo, {"model.bin": LFS_POINTER, "data/x.ckpt": LFS_POINTER}, "lfs")
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError) as caught:
        fetch(parse_source(str(repo), cfg), dest, None, cfg)
    assert caught.value.message == (
        f"{repo} keeps files in Git LFS but git-lfs is not installed: data/x.ckpt, model.bin"
    )
    assert caught.value.hint == "install git-lfs (apt-get install git-lfs) and retry"
    assert not dest.exists()


def test_fetch_lfs_names_at_most_ten_files(repo, tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(sources, "_git_lfs_available", lambda: False)
    commit(repo, {f"w{i:02}.bin": LFS_POINTER for i in range(13)}, "lfs")
    with pytest.raises(SourceError) as caught:
        fetch(parse_source(str(repo), cfg), tmp_path / "checkout", None, cfg)
    assert caught.value.message.endswith("w08.bin, w09.bin and 3 more")


def test_fetch_lfs_content_counts_towards_the_size_limit(repo, tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(sources, "_git_lfs_available", lambda: True)
    pointer = LFS_POINTER.replace("size 12345", f"size {5 * 1024 * 1024}")
    commit(repo, {"model.bin": pointer}, "lfs")
    small = cfg.with_values(max_checkout_mb=1)
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError, match=r"is 5\.0 MiB, over the 1 MiB limit"):
        fetch(parse_source(str(repo), small), dest, None, small)
    assert not dest.exists()


def lfs_commit(repo: Path, files: dict[str, bytes]) -> str:
    """Commit files through the real git-lfs: pointers in git, contents in .git/lfs."""
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0:
        pytest.fail("git-lfs is needed for the LFS tests: apt-get install git-lfs "
                    "(scripts/setup.sh installs it)")
    git(repo, "lfs", "install", "--local")
    git(repo, "lfs", "track", "*.bin")
    sha = commit(repo, files, "lfs")
    assert git(repo, "show", f"HEAD:{next(iter(files))}").startswith(
        "version https://git-lfs.github.com/spec/v1"), "committed as a pointer"
    return sha


def test_fetch_pulls_git_lfs_content(repo, tmp_path, cfg):
    weights = os.urandom(300_000)
    sha = lfs_commit(repo, {"model.bin": weights, "sub/more.bin": b"x" * 5000})
    dest = tmp_path / "checkout"
    assert fetch(parse_source(str(repo), cfg), dest, None, cfg) == sha
    assert (dest / "model.bin").read_bytes() == weights
    assert (dest / "sub" / "more.bin").read_bytes() == b"x" * 5000


def test_fetch_of_lfs_content_missing_at_the_source_says_so(repo, tmp_path, cfg):
    lfs_commit(repo, {"model.bin": os.urandom(2000), "kept.bin": b"k" * 3000})
    kept = hashlib.sha256(b"k" * 3000).hexdigest()
    for stored in (repo / ".git" / "lfs" / "objects").rglob("*"):
        if stored.is_file() and stored.name != kept:
            stored.unlink()  # pushed without its LFS object: the server does not have it
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError) as caught:
        fetch(parse_source(str(repo), cfg), dest, None, cfg)
    assert caught.value.message == (
        f"{repo} keeps files in Git LFS that its server does not have: model.bin")
    assert caught.value.hint == (
        "push them from a clone that has them ('git lfs push --all origin'), or pick a "
        "revision whose LFS files were pushed")
    assert not dest.exists()


def test_fetch_re_vets_a_local_source(repo, tmp_path, cfg):
    source = Source("local", str(repo), str(repo), "local/x")
    narrower = cfg.with_values(local_sources=str(tmp_path / "elsewhere"))
    with pytest.raises(SourceError, match="outside the allowed directories"):
        fetch(source, tmp_path / "checkout", None, narrower)


def test_fetch_of_empty_repository_is_refused(tmp_path, cfg):
    empty = tmp_path / "empty"
    subprocess.run(["git", "init", "-q", str(empty)], check=True)
    dest = tmp_path / "checkout"
    with pytest.raises(SourceError, match=f"Repository {empty} has no commits"):
        fetch(parse_source(str(empty), cfg), dest, None, cfg)
    assert not dest.exists()


# git failures, through stand-in git binaries


def stand_in_git(tmp_path, monkeypatch, script: str) -> None:
    path = tmp_path / "fake-git"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    monkeypatch.setattr(sources, "_GIT", str(path))


NETWORK_ANSWERS = [
    "fatal: unable to access 'https://u:s3cr3tpw@git.lan/o/n/': Could not resolve host: git.lan",
    "fatal: unable to access 'https://git.lan/o/n/': Failed to connect to git.lan port 443 after "
    "3 ms: Connection refused",
    "fatal: unable to access 'https://git.lan/o/n/': Failed to connect to git.lan port 443 after "
    "130000 ms: Connection timed out",
    "remote: Repository not found.\nfatal: repository 'https://git.lan/o/n/' not found",
    "fatal: unable to access 'https://git.lan/o/n/': The requested URL returned error: 404",
    "fatal: could not read Username for 'https://git.lan': terminal prompts disabled",
    "fatal: unable to access 'https://git.lan/o/n/': SSL certificate problem: self signed",
    "fatal: Remote branch dev not found in upstream origin",
    "fatal: something odd",
]


@pytest.mark.parametrize("said", NETWORK_ANSWERS)
@pytest.mark.parametrize("revision", [None, "dev"])
def test_a_remote_fetch_failure_reads_the_same_whatever_the_network_said(
        said, revision, tmp_path, cfg, monkeypatch, caplog):
    stand_in_git(tmp_path, monkeypatch, f"cat >&2 <<'EOF'\n{said}\nEOF\nexit 128\n")
    source = parse_source("https://u:s3cr3tpw@git.lan/o/n", cfg)
    lines = []
    with caplog.at_level("INFO", logger="appliance.sources"), \
            pytest.raises(SourceError) as caught:
        fetch(source, tmp_path / "checkout", revision, cfg, log=lines.append)
    at = " at revision 'dev'" if revision else ""
    assert caught.value.message == f"Could not fetch https://git.lan/o/n{at}"
    assert caught.value.hint == (
        f"check the URL{', the revision' if revision else ''} and that this box can reach the "
        "server (and, for a private repository, the credentials in the URL); an admin finds "
        "git's own message in the appliance's server log")
    # What git said reaches the server log only, without the password; the build log a
    # member reads shows the command, never the answer.
    last = said.splitlines()[-1].replace("u:s3cr3tpw@", "")
    assert last in caplog.text and "s3cr3tpw" not in caplog.text
    assert lines and all(line.startswith("$ git") for line in lines), lines
    assert "s3cr3tpw" not in "".join(lines)


def test_remote_fetch_that_times_out_names_the_host_and_the_time_it_waited(
        tmp_path, cfg, monkeypatch, caplog):
    # Issue 12: a server that never answers is told apart (the wait itself already shows it).
    stand_in_git(tmp_path, monkeypatch, "sleep 30\n")
    quick = cfg.with_values(git_timeout=1)
    with caplog.at_level("WARNING", logger="appliance.sources"), \
            pytest.raises(SourceError) as caught:
        fetch(parse_source("https://git.lan/o/n", quick), tmp_path / "checkout", None, quick)
    assert caught.value.message == "The git server at git.lan did not answer within 1 s"
    assert "APPLIANCE_GIT_TIMEOUT" in caught.value.hint
    assert "git clone of https://git.lan/o/n timed out after 1 s" in caplog.text


@pytest.mark.parametrize(
    ("said", "message", "hint"),
    [
        (
            "fatal: detected dubious ownership in repository at '/srv/x'",
            "git refuses {repo}: it belongs to another user",
            "safe.directory",
        ),
        ("fatal: something odd", "git failed to fetch {repo}", "build log"),
    ],
)
def test_local_fetch_failures_keep_their_own_messages(
        said, message, hint, repo, tmp_path, cfg, monkeypatch):
    source = parse_source(str(repo), cfg)
    stand_in_git(tmp_path, monkeypatch, f"cat >&2 <<'EOF'\n{said}\nEOF\nexit 128\n")
    lines = []
    with pytest.raises(SourceError) as caught:
        fetch(source, tmp_path / "checkout", None, cfg, log=lines.append)
    assert caught.value.message == f"{message.format(repo=repo)} (git: {said})"
    assert hint in caught.value.hint
    assert said in lines


def test_fetch_log_never_shows_the_token(tmp_path, cfg, monkeypatch, caplog):
    stand_in_git(
        tmp_path, monkeypatch, 'echo "error: using $*" >&2\necho "token ghp_abcdefgh" >&2\nexit 1\n'
    )
    source = parse_source("https://ghp_abcdefgh@git.lan/o/n", cfg)
    lines = []
    with caplog.at_level("INFO", logger="appliance.sources"), pytest.raises(SourceError):
        fetch(source, tmp_path / "checkout", None, cfg, log=lines.append)
    assert lines and not any("ghp_abcdefgh" in line for line in lines)
    assert "token ***" in caplog.text and "ghp_abcdefgh" not in caplog.text


def test_fetch_hung_git_times_out_and_is_killed(repo, tmp_path, cfg, monkeypatch):
    marker = tmp_path / "still-running"
    quick = cfg.with_values(git_timeout=1)
    source = parse_source(str(repo), quick)
    stand_in_git(tmp_path, monkeypatch, f"(sleep 2; touch {marker}) &\nsleep 30\n")
    dest = tmp_path / "checkout"
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        fetch(source, dest, None, quick)
    assert time.monotonic() - started < 10
    assert caught.value.message == f"git clone of {repo} timed out after 1 s"
    assert "APPLIANCE_GIT_TIMEOUT" in caught.value.hint
    assert not dest.exists()
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))
    assert not marker.exists()  # the whole process group died, the background child too


def test_fetch_without_git_installed(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(sources, "_GIT", str(tmp_path / "no-git-here"))
    with pytest.raises(SourceError) as caught:
        fetch(parse_source("https://git.lan/o/n", cfg), tmp_path / "checkout", None, cfg)
    assert caught.value.message.startswith("Cannot run git to fetch https://git.lan/o/n")
    assert caught.value.hint == "install git (apt-get install git)"


def test_git_runs_with_prompts_off_and_protocols_limited(tmp_path, cfg, monkeypatch):
    record = tmp_path / "env"
    stand_in_git(tmp_path, monkeypatch, f'env > {record}\necho "$@" >> {record}\nexit 1\n')
    with pytest.raises(SourceError):
        fetch(parse_source("https://git.lan/o/n", cfg), tmp_path / "checkout", None, cfg)
    seen = record.read_text()
    assert "GIT_TERMINAL_PROMPT=0" in seen
    assert "GIT_ALLOW_PROTOCOL=https:http:ssh:git" in seen
    assert "-c protocol.ext.allow=never" in seen
    assert "clone --depth 1 --no-checkout -- https://git.lan/o/n" in seen
    assert "followRedirects" not in seen and "lfs.url" not in seen  # no source_hosts set


# source_hosts: the admin's allowlist of hosts for remote sources


@pytest.mark.parametrize(("text", "allowed"), [
    ("https://git.lan/o/n", "git.lan"),
    ("https://GIT.LAN/o/n", "git.lan"),
    ("ssh://git@code.corp.example/o/n.git", "*.example"),
    ("git@code.corp.example:o/n.git", "github.com, *.corp.example"),
    ("hf://spaces/o/n", "huggingface.co"),
    ("https://huggingface.co/spaces/o/n", "huggingface.co"),
])
def test_source_hosts_allows_the_named_hosts(text, allowed, cfg):
    assert parse_source(text, cfg.with_values(source_hosts=allowed)).kind == "git"


@pytest.mark.parametrize(("text", "host"), [
    ("https://10.0.0.5:8080/o/n", "10.0.0.5"),
    ("https://[::1]/o/n", "::1"),
    ("http://localhost/o/n", "localhost"),
    ("https://git.lan.evil.example/o/n", "git.lan.evil.example"),
    ("https://evilgit.lan/o/n", "evilgit.lan"),
    ("git@169.254.169.254:o/n.git", "169.254.169.254"),
    ("ssh://git@internal:22/o/n", "internal"),
])
def test_source_hosts_refuses_any_other_host_before_git_runs(text, host, tmp_path, cfg,
                                                           monkeypatch):
    ran = tmp_path / "ran"
    stand_in_git(tmp_path, monkeypatch, f"touch {ran}\nexit 1\n")
    strict = cfg.with_values(source_hosts="git.lan, *.corp.example")
    with pytest.raises(SourceError) as caught:
        parse_source(text, strict)
    assert caught.value.message.endswith(
        f"is on host {host}, which is not among the hosts this box fetches Spaces from: "
        "git.lan, *.corp.example")
    assert caught.value.hint == ("use a repository on one of those hosts, or ask an admin to add "
                                 "its host to APPLIANCE_SOURCE_HOSTS")
    # A source vetted before the setting changed is checked again by fetch and remote_head.
    loose = parse_source(text, cfg)
    for call in (lambda: fetch(loose, tmp_path / "checkout", None, strict),
                 lambda: remote_head(loose, None, strict)):
        with pytest.raises(SourceError, match="not among the hosts"):
            call()
    assert not ran.exists()


def test_hf_sources_are_checked_against_the_endpoint_they_fetch_from(cfg):
    mirror = cfg.with_values(hf_endpoint="http://10.1.2.3:8080", source_hosts="huggingface.co")
    with pytest.raises(SourceError, match="is on host 10.1.2.3, which is not among"):
        parse_source("hf://spaces/o/n", mirror)


def test_with_source_hosts_git_follows_no_redirect_and_no_lfsconfig(tmp_path, cfg, monkeypatch):
    record = tmp_path / "args"
    stand_in_git(tmp_path, monkeypatch, f'echo "$@" >> {record}\nexit 1\n')
    strict = cfg.with_values(source_hosts="git.lan")
    with pytest.raises(SourceError):
        fetch(parse_source("https://git.lan/o/n", strict), tmp_path / "checkout", None, strict)
    seen = record.read_text()
    assert "-c http.followRedirects=false" in seen
    assert "-c lfs.url=https://git.lan/o/n.git/info/lfs" in seen


# remote_head


def test_remote_head_of_default_branch_branch_and_tags(repo, cfg):
    source = parse_source(str(repo), cfg)
    assert remote_head(source, None, cfg) == sha_of(repo, "main")
    assert remote_head(source, "dev", cfg) == sha_of(repo, "dev")
    assert remote_head(source, "v1", cfg) == sha_of(repo, "v1")
    assert remote_head(source, "light", cfg) == sha_of(repo, "light")


def test_remote_head_follows_new_commits(repo, cfg):
    source = parse_source(str(repo), cfg)
    before = remote_head(source, "main", cfg)
    after = commit(repo, {"app.py": "print('three')\n"}, "three")
    assert before != after
    assert remote_head(source, "main", cfg) == after


def test_remote_head_full_sha_names_itself(repo, cfg):
    source = parse_source(str(repo), cfg)
    assert remote_head(source, "A" * 40, cfg) == "a" * 40


def test_remote_head_unknown_revision(repo, cfg):
    source = parse_source(str(repo), cfg)
    with pytest.raises(SourceError) as caught:
        remote_head(source, "nope", cfg)
    assert caught.value.message == f"Revision 'nope' not found in {repo}"


def test_remote_head_of_missing_repository(tmp_path, cfg, monkeypatch, caplog):
    stand_in_git(tmp_path, monkeypatch, "echo 'remote: Repository not found.' >&2\nexit 128\n")
    gone = parse_source("https://git.lan/o/gone", cfg)
    with caplog.at_level("WARNING", logger="appliance.sources"), \
            pytest.raises(SourceError) as caught:
        remote_head(gone, None, cfg)
    assert caught.value.message == "Could not fetch https://git.lan/o/gone"
    assert "Repository not found" in caplog.text


def test_remote_head_of_a_remote_without_the_revision_reads_like_a_failure(tmp_path, cfg,
                                                                         monkeypatch):
    # A server that answers (with no such ref) is not told apart from one that does not.
    stand_in_git(tmp_path, monkeypatch, "exit 0\n")
    source = parse_source("https://git.lan/o/n", cfg)
    with pytest.raises(SourceError) as caught:
        remote_head(source, "nope", cfg)
    assert caught.value.message == "Could not fetch https://git.lan/o/n at revision 'nope'"


def test_remote_head_of_local_repository_re_vets_it(repo, tmp_path, cfg):
    source = parse_source(str(repo), cfg)
    narrower = cfg.with_values(local_sources=str(tmp_path / "elsewhere"))
    with pytest.raises(SourceError, match="outside the allowed directories"):
        remote_head(source, None, narrower)
