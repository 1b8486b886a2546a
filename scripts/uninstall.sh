#!/usr/bin/env bash
# Remove the appliance installed by scripts/install.sh: units, virtualenv and configuration;
# the data in /var/lib/appliance stays unless --purge. Same options as install.sh --uninstall.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/install.sh" --uninstall "$@"
