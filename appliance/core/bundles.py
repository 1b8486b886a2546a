"""Air-gapped bundles: one file with everything some Spaces need on a box with no network.

A bundle is a plain (GNU) tar whose members are all regular files ("parts"):

    repos/<slug>.tar                    the Space's checkout at its commit, .git included
    images/images.tar                   `podman save` (docker-archive) of the Spaces' images,
                                        their SDK layer and base image, layers stored once
    models/<models--o--n>/blobs/<blob>  model / dataset files, each stored once
    packages/<sha256>/<file>            the Python package files the Spaces' locks name, each
                                        stored once (a locked rebuild needs no package index)
    wheels/<file>.whl                   optional: the appliance and its Python dependencies
    manifest.json                       what each part is, with its sha256 and size
    manifest.sig                        optional: HMAC-SHA256 of manifest.json, hex

The manifest comes last so that export streams `podman save` straight into the bundle.
Import streams the tar once into a staging directory inside the data dir, checks every part
(and the signature), every entry of the manifest (Spaces, models, package files and locks)
and every repository tree unpacked there, and only then loads images, fills the shared
Hugging Face cache and adds or updates the Spaces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import io
import json
import os
import re
import secrets as pysecrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from ..adapters.runtime import LABEL_INSTANCE
from ..errors import ApplianceError, Conflict, InvalidInput, NotFound
from ..gpu import claims
from . import builds, packages, sources, spaces
from .manifest import load_manifest

FORMAT = "appliance-bundle"
VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
IMAGES_PART = "images/images.tar"
HF_CACHE_DIR = spaces.HF_HOME
_BLOCK = 512
_CHUNK = 1 << 20
_PART_NAME = re.compile(r"(?:repos|images|models|packages|wheels)/[A-Za-z0-9._@+=!/-]{1,400}")
_REPO_ID = re.compile(r"(?:(datasets|models)/)?([A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})")
_REVISION = re.compile(r"[\w.-]{1,128}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PYTHON_TAG = re.compile(r"\d{1,2}\.\d{1,3}(?:\.\d{1,3})?")
_WORD = re.compile(r"[A-Za-z0-9_:.+-]{1,64}")
LOCK_FIELDS = ("revision", "resolution", "as_of", "python", "platform", "text", "sdk_packages")


class BundleError(ApplianceError):
    """A bundle is unreadable, corrupt, truncated, unsigned or signed with another key."""

    status = 422


Log = Callable[[str], None]


def _quiet(line: str) -> None:
    """Drop a progress line."""


# -- the tar format, written and read by hand -------------------------------------------------


class _TarWriter:
    """Append regular files to a tar; a member of unknown size is streamed and its header
    rewritten afterwards, so `podman save` needs no temporary copy."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.parts: dict[str, dict[str, Any]] = {}

    def _header(self, name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        return info.tobuf(format=tarfile.GNU_FORMAT)

    def add_stream(self, name: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        start = self.fh.tell()
        header = self._header(name, 0)
        self.fh.write(header)
        digest, size = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            self.fh.write(chunk)
            size += len(chunk)
        self.fh.write(b"\0" * (-size % _BLOCK))
        end = self.fh.tell()
        final = self._header(name, size)
        if len(final) != len(header):  # never for the short names the bundle uses
            raise BundleError(f"Cannot write part {name}: its tar header changed length")
        self.fh.seek(start)
        self.fh.write(final)
        self.fh.seek(end)
        entry = {"sha256": digest.hexdigest(), "size": size}
        if name not in (MANIFEST, SIGNATURE):
            self.parts[name] = entry
        return entry

    def add_file(self, name: str, path: Path) -> dict[str, Any]:
        with open(path, "rb") as src:
            return self.add_stream(name, iter(lambda: src.read(_CHUNK), b""))

    def add_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        return self.add_stream(name, [data])

    def close(self) -> None:
        self.fh.write(b"\0" * (_BLOCK * 2))


def sign(manifest_bytes: bytes, key: bytes) -> str:
    """Return the HMAC-SHA256 of the manifest under a shared key, hex."""
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def read_key(path: str | Path) -> bytes:
    """Read a shared signing key file (at least 16 bytes once surrounding whitespace goes)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise InvalidInput(f"Cannot read the key file {path}: {exc.strerror}",
                           hint="make one with 'head -c 32 /dev/urandom | base64 > KEYFILE' "
                           "and copy it to both machines") from None
    if len(key) < 16:
        raise InvalidInput(f"The key file {path} holds {len(key)} bytes; at least 16 are needed",
                           hint="make one with 'head -c 32 /dev/urandom | base64 > KEYFILE'")
    return key


@dataclass
class Staged:
    """A bundle unpacked into a staging directory and checked part by part."""

    root: Path
    manifest: dict[str, Any]
    signed: bool
    trees: dict[str, Path] = field(default_factory=dict)  # repository part -> unpacked tree

    def part(self, name: str) -> Path:
        """The staged file of a part the manifest names; refuse a name that is not a part
        this bundle holds (a manifest's names are never trusted as paths)."""
        path = self.root / name
        if not (isinstance(name, str) and _safe_part(name) and path.is_file()
                and not path.is_symlink() and path.resolve().is_relative_to(self.root.resolve())):
            raise BundleError(f"The bundle's manifest names a part it does not hold: {name!r}",
                              hint="this bundle was altered or is not an appliance bundle")
        return path


def stage_bundle(path: Path, staging: Path, key: bytes | None = None,
                 require_signature: bool = False) -> Staged:
    """Stream the bundle once into `staging`, then check its manifest, signature and every
    part; raise BundleError naming the bad part. Nothing outside `staging` is touched."""
    path = Path(path)
    try:
        total = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(f"Cannot read the bundle {path}: {exc.strerror}") from None
    free = shutil.disk_usage(staging.parent).free
    if total > free:
        raise ApplianceError(
            f"Not enough room to unpack the bundle: it is {total / 2**30:.1f} GiB and "
            f"{staging.parent} has {free / 2**30:.1f} GiB free",
            hint="free some disk space in the data dir first")
    staging.mkdir(parents=True)
    seen: dict[str, dict[str, Any]] = {}
    current = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                current = member.name
                if not member.isfile():
                    raise BundleError(f"The bundle {path} holds {member.name!r}, which is not "
                                      "a plain file", hint="this is not an appliance bundle")
                if member.name not in (MANIFEST, SIGNATURE) and not _safe_part(member.name):
                    raise BundleError(f"The bundle {path} holds a part with a refused name: "
                                      f"{member.name!r}", hint="this is not an appliance bundle")
                if member.name in seen:
                    raise BundleError(f"The bundle {path} holds part {member.name} twice")
                target = staging / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                digest, size = hashlib.sha256(), 0
                with open(target, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                if size != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                seen[member.name] = {"sha256": digest.hexdigest(), "size": size}
                current = None
    except tarfile.TarError as exc:
        where = f" in part {current}" if current else (
            f" after part {list(seen)[-1]}" if seen else " at its start")
        reason = "is truncated" if "end of" in str(exc) or "truncated" in str(exc) \
            else "is corrupt"
        raise BundleError(f"The bundle {path} {reason}{where} ({exc})",
                          hint="copy it again from the connected machine and compare its "
                          "sha256sum") from None
    except OSError as exc:
        raise BundleError(f"Cannot unpack the bundle {path}: {exc}") from None
    if MANIFEST not in seen:
        last = f" (the last part read is {list(seen)[-1]})" if seen else ""
        raise BundleError(f"The bundle {path} has no manifest.json: it is truncated or not a "
                          f"bundle{last}", hint="copy it again from the connected machine")
    raw = (staging / MANIFEST).read_bytes()
    signed = SIGNATURE in seen
    if key is not None or require_signature:
        if not signed:
            raise BundleError(f"The bundle {path} is not signed, and a signature is required",
                              hint="export it with 'appliance bundle export --sign KEYFILE'")
        if key is None:
            raise BundleError("A signed bundle is required but no key was given to check it",
                              hint="pass --verify KEYFILE (the key it was signed with)")
        given = (staging / SIGNATURE).read_text(errors="replace").strip()
        if not hmac.compare_digest(given, sign(raw, key)):
            raise BundleError(f"The signature of {path} does not match the key: the manifest "
                              "was changed or signed with another key",
                              hint="check that both machines hold the same key file")
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT:
            raise ValueError("not an appliance bundle manifest")
        expected = manifest["parts"]
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise BundleError(f"The manifest.json of {path} is corrupt ({exc})",
                          hint="copy the bundle again from the connected machine") from None
    if manifest.get("version") != VERSION:
        raise BundleError(f"The bundle {path} has format version {manifest.get('version')}; "
                          f"this appliance reads version {VERSION}",
                          hint="export it with the same appliance release as this box")
    for name, want in expected.items():
        got = seen.get(name)
        if got is None:
            raise BundleError(f"The bundle {path} lacks part {name}: it is truncated",
                              hint="copy it again from the connected machine")
        if got["size"] != want["size"]:
            raise BundleError(f"Part {name} of {path} is {got['size']} bytes, the manifest says "
                              f"{want['size']}", hint="copy the bundle again")
        if got["sha256"] != want["sha256"]:
            raise BundleError(f"Part {name} of {path} is corrupt: its sha256 is "
                              f"{got['sha256'][:16]}…, the manifest says {want['sha256'][:16]}…",
                              hint="copy the bundle again from the connected machine")
    extra = sorted(set(seen) - set(expected) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError(f"The bundle {path} holds parts its manifest does not list: "
                          f"{', '.join(extra[:5])}", hint="the bundle was altered")
    return Staged(staging, manifest, signed)


def _safe_part(name: str) -> bool:
    return bool(_PART_NAME.fullmatch(name)) and ".." not in name.split("/") \
        and "//" not in name and not name.endswith("/")


# -- models from a local Hugging Face cache or mirror -----------------------------------------


@dataclass
class ModelSpec:
    """One entry of preload_from_hub (or --models): a repository, maybe some files, a revision."""

    repo_id: str
    repo_type: str = "model"
    files: list[str] = field(default_factory=list)
    revision: str | None = None

    @property
    def cache_dir_name(self) -> str:
        return f"{self.repo_type}s--" + self.repo_id.replace("/", "--")


def parse_model_spec(text: str) -> ModelSpec:
    """Read 'owner/name [file1,file2] [revision]' (preload_from_hub) or 'owner/name@rev'."""
    words = str(text).split()
    head = words[0] if words else ""
    revision = None
    if "@" in head:
        head, revision = head.split("@", 1)
    match = _REPO_ID.fullmatch(head)
    if not match or len(words) > 3:
        raise InvalidInput(f"Not a model or dataset: {text!r}",
                           hint="write owner/name, owner/name@revision, datasets/owner/name, "
                           "or 'owner/name file1,file2 revision' as in preload_from_hub")
    files = [f for f in words[1].split(",") if f] if len(words) > 1 else []
    if len(words) > 2:
        revision = words[2]
    if revision is not None and not _REVISION.fullmatch(revision):
        raise InvalidInput(f"Invalid revision {revision!r} in {text!r}")
    kind = "dataset" if match.group(1) == "datasets" else "model"
    return ModelSpec(match.group(2), kind, files, revision)


def default_hub_cache(config) -> Path:
    """Where export looks for models: the hub_cache setting, else what huggingface_hub uses."""
    configured = getattr(config, "bundle_hub_cache", "")
    if configured:
        return Path(configured)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "huggingface")
    return Path(home) / "hub"


@dataclass
class ModelFiles:
    spec: ModelSpec
    revision: str
    files: dict[str, str]  # path in the snapshot -> blob name
    blobs: dict[str, Path]  # blob name -> where it lies on this machine


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def locate_model(spec: ModelSpec, hub_cache: Path) -> ModelFiles:
    """Find a model's files in a Hugging Face cache (models--o--n/…) or a plain mirror
    (o/n/… as `huggingface-cli download --local-dir` leaves them)."""
    cached = hub_cache / spec.cache_dir_name
    mirror = hub_cache / ("datasets/" if spec.repo_type == "dataset" else "") / spec.repo_id
    files: dict[str, str] = {}
    blobs: dict[str, Path] = {}
    if cached.is_dir():
        revision = spec.revision or "main"
        ref = cached / "refs" / revision
        if ref.is_file():
            revision = ref.read_text().strip()
        snapshot = cached / "snapshots" / revision
        if not _HEX40.fullmatch(revision) or not snapshot.is_dir():
            raise NotFound(f"Revision {spec.revision or 'main'} of {spec.repo_id} is not in the "
                           f"Hugging Face cache {hub_cache}",
                           hint=f"download it there: huggingface-cli download {spec.repo_id} "
                           f"--revision {spec.revision or 'main'} --cache-dir {hub_cache}")
        for path in sorted(snapshot.rglob("*")):
            if path.is_dir():
                continue
            real = path.resolve()
            if not real.is_file():
                raise NotFound(f"{spec.repo_id}: {path.relative_to(snapshot)} in the cache "
                               f"{hub_cache} points at a missing file",
                               hint=f"download it again: huggingface-cli download {spec.repo_id}")
            blob = real.name if real.parent == (cached / "blobs").resolve() \
                else _sha256_file(real)
            files[path.relative_to(snapshot).as_posix()] = blob
            blobs[blob] = real
    elif mirror.is_dir():
        listing = hashlib.sha1(usedforsecurity=False)
        for path in sorted(mirror.rglob("*")):
            relative = path.relative_to(mirror).as_posix()
            if path.is_dir() or relative.startswith((".git/", ".cache/")):
                continue
            blob = _sha256_file(path)
            files[relative] = blob
            blobs[blob] = path
            listing.update(f"{relative}\0{blob}\n".encode())
        revision = spec.revision if spec.revision and _HEX40.fullmatch(spec.revision) \
            else listing.hexdigest()
    else:
        raise NotFound(f"{spec.repo_type.capitalize()} {spec.repo_id} is in neither "
                       f"{cached} nor {mirror}",
                       hint=f"download it on this machine first (huggingface-cli download "
                       f"{spec.repo_id} --cache-dir {hub_cache}), or point --hub-cache at the "
                       "cache or mirror that holds it")
    if spec.files:
        files = {p: b for p, b in files.items()
                 if any(fnmatch.fnmatch(p, pattern) for pattern in spec.files)}
        missing = [f for f in spec.files if not any(fnmatch.fnmatch(p, f) for p in files)]
        if missing:
            raise NotFound(f"{spec.repo_id} in {hub_cache} has no file {missing[0]}",
                           hint="check the file names in preload_from_hub / --models")
        blobs = {b: blobs[b] for b in set(files.values())}
    return ModelFiles(spec, revision, files, blobs)


# -- export -----------------------------------------------------------------------------------


def _space_models(row: dict[str, Any]) -> list[str]:
    manifest = json.loads(row["manifest"] or "{}")
    return list(manifest.get("preload_from_hub") or [])


def _checkout_of(ctx, row: dict[str, Any], work: Path) -> Path:
    """The Space's checkout at its serving revision (fetched again if housekeeping pruned it)."""
    checkout = spaces.space_paths(ctx, row["id"])[0] / row["revision"]
    if checkout.is_dir():
        return checkout
    source = sources.parse_source(row["source"], ctx.config)
    dest = work / f"checkout-{pysecrets.token_hex(4)}"
    sources.fetch(source, dest, row["revision"], ctx.config)
    return dest


def _tar_tree(root: Path, out: IO[bytes]) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(root, arcname=".", filter=_owned_by_nobody)


def _owned_by_nobody(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@dataclass
class PackageFiles:
    """The exported Spaces' package locks and the files they name, each file stored once."""

    locks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # Space -> its locks
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # Space -> its files
    paths: dict[str, Path] = field(default_factory=dict)  # part name -> file in the cache

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path in self.paths.values())


def package_part(sha256: str, filename: str) -> str:
    """The bundle part holding a package file (named by its hash, as in the package cache)."""
    return f"packages/{sha256}/{filename}"


def gather_packages(ctx, rows: list[dict[str, Any]], log: Log = _quiet) -> PackageFiles:
    """The locks of each Space's serving and previous revisions and every file they name,
    downloaded into the package cache first where missing (that needs the package index)."""
    cache = ctx.config.package_cache_path
    gathered = PackageFiles()
    for row in rows:
        locks, pins = [], {}
        for revision in dict.fromkeys(r for r in (row["revision"], row["previous_revision"])
                                      if r):
            lock = ctx.store.get_lock(row["id"], revision)
            if lock is None:
                continue
            locks.append({**{k: lock[k] for k in LOCK_FIELDS},
                          "sdk_packages": json.loads(lock["sdk_packages"] or "[]")})
            for pin in packages.parse_lock(lock["text"]):
                if pin.direct:
                    log(f"Note: {row['id']} installs {pin.direct} from its source: a rebuild "
                        "on the offline box needs that source reachable")
                else:
                    pins[package_part(pin.sha256, pin.filename)] = pin
        try:
            if pins:
                packages.fetch(pins.values(), cache, ctx.config, log)
        except ApplianceError as exc:
            raise ApplianceError(
                f"Cannot export {row['id']}: the package files its lock names are not all in "
                f"the package cache {cache}, and downloading them failed: {exc.message}",
                hint="export from a box that reaches the package index (or its mirror), or "
                "rebuild the Space on this box first") from None
        gathered.locks[row["id"]] = locks
        gathered.files[row["id"]] = []
        for part, pin in sorted(pins.items(), key=lambda item: item[1].filename):
            path = packages.cached_path(cache, pin)
            gathered.paths[part] = path
            gathered.files[row["id"]].append({"sha256": pin.sha256, "filename": pin.filename,
                                              "size": path.stat().st_size})
    return gathered


def write_packages(writer: _TarWriter, gathered: PackageFiles) -> None:
    """Add each package file once, checking that what was written hashes as its name says."""
    for part, path in sorted(gathered.paths.items()):
        written = writer.add_file(part, path)
        if written["sha256"] != part.split("/")[1]:
            raise BundleError(f"The package file {path} is corrupt in the package cache: its "
                              f"sha256 is {written['sha256'][:16]}…",
                              hint=f"delete {path.parent} and export again (it is downloaded "
                              "again)")


def package_summary(manifest: dict[str, Any]) -> dict[str, int]:
    """How many package files a bundle carries and their size (each file counted once)."""
    seen = {}
    for space in manifest.get("spaces") or []:
        for item in space.get("packages") or []:
            if isinstance(item, dict):
                seen[(item.get("sha256"), item.get("filename"))] = item.get("size") or 0
    return {"count": len(seen), "size": sum(v for v in seen.values() if isinstance(v, int))}


def export_bundle(ctx, space_ids: list[str], dest: Path, models: Iterable[str] = (),
                  hub_cache: Path | None = None, sign_key: bytes | None = None,
                  with_appliance: bool = False, log: Log = _quiet) -> dict[str, Any]:
    """Write one bundle file holding the Spaces (repo, images), their models and a manifest."""
    dest = Path(dest)
    if not space_ids:
        raise InvalidInput("Name at least one Space to export",
                           hint="appliance bundle export owner/name -o spaces.bundle")
    hub_cache = Path(hub_cache) if hub_cache else default_hub_cache(ctx.config)
    rows = []
    for space_id in dict.fromkeys(space_ids):
        row = ctx.store.get_space(space_id)
        if not row["revision"] or not row["image"] or not ctx.runtime.image_exists(row["image"]):
            raise Conflict(f"Space {space_id} has no built image to export",
                           hint=f"build it first: appliance spaces update {space_id} --wait")
        rows.append(row)
    specs: dict[tuple[str, str], ModelSpec] = {}
    for text in [*models, *(m for row in rows for m in _space_models(row))]:
        spec = parse_model_spec(text)
        key = (spec.repo_type, spec.repo_id)
        if key in specs:  # one revision per repository; the union of requested files
            known = specs[key]
            known.files = [] if not (known.files and spec.files) else known.files + spec.files
        else:
            specs[key] = spec
    found = [locate_model(spec, hub_cache) for spec in specs.values()]  # fail before writing
    gathered = gather_packages(ctx, rows, log)
    images = _images_to_save(ctx, rows)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{pysecrets.token_hex(4)}")
    started = time.monotonic()
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "appliance_version": metadata.version("appliance"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spaces": [], "models": [], "images": {"part": IMAGES_PART, "tags": images},
        "wheels": [],
    }
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".bundle-work-") as work, \
                open(partial, "wb") as fh:
            writer = _TarWriter(fh)
            for row in rows:
                checkout = _checkout_of(ctx, row, Path(work))
                slug = builds.image_repository(row["id"]).split("/", 1)[1]
                part = f"repos/{slug}.tar"
                with tempfile.TemporaryFile(dir=work) as spool:
                    _tar_tree(checkout, spool)
                    spool.seek(0)
                    writer.add_stream(part, iter(lambda s=spool: s.read(_CHUNK), b""))
                log(f"Added the repository of {row['id']} at {row['revision'][:12]}")
                manifest["spaces"].append({
                    "id": row["id"], "revision": row["revision"], "image": row["image"],
                    "sdk": row["sdk"], "hardware": row["hardware"], "repo": part,
                    "title": row["title"],
                    "models": [parse_model_spec(m).repo_id for m in _space_models(row)],
                    "variables": ctx.store.kv("variables", row["id"]),
                    "locks": gathered.locks[row["id"]], "packages": gathered.files[row["id"]],
                })
            log(f"Saving {len(images)} image(s): {', '.join(images)}")
            writer.add_stream(IMAGES_PART, ctx.runtime.save_images(images))
            for model in found:
                directory = model.spec.cache_dir_name
                for blob, where in sorted(model.blobs.items()):
                    writer.add_file(f"models/{directory}/blobs/{blob}", where)
                manifest["models"].append({
                    "repo_id": model.spec.repo_id, "type": model.spec.repo_type,
                    "revision": model.revision, "dir": directory, "files": model.files,
                    "requested_revision": model.spec.revision,
                })
                log(f"Added {model.spec.repo_id} at {model.revision[:12]} "
                    f"({len(model.files)} files)")
            if gathered.paths:
                write_packages(writer, gathered)
                log(f"Added {len(gathered.paths)} package files "
                    f"({gathered.size / 2**20:.0f} MiB)")
            if with_appliance:
                wheels = Path(work) / "wheels"
                download_wheels(wheels, log)
                for wheel in sorted(wheels.iterdir()):
                    writer.add_file(f"wheels/{wheel.name}", wheel)
                    manifest["wheels"].append(wheel.name)
            manifest["parts"] = writer.parts
            raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
            writer.add_bytes(MANIFEST, raw)
            if sign_key is not None:
                writer.add_bytes(SIGNATURE, (sign(raw, sign_key) + "\n").encode())
            writer.close()
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": str(dest), "size": dest.stat().st_size, "signed": sign_key is not None,
            "spaces": [s["id"] for s in manifest["spaces"]],
            "models": [m["repo_id"] for m in manifest["models"]], "images": images,
            "wheels": len(manifest["wheels"]), "package_files": len(gathered.paths),
            "seconds": round(time.monotonic() - started, 2)}


def _images_to_save(ctx, rows: list[dict[str, Any]]) -> list[str]:
    """The Spaces' images plus the SDK and base images they were built on (for offline
    code-only updates); shared layers are stored once in the archive."""
    wanted: list[str] = []
    candidates = ctx.runtime.list_images("localhost/appliance-sdk") + \
        ctx.runtime.list_images(builds.BASE_REPOSITORY)
    if ctx.config.base_image:
        candidates.append(ctx.config.base_image)
    ids = {tag: ctx.runtime.image_id(tag) for tag in candidates}
    for row in rows:
        wanted.append(row["image"])
        ancestors = ctx.runtime.image_ancestors(row["image"])
        wanted += [tag for tag, image_id in ids.items() if image_id in ancestors]
    return list(dict.fromkeys(wanted))


def project_root() -> Path | None:
    """The appliance's source checkout, when it runs from one (a wheel can be built there)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def download_wheels(dest: Path, log: Log = _quiet) -> None:
    """Put wheels of the appliance and all its dependencies in dest (pip, on this machine)."""
    root = project_root()
    if root is None:
        raise NotFound("The appliance's source is not here to build its wheel",
                       hint="run the export from a checkout of the appliance")
    dest.mkdir(parents=True, exist_ok=True)
    log("Building the appliance wheel and downloading its dependencies with pip")
    leftover = root / "build"  # setuptools builds in the source tree: leave it as it was
    had_build_dir = leftover.exists()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest),
             str(root)], capture_output=True, text=True, timeout=1800)
    finally:
        if not had_build_dir:
            shutil.rmtree(leftover, ignore_errors=True)
    if done.returncode != 0:
        tail = " / ".join(done.stderr.strip().splitlines()[-3:])
        raise ApplianceError(f"pip could not gather the appliance's wheels: {tail}",
                             hint="check the package index (PIP_INDEX_URL) and retry")


# -- import -----------------------------------------------------------------------------------


def repos_dir(config) -> Path:
    """Where imported Space repositories live (a local source for later offline updates)."""
    return config.imported_repos_path


def import_bundle(ctx, path: Path, key: bytes | None = None, log: Log = _quiet,
                  allow_unsigned: bool = False) -> dict[str, Any]:
    """Check a bundle whole, then load its images, install its models and add or update its
    Spaces (started from the bundled images, offline). A bad bundle changes nothing.

    A bundle's signature is checked with key (or APPLIANCE_BUNDLE_VERIFY_KEY); one that
    cannot be checked is imported only when allow_unsigned says its source is trusted.
    """
    started = time.monotonic()
    config = ctx.config
    require = bool(getattr(config, "bundle_require_signature", False))
    if key is None and getattr(config, "bundle_verify_key", ""):
        key = read_key(config.bundle_verify_key)
    if key is None and (require or not allow_unsigned):
        raise BundleError(
            f"Not importing {path}: its signature cannot be checked without the key it was "
            "signed with",
            hint="pass --verify KEYFILE (or set APPLIANCE_BUNDLE_VERIFY_KEY); for a bundle "
            "whose source you trust, --allow-unsigned imports it unchecked"
            + (" (refused here: APPLIANCE_BUNDLE_REQUIRE_SIGNATURE is on)" if require else ""))
    bundles_dir = config.data_path / "bundles"
    bundles_dir.mkdir(parents=True, exist_ok=True)
    staging = bundles_dir / f".staging-{pysecrets.token_hex(6)}"
    try:
        log(f"Checking {path}")
        staged = stage_bundle(Path(path), staging, key, require)
        check_models(staged)
        _check_entries(staged)
        checked = check_packages(staged, config.package_cache_path)
        _unpack_repos(staged)
        plans = _plan_spaces(ctx, staged)
        log("Every part checked; installing")
        loaded = _load_images(ctx, staged, log)
        _install_models(ctx, staged, loaded, log)
        install_packages(checked, log)
        results = [_apply_space(ctx, staged, plan, checked.locks.get(plan.entry["id"], []), log)
                   for plan in plans]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"spaces": results, "models": [m["repo_id"] for m in staged.manifest["models"]],
            "images": loaded, "signed": staged.signed,
            "wheels": staged.manifest.get("wheels", []), "package_files": len(checked.files),
            "seconds": round(time.monotonic() - started, 2)}


def _check_entries(staged: Staged) -> None:
    """Check the shape of the manifest's Space and image entries (what later steps index),
    so that a wrong JSON type is refused naming the entry, before anything is installed."""
    manifest = staged.manifest
    hint = "this bundle was altered or not made by an appliance"
    images = manifest.get("images")
    if not (isinstance(images, dict) and isinstance(images.get("part"), str)
            and isinstance(images.get("tags"), list)
            and all(isinstance(tag, str) for tag in images["tags"])):
        raise BundleError(f"The bundle describes its images oddly: {_shown(images)}", hint=hint)
    entries = manifest.get("spaces")
    if not isinstance(entries, list):
        raise BundleError(f"The bundle lists its Spaces oddly: {_shown(entries)}", hint=hint)
    ids, repos = {}, {}
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise BundleError(f"Space entry {number} of the bundle is {_shown(entry)}, not an "
                              "object", hint=hint)
        bad = [key for key in ("id", "repo") if not isinstance(entry.get(key), str)]
        if bad:
            raise BundleError(f"Space entry {number} of the bundle ({_shown(entry.get('id'))}) "
                              f"has no valid {', '.join(bad)}", hint=hint)
        space_id, repo = entry["id"], entry["repo"]
        if space_id in ids:
            raise BundleError(f"The bundle lists Space {_shown(space_id)} twice (entries "
                              f"{ids[space_id]} and {number})", hint=hint)
        if repo in repos:
            raise BundleError(f"Part {_shown(repo)} is named as the repository of both "
                              f"{_shown(repos[repo])} and {_shown(space_id)}", hint=hint)
        ids[space_id], repos[repo] = number, space_id
    if manifest.get("models") and not entries and not images["tags"]:
        raise BundleError("The bundle carries models but no image to unpack them into the "
                          "models' volume with", hint="export the models with a Space")


def _unpack_repos(staged: Staged) -> None:
    """Unpack each Space's repository part into its own folder of staging, outside the
    parts' names (repos/x.tar and a part repos/x cannot collide)."""
    trees = staged.root / "unpacked"
    trees.mkdir()
    for number, space in enumerate(staged.manifest["spaces"], 1):
        archive = staged.part(space["repo"])
        target = trees / str(number)
        target.mkdir()
        try:
            _extract_tree(archive, target)
        except (tarfile.TarError, OSError, ValueError) as exc:
            # ValueError: a name tarfile reads but the OS cannot take (a NUL in a pax name).
            raise BundleError(f"Part {space['repo']} (the repository of {space['id']}) cannot "
                              f"be unpacked: {exc}") from None
        if not (target / ".git").is_dir():
            raise BundleError(f"Part {space['repo']} holds no git repository for {space['id']}")
        sources.defuse_repository(target / ".git")
        staged.trees[space["repo"]] = target




def _extract_tree(archive: Path, target: Path) -> None:
    """Extract a repository tar, refusing anything that would land outside target, and
    then any symlink that leads outside it in the tree as finally unpacked.

    Each member lands at its name read lexically: a name with "..", one under a link or one
    over an earlier member is refused, as git never writes them. A link is kept (git stores
    links) only when its target, read lexically from the link's own folder, stays inside,
    and when following it through the whole unpacked tree never steps outside: it is checked
    against the final tree because a later link can change where an earlier one leads
    (a -> b/x; b -> e/e/../..; e -> .)."""
    root = target.resolve()
    with tarfile.open(archive, mode="r:") as tar:
        for member in tar:
            name = member.name
            if "\x00" in name or "\x00" in member.linkname:
                raise BundleError(f"{archive.name} holds a name with a NUL byte: {_shown(name)}"
                                  + (f" -> {_shown(member.linkname)}" if member.linkname else ""))
            parts = [part for part in name.split("/") if part not in ("", ".")]
            if os.path.isabs(name) or ".." in parts:
                # git never writes "..": refusing it keeps the lexical path the real one
                where = "a path outside its tree" if _leaves(name) else "a path with '..' in it"
                raise BundleError(f"{archive.name} holds {where}: {name}")
            if len(parts) > _MAX_DEPTH or len(os.fsencode(name)) > _MAX_PATH:
                raise BundleError(f"{archive.name} holds a path too long or too deep to unpack: "
                                  f"{_shown(name)}")
            for depth in range(1, len(parts)):
                if os.path.islink(os.path.join(root, *parts[:depth])):
                    raise BundleError(f"{archive.name} holds {_shown(name)} under the link "
                                      f"{'/'.join(parts[:depth])}")
            path = os.path.join(root, *parts)
            if os.path.lexists(path) and not (member.isdir() and os.path.isdir(path)
                                              and not os.path.islink(path)):
                raise BundleError(f"{archive.name} holds {_shown(name)} over what an earlier "
                                  "member unpacked there")
            if member.issym():
                if not parts or os.path.isabs(member.linkname) \
                        or _leaves(os.path.join(*parts[:-1], member.linkname)):
                    raise BundleError(f"{archive.name} holds a link leaving its tree: "
                                      f"{name} -> {member.linkname}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.symlink(member.linkname, path)
                continue
            if not (member.isfile() or member.isdir()):
                raise BundleError(f"{archive.name} holds {name}, not a file or directory")
            member.mode = (member.mode or 0o644) & 0o755 | (0o700 if member.isdir() else 0o600)
            member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
            if not (isinstance(member.mtime, int | float) and 0 <= member.mtime < 2**33):
                member.mtime = 0  # a pax header may say inf or nan, which utime cannot take
            tar.extract(member, root)
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            if os.path.islink(path):
                relative = os.path.relpath(path, root)
                problem = _follow_link(root, relative)
                if problem:
                    raise BundleError(f"{archive.name} holds {problem}: {relative} -> "
                                      f"{os.readlink(path)}")


def _leaves(relative: str) -> bool:
    """Whether a path, read lexically (no link followed), is absolute or climbs out."""
    normal = os.path.normpath(relative)
    return os.path.isabs(normal) or normal == ".." or normal.startswith("../")


_MAX_LINKS = 40  # as Linux follows at most 40 links in one lookup
_MAX_DEPTH = 255  # folders in a repository path (os.makedirs recurses once per folder)
_MAX_PATH = 4095  # bytes, as Linux's PATH_MAX


def _follow_link(root: Path, relative: str) -> str | None:
    """Follow the path relative (a link in root) as the kernel would, one name at a time;
    say what is wrong when a step leaves root (even on the way: a path that leaves and comes
    back by the tree's own name leads elsewhere once the tree is copied) or links loop."""
    pending = relative.split("/")
    where: list[str] = []  # real names from root: never a link
    followed = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if not where:
                return "a link leaving its tree"
            where.pop()
            continue
        path = os.path.join(root, *where, name)
        if not os.path.islink(path):
            where.append(name)  # a folder, a file or nothing: the kernel stops at the last two
            continue
        followed += 1
        if followed > _MAX_LINKS:
            return "links that loop or chain too deep"
        target = os.readlink(path)
        if os.path.isabs(target):
            return "a link leaving its tree"
        pending[:0] = target.split("/")
    return None


@dataclass
class _SpacePlan:
    entry: dict[str, Any]
    exists: bool
    repo: Path


def _plan_spaces(ctx, staged: Staged) -> list[_SpacePlan]:
    """Check that every Space can be applied (names, stages, sources, hardware) before any
    change is made."""
    plans = []
    repos = repos_dir(ctx.config)
    for entry in staged.manifest["spaces"]:
        space_id = sources.validate_space_id(entry["id"])
        if not isinstance(entry.get("revision"), str) or not _HEX40.fullmatch(entry["revision"]):
            raise BundleError(f"The bundle gives {space_id} no valid revision")
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            raise BundleError(f"The bundle gives {space_id} no valid image: "
                              f"{_shown(entry.get('image'))}",
                              hint="this bundle was altered or not made by an appliance")
        slug = builds.image_repository(space_id).split("/", 1)[1]
        repo = repos / slug
        row = ctx.store.find_space(space_id)
        if row is not None:
            row = spaces.recover_abandoned(ctx, space_id)
            if row["stage"] in spaces.stages.BUSY:
                raise Conflict(f"Space {space_id} is busy ({row['stage']}); nothing was imported",
                               hint="wait for it to finish, then import again")
        else:
            claims.check_request(ctx, space_id, entry.get("hardware") or "cpu")
        plans.append(_SpacePlan(entry, row is not None, repo))
    return plans


@dataclass
class CheckedPackages:
    """A bundle's package files and locks, every one checked, ready to install."""

    files: dict[Path, Path] = field(default_factory=dict)  # staged file -> its cache path
    locks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # Space -> lock rows


def check_packages(staged: Staged, cache_dir: Path) -> CheckedPackages:
    """Check every package file the manifest lists (its name, its hash, the content of its
    part) and every lock (it reads, and each file it names is carried); raise BundleError
    naming the entry. Names come from the manifest and are checked before any path is made
    of them; nothing is written."""
    checked = CheckedPackages()
    hashed: dict[str, str] = {}
    root = staged.root.resolve()
    wheelhouse = packages.wheelhouse(cache_dir)
    for space in staged.manifest["spaces"]:
        space_id = space.get("id")
        items = space.get("packages") or []
        if not isinstance(items, list):
            raise BundleError(f"The bundle lists the package files of {space_id} oddly")
        carried: set[tuple[str, str]] = set()
        for number, item in enumerate(items, 1):
            item = item if isinstance(item, dict) else {}
            filename, sha = item.get("filename"), item.get("sha256")
            entry = (f"Package file {number} of {space_id} ({_shown(filename)}, sha256 "
                     f"{_shown(sha)})")
            if not isinstance(filename, str) or not packages.safe_filename(filename):
                raise BundleError(f"{entry} has a refused file name",
                                  hint="this bundle was altered or not made by an appliance")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise BundleError(f"{entry} has no valid sha256 (64 lower-case hex digits)",
                                  hint="this bundle was altered or not made by an appliance")
            part = package_part(sha, filename)
            source = root / "packages" / sha / filename
            if part not in staged.manifest["parts"] or source.is_symlink() \
                    or not source.is_file() or source.resolve().parent.parent != root / "packages":
                raise BundleError(f"{entry} is not in the bundle (no part {part})",
                                  hint="export the bundle again")
            if part not in hashed:
                hashed[part] = _sha256_file(source)
            if hashed[part] != sha:
                raise BundleError(f"{entry} does not match its content: the part hashes to "
                                  f"{hashed[part][:16]}…", hint="this bundle was altered")
            pin = packages.Pin("", "", filename, None, sha, None)
            target = packages.cached_path(cache_dir, pin)
            if target.parent.parent.parent != wheelhouse or target.name != filename:
                raise BundleError(f"{entry} would land outside the package cache")
            checked.files[source] = target
            carried.add((sha, filename))
        checked.locks[space_id] = _check_locks(space, carried)
    return checked


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _check_locks(space: dict[str, Any], carried: set[tuple[str, str]]) -> list[dict[str, Any]]:
    space_id = space.get("id")
    locks = space.get("locks") or []
    if not isinstance(locks, list):
        raise BundleError(f"The bundle lists the package locks of {space_id} oddly")
    rows, revisions = [], set()
    for number, lock in enumerate(locks, 1):
        lock = lock if isinstance(lock, dict) else {}
        revision = lock.get("revision")
        entry = f"Package lock {number} of {space_id} (revision {_shown(revision)})"
        problems = [
            (isinstance(revision, str) and bool(_HEX40.fullmatch(revision)), "revision"),
            (lock.get("resolution") in packages.RESOLUTIONS, "resolution"),
            (isinstance(lock.get("python"), str) and bool(_PYTHON_TAG.fullmatch(lock["python"])),
             "python"),
            (lock.get("platform") is None or isinstance(lock["platform"], str)
             and bool(_WORD.fullmatch(lock["platform"])), "platform"),
            (lock.get("as_of") is None or isinstance(lock["as_of"], str)
             and bool(_WORD.fullmatch(lock["as_of"])), "as_of"),
            (isinstance(lock.get("text"), str), "text"),
            (isinstance(lock.get("sdk_packages"), list)
             and all(isinstance(n, str) for n in lock["sdk_packages"]), "sdk_packages"),
        ]
        bad = [name for ok, name in problems if not ok]
        if bad:
            raise BundleError(f"{entry} has an invalid {', '.join(bad)}",
                              hint="this bundle was altered or not made by an appliance")
        if revision in revisions:
            raise BundleError(f"{entry} is listed twice")
        revisions.add(revision)
        try:
            pins = packages.parse_lock(lock["text"])
        except ApplianceError as exc:
            raise BundleError(f"{entry} cannot be read: {exc.message}") from None
        for pin in pins:
            if pin.filename and (pin.sha256, pin.filename) not in carried:
                raise BundleError(f"{entry} names {pin.filename} (sha256 {pin.sha256[:16]}…), "
                                  "which the bundle does not carry",
                                  hint="export the bundle again")
        rows.append({**{k: lock.get(k) for k in LOCK_FIELDS}, "space_id": space_id,
                     "sdk_packages": json.dumps(lock["sdk_packages"])})
    return rows


def install_packages(checked: CheckedPackages, log: Log = _quiet) -> None:
    """Copy the checked package files into the package cache (a file already there, whole,
    stays); each lands under a temporary name first, so a reader never sees half a file."""
    for source, target in checked.files.items():
        sha = target.parent.name
        if target.is_file() and not target.is_symlink() and _sha256_file(target) == sha:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{pysecrets.token_hex(4)}.part")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    if checked.files:
        log(f"Installed {len(checked.files)} package files into the package cache")


def _load_images(ctx, staged: Staged, log: Log) -> list[str]:
    archive = staged.part(staged.manifest["images"]["part"])
    log(f"Loading images ({archive.stat().st_size / 2**20:.0f} MiB)")
    loaded = ctx.runtime.load_archive(archive)
    wanted = staged.manifest["images"]["tags"]
    missing = [tag for tag in wanted if not ctx.runtime.image_exists(tag)]
    if missing:
        raise BundleError(f"Podman loaded the images but {missing[0]} is not among them",
                          hint="export the bundle again")
    for space in staged.manifest["spaces"]:
        _adopt_image(ctx, space["image"], log)
    return loaded or wanted


def _adopt_image(ctx, image: str, log: Log) -> None:
    """Relabel an imported Space image with this box's instance id, so that this appliance
    (its pruning, rollback and delete) treats it as its own."""
    mine = ctx.config.instance_id
    if ctx.runtime.image_labels(image).get(LABEL_INSTANCE) == mine:
        return
    old_id = ctx.runtime.image_id(image)
    containerfile = f'FROM {image}\nLABEL "{LABEL_INSTANCE}"="{mine}"\n'
    ctx.runtime.build({".appliance.Containerfile": containerfile.encode()},
                      ".appliance.Containerfile", image, {}, {}, {}, False, _quiet,
                      ctx.config.build_timeout)
    if ctx.runtime.image_id(image) != old_id:
        ctx.runtime.remove_image(old_id)
    log(f"Adopted {image} for this appliance")


def model_archive(staged: Staged, dest: Path) -> list[str]:
    """Lay the bundle's models out as a Hugging Face cache (hub/models--o--n/{blobs,
    snapshots/<rev>/…,refs/main}) in a tar; return the top directories it fills."""
    models = check_models(staged)
    tops = []
    with tarfile.open(dest, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add_dir(tar, "hub")
        for model in models:
            top = f"hub/{model['dir']}"
            tops.append(top)
            for sub in ("", "/blobs", "/refs", "/snapshots", f"/snapshots/{model['revision']}"):
                _add_dir(tar, top + sub)
            files = model["files"]
            for blob in sorted(set(files.values())):
                tar.add(staged.part(f"models/{model['dir']}/blobs/{blob}"),
                        arcname=f"{top}/blobs/{blob}", filter=_readable)
            made = set()
            for relative, blob in sorted(files.items()):
                parts = relative.split("/")
                for depth in range(1, len(parts)):
                    folder = "/".join(parts[:depth])
                    if folder not in made:
                        made.add(folder)
                        _add_dir(tar, f"{top}/snapshots/{model['revision']}/{folder}")
                link = tarfile.TarInfo(f"{top}/snapshots/{model['revision']}/{relative}")
                link.type = tarfile.SYMTYPE
                link.linkname = "../" * (len(parts) + 1) + f"blobs/{blob}"
                tar.addfile(link)
            ref = (model["revision"]).encode()
            info = tarfile.TarInfo(f"{top}/refs/{model.get('requested_revision') or 'main'}")
            info.size, info.mode = len(ref), 0o644
            tar.addfile(info, io.BytesIO(ref))
    return tops


_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git blob sha1, LFS sha256
_REF_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_PATH_PART = re.compile(r"[^\x00-\x1f\x7f/\\]{1,255}")
_MODEL_DIR = re.compile(r"(models|datasets)--[\w.-]+--[\w.-]+")


def check_models(staged: Staged) -> list[dict[str, Any]]:
    """Check every model entry of the manifest (its folder, revision, ref, file paths and
    blobs, each blob a part the bundle holds) and return them; raise BundleError naming the
    entry. Runs before anything is installed; nothing is written."""
    models = staged.manifest.get("models")
    if not isinstance(models, list):
        raise BundleError(f"The bundle lists its models oddly: {_shown(models)}",
                          hint="this bundle was altered or not made by an appliance")
    dirs: dict[str, str] = {}
    for number, model in enumerate(models, 1):
        _check_model(model, number)
        name = model.get("repo_id")
        if model["dir"] in dirs:
            raise BundleError(f"Model {name} and model {dirs[model['dir']]} both fill the "
                              f"cache folder {model['dir']}", hint="this bundle was altered")
        dirs[model["dir"]] = name
        for relative, blob in model["files"].items():
            try:
                staged.part(f"models/{model['dir']}/blobs/{blob}")
            except BundleError:
                raise BundleError(f"Model {name} names blob {blob} for {relative!r}, which the "
                                  "bundle does not hold", hint="export the bundle again") from None
    return models


def _check_model(model: Any, number: int) -> None:
    hint = "this bundle was altered or not made by an appliance"
    if not isinstance(model, dict):
        raise BundleError(f"The bundle describes model entry {number} oddly: it is "
                          f"{_shown(model)}, not an object", hint=hint)
    name = model.get("repo_id")
    if not isinstance(name, str) or not _REPO_ID.fullmatch(name):
        raise BundleError(f"The bundle describes model entry {number} oddly: its repo_id is "
                          f"{_shown(name)}", hint=hint)
    folder, revision, files = model.get("dir"), model.get("revision"), model.get("files")
    if not isinstance(folder, str) or not _MODEL_DIR.fullmatch(folder):
        raise BundleError(f"The bundle describes model {name} oddly: its dir is "
                          f"{_shown(folder)}, not a cache folder (models--owner--name)",
                          hint=hint)
    if not isinstance(revision, str) or not _HEX40.fullmatch(revision):
        raise BundleError(f"The bundle describes model {name} oddly: its revision is "
                          f"{_shown(revision)}, not 40 hex digits", hint=hint)
    if not isinstance(files, dict):
        raise BundleError(f"The bundle describes model {name} oddly: its files are "
                          f"{_shown(files)}, not paths mapped to blobs", hint=hint)
    for relative, blob in files.items():
        _check_model_file(model, relative, blob)
    for relative in files:
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            if above in files:
                raise BundleError(f"Model {name} lists {above!r} both as a file and as the "
                                  f"folder of {relative!r}", hint=hint)
    ref_name = model.get("requested_revision") or "main"
    if not isinstance(ref_name, str) or not _REF_NAME.fullmatch(ref_name) or ".." in ref_name:
        raise BundleError(f"Model {name} names a bad revision {str(ref_name)[:80]!r}")


def _check_model_file(model: dict[str, Any], relative: Any, blob: Any) -> None:
    """A model file is a relative path of plain names inside its snapshot, and its blob a
    hash: nothing a manifest says can name a file outside the bundle's own parts."""
    name = model.get("repo_id")
    if not isinstance(blob, str) or not _BLOB_NAME.fullmatch(blob):
        raise BundleError(f"Model {name} names a bad blob {str(blob)[:80]!r} for "
                          f"{str(relative)[:80]!r}", hint="this bundle was altered")
    parts = relative.split("/") if isinstance(relative, str) else []
    if not parts or any(part in (".", "..") or not _PATH_PART.fullmatch(part)
                        for part in parts):
        raise BundleError(f"Model {name} names a bad path {str(relative)[:80]!r}",
                          hint="this bundle was altered")


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def _readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mode = 0o644
    return _owned_by_nobody(info)


def _install_models(ctx, staged: Staged, loaded: list[str], log: Log) -> None:
    if not staged.manifest["models"]:
        return
    archive = staged.root / "hf-cache.tar"
    tops = model_archive(staged, archive)
    # _check_entries made sure there is an image to run the fill in.
    helper_image = staged.manifest["spaces"][0]["image"] if staged.manifest["spaces"] \
        else (loaded or staged.manifest["images"]["tags"])[0]
    ctx.runtime.ensure_volume(spaces.HF_CACHE_VOLUME, {spaces.LABEL_ROLE: "hf-cache"})
    ctx.runtime.fill_volume(spaces.HF_CACHE_VOLUME, archive, helper_image,
                            chown_paths=["hub", *tops])
    log(f"Installed {len(tops)} model(s) into the volume {spaces.HF_CACHE_VOLUME}")


def _apply_space(ctx, staged: Staged, plan: _SpacePlan, locks: list[dict[str, Any]],
                 log: Log) -> dict[str, Any]:
    entry = plan.entry
    space_id, sha, image = entry["id"], entry["revision"], entry["image"]
    unpacked = staged.trees[entry["repo"]]
    plan.repo.parent.mkdir(parents=True, exist_ok=True)
    incoming = plan.repo.with_name(f".{plan.repo.name}.incoming-{pysecrets.token_hex(3)}")
    shutil.copytree(unpacked, incoming, symlinks=True)
    if plan.repo.exists():
        retired = plan.repo.with_name(f".{plan.repo.name}.old-{pysecrets.token_hex(3)}")
        os.replace(plan.repo, retired)
        os.replace(incoming, plan.repo)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(incoming, plan.repo)
    checkouts, _ = spaces.space_paths(ctx, space_id)
    checkout = checkouts / sha
    if not checkout.is_dir():
        checkouts.mkdir(parents=True, exist_ok=True)
        shutil.copytree(unpacked, checkout, symlinks=True)
    manifest = load_manifest(checkout)
    logs = spaces.space_paths(ctx, space_id)[1]
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"build-{int(time.time() * 1000)}.log"
    log_path.write_text(f"==> Imported from an offline bundle: revision {sha}, image {image} "
                        "(no build on this box)\n")
    if plan.exists:
        source = sources.parse_source(str(plan.repo), ctx.config)
        ctx.store.update_space(space_id, actor=ctx.actor, event="bundle-import",
                               detail={"revision": sha}, source=source.url,
                               source_display=source.display, revision_request=sha)
    else:
        spaces.add_space(ctx, str(plan.repo), name=space_id, revision=sha,
                         hardware=entry.get("hardware") or "cpu", from_bundle=True)
        for key, value in (entry.get("variables") or {}).items():
            spaces.set_value(ctx, "variables", space_id, key, value)
    # Models come from the shared cache, never from the Hub: there is no network here. (The
    # cache is mounted because the Space's source is the imported repository, not because of
    # this variable, which tells the app's huggingface_hub not to try the network.)
    spaces.set_value(ctx, "variables", space_id, "HF_HUB_OFFLINE", "1")
    # The locks the bundled images were built with: a rebuild here installs the same files
    # from the package cache, with no package index.
    for lock in locks:
        ctx.store.save_lock(lock)
    ctx.store.update_space(space_id, sdk=manifest.sdk, title=manifest.title,
                           manifest=json.dumps(manifest.to_dict()),
                           warnings=json.dumps(list(manifest.warnings)))
    build_id = ctx.store.start_build(space_id, False, log_path)
    ctx.store.finish_build(build_id, "succeeded", revision=sha, image=image)
    log(f"Starting {space_id} at {sha[:12]}")
    view = spaces.start_revision(ctx, space_id, sha, image, manifest)
    return {"id": space_id, "revision": sha, "stage": view["stage"], "url": view["url"],
            "error": view["error"], "added": not plan.exists}


def read_manifest(path: Path) -> dict[str, Any]:
    """Return a bundle's manifest without unpacking it (for `bundle show`); unchecked."""
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if member.name == MANIFEST:
                    return json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BundleError(f"Cannot read the bundle {path}: {exc}") from None
    raise BundleError(f"The bundle {path} has no manifest.json: it is truncated or not a bundle")


def iter_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """Yield a file's content in 1 MiB chunks."""
    return iter(lambda: fh.read(_CHUNK), b"")
