"""`mig-guard profiles LABEL`: the MIG profile table of a GPU product, from the catalog.

LABEL is any spelling the catalog knows: the `nvidia.com/gpu.product` value, an NVML name,
a PCI device id or a catalog key. Values no source confirmed for this product are marked `*`.
Exit codes: 0 printed, 2 unknown product.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from migcore.catalog import (
    GpuInstanceProfile,
    Product,
    UnknownProductError,
    format_pci_device_id,
    load_catalog,
)

_HEADERS = ("PROFILE", "ALIASES", "MAX", "PLACEMENTS (start:size)", "MEMORY", "COMPUTE PROFILES (max)")


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "profiles",
        help="show the MIG profiles of a GPU product",
        description="Show the MIG profile table of a GPU product (nvidia.com/gpu.product value).",
    )
    parser.add_argument("label", metavar="LABEL", help="GPU product label, NVML name, PCI id or catalog key")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        product = load_catalog().find(args.label)
    except UnknownProductError as exc:
        print(f"mig-guard profiles: {exc}", file=sys.stderr)
        return 2
    print(render(product))
    return 0


def _mark(profile: GpuInstanceProfile, *fields: str) -> str:
    return "*" if any(f in profile.unconfirmed for f in fields) else ""


def _memory(profile: GpuInstanceProfile) -> str:
    parts = []
    if profile.memory_fraction is not None:
        parts.append(f"{profile.memory_fraction.numerator}/{profile.memory_fraction.denominator}")
    if profile.memory_mib is not None:
        parts.append(f"{profile.memory_mib} MiB{_mark(profile, 'memory_mib')}")
    return " ".join(parts) or "?"


def _row(profile: GpuInstanceProfile) -> tuple[str, ...]:
    placements = ",".join(str(s) for s in profile.placements)
    unconfirmed_ci = any(ci.unconfirmed for ci in profile.compute_profiles)
    compute = ", ".join(
        f"{profile.name.with_compute_slices(ci.slices)} ({ci.max_count})" for ci in profile.compute_profiles
    )
    return (
        str(profile.name),
        ", ".join(str(a) for a in profile.aliases) or "-",
        f"{profile.max_count}{_mark(profile, 'max_count')}",
        f"{{{placements}}}:{profile.placement_size}{_mark(profile, 'placements', 'placement_size')}",
        _memory(profile),
        compute + ("*" if unconfirmed_ci else ""),
    )


def render(product: Product) -> str:
    """The table as text: a product header, one row per GPU-instance profile, footnotes."""
    ids = ", ".join(format_pci_device_id(i) for i in product.pci_device_ids)
    grid_mark = "*" if "placement_grid" in product.unconfirmed else ""
    lines = [
        f"{product.key}: {product.marketing_name}",
        f"  labels: {', '.join(product.gfd_labels) or '-'}",
        f"  PCI ids: {ids}",
        f"  {product.compute_slices} compute slices, {product.memory_slices} memory slices,"
        f" placement grid {product.placement_grid}{grid_mark}, at most {product.max_instances} GPU instances",
        "",
    ]
    rows = [_HEADERS, *(_row(p) for p in product.profiles)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if "*" in "\n".join(lines):
        lines += [
            "",
            "* unconfirmed for this product: inferred from an identical geometry, derived, or nominal",
        ]
    for note in product.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
