#!/usr/bin/env bash
# Build the appliance's Python base image without a registry: debootstrap a minimal Debian
# bookworm (Python 3.11) with what Hugging Face's gradio/streamlit images carry, and
# `podman import` it into the service account's storage, labelled with its recipe's digest.
# Usage: build.sh CACHE_DIR SERVICE_USER IMAGE_NAME   (run as root; does nothing when the
#        image already carries the current recipe)
#        build.sh --print-recipe                      (the digest of the current recipe)
set -euo pipefail
SUITE="${APPLIANCE_BASE_SUITE:-bookworm}"
MIRROR="${APPLIANCE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LABEL="appliance.base-recipe"

# Spaces' images: their apt packages (git, git-lfs, ffmpeg, libsm6, libxext6, cmake, libgl1,
# rsync) and the build tools of the python:3.x image they start from, so apps that compile an
# extension or run `make` at start, or load libGL (opencv), work unchanged. README: "Image
# parity with Spaces".
PACKAGES=(
  python3 python3-venv python3-pip python3-dev ca-certificates
  git git-lfs ffmpeg libsm6 libxext6 cmake libgl1 rsync
  gcc g++ make libc6-dev pkg-config
  curl wget procps unzip
)

make_rootfs() {
  local rootfs="$1" include
  include="$(IFS=,; echo "${PACKAGES[*]}")"
  debootstrap --variant=minbase --include="$include" "$SUITE" "$rootfs" "$MIRROR" >/dev/null
  chroot "$rootfs" git lfs install --system >/dev/null
  # Packages for packages.txt come from the same mirror the host used.
  echo "deb $MIRROR $SUITE main" > "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
}

import_rootfs() {
  local tarball="$1" image="$2" recipe="$3"
  as_service podman import --quiet --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    --change "LABEL $LABEL=$recipe" - "$image" < "$tarball" >/dev/null
}

# The suite, the packages (in any order) and the code that makes the image: `declare -f`
# prints the functions without their comments, so rewording a comment rebuilds nothing.
recipe_digest() {
  { echo "$SUITE"; printf '%s\n' "${PACKAGES[@]}" | LC_ALL=C sort -u
    declare -f make_rootfs import_rootfs; } | sha256sum | cut -c1-12
}

as_service() {
  (cd / && runuser -u "$SERVICE_USER" -- env \
    HOME="$(getent passwd "$SERVICE_USER" | cut -d: -f6)" \
    XDG_RUNTIME_DIR="/run/user/$(id -u "$SERVICE_USER")" "$@")
}

if [ "${1:-}" = "--print-recipe" ]; then
  recipe_digest
  exit 0
fi
if [ "$#" -ne 3 ]; then
  echo "usage: $0 CACHE_DIR SERVICE_USER IMAGE_NAME | $0 --print-recipe" >&2
  exit 2
fi
CACHE_DIR="$1"; SERVICE_USER="$2"; IMAGE="$3"
RECIPE="$(recipe_digest)"
TARBALL="$CACHE_DIR/rootfs-$SUITE-$RECIPE.tar"

install -d -m 755 "$CACHE_DIR"
# scripts/setup.sh and the Ansible role may both run this on one host.
exec 9>"$CACHE_DIR/.build.lock"
flock 9
current="$(as_service podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$IMAGE" \
  2>/dev/null || true)"
if [ "$current" = "$RECIPE" ]; then
  echo "==> $IMAGE is up to date (recipe $RECIPE)"
  exit 0
fi
if [ ! -s "$TARBALL" ]; then
  echo "==> debootstrap $SUITE with ${#PACKAGES[@]} packages (about 3 minutes)"
  ROOTFS="$(mktemp -d)"
  trap 'rm -rf "$ROOTFS" "$TARBALL.tmp"' EXIT
  make_rootfs "$ROOTFS"
  tar -C "$ROOTFS" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi
echo "==> podman import $TARBALL as $IMAGE (recipe $RECIPE)"
import_rootfs "$TARBALL" "$IMAGE" "$RECIPE"
# Root filesystems of earlier recipes of this suite (and the unversioned name they once had).
find "$CACHE_DIR" -maxdepth 1 -type f \
  \( -name "rootfs-$SUITE.tar" -o -name "rootfs-$SUITE-*.tar" \) ! -name "rootfs-$SUITE-$RECIPE.tar" \
  -print -delete | sed 's/^/==> removed stale /'
