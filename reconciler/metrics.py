"""Prometheus metrics and the health endpoint of the node agent.

`/metrics`: reconcile duration, outcomes, MIG instances per profile, evictions, where the
driver's MIG table disagrees with the catalog, and whether the node waits for or holds a rollout
slot of its pool.
`/healthz`: 200 while the reconcile loop is alive (it beats at least once per resync period),
503 otherwise, so a wedged agent gets restarted by its liveness probe.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from migcore.geometry import GpuGeometry


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconcile_seconds = Histogram(
            "mig_guard_reconcile_duration_seconds",
            "Time from the start of a MIG change to its outcome",
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.outcomes = PromCounter(
            "mig_guard_reconcile_outcomes",
            "MIG changes by outcome (success, failed, rebooting)",
            ["outcome"],
            registry=self.registry,
        )
        self.instances = Gauge(
            "mig_guard_mig_instances",
            "MIG compute instances per GPU and profile, as read back from NVML",
            ["gpu", "profile"],
            registry=self.registry,
        )
        self.evictions = PromCounter(
            "mig_guard_evicted_pods", "Pods evicted to move them off changing GPUs", registry=self.registry
        )
        self.nvml_operations = PromCounter(
            "mig_guard_nvml_operations", "NVML plan operations executed", ["op"], registry=self.registry
        )
        self.catalog_disagreements = Gauge(
            "mig_guard_catalog_disagreements",
            "Differences between the driver's MIG table and mig-guard's catalog, per GPU (a catalog"
            " error or a new driver; the driver's table is what verdicts use)",
            ["gpu", "product"],
            registry=self.registry,
        )
        # Each reconciler says 1 for its own node: summed by pool, the fleet's figures.
        self.rollout_waiting = Gauge(
            "mig_guard_rollout_waiting",
            "1 while this node waits to start a change (no rollout slot free, its pool stopped, rollouts paused)",
            ["pool"],
            registry=self.registry,
        )
        self.rollout_active = Gauge(
            "mig_guard_rollout_active",
            "1 while this node holds a rollout slot of its pool (its change runs)",
            ["pool"],
            registry=self.registry,
        )
        self._beat = time.monotonic()
        self._lock = threading.Lock()

    def heartbeat(self) -> None:
        with self._lock:
            self._beat = time.monotonic()

    def seconds_since_heartbeat(self) -> float:
        with self._lock:
            return time.monotonic() - self._beat

    def observe_geometry(self, geometries: Mapping[int, GpuGeometry]) -> None:
        self.instances.clear()
        for index, geometry in geometries.items():
            counts: Counter[str] = geometry.device_counts()
            for profile, n in counts.items():
                self.instances.labels(gpu=str(index), profile=profile).set(n)

    def observe_disagreements(self, found: Mapping[int, tuple[str, tuple[str, ...]]]) -> None:
        """`found`: GPU index -> (catalog product, differences) for GPUs with a table and a product."""
        self.catalog_disagreements.clear()
        for index, (product, differences) in found.items():
            self.catalog_disagreements.labels(gpu=str(index), product=product).set(len(differences))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def serve(metrics: Metrics, host: str, port: int, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on host:port in a daemon thread; returns the server (port 0 = any)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = healthy()
                self._send(200 if ok else 503, b"ok\n" if ok else b"reconcile loop stalled\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the reconcile log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
