#!/usr/bin/env bash
# Quick start, command 1: set up this host (idempotent) and run the appliance with the bundled
# example Space deployed; prints where to open it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then exec sudo -E bash "$0" "$@"; fi
bash "$REPO/scripts/setup.sh"

SPACE=examples/hello-gradio
SOURCE=/opt/appliance/share/examples/hello-gradio
field() { appliance spaces show "$SPACE" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'] or '')"; }
if appliance spaces show "$SPACE" >/dev/null 2>&1; then
  # start is a no-op for a Space that runs, and revives one whose container died;
  # update is a no-op unless the example changed.
  appliance spaces start "$SPACE" >/dev/null || true
  appliance spaces update "$SPACE" --wait >/dev/null
else
  echo "==> Deploying the example Space $SPACE (the first build takes a minute or two)"
  appliance spaces add "$SOURCE" --name "$SPACE" --wait >/dev/null
fi
appliance spaces show "$SPACE"
url="$(field url)"
if [ -z "$url" ]; then
  echo "The example Space is not running: see 'appliance spaces logs $SPACE --build'" >&2
  exit 1
fi
echo
echo "The appliance is running. Open $url"
echo "Next: appliance spaces list | appliance spaces add hf://spaces/OWNER/NAME --wait | appliance doctor"
