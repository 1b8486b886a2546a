"""Users and tokens on a real SQLite file: hashes, roles, the last admin, tokens, limits."""

from __future__ import annotations

import pytest

from appliance import users
from appliance.adapters.store import open_store
from appliance.errors import InvalidInput, NotFound, TooManyAttempts, Unauthorized

PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path):
    opened = open_store(tmp_path / "appliance.db")
    yield opened
    opened.close()


def test_passwords_are_stored_as_scrypt_hashes_only(store):
    users.add_user(store, "ada", "admin", PASSWORD, "test")
    stored = store.find_user("ada")["password_hash"]
    assert stored.startswith("scrypt$32768$8$1$") and PASSWORD not in stored
    assert users.check_password(PASSWORD, stored)
    assert not users.check_password(PASSWORD + "!", stored)
    assert not users.check_password(PASSWORD, "md5$whatever")
    assert users.hash_password(PASSWORD) != users.hash_password(PASSWORD)  # salted


@pytest.mark.parametrize("name", ["", "-dash", "has space", "a/b", "x" * 65, "../etc"])
def test_bad_user_names_are_refused(store, name):
    with pytest.raises(InvalidInput, match="is not valid"):
        users.add_user(store, name, "member", PASSWORD, "test")


def test_short_passwords_bad_roles_and_duplicates_are_refused(store):
    with pytest.raises(InvalidInput, match="shorter than 8"):
        users.add_user(store, "bob", "member", "short", "test")
    with pytest.raises(InvalidInput, match="not one of admin, member, viewer"):
        users.add_user(store, "bob", "root", PASSWORD, "test")
    users.add_user(store, "bob", "member", PASSWORD, "test")
    with pytest.raises(InvalidInput, match="already exists"):
        users.add_user(store, "bob", "viewer", PASSWORD, "test")
    assert users.add_user(store, "bob", "viewer", PASSWORD, "test", replace=True)["role"] == \
        "viewer"


def test_the_last_admin_stays_one(store):
    users.add_user(store, "ada", "admin", PASSWORD, "test")
    with pytest.raises(InvalidInput, match="last admin"):
        users.delete_user(store, "ada", "test")
    with pytest.raises(InvalidInput, match="last admin"):
        users.add_user(store, "ada", "member", PASSWORD, "test", replace=True)
    users.add_user(store, "eve", "admin", PASSWORD, "test")
    users.delete_user(store, "ada", "test")
    assert [u["name"] for u in store.list_users()] == ["eve"]


def test_tokens_are_hashed_scoped_and_die_with_their_user(store):
    users.add_user(store, "ada", "admin", PASSWORD, "test")
    users.add_user(store, "bob", "member", PASSWORD, "test")
    token_id, token = users.create_token(store, "ci", "bob", "read", "test")
    assert token.startswith("apl_") and len(token) > 40
    assert token not in str(store.db.execute("select * from tokens").fetchall())
    caller = users.caller_for_token(store, token)
    assert (caller.user, caller.role, caller.scope, caller.can_write) == \
        ("bob", "member", "read", False)
    with pytest.raises(InvalidInput, match="Scope 'admin'"):
        users.create_token(store, "x", "bob", "admin", "test")
    with pytest.raises(NotFound, match="No user named carl"):
        users.create_token(store, "x", "carl", "read", "test")
    users.delete_user(store, "bob", "test")
    with pytest.raises(Unauthorized, match="not valid"):
        users.caller_for_token(store, token)
    assert store.list_tokens("bob") == []


def test_login_failures_are_limited_per_client(store):
    users.add_user(store, "ada", "admin", PASSWORD, "test")
    for _ in range(3):
        with pytest.raises(Unauthorized, match="Wrong user name or password"):
            users.login(store, "ada", "nope nope", "10.0.0.9", limit=3)
    with pytest.raises(TooManyAttempts):
        users.login(store, "ada", PASSWORD, "10.0.0.9", limit=3)
    assert users.login(store, "ada", PASSWORD, "10.0.0.10", limit=3).user == "ada"
    with pytest.raises(Unauthorized):  # an unknown name takes the same path
        users.login(store, "nobody", PASSWORD, "10.0.0.11", limit=3)
