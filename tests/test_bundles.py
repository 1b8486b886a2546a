"""Bundles without Podman: the file format, checksums, signatures, HF cache layouts, the CLI."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.bundle import bundle_group
from appliance.config import load_config
from appliance.core import bundles, spaces
from appliance.errors import InvalidInput, NotFound

KEY = b"a-shared-key-of-enough-length-123"


def make_bundle(path: Path, parts: dict[str, bytes], key: bytes | None = None,
                models: list | None = None) -> dict:
    with open(path, "wb") as fh:
        writer = bundles._TarWriter(fh)
        for name, data in parts.items():
            # Streamed in pieces, as `podman save` arrives.
            writer.add_stream(name, (data[i:i + 1000] for i in range(0, len(data), 1000)))
        manifest = {"format": bundles.FORMAT, "version": bundles.VERSION, "spaces": [],
                    "models": models or [], "images": {"part": bundles.IMAGES_PART, "tags": []},
                    "parts": writer.parts}
        raw = json.dumps(manifest).encode()
        writer.add_bytes(bundles.MANIFEST, raw)
        if key:
            writer.add_bytes(bundles.SIGNATURE, bundles.sign(raw, key).encode())
        writer.close()
    return manifest


PARTS = {"repos/space-a.tar": b"r" * 3000, bundles.IMAGES_PART: bytes(range(256)) * 700,
         "models/models--o--m/blobs/abc": b"weights" * 100}


def test_bundle_round_trips_with_every_part_checked(tmp_path):
    manifest = make_bundle(tmp_path / "b.tar", PARTS, key=KEY)
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage", KEY)
    assert staged.signed
    for name, data in PARTS.items():
        assert staged.part(name).read_bytes() == data
        assert manifest["parts"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                           "size": len(data)}
    # A plain tar: standard tools read it too.
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert tar.getnames()[-2:] == [bundles.MANIFEST, bundles.SIGNATURE]


def test_a_flipped_byte_is_rejected_naming_the_part(tmp_path):
    make_bundle(tmp_path / "b.tar", PARTS)
    data = bytearray((tmp_path / "b.tar").read_bytes())
    offset = data.index(bytes(range(256))) + 5000  # inside images/images.tar
    data[offset] ^= 0xFF
    (tmp_path / "b.tar").write_bytes(bytes(data))
    with pytest.raises(bundles.BundleError) as caught:
        bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    assert f"Part {bundles.IMAGES_PART}" in caught.value.message
    assert "is corrupt" in caught.value.message
    assert "copy the bundle again" in caught.value.hint


@pytest.mark.parametrize("cut", ["half", "inside the manifest"])
def test_a_truncated_bundle_is_rejected(tmp_path, cut):
    make_bundle(tmp_path / "b.tar", PARTS)
    data = (tmp_path / "b.tar").read_bytes()
    # The end is two zero blocks, then the manifest's padding: 1024 + 400 lands in its JSON.
    keep = len(data) // 2 if cut == "half" else len(data) - 1024 - 400
    (tmp_path / "b.tar").write_bytes(data[:keep])
    with pytest.raises(bundles.BundleError) as caught:
        bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    assert "truncated" in caught.value.message


def test_a_bundle_cut_before_its_manifest_is_rejected(tmp_path):
    make_bundle(tmp_path / "b.tar", PARTS)
    with tarfile.open(tmp_path / "b.tar") as tar:
        manifest_offset = tar.getmember(bundles.MANIFEST).offset
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:manifest_offset] + b"\0" * 1024)
    with pytest.raises(bundles.BundleError) as caught:
        bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    assert "has no manifest.json" in caught.value.message
    assert "models/models--o--m/blobs/abc" in caught.value.message


def test_wrong_key_and_missing_signature_are_rejected(tmp_path):
    make_bundle(tmp_path / "signed.tar", PARTS, key=KEY)
    with pytest.raises(bundles.BundleError) as caught:
        bundles.stage_bundle(tmp_path / "signed.tar", tmp_path / "s1", b"another-key-entirely!")
    assert "signature" in caught.value.message and "does not match" in caught.value.message
    make_bundle(tmp_path / "plain.tar", PARTS)
    with pytest.raises(bundles.BundleError) as caught:
        bundles.stage_bundle(tmp_path / "plain.tar", tmp_path / "s2", KEY)
    assert "is not signed" in caught.value.message
    with pytest.raises(bundles.BundleError, match="no key was given"):
        bundles.stage_bundle(tmp_path / "signed.tar", tmp_path / "s3", require_signature=True)


def test_a_changed_manifest_fails_the_signature(tmp_path):
    make_bundle(tmp_path / "b.tar", PARTS, key=KEY)
    data = bytearray((tmp_path / "b.tar").read_bytes())
    at = data.index(b'"format"')
    data[at + 1] = ord("F")
    (tmp_path / "b.tar").write_bytes(bytes(data))
    with pytest.raises(bundles.BundleError, match="does not match the key"):
        bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage", KEY)


def test_parts_with_escaping_names_or_unlisted_parts_are_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("models/../../etc/passwd")
        tar.addfile(info)
    with pytest.raises(bundles.BundleError, match="refused name"):
        bundles.stage_bundle(path, tmp_path / "s1")
    assert not (tmp_path / "etc").exists()
    make_bundle(tmp_path / "b.tar", PARTS)
    with tarfile.open(tmp_path / "b.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "extra.tar", "w") as tar:
        for member, data in members[:1]:
            tar.addfile(member, __import__("io").BytesIO(data))
        extra = tarfile.TarInfo("wheels/evil.whl")
        tar.addfile(extra)
        for member, data in members[1:]:
            tar.addfile(member, __import__("io").BytesIO(data))
    with pytest.raises(bundles.BundleError, match="does not list: wheels/evil.whl"):
        bundles.stage_bundle(tmp_path / "extra.tar", tmp_path / "s2")


def test_key_files_must_hold_enough_bytes(tmp_path):
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(InvalidInput, match="at least 16"):
        bundles.read_key(tmp_path / "short")
    (tmp_path / "good").write_bytes(KEY + b"\n")
    assert bundles.read_key(tmp_path / "good") == KEY


@pytest.mark.parametrize(("text", "repo", "kind", "files", "revision"), [
    ("owner/name", "owner/name", "model", [], None),
    ("owner/name@v1.0", "owner/name", "model", [], "v1.0"),
    ("datasets/owner/data", "owner/data", "dataset", [], None),
    ("owner/name config.json,*.safetensors abc123", "owner/name", "model",
     ["config.json", "*.safetensors"], "abc123"),
])
def test_model_specs_read_as_preload_from_hub_writes_them(text, repo, kind, files, revision):
    spec = bundles.parse_model_spec(text)
    assert (spec.repo_id, spec.repo_type, spec.files, spec.revision) == \
        (repo, kind, files, revision)


@pytest.mark.parametrize(
    "text", ["", "noslash", "../x/y", "a/b c d e", "a/b@bad!rev", "o/n f.json bad~rev"])
def test_bad_model_specs_are_refused(text):
    with pytest.raises(InvalidInput):
        bundles.parse_model_spec(text)


def make_hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> str:
    """Lay files out as huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    top = root / ("models--" + repo.replace("/", "--"))
    revision = hashlib.sha1(repo.encode()).hexdigest()
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (top / "blobs").mkdir(parents=True, exist_ok=True)
        (top / "blobs" / blob).write_bytes(data)
        link = top / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = len(Path(name).parts)
        link.symlink_to("../" * (depth + 1) + f"blobs/{blob}")
    (top / "refs").mkdir(parents=True)
    (top / "refs" / "main").write_text(revision)
    return revision


def test_models_are_found_in_a_hub_cache_and_a_plain_mirror(tmp_path):
    files = {"config.json": b"{}", "1_Pooling/config.json": b'{"p": 1}', "w.bin": b"x" * 10}
    revision = make_hf_cache(tmp_path / "cache", "o/m", files)
    found = bundles.locate_model(bundles.parse_model_spec("o/m"), tmp_path / "cache")
    assert found.revision == revision
    assert set(found.files) == set(files)
    assert {p.read_bytes() for p in found.blobs.values()} == set(files.values())
    only = bundles.locate_model(bundles.parse_model_spec("o/m *.json"), tmp_path / "cache")
    assert set(only.files) == {"config.json", "1_Pooling/config.json"}
    mirror = tmp_path / "mirror" / "o" / "plain"
    mirror.mkdir(parents=True)
    (mirror / "vocab.txt").write_text("a\nb\n")
    plain = bundles.locate_model(bundles.parse_model_spec("o/plain"), tmp_path / "mirror")
    assert len(plain.revision) == 40 and list(plain.files) == ["vocab.txt"]


def test_a_missing_model_names_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(NotFound) as caught:
        bundles.locate_model(bundles.parse_model_spec("o/absent"), tmp_path)
    assert "o/absent" in caught.value.message and str(tmp_path) in caught.value.message
    assert "huggingface-cli download o/absent" in caught.value.hint
    make_hf_cache(tmp_path, "o/m", {"a.json": b"1"})
    with pytest.raises(NotFound, match="has no file b.json"):
        bundles.locate_model(bundles.parse_model_spec("o/m b.json"), tmp_path)


def test_model_archive_lays_out_a_cache_huggingface_hub_can_read(tmp_path):
    files = {"config.json": b"{}", "1_Pooling/config.json": b'{"p": 1}'}
    revision = make_hf_cache(tmp_path / "cache", "o/m", files)
    found = bundles.locate_model(bundles.parse_model_spec("o/m"), tmp_path / "cache")
    parts = {f"models/models--o--m/blobs/{b}": p.read_bytes() for b, p in found.blobs.items()}
    model = {"repo_id": "o/m", "type": "model", "revision": revision, "dir": "models--o--m",
             "files": found.files, "requested_revision": None}
    make_bundle(tmp_path / "b.tar", parts, models=[model])
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    tops = bundles.model_archive(staged, tmp_path / "cache.tar")
    assert tops == ["hub/models--o--m"]
    out = tmp_path / "volume"
    with tarfile.open(tmp_path / "cache.tar") as tar:
        tar.extractall(out)  # noqa: S202 - made by the test
    snapshot = out / "hub" / "models--o--m" / "snapshots" / revision
    assert (out / "hub/models--o--m/refs/main").read_text() == revision
    for name, data in files.items():
        assert (snapshot / name).is_symlink() and (snapshot / name).read_bytes() == data


def test_cli_import_of_a_corrupt_bundle_says_which_part_and_changes_nothing(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"),
                         local_sources=str(tmp_path / "data" / "repos"))
    ctx = spaces.open_context(config, actor="test")
    make_bundle(tmp_path / "b.tar", PARTS)
    data = bytearray((tmp_path / "b.tar").read_bytes())
    data[data.index(b"weights") + 3] ^= 1
    (tmp_path / "b.tar").write_bytes(bytes(data))
    result = CliRunner().invoke(bundle_group, ["import", str(tmp_path / "b.tar")],
                                obj={"ctx": ctx})
    assert result.exit_code == 1
    assert "Part models/models--o--m/blobs/abc" in result.output and "corrupt" in result.output
    assert "Hint: copy the bundle again" in result.output
    assert ctx.store.list_spaces() == []
    assert list((tmp_path / "data" / "bundles").iterdir()) == []  # staging cleaned up
    assert not (tmp_path / "data" / "repos").exists()


def test_cli_show_prints_the_manifest(tmp_path):
    make_bundle(tmp_path / "b.tar", PARTS)
    result = CliRunner().invoke(bundle_group, ["show", str(tmp_path / "b.tar"), "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["parts"]) == set(PARTS)
