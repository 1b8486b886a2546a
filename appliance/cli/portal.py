"""The portal's commands: `appliance serve` (gunicorn), `appliance users`, `appliance tokens`."""

from __future__ import annotations

import os
import sys

import click

from .. import users
from ..errors import InvalidInput
from .common import actor, config_of, context_of, emit, handles_errors


def _read_password(prompt: str) -> str:
    """Read a password: a prompt on a terminal, the first line of stdin otherwise."""
    if sys.stdin.isatty():
        return click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise InvalidInput("No password on stdin", hint="echo 'PASSWORD' | appliance users add ...")
    return line


@click.command("serve")
@click.option("--host", help="Address to listen on (default: the portal_host setting).")
@click.option("--port", type=int, help="Port to listen on (default: the portal_port setting).")
@click.option("--apps-port", type=int,
              help="Port of the Spaces' apps, 0 for the portal's own (default: portal_apps_port).")
@click.option("--workers", type=int, help="gunicorn worker processes (default: portal_workers).")
@click.pass_obj
@handles_errors
def serve_cmd(obj, host, port, apps_port, workers):
    """Run the portal (pages, API, the Spaces' proxy) under gunicorn in the foreground.

    Example: appliance serve --host 0.0.0.0 --port 8080 --apps-port 8081
    """
    config = config_of(obj)
    chosen = {"portal_host": host, "portal_port": port, "portal_apps_port": apps_port,
              "portal_workers": workers}
    for name, value in chosen.items():
        if value is not None:
            config.values[name] = value
    if config.portal_apps_port == config.portal_port:
        raise InvalidInput(f"The apps port and the portal port are both {config.portal_port}",
                           hint="pick another --apps-port, or 0 to serve the apps on the "
                           "portal's port")
    # gunicorn's master runs in a fresh interpreter holding only the settings (this one has
    # imported the whole command line); the options travel as the settings they override.
    os.environ.update({f"APPLIANCE_{name.upper()}": str(config.values[name]) for name in chosen})
    os.execv(sys.executable, [sys.executable, "-m", "appliance.web.server"])


@click.group("users")
def users_group() -> None:
    """Portal users: admin, member (changes Spaces), viewer (looks).

    Example: echo 'long password' | appliance users add alice --role admin
    """


@users_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(users.ROLES), default="member", show_default=True)
@click.option("--replace", is_flag=True, help="Change an existing user's role and password.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def users_add(obj, name, role, replace, as_json):
    """Add a user; the password is read from stdin (prompted on a terminal), never echoed.

    Example: echo 'long password' | appliance users add alice --role admin
    """
    password = _read_password(f"Password for {name}")
    user = users.add_user(context_of(obj).store, name, role, password, actor(), replace)
    emit(user, as_json, lambda u: f"{'Changed' if replace else 'Added'} {u['role']} {u['name']}")


@users_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def users_list(obj, as_json):
    """List users and their roles.

    Example: appliance users list
    """
    rows = context_of(obj).store.list_users()
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['name']:<24} {r['role']:<8} last login {r['last_login_at'] or 'never'}"
        for r in rs) or "No users yet: appliance users add NAME --role admin")


@users_group.command("delete")
@click.argument("name")
@click.pass_obj
@handles_errors
def users_delete(obj, name):
    """Delete a user (their tokens are revoked).

    Example: appliance users delete bob
    """
    users.delete_user(context_of(obj).store, name, actor())
    click.echo(f"Deleted {name}")


@click.group("tokens")
def tokens_group() -> None:
    """API tokens: scoped read or write, shown once, revocable.

    Example: appliance tokens create ci --user alice --scope write
    """


@tokens_group.command("create")
@click.argument("name")
@click.option("--user", "user", required=True, help="The user the token acts as.")
@click.option("--scope", type=click.Choice(users.SCOPES), default="read", show_default=True)
@click.pass_obj
@handles_errors
def tokens_create(obj, name, user, scope):
    """Create a token and print it once on stdout (only its hash is kept).

    Example: appliance tokens create ci --user alice --scope write
    """
    token_id, token = users.create_token(context_of(obj).store, name, user, scope, actor())
    click.echo(token)
    click.echo(f"Token {token_id} ({scope}) for {user}; it is not shown again.", err=True)


@tokens_group.command("list")
@click.option("--user", "user", help="Only this user's tokens.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handles_errors
def tokens_list(obj, user, as_json):
    """List tokens (never their values): scope, last use, revocation.

    Example: appliance tokens list --user alice
    """
    rows = context_of(obj).store.list_tokens(user)
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['id']:>4} {r['name']:<20} {r['user']:<16} {r['scope']:<6} "
        f"used {r['last_used_at'] or 'never'}{'  REVOKED' if r['revoked_at'] else ''}"
        for r in rs) or "No tokens.")


@tokens_group.command("revoke")
@click.argument("token_id", type=int)
@click.pass_obj
@handles_errors
def tokens_revoke(obj, token_id):
    """Revoke a token by its id (from `tokens list`).

    Example: appliance tokens revoke 3
    """
    context_of(obj).store.revoke_token(token_id, actor())
    click.echo(f"Revoked token {token_id}")
