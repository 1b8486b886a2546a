"""A prune never removes images while a build runs: a build failed with Podman's "checking if
cached image exists from a previous build: getting top layer info: layer not known" while the
hourly prune ran on the same storage. Builds (in any process) hold the image store shared, a
prune takes it alone or leaves its images for the next pass; a build that meets the error all
the same (an image removed by other means) is tried once more, and its log says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
from conftest import labelled, wait_for

from appliance.adapters.runtime import Runtime
from appliance.config import SETTINGS, load_config
from appliance.errors import BuildFailed
from appliance.upkeep import housekeeping

LOST = ("checking if cached image exists from a previous build: getting top layer info: "
        "layer not known")
IMAGE_ID = "ab" * 32

# -- the lock itself, across threads ----------------------------------------------------------


def test_a_prune_cannot_take_the_image_store_while_a_build_holds_it(tmp_path):
    runtime = Runtime(load_config({}, data_dir=str(tmp_path), podman_autostart=False))
    building, release, done = threading.Event(), threading.Event(), threading.Event()

    def build():
        with runtime.images_in_use():
            building.set()
            release.wait(30)
        done.set()

    worker = threading.Thread(target=build)
    worker.start()
    try:
        assert building.wait(30)
        with runtime.images_in_use():  # a second build shares it
            with runtime.images_alone() as alone:
                assert alone is False
    finally:
        release.set()
        worker.join(30)
    assert done.is_set()
    with runtime.images_alone() as alone:
        assert alone is True


# -- the retry, with a stand-in for Podman's answer -------------------------------------------


class Response:
    status_code = 200

    def __init__(self, lines: list[dict]):
        self.lines = [json.dumps(line).encode() for line in lines]

    def iter_lines(self):
        return iter(self.lines)

    def close(self) -> None:
        pass


class Api:
    """Answers each /build with the next of the given streams, as Podman 4.3's API does."""

    def __init__(self, answers: list[list[dict]]):
        self.answers = answers
        self.calls = 0

    def post(self, path: str, **kwargs) -> Response:
        assert path == "/build"
        self.calls += 1
        return Response(self.answers[self.calls - 1])


class Client:
    def __init__(self, answers: list[list[dict]]):
        self.api = Api(answers)


def stand_in(tmp_path, answers: list[list[dict]]) -> Runtime:
    runtime = Runtime(load_config({}, data_dir=str(tmp_path), podman_autostart=False))
    runtime._client = Client(answers)
    return runtime


def build(runtime: Runtime, log: list[str]) -> str:
    return runtime.build({"Containerfile": b"FROM scratch\n"}, "Containerfile", "x:1", {}, {},
                         {}, False, log.append, 60)


def test_a_build_that_meets_a_lost_layer_is_tried_once_more_and_says_so(tmp_path):
    runtime = stand_in(tmp_path, [
        [{"stream": "STEP 1/2: FROM scratch\n"}, {"error": LOST}],
        [{"stream": "STEP 1/2: FROM scratch\n"}, {"stream": IMAGE_ID + "\n"}],
    ])
    log: list[str] = []
    assert build(runtime, log) == IMAGE_ID
    assert runtime.client.api.calls == 2
    assert log[1:3] == [LOST, (
        f"==> Podman lost a layer this build was reading ({LOST}): an image was removed "
        "meanwhile; building once more")]


def test_a_lost_layer_twice_fails_the_build_with_podmans_message(tmp_path):
    runtime = stand_in(tmp_path, [[{"error": LOST}], [{"error": LOST}], [{"error": LOST}]])
    with pytest.raises(BuildFailed) as caught:
        build(runtime, [])
    assert caught.value.message == LOST
    assert runtime.client.api.calls == 2  # once more, not in a loop


def test_only_a_lost_layer_is_tried_again(tmp_path):
    failure = "building at STEP \"RUN false\": while running runtime: exit status 1"
    runtime = stand_in(tmp_path, [[{"error": failure}], [{"stream": IMAGE_ID + "\n"}]])
    with pytest.raises(BuildFailed) as caught:
        build(runtime, [])
    assert caught.value.message == failure
    assert runtime.client.api.calls == 1  # a broken Containerfile fails once, at once
    runtime = stand_in(tmp_path, [[{"error": LOST}], [{"stream": IMAGE_ID + "\n"}]])
    assert build(runtime, []) == IMAGE_ID


# -- a build in another process and the scheduler's prune, on the real Podman -----------------

BUILD = """
import sys
from appliance.adapters.runtime import Runtime
from appliance.config import load_config
config = load_config()
image = Runtime(config).build(
    {"Containerfile": sys.argv[1].encode()}, "Containerfile", sys.argv[2],
    {"appliance.space": sys.argv[3], "appliance.instance": config.instance_id}, {}, {},
    False, lambda line: print(line, flush=True), 300)
print("built", image, flush=True)
"""


@pytest.mark.podman
def test_a_prune_while_another_process_builds_leaves_images_for_the_next_pass(appliance_env):
    ctx, _ = appliance_env
    # Space ids of this run only: another run's leftovers (another data dir, another instance,
    # which this prune rightly leaves alone) carry other ids.
    run = uuid.uuid4().hex[:8]
    ghost_id, building_id = f"race/ghost-{run}", f"race/building-{run}"
    ghost = ctx.runtime.build(
        {"Containerfile": f"FROM localhost/appliance-python:3.11\nLABEL run={uuid.uuid4()}\n"
         .encode()}, "Containerfile", f"localhost/space-race-ghost:{run}",
        {"appliance.space": ghost_id, "appliance.instance": ctx.config.instance_id},
        {}, {}, False, lambda line: None, 300)
    assert labelled("image", ghost_id)  # an image whose Space is gone: the prune's to take
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(ctx.config.values[s.name])
                            for s in SETTINGS}}
    marker = uuid.uuid4().hex  # never from the layer cache of an earlier run
    # A step long enough for the prune below (which takes no time: it does not wait) to run
    # inside it.
    containerfile = (f"FROM localhost/appliance-python:3.11\n"
                     f"RUN echo 'step runs {marker}' && sleep 20\n")
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILD, containerfile, f"localhost/space-race-building:{run}",
         building_id],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(builder.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(f"step runs {marker}" in line for line in lines), 120,
                 "the build's step to run")
        report = housekeeping.prune_once(ctx)
        assert builder.poll() is None, lines  # the build was still running throughout
        assert labelled("image", ghost_id)  # still there while the build runs
        assert report.removed_images == [] and report.errors == []
        assert report.deferred == ["images: a build is under way; the next pass prunes them"]
    finally:
        builder.wait(180)
        reader.join(10)
    assert builder.returncode == 0 and lines[-1].startswith("built "), lines
    after = housekeeping.prune_once(ctx)
    assert after.deferred == [] and after.errors == []
    assert ghost in after.removed_images and labelled("image", ghost_id) == []
    assert labelled("image", building_id) == []  # its Space does not exist either


def test_a_switch_leaves_its_old_images_while_a_build_holds_the_store(tmp_path):
    """The images a switch frees go at once only when no build runs (a build's layer cache
    may read them); otherwise the hourly prune takes them."""
    from appliance.core import spaces

    class Recording(Runtime):
        removed: list[str] = []

        def images_of(self, space_id):
            return {"old-image-id": ["localhost/appliance-space/team--a:old"]}

        def remove_image(self, name, force=False):
            self.removed.append(name)

    class Store:
        def get_space(self, space_id):
            return {"id": space_id, "image": "localhost/appliance-space/team--a:new",
                    "revision": "b" * 40, "previous_image": None, "previous_revision": None}

        def built_revisions(self, space_id, limit):
            return []

    runtime = Recording(load_config({}, data_dir=str(tmp_path), podman_autostart=False))
    ctx = type("Ctx", (), {"runtime": runtime, "store": Store(), "config": runtime.config})()
    with runtime.images_in_use():
        spaces._prune_images(ctx, "team/a")
    assert runtime.removed == []
    spaces._prune_images(ctx, "team/a")
    assert runtime.removed == ["old-image-id"]
