"""Tests for turning a Space checkout into build plans, and for build logs (appliance.builds)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import load_config
from appliance.core import builds, packages
from appliance.core.builds import (
    BuildLog,
    Locked,
    build_env,
    choose_python,
    dockerfile_bases,
    explain_failure,
    image_repository,
    sdk_image_plan,
    space_image_plan,
)
from appliance.core.manifest import Manifest, parse_manifest
from appliance.core.packages import Pin
from appliance.errors import BuildFailed, InvalidInput

SDK_IMAGE = "localhost/appliance-sdk:gradio-5.9.1-py3.11-0123abcd"
BASE_IMAGE = "localhost/appliance-python:3.11"
REVISION = "0123456789abcdef0123456789abcdef01234567"
CA_MOUNT = "--mount=type=secret,id=cacert,mode=0444"
# What podman accepts as a repository (lower-case path) and as a tag.
REPOSITORY = re.compile(r"[a-z0-9][a-z0-9._/-]*")
TAG = re.compile(r"[\w][\w.-]{0,127}")


def manifest(front_matter: str) -> Manifest:
    return parse_manifest(f"---\n{front_matter}\n---\n")


def config(**overrides):
    """A config with no CA bundle (the host's default may be absent) unless one is given."""
    return load_config({}, **{"build_ca_bundle": "", **overrides})


def checkout(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "checkout"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


def space_plan(tmp_path, front_matter, files, variables=None, secrets=None, cfg=None):
    return space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, files), manifest(front_matter), SDK_IMAGE,
        variables or {}, secrets or {}, cfg or config(),
    )


def containerfile_lines(plan) -> list[str]:
    return plan.context[plan.containerfile].decode().splitlines()


def cmd(lines: list[str]) -> list[str]:
    assert lines[-2].startswith("CMD ") and lines[-1].startswith("LABEL ")
    return json.loads(lines[-2].removeprefix("CMD "))


def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "corporate-ca.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return path


def pin(name: str, version: str = "1.0", wheel: bool = True, direct: str | None = None
        ) -> Pin:
    if direct:
        return Pin(name, version, None, None, None, None, direct=direct)
    filename = f"{name}-{version}-py3-none-any.whl" if wheel else f"{name}-{version}.tar.gz"
    return Pin(name, version, filename, f"https://files.example/{filename}",
               hashlib.sha256(name.encode()).hexdigest(), 10)


def locked(tmp_path: Path, sdk: list[Pin], space: list[Pin]) -> Locked:
    files = {}
    for one in sdk + space:
        if one.filename:
            files[one.filename] = tmp_path / "cache" / one.filename
    return Locked(text='lock-version = "1.0"\n', sdk_pins=sdk, space_pins=space, files=files)


SPACE_TXT = ("COPY --chown=1000:1000 .appliance-space.txt "
             "/home/user/.appliance/space-requirements.txt")
LOCK_COPY = "COPY --chown=1000:1000 .appliance-lock.toml /home/user/.appliance/pylock.toml"
COPY_APP = "COPY --chown=1000:1000 app/ /home/user/app/"


def install_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "uv pip install" in line]


# -- space_image_plan ---------------------------------------------------------------------


def test_gradio_space_installs_its_own_locked_packages_then_copies_code_last(tmp_path):
    extra = [pin("numpy", "1.26.4"), pin("tqdm", "4.66.0")]
    plan = space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, {
            "src/main.py": "print()\n", "packages.txt": "ffmpeg\n",
            "pre-requirements.txt": "pip>=24\n", "requirements.txt": "numpy\n"}),
        manifest("sdk: gradio\nsdk_version: 5.9.1\napp_file: src/main.py"), SDK_IMAGE, {}, {},
        config(), locked(tmp_path, [pin("gradio", "5.9.1")], extra))
    lines = containerfile_lines(plan)
    assert plan.containerfile == ".appliance.Containerfile"
    assert lines[0] == f"FROM {SDK_IMAGE}"
    steps = [
        "USER root",
        "COPY app/packages.txt /tmp/packages.txt",
        next(line for line in lines if line.startswith("RUN apt-get update")),
        "USER user",
        "ARG UV_DEFAULT_INDEX UV_INDEX UV_INSECURE_HOST",
        SPACE_TXT,
        install_lines(lines)[0],
        LOCK_COPY,
        COPY_APP,
        'CMD ["python", "src/main.py"]',
    ]
    # Consecutive line indexes: each input is copied alone right before the step using it,
    # and the whole app comes last, so a code-only change reuses every earlier layer.
    assert [lines.index(step) for step in steps] == list(range(1, 1 + len(steps)))
    assert len(lines) == 2 + len(steps) and lines[-1].startswith("LABEL ")
    # Only the Space's own pins, hash-checked, from the mounted cache, with no index.
    install = install_lines(lines)[0]
    assert install.startswith("RUN --mount=type=bind,source=.appliance-wheels,target=/tmp/wheels")
    for option in ("--no-deps", "--require-hashes", "--offline", "--no-index",
                   "--find-links /tmp/wheels", "-r /home/user/.appliance/space-requirements.txt"):
        assert option in install
    assert plan.context[".appliance-space.txt"].decode() == (
        f"numpy==1.26.4 --hash=sha256:{extra[0].sha256}\n"
        f"tqdm==4.66.0 --hash=sha256:{extra[1].sha256}\n")
    assert plan.context[".appliance-wheels/numpy-1.26.4-py3-none-any.whl"] == \
        tmp_path / "cache" / "numpy-1.26.4-py3-none-any.whl"
    assert ".appliance-wheels/gradio-5.9.1-py3-none-any.whl" not in plan.context  # SDK layer
    assert plan.context["app"] == tmp_path / "checkout"
    assert plan.context[".appliance-lock.toml"] == b'lock-version = "1.0"\n'


def test_gradio_space_whose_lock_is_all_sdk_has_no_install_steps(tmp_path):
    plan = space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, {"app.py": "print()\n"}),
        manifest("sdk: gradio\nsdk_version: 5.9.1"), SDK_IMAGE, {}, {}, config(),
        locked(tmp_path, [pin("gradio", "5.9.1")], []))
    lines = containerfile_lines(plan)
    # Nothing installs, so no ARG step either: a code-only change rebuilds three steps.
    assert lines[:4] == [f"FROM {SDK_IMAGE}", LOCK_COPY, COPY_APP, 'CMD ["python", "app.py"]']
    assert len(lines) == 5 and lines[4].startswith("LABEL ")


def test_an_sdist_in_the_lock_lets_the_install_reach_the_index_for_its_build(tmp_path):
    plan = space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, {"app.py": ""}),
        manifest("sdk: gradio\nsdk_version: 5.9.1"), SDK_IMAGE, {}, {}, config(),
        locked(tmp_path, [], [pin("oldpkg", "0.1", wheel=False)]))
    install = install_lines(containerfile_lines(plan))[0]
    assert "--offline" not in install and "--no-index" not in install
    assert "--require-hashes" in install


def test_a_git_requirement_is_installed_from_a_file_never_the_command_line(tmp_path):
    hostile = 'evil @ git+https://git.example/x"; touch /pwned; echo "@abc'
    plan = space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, {"app.py": ""}),
        manifest("sdk: gradio\nsdk_version: 5.9.1"), SDK_IMAGE, {}, {}, config(),
        locked(tmp_path, [], [pin("evil", direct=hostile)]))
    text = plan.context[plan.containerfile].decode()
    assert "touch /pwned" not in text
    assert plan.context[".appliance-direct.txt"].decode() == hostile + "\n"
    assert "-r /home/user/.appliance/direct-requirements.txt" in text


def test_space_installs_use_the_ca_bundle_secret_when_configured(tmp_path):
    ca = ca_file(tmp_path)
    plan = space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, {"app.py": ""}),
        manifest("sdk: gradio\nsdk_version: 5.9.1"), SDK_IMAGE, {}, {},
        config(build_ca_bundle=str(ca)), locked(tmp_path, [], [pin("numpy")]))
    install = install_lines(containerfile_lines(plan))[0]
    assert f"{CA_MOUNT} PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert " in install
    assert plan.secrets == {"cacert": ca.read_bytes()}


def test_space_plan_is_tagged_and_labelled_with_its_revision(tmp_path):
    plan = space_plan(tmp_path, "sdk: gradio", {"app.py": ""},
                      cfg=config(pip_index_url="http://mirror.lan/simple"))
    assert plan.tag == f"{image_repository('alice/demo')}:{REVISION[:12]}"
    # Labels are one LABEL line in the Containerfile: through the build API each label would
    # become a step of its own, each committed.
    assert plan.labels == {}
    assert containerfile_lines(plan)[-1] == (
        f'LABEL "appliance.space"="alice/demo" "appliance.revision"="{REVISION}" '
        f'"appliance.role"="space" "appliance.instance"="{config().instance_id}"')
    assert plan.buildargs == {"PIP_INDEX_URL": "http://mirror.lan/simple",
                              "UV_DEFAULT_INDEX": "http://mirror.lan/simple"}


def test_streamlit_space_runs_streamlit_headless_on_its_port(tmp_path):
    plan = space_plan(tmp_path, "sdk: streamlit\nsdk_version: 1.40.0\napp_file: ui.py",
                      {"ui.py": "", "requirements.txt": "pandas\n"})
    command = cmd(containerfile_lines(plan))
    assert command[:3] == ["streamlit", "run", "ui.py"]
    for option in ("--server.port=8501", "--server.address=0.0.0.0", "--server.headless=true",
                   "--server.enableXsrfProtection=false"):
        assert option in command


def test_static_space_installs_nothing_and_serves_its_index_on_7860(tmp_path):
    plan = space_plan(
        tmp_path, "sdk: static\napp_file: site/home.html",
        {"site/home.html": "<h1>hi</h1>", "packages.txt": "ffmpeg\n",
         "pre-requirements.txt": "pip\n", "requirements.txt": "numpy\n"},
    )
    lines = containerfile_lines(plan)
    assert lines == [f"FROM {SDK_IMAGE}", COPY_APP, lines[-2], lines[-1]]
    assert cmd(lines) == ["python3", "/home/user/.static_server.py", "--root", "/home/user/app",
                          "--index", "site/home.html", "--port", "7860"]


@pytest.mark.parametrize("sdk, index", [("static", 5), ("gradio", 1), ("streamlit", 2)])
@pytest.mark.parametrize("app_file", ['x".html', "a\\b.html", "$HOME.html", "é ü.html",
                                      "x\nRUN touch /pwned", "`id`.py", "a'; rm -rf /"])
def test_a_hostile_app_file_stays_one_argument_of_an_exec_form_cmd(tmp_path, app_file, sdk,
                                                                    index):
    """The front matter's fields reach a Containerfile only as serialised JSON (app_file in
    CMD); the SDK version and Python version reach it through the lock and the base image's
    tag, never as text."""
    plan = space_image_plan(
        "alice/demo", REVISION, checkout(tmp_path, {"index.html": ""}),
        Manifest(sdk=sdk, sdk_version='5.9.1"\nRUN touch /pwned', app_file=app_file),
        SDK_IMAGE, {}, {}, config(), locked(tmp_path, [], []))
    lines = containerfile_lines(plan)
    assert cmd(lines)[index] == app_file  # JSON, so Podman runs it in exec form, no shell
    assert not any(line.startswith("RUN touch") for line in lines)
    assert "/pwned" not in "\n".join(lines[:-2])


def test_docker_space_builds_its_dockerfile_with_variables_as_args_and_secrets_apart(tmp_path):
    plan = space_plan(
        tmp_path, "sdk: docker\napp_port: 8080",
        {"Dockerfile": "FROM python:3.11\n", "app.py": ""},
        variables={"MODEL": "small"}, secrets={"HF_TOKEN": "hf_not_in_the_context"},
        cfg=config(build_https_proxy="http://proxy.lan:3128"),
    )
    assert plan.containerfile == "Dockerfile"
    assert plan.buildargs == {"MODEL": "small", "HTTPS_PROXY": "http://proxy.lan:3128",
                              "https_proxy": "http://proxy.lan:3128"}
    assert plan.secrets == {"HF_TOKEN": b"hf_not_in_the_context"}
    # Only the checkout itself travels as context: no generated file holds either value.
    assert plan.context == {".": tmp_path / "checkout"}
    assert plan.tag == f"{image_repository('alice/demo')}:{REVISION[:12]}"


def test_docker_space_without_dockerfile_fails_with_a_hint(tmp_path):
    with pytest.raises(BuildFailed) as caught:
        space_plan(tmp_path, "sdk: docker", {"app.py": ""})
    assert "needs a Dockerfile" in caught.value.message
    assert "add a Dockerfile" in caught.value.hint


# -- sdk_image_plan -----------------------------------------------------------------------

SDK_PINS = [pin("gradio", "5.9.1"), pin("spaces", "0.30.0")]


def sdk_plan(front_matter: str, cfg=None, pins=None, python="3.11", base=BASE_IMAGE,
             tmp_path=Path("/nonexistent")):
    pins = SDK_PINS if pins is None else pins
    files = {p.filename: tmp_path / p.filename for p in pins if p.filename}
    return sdk_image_plan(manifest(front_matter), python, base, cfg or config(), pins, files)


def test_gradio_sdk_layer_installs_the_locked_closure_with_uv():
    plan = sdk_plan("sdk: gradio\nsdk_version: 5.9.1")
    lines = containerfile_lines(plan)
    assert lines[0] == f"FROM {BASE_IMAGE}"
    assert "COPY .appliance-uv /usr/local/bin/uv" in lines
    assert plan.context[".appliance-uv"] == packages.uv_binary()
    install = install_lines(lines)[0]
    assert "--offline --no-index" in install and "--require-hashes" in install
    assert plan.context[".appliance-sdk.txt"].decode().splitlines() == [
        f"gradio==5.9.1 --hash=sha256:{SDK_PINS[0].sha256}",
        f"spaces==0.30.0 --hash=sha256:{SDK_PINS[1].sha256}"]
    assert plan.tag.startswith("localhost/appliance-sdk:gradio-5.9.1-py3.11-")
    assert lines[-1] == 'LABEL "appliance.role"="sdk"'
    assert plan.secrets == {}


def test_the_user_owns_every_folder_a_volume_is_mounted_under_and_pythonpath_is_the_app():
    text = sdk_plan("sdk: gradio\nsdk_version: 5.9.1").context[".appliance.Containerfile"]
    text = text.decode()
    assert "install -d -o 1000 -g 1000 /home/user /home/user/app /data /home/user/.cache " in text
    assert "/home/user/.cache/huggingface" in text
    assert "PYTHONPATH=/home/user/app" in text and "SYSTEM=spaces" in text


def test_sdk_layer_without_sdk_version_is_tagged_latest():
    assert "gradio-latest-py3.11-" in sdk_plan("sdk: gradio").tag


def test_sdk_layers_whose_closures_differ_never_share_a_tag():
    first = sdk_plan("sdk: gradio\nsdk_version: 5.9.1")
    other = sdk_plan("sdk: gradio\nsdk_version: 5.9.1",
                     pins=[pin("gradio", "5.9.1"), pin("spaces", "0.31.0")])
    assert first.tag != other.tag
    assert first.tag == sdk_plan("sdk: gradio\nsdk_version: 5.9.1").tag


def test_streamlit_sdk_layer_is_tagged_with_streamlit():
    plan = sdk_plan("sdk: streamlit\nsdk_version: 1.40.0", pins=[pin("streamlit", "1.40.0")])
    assert plan.tag.startswith("localhost/appliance-sdk:streamlit-1.40.0-py3.11-")


@pytest.mark.parametrize("front_matter", ["sdk: gradio\nsdk_version: 5.9.1", "sdk: gradio",
                                          "sdk: streamlit\nsdk_version: 1.40.0", "sdk: static"])
def test_sdk_layer_tag_is_a_valid_podman_reference(front_matter):
    repository, tag = sdk_plan(front_matter).tag.rsplit(":", 1)
    assert REPOSITORY.fullmatch(repository) and TAG.fullmatch(tag)


def test_sdk_layer_tag_is_stable_for_identical_inputs(tmp_path):
    ca = ca_file(tmp_path)
    first = sdk_plan("sdk: gradio\nsdk_version: 5.9.1", config(build_ca_bundle=str(ca)))
    again = sdk_plan("sdk: gradio\nsdk_version: 5.9.1", config(build_ca_bundle=str(ca)))
    assert first.tag == again.tag


def test_a_rebuilt_base_image_gets_new_sdk_layers():
    files = {p.filename: Path("/nonexistent") / p.filename for p in SDK_PINS}
    old = sdk_image_plan(manifest("sdk: gradio"), "3.11", BASE_IMAGE, config(), SDK_PINS,
                         files, base_id="1" * 64)
    new = sdk_image_plan(manifest("sdk: gradio"), "3.11", BASE_IMAGE, config(), SDK_PINS,
                         files, base_id="2" * 64)
    assert old.tag != new.tag


def test_sdk_layer_tag_changes_with_python_version():
    older = sdk_plan("sdk: gradio\nsdk_version: 5.9.1", python="3.10",
                     base="localhost/appliance-python:3.10")
    newer = sdk_plan("sdk: gradio\nsdk_version: 5.9.1")
    assert "-py3.10-" in older.tag and "-py3.11-" in newer.tag


def test_sdk_layer_tag_changes_when_the_ca_bundle_is_switched_on(tmp_path):
    without = sdk_plan("sdk: gradio\nsdk_version: 5.9.1")
    with_ca = sdk_plan("sdk: gradio\nsdk_version: 5.9.1",
                       config(build_ca_bundle=str(ca_file(tmp_path))))
    assert without.tag != with_ca.tag


def test_sdk_layer_tag_changes_when_the_static_server_changes(tmp_path, monkeypatch):
    static = manifest("sdk: static")
    shipped = sdk_image_plan(static, "3.11", BASE_IMAGE, config())
    changed = tmp_path / "static_server.py"
    changed.write_bytes(builds.STATIC_SERVER.read_bytes() + b"\n# a new release\n")
    monkeypatch.setattr(builds, "STATIC_SERVER", changed)
    released = sdk_image_plan(static, "3.11", BASE_IMAGE, config())
    assert shipped.tag != released.tag
    assert released.context["static_server.py"] == changed.read_bytes()


def test_static_sdk_layer_ships_the_static_server_and_installs_no_packages():
    plan = sdk_image_plan(manifest("sdk: static"), "3.11", BASE_IMAGE, config())
    gradio = sdk_plan("sdk: gradio")
    assert plan.context["static_server.py"] == builds.STATIC_SERVER.read_bytes()
    lines = containerfile_lines(plan)
    assert "COPY static_server.py /home/user/.static_server.py" in lines
    assert not any("install" in line and "uv" in line for line in lines)
    assert ".appliance-uv" not in plan.context
    assert plan.tag.startswith("localhost/appliance-sdk:static-latest-py3.11-")
    assert plan.tag.rsplit("-", 1)[1] != gradio.tag.rsplit("-", 1)[1]


def test_sdk_layer_mounts_the_ca_bundle_as_a_secret_when_configured(tmp_path):
    ca = ca_file(tmp_path)
    plan = sdk_plan("sdk: gradio\nsdk_version: 5.9.1", config(build_ca_bundle=str(ca)))
    install = install_lines(containerfile_lines(plan))[0]
    assert f"{CA_MOUNT} PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert " in install
    assert plan.secrets == {"cacert": ca.read_bytes()}
    # The bundle travels as a secret, never in the context.
    assert all(not isinstance(value, bytes) or ca.read_bytes() not in value
               for value in plan.context.values())


def test_sdk_layer_has_no_ca_mount_when_the_bundle_is_set_empty():
    plan = sdk_plan("sdk: gradio\nsdk_version: 5.9.1", config(build_ca_bundle=""))
    text = plan.context[plan.containerfile].decode()
    assert "type=secret" not in text and "PIP_CERT" not in text
    assert plan.secrets == {}


def test_missing_ca_bundle_names_the_path_and_the_setting(tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(InvalidInput) as caught:
        sdk_plan("sdk: gradio", config(build_ca_bundle=str(missing)))
    assert str(missing) in caught.value.message
    assert "APPLIANCE_BUILD_CA_BUNDLE" in caught.value.hint


# -- build_env ----------------------------------------------------------------------------


def test_build_env_is_empty_by_default():
    assert build_env(config()) == {}


def test_build_env_passes_proxies_in_upper_and_lower_case():
    args = build_env(config(build_http_proxy="http://proxy.lan:3128",
                            build_https_proxy="http://proxy.lan:3129",
                            build_no_proxy="localhost,.lan"))
    assert args == {
        "HTTP_PROXY": "http://proxy.lan:3128", "http_proxy": "http://proxy.lan:3128",
        "HTTPS_PROXY": "http://proxy.lan:3129", "https_proxy": "http://proxy.lan:3129",
        "NO_PROXY": "localhost,.lan", "no_proxy": "localhost,.lan",
    }


def test_build_env_passes_the_package_index_in_upper_case_only():
    args = build_env(config(pip_index_url="http://mirror.lan/simple",
                            pip_extra_index_url="http://extra.lan/simple",
                            pip_trusted_host="mirror.lan"))
    assert args == {"PIP_INDEX_URL": "http://mirror.lan/simple",
                    "PIP_EXTRA_INDEX_URL": "http://extra.lan/simple",
                    "PIP_TRUSTED_HOST": "mirror.lan"}


# -- choose_python ------------------------------------------------------------------------


def test_choose_python_takes_an_exact_match_without_warning():
    assert choose_python("3.10", ["3.11", "3.10"]) == ("3.10", None)


def test_choose_python_falls_back_to_the_only_version_with_a_warning():
    chosen, warning = choose_python("3.10", ["3.11"])
    assert chosen == "3.11"
    assert "3.10" in warning and "3.11" in warning


@pytest.mark.parametrize(("requested", "available", "expected"), [
    ("3.9", ["3.8", "3.11"], "3.8"),
    ("3.12", ["3.8", "3.11"], "3.11"),
    ("3.10.4", ["3.8", "3.10", "3.12"], "3.10"),
    ("3.10", ["3.9", "3.11"], "3.11"),  # a tie goes to the newer one
    ("3.10", ["3.11", "3.9"], "3.11"),
])
def test_choose_python_picks_the_nearest_minor(requested, available, expected):
    chosen, warning = choose_python(requested, available)
    assert chosen == expected
    assert warning is not None


def test_choose_python_without_base_images_fails_pointing_at_setup():
    with pytest.raises(BuildFailed) as caught:
        choose_python("3.10", [])
    assert builds.BASE_REPOSITORY in caught.value.message
    assert "scripts/setup.sh" in caught.value.hint


@pytest.mark.parametrize("requested", ["latest", "", "3.x", "three"])
def test_choose_python_survives_a_garbage_version(requested):
    chosen, warning = choose_python(requested, ["3.10", "3.12"])
    assert chosen in ("3.10", "3.12")
    assert chosen in warning


# -- image_repository ---------------------------------------------------------------------


def test_image_repository_is_lower_case_and_names_the_space():
    repository = image_repository("Alice/My_Demo.Space")
    assert repository == repository.lower()
    assert repository.startswith("localhost/space-alice-my-demo-space-")


def test_image_repository_differs_for_ids_differing_only_in_case():
    assert image_repository("alice/demo") != image_repository("Alice/Demo")


@given(st.text(min_size=1, max_size=200))
def test_image_repository_is_always_a_valid_podman_reference(space_id):
    repository = image_repository(space_id)
    assert repository.startswith("localhost/space-")
    assert REPOSITORY.fullmatch(repository)
    assert len(repository) < 128


# -- BuildLog -----------------------------------------------------------------------------


def test_build_log_writes_lines_with_every_secret_replaced_longest_first(tmp_path):
    path = tmp_path / "logs" / "build.log"
    log = BuildLog(path, ["abc", "abcdef", "xy"])
    log("token abcdef then abc\n")
    log("short secrets like xy are too common to hide")
    log.close()
    assert path.read_text() == (
        "token *** then ***\n"
        "short secrets like xy are too common to hide\n"
    )


def test_build_log_keeps_the_last_40_lines_redacted(tmp_path):
    log = BuildLog(tmp_path / "build.log", ["s3cret"])
    for number in range(45):
        log(f"step {number:02d} s3cret")
    log.close()
    assert log.tail == [f"step {number:02d} ***" for number in range(5, 45)]
    assert len((tmp_path / "build.log").read_text().splitlines()) == 45


def test_build_log_redacts_arbitrary_text(tmp_path):
    log = BuildLog(tmp_path / "build.log", ["hf_token_value", "pw"])
    try:
        assert log.redact("a\nhf_token_value\nb hf_token_value pw") == "a\n***\nb *** pw"
    finally:
        log.close()


# -- dockerfile_bases ---------------------------------------------------------------------


def test_dockerfile_bases_lists_external_images_not_earlier_stages(tmp_path):
    root = checkout(tmp_path, {"Dockerfile": (
        "# FROM commented/out:1\n"
        "FROM --platform=$BUILDPLATFORM python:3.11-slim AS builder\n"
        "RUN pip wheel -w /wheels numpy\n"
        "from ghcr.io/org/runtime:2 as Final\n"
        "COPY --from=builder /wheels /wheels\n"
        "FROM builder\n"
        "FROM final AS again\n"
        "  FROM nvidia/cuda:12.4.0-runtime-ubuntu22.04\n"
    )})
    assert dockerfile_bases(root) == [
        "python:3.11-slim", "ghcr.io/org/runtime:2", "nvidia/cuda:12.4.0-runtime-ubuntu22.04"]


def test_dockerfile_bases_without_dockerfile_is_empty(tmp_path):
    assert dockerfile_bases(checkout(tmp_path, {"app.py": ""})) == []


# -- explain_failure ----------------------------------------------------------------------


def test_explain_failure_names_the_unpullable_base_and_offline_loading():
    message = ("initializing source docker://python:3.11-slim: pinging container registry "
               "registry-1.docker.io: dial tcp: lookup registry-1.docker.io: no such host")
    text = explain_failure(message, ["STEP 1/3: FROM docker.io/library/python:3.11-slim"],
                           ["docker.io/library/python:3.11-slim"])
    assert text.startswith(
        "The Dockerfile's base image docker.io/library/python:3.11-slim could not be pulled")
    assert "appliance images load" in text
    assert "podman save -o IMAGE.tar docker.io/library/python:3.11-slim" in text
    assert "Build failed:" not in text


def test_explain_failure_finds_the_base_in_the_log_tail():
    text = explain_failure("unable to pull image", ["Trying to pull ghcr.io/org/runtime:2..."],
                           ["ghcr.io/org/runtime:2"])
    assert "base image ghcr.io/org/runtime:2 could not be pulled" in text


def test_explain_failure_shows_the_log_tail_for_other_failures():
    tail = [f"step {number:02d}" for number in range(30)]
    text = explain_failure("  exit status 1\n", tail, ["python:3.11"])
    assert text.startswith("Build failed: exit status 1\n")
    assert "--- last lines of the build log ---" in text
    assert text.endswith("\n".join(tail[-25:]))
    assert "step 04" not in text


def test_explain_failure_for_a_pull_of_another_image_is_a_plain_failure():
    text = explain_failure("manifest unknown: other/image:9", [], ["python:3.11"])
    assert text.startswith("Build failed: manifest unknown")
    assert "appliance images load" not in text


def test_sdk_layer_tag_stays_a_valid_reference_for_a_local_version_label():
    manifest = parse_manifest("---\nsdk: gradio\nsdk_version: 5.9.1+cpu\n---\n")
    plan = builds.sdk_image_plan(manifest, "3.11", "base", load_config({}, build_ca_bundle=""))
    assert re.fullmatch(r"localhost/appliance-sdk:[\w][\w.-]{0,127}", plan.tag)


def test_choose_python_skips_base_tags_that_are_not_versions():
    assert builds.choose_python("3.10", ["3.11", "latest"])[0] == "3.11"
    with pytest.raises(BuildFailed, match="No Python base image"):
        builds.choose_python("3.10", ["latest"])


def test_build_log_redacts_a_multi_line_secret_arriving_line_by_line(tmp_path):
    key = "-----BEGIN KEY-----\nAAAAsecretbody\n-----END KEY-----"
    log = builds.BuildLog(tmp_path / "build.log", [key])
    for line in key.splitlines():
        log(line)
    log.close()
    text = (tmp_path / "build.log").read_text()
    assert "AAAAsecretbody" not in text and "BEGIN KEY" not in text


def test_dockerfile_bases_reads_a_dockerfile_that_starts_with_a_bom(tmp_path):
    (tmp_path / "Dockerfile").write_text("\ufeffFROM python:3.11\n")
    assert builds.dockerfile_bases(tmp_path) == ["python:3.11"]


@pytest.mark.parametrize("line, host", [
    ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError('"
     "<pip._vendor.urllib3.connection.HTTPSConnection object>: Failed to establish a new "
     "connection: [Errno -3] Temporary failure in name resolution')': /simple/flask/", None),
    ("Err:1 http://deb.debian.org/debian bookworm InRelease  Temporary failure resolving "
     "'deb.debian.org'", "deb.debian.org"),
    ("curl: (6) Could not resolve host: example.org", "example.org"),
    ("fatal: unable to access 'https://github.com/x/y.git/': Could not resolve host: "
     "github.com", "github.com"),
])
def test_a_docker_build_that_cannot_reach_the_network_says_so_first(line, host):
    tail = ["STEP 3/5: RUN pip install flask", line, "ERROR: No matching distribution found"]
    text = explain_failure("building at STEP \"RUN pip install flask\": exit status 1", tail,
                           ["python:3.11"])
    first = text.splitlines()[0]
    assert first.startswith(f"The build could not reach {host or ''}")
    assert "APPLIANCE_BUILD_HTTPS_PROXY" in text and "--- last lines of the build log ---" in text
