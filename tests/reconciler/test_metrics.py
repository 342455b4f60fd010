"""The agent's /metrics and /healthz, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import requests

from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec
from reconciler.metrics import Metrics, serve


def test_metrics_and_health_are_served() -> None:
    metrics = Metrics()
    healthy = {"ok": True}
    server = serve(metrics, "127.0.0.1", 0, lambda: healthy["ok"])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        metrics.outcomes.labels(outcome="success").inc()
        metrics.evictions.inc(3)
        metrics.reconcile_seconds.observe(1.5)
        gi = GpuInstanceSpec(0, 1, "1g.5gb", (ComputeInstanceSpec("1g.5gb", 0),))
        metrics.observe_geometry(
            {0: GpuGeometry(True, (gi, GpuInstanceSpec(1, 1, "1g.5gb", (ComputeInstanceSpec("1g.5gb", 0),))))}
        )
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert 'mig_guard_reconcile_outcomes_total{outcome="success"} 1.0' in text
        assert "mig_guard_evicted_pods_total 3.0" in text
        assert "mig_guard_reconcile_duration_seconds_count 1.0" in text
        assert 'mig_guard_mig_instances{gpu="0",profile="1g.5gb"} 2.0' in text
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        healthy["ok"] = False
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 503
        assert requests.get(f"{base}/other", timeout=5).status_code == 404
    finally:
        server.shutdown()
