"""What a Space controls must not reach the portal's pages as markup or a secret (issue 11):
card colours outside Hugging Face's list, the portal's Content-Security-Policy (and not the
apps'), and secrets in app log lines that the log stream splits."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import http_server
from test_web import PASSWORD, logged_in

from appliance import users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.builds import Redactor
from appliance.core.manifest import CARD_COLORS, parse_manifest
from appliance.core.spaces import Context
from appliance.gpu.nvml import Inventory
from appliance.web.app import create_app

HOSTILE_COLOR = "red; background:url(//evil.example/x)"
SECRET = "hf_SeCrEt-that-straddles-the-split-0123456789"
SPLIT = 8192  # where conmon cuts a long log line into two records


def readme(color_from: str | int, color_to: str = "blue") -> str:
    return (f"---\nsdk: gradio\nsdk_version: 5.9.1\ncolorFrom: {json.dumps(color_from)}\n"
            f"colorTo: {json.dumps(color_to)}\n---\n# A Space\n")


class LogRuntime:
    """The runtime seam: one container whose log line is longer than conmon's 8 KiB record,
    with the secret placed across the cut."""

    line = "x" * (SPLIT - 10) + SECRET + " and the rest of the line"

    def info(self):
        from appliance.errors import RuntimeUnavailable

        raise RuntimeUnavailable("Podman is not used in these tests")

    def logs(self, name, tail=200):
        return "before\n" + self.line + "\nafter\n"

    def follow_logs(self, name, tail=None):
        text = "before\n" + self.line + "\nafter\n"
        cut = len("before\n") + SPLIT
        yield text[:cut]
        yield text[cut:]


class HfFollowRuntime(LogRuntime):
    """As LogRuntime, but nothing was logged before the stream began (all of it is new)."""

    def logs(self, name, tail=200):
        return ""


def make_app(tmp_path, runtime=None, **settings):
    config = load_config({}, data_dir=str(tmp_path / "data"), port_range="18000-18099",
                         **settings)

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), runtime or LogRuntime(), actor,
                       read_inventory=lambda: Inventory(available=False, reason="no GPU"))

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    users.add_user(store, "admin", "admin", PASSWORD, "test")
    parsed = parse_manifest(readme(HOSTILE_COLOR, "pink;}</style><script>alert(1)</script>"))
    # One row as a build now stores it, one as a build stored it before colours were checked.
    for number, (space_id, manifest) in enumerate((
            ("alice/parsed", parsed.to_dict()),
            ("alice/legacy", {"colorFrom": HOSTILE_COLOR, "colorTo": "x)}body{display:none"}),
    )):
        store.insert_space({
            "id": space_id, "source": "/src", "source_display": "/src", "stage": "RUNNING",
            "port": 18000 + number, "hardware": "cpu", "desired": "running", "sdk": "gradio",
            "title": space_id.split("/")[1].title(), "created_by": "cli:root",
            "visibility": "public", "container": f"c{number}", "manifest": json.dumps(manifest),
        }, "test")
        store.set_kv("secrets", space_id, "HF_TOKEN", SECRET, "test")
    store.close()
    app.config["store_path"] = config.db_path
    return app


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


# -- card colours -----------------------------------------------------------------------------


@pytest.mark.parametrize("color", [
    HOSTILE_COLOR, "var(--x)", "red\n", "gr\x00ay", "#ff0000", "blue" * 10_000, "grey", "", 7,
])
def test_an_unknown_card_colour_is_dropped_with_a_warning_and_the_space_still_parses(color):
    manifest = parse_manifest(readme(color))
    assert manifest.color_from is None and manifest.color_to == "blue"
    assert "colorFrom" not in manifest.to_dict()
    [warning] = [w for w in manifest.warnings if "colorFrom" in w]
    assert "is not a card colour and is ignored" in warning and "gray" in warning
    assert len(warning) < 300, "a huge value is shortened in the warning"


def test_every_hugging_face_card_colour_is_kept_whatever_its_case():
    for color in CARD_COLORS:
        manifest = parse_manifest(readme(color.upper(), color))
        assert (manifest.color_from, manifest.color_to) == (color, color)
        assert not [w for w in manifest.warnings if "colo" in w]


def test_hostile_card_colours_never_reach_a_page(app):
    client = logged_in(app, "admin")
    for path in ("/", "/spaces/alice/parsed", "/spaces/alice/legacy", "/spaces/alice/legacy/logs",
                 "/spaces/alice/legacy/settings"):
        page = client.get(path).data.decode()
        assert "Legacy" in page or "Parsed" in page, path
        for hostile in ("evil.example", "background:", "<script>alert", "display:none"):
            assert hostile not in page, (path, hostile)
        assert "--from: var(--c-gray)" in page, path


# -- the portal's Content-Security-Policy ----------------------------------------------------


def test_portal_pages_and_apis_send_the_content_security_policy(app):
    client = logged_in(app, "admin")
    for path in ("/", "/spaces/alice/parsed", "/login", "/no/such/page", "/api/v1/spaces",
                 "/api/spaces/alice/parsed", "/static/portal.css"):
        policy = client.get(path).headers.get("Content-Security-Policy", "")
        assert policy == (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; frame-src http://localhost:8081; frame-ancestors 'self'; "
            "base-uri 'none'; form-action 'self'"), path


def test_the_policy_frames_exactly_where_the_space_page_embeds_its_app(tmp_path):
    app = make_app(tmp_path / "domain", portal_apps_domain="apps.example")
    response = app.test_client().get("/spaces/alice/parsed", base_url="http://apps.example:8080")
    assert 'src="http://alice--parsed.apps.example:8081/"' in response.data.decode()
    assert ("frame-src http://apps.example:8081 http://*.apps.example:8081;"
            in response.headers["Content-Security-Policy"])
    # A host the box does not answer to is not written into the policy: its public_host is.
    response = app.test_client().get("/spaces/alice/parsed", base_url="http://portal.lan:8080")
    assert ("frame-src http://127.0.0.1:8081 http://*.apps.example:8081;"
            in response.headers["Content-Security-Policy"])
    app = make_app(tmp_path / "one-port", portal_apps_port=0)
    response = app.test_client().get("/spaces/alice/parsed")
    assert 'src="/s/alice--parsed/"' in response.data.decode()
    assert "frame-src 'self';" in response.headers["Content-Security-Policy"]


def test_a_hostile_host_header_cannot_write_policy_directives(app):
    response = app.test_client().get("/", headers={"Host": "evil;script-src *"})
    policy = response.headers["Content-Security-Policy"]
    assert "evil" not in policy and "script-src *" not in policy
    assert "script-src 'self'" in policy


class SpaceApp(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = b"<html><body>the Space's own page</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def space_app():
    with http_server(SpaceApp) as port:
        yield port


def point_space_at(app, port: int) -> None:
    store = open_store(app.config["store_path"])
    store.update_space("alice/parsed", port=port)
    store.close()


@pytest.mark.parametrize("apps_port", [0, 8081])
def test_proxied_space_responses_do_not_get_the_portal_policy(tmp_path, space_app, apps_port):
    app = make_app(tmp_path, portal_apps_port=apps_port)
    point_space_at(app, space_app)
    on_apps_port = {"SERVER_PORT": str(apps_port)} if apps_port else {}
    response = app.test_client().get("/s/alice--parsed/", environ_overrides=on_apps_port)
    assert response.status_code == 200 and b"the Space's own page" in response.data
    # The proxy's own frame-ancestors policy, nothing of the portal's.
    assert response.headers["Content-Security-Policy"].startswith("frame-ancestors ")
    assert "default-src" not in response.headers["Content-Security-Policy"]
    if apps_port:
        offline = app.test_client().get(
            "/static/offline/iframe-resizer/4.3.1/iframeResizer.contentWindow.min.js",
            environ_overrides=on_apps_port)
        assert offline.status_code == 200
        assert "Content-Security-Policy" not in offline.headers


# -- secrets across a log split ---------------------------------------------------------------


def assert_hidden(text: str) -> None:
    assert SECRET not in text
    for piece in (SECRET[:10], SECRET[10:20], SECRET[-10:]):
        assert piece not in text, f"part of the secret shows: {piece!r}"
    assert "***" in text


def test_a_secret_across_the_log_split_never_shows_in_the_log_stream(app):
    response = app.test_client().get("/spaces/alice/parsed/logs/stream?kind=run")
    lines = [json.loads(event.split("data: ", 1)[1])["line"]
             for event in response.data.decode().split("\n\n") if event.startswith("event: line")]
    assert_hidden("\n".join(lines))
    assert lines[0] == "before" and lines[-1] == "after"
    assert lines[1].endswith("*** and the rest of the line"), "the line is shown whole"


def test_a_secret_across_the_log_split_never_shows_in_the_apis(tmp_path, app):
    answer = app.test_client().get("/api/v1/spaces/alice/parsed/logs?kind=run")
    assert answer.status_code == 200
    assert_hidden("\n".join(answer.json["lines"]))
    stream = make_app(tmp_path / "hf", HfFollowRuntime()).test_client().get(
        "/api/spaces/alice/parsed/logs/run")
    text = "".join(json.loads(event[len("data: "):])["data"]
                   for event in stream.data.decode().split("\n\n") if event.startswith("data: "))
    assert_hidden(text)


@pytest.mark.parametrize("longest", [1 << 20, 64, 10])
def test_no_split_or_cut_of_a_log_stream_lets_a_secret_through(longest):
    redact = Redactor([SECRET, "short-one"])
    text = "a" * 50 + SECRET + "b" * 7 + "short-one" + SECRET + "\n" + SECRET + "tail"
    for cut in range(1, len(text)):
        shown = list(redact.lines([text[:cut], text[cut:]], longest=longest))
        assert SECRET not in "".join(shown) and "short-one" not in "".join(shown), cut
        assert "".join(shown).count("***") == 4, cut
        if longest > len(text):
            assert shown == [redact(line) for line in text.split("\n")], cut


@pytest.mark.parametrize("follow", [False, True])
def test_the_cli_hides_secrets_in_the_run_log_as_the_portal_does(tmp_path, app, follow):
    from click.testing import CliRunner

    from appliance.cli.spaces import spaces_group

    config = app.extensions["appliance.config"]
    ctx = Context(config, open_store(config.db_path), LogRuntime(), "test",
                  read_inventory=lambda: Inventory(available=False, reason="no GPU"))
    result = CliRunner().invoke(spaces_group, ["logs", "alice/parsed",
                                               *(["--follow"] if follow else [])],
                                obj={"ctx": ctx})
    assert result.exit_code == 0, result.output
    assert_hidden(result.output)
    assert result.output.splitlines()[0] == "before"
    ctx.store.close()
