"""Tests for reading a Space's README front matter (appliance.manifest)."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.core.manifest import (
    Manifest,
    check_app_file,
    load_manifest,
    parse_manifest,
    split_front_matter,
)
from appliance.errors import ManifestError


def readme(front_matter: str, body: str = "# My Space\n") -> str:
    return f"---\n{front_matter}---\n{body}"


def config_error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    assert caught.value.stage == "CONFIG_ERROR"
    return caught.value


def make_checkout(tmp_path, front_matter: str, files=("app.py",)):
    checkout = tmp_path / "space"
    checkout.mkdir()
    (checkout / "README.md").write_text(readme(front_matter), encoding="utf-8")
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("print('hi')\n")
    return checkout


# Defaults


@pytest.mark.parametrize(
    ("sdk", "app_file", "port"),
    [
        ("gradio", "app.py", 7860),
        ("streamlit", "app.py", 8501),
        ("static", "index.html", 7860),
        ("docker", None, 7860),
    ],
)
def test_defaults_for_each_sdk(sdk, app_file, port):
    manifest = parse_manifest(readme(f"sdk: {sdk}\n"))
    assert manifest.sdk == sdk
    assert manifest.app_file == app_file
    assert manifest.container_port == port
    assert manifest.app_port == 7860
    assert manifest.python_version == "3.10"
    assert manifest.sdk_version is None
    assert manifest.base_path == "/"
    assert manifest.header == "default"
    assert manifest.startup_duration_timeout == 1800
    assert manifest.full_width is manifest.pinned is manifest.hf_oauth is False
    assert manifest.disable_embedding is False
    assert manifest.tags == manifest.models == manifest.datasets == []
    assert manifest.custom_headers == {}
    assert manifest.extra == {}


def test_docker_container_port_follows_app_port():
    manifest = parse_manifest(readme("sdk: docker\napp_port: 8080\n"))
    assert manifest.app_port == 8080
    assert manifest.container_port == 8080
    assert manifest.warnings == ()


def test_app_port_on_gradio_is_ignored_with_a_warning():
    manifest = parse_manifest(readme("sdk: gradio\nsdk_version: 5.9.1\napp_port: 8080\n"))
    assert manifest.container_port == 7860
    assert manifest.warnings == ("app_port is ignored for gradio Spaces (they listen on 7860)",)


def test_missing_sdk_version_is_none_with_a_warning():
    manifest = parse_manifest(readme("sdk: gradio\n"))
    assert manifest.sdk_version is None
    assert manifest.warnings == ("sdk_version missing; the newest gradio will be installed",)


def test_docker_without_sdk_version_has_no_warning():
    assert parse_manifest(readme("sdk: docker\n")).warnings == ()


# Every documented key

FULL_FRONT_MATTER = """\
title: Demo Space
emoji: 🤗
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: 5.9.1
python_version: 3.11
app_file: src/main.py
app_port: 7861
base_path: /editor
fullWidth: true
header: mini
short_description: Does a demo
models:
  - openai-community/gpt2
  - google/gemma-2b
datasets: mozilla-foundation/common_voice_13_0
tags: [demo, "3d"]
thumbnail: https://example.com/thumb.png
pinned: yes
license: apache-2.0
hf_oauth: true
hf_oauth_scopes:
  - read-repos
  - inference-api
hf_oauth_expiration_minutes: 480
hf_oauth_authorized_org: my-org
suggested_hardware: t4-small
suggested_storage: small
disable_embedding: true
startup_duration_timeout: 1h
custom_headers:
  cross-origin-embedder-policy: require-corp
  cross-origin-opener-policy: same-origin
  cross-origin-resource-policy: cross-origin
preload_from_hub:
  - warp-ai/wuerstchen-prior text_encoder/model.safetensors
"""


def test_every_documented_key_is_parsed():
    manifest = parse_manifest(readme(FULL_FRONT_MATTER))
    assert manifest == Manifest(
        sdk="gradio",
        sdk_version="5.9.1",
        python_version="3.11",
        app_file="src/main.py",
        app_port=7861,
        base_path="/editor",
        title="Demo Space",
        emoji="🤗",
        color_from="blue",
        color_to="green",
        full_width=True,
        header="mini",
        short_description="Does a demo",
        models=["openai-community/gpt2", "google/gemma-2b"],
        datasets=["mozilla-foundation/common_voice_13_0"],
        tags=["demo", "3d"],
        thumbnail="https://example.com/thumb.png",
        pinned=True,
        license="apache-2.0",
        hf_oauth=True,
        hf_oauth_scopes=["read-repos", "inference-api"],
        hf_oauth_expiration_minutes=480,
        hf_oauth_authorized_org=["my-org"],
        suggested_hardware="t4-small",
        suggested_storage="small",
        disable_embedding=True,
        startup_duration_timeout=3600,
        custom_headers={
            "cross-origin-embedder-policy": "require-corp",
            "cross-origin-opener-policy": "same-origin",
            "cross-origin-resource-policy": "cross-origin",
        },
        preload_from_hub=["warp-ai/wuerstchen-prior text_encoder/model.safetensors"],
        warnings=("app_port is ignored for gradio Spaces (they listen on 7860)",),
    )


def test_to_dict_uses_hugging_face_key_names_and_round_trips():
    manifest = parse_manifest(readme(FULL_FRONT_MATTER + "my_custom_key: {a: [1, 2]}\n"))
    data = manifest.to_dict()
    assert data["colorFrom"] == "blue"
    assert data["colorTo"] == "green"
    assert data["fullWidth"] is True
    assert data["my_custom_key"] == {"a": [1, 2]}
    assert "color_from" not in data and "warnings" not in data
    again = parse_manifest(readme(yaml.safe_dump(data, allow_unicode=True)))
    assert again == manifest


def test_to_dict_is_json_serialisable_with_dates_in_unknown_keys():
    manifest = parse_manifest(readme("sdk: static\nreleased: 2024-05-01\n"))
    assert json.loads(json.dumps(manifest.to_dict()))["released"] == "2024-05-01"


# Versions


@pytest.mark.parametrize(
    ("written", "expected"),
    [("3.10", "3.10"), ("3.9", "3.9"), ('"3.11"', "3.11"), ("'3.12'", "3.12"), ("3", "3")],
)
def test_python_version_keeps_the_text_the_author_wrote(written, expected):
    manifest = parse_manifest(readme(f"sdk: gradio\npython_version: {written}\n"))
    assert manifest.python_version == expected


def test_python_version_float_310_becomes_string_310():
    assert parse_manifest(readme("sdk: gradio\npython_version: 3.10\n")).python_version == "3.10"


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("4.0", "4.0"),
        ("3.40", "3.40"),
        ("5", "5"),
        ("5.9.1", "5.9.1"),
        ('"4.44.1"', "4.44.1"),
        ("5.0.0b1", "5.0.0b1"),
        ("1.38.0rc2", "1.38.0rc2"),
        ("1.2.3.post1", "1.2.3.post1"),
    ],
)
def test_sdk_version_keeps_the_text_the_author_wrote(written, expected):
    manifest = parse_manifest(readme(f"sdk: gradio\nsdk_version: {written}\n"))
    assert manifest.sdk_version == expected
    assert manifest.warnings == ()


def test_sdk_version_from_a_merge_key_keeps_its_text():
    text = readme("base: &base {python_version: 3.10}\n<<: *base\nsdk: gradio\n")
    assert parse_manifest(text).python_version == "3.10"


@pytest.mark.parametrize(
    "written", ["latest; rm -rf /", "'5.0 --index-url http://evil'", "'>=4'", "true", "[5]"]
)
def test_sdk_version_that_is_not_a_version_is_refused(written):
    error = config_error(readme(f"sdk: gradio\nsdk_version: {written}\n"))
    assert error.message.startswith("Key 'sdk_version' must be a version such as '5.9.1', got ")


def test_python_version_that_is_not_a_version_is_refused():
    error = config_error(readme("sdk: gradio\npython_version: 3.10-slim\n"))
    assert error.message == "Key 'python_version' must be a version such as '3.10', got '3.10-slim'"


# Front matter shape


def test_crlf_bom_comments_and_trailing_spaces_are_tolerated():
    text = (
        "\ufeff---  \r\n# a comment\r\ntitle: Hi   # trailing comment\r\n"
        "sdk: streamlit\r\nsdk_version: 1.38.0\r\n---\t\r\nBody text\r\n"
    )
    manifest = parse_manifest(text)
    assert (manifest.sdk, manifest.title, manifest.sdk_version) == ("streamlit", "Hi", "1.38.0")


def test_leading_blank_lines_before_the_front_matter_are_tolerated():
    assert parse_manifest("\n\n" + readme("sdk: docker\n")).sdk == "docker"


def test_split_front_matter_returns_yaml_and_body():
    assert split_front_matter("---\nsdk: gradio\n---\n# Title\n") == ("sdk: gradio\n", "# Title\n")


def test_split_front_matter_without_front_matter_returns_none_and_the_text():
    assert split_front_matter("# Title\n") == (None, "# Title\n")


def test_a_body_line_of_dashes_does_not_end_the_front_matter_early():
    _yaml, body = split_front_matter("---\nsdk: gradio\n---\ntext\n---\nmore\n")
    assert body == "text\n---\nmore\n"


# Error paths, each with the message the user sees


def test_readme_without_front_matter_is_a_config_error():
    error = config_error("# Just a title\n")
    assert error.message == (
        "README.md has no YAML front matter (a block between '---' lines at the top)"
    )


def test_front_matter_without_closing_fence_is_a_config_error():
    error = config_error("---\nsdk: gradio\n# Title\n")
    assert error.message == "README.md front matter has no closing '---' line"


def test_missing_sdk_is_a_config_error_listing_valid_sdks():
    error = config_error(readme("title: No SDK\n"))
    assert error.message == "Key 'sdk' is missing from the README front matter"
    assert "gradio, streamlit, docker, static" in error.hint


def test_empty_front_matter_reports_missing_sdk():
    assert "Key 'sdk' is missing" in config_error("---\n---\n").message


def test_unknown_sdk_is_a_config_error_listing_valid_sdks():
    error = config_error(readme("sdk: flask\n"))
    assert (
        error.message == "Key 'sdk' must be one of gradio, streamlit, docker, static, got 'flask'"
    )


def test_invalid_yaml_reports_the_readme_line_and_column():
    error = config_error(readme("sdk: gradio\ntitle: a: b\n"))
    assert error.message == (
        "README.md front matter is not valid YAML: mapping values are not allowed here "
        "(line 3, column 9)"
    )


def test_impossible_date_reports_where_it_is():
    error = config_error(readme("sdk: gradio\nreleased: 2024-13-45\n"))
    assert "cannot read this value (month must be in 1..12) (line 3, column 11)" in error.message


def test_front_matter_that_is_a_list_is_a_config_error():
    error = config_error(readme("- sdk: gradio\n"))
    assert error.message == (
        "README.md front matter must be a YAML mapping of keys to values, got a list"
    )


def test_front_matter_that_is_a_plain_string_is_a_config_error():
    error = config_error(readme("just some words\n"))
    assert error.message.endswith("got 'just some words'")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("app_port: abc", "Key 'app_port' must be an integer between 1 and 65535, got 'abc'"),
        ("app_port: 70000", "Key 'app_port' must be an integer between 1 and 65535, got 70000"),
        ("app_port: true", "Key 'app_port' must be an integer between 1 and 65535, got True"),
        ("header: big", "Key 'header' must be one of default, mini, got 'big'"),
        ("base_path: editor", "Key 'base_path' must be a URL path starting with '/', got 'editor'"),
        ("pinned: maybe", "Key 'pinned' must be true or false, got 'maybe'"),
        ("fullWidth: 2", "Key 'fullWidth' must be true or false, got 2"),
        ("title: [a, b]", "Key 'title' must be a string, got a list"),
        ("tags: {a: b}", "Key 'tags' must be a list of strings, got a mapping"),
        ("models: [[x]]", "Key 'models' must be a list of strings, got an item that is a list"),
        (
            "startup_duration_timeout: soon",
            "Key 'startup_duration_timeout' must be a duration such as '30m', '1h' or '90s', "
            "got 'soon'",
        ),
        (
            "startup_duration_timeout: 0",
            "Key 'startup_duration_timeout' must be a duration such as '30m', '1h' or '90s', got 0",
        ),
        (
            "hf_oauth_expiration_minutes: 50000",
            "Key 'hf_oauth_expiration_minutes' must be an integer between 1 and 43200, got 50000",
        ),
        (
            "custom_headers: [a]",
            "Key 'custom_headers' must be a mapping of header names to values, got a list",
        ),
        (
            "custom_headers: {'bad name': x}",
            "Key 'custom_headers' has an invalid header name 'bad name'",
        ),
        (
            'custom_headers: {x-a: "v\\r\\nSet-Cookie: a=b"}',
            "Key 'custom_headers' has a line break or NUL in header 'x-a'",
        ),
        (
            "custom_headers: {x-a: [v]}",
            "Key 'custom_headers' must map 'x-a' to a string, got a list",
        ),
    ],
)
def test_invalid_value_is_a_config_error_naming_the_key(line, message):
    assert config_error(readme(f"sdk: docker\n{line}\n")).message == message


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("30m", 1800), ("1h", 3600), ("90s", 90), ("1h30m", 5400), ("600", 600), ("45", 45)],
)
def test_startup_duration_timeout_is_read_as_seconds(written, seconds):
    text = readme(f"sdk: docker\nstartup_duration_timeout: {written}\n")
    assert parse_manifest(text).startup_duration_timeout == seconds


@pytest.mark.parametrize(
    ("written", "expected"),
    [("yes", True), ("no", False), ("'yes'", True), ("'False'", False), ("true", True)],
)
def test_bool_keys_accept_yes_no_true_false(written, expected):
    assert parse_manifest(readme(f"sdk: docker\nhf_oauth: {written}\n")).hf_oauth is expected


def test_list_keys_accept_a_single_string():
    manifest = parse_manifest(readme("sdk: docker\ntags: demo\nmodels: org/model\n"))
    assert (manifest.tags, manifest.models) == (["demo"], ["org/model"])


def test_unknown_keys_are_kept_in_extra():
    manifest = parse_manifest(readme("sdk: docker\nmy_key: [1, two]\nnested: {a: null}\n"))
    assert manifest.extra == {"my_key": [1, "two"], "nested": {"a": None}}
    assert manifest.to_dict()["my_key"] == [1, "two"]


def test_recursive_alias_in_an_unknown_key_is_a_config_error():
    error = config_error(readme("sdk: docker\nloop: &a [*a]\n"))
    assert error.message == (
        "Key 'loop' is too large or nested too deeply (recursive YAML aliases?)"
    )


def test_alias_bomb_is_a_config_error():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 9)]
    error = config_error(readme("sdk: docker\n" + "\n".join(lines) + "\n"))
    assert "is too large or nested too deeply" in error.message


def test_deeply_nested_yaml_is_a_config_error():
    error = config_error(readme("sdk: docker\nx: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert error.message.startswith("README.md front matter")


def test_integer_too_large_to_print_is_a_config_error():
    error = config_error(readme("sdk: docker\ntitle: 0x" + "F" * 5000 + "\n"))
    assert error.message.startswith(
        "README.md front matter is not valid YAML: this integer is too large (line 3, column 8)"
    )


def test_overlong_digit_string_for_app_port_is_a_config_error():
    error = config_error(readme(f"sdk: docker\napp_port: '{'9' * 5000}'\n"))
    assert error.message.startswith("Key 'app_port' must be an integer between 1 and 65535")


def test_readme_with_invalid_utf8_is_read_with_replacement_characters(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: docker\n", files=())
    (checkout / "README.md").write_bytes(b"---\nsdk: docker\ntitle: caf\xe9\n---\n")
    assert load_manifest(checkout).title == "caf\ufffd"


# app_file containment


@pytest.mark.parametrize(
    ("app_file", "problem"),
    [
        ("../outside.py", "must not contain '..' (it must stay inside the repository)"),
        ("src/../../x.py", "must not contain '..' (it must stay inside the repository)"),
        ("/etc/passwd", "must be a path relative to the repository, not an absolute path"),
        ("'src\\\\app.py'", "must not contain backslashes or control characters"),
        ("'app\\0.py'", None),
        ("''", "must not be empty"),
    ],
)
def test_app_file_outside_the_checkout_is_a_config_error(app_file, problem):
    error = config_error(readme(f'sdk: gradio\napp_file: "{app_file.strip(chr(39))}"\n'))
    assert error.message.startswith("Key 'app_file' ")
    if problem:
        assert problem in error.message


def test_app_file_that_is_not_a_string_is_a_config_error():
    error = config_error(readme("sdk: gradio\napp_file: [a.py]\n"))
    assert error.message == "Key 'app_file' must be a path, got a list"


def test_load_manifest_reads_the_readme_and_checks_the_app_file(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: gradio\nsdk_version: 5.9.1\n")
    assert load_manifest(checkout).app_file == "app.py"


def test_missing_app_file_is_no_app_file(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: gradio\napp_file: main.py\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.stage == "NO_APP_FILE"
    assert caught.value.message == "App file 'main.py' (app_file) was not found in the repository"
    assert "set app_file in README.md" in caught.value.hint


def test_static_space_needs_index_html(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: static\n", files=())
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.stage == "NO_APP_FILE"
    assert "'index.html'" in caught.value.message


def test_docker_space_without_app_file_is_not_checked(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: docker\n", files=())
    assert load_manifest(checkout).app_file is None


def test_app_file_symlink_leading_outside_the_checkout_is_no_app_file(tmp_path):
    secret = tmp_path / "secret.py"
    secret.write_text("x = 1\n")
    checkout = make_checkout(tmp_path, "sdk: gradio\n", files=())
    os.symlink(secret, checkout / "app.py")
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.stage == "NO_APP_FILE"
    assert caught.value.message == (
        "App file 'app.py' (app_file) is a symlink that leads outside the repository"
    )


def test_app_file_under_a_symlinked_directory_outside_is_no_app_file(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "app.py").write_text("x = 1\n")
    checkout = make_checkout(tmp_path, "sdk: gradio\napp_file: src/app.py\n", files=())
    os.symlink(outside, checkout / "src")
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.stage == "NO_APP_FILE"
    assert "leads outside the repository" in caught.value.message


def test_app_file_symlink_inside_the_checkout_is_accepted(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: gradio\n", files=("real.py",))
    os.symlink("real.py", checkout / "app.py")
    assert load_manifest(checkout).app_file == "app.py"


def test_app_file_that_is_a_directory_is_no_app_file(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: gradio\n", files=())
    (checkout / "app.py").mkdir()
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.stage == "NO_APP_FILE"
    assert caught.value.message == "App file 'app.py' (app_file) is not a regular file"


def test_app_file_symlink_loop_is_no_app_file(tmp_path):
    checkout = make_checkout(tmp_path, "sdk: gradio\n", files=())
    os.symlink("app.py", checkout / "app.py")
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.stage == "NO_APP_FILE"


def test_check_app_file_refuses_an_escaping_path_on_a_hand_built_manifest(tmp_path):
    with pytest.raises(ManifestError) as caught:
        check_app_file(tmp_path, Manifest(sdk="gradio", app_file="../x.py"))
    assert caught.value.message.startswith("Key 'app_file' must not contain '..'")


def test_checkout_without_readme_is_a_config_error(tmp_path):
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path)
    assert caught.value.stage == "CONFIG_ERROR"
    assert caught.value.message == "The repository has no README.md"


def test_readme_symlink_leading_outside_the_checkout_is_a_config_error(tmp_path):
    outside = tmp_path / "elsewhere.md"
    outside.write_text(readme("sdk: docker\nsecret: hunter2\n"))
    checkout = tmp_path / "space"
    checkout.mkdir()
    os.symlink(outside, checkout / "README.md")
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.message == "README.md is a symlink that leads outside the repository"


# Property: arbitrary input raises nothing but ManifestError

KNOWN_KEYS = [
    "sdk", "sdk_version", "python_version", "app_file", "app_port", "base_path", "title",
    "emoji", "colorFrom", "colorTo", "fullWidth", "header", "short_description", "models",
    "datasets", "tags", "thumbnail", "pinned", "license", "hf_oauth", "hf_oauth_scopes",
    "hf_oauth_expiration_minutes", "hf_oauth_authorized_org", "suggested_hardware",
    "suggested_storage", "disable_embedding", "startup_duration_timeout", "custom_headers",
    "preload_from_hub",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.integers(min_value=1, max_value=65535),
    st.sampled_from(["gradio", "docker", "3.10", "5.9.1", "1h", "/x", "mini", "yes", "app.py"]),
)
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4),
    ),
    max_leaves=12,
)
documents = st.builds(
    lambda sdk, rest: rest if sdk is None else {**rest, "sdk": sdk},
    st.one_of(st.none(), st.sampled_from(["gradio", "streamlit", "docker", "static"])),
    st.dictionaries(
        st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10)), yaml_values, max_size=8
    ),
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_or_refuse(text: str) -> Manifest | None:
    try:
        manifest = parse_manifest(text)
    except ManifestError as error:
        assert error.stage == "CONFIG_ERROR"
        assert error.message
        return None
    json.dumps(manifest.to_dict())
    return manifest


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_manifest_error(text):
    parse_or_refuse(text)


@FAST
@given(st.text(alphabet=st.sampled_from("-:\n \t#'\"[]{}&*!|>?,.%@`\\0123abc\r"), max_size=200))
def test_arbitrary_yaml_ish_text_in_fences_raises_only_manifest_error(text):
    parse_or_refuse(f"---\nsdk: gradio\n{text}\n---\n")


@FAST
@given(documents)
def test_arbitrary_yaml_documents_raise_only_manifest_error(document):
    manifest = parse_or_refuse(readme(yaml.safe_dump(document, allow_unicode=True)))
    if manifest is not None and not _has_nan(manifest.to_dict()):
        rendered = yaml.safe_dump(manifest.to_dict(), allow_unicode=True)
        assert parse_manifest(readme(rendered)).to_dict() == manifest.to_dict()


@FAST
@given(st.sampled_from(["gradio", "streamlit", "docker", "static"]), st.sampled_from(KNOWN_KEYS),
       yaml_values)  # fmt: skip
def test_random_values_for_known_keys_raise_only_manifest_error(sdk, key, value):
    document = {"sdk": sdk, key: value} if key != "sdk" else {"sdk": value}
    parse_or_refuse(readme(yaml.safe_dump(document, allow_unicode=True)))


def _has_nan(value) -> bool:
    if isinstance(value, dict):
        return any(_has_nan(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_nan(item) for item in value)
    return isinstance(value, float) and math.isnan(value)


def test_manifest_stored_as_json_round_trips_with_emoji_and_versions():
    import json

    original = parse_manifest(
        "---\ntitle: Hi\nemoji: 👋\nsdk: gradio\nsdk_version: 5.9.1\npython_version: 3.10\n"
        "custom_key: {nested: [1, 2]}\n---\n")
    stored = json.dumps(original.to_dict(), ensure_ascii=False)
    again = parse_manifest("---\n" + stored + "\n---\n")
    assert again.to_dict() == original.to_dict()
    assert again.emoji == "👋" and again.python_version == "3.10"


@pytest.mark.parametrize("shape", ["never closed", "closed at the end", "one long line"])
def test_a_ten_megabyte_readme_is_too_large_not_unclosed(tmp_path, shape):
    checkout = tmp_path / "space"
    checkout.mkdir()
    (checkout / "app.py").write_text("print('hi')\n")
    ten_mb = 10 * 2**20
    head = "---\nsdk: gradio\n"
    body = {"never closed": "tags: [x]\n" * (ten_mb // 10),
            "closed at the end": "tags: [x]\n" * (ten_mb // 10) + "---\n# body\n",
            "one long line": "title: " + "x" * ten_mb + "\n"}[shape]
    (checkout / "README.md").write_text(head + body)
    assert (checkout / "README.md").stat().st_size > ten_mb
    with pytest.raises(ManifestError) as caught:
        load_manifest(checkout)
    assert caught.value.message == (
        "README.md front matter is too large: it does not end within the first 1 MiB of the file"
    )
    assert "closing" not in caught.value.message
    assert caught.value.hint == (
        "Keep the YAML block at the top of README.md short and end it with a '---' line")
    assert caught.value.stage == "CONFIG_ERROR"
