"""Prometheus metrics of the webhook, correct under several gunicorn workers.

With `PROMETHEUS_MULTIPROC_DIR` set (the `mig-guard webhook` command sets it before gunicorn
forks) every worker writes its values to files there and `/metrics` aggregates them, so a
scrape sees the whole server whichever worker answers. Without it (the Flask test client)
the metrics live in a registry of their own per app.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def _ensure_value_class() -> None:
    # prometheus_client picks file-backed values at import time; if it was imported before the
    # command set the variable (another subcommand's import), switch now, before any metric exists.
    if multiprocess_dir() and values.ValueClass.__name__ != "MmapedValue":
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class _ConfigAge(Collector):
    """Seconds since this worker's config was loaded, computed at scrape time."""

    def __init__(self, loaded_at: Callable[[], float | None]) -> None:
        self._loaded_at = loaded_at

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mig_guard_webhook_config_age_seconds",
            "Seconds since the config in use was loaded (this worker).",
        )
        loaded = self._loaded_at()
        if loaded is not None:
            family.add_metric([], time.time() - loaded)
        yield family


class WebhookMetrics:
    """The webhook's metric objects plus how to expose them."""

    def __init__(self) -> None:
        _ensure_value_class()
        self._own = CollectorRegistry(auto_describe=True)
        registry = None if multiprocess_dir() else self._own
        self.requests = Counter(
            "mig_guard_webhook_requests_total",
            "Requests answered, by endpoint and verdict (allowed, warned, patched, denied, malformed, ...).",
            ["endpoint", "verdict"],
            registry=registry,
        )
        self.latency = Histogram(
            "mig_guard_webhook_request_duration_seconds",
            "Time to answer an admission request, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.config_reloads = Counter(
            "mig_guard_webhook_config_reloads_total",
            "Config load attempts by result (counted in every worker: each watches the source).",
            ["result"],
            registry=registry,
        )
        self.config_loaded_at = Gauge(
            "mig_guard_webhook_config_loaded_timestamp_seconds",
            "Unix time the config in use was loaded.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.last_good_in_use = Gauge(
            "mig_guard_webhook_config_last_good_in_use",
            "1 when the latest config version was rejected and the last good one is still used.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._age: _ConfigAge | None = None

    def config_loaded(self, ok: bool, loaded_at: float | None, last_good_in_use: bool) -> None:
        """ReloadObserver for the config source."""
        self.config_reloads.labels("success" if ok else "failure").inc()
        if loaded_at is not None:
            self.config_loaded_at.set(loaded_at)
        self.last_good_in_use.set(1 if last_good_in_use else 0)

    def track_config_age(self, loaded_at: Callable[[], float | None]) -> None:
        self._age = _ConfigAge(loaded_at)
        if not multiprocess_dir():
            self._own.register(self._age)

    def exposition(self) -> bytes:
        """The text format of every metric (all workers' in multiprocess mode)."""
        if not multiprocess_dir():
            return generate_latest(self._own)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self._age is not None:
            registry.register(self._age)
        return generate_latest(registry)


def mark_worker_dead(pid: int) -> None:
    """gunicorn `child_exit` hook: drop a dead worker's live gauges."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
