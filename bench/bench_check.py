"""How long one `check_config` takes: the webhook calls it inside an admission request.

For every config of the upstream default file against a few products (8 GPUs, from labels)
it measures the median time of one check when the verdict is memoised (cached), when the
verdict memo is cleared before each call (uncached; placements stay memoised per product,
as in a running webhook), and with the placement memo cleared too (cold). The same against
hardware reports that carry the driver's MIG table (8 GPUs sharing one table): a catalog
product's table (the table judges, compared with the catalog) and the X100, a GPU no catalog
knows. Parsing the report and building the hardware from it are measured apart (the webhook
caches them per annotation text). Targets: cached <= 50 us, uncached <= 1 ms.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from migcore.catalog import Catalog, load_catalog
from migcore.check import (
    NodeHardware,
    check_config,
    clear_check_cache,
    hardware_from_labels,
    hardware_from_report,
)
from migcore.config import MigPartedConfig, load_config_file, parse_config
from migcore.driver_table import MigTable, catalog_table
from migcore.hardware import DiscoveredGpu, NodeGpus
from migcore.placement import clear_fit_cache

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "migcore" / "data" / "default-mig-parted-config.yaml"
X100_REPORT = ROOT / "devcluster" / "gpu-models" / "x100.json"
X100_CONFIGS = ROOT / "devcluster" / "gpu-models" / "x100-mig-parted-config.yaml"
PRODUCTS = (
    "NVIDIA-A100-SXM4-40GB",
    "NVIDIA-H100-80GB-HBM3",
    "NVIDIA-A30",
    "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition",
    "NVIDIA-B200",
)
REPEATS = 31
CACHED_TARGET_US = 50.0
UNCACHED_TARGET_US = 1000.0


def _median_us(run: Callable[[], object], before: Callable[[], None] | None = None) -> float:
    samples = []
    for _ in range(REPEATS):
        if before is not None:
            before()
        start = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def _cold() -> None:
    clear_check_cache()
    clear_fit_cache()


def _report_text(name: str, pci: int, memory: int | None, table: MigTable) -> str:
    gpus = tuple(
        DiscoveredGpu(i, pci, name, True, uuid=f"GPU-{i:036d}", memory_mib=memory, mig_table=table)
        for i in range(8)
    )
    return NodeGpus(gpus, "2026-11-28T14:00:00Z").to_annotation()


def _reports(catalog: Catalog) -> list[tuple[str, str, MigPartedConfig]]:
    """(what, annotation text, config) for the driver-table cases."""
    default = load_config_file(CONFIG, load_catalog())
    out = []
    for key in ("A100-40GB", "H100-80GB", "H200-141GB"):
        product = catalog.products[key]
        text = _report_text(
            product.nvml_names[0], product.pci_device_ids[0], product.memory_mib, catalog_table(product)
        )
        out.append((f"{key} (driver table)", text, default))
    raw = json.loads(X100_REPORT.read_text())
    x100 = _report_text("NVIDIA X100", 0x2FFF10DE, 98304, MigTable.from_json(raw["migTables"][0]))
    x100_configs = X100_CONFIGS.read_text().split("mig-configs:\n", 1)[1]
    with_x100 = parse_config(CONFIG.read_text().rstrip("\n") + "\n" + x100_configs, load_catalog())
    out.append(("X100, in no catalog (driver table)", x100, with_x100))
    return out


def _measure(config: MigPartedConfig, hardware: NodeHardware) -> tuple[list[float], list[float], list[float]]:
    cached, uncached, cold = [], [], []
    for name in config.names():
        check_config(config, name, hardware)
        one = partial(check_config, config, name, hardware)
        cached.append(_median_us(one))
        uncached.append(_median_us(one, clear_check_cache))
        cold.append(_median_us(one, _cold))
    return cached, uncached, cold


def _row(label: str, figures: tuple[list[float], list[float], list[float]]) -> str:
    cached, uncached, cold = figures
    return (
        f"{label:<46} {statistics.median(cached):>7.1f}/{max(cached):<7.1f}"
        f" {statistics.median(uncached):>8.1f}/{max(uncached):<8.1f}"
        f" {statistics.median(cold):>7.1f}/{max(cold):<7.1f}"
    )


def main() -> int:
    catalog = load_catalog()
    config = load_config_file(CONFIG, load_catalog())
    names = config.names()
    print(f"{len(names)} configs of {CONFIG.name}, {REPEATS} runs each; figures in microseconds")
    print(f"{'hardware (8 GPUs)':<46} {'cached med/max':>15} {'uncached med/max':>17} {'cold med/max':>15}")
    worst_cached = worst_uncached = 0.0
    for label in PRODUCTS:
        figures = _measure(config, hardware_from_labels(catalog, label, 8))
        worst_cached = max(worst_cached, statistics.median(figures[0]))
        worst_uncached = max(worst_uncached, statistics.median(figures[1]))
        print(_row(label, figures))
    table_cached = table_uncached = 0.0
    for what, text, table_config in _reports(catalog):
        hardware = hardware_from_report(catalog, NodeGpus.from_annotation(text))
        figures = _measure(table_config, hardware)
        table_cached = max(table_cached, statistics.median(figures[0]))
        table_uncached = max(table_uncached, statistics.median(figures[1]))
        print(_row(what, figures))
        parse_us = _median_us(partial(NodeGpus.from_annotation, text))
        build_us = _median_us(partial(hardware_from_report, catalog, NodeGpus.from_annotation(text)))
        print(f"  report: {len(text)} bytes, parsed in {parse_us:.1f}, hardware built in {build_us:.1f}")
    labels_us = _median_us(partial(hardware_from_labels, catalog, PRODUCTS[0], 8))
    print(f"hardware_from_labels (8 GPUs): {labels_us:.1f}")
    # An unknown name checks every config to suggest the valid ones (the error path).
    typo = partial(check_config, config, "all-1g-5gb", hardware_from_labels(catalog, PRODUCTS[0], 8))
    print(f"unknown config name (suggestions), uncached: {_median_us(typo, clear_check_cache):.1f}")
    ok = worst_cached <= CACHED_TARGET_US and worst_uncached <= UNCACHED_TARGET_US
    print(
        f"targets from labels: cached <= {CACHED_TARGET_US:.0f} (worst product median {worst_cached:.1f}),"
        f" uncached <= {UNCACHED_TARGET_US:.0f} (worst product median {worst_uncached:.1f}): "
        + ("met" if ok else "MISSED")
    )
    ok = table_cached <= CACHED_TARGET_US and table_uncached <= UNCACHED_TARGET_US
    print(
        f"targets from a driver table: cached <= {CACHED_TARGET_US:.0f} (worst median {table_cached:.1f}),"
        f" uncached <= {UNCACHED_TARGET_US:.0f} (worst median {table_uncached:.1f}): "
        + ("met" if ok else "MISSED")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
