"""Driver tables for tests: a catalog product's table as its driver would report it, and the
X100, a GPU no catalog knows (devcluster/gpu-models/x100.json)."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources

from migcore.catalog import Product
from migcore.driver_table import (
    ComputeProfileEntry,
    GpuInstanceProfileEntry,
    MigTable,
    gpu_instance_profile_name,
)
from migcore.hardware import DiscoveredGpu, NodeGpus

X100_REPORT = json.loads(resources.files("devcluster").joinpath("gpu-models/x100.json").read_text())
X100_TABLE = MigTable.from_json(X100_REPORT["migTables"][0])
X100_PCI = 0x2FFF10DE
X100_SUBSYSTEM = 0x1A2B10DE


def x100(index: int, table: MigTable | None = X100_TABLE) -> DiscoveredGpu:
    return DiscoveredGpu(
        index,
        X100_PCI,
        "NVIDIA X100",
        True,
        pci_subsystem_id=X100_SUBSYSTEM,
        memory_mib=98304,
        mig_table=table,
    )


def from_catalog(product: Product, with_compute: bool = True) -> MigTable:
    """`product`'s table as a driver that agrees with the catalog reports it."""
    assert product.memory_mib is not None
    entries = []
    for gi in product.profiles:
        memory = gi.memory_mib or int((gi.memory_fraction or 0) * product.memory_mib)
        name = gpu_instance_profile_name(gi.nvml_profile_id, gi.slices, memory, product.memory_mib)
        computes = tuple(
            ComputeProfileEntry(
                name.with_compute_slices(ci.slices),
                ci.nvml_ci_profile_id,
                ci.nvml_ci_profile_id,
                ci.slices,
                ci.max_count,
                ci.placements(gi.slices),
            )
            for ci in gi.compute_profiles
        )
        entries.append(
            GpuInstanceProfileEntry(
                name,
                gi.nvml_profile_id,
                gi.smi_profile_id or 0,
                gi.slices,
                memory,
                gi.max_count,
                gi.placements,
                gi.placement_size,
                computes if with_compute else None,
            )
        )
    return MigTable(tuple(entries))


def with_profile(table: MigTable, profile: str, **changes: object) -> MigTable:
    """`table` with one GPU-instance profile's fields changed (a driver that differs)."""
    return MigTable(tuple(replace(p, **changes) if str(p.name) == profile else p for p in table.profiles))  # type: ignore[arg-type]


def report(*gpus: DiscoveredGpu) -> NodeGpus:
    return NodeGpus(gpus)
