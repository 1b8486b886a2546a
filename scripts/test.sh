#!/usr/bin/env bash
# Quick start, command 2: set up this host (idempotent) and run the whole test suite against
# real rootless Podman, real git repositories and real SQLite files.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then exec sudo -E bash "$0" "$@"; fi
bash "$REPO/scripts/setup.sh"

# The install and Ansible tests: shellcheck, and an sshd per network-namespace test host; jq
# for the "Use via API" panel's curl snippet, run as a user would.
if ! dpkg-query -W -f='${Status}\n' openssh-server shellcheck jq 2>/dev/null | grep -c "install ok installed" | grep -q 3; then
  echo "==> Installing openssh-server, shellcheck and jq for the install, Ansible and browser tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server shellcheck jq >/dev/null
fi
# The browser tests drive Debian's Chromium (no browser download: there is no internet).
if ! dpkg-query -W -f='${Status}\n' chromium fonts-noto-color-emoji 2>/dev/null | grep -c "install ok installed" | grep -q 2; then
  echo "==> Installing chromium for the browser tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
fi

cd "$REPO"
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
stamp=".venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> Installing the appliance and its test dependencies into .venv"
  .venv/bin/pip install -q -e '.[test]' >/dev/null 2>&1 || .venv/bin/pip install -e '.[test]'
  touch "$stamp"
fi
export APPLIANCE_CONFIG_FILE=/nonexistent/appliance.toml
exec .venv/bin/python -m pytest "$@"
