"""What the portal refuses, and how: wrong JSON types answer a 400 naming the field (never a
500 page), a bug answers the envelope and is logged, anonymous API writes get 401 (not the
CSRF 403), portal credentials never reach a Space's app however they are written, a forged
Host header is never reflected, and account events are for admins."""

# ruff: noqa: F811 - tests take the app fixture imported from test_web as their argument
from __future__ import annotations

import base64
import logging

import pytest
from test_web import PASSWORD, app, csrf_of, logged_in, mutating_urls, token_for  # noqa: F401

from appliance.adapters.store import open_store

SPACE = "/api/v1/spaces/alice/public"


# -- wrong JSON types -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "message"), [
    (f"{SPACE}/health", {"interval": "abc"}, "'interval' must be a number, got 'abc'"),
    (f"{SPACE}/health", {"interval": [1]}, "'interval' must be a number, got [1]"),
    (f"{SPACE}/health", {"interval": 1e27}, "'interval' must be between 0 and 31536000, got 1e+27"),
    (f"{SPACE}/health", {"path": {"a": "b"}}, "'path' must be a string, got {'a': 'b'}"),
    (f"{SPACE}/update-policy", {"policy": "track", "interval": "3600"},
     "'interval' must be a whole number, got '3600'"),
    (f"{SPACE}/update-policy", {"policy": ["track"]}, "'policy' must be a string, got ['track']"),
    (f"{SPACE}/hardware", {"hardware": {"gpu": 1}}, "'hardware' must be a string"),
    (f"{SPACE}/visibility", {"visibility": True}, "'visibility' must be a string, got True"),
    (f"{SPACE}/sleep-time", {"seconds": 10**30}, "'seconds' must be between 0 and"),
    (f"{SPACE}/sleep-time", {"seconds": "²"},
     "Sleep time must be a duration like 30m, 2h, 1h30m or 3600 (seconds), or 'never'; got '²'"),
    (f"{SPACE}/resolution", {"resolution": 5},
     "Package resolution must be one of dated, latest, default, got 5"),
    (f"{SPACE}/secrets/TOKEN", {"value": 12345}, "'value' must be a string, got 12345"),
    (f"{SPACE}/variables/MODE", {"value": {"nested": "x"}}, "'value' must be a string"),
    (f"{SPACE}/secrets/TOKEN", {"value": None}, "'value' must be a string, got None"),
])
def test_wrong_json_types_are_refused_naming_the_field(app, path, body, message):
    response = app.test_client().put(path, json=body, headers=token_for(app, "admin", "write"))
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.json["ok"] is False and response.json["status"] == 400
    assert response.json["error"].startswith(message), response.json["error"]


def test_a_secret_that_is_not_a_string_is_not_stored_as_its_repr(app):
    headers = token_for(app, "admin", "write")
    app.test_client().put(f"{SPACE}/secrets/TOKEN", json={"value": ["a"]}, headers=headers)
    store = open_store(app.config["store_path"])
    assert "TOKEN" not in store.kv("secrets", "alice/public")
    store.close()


def test_a_password_that_is_not_a_string_is_refused(app):
    response = app.test_client().post("/api/v1/users", headers=token_for(app, "admin", "write"),
                                      json={"name": "newbie", "password": 123456789})
    assert response.status_code == 400
    assert response.json["error"] == "'password' must be a string, got 123456789"
    store = open_store(app.config["store_path"])
    assert store.find_user("newbie") is None
    store.close()


@pytest.mark.parametrize(("body", "message"), [
    ({"name": ["x"], "scope": "read"}, "'name' must be a string, got ['x']"),
    ({"name": "ci", "scope": {"write": True}}, "'scope' must be a string"),
    ({"name": "ci", "user": 7}, "'user' must be a string, got 7"),
])
def test_token_fields_of_the_wrong_type_are_refused(app, body, message):
    response = app.test_client().post("/api/v1/tokens", json=body,
                                      headers=token_for(app, "admin", "write"))
    assert response.status_code == 400 and response.json["error"].startswith(message)


@pytest.mark.parametrize("limit", ["abc", "1e3", "-5", "0", "99999999999999999999999", "١٠"])
def test_a_bad_limit_on_events_is_a_400_naming_it(app, limit):
    response = app.test_client().get("/api/v1/events", query_string={"limit": limit},
                                     headers=token_for(app, "admin", "write"))
    assert response.status_code == 400
    assert response.json["error"].startswith("?limit= must be a whole number from 1 to 1000")


@pytest.mark.parametrize("seconds", [10**30, -5, -(10**30)])
def test_the_hf_sleep_time_refuses_what_is_not_seconds(app, seconds):
    response = app.test_client().post("/api/spaces/alice/public/sleeptime",
                                      json={"seconds": seconds},
                                      headers=token_for(app, "admin", "write"))
    assert response.status_code == 400
    assert response.json["error"].startswith("Sleep time must be a whole number of seconds")


def test_revoking_a_token_id_too_large_for_sqlite_is_a_404(app):
    response = app.test_client().delete("/api/v1/tokens/99999999999999999999999",
                                        headers=token_for(app, "admin", "write"))
    assert response.status_code == 404
    assert response.json["error"] == "No active token with id 99999999999999999999999"


def test_a_bug_under_the_api_answers_the_envelope_and_is_logged(app, monkeypatch, caplog):
    from appliance.core import spaces

    def broken(*_args, **_kwargs):
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr(spaces, "list_spaces", broken)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/api/v1/spaces")
    assert response.status_code == 500
    assert response.json == {
        "ok": False, "error": "The portal failed unexpectedly (a bug in the appliance)",
        "hint": "the details are in the portal's log ('journalctl -u appliance-portal')",
        "status": 500}
    assert "an unexpected bug" in caplog.text and "Traceback" in caplog.text
    page = app.test_client().get("/")
    assert page.status_code == 500 and b"failed unexpectedly" in page.data


# -- anonymous API writes: 401, not the CSRF 403 ----------------------------------------------


def test_every_anonymous_api_write_is_a_401_saying_what_to_send(app):
    checked = 0
    for method, url in mutating_urls(app):
        if not url.startswith("/api/"):
            continue
        response = app.test_client().open(url, method=method, json={})
        assert response.status_code == 401, (method, url, response.status_code)
        assert response.json["status"] == 401 and "CSRF" not in response.json["error"]
        assert response.json["hint"], (method, url)
        checked += 1
    assert checked >= 20


def test_an_api_write_with_an_ended_session_cookie_is_a_401(app):
    client = logged_in(app, "admin")
    client.post("/logout", data={"csrf_token": csrf_of(client.get("/account").data)})
    response = client.put(f"{SPACE}/visibility", json={"visibility": "private"})
    assert response.status_code == 401 and "Log in" in response.json["error"]
    # a live login cookie still needs the CSRF token
    response = logged_in(app, "admin").put(f"{SPACE}/visibility", json={"visibility": "private"})
    assert response.status_code == 403 and "CSRF" in response.json["error"]




# -- credentials never reach a Space's app ----------------------------------------------------


def forwarded(app, **environ) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in app.wsgi_app.request_headers(
            {"REMOTE_ADDR": "10.0.0.9", "wsgi.url_scheme": "http", **environ}, "/s/alice--public"):
        headers.setdefault(name.lower(), []).append(value)
    return headers


@pytest.mark.parametrize("auth", [
    "Bearer  apl_stolen", "BEARER\tapl_stolen", "  Bearer apl_stolen  ",
    "Bearer hf_app,Bearer apl_stolen", "Token apl_stolen",
    "Basic " + base64.b64encode(b"user:apl_stolen").decode(),
    "Basic " + base64.b64encode(b"user:apl_stolen").decode().rstrip("="),
])
def test_a_portal_token_never_reaches_the_app_however_it_is_written(app, auth):
    assert "authorization" not in forwarded(app, HTTP_AUTHORIZATION=auth)


def test_every_copy_of_the_portal_cookie_is_filtered(app):
    for cookie, kept in (
            ("a=1,appliance_session=stolen", "a=1"),  # a second Cookie header, as gunicorn joins it
            ("appliance_session=stolen, a=1", "a=1"),
            ("a=1; appliance_session=stolen; appliance_session=two; b=x,y", "a=1; b=x,y"),
            ("appliance_session=stolen", None)):
        sent = forwarded(app, HTTP_COOKIE=cookie)
        assert sent.get("cookie") == ([kept] if kept else None), cookie
        assert "stolen" not in str(sent) and "appliance_session" not in str(sent)


def test_a_two_space_bearer_token_opens_a_private_space_only_when_valid(app):
    token = token_for(app, "mia", "read")["Authorization"].split()[1]
    row = {"visibility": "private"}
    proxy = app.wsgi_app
    assert proxy.check_access({"HTTP_AUTHORIZATION": f"Bearer  {token}"}, row) is None
    assert proxy.check_access({"HTTP_AUTHORIZATION": "Bearer  apl_forged"}, row) is not None
    sent = forwarded(app, HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"u:p").decode())
    assert sent["authorization"] == ["Basic dTpw"], "the app's own credentials still pass"


# -- a forged Host header is not reflected ----------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example",
                                  "a b", "evil.example.", "evil.example/x?y"])
def test_a_forged_host_never_reaches_the_iframe_or_the_csp(app, host):
    response = app.test_client().get("/spaces/alice/public", headers={"Host": host})
    page = response.get_data(as_text=True)
    assert 'src="http://127.0.0.1:8081/s/alice--public/"' in page
    assert "evil" not in page and "evil" not in response.headers["Content-Security-Policy"]


def test_a_forged_host_is_not_written_into_the_redirect_to_the_apps_port(app):
    response = app.test_client().get("/s/alice--public/", headers={"Host": "evil.example"})
    assert response.status_code == 307
    assert response.location == "http://127.0.0.1:8081/s/alice--public/"
    for host in ("x" * 300, "[::1]evil", "a..b"):  # Hosts werkzeug cannot read: 400, not 500
        for path in ("/spaces/alice/public", "/api/v1/spaces"):
            answer = app.test_client().get(path, headers={"Host": host})
            assert answer.status_code in (200, 400), (path, host, answer.status_code)
    app.extensions["appliance.config"].values["public_host"] = "box.lan"
    for host, name in (("box.lan", "box.lan"), ("localhost:8080", "localhost"),
                       ("127.0.0.1", "127.0.0.1"), ("[::1]:8080", "[::1]")):
        response = app.test_client().get("/s/alice--public/", headers={"Host": host})
        assert response.location == f"http://{name}:8081/s/alice--public/", host


# -- account events are for admins -----------------------------------------------------------


def test_a_viewer_sees_no_user_or_token_events_of_others(app):
    token_for(app, "mia", "read")  # a token:created event about mia
    viewer = token_for(app, "vic", "read")  # and one about vic
    events = app.test_client().get("/api/v1/events", headers=viewer).json
    kinds = {(e["kind"], e["detail"].get("user")) for e in events}
    assert ("token:created", "vic") in kinds, "one's own account events stay visible"
    assert not [e for e in events if e["kind"].startswith(("user:", "token:"))
                and e["detail"].get("user") != "vic"], events
    everything = app.test_client().get("/api/v1/events",
                                       headers=token_for(app, "admin", "write")).json
    assert {e["detail"].get("user") for e in everything
            if e["kind"] == "user:added"} == {"admin", "mia", "vic"}


def test_the_system_page_hides_other_users_account_events_from_a_member(app):
    about = "&#34;user&#34;: &#34;{}&#34;"
    page = logged_in(app, "mia").get("/system").get_data(as_text=True)
    assert about.format("mia") in page and about.format("vic") not in page
    assert about.format("vic") in logged_in(app, "admin").get("/system").get_data(as_text=True)
