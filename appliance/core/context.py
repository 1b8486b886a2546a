"""The service Context every Space operation takes, and where a Space's files live.

Below the Space service (`spaces.py`) so that housekeeping, which prunes what the service
keeps, can use them without importing the service back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.runtime import Runtime
from ..adapters.store import Store, open_store
from ..config import Config
from ..gpu import nvml
from ..gpu.nvml import Inventory
from . import builds


@dataclass
class Context:
    """What every service call needs: settings, the database, Podman, who is acting, and
    how to read the GPUs (NVML; tests hand in an inventory at this seam)."""

    config: Config
    store: Store
    runtime: Runtime
    actor: str = "cli"
    read_inventory: Callable[[], Inventory] = nvml.read_inventory


def open_context(config: Config, actor: str = "cli") -> Context:
    return Context(config, open_store(config.db_path), Runtime(config), actor)


def space_paths(ctx: Context, space_id: str) -> tuple[Path, Path]:
    """Return the Space's checkouts and logs directories under the data dir."""
    slug = builds.image_repository(space_id).split("/", 1)[1]
    return ctx.config.data_path / "checkouts" / slug, ctx.config.data_path / "logs" / slug


def kept_images(ctx: Context, row: dict[str, Any]) -> dict[str, str]:
    """The images kept for rollback, image -> revision: the serving and previous ones, and
    the newest other builds up to images_keep in all."""
    kept = {image: revision for image, revision in (
        (row["image"], row["revision"]), (row["previous_image"], row["previous_revision"]))
        if image}
    limit = max(ctx.config.images_keep, 2)  # the serving and previous ones always stay
    for built in ctx.store.built_revisions(row["id"], limit + 2):
        if len(kept) >= limit:
            break
        kept.setdefault(built["image"], built["revision"])
    return kept
