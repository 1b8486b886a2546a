"""The systemd units: each passes `systemd-analyze verify`, runs as the service account, and
is ordered so that a reboot brings everything back."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
LONG_RUNNING = {"appliance-router.service", "appliance-portal.service",
                "appliance-scheduler.service"}


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_the_units_are_there():
    assert {p.name for p in SERVICES} == LONG_RUNNING | {"appliance-migrate.service"}


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is part of the test setup"
    if not Path("/opt/appliance/venv/bin/appliance").exists():
        pytest.fail("scripts/setup.sh installs /opt/appliance/venv/bin/appliance first")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_unit_runs_unprivileged_and_hardened(path):
    service = unit(path)["Service"]
    assert service["User"] == "appliance" and service["Group"] == "appliance"
    assert service["ExecStart"].startswith("/opt/appliance/venv/bin/appliance ")
    for option in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables",
                   "ProtectControlGroups", "RestrictSUIDSGID"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/appliance" in service["ReadWritePaths"].split()


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_long_running_units_restart_and_wait_for_the_migration(name):
    parsed = unit(UNITS / name)
    assert parsed["Service"]["Restart"] == "always"
    assert "appliance-migrate.service" in parsed["Unit"]["Requires"].split()
    assert "appliance-migrate.service" in parsed["Unit"]["After"].split()
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_migration_runs_once_before_the_others():
    migrate = unit(UNITS / "appliance-migrate.service")
    assert migrate["Service"]["Type"] == "oneshot"
    assert migrate["Service"]["RemainAfterExit"] == "yes"
    assert migrate["Service"]["ExecStart"].endswith(" migrate")
    for name in ("appliance-portal.service", "appliance-scheduler.service"):
        assert "appliance-router.service" in unit(UNITS / name)["Unit"]["After"].split()


def test_the_portal_and_the_scheduler_leave_build_workers_to_finish():
    for name in ("appliance-portal.service", "appliance-scheduler.service"):
        assert unit(UNITS / name)["Service"]["KillMode"] == "process"
