"""Portal logins are server-side sessions: a cookie copied before logout, a new password or
role, or the user's deletion is refused afterwards, and so is one past its lifetime; other
users' sessions keep working. The proxy in front of the Spaces reads the same sessions."""

# ruff: noqa: F811 - tests take the app fixture imported from test_web as their argument
from __future__ import annotations

import time

from test_web import PASSWORD, app, csrf_of, logged_in, login  # noqa: F401 - the app fixture

from appliance import users
from appliance.adapters.store import open_store

COOKIE = "appliance_session"
NEW_PASSWORD = "a brand new passphrase\n'\"; --"


def cookie_of(client) -> str:
    found = client.get_cookie(COOKIE)
    assert found is not None and found.value, "the client holds no session cookie"
    return found.value


def with_cookie(app, value: str):
    thief = app.test_client()
    thief.set_cookie(COOKIE, value)
    return thief


def who(client) -> str | None:
    return client.get("/api/v1/whoami").json["user"]


def store_of(app):
    return open_store(app.config["store_path"])


def test_a_cookie_copied_before_logout_is_refused_after_and_cleared(app):
    client = logged_in(app, "mia")
    stolen = cookie_of(client)
    assert who(with_cookie(app, stolen)) == "mia"
    token = csrf_of(client.get("/account").data)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    thief = with_cookie(app, stolen)
    response = thief.get("/api/v1/whoami")
    assert response.json["user"] is None and response.json["via"] == "anonymous"
    assert f"{COOKIE}=;" in response.headers.get("Set-Cookie", ""), "the cookie is cleared"
    page = with_cookie(app, stolen).get("/account")
    assert page.status_code == 302 and "/login?next=/account" in page.location


def test_logging_out_one_browser_leaves_the_users_other_sessions_and_other_users(app):
    laptop, phone, admin = logged_in(app, "mia"), logged_in(app, "mia"), logged_in(app, "admin")
    copied = cookie_of(laptop)
    laptop.post("/logout", data={"csrf_token": csrf_of(laptop.get("/account").data)})
    assert who(laptop) is None and who(with_cookie(app, copied)) is None
    assert who(phone) == "mia" and who(admin) == "admin"


def test_changing_ones_password_ends_every_other_session_of_that_user_only(app):
    client, other_browser = logged_in(app, "mia"), logged_in(app, "mia")
    bystander = logged_in(app, "vic")
    before = cookie_of(client)
    response = client.post("/account/password", data={
        "current": PASSWORD, "password": NEW_PASSWORD,
        "csrf_token": csrf_of(client.get("/account").data)})
    assert response.status_code == 302
    assert "every other login of yours has ended" in client.get("/account").data.decode()
    assert who(client) == "mia", "the browser that changed it stays logged in"
    assert who(other_browser) is None
    assert who(with_cookie(app, before)) is None, "its old cookie is refused too"
    assert who(bystander) == "vic"
    assert login(app.test_client(), "mia").status_code == 401, "the old password is refused"
    assert login(app.test_client(), "mia", NEW_PASSWORD).status_code == 302
    store = store_of(app)
    assert users.check_password(NEW_PASSWORD, store.find_user("mia")["password_hash"])
    assert store.events(limit=1)[0]["kind"] == "user:password"
    store.close()


def test_a_wrong_current_password_or_a_short_new_one_changes_nothing_and_says_so(app):
    client, other_browser = logged_in(app, "mia"), logged_in(app, "mia")
    for current, new, message in ((PASSWORD + "x", NEW_PASSWORD, "The current password is wrong"),
                                  (PASSWORD, "short", "shorter than 8 characters")):
        client.post("/account/password", data={
            "current": current, "password": new,
            "csrf_token": csrf_of(client.get("/account").data)})
        assert message in client.get("/account").data.decode()
        assert who(other_browser) == "mia"
    store = store_of(app)
    assert users.check_password(PASSWORD, store.find_user("mia")["password_hash"])
    store.close()


def test_an_admin_resetting_a_password_from_the_cli_ends_the_users_sessions(app):
    mia, admin = logged_in(app, "mia"), logged_in(app, "admin")
    store = store_of(app)
    # what "appliance users add mia --replace" calls
    users.add_user(store, "mia", "member", NEW_PASSWORD, "cli:root", replace=True)
    store.close()
    assert who(mia) is None
    assert who(admin) == "admin"


def test_a_role_change_ends_the_users_sessions(app):
    mia = logged_in(app, "mia")
    store = store_of(app)
    users.add_user(store, "mia", "viewer", PASSWORD, "cli:root", replace=True)
    store.close()
    assert who(mia) is None
    assert who(logged_in(app, "mia")) == "mia"


def test_deleting_a_user_ends_their_sessions_and_keeps_the_admins(app):
    mia, admin = logged_in(app, "mia"), logged_in(app, "admin")
    stolen = cookie_of(mia)
    response = admin.post("/admin/users/mia/delete",
                          data={"csrf_token": csrf_of(admin.get("/account").data)})
    assert response.status_code == 302
    assert who(with_cookie(app, stolen)) is None
    assert who(admin) == "admin"
    store = store_of(app)
    assert store.db.execute("select count(*) from sessions where user = 'mia'").fetchone()[0] == 0
    store.close()


def test_a_session_past_its_lifetime_is_anonymous(app):
    app.extensions["appliance.config"].values["session_hours"] = 1
    client = logged_in(app, "mia")
    assert who(client) == "mia"
    store = store_of(app)
    row = store.db.execute("select expires_at from sessions where user = 'mia'").fetchone()
    assert abs(row[0] - (time.time() + 3600)) < 60, "it lasts session_hours"
    store.db.execute("update sessions set expires_at = ? where user = 'mia'", [time.time() - 1])
    store.close()
    response = client.get("/api/v1/whoami")
    assert response.json["user"] is None and f"{COOKIE}=;" in response.headers["Set-Cookie"]


def test_session_ids_expire_and_only_their_hash_is_stored(tmp_path):
    store = open_store(tmp_path / "appliance.db")
    users.add_user(store, "ada", "admin", PASSWORD, "test")
    started = 1_000_000.0
    sid = users.start_session(store, "ada", hours=2, now=started)
    assert users.caller_for_session(store, sid, now=started + 7199).user == "ada"
    assert users.caller_for_session(store, sid, now=started + 7200) is None
    stored = [row[0] for row in store.db.execute("select id from sessions")]
    assert stored and sid not in stored
    for hostile in (None, "", 42, ["x"], {"sid": sid}, "x" * 100_000, sid + "\n", "../" + sid):
        assert users.caller_for_session(store, hostile, now=started) is None
    users.end_session(store, sid)
    assert users.caller_for_session(store, sid, now=started) is None
    store.close()


def test_a_cookie_from_before_server_side_sessions_is_anonymous(app):
    serializer = app.session_interface.get_signing_serializer(app)
    old = with_cookie(app, serializer.dumps({"user": "admin", "csrf": "x"}))
    response = old.get("/api/v1/whoami")
    assert response.json["user"] is None and f"{COOKIE}=;" in response.headers["Set-Cookie"]


def test_the_proxy_refuses_an_ended_session_for_a_private_space(app):
    client = logged_in(app, "mia")
    environ = {"HTTP_COOKIE": f"other=1; {COOKIE}={cookie_of(client)}"}
    proxy = app.wsgi_app
    assert proxy.session_user(environ) == "mia"
    client.post("/logout", data={"csrf_token": csrf_of(client.get("/account").data)})
    assert proxy.session_user(environ) is None


def test_guessing_the_current_password_is_limited_like_a_login(app):
    """A stolen session cannot guess the password faster than the login page allows."""
    client = logged_in(app, "mia")
    limit = app.extensions["appliance.config"].login_attempts
    for _ in range(limit):
        client.post("/account/password", data={
            "current": "a wrong guess!", "password": NEW_PASSWORD,
            "csrf_token": csrf_of(client.get("/account").data)})
    client.post("/account/password", data={
        "current": PASSWORD, "password": NEW_PASSWORD,
        "csrf_token": csrf_of(client.get("/account").data)})
    assert "Too many wrong passwords from this address" in client.get("/account").data.decode()
    store = store_of(app)
    assert users.check_password(PASSWORD, store.find_user("mia")["password_hash"])
    store.close()
