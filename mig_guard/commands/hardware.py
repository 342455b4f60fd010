"""`mig-guard hardware`: the hardware report the reconciler would publish, read-only. (a CLI contract)

    mig-guard hardware [--simulated-gpus LABEL:N | --simulated-gpu-spec FILE:N] [--json]
    mig-guard hardware [--simulated-gpus LABEL:N | --simulated-gpu-spec FILE:N] --compare-catalog

Real NVML by default. Nothing is changed: no MIG mode, no instance, no reset. The driver reports
its MIG table only for a GPU with MIG on; simulated GPUs start with MIG on (no instances) so that
theirs can be read. `--json` prints exactly the `mig-guard.io/gpus` annotation's JSON.

Exit codes: 0 printed (with --compare-catalog: the driver and the catalog agree), 1 they
disagree (or a GPU with a table is not in the catalog), 2 usage error, no GPU or driver to read,
or (--compare-catalog) no GPU that reports a table.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mig_guard.commands import flags
from migcore.catalog import format_pci_device_id, load_catalog
from migcore.driver_table import MigTable
from migcore.hardware import DiscoveredGpu, NodeGpus
from reconciler.discovery import catalog_disagreements
from reconciler.gpu_access import GpuError
from reconciler.gpu_backend import make_gpu_access

EXIT_OK = 0
EXIT_DISAGREE = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "hardware",
        help="show the GPUs and the driver's MIG tables as the reconciler reports them (read-only)",
        description="Show this node's GPUs and the driver's MIG tables, as the reconciler would report"
        " them in mig-guard.io/gpus. Read-only: nothing on the GPUs changes.",
    )
    flags.add_simulated_gpus(parser, note=" (MIG on)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the annotation's JSON exactly")
    output.add_argument(
        "--compare-catalog",
        action="store_true",
        help="show where the driver's MIG tables and mig-guard's catalog disagree (exit 1 if they do)",
    )
    parser.set_defaults(func=run)


def read_report(simulated_gpus: str | None, simulated_gpu_spec: str | None) -> NodeGpus:
    """The report from NVML (or the simulator), without changing anything. Raises ValueError
    (a bad simulation spec) or GpuError (no driver, an NVML failure)."""
    simulated = bool(simulated_gpus or simulated_gpu_spec)
    access = make_gpu_access(
        "simulated" if simulated else "nvml",
        simulated_gpus=simulated_gpus,
        simulated_gpu_spec=simulated_gpu_spec,
        mig_enabled=True,
    )
    access.start()
    try:
        return access.discover()
    finally:
        access.stop()


def run(args: argparse.Namespace) -> int:
    try:
        report = read_report(args.simulated_gpus, args.simulated_gpu_spec)
    except (ValueError, GpuError) as exc:
        print(f"mig-guard hardware: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(report.to_annotation())
        return EXIT_OK
    if args.compare_catalog:
        return _compare(report)
    print(render(report))
    return EXIT_OK


def _gpu_line(gpu: DiscoveredGpu) -> str:
    ids = format_pci_device_id(gpu.pci_device_id)
    if gpu.pci_subsystem_id is not None:
        ids += f", subsystem {format_pci_device_id(gpu.pci_subsystem_id)}"
    memory = f", {gpu.memory_mib} MiB" if gpu.memory_mib else ""
    if not gpu.mig_capable:
        state = "not MIG-capable"
    elif gpu.geometry is None or not gpu.geometry.mig_enabled:
        state = "MIG off"
    elif not gpu.geometry.instances:
        state = "MIG on, no instances"
    else:
        state = f"MIG on: {gpu.geometry.summary()}"
    return f"GPU {gpu.index}: {gpu.name} ({ids}{memory}), {state}"


def render_table(table: MigTable) -> list[str]:
    """One row per GPU-instance profile (as `mig-guard profiles` shows the catalog's)."""
    rows = [("PROFILE", "ID", "MAX", "PLACEMENTS (start:size)", "MEMORY", "COMPUTE PROFILES (max)")]
    for entry in table.profiles:
        computes = (
            "not read (no instance yet)"
            if entry.compute_profiles is None
            else ", ".join(f"{c.name} ({c.max_count})" for c in entry.compute_profiles)
        )
        name = str(entry.name) + (f" [nvidia-smi: {entry.driver_name}]" if entry.driver_name else "")
        starts = ",".join(str(s) for s in entry.placements)
        rows.append(
            (
                name,
                f"{entry.profile_id}/{entry.id}",
                str(entry.max_count),
                f"{{{starts}}}:{entry.placement_size}",
                f"{entry.memory_mib} MiB",
                computes,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(report: NodeGpus) -> str:
    lines = [_gpu_line(gpu) for gpu in report.gpus] or ["no GPUs"]
    tables: dict[MigTable, list[int]] = {}
    for gpu in report.gpus:
        if gpu.mig_table is not None:
            tables.setdefault(gpu.mig_table, []).append(gpu.index)
    for table, indexes in tables.items():
        which = ", ".join(str(i) for i in indexes)
        lines += ["", f"driver MIG table of GPU {which} (ID: NVML profile constant / driver id):"]
        lines += render_table(table)
    without = [g.index for g in report.gpus if g.mig_capable and g.mig_table is None]
    if without:
        lines += [
            "",
            f"GPU {', '.join(map(str, without))}: no MIG table (the driver reports it only with MIG on,"
            " and its placements only to a privileged user)",
        ]
    return "\n".join(lines)


def _compare(report: NodeGpus) -> int:
    catalog = load_catalog()
    found = catalog_disagreements(report, catalog)
    with_table = [g for g in report.gpus if g.mig_table is not None]
    if not with_table:
        print(
            "mig-guard hardware: no GPU reports a MIG table (the driver reports it only with MIG on, and"
            " its placements only to a privileged user); nothing to compare",
            file=sys.stderr,
        )
        return EXIT_USAGE
    disagree = False
    for gpu in with_table:
        if gpu.index not in found:
            print(
                f"GPU {gpu.index}: {gpu.name} ({format_pci_device_id(gpu.pci_device_id)}) is not in the catalog"
            )
            disagree = True
            continue
        product, differences = found[gpu.index]
        if not differences:
            print(f"GPU {gpu.index}: {gpu.name}: the driver's MIG table agrees with the catalog's {product}")
            continue
        disagree = True
        print(f"GPU {gpu.index}: {gpu.name}: the driver's MIG table and the catalog's {product} disagree:")
        for line in differences:
            print(f"  {line}")
    for gpu in report.gpus:
        if gpu.mig_capable and gpu.mig_table is None:
            print(f"GPU {gpu.index}: {gpu.name}: MIG off, no MIG table to compare")
    return EXIT_DISAGREE if disagree else EXIT_OK
