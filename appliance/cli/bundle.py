"""The `appliance bundle` commands: carry Spaces, images and models to a box with no network."""

from __future__ import annotations

from pathlib import Path

import click

from ..core import bundles
from .common import context_of, emit, handles_errors


@click.group(name="bundle")
def bundle_group() -> None:
    """Export Spaces into one file on a connected machine; import it on an offline box.

    Example: appliance bundle export owner/name -o spaces.bundle
    """


def _progress(line: str) -> None:
    click.echo(line, err=True)


@bundle_group.command("export")
@click.argument("space_ids", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle file to write.")
@click.option("--models", "models", multiple=True,
              help="Also carry this model (owner/name, owner/name@rev, datasets/owner/name); "
              "repeat for more. The Spaces' preload_from_hub models are always carried.")
@click.option("--hub-cache", type=click.Path(file_okay=False, path_type=Path),
              help="Hugging Face cache (or plain mirror) to read models from "
              "(default: $HF_HUB_CACHE or ~/.cache/huggingface/hub).")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the manifest with this shared key file (HMAC-SHA256).")
@click.option("--with-appliance", is_flag=True,
              help="Also carry wheels of the appliance and its Python dependencies.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def bundle_export(obj, space_ids, output, models, hub_cache, sign_key, with_appliance,
                  as_json):
    """Write one file holding the Spaces' repos, images and models, with checksums.

    Example: appliance bundle export team/chat team/docs -o spaces.bundle --sign key.txt
    """
    key = bundles.read_key(sign_key) if sign_key else None
    result = bundles.export_bundle(context_of(obj), list(space_ids), output, models=models,
                                   hub_cache=hub_cache, sign_key=key,
                                   with_appliance=with_appliance, log=_progress)
    emit(result, as_json, lambda r: (
        f"Wrote {r['path']} ({r['size'] / 2**20:.0f} MiB{', signed' if r['signed'] else ''}) "
        f"in {r['seconds']} s: {', '.join(r['spaces'])}"
        + (f"; models {', '.join(r['models'])}" if r["models"] else "")
        + (f"; {r['package_files']} package files" if r.get("package_files") else "")))


@bundle_group.command("import")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--verify", "verify_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Require a signature made with this shared key file.")
@click.option("--allow-unsigned", is_flag=True,
              help="Import a bundle whose signature is not checked (its source is trusted).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def bundle_import(obj, bundle, verify_key, allow_unsigned, as_json):
    """Check a bundle whole, then install its images and models and add or update its Spaces.

    A bundle is imported when its signature checks out with the key (--verify or
    APPLIANCE_BUNDLE_VERIFY_KEY), or with --allow-unsigned.

    Example: appliance bundle import spaces.bundle --verify key.txt
    """
    key = bundles.read_key(verify_key) if verify_key else None
    result = bundles.import_bundle(context_of(obj), bundle, key=key, log=_progress,
                                   allow_unsigned=allow_unsigned)

    def text(r: dict) -> str:
        lines = [f"Imported {bundle} in {r['seconds']} s"
                 + (" (signature checked)" if r["signed"] and (key or r["signed"]) else "")]
        for space in r["spaces"]:
            lines.append(f"  {space['id']:<32} {space['stage']:<14} {space['url'] or '-'}"
                         + (f"\n    error: {space['error']}" if space["error"] else ""))
        if r.get("package_files"):
            lines.append(f"  {r['package_files']} package files into the package cache "
                         "(locked rebuilds need no package index)")
        if r["wheels"]:
            lines.append("  wheels for an offline install are in the bundle: "
                         "tar -xf BUNDLE wheels && pip install --no-index --find-links wheels "
                         "appliance")
        return "\n".join(lines)

    emit(result, as_json, text)
    if any(s["error"] and s["stage"] != "RUNNING" for s in result["spaces"]):
        raise SystemExit(1)


@bundle_group.command("show")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def bundle_show(bundle, as_json):
    """Print what a bundle holds (its manifest, unchecked: import checks everything); with
    --json, the manifest and a package_files summary (count, size in bytes).

    Example: appliance bundle show spaces.bundle
    """
    manifest = bundles.read_manifest(bundle)
    summary = bundles.package_summary(manifest)
    emit({**manifest, "package_files": summary}, as_json, lambda m: "\n".join(
        [f"{bundle}: bundle format {m.get('version')}, made {m.get('created_at')}"]
        + [f"  space  {s['id']} @ {s['revision'][:12]} ({s['sdk']})"
           + (f", {len(s['locks'])} package lock(s)" if s.get("locks") else "")
           for s in m["spaces"]]
        + [f"  model  {x['repo_id']} @ {x['revision'][:12]} ({len(x['files'])} files)"
           for x in m["models"]]
        + [f"  image  {t}" for t in m["images"]["tags"]]
        + [f"  {summary['count']} package files ({summary['size'] / 2**20:.1f} MiB)"]
        * bool(summary["count"])
        + [f"  {len(m.get('wheels') or [])} wheels"] * bool(m.get("wheels"))))
