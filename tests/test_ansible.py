"""The Ansible role and playbooks, run for real: over SSH to "hosts" that are network
namespaces (a veth pair and an sshd each), against real portals with real Spaces.

The namespaces share this machine's filesystem, so the host part of the role goes to one
host under a test prefix, data dir and service account; the declarative Spaces go to a portal
per host (each in its own data dir, listening on the host side of that host's veth pair).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import free_port, make_space_repo, wait_for

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
HOSTS = ("h1", "h2", "h3")
STATIC_SPACE = {"README.md": "---\ntitle: Fleet\nsdk: static\n---\n",
                "index.html": "<h1>fleet</h1>\n"}
BROKEN_SPACE = {"README.md": "---\ntitle: Broken\nsdk: static\n---\n"}  # no index.html


def sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result



def require_prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.fail("the Ansible tests make network namespaces and an sshd: run them as root")
    missing = [what for what, ok in [
        ("openssh-server (apt-get install -y openssh-server)", Path("/usr/sbin/sshd").exists()),
        ("ssh-keygen (openssh-client)", shutil.which("ssh-keygen")),
        ("ip (iproute2)", shutil.which("ip")),
        ("ansible-playbook (pip install -e '.[test]')", (BIN / "ansible-playbook").exists()),
    ] if not ok]
    if missing:
        pytest.fail("missing for the Ansible tests: " + ", ".join(missing))


class Fleet:
    """Network-namespace hosts reached over SSH, each with its own portal."""

    def __init__(self, base: Path):
        self.base = base
        self.tag = uuid.uuid4().hex[:5]
        self.net = 100 + uuid.uuid4().int % 150
        self.processes: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self.portals: dict[str, dict] = {}
        self.sources = base / "sources"
        self.sources.mkdir()
        self.key = base / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key"))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def addresses(self, index: int) -> tuple[str, str]:
        return f"10.{self.net}.{index}.1", f"10.{self.net}.{index}.2"

    def add_host(self, name: str, index: int) -> None:
        ns, outside = f"apl{self.tag}{index}", f"apl{self.tag}o{index}"
        host_side, ns_side = self.addresses(index)
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{host_side}/24", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_side}/24", "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        config = self.base / f"sshd_{name}.conf"
        config.write_text(
            f"ListenAddress {ns_side}\nPort 22\nHostKey {self.base / 'host_key'}\n"
            f"AuthorizedKeysFile {self.key}.pub\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {self.base / f'sshd_{name}.pid'}\nSubsystem sftp internal-sftp\n")
        self.processes.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL, stderr=open(self.base / f"sshd_{name}.log", "w")))

        def answers() -> bool:
            connect = f"import socket; socket.create_connection(('{ns_side}', 22), 1)"
            probe = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", connect],
                                   capture_output=True)
            return probe.returncode == 0
        wait_for(answers, 15, f"sshd in {ns}")
        self.start_portal(name, index)

    def appliance(self, env: dict, *args: str, stdin: str = "") -> str:
        return sh(sys.executable, "-m", "appliance.cli", *args, input=stdin, env=env).stdout

    def start_portal(self, name: str, index: int) -> None:
        data = self.base / f"portal_{name}"
        low = 17400 + index * 40 + (self.net % 5) * 120
        env = {**os.environ, "APPLIANCE_DATA_DIR": str(data),
               "APPLIANCE_LOCAL_SOURCES": str(self.sources),
               "APPLIANCE_PORT_RANGE": f"{low}-{low + 39}",
               "APPLIANCE_CONFIG_FILE": "/nonexistent/appliance.toml"}
        self.appliance(env, "users", "add", "admin", "--role", "admin",
                       stdin="a long test password\n")
        token = self.appliance(env, "tokens", "create", "ansible", "--user", "admin",
                               "--scope", "write").strip()
        host_side, _ = self.addresses(index)
        port = free_port()
        log = open(self.base / f"portal_{name}.log", "w")
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--host", host_side, "--port",
             str(port), "--apps-port", "0"], env=env, stdout=log, stderr=log,
            start_new_session=True))
        url = f"http://{host_side}:{port}"
        self.portals[name] = {"url": url, "token": token, "env": env}
        wait_for(lambda: self.api(name, "/api/v1/whoami", ok_only=True), 30,
                 f"the portal of {name} at {url}")

    def api(self, name: str, path: str, ok_only: bool = False):
        portal = self.portals[name]
        request = urllib.request.Request(portal["url"] + path, headers={
            "Authorization": f"Bearer {portal['token']}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except OSError:
            if ok_only:
                return None
            raise

    def inventory(self, host_vars: dict[str, dict], group_vars: dict | None = None) -> Path:
        hosts = {}
        for name, extra in host_vars.items():
            index = HOSTS.index(name) + 1
            hosts[name] = {
                "ansible_host": self.addresses(index)[1], "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args":
                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "ansible_python_interpreter": "/usr/bin/python3",
                "appliance_install": False,
                "appliance_api_url": self.portals[name]["url"],
                "appliance_api_token": self.portals[name]["token"],
                "appliance_spaces_timeout": 180,
                "appliance_secret_fingerprints_file": str(self.base / f"fingerprints_{name}.json"),
                **extra,
            }
        path = self.base / f"inventory-{uuid.uuid4().hex[:6]}.yml"
        path.write_text(yaml.safe_dump(
            {"appliances": {"hosts": hosts, "vars": group_vars or {}}}))
        return path

    def playbook(self, playbook: str, inventory: Path, *extra: str,
                 check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
               "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-local"),
               "PATH": f"{BIN}:{os.environ['PATH']}"}
        result = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE / playbook),
             *extra], capture_output=True, text=True, env=env, cwd=ANSIBLE, timeout=600)
        if check:
            assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        return result

    def close(self) -> None:
        for name, portal in self.portals.items():
            try:
                for space in self.api(name, "/api/v1/spaces"):
                    subprocess.run([sys.executable, "-m", "appliance.cli", "spaces", "delete",
                                    "--yes", space["id"]], env=portal["env"], capture_output=True,
                                   timeout=60)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
            subprocess.run([sys.executable, "-m", "appliance.cli", "router", "--stop"],
                           env=portal["env"], capture_output=True, timeout=30)
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM) if process.args[0] == sys.executable \
                    else process.terminate()
                process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                process.kill()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines as {host: {ok: n, changed: n, failed: n, ...}}."""
    found = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return found


@pytest.fixture(scope="module")
def fleet():
    require_prerequisites()
    base = Path(tempfile.mkdtemp(prefix="appliance-ansible-"))
    base.chmod(0o755)  # the test service account must reach its home below it
    fleet = Fleet(base)
    try:
        for index, name in enumerate(HOSTS, start=1):
            fleet.add_host(name, index)
        yield fleet
    finally:
        fleet.close()
        shutil.rmtree(base, ignore_errors=True)


def test_the_role_installs_the_packages_setup_installs():
    """The role does what scripts/setup.sh does: the same apt packages."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    listed = re.search(r"local pkgs=\(([^)]*)\)", setup)
    assert listed, "scripts/setup.sh no longer lists its packages in 'local pkgs=(...)'"
    defaults = yaml.safe_load((REPO / "ansible" / "roles" / "appliance" / "defaults" /
                               "main.yml").read_text())
    assert defaults["appliance_packages"] == listed[1].split()
    assert "git-lfs" in defaults["appliance_packages"]


def test_the_role_and_playbooks_are_ansible_lint_clean():
    lint = BIN / "ansible-lint"
    if not lint.exists():
        pytest.fail("ansible-lint is part of the test extras: pip install -e '.[test]'")
    result = subprocess.run([str(lint), "--offline", "."], capture_output=True, text=True,
                            cwd=ANSIBLE, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_role_installs_the_host_over_ssh_and_a_second_run_changes_nothing(fleet):
    user = f"aplt{fleet.tag}"
    root = fleet.base / "install"
    host_vars = {
        "appliance_install": True,
        "appliance_service_user": user,
        "appliance_prefix": str(root / "opt"),
        "appliance_data_dir": str(root / "data"),
        "appliance_cache_dir": str(root / "cache"),
        "appliance_config_dir": str(root / "etc"),
        "appliance_systemd_dir": str(root / "systemd"),
        "appliance_bin_link": str(root / "bin/appliance"),
        "appliance_portal_port": 18999,
        "appliance_apt_update_cache": False,
        "appliance_build_base_image": False,
    }
    # No internet in the namespace: a wheelhouse of the dependencies, as on an offline LAN.
    wheels = fleet.base / "wheels"
    frozen = sh("/opt/appliance/venv/bin/pip", "freeze", "--exclude", "appliance").stdout
    (fleet.base / "requirements.txt").write_text(frozen + "setuptools>=68\nwheel\n")
    sh(sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "-r",
       str(fleet.base / "requirements.txt"))
    host_vars["appliance_pip_extra_args"] = f"--no-index --find-links {wheels}"
    # A snapshot of the source: others may edit the checkout between the two runs.
    snapshot = fleet.base / "src"
    snapshot.mkdir()
    for part in ("pyproject.toml", "README.md", "appliance", "images", "systemd"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, snapshot / part)
    host_vars["appliance_source_dir"] = str(snapshot)
    inventory = fleet.inventory({"h1": host_vars})
    try:
        first = fleet.playbook("site.yml", inventory)
        assert recap(first.stdout)["h1"]["changed"] > 0
        second = fleet.playbook("site.yml", inventory)
        assert recap(second.stdout)["h1"]["changed"] == 0, second.stdout[-6000:]
        assert recap(second.stdout)["h1"]["failed"] == 0
        for unit in (REPO / "systemd").glob("*.service"):
            assert (root / "systemd" / unit.name).read_bytes() == unit.read_bytes()
        environment = (root / "etc/environment").read_text()
        assert f"APPLIANCE_DATA_DIR={root / 'data'}" in environment
        assert "APPLIANCE_PORTAL_PORT=18999" in environment
        assert "systemd does not manage services" in first.stdout
        account = pwd.getpwnam(user)
        assert (root / "data/appliance.db").stat().st_uid == account.pw_uid
        assert re.search(rf"^{user}:\d+:65536$", Path("/etc/subuid").read_text(), re.M)
        version = sh(str(root / "bin/appliance"), "--version").stdout
        assert "appliance" in version
    finally:
        for pid in subprocess.run(["pgrep", "-u", user], capture_output=True,
                                  text=True).stdout.split():
            subprocess.run(["kill", pid], capture_output=True)
        subprocess.run(["userdel", user], capture_output=True)
        for path in ("/etc/subuid", "/etc/subgid"):
            text = Path(path).read_text()
            Path(path).write_text("".join(line for line in text.splitlines(keepends=True)
                                          if not line.startswith(f"{user}:")))


def test_declared_spaces_are_applied_through_the_api_and_a_second_run_changes_nothing(fleet):
    source = make_space_repo(fleet.sources / "fleet", STATIC_SPACE)
    spaces = [{"id": "fleet/site", "source": str(source), "revision": "main",
               "hardware": "cpu", "variables": {"GREETING": "hello"},
               "secrets": {"API_KEY": "s3cret"}}]
    inventory = fleet.inventory({"h1": {"appliance_spaces": spaces}})
    first = fleet.playbook("site.yml", inventory)
    assert recap(first.stdout)["h1"]["changed"] >= 3  # added, variable, secret
    assert "s3cret" not in first.stdout
    space = fleet.api("h1", "/api/v1/spaces/fleet/site")
    assert space["stage"] == "RUNNING" and space["url"]
    assert fleet.api("h1", "/api/v1/spaces/fleet/site/variables") == {"GREETING": "hello"}
    assert [s["key"] for s in fleet.api("h1", "/api/v1/spaces/fleet/site/secrets")] == ["API_KEY"]
    second = fleet.playbook("site.yml", inventory)
    assert recap(second.stdout)["h1"]["changed"] == 0, second.stdout[-6000:]

    spaces[0]["secrets"]["API_KEY"] = "rotated"
    third = fleet.playbook("site.yml", fleet.inventory({"h1": {"appliance_spaces": spaces}}))
    assert "Set the new or changed secrets of Space fleet/site" in third.stdout
    assert recap(third.stdout)["h1"]["changed"] >= 2  # the secret, its fingerprint (+restart)


def test_undeclared_spaces_are_left_alone_unless_pruning(fleet):
    source = make_space_repo(fleet.sources / "other", STATIC_SPACE)
    fleet.appliance(fleet.portals["h3"]["env"], "spaces", "add", str(source), "--name",
                    "manual/other")
    declared = make_space_repo(fleet.sources / "declared", STATIC_SPACE)
    spaces = [{"id": "fleet/declared", "source": str(declared)}]
    fleet.playbook("site.yml", fleet.inventory({"h3": {"appliance_spaces": spaces}}))
    ids = {s["id"] for s in fleet.api("h3", "/api/v1/spaces")}
    assert ids == {"fleet/declared", "manual/other"}
    fleet.playbook("site.yml", fleet.inventory(
        {"h3": {"appliance_spaces": spaces, "appliance_prune_spaces": True}}))
    assert {s["id"] for s in fleet.api("h3", "/api/v1/spaces")} == {"fleet/declared"}


def test_rolling_update_stops_at_the_batch_that_fails(fleet):
    good = make_space_repo(fleet.sources / "rolling", STATIC_SPACE)
    broken = make_space_repo(fleet.sources / "broken", BROKEN_SPACE)
    for name in ("h2", "h3"):
        for space in fleet.api(name, "/api/v1/spaces"):
            fleet.appliance(fleet.portals[name]["env"], "spaces", "delete", space["id"], "--yes")
    declared = {"id": "fleet/rolling", "source": str(good)}
    inventory = fleet.inventory({
        "h1": {"appliance_spaces": [declared]},
        "h2": {"appliance_spaces": [{"id": "fleet/rolling", "source": str(broken)}]},
        "h3": {"appliance_spaces": [declared]},
    })
    result = fleet.playbook("fleet.yml", inventory, check=False)
    assert result.returncode != 0, result.stdout[-6000:]
    counts = recap(result.stdout)
    assert counts["h1"]["failed"] == 0 and counts["h2"]["failed"] == 1, result.stdout[-6000:]
    assert "h3" not in counts  # never reached: the rollout stopped after h2's batch
    assert fleet.api("h1", "/api/v1/spaces/fleet/rolling")["stage"] == "RUNNING"
    assert fleet.api("h2", "/api/v1/spaces/fleet/rolling")["stage"] == "NO_APP_FILE"
    assert fleet.api("h3", "/api/v1/spaces") == []
