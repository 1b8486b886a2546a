"""Who may name a Space what, and what a Space may reach because of where it came from: an
owner name that is another portal user's is theirs; only a Space really imported from an
offline bundle reads the shared model cache (never one whose member set HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import shutil

import pytest
import requests
from conftest import as_service, make_space_repo, space_port_range

from appliance import stages, users
from appliance.config import load_config
from appliance.core import spaces
from appliance.errors import Forbidden, SourceError

PASSWORD = "correct horse battery"
STATIC = {"README.md": "---\nsdk: static\n---\n", "index.html": "<p>hi</p>\n"}


@pytest.fixture
def box(tmp_path):
    """A context on a fresh data dir (no Podman is reached), with three portal users."""
    sources_dir = tmp_path / "sources"
    sources_dir.mkdir()
    config = load_config({}, data_dir=str(tmp_path / "data"), local_sources=str(sources_dir),
                         port_range=space_port_range())
    ctx = spaces.open_context(config, actor="cli")
    for name, role in (("alice", "member"), ("bob", "member"), ("root", "admin"),
                       ("Vic", "viewer")):
        users.add_user(ctx.store, name, role, PASSWORD, "test")
    repo = make_space_repo(sources_dir / "demo", STATIC)
    yield ctx, repo
    ctx.store.close()


@pytest.mark.parametrize("actor", ["session:bob", "token:bob"])
@pytest.mark.parametrize(("owner", "user"), [
    ("alice", "alice"), ("ALICE", "alice"), ("root", "root"), ("Root", "root"),
    ("vic", "Vic"),
])
def test_a_member_may_not_name_a_space_under_another_users_name(box, actor, owner, user):
    ctx, repo = box
    ctx.actor = actor
    with pytest.raises(Forbidden) as caught:
        spaces.add_space(ctx, str(repo), name=f"{owner}/demo")
    assert caught.value.message == (
        f"The owner {owner!r} of {owner}/demo is the name of the portal user {user}: only "
        f"{user} or an admin may add Spaces under it")
    assert caught.value.hint == (
        "name it bob/demo (your own name), or use an owner that is not a portal user's name, "
        "such as the organisation of the source repository")
    assert ctx.store.find_space(f"{owner}/demo") is None


@pytest.mark.parametrize("owner", ["bob", "Bob", "some-org", "local"])
def test_a_member_may_use_their_own_name_or_one_no_user_has(box, owner):
    ctx, repo = box
    ctx.actor = "session:bob"
    with pytest.raises(Forbidden):
        spaces.add_space(ctx, str(repo), name=f"alice/{owner}")
    assert spaces.add_space(ctx, str(repo), name=f"{owner}/demo")["id"] == f"{owner}/demo"
    assert ctx.store.get_space(f"{owner}/demo")["created_by"] == "session:bob"


def test_the_default_name_is_checked_too(box, tmp_path):
    ctx, _ = box
    ctx.actor = "token:bob"
    repo = make_space_repo(tmp_path / "sources" / "alice" / "demo", STATIC)
    # A local source's default id is local/<name>: not a user, so it is fine ...
    assert spaces.add_space(ctx, str(repo))["id"] == "local/demo"
    # ... and a user named "local" makes it that user's.
    users.add_user(ctx.store, "local", "member", PASSWORD, "test")
    with pytest.raises(Forbidden, match="is the name of the portal user local"):
        spaces.add_space(ctx, str(repo), name=None)


@pytest.mark.parametrize("actor", ["session:root", "token:root", "cli"])
def test_admins_and_the_box_itself_may_use_any_owner(box, actor):
    ctx, repo = box
    ctx.actor = "token:bob"
    with pytest.raises(Forbidden):
        spaces.add_space(ctx, str(repo), name="alice/demo")
    ctx.actor = actor
    assert spaces.add_space(ctx, str(repo), name="alice/demo")["id"] == "alice/demo"


def test_a_member_cannot_add_a_bundled_repository_as_a_source(box):
    ctx, _ = box
    ctx.actor = "session:bob"
    imported = make_space_repo(ctx.config.imported_repos_path / "team--demo", STATIC)
    with pytest.raises(SourceError) as caught:
        spaces.add_space(ctx, str(imported), name="bob/copy")
    assert caught.value.message == (
        f"Source {imported.resolve()} is the appliance's copy of a Space imported from a "
        "bundle; it cannot be the source of another Space")
    assert "APPLIANCE_LOCAL_SOURCES" in caught.value.hint
    # Not through a link from an allowed directory either.
    link = ctx.config.local_source_roots[0] / "innocent"
    link.symlink_to(imported)
    with pytest.raises(SourceError, match="imported from a bundle"):
        spaces.add_space(ctx, str(link), name="bob/copy")
    assert ctx.store.find_space("bob/copy") is None
    # Nor when an admin's setting allows the whole data dir: the rule is about the path.
    wide = ctx.config.with_values(local_sources=str(ctx.config.data_path))
    ctx.config = wide
    with pytest.raises(SourceError, match="imported from a bundle"):
        spaces.add_space(ctx, str(imported), name="bob/copy")
    # The import itself may.
    ctx.actor = "cli"
    spaces.add_space(ctx, str(imported), name="team/demo", from_bundle=True)
    assert spaces.is_from_bundle(ctx, ctx.store.get_space("team/demo"))


# -- on real Podman: the shared model cache ---------------------------------------------------

DOCKER = {
    "README.md": "---\nsdk: docker\napp_port: 8000\n---\n",
    "Dockerfile": "FROM localhost/appliance-python:3.11\nWORKDIR /srv\nCOPY v.txt .\n"
                  "CMD [\"python3\", \"-m\", \"http.server\", \"8000\"]\n",
    "v.txt": "hello\n",
}


def _mounts(container: str) -> dict[str, dict]:
    out = as_service("podman", "inspect", "--format", "{{json .Mounts}}", container).stdout
    return {m["Destination"]: m for m in json.loads(out)}


def _networks(container: str) -> list[str]:
    out = as_service("podman", "inspect", "--format", "{{json .NetworkSettings.Networks}}",
                     container).stdout
    return list(json.loads(out) or {})


@pytest.mark.podman
def test_hf_hub_offline_set_by_a_member_does_not_mount_the_shared_cache(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "policy-member", DOCKER)
    spaces.add_space(ctx, str(repo), name="policy/member")
    spaces.set_value(ctx, "variables", "policy/member", "HF_HUB_OFFLINE", "1")
    view = spaces.deploy(ctx, "policy/member")
    assert view["stage"] == stages.RUNNING, view["error"]
    container = ctx.store.get_space("policy/member")["container"]
    mounts = _mounts(container)
    assert spaces.HF_HOME not in mounts, mounts
    assert not any(m.get("Name") == spaces.HF_CACHE_VOLUME for m in mounts.values()), mounts
    assert mounts["/data"]["Name"] == spaces.data_volume("policy/member")
    assert spaces.offline_network("policy/member") not in _networks(container)
    spaces.delete(ctx, "policy/member")


@pytest.mark.podman
def test_a_space_imported_from_a_bundle_reads_the_shared_cache(appliance_env):
    ctx, _ = appliance_env
    # What bundles.import_bundle does: the repository under <data_dir>/repos, added by the
    # import (the models come into the shared cache volume beside it).
    repo = make_space_repo(ctx.config.imported_repos_path / "policy--bundled", DOCKER)
    try:
        spaces.add_space(ctx, str(repo), name="policy/bundled", from_bundle=True)
        view = spaces.deploy(ctx, "policy/bundled")
        assert view["stage"] == stages.RUNNING, view["error"]
        assert requests.get(view["url"] + "v.txt", timeout=5).text == "hello\n"
        container = ctx.store.get_space("policy/bundled")["container"]
        mounts = _mounts(container)
        assert mounts[spaces.HF_HOME]["Name"] == spaces.HF_CACHE_VOLUME
        assert mounts[spaces.HF_HOME]["RW"] is False
        assert _networks(container) == [spaces.offline_network("policy/bundled")]
    finally:
        spaces.delete(ctx, "policy/bundled")
        shutil.rmtree(repo, ignore_errors=True)
