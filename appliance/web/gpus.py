"""The portal's GPU page (readings, allocations, small charts of the last hours) and the
Prometheus `/metrics` endpoint."""

from __future__ import annotations

from collections import Counter
from typing import Any

from flask import Blueprint, Flask, Response, render_template

from ..core import spaces
from ..gpu import claims, telemetry, watchdog
from .base import context, may_see, require

bp = Blueprint("gpus", __name__)
CHART_HOURS = 6
CHART_WIDTH, CHART_HEIGHT = 240, 48


def register(app: Flask) -> None:
    app.register_blueprint(bp)


def sparkline(values: list[float | None], ceiling: float | None = None) -> str:
    """SVG polyline points for a small chart (None readings leave gaps out)."""
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return ""
    top = ceiling or max(known) or 1.0
    step = CHART_WIDTH / (len(values) - 1)
    return " ".join(f"{i * step:.1f},{CHART_HEIGHT - (v / top) * (CHART_HEIGHT - 2) - 1:.1f}"
                    for i, v in enumerate(values) if v is not None)


@bp.get("/gpus")
@require("read")
def gpus_page():
    ctx = context()
    inventory = ctx.read_inventory()
    view = claims.inventory_view(ctx, inventory)
    strangers = watchdog.unattributed_on_gpus(ctx, inventory) or set()
    charts = {}
    for card in view["gpus"]:
        rows = telemetry.history(ctx, card["uuid"], hours=CHART_HOURS)
        charts[card["uuid"]] = {
            "memory": sparkline([r["memory_used_mib"] for r in rows], card["memory_total_mib"]),
            "utilization": sparkline([r["utilization_gpu"] for r in rows], 100),
        }
    allocations = [a for a in view["allocations"]
                   if may_see(spaces.describe(ctx, a["space_id"]))]
    return render_template("gpus.html", view=view, charts=charts, allocations=allocations,
                           strangers=strangers, hours=CHART_HOURS, width=CHART_WIDTH,
                           height=CHART_HEIGHT)


def space_gpu_usage(ctx: spaces.Context, space_id: str) -> dict[str, Any] | None:
    """The Space's GPU memory lately, for its page: the last reading and a small chart."""
    rows = telemetry.usage(ctx, space_id, hours=CHART_HOURS)
    if not rows:
        return None
    now = telemetry.current_mib(ctx, ctx.store.get_space(space_id), hours=CHART_HOURS)
    return {"last_mib": now, "chart": sparkline([r["memory_used_mib"] for r in rows])}


# -- Prometheus -------------------------------------------------------------------------------


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(round(value, 6))


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


METRICS = (
    # (name, help, type)
    ("appliance_gpu_memory_total_bytes", "GPU memory in total.", "gauge"),
    ("appliance_gpu_memory_used_bytes", "GPU memory in use.", "gauge"),
    ("appliance_gpu_utilization_ratio", "GPU busy share over the last sample period.", "gauge"),
    ("appliance_gpu_temperature_celsius", "GPU temperature.", "gauge"),
    ("appliance_gpu_power_watts", "GPU power draw.", "gauge"),
    ("appliance_gpu_processes", "Compute processes on the GPU.", "gauge"),
    ("appliance_space_gpu_memory_allocated_bytes", "A Space's GPU memory budget.", "gauge"),
    ("appliance_space_gpu_memory_used_bytes", "GPU memory a Space's processes hold.", "gauge"),
    ("appliance_space_up", "1 when the Space serves, else 0.", "gauge"),
    ("appliance_spaces", "Spaces per stage.", "gauge"),
    ("appliance_gpus_available", "1 when NVML answered, else 0.", "gauge"),
)
MIB = 1 << 20


def metrics_text(ctx: spaces.Context) -> str:
    """The Prometheus text exposition of the GPUs and the Spaces."""
    samples: dict[str, list[str]] = {name: [] for name, _, _ in METRICS}
    view = claims.inventory_view(ctx)
    samples["appliance_gpus_available"].append(f" {int(bool(view['available']))}")
    for card in view["gpus"]:
        labels = _labels(gpu=card["index"], uuid=card["uuid"], name=card["name"])
        for metric, value, scale in (
                ("appliance_gpu_memory_total_bytes", card["memory_total_mib"], MIB),
                ("appliance_gpu_memory_used_bytes", card["memory_used_mib"], MIB),
                ("appliance_gpu_utilization_ratio", card["utilization_gpu"], 0.01),
                ("appliance_gpu_temperature_celsius", card["temperature_c"], 1),
                ("appliance_gpu_power_watts", card["power_w"], 1),
                ("appliance_gpu_processes", len(card["processes"]), 1)):
            if value is not None:
                samples[metric].append(f"{labels} {_number(value * scale)}")
    listed = [s for s in spaces.list_spaces(ctx) if may_see(s)]
    shown = {s["id"] for s in listed}
    for allocation in view["allocations"]:
        if allocation["space_id"] in shown and allocation["memory_mib"]:
            samples["appliance_space_gpu_memory_allocated_bytes"].append(
                f"{_labels(space=allocation['space_id'])} {allocation['memory_mib'] * MIB}")
    for space in listed:
        used = telemetry.current_mib(ctx, space)
        if used is not None:
            samples["appliance_space_gpu_memory_used_bytes"].append(
                f"{_labels(space=space['id'])} {_number(used * MIB)}")
        serving = int(space["stage"] in spaces.SERVING)
        samples["appliance_space_up"].append(f"{_labels(space=space['id'])} {serving}")
    for stage, count in sorted(Counter(s["stage"] for s in listed).items()):
        samples["appliance_spaces"].append(f"{_labels(stage=stage)} {count}")
    lines = []
    for name, help_text, kind in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [name + sample for sample in samples[name]]
    return "\n".join(lines) + "\n"


@bp.get("/metrics")
@require("read")
def metrics():
    """Prometheus scrape: with a bearer token, or openly where the portal is public."""
    return Response(metrics_text(context()), mimetype="text/plain; version=0.0.4")
