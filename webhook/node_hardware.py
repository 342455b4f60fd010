"""Which GPUs a Node has, as the webhook can tell from the Node object alone.

The reconciler's hardware report (annotation `mig-guard.io/gpus`) wins when present and
readable; otherwise GPU Feature Discovery's product and count labels. Results are cached by
their inputs: the same few products and reports come back on every request.
"""

from __future__ import annotations

from dataclasses import dataclass

from kube.node import NodeView
from migcore import keys
from migcore.catalog import Catalog, UnknownProductError
from migcore.check import NodeHardware, hardware_from_labels, hardware_from_report
from migcore.geometry import GpuGeometry
from migcore.hardware import HardwareReportError, NodeGpus
from migcore.memo import LruCache

CACHE_SIZE = 256


@dataclass(frozen=True)
class HardwareFinding:
    """The node's hardware (None when it cannot be told), how it was found, and any warnings."""

    hardware: NodeHardware | None
    source: str
    warnings: tuple[str, ...] = ()
    # The GPUs' layouts now, from the report (index, layout or None); empty from labels.
    layouts: tuple[tuple[int, GpuGeometry | None], ...] = ()


def parse_gpu_count(text: str | None) -> int | None:
    """The `nvidia.com/gpu.count` label as a number; None when absent or not a count."""
    if text is None or not text.isdigit() or len(text) > 6:
        return None
    return int(text)


class HardwareResolver:
    """Turns a NodeView into NodeHardware, with a bounded cache shared by request threads."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._cache: LruCache[tuple[str, ...], HardwareFinding] = LruCache(CACHE_SIZE)

    def find(self, node: NodeView) -> HardwareFinding:
        report = node.annotations.get(keys.ANNOTATION_GPUS)
        product = node.labels.get(keys.LABEL_GPU_PRODUCT)
        count = node.labels.get(keys.LABEL_GPU_COUNT)
        cache_key = (report or "", product or "", count or "")
        return self._cache.get_or_make(cache_key, lambda: self._resolve(report, product, count))

    def _resolve(self, report: str | None, product: str | None, count: str | None) -> HardwareFinding:
        warnings: list[str] = []
        if report:
            try:
                gpus = NodeGpus.from_annotation(report)
                hardware = hardware_from_report(self.catalog, gpus)
                layouts = tuple((gpu.index, gpu.geometry) for gpu in gpus.gpus)
                return HardwareFinding(
                    hardware, f"{hardware.describe()}, from {keys.ANNOTATION_GPUS}", (), layouts
                )
            except (HardwareReportError, UnknownProductError) as exc:
                warnings.append(f"{keys.ANNOTATION_GPUS} ignored: {exc}")
        if not product:
            warnings.append(
                f"GPU hardware unknown (no {keys.LABEL_GPU_PRODUCT} label yet): layout not checked against the GPUs"
            )
            return HardwareFinding(None, "none", tuple(warnings))
        gpu_count = parse_gpu_count(count)
        try:
            hardware = hardware_from_labels(self.catalog, product, gpu_count)
        except (UnknownProductError, ValueError):
            warnings.append(f"GPU product {product[:60]!r} is not in mig-guard's catalog: layout not checked")
            return HardwareFinding(None, "unknown product", tuple(warnings))
        return HardwareFinding(hardware, hardware.describe(), tuple(warnings))
