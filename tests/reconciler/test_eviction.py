"""Evictions through the real Eviction API on kwok nodes: pods go, PodDisruptionBudgets hold."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from devcluster.processes import wait_until
from reconciler.eviction import EvictionError, Evictor
from reconciler.workloads import PodRef


def _setup(api: Any, app: str, count: int) -> tuple[str, list[PodRef]]:
    namespace = f"ev-{uuid.uuid4().hex[:6]}"
    ensure_namespace(api, namespace)
    node = f"ev-{uuid.uuid4().hex[:6]}"
    create_gpu_node(api, node)
    core = k8s.CoreV1Api(api)
    refs = []
    for i in range(count):
        name = f"{app}-{i}"
        core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {
                    "nodeName": node,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": "cuda"}],
                },
            },
        )
        refs.append(PodRef(namespace, name))

    def running() -> bool:
        pods = core.list_namespaced_pod(namespace).items
        return len(pods) == count and all(p.status.phase == "Running" for p in pods)

    wait_until(running, 60, what="pods running on the kwok node")
    return namespace, refs


def test_evicts_only_the_given_pods_and_waits_until_gone(workload_plane: Any) -> None:
    api = workload_plane.api
    namespace, refs = _setup(api, "train", 3)
    evicted = Evictor(api, timeout=60, poll_seconds=0.2).evict(refs[:2])
    assert evicted == refs[:2]
    left = [p.metadata.name for p in k8s.CoreV1Api(api).list_namespaced_pod(namespace).items]
    assert left == ["train-2"]


def test_a_pod_disruption_budget_blocks_and_is_named(workload_plane: Any) -> None:
    api = workload_plane.api
    namespace, refs = _setup(api, "serve", 1)
    k8s.PolicyV1Api(api).create_namespaced_pod_disruption_budget(
        namespace,
        {
            "metadata": {"name": "serve-pdb"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "serve"}}},
        },
    )
    # The disruption controller must have computed the budget's status before it counts.
    wait_until(
        lambda: (
            k8s.PolicyV1Api(api)
            .read_namespaced_pod_disruption_budget("serve-pdb", namespace)
            .status.observed_generation
            is not None
        ),
        30,
    )
    with pytest.raises(
        EvictionError,
        match=f"PodDisruptionBudget {namespace}/serve-pdb blocks eviction of pod {namespace}/serve-0",
    ):
        Evictor(api, timeout=1.5, poll_seconds=0.3).evict(refs)
    assert k8s.CoreV1Api(api).read_namespaced_pod("serve-0", namespace).metadata.deletion_timestamp is None
