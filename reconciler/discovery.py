"""What the reconciler publishes about the node's GPUs (`mig-guard.io/gpus`), so that the webhook
judges a layout against what the driver offers, not only against the `gpu.product` label.

The report itself is read through NVML by `GpuAccess.discover`; this module turns it into the
annotation and decides when it needs rewriting (not on every resync: only when the GPUs change).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Protocol

from migcore.catalog import Catalog, UnknownProductError
from migcore.driver_table import compare
from migcore.hardware import MAX_ANNOTATION_BYTES, HardwareReportError, NodeGpus
from migcore.keys import ANNOTATION_GPUS
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.metrics import Metrics
from reconciler.node_state import NodeEdit, NodeState

log = logging.getLogger(__name__)


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


def _body(report: NodeGpus) -> str:
    """The report as compared with what was published (the report time aside)."""
    return replace(report, reported_at=None).to_annotation()


class HardwarePublisher:
    """Keeps `mig-guard.io/gpus` on the Node true without rewriting it on every resync: it
    remembers what it published (at start, what the node carries), and logs and counts where a
    GPU's driver table and the catalog disagree, once per sight of new GPUs."""

    def __init__(self, node: NodeState, metrics: Metrics) -> None:
        self.node = node
        self.metrics = metrics
        self.published: str | None = None
        self._observed: str | None = None  # the GPUs as last seen (their catalog check done)

    def look(
        self, gpus: GpuAccess, catalog: Catalog, report: NodeGpus | None = None
    ) -> tuple[NodeGpus, str | None]:
        """The GPUs now, and their annotation text when it differs from what the node says."""
        report = report or gpus.discover()
        body = _body(report)
        # A new agent compares with what the node carries (one read), then with what it wrote.
        if self.published is None and not report_changed(
            self.node.annotations().get(ANNOTATION_GPUS), report
        ):
            self.published = body
        if body != self._observed:  # GPUs seen anew: where their driver and the catalog disagree
            self._observed = body
            self._observe_disagreements(report, catalog)
        self.metrics.observe_geometry({g.index: g.geometry for g in report.gpus if g.geometry is not None})
        return report, (None if body == self.published else report.to_annotation())

    def publish(
        self,
        gpus: GpuAccess,
        catalog: Catalog,
        report: NodeGpus | None = None,
        also: ReportPart | None = None,
    ) -> NodeGpus:
        """Publish the GPUs when they differ from what was published, with `also` (another report,
        e.g. the pods' usage) when it changed: one Node write."""
        report, text = self.look(gpus, catalog, report)
        annotations = {} if also is None else also.patch()
        if text is not None:
            annotations[ANNOTATION_GPUS] = text
        if annotations:
            self.node.apply(NodeEdit(annotations=annotations))
            if text is not None:
                self.published = _body(report)
            if also is not None:
                also.written()
        return report

    def report(self, gpus: GpuAccess, catalog: Catalog) -> GpuReport:
        """The annotation for the last Node write of a change (`reconciler.change.HardwareReport`)."""
        return GpuReport(self, gpus, catalog)

    def _observe_disagreements(self, report: NodeGpus, catalog: Catalog) -> None:
        found = catalog_disagreements(report, catalog)
        self.metrics.observe_disagreements(found)
        for product, differences in dict(found.values()).items():
            if differences:
                log.warning(
                    "the driver's MIG table disagrees with the catalog's %s (verdicts use the driver's): %s",
                    product,
                    "; ".join(differences),
                )


class ReportPart(Protocol):
    """An annotation a Node write may carry (`reconciler.change.HardwareReport`)."""

    def patch(self) -> dict[str, str | None]: ...
    def written(self) -> None: ...


@dataclass
class Reports:
    """Several reports carried by one Node write (the GPUs and the pods' usage)."""

    parts: tuple[ReportPart, ...]

    def patch(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for part in self.parts:
            out.update(part.patch())
        return out

    def written(self) -> None:
        for part in self.parts:
            part.written()


@dataclass
class GpuReport:
    """The GPUs annotation a Node write carries, published once that write succeeded."""

    publisher: HardwarePublisher
    gpus: GpuAccess
    catalog: Catalog
    _pending: str | None = None

    def patch(self) -> dict[str, str | None]:
        """The annotation when it changed (empty when unchanged or unreadable)."""
        self._pending = None
        try:
            report, text = self.publisher.look(self.gpus, self.catalog)
        except GpuError as exc:
            log.warning("could not read the GPUs to publish them: %s", exc)
            return {}
        if text is None:
            return {}
        self._pending = _body(report)
        return {ANNOTATION_GPUS: text}

    def written(self) -> None:
        if self._pending is not None:
            self.publisher.published = self._pending
