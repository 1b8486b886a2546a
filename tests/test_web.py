"""The portal in-process (Flask's test client, a real SQLite file): pages, the JSON API, users,
tokens, sessions, CSRF, roles, visibility, the error envelope, and the OpenAPI document."""

from __future__ import annotations

import json
import re

import pytest

from appliance import users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.gpu.nvml import Inventory
from appliance.web import api
from appliance.web.app import create_app

PASSWORD = "correct horse battery"
SECRET_VALUE = "s3cr3t-value-that-must-never-show"


class NoPodman:
    """The runtime seam for pages that ask Podman: it is not reachable in these tests."""

    def info(self):
        from appliance.errors import RuntimeUnavailable

        raise RuntimeUnavailable("Podman is not used in these tests")

    def logs(self, name, tail=200):
        return "app log line\n"


@pytest.fixture
def app(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"), port_range="18000-18099")

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), NoPodman(), actor,
                       read_inventory=lambda: Inventory(available=False, reason="no GPU"))

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    users.add_user(store, "admin", "admin", PASSWORD, "test")
    users.add_user(store, "mia", "member", PASSWORD, "test")
    users.add_user(store, "vic", "viewer", PASSWORD, "test")
    for space_id, visibility, creator in (("alice/public", "public", "session:mia"),
                                          ("alice/private", "private", "cli:root")):
        store.insert_space({
            "id": space_id, "source": "/src", "source_display": "/src", "stage": "RUNNING",
            "port": 18000 + len(visibility), "hardware": "cpu", "desired": "running",
            "sdk": "gradio", "title": space_id.split("/")[1].title(), "created_by": creator,
            "visibility": visibility,
            "manifest": json.dumps({"emoji": "🧪", "colorFrom": "blue", "colorTo": "green",
                                    "short_description": f"the {visibility} one",
                                    "tags": [visibility], "pinned": visibility == "private"}),
        }, "test")
    store.set_kv("secrets", "alice/public", "API_KEY", SECRET_VALUE, "test")
    store.close()
    app.config["store_path"] = config.db_path
    return app


def csrf_of(page: bytes) -> str:
    found = re.search(rb'name="csrf_token" value="([^"]+)"', page)
    assert found, "the page has no CSRF field"
    return found.group(1).decode()


def login(client, name: str, password: str = PASSWORD):
    token = csrf_of(client.get("/login").data)
    return client.post("/login", data={"username": name, "password": password,
                                       "csrf_token": token})


def logged_in(app, name: str):
    client = app.test_client()
    assert login(client, name).status_code == 302
    return client


def token_for(app, user: str, scope: str) -> dict[str, str]:
    store = open_store(app.config["store_path"])
    _, token = users.create_token(store, f"{user}-{scope}", user, scope, "test")
    store.close()
    return {"Authorization": f"Bearer {token}"}


# -- pages ------------------------------------------------------------------------------------


def test_home_shows_cards_pinned_first_and_hides_private_spaces_from_visitors(app):
    anonymous = app.test_client().get("/").data.decode()
    assert "Public" in anonymous and "the public one" in anonymous
    assert "alice/private" not in anonymous
    assert "linear-gradient" not in anonymous  # the gradient lives in the stylesheet
    assert "--c-blue" in anonymous and "--c-green" in anonymous
    page = logged_in(app, "vic").get("/").data.decode()
    assert page.index("alice/private") < page.index("alice/public"), "pinned first"


def test_home_search_and_filters(app):
    client = logged_in(app, "admin")
    assert "alice/private" not in client.get("/?q=public").data.decode()
    assert "alice/public" not in client.get("/?tag=private").data.decode()
    assert "No Space matches" in client.get("/?sdk=streamlit").data.decode()
    assert "alice/public" in client.get("/?stage=running").data.decode()


def test_space_page_embeds_the_app_from_the_apps_origin(app):
    page = app.test_client().get("/spaces/alice/public").data.decode()
    assert 'id="app"' in page and 'src="http://localhost:8081/s/alice--public/"' in page
    app.extensions["appliance.config"].values["portal_apps_port"] = 0
    page = app.test_client().get("/spaces/alice/public").data.decode()
    assert 'src="/s/alice--public/"' in page


def test_private_space_page_sends_visitors_to_login_and_404s_nothing_else(app):
    response = app.test_client().get("/spaces/alice/private")
    assert response.status_code == 302 and "/login?next=" in response.location
    assert logged_in(app, "vic").get("/spaces/alice/private").status_code == 200
    assert app.test_client().get("/spaces/alice/nothing").status_code == 404


def test_portal_without_public_access_requires_login(app, tmp_path):
    app.extensions["appliance.config"].values["portal_public"] = False
    response = app.test_client().get("/")
    assert response.status_code == 302 and "/login" in response.location


def test_login_failure_says_so_and_is_rate_limited_per_client(app):
    client = app.test_client()
    response = login(client, "admin", "wrong password!")
    assert response.status_code == 401 and b"Wrong user name or password" in response.data
    for _ in range(app.extensions["appliance.config"].login_attempts - 1):
        login(client, "nobody", "wrong password!")
    response = login(client, "admin")  # even the right password is refused for a while
    assert response.status_code == 429 and b"Too many failed logins" in response.data


def test_session_cookie_is_httponly_and_samesite(app):
    client = app.test_client()
    token = csrf_of(client.get("/login").data)
    response = client.post("/login", data={"username": "admin", "password": PASSWORD,
                                           "csrf_token": token})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_login_next_never_redirects_off_the_portal(app):
    client = app.test_client()
    token = csrf_of(client.get("/login").data)
    response = client.post("/login", data={"username": "admin", "password": PASSWORD,
                                           "csrf_token": token, "next": "//evil.example/x"})
    assert response.location == "/"


def test_setup_page_only_from_localhost_and_only_without_an_admin(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "fresh"))
    app = create_app(config)
    remote = app.test_client().get("/setup", environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert remote.status_code == 403 and b"only be created from the box itself" in remote.data
    client = app.test_client()
    token = csrf_of(client.get("/setup").data)
    response = client.post("/setup", data={"username": "root", "password": PASSWORD,
                                           "csrf_token": token})
    assert response.status_code == 302
    assert client.get("/api/v1/whoami").json["role"] == "admin"
    assert app.test_client().get("/setup").status_code == 302  # gone once an admin exists


def test_settings_show_secret_names_never_values(app):
    page = logged_in(app, "admin").get("/spaces/alice/public/settings").data.decode()
    assert "API_KEY" in page and SECRET_VALUE not in page


def test_members_manage_their_own_spaces_only(app):
    client = logged_in(app, "mia")
    assert client.get("/spaces/alice/public/settings").status_code == 200
    response = client.get("/spaces/alice/private/settings")
    assert response.status_code == 403 and b"Only an admin or the member" in response.data


def test_forms_set_and_delete_variables_and_secrets(app):
    client = logged_in(app, "mia")
    page = client.get("/spaces/alice/public/settings").data
    token = csrf_of(page)
    client.post("/spaces/alice/public/variables", data={"key": "MODEL", "value": "tiny",
                                                         "csrf_token": token})
    client.post("/spaces/alice/public/secrets", data={"key": "TOKEN", "value": SECRET_VALUE,
                                                       "csrf_token": token})
    page = client.get("/spaces/alice/public/settings").data.decode()
    assert "MODEL" in page and "tiny" in page and "TOKEN" in page
    assert SECRET_VALUE not in page
    client.post("/spaces/alice/public/variables/MODEL/delete", data={"csrf_token": token})
    page = client.get("/spaces/alice/public/settings").data.decode()
    assert "Deleted variable MODEL" in page and "<code>MODEL</code>" not in page
    bad = client.post("/spaces/alice/public/variables", data={"key": "1BAD", "value": "x",
                                                               "csrf_token": token})
    assert bad.status_code == 400 and b"is not valid" in bad.data


def test_settings_forms_change_visibility_and_sleep_time(app):
    client = logged_in(app, "admin")
    token = csrf_of(client.get("/spaces/alice/public/settings").data)
    client.post("/spaces/alice/public/settings/visibility",
                data={"visibility": "private", "csrf_token": token})
    assert app.test_client().get("/spaces/alice/public").status_code == 302
    response = client.post("/spaces/alice/public/settings/sleep",
                           data={"seconds": "soon", "csrf_token": token})
    assert response.status_code == 400
    assert b"Sleep time must be a duration like 30m, 2h, 1h30m or 3600 (seconds), or " \
        b"&#39;never&#39;; got &#39;soon&#39;" in response.data


def test_add_space_form_shows_a_bad_source_and_keeps_the_input(app):
    client = logged_in(app, "mia")
    token = csrf_of(client.get("/new").data)
    response = client.post("/new", data={"source": "ext::sh -c id", "csrf_token": token})
    page = response.data.decode()
    assert response.status_code == 400 and "ext::sh -c id" in page
    assert 'class="flash error"' in page


def test_viewer_cannot_open_the_add_form(app):
    assert logged_in(app, "vic").get("/new").status_code == 403


def test_system_page_shows_checks_and_events(app):
    page = logged_in(app, "admin").get("/system").data.decode()
    assert "Host checks" in page and "api-socket" in page and "created" in page
    assert app.test_client().get("/system").status_code == 302


def test_account_page_creates_a_token_shown_once(app):
    client = logged_in(app, "mia")
    token = csrf_of(client.get("/account").data)
    page = client.post("/account/tokens", data={"name": "laptop", "scope": "write",
                                                "csrf_token": token}).data.decode()
    value = re.search(r'id="new-token">(apl_[^<]+)<', page).group(1)
    assert value not in client.get("/account").data.decode()
    who = app.test_client().get("/api/v1/whoami", headers={"Authorization": f"Bearer {value}"})
    assert who.json["user"] == "mia" and who.json["scope"] == "write"


def test_viewer_gets_read_tokens_only(app):
    client = logged_in(app, "vic")
    token = csrf_of(client.get("/account").data)
    response = client.post("/account/tokens", data={"name": "t", "scope": "write",
                                                    "csrf_token": token})
    assert response.status_code == 403 and b"only read tokens" in response.data


# -- API --------------------------------------------------------------------------------------


def test_api_lists_and_shows_spaces_with_the_contract_fields(app):
    listed = app.test_client().get("/api/v1/spaces").json
    assert [s["id"] for s in listed] == ["alice/public"]
    shown = app.test_client().get("/api/v1/spaces/alice/public").json
    for key in ("id", "stage", "sdk", "revision", "url", "error", "hardware"):
        assert key in shown


def test_api_errors_use_one_envelope(app):
    response = app.test_client().get("/api/v1/spaces/alice/none")
    assert response.status_code == 404
    assert response.json == {"ok": False, "error": "No Space named alice/none",
                             "hint": response.json["hint"], "status": 404}
    response = app.test_client().post("/api/v1/spaces", json={},
                                      headers=token_for(app, "mia", "write"))
    assert response.status_code == 400 and "'source' is required" in response.json["error"]
    assert app.test_client().get("/api/v1/nothing").json["status"] == 404


def test_bad_token_is_refused_not_treated_as_anonymous(app):
    response = app.test_client().get("/api/v1/spaces",
                                     headers={"Authorization": "Bearer apl_forged"})
    assert response.status_code == 401 and "not valid" in response.json["error"]


def test_revoked_token_stops_working_and_last_use_is_recorded(app):
    headers = token_for(app, "mia", "read")
    assert app.test_client().get("/api/v1/whoami", headers=headers).json["user"] == "mia"
    store = open_store(app.config["store_path"])
    row = store.list_tokens("mia")[0]
    assert row["last_used_at"]
    store.revoke_token(row["id"], "test")
    store.close()
    assert app.test_client().get("/api/v1/whoami", headers=headers).status_code == 401


def test_api_secrets_are_names_only(app):
    headers = token_for(app, "admin", "write")
    response = app.test_client().put("/api/v1/spaces/alice/public/secrets/NEW",
                                     json={"value": SECRET_VALUE}, headers=headers)
    assert response.status_code == 200 and SECRET_VALUE not in response.get_data(as_text=True)
    listed = app.test_client().get("/api/v1/spaces/alice/public/secrets", headers=headers)
    assert {r["key"] for r in listed.json} == {"API_KEY", "NEW"}
    assert SECRET_VALUE not in listed.get_data(as_text=True)


def test_api_visibility_and_events(app):
    headers = token_for(app, "admin", "write")
    response = app.test_client().put("/api/v1/spaces/alice/public/visibility",
                                     json={"visibility": "private"}, headers=headers)
    assert response.json["visibility"] == "private"
    assert app.test_client().get("/api/v1/spaces").json == []
    events = app.test_client().get("/api/v1/events", headers=headers).json
    assert events[0]["kind"] == "visibility" and events[0]["actor"] == "token:admin"


def test_openapi_document_matches_the_routes(tmp_path):
    app = create_app(load_config({}, data_dir=str(tmp_path)))
    documented = {(path, method.upper()) for path, ops in
                  api.openapi_document()["paths"].items() for method in ops}
    served = {(api.openapi_path(rule.rule), method) for rule in app.url_map.iter_rules()
              if rule.rule.startswith(api.PREFIX)
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == served
    assert app.test_client().get("/api/v1/openapi.json").json["openapi"].startswith("3.")


# -- every mutating route is guarded ----------------------------------------------------------

SAMPLES = {"owner": "alice", "name": "public", "action": "restart", "kind": "variables",
           "key": "KEY", "token_id": "1", "what": "visibility", "path": "x"}
OPEN = {"/login", "/setup", "/logout"}  # open to visitors by design (CSRF still applies)
SESSION_ONLY = {"/account/tokens", "/account/tokens/1/revoke",  # no token acts here at all
                "/account/password"}
# git's fetch negotiation is a read that git sends as a POST: anyone who may see the Space may
# make it (tests/test_git_push.py checks it follows the Space's visibility).
READ_BY_POST = {"/spaces/alice/public/git-upload-pack"}


def mutating_urls(app) -> list[tuple[str, str]]:
    found = []
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods & {"POST", "PUT", "PATCH", "DELETE"}):
            url = rule.rule
            for arg in rule.arguments:
                url = re.sub(rf"<(?:[^<>]*:)?{arg}>", SAMPLES.get(arg, "x"), url)
            found.append((method, url))
    return found


def test_there_are_mutating_routes_to_check(app):
    assert len(mutating_urls(app)) >= 20


def test_every_mutating_route_refuses_anonymous_callers(app):
    for method, url in mutating_urls(app):
        if url in OPEN or url in READ_BY_POST:
            continue
        response = app.test_client().open(url, method=method, json={},
                                          headers={"Accept": "application/json"})
        assert response.status_code in (401, 403), (method, url, response.status_code)


def test_every_mutating_route_refuses_a_read_only_token(app):
    headers = token_for(app, "admin", "read")
    for method, url in mutating_urls(app):
        if url in OPEN or url in READ_BY_POST:
            continue
        response = app.test_client().open(url, method=method, json={}, headers=headers)
        if url in SESSION_ONLY:
            assert response.status_code == 401, (method, url, response.status_code)
            continue
        assert response.status_code == 403, (method, url, response.status_code)
        assert "read-only" in response.get_data(as_text=True), (method, url)


def test_every_form_refuses_a_missing_csrf_token(app):
    client = logged_in(app, "admin")
    for method, url in mutating_urls(app):
        response = client.open(url, method=method, data={"key": "A", "value": "b"})
        if url.startswith("/api/spaces/"):  # the HF API refuses the login cookie outright
            assert response.status_code == 401, (method, url, response.status_code)
            assert "takes an API token" in response.get_data(as_text=True)
            continue
        assert response.status_code == 403, (method, url, response.status_code)
        assert "CSRF" in response.get_data(as_text=True), (method, url)


def test_secret_never_appears_in_any_page_or_response(app):
    client = logged_in(app, "admin")
    headers = token_for(app, "admin", "write")
    seen = []
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods or "stream" in rule.rule:
            continue
        url = rule.rule
        for arg in rule.arguments:
            url = re.sub(rf"<(?:[^<>]*:)?{arg}>", SAMPLES.get(arg, "x"), url)
        for response in (client.get(url), app.test_client().get(url, headers=headers)):
            seen.append(url)
            assert SECRET_VALUE not in response.get_data(as_text=True), url
    assert "/spaces/<owner>/<name>/settings" in {r.rule for r in app.url_map.iter_rules()}
    assert len(seen) > 20


def test_with_an_apps_domain_spaces_get_hosts_of_their_own_and_the_login_covers_them(app):
    app.extensions["appliance.config"].values["portal_apps_domain"] = "spaces.test"
    page = app.test_client().get("/spaces/alice/public", base_url="http://spaces.test:8080")
    assert 'src="http://alice--public.spaces.test:8081/"' in page.get_data(as_text=True)
    for base, domain in (("http://spaces.test:8080", "Domain=spaces.test"),
                         ("http://127.0.0.1:8080", None)):
        client = app.test_client()
        token = csrf_of(client.get("/login", base_url=base).data)
        response = client.post("/login", base_url=base, data={
            "username": "admin", "password": PASSWORD, "csrf_token": token})
        cookie = response.headers["Set-Cookie"]
        assert (domain in cookie) if domain else ("Domain=" not in cookie), (base, cookie)


def test_pages_answer_while_another_process_holds_the_databases_write_lock(app):
    import sqlite3
    import threading

    portal = create_app(app.extensions["appliance.config"])  # the contexts production makes
    writer = sqlite3.connect(str(app.config["store_path"]), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the scheduler in the middle of a write
    answers = []
    worker = threading.Thread(
        target=lambda: answers.append(portal.test_client().get("/api/v1/spaces").status_code))
    try:
        worker.start()
        worker.join(5)
        assert answers == [200], "a read request waited for the write lock"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        worker.join(30)


def test_api_refuses_a_body_that_is_not_a_json_object_and_says_so(app):
    headers = token_for(app, "admin", "write")
    response = app.test_client().put("/api/v1/spaces/alice/public/visibility", data="public",
                                     headers={**headers, "Content-Type": "text/plain"})
    assert response.status_code == 400 and response.json["error"] == "The request body is not JSON"
    assert response.json["hint"] == "send Content-Type: application/json"
    response = app.test_client().put("/api/v1/spaces/alice/public/visibility", json=["public"],
                                     headers=headers)
    assert response.json["error"] == "The request body must be a JSON object"
    response = app.test_client().put("/api/v1/spaces/alice/public/visibility",
                                     json={"visibility": "everyone"}, headers=headers)
    assert response.status_code == 400
    assert response.json["error"] == "Visibility must be public or private, got 'everyone'"


def test_settings_forms_say_what_is_wrong(app):
    client = logged_in(app, "admin")
    token = csrf_of(client.get("/spaces/alice/public/settings").data)
    response = client.post("/spaces/alice/public/settings/colour", data={"csrf_token": token})
    assert response.status_code == 404 and b"No setting named colour" in response.data
    response = client.post("/spaces/alice/public/settings/health",
                           data={"interval": "soon", "csrf_token": token})
    assert response.status_code == 400
    assert b"Health interval must be a duration like 30m, 2h, 1h30m or 3600 (seconds), or " \
        b"&#39;never&#39;; got &#39;soon&#39;" in response.data


def test_serve_refuses_the_same_port_for_the_portal_and_the_apps(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from appliance.cli.main import cli

    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["serve", "--port", "9000", "--apps-port", "9000"], obj={})
    assert result.exit_code == 2
    assert "The apps port and the portal port are both 9000" in result.output
    assert "pick another --apps-port, or 0" in result.output
