"""What the reconciler publishes about the node's GPUs (`mig-guard.io/gpus`), so that the webhook
judges a layout against what the driver offers, not only against the `gpu.product` label.

The report itself is read through NVML by `GpuAccess.discover`; this module turns it into the
annotation and decides when it needs rewriting (not on every resync: only when the GPUs change).
"""

from __future__ import annotations

import json

from migcore.catalog import Catalog, UnknownProductError
from migcore.driver_table import compare
from migcore.hardware import MAX_ANNOTATION_BYTES, HardwareReportError, NodeGpus
from migcore.keys import ANNOTATION_GPUS
from reconciler.gpu_access import GpuAccess


def discover(access: GpuAccess) -> NodeGpus:
    """The node's GPUs now (ids, memory, MIG capability, layouts, the driver's MIG tables)."""
    return access.discover()


def gpus_annotation(report: NodeGpus) -> dict[str, str]:
    """The annotation patch for `report`. Raises HardwareReportError if it would not fit the limit."""
    text = report.to_annotation()
    if len(text.encode()) > MAX_ANNOTATION_BYTES:
        raise HardwareReportError(
            f"hardware report is {len(text.encode())} bytes, over {MAX_ANNOTATION_BYTES}"
        )
    return {ANNOTATION_GPUS: text}


def _comparable(text: str) -> object:
    raw = json.loads(text)
    if isinstance(raw, dict):
        raw.pop("reportedAt", None)
    return raw


def report_changed(published: str | None, report: NodeGpus) -> bool:
    """True when the annotation on the node (`published`) says something else than `report`
    (the report time aside), or is missing or unreadable."""
    if not published:
        return True
    try:
        return _comparable(published) != _comparable(report.to_annotation())
    except json.JSONDecodeError:
        return True


def catalog_disagreements(report: NodeGpus, catalog: Catalog) -> dict[int, tuple[str, tuple[str, ...]]]:
    """GPU index -> (catalog product, where its driver's MIG table disagrees with the catalog),
    for every GPU that has both a table and a catalog entry (an empty tuple: they agree)."""
    found: dict[int, tuple[str, tuple[str, ...]]] = {}
    for gpu in report.gpus:
        if gpu.mig_table is None:
            continue
        try:
            product = catalog.by_pci_id(gpu.pci_device_id)
        except UnknownProductError:
            try:
                product = catalog.by_nvml_name(gpu.name)
            except UnknownProductError:
                continue
        found[gpu.index] = (product.key, compare(gpu.mig_table, product))
    return found
