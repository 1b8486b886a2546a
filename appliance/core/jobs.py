"""Work longer than a command: run a Space job here, or in a detached worker process.

The jobs are deploy, start, restart and update; the update job (deploy the tracked revision,
remember whether it now serves) lives here so the scheduled update checks can spawn it
without this module importing them back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from .. import stages
from ..config import SETTINGS, Config
from ..errors import ApplianceError, InvalidInput
from . import manifest, sources, spaces

JOBS = ("deploy", "start", "restart", "update")
# Workers this process started; a long-lived spawner (the scheduler) reaps them so that
# finished or killed ones do not linger as zombies.
_children: list[subprocess.Popen] = []


def reap_children() -> None:
    """Collect the exit status of finished workers."""
    _children[:] = [child for child in _children if child.poll() is None]


def run_job(ctx: spaces.Context, space_id: str, job: str, factory: bool = False
            ) -> dict[str, Any]:
    """Run one job for a Space in this process and return the Space's view."""
    if job == "deploy":
        view = spaces.deploy(ctx, space_id, factory=factory)
        if view["stage"] in (stages.CONFIG_ERROR, stages.NO_APP_FILE) and not view["manifest"]:
            remember_card(ctx, space_id)
            view = spaces.describe(ctx, space_id)
        return view
    if job == "start":
        needs_build, view = spaces.start(ctx, space_id)
        return spaces.deploy(ctx, space_id) if needs_build else view
    if job == "restart":
        return spaces.restart(ctx, space_id)
    if job == "update":
        return run_update(ctx, space_id)
    raise InvalidInput(f"Unknown job {job!r}", hint=f"jobs are {', '.join(JOBS)}")


def spawn_job(ctx: spaces.Context, space_id: str, job: str, factory: bool = False) -> int:
    """Run a job in a detached worker process that owns the Space until it is done."""
    config: Config = ctx.config
    env = {**os.environ, **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name])
                            for s in SETTINGS}, "APPLIANCE_ACTOR": ctx.actor}
    command = [sys.executable, "-m", "appliance.cli", "worker", space_id, "--job", job]
    if factory:
        command.append("--factory")
    log_dir = config.data_path / "run"
    log_dir.mkdir(parents=True, exist_ok=True)
    reap_children()
    with open(log_dir / "worker.log", "ab") as log:
        child = subprocess.Popen(command, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
    _children.append(child)
    pid = child.pid
    # The worker owns the busy stage from now on, so its crash is recognised as one.
    ctx.store.update_space(space_id, worker_pid=pid)
    return pid


def remember_card(ctx: spaces.Context, space_id: str) -> None:
    """Keep the title, emoji and colours a Space's README gives even though its front matter
    made no Manifest, so its card and header show them beside the reason it is broken."""
    checkouts, _ = spaces.space_paths(ctx, space_id)
    try:
        fetched = sorted((p for p in checkouts.iterdir() if p.is_dir() and
                          not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    card = manifest.card_fields(fetched[-1]) if fetched else {}
    if card:
        fields = {"manifest": json.dumps(card, ensure_ascii=False)}
        if card.get("title"):
            fields["title"] = card["title"]
        if card.get("sdk"):
            fields["sdk"] = card["sdk"]
        ctx.store.update_space(space_id, **fields)


# -- the update itself (run by a worker) ------------------------------------------------------


def run_update(ctx: spaces.Context, space_id: str) -> dict[str, Any]:
    """Deploy the Space's requested revision, then record whether it now serves it.

    A worker only gets the Space's id, so the commit aimed at is looked up again here (the
    branch's head, or the pinned sha); where the build got as far as fetching, the commit it
    actually built is the one judged.
    """
    row = ctx.store.get_space(space_id)
    try:
        target = sources.remote_head(sources.parse_source(row["source"], ctx.config),
                                     row["revision_request"], ctx.config)
    except ApplianceError:
        target = None  # the deploy's own fetch fails too, and says why in the Space's error
    try:
        spaces.deploy(ctx, space_id)
    finally:
        if ctx.store.find_space(space_id):
            build = ctx.store.latest_build(space_id)
            target = (build and build["revision"]) or target
            if target:
                record_update_outcome(ctx, space_id, target)
    return spaces.describe(ctx, space_id)


def record_update_outcome(ctx: spaces.Context, space_id: str, target_sha: str) -> bool:
    """Clear failed_revision when the Space now serves target_sha, else set it to it."""
    view = spaces.describe(ctx, space_id)
    if view["revision"] == target_sha:
        ctx.store.update_space(space_id, actor=ctx.actor, event="updated",
                               detail={"revision": target_sha}, failed_revision=None)
        return True
    error = (view["error"] or "it did not end serving").splitlines()[0][:300]
    ctx.store.update_space(
        space_id, actor=ctx.actor, event="update-failed",
        detail={"revision": target_sha, "serving": view["revision"], "error": error},
        failed_revision=target_sha)
    return False
