"""Doctor checks against fake host trees: each HOST-NOTES quirk is detected with its fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance import doctor
from appliance.adapters import host
from appliance.config import load_config
from appliance.errors import RuntimeUnavailable

# A service uid that the test can own files as: chown needs root, otherwise use our own.
UID = 1001 if os.geteuid() == 0 else os.geteuid()
HOME = "/var/lib/appliance"
CONTAINERS_CONF = f"{HOME}/.config/containers/containers.conf"
INSTALLED = {"podman", "newuidmap", "newgidmap", "slirp4netns", "runc", "crun", "git", "git-lfs"}

ROOTFS = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
MOUNTINFO_V2 = ROOTFS + (
    "25 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
    "26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
MOUNTINFO_HYBRID = ROOTFS + (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
MOUNTINFO_V1 = ROOTFS + (
    "31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
    "33 31 0:29 / /sys/fs/cgroup/systemd rw,nosuid shared:10 - cgroup cgroup "
    "rw,xattr,name=systemd\n"
    "36 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct\n"
    "37 31 0:33 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory\n"
)
HEALTHY_PROBE = {
    "version": "4.9.3",
    "storage_driver": "overlay",
    "runtime": "crun",
    "cgroup_version": "v2",
    "rootless": True,
}


def write(root: Path, path: str, text: str = "", mode: int | None = None) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    if mode is not None:
        target.chmod(mode)
    return target


def set_conf(root: Path, name: str, text: str) -> None:
    write(root, f"{HOME}/.config/containers/{name}", text)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A healthy cgroup v2 host with systemd, every package and delegated controllers."""
    root = tmp_path / "host"
    root.mkdir(mode=0o755)
    write(root, "etc/passwd", f"root:x:0:0::/root:/bin/bash\nappliance:x:{UID}:{UID}::{HOME}:/x\n")
    write(root, "proc/self/mountinfo", MOUNTINFO_V2)
    write(root, "proc/self/status", "Name:\tpython\nCapEff:\t000001ffffffffff\n")
    write(root, "proc/1/comm", "systemd\n")
    (root / "var/lib/cni").mkdir(parents=True)
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    write(
        root,
        f"sys/fs/cgroup/user.slice/user-{UID}.slice/user@{UID}.service/cgroup.controllers",
        "cpuset cpu io memory pids\n",
    )
    write(root, "etc/subuid", "appliance:100000:65536\n")
    write(root, "etc/subgid", "appliance:100000:65536\n")
    write(root, "dev/net/tun", mode=0o666)
    write(root, "etc/ssl/certs/ca-certificates.crt", "-----BEGIN CERTIFICATE-----\n")
    write(root, "usr/bin/python3.11")
    set_conf(root, "containers.conf", '[engine]\nruntime = "crun"\n')
    set_conf(root, "storage.conf", '[storage]\ndriver = "overlay"\n')
    run_dir = root / f"run/user/{UID}"
    run_dir.mkdir(parents=True, mode=0o700)
    run_dir.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(run_dir, UID, UID)
    install_only(monkeypatch, INSTALLED)
    monkeypatch.setattr(host, "disk_free_bytes", lambda path: 100 * doctor.GIB)
    monkeypatch.setattr(host, "base_interpreter", lambda: Path("/usr/bin/python3.11"))
    return root


@pytest.fixture
def config(tmp_path):
    return load_config({}, data_dir=HOME)


def checks(config, root, probe=lambda: dict(HEALTHY_PROBE), image=lambda: (True, "py")):
    return {c.name: c for c in doctor.run_checks(config, root, probe, image)}


def without(*names: str) -> set[str]:
    return INSTALLED - set(names)


def install_only(monkeypatch, names: set[str]) -> None:
    monkeypatch.setattr(host, "which", lambda n: f"/usr/bin/{n}" if n in names else None)


def test_healthy_host_passes_every_check(config, tree):
    found = checks(config, tree)
    assert {n: c.status for n, c in found.items() if c.status != "ok"} == {}
    assert all(c.fix is None for c in found.values())
    assert found["limits"].detail.startswith("--memory, --cpus and --pids-limit enforced")


def test_every_check_name_is_reported_once_in_order(config, tree):
    assert [c.name for c in doctor.run_checks(config, tree)] == list(doctor.CHECK_NAMES)


def test_missing_service_user_fails_with_useradd_and_skips_dependent_checks(config, tree):
    write(tree, "etc/passwd", "root:x:0:0::/root:/bin/bash\n")
    found = checks(config, tree)
    assert found["service-user"].status == "fail"
    assert found["service-user"].fix == (
        f"useradd --system --create-home --home-dir {HOME} --shell /usr/sbin/nologin appliance"
    )
    for name in ("subuid", "runtime-dir", "python"):
        assert found[name].status == "warn"
        assert "not checked: service user appliance does not exist" in found[name].detail


def test_missing_podman_fails_with_apt_get_install(config, tree, monkeypatch):
    install_only(monkeypatch, without("podman"))
    found = checks(config, tree)["podman"]
    assert (found.status, found.fix) == ("fail", doctor.PODMAN_PACKAGES)
    assert found.fix == "apt-get install podman uidmap slirp4netns fuse-overlayfs runc"


def test_debian_podman_431_warns_that_quadlet_and_health_on_failure_are_absent(config, tree):
    found = checks(config, tree, probe=lambda: {**HEALTHY_PROBE, "version": "4.3.1"})["podman"]
    assert found.status == "warn"
    assert "Podman 4.3.1" in found.detail
    assert "no Quadlet" in found.detail and "--health-on-failure" in found.detail


def test_missing_uidmap_and_slirp4netns_fail_with_packages(config, tree, monkeypatch):
    install_only(monkeypatch, without("newuidmap", "newgidmap", "slirp4netns"))
    found = checks(config, tree)
    assert (found["uidmap"].status, found["uidmap"].fix) == ("fail", "apt-get install uidmap")
    assert found["slirp4netns"].fix == "apt-get install slirp4netns"


@pytest.mark.parametrize(
    ("mountinfo", "mode"),
    [(MOUNTINFO_V2, "v2"), (MOUNTINFO_HYBRID, "hybrid"), (MOUNTINFO_V1, "v1")],
)
def test_cgroup_mode_reads_mountinfo(tree, mountinfo, mode):
    write(tree, "proc/self/mountinfo", mountinfo)
    assert host.cgroup_mode(tree) == mode


def test_cgroup_mode_ignores_a_bare_name_systemd_hierarchy(tree):
    named = "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
    write(tree, "proc/self/mountinfo", MOUNTINFO_V2 + named)
    assert host.cgroup_mode(tree) == "v2"


def test_cgroup_mode_falls_back_to_proc_mounts(tree):
    (tree / "proc/self/mountinfo").unlink()
    write(tree, "proc/mounts", "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n")
    assert host.cgroup_mode(tree) == "v1"


def test_hybrid_cgroups_with_default_crun_fail_with_runc_and_cgroupfs_fix(config, tree):
    write(tree, "proc/self/mountinfo", MOUNTINFO_HYBRID)
    set_conf(tree, "containers.conf", "")
    found = checks(config, tree, probe=lambda: {**HEALTHY_PROBE, "runtime": ""})
    runtime = found["runtime"]
    assert runtime.status == "fail"
    assert doctor.CRUN_HYBRID_ERROR in runtime.detail
    assert runtime.fix == (
        f"as appliance, put in the [engine] table of {CONTAINERS_CONF}:\n"
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"'
    )
    assert found["cgroups"].status == "warn"
    assert "hybrid" in found["cgroups"].detail


def test_hybrid_cgroups_with_crun_set_in_user_conf_fail(config, tree):
    write(tree, "proc/self/mountinfo", MOUNTINFO_HYBRID)
    found = checks(config, tree, probe=None)["runtime"]
    assert (found.status, found.detail.split(" ")[0]) == ("fail", "crun")
    assert "set in containers.conf" in found.detail


def test_hybrid_cgroups_with_runc_only_by_fallback_warn_to_pin_it(config, tree, monkeypatch):
    write(tree, "proc/self/mountinfo", MOUNTINFO_HYBRID)
    set_conf(tree, "containers.conf", "")
    install_only(monkeypatch, without("crun"))
    found = checks(config, tree, probe=None)["runtime"]
    assert found.status == "warn"
    assert 'runtime = "runc"' in found.fix


def test_hybrid_cgroups_with_runc_configured_pass_runtime_but_warn_limits(config, tree):
    write(tree, "proc/self/mountinfo", MOUNTINFO_HYBRID)
    set_conf(tree, "containers.conf", '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    found = checks(config, tree, probe=lambda: {**HEALTHY_PROBE, "runtime": "runc"})
    assert found["runtime"].status == "ok"
    limits = found["limits"]
    assert limits.status == "warn"
    assert limits.detail.startswith(
        "cgroup v1 (hybrid): --memory, --cpus and --pids-limit cannot be enforced "
        "for rootless containers"
    )
    assert 'records "limits not enforceable on this host"' in limits.detail


def test_configured_runtime_that_is_not_installed_fails(config, tree, monkeypatch):
    set_conf(tree, "containers.conf", '[engine]\nruntime = "runc"\n')
    install_only(monkeypatch, without("runc"))
    found = checks(config, tree, probe=None)["runtime"]
    assert (found.status, found.fix) == ("fail", "apt-get install runc")


def test_systemd_cgroup_manager_without_systemd_fails_with_cgroupfs_fix(config, tree):
    write(tree, "proc/1/comm", "tini\n")
    set_conf(tree, "containers.conf", '[engine]\ncgroup_manager = "systemd"\n')
    found = checks(config, tree)["cgroup-manager"]
    assert found.status == "fail"
    assert found.fix.endswith('[engine]\ncgroup_manager = "cgroupfs"')
    assert CONTAINERS_CONF in found.fix


def test_v2_without_delegation_warns_with_delegate_fix(config, tree):
    (tree / f"sys/fs/cgroup/user.slice/user-{UID}.slice").rename(tree / "sys/fs/cgroup/gone")
    found = checks(config, tree)["limits"]
    assert found.status == "warn"
    assert found.detail.startswith("cgroup v2 without systemd delegation for the service user: ")
    assert "Delegate=cpu cpuset io memory pids" in found.fix
    assert f"systemctl restart user@{UID}.service" in found.fix


def test_v2_with_partial_delegation_names_the_missing_controllers(tree):
    write(
        tree,
        f"sys/fs/cgroup/user.slice/user-{UID}.slice/user@{UID}.service/cgroup.controllers",
        "memory pids\n",
    )
    assert host.resource_limits_enforceable(UID, tree) == (
        False,
        f"cgroup v2, but user@{UID}.service is not delegated cpu (has: memory pids)",
    )


def test_pure_v1_limits_reason(tree):
    write(tree, "proc/self/mountinfo", MOUNTINFO_V1)
    enforceable, reason = host.resource_limits_enforceable(UID, tree)
    assert not enforceable and reason.startswith("cgroup v1: ")


def test_missing_capability_is_explained_but_rootful_stays_ok(config, tree):
    write(tree, "proc/self/status", "CapEff:\t000001fffeffffff\n")
    found = checks(config, tree)["rootful"]
    assert (found.status, found.fix) == ("ok", None)
    assert "setrlimit RLIMIT_NOFILE: Operation not permitted" in found.detail
    assert "never runs rootful containers" in found.detail


def test_missing_subids_fail_with_usermod(config, tree):
    write(tree, "etc/subuid", "")
    write(tree, "etc/subgid", "appliance:100000:1000\n")
    found = checks(config, tree)["subuid"]
    assert found.status == "fail"
    assert found.fix.splitlines()[0] == (
        "usermod --add-subuids 101000-166535 --add-subgids 101000-166535 appliance"
    )
    assert found.fix.splitlines()[1] == (
        f"runuser -u appliance -- env XDG_RUNTIME_DIR=/run/user/{UID} podman system migrate"
    )


def test_subid_fix_starts_past_ranges_already_handed_out(config, tree):
    write(tree, "etc/subuid", "someone:100000:65536\n")
    write(tree, "etc/subgid", "someone:100000:65536\nappliance:300000:65536\n")
    found = checks(config, tree)["subuid"]
    assert found.fix.splitlines()[0] == "usermod --add-subuids 365536-431071 appliance"


def test_short_subid_range_fails(config, tree):
    write(tree, "etc/subuid", "appliance:100000:1000\n")
    assert checks(config, tree)["subuid"].status == "fail"


def test_subids_match_by_uid_number(tree):
    write(tree, "etc/subuid", f"{UID}:200000:65536\n")
    assert host.subid_ranges("appliance", tree)["subuid"] == [(200000, 65536)]


def test_tun_mode_600_fails_with_chmod(config, tree):
    (tree / "dev/net/tun").chmod(0o600)
    found = checks(config, tree)["tun"]
    assert (found.status, found.fix) == ("fail", "chmod 666 /dev/net/tun")
    assert "is mode 600" in found.detail and "Permission denied" in found.detail


def test_missing_tun_fails_with_modprobe(config, tree):
    (tree / "dev/net/tun").unlink()
    found = checks(config, tree)["tun"]
    assert found.status == "fail" and found.fix.startswith("modprobe tun")


def test_vfs_storage_warns_with_overlay_fix(config, tree):
    set_conf(tree, "storage.conf", '[storage]\ndriver = "vfs"\n')
    found = checks(config, tree, probe=None)["storage"]
    assert found.status == "warn"
    assert f'put in {HOME}/.config/containers/storage.conf:\n[storage]\ndriver = "overlay"' in (
        found.fix
    )


def test_vfs_reported_by_podman_warns(config, tree):
    found = checks(config, tree, probe=lambda: {**HEALTHY_PROBE, "storage_driver": "vfs"})
    assert found["storage"].status == "warn"


def test_unset_storage_driver_warns_that_vfs_may_be_picked(config, tree):
    (tree / HOME.lstrip("/") / ".config/containers/storage.conf").unlink()
    found = checks(config, tree, probe=None)["storage"]
    assert found.status == "warn" and "may pick vfs" in found.detail


def test_invalid_conf_files_read_as_empty(tree):
    set_conf(tree, "containers.conf", "[engine\nruntime=")
    assert host.user_containers_conf(tree / HOME.lstrip("/")) == {}
    assert host.user_storage_conf(tree / "nowhere") == {}


def test_missing_runtime_dir_without_systemd_fails_with_install(config, tree):
    write(tree, "proc/1/comm", "tini\n")
    (tree / f"run/user/{UID}").rmdir()
    found = checks(config, tree)["runtime-dir"]
    assert found.status == "fail"
    assert found.fix == f"install -d -m 700 -o appliance -g appliance /run/user/{UID}"


def test_missing_runtime_dir_with_systemd_suggests_linger(config, tree):
    (tree / f"run/user/{UID}").rmdir()
    assert checks(config, tree)["runtime-dir"].fix == "loginctl enable-linger appliance"


def test_runtime_dir_with_wrong_mode_fails(config, tree):
    (tree / f"run/user/{UID}").chmod(0o755)
    found = checks(config, tree)["runtime-dir"]
    assert found.status == "fail" and "mode 755" in found.detail
    assert found.fix == f"chown appliance:appliance /run/user/{UID} && chmod 700 /run/user/{UID}"


def test_runtime_dir_left_by_dead_processes_fails_with_the_clean_up(config, tree):
    write(tree, f"run/user/{UID}/libpod/tmp/alive", "")
    found = checks(config, tree)["runtime-dir"]
    assert found.status == "fail" and "state from processes that are gone" in found.detail
    assert found.fix == f"find /run/user/{UID} -mindepth 1 -delete"
    write(tree, "proc/4242/status", f"Name:\tpodman\nUid:\t{UID}\t{UID}\t{UID}\t{UID}\n")
    assert checks(config, tree)["runtime-dir"].status == "ok"


def test_missing_var_lib_cni_warns_with_the_fix(config, tree):
    (tree / "var/lib/cni").rmdir()
    found = checks(config, tree)["cni-dir"]
    assert found.status == "warn" and "network not found" in found.detail
    assert found.fix == "install -d -m 755 /var/lib/cni"


def unreachable():
    raise RuntimeUnavailable(f"Cannot reach Podman at unix:///run/user/{UID}/podman/podman.sock")


def test_unreachable_socket_without_systemd_fails_with_podman_system_service(config, tree):
    write(tree, "proc/1/comm", "tini\n")
    found = checks(config, tree, probe=unreachable)
    assert found["api-socket"].status == "fail"
    assert found["api-socket"].fix == (
        f"runuser -u appliance -- env XDG_RUNTIME_DIR=/run/user/{UID} podman system service "
        f"--time=0 unix:///run/user/{UID}/podman/podman.sock &"
    )
    assert found["podman"].status == "warn" and "Cannot reach Podman" in found["podman"].detail


def test_unreachable_socket_with_systemd_suggests_podman_socket_unit(config, tree):
    found = checks(config, tree, probe=unreachable)["api-socket"]
    assert found.fix == "systemctl --user -M appliance@ enable --now podman.socket"


def test_rootful_socket_fails(config, tree):
    found = checks(config, tree, probe=lambda: {**HEALTHY_PROBE, "rootless": False})
    assert found["api-socket"].status == "fail" and "runs rootful" in found["api-socket"].detail


def test_without_probes_podman_socket_and_base_image_are_not_checked(config, tree):
    found = {c.name: c for c in doctor.run_checks(config, tree)}
    assert found["api-socket"].status == "warn"
    assert found["api-socket"].detail.endswith("not checked")
    assert (found["base-image"].status, found["base-image"].detail) == ("warn", "not checked")


def test_venv_built_from_root_pyenv_fails_python_check(config, tree, monkeypatch):
    python = "/root/.pyenv/versions/3.11.7/bin/python3.11"
    write(tree, python)
    (tree / "root").chmod(0o700)
    monkeypatch.setattr(host, "base_interpreter", lambda: Path(python))
    found = checks(config, tree)["python"]
    assert found.status == "fail" and "cannot enter /root" in found.detail
    assert found.fix.startswith("/usr/bin/python3 -m venv ")


def test_missing_ca_bundle_warns(config, tree):
    (tree / "etc/ssl/certs/ca-certificates.crt").unlink()
    found = checks(config, tree)["ca-bundle"]
    assert found.status == "warn" and "CERTIFICATE_VERIFY_FAILED" in found.detail


def test_cpu_only_box_passes_cdi(config, tree):
    found = checks(config, tree)["cdi"]
    assert (found.status, found.detail) == ("ok", "CPU-only box: no NVIDIA GPU found")


def test_nvidia_gpu_without_cdi_spec_fails_with_nvidia_ctk(config, tree, monkeypatch):
    write(tree, "dev/nvidia0")
    install_only(monkeypatch, {"nvidia-ctk"})
    found = checks(config, tree)["cdi"]
    assert found.status == "fail"
    assert found.fix == "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"


def test_nvidia_gpu_with_cdi_spec_passes(config, tree):
    write(tree, "proc/driver/nvidia/version", "NVRM version: 550.54\n")
    write(tree, "etc/cdi/nvidia.yaml", "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    found = checks(config, tree)["cdi"]
    assert (found.status, found.detail) == ("ok", "NVIDIA CDI spec: /etc/cdi/nvidia.yaml")


def test_jetson_without_cdi_spec_uses_csv_mode(config, tree):
    write(tree, "etc/nv_tegra_release", "# R36 (release), REVISION: 3.0\n")
    write(tree, "var/run/cdi/other.json", '{"kind": "example.com/device"}')
    found = checks(config, tree)["cdi"]
    assert found.fix == (
        "apt-get install nvidia-container-toolkit && "
        "nvidia-ctk cdi generate --mode=csv --output=/etc/cdi/nvidia.yaml"
    )


def test_missing_git_fails_and_missing_git_lfs_warns(config, tree, monkeypatch):
    install_only(monkeypatch, without("git", "git-lfs"))
    found = checks(config, tree)
    assert (found["git"].status, found["git"].fix) == ("fail", "apt-get install git")
    assert (found["git-lfs"].status, found["git-lfs"].fix) == ("warn", "apt-get install git-lfs")
    assert "LFS will be refused" in found["git-lfs"].detail


@pytest.mark.parametrize(("gib", "status"), [(100, "ok"), (3, "warn"), (0.5, "fail")])
def test_disk_thresholds(config, tree, monkeypatch, gib, status):
    monkeypatch.setattr(host, "disk_free_bytes", lambda path: int(gib * doctor.GIB))
    assert checks(config, tree)["disk"].status == status


def test_disk_check_uses_nearest_existing_parent(tree, monkeypatch):
    seen = []
    monkeypatch.setattr(host, "disk_free_bytes", lambda path: seen.append(path) or 10 * doctor.GIB)
    cfg = load_config({}, data_dir="/srv/appliance/data")
    write(tree, "srv/.keep")
    found = checks(cfg, tree)["disk"]
    assert seen == [tree / "srv"]
    assert found.detail == "10.0 GiB free at /srv"


def test_missing_base_image_fails_with_setup_script(config, tree):
    found = checks(config, tree, image=lambda: (False, "appliance-python:3.11"))["base-image"]
    assert found.status == "fail" and "appliance-python:3.11" in found.detail
    assert "sudo scripts/setup.sh" in found.fix and "appliance images load FILE" in found.fix


def test_render_text_marks_status_and_indents_fixes():
    text = doctor.render_text(
        [
            doctor.Check("git", "ok", "/usr/bin/git"),
            doctor.Check("git-lfs", "warn", "missing", "apt-get install git-lfs"),
            doctor.Check("runtime", "fail", "crun on hybrid", "line one\nline two"),
        ]
    )
    assert text == (
        "✔ git: /usr/bin/git\n"
        "! git-lfs: missing\n"
        "    fix: apt-get install git-lfs\n"
        "✘ runtime: crun on hybrid\n"
        "    fix: line one\n"
        "         line two\n"
        "3 checks: 1 ok, 1 warn, 1 fail\n"
    )


def test_run_checks_on_this_machine_reports_every_check():
    found = doctor.run_checks(load_config({}))
    names = [c.name for c in found]
    assert names == list(doctor.CHECK_NAMES)
    assert {
        "podman", "runtime", "cgroups", "subuid", "tun", "storage", "runtime-dir", "api-socket",
        "limits", "cdi", "service-user", "git", "git-lfs", "disk", "base-image", "rootful",
    } <= set(names)  # fmt: skip
    assert all(c.status in ("ok", "warn", "fail") for c in found)
    assert all(c.fix is None for c in found if c.status == "ok")
    assert doctor.render_text(found).count("\n") >= len(found)
