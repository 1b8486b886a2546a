"""Push to deploy: each Space's git remote on the box, with the real git client against the
portal served by a real WSGI server (werkzeug, threads) on a free port.

The deploy a push starts is recorded instead of run (jobs.spawn_job is replaced), so these
tests need no Podman; test_push_deploys_on_podman_with_no_failed_request runs the real thing.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import commit, git, make_space_repo, start_on_free_port, wait_for
from werkzeug.serving import make_server

from appliance import stages, users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core import hosted, jobs, sources, spaces
from appliance.core.context import space_paths
from appliance.web.app import create_app

STATIC = {"README.md": "---\ntitle: Site\nsdk: static\n---\n", "index.html": "<p>one</p>\n"}


class Box:
    """The portal on a port, its store, tokens by name, and the deploys it asked for."""

    def __init__(self, url: str, config, store, tokens: dict[str, str], spawned: list):
        self.url, self.config, self.store = url, config, store
        self.tokens, self.spawned = tokens, spawned
        self.host = url.removeprefix("http://")

    def remote(self, space_id: str, who: str | None = None, suffix: str = "") -> str:
        auth = f"x:{self.tokens[who]}@" if who else ""
        return f"http://{auth}{self.host}/spaces/{space_id}{suffix}"


def serve(app):
    def start(port: int):
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, port

    return start_on_free_port(start)


def running_box(root: Path, port_range: str, limit_mb: int, roles: dict[str, str]
                ) -> Iterator[Box]:
    """A portal on a real HTTP server with a write token per user (and a read one for mia);
    the deploy a push starts is recorded, not run (one test below runs it for real)."""
    spawned: list[tuple[str, str]] = []
    patch = pytest.MonkeyPatch()
    patch.setattr(jobs, "spawn_job", lambda ctx, space_id, job, factory=False:
                  spawned.append((space_id, job)) or 0)
    config = load_config({}, data_dir=str(root / "data"), port_range=port_range,
                         max_checkout_mb=limit_mb, max_push_mb=limit_mb)
    app = create_app(config)
    store = open_store(config.db_path)
    tokens = {}
    for name, role in roles.items():
        users.add_user(store, name, role, "correct horse battery", "test")
        tokens[name] = users.create_token(store, "push", name, "write", "test")[1]
    tokens["mia-read"] = users.create_token(store, "read", "mia", "read", "test")[1]
    server, port = serve(app)
    yield Box(f"http://127.0.0.1:{port}", config, store, tokens, spawned)
    server.shutdown()
    store.close()
    patch.undo()


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    yield from running_box(tmp_path_factory.mktemp("push"), "18300-18399", 1,
                           {"ada": "admin", "mia": "member", "max": "member", "vic": "viewer"})


def run_git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The git client as a person runs it, with no prompts and none of this machine's config."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
           "HOME": str(cwd), "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
    done = subprocess.run(["git", "-c", "user.name=Test", "-c", "user.email=t@example.com",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"git {' '.join(args)} failed:\n{done.stderr}"
    return done


def local_repo(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    return make_space_repo(tmp_path / "work", files or STATIC)


def pushed(box: Box, tmp_path: Path, space_id: str, who: str = "mia") -> Path:
    repo = local_repo(tmp_path)
    run_git(repo, "push", box.remote(space_id, who), "main")
    return repo


def settle(box: Box, space_id: str) -> None:
    """End the recorded (never run) build, as a failed build would, so the next push
    deploys."""
    box.store.move(space_id, stages.BUILDING, stages.BUILD_ERROR, "test")


# -- pushing creates and deploys --------------------------------------------------------------


def test_push_to_a_new_name_creates_a_hosted_space_and_starts_its_build(box, tmp_path):
    repo = local_repo(tmp_path)
    sha = git(repo, "rev-parse", "HEAD")
    done = run_git(repo, "push", box.remote("mia/site", "mia"), "main")
    assert f"remote: Building mia/site at {sha[:12]}" in done.stderr
    assert "remote: follow it at http://127.0.0.1" in done.stderr
    assert "appliance spaces logs mia/site --build --follow" in done.stderr
    assert ("mia/site", "deploy") in box.spawned
    row = box.store.get_space("mia/site")
    assert row["source"] == "hosted://mia/site" and row["created_by"] == "token:mia"
    assert row["stage"] == stages.BUILDING
    bare = sources.hosted_repo_path(box.config, "mia/site")
    assert sources.hosted_git(bare, "rev-parse", "refs/heads/main").strip() == sha


def test_a_hosted_repository_runs_no_hook_of_its_own(box, tmp_path):
    pushed(box, tmp_path, "mia/hookless")
    bare = sources.hosted_repo_path(box.config, "mia/hookless")
    hooks = Path(sources.hosted_git(bare, "config", "core.hooksPath").strip())
    assert hooks == hosted.hooks_dir(box.config, empty=True) and not any(hooks.iterdir())
    assert not (bare / "hooks").exists()
    assert sources.hosted_git(bare, "config", "receive.denyNonFastForwards").strip() == "true"
    assert sources.hosted_git(bare, "config", "receive.denyDeletes").strip() == "true"


def test_clone_edit_push_deploys_the_new_commit(box, tmp_path):
    pushed(box, tmp_path, "mia/edit")
    settle(box, "mia/edit")
    clone = tmp_path / "clone"
    run_git(tmp_path, "clone", box.remote("mia/edit", "mia", ".git"), str(clone))
    assert (clone / "index.html").read_text() == "<p>one</p>\n"
    sha = commit(clone, {"index.html": "<p>two</p>\n"}, "two")
    box.spawned.clear()
    done = run_git(clone, "push", "origin", "main")
    assert f"remote: Building mia/edit at {sha[:12]}" in done.stderr
    assert box.spawned == [("mia/edit", "deploy")]
    assert hosted.head(box.config, "mia/edit") == sha


def test_a_push_while_the_space_builds_is_kept_and_says_how_to_deploy_it(box, tmp_path):
    repo = pushed(box, tmp_path, "mia/busy")
    sha = commit(repo, {"index.html": "<p>again</p>\n"}, "again")
    box.spawned.clear()
    done = run_git(repo, "push", box.remote("mia/busy", "mia"), "main")
    assert f"remote: {sha[:12]} is stored, but mia/busy is not deployed now: Space mia/busy " \
           "is busy (BUILDING)" in done.stderr
    assert "remote: deploy it once that ends: 'appliance spaces update mia/busy'" in done.stderr
    assert box.spawned == []
    assert hosted.head(box.config, "mia/busy") == sha


def test_an_admin_may_push_to_a_members_space(box, tmp_path):
    repo = pushed(box, tmp_path, "mia/shared")
    settle(box, "mia/shared")
    commit(repo, {"index.html": "<p>by ada</p>\n"}, "ada's")
    done = run_git(repo, "push", box.remote("mia/shared", "ada"), "main")
    assert "remote: Building mia/shared" in done.stderr


def test_a_bearer_token_in_an_extra_header_pushes_too(box, tmp_path):
    repo = local_repo(tmp_path)
    done = run_git(repo, "-c", f"http.extraHeader=Authorization: Bearer {box.tokens['max']}",
                   "push", box.remote("max/bearer"), "main")
    assert "remote: Building max/bearer" in done.stderr
    assert box.store.get_space("max/bearer")["created_by"] == "token:max"


# -- who may push -----------------------------------------------------------------------------


def test_push_without_a_token_is_asked_for_credentials(box, tmp_path):
    response = requests.get(f"{box.url}/spaces/mia/anon/info/refs",
                            params={"service": "git-receive-pack"}, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
    assert "Pushing to mia/anon needs an API token" in response.text
    assert "any user name and an API token as the password" in response.text
    done = run_git(local_repo(tmp_path), "push", box.remote("mia/anon"), "main", check=False)
    assert done.returncode != 0 and "could not read Username" in done.stderr
    assert box.store.find_space("mia/anon") is None


def test_push_with_a_bad_token_is_refused(box, tmp_path):
    bad = f"http://x:apl_nope@{box.host}/spaces/mia/badtoken"
    done = run_git(local_repo(tmp_path), "push", bad, "main", check=False)
    assert done.returncode != 0
    assert "remote: The API token is not valid (unknown or revoked)" in done.stderr


def test_push_with_a_read_token_is_forbidden(box, tmp_path):
    done = run_git(local_repo(tmp_path), "push", box.remote("mia/readonly", "mia-read"), "main",
                   check=False)
    assert done.returncode != 0
    assert "remote: This token is read-only: it cannot push to mia/readonly" in done.stderr
    assert "--user mia --scope write" in done.stderr
    assert box.store.find_space("mia/readonly") is None


def test_a_member_may_not_push_to_another_members_space(box, tmp_path):
    pushed(box, tmp_path / "a", "mia/mine")
    before = hosted.head(box.config, "mia/mine")
    repo = local_repo(tmp_path / "b", {**STATIC, "index.html": "<p>max was here</p>\n"})
    done = run_git(repo, "push", box.remote("mia/mine", "max"), "main", check=False)
    assert done.returncode != 0
    assert "remote: Only an admin or the member who added mia/mine may push to it" in done.stderr
    assert "remote: push to a Space under your own name, e.g. max/mine" in done.stderr
    assert hosted.head(box.config, "mia/mine") == before


def test_a_viewer_may_not_create_a_space_by_pushing(box, tmp_path):
    done = run_git(local_repo(tmp_path), "push", box.remote("vic/site", "vic"), "main",
                   check=False)
    assert done.returncode != 0
    assert "remote: vic is a viewer and may not change Spaces" in done.stderr
    assert box.store.find_space("vic/site") is None


def test_a_member_may_not_create_a_space_under_another_users_name(box, tmp_path):
    done = run_git(local_repo(tmp_path), "push", box.remote("max/taken", "mia"), "main",
                   check=False)
    assert done.returncode != 0
    assert "remote: The owner 'max' of max/taken is the name of the portal user max" \
        in done.stderr
    assert box.store.find_space("max/taken") is None


def test_a_space_that_follows_a_url_refuses_pushes_and_keeps_following_it(box, tmp_path):
    box.store.insert_space({
        "id": "mia/upstream", "source": "https://example.com/mia/upstream.git",
        "source_display": "https://example.com/mia/upstream.git", "stage": stages.RUNNING,
        "port": 18399, "hardware": "cpu", "desired": "running", "created_by": "token:mia"},
        "test")
    done = run_git(local_repo(tmp_path), "push", box.remote("mia/upstream", "mia"), "main",
                   check=False)
    assert done.returncode != 0
    assert ("remote: Space mia/upstream follows https://example.com/mia/upstream.git; pushing "
            "to this box is refused") in done.stderr
    assert "remote: push there, then run 'appliance spaces update mia/upstream'" in done.stderr
    assert box.store.get_space("mia/upstream")["source"] == \
        "https://example.com/mia/upstream.git"
    assert not sources.hosted_repo_path(box.config, "mia/upstream").exists()


def test_a_hosted_repository_cannot_be_the_source_of_another_space(box, tmp_path):
    from appliance.errors import SourceError

    pushed(box, tmp_path, "mia/original")
    ctx = spaces.open_context(box.config, actor="token:max")
    with pytest.raises(SourceError) as caught:
        spaces.add_space(ctx, "hosted://mia/original", name="max/copy")
    assert "hosted://mia/original is the repository of a Space hosted on this box" \
        in caught.value.message
    ctx.store.close()


# -- what a push may change -------------------------------------------------------------------


def test_force_push_and_deleting_the_branch_are_refused(box, tmp_path):
    repo = pushed(box, tmp_path, "mia/history")
    before = hosted.head(box.config, "mia/history")
    git(repo, "commit", "-q", "--amend", "-m", "rewritten")
    done = run_git(repo, "push", "--force", box.remote("mia/history", "mia"), "main",
                   check=False)
    assert done.returncode != 0 and "non-fast-forward" in done.stderr
    done = run_git(repo, "push", box.remote("mia/history", "mia"), ":main", check=False)
    assert done.returncode != 0 and "deletion prohibited" in done.stderr
    assert hosted.head(box.config, "mia/history") == before


def test_only_the_tracked_branch_may_be_pushed(box, tmp_path):
    repo = pushed(box, tmp_path, "mia/branches")
    done = run_git(repo, "push", box.remote("mia/branches", "mia"), "main:refs/heads/dev",
                   "main:refs/tags/v1", check=False)
    assert done.returncode != 0
    assert ("remote: error: refs/heads/dev refused: this box keeps only the branch main of "
            "mia/branches") in done.stderr
    assert "remote: error: refs/tags/v1 refused" in done.stderr
    bare = sources.hosted_git(sources.hosted_repo_path(box.config, "mia/branches"),
                              "for-each-ref", "--format=%(refname)")
    assert bare.split() == ["refs/heads/main"]


def test_a_tree_over_max_checkout_mb_is_refused_before_the_branch_moves(box, tmp_path):
    repo = pushed(box, tmp_path, "mia/big")
    before = hosted.head(box.config, "mia/big")
    (repo / "zeros.bin").write_bytes(bytes(3 * 1024 * 1024))  # compresses to almost nothing
    commit(repo, {}, "big")
    box.spawned.clear()
    done = run_git(repo, "push", box.remote("mia/big", "mia"), "main", check=False)
    assert done.returncode != 0
    assert "over the 1 MiB limit (largest: zeros.bin 3.0 MiB); nothing was changed" \
        in done.stderr
    assert "APPLIANCE_MAX_CHECKOUT_MB" in done.stderr
    assert hosted.head(box.config, "mia/big") == before and box.spawned == []


def test_a_pack_over_max_push_mb_is_refused(box, tmp_path):
    repo = pushed(box, tmp_path, "mia/pack")
    before = hosted.head(box.config, "mia/pack")
    (repo / "noise.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # does not compress
    commit(repo, {}, "noise")
    done = run_git(repo, "push", box.remote("mia/pack", "mia"), "main", check=False)
    assert done.returncode != 0
    assert "pack exceeds maximum allowed size" in done.stderr
    assert hosted.head(box.config, "mia/pack") == before


def test_a_push_body_announced_over_the_limit_is_refused_unread(box):
    conn = http.client.HTTPConnection(box.host, timeout=30)
    conn.putrequest("POST", "/spaces/mia/site/git-receive-pack")
    for key, value in (("Authorization", f"Bearer {box.tokens['mia']}"),
                       ("Content-Type", "application/x-git-receive-pack-request"),
                       ("Content-Length", str(5 * 1024 * 1024))):
        conn.putheader(key, value)
    conn.endheaders(b"0000")  # the rest of the announced body never comes
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 413
    assert "The push is 5.0 MiB, over the 1 MiB this box accepts" in text
    assert "APPLIANCE_MAX_PUSH_MB" in text


# -- reading ----------------------------------------------------------------------------------


def test_a_private_space_is_cloned_only_with_a_token(box, tmp_path):
    pushed(box, tmp_path, "mia/secret")
    box.store.update_space("mia/secret", visibility="private")
    done = run_git(tmp_path, "clone", box.remote("mia/secret"), "anon", check=False)
    assert done.returncode != 0 and "could not read Username" in done.stderr
    run_git(tmp_path, "clone", box.remote("mia/secret", "mia-read"), "reader")
    assert (tmp_path / "reader" / "index.html").is_file()


def test_cloning_a_space_that_does_not_exist_says_so(box, tmp_path):
    done = run_git(tmp_path, "clone", box.remote("mia/nothing", "mia"), "x", check=False)
    assert done.returncode != 0 and "remote: No Space named mia/nothing" in done.stderr


def test_a_space_from_a_url_clones_as_the_revision_it_serves(box, tmp_path):
    source = make_space_repo(tmp_path / "upstream", STATIC)
    sha = git(source, "rev-parse", "HEAD")
    box.store.insert_space({
        "id": "mia/mirror", "source": str(source), "source_display": str(source),
        "stage": stages.RUNNING, "port": 18398, "hardware": "cpu", "desired": "running",
        "created_by": "token:mia", "revision": sha}, "test")
    response = requests.get(f"{box.url}/spaces/mia/mirror/info/refs",
                            params={"service": "git-upload-pack"}, timeout=30)
    assert response.status_code == 404 and "serves no revision yet" in response.text
    ctx = spaces.open_context(box.config)
    checkouts = space_paths(ctx, "mia/mirror")[0]
    ctx.store.close()
    checkouts.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(source), str(checkouts / sha)], check=True)
    run_git(tmp_path, "clone", box.remote("mia/mirror"), "copy")
    assert git(tmp_path / "copy", "rev-parse", "HEAD") == sha


@pytest.mark.parametrize("path", [
    "/spaces/../x/info/refs", "/spaces/..%2Fx/y/info/refs", "/spaces/mia/%2e%2e/info/refs",
    "/spaces/mia/..%2F..%2Fetc/info/refs", "/spaces/mia/-rf/info/refs",
    "/spaces/mia/a%00b/info/refs", "/spaces/mia/" + "n" * 200 + "/info/refs",
])
def test_paths_that_are_not_space_ids_are_refused(box, path):
    conn = http.client.HTTPConnection(box.host, timeout=30)
    conn.request("GET", path + "?service=git-upload-pack")  # sent as is, not normalised
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status in (400, 404), (path, response.status, text)
    assert "# service=" not in text


def test_invalid_space_names_are_refused_with_the_rule(box, tmp_path):
    done = run_git(local_repo(tmp_path), "push", box.remote("mia/-bad", "mia"), "main",
                   check=False)
    assert done.returncode != 0
    assert "remote: Invalid Space id 'mia/-bad': not a Space's git URL" in done.stderr
    assert "each part letters, digits" in done.stderr


def test_the_dumb_protocol_is_refused(box):
    response = requests.get(f"{box.url}/spaces/mia/site/info/refs", timeout=30)
    assert response.status_code == 403
    assert "This box serves git's smart HTTP protocol only" in response.text


def test_two_pushes_to_one_new_name_create_one_space(box, tmp_path):
    repos = [local_repo(tmp_path / str(n), {**STATIC, "index.html": f"<p>{n}</p>\n"})
             for n in range(2)]
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda r=r: results.append(
        run_git(r, "push", box.remote("mia/race", "mia"), "main", check=False)))
        for r in repos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.returncode == 0 for r in results) == [False, True], \
        [r.stderr for r in results]
    assert len([s for s in box.store.list_spaces() if s["id"] == "mia/race"]) == 1
    heads = {git(r, "rev-parse", "HEAD") for r in repos}
    assert hosted.head(box.config, "mia/race") in heads


def test_a_session_cookie_cannot_post_to_git(box):
    """git never sends the portal's cookie; a POST that rides on one came from a web page."""
    from test_web import login

    client = create_app(box.config).test_client()
    assert login(client, "mia", "correct horse battery").status_code == 302
    for path in ("/spaces/mia/site/git-receive-pack", "/spaces/mia/site/git-upload-pack"):
        response = client.post(path, data=b"0000")
        assert response.status_code == 403, path
        assert "git's endpoints do not take the portal's login (CSRF protection)" in \
            response.get_data(as_text=True)


def test_fetching_a_private_space_needs_a_login_on_every_step(box, tmp_path):
    pushed(box, tmp_path, "mia/hidden")
    box.store.update_space("mia/hidden", visibility="private")
    response = requests.post(f"{box.url}/spaces/mia/hidden/git-upload-pack", data=b"0000",
                             headers={"Content-Type": "application/x-git-upload-pack-request"},
                             timeout=30)
    assert response.status_code == 401 and "Log in to see Space mia/hidden" in response.text
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


# -- the real thing: Podman ---------------------------------------------------------------


@pytest.mark.podman
def test_push_deploys_on_podman_with_no_failed_request(appliance_env, tmp_path, monkeypatch):
    """Create a static Space by pushing, push a change while polling the Space's URL (no
    request may fail), then push a revision that cannot build: the old one keeps serving and
    the Space's error says why."""
    monkeypatch.setattr(jobs, "spawn_job", REAL_SPAWN_JOB)  # the box fixture may have replaced it
    ctx, _ = appliance_env
    users.add_user(ctx.store, "pia", "member", "correct horse battery", "test")
    token = users.create_token(ctx.store, "push", "pia", "write", "test")[1]
    server, port = serve(create_app(ctx.config))
    remote = f"http://x:{token}@127.0.0.1:{port}/spaces/pia/e2e"
    try:
        repo = local_repo(tmp_path)
        first = git(repo, "rev-parse", "HEAD")
        done = run_git(repo, "push", remote, "main")
        assert f"remote: Building pia/e2e at {first[:12]}" in done.stderr
        view = wait_for(lambda: serving(ctx, "pia/e2e", first), 600, "the first revision")
        url = view["url"]
        assert "<p>one</p>" in requests.get(url, timeout=10).text

        failures: list[str] = []
        seen: set[str] = set()
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    answer = requests.get(url, timeout=10)
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    seen.add(answer.text.strip())
                except requests.RequestException as exc:
                    failures.append(repr(exc))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        clone = tmp_path / "clone"
        run_git(tmp_path, "clone", remote, str(clone))
        second = commit(clone, {"index.html": "<p>two</p>\n"}, "two")
        done = run_git(clone, "push", "origin", "main")
        assert f"remote: Building pia/e2e at {second[:12]}; {first[:12]} keeps serving" \
            in done.stderr
        wait_for(lambda: serving(ctx, "pia/e2e", second), 600, "the second revision")
        wait_for(lambda: "<p>two</p>" in seen, 60, "the new page through the URL")
        stop.set()
        poller.join()
        assert failures == [], failures[:5]

        third = commit(clone, {"README.md": "---\ntitle: Site\nsdk: cobol\n---\n"}, "broken")
        done = run_git(clone, "push", "origin", "main")
        assert f"remote: Building pia/e2e at {third[:12]}; {second[:12]} keeps serving" \
            in done.stderr
        view = wait_for(lambda: settled(ctx, "pia/e2e"), 600, "the broken build to end")
        assert view["revision"] == second and view["stage"] == stages.CONFIG_ERROR
        assert "cobol" in view["error"]
        assert "<p>two</p>" in requests.get(url, timeout=10).text
    finally:
        server.shutdown()


REAL_SPAWN_JOB = jobs.spawn_job


def serving(ctx, space_id: str, sha: str):
    view = spaces.describe(ctx, space_id)
    if view["stage"] in (stages.BUILD_ERROR, stages.CONFIG_ERROR, stages.RUNTIME_ERROR,
                         stages.NO_APP_FILE):
        raise AssertionError(f"{space_id} failed: {view['error']}")
    return view if view["revision"] == sha and view["stage"] == stages.RUNNING else None


def settled(ctx, space_id: str):
    view = spaces.describe(ctx, space_id)
    return view if view["stage"] not in stages.BUSY else None
