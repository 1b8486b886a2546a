"""Docker Spaces run as uid 1000, as Hugging Face runs them, not as root: whatever the
Dockerfile's USER, the app's processes are 1000, /data is theirs to write (a volume written
by an earlier root-run container included), and an app that counted on root says why it
failed."""

from __future__ import annotations

import pytest
import requests
from conftest import as_service, make_space_repo

from appliance import stages
from appliance.core import spaces

pytestmark = pytest.mark.podman

README = "---\nsdk: docker\napp_port: 8000\n---\n"
# No user 1000 in the image, no USER line: the image would run as root.
AS_ROOT_IMAGE = """FROM localhost/appliance-python:3.11
CMD ["sh", "-c", "id -u > /data/uid-of-app && cat /data/old >> /data/uid-of-app && \\
python3 -m http.server 8000 --directory /data"]
"""
WRITES_TO_ROOTS_FOLDER = """FROM localhost/appliance-python:3.11
WORKDIR /srv
CMD ["sh", "-c", "echo started > /srv/state.txt && python3 -m http.server 8000"]
"""


def test_a_docker_space_runs_as_uid_1000_and_owns_its_data(appliance_env):
    ctx, sources_dir = appliance_env
    space_id = "uid/docker"
    # A /data volume written by root, as containers of docker Spaces were before.
    volume = spaces.data_volume(space_id)
    as_service("podman", "volume", "create", volume)
    as_service("podman", "run", "--rm", "-v", f"{volume}:/data",
               "localhost/appliance-python:3.11", "sh", "-c", "echo written-by-root > /data/old")
    try:
        repo = make_space_repo(sources_dir / "uid-docker", {"README.md": README,
                                                            "Dockerfile": AS_ROOT_IMAGE})
        spaces.add_space(ctx, str(repo), name=space_id)
        view = spaces.deploy(ctx, space_id)
        assert view["stage"] == stages.RUNNING, view["error"]
        # The app itself ran as 1000, and could read and write /data.
        assert requests.get(view["url"] + "uid-of-app", timeout=5).text == (
            "1000\nwritten-by-root\n")
        container = ctx.store.get_space(space_id)["container"]
        assert as_service("podman", "exec", container, "id", "-u").stdout.strip() == "1000"
        assert as_service("podman", "exec", container, "stat", "-c", "%u",
                          "/data", "/data/old").stdout.split() == ["1000", "1000"]
        as_service("podman", "exec", container, "sh", "-c", "echo more >> /data/old")
        # Every process of the container, the init included, is 1000: nothing left as root.
        uids = as_service("podman", "exec", container, "ps", "-eo", "uid=").stdout.split()
        assert len(uids) >= 3 and set(uids) == {"1000"}, uids
    finally:
        spaces.delete(ctx, space_id)
    assert volume not in as_service("podman", "volume", "ls", "--format", "{{.Name}}").stdout


def test_a_docker_space_that_needs_root_says_it_runs_as_user_1000(appliance_env):
    ctx, sources_dir = appliance_env
    space_id = "uid/needs-root"
    repo = make_space_repo(sources_dir / "uid-needs-root", {
        "README.md": README, "Dockerfile": WRITES_TO_ROOTS_FOLDER})
    try:
        spaces.add_space(ctx, str(repo), name=space_id)
        view = spaces.deploy(ctx, space_id)
        assert view["stage"] == stages.RUNTIME_ERROR
        first, note, *rest = view["error"].splitlines()
        assert first == "The app exited (code 2) before answering on port 8000"  # sh: cannot create
        assert note == (
            "Docker Spaces run as user 1000 (uid 1000), as on Hugging Face, not as root: create "
            "that user and give it what the app writes (RUN useradd -m -u 1000 user, USER "
            "user, WORKDIR /home/user/app, COPY --chown=user . .); /data is writable by it")
        assert "Permission denied" in "\n".join(rest)
    finally:
        spaces.delete(ctx, space_id)
