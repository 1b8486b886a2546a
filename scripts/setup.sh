#!/usr/bin/env bash
# Prepare this host for the appliance (idempotent): packages, the service account, rootless
# Podman for it, its API socket, a virtualenv with the appliance, and the Python base image.
# Sourced by scripts/run.sh and scripts/test.sh; run it alone to (re)provision a box.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICE_USER="${APPLIANCE_SERVICE_USER:-appliance}"
DATA_DIR="${APPLIANCE_DATA_DIR:-/var/lib/appliance}"
PREFIX="${APPLIANCE_PREFIX:-/opt/appliance}"
CACHE_DIR="${APPLIANCE_CACHE_DIR:-/var/cache/appliance}"
BASE_IMAGE="localhost/appliance-python:3.11"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E bash "$0" "$@"
fi

install_packages() {
  local pkgs=(podman uidmap slirp4netns fuse-overlayfs runc catatonit debootstrap python3 python3-venv
              git git-lfs ca-certificates iproute2 util-linux procps)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "Installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_service_user() {
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    say "Creating service account $SERVICE_USER (home $DATA_DIR)"
    useradd --system --create-home --home-dir "$DATA_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  install -d -m 750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA_DIR"
  # Rootless Podman maps container uids into these ranges; useradd --system adds none.
  local uid; uid="$(id -u "$SERVICE_USER")"
  for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -qE "^($SERVICE_USER|$uid):" "$f"; then
      local start=100000
      while grep -qE ":$start:" "$f"; do start=$((start + 65536)); done
      echo "$SERVICE_USER:$start:65536" >> "$f"
      say "Added $SERVICE_USER:$start:65536 to $f"
      SUBIDS_CHANGED=1
    fi
  done
}

configure_podman() {
  local uid home; uid="$(id -u "$SERVICE_USER")"; home="$(getent passwd "$SERVICE_USER" | cut -d: -f6)"
  # Rootless networking opens /dev/net/tun; some VMs ship it 0600 (real hosts use 0666).
  if [ -e /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != "666" ]; then
    chmod 666 /dev/net/tun
  fi
  install -d -m 700 -o "$SERVICE_USER" -g "$SERVICE_USER" "/run/user/$uid"
  # Without /var/lib/cni, rootless Podman 4.3 hides /var/lib in its network namespace, and
  # with it the account's own network files: offline Spaces (an internal network) fail to
  # start with "network not found".
  install -d -m 755 /var/lib/cni
  install -d -m 755 -o "$SERVICE_USER" -g "$SERVICE_USER" "$home/.config" "$home/.config/containers"
  local manager=systemd runtime=crun
  # crun refuses hybrid cgroups, and without systemd as PID 1 there is no user manager.
  if [ ! -f /sys/fs/cgroup/cgroup.controllers ] || [ -d /sys/fs/cgroup/unified ] \
     || [ "$(cat /proc/1/comm 2>/dev/null)" != "systemd" ]; then
    manager=cgroupfs runtime=runc
  fi
  cat > "$home/.config/containers/containers.conf.new" <<EOF
# Written by appliance scripts/setup.sh
[containers]
log_driver = "k8s-file"

[engine]
runtime = "$runtime"
cgroup_manager = "$manager"
events_logger = "file"
EOF
  cat > "$home/.config/containers/storage.conf.new" <<EOF
# Written by appliance scripts/setup.sh: native rootless overlay, not vfs.
[storage]
driver = "overlay"
EOF
  for f in containers.conf storage.conf; do
    if ! cmp -s "$home/.config/containers/$f.new" "$home/.config/containers/$f"; then
      mv "$home/.config/containers/$f.new" "$home/.config/containers/$f"
    else
      rm -f "$home/.config/containers/$f.new"
    fi
  done
  chown -R "$SERVICE_USER:$SERVICE_USER" "$home/.config"
  if [ "$(cat /proc/1/comm 2>/dev/null)" = "systemd" ] && command -v loginctl >/dev/null; then
    loginctl enable-linger "$SERVICE_USER" || true
  fi
}

as_service() {
  local uid; uid="$(id -u "$SERVICE_USER")"
  (cd / && runuser -u "$SERVICE_USER" -- env HOME="$(getent passwd "$SERVICE_USER" | cut -d: -f6)" \
    XDG_RUNTIME_DIR="/run/user/$uid" "$@")
}

start_podman_service() {
  local uid sock; uid="$(id -u "$SERVICE_USER")"; sock="/run/user/$uid/podman/podman.sock"
  if as_service podman --remote --url "unix://$sock" version >/dev/null 2>&1; then
    return
  fi
  say "Starting the Podman API service for $SERVICE_USER at unix://$sock"
  # /run/user/UID is a tmpfs that empties when the account's last process ends; where it
  # is a plain directory (containers, some VMs) it survives with the pause-process and
  # container state of processes that are gone, and every podman command then fails with
  # "invalid internal status ... could not find any running process". With no process of
  # the account left, nothing in it is live: empty it, as a reboot would.
  if ! pgrep -u "$uid" >/dev/null 2>&1 && [ -n "$(ls -A "/run/user/$uid" 2>/dev/null)" ]; then
    say "Clearing stale runtime state in /run/user/$uid (no process of $SERVICE_USER is running)"
    find "/run/user/$uid" -mindepth 1 -delete 2>/dev/null || true
  fi
  # migrate picks up new subuid ranges, but it also stops every running container: only
  # when the ranges changed.
  if [ "${SUBIDS_CHANGED:-0}" = 1 ]; then
    as_service podman system migrate >/dev/null 2>&1 || true
  fi
  install -d -m 700 -o "$SERVICE_USER" -g "$SERVICE_USER" "/run/user/$uid/podman"
  as_service setsid nohup podman system service --time=0 "unix://$sock" \
    >"/run/user/$uid/podman/service.log" 2>&1 < /dev/null &
  for _ in $(seq 1 50); do
    as_service podman --remote --url "unix://$sock" version >/dev/null 2>&1 && return
    sleep 0.2
  done
  echo "Podman API service did not come up; its log (/run/user/$uid/podman/service.log) ends:" >&2
  tail -n 20 "/run/user/$uid/podman/service.log" >&2 || true
  exit 1
}

install_venv() {
  # The service account must be able to run the venv: build it from Debian's python3, not
  # root's pyenv, and install the package (not editable) so it does not live under /root.
  install -d -m 755 "$PREFIX" "$PREFIX/share"
  if [ ! -x "$PREFIX/venv/bin/python" ]; then
    say "Creating $PREFIX/venv"
    /usr/bin/python3 -m venv "$PREFIX/venv"
  fi
  local stamp="$PREFIX/venv/.appliance-src"
  # Every file of the package counts, by path and content: templates and static files too, and a
  # file that only moved (a module moving to a subpackage must reinstall).
  local digest; digest="$(cd "$REPO" && { cat pyproject.toml; find appliance -type f ! -name '*.pyc' \
    ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
    say "Installing the appliance into $PREFIX/venv"
    local tmp; tmp="$(mktemp -d)"
    cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/appliance" "$tmp/"
    "$PREFIX/venv/bin/pip" install -q --upgrade "$tmp" >/dev/null 2>&1 \
      || "$PREFIX/venv/bin/pip" install --upgrade "$tmp"
    rm -rf "$tmp"
    echo "$digest" > "$stamp"
  fi
  ln -sf "$PREFIX/venv/bin/appliance" /usr/local/bin/appliance
  # The bundled examples become git repositories owned by the service account (git refuses
  # to read a repository another user owns); fixed dates keep their commit ids stable, so a
  # re-run changes nothing unless the example did.
  local staged; staged="$(mktemp -d)"
  cp -r "$REPO/examples/." "$staged/"
  for dir in "$staged"/*/; do
    (cd "$dir" && git init -q -b main && git add -A \
      && GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z" \
         git -c user.name=appliance -c user.email=appliance@localhost commit -q -m "Example Space")
  done
  rm -rf "$PREFIX/share/examples"
  mv "$staged" "$PREFIX/share/examples"
  chown -R "$SERVICE_USER:$SERVICE_USER" "$PREFIX/share/examples"
  chmod -R a+rX "$PREFIX/share"
  install -d -m 755 /etc/appliance
  if [ ! -f /etc/appliance/appliance.toml ]; then
    printf '%s\n' "# appliance settings (README: Configuration); APPLIANCE_* variables win." \
      "data_dir = \"$DATA_DIR\"" "local_sources = \"$PREFIX/share/examples\"" \
      > /etc/appliance/appliance.toml
  fi
}

build_base_image() {
  # The image carries the digest of the recipe it was built from: a changed package list or
  # build script rebuilds it, not only a missing image.
  local want have
  want="$(bash "$REPO/images/python/build.sh" --print-recipe)"
  have="$(as_service podman image inspect --format '{{ index .Labels "appliance.base-recipe" }}' \
    "$BASE_IMAGE" 2>/dev/null || true)"
  if [ "$have" = "$want" ]; then
    return
  fi
  if [ -n "$have" ] || as_service podman image exists "$BASE_IMAGE" 2>/dev/null; then
    say "Rebuilding $BASE_IMAGE: its recipe changed (${have:-none} -> $want)"
  else
    say "Building $BASE_IMAGE (recipe $want)"
  fi
  bash "$REPO/images/python/build.sh" "$CACHE_DIR" "$SERVICE_USER" "$BASE_IMAGE"
}

install_packages
ensure_service_user
configure_podman
start_podman_service
install_venv
build_base_image
say "Host ready: service account $SERVICE_USER, Podman API unix:///run/user/$(id -u "$SERVICE_USER")/podman/podman.sock"
