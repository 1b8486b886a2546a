"""Tests for turning a Space checkout into build plans, and for build logs (appliance.builds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import load_config
from appliance.core import builds
from appliance.core.builds import (
    BuildLog,
    build_env,
    choose_python,
    dockerfile_bases,
    explain_failure,
    image_repository,
    sdk_image_plan,
    space_image_plan,
)
from appliance.core.manifest import Manifest, parse_manifest
from appliance.errors import BuildFailed, InvalidInput

SDK_IMAGE = "localhost/appliance-sdk:gradio-5.9.1-py3.11-0123abcd"
BASE_IMAGE = "localhost/appliance-python:3.11"
REVISION = "0123456789abcdef0123456789abcdef01234567"
CA_MOUNT = "--mount=type=secret,id=cacert,mode=0444"
# What podman accepts as a repository (lower-case path) and as a tag.
REPOSITORY = re.compile(r"[a-z0-9][a-z0-9._/-]*")
TAG = re.compile(r"[\w][\w.-]{0,127}")
COPY_APP = "COPY --chown=1000:1000 . /home/user/app"


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


# -- space_image_plan ---------------------------------------------------------------------


def test_gradio_space_installs_each_input_file_right_after_copying_it_and_copies_code_last(
    tmp_path,
):
    plan = space_plan(
        tmp_path, "sdk: gradio\nsdk_version: 5.9.1\napp_file: src/main.py",
        {"src/main.py": "print()\n", "packages.txt": "ffmpeg\n",
         "pre-requirements.txt": "pip>=24\n", "requirements.txt": "numpy\n"},
    )
    lines = containerfile_lines(plan)
    assert plan.containerfile == ".appliance.Containerfile"
    assert lines[0] == f"FROM {SDK_IMAGE}"
    steps = [
        "USER root",
        "COPY packages.txt /tmp/packages.txt",
        next(line for line in lines if line.startswith("RUN apt-get update")),
        "USER user",
        "ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST",
        "COPY --chown=1000:1000 pre-requirements.txt /tmp/pre-requirements.txt",
        "RUN pip install --no-cache-dir -r /tmp/pre-requirements.txt",
        "COPY --chown=1000:1000 requirements.txt /tmp/requirements.txt",
        "RUN pip install --no-cache-dir -r /tmp/requirements.txt",
        'RUN pip install --no-cache-dir "gradio[oauth]==5.9.1"',
        COPY_APP,
        'CMD ["python", "src/main.py"]',
    ]
    # Consecutive line indexes: each file is copied alone right before the step using it,
    # and the whole app comes last, so a code-only change reuses every earlier layer.
    assert [lines.index(step) for step in steps] == list(range(1, 1 + len(steps)))
    assert len(lines) == 2 + len(steps) and lines[-1].startswith("LABEL ")
    assert "apt-get install" in steps[2] and "/tmp/packages.txt" in steps[2]
    assert plan.context["."] == tmp_path / "checkout"


def test_gradio_space_without_packages_or_requirements_has_no_install_steps(tmp_path):
    plan = space_plan(tmp_path, "sdk: gradio\nsdk_version: 5.9.1", {"app.py": "print()\n"})
    lines = containerfile_lines(plan)
    # Nothing installs, so no ARG step either: a code-only change rebuilds three steps.
    assert lines[:3] == [f"FROM {SDK_IMAGE}", COPY_APP, 'CMD ["python", "app.py"]']
    assert len(lines) == 4 and lines[3].startswith("LABEL ")


def test_gradio_space_with_only_requirements_skips_apt_and_pre_requirements(tmp_path):
    plan = space_plan(tmp_path, "sdk: gradio\nsdk_version: 5.9.1",
                      {"app.py": "", "requirements.txt": "numpy\n"})
    text = plan.context[plan.containerfile].decode()
    assert "USER root" not in text and "apt-get" not in text and "packages.txt" not in text
    assert "pre-requirements" not in text
    assert "-r /tmp/requirements.txt" in text


def test_space_without_sdk_version_repins_the_sdk_unpinned(tmp_path):
    plan = space_plan(tmp_path, "sdk: gradio", {"app.py": "", "requirements.txt": "numpy\n"})
    lines = containerfile_lines(plan)
    assert lines[lines.index(COPY_APP) - 1] == 'RUN pip install --no-cache-dir "gradio[oauth]"'


def test_space_pip_installs_use_the_ca_bundle_secret_when_configured(tmp_path):
    ca = ca_file(tmp_path)
    plan = space_plan(tmp_path, "sdk: gradio\nsdk_version: 5.9.1",
                      {"app.py": "", "requirements.txt": "numpy\n"},
                      cfg=config(build_ca_bundle=str(ca)))
    pip_lines = [line for line in containerfile_lines(plan) if "pip install" in line]
    assert len(pip_lines) == 2
    assert all(line.startswith(f"RUN {CA_MOUNT} PIP_CERT=/run/secrets/cacert ")
               for line in pip_lines)
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
    assert plan.buildargs == {"PIP_INDEX_URL": "http://mirror.lan/simple"}


def test_streamlit_space_runs_streamlit_headless_on_its_port(tmp_path):
    plan = space_plan(tmp_path, "sdk: streamlit\nsdk_version: 1.40.0\napp_file: ui.py",
                      {"ui.py": "", "requirements.txt": "pandas\n"})
    lines = containerfile_lines(plan)
    command = cmd(lines)
    assert command[:3] == ["streamlit", "run", "ui.py"]
    for option in ("--server.port=8501", "--server.address=0.0.0.0", "--server.headless=true",
                   "--server.enableXsrfProtection=false"):
        assert option in command
    # The SDK pin has no [oauth] extra for streamlit.
    assert lines[lines.index(COPY_APP) - 1] == 'RUN pip install --no-cache-dir "streamlit==1.40.0"'


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


def test_gradio_sdk_layer_pins_the_sdk_version():
    plan = sdk_image_plan(manifest("sdk: gradio\nsdk_version: 5.9.1"), "3.11", BASE_IMAGE,
                          config())
    lines = containerfile_lines(plan)
    assert lines[0] == f"FROM {BASE_IMAGE}"
    assert 'RUN pip install --no-cache-dir "gradio[oauth]==5.9.1" spaces' in lines
    assert plan.tag.startswith("localhost/appliance-sdk:gradio-5.9.1-py3.11-")
    assert lines[-1] == 'LABEL "appliance.role"="sdk"'
    assert plan.secrets == {}


def test_sdk_layer_without_sdk_version_is_unpinned_and_tagged_latest():
    plan = sdk_image_plan(manifest("sdk: gradio"), "3.11", BASE_IMAGE, config())
    text = plan.context[plan.containerfile].decode()
    assert 'pip install --no-cache-dir "gradio[oauth]" spaces' in text
    assert "==" not in text
    assert "gradio-latest-py3.11-" in plan.tag


def test_streamlit_sdk_layer_pins_streamlit():
    plan = sdk_image_plan(manifest("sdk: streamlit\nsdk_version: 1.40.0"), "3.11", BASE_IMAGE,
                          config())
    assert 'RUN pip install --no-cache-dir "streamlit==1.40.0"' in containerfile_lines(plan)
    assert plan.tag.startswith("localhost/appliance-sdk:streamlit-1.40.0-py3.11-")


@pytest.mark.parametrize("front_matter", ["sdk: gradio\nsdk_version: 5.9.1", "sdk: gradio",
                                          "sdk: streamlit\nsdk_version: 1.40.0", "sdk: static"])
def test_sdk_layer_tag_is_a_valid_podman_reference(front_matter):
    plan = sdk_image_plan(manifest(front_matter), "3.11", BASE_IMAGE, config())
    repository, tag = plan.tag.rsplit(":", 1)
    assert REPOSITORY.fullmatch(repository) and TAG.fullmatch(tag)


def test_sdk_layer_tag_is_stable_for_identical_inputs(tmp_path):
    ca = ca_file(tmp_path)
    first = sdk_image_plan(manifest("sdk: gradio\nsdk_version: 5.9.1"), "3.11", BASE_IMAGE,
                           config(build_ca_bundle=str(ca)))
    again = sdk_image_plan(manifest("sdk: gradio\nsdk_version: 5.9.1"), "3.11", BASE_IMAGE,
                           config(build_ca_bundle=str(ca)))
    assert first.tag == again.tag


def test_sdk_layer_tag_changes_with_python_version():
    gradio = manifest("sdk: gradio\nsdk_version: 5.9.1")
    older = sdk_image_plan(gradio, "3.10", "localhost/appliance-python:3.10", config())
    newer = sdk_image_plan(gradio, "3.11", BASE_IMAGE, config())
    assert "-py3.10-" in older.tag and "-py3.11-" in newer.tag


def test_sdk_layer_tag_changes_when_the_ca_bundle_is_switched_on(tmp_path):
    gradio = manifest("sdk: gradio\nsdk_version: 5.9.1")
    without = sdk_image_plan(gradio, "3.11", BASE_IMAGE, config())
    with_ca = sdk_image_plan(gradio, "3.11", BASE_IMAGE,
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
    gradio = sdk_image_plan(manifest("sdk: gradio"), "3.11", BASE_IMAGE, config())
    assert plan.context["static_server.py"] == builds.STATIC_SERVER.read_bytes()
    lines = containerfile_lines(plan)
    assert "COPY static_server.py /home/user/.static_server.py" in lines
    assert not any("pip install" in line for line in lines)
    assert plan.tag.startswith("localhost/appliance-sdk:static-latest-py3.11-")
    assert plan.tag.rsplit("-", 1)[1] != gradio.tag.rsplit("-", 1)[1]


def test_sdk_layer_mounts_the_ca_bundle_as_a_secret_when_configured(tmp_path):
    ca = ca_file(tmp_path)
    plan = sdk_image_plan(manifest("sdk: gradio\nsdk_version: 5.9.1"), "3.11", BASE_IMAGE,
                          config(build_ca_bundle=str(ca)))
    pip_line = next(line for line in containerfile_lines(plan) if "pip install" in line)
    assert pip_line.startswith(
        f"RUN {CA_MOUNT} PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert pip ")
    assert plan.secrets == {"cacert": ca.read_bytes()}
    # The bundle travels as a secret, never in the context.
    assert all(ca.read_bytes() not in value for value in plan.context.values())


def test_sdk_layer_has_no_ca_mount_when_the_bundle_is_set_empty():
    plan = sdk_image_plan(manifest("sdk: gradio\nsdk_version: 5.9.1"), "3.11", BASE_IMAGE,
                          config(build_ca_bundle=""))
    text = plan.context[plan.containerfile].decode()
    assert "--mount" not in text and "PIP_CERT" not in text
    assert plan.secrets == {}


def test_missing_ca_bundle_names_the_path_and_the_setting(tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(InvalidInput) as caught:
        sdk_image_plan(manifest("sdk: gradio"), "3.11", BASE_IMAGE,
                       config(build_ca_bundle=str(missing)))
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
    assert '"gradio[oauth]==5.9.1+cpu"' in plan.context[".appliance.Containerfile"].decode()


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
