"""How long one `check_config` takes: the webhook calls it inside an admission request.

For every config of the upstream default file against a few products (8 GPUs, from labels)
it measures the median time of one check when the verdict is memoised (cached), when the
verdict memo is cleared before each call (uncached; placements stay memoised per product,
as in a running webhook), and with the placement memo cleared too (cold). Targets: cached
<= 50 us, uncached <= 1 ms.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from migcore.catalog import load_catalog
from migcore.check import check_config, clear_check_cache, hardware_from_labels
from migcore.config import load_config_file
from migcore.placement import clear_fit_cache

CONFIG = Path(__file__).parents[1] / "migcore" / "data" / "default-mig-parted-config.yaml"
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


def main() -> int:
    catalog = load_catalog()
    config = load_config_file(CONFIG)
    names = config.names()
    print(f"{len(names)} configs of {CONFIG.name}, {REPEATS} runs each; figures in microseconds")
    print(f"{'product':<46} {'cached med/max':>15} {'uncached med/max':>17} {'cold med/max':>15}")
    worst_cached = worst_uncached = 0.0
    for label in PRODUCTS:
        hardware = hardware_from_labels(catalog, label, 8)
        cached, uncached, cold = [], [], []
        for name in names:
            check_config(config, name, hardware)
            one = partial(check_config, config, name, hardware)
            cached.append(_median_us(one))
            uncached.append(_median_us(one, clear_check_cache))
            cold.append(_median_us(one, _cold))
        worst_cached = max(worst_cached, statistics.median(cached))
        worst_uncached = max(worst_uncached, statistics.median(uncached))
        print(
            f"{label:<46} {statistics.median(cached):>7.1f}/{max(cached):<7.1f}"
            f" {statistics.median(uncached):>8.1f}/{max(uncached):<8.1f}"
            f" {statistics.median(cold):>7.1f}/{max(cold):<7.1f}"
        )
    labels_us = _median_us(partial(hardware_from_labels, catalog, PRODUCTS[0], 8))
    print(f"hardware_from_labels (8 GPUs): {labels_us:.1f}")
    # An unknown name checks every config to suggest the valid ones (the error path).
    typo = partial(check_config, config, "all-1g-5gb", hardware_from_labels(catalog, PRODUCTS[0], 8))
    print(f"unknown config name (suggestions), uncached: {_median_us(typo, clear_check_cache):.1f}")
    ok = worst_cached <= CACHED_TARGET_US and worst_uncached <= UNCACHED_TARGET_US
    print(
        f"targets: cached <= {CACHED_TARGET_US:.0f} (worst product median {worst_cached:.1f}),"
        f" uncached <= {UNCACHED_TARGET_US:.0f} (worst product median {worst_uncached:.1f}): "
        + ("met" if ok else "MISSED")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
