"""The `appliance` command line: parse, call one service function, render (text or --json)."""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from . import builds, doctor, jobs, router, spaces, stages
from .config import Config, load_config
from .errors import ApplianceError, InvalidInput
from .runtime import Runtime


class ApplianceClickError(click.ClickException):
    def __init__(self, error: ApplianceError):
        text = error.message + (f"\nHint: {error.hint}" if error.hint else "")
        super().__init__(text)
        self.exit_code = 2 if error.status == 400 else 1


def handles_errors(func: Callable) -> Callable:
    """Render ApplianceError once, as a ClickException with its hint."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ApplianceError as exc:
            raise ApplianceClickError(exc) from None

    return wrapper


def _config(obj: dict) -> Config:
    if "config" not in obj:
        try:
            obj["config"] = load_config()
        except ApplianceError as exc:
            raise ApplianceClickError(exc) from None
    return obj["config"]


def _ctx(obj: dict) -> spaces.Context:
    if "ctx" not in obj:
        try:
            obj["ctx"] = spaces.open_context(_config(obj), actor=_actor())
        except ApplianceError as exc:
            raise ApplianceClickError(exc) from None
    return obj["ctx"]


def _actor() -> str:
    """Name who typed the command (recorded before root becomes the service account)."""
    if os.environ.get("APPLIANCE_ACTOR"):
        return os.environ["APPLIANCE_ACTOR"]
    name = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"cli:{name}"


def _emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text(data))


def _space_line(space: dict) -> str:
    url = space["url"] or "-"
    return f"{space['id']:<32} {space['stage']:<22} {space['sdk'] or '-':<9} {url}"


def _space_text(space: dict) -> str:
    lines = [f"{space['emoji'] or ''} {space['title']} ({space['id']})".strip()]
    for key in ("stage", "sdk", "revision", "url", "hardware", "source", "previous_revision"):
        lines.append(f"  {key + ':':<19}{space[key] if space[key] is not None else '-'}")
    for warning in space["warnings"]:
        lines.append(f"  warning:           {warning}")
    if space["error"]:
        lines.append("  error:")
        lines.extend(f"    {line}" for line in space["error"].splitlines())
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="appliance")
@click.pass_context
def cli(click_ctx: click.Context) -> None:
    """Hugging Face Spaces on your own hardware.

    Example: appliance spaces add hf://spaces/owner/name --wait
    """
    click_ctx.ensure_object(dict)


@cli.group(name="spaces")
def spaces_group() -> None:
    """Add, run, update and remove Spaces.

    Example: appliance spaces list
    """


def _wait_or_spawn(obj: dict, space_id: str, job: str, wait: bool, factory: bool = False
                   ) -> dict:
    ctx = _ctx(obj)
    if wait:
        return jobs.run_job(ctx, space_id, job, factory)
    jobs.spawn_job(ctx, space_id, job, factory)
    return spaces.describe(ctx, space_id)


def _report(space: dict, as_json: bool) -> None:
    _emit(space, as_json, _space_text)
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
    space = spaces.add_space(_ctx(obj), source, name=name, revision=revision, hardware=hardware)
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
    rows = spaces.list_spaces(_ctx(obj))
    _emit(rows, as_json, lambda rs: "\n".join(map(_space_line, rs)) or "No Spaces yet.")


@spaces_group.command("show")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_show(obj, space_id, as_json):
    """Show one Space: stage, revision, url, error.

    Example: appliance spaces show owner/name --json
    """
    _emit(spaces.describe(_ctx(obj), space_id), as_json, _space_text)


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
    ctx = _ctx(obj)
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
    if follow:
        for chunk in ctx.runtime.follow_logs(row["container"]):
            for line in chunk.splitlines():
                out(line, "run")
    else:
        for line in ctx.runtime.logs(row["container"], tail=tail).splitlines():
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
    needed, space = spaces.request_update(_ctx(obj), space_id, factory=factory,
                                          revision=revision)
    if not needed:
        if not as_json:
            click.echo(f"{space_id} is already at {space['revision']}", err=True)
        _emit(space, as_json, _space_text)
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
    ctx = _ctx(obj)
    if factory:
        spaces.request_update(ctx, space_id, factory=True)
        _report(_wait_or_spawn(obj, space_id, "deploy", wait, True), as_json)
    else:
        _report(spaces.restart(ctx, space_id), as_json)


@spaces_group.command("rollback")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_rollback(obj, space_id, as_json):
    """Serve the previous revision again from its kept image.

    Example: appliance spaces rollback owner/name
    """
    _report(spaces.rollback(_ctx(obj), space_id), as_json)


@spaces_group.command("stop")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_stop(obj, space_id, as_json):
    """Stop a Space (image and /data are kept).

    Example: appliance spaces stop owner/name
    """
    _emit(spaces.stop(_ctx(obj), space_id), as_json, _space_text)


@spaces_group.command("pause")
@click.argument("space_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_pause(obj, space_id, as_json):
    """Pause a Space: stopped until someone starts it.

    Example: appliance spaces pause owner/name
    """
    _emit(spaces.stop(_ctx(obj), space_id, pause=True), as_json, _space_text)


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
    needs_build, space = spaces.start(_ctx(obj), space_id)
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
    view = spaces.set_hardware(_ctx(obj), space_id, request)
    if not as_json:
        click.echo(f"{space_id} asks for {view['hardware']}; restart it to apply: "
                   f"appliance spaces restart {space_id}", err=True)
    _emit(view, as_json, _space_text)


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
    from . import updates

    _emit(updates.set_update_policy(_ctx(obj), space_id, policy, interval, revision),
          as_json, _space_text)


@spaces_group.command("sleep-time")
@click.argument("space_id")
@click.argument("seconds")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def spaces_sleep_time(obj, space_id, seconds, as_json):
    """Sleep after SECONDS without a request (the next request wakes it), or 'never'.

    Example: appliance spaces sleep-time owner/name 3600
    """
    from . import sleep

    if seconds == "never":
        value = None
    elif seconds.isdigit():
        value = int(seconds)
    else:
        raise InvalidInput(f"Sleep time must be a number of seconds or 'never', got {seconds!r}")
    _emit(sleep.set_sleep_time(_ctx(obj), space_id, value), as_json, _space_text)


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
    ctx = _ctx(obj)
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
        spaces.set_value(_ctx(obj), kind, space_id, key, value)
        click.echo(f"Set {noun} {key} on {space_id}; restart the Space to apply it", err=True)

    @group.command("delete", help=f"Delete a {noun}.\n\nExample: appliance spaces {kind} "
                   "delete owner/name KEY")
    @click.argument("space_id")
    @click.argument("key")
    @click.pass_obj
    @handles_errors
    def delete_cmd(obj, space_id, key):
        _ctx(obj).store.delete_kv(kind, space_id, key, _actor())
        click.echo(f"Deleted {noun} {key} from {space_id}", err=True)

    @group.command("list", help=f"List {kind}" + (" (names and dates only)." if secret else ".")
                   + f"\n\nExample: appliance spaces {kind} list owner/name --json")
    @click.argument("space_id")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @handles_errors
    def list_cmd(obj, space_id, as_json):
        ctx = _ctx(obj)
        ctx.store.get_space(space_id)
        if secret:
            rows = ctx.store.kv_meta(kind, space_id)
            _emit(rows, as_json, lambda rs: "\n".join(f"{r['key']}  (set {r['updated_at']})"
                                                      for r in rs))
        else:
            values = ctx.store.kv(kind, space_id)
            _emit(values, as_json, lambda vs: "\n".join(f"{k}={v}" for k, v in vs.items()))

    return group


spaces_group.add_command(_kv_group("secrets", secret=True))
spaces_group.add_command(_kv_group("variables", secret=False))


@cli.command("events")
@click.option("--space", "space_id", help="Only this Space's events.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def events_cmd(obj, space_id, limit, as_json):
    """Show what happened, when, and who did it.

    Example: appliance events --space owner/name
    """
    rows = _ctx(obj).store.events(space_id, limit)
    _emit(rows, as_json, lambda rs: "\n".join(
        f"{r['at']}  {r['actor']:<16} {r['space_id'] or '-':<28} {r['kind']} "
        f"{json.dumps(r['detail']) if r['detail'] else ''}" for r in rs))


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def doctor_cmd(obj, as_json):
    """Check this host for everything rootless Spaces need; print each fix.

    Example: appliance doctor
    """
    config = _config(obj)
    runtime = Runtime(config)

    def base_image_probe() -> tuple[bool, str]:
        name = config.base_image or f"{builds.BASE_REPOSITORY}:*"
        if config.base_image:
            return runtime.image_exists(config.base_image), name
        return bool(runtime.list_images(builds.BASE_REPOSITORY)), name

    checks = doctor.run_checks(config, podman_probe=runtime.info,
                               base_image_probe=base_image_probe)
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        click.echo(doctor.render_text(checks))
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


@cli.group("images")
def images_group() -> None:
    """Base and SDK images on this box.

    Example: appliance images list
    """


@images_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def images_list(obj, as_json):
    """List the base and shared SDK images.

    Example: appliance images list
    """
    runtime = Runtime(_config(obj))
    tags = runtime.list_images(builds.BASE_REPOSITORY) + runtime.list_images(
        "localhost/appliance-sdk")
    _emit(tags, as_json, lambda ts: "\n".join(ts) or "No images yet.")


@images_group.command("load")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
@handles_errors
def images_load(obj, archive):
    """Load an image archive made by `podman save` (base images, Dockerfile FROM images).

    Example: appliance images load python-3.11.tar
    """
    for tag in Runtime(_config(obj)).load_image(archive):
        click.echo(f"Loaded {tag}")


@cli.command("worker", hidden=True)
@click.argument("space_id")
@click.option("--job", default="deploy")
@click.option("--factory", is_flag=True)
@click.pass_obj
@handles_errors
def worker_cmd(obj, space_id, job, factory):
    """Run one queued job for a Space (started in the background by other commands)."""
    jobs.run_job(_ctx(obj), space_id, job, factory)


@cli.command("router")
@click.option("--stop", is_flag=True, help="Stop the running router instead.")
@click.pass_obj
def router_cmd(obj, stop):
    """Run the front router in the foreground (normally started on demand or by systemd).

    Example: appliance router
    """
    config = _config(obj)
    if stop:
        router.stop_router(config)
        return
    router.main()


@cli.group("gpus")
def gpus_group() -> None:
    """NVIDIA GPUs on this box, read through NVML.

    Example: appliance gpus list
    """


def _gpu_line(gpu: dict) -> str:
    memory = (f"{gpu['memory_used_mib']}/{gpu['memory_total_mib']} MiB"
              if gpu["memory_total_mib"] is not None else "memory n/a")
    util = f"{gpu['utilization_gpu']}%" if gpu["utilization_gpu"] is not None else "n/a"
    return (f"{gpu['index']}  {gpu['name']:<28} {gpu['uuid']:<44} {memory:<20} util {util}  "
            f"{len(gpu['processes'])} processes")


@gpus_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def gpus_list(as_json):
    """List the GPUs with memory, utilisation and processes.

    Example: appliance gpus list --json
    """
    from . import gpu

    inventory = gpu.read_inventory().to_dict()
    if as_json:
        click.echo(json.dumps(inventory, indent=2, sort_keys=True))
        return
    if not inventory["available"]:
        click.echo(f"No GPU: {inventory['reason']} (a CPU-only box runs CPU Spaces normally)")
        return
    click.echo(f"driver {inventory['driver_version']}, CUDA {inventory['cuda_version']}")
    for line in map(_gpu_line, inventory["gpus"]):
        click.echo(line)


@gpus_group.command("show")
@click.argument("index", type=int)
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def gpus_show(index, as_json):
    """Show one GPU in full (MIG devices, processes, readings).

    Example: appliance gpus show 0
    """
    from . import gpu

    inventory = gpu.read_inventory().to_dict()
    found = [g for g in inventory["gpus"] if g["index"] == index]
    if not found:
        from .errors import NotFound

        raise NotFound(f"No GPU with index {index}", hint="see 'appliance gpus list'")
    _emit(found[0], as_json, lambda g: json.dumps(g, indent=2, sort_keys=True))


@gpus_group.command("history")
@click.argument("gpu_ref", metavar="[INDEX|UUID]", required=False)
@click.option("--space", "space_id", help="A Space's GPU memory instead of a GPU's readings.")
@click.option("--hours", type=float, default=24.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def gpus_history(obj, gpu_ref, space_id, hours, as_json):
    """Show GPU readings over time: raw samples lately, 5-minute and hourly averages before.

    Example: appliance gpus history 0 --hours 6
    """
    from . import telemetry

    ctx = _ctx(obj)

    def shown(value, unit):
        return "-" if value is None else f"{value:.0f}{unit}"

    if space_id:
        rows = telemetry.usage(ctx, space_id, hours)
        if gpu_ref:
            key = telemetry.resolve_gpu(ctx, gpu_ref)
            rows = [r for r in rows if r["gpu_uuid"] == key]

        def line(r):
            return (f"{r['at']}  {r['gpu_uuid']:<44} {r['resolution']:>5}s  "
                    f"{shown(r['memory_used_mib'], ' MiB')}")
    elif gpu_ref:
        rows = telemetry.history(ctx, gpu_ref, hours)

        def line(r):
            return (f"{r['at']}  {r['resolution']:>5}s  {shown(r['memory_used_mib'], ' MiB'):>10}"
                    f"  {shown(r['utilization_gpu'], '%'):>5}  {shown(r['temperature_c'], ' C'):>5}"
                    f"  {shown(r['power_w'], ' W'):>6}")
    else:
        raise InvalidInput("Name a GPU (index or UUID) or a Space with --space",
                           hint="e.g. 'appliance gpus history 0' or "
                           "'appliance gpus history --space owner/name'")
    _emit(rows, as_json, lambda rs: "\n".join(map(line, rs)) or "No samples in that window")


@cli.command("scheduler")
@click.pass_obj
def scheduler_cmd(obj):
    """Run the scheduler in the foreground: reconcile Podman with the database on a schedule.

    Example: appliance scheduler
    """
    from . import scheduler

    scheduler.run(_config(obj))


def drop_privileges(config: Config) -> None:
    """When root types a command, run it as the service account that owns the data."""
    if os.geteuid() != 0:
        return
    try:
        account = pwd.getpwnam(config.service_user)
    except KeyError:
        return
    try:
        if os.stat(config.data_dir).st_uid != account.pw_uid:
            return
    except OSError:
        return
    cwd = os.getcwd()
    os.environ["APPLIANCE_ACTOR"] = _actor()
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    os.environ.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name,
                      XDG_RUNTIME_DIR=f"/run/user/{account.pw_uid}")
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def main() -> None:
    """Console entry point."""
    try:
        drop_privileges(load_config())
    except ApplianceError as exc:
        raise SystemExit(f"Error: {exc}") from None
    cli(obj={})


if __name__ == "__main__":
    main()
