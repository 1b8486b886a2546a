"""The `appliance gpus` commands: the NVIDIA GPUs read through NVML, and their history."""

from __future__ import annotations

import json

import click

from ..errors import InvalidInput
from .common import context_of, emit, handles_errors


@click.group("gpus")
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
    from ..gpu import nvml

    inventory = nvml.read_inventory().to_dict()
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
    from ..gpu import nvml

    inventory = nvml.read_inventory().to_dict()
    found = [g for g in inventory["gpus"] if g["index"] == index]
    if not found:
        from ..errors import NotFound

        if not inventory["available"]:
            raise NotFound(f"No GPU with index {index}: {inventory['reason']}",
                           hint="run 'appliance doctor' (this box runs CPU Spaces normally)")
        raise NotFound(f"No GPU with index {index}", hint="see 'appliance gpus list'")
    emit(found[0], as_json, lambda g: json.dumps(g, indent=2, sort_keys=True))


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
    from ..gpu import telemetry

    ctx = context_of(obj)

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
    emit(rows, as_json, lambda rs: "\n".join(map(line, rs)) or "No samples in that window")
