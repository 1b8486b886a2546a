#!/usr/bin/env bash
# Build the appliance's Python base image without a registry: debootstrap a minimal Debian
# bookworm (Python 3.11) and `podman import` it into the service account's storage.
# Usage: build.sh CACHE_DIR SERVICE_USER IMAGE_NAME   (run as root)
set -euo pipefail
CACHE_DIR="$1"; SERVICE_USER="$2"; IMAGE="$3"
SUITE="${APPLIANCE_BASE_SUITE:-bookworm}"
MIRROR="${APPLIANCE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TARBALL="$CACHE_DIR/rootfs-$SUITE.tar"

install -d -m 755 "$CACHE_DIR"
if [ ! -s "$TARBALL" ]; then
  echo "==> debootstrap $SUITE into a temporary directory (about a minute)"
  ROOTFS="$(mktemp -d)"
  trap 'rm -rf "$ROOTFS"' EXIT
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,git \
    "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
  # Packages for packages.txt come from the same mirror the host used.
  echo "deb $MIRROR $SUITE main" > "$ROOTFS/etc/apt/sources.list"
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
  tar -C "$ROOTFS" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi
uid="$(id -u "$SERVICE_USER")"
echo "==> podman import $TARBALL as $IMAGE"
runuser -u "$SERVICE_USER" -- env HOME="$(getent passwd "$SERVICE_USER" | cut -d: -f6)" \
  XDG_RUNTIME_DIR="/run/user/$uid" \
  podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
  - "$IMAGE" < "$TARBALL" >/dev/null
