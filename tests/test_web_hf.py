"""The Hugging Face compatible API, driven by the real huggingface_hub.HfApi against the real
portal under gunicorn (`appliance serve`): reads, permissions, secrets, variables, sleep time,
hardware, logs and errors on Space rows written here; restart, pause and factory rebuild of
one static Space on real Podman.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import requests
from conftest import make_space_repo, portal
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    BadRequestError,
    HfHubHTTPError,
    RepositoryNotFoundError,
)

from appliance import stages, users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core import jobs, spaces
from appliance.web.hf import hardware_request

SECRET = "s3cr3t-value-never-shown-4711"
PASSWORD = "correct horse battery"



def space_row(space_id: str, port: int, stage: str, **extra) -> dict:
    return {"id": space_id, "source": f"https://example.org/{space_id}",
            "source_display": f"https://example.org/{space_id}", "stage": stage, "port": port,
            "hardware": "cpu", "desired": "running", "created_by": "token:alice", **extra}


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A data dir with users, tokens and Space rows (no containers), served by gunicorn."""
    root = tmp_path_factory.mktemp("hf")
    config = load_config({}, data_dir=str(root / "data"), public_host="box.lan")
    store = open_store(config.db_path)
    users.add_user(store, "alice", "admin", PASSWORD, "test")
    users.add_user(store, "bob", "member", PASSWORD, "test")
    users.add_user(store, "vera", "viewer", PASSWORD, "test")
    tokens = {
        "write": users.create_token(store, "ci", "alice", "write", "test")[1],
        "read": users.create_token(store, "ro", "alice", "read", "test")[1],
        "member": users.create_token(store, "bob", "bob", "write", "test")[1],
        "viewer": users.create_token(store, "vera", "vera", "write", "test")[1],
    }
    manifest = {"title": "Demo", "sdk": "gradio", "sdk_version": "5.0.0", "emoji": "🚀",
                "app_file": "app.py", "tags": ["demo"], "models": ["org/model"]}
    store.insert_space(space_row(
        "alice/demo", 17901, stages.RUNNING, sdk="gradio", title="Demo", revision="a" * 40,
        container="alice-demo-fake", backend_port=17950, manifest=json.dumps(manifest),
        sleep_after=7200, error=f"app said: token={SECRET}"), "test")
    store.insert_space(space_row("alice/napper", 17902, stages.STOPPED, desired="sleeping",
                                 sdk="static"), "test")
    store.insert_space(space_row("alice/hidden", 17903, stages.PAUSED, desired="paused",
                                 visibility="private"), "test")
    store.insert_space(space_row("alice/fresh", 17904, stages.BUILD_ERROR), "test")
    log_path = root / "data" / "logs" / "demo-build.log"
    log_path.parent.mkdir(parents=True)
    # An older build log written before the secret was set: it holds the value in clear.
    log_path.write_text(f"==> Fetching demo\nStep 1/3: FROM base\necho {SECRET}\n==> done\n")
    build_id = store.start_build("alice/demo", False, log_path)
    store.finish_build(build_id, "succeeded", revision="a" * 40)
    store.close()
    with portal(config, root / "portal.log") as endpoint:
        yield endpoint, tokens, config
    assert "Traceback" not in (root / "portal.log").read_text()


def api(box, who: str | None) -> HfApi:
    endpoint, tokens, _ = box
    return HfApi(endpoint=endpoint, token=tokens[who] if who else False)


def raw(box, method: str, path: str, who: str | None = None, **kwargs) -> requests.Response:
    endpoint, tokens, _ = box
    headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
    return requests.request(method, endpoint + path, headers=headers, timeout=10, **kwargs)


# -- reading ----------------------------------------------------------------------------------


def test_space_info_reads_the_space_as_huggingface_hub_expects(box):
    info = api(box, "read").space_info("alice/demo")
    assert (info.id, info.author, info.sha, info.sdk) == ("alice/demo", "alice", "a" * 40,
                                                          "gradio")
    assert info.private is False and info.host == "http://box.lan:17901"
    assert info.card_data.title == "Demo" and info.card_data.sdk_version == "5.0.0"
    assert info.tags == ["gradio", "demo"] and info.models == ["org/model"]
    assert info.created_at.year >= 2024 and info.last_modified >= info.created_at
    assert info.runtime.stage == "RUNNING" and info.runtime.hardware == "cpu-basic"
    assert info.runtime.sleep_time == 7200


def test_space_info_at_the_serving_revision_and_not_at_another(box):
    assert api(box, "read").space_info("alice/demo", revision="a" * 40).sha == "a" * 40
    with pytest.raises(HfHubHTTPError) as caught:
        api(box, "read").space_info("alice/demo", revision="b" * 40)
    assert f"Space alice/demo serves {'a' * 40}, not {'b' * 40}" in str(caught.value)


def test_runtime_maps_stages_hardware_and_sleep(box):
    runtime = api(box, None).get_space_runtime("alice/demo")
    assert runtime.stage == "RUNNING"
    assert (runtime.hardware, runtime.requested_hardware) == ("cpu-basic", "cpu-basic")
    assert runtime.raw["domains"] == [{"domain": "box.lan:17901", "stage": "READY"}]
    asleep = api(box, None).get_space_runtime("alice/napper")
    assert asleep.stage == "SLEEPING"  # stopped by the sleep timer: a request wakes it
    assert (asleep.hardware, asleep.requested_hardware) == (None, "cpu-basic")
    assert api(box, "read").get_space_runtime("alice/hidden").stage == "PAUSED"


def test_missing_space_is_repository_not_found_with_our_message(box):
    with pytest.raises(RepositoryNotFoundError) as caught:
        api(box, "read").space_info("alice/nope")
    assert "No Space named alice/nope" in str(caught.value)
    assert caught.value.response.status_code == 404
    assert not api(box, "read").repo_exists("alice/nope", repo_type="space")
    assert api(box, "read").repo_exists("alice/demo", repo_type="space")


def test_private_space_needs_a_login_to_be_seen(box):
    with pytest.raises(HfHubHTTPError) as caught:
        api(box, None).space_info("alice/hidden")
    assert caught.value.response.status_code == 401
    assert "Log in to see Space alice/hidden" in str(caught.value)
    assert api(box, "read").space_info("alice/hidden").private is True


def test_error_envelope_carries_message_hint_and_status(box):
    response = raw(box, "POST", "/api/spaces/alice/demo/restart")
    assert response.status_code == 401
    body = response.json()
    assert body["ok"] is False and body["status"] == 401
    assert body["error"] == "Log in (or send an API token) to do this"
    assert body["hint"] == "appliance tokens create NAME --user USER --scope write"
    assert raw(box, "GET", "/api/spaces/alice/nope").headers["X-Error-Code"] == "RepoNotFound"


# -- who may do what --------------------------------------------------------------------------


def test_whoami_names_the_tokens_user_and_its_power(box):
    me = api(box, "write").whoami()
    assert (me["name"], me["type"], me["auth"]["accessToken"]["role"]) == ("alice", "user",
                                                                          "write")
    assert api(box, "read").whoami()["auth"]["accessToken"]["role"] == "read"
    assert api(box, "viewer").whoami()["auth"]["accessToken"]["role"] == "read"
    assert raw(box, "GET", "/api/whoami-v2").json()["error"] == \
        "Send an API token to see who you are"
    endpoint, _, _ = box
    with pytest.raises(HfHubHTTPError) as caught:
        HfApi(endpoint=endpoint, token="apl_not-a-real-token").whoami()
    assert caught.value.response.status_code == 401
    assert "The API token is not valid" in caught.value.response.json()["error"]


def test_read_token_reads_but_may_not_restart_or_add_secrets(box):
    reader = api(box, "read")
    assert reader.get_space_runtime("alice/demo").stage == "RUNNING"
    for call in (lambda: reader.restart_space("alice/demo"),
                 lambda: reader.add_space_secret("alice/demo", "KEY", SECRET),
                 lambda: reader.pause_space("alice/demo"),
                 lambda: reader.set_space_sleep_time("alice/demo", 3600)):
        with pytest.raises(HfHubHTTPError) as caught:
            call()
        assert caught.value.response.status_code == 403
        assert "This token is read-only: it cannot change Spaces" in str(caught.value)
    assert raw(box, "GET", "/api/spaces/alice/demo/secrets", "read").json() == {}


def test_anonymous_callers_may_not_change_anything(box):
    anonymous = api(box, None)
    for call in (lambda: anonymous.restart_space("alice/demo", factory_reboot=True),
                 lambda: anonymous.add_space_secret("alice/demo", "KEY", SECRET),
                 lambda: anonymous.add_space_variable("alice/demo", "KEY", "v"),
                 lambda: anonymous.request_space_hardware("alice/demo", "t4-small")):
        with pytest.raises(HfHubHTTPError) as caught:
            call()
        assert caught.value.response.status_code == 401
        assert "Log in (or send an API token) to do this" in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        anonymous.get_space_variables("alice/demo")
    assert caught.value.response.status_code == 401


def test_viewers_and_other_members_may_not_change_alices_space(box):
    with pytest.raises(HfHubHTTPError) as caught:
        api(box, "viewer").restart_space("alice/demo")
    assert "vera is a viewer and may not change Spaces" in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        api(box, "member").add_space_variable("alice/demo", "K", "v")
    assert caught.value.response.status_code == 403
    assert "Only an admin or the member who added alice/demo may change it" in \
        str(caught.value)


def test_a_portal_login_cannot_change_spaces_through_this_api(box):
    """A browser's cookie rides along on any site's form post; only tokens may change here."""
    endpoint, _, _ = box
    browser = requests.Session()
    page = browser.get(f"{endpoint}/login", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    browser.post(f"{endpoint}/login", timeout=10, data={
        "username": "alice", "password": PASSWORD, "csrf_token": csrf})
    assert browser.get(f"{endpoint}/api/whoami-v2", timeout=10).json()["name"] == "alice"
    refused = browser.post(f"{endpoint}/api/spaces/alice/demo/pause", timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"] == \
        "The Hugging Face API takes an API token, not the portal's login"
    assert api(box, "read").get_space_runtime("alice/demo").stage == "RUNNING"


# -- secrets and variables --------------------------------------------------------------------


def test_secret_values_never_come_back(box):
    writer = api(box, "write")
    writer.add_space_secret("alice/demo", "API_KEY", SECRET, description="ignored")
    secrets = writer.get_space_secrets("alice/demo")
    assert list(secrets) == ["API_KEY"] and secrets["API_KEY"].updated_at is not None
    paths = ["/api/spaces/alice/demo", "/api/spaces/alice/demo/runtime",
             "/api/spaces/alice/demo/secrets", "/api/spaces/alice/demo/variables",
             "/api/whoami-v2", "/api/spaces/alice/demo/logs/build"]
    for path in paths:
        response = raw(box, "GET", path, "write")
        assert response.status_code == 200, (path, response.text)
        assert SECRET not in response.text, path
    runtime = writer.get_space_runtime("alice/demo")
    assert runtime.raw["errorMessage"] == "app said: token=***"
    build = list(writer.fetch_space_logs("alice/demo", build=True))
    assert "echo ***\n" in build
    added = raw(box, "POST", "/api/spaces/alice/demo/secrets", "write",
                json={"key": "OTHER", "value": SECRET})
    assert added.status_code == 200 and SECRET not in added.text
    writer.delete_space_secret("alice/demo", "OTHER")
    assert list(writer.get_space_secrets("alice/demo")) == ["API_KEY"]


def test_variables_round_trip(box):
    writer = api(box, "write")
    answer = writer.add_space_variable("alice/demo", "MODEL_REPO", "org/model")
    assert answer["MODEL_REPO"].value == "org/model"
    writer.add_space_variable("alice/demo", "TEMPERATURE", "0.7")
    listed = api(box, "read").get_space_variables("alice/demo")
    assert {k: v.value for k, v in listed.items()} == {"MODEL_REPO": "org/model",
                                                       "TEMPERATURE": "0.7"}
    assert listed["TEMPERATURE"].updated_at is not None
    left = writer.delete_space_variable("alice/demo", "TEMPERATURE")
    assert list(left) == ["MODEL_REPO"]
    writer.delete_space_variable("alice/demo", "MODEL_REPO")


def test_bad_keys_and_missing_keys_say_what_is_wrong(box):
    writer = api(box, "write")
    with pytest.raises(BadRequestError) as caught:
        writer.add_space_variable("alice/demo", "1BAD", "v")
    assert "Variable name '1BAD' is not valid" in str(caught.value)
    assert "use letters, digits and _ (not starting with a digit)" in str(caught.value)
    with pytest.raises(BadRequestError) as caught:
        writer.add_space_secret("alice/demo", "SPACE_ID", "x")
    assert "SPACE_ID is set by the appliance itself" in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        writer.delete_space_secret("alice/demo", "NEVER_SET")
    assert caught.value.response.status_code == 404
    assert "Space alice/demo has no secret named NEVER_SET" in str(caught.value)


# -- sleep time and hardware ------------------------------------------------------------------


def test_sleep_time_sets_seconds_and_minus_one_means_never(box):
    writer = api(box, "write")
    with pytest.warns(UserWarning):  # huggingface_hub warns about cpu-basic; here it works
        assert writer.set_space_sleep_time("alice/napper", 3600).sleep_time == 3600
    with pytest.warns(UserWarning):
        assert writer.set_space_sleep_time("alice/napper", -1).sleep_time is None
    with pytest.raises(BadRequestError) as caught:
        writer.set_space_sleep_time("alice/napper", 30)
    assert "Sleep time must be at least 60 seconds, got 30" in str(caught.value)


def test_hardware_flavors_map_to_this_boxs_requests(box):
    assert [hardware_request(f) for f in ("cpu-basic", "CPU-Upgrade", "t4-small", "a10g-small",
                                          "a10g-largex2", "l4x4", "a100x8", "shared:8g")] == \
        ["cpu", "cpu", "gpu", "gpu", "gpu:2", "gpu:4", "gpu:8", "shared:8g"]
    writer = api(box, "write")
    runtime = writer.request_space_hardware("alice/fresh", "cpu-upgrade", sleep_time=7200)
    assert (runtime.requested_hardware, runtime.sleep_time) == ("cpu-basic", 7200)
    with pytest.raises(BadRequestError) as caught:
        writer.request_space_hardware("alice/fresh", "quantum-xl")
    assert "Hardware 'quantum-xl' is not a hardware request" in str(caught.value)
    assert "cpu" in str(caught.value) and "shared:" in str(caught.value)  # the forms it takes


def test_gpu_flavor_on_a_box_without_that_gpu_is_refused_with_the_reason(box):
    with pytest.raises(HfHubHTTPError) as caught:
        api(box, "write").request_space_hardware("alice/fresh", "t4-small")
    assert caught.value.response.status_code == 409
    assert "Hardware gpu is not available" in str(caught.value)
    assert api(box, "read").get_space_runtime("alice/fresh").requested_hardware == "cpu-basic"


# -- logs and actions without a container -----------------------------------------------------


def test_build_log_comes_as_server_sent_events(box):
    response = raw(box, "GET", "/api/spaces/alice/demo/logs/build", "read")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    assert [e["data"] for e in events][:2] == ["==> Fetching demo\n", "Step 1/3: FROM base\n"]
    assert all(e["timestamp"].endswith("Z") for e in events)
    lines = list(api(box, None).fetch_space_logs("alice/demo", build=True))
    assert lines[0] == "==> Fetching demo\n" and lines[-1] == "==> done\n"


def test_logs_that_do_not_exist_say_why(box):
    with pytest.raises(HfHubHTTPError) as caught:
        list(api(box, "read").fetch_space_logs("alice/fresh", build=True))
    assert "Space alice/fresh has no build log yet" in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        list(api(box, "read").fetch_space_logs("alice/fresh"))
    assert caught.value.response.status_code == 409
    assert "Space alice/fresh has no running app (BUILD_ERROR)" in str(caught.value)


def test_restart_without_an_image_says_to_rebuild(box):
    with pytest.raises(HfHubHTTPError) as caught:
        api(box, "write").restart_space("alice/fresh")
    assert caught.value.response.status_code == 409
    assert "Space alice/fresh has no built image to restart" in str(caught.value)


# -- the real thing: one static Space on Podman -----------------------------------------------


def poll_stage(hf: HfApi, space_id: str, wanted: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    stage = None
    while time.monotonic() < deadline:
        stage = hf.get_space_runtime(space_id).stage
        if stage == wanted:
            return
        time.sleep(0.5)
    raise AssertionError(f"{space_id} is {stage}, not {wanted}, after {timeout} s")


@pytest.mark.podman
def test_restart_pause_factory_and_logs_on_real_podman(appliance_env, tmp_path):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "hfdemo", {"README.md": "---\nsdk: static\n---\n",
                                                   "index.html": "hello from hfdemo"})
    spaces.add_space(ctx, str(repo), name="zz/hfdemo")
    view = jobs.run_job(ctx, "zz/hfdemo", "deploy")
    assert view["stage"] == stages.RUNNING, view["error"]
    assert requests.get(view["url"], timeout=5).text == "hello from hfdemo"
    users.add_user(ctx.store, "admin", "admin", PASSWORD, "test")
    _, token = users.create_token(ctx.store, "hf", "admin", "write", "test")
    with portal(ctx.config, tmp_path / "portal.log") as endpoint:
        hf = HfApi(endpoint=endpoint, token=token)
        assert hf.get_space_runtime("zz/hfdemo").stage == "RUNNING"
        assert any(line.startswith("==> Building") for line in
                   hf.fetch_space_logs("zz/hfdemo", build=True))
        requests.get(view["url"] + "before-marker", timeout=5)
        run = list(hf.fetch_space_logs("zz/hfdemo"))
        assert any('"GET / HTTP/1.1" 200' in line for line in run), run
        assert len([line for line in run if "before-marker" in line]) == 1, run
        followed = follow_until(hf, "zz/hfdemo", "followed-marker",
                                lambda: requests.get(view["url"] + "followed-marker", timeout=5))
        # The tail once, then only what came since: the 404's error line and request line.
        assert followed[:len(run)] == run
        assert len(followed) - len(run) <= 2, followed
        assert "followed-marker" in followed[-1]
        assert len([line for line in followed if "before-marker" in line]) == 1, followed

        first = ctx.store.get_space("zz/hfdemo")["container"]
        assert hf.restart_space("zz/hfdemo").stage in ("RUNNING", "RUNNING_APP_STARTING")
        poll_until(lambda: ctx.store.get_space("zz/hfdemo")["container"] not in (None, first))
        poll_stage(hf, "zz/hfdemo", "RUNNING")

        paused = hf.pause_space("zz/hfdemo")
        assert (paused.stage, paused.hardware) == ("PAUSED", None)
        assert ctx.store.get_space("zz/hfdemo")["desired"] == "paused"
        assert hf.restart_space("zz/hfdemo").stage in ("PAUSED", "APP_STARTING")
        poll_stage(hf, "zz/hfdemo", "RUNNING")
        assert ctx.store.get_space("zz/hfdemo")["desired"] == "running"

        builds_before = ctx.store.latest_build("zz/hfdemo")["id"]
        assert hf.restart_space("zz/hfdemo", factory_reboot=True).stage == "RUNNING_BUILDING"
        poll_stage(hf, "zz/hfdemo", "RUNNING")
        latest = ctx.store.latest_build("zz/hfdemo")
        assert latest["id"] > builds_before and latest["factory"] == 1
        assert latest["status"] == "succeeded"
        assert requests.get(hf.space_info("zz/hfdemo").host + "/", timeout=5).text == \
            "hello from hfdemo"
    spaces.delete(ctx, "zz/hfdemo")
    assert "Traceback" not in (tmp_path / "portal.log").read_text()


def follow_until(hf: HfApi, space_id: str, marker: str, make_line) -> list[str]:
    """Follow the run log until a line holding marker arrives (make_line causes it)."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in hf.fetch_space_logs(space_id, follow=True):
            lines.append(line)
            if marker in line:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    poll_until(lambda: lines)  # the tail has come: the stream is open
    make_line()
    assert done.wait(30), f"no line with {marker!r} in {lines}"
    return lines


def poll_until(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)
