"""Portal users and API tokens: scrypt password hashes, hashed scoped tokens, login limits,
and the server-side sessions behind the portal's login cookie.

A session id is random and only its sha256 is stored; a new password or role, or deleting
the user, ends every session the user has (the CLI's `users` commands come through here too).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .adapters.store import Store
from .errors import InvalidInput, NotFound, TooManyAttempts, Unauthorized

ROLES = ("admin", "member", "viewer")
SCOPES = ("read", "write")
TOKEN_PREFIX = "apl_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_PASSWORD = 8
# scrypt with N=2^15, r=8: 32 MiB and ~50 ms per hash, memory-hard against GPU guessing.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
FAILURE_WINDOW = 15 * 60


@dataclass(frozen=True)
class Caller:
    """Who is acting on a request: a user (by login or token) with a role and a scope."""

    user: str | None
    role: str | None
    scope: str  # "write" for a logged-in person, the token's scope for a token
    via: str  # "session" | "token" | "anonymous"

    @property
    def actor(self) -> str:
        return f"{self.via}:{self.user}" if self.user else "anonymous"

    @property
    def can_write(self) -> bool:
        return self.role in ("admin", "member") and self.scope == "write"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" and self.scope == "write"


ANONYMOUS = Caller(None, None, "read", "anonymous")


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise InvalidInput(f"User name {name!r} is not valid",
                           hint="use 1-64 letters, digits, '.', '_' or '-'")
    return name


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=64 << 20, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        found = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                               r=int(r), p=int(p), maxmem=64 << 20, dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(found, base64.b64decode(digest))


# A hash to check against when the user does not exist, so timing does not tell names apart.
_DUMMY = hash_password(secrets.token_hex(8))


def add_user(store: Store, name: str, role: str, password: str, actor: str,
             replace: bool = False) -> dict[str, Any]:
    """Create a user (or, with replace, change an existing one's role and password)."""
    validate_name(name)
    if role not in ROLES:
        raise InvalidInput(f"Role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(password, str):
        raise InvalidInput("The password must be a string")
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"The password is shorter than {MIN_PASSWORD} characters")
    existing = store.find_user(name)
    if existing and not replace:
        raise InvalidInput(f"A user named {name} already exists",
                           hint="pick another name, or change it with --replace")
    if existing and existing["role"] == "admin" and role != "admin" and store.count_admins() == 1:
        raise InvalidInput(f"{name} is the last admin and must stay one")
    store.upsert_user(name, role, hash_password(password), actor, created=not existing)
    return public_user(store, name)


def public_user(store: Store, name: str) -> dict[str, Any]:
    row = store.find_user(name)
    if row is None:
        raise NotFound(f"No user named {name}")
    return {k: row[k] for k in ("name", "role", "created_at", "last_login_at")}


def change_password(store: Store, name: str, current: str, new: str, actor: str,
                    client: str | None = None, limit: int = 0) -> None:
    """Change a user's own password (the current one is asked); end all their sessions.

    A wrong current password counts as a failed login of the client, so a stolen session
    cannot be used to guess the password faster than the login page allows."""
    now = time.time()
    if client is not None and store.login_failures(client, now - FAILURE_WINDOW) >= limit:
        raise TooManyAttempts("Too many wrong passwords from this address",
                              hint="wait 15 minutes, or ask an admin to reset your password")
    row = store.find_user(name)
    if row is None or not check_password(current if isinstance(current, str) else "",
                                         row["password_hash"]):
        if client is not None:
            store.add_login_failure(client, now)
        raise Unauthorized("The current password is wrong", hint="type it again")
    if not isinstance(new, str) or len(new) < MIN_PASSWORD:
        raise InvalidInput(f"The new password is shorter than {MIN_PASSWORD} characters")
    store.set_password_hash(name, hash_password(new), actor)


def delete_user(store: Store, name: str, actor: str) -> None:
    row = store.find_user(name)
    if row and row["role"] == "admin" and store.count_admins() == 1:
        raise InvalidInput(f"{name} is the last admin and cannot be deleted")
    store.delete_user(name, actor)


def login(store: Store, name: str, password: str, client: str, limit: int) -> Caller:
    """Check a password; too many failures from one client in 15 minutes are refused."""
    now = time.time()
    if store.login_failures(client, now - FAILURE_WINDOW) >= limit:
        raise TooManyAttempts("Too many failed logins from this address",
                              hint="wait 15 minutes, or ask an admin to reset your password")
    row = store.find_user(name or "")
    if not check_password(password or "", row["password_hash"] if row else _DUMMY) or not row:
        store.add_login_failure(client, now)
        raise Unauthorized("Wrong user name or password")
    store.clear_login_failures(client)
    store.set_user_fields(row["name"], last_login_at=_iso(now))
    return Caller(row["name"], row["role"], "write", "session")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, name: str, user: str, scope: str, actor: str
                 ) -> tuple[int, str]:
    """Make an API token; return (id, token). Only its sha256 is stored: shown once."""
    if scope not in SCOPES:
        raise InvalidInput(f"Scope {scope!r} is not one of {', '.join(SCOPES)}")
    if not name or len(name) > 100:
        raise InvalidInput("A token needs a name of 1-100 characters")
    if store.find_user(user) is None:
        raise NotFound(f"No user named {user}", hint="create it with 'appliance users add'")
    token = TOKEN_PREFIX + secrets.token_urlsafe(30)
    return store.add_token(name, user, scope, _token_hash(token), actor), token


def caller_for_token(store: Store, token: str) -> Caller:
    row = store.token_by_hash(_token_hash(token)) if token.startswith(TOKEN_PREFIX) else None
    if row is None:
        raise Unauthorized("The API token is not valid (unknown or revoked)",
                           hint="create one with 'appliance tokens create'")
    store.touch_token(row["id"])
    return Caller(row["user"], row["role"], row["scope"], "token")


def caller_for_user(store: Store, name: str) -> Caller | None:
    """Re-read a user (deleted or demoted users lose their powers at once)."""
    row = store.find_user(name)
    return Caller(row["name"], row["role"], "write", "session") if row else None


def start_session(store: Store, name: str, hours: float, now: float | None = None) -> str:
    """Open a login session for a user; return its id (for the cookie: only its hash is kept)."""
    session_id = secrets.token_urlsafe(32)
    at = time.time() if now is None else now
    store.add_session(_token_hash(session_id), name, at + hours * 3600)
    return session_id


def caller_for_session(store: Store, session_id: Any, now: float | None = None
                       ) -> Caller | None:
    """The user of a live session; None once it was ended (logout, new password or role,
    user deleted) or expired, or for anything that is not a session id."""
    if not isinstance(session_id, str) or not session_id or len(session_id) > 200:
        return None
    row = store.session_user(_token_hash(session_id), time.time() if now is None else now)
    return Caller(row["name"], row["role"], "write", "session") if row else None


def end_session(store: Store, session_id: Any) -> None:
    """End one session (logging out); unknown ids are ignored."""
    if isinstance(session_id, str) and session_id:
        store.end_session(_token_hash(session_id))
