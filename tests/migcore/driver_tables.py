"""Driver tables for tests: a catalog product's table as its driver would report it, and the
X100, a GPU no catalog knows (devcluster/gpu-models/x100.json)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from devcluster.helpers import gpu_model_file
from migcore.catalog import Product
from migcore.driver_table import MigTable, catalog_table
from migcore.hardware import DiscoveredGpu, NodeGpus

X100_REPORT = json.loads(Path(gpu_model_file("x100.json")).read_text())
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
    table = catalog_table(product)
    if with_compute:
        return table
    return MigTable(tuple(replace(p, compute_profiles=None) for p in table.profiles))


def with_profile(table: MigTable, profile: str, **changes: object) -> MigTable:
    """`table` with one GPU-instance profile's fields changed (a driver that differs)."""
    return MigTable(tuple(replace(p, **changes) if str(p.name) == profile else p for p in table.profiles))  # type: ignore[arg-type]


def report(*gpus: DiscoveredGpu) -> NodeGpus:
    return NodeGpus(gpus)
