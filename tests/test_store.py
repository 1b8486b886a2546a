"""The SQLite store against a real database file: migrations, compare-and-swap, crash safety."""

import json
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance import stages
from appliance.adapters.store import MIGRATIONS, Store, open_store
from appliance.errors import ApplianceError, Conflict, NotFound

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "appliance.db"


@pytest.fixture
def store(db_path):
    handle = open_store(db_path)
    yield handle
    handle.close()


def space_row(space_id="owner/name", port=17000, stage=stages.BUILDING, **extra):
    return {
        "id": space_id, "source": "https://example.org/owner/name",
        "source_display": "https://example.org/owner/name", "stage": stage, "port": port,
        "hardware": "cpu", "desired": "running", **extra,
    }


def all_events(store):
    """Every events row, raw (no JSON decoding), oldest first."""
    return list(store.db.query("select * from events order by id"))


# -- schema ---------------------------------------------------------------------------------


def test_migrations_are_named_in_the_order_they_apply():
    names = [name for name, _ in MIGRATIONS]
    assert len(names) == len(set(names))
    assert names == sorted(names)
    assert all(name[:3].isdigit() and name[3] == "_" for name in names)


def test_migrate_applies_each_migration_once_and_records_it(db_path):
    first = Store(db_path)
    assert first.applied_migrations() == []
    assert first.migrate() == [name for name, _ in MIGRATIONS]
    assert first.migrate() == []
    first.close()
    second = Store(db_path)
    assert second.migrate() == []
    assert second.applied_migrations() == [name for name, _ in MIGRATIONS]
    rows = list(second.db.query("select name, applied_at from migrations"))
    assert all(row["applied_at"] for row in rows)
    second.close()


def test_database_uses_wal_journal(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_file_is_readable_by_its_owner_only(store, db_path):
    store.insert_space(space_row(), "test")
    store.set_kv("secrets", "owner/name", "TOKEN", "hunter2-secret", "test")
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_integrity_check_passes_on_a_fresh_database(store):
    store.insert_space(space_row(), "test")
    assert store.integrity_ok()


def test_open_store_on_a_garbage_file_says_the_database_is_damaged(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database, just some bytes\n" * 100)
    with pytest.raises(ApplianceError) as caught:
        open_store(db_path)
    assert caught.value.message.startswith(f"The database {db_path} is damaged: ")
    assert caught.value.hint == (
        "restore the latest backup from the data directory's backups/ folder"
    )


# -- spaces ---------------------------------------------------------------------------------


def test_insert_space_records_the_row_and_a_created_event(store):
    store.insert_space(space_row(), "cli:alice")
    row = store.get_space("owner/name")
    assert (row["stage"], row["port"], row["created_at"]) == ("BUILDING", 17000, row["updated_at"])
    [event] = store.events("owner/name")
    assert (event["kind"], event["actor"]) == ("created", "cli:alice")
    assert event["detail"] == {"source": "https://example.org/owner/name"}


def test_insert_space_with_a_taken_id_is_a_conflict(store):
    store.insert_space(space_row(), "test")
    with pytest.raises(Conflict) as caught:
        store.insert_space(space_row(port=17001), "test")
    assert caught.value.message == "A Space named owner/name already exists"
    assert "appliance spaces update owner/name" in caught.value.hint
    assert len(store.list_spaces()) == 1
    assert len(all_events(store)) == 1


def test_insert_space_with_a_taken_port_is_a_conflict(store):
    store.insert_space(space_row(), "test")
    with pytest.raises(Conflict) as caught:
        store.insert_space(space_row("owner/other", port=17000), "test")
    assert caught.value.message.startswith("Could not record Space owner/other: ")
    assert "already exists" not in caught.value.message
    assert store.find_space("owner/other") is None
    assert len(all_events(store)) == 1


def test_get_space_of_an_unknown_id_is_not_found(store):
    with pytest.raises(NotFound) as caught:
        store.get_space("nope/nope")
    assert caught.value.message == "No Space named nope/nope"
    assert store.find_space("nope/nope") is None


def test_used_ports_holds_stable_and_backend_ports(store):
    store.insert_space(space_row(), "test")
    store.insert_space(space_row("owner/b", port=17001, backend_port=17050), "test")
    assert store.used_ports() == {17000, 17001, 17050}


def test_routes_map_stable_ports_to_backends_and_skip_deleting_spaces(store):
    store.insert_space(space_row("a/serving", port=17000, stage=stages.RUNNING,
                                 backend_port=17100), "test")
    store.insert_space(space_row("a/building", port=17001), "test")
    store.insert_space(space_row("a/going", port=17002, stage=stages.DELETING,
                                 backend_port=17102), "test")
    assert store.routes() == {17000: 17100, 17001: None}


# -- compare-and-swap -------------------------------------------------------------------------


def test_move_from_the_expected_stage_updates_fields_and_writes_an_event(store):
    store.insert_space(space_row(), "test")
    moved = store.move("owner/name", stages.BUILDING, stages.APP_STARTING, "worker",
                       detail={"revision": "abc"}, image="img:1")
    assert (moved["stage"], moved["image"]) == ("APP_STARTING", "img:1")
    assert store.get_space("owner/name")["stage"] == "APP_STARTING"
    latest = store.events("owner/name")[0]
    assert (latest["kind"], latest["actor"]) == ("stage:APP_STARTING", "worker")
    assert latest["detail"] == {"from": "BUILDING", "revision": "abc"}


def test_move_accepts_any_of_several_expected_stages(store):
    store.insert_space(space_row(stage=stages.RUNNING), "test")
    store.move("owner/name", {stages.RUNNING, stages.RUNTIME_ERROR}, stages.STOPPED, "cli",
               event="stopped")
    assert store.get_space("owner/name")["stage"] == "STOPPED"
    assert store.events("owner/name")[0]["kind"] == "stopped"


def test_move_fails_when_the_stage_moved_first(store):
    store.insert_space(space_row(stage=stages.RUNNING), "test")
    store.move("owner/name", stages.RUNNING, stages.STOPPED, "cli")
    before = all_events(store)
    with pytest.raises(Conflict) as caught:
        store.move("owner/name", stages.RUNNING, stages.PAUSED, "cli")
    assert caught.value.message == "Space owner/name is STOPPED, not RUNNING"
    assert store.get_space("owner/name")["stage"] == "STOPPED"
    assert all_events(store) == before


def test_forbidden_move_raises_conflict_and_changes_nothing(store):
    store.insert_space(space_row(stage=stages.STOPPED), "test")
    row_before, events_before = store.get_space("owner/name"), all_events(store)
    with pytest.raises(Conflict) as caught:
        store.move("owner/name", stages.STOPPED, stages.RUNNING, "cli", backend_port=17100)
    assert caught.value.message == "Space owner/name cannot go from STOPPED to RUNNING"
    assert store.get_space("owner/name") == row_before
    assert all_events(store) == events_before


def test_move_of_an_unknown_space_is_not_found(store):
    with pytest.raises(NotFound, match="No Space named nope/nope"):
        store.move("nope/nope", stages.BUILDING, stages.APP_STARTING, "cli")


def test_second_handle_racing_the_same_move_gets_a_conflict(store, db_path):
    store.insert_space(space_row(), "test")
    rival = Store(db_path)
    try:
        # Both handles saw BUILDING; the worker's move lands first.
        assert rival.get_space("owner/name")["stage"] == "BUILDING"
        store.move("owner/name", stages.BUILDING, stages.APP_STARTING, "worker")
        with pytest.raises(Conflict, match="is APP_STARTING, not BUILDING"):
            rival.move("owner/name", stages.BUILDING, stages.STOPPED, "web")
    finally:
        rival.close()
    assert store.get_space("owner/name")["stage"] == "APP_STARTING"
    kinds = [e["kind"] for e in all_events(store)]
    assert kinds == ["created", "stage:APP_STARTING"]


# -- secrets and variables ------------------------------------------------------------------


def test_set_kv_stores_values_and_kv_meta_shows_names_and_dates_only(store):
    store.insert_space(space_row(), "test")
    store.set_kv("secrets", "owner/name", "B_TOKEN", "two", "cli")
    store.set_kv("secrets", "owner/name", "A_TOKEN", "one", "cli")
    store.set_kv("secrets", "owner/name", "A_TOKEN", "one-again", "cli")
    assert store.kv("secrets", "owner/name") == {"A_TOKEN": "one-again", "B_TOKEN": "two"}
    meta = store.kv_meta("secrets", "owner/name")
    assert [m["key"] for m in meta] == ["A_TOKEN", "B_TOKEN"]
    assert all(set(m) == {"key", "updated_at"} for m in meta)
    assert store.kv("variables", "owner/name") == {}


def test_set_kv_on_an_unknown_space_is_not_found(store):
    with pytest.raises(NotFound, match="No Space named nope/nope"):
        store.set_kv("variables", "nope/nope", "KEY", "value", "cli")


def test_delete_kv_removes_the_key_and_a_missing_key_is_not_found(store):
    store.insert_space(space_row(), "test")
    store.set_kv("variables", "owner/name", "MODE", "fast", "cli")
    store.delete_kv("variables", "owner/name", "MODE", "cli")
    assert store.kv("variables", "owner/name") == {}
    with pytest.raises(NotFound) as caught:
        store.delete_kv("variables", "owner/name", "MODE", "cli")
    assert caught.value.message == "Space owner/name has no variable named MODE"
    assert store.events("owner/name")[0]["kind"] == "variable:deleted"


def test_secret_values_never_reach_the_events_table(store):
    planted = "s3cr3t-planted-value-7f1c"
    store.insert_space(space_row(), "test")
    store.set_kv("secrets", "owner/name", "HF_TOKEN", planted, "cli")
    store.set_kv("secrets", "owner/name", "HF_TOKEN", planted + "-rotated", "cli")
    store.delete_kv("secrets", "owner/name", "HF_TOKEN", "cli")
    rows = all_events(store)
    assert [r["kind"] for r in rows] == ["created", "secret:set", "secret:set", "secret:deleted"]
    assert all(json.loads(r["detail"]) == {"key": "HF_TOKEN"} for r in rows[1:])
    for row in rows:
        for column, value in row.items():
            assert planted not in str(value), f"secret value leaked into events.{column}"


# -- deleting -------------------------------------------------------------------------------


def test_delete_space_rows_removes_everything_but_the_events(store, tmp_path):
    store.insert_space(space_row(), "test")
    store.insert_space(space_row("owner/kept", port=17001), "test")
    store.set_kv("secrets", "owner/name", "TOKEN", "x", "cli")
    store.set_kv("variables", "owner/name", "MODE", "y", "cli")
    store.start_build("owner/name", False, tmp_path / "build.log")
    store.delete_space_rows("owner/name", "cli")
    assert store.find_space("owner/name") is None
    for table in ("secrets", "variables", "builds"):
        count = store.db.execute(
            f"select count(*) from {table} where space_id = ?", ["owner/name"]).fetchone()[0]
        assert count == 0, table
    assert store.latest_build("owner/name") is None
    kinds = [e["kind"] for e in store.events("owner/name")]
    assert kinds == ["deleted", "variable:set", "secret:set", "created"]
    assert store.find_space("owner/kept") is not None


# -- transactions and crashes ----------------------------------------------------------------


def test_transaction_that_raises_midway_leaves_no_rows(store):
    with pytest.raises(RuntimeError, match="power cut"):
        with store.transaction():
            store.insert_space(space_row(), "test")
            assert store.find_space("owner/name") is not None
            raise RuntimeError("power cut")
    assert store.find_space("owner/name") is None
    assert all_events(store) == []
    store.insert_space(space_row(), "test")
    assert store.find_space("owner/name") is not None


CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from appliance.adapters.store import Store

    store = Store(Path(sys.argv[1]))
    with store.transaction():
        store.insert_space({"id": "owner/name", "source": "s", "stage": "BUILDING",
                            "port": 17000, "hardware": "cpu", "desired": "running"}, "child")
        print("inserted", store.find_space("owner/name")["id"], flush=True)
        os._exit(9)  # the process dies before COMMIT
""")


def test_process_killed_before_commit_leaves_no_row_and_the_id_stays_free(store, db_path):
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(db_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert done.returncode == 9, done.stderr
    assert done.stdout.strip() == "inserted owner/name"
    store.close()
    reopened = open_store(db_path)
    try:
        assert reopened.integrity_ok()
        assert reopened.find_space("owner/name") is None
        assert all_events(reopened) == []
        reopened.insert_space(space_row(), "test")
        assert reopened.get_space("owner/name")["stage"] == "BUILDING"
    finally:
        reopened.close()


def test_insert_space_through_raw_sqlite_still_enforces_unique_ports(store, db_path):
    # The UNIQUE index, not application code, guards ports: another writer cannot bypass it.
    store.insert_space(space_row(), "test")
    raw = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="spaces.port"):
            raw.execute(
                "insert into spaces (id, source, stage, port, hardware, desired) "
                "values ('x/y', 's', 'BUILDING', 17000, 'cpu', 'running')")
    finally:
        raw.close()
