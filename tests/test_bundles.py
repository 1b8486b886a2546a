"""Bundles without Podman: the file format, checksums, signatures, HF cache layouts, the CLI."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.bundle import bundle_group
from appliance.config import load_config
from appliance.core import bundles, packages, spaces
from appliance.errors import ApplianceError, InvalidInput, NotFound

KEY = b"a-shared-key-of-enough-length-123"


def make_bundle(path: Path, parts: dict[str, bytes], key: bytes | None = None,
                models: list | None = None, spaces_: list | None = None) -> dict:
    with open(path, "wb") as fh:
        writer = bundles._TarWriter(fh)
        for name, data in parts.items():
            # Streamed in pieces, as `podman save` arrives.
            writer.add_stream(name, (data[i:i + 1000] for i in range(0, len(data), 1000)))
        manifest = {"format": bundles.FORMAT, "version": bundles.VERSION,
                    "spaces": spaces_ or [],
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


@pytest.mark.parametrize("field, value, says", [
    ("blob", "../../../../../appliance.db", "bad blob"),
    ("blob", "/etc/shadow", "bad blob"),
    ("blob", "a" * 63, "bad blob"),
    ("blob", ["x"], "bad blob"),
    ("path", "../../escape.json", "bad path"),
    ("path", "/abs/config.json", "bad path"),
    ("path", "a//b.json", "bad path"),
    ("path", "a\\b.json", "bad path"),
    ("path", "new\nline.json", "bad path"),
    ("revision", "../../../refs", "bad revision"),
    ("revision", "main\n", "bad revision"),
])
def test_a_model_entry_naming_anything_outside_the_bundle_is_refused(tmp_path, field, value,
                                                                     says):
    """An unsigned bundle's manifest could name the box's database as a model blob, to have it
    copied into the cache volume offline Spaces mount: every name is checked first."""
    files = {"config.json": b"{}"}
    revision = make_hf_cache(tmp_path / "cache", "o/m", files)
    found = bundles.locate_model(bundles.parse_model_spec("o/m"), tmp_path / "cache")
    parts = {f"models/models--o--m/blobs/{b}": p.read_bytes() for b, p in found.blobs.items()}
    model_files = dict(found.files)
    if field == "blob":
        model_files["config.json"] = value
    elif field == "path":
        model_files[value] = next(iter(found.files.values()))
    model = {"repo_id": "o/m", "type": "model", "revision": revision, "dir": "models--o--m",
             "files": model_files,
             "requested_revision": value if field == "revision" else None}
    (tmp_path / "appliance.db").write_bytes(b"SQLite format 3\0 the box's secrets")
    make_bundle(tmp_path / "b.tar", parts, models=[model])
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    with pytest.raises(bundles.BundleError, match=says):
        bundles.model_archive(staged, tmp_path / "cache.tar")
    if (tmp_path / "cache.tar").exists():
        assert b"the box's secrets" not in (tmp_path / "cache.tar").read_bytes()


def test_a_part_the_bundle_does_not_hold_is_never_read(tmp_path):
    make_bundle(tmp_path / "b.tar", PARTS)
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    (tmp_path / "secret").write_text("session key")
    for name in ("../secret", "models/../../secret", "models/x/none", "manifest.json"):
        with pytest.raises(bundles.BundleError, match="names a part it does not hold"):
            staged.part(name)


def test_cli_import_of_a_corrupt_bundle_says_which_part_and_changes_nothing(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"),
                         local_sources=str(tmp_path / "data" / "repos"))
    ctx = spaces.open_context(config, actor="test")
    make_bundle(tmp_path / "b.tar", PARTS)
    data = bytearray((tmp_path / "b.tar").read_bytes())
    data[data.index(b"weights") + 3] ^= 1
    (tmp_path / "b.tar").write_bytes(bytes(data))
    result = CliRunner().invoke(bundle_group, ["import", str(tmp_path / "b.tar"),
                                               "--allow-unsigned"],
                                obj={"ctx": ctx})
    assert result.exit_code == 1
    assert "Part models/models--o--m/blobs/abc" in result.output and "corrupt" in result.output
    assert "Hint: copy the bundle again" in result.output
    assert ctx.store.list_spaces() == []
    assert list((tmp_path / "data" / "bundles").iterdir()) == []  # staging cleaned up
    assert not (tmp_path / "data" / "repos").exists()


def test_a_bundle_whose_signature_cannot_be_checked_is_refused_unless_allowed(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"),
                         local_sources=str(tmp_path / "data" / "repos"))
    ctx = spaces.open_context(config, actor="test")
    make_bundle(tmp_path / "b.tar", PARTS)
    result = CliRunner().invoke(bundle_group, ["import", str(tmp_path / "b.tar")],
                                obj={"ctx": ctx})
    assert result.exit_code == 1
    assert "its signature cannot be checked without the key" in result.output
    assert "--verify KEYFILE" in result.output and "--allow-unsigned" in result.output
    assert not (tmp_path / "data" / "bundles").exists()  # refused before reading it
    strict = spaces.Context(config.with_values(bundle_require_signature=True), ctx.store,
                            ctx.runtime, "test")
    with pytest.raises(bundles.BundleError, match="REQUIRE_SIGNATURE is on"):
        bundles.import_bundle(strict, tmp_path / "b.tar", allow_unsigned=True)
    assert ctx.store.list_spaces() == []


def test_cli_show_prints_the_manifest(tmp_path):
    make_bundle(tmp_path / "b.tar", PARTS)
    result = CliRunner().invoke(bundle_group, ["show", str(tmp_path / "b.tar"), "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["parts"]) == set(PARTS)


# -- package locks and the files they name ------------------------------------------------------

REV_A, REV_A0, REV_B, REV_STALE = "a" * 40, "0" * 40, "b" * 40, "c" * 40
SHARED, ALPHA, OLD, BETA = ("shared-1.0-py3-none-any.whl", "alpha-2.0-py3-none-any.whl",
                            "old-0.1-py3-none-any.whl", "beta-3.0-py3-none-any.whl")
FILES = {SHARED: b"shared wheel " * 50, ALPHA: b"alpha wheel " * 70, OLD: b"old wheel " * 30,
         BETA: b"beta wheel " * 90, "stale-9-py3-none-any.whl": b"never cached"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lock_text(names: list[str], base: str = "https://files.example.invalid/p") -> str:
    """A pylock.toml as uv writes it, with bytes a careless round trip would change."""
    text = ('lock-version = "1.0"\r\ncreated-by = "uv"   \n'
            '# Grüße, "quoted" \\ and a\ttab\nrequires-python = ">=3.11"\n')
    for name in names:
        package, version = name.split("-")[:2]
        text += (f'\n[[packages]]\nname = "{package}"\nversion = "{version}"\n'
                 f'wheels = [{{ url = "{base}/{name}", hashes = {{ sha256 = '
                 f'"{sha(FILES[name])}" }}, size = {len(FILES[name])} }}]\n')
    return text


def lock_row(space_id: str, revision: str, names: list[str], **text_args) -> dict:
    return {"space_id": space_id, "revision": revision, "resolution": "dated",
            "as_of": "2026-01-01T00:00:00Z", "python": "3.11",
            "platform": "x86_64-manylinux_2_36", "text": lock_text(names, **text_args),
            "sdk_packages": json.dumps(["shared"])}


def cache_path(cache: Path, name: str) -> Path:
    return packages.cached_path(cache, packages.Pin(name, "", name, None, sha(FILES[name]),
                                                    None))


def open_box(root: Path, **settings):
    config = load_config({}, data_dir=str(root / "data"), package_cache_dir=str(root / "cache"),
                         local_sources=str(root / "data" / "repos"), **settings)
    ctx = spaces.open_context(config, actor="test")
    for number, (space_id, revision, previous) in enumerate(
            [("team/a", REV_A, REV_A0), ("team/b", REV_B, None)]):
        ctx.store.insert_space({"id": space_id, "source": "/nowhere", "stage": "RUNNING",
                                "port": 17990 + number, "revision": revision,
                                "previous_revision": previous}, "test")
    return ctx


@pytest.fixture
def box(tmp_path):
    """An appliance (no Podman needed) whose two Spaces' locks share a file, all cached."""
    ctx = open_box(tmp_path / "box", package_timeout=5)
    ctx.store.save_lock(lock_row("team/a", REV_A, [SHARED, ALPHA]))
    ctx.store.save_lock(lock_row("team/a", REV_A0, [SHARED, OLD]))
    ctx.store.save_lock(lock_row("team/a", REV_STALE, ["stale-9-py3-none-any.whl"]))
    ctx.store.save_lock(lock_row("team/b", REV_B, [SHARED, BETA]))
    for name in (SHARED, ALPHA, OLD, BETA):
        path = cache_path(ctx.config.package_cache_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(FILES[name])
    yield ctx
    ctx.store.close()


def rows_of(ctx) -> list[dict]:
    return [ctx.store.get_space("team/a"), ctx.store.get_space("team/b")]


def write_package_bundle(path: Path, gathered: bundles.PackageFiles) -> dict:
    """A bundle of the gathered package files, with the manifest entries export writes."""
    with open(path, "wb") as fh:
        writer = bundles._TarWriter(fh)
        bundles.write_packages(writer, gathered)
        manifest = {"format": bundles.FORMAT, "version": bundles.VERSION, "models": [],
                    "images": {"part": bundles.IMAGES_PART, "tags": []},
                    "spaces": [{"id": space_id, "revision": REV_A if space_id == "team/a"
                                else REV_B, "sdk": "gradio", "locks": gathered.locks[space_id],
                                "packages": gathered.files[space_id]}
                               for space_id in gathered.locks],
                    "parts": writer.parts}
        writer.add_bytes(bundles.MANIFEST, json.dumps(manifest).encode())
        writer.close()
    return manifest


def test_export_carries_the_serving_and_previous_locks_and_each_file_once(box, tmp_path):
    gathered = bundles.gather_packages(box, rows_of(box))
    # The serving and the previous revision's locks; never another revision's.
    assert [lock["revision"] for lock in gathered.locks["team/a"]] == [REV_A, REV_A0]
    stored = box.store.get_lock("team/a", REV_A)
    assert gathered.locks["team/a"][0] == {
        "revision": REV_A, "resolution": "dated", "as_of": "2026-01-01T00:00:00Z",
        "python": "3.11", "platform": "x86_64-manylinux_2_36", "text": stored["text"],
        "sdk_packages": ["shared"]}
    assert gathered.files["team/a"] == [
        {"sha256": sha(FILES[name]), "filename": name, "size": len(FILES[name])}
        for name in (ALPHA, OLD, SHARED)]
    assert [f["filename"] for f in gathered.files["team/b"]] == [BETA, SHARED]
    # The file both Spaces lock is one part.
    assert sorted(gathered.paths) == sorted(
        bundles.package_part(sha(FILES[name]), name) for name in (SHARED, ALPHA, OLD, BETA))
    write_package_bundle(tmp_path / "b.tar", gathered)
    with tarfile.open(tmp_path / "b.tar") as tar:
        names = [n for n in tar.getnames() if n.startswith("packages/")]
    assert len(names) == 4 and names.count(f"packages/{sha(FILES[SHARED])}/{SHARED}") == 1
    result = CliRunner().invoke(bundle_group, ["show", str(tmp_path / "b.tar")])
    assert result.exit_code == 0, result.output
    assert "team/a @ aaaaaaaaaaaa (gradio), 2 package lock(s)" in result.output
    assert "4 package files (0.0 MiB)" in result.output
    result = CliRunner().invoke(bundle_group, ["show", str(tmp_path / "b.tar"), "--json"])
    total = sum(len(FILES[name]) for name in (SHARED, ALPHA, OLD, BETA))
    assert json.loads(result.output)["package_files"] == {"count": 4, "size": total}


def test_imported_locks_and_files_round_trip_byte_for_byte(box, tmp_path):
    write_package_bundle(tmp_path / "b.tar", bundles.gather_packages(box, rows_of(box)))
    other = open_box(tmp_path / "other")
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    checked = bundles.check_packages(staged, other.config.package_cache_path)
    bundles.install_packages(checked)
    for name in (SHARED, ALPHA, OLD, BETA):
        assert cache_path(other.config.package_cache_path, name).read_bytes() == FILES[name]
    for rows in checked.locks.values():
        for row in rows:
            other.store.save_lock(row)
    for space_id, revision in (("team/a", REV_A), ("team/a", REV_A0), ("team/b", REV_B)):
        mine, theirs = box.store.get_lock(space_id, revision), \
            other.store.get_lock(space_id, revision)
        assert theirs["text"] == mine["text"] and "\r\n" in theirs["text"]
        assert {k: theirs[k] for k in ("resolution", "as_of", "python", "platform",
                                       "sdk_packages")} == \
            {k: mine[k] for k in ("resolution", "as_of", "python", "platform", "sdk_packages")}
    assert other.store.get_lock("team/a", REV_STALE) is None
    other.store.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        """No access log on the test's stderr."""


def test_export_downloads_a_locked_file_missing_from_the_cache_first(box, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / BETA).write_bytes(FILES[BETA])
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        box.store.save_lock(lock_row("team/b", REV_B, [SHARED, BETA], base=base))
        cached = cache_path(box.config.package_cache_path, BETA)
        cached.unlink()
        lines = []
        gathered = bundles.gather_packages(box, [box.store.get_space("team/b")], lines.append)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert cached.read_bytes() == FILES[BETA]
    assert gathered.paths[bundles.package_part(sha(FILES[BETA]), BETA)] == cached
    assert any("Downloading 1 package files" in line for line in lines)


def test_export_fails_naming_the_space_when_a_missing_file_cannot_be_downloaded(box):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = held.getsockname()[1]
        box.store.save_lock(lock_row("team/b", REV_B, [SHARED, BETA],
                                     base=f"http://127.0.0.1:{port}"))
        cache_path(box.config.package_cache_path, BETA).unlink()
        with pytest.raises(ApplianceError) as caught:
            bundles.gather_packages(box, rows_of(box))
    message = caught.value.message
    assert message.startswith("Cannot export team/b: the package files its lock names are not "
                              f"all in the package cache {box.config.package_cache_path}")
    assert f"Could not download beta 3.0 ({BETA}) from 127.0.0.1:{port}: connection refused" \
        in message
    assert "reaches the package index" in caught.value.hint


GOOD = FILES[SHARED]
GOOD_SHA = sha(GOOD)


def space_entry(packages_: list, locks: list | None = None) -> dict:
    return {"id": "team/a", "revision": REV_A, "sdk": "gradio", "repo": "repos/x.tar",
            "packages": packages_, "locks": locks or []}


@pytest.mark.parametrize(("filename", "digest", "expected"), [
    ("../../appliance.db", GOOD_SHA, "has a refused file name"),
    ("/etc/passwd", GOOD_SHA, "has a refused file name"),
    ("sub/dir.whl", GOOD_SHA, "has a refused file name"),
    (".hidden.whl", GOOD_SHA, "has a refused file name"),
    ("x.whl\n", GOOD_SHA, "has a refused file name"),
    ("nul\x00.whl", GOOD_SHA, "has a refused file name"),
    ("a" * 300 + ".whl", GOOD_SHA, "has a refused file name"),
    (42, GOOD_SHA, "has a refused file name"),
    (SHARED, GOOD_SHA.upper(), "has no valid sha256 (64 lower-case hex digits)"),
    (SHARED, GOOD_SHA[:63], "has no valid sha256 (64 lower-case hex digits)"),
    (SHARED, "../" * 21 + "x", "has no valid sha256 (64 lower-case hex digits)"),
    (SHARED, None, "has no valid sha256 (64 lower-case hex digits)"),
    (SHARED, sha(b"other content"), "is not in the bundle"),
])
def test_hostile_package_file_entries_are_refused_naming_the_entry(tmp_path, filename, digest,
                                                                   expected):
    ctx = open_box(tmp_path)
    make_bundle(tmp_path / "b.tar", {bundles.package_part(GOOD_SHA, SHARED): GOOD},
                spaces_=[space_entry([{"filename": SHARED, "sha256": GOOD_SHA, "size": 1},
                                      {"filename": filename, "sha256": digest, "size": 1}])])
    with pytest.raises(bundles.BundleError) as caught:
        bundles.import_bundle(ctx, tmp_path / "b.tar", allow_unsigned=True)
    # Names are shown as repr(), a long one cut short.
    assert caught.value.message == (f"Package file 2 of team/a ({bundles._shown(filename)}, "
                                    f"sha256 {digest!r}) {expected}"
                                    + (f" (no part packages/{digest}/{SHARED})"
                                       if expected == "is not in the bundle" else ""))
    assert_nothing_written(ctx, tmp_path)


def assert_nothing_written(ctx, root: Path) -> None:
    assert not (ctx.config.package_cache_path / "files").exists()
    assert [p.relative_to(root) for p in root.rglob("appliance.db")] == [
        Path("data/appliance.db")]
    assert list((ctx.config.data_path / "bundles").iterdir()) == []  # staging cleaned up
    assert ctx.store.locks() == []


def test_a_package_entry_whose_part_has_other_content_is_refused(tmp_path):
    ctx = open_box(tmp_path)
    evil = b"not the wheel the lock names"
    make_bundle(tmp_path / "b.tar", {bundles.package_part(GOOD_SHA, SHARED): evil},
                spaces_=[space_entry([{"filename": SHARED, "sha256": GOOD_SHA, "size": 1}])])
    with pytest.raises(bundles.BundleError) as caught:
        bundles.import_bundle(ctx, tmp_path / "b.tar", allow_unsigned=True)
    assert caught.value.message == (
        f"Package file 1 of team/a ({SHARED!r}, sha256 {GOOD_SHA!r}) does not match its "
        f"content: the part hashes to {sha(evil)[:16]}…")
    assert_nothing_written(ctx, tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "escaping name"])
def test_package_members_that_are_links_or_escape_are_refused(tmp_path, kind):
    ctx = open_box(tmp_path)
    path = tmp_path / "b.tar"
    with tarfile.open(path, "w") as tar:
        if kind == "symlink":
            info = tarfile.TarInfo(bundles.package_part(GOOD_SHA, SHARED))
            info.type, info.linkname = tarfile.SYMTYPE, "../../../data/appliance.db"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo(f"packages/{GOOD_SHA}/../../appliance.db")
            info.size = len(GOOD)
            tar.addfile(info, io.BytesIO(GOOD))
    with pytest.raises(bundles.BundleError) as caught:
        bundles.import_bundle(ctx, path, allow_unsigned=True)
    expected = "which is not a plain file" if kind == "symlink" else "refused name"
    assert expected in caught.value.message and f"packages/{GOOD_SHA}/" in caught.value.message
    assert_nothing_written(ctx, tmp_path)


@pytest.mark.parametrize(("change", "expected"), [
    ({"revision": "../x"}, "(revision '../x') has an invalid revision"),
    ({"resolution": "whatever"}, "has an invalid resolution"),
    ({"python": "3.11; rm -rf /"}, "has an invalid python"),
    ({"sdk_packages": "gradio"}, "has an invalid sdk_packages"),
    ({"text": "packages = [ broken"}, "cannot be read: The package lock cannot be read"),
    ({"text": lock_text([SHARED, BETA])},
     f"names {BETA} (sha256 {sha(FILES[BETA])[:16]}…), which the bundle does not carry"),
])
def test_bad_package_locks_are_refused_naming_the_lock(tmp_path, change, expected):
    ctx = open_box(tmp_path)
    lock = {**{k: v for k, v in lock_row("team/a", REV_A, [SHARED]).items()
               if k != "space_id"}, "sdk_packages": ["shared"], **change}
    make_bundle(tmp_path / "b.tar", {bundles.package_part(GOOD_SHA, SHARED): GOOD},
                spaces_=[space_entry([{"filename": SHARED, "sha256": GOOD_SHA, "size": 1}],
                                     [lock])])
    with pytest.raises(bundles.BundleError) as caught:
        bundles.import_bundle(ctx, tmp_path / "b.tar", allow_unsigned=True)
    assert caught.value.message.startswith("Package lock 1 of team/a (revision ")
    assert expected in caught.value.message
    assert_nothing_written(ctx, tmp_path)
