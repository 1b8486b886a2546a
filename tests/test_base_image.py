"""The base image carries what Hugging Face's gradio/streamlit images carry, and the recipe it
was built from: a changed recipe is a different digest, and setup rebuilds on it."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from conftest import SERVICE_USER, as_service

pytestmark = pytest.mark.podman

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "images" / "python" / "build.sh"
IMAGE = "localhost/appliance-python:3.11"
LABEL_FORMAT = '{{ index .Labels "appliance.base-recipe" }}'
# Spaces' apt packages and the build tools of the python:3.x image their images start from.
TOOLS = ["make", "gcc", "g++", "cmake", "ffmpeg", "git", "git-lfs", "rsync", "pkg-config",
         "curl", "wget", "unzip", "ps"]
LIBRARIES = ["libGL.so.1", "libSM.so.6", "libXext.so.6"]
HEADER = "/usr/include/python3.11/Python.h"


def recipe(script: Path = BUILD, **env: str) -> str:
    result = subprocess.run(["bash", str(script), "--print-recipe"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def edited_copy(tmp_path: Path, old: str, new: str) -> Path:
    text = BUILD.read_text()
    assert text.count(old) == 1, f"build.sh no longer has {old!r} once"
    copy = tmp_path / "build.sh"
    copy.write_text(text.replace(old, new))
    return copy


def run_in_image(script: str) -> str:
    result = as_service("podman", "run", "--rm", "--network", "none", IMAGE, "bash", "-c",
                        script, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_build_and_setup_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is part of the test setup: apt-get install -y shellcheck")
    result = subprocess.run([shellcheck, "-x", str(BUILD), str(REPO / "scripts" / "setup.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_recipe_is_a_short_hex_digest_and_stable():
    digest = recipe()
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert recipe() == digest


def test_adding_a_package_changes_the_recipe(tmp_path):
    copy = edited_copy(tmp_path, "  curl wget procps unzip\n", "  curl wget procps unzip jq\n")
    assert recipe(copy) != recipe()


def test_changing_how_the_rootfs_is_made_changes_the_recipe(tmp_path):
    copy = edited_copy(tmp_path, "git lfs install --system",
                       "git lfs install --system --skip-smudge")
    assert recipe(copy) != recipe()


def test_another_suite_is_another_recipe():
    assert recipe(APPLIANCE_BASE_SUITE="trixie") != recipe()


def test_rewording_a_comment_or_reordering_packages_keeps_the_recipe(tmp_path):
    copy = edited_copy(tmp_path, "# Packages for packages.txt come from",
                       "# packages.txt's packages come from")
    assert recipe(copy) == recipe()
    copy = edited_copy(tmp_path, "  curl wget procps unzip\n", "  unzip procps wget curl\n")
    assert recipe(copy) == recipe()


def test_base_image_is_labelled_with_the_current_recipe():
    label = as_service("podman", "image", "inspect", "--format", LABEL_FORMAT, IMAGE)
    assert label.stdout.strip() == recipe(), "run 'sudo scripts/setup.sh' to rebuild the image"


def test_base_image_has_the_tools_spaces_images_carry():
    found = run_in_image(f'for t in {" ".join(TOOLS)}; do '
                         'printf "%s=%s\\n" "$t" "$(command -v "$t")"; done')
    paths = dict(line.split("=", 1) for line in found.splitlines())
    missing = [tool for tool in TOOLS if not paths.get(tool)]
    assert not missing, f"missing from {IMAGE}: {missing}"


def test_base_image_has_the_libraries_opencv_and_friends_load():
    listed = run_in_image("ldconfig -p")
    missing = [lib for lib in LIBRARIES if f"\t{lib} (" not in listed]
    assert not missing, f"ldconfig -p in {IMAGE} lacks {missing}"


def test_base_image_compiles_against_the_python_headers():
    out = run_in_image(
        f"test -f {HEADER} && printf '#include <Python.h>\\nint main(void) {{ return 0; }}\\n'"
        " > /tmp/x.c && gcc $(python3-config --includes) -c /tmp/x.c -o /tmp/x.o"
        " && printf 'int main() { return 0; }\\n' > /tmp/y.cc && g++ /tmp/y.cc -o /tmp/y"
        " && /tmp/y && echo compiled")
    assert out.strip() == "compiled"


def test_base_image_wires_git_lfs_for_every_user():
    out = run_in_image("git config --system --get filter.lfs.process; git lfs version")
    process, version = out.splitlines()
    assert process == "git-lfs filter-process"
    assert version.startswith("git-lfs/")


def test_build_imports_a_cached_rootfs_labelled_then_does_nothing_and_drops_stale_ones(
        tmp_path):
    """The build itself, on a tiny root filesystem in a cache of its own (no debootstrap)."""
    digest = recipe()
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "marker").write_text("tiny")
    with tarfile.open(cache / f"rootfs-bookworm-{digest}.tar", "w") as tar:
        tar.add(tmp_path / "root", arcname=".")
    stale = [cache / "rootfs-bookworm.tar", cache / "rootfs-bookworm-000000000000.tar"]
    kept = cache / "rootfs-trixie-000000000000.tar"  # another suite's image, still wanted
    for path in [*stale, kept]:
        path.write_bytes(b"old")
    image = f"localhost/appliance-test-base-{uuid.uuid4().hex[:8]}:3.11"
    try:
        first = subprocess.run(["bash", str(BUILD), str(cache), SERVICE_USER, image],
                               capture_output=True, text=True)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"podman import {cache}/rootfs-bookworm-{digest}.tar as {image}" in first.stdout
        label = as_service("podman", "image", "inspect", "--format", LABEL_FORMAT, image)
        assert label.stdout.strip() == digest
        assert not any(path.exists() for path in stale)
        assert kept.exists() and (cache / f"rootfs-bookworm-{digest}.tar").exists()

        again = subprocess.run(["bash", str(BUILD), str(cache), SERVICE_USER, image],
                               capture_output=True, text=True)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout == f"==> {image} is up to date (recipe {digest})\n"
    finally:
        as_service("podman", "rmi", "--force", image, check=False)


def test_build_without_arguments_says_how_to_call_it():
    result = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--print-recipe" in result.stderr
