"""The `appliance` command line: parse, call one service function, render (text or --json)."""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

import click

from .. import doctor
from ..adapters import router
from ..adapters.runtime import Runtime
from ..config import Config, load_config
from ..core import builds, jobs
from ..errors import ApplianceError
from .bundle import bundle_group
from .common import actor, config_of, context_of, emit, handles_errors
from .gpus import gpus_group
from .portal import serve_cmd, tokens_group, users_group
from .spaces import spaces_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="appliance")
@click.pass_context
def cli(click_ctx: click.Context) -> None:
    """Hugging Face Spaces on your own hardware.

    Example: appliance spaces add hf://spaces/owner/name --wait
    """
    click_ctx.ensure_object(dict)


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
    rows = context_of(obj).store.events(space_id, limit)
    emit(rows, as_json, lambda rs: "\n".join(
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
    config = config_of(obj)
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


@cli.command("migrate")
@click.pass_obj
@handles_errors
def migrate_cmd(obj):
    """Bring the database up to date (a backup is taken first when anything changes).

    Example: appliance migrate
    """
    from ..upkeep import housekeeping

    backup, applied = housekeeping.migrate_with_backup(config_of(obj))
    if not applied:
        click.echo("The database is up to date.")
        return
    if backup:
        click.echo(f"Backed up the database to {backup}")
    click.echo(f"Applied {', '.join(applied)}")


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
    runtime = Runtime(config_of(obj))
    tags = runtime.list_images(builds.BASE_REPOSITORY) + runtime.list_images(
        "localhost/appliance-sdk")
    emit(tags, as_json, lambda ts: "\n".join(ts) or "No images yet.")


@images_group.command("load")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
@handles_errors
def images_load(obj, archive):
    """Load an image archive made by `podman save` (base images, Dockerfile FROM images).

    Example: appliance images load python-3.11.tar
    """
    for tag in Runtime(config_of(obj)).load_image(archive):
        click.echo(f"Loaded {tag}")


@cli.command("worker", hidden=True)
@click.argument("space_id")
@click.option("--job", default="deploy")
@click.option("--factory", is_flag=True)
@click.pass_obj
@handles_errors
def worker_cmd(obj, space_id, job, factory):
    """Run one queued job for a Space (started in the background by other commands)."""
    jobs.run_job(context_of(obj), space_id, job, factory)


@cli.command("router")
@click.option("--stop", is_flag=True, help="Stop the running router instead.")
@click.pass_obj
def router_cmd(obj, stop):
    """Run the front router in the foreground (normally started on demand or by systemd).

    Example: appliance router
    """
    config = config_of(obj)
    if stop:
        router.stop_router(config)
        return
    router.main()


@cli.command("scheduler")
@click.pass_obj
def scheduler_cmd(obj):
    """Run the scheduler in the foreground: reconcile Podman with the database on a schedule.

    Example: appliance scheduler
    """
    from ..upkeep import scheduler

    scheduler.run(config_of(obj))


cli.add_command(spaces_group)
cli.add_command(gpus_group)
cli.add_command(serve_cmd)
cli.add_command(users_group)
cli.add_command(tokens_group)
cli.add_command(bundle_group)


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
    os.environ["APPLIANCE_ACTOR"] = actor()
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
