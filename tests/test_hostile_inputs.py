"""Hostile input from issue 11: oversized values are refused before any pattern runs, the
patterns that see user input run in linear time, and ?next= never leads off the portal.

Timings here are liveness bounds, not benchmarks: each states the figure expected on any
machine and asserts ten times it, so only a quadratic (or worse) path can fail them."""

# ruff: noqa: F811 - tests take the app fixture imported from test_web as their argument
from __future__ import annotations

import re
import time

import pytest
from test_web import PASSWORD, app, csrf_of, token_for  # noqa: F401 - the app fixture

from appliance.config import load_config
from appliance.core import manifest, sources
from appliance.core.manifest import load_manifest
from appliance.errors import InvalidInput, ManifestError, SourceError

HUGE = 200_000
# Shapes that made a backtracking pattern quadratic: long runs of the characters a pattern's
# repeated part accepts, ended by one it does not.
HOSTILE_TEXTS = [
    "a" * HUGE,
    "a" * HUGE + "!",
    "1a" * (HUGE // 2) + "!",
    "a." * (HUGE // 2) + "-",
    "a-" * (HUGE // 2) + ":",
    "1" + "-pre" * (HUGE // 4) + "+",
    " " * HUGE + "x",
    "a://" + "x" * HUGE,
    "remote branch " * (HUGE // 14),
]


# -- oversized values -------------------------------------------------------------------------


def test_huge_source_is_refused_by_the_api_quickly_naming_the_limit(app):
    started = time.monotonic()
    response = app.test_client().post("/api/v1/spaces", json={"source": "a" * HUGE},
                                         headers=token_for(app, "mia", "write"))
    elapsed = time.monotonic() - started
    assert response.status_code == 400
    assert response.json["error"] == (
        f"Source is {HUGE} characters long, over the 4096-character limit"
    )
    # Liveness bound: refusing takes well under 0.2 s; 120 KB used to freeze the portal 15 s.
    assert elapsed < 2


def test_source_at_the_limit_is_parsed_and_one_past_it_refused():
    config = load_config({}, data_dir="/nonexistent")
    with pytest.raises(SourceError) as caught:
        sources.parse_source("a" * sources.MAX_SOURCE_LENGTH, config)
    assert caught.value.message == f"Not a Space source: {'a' * 4096!r}"
    with pytest.raises(InvalidInput) as caught:
        sources.parse_source("a" * 4097, config)
    assert caught.value.message == "Source is 4097 characters long, over the 4096-character limit"


def test_source_that_is_not_text_is_refused():
    config = load_config({}, data_dir="/nonexistent")
    with pytest.raises(InvalidInput) as caught:
        sources.parse_source(["hf://spaces/a/b"], config)
    assert caught.value.message == "A Space source must be text, got list"


def test_huge_revision_and_space_id_are_refused_naming_the_limit():
    with pytest.raises(InvalidInput) as caught:
        sources.validate_revision("a" * 256)
    assert caught.value.message == (
        "Invalid revision: 256 characters long, over the 255-character limit"
    )
    assert sources.validate_revision("a" * 255) == "a" * 255
    with pytest.raises(InvalidInput) as caught:
        sources.validate_space_id("a" * HUGE + "/b")
    assert caught.value.message == (
        f"Invalid Space id: {HUGE + 2} characters long, over the 193-character limit"
    )
    assert sources.validate_space_id("a" * 96 + "/" + "b" * 96) == "a" * 96 + "/" + "b" * 96


def test_huge_revision_and_name_are_refused_by_the_api(app):
    client, headers = app.test_client(), token_for(app, "mia", "write")
    for field, message in (("revision", "Invalid revision: 100000 characters long"),
                           ("name", "Invalid Space id: 100000 characters long")):
        response = client.post("/api/v1/spaces", headers=headers,
                               json={"source": "https://example.invalid/o/n", field: "x" * 100_000})
        assert response.status_code == 400 and response.json["error"].startswith(message)


def test_readme_whose_front_matter_runs_past_the_read_limit_is_too_large(tmp_path):
    checkout = tmp_path / "space"
    checkout.mkdir()
    (checkout / "app.py").write_text("print('hi')\n")
    (checkout / "README.md").write_text("---\nsdk: gradio\n" + "tags: [x]\n" * 120_000)
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.message == (
        "README.md front matter is too large: it does not end within the first 1 MiB of the file"
    )
    assert caught.value.stage == "CONFIG_ERROR"


def test_readme_larger_than_the_read_limit_with_short_front_matter_still_loads(tmp_path):
    checkout = tmp_path / "space"
    checkout.mkdir()
    (checkout / "app.py").write_text("print('hi')\n")
    (checkout / "README.md").write_text("---\nsdk: gradio\n---\n" + "body line\n" * 200_000)
    assert load_manifest(checkout).sdk == "gradio"


def test_short_readme_without_closing_fence_still_says_so(tmp_path):
    checkout = tmp_path / "space"
    checkout.mkdir()
    (checkout / "README.md").write_text("---\nsdk: gradio\n# Title\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.message == "README.md front matter has no closing '---' line"


# -- linear-time patterns ---------------------------------------------------------------------


def test_redacting_a_huge_line_is_linear_and_still_drops_credentials():
    for text in HOSTILE_TEXTS:
        started = time.monotonic()
        assert sources._redact(text) == text
        # Liveness bound: each takes well under 0.2 s (the old regex took 0.7 s at 20 KB).
        assert time.monotonic() - started < 2, text[:20]
    assert sources._redact("see https://user:tok@host/x and ssh://git@h:22/a, 1://u@x") == (
        "see https://host/x and ssh://h:22/a, 1://u@x"
    )


def _patterns(module) -> dict[str, re.Pattern]:
    return {name: value for name, value in vars(module).items() if isinstance(value, re.Pattern)}


@pytest.mark.parametrize("module", [sources, manifest], ids=["sources", "manifest"])
def test_every_pattern_runs_in_linear_time_on_hostile_text(module):
    patterns = _patterns(module)
    assert len(patterns) >= 6  # the walk found the module's patterns
    failure_patterns = [re.compile(p) for p, *_ in getattr(module, "_FAILURES", {}).values() if p]
    for text in HOSTILE_TEXTS:
        started = time.monotonic()
        for pattern in patterns.values():
            pattern.match(text)
            pattern.fullmatch(text)
        for pattern in [module.__dict__.get("_BAD_REV"), *failure_patterns]:
            if pattern is not None:
                pattern.search(text)
        # Liveness bound: all of them together take well under 0.2 s on 200 KB.
        assert time.monotonic() - started < 2, text[:20]


# -- ?next= after login -----------------------------------------------------------------------


def post_login(app, next_value: str, in_query: bool = False):
    client = app.test_client()
    form = {"username": "admin", "password": PASSWORD,
            "csrf_token": csrf_of(client.get("/login").data)}
    if in_query:
        return client.post("/login", query_string={"next": next_value}, data=form)
    return client.post("/login", data={**form, "next": next_value})


HOSTILE_NEXT = [
    "/%09/evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\n/evil.example",
    "//evil.example",
    "/\\evil.example",
    "/\\/evil.example",
    "/%5C/evil.example",
    "/%2F/evil.example",
    "https://evil.example",
    "/%0d%0aSet-Cookie:x=y",
    "/\r\nSet-Cookie:x=y",
    "javascript:alert(1)",
    "/\x00/evil.example",
    "/\x7f/evil.example",
]


@pytest.mark.parametrize("next_value", HOSTILE_NEXT)
@pytest.mark.parametrize("in_query", [False, True], ids=["form", "query"])
def test_login_never_follows_next_off_the_portal(app, next_value, in_query):
    response = post_login(app, next_value, in_query)
    assert response.status_code == 302
    assert response.location == "/"
    assert "Set-Cookie:x" not in str(response.headers)


def test_login_keeps_a_next_within_the_portal(app):
    response = post_login(app, "/spaces/alice/x?tab=logs")
    assert response.status_code == 302 and response.location == "/spaces/alice/x?tab=logs"
    response = post_login(app, "/spaces/alice/x?tab=logs", in_query=True)
    assert response.status_code == 302 and response.location == "/spaces/alice/x?tab=logs"


@pytest.mark.parametrize("next_value", ["/\n/evil.example", "/%0d%0aSet-Cookie:x=y"])
def test_login_page_with_a_hostile_next_renders_with_home_as_next(app, next_value):
    response = app.test_client().get("/login", query_string={"next": next_value})
    assert response.status_code == 200
    assert b'name="next" value="/"' in response.data
