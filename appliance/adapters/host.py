"""Read host facts (cgroups, subordinate ids, devices, Podman config files) for the doctor.

Every function takes ``root`` so tests can point it at a fake tree under ``tmp_path``.
"""

from __future__ import annotations

import pwd
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/")

# v1 hierarchies that carry a real controller; a bare ``name=systemd`` hierarchy does not
# stop a host from being unified.
V1_CONTROLLERS = frozenset(
    "blkio cpu cpuacct cpuset devices freezer hugetlb memory misc net_cls net_prio "
    "perf_event pids rdma".split()
)
LIMIT_CONTROLLERS = ("cpu", "memory", "pids")
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path


def under(root: Path, path: str | Path) -> Path:
    """Return host path ``path`` (relative ones from the working directory) inside ``root``."""
    return root / Path(path).absolute().relative_to("/")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def service_account(name: str, root: Path = ROOT) -> Account | None:
    """Look up ``name`` (or a uid number) in the passwd database of ``root``."""
    if root == ROOT:
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except KeyError:
            return None
        return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    for line in (_read(root / "etc/passwd") or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and name in (fields[0], fields[2]):
            try:
                return Account(fields[0], int(fields[2]), int(fields[3]), Path(fields[5]))
            except ValueError:
                continue
    return None


def _mounts(root: Path) -> list[tuple[str, str, set[str]]] | None:
    """Return (mount point, fs type, super options) for each mount, or None if unreadable."""
    text = _read(root / "proc/self/mountinfo")
    if text is not None:
        found = []
        for line in text.splitlines():
            left, sep, right = line.partition(" - ")
            head, tail = left.split(), right.split()
            if sep and len(head) >= 5 and len(tail) >= 3:
                found.append((head[4], tail[0], set(tail[2].split(","))))
        return found
    text = _read(root / "proc/mounts")
    if text is None:
        return None
    return [
        (f[1], f[2], set(f[3].split(",")))
        for f in (line.split() for line in text.splitlines())
        if len(f) >= 4
    ]


def cgroup_mode(root: Path = ROOT) -> str:
    """Say how cgroups are mounted: "v2" (unified), "hybrid" or "v1"."""
    mounts = _mounts(root)
    if mounts is None:
        return "v2" if (root / "sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    v1 = any(kind == "cgroup" and opts & V1_CONTROLLERS for _, kind, opts in mounts)
    v2 = any(kind == "cgroup2" for _, kind, _ in mounts)
    if v1:
        return "hybrid" if v2 else "v1"
    if v2 or (root / "sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    return "v1"


def systemd_is_pid1(root: Path = ROOT) -> bool:
    """Tell whether systemd runs as PID 1 (so logind, lingering and user units exist)."""
    return (_read(root / "proc/1/comm") or "").strip() == "systemd"


def _id_ranges(path: Path, keys: set[str]) -> list[tuple[int, int]]:
    ranges = []
    for line in (_read(path) or "").splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in keys:
            try:
                ranges.append((int(fields[1]), int(fields[2])))
            except ValueError:
                continue
    return ranges


def subid_ranges(user: str, root: Path = ROOT) -> dict[str, list[tuple[int, int]]]:
    """Return the user's (start, count) ranges from /etc/subuid and /etc/subgid."""
    keys = {user}
    account = service_account(user, root)
    if account is not None:
        keys |= {account.name, str(account.uid)}
    return {kind: _id_ranges(root / "etc" / kind, keys) for kind in ("subuid", "subgid")}


def first_free_subid(root: Path = ROOT, at_least: int = 100000) -> int:
    """Return the lowest start at or above ``at_least`` past every range already handed out."""
    end = at_least
    for kind in ("subuid", "subgid"):
        for line in (_read(root / "etc" / kind) or "").splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def tun_mode(root: Path = ROOT) -> int | None:
    """Return the permission bits of /dev/net/tun, or None when it is absent."""
    try:
        return (root / "dev/net/tun").stat().st_mode & 0o7777
    except OSError:
        return None


def _toml(path: Path) -> dict:
    text = _read(path)
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}


def _engine(path: Path) -> dict:
    engine = _toml(path).get("engine", {})
    if not isinstance(engine, dict):
        return {}
    return {k: engine[k] for k in ("runtime", "cgroup_manager") if isinstance(engine.get(k), str)}


def user_containers_conf(home: Path) -> dict:
    """Return [engine] runtime and cgroup_manager from ~/.config/containers/containers.conf."""
    return _engine(home / ".config/containers/containers.conf")


def system_containers_conf(root: Path = ROOT) -> dict:
    """Return the same keys from the system-wide containers.conf files (later files win)."""
    merged: dict = {}
    for folder in ("usr/share/containers", "etc/containers"):
        merged.update(_engine(root / folder / "containers.conf"))
    return merged


def user_storage_conf(home: Path) -> dict:
    """Return the [storage] driver set in ~/.config/containers/storage.conf."""
    storage = _toml(home / ".config/containers/storage.conf").get("storage", {})
    if isinstance(storage, dict) and isinstance(storage.get("driver"), str):
        return {"driver": storage["driver"]}
    return {}


def _delegated_controllers(uid: int, root: Path) -> set[str] | None:
    path = root / (
        f"sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service/cgroup.controllers"
    )
    text = _read(path)
    return None if text is None else set(text.split())


def resource_limits_enforceable(user_uid: int | None, root: Path = ROOT) -> tuple[bool, str]:
    """Tell whether --memory, --cpus and --pids-limit work for the service user's containers."""
    mode = cgroup_mode(root)
    if mode != "v2":
        label = "cgroup v1 (hybrid)" if mode == "hybrid" else "cgroup v1"
        return False, (
            f"{label}: --memory, --cpus and --pids-limit cannot be enforced for rootless containers"
        )
    if user_uid is None:
        return False, "cgroup v2, but the service user does not exist to delegate cgroups to"
    delegated = _delegated_controllers(user_uid, root)
    if delegated is None:
        return False, (
            "cgroup v2 without systemd delegation for the service user: "
            f"no user@{user_uid}.service cgroup, so --memory, --cpus and --pids-limit "
            "cannot be enforced"
        )
    missing = [c for c in LIMIT_CONTROLLERS if c not in delegated]
    if missing:
        return False, (
            f"cgroup v2, but user@{user_uid}.service is not delegated "
            f"{', '.join(missing)} (has: {' '.join(sorted(delegated)) or 'nothing'})"
        )
    return True, f"cgroup v2 with {', '.join(LIMIT_CONTROLLERS)} delegated to user@{user_uid}"


def has_capability(bit: int, root: Path = ROOT) -> bool | None:
    """Tell whether this process holds capability ``bit`` (None when unknown)."""
    for line in (_read(root / "proc/self/status") or "").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return None


def has_processes(uid: int, root: Path = ROOT) -> bool:
    """Return whether any process runs with real uid ``uid`` (read from /proc/PID/status)."""
    for status in under(root, "/proc").glob("[0-9]*/status"):
        for line in (_read(status) or "").splitlines():
            if line.startswith("Uid:"):
                if line.split()[1:2] == [str(uid)]:
                    return True
                break
    return False


def disk_free_bytes(path: Path) -> int:
    """Return the bytes free to unprivileged users on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def which(name: str) -> str | None:
    """Return the full path of command ``name`` on PATH, or None."""
    return shutil.which(name)


def cdi_spec_files(root: Path = ROOT) -> list[Path]:
    """List the CDI spec files (*.yaml, *.json) in /etc/cdi and /var/run/cdi."""
    found: list[Path] = []
    for folder in ("etc/cdi", "var/run/cdi"):
        directory = root / folder
        if directory.is_dir():
            found += sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".json"))
    return found


def nvidia_cdi_specs(root: Path = ROOT) -> list[Path]:
    """Return the CDI spec files that describe NVIDIA devices (nvidia.com/gpu)."""
    found = []
    for path in cdi_spec_files(root):
        text = _read(path) or ""
        if "nvidia" in path.name.lower() or "nvidia.com/" in text:
            found.append(path)
    return found


def nvidia_device_present(root: Path = ROOT) -> bool:
    """Tell whether an NVIDIA GPU is present (discrete driver or a Jetson's L4T)."""
    return any(
        (root / p).exists()
        for p in ("dev/nvidia0", "proc/driver/nvidia/version", "etc/nv_tegra_release")
    )


def is_jetson(root: Path = ROOT) -> bool:
    """Tell whether this is a Jetson (L4T), whose CDI spec is generated in csv mode."""
    return (root / "etc/nv_tegra_release").exists()


def base_interpreter() -> Path:
    """Return the real Python executable behind this process (a venv's base interpreter)."""
    return Path(getattr(sys, "_base_executable", "") or sys.executable).resolve()


def blocked_ancestor(path: Path, uid: int, gid: int, root: Path = ROOT) -> Path | None:
    """Return the first directory above ``path`` that uid/gid cannot enter, or None."""
    for parent in reversed(Path(path).parents):
        try:
            st = under(root, parent).stat()
        except OSError:
            return parent
        if (
            uid == 0
            or st.st_mode & 0o001
            or (st.st_uid == uid and st.st_mode & 0o100)
            or (st.st_gid == gid and st.st_mode & 0o010)
        ):
            continue
        return parent
    return None
