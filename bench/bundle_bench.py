"""Benchmark offline bundles: export and import of the example Spaces against plain podman.

Run as root on a box set up by scripts/setup.sh (the service account's Podman API must answer):

    .venv/bin/python bench/bundle_bench.py             # 3 rounds, writes bench/results/bundle.*
    .venv/bin/python bench/bundle_bench.py --rounds 1  # development only

Each round: deploy examples/hello-gradio and a small static Space in a connected appliance
(once), then `appliance bundle export` of both versus `podman save` of the same images, then
on a fresh data dir `appliance bundle import` (Spaces deleted first, so the images really
load) versus `podman load` of the plain archive, and the time from the start of the import
until every Space answers HTTP. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from appliance.adapters import router  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.core import bundles, spaces  # noqa: E402

EXAMPLE = REPO_ROOT / "examples" / "hello-gradio"
STATIC = {"README.md": "---\ntitle: Static bench\nsdk: static\n---\n",
          "index.html": "<h1>static bench</h1>\n"}
PORT_RANGES = ("18400-18439", "18440-18479")  # other benches use 18000-18199


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=Bench", "-c", "user.email=bench@example.com",
                    *args], cwd=cwd, check=True, capture_output=True)


def make_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "bench")
    return path


def podman(*args: str) -> subprocess.CompletedProcess:
    import pwd

    account = pwd.getpwnam("appliance")
    return subprocess.run(["runuser", "-u", "appliance", "--", "env", f"HOME={account.pw_dir}",
                           f"XDG_RUNTIME_DIR=/run/user/{account.pw_uid}", "podman", *args],
                          cwd="/", check=True, capture_output=True, text=True)


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


def one_round(ctx_a, work: Path, ids: list[str], images: list[str]) -> dict[str, float]:
    bundle = work / "spaces.bundle"
    started = time.monotonic()
    bundles.export_bundle(ctx_a, ids, bundle)
    export_s = time.monotonic() - started
    plain = work / "plain.tar"
    plain.parent.chmod(0o777)
    started = time.monotonic()
    podman("save", "-m", "--format", "docker-archive", "-o", "/tmp/bundle-bench-plain.tar",
           *images)
    save_s = time.monotonic() - started
    shutil.move("/tmp/bundle-bench-plain.tar", plain)
    # The offline box: a fresh data dir, and none of the Spaces' images in Podman.
    for space_id in ids:
        for image_id in ctx_a.runtime.images_of(space_id):
            ctx_a.runtime.remove_image(image_id, force=True)
    data_b = work / "box"
    config_b = load_config({}, data_dir=str(data_b), local_sources=str(data_b / "repos"),
                           port_range=PORT_RANGES[1], startup_timeout_cap=300, drain_seconds=1)
    ctx_b = spaces.open_context(config_b, actor="bench")
    try:
        started = time.monotonic()
        result = bundles.import_bundle(ctx_b, bundle, allow_unsigned=True)
        import_s = time.monotonic() - started
        for space in result["spaces"]:
            assert space["stage"] == "RUNNING", space
            deadline = time.monotonic() + 120
            while not answers(space["url"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        healthy_s = time.monotonic() - started
        for space_id in ids:
            spaces.delete(ctx_b, space_id)
    finally:
        router.stop_router(config_b)
        ctx_b.store.close()
        shutil.rmtree(data_b, ignore_errors=True)
    # Plain load of the same images (removed again first so they really load).
    started = time.monotonic()
    podman("load", "-i", str(plain))
    load_s = time.monotonic() - started
    sizes = {"bundle_mb": bundle.stat().st_size / 2**20, "plain_mb": plain.stat().st_size / 2**20}
    bundle.unlink()
    plain.unlink()
    return {"export_s": export_s, "save_s": save_s, "import_s": import_s, "load_s": load_s,
            "import_to_healthy_s": healthy_s, **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bundle-bench-"))
    work.chmod(0o755)
    sources = work / "sources"
    sources.mkdir()
    config_a = load_config({}, data_dir=str(work / "connected"), local_sources=str(sources),
                           port_range=PORT_RANGES[0], startup_timeout_cap=300, drain_seconds=1)
    ctx_a = spaces.open_context(config_a, actor="bench")
    ids = ["bench/hello-gradio", "bench/static"]
    rounds = []
    try:
        hello = make_repo(sources / "hello", {p.name: p.read_text() for p in EXAMPLE.iterdir()})
        static = make_repo(sources / "static", STATIC)
        for space_id, repo in zip(ids, (hello, static), strict=True):
            spaces.add_space(ctx_a, str(repo), name=space_id)
            view = spaces.deploy(ctx_a, space_id)
            assert view["stage"] == "RUNNING", view["error"]
        images = bundles._images_to_save(ctx_a, [ctx_a.store.get_space(i) for i in ids])
        for _ in range(args.rounds):
            # The plain `podman load` at the end of a round brings the images back; a Space
            # whose image is gone anyway is rebuilt from the layer cache.
            for space_id in ids:
                if not ctx_a.runtime.image_exists(ctx_a.store.get_space(space_id)["image"]):
                    spaces.stop(ctx_a, space_id)
                    needs_build, _ = spaces.start(ctx_a, space_id)
                    if needs_build:
                        spaces.deploy(ctx_a, space_id)
            rounds.append(one_round(ctx_a, work, ids, images))
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        for space_id in ids:
            if ctx_a.store.find_space(space_id):
                spaces.delete(ctx_a, space_id)
        router.stop_router(config_a)
        shutil.rmtree(work, ignore_errors=True)
    median = {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}
    median["export_ratio"] = round(median["export_s"] / median["save_s"], 2)
    median["import_ratio"] = round(median["import_s"] / median["load_s"], 2)
    median["size_ratio"] = round(median["bundle_mb"] / median["plain_mb"], 3)
    report = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
              "host": platform.node(), "rounds": len(rounds), "spaces": ids, "images": images,
              "median": median, "all": rounds}
    out = REPO_ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bundle.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Offline bundles: export/import vs plain podman save/load",
        "",
        f"{report['when']}, {len(rounds)} rounds (medians), Spaces: {', '.join(ids)}; "
        f"images: {', '.join(images)}.",
        "",
        "| figure | bundle | plain podman | ratio |",
        "| --- | --- | --- | --- |",
        f"| export / save (s) | {median['export_s']} | {median['save_s']} | "
        f"{median['export_ratio']} |",
        f"| import / load (s) | {median['import_s']} | {median['load_s']} | "
        f"{median['import_ratio']} |",
        f"| size (MiB) | {median['bundle_mb']:.0f} | {median['plain_mb']:.0f} | "
        f"{median['size_ratio']} |",
        f"| import start → every Space answers (s) | {median['import_to_healthy_s']} | – | – |",
        "",
        "Import includes checking every part's sha256, loading the images, adopting them for "
        "the box (a LABEL-only build), installing the repos and starting the Spaces.",
    ]
    (out / "bundle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
