#!/usr/bin/env bash
# Quick start, command 1: set up this host (idempotent) and run the appliance with the bundled
# example Space deployed; prints where to open it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then exec sudo -E bash "$0" "$@"; fi
bash "$REPO/scripts/setup.sh"

appliance_setting() { /opt/appliance/venv/bin/python -c "from appliance.config import load_config; print(getattr(load_config(), '$1'))"; }
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

# The portal (gunicorn) and the scheduler run as the service account (the appliance command
# drops to it); started here when they are not running already (systemd units do it on a
# production box).
PORT="$(appliance_setting portal_port)"
RUN_DIR="$(appliance_setting data_dir)/run"
answers() { python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/api/v1/whoami', timeout=2)" 2>/dev/null; }
if ! answers; then
  echo "==> Starting the portal on port $PORT"
  setsid nohup appliance serve >>"$RUN_DIR/portal.log" 2>&1 < /dev/null &
  for _ in $(seq 1 50); do answers && break; sleep 0.2; done
  answers || { echo "The portal did not start; see $RUN_DIR/portal.log" >&2; exit 1; }
fi
if ! pgrep -f "appliance scheduler" >/dev/null; then
  echo "==> Starting the scheduler"
  setsid nohup appliance scheduler >>"$RUN_DIR/scheduler.log" 2>&1 < /dev/null &
fi
host="$(hostname -I 2>/dev/null | awk '{print $1}')"
echo
echo "The appliance is running. Open the portal: http://${host:-127.0.0.1}:$PORT/"
echo "The example Space also answers on its own port: $url"
if ! appliance users list --json | python3 -c "import json,sys; sys.exit(0 if any(u['role']=='admin' for u in json.load(sys.stdin)) else 1)"; then
  echo "Create the first admin: open http://127.0.0.1:$PORT/setup on this box, or run"
  echo "  appliance users add admin --role admin   (the password is read from stdin)"
fi
echo "Next: appliance spaces list | appliance spaces add hf://spaces/OWNER/NAME --wait | appliance doctor"
