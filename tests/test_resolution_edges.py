"""A Space's package resolution and locks at every edge: the actions, `appliance spaces
packages|resolution|relock`, the API routes, the Settings form and the Space page; with a real
Flask app through its test client, a real CliRunner and a real SQLite file."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from test_web import PASSWORD, csrf_of, logged_in, token_for

from appliance import users
from appliance.adapters.store import open_store
from appliance.cli.main import cli
from appliance.cli.spaces import spaces_group
from appliance.config import load_config
from appliance.core import actions
from appliance.core.spaces import Context
from appliance.errors import InvalidInput
from appliance.gpu.nvml import Inventory
from appliance.web import api
from appliance.web.app import create_app

REVISION = "a" * 40
AS_OF = "2024-10-01T12:00:00Z"
HOSTILE_NAME = "<script>alert(1)</script>"


def wheel(name: str, version: str, filename: str, digit: str) -> str:
    return (f'[[packages]]\nname = "{name}"\nversion = "{version}"\n\n[[packages.wheels]]\n'
            f'url = "https://x.example/{filename}"\nhashes = {{ sha256 = "{digit * 64}" }}\n\n')


LOCK_TEXT = ('lock-version = "1.0"\n\n'
             + wheel("gradio", "4.44.0", "gradio-4.44.0-py3-none-any.whl", "1")
             + wheel("numpy", "2.1.1", "numpy-2.1.1-py3-none-any.whl", "2")
             + wheel(HOSTILE_NAME, "1.0", "evil-1.0-py3-none-any.whl", "3"))
REFUSED = "Package resolution must be one of dated, latest, default, got "
HOSTILE_VALUES = ["dated; rm -rf /", 123, [], "", "x" * 10000, "dated\nlatest", "dated\n",
                  '"dated"', "dated\x00", {"resolution": "dated"}, True, "..", "défault"]


class NoPodman:
    """The runtime seam: Podman is not used by anything these tests reach."""

    def info(self):
        from appliance.errors import RuntimeUnavailable

        raise RuntimeUnavailable("Podman is not used in these tests")

    def logs(self, name, tail=200):
        return "app log line\n"


def make_context(cfg, actor: str) -> Context:
    return Context(cfg, open_store(cfg.db_path), NoPodman(), actor,
                   read_inventory=lambda: Inventory(available=False, reason="no GPU"))


@pytest.fixture
def app(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"), port_range="18000-18099")
    app = create_app(config, context_factory=make_context)
    store = open_store(config.db_path)
    users.add_user(store, "admin", "admin", PASSWORD, "test")
    users.add_user(store, "mia", "member", PASSWORD, "test")
    users.add_user(store, "max", "member", PASSWORD, "test")
    users.add_user(store, "vic", "viewer", PASSWORD, "test")
    for port, (space_id, sdk, visibility, creator) in enumerate((
            ("alice/public", "gradio", "public", "session:mia"),
            ("alice/private", "gradio", "private", "cli:root"),
            ("alice/unbuilt", "streamlit", "public", "session:mia"),
            ("alice/docker", "docker", "public", "session:mia"))):
        store.insert_space({
            "id": space_id, "source": "/src", "source_display": "/src", "stage": "RUNNING",
            "port": 18000 + port, "hardware": "cpu", "desired": "running", "sdk": sdk,
            "title": space_id.split("/")[1].title(), "created_by": creator,
            "visibility": visibility, "manifest": json.dumps({"emoji": "🧪"}),
        }, "test")
    for space_id in ("alice/public", "alice/private", "alice/docker"):
        store.update_space(space_id, revision=REVISION)
    for space_id in ("alice/public", "alice/private"):
        store.save_lock({"space_id": space_id, "revision": REVISION, "resolution": "dated",
                         "as_of": AS_OF, "python": "3.11", "platform": "x86_64-manylinux_2_36",
                         "text": LOCK_TEXT, "sdk_packages": '["gradio", "numpy"]'})
    store.close()
    app.config["store_path"] = config.db_path
    return app


@pytest.fixture
def ctx(app):
    context = make_context(app.extensions["appliance.config"], "test")
    yield context
    context.store.close()


def stored_resolution(app, space_id: str = "alice/public") -> str | None:
    store = open_store(app.config["store_path"])
    try:
        return store.get_space(space_id)["resolution"]
    finally:
        store.close()


def lock_count(app, space_id: str = "alice/public") -> int:
    store = open_store(app.config["store_path"])
    try:
        return len(store.locks(space_id))
    finally:
        store.close()


# -- the actions ------------------------------------------------------------------------------


@pytest.mark.parametrize("value, stored", [
    ("dated", "dated"), ("LATEST", "latest"), ("DATED ", "dated"), ("  Latest  ", "latest"),
    ("default", None), (" DEFAULT", None),
])
def test_resolution_is_read_in_any_case_with_spaces_around(ctx, value, stored):
    view = actions.set_resolution(ctx, "alice/public", value)
    assert view["resolution"] == stored
    assert view["resolution_effective"] == (stored or ctx.config.build_resolution)
    assert ctx.store.get_space("alice/public")["resolution"] == stored


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=repr)
def test_resolution_refuses_anything_else_naming_the_allowed_values(ctx, value):
    actions.set_resolution(ctx, "alice/public", "latest")
    with pytest.raises(InvalidInput) as refused:
        actions.set_resolution(ctx, "alice/public", value)
    assert refused.value.message.startswith(REFUSED)
    assert len(refused.value.message) < 120, "a huge value is not echoed whole"
    assert "default: the box's build_resolution (now dated)" in refused.value.hint
    assert ctx.store.get_space("alice/public")["resolution"] == "latest"


def test_forgetting_locks_counts_them_and_the_view_loses_the_lock(ctx):
    assert ctx.store.get_space("alice/public")["revision"] == REVISION
    assert actions.forget_locks(ctx, "alice/public") == 1
    assert actions.forget_locks(ctx, "alice/public") == 0
    assert ctx.store.locks("alice/public") == []
    assert len(ctx.store.locks("alice/private")) == 1, "another Space's lock is untouched"
    events = [e for e in ctx.store.events("alice/public") if e["kind"] == "locks-forgotten"]
    assert [e["detail"] for e in events] == [{"locks": 0}, {"locks": 1}]  # newest first


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def runner(app, tmp_path):
    return CliRunner(env={
        "APPLIANCE_DATA_DIR": app.extensions["appliance.config"].data_dir,
        "APPLIANCE_PODMAN_URL": "unix:///nonexistent.sock",
        "APPLIANCE_PODMAN_AUTOSTART": "false",
        "APPLIANCE_CONFIG_FILE": "/nonexistent",
        "APPLIANCE_ACTOR": "cli:tester",
    })


def run(runner, *args):
    return runner.invoke(cli, list(args), obj={}, prog_name="appliance")


def test_packages_command_prints_the_lock_header_and_one_row_per_package(runner):
    result = run(runner, "spaces", "packages", "alice/public")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"Resolved dated as of 2024-10-01T12:00:00Z for Python 3\.11 "
                        r"\(x86_64-manylinux_2_36\), locked \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                        lines[0]), lines[0]
    assert [line.split() for line in lines[1:]] == [
        ["gradio", "4.44.0"], ["numpy", "2.1.1"], ["<script>alert(1)</script>", "1.0"]]


def test_packages_command_json_is_the_lock_of_show_json(runner):
    result = run(runner, "spaces", "packages", "alice/public", "--json")
    assert result.exit_code == 0, result.output
    lock = json.loads(result.stdout)
    shown = json.loads(run(runner, "spaces", "show", "alice/public", "--json").stdout)
    assert lock == shown["lock"]
    assert lock["revision"] == REVISION and lock["as_of"] == AS_OF
    assert lock["packages"][0] == {"name": "gradio", "version": "4.44.0"}
    result = run(runner, "spaces", "packages", "alice/unbuilt", "--json")
    assert (result.exit_code, json.loads(result.stdout)) == (0, None)


@pytest.mark.parametrize("space_id, says", [
    ("alice/docker", "alice/docker is a docker Space: the appliance locks no Python packages "
                     "for it (its Dockerfile installs its own)."),
    ("alice/unbuilt", "alice/unbuilt has not been built yet: its packages are locked when a "
                      "revision is first built."),
])
def test_packages_command_says_why_there_is_no_lock(runner, space_id, says):
    result = run(runner, "spaces", "packages", space_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(says)


def test_packages_command_for_a_built_revision_without_a_lock_says_what_comes_next(runner):
    assert run(runner, "spaces", "relock", "alice/public").exit_code == 0
    result = run(runner, "spaces", "packages", "alice/public")
    assert result.stdout.strip() == (
        "No packages are locked for revision aaaaaaaaaaaa of alice/public (built before locks "
        "were kept, or its locks were forgotten); the next build resolves them dated, as of "
        "each revision's commit time.")


def test_packages_command_for_an_unknown_space_says_so(runner):
    result = run(runner, "spaces", "packages", "alice/none")
    assert result.exit_code == 1 and "No Space named alice/none" in result.output


def test_resolution_command_sets_it_and_says_what_the_next_build_does(runner, app):
    result = run(runner, "spaces", "resolution", "alice/public", "LATEST ")
    assert result.exit_code == 0, result.output
    assert ("alice/public's next unlocked build resolves its packages latest, with the newest "
            "versions at build time (its own choice); revisions already locked keep their "
            "lock (to resolve again: appliance spaces relock alice/public)") in result.stderr
    assert "Public (alice/public)" in result.stdout
    assert stored_resolution(app) == "latest"
    result = run(runner, "spaces", "resolution", "alice/public", "default", "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert (view["resolution"], view["resolution_effective"]) == (None, "dated")
    assert stored_resolution(app) is None


@pytest.mark.parametrize("value", ["dated; rm -rf /", "", "x" * 10000, "dated\nlatest",
                                   "'dated'", "123"])
def test_resolution_command_refuses_other_values_with_exit_code_2(runner, app, value):
    result = run(runner, "spaces", "resolution", "alice/public", value)
    assert result.exit_code == 2, result.output
    assert f"Error: {REFUSED}" in result.stderr
    assert "Hint: dated: as of the revision's commit time" in result.stderr
    assert len(result.stderr) < 400
    assert stored_resolution(app) is None


def test_relock_command_says_how_many_and_names_the_rebuild_command(runner, app):
    result = run(runner, "spaces", "relock", "alice/public")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        "Forgot 1 package lock of alice/public; its next build resolves its packages again "
        "(dated, as of each revision's commit time). Rebuild now: appliance spaces restart "
        "alice/public --factory")
    assert lock_count(app) == 0
    result = run(runner, "spaces", "relock", "alice/public", "--json")
    assert json.loads(result.stdout) == {"ok": True, "forgotten": 0}
    restart = spaces_group.commands["restart"]  # the command the message names exists
    assert "--factory" in {opt for param in restart.params for opt in param.opts}


def test_relock_command_for_an_unknown_space_says_so(runner):
    result = run(runner, "spaces", "relock", "alice/none")
    assert result.exit_code == 1 and "No Space named alice/none" in result.output


# -- the API ----------------------------------------------------------------------------------

URL = "/api/v1/spaces/alice/public"


@pytest.mark.parametrize("body, stored", [
    ({"resolution": "latest"}, "latest"), ({"resolution": "DATED "}, "dated"),
    ({"resolution": "default"}, None), ({"resolution": None}, None),
])
def test_api_sets_the_resolution_and_answers_the_space(app, body, stored):
    headers = token_for(app, "mia", "write")  # mia added alice/public
    if stored is None:
        app.test_client().put(f"{URL}/resolution", json={"resolution": "latest"},
                              headers=headers)
    response = app.test_client().put(f"{URL}/resolution", json=body, headers=headers)
    assert response.status_code == 200, response.json
    assert response.json["id"] == "alice/public" and response.json["resolution"] == stored
    assert response.json["lock"]["revision"] == REVISION
    assert stored_resolution(app) == stored


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=repr)
def test_api_refuses_other_values_in_the_envelope(app, value):
    response = app.test_client().put(f"{URL}/resolution", json={"resolution": value},
                                     headers=token_for(app, "admin", "write"))
    assert response.status_code == 400
    assert response.json["ok"] is False and response.json["error"].startswith(REFUSED)
    assert len(response.json["error"]) < 120
    assert stored_resolution(app) is None


def test_api_refuses_a_body_without_resolution(app):
    headers = token_for(app, "admin", "write")
    response = app.test_client().put(f"{URL}/resolution", json={"resolutoin": "dated"},
                                     headers=headers)
    assert response.status_code == 400
    assert response.json["error"] == "'resolution' is required: dated, latest, default or null"
    response = app.test_client().put(f"{URL}/resolution", json=["dated"], headers=headers)
    assert response.json["error"] == "The request body must be a JSON object"


def test_api_forgets_the_locks_and_counts_them(app):
    headers = token_for(app, "admin", "write")
    response = app.test_client().delete(f"{URL}/lock", headers=headers)
    assert (response.status_code, response.json) == (200, {"ok": True, "forgotten": 1})
    response = app.test_client().delete(f"{URL}/lock", headers=headers)
    assert response.json == {"ok": True, "forgotten": 0}
    assert app.test_client().get(f"{URL}/packages").json is None
    assert lock_count(app, "alice/private") == 1


def test_api_packages_is_the_lock_or_null_and_follows_visibility(app):
    lock = app.test_client().get(f"{URL}/packages").json
    assert lock["resolution"] == "dated" and lock["as_of"] == AS_OF
    assert lock["python"] == "3.11" and lock["platform"] == "x86_64-manylinux_2_36"
    assert [p["name"] for p in lock["packages"]] == ["gradio", "numpy", HOSTILE_NAME]
    assert app.test_client().get("/api/v1/spaces/alice/unbuilt/packages").json is None
    assert app.test_client().get("/api/v1/spaces/alice/docker/packages").json is None
    private = "/api/v1/spaces/alice/private/packages"
    assert app.test_client().get(private).status_code == 401
    assert app.test_client().get(private, headers=token_for(app, "vic", "read")).json[
        "revision"] == REVISION
    assert app.test_client().get("/api/v1/spaces/alice/none/packages").status_code == 404


@pytest.mark.parametrize("method, path, body", [
    ("PUT", "resolution", {"resolution": "latest"}), ("DELETE", "lock", None),
])
def test_api_changes_need_the_right_caller(app, method, path, body):
    def call(space: str, headers: dict[str, str] | None = None, client=None):
        return (client or app.test_client()).open(
            f"/api/v1/spaces/alice/{space}/{path}", method=method, json=body,
            headers=headers or {})

    assert call("public").status_code in (401, 403)  # anonymous: no token, no session
    response = call("public", token_for(app, "vic", "read"))
    assert response.status_code == 403 and "read-only" in response.json["error"]
    response = call("public", token_for(app, "max", "write"))  # a member, not the one who added it
    assert response.status_code == 403
    assert response.json["error"] == ("Only an admin or the member who added alice/public may "
                                      "change it")
    response = call("private", token_for(app, "mia", "write"))
    assert response.status_code == 403 and "Only an admin" in response.json["error"]
    viewer = logged_in(app, "vic")
    token = csrf_of(viewer.get("/account").data)
    response = call("public", {"X-CSRF-Token": token}, viewer)
    assert response.status_code == 403
    assert response.json["error"] == "vic is a viewer and may not change Spaces"
    assert stored_resolution(app) is None and lock_count(app) == 1


@pytest.mark.parametrize("method, path, body", [
    ("PUT", "resolution", {"resolution": "latest"}), ("DELETE", "lock", None),
])
def test_api_changes_with_the_login_cookie_need_the_csrf_header(app, method, path, body):
    client = logged_in(app, "mia")
    response = client.open(f"{URL}/{path}", method=method, json=body)
    assert response.status_code == 403 and "CSRF check failed" in response.json["error"]
    assert stored_resolution(app) is None and lock_count(app) == 1
    token = csrf_of(client.get("/account").data)
    response = client.open(f"{URL}/{path}", method=method, json=body,
                           headers={"X-CSRF-Token": token})
    assert response.status_code == 200, response.json


def test_openapi_document_lists_the_three_routes():
    paths = api.openapi_document()["paths"]
    space = "/api/v1/spaces/{owner}/{name}"
    assert paths[f"{space}/resolution"]["put"]["x-required-access"] == "write"
    assert paths[f"{space}/lock"]["delete"]["security"]
    assert paths[f"{space}/packages"]["get"]["x-required-access"] == "read"


# -- the pages --------------------------------------------------------------------------------

SETTINGS = "/spaces/alice/public/settings"


def test_settings_page_has_the_python_packages_form_with_the_box_default(app):
    page = logged_in(app, "mia").get(SETTINGS).data.decode()
    assert "<h2>Python packages</h2>" in page
    assert ('<option value="default" selected>Default — the box\'s (dated)</option>'
            in page)
    assert 'action="/spaces/alice/public/settings/resolution"' in page
    assert 'action="/spaces/alice/public/settings/relock"' in page
    assert "Resolve again at the next build" in page
    assert "Revision aaaaaaaaaa is locked (dated, as of 2024-10-01T12:00:00Z, 3 packages)" in page


def test_settings_form_saves_the_resolution(app):
    client = logged_in(app, "mia")
    token = csrf_of(client.get(SETTINGS).data)
    response = client.post(f"{SETTINGS}/resolution", data={"resolution": "Latest ",
                                                           "csrf_token": token})
    assert response.status_code == 302 and response.location.endswith(SETTINGS)
    assert stored_resolution(app) == "latest"
    page = client.get(SETTINGS).data.decode()
    assert '<option value="latest" selected>' in page and "Saved" in page
    client.post(f"{SETTINGS}/resolution", data={"resolution": "default", "csrf_token": token})
    assert stored_resolution(app) is None


@pytest.mark.parametrize("value", ["dated; rm -rf /", "", "x" * 10000, '"><b>x</b>'])
def test_settings_form_shows_a_bad_resolution_like_the_other_settings(app, value):
    client = logged_in(app, "admin")
    token = csrf_of(client.get(SETTINGS).data)
    response = client.post(f"{SETTINGS}/resolution", data={"resolution": value,
                                                           "csrf_token": token})
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "Package resolution must be one of dated, latest, default, got " in page
    assert "<b>x</b>" not in page and len(page) < 20000
    assert stored_resolution(app) is None


def test_settings_form_without_a_resolution_field_is_refused(app):
    client = logged_in(app, "admin")
    token = csrf_of(client.get(SETTINGS).data)
    response = client.post(f"{SETTINGS}/resolution", data={"csrf_token": token})
    assert response.status_code == 400
    assert b"Package resolution must be one of dated, latest, default, got &#39;&#39;" in (
        response.data)


def test_resolve_again_button_forgets_the_locks_and_says_so(app):
    client = logged_in(app, "mia")
    token = csrf_of(client.get(SETTINGS).data)
    response = client.post(f"{SETTINGS}/relock", data={"csrf_token": token})
    assert response.status_code == 302
    page = client.get(SETTINGS).data.decode()
    assert ("Forgot 1 package lock: the next build resolves the packages again (Factory "
            "rebuild builds now)") in page
    assert lock_count(app) == 0
    assert "Packages (" not in client.get("/spaces/alice/public").data.decode()


@pytest.mark.parametrize("what", ["resolution", "relock"])
def test_settings_forms_refuse_a_missing_csrf_token(app, what):
    client = logged_in(app, "mia")
    response = client.post(f"{SETTINGS}/{what}", data={"resolution": "latest"})
    assert response.status_code == 403 and b"CSRF check failed" in response.data
    assert stored_resolution(app) is None and lock_count(app) == 1


@pytest.mark.parametrize("what", ["resolution", "relock"])
def test_settings_forms_refuse_a_viewer_and_another_member(app, what):
    for user, says in (("vic", b"vic is a viewer and may not change Spaces"),
                       ("max", b"Only an admin or the member who added alice/public")):
        client = logged_in(app, user)
        token = csrf_of(client.get("/account").data)
        response = client.post(f"{SETTINGS}/{what}", data={"resolution": "latest",
                                                            "csrf_token": token})
        assert response.status_code == 403 and says in response.data, user
        assert client.get(SETTINGS).status_code == 403
    assert stored_resolution(app) is None and lock_count(app) == 1


def test_space_page_lists_the_locked_packages_collapsed(app):
    page = app.test_client().get("/spaces/alice/public").data.decode()
    details = re.search(r'<details class="panel packages">(.*?)</details>', page, re.S)
    assert details, "no packages panel"
    assert ("<summary>Packages (3) — resolved dated as of 2024-10-01T12:00:00Z for Python "
            "3.11</summary>") in details.group(1)
    assert "<code>gradio==4.44.0</code>" in details.group(1)
    assert "<code>numpy==2.1.1</code>" in details.group(1)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;==1.0" in details.group(1)
    assert "<script>alert(1)" not in page
    assert "<details open" not in page


def test_space_page_says_latest_without_a_date(app):
    store = open_store(app.config["store_path"])
    store.save_lock({"space_id": "alice/public", "revision": REVISION, "resolution": "latest",
                     "as_of": None, "python": "3.12", "platform": "aarch64-manylinux_2_36",
                     "text": LOCK_TEXT, "sdk_packages": '["gradio"]'})
    store.close()
    page = app.test_client().get("/spaces/alice/public").data.decode()
    assert ("<summary>Packages (3) — resolved latest with the newest versions then for Python "
            "3.12</summary>") in page


@pytest.mark.parametrize("space_id", ["alice/unbuilt", "alice/docker"])
def test_space_page_shows_no_packages_without_a_lock(app, space_id):
    page = app.test_client().get(f"/spaces/{space_id}").data.decode()
    assert "Packages (" not in page and "panel packages" not in page
