"""Rollback to any kept revision: images_keep images per Space stay, older ones go."""

from __future__ import annotations

import pytest
import requests
from conftest import commit, make_space_repo

from appliance import stages
from appliance.core import spaces
from appliance.errors import InvalidInput, NotFound

pytestmark = pytest.mark.podman


def test_the_newest_images_stay_for_rollback_to_any_of_them(appliance_env):
    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / "keep", {"README.md": "---\nsdk: static\n---\n",
                                                  "index.html": "v1"})
    space_id = "keep/many"
    spaces.add_space(ctx, str(repo), name=space_id)
    shas = [spaces.deploy(ctx, space_id)["revision"]]
    for number in (2, 3, 4):
        commit(repo, {"index.html": f"v{number}"}, f"v{number}")
        spaces.request_update(ctx, space_id)
        view = spaces.deploy(ctx, space_id)
        assert view["stage"] == stages.RUNNING, view["error"]
        shas.append(view["revision"])
    tags = [tag for tags in ctx.runtime.images_of(space_id).values() for tag in tags]
    kept = sorted(sha[:12] for sha in shas if any(tag.endswith(":" + sha[:12]) for tag in tags))
    assert kept == sorted(sha[:12] for sha in shas[1:]), "images_keep=3: v2, v3, v4"

    view = spaces.rollback(ctx, space_id, shas[1][:8])  # v2, two revisions back
    assert view["stage"] == stages.RUNNING and view["revision"] == shas[1]
    assert requests.get(view["url"], timeout=5).text == "v2"
    assert view["previous_revision"] == shas[3]
    with pytest.raises(NotFound, match="keeps no single image of revision") as refused:
        spaces.rollback(ctx, space_id, shas[0][:8])  # v1's image is gone
    assert shas[2][:12] in refused.value.hint
    with pytest.raises(InvalidInput, match="at least 7 hex digits"):
        spaces.rollback(ctx, space_id, "v2")
    view = spaces.rollback(ctx, space_id)  # back to where it was
    assert requests.get(view["url"], timeout=5).text == "v4"
    spaces.delete(ctx, space_id)
