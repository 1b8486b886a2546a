"""`appliance migrate`: pending migrations are applied after an online backup; nothing to do
is said so and leaves no backup behind."""

from __future__ import annotations

import sqlite3

from click.testing import CliRunner

from appliance.adapters import store
from appliance.cli.main import cli
from appliance.config import load_config
from appliance.upkeep import housekeeping


def test_migrate_backs_up_then_applies_what_is_pending(tmp_path, monkeypatch):
    config = load_config({}, data_dir=str(tmp_path))
    old = store.Store(config.db_path)
    monkeypatch.setattr(store, "MIGRATIONS", store.MIGRATIONS[:5])
    old.migrate()
    old.db["spaces"].insert({"id": "lab/kept", "source": "/s", "stage": "RUNNING",
                             "port": 17000, "hardware": "cpu", "desired": "running"})
    old.close()
    monkeypatch.undo()

    backup, applied = housekeeping.migrate_with_backup(config)
    assert applied == [name for name, _ in store.MIGRATIONS[5:]]
    assert backup is not None and backup.name.startswith("pre-migrate-")
    saved = sqlite3.connect(backup)
    assert saved.execute("select id from spaces").fetchall() == [("lab/kept",)]
    assert "users" not in {r[0] for r in saved.execute("select name from sqlite_master")}
    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    current = store.open_store(config.db_path)
    assert current.pending_migrations() == [] and current.get_space("lab/kept")
    current.close()


def test_migrate_command_says_when_there_is_nothing_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    first = runner.invoke(cli, ["migrate"], obj={})
    assert first.exit_code == 0 and "Applied 001_initial" in first.output
    again = runner.invoke(cli, ["migrate"], obj={})
    assert again.exit_code == 0 and again.output.strip() == "The database is up to date."
    assert not (tmp_path / "backups").exists()
