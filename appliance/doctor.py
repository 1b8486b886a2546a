"""Check that this host can run Spaces with rootless Podman, and say exactly how to fix it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .adapters import host
from .config import Config
from .errors import ApplianceError
from .gpu import nvml

GIB = 1 << 30
SUBIDS_NEEDED = 65536
CRUN_HYBRID_ERROR = "crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2"
PODMAN_PACKAGES = "apt-get install podman uidmap slirp4netns fuse-overlayfs runc"
NOT_CHECKED = "not checked"
SYMBOLS = {"ok": "✔", "warn": "!", "fail": "✘"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Facts:
    """What every check may look at, gathered once per run."""

    config: Config
    root: Path
    user: str
    account: host.Account | None
    systemd: bool
    mode: str
    podman: dict | None
    podman_error: str | None
    base_image_probe: Callable[[], tuple[bool, str]] | None = None
    inventory: nvml.Inventory | None = None  # the GPUs as NVML reads them

    @property
    def uid(self) -> str:
        return str(self.account.uid) if self.account else "UID"

    @property
    def home(self) -> Path:
        """Return the service user's home as the host sees it (the data dir before useradd)."""
        return self.account.home if self.account else Path(self.config.data_dir)

    @property
    def socket_url(self) -> str:
        if self.config.podman_url or self.account is None:
            return self.config.podman_socket_url
        return f"unix:///run/user/{self.account.uid}/podman/podman.sock"

    def as_user(self, command: str) -> str:
        return f"runuser -u {self.user} -- env XDG_RUNTIME_DIR=/run/user/{self.uid} {command}"

    def engine(self) -> dict:
        """Return containers.conf's [engine] settings: system files, then the user's."""
        conf = host.system_containers_conf(self.root)
        return conf | (host.user_containers_conf(self.local_home) if self.account else {})

    @property
    def local_home(self) -> Path:
        return host.under(self.root, self.home)

    def engine_fix(self, **keys: str) -> str:
        lines = "\n".join(f'{key} = "{value}"' for key, value in keys.items())
        path = self.home / ".config/containers/containers.conf"
        return f"as {self.user}, put in the [engine] table of {path}:\n[engine]\n{lines}"


def _skipped(f: Facts, name: str) -> Check | None:
    if f.account is None:
        return Check(name, "warn", f"{NOT_CHECKED}: service user {f.user} does not exist")
    return None


def check_service_user(f: Facts) -> Check:
    if f.account is None:
        fix = (
            f"useradd --system --create-home --home-dir {f.config.data_dir} "
            f"--shell /usr/sbin/nologin {f.user}"
        )
        return Check("service-user", "fail", f"no account named {f.user}", fix)
    if f.account.uid == 0:
        return Check(
            "service-user",
            "fail",
            f"service user {f.user} is uid 0, but Spaces must run rootless",
            "set APPLIANCE_SERVICE_USER=appliance and create that account",
        )
    return Check("service-user", "ok", f"{f.user} (uid {f.account.uid}, home {f.account.home})")


def check_podman(f: Facts) -> Check:
    path = host.which("podman")
    if path is None:
        return Check("podman", "fail", "podman is not installed", PODMAN_PACKAGES)
    if f.podman is None:
        why = f.podman_error or "no API probe"
        return Check("podman", "warn", f"{path}; version {NOT_CHECKED} ({why})")
    version = str(f.podman.get("version", "?"))
    if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < (4, 4):
        return Check(
            "podman",
            "warn",
            f"Podman {version} at {path}: no Quadlet and no --health-on-failure "
            "(both arrived in 4.4); the appliance works without them",
        )
    return Check("podman", "ok", f"Podman {version} at {path}")


def check_uidmap(f: Facts) -> Check:
    missing = [n for n in ("newuidmap", "newgidmap") if host.which(n) is None]
    if missing:
        detail = f"{' and '.join(missing)} missing: rootless Podman cannot map subordinate ids"
        return Check("uidmap", "fail", detail, "apt-get install uidmap")
    return Check("uidmap", "ok", f"newuidmap at {host.which('newuidmap')}")


def check_slirp4netns(f: Facts) -> Check:
    path = host.which("slirp4netns")
    if path is None:
        detail = "slirp4netns missing: rootless containers get no network"
        return Check("slirp4netns", "fail", detail, "apt-get install slirp4netns")
    return Check("slirp4netns", "ok", path)


def check_cgroups(f: Facts) -> Check:
    if f.mode == "v2":
        return Check("cgroups", "ok", "cgroup v2 (unified)")
    label = "cgroup v1"
    if f.mode == "hybrid":
        label += " in hybrid mode (v1 controllers plus cgroup2 at /sys/fs/cgroup/unified)"
    return Check(
        "cgroups",
        "warn",
        f"{label}: crun cannot run containers and rootless limits are not enforced "
        "(see runtime and limits)",
        "boot with cgroup v2: add systemd.unified_cgroup_hierarchy=1 to GRUB_CMDLINE_LINUX "
        "in /etc/default/grub, then update-grub && reboot",
    )


def check_runtime(f: Facts) -> Check:
    configured = f.engine().get("runtime")
    if f.podman and f.podman.get("runtime"):
        runtime, source = str(f.podman["runtime"]), "reported by Podman"
    elif configured:
        runtime, source = configured, "set in containers.conf"
    elif host.which("crun") or not host.which("runc"):
        runtime, source = "crun", "Podman's default"
    else:
        runtime, source = "runc", "Podman's fallback: crun is not installed"
    if host.which(runtime) is None and Path(runtime).name in ("crun", "runc"):
        fix = f"apt-get install {Path(runtime).name}"
        return Check("runtime", "fail", f"OCI runtime {runtime} ({source}) is not installed", fix)
    v1_fix = f.engine_fix(runtime="runc", cgroup_manager="cgroupfs")
    if f.mode != "v2" and Path(runtime).name == "crun":
        detail = f'crun ({source}) on cgroup {f.mode}: containers fail with "{CRUN_HYBRID_ERROR}"'
        return Check("runtime", "fail", detail, v1_fix)
    if f.mode != "v2" and not configured:
        detail = (
            f"runc ({source}); installing crun later would break every Space on "
            f'cgroup {f.mode} ("{CRUN_HYBRID_ERROR}")'
        )
        return Check("runtime", "warn", detail, v1_fix)
    return Check("runtime", "ok", f"{runtime} ({source})")


def check_cgroup_manager(f: Facts) -> Check:
    manager = f.engine().get("cgroup_manager")
    if not f.systemd and manager == "systemd":
        detail = 'cgroup_manager = "systemd" but systemd is not PID 1: containers cannot start'
        return Check("cgroup-manager", "fail", detail, f.engine_fix(cgroup_manager="cgroupfs"))
    if manager:
        return Check("cgroup-manager", "ok", f"{manager} (set in containers.conf)")
    default = "systemd" if f.systemd else "cgroupfs"
    pid1 = "systemd is PID 1" if f.systemd else "no systemd as PID 1"
    return Check("cgroup-manager", "ok", f"{default} (Podman's default: {pid1})")


def check_limits(f: Facts) -> Check:
    enforceable, reason = host.resource_limits_enforceable(
        f.account.uid if f.account else None, f.root
    )
    if enforceable:
        return Check("limits", "ok", f"--memory, --cpus and --pids-limit enforced: {reason}")
    detail = (
        f'{reason}; the appliance records "limits not enforceable on this host" '
        "and starts Spaces without them"
    )
    if f.mode != "v2":
        fix = check_cgroups(f).fix
    elif f.systemd and f.account:
        fix = (
            "mkdir -p /etc/systemd/system/user@.service.d && printf "
            "'[Service]\\nDelegate=cpu cpuset io memory pids\\n' "
            "> /etc/systemd/system/user@.service.d/delegate.conf\n"
            f"systemctl daemon-reload && loginctl enable-linger {f.user} "
            f"&& systemctl restart user@{f.uid}.service"
        )
    else:
        fix = None  # delegation needs systemd as PID 1; nothing else hands out a user cgroup
    return Check("limits", "warn", detail, fix)


def check_rootful(f: Facts) -> Check:
    detail = "the appliance never runs rootful containers, only rootless ones as " + f.user
    if host.has_capability(host.CAP_SYS_RESOURCE, f.root) is False:
        detail = (
            "root lacks CAP_SYS_RESOURCE, so a rootful `podman run` fails with "
            '"setrlimit RLIMIT_NOFILE: Operation not permitted" (add --ulimit '
            "nofile=1024:1024 --ulimit nproc=4096:4096 by hand); " + detail
        )
    return Check("rootful", "ok", detail)


def _ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{start}+{count}" for start, count in ranges) or "none"


def check_subuid(f: Facts) -> Check:
    if skipped := _skipped(f, "subuid"):
        return skipped
    ranges = host.subid_ranges(f.user, f.root)
    short = [k for k in ("subuid", "subgid") if sum(c for _, c in ranges[k]) < SUBIDS_NEEDED]
    detail = f"{f.user} has subuid {_ranges(ranges['subuid'])}, subgid {_ranges(ranges['subgid'])}"
    if not short:
        return Check("subuid", "ok", detail)
    start = host.first_free_subid(f.root)
    span = f"{start}-{start + SUBIDS_NEEDED - 1}"
    flags = " ".join(f"--add-{k}s {span}" for k in short)
    fix = f"usermod {flags} {f.user}\n" + f.as_user("podman system migrate")
    return Check("subuid", "fail", f"{detail}; rootless Podman needs {SUBIDS_NEEDED} of each", fix)


def check_tun(f: Facts) -> Check:
    mode = host.tun_mode(f.root)
    if mode is None:
        fix = (
            "modprobe tun\n(still missing?) mkdir -p /dev/net && mknod -m 666 /dev/net/tun c 10 200"
        )
        return Check("tun", "fail", "/dev/net/tun is missing: rootless networking fails", fix)
    if mode & 0o666 != 0o666:
        detail = (
            f"/dev/net/tun is mode {mode:o}: rootless networking fails with "
            "'slirp4netns failed: open(\"/dev/net/tun\"): Permission denied'"
        )
        return Check("tun", "fail", detail, "chmod 666 /dev/net/tun")
    return Check("tun", "ok", f"/dev/net/tun is mode {mode:o}")


def check_storage(f: Facts) -> Check:
    path = f.home / ".config/containers/storage.conf"
    fix = (
        f'as {f.user}, put in {path}:\n[storage]\ndriver = "overlay"\n'
        "then, only if it already has images (this deletes them): "
        + f.as_user("podman system reset --force")
    )
    if f.podman and f.podman.get("storage_driver"):
        driver, source = str(f.podman["storage_driver"]), "reported by Podman"
    elif f.account:
        driver = host.user_storage_conf(f.local_home).get("driver")
        source = f"set in {path}"
    else:
        return _skipped(f, "storage")
    if driver is None:
        detail = f"no driver set in {path}: rootless Podman may pick vfs (slow, huge on disk)"
        return Check("storage", "warn", detail, fix)
    if driver == "vfs":
        return Check("storage", "warn", f"vfs ({source}): slow builds, huge disk use", fix)
    return Check("storage", "ok", f"{driver} ({source})")


def check_runtime_dir(f: Facts) -> Check:
    if skipped := _skipped(f, "runtime-dir"):
        return skipped
    path = f"/run/user/{f.uid}"
    try:
        st = host.under(f.root, path).stat()
    except OSError:
        create = f"install -d -m 700 -o {f.user} -g {f.user} {path}"
        fix = f"loginctl enable-linger {f.user}" if f.systemd else create
        detail = f"{path} is missing: no XDG_RUNTIME_DIR for {f.user}'s Podman socket"
        return Check("runtime-dir", "fail", detail, fix)
    mode = st.st_mode & 0o7777
    if st.st_uid != f.account.uid or mode != 0o700:
        detail = f"{path} is owned by uid {st.st_uid} with mode {mode:o}, not {f.uid} with 700"
        fix = f"chown {f.user}:{f.user} {path} && chmod 700 {path}"
        return Check("runtime-dir", "fail", detail, fix)
    stale = (host.under(f.root, path) / "libpod").exists()
    if stale and not host.has_processes(f.account.uid, f.root):
        # Where /run is not a tmpfs, the state of processes that are gone survives them and
        # every podman command fails with "invalid internal status".
        detail = (f"{path} holds Podman state from processes that are gone (no process of "
                  f"{f.user} runs); Podman will fail with \"invalid internal status\"")
        return Check("runtime-dir", "fail", detail, f"find {path} -mindepth 1 -delete")
    return Check("runtime-dir", "ok", f"{path} (owner {f.user}, mode 700)")


def check_cni_dir(f: Facts) -> Check:
    if host.under(f.root, "/var/lib/cni").is_dir():
        return Check("cni-dir", "ok", "/var/lib/cni exists")
    detail = ("/var/lib/cni is missing: rootless Podman then hides /var/lib in its network "
              "namespace, and offline Spaces (from bundles) fail with \"network not found\"")
    return Check("cni-dir", "warn", detail, "install -d -m 755 /var/lib/cni")


def check_api_socket(f: Facts) -> Check:
    url = f.socket_url
    if f.podman is None and f.podman_error is None:
        return Check("api-socket", "warn", f"{url}: {NOT_CHECKED}")
    if f.systemd:
        fix = f"systemctl --user -M {f.user}@ enable --now podman.socket"
    else:
        fix = f.as_user(f"podman system service --time=0 {url} &")
    if f.podman is None:
        return Check("api-socket", "fail", f"cannot reach Podman at {url}: {f.podman_error}", fix)
    if f.podman.get("rootless") is False:
        detail = f"Podman at {url} runs rootful; Spaces must run in {f.user}'s rootless Podman"
        return Check("api-socket", "fail", detail, f"unset APPLIANCE_PODMAN_URL, then: {fix}")
    return Check("api-socket", "ok", f"Podman answers at {url}")


def check_python(f: Facts) -> Check:
    if skipped := _skipped(f, "python"):
        return skipped
    interpreter = host.base_interpreter()
    blocked = host.blocked_ancestor(interpreter, f.account.uid, f.account.gid, f.root)
    if blocked is None:
        return Check("python", "ok", f"{interpreter} is usable by {f.user}")
    detail = f"{interpreter}: {f.user} cannot enter {blocked}, so it cannot run this venv"
    fix = (
        "/usr/bin/python3 -m venv /opt/appliance/venv && "
        "/opt/appliance/venv/bin/pip install appliance  (then run the service from that venv)"
    )
    return Check("python", "fail", detail, fix)


def check_ca_bundle(f: Facts) -> Check:
    bundle = f.config.build_ca_bundle
    if not bundle:
        return Check("ca-bundle", "ok", "disabled: builds trust only their base image's CAs")
    if not host.under(f.root, bundle).is_file():
        detail = (
            f"{bundle} is missing: builds behind an intercepting HTTPS proxy fail with "
            "CERTIFICATE_VERIFY_FAILED"
        )
        fix = "apt-get install ca-certificates  (or set APPLIANCE_BUILD_CA_BUNDLE to your bundle)"
        return Check("ca-bundle", "warn", detail, fix)
    return Check("ca-bundle", "ok", f"{bundle} is mounted read-only into builds")


def _gpus(f: Facts) -> tuple[nvml.Gpu, ...]:
    return f.inventory.gpus if f.inventory is not None and f.inventory.available else ()


def check_gpus(f: Facts) -> Check:
    inventory = f.inventory
    if inventory is None:
        return Check("gpus", "warn", NOT_CHECKED)
    if not inventory.available:
        if host.nvidia_device_present(f.root):
            detail = ("NVIDIA driver files are present but NVML cannot read the GPUs: "
                      f"{inventory.reason}")
            return Check("gpus", "warn", detail, "nvidia-smi  (it says what the driver lacks)")
        return Check("gpus", "ok", f"CPU-only box: {inventory.reason}")
    if not inventory.gpus:
        return Check("gpus", "ok", "CPU-only box: NVML finds no GPU")
    names = ", ".join(f"{gpu.index} {gpu.name or '?'}" for gpu in inventory.gpus)
    detail = f"{len(inventory.gpus)} GPU(s) ({names}); driver {inventory.driver_version or '?'}"
    warnings = list(inventory.warnings) + [
        f"GPU {gpu.index}: {warning}" for gpu in inventory.gpus for warning in gpu.warnings]
    if warnings:
        fix = "upgrade the NVIDIA driver" if any(
            "this driver has no" in w for w in warnings) else None
        return Check("gpus", "warn", f"{detail}; NVML: {'; '.join(warnings)}", fix)
    return Check("gpus", "ok", detail)


def check_cdi(f: Facts) -> Check:
    gpus = _gpus(f)
    # NVML says whether there is a GPU; the device files only when NVML cannot answer (a
    # Jetson's /dev has no nvidia0, and a stale /dev/nvidia0 outlives a removed card).
    nvml_answered = f.inventory is not None and f.inventory.available
    if not gpus and (nvml_answered or not host.nvidia_device_present(f.root)):
        return Check("cdi", "ok", "CPU-only box: no NVIDIA GPU found")
    jetson = any(gpu.jetson for gpu in gpus) or nvml.is_jetson(f.root)
    specs = host.nvidia_cdi_specs(f.root)
    if specs:
        shown = ", ".join("/" + str(p.relative_to(f.root)) for p in specs)
        return Check("cdi", "ok", f"NVIDIA CDI spec: {shown}")
    mode = " --mode=csv" if jetson else ""
    fix = f"nvidia-ctk cdi generate{mode} --output=/etc/cdi/nvidia.yaml"
    if host.which("nvidia-ctk") is None:
        fix = f"apt-get install nvidia-container-toolkit && {fix}"
    if jetson:
        detail = (
            "Jetson GPU found but no NVIDIA CDI spec in /etc/cdi or /var/run/cdi: on JetPack 6 "
            "containers reach the integrated GPU only through CDI, and its spec is generated in "
            "csv mode from the files L4T lists in /etc/nvidia-container-runtime/"
            "host-files-for-container.d: nvidia-ctk cdi generate --mode=csv "
            "--output=/etc/cdi/nvidia.yaml"
        )
    else:
        detail = "NVIDIA GPU found but no NVIDIA CDI spec in /etc/cdi or /var/run/cdi"
    return Check("cdi", "fail", detail, fix)


def check_git(f: Facts) -> Check:
    path = host.which("git")
    if path is None:
        detail = "git is not installed: Spaces cannot be fetched"
        return Check("git", "fail", detail, "apt-get install git")
    return Check("git", "ok", path)


def check_git_lfs(f: Facts) -> Check:
    path = host.which("git-lfs")
    if path is None:
        detail = "git-lfs is not installed: Spaces whose repositories use Git LFS will be refused"
        return Check("git-lfs", "warn", detail, "apt-get install git-lfs")
    return Check("git-lfs", "ok", path)


def check_disk(f: Facts) -> Check:
    path = Path(f.config.data_dir).absolute()
    while not host.under(f.root, path).exists() and path != path.parent:
        path = path.parent
    free = host.disk_free_bytes(host.under(f.root, path))
    detail = f"{free / GIB:.1f} GiB free at {path}"
    if free >= 5 * GIB:
        return Check("disk", "ok", detail)
    fix = (
        f.as_user("podman image prune")
        + "\n(or set APPLIANCE_DATA_DIR to a disk with more than 5 GiB free)"
    )
    status = "fail" if free < GIB else "warn"
    return Check("disk", status, f"{detail}: images and builds need at least 5 GiB", fix)


def check_base_image(f: Facts) -> Check:
    if f.base_image_probe is None:
        return Check("base-image", "warn", NOT_CHECKED)
    try:
        found, image = f.base_image_probe()
    except ApplianceError as exc:
        return Check("base-image", "warn", f"{NOT_CHECKED}: {exc}")
    if found:
        return Check("base-image", "ok", f"{image} is present")
    detail = f"base image {image} is missing (no registry is needed: it is built locally)"
    fix = "sudo scripts/setup.sh  (builds it), or: appliance images load FILE"
    return Check("base-image", "fail", detail, fix)


CHECKS: tuple[Callable[[Facts], Check], ...] = (
    check_service_user, check_podman, check_uidmap, check_slirp4netns, check_cgroups,
    check_runtime, check_cgroup_manager, check_limits, check_rootful, check_subuid, check_tun,
    check_storage, check_runtime_dir, check_cni_dir, check_api_socket, check_python,
    check_ca_bundle, check_gpus, check_cdi,
    check_git, check_git_lfs, check_disk, check_base_image,
)  # fmt: skip
CHECK_NAMES = tuple(c.__name__.removeprefix("check_").replace("_", "-") for c in CHECKS)


def run_checks(
    config: Config,
    root: Path = Path("/"),
    podman_probe: Callable[[], dict] | None = None,
    base_image_probe: Callable[[], tuple[bool, str]] | None = None,
    read_inventory: Callable[[], nvml.Inventory] | None = None,
) -> list[Check]:
    """Run every host check and return them in a fixed order, one per name in CHECK_NAMES.

    read_inventory reads the GPUs (default: NVML, with root's L4T files for a Jetson).
    """
    podman, podman_error = None, None
    if podman_probe is not None:
        try:
            podman = dict(podman_probe())
        except ApplianceError as exc:
            podman_error = exc.message  # its hint points back at doctor
    facts = Facts(
        config=config,
        root=root,
        user=config.service_user,
        account=host.service_account(config.service_user, root),
        systemd=host.systemd_is_pid1(root),
        mode=host.cgroup_mode(root),
        podman=podman,
        podman_error=podman_error,
        base_image_probe=base_image_probe,
        inventory=(read_inventory or (lambda: nvml.read_inventory(root)))(),
    )
    checks = []
    for name, check in zip(CHECK_NAMES, CHECKS, strict=True):
        try:
            checks.append(check(facts))
        except (OSError, ValueError) as exc:
            checks.append(Check(name, "warn", f"could not check: {exc}"))
    return checks


def render_text(checks: list[Check]) -> str:
    """Render checks one per line ("✔ name: detail"), each fix indented beneath its check."""
    lines = []
    for check in checks:
        lines.append(f"{SYMBOLS.get(check.status, '?')} {check.name}: {check.detail}")
        if check.fix:
            first, *rest = check.fix.splitlines()
            lines.append(f"    fix: {first}")
            lines.extend(f"         {line}" for line in rest)
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    lines.append(f"{len(checks)} checks: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"
