"""SQLite state (the only module importing sqlite_utils): migrations, rows, compare-and-swap."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from .. import stages
from ..errors import ApplianceError, Conflict, NotFound


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["spaces"].create(
        {
            "id": str, "source": str, "source_display": str, "revision_request": str,
            "stage": str, "error": str, "sdk": str, "title": str, "manifest": str,
            "warnings": str, "hardware": str, "desired": str,
            "revision": str, "image": str, "container": str, "backend_port": int,
            "port": int, "previous_revision": str, "previous_image": str,
            "created_at": str, "updated_at": str, "created_by": str,
        },
        pk="id",
        not_null={"source", "stage", "port", "desired", "hardware"},
        defaults={"hardware": "cpu", "desired": "running", "warnings": "[]"},
    )
    db["spaces"].create_index(["port"], unique=True)
    db["builds"].create(
        {
            "id": int, "space_id": str, "revision": str, "image": str, "status": str,
            "factory": int, "log_path": str, "error": str, "pid": int,
            "started_at": str, "finished_at": str,
        },
        pk="id",
        foreign_keys=[("space_id", "spaces", "id")],
        not_null={"space_id", "status"},
    )
    db["builds"].create_index(["space_id"])
    for table in ("secrets", "variables"):
        db[table].create(
            {"space_id": str, "key": str, "value": str, "updated_at": str},
            pk=("space_id", "key"),
            foreign_keys=[("space_id", "spaces", "id")],
            not_null={"value"},
        )
    db["events"].create(
        {"id": int, "at": str, "actor": str, "space_id": str, "kind": str, "detail": str},
        pk="id",
        not_null={"at", "kind"},
    )
    db["events"].create_index(["space_id", "id"])


def _m002_worker_pid(db: sqlite_utils.Database) -> None:
    # Which process owns a busy stage, so a crash mid-build can be told from a slow build.
    db["spaces"].add_column("worker_pid", int)


def _m003_health(db: sqlite_utils.Database) -> None:
    # Restarts the scheduler made (JSON list of times, for backoff and the give-up window)
    # and the health check's consecutive failures.
    db["spaces"].add_column("restarts", str, not_null_default="[]")
    db["spaces"].add_column("health_failures", int, not_null_default=0)
    db["spaces"].add_column("health_checked_at", str)


def _m004_policies(db: sqlite_utils.Database) -> None:
    # Sleep: seconds idle before sleeping (NULL: never), the router's last proxied request,
    # and a wake asked for by a request while asleep. Updates: the policy ("manual", "track"
    # a branch every update_interval seconds, or "pinned"), when it last looked, and the
    # commit that failed (never retried in a loop).
    table = db["spaces"]
    table.add_column("sleep_after", int)
    table.add_column("last_request_at", str)
    table.add_column("wake_requested_at", str)
    table.add_column("update_policy", str, not_null_default="manual")
    table.add_column("update_interval", int, not_null_default=3600)
    table.add_column("last_update_check", str)
    table.add_column("failed_revision", str)


def _m005_allocations(db: sqlite_utils.Database) -> None:
    # What each Space holds on the GPUs: one row per Space (whole GPUs, a MIG device, or a
    # shared memory budget), released when it stops, sleeps or is deleted.
    db["allocations"].create(
        {"space_id": str, "kind": str, "gpu_uuids": str, "mig_uuid": str, "memory_mib": int,
         "created_at": str},
        pk="space_id", foreign_keys=[("space_id", "spaces", "id")], not_null={"kind"},
    )
    # When a Space first went over its GPU memory budget (for the enforcement grace period).
    db["spaces"].add_column("gpu_over_since", str)


def _m006_gpu_samples(db: sqlite_utils.Database) -> None:
    # GPU telemetry: one row per GPU (space_id NULL) or per Space on a GPU, per sample time;
    # resolution says whether the row is a raw sample or an average over that many seconds.
    db["gpu_samples"].create(
        {"id": int, "at": str, "gpu_uuid": str, "space_id": str, "resolution": int,
         "memory_used_mib": float, "utilization_gpu": float, "temperature_c": float,
         "power_w": float},
        pk="id", not_null={"at", "gpu_uuid", "resolution"},
    )
    db["gpu_samples"].create_index(["gpu_uuid", "at"])
    db["gpu_samples"].create_index(["space_id", "at"])


def _m007_portal(db: sqlite_utils.Database) -> None:
    # Portal users (password hashes only), API tokens (sha256 of the token only), failed
    # logins per client for rate limiting (shared by every gunicorn worker), and who may
    # see each Space ("public" on the LAN, or "private": login required).
    db["users"].create(
        {"name": str, "role": str, "password_hash": str, "created_at": str,
         "last_login_at": str},
        pk="name", not_null={"role", "password_hash"},
    )
    db["tokens"].create(
        {"id": int, "name": str, "user": str, "scope": str, "token_hash": str,
         "created_at": str, "last_used_at": str, "revoked_at": str},
        pk="id", foreign_keys=[("user", "users", "name")], not_null={"token_hash", "scope"},
    )
    db["tokens"].create_index(["token_hash"], unique=True)
    db["login_failures"].create({"client": str, "at": float}, not_null={"client", "at"})
    db["login_failures"].create_index(["client", "at"])
    db["spaces"].add_column("visibility", str, not_null_default="public")


def _m008_space_overrides(db: sqlite_utils.Database) -> None:
    # Per-Space health check overrides (NULL: the Space's base_path, the global interval),
    # and whether an interrupted build was already retried once (cleared by a finished build).
    db["spaces"].add_column("health_path", str)
    db["spaces"].add_column("health_interval", float)
    db["spaces"].add_column("build_retried", int, not_null_default=0)


def _m009_locks(db: sqlite_utils.Database) -> None:
    # The exact Python packages each built revision installed (the pylock.toml uv wrote), so
    # a rebuild of that revision installs the same files; and a Space's own choice of how its
    # packages are resolved ("dated" or "latest"; NULL: the box's build_resolution). inputs
    # names what the resolution was asked (a later revision asking the same keeps the lock);
    # resolved_at is when the index was last asked for it.
    db["locks"].create(
        {"space_id": str, "revision": str, "resolution": str, "as_of": str, "python": str,
         "platform": str, "text": str, "sdk_packages": str, "inputs": str, "resolved_at": str,
         "created_at": str},
        pk=("space_id", "revision"), foreign_keys=[("space_id", "spaces", "id")],
        not_null={"resolution", "python", "text"},
    )
    db["spaces"].add_column("resolution", str)


def _m010_sessions(db: sqlite_utils.Database) -> None:
    # Portal logins kept on the server: the cookie carries a random session id whose sha256 is
    # the key here, so logging out, a new password or role, or deleting the user ends it at
    # once (a signed cookie alone stayed valid for session_hours whatever happened).
    db["sessions"].create(
        {"id": str, "user": str, "created_at": str, "expires_at": float},
        pk="id", foreign_keys=[("user", "users", "name")], not_null={"user", "expires_at"},
    )
    db["sessions"].create_index(["user"])


# Named migrations, applied in order and recorded in the migrations table. Never edit one
# that has shipped; append a new one.
MIGRATIONS: tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...] = (
    ("001_initial", _m001_initial),
    ("002_worker_pid", _m002_worker_pid),
    ("003_health", _m003_health),
    ("004_policies", _m004_policies),
    ("005_allocations", _m005_allocations),
    ("006_gpu_samples", _m006_gpu_samples),
    ("007_portal", _m007_portal),
    ("008_space_overrides", _m008_space_overrides),
    ("009_locks", _m009_locks),
    ("010_sessions", _m010_sessions),
)


class Store:
    """A handle on the appliance database; cheap to create, one per process or request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                               check_same_thread=False)
        if self.path.stat().st_mode & 0o077:
            os.chmod(self.path, 0o600)  # secrets live here (a restored copy may be 0644)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        self.db = sqlite_utils.Database(conn)

    def close(self) -> None:
        self.db.conn.close()

    # -- schema --------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending named migrations; return the names applied."""
        applied: list[str] = []
        with self.transaction():
            if "migrations" not in self.db.table_names():
                self.db["migrations"].create({"name": str, "applied_at": str}, pk="name")
            done = {row["name"] for row in self.db["migrations"].rows}
            for name, step in MIGRATIONS:
                if name not in done:
                    step(self.db)
                    self.db["migrations"].insert({"name": name, "applied_at": now()})
                    applied.append(name)
        return applied

    def pending_migrations(self) -> list[str]:
        done = set(self.applied_migrations())
        return [name for name, _ in MIGRATIONS if name not in done]

    def applied_migrations(self) -> list[str]:
        if "migrations" not in self.db.table_names():
            return []
        return [r["name"] for r in self.db.query("select name from migrations order by name")]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run a block in one IMMEDIATE transaction (writers queue instead of failing)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def backup(self, destination: Path) -> None:
        """Copy the live database with SQLite's online backup API (never a file copy)."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        target = sqlite3.connect(str(partial))
        try:
            self.db.conn.backup(target)
        finally:
            target.close()
        os.chmod(partial, 0o600)
        os.replace(partial, destination)  # a backup is whole or absent, never half-written

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # -- spaces --------------------------------------------------------------------------

    def get_space(self, space_id: str) -> dict[str, Any]:
        try:
            return self.db["spaces"].get(space_id)
        except sqlite_utils.db.NotFoundError:
            raise NotFound(
                f"No Space named {space_id}", hint="see 'appliance spaces list'"
            ) from None

    def find_space(self, space_id: str) -> dict[str, Any] | None:
        # One statement (sqlite-utils' query() wraps each in a savepoint): the proxy asks often.
        cursor = self.db.execute("select * from spaces where id = ?", [space_id])
        row = cursor.fetchone()
        return dict(zip([c[0] for c in cursor.description], row, strict=True)) if row else None

    def data_version(self) -> int:
        """SQLite's data_version: it changes when another connection commits a write."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def list_spaces(self) -> list[dict[str, Any]]:
        return list(self.db.query("select * from spaces order by id"))

    def insert_space(self, row: dict[str, Any], actor: str) -> None:
        """Insert a new Space row plus its event; Conflict when the id or port is taken."""
        with self.transaction():
            try:
                at = now()
                self.db["spaces"].insert({**row, "created_at": at, "updated_at": at})
            except sqlite3.IntegrityError as exc:
                if "spaces.id" in str(exc):
                    raise Conflict(
                        f"A Space named {row['id']} already exists",
                        hint="choose another name with --name, or update it with "
                        f"'appliance spaces update {row['id']}'",
                    ) from None
                raise Conflict(f"Could not record Space {row['id']}: {exc}") from None
            self.add_event(row["id"], "created", actor, {"source": row.get("source_display")})

    def used_ports(self) -> set[int]:
        rows = self.db.query("select port, backend_port from spaces")
        return {p for r in rows for p in (r["port"], r["backend_port"]) if p}

    def routes(self) -> dict[int, int | None]:
        """Map each Space's stable port to the host port of the container serving it."""
        return {r["port"]: r["backend_port"] for r in self.db.query(
            "select port, backend_port from spaces where stage != 'DELETING'")}

    def sleeping_ports(self) -> set[int]:
        """Ports of Spaces asleep (a request wakes them; paused ones are not here)."""
        return {r["port"] for r in self.db.query(
            "select port from spaces where desired = 'sleeping' and stage != 'DELETING'")}

    def record_requests(self, last_seen: dict[int, str], wakes: set[int]) -> None:
        """Store when each port last saw a request, and ask sleeping Spaces to wake."""
        with self.transaction():
            for port, at in last_seen.items():
                self.db.execute("update spaces set last_request_at = ? where port = ?",
                                [at, port])
            for port in wakes:
                self.db.execute(
                    "update spaces set wake_requested_at = ? where port = ? "
                    "and desired = 'sleeping' and wake_requested_at is null", [now(), port])

    def move(
        self,
        space_id: str,
        expected: str | set[str] | frozenset[str],
        new: str,
        actor: str,
        event: str | None = None,
        detail: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Compare-and-swap the stage (and other fields) and write an event, atomically."""
        allowed = {expected} if isinstance(expected, str) else set(expected)
        with self.transaction():
            row = self.get_space(space_id)
            if row["stage"] not in allowed:
                raise Conflict(
                    f"Space {space_id} is {row['stage']}, not {' or '.join(sorted(allowed))}",
                    hint="another action changed it first; look again with "
                    f"'appliance spaces show {space_id}'",
                )
            if row["stage"] != new:
                stages.check_move(space_id, row["stage"], new)
            values = {**fields, "stage": new, "updated_at": now()}
            # worker_pid names the owner of a busy stage only: set on the way in, cleared
            # on the way out (a live process that once deployed owns nothing afterwards).
            values.setdefault("worker_pid", os.getpid() if new in stages.BUSY else None)
            sets = ", ".join(f"[{k}] = ?" for k in values)
            placeholders = ", ".join("?" for _ in allowed)
            cursor = self.db.execute(
                f"update spaces set {sets} where id = ? and stage in ({placeholders})",
                [*values.values(), space_id, *sorted(allowed)],
            )
            if cursor.rowcount != 1:
                raise Conflict(f"Space {space_id} changed while updating it; try again")
            self.add_event(
                space_id, event or f"stage:{new}", actor, {"from": row["stage"], **(detail or {})}
            )
        return self.get_space(space_id)

    def update_space(self, space_id: str, actor: str | None = None, event: str | None = None,
                     detail: dict[str, Any] | None = None, **fields: Any) -> None:
        """Update fields that are not the stage (the stage only moves through move())."""
        assert "stage" not in fields
        with self.transaction():
            self.db["spaces"].update(space_id, {**fields, "updated_at": now()})
            if event:
                self.add_event(space_id, event, actor or "system", detail or {})

    def allocations(self) -> list[dict[str, Any]]:
        """Every GPU allocation, gpu_uuids decoded to a list."""
        return [{**r, "gpu_uuids": json.loads(r["gpu_uuids"] or "[]")}
                for r in self.db.query("select * from allocations order by space_id")]

    def set_allocation(self, space_id: str, kind: str, gpu_uuids: list[str],
                       mig_uuid: str | None, memory_mib: int | None, actor: str) -> None:
        """Record (or replace) what the Space holds on the GPUs, with an event."""
        with self.transaction():
            self.db["allocations"].upsert({
                "space_id": space_id, "kind": kind, "gpu_uuids": json.dumps(gpu_uuids),
                "mig_uuid": mig_uuid, "memory_mib": memory_mib, "created_at": now(),
            }, pk="space_id")
            self.add_event(space_id, "gpu:allocated", actor,
                           {"kind": kind, "gpus": gpu_uuids, "mig": mig_uuid,
                            "memory_mib": memory_mib})

    def release_allocation(self, space_id: str, actor: str, reason: str = "") -> bool:
        """Release the Space's GPU allocation; True when it held one."""
        with self.transaction():
            cursor = self.db.execute("delete from allocations where space_id = ?", [space_id])
            if cursor.rowcount:
                self.add_event(space_id, "gpu:released", actor, {"reason": reason})
            return bool(cursor.rowcount)

    def delete_space_rows(self, space_id: str, actor: str) -> None:
        with self.transaction():
            for table in ("secrets", "variables", "builds", "allocations", "locks"):
                self.db.execute(f"delete from {table} where space_id = ?", [space_id])
            self.db.execute("delete from spaces where id = ?", [space_id])
            self.add_event(space_id, "deleted", actor, {})

    # -- builds --------------------------------------------------------------------------

    def start_build(self, space_id: str, factory: bool, log_path: Path) -> int:
        with self.transaction():
            table = self.db["builds"].insert({
                "space_id": space_id, "status": "running", "factory": int(factory),
                "log_path": str(log_path), "pid": os.getpid(), "started_at": now(),
            })
            return table.last_pk

    def finish_build(self, build_id: int, status: str, **fields: Any) -> None:
        with self.transaction():
            self.db["builds"].update(build_id, {**fields, "status": status,
                                                "finished_at": now()})
            if status != "abandoned":  # a build that ran to its end: any later one is new
                self.db.execute("update spaces set build_retried = 0 where id = (select "
                                "space_id from builds where id = ?)", [build_id])

    def built_revisions(self, space_id: str, limit: int) -> list[dict[str, str]]:
        """The newest `limit` distinct images the Space's builds made, with their revisions."""
        rows = self.db.query(
            "select revision, image, max(id) as last from builds where space_id = ? and "
            "status = 'succeeded' and image is not null group by image order by last desc "
            "limit ?", [space_id, limit])
        return [{"revision": r["revision"], "image": r["image"]} for r in rows]

    def latest_build(self, space_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query(
            "select * from builds where space_id = ? order by id desc limit 1", [space_id]))
        return rows[0] if rows else None

    # -- package locks -------------------------------------------------------------------

    def save_lock(self, lock: dict[str, Any]) -> None:
        """Record the packages a revision's build installed (once: a rebuild reuses them)."""
        fields = ("space_id", "revision", "resolution", "as_of", "python", "platform", "text",
                  "sdk_packages", "inputs", "resolved_at")
        with self.transaction():
            self.db["locks"].insert({**{k: lock.get(k) for k in fields}, "created_at": now()},
                                    pk=("space_id", "revision"), replace=True)

    def get_lock(self, space_id: str, revision: str) -> dict[str, Any] | None:
        rows = list(self.db.query(
            "select * from locks where space_id = ? and revision = ?", [space_id, revision]))
        return rows[0] if rows else None

    def locks(self, space_id: str | None = None) -> list[dict[str, Any]]:
        """Every recorded lock (of one Space when given), oldest first."""
        where, params = ("where space_id = ?", [space_id]) if space_id else ("", [])
        return list(self.db.query(f"select * from locks {where} order by created_at", params))

    def last_resolved(self, inputs: str) -> str | None:
        """When the index was last asked for a lock with these inputs (any Space)."""
        rows = list(self.db.query("select max(resolved_at) as at from locks where inputs = ?",
                                  [inputs]))
        return rows[0]["at"] if rows else None

    def forget_locks(self, space_id: str, actor: str) -> int:
        """Drop a Space's locks, so its next build resolves its packages again."""
        self.get_space(space_id)
        with self.transaction():
            count = self.db.execute("delete from locks where space_id = ?", [space_id]).rowcount
            self.add_event(space_id, "locks-forgotten", actor, {"locks": count})
        return count

    # -- secrets, variables ----------------------------------------------------------------

    def set_kv(self, table: str, space_id: str, key: str, value: str, actor: str) -> None:
        self.get_space(space_id)
        with self.transaction():
            self.db[table].upsert(
                {"space_id": space_id, "key": key, "value": value, "updated_at": now()},
                pk=("space_id", "key"),
            )
            # The event names the key only: values (secret ones above all) never reach events.
            self.add_event(space_id, f"{table[:-1]}:set", actor, {"key": key})

    def delete_kv(self, table: str, space_id: str, key: str, actor: str) -> None:
        with self.transaction():
            cursor = self.db.execute(
                f"delete from {table} where space_id = ? and key = ?", [space_id, key])
            if cursor.rowcount == 0:
                raise NotFound(f"Space {space_id} has no {table[:-1]} named {key}")
            self.add_event(space_id, f"{table[:-1]}:deleted", actor, {"key": key})

    def kv(self, table: str, space_id: str) -> dict[str, str]:
        rows = self.db.query(
            f"select key, value from {table} where space_id = ? order by key", [space_id])
        return {r["key"]: r["value"] for r in rows}

    def kv_meta(self, table: str, space_id: str) -> list[dict[str, str]]:
        return list(self.db.query(
            f"select key, updated_at from {table} where space_id = ? order by key", [space_id]))

    # -- events --------------------------------------------------------------------------

    def add_event(self, space_id: str | None, kind: str, actor: str,
                  detail: dict[str, Any]) -> None:
        self.db["events"].insert({
            "at": now(), "actor": actor, "space_id": space_id, "kind": kind,
            "detail": json.dumps(detail, sort_keys=True),
        })

    def events(self, space_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if space_id:
            rows = self.db.query(
                "select * from events where space_id = ? order by id desc limit ?",
                [space_id, limit])
        else:
            rows = self.db.query("select * from events order by id desc limit ?", [limit])
        return [{**r, "detail": json.loads(r["detail"] or "{}")} for r in rows]

    # -- users, tokens, login failures ----------------------------------------------------

    def find_user(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from users where name = ?", [name]))
        return rows[0] if rows else None

    def list_users(self) -> list[dict[str, Any]]:
        return list(self.db.query(
            "select name, role, created_at, last_login_at from users order by name"))

    def count_admins(self) -> int:
        return self.db.execute("select count(*) from users where role = 'admin'").fetchone()[0]

    def upsert_user(self, name: str, role: str, password_hash: str, actor: str,
                    created: bool) -> None:
        with self.transaction():
            self.db["users"].upsert({"name": name, "role": role, "password_hash": password_hash,
                                     **({"created_at": now()} if created else {})}, pk="name")
            if not created:  # a new password or role: whoever held the old one is logged out
                self.end_sessions(name)
            self.add_event(None, "user:added" if created else "user:changed", actor,
                           {"user": name, "role": role})

    def set_user_fields(self, name: str, **fields: Any) -> None:
        self.db["users"].update(name, fields)

    def delete_user(self, name: str, actor: str) -> None:
        with self.transaction():
            # The user's tokens and logins go with them (the events keep who did what).
            self.db.execute("delete from tokens where user = ?", [name])
            self.end_sessions(name)
            if self.db.execute("delete from users where name = ?", [name]).rowcount == 0:
                raise NotFound(f"No user named {name}")
            self.add_event(None, "user:deleted", actor, {"user": name})

    def add_token(self, name: str, user: str, scope: str, token_hash: str, actor: str) -> int:
        with self.transaction():
            token_id = self.db["tokens"].insert({
                "name": name, "user": user, "scope": scope, "token_hash": token_hash,
                "created_at": now()}).last_pk
            self.add_event(None, "token:created", actor,
                           {"token": token_id, "name": name, "user": user, "scope": scope})
            return token_id

    def token_by_hash(self, token_hash: str) -> dict[str, Any] | None:
        rows = list(self.db.query(
            "select tokens.*, users.role as role from tokens join users on users.name = "
            "tokens.user where token_hash = ? and revoked_at is null", [token_hash]))
        return rows[0] if rows else None

    def list_tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        where, args = ("where user = ?", [user]) if user else ("", [])
        return list(self.db.query(
            "select id, name, user, scope, created_at, last_used_at, revoked_at from tokens "
            f"{where} order by id", args))

    def touch_token(self, token_id: int) -> None:
        self.db.execute("update tokens set last_used_at = ? where id = ?", [now(), token_id])

    def revoke_token(self, token_id: int, actor: str, user: str | None = None) -> None:
        if not 0 < token_id < 2**63:  # an id SQLite cannot hold names no token
            raise NotFound(f"No active token with id {token_id}")
        with self.transaction():
            sql = "update tokens set revoked_at = ? where id = ? and revoked_at is null"
            args: list[Any] = [now(), token_id]
            if user is not None:
                sql, args = sql + " and user = ?", [*args, user]
            if self.db.execute(sql, args).rowcount == 0:
                raise NotFound(f"No active token with id {token_id}")
            self.add_event(None, "token:revoked", actor, {"token": token_id})

    def set_password_hash(self, name: str, password_hash: str, actor: str) -> int:
        """Change a user's password and end every session they have; return how many."""
        with self.transaction():
            if self.db.execute("update users set password_hash = ? where name = ?",
                               [password_hash, name]).rowcount == 0:
                raise NotFound(f"No user named {name}")
            ended = self.end_sessions(name)
            self.add_event(None, "user:password", actor, {"user": name})
            return ended

    def add_session(self, session_hash: str, user: str, expires_at: float) -> None:
        with self.transaction():
            self.db.execute("delete from sessions where expires_at <= ?", [time.time()])
            self.db["sessions"].insert({"id": session_hash, "user": user, "created_at": now(),
                                        "expires_at": expires_at})

    def session_user(self, session_hash: str, at: float) -> dict[str, Any] | None:
        """The user (name, role) of a session that has not ended or expired: one lookup."""
        row = self.db.execute(
            "select users.name, users.role from sessions join users on users.name = "
            "sessions.user where sessions.id = ? and sessions.expires_at > ?",
            [session_hash, at]).fetchone()
        return {"name": row[0], "role": row[1]} if row else None

    def end_session(self, session_hash: str) -> None:
        self.db.execute("delete from sessions where id = ?", [session_hash])

    def end_sessions(self, user: str) -> int:
        """End every session of a user; return how many there were."""
        return self.db.execute("delete from sessions where user = ?", [user]).rowcount

    def login_failures(self, client: str, since: float) -> int:
        return self.db.execute("select count(*) from login_failures where client = ? and "
                               "at >= ?", [client, since]).fetchone()[0]

    def add_login_failure(self, client: str, at: float) -> None:
        with self.transaction():
            self.db["login_failures"].insert({"client": client, "at": at})
            self.db.execute("delete from login_failures where at < ?", [at - 86400])

    def clear_login_failures(self, client: str) -> None:
        self.db.execute("delete from login_failures where client = ?", [client])

    # -- GPU telemetry ---------------------------------------------------------------------

    def add_gpu_samples(self, rows: list[dict[str, Any]]) -> None:
        """Insert telemetry rows (gpu_samples columns but id; absent ones NULL) at once."""
        if not rows:
            return
        # executemany, not insert_all: a sample runs every few seconds and insert_all's
        # introspection of the table costs twice the insert itself.
        columns = ("at", "gpu_uuid", "space_id", "resolution", "memory_used_mib",
                   "utilization_gpu", "temperature_c", "power_w")
        with self.transaction():
            self.db.conn.executemany(
                f"insert into gpu_samples ({', '.join(columns)}) "
                f"values ({', '.join('?' for _ in columns)})",
                [[row.get(column) for column in columns] for row in rows])

    def gpu_samples(self, gpu_uuid: str | None = None, space_id: str | None = None,
                    since: str | None = None, limit: int = 100_000,
                    whole_gpu: bool = False) -> list[dict[str, Any]]:
        """Return the newest ``limit`` matching telemetry rows, oldest first.

        whole_gpu keeps the GPU's own rows only (space_id NULL), leaving out the Spaces'.
        """
        where, params = [], []
        if gpu_uuid is not None:
            where.append("gpu_uuid = ?")
            params.append(gpu_uuid)
        if space_id is not None:
            where.append("space_id = ?")
            params.append(space_id)
        elif whole_gpu:
            where.append("space_id is null")
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        clause = f"where {' and '.join(where)}" if where else ""
        return list(self.db.query(
            f"select * from (select * from gpu_samples {clause} order by at desc, id desc "
            "limit ?) order by at, id", [*params, limit]))

    def rollup_gpu_samples(self, resolution: int, span: int, before: str) -> tuple[int, int]:
        """Replace rows of one resolution older than ``before`` by their span-second averages.

        One transaction: the averages appear as the rows they stand for go, so a crash never
        loses a sample nor counts it twice. Rows are grouped by (GPU, Space, bucket), buckets
        starting at multiples of span since the epoch; ``before`` should be such a multiple
        so that no bucket is split between two passes. A Space's row is missing from a
        sample where it held no GPU memory, so its memory averages over every sample of the
        GPU in the bucket (a missing row counts 0), not over its own rows alone. Returns
        (rows replaced, averaged rows written).
        """
        with self.transaction():
            written = self.db.execute(
                """
                insert into gpu_samples (at, gpu_uuid, space_id, resolution, memory_used_mib,
                                         utilization_gpu, temperature_c, power_w)
                with src as (
                    select gpu_uuid, space_id, memory_used_mib, utilization_gpu,
                           temperature_c, power_w,
                           cast(strftime('%s', at) as integer) / :span * :span as bucket
                    from gpu_samples where resolution = :resolution and at < :before
                ), samples as (
                    select gpu_uuid, bucket, count(*) as n from src
                    where space_id is null group by gpu_uuid, bucket
                )
                select strftime('%Y-%m-%dT%H:%M:%S.000+00:00', src.bucket, 'unixepoch'),
                       src.gpu_uuid, src.space_id, :span,
                       case when src.space_id is null then avg(src.memory_used_mib)
                            else total(src.memory_used_mib)
                                 / max(count(*), coalesce(max(samples.n), 0)) end,
                       avg(src.utilization_gpu), avg(src.temperature_c), avg(src.power_w)
                from src left join samples
                    on samples.gpu_uuid = src.gpu_uuid and samples.bucket = src.bucket
                group by src.gpu_uuid, src.space_id, src.bucket
                order by src.bucket, src.gpu_uuid, src.space_id
                """,
                {"span": span, "resolution": resolution, "before": before},
            ).rowcount
            replaced = self.db.execute(
                "delete from gpu_samples where resolution = ? and at < ?", [resolution, before]
            ).rowcount
        return replaced, written

    def delete_gpu_samples(self, before: str) -> int:
        """Delete telemetry rows of every resolution older than ``before``; return how many."""
        with self.transaction():
            return self.db.execute("delete from gpu_samples where at < ?", [before]).rowcount


def open_store(path: Path, retries: int = 3) -> Store:
    """Open the database and apply migrations; translate sqlite failures for the user."""
    for attempt in range(retries):
        try:
            store = Store(path)
            store.migrate()
            return store
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) and attempt + 1 < retries:
                time.sleep(0.5)
                continue
            raise ApplianceError(
                f"Cannot open the database {path}: {exc}",
                hint="check the data directory's permissions and free space "
                "('appliance doctor')",
            ) from None
        except sqlite3.DatabaseError as exc:
            raise ApplianceError(
                f"The database {path} is damaged: {exc}",
                hint="restore the latest backup from the data directory's backups/ folder",
            ) from None
    raise AssertionError("unreachable")
