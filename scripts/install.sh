#!/usr/bin/env bash
# Production install (idempotent; run it again to upgrade): everything scripts/setup.sh does
# (packages, the service account, rootless Podman, the virtualenv, the base image), then the
# configuration in /etc/appliance, the systemd units enabled and started, the account's
# lingering and Podman API socket (podman.socket), and on an upgrade the database backed up
# and migrated (appliance-migrate.service) and the services restarted; Spaces keep running.
#
#   scripts/install.sh                    install or upgrade this host
#   scripts/install.sh --uninstall        remove units, venv and configuration; keep data
#   scripts/install.sh --uninstall --purge    ... and the data, the account, its containers
#   scripts/install.sh --root DIR         lay the files out under DIR only (staging, tests):
#                                         no packages, account, Podman or systemctl
#
# Without systemd as PID 1 (containers, some CI VMs) the units are installed but not
# enabled or started; the message says how the processes are run instead.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICE_USER="appliance"   # the units name it: User=appliance
ROOT=""
UNINSTALL=0
PURGE=0
CHANGES=0
PORT="${APPLIANCE_PORTAL_PORT:-8080}"
ARGS=("$@")

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --root=*) ROOT="${1#--root=}"; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
  echo "install.sh: --purge goes with --uninstall" >&2; exit 2
fi
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
elif [ "$(id -u)" -ne 0 ]; then
  exec sudo -E bash "$0" "${ARGS[@]}"
fi

ETC_DIR="$ROOT/etc/appliance"
UNIT_DIR="$ROOT/etc/systemd/system"
DATA_DIR="$ROOT/var/lib/appliance"
CACHE_DIR="$ROOT/var/cache/appliance"
PREFIX="$ROOT/opt/appliance"
BIN_LINK="$ROOT/usr/local/bin/appliance"
UNITS=(appliance-migrate.service appliance-router.service appliance-portal.service
       appliance-scheduler.service)
LONG_RUNNING=(appliance-router.service appliance-portal.service appliance-scheduler.service)

has_systemd() { [ -z "$ROOT" ] && [ "$(cat /proc/1/comm 2>/dev/null)" = "systemd" ]; }

no_systemd_reason() {
  if [ -n "$ROOT" ]; then
    echo "--root $ROOT stages files only"
  else
    echo "systemd is not PID 1 on this host (PID 1 is '$(cat /proc/1/comm 2>/dev/null || echo unknown)')"
  fi
}

# Copy SRC to DEST (mode MODE) unless DEST already has the same bytes; count the change.
put_file() {
  local src="$1" dest="$2" mode="$3"
  if cmp -s "$src" "$dest"; then
    note "unchanged ${dest#"$ROOT"}"
    return 1
  fi
  install -D -m "$mode" "$src" "$dest"
  note "installed ${dest#"$ROOT"}"
  CHANGES=$((CHANGES + 1))
}

make_dir() {
  local dir="$1" mode="$2"
  if [ -d "$dir" ]; then return; fi
  install -d -m "$mode" "$dir"
  note "created ${dir#"$ROOT"}/"
  CHANGES=$((CHANGES + 1))
}

remove_path() {
  local path="$1"
  if [ -e "$path" ] || [ -L "$path" ]; then
    rm -rf -- "$path"
    note "removed ${path#"$ROOT"}"
    CHANGES=$((CHANGES + 1))
  fi
}

write_environment() {
  # Optional settings for the units (EnvironmentFile=-); never overwritten, it is the admin's.
  local env_file="$ETC_DIR/environment"
  if [ -f "$env_file" ]; then
    note "kept ${env_file#"$ROOT"} (yours to edit)"
    return
  fi
  local tmp; tmp="$(mktemp)"
  cat > "$tmp" <<'EOF'
# Settings for the appliance's systemd units, one APPLIANCE_*=value a line (README:
# Configuration). They win over /etc/appliance/appliance.toml. Restart after a change:
#   systemctl restart appliance-portal appliance-scheduler appliance-router
# APPLIANCE_PORTAL_PORT=8080
# APPLIANCE_PORTAL_APPS_PORT=8081
# APPLIANCE_LOCAL_SOURCES=/srv/spaces
EOF
  put_file "$tmp" "$env_file" 0644 || true
  rm -f "$tmp"
}

install_files() {
  say "Installing configuration and units${ROOT:+ under $ROOT}"
  make_dir "$ETC_DIR" 755
  make_dir "$DATA_DIR" 750
  write_environment
  for unit in "${UNITS[@]}"; do
    if put_file "$REPO/systemd/$unit" "$UNIT_DIR/$unit" 0644; then UNITS_CHANGED=1; fi
  done
}

wait_for_portal() {
  local url="http://127.0.0.1:$PORT/api/v1/whoami"
  for _ in $(seq 1 60); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$url', timeout=2)" 2>/dev/null; then
      say "The portal answers at $url"
      return
    fi
    sleep 0.5
  done
  echo "The portal does not answer at $url: see 'journalctl -u appliance-portal'" >&2
  exit 1
}

start_with_systemd() {
  local uid; uid="$(id -u "$SERVICE_USER")"
  say "Lingering and the Podman API socket (podman.socket) for $SERVICE_USER"
  loginctl enable-linger "$SERVICE_USER"
  # scripts/setup.sh started the API service by hand (it also serves hosts without systemd);
  # systemd takes the socket over from here: the hand-started service would otherwise live
  # on, unreachable, once podman.socket binds the path. Containers belong to conmon, not to
  # it: they keep running.
  if ! systemctl --user -M "$SERVICE_USER@" is-active --quiet podman.socket 2>/dev/null; then
    pkill -TERM -u "$uid" -f '^podman system service' 2>/dev/null || true
  fi
  systemctl --user -M "$SERVICE_USER@" enable --now podman.socket
  note "unix:///run/user/$uid/podman/podman.sock"
  if [ "${UNITS_CHANGED:-0}" = 1 ]; then systemctl daemon-reload; fi
  systemctl enable "${UNITS[@]}" >/dev/null
  if [ "$UPGRADE" = 1 ]; then
    say "Upgrading: backing up and migrating the database, then restarting the services"
    # A oneshot with RemainAfterExit runs again on restart: `appliance migrate` backs up to
    # backups/pre-migrate-*.db when a migration is pending. Spaces' containers belong to the
    # account's Podman service, not to these units: they keep serving.
    systemctl restart appliance-migrate.service
    systemctl restart "${LONG_RUNNING[@]}"
  else
    say "Starting the appliance services"
    systemctl start "${UNITS[@]}"
  fi
  wait_for_portal
}

explain_without_systemd() {
  say "Not enabling or starting the units: $(no_systemd_reason)"
  if [ -n "$ROOT" ]; then
    return
  fi
  # What the migrate unit would do, done directly (root's `appliance` drops to the account).
  say "Bringing the database up to date (appliance migrate)"
  /usr/local/bin/appliance migrate | sed 's/^/    /'
  note "The units are in $UNIT_DIR for a host with systemd. Here, run the processes the way"
  note "scripts/run.sh does (it starts whichever is not running):"
  note "  setsid nohup appliance serve     >>$DATA_DIR/run/portal.log 2>&1 &"
  note "  setsid nohup appliance scheduler >>$DATA_DIR/run/scheduler.log 2>&1 &"
  note "The Podman API service was started by scripts/setup.sh (podman system service)."
  note "After an upgrade, restart the portal and the scheduler you started; Spaces keep running."
}

do_install() {
  UPGRADE=0
  if [ -f "$UNIT_DIR/appliance-migrate.service" ]; then UPGRADE=1; fi
  if [ -z "$ROOT" ]; then
    bash "$REPO/scripts/setup.sh"
  else
    say "Staging under $ROOT: scripts/setup.sh (packages, account, Podman, venv) is not run"
  fi
  install_files
  if has_systemd; then
    start_with_systemd
  else
    explain_without_systemd
  fi
  say "Installed ($CHANGES change(s)${ROOT:+ under $ROOT})"
}

do_uninstall() {
  if has_systemd; then
    say "Stopping and disabling the appliance services"
    systemctl disable --now "${UNITS[@]}" 2>/dev/null || true
    if id "$SERVICE_USER" >/dev/null 2>&1; then
      systemctl --user -M "$SERVICE_USER@" disable --now podman.socket 2>/dev/null || true
      loginctl disable-linger "$SERVICE_USER" 2>/dev/null || true
    fi
  else
    say "Not stopping units: $(no_systemd_reason)"
    [ -n "$ROOT" ] || note "stop 'appliance serve' and 'appliance scheduler' if you started them"
  fi
  say "Removing units, the virtualenv and the configuration${ROOT:+ under $ROOT}"
  for unit in "${UNITS[@]}"; do remove_path "$UNIT_DIR/$unit"; done
  if has_systemd; then systemctl daemon-reload; fi
  if [ -L "$BIN_LINK" ] && [[ "$(readlink "$BIN_LINK")" == "$PREFIX/"* ]]; then
    remove_path "$BIN_LINK"
  fi
  remove_path "$PREFIX"
  remove_path "$ETC_DIR"
  if [ -z "$ROOT" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
    local home; home="$(getent passwd "$SERVICE_USER" | cut -d: -f6)"
    remove_path "$home/.config/containers/containers.conf"
    remove_path "$home/.config/containers/storage.conf"
  fi
  if [ "$PURGE" = 1 ]; then
    say "Purging the data, the cache and the service account"
    if [ -z "$ROOT" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
      local uid; uid="$(id -u "$SERVICE_USER")"
      # Its Spaces' containers, images and volumes, then every process of the account.
      (cd / && runuser -u "$SERVICE_USER" -- env HOME="$DATA_DIR" XDG_RUNTIME_DIR="/run/user/$uid" \
        podman system reset --force >/dev/null 2>&1) || true
      pkill -u "$SERVICE_USER" 2>/dev/null || true
      userdel "$SERVICE_USER" 2>/dev/null || true
      sed -i "/^$SERVICE_USER:/d" /etc/subuid /etc/subgid
      remove_path "/run/user/$uid"
    fi
    remove_path "$DATA_DIR"
    remove_path "$CACHE_DIR"
  else
    note "kept ${DATA_DIR} (Spaces, database, backups); --purge removes it"
  fi
  say "Uninstalled ($CHANGES change(s)${ROOT:+ under $ROOT})"
}

if [ "$UNINSTALL" = 1 ]; then
  do_uninstall
else
  do_install
fi
