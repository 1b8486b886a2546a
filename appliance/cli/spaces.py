"""The `appliance spaces` commands: add, run, update and remove Spaces."""

from __future__ import annotations

import json
import sys
import time

import click

from .. import stages
from ..core import actions, jobs, spaces
from ..errors import ApplianceError, InvalidInput
from .common import (
    ApplianceClickError,
    actor,
    context_of,
    emit,
    handles_errors,
    space_line,
    space_text,
)


@click.group(name="spaces")
def spaces_group() -> None:
    """Add, run, update and remove Spaces.

    Example: appliance spaces list
    """


def _wait_or_spawn(obj: dict, space_id: str, job: str, wait: bool, factory: bool = False
                   ) -> dict:
    ctx = context_of(obj)
    if wait:
        return jobs.run_job(ctx, space_id, job, factory)
    jobs.spawn_job(ctx, space_id, job, factory)
    return spaces.describe(ctx, space_id)


def _report(space: dict, as_json: bool) -> None:
    emit(space, as_json, space_text)
    if space["stage"] in stages.BUSY:
        return
    if stages.is_error(space["stage"]) or (space["error"] and space["stage"] == stages.RUNNING):
        if not as_json:
            click.echo(f"\nSee the log: appliance spaces logs {space['id']} --build", err=True)
        if stages.is_error(space["stage"]):
            sys.exit(1)


@spaces_group.command("add")
@click.argument("source")
@click.option("--name", help="Space id owner/name (default: taken from the source).")
@click.option("--revision", help="Branch, tag or commit to deploy (default: default branch).")
@click.option("--hardware", default="cpu", show_default=True, help="Hardware to request.")
@click.option("--wait/--no-wait", default=False, help="Build and start now, in this command.")
@click.option("--json", "as_json", is_flag=True, help="Print the Space as JSON.")
@click.pass_obj
@handles_errors
def spaces_add(obj, source, name, revision, hardware, wait, as_json):
    """Add a Space from a Space URL, hf://spaces/owner/name, a git URL or a local path.

    Example: appliance spaces add https://huggingface.co/spaces/owner/name --wait
    """
    space = spaces.add_space(context_of(obj), source, name=name, revision=revision,
                             hardware=hardware)
    if not as_json:
        click.echo(f"Added {space['id']}; building…", err=True)
    _report(_wait_or_spawn(obj, space["id"], "deploy", wait), as_json)


@spaces_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_list(obj, as_json):
    """List the Spaces on this box.

    Example: appliance spaces list --json
    """
    rows = spaces.list_spaces(context_of(obj))
    emit(rows, as_json, lambda rs: "\n".join(map(space_line, rs)) or "No Spaces yet.")


@spaces_group.command("show")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_show(obj, space_id, as_json):
    """Show one Space: stage, revision, url, error.

    Example: appliance spaces show owner/name --json
    """
    emit(spaces.describe(context_of(obj), space_id), as_json, space_text)


@spaces_group.command("logs")
@click.argument("space_id")
@click.option("--build", is_flag=True, help="The latest build log instead of the app's log.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", default=200, show_default=True, help="Lines of the app log to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
@handles_errors
def spaces_logs(obj, space_id, build, follow, tail, as_json):
    """Print a Space's build or run log.

    Example: appliance spaces logs owner/name --build --follow
    """
    ctx = context_of(obj)
    space = spaces.describe(ctx, space_id)

    def out(line: str, kind: str) -> None:
        click.echo(json.dumps({"type": kind, "line": line}) if as_json else line)

    if build:
        path = spaces.build_log_path(ctx, space_id)
        if path is None or not path.exists():
            raise ApplianceClickError(ApplianceError(f"Space {space_id} has no build log yet"))
        with open(path, encoding="utf-8", errors="replace") as fh:
            while True:
                line = fh.readline()
                if line:
                    out(line.rstrip("\n"), "build")
                    continue
                if not follow:
                    break
                latest = ctx.store.latest_build(space_id)
                if latest and latest["status"] != "running":
                    break
                time.sleep(0.2)
        return
    row = ctx.store.get_space(space_id)
    if not row["container"]:
        raise ApplianceClickError(ApplianceError(
            f"Space {space_id} has no running app ({space['stage']})",
            hint=f"see the build log: appliance spaces logs {space_id} --build"))
    # Secret values are hidden here as on the portal: whole lines, so a secret across
    # conmon's 8 KiB split of a long line is hidden too.
    if follow:
        for line in spaces.redactor(ctx, space_id).lines(
                ctx.runtime.follow_logs(row["container"])):
            out(line, "run")
    else:
        for line in spaces.app_log(ctx, space_id, tail=tail).splitlines():
            out(line, "run")


@spaces_group.command("update")
@click.argument("space_id")
@click.option("--revision", help="Switch to this branch, tag or commit.")
@click.option("--factory", is_flag=True, help="Rebuild from scratch, ignoring every cache.")
@click.option("--wait/--no-wait", default=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_update(obj, space_id, revision, factory, wait, as_json):
    """Fetch the newest commit, build it while the old one serves, then switch.

    Example: appliance spaces update owner/name --wait
    """
    needed, space = spaces.request_update(context_of(obj), space_id, factory=factory,
                                          revision=revision)
    if not needed:
        if not as_json:
            click.echo(f"{space_id} is already at {space['revision']}", err=True)
        emit(space, as_json, space_text)
        return
    _report(_wait_or_spawn(obj, space_id, "deploy", wait, factory), as_json)


@spaces_group.command("restart")
@click.argument("space_id")
@click.option("--factory", is_flag=True, help="Rebuild from scratch, ignoring every cache.")
@click.option("--wait/--no-wait", default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_restart(obj, space_id, factory, wait, as_json):
    """Restart a Space (a new container replaces the old one once it answers).

    Example: appliance spaces restart owner/name --factory
    """
    ctx = context_of(obj)
    if factory:
        spaces.request_update(ctx, space_id, factory=True)
        _report(_wait_or_spawn(obj, space_id, "deploy", wait, True), as_json)
    else:
        _report(spaces.restart(ctx, space_id), as_json)


@spaces_group.command("rollback")
@click.argument("space_id")
@click.option("--to", "revision", help="A kept revision (7+ hex digits of its sha); default: "
              "the previous one.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_rollback(obj, space_id, revision, as_json):
    """Serve an earlier revision again from its kept image (images_keep are kept).

    Example: appliance spaces rollback owner/name --to 1a2b3c4
    """
    _report(spaces.rollback(context_of(obj), space_id, revision), as_json)


@spaces_group.command("stop")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_stop(obj, space_id, as_json):
    """Stop a Space (image and /data are kept).

    Example: appliance spaces stop owner/name
    """
    emit(spaces.stop(context_of(obj), space_id), as_json, space_text)


@spaces_group.command("pause")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_pause(obj, space_id, as_json):
    """Pause a Space: stopped until someone starts it.

    Example: appliance spaces pause owner/name
    """
    emit(spaces.stop(context_of(obj), space_id, pause=True), as_json, space_text)


@spaces_group.command("start")
@click.argument("space_id")
@click.option("--wait/--no-wait", default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_start(obj, space_id, wait, as_json):
    """Start a stopped or paused Space.

    Example: appliance spaces start owner/name
    """
    needs_build, space = spaces.start(context_of(obj), space_id)
    if needs_build:
        space = _wait_or_spawn(obj, space_id, "deploy", wait)
    _report(space, as_json)


@spaces_group.command("hardware")
@click.argument("space_id")
@click.argument("request", metavar="cpu|gpu|gpu:N|mig:PROFILE|shared:SIZE")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_hardware(obj, space_id, request, as_json):
    """Ask for hardware (checked against what is free now; applied at the next restart).

    Example: appliance spaces hardware owner/name shared:8g
    """
    view = spaces.set_hardware(context_of(obj), space_id, request)
    if not as_json:
        click.echo(f"{space_id} asks for {view['hardware']}; restart it to apply: "
                   f"appliance spaces restart {space_id}", err=True)
    emit(view, as_json, space_text)


@spaces_group.command("update-policy")
@click.argument("space_id")
@click.argument("policy", metavar="manual|track|pinned")
@click.option("--interval", type=int,
              help="Seconds between looks for new commits (track; at least 60).")
@click.option("--revision", help="The branch to track, or the full commit sha to pin.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_update_policy(obj, space_id, policy, interval, revision, as_json):
    """Update a Space by hand (manual), follow a branch (track) or hold one commit (pinned).

    Example: appliance spaces update-policy owner/name track --interval 3600
    """
    from ..upkeep import updates

    emit(updates.set_update_policy(context_of(obj), space_id, policy, interval, revision),
          as_json, space_text)


@spaces_group.command("health")
@click.argument("space_id")
@click.option("--path", help="URL path to probe (default: the Space's base_path).")
@click.option("--interval", type=float,
              help="Seconds between probes of this Space (default: health_interval).")
@click.option("--reset", is_flag=True, help="Back to the defaults.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_health(obj, space_id, path, interval, reset, as_json):
    """Give a Space a health-check path and interval of its own.

    Example: appliance spaces health owner/name --path /healthz --interval 30
    """
    from ..upkeep import health

    if reset and (path or interval):
        raise InvalidInput("--reset takes no --path or --interval")
    emit(health.set_health(context_of(obj), space_id, path, interval), as_json, space_text)


@spaces_group.command("sleep-time")
@click.argument("space_id")
@click.argument("seconds")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_sleep_time(obj, space_id, seconds, as_json):
    """Sleep after SECONDS without a request (the next request wakes it): plain seconds or a
    duration (30m, 2h, 1h30m), or 'never'.

    Example: appliance spaces sleep-time owner/name 1h30m
    """
    from ..core import actions

    emit(actions.set_sleep_time(context_of(obj), space_id, seconds), as_json, space_text)


def _resolution_text(mode: str) -> str:
    return ("dated, as of each revision's commit time" if mode == "dated"
            else "latest, with the newest versions at build time")


def _lock_text(space: dict) -> str:
    lock = space["lock"]
    if lock is None:
        if space["sdk"] in ("docker", "static"):
            why = ("its Dockerfile installs its own" if space["sdk"] == "docker"
                   else "it runs no Python of its own")
            return (f"{space['id']} is a {space['sdk']} Space: the appliance locks no Python "
                    f"packages for it ({why}).")
        if not space["revision"]:
            return (f"{space['id']} has not been built yet: its packages are locked when a "
                    "revision is first built.")
        return (f"No packages are locked for revision {space['revision'][:12]} of "
                f"{space['id']} (built before locks were kept, or its locks were forgotten); "
                f"the next build resolves them {_resolution_text(space['resolution_effective'])}.")
    when = f"as of {lock['as_of']}" if lock["as_of"] else "with the newest versions then"
    lines = [f"Resolved {lock['resolution']} {when} for Python {lock['python']} "
             f"({lock['platform'] or 'unknown platform'}), locked {lock['created_at'][:19]}Z"]
    width = max((len(p["name"]) for p in lock["packages"]), default=0)
    lines.extend(f"{p['name']:<{width}}  {p['version']}" for p in lock["packages"])
    return "\n".join(lines)


@spaces_group.command("packages")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True, help="Print the lock as JSON (null: none).")
@click.pass_obj
@handles_errors
def spaces_packages(obj, space_id, as_json):
    """List the Python packages locked for the revision a Space serves.

    Example: appliance spaces packages owner/name
    """
    space = spaces.describe(context_of(obj), space_id)
    if as_json:
        emit(space["lock"], True, str)
    else:
        click.echo(_lock_text(space))


@spaces_group.command("resolution")
@click.argument("space_id")
@click.argument("resolution", metavar="dated|latest|default")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_resolution(obj, space_id, resolution, as_json):
    """Resolve a Space's packages as of each revision's commit time (dated), with today's
    versions (latest), or as the box does (default); locked revisions keep their lock.

    Example: appliance spaces resolution owner/name latest
    """
    view = actions.set_resolution(context_of(obj), space_id, resolution)
    if not as_json:
        source = "its own choice" if view["resolution"] else "the box's default"
        click.echo(f"{space_id}'s next unlocked build resolves its packages "
                   f"{_resolution_text(view['resolution_effective'])} ({source}); revisions "
                   f"already locked keep their lock (to resolve again: appliance spaces relock "
                   f"{space_id})", err=True)
    emit(view, as_json, space_text)


@spaces_group.command("relock")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_relock(obj, space_id, as_json):
    """Forget a Space's package locks, so its next build resolves its packages again (what
    runs now is untouched).

    Example: appliance spaces relock owner/name
    """
    ctx = context_of(obj)
    count = actions.forget_locks(ctx, space_id)
    if as_json:
        emit({"ok": True, "forgotten": count}, True, str)
        return
    mode = spaces.describe(ctx, space_id)["resolution_effective"]
    click.echo(f"Forgot {count} package lock{'' if count == 1 else 's'} of {space_id}; its "
               f"next build resolves its packages again ({_resolution_text(mode)}). Rebuild "
               f"now: appliance spaces restart {space_id} --factory")


@spaces_group.command("delete")
@click.argument("space_id")
@click.option("--keep-data", is_flag=True, help="Keep the Space's /data volume.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@handles_errors
def spaces_delete(obj, space_id, keep_data, yes):
    """Delete a Space: its containers, images, checkouts and logs (and /data unless kept).

    Example: appliance spaces delete owner/name --yes
    """
    ctx = context_of(obj)
    ctx.store.get_space(space_id)
    if not yes:
        click.confirm(f"Delete {space_id}" + ("" if keep_data else " and its /data"),
                      abort=True)
    spaces.delete(ctx, space_id, keep_data=keep_data)
    click.echo(f"Deleted {space_id}", err=True)


def _kv_group(kind: str, secret: bool) -> click.Group:
    noun = kind[:-1]

    @click.group(name=kind, help=f"Manage a Space's {kind}.\n\nExample: appliance spaces "
                 f"{kind} list owner/name")
    def group() -> None:
        pass

    @group.command("set", help=(
        f"Set a {noun}" + (" (value read from stdin, never echoed)." if secret else ".")
        + f"\n\nExample: appliance spaces {kind} set owner/name KEY"
        + ("" if secret else " VALUE")))
    @click.argument("space_id")
    @click.argument("key")
    @click.argument("value", required=not secret, default=None)
    @click.pass_obj
    @handles_errors
    def set_cmd(obj, space_id, key, value):
        if secret:
            if value is not None:
                raise InvalidInput("Secret values are read from stdin, not the command line",
                                   hint=f"printf %s VALUE | appliance spaces secrets set "
                                   f"{space_id} {key}")
            value = (click.prompt(f"Value for {key}", hide_input=True) if sys.stdin.isatty()
                     else sys.stdin.read().rstrip("\n"))
        spaces.set_value(context_of(obj), kind, space_id, key, value)
        click.echo(f"Set {noun} {key} on {space_id}; restart the Space to apply it", err=True)

    @group.command("delete", help=f"Delete a {noun}.\n\nExample: appliance spaces {kind} "
                   "delete owner/name KEY")
    @click.argument("space_id")
    @click.argument("key")
    @click.pass_obj
    @handles_errors
    def delete_cmd(obj, space_id, key):
        context_of(obj).store.delete_kv(kind, space_id, key, actor())
        click.echo(f"Deleted {noun} {key} from {space_id}", err=True)

    @group.command("list", help=f"List {kind}" + (" (names and dates only)." if secret else ".")
                   + f"\n\nExample: appliance spaces {kind} list owner/name --json")
    @click.argument("space_id")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @handles_errors
    def list_cmd(obj, space_id, as_json):
        ctx = context_of(obj)
        ctx.store.get_space(space_id)
        if secret:
            rows = ctx.store.kv_meta(kind, space_id)
            emit(rows, as_json, lambda rs: "\n".join(f"{r['key']}  (set {r['updated_at']})"
                                                      for r in rs))
        else:
            values = ctx.store.kv(kind, space_id)
            emit(values, as_json, lambda vs: "\n".join(f"{k}={v}" for k, v in vs.items()))

    return group


spaces_group.add_command(_kv_group("secrets", secret=True))
spaces_group.add_command(_kv_group("variables", secret=False))
