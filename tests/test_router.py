"""The front router as a real process: an open connection keeps its Space awake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from appliance import router
from appliance.config import load_config
from appliance.store import open_store


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_long_lived_connection_counts_as_use_at_every_flush(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"))
    backend = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(backend.accept()), daemon=True).start()
    port = free_port()
    store = open_store(config.db_path)
    store.insert_space({"id": "lab/ws", "source": "/s", "source_display": "/s",
                        "stage": "RUNNING", "port": port, "hardware": "cpu",
                        "desired": "running", "backend_port": backend.getsockname()[1],
                        "container": "c"}, "test")
    env = {**os.environ, "APPLIANCE_DATA_DIR": str(config.data_path),
           "APPLIANCE_CONFIG_FILE": "/nonexistent"}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "router"], env=env)
    try:
        router.wait_route(config, port, backend.getsockname()[1], timeout=10)
        client = socket.create_connection(("127.0.0.1", port))  # a WebSocket, say: no bytes
        seen = []
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and len(set(seen)) < 3:
            at = store.get_space("lab/ws")["last_request_at"]
            if at:
                seen.append(at)
            time.sleep(0.5)
        assert len(set(seen)) >= 3, f"last_request_at did not move while open: {seen}"
        client.close()
        held[0][0].close()  # the app answers the visitor's close with its own
        time.sleep(router.FLUSH_SECONDS + 1.5)
        closed_at = store.get_space("lab/ws")["last_request_at"]
        time.sleep(router.FLUSH_SECONDS + 1)
        assert store.get_space("lab/ws")["last_request_at"] == closed_at, "idle must stay idle"
    finally:
        process.terminate()
        process.wait(10)
        backend.close()
