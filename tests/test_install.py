"""scripts/install.sh: shellcheck-clean, idempotent, and honest about hosts without systemd.

Staged installs (`--root DIR`) check the file layout, idempotency and uninstall/purge; one
real run on this host checks the path a box without systemd as PID 1 takes. Enabling and
starting the units (systemctl, loginctl, podman.socket) cannot run here: see ansible/README.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install.sh"
UNINSTALL = REPO / "scripts" / "uninstall.sh"
UNITS = sorted(p.name for p in (REPO / "systemd").glob("*.service"))


def run(*args: str | Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_mode,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_install_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is part of the test setup: apt-get install -y shellcheck")
    result = subprocess.run([shellcheck, "-x", str(INSTALL), str(UNINSTALL)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_staged_install_copies_units_unchanged_and_writes_the_environment(tmp_path):
    out = run(INSTALL, "--root", tmp_path).stdout
    for name in UNITS:
        installed = tmp_path / "etc/systemd/system" / name
        assert installed.read_bytes() == (REPO / "systemd" / name).read_bytes()
        assert oct(installed.stat().st_mode & 0o777) == "0o644"
    environment = (tmp_path / "etc/appliance/environment").read_text()
    assert "APPLIANCE_" in environment and all(
        line.startswith("#") for line in environment.splitlines() if line.strip())
    assert (tmp_path / "var/lib/appliance").is_dir()
    assert "Not enabling or starting the units" in out
    assert "7 change(s)" in out


def test_second_staged_install_changes_nothing(tmp_path):
    run(INSTALL, "--root", tmp_path)
    before = snapshot(tmp_path)
    out = run(INSTALL, "--root", tmp_path).stdout
    assert snapshot(tmp_path) == before
    assert "Installed (0 change(s)" in out


def test_reinstall_keeps_an_edited_environment_and_restores_a_changed_unit(tmp_path):
    run(INSTALL, "--root", tmp_path)
    environment = tmp_path / "etc/appliance/environment"
    environment.write_text("APPLIANCE_PORTAL_PORT=9090\n")
    unit = tmp_path / "etc/systemd/system/appliance-portal.service"
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    out = run(INSTALL, "--root", tmp_path).stdout
    assert environment.read_text() == "APPLIANCE_PORTAL_PORT=9090\n"
    assert unit.read_bytes() == (REPO / "systemd/appliance-portal.service").read_bytes()
    assert "installed /etc/systemd/system/appliance-portal.service" in out
    assert "1 change(s)" in out


def test_uninstall_keeps_the_data_and_purge_removes_it(tmp_path):
    run(INSTALL, "--root", tmp_path)
    (tmp_path / "opt/appliance/venv/bin").mkdir(parents=True)
    (tmp_path / "var/lib/appliance/appliance.db").write_text("data")
    out = run(UNINSTALL, "--root", tmp_path).stdout
    assert not any((tmp_path / "etc/systemd/system").iterdir())
    assert not (tmp_path / "etc/appliance").exists()
    assert not (tmp_path / "opt/appliance").exists()
    assert (tmp_path / "var/lib/appliance/appliance.db").read_text() == "data"
    assert "--purge removes it" in out
    run(INSTALL, "--root", tmp_path, "--uninstall", "--purge")
    assert not (tmp_path / "var/lib/appliance").exists()


def test_purge_without_uninstall_is_refused(tmp_path):
    result = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path), "--purge"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--purge goes with --uninstall" in result.stderr


def test_install_on_this_host_without_systemd_installs_and_explains():
    """The real thing on this host: setup.sh, /etc/appliance, the units, the migration."""
    if os.geteuid() != 0:
        pytest.fail("the real install runs as root (scripts/test.sh runs the suite as root)")
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        pytest.fail("this test covers hosts without systemd as PID 1; on a systemd host run "
                    "scripts/install.sh by hand and check 'systemctl status appliance-portal'")
    run(INSTALL)
    out = run(INSTALL).stdout
    for name in UNITS:
        assert (Path("/etc/systemd/system") / name).read_bytes() == (
            REPO / "systemd" / name).read_bytes()
    assert Path("/etc/appliance/environment").is_file()
    assert "systemd is not PID 1 on this host" in out
    assert "appliance serve" in out and "appliance scheduler" in out
    assert "The database is up to date." in out
    assert "Installed (0 change(s))" in out
