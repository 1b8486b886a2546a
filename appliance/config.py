"""Settings declared once as data, loaded from APPLIANCE_* variables or a config file."""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInput


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    kind: type = str


# Every setting the appliance reads. The README's configuration table lists each one
# (tests/test_config.py keeps the two in step).
SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "/var/lib/appliance", "Where the database, checkouts and logs live."),
    Setting("config_file", "/etc/appliance/appliance.toml", "Optional TOML file of settings."),
    Setting("service_user", "appliance", "Unprivileged account whose rootless Podman runs Spaces."),
    Setting(
        "podman_url",
        "",
        "Podman API socket; empty means unix:///run/user/<service uid>/podman/podman.sock.",
    ),
    Setting(
        "podman_autostart",
        True,
        "Start `podman system service` for the service user when its socket is absent.",
        bool,
    ),
    Setting("public_host", "127.0.0.1", "Host name put in each Space's `url`."),
    Setting("portal_host", "0.0.0.0", "Address the portal (`appliance serve`) listens on."),
    Setting("portal_port", 8080, "Port of the portal: pages, API and the Spaces' proxy.", int),
    Setting("portal_apps_port", 8081,
            "Port serving the Spaces' apps (/s/OWNER--NAME/): another origin than the portal, so "
            "a Space's scripts cannot act as its visitor on the portal; 0 serves them on "
            "portal_port.", int),
    Setting("portal_apps_domain", "",
            "Wildcard DNS name for the Spaces' apps: OWNER--NAME.DOMAIN on the apps port serves "
            "that Space at its root, an origin of its own; the portal is then opened at "
            "DOMAIN. Empty: paths under /s/ only.", str),
    Setting("portal_workers", 1,
            "gunicorn worker processes of the portal (about 50 MiB each; more serve more "
            "requests at once on a box with cores to spare).", int),
    Setting("portal_threads", 32, "Threads per portal worker (each open proxy stream holds one).",
            int),
    Setting("portal_public", True,
            "Let visitors who are not logged in see the home page and public Spaces.", bool),
    Setting("login_attempts", 10, "Failed logins per client per 15 minutes before refusing.",
            int),
    Setting("session_hours", 336, "Hours a portal login lasts.", int),
    Setting("router_host", "127.0.0.1", "Address the front router listens on for Space ports."),
    Setting(
        "drain_seconds", 10.0, "Longest wait for an old revision's connections on a switch.", float
    ),
    Setting("port_range", "17000-17999", "Host ports (on 127.0.0.1) handed out to Space apps."),
    Setting(
        "local_sources",
        "",
        "Colon-separated directories that local-path sources may come from; empty refuses them.",
    ),
    Setting("max_checkout_mb", 2048,
            "Largest checkout (working tree) accepted, in MiB; checked against the sizes git "
            "announces before a file is written.", int),
    Setting("source_hosts", "",
            "Comma-separated hosts remote git sources may come from (exact names, or "
            "*.example.com for any name under it); empty: any host. hf:// sources fetch from "
            "hf_endpoint's host."),
    Setting("git_timeout", 600, "Seconds a git fetch may take.", int),
    Setting("max_push_mb", 1024,
            "Largest git push (its pack) or Hugging Face upload the portal accepts, in MiB; the "
            "pushed tree must also fit max_checkout_mb.", int),
    Setting("allow_force_push", False,
            "Let a git push to a Space hosted on this box rewrite or delete its branch "
            "(force push); off: such pushes are refused.", bool),
    Setting("hf_endpoint", "https://huggingface.co", "Where hf://spaces/owner/name resolves."),
    Setting("bundle_hub_cache", "",
            "Hugging Face cache or mirror `bundle export` reads models from; empty: "
            "$HF_HUB_CACHE or ~/.cache/huggingface/hub."),
    Setting("bundle_verify_key", "",
            "Shared key file: `bundle import` requires bundles signed with it (empty: a "
            "signature is checked only with --verify; without either, only --allow-unsigned "
            "imports)."),
    Setting("bundle_require_signature", False,
            "Refuse unsigned bundles, even with --allow-unsigned.", bool),
    Setting("base_image", "", "Python base image; empty means the locally built appliance-python."),
    Setting(
        "build_ca_bundle",
        "/etc/ssl/certs/ca-certificates.crt",
        "CA bundle builds trust (corporate proxies); empty disables.",
    ),
    Setting("build_http_proxy", "", "HTTP_PROXY passed to builds (empty: none)."),
    Setting("build_https_proxy", "", "HTTPS_PROXY passed to builds (empty: none)."),
    Setting("build_no_proxy", "", "NO_PROXY passed to builds."),
    Setting("pip_index_url", "", "PIP_INDEX_URL for builds (a local mirror); empty uses PyPI."),
    Setting("pip_extra_index_url", "", "PIP_EXTRA_INDEX_URL for builds."),
    Setting("pip_trusted_host", "", "PIP_TRUSTED_HOST for builds (a plain-http local mirror)."),
    Setting("build_timeout", 3600, "Seconds a build may take before it is stopped.", int),
    Setting("build_resolution", "dated",
            "How gradio/streamlit Spaces' Python packages are resolved when a revision is "
            "first built: dated (as of the revision's commit time) or latest (today's "
            "packages, as Hugging Face does). A Space may choose its own."),
    Setting("package_cache_dir", "",
            "The box's package cache (wheels the builds install, shared by all Spaces); empty: "
            "<data_dir>/cache/packages."),
    Setting("package_cache_gb", 20.0,
            "GiB the package cache may hold before housekeeping removes the least recently "
            "used files (never one a kept revision's lock names).", float),
    Setting("package_timeout", 60,
            "Seconds without an answer from the package index before a resolution or a "
            "download gives up.", int),
    Setting("space_cpus", 2.0, "CPU limit per Space, where the host can enforce limits.", float),
    Setting("space_memory_mb", 16384, "Memory limit per Space in MiB, where enforceable.", int),
    Setting("space_pids_limit", 4096, "Process limit per Space, where enforceable.", int),
    Setting(
        "startup_poll_interval", 0.1, "Seconds between readiness probes of a new app.", float
    ),
    Setting(
        "startup_timeout_cap",
        0,
        "Upper bound in seconds on a Space's startup_duration_timeout (0: no cap).",
        int,
    ),
    Setting("gpu_reserve_mib", 2048, "GPU memory kept free on a shared GPU (MiB).", int),
    Setting("cdi_kind", "nvidia.com/gpu", "CDI kind of the GPUs (as nvidia-ctk names them)."),
    Setting("cdi_names", "index", "CDI device names: index (nvidia-ctk's default) or uuid."),
    Setting("gpu_mps", False, "The box runs the CUDA MPS daemon: pin shared budgets with it.",
            bool),
    Setting("gpu_watchdog_interval", 10.0,
            "Seconds between checks of GPU memory use against shared budgets.", float),
    Setting("reconcile_interval", 5.0, "Seconds between reconcile passes of the scheduler.",
            float),
    Setting("wake_interval", 1.0, "Seconds between checks for idle Spaces and wake requests.",
            float),
    Setting("health_interval", 10.0, "Seconds between health sweeps of running Spaces.", float),
    Setting("streamlit_script_interval", 60.0,
            "Seconds between runs of a Streamlit Space's script by the health check (it runs "
            "the script as a visitor would, to catch errors its HTTP answers hide); 0: never.",
            float),
    Setting("health_initial_delay", 10.0,
            "Seconds a newly serving container is left alone before its health probes count.",
            float),
    Setting("health_timeout", 5.0, "Seconds a health probe may take.", float),
    Setting("health_attempts", 3, "Failed probes in a row before a Space is restarted.", int),
    Setting("restart_backoff", 5.0, "First wait before an automatic restart; doubles each time.",
            float),
    Setting("restart_limit", 5, "Automatic restarts within restart_window before giving up.", int),
    Setting("restart_window", 600.0, "Seconds over which automatic restarts are counted.",
            float),
    Setting("backup_interval", 86400.0, "Seconds between online backups of the database.", float),
    Setting("backup_keep", 7, "Database backups kept in `<data_dir>/backups` (the newest).", int),
    Setting("images_keep", 3,
            "Images kept per Space for rollback: the serving one, the previous one, and the "
            "newest others up to this many.", int),
    Setting("build_logs_keep", 10, "Build logs kept per Space (the latest build's always).", int),
    Setting("run_log_max_mb", 10, "Size in MiB past which a `<data_dir>/run/*.log` is cut.", int),
    Setting("housekeeping_interval", 3600.0,
            "Seconds between log rotation and prune passes (old checkouts, images).", float),
    Setting("disk_check_interval", 60.0, "Seconds between free-space checks of data_dir.",
            float),
    Setting("disk_min_free_gb", 5.0, "Free GiB in data_dir below which a warning is recorded.",
            float),
    Setting("disk_refuse_builds_gb", 2.0,
            "Free GiB in data_dir below which builds are refused (0: never).", float),
    Setting("update_check_interval", 60.0,
            "Seconds between passes over Spaces that track a branch or are pinned.", float),
    Setting("update_window", "",
            "Local time in which scheduled updates may start, e.g. 02:00-05:00 (may span "
            "midnight); empty: any time."),
    Setting("gpu_quota_grace", 30.0,
            "Seconds a Space may stay over its shared GPU memory budget before it is stopped.",
            float),
    Setting("telemetry_interval", 10.0,
            "Seconds between GPU telemetry samples (each GPU's and each Space's use).", float),
    Setting("telemetry_raw_hours", 12,
            "Hours raw GPU samples are kept before they become 5-minute averages.", int),
    Setting("telemetry_keep_days", 30,
            "Days of GPU telemetry kept (5-minute averages become hourly after 7 days).", int),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _coerce(setting: Setting, raw: Any) -> Any:
    if setting.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise InvalidInput(
            f"Setting {setting.name} must be true or false, got {raw!r}",
            hint=f"set APPLIANCE_{setting.name.upper()}=true or false",
        )
    try:
        if isinstance(raw, bool) and setting.kind is not str:
            raise ValueError(raw)
        if setting.kind is int and isinstance(raw, float):
            raise ValueError(raw)  # int(0.5) would silently become 0
        value = setting.kind(raw)
        if setting.kind in (int, float) and not 0 <= value < float("inf"):
            raise ValueError(raw)  # negative, NaN and infinite values make no sense here
        return value
    except (TypeError, ValueError):
        raise InvalidInput(
            f"Setting {setting.name} must be {setting.kind.__name__}, got {raw!r}",
            hint=f"fix APPLIANCE_{setting.name.upper()} or {setting.name} in the config file",
        ) from None


@dataclass(frozen=True)
class Config:
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def instance_id(self) -> str:
        """Name this appliance (its data dir) on labels, so instances sharing a Podman (tests,
        benchmarks, a second data dir) never take each other's containers for orphans."""
        import hashlib

        return hashlib.sha256(str(self.data_path.resolve()).encode()).hexdigest()[:12]

    @property
    def package_cache_path(self) -> Path:
        return Path(self.package_cache_dir) if self.package_cache_dir else (
            self.data_path / "cache" / "packages")

    @property
    def db_path(self) -> Path:
        return self.data_path / "appliance.db"

    @property
    def service_uid(self) -> int | None:
        try:
            return pwd.getpwnam(self.service_user).pw_uid
        except KeyError:
            return None

    @property
    def podman_socket_url(self) -> str:
        if self.podman_url:
            return self.podman_url
        uid = self.service_uid if self.service_uid is not None else os.getuid()
        return f"unix:///run/user/{uid}/podman/podman.sock"

    @property
    def port_bounds(self) -> tuple[int, int]:
        try:
            low, high = (int(p) for p in self.port_range.split("-", 1))
        except ValueError:
            raise InvalidInput(
                f"Setting port_range must look like 17000-17999, got {self.port_range!r}",
                hint="fix APPLIANCE_PORT_RANGE",
            ) from None
        if low > high:
            raise InvalidInput(
                f"Setting port_range {self.port_range!r} starts above where it ends",
                hint="write the lower port first, e.g. 17000-17999",
            )
        if not 1024 < low <= high < 65536:
            raise InvalidInput(
                f"Setting port_range {self.port_range!r} is outside 1025-65535",
                hint="fix APPLIANCE_PORT_RANGE",
            )
        return low, high

    @property
    def local_source_roots(self) -> list[Path]:
        return [Path(p).resolve() for p in self.local_sources.split(":") if p.strip()]

    @property
    def imported_repos_path(self) -> Path:
        """Where Spaces imported from bundles keep their repositories (always a local source)."""
        return (self.data_path / "repos").resolve()

    def with_values(self, **overrides: Any) -> Config:
        merged = dict(self.values)
        for name, raw in overrides.items():
            merged[name] = _coerce(_BY_NAME[name], raw)
        return Config(merged)


def load_config(environ: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Load settings: defaults, then the config file, then APPLIANCE_* variables, then overrides."""
    environ = dict(os.environ if environ is None else environ)
    values = {s.name: s.default for s in SETTINGS}
    # The file's location is a process-wide choice (the test suite points it away from
    # /etc), so it is read from the process environment when the caller's mapping lacks it.
    config_file = Path(environ.get("APPLIANCE_CONFIG_FILE")
                       or os.environ.get("APPLIANCE_CONFIG_FILE") or values["config_file"])
    if config_file.is_file():
        try:
            data = tomllib.loads(config_file.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise InvalidInput(
                f"Cannot read config file {config_file}: {exc}", hint="fix or remove the file"
            ) from None
        for name, raw in data.items():
            if name not in _BY_NAME:
                raise InvalidInput(
                    f"Unknown setting {name!r} in {config_file}",
                    hint="see the configuration table in the README",
                )
            values[name] = _coerce(_BY_NAME[name], raw)
    for setting in SETTINGS:
        key = f"APPLIANCE_{setting.name.upper()}"
        if key in environ:
            values[setting.name] = _coerce(setting, environ[key])
    for name, raw in overrides.items():
        values[name] = _coerce(_BY_NAME[name], raw)
    return Config(values)
