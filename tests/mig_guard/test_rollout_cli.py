"""`mig-guard rollout` on the real API server: the pause switch and the resume command that the
waiting nodes' reasons name act on the Leases the reconcilers read (tests/reconciler/test_rollout.py
shows the reconcilers' side), and `status` shows the rollout as the reconcilers left it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from migcore import keys
from reconciler.metrics import Metrics
from reconciler.rollout import Budget, Rollout, RolloutSettings

POOL = "NVIDIA-A100-SXM4-40GB"


def rollout(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig_guard.cli", "rollout", *args, "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def leases(api: Any, namespace: str) -> dict[str, Any]:
    items = k8s.CoordinationV1Api(api).list_namespaced_lease(namespace).items
    return {lease.metadata.name: lease for lease in items}


def test_pause_stops_every_start_and_resume_lifts_it(k8s_api: Any, kubeconfig: Path) -> None:
    namespace = f"rollout-{uuid.uuid4().hex[:6]}"
    ensure_namespace(k8s_api, namespace)
    node = Rollout(k8s_api, RolloutSettings(Budget(count=5), namespace), "gpu-a", lambda: None, Metrics())
    try:
        done = rollout(kubeconfig, "pause", "-n", namespace, "--reason", "change freeze until Monday")
        assert done.returncode == 0, done.stderr
        assert "rollouts paused" in done.stdout
        pause = leases(k8s_api, namespace)[keys.PAUSE_LEASE]
        assert pause.spec.holder_identity  # who paused (the API server's name for the caller)
        waiting = node.take(POOL)
        assert waiting is not None and waiting.cause == "paused"
        assert "change freeze until Monday" in waiting.reason
        assert "rollouts are paused" in rollout(kubeconfig, "status", "-n", namespace).stdout
        assert rollout(kubeconfig, "pause", "-n", namespace).returncode == 0  # idempotent
        done = rollout(kubeconfig, "resume", "-n", namespace)
        assert done.returncode == 0 and "the pause is lifted" in done.stdout
        node.view.refresh()
        assert node.take(POOL) is None
        assert "not paused" in rollout(kubeconfig, "status", "-n", namespace).stdout
    finally:
        node.close()


def test_resume_forgets_one_pools_failures_and_status_shows_the_rollout(
    k8s_api: Any, kubeconfig: Path
) -> None:
    namespace = f"rollout-{uuid.uuid4().hex[:6]}"
    ensure_namespace(k8s_api, namespace)
    made = []

    def node(name: str) -> Rollout:
        made.append(
            Rollout(
                k8s_api,
                RolloutSettings(Budget(count=2), namespace, failure_limit=1),
                name,
                lambda: None,
                Metrics(),
            )
        )
        return made[-1]

    try:
        assert node("gpu-3").take(POOL) is None  # holds a slot while status runs
        for name, pool in (("gpu-1", POOL), ("gpu-2", "other")):
            failing = node(name)
            assert failing.take(pool) is None
            failing.release(pool, failed=f"all-1g.5gb not applied: {name} broke", config="all-1g.5gb")
        waiter = f"waiter-{uuid.uuid4().hex[:4]}"
        create_gpu_node(
            k8s_api, waiter, "NVIDIA-H100-80GB-HBM3", fake=False, labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"}
        )
        condition = {
            "type": keys.CONDITION_READY,
            "status": "False",
            "reason": "RolloutStopped",
            "message": "m",
        }
        k8s.CoreV1Api(k8s_api).patch_node_status(waiter, {"status": {"conditions": [condition]}})
        shown = rollout(kubeconfig, "status", "-n", namespace)
        assert shown.returncode == 0, shown.stderr
        assert f"pool {POOL}: 1 active: gpu-3;" in shown.stdout
        assert "failed: gpu-1 (all-1g.5gb): all-1g.5gb not applied: gpu-1 broke" in shown.stdout
        assert "pool other: 0 active; 0 waiting; 1 failed" in shown.stdout
        assert "pool NVIDIA-H100-80GB-HBM3: 0 active; 1 waiting; 0 failed" in shown.stdout  # by its label

        done = rollout(kubeconfig, "resume", "-n", namespace, "--pool", POOL)
        assert done.returncode == 0 and f"pool {POOL}: 1 failed change(s) forgotten" in done.stdout
        remaining = [
            lease.spec.holder_identity
            for lease in leases(k8s_api, namespace).values()
            if lease.metadata.labels[keys.LABEL_ROLLOUT] == keys.ROLLOUT_FAILED
        ]
        assert remaining == ["gpu-2"]  # the other pool stays stopped
        assert rollout(kubeconfig, "resume", "-n", namespace, "--all-pools").returncode == 0
        assert all(
            lease.metadata.labels[keys.LABEL_ROLLOUT] == keys.ROLLOUT_SLOT
            for lease in leases(k8s_api, namespace).values()
        )
    finally:
        for each in made:
            each.close()


def test_usage_errors_exit_2_and_refusals_1(kubeconfig: Path) -> None:
    assert rollout(kubeconfig, "resume").returncode == 2  # no namespace
    assert rollout(kubeconfig, "resume", "-n", "x", "--pool", "a", "--all-pools").returncode == 2
    refused = rollout(kubeconfig, "pause", "-n", "no-such-namespace-here")
    assert refused.returncode == 1 and "the API server refused: 404" in refused.stderr
