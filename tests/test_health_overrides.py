"""Per-Space health settings: a path and an interval of its own, checked against a real HTTP
server playing the app, with a real SQLite file."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from appliance.adapters.store import open_store
from appliance.cli.main import cli
from appliance.config import load_config
from appliance.core.spaces import Context
from appliance.errors import InvalidInput
from appliance.upkeep import health


class App(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(500 if self.path == "/healthz" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def app_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def ctx(tmp_path):
    config = load_config({}, data_dir=str(tmp_path))
    store = open_store(config.db_path)
    store.insert_space({"id": "lab/h", "source": "/s", "source_display": "/s",
                        "stage": "RUNNING", "port": 18200, "hardware": "cpu",
                        "desired": "running", "manifest": json.dumps({"base_path": "/"})},
                       "test")
    yield Context(config, store, None, "test")
    store.close()


def test_a_health_path_of_its_own_is_what_gets_probed(ctx, app_port):
    ctx.store.update_space("lab/h", backend_port=app_port)
    assert health.probe_space(ctx.store.get_space("lab/h"), 5) is None  # base_path answers
    view = health.set_health(ctx, "lab/h", "/healthz", None)
    assert view["health_path"] == "/healthz"
    assert health.probe_space(ctx.store.get_space("lab/h"), 5) == "answered HTTP 500"
    health.set_health(ctx, "lab/h", None, None)
    assert health.probe_space(ctx.store.get_space("lab/h"), 5) is None


def test_an_interval_of_its_own_spaces_the_probes(ctx):
    health.set_health(ctx, "lab/h", None, 30)
    row = ctx.store.get_space("lab/h")
    health._last_probe.pop("lab/h", None)
    assert health.due(row, now=1000.0)
    assert not health.due(row, now=1020.0)
    assert health.due(row, now=1031.0)
    assert health.due({**row, "health_interval": None}, now=1031.5)  # the sweep's own pace


@pytest.mark.parametrize("path, interval, message", [
    ("healthz", None, "must be an absolute URL path"),
    ("/a b", None, "must be an absolute URL path"),
    ("/x#y", None, "must be an absolute URL path"),
    (None, 1, "at least 5 seconds"),
])
def test_bad_health_settings_are_refused(ctx, path, interval, message):
    with pytest.raises(InvalidInput, match=message):
        health.set_health(ctx, "lab/h", path, interval)
    assert ctx.store.get_space("lab/h")["health_path"] is None


def test_the_command_sets_and_resets(ctx, monkeypatch):
    monkeypatch.setenv("APPLIANCE_DATA_DIR", ctx.config.data_dir)
    runner = CliRunner()
    result = runner.invoke(cli, ["spaces", "health", "lab/h", "--path", "/ok", "--interval",
                                 "20", "--json"], obj={})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["health_interval"] == 20
    result = runner.invoke(cli, ["spaces", "health", "lab/h", "--reset", "--json"], obj={})
    assert json.loads(result.output)["health_path"] is None


def test_a_new_container_is_left_alone_for_the_initial_delay(ctx):
    row = {**ctx.store.get_space("lab/h"), "container": "c-new"}
    assert not health.settled_in(row, now=100.0, delay=10)
    assert not health.settled_in(row, now=109.0, delay=10)
    assert health.settled_in(row, now=110.0, delay=10)
    assert not health.settled_in({**row, "container": "c-next"}, now=111.0, delay=10)
