"""What every `appliance` command module shares: config and context, error rendering, output."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from ..config import Config, load_config
from ..core import spaces
from ..errors import ApplianceError


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


def config_of(obj: dict) -> Config:
    if "config" not in obj:
        try:
            obj["config"] = load_config()
        except ApplianceError as exc:
            raise ApplianceClickError(exc) from None
    return obj["config"]


def context_of(obj: dict) -> spaces.Context:
    if "ctx" not in obj:
        try:
            obj["ctx"] = spaces.open_context(config_of(obj), actor=actor())
        except ApplianceError as exc:
            raise ApplianceClickError(exc) from None
    return obj["ctx"]


def actor() -> str:
    """Name who typed the command (recorded before root becomes the service account)."""
    if os.environ.get("APPLIANCE_ACTOR"):
        return os.environ["APPLIANCE_ACTOR"]
    name = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"cli:{name}"


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text(data))


def space_line(space: dict) -> str:
    url = space["url"] or "-"
    return f"{space['id']:<32} {space['stage']:<22} {space['sdk'] or '-':<9} {url}"


def space_text(space: dict) -> str:
    lines = [f"{space['emoji'] or ''} {space['title']} ({space['id']})".strip()]
    for key in ("stage", "sdk", "revision", "url", "hardware", "source", "previous_revision"):
        lines.append(f"  {key + ':':<19}{space[key] if space[key] is not None else '-'}")
    for warning in space["warnings"]:
        lines.append(f"  warning:           {warning}")
    if space["error"]:
        lines.append("  error:")
        lines.extend(f"    {line}" for line in space["error"].splitlines())
    return "\n".join(lines)
