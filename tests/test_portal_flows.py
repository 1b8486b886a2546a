"""Issue 12 on the server side (Flask's test client, a real SQLite file, real git): every state
leads somewhere (the stage endpoint, wake on visit, broken Spaces with their title and
reason), adding never waits on the source's server, errors shown beside their field with
what was typed kept, one duration parser for the CLI, the API and the pages, only warnings
that apply, local folders named after their place, and the accessibility basics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_space_repo, silent_listener
from markupsafe import escape
from test_web import NoPodman

from appliance import stages, users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core import actions, jobs, spaces
from appliance.core.spaces import Context
from appliance.errors import InvalidInput
from appliance.gpu.nvml import Inventory
from appliance.upkeep import sleep
from appliance.web import pages
from appliance.web.app import create_app

PASSWORD = "correct horse battery"
LIVENESS = 60  # seconds a request may take before the test calls it hung (a bound, not a timing)


@pytest.fixture
def box(tmp_path):
    """A portal with an admin, a member, a viewer, a local sources folder and a quick git."""
    roots = tmp_path / "sources"
    roots.mkdir()
    config = load_config({}, data_dir=str(tmp_path / "data"), port_range="18100-18199",
                         local_sources=str(roots), git_timeout=2)

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), NoPodman(), actor,
                       read_inventory=lambda: Inventory(available=False, reason="no GPU"))

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    for name, role in (("admin", "admin"), ("mia", "member"), ("vic", "viewer")):
        users.add_user(store, name, role, PASSWORD, "test")
    store.close()
    app.config["roots"] = roots
    app.config["ctx"] = lambda actor="test": context(config, actor)
    return app


def csrf_of(page: bytes) -> str:
    found = re.search(rb'name="csrf_token" value="([^"]+)"', page)
    assert found, "the page has no CSRF field"
    return found.group(1).decode()


def logged_in(app, name: str):
    client = app.test_client()
    token = csrf_of(client.get("/login").data)
    answer = client.post("/login", data={"username": name, "password": PASSWORD,
                                         "csrf_token": token})
    assert answer.status_code == 302
    return client


def put_space(app, space_id: str, **fields) -> None:
    store = open_store(app.extensions["appliance.config"].db_path)
    row = {"id": space_id, "source": "/src", "source_display": "/src", "stage": "RUNNING",
           "port": 18100 + len(store.list_spaces()), "hardware": "cpu", "desired": "running",
           "sdk": "gradio", "title": space_id.split("/")[1].title(), "created_by": "cli:root",
           "manifest": json.dumps({"emoji": "🧪", "colorFrom": "blue", "colorTo": "green"})}
    store.insert_space({**row, **fields}, "test")
    store.close()


@pytest.fixture
def spawned(monkeypatch):
    """Record the workers the portal would start, instead of starting them."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(jobs, "spawn_job", lambda ctx, space_id, job, factory=False:
                        calls.append((space_id, job)) or 0)
    return calls


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a hung git server)."""
    with silent_listener(16) as port:
        yield port


def in_time(call):
    """Run call() on a thread and return its result, failing if it is still running after
    LIVENESS seconds (a hung request), which is what these tests are about."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(LIVENESS)
    assert not thread.is_alive(), f"the request was still waiting after {LIVENESS} s"
    return result[0]


# -- durations: one parser for the CLI, the API and the pages -----------------------------------


@pytest.mark.parametrize(("typed", "seconds"), [
    ("3600", 3600), (3600, 3600), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
    ("1h30", 5400), ("1d", 86400), (" 2H ", 7200), ("1d2h3m4s", 93784), ("never", None),
    ("", None), (None, None), ("0", 0),
])
def test_durations_are_read_as_people_type_them(typed, seconds):
    assert actions.parse_duration(typed, "Sleep time") == seconds


@pytest.mark.parametrize("typed", [
    "soon", "-5", "1e3", "1h-30m", "30 minutes", "30m'", "\x00", "1.5h", "h", "m30",
    "9" * 41, "１２", True, "30m\n2h",
])
def test_durations_refuse_what_they_cannot_read_and_say_how_to_write_one(typed):
    with pytest.raises(InvalidInput) as caught:
        actions.parse_duration(typed, "Sleep time")
    assert caught.value.message.startswith("Sleep time must be a duration")
    assert caught.value.hint == "write 3600, 90s, 30m, 2h, 1h30m or 1d — or never"


def test_a_duration_past_ten_years_is_refused():
    with pytest.raises(InvalidInput, match="must be between 0 and 10 years, got 3599996400 s"):
        actions.parse_duration("999999h", "Sleep time")


@pytest.mark.parametrize("seconds", [None, 0, 59, 60, 90, 3600, 5400, 86400, 93784])
def test_durations_are_written_the_way_they_are_read_back(seconds):
    assert actions.parse_duration(actions.format_duration(seconds)) == seconds


def test_the_cli_the_api_and_the_page_take_the_same_durations(box):
    put_space(box, "alice/napper")
    ctx = box.config["ctx"]("cli:root")
    from appliance.cli.main import cli

    result = CliRunner().invoke(cli, ["spaces", "sleep-time", "alice/napper", "1h30m", "--json"],
                                obj={"ctx": ctx})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sleep_after"] == 5400

    client = logged_in(box, "admin")
    token = csrf_of(client.get("/spaces/alice/napper/settings").data)
    answer = client.put("/api/v1/spaces/alice/napper/sleep-time", json={"seconds": "30m"},
                        headers={"X-CSRF-Token": token})
    assert answer.status_code == 200 and answer.json["sleep_after"] == 1800
    answer = client.put("/api/v1/spaces/alice/napper/sleep-time", json={"seconds": "soon"},
                        headers={"X-CSRF-Token": token})
    assert answer.status_code == 400
    assert answer.json["error"].startswith("Sleep time must be a duration like 30m")

    answer = client.post("/spaces/alice/napper/settings/sleep",
                         data={"seconds": "2h", "csrf_token": token})
    assert answer.status_code == 302
    page = client.get("/spaces/alice/napper/settings").data.decode()
    assert 'name="seconds" value="2h"' in page  # shown the way it is typed
    result = CliRunner().invoke(cli, ["spaces", "sleep-time", "alice/napper", "later"],
                                obj={"ctx": ctx})
    assert result.exit_code != 0 and "Sleep time must be a duration like 30m" in result.output


# -- errors in place -----------------------------------------------------------------------------


def test_a_settings_error_is_shown_beside_its_form_with_what_was_typed(box):
    put_space(box, "alice/napper")
    client = logged_in(box, "admin")
    token = csrf_of(client.get("/spaces/alice/napper/settings").data)
    answer = client.post("/spaces/alice/napper/settings/sleep",
                         data={"seconds": "30s", "csrf_token": token})
    page = answer.data.decode()
    assert answer.status_code == 400
    assert ('<p class="field-error" id="error-sleep" role="alert">Sleep time must be at least '
            '60 seconds, got 30 — give 1m or more (30m, 2h, 3600), or never</p>') in page
    assert 'name="seconds" value="30s"' in page and 'aria-invalid="true"' in page
    assert "Back to the Spaces" not in page and "<h2>Variables</h2>" in page  # the whole page

    hostile = '1BAD"><script>x</script>'
    answer = client.post("/spaces/alice/napper/variables",
                         data={"key": hostile, "value": "v'\"\n", "csrf_token": token})
    page = answer.data.decode()
    assert answer.status_code == 400 and 'id="error-variables"' in page
    assert "Variable name &#39;1BAD&#34;&gt;&lt;script&gt;x&lt;/script&gt;&#39; is not valid" \
        in page
    assert "<script>x</script>" not in page
    assert 'value="1BAD&#34;&gt;&lt;script&gt;x&lt;/script&gt;"' in page  # kept, escaped

    answer = client.post("/spaces/alice/napper/secrets",
                         data={"key": "2X", "value": "hunter2-secret", "csrf_token": token})
    page = answer.data.decode()
    assert answer.status_code == 400 and 'id="error-secrets"' in page
    assert "hunter2-secret" not in page  # a secret is never written back into the page

    answer = client.post("/spaces/alice/napper/settings/update-policy",
                         data={"policy": "track", "interval": "every day", "csrf_token": token})
    page = answer.data.decode()
    assert answer.status_code == 400 and 'id="error-update-policy"' in page
    assert "Update interval must be a duration like 30m" in page
    assert 'value="every day"' in page


def test_an_action_that_fails_says_so_on_the_page_in_the_portal_s_words(box):
    put_space(box, "alice/imageless")
    client = logged_in(box, "admin")
    token = csrf_of(client.get("/spaces/alice/imageless/settings").data)
    answer = client.post("/spaces/alice/imageless/actions/restart",
                         data={"csrf_token": token, "from": "settings"})
    assert answer.status_code == 302
    assert answer.location.endswith("/spaces/alice/imageless/settings")
    page = client.get("/spaces/alice/imageless/settings").data.decode()
    assert ("Restart failed: Space alice/imageless has no built image to restart — rebuild "
            "it with Factory rebuild in Settings") in page
    assert "appliance spaces" not in page


@pytest.mark.parametrize(("cli_hint", "web"), [
    ("wait for it: 'appliance spaces logs a/b --build --follow'", "wait for it: the Logs tab"),
    ("rebuild it with 'appliance spaces restart a/b --factory'",
     "rebuild it with Factory rebuild in Settings"),
    ("update it with 'appliance spaces update a/b', or pick another name with --name",
     "update it with Update now in Settings, or pick another name in the Name field"),
    ("start it from its page (or 'appliance spaces start a/b')",
     "start it from its page (or the Start button in Settings)"),
    ("run 'appliance doctor'", "run the System page"),
    (None, ""),
])
def test_web_hints_speak_of_what_to_click(cli_hint, web):
    assert pages.web_hint(cli_hint) == web


def test_new_space_form_shows_each_refusal_beside_its_field_and_keeps_the_values(box, spawned):
    roots = box.config["roots"]
    make_space_repo(roots / "team" / "tool", {"README.md": "---\nsdk: static\n---\n",
                                              "index.html": "hi"})
    client = logged_in(box, "mia")
    token = csrf_of(client.get("/new").data)
    cases = [
        ({"source": "ext::sh -c id"}, "source", "Remote-helper sources"),
        ({"source": str(roots / "team" / "tool"), "name": "bad name/..'\""}, "name",
         "Invalid Space id"),
        ({"source": str(roots / "team" / "tool"), "revision": "--upload-pack=x"}, "revision",
         "Revision"),
        ({"source": str(roots / "team" / "tool"), "hardware": "gpu:x"}, "hardware", "ardware"),
    ]
    for data, field, said in cases:
        answer = client.post("/new", data={**data, "csrf_token": token})
        page = answer.data.decode()
        assert answer.status_code in (400, 403, 409), (data, answer.status_code)
        found = re.search(rf'<p class="field-error" id="error-{field}" role="alert">([^<]*)</p>',
                          page)
        assert found and said.lower() in found.group(1).lower(), (field, page[-3000:])
        for value in data.values():  # every value typed is still in its field
            assert f'value="{escape(value)}"' in page, value
        assert 'class="flash error"' in page and not spawned

    assert client.post("/new", data={"source": str(roots / "team" / "tool"),
                                     "csrf_token": token}).status_code == 302
    answer = client.post("/new", data={"source": str(roots / "team" / "tool"),
                                       "csrf_token": token})
    page = answer.data.decode()
    assert answer.status_code == 409
    assert ('id="error-name" role="alert">A Space named team/tool already exists — open it '
            "from the Spaces page (Update now is in its Settings), or type another owner/name "
            "in the Name field</p>") in page
    assert "appliance spaces" not in page and "--name" not in page


# -- adding never waits on the source's server -------------------------------------------------


def test_adding_a_space_from_a_hung_git_server_answers_at_once(box, spawned, silent_server):
    # A git timeout of an hour: if adding asked the server, the request would hang.
    box.extensions["appliance.config"].values["git_timeout"] = 3600
    source = f"http://127.0.0.1:{silent_server}/team/slow.git"
    client = logged_in(box, "mia")
    token = csrf_of(client.get("/new").data)
    answer = in_time(lambda: client.post("/new", data={"source": source, "csrf_token": token}))
    assert answer.status_code == 302 and answer.location.endswith("/spaces/team/slow/logs")
    assert spawned == [("team/slow", "deploy")]

    api = in_time(lambda: client.post("/api/v1/spaces", json={"source": source,
                                                               "name": "team/slow2"},
                                      headers={"X-CSRF-Token": token}))
    assert api.status_code == 202 and api.json["stage"] == stages.BUILDING
    assert spawned[-1] == ("team/slow2", "deploy")


def test_the_worker_says_the_git_server_did_not_answer_and_the_page_shows_the_fix(
        box, spawned, silent_server):
    source = f"http://127.0.0.1:{silent_server}/team/slow.git"
    ctx = box.config["ctx"]("session:mia")
    actions.add(ctx, source)
    view = jobs.run_job(ctx, "team/slow", "deploy")  # what the worker runs, git_timeout=2
    assert view["stage"] == stages.BUILD_ERROR
    assert view["error"].startswith("The git server at 127.0.0.1 did not answer within 2 s — "
                                    "check that the server is up")
    log = spaces.build_log_path(ctx, "team/slow").read_text()
    assert f"==> Fetching {source} (default branch)" in log
    assert "$ git clone" in log and "==> The git server at 127.0.0.1 did not answer" in log

    client = logged_in(box, "mia")
    page = client.get("/spaces/team/slow").data.decode()
    assert '<p class="error-what">The git server at 127.0.0.1 did not answer within 2 s</p>' \
        in page
    assert "<strong>How to fix it:</strong> check that the server is up" in page
    assert "Retry (rebuild)" in page
    stage = client.get("/spaces/team/slow/stage").json
    assert stage["stage"] == stages.BUILD_ERROR and not stage["busy"] and stage["settled"]
    assert "Retry (rebuild)" in stage["html"] and "did not answer within 2 s" in stage["html"]


# -- every state leads somewhere ---------------------------------------------------------------


def test_the_stage_endpoint_follows_a_build_to_the_app(box):
    put_space(box, "alice/fresh", stage=stages.BUILDING, manifest=None, title=None, sdk=None)
    client = logged_in(box, "admin")
    page = client.get("/spaces/alice/fresh/logs").data.decode()
    assert 'data-follow="1"' in page and 'data-where="logs"' in page
    assert 'data-poll="/spaces/alice/fresh/stage?where=logs"' in page
    stage = client.get("/spaces/alice/fresh/stage?where=logs").json
    assert (stage["stage"], stage["busy"], stage["serving"]) == (stages.BUILDING, True, False)
    assert stage["app"] == "/spaces/alice/fresh" and "Building…" in stage["html"]
    store = open_store(box.extensions["appliance.config"].db_path)
    store.move("alice/fresh", stages.BUILDING, stages.APP_STARTING, "test")
    assert client.get("/spaces/alice/fresh/stage").json["label"] == "starting"
    store.move("alice/fresh", stages.APP_STARTING, stages.RUNNING, "test")
    store.close()
    stage = client.get("/spaces/alice/fresh/stage").json
    assert stage["serving"] and not stage["busy"] and stage["label"] == "RUNNING".lower()
    assert app_frame(client.get("/spaces/alice/fresh").data.decode())


def app_frame(page: str) -> bool:
    return '<iframe class="app" id="app"' in page


def test_the_stage_endpoint_is_for_those_who_may_see_the_space(box):
    put_space(box, "alice/hidden", visibility="private")
    assert box.test_client().get("/spaces/alice/hidden/stage").status_code in (302, 401)
    assert box.test_client().get("/spaces/alice/nobody/stage").status_code == 404
    assert logged_in(box, "vic").get("/spaces/alice/hidden/stage").json["serving"]


def test_opening_a_sleeping_space_s_page_wakes_it_and_follows_it(box, spawned):
    put_space(box, "alice/napper", stage=stages.STOPPED, desired=sleep.SLEEPING,
              container=None)
    viewer = logged_in(box, "vic")  # whoever may open the app wakes it, as through its url
    page = viewer.get("/spaces/alice/napper").data.decode()
    assert spawned == [("alice/napper", "start")]
    assert "<h2>Waking up…</h2>" in page and 'data-follow="1"' in page
    ctx = box.config["ctx"]()
    assert ctx.store.get_space("alice/napper")["wake_requested_at"] is None
    assert [e["kind"] for e in ctx.store.events(limit=5)][0] == "wake"

    # While its worker runs, another visit or the scheduler's pass starts no second one.
    owner = subprocess.Popen(["sleep", "60"])
    try:
        ctx.store.update_space("alice/napper", worker_pid=owner.pid)
        page = viewer.get("/spaces/alice/napper").data.decode()
        assert "<h2>Waking up…</h2>" in page
        assert ctx.store.get_space("alice/napper")["wake_requested_at"]  # asked again...
        assert not sleep._take_wake_request(ctx, "alice/napper")  # ...but its worker owns it
        assert spawned == [("alice/napper", "start")]
        assert viewer.get("/spaces/alice/napper/stage").json["waking"]
    finally:
        owner.kill()
        owner.wait()
    ctx.store.update_space("alice/napper", desired="running", worker_pid=None)
    ctx.store.move("alice/napper", stages.STOPPED, stages.APP_STARTING, "test")
    ctx.store.move("alice/napper", stages.APP_STARTING, stages.RUNNING, "test")
    assert viewer.get("/spaces/alice/napper/stage").json["serving"]


def test_a_paused_or_stopped_space_is_not_woken_by_its_page(box, spawned):
    put_space(box, "alice/paused", stage=stages.PAUSED, desired="paused")
    put_space(box, "alice/stopped", stage=stages.STOPPED, desired="stopped")
    client = logged_in(box, "admin")
    assert "This Space is paused" in client.get("/spaces/alice/paused").data.decode()
    assert "This Space is stopped" in client.get("/spaces/alice/stopped").data.decode()
    assert spawned == []


def test_a_broken_space_shows_its_title_emoji_and_reason(box):
    roots = box.config["roots"]
    make_space_repo(roots / "team" / "broken", {
        "README.md": "---\ntitle: Broken Thing\nemoji: 🧨\ncolorFrom: red\ncolorTo: yellow\n"
                     "sdk: gradio\napp_file: missing.py\n---\n"})
    ctx = box.config["ctx"]("session:admin")
    actions.add(ctx, str(roots / "team" / "broken"))  # spawns nothing: run the job here
    view = jobs.run_job(ctx, "team/broken", "deploy")
    assert view["stage"] == stages.NO_APP_FILE
    assert (view["title"], view["emoji"]) == ("Broken Thing", "🧨")
    client = logged_in(box, "admin")
    page = client.get("/spaces/team/broken").data.decode()
    assert "<h1>Broken Thing</h1>" in page and "🧨" in page
    assert "no revisio" not in page and '<span class="rev">not built yet</span>' in page
    assert "This Space has an error: no app file" in page
    assert "App file &#39;missing.py&#39; (app_file) was not found in the repository" in page
    assert "<strong>How to fix it:</strong> Add the file, or set app_file" in page
    home = client.get("/").data.decode()
    card = home[home.rindex("<li", 0, home.index('data-space="team/broken"')):]
    card = card[:card.index("</li>")]
    assert "Broken Thing" in card and "🧨" in card and "· ?" not in card
    assert "--c-red" in card and '<p class="reason">no app file: App file' in card


def test_a_static_or_docker_space_gets_no_python_version_warning(tmp_path):
    from appliance.core.manifest import parse_manifest

    class Images:
        """The runtime seam for the image builds: base images for Python 3.11 only."""

        def list_images(self, repository):
            return [f"{repository}:3.11"]

        def image_id(self, tag):
            return "sha256:base"

        def image_exists(self, tag):
            return True

        def build(self, *args, **kwargs):
            pass

    config = load_config({}, data_dir=str(tmp_path / "data"))
    ctx = Context(config, open_store(config.db_path), Images(), "test")
    checkout = make_space_repo(tmp_path / "space", {"README.md": "x", "index.html": "hi",
                                                    "Dockerfile": "FROM scratch\n"})
    said: list[str] = []
    for sdk in ("static", "docker", "gradio"):
        manifest = parse_manifest(f"---\nsdk: {sdk}\npython_version: '3.10'\n---\n")
        if sdk == "gradio":
            break  # gradio reads packages (the index); its warning is checked by choose_python
        _, warnings, _ = spaces._build_images(ctx, "a/b", "0" * 40, checkout, manifest, False,
                                              said.append)
        assert warnings == [], sdk
    assert not [line for line in said if "python_version" in line], said
    from appliance.core import builds

    assert "python_version 3.10 is not available" in builds.choose_python("3.10", ["3.11"])[1]


# -- local folders ------------------------------------------------------------------------------


def test_a_local_folder_is_named_after_its_owner_and_name(box, spawned):
    roots = box.config["roots"]
    make_space_repo(roots / "team" / "tool", {"README.md": "---\nsdk: static\n---\n"})
    make_space_repo(roots / "solo", {"README.md": "---\nsdk: static\n---\n"})
    client = logged_in(box, "mia")
    page = client.get("/new").data.decode()
    assert f"<code>{roots}</code>" in page and f"<code>{roots}/OWNER/NAME</code>" in page
    token = csrf_of(page.encode())
    answer = client.post("/new", data={"source": str(roots / "team" / "tool"),
                                       "csrf_token": token})
    assert answer.location.endswith("/spaces/team/tool/logs")
    answer = client.post("/new", data={"source": str(roots / "solo"), "csrf_token": token})
    assert answer.location.endswith("/spaces/local/solo/logs")
    assert spawned == [("team/tool", "deploy"), ("local/solo", "deploy")]


def test_the_new_space_form_says_when_no_local_folder_is_allowed(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"), local_sources="")
    app = create_app(config)
    store = open_store(config.db_path)
    users.add_user(store, "admin", "admin", PASSWORD, "test")
    store.close()
    page = logged_in(app, "admin").get("/new").data.decode()
    assert "This box takes no local folders" in page


# -- accessible ----------------------------------------------------------------------------------


@pytest.mark.parametrize("color_from", sorted(pages.CARD_HEX))
@pytest.mark.parametrize("color_to", sorted(pages.CARD_HEX))
def test_card_and_header_text_reach_wcag_aa_on_every_gradient(color_from, color_to):
    paint = pages.card_paint(color_from, color_to)
    for stop in (paint["from"], paint["to"]):
        assert pages.contrast(paint["ink"], stop) >= 4.5, (color_from, color_to, paint)
    for stop in (paint["head_from"], paint["head_to"]):
        for text in (pages.DARK_INK, "#374151"):  # the title; the revision and tabs
            assert pages.contrast(text, stop) >= 4.5, (color_from, color_to, text, stop)


def test_contrast_matches_wcag_reference_values():
    assert round(pages.contrast("#000000", "#ffffff"), 1) == 21.0
    assert round(pages.contrast("#777777", "#ffffff"), 2) == 4.48


class Page(HTMLParser):
    """What the accessibility checks need from a page."""

    def __init__(self):
        super().__init__()
        self.h1 = 0
        self.skip = False
        self.icon = False
        self.controls: list[dict] = []
        self.label_for: set[str] = set()
        self.open_labels = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h1":
            self.h1 += 1
        if tag == "a" and a.get("class") == "skip" and a.get("href") == "#main":
            self.skip = True
        if tag == "link" and a.get("rel") == "icon":
            self.icon = True
        if tag == "label":
            self.open_labels += 1
            if a.get("for"):
                self.label_for.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append({**a, "in_label": self.open_labels > 0})

    def handle_endtag(self, tag):
        if tag == "label":
            self.open_labels -= 1


def test_every_page_has_an_h1_a_skip_link_an_icon_and_labelled_fields(box):
    put_space(box, "alice/demo")
    put_space(box, "alice/broke", stage=stages.BUILD_ERROR, error="It broke — fix it",
              manifest=None, title=None)
    client = logged_in(box, "admin")
    for path in ("/", "/new", "/system", "/gpus", "/account", "/spaces/alice/demo",
                 "/spaces/alice/demo/logs", "/spaces/alice/demo/settings",
                 "/spaces/alice/broke", "/spaces/alice/nobody", "/login"):
        answer = client.get(path)
        page = Page()
        page.feed(answer.data.decode())
        assert page.h1 >= 1, f"{path} has no h1"
        assert page.skip and page.icon, path
        for control in page.controls:
            assert (control.get("aria-label") or control["in_label"]
                    or control.get("id") in page.label_for), (path, control)
    favicon = client.get("/favicon.ico")
    assert favicon.status_code == 301 and favicon.location.endswith("/static/favicon.svg")
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml"
    assert box.test_client().get("/favicon.ico").status_code == 301  # logged out too


def test_focus_is_visible_on_every_control():
    css = (Path(pages.__file__).parent / "static" / "portal.css").read_text()
    assert re.search(r":focus-visible\s*\{[^}]*outline: 3px solid", css)
    assert "outline: none" not in css.replace("main:focus { outline: none; }", "")



def _wake_from_another_process(make_ctx, space_id: str, ready, go, out: str) -> None:
    ctx = make_ctx(f"process:{os.getpid()}")

    def spawn(ctx, space_id, job):
        # As jobs.spawn_job does: a worker process, which owns the Space from then on.
        worker = subprocess.Popen(["sleep", "60"], start_new_session=True)
        ctx.store.update_space(space_id, worker_pid=worker.pid)
        with open(out, "a") as log:
            log.write(f"{job} {worker.pid}\n")

    ready.wait(30)
    go.wait(30)
    sleep.wake(ctx, space_id, spawn=spawn)


def test_visits_from_many_processes_at_once_start_one_wake(box, tmp_path):
    """Portal workers and the scheduler each see the request; one of them starts the Space."""
    import multiprocessing

    put_space(box, "alice/crowd", stage=stages.STOPPED, desired=sleep.SLEEPING, container=None)
    fork = multiprocessing.get_context("fork")
    ready, go = fork.Barrier(7), fork.Event()
    out = tmp_path / "spawned.txt"
    children = [fork.Process(target=_wake_from_another_process,
                             args=(box.config["ctx"], "alice/crowd", ready, go, str(out)))
                for _ in range(6)]
    for child in children:
        child.start()
    ready.wait(30)
    go.set()
    for child in children:
        child.join(60)
    started = [line.split() for line in out.read_text().splitlines()]
    for _, pid in started:
        os.kill(int(pid), 9)
    assert [child.exitcode for child in children] == [0] * 6
    assert [job for job, _ in started] == ["start"]
    events = box.config["ctx"]().store.events("alice/crowd", limit=20)
    assert [e["kind"] for e in events].count("wake") == 1


def test_update_from_a_silent_git_server_answers_in_bounded_time_and_says_why(
        box, spawned, silent_server):
    """Update asks the git server whether there is anything new while the request waits:
    bounded (here by the box's git_timeout, 2 s; at most 20 s), with the reason on the page."""
    put_space(box, "alice/stuck", source=f"http://127.0.0.1:{silent_server}/alice/stuck.git",
              source_display=f"http://127.0.0.1:{silent_server}/alice/stuck.git")
    client = logged_in(box, "admin")
    token = csrf_of(client.get("/spaces/alice/stuck/settings").data)
    answer = in_time(lambda: client.post("/spaces/alice/stuck/actions/update",
                                         data={"csrf_token": token, "from": "settings"}))
    assert answer.status_code == 302
    page = client.get("/spaces/alice/stuck/settings").data.decode()
    assert "Update failed: The git server at 127.0.0.1 did not answer within 2 s" in page
    assert spawned == []
    assert box.config["ctx"]().store.get_space("alice/stuck")["stage"] == stages.RUNNING
