"""Messages a person sees when a command cannot do what was asked (real Podman, real CLI)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import make_space_repo

from appliance import stages
from appliance.cli.main import cli
from appliance.core import spaces

pytestmark = pytest.mark.podman


def run(ctx, *args):
    return CliRunner().invoke(cli, list(args), obj={"ctx": ctx, "config": ctx.config})


def test_commands_on_a_space_that_cannot_do_it_yet_say_why_and_what_to_do(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "msgs", {"README.md": "---\nsdk: static\n---\n",
                                                  "index.html": "hi"})
    spaces.add_space(ctx, str(repo), name="msg/space")  # recorded, never built

    result = run(ctx, "spaces", "logs", "msg/space", "--build")
    assert result.exit_code == 1
    assert "Error: Space msg/space has no build log yet" in result.output

    result = run(ctx, "spaces", "logs", "msg/space")
    assert result.exit_code == 1
    assert "Error: Space msg/space has no running app (BUILDING)" in result.output
    assert "Hint: see the build log: appliance spaces logs msg/space --build" in result.output

    ctx.store.move("msg/space", stages.BUILDING, stages.BUILD_ERROR, "test", worker_pid=None)
    result = run(ctx, "spaces", "restart", "msg/space")
    assert result.exit_code == 1
    assert "Error: Space msg/space has no built image to restart" in result.output
    assert "Hint: rebuild it with 'appliance spaces restart msg/space --factory'" in result.output

    result = run(ctx, "spaces", "rollback", "msg/space")
    assert result.exit_code == 1
    assert "Error: Space msg/space has no earlier revision to roll back to" in result.output
    spaces.delete(ctx, "msg/space")


def test_loading_a_file_that_is_not_an_image_archive_is_refused(appliance_env, tmp_path):
    ctx, _ = appliance_env
    bogus = tmp_path / "not-an-image.tar"
    bogus.write_text("this is not a tarball\n")
    result = run(ctx, "images", "load", str(bogus))
    assert result.exit_code == 2
    assert f"Error: {bogus} is not an image archive Podman can load" in result.output
    assert "Hint: make it with 'podman save -o FILE IMAGE'" in result.output
