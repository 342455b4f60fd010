"""Pausing GPU operands the GPU Operator way: real DaemonSets on a kwok node leave when their
`nvidia.com/gpu.deploy.*` label is paused and come back when it is restored."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from devcluster.processes import wait_until
from migcore import keys
from reconciler.node_state import NodeState
from reconciler.operands import Operands, OperandTimeoutError, to_pause

DP = "nvidia.com/gpu.deploy.device-plugin"
GFD = "nvidia.com/gpu.deploy.gpu-feature-discovery"
DCGM = "nvidia.com/gpu.deploy.dcgm"
EXPORTER = "nvidia.com/gpu.deploy.dcgm-exporter"


def test_to_pause_keeps_false_and_absent_labels_alone() -> None:
    labels = {DP: "true", GFD: "false", EXPORTER: "custom", "other": "x"}
    assert to_pause(labels) == {DP: "true", EXPORTER: "custom"}


def test_a_label_left_paused_by_a_crashed_run_restores_to_true() -> None:
    assert to_pause({DP: keys.PAUSED_FOR_MIG_CHANGE}) == {DP: "true"}


def _daemonset(apps: Any, namespace: str, name: str, app: str, label: str) -> None:
    apps.create_namespaced_daemon_set(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": {"app": app}},
                    "spec": {
                        "nodeSelector": {label: "true"},
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "main", "image": "nvidia/operand"}],
                    },
                },
            },
        },
    )


def test_pause_waits_for_operand_pods_and_restore_brings_them_back(workload_plane: Any) -> None:
    api = workload_plane.api
    namespace = f"gpu-op-{uuid.uuid4().hex[:6]}"
    ensure_namespace(api, namespace)
    node = f"op-{uuid.uuid4().hex[:6]}"
    create_gpu_node(api, node, labels={DP: "true", DCGM: "false", GFD: "true"})
    apps = k8s.AppsV1Api(api)
    _daemonset(apps, namespace, "device-plugin", "nvidia-device-plugin-daemonset", DP)
    _daemonset(apps, namespace, "gfd", "gpu-feature-discovery", GFD)
    state = NodeState(api, node)
    operands = Operands(state, namespace=namespace, poll_seconds=0.2)
    core = k8s.CoreV1Api(api)

    def pods_on_node() -> set[str]:
        pods = core.list_namespaced_pod(namespace, field_selector=f"spec.nodeName={node}").items
        return {p.metadata.labels["app"] for p in pods if p.metadata.deletion_timestamp is None}

    wait_until(lambda: pods_on_node() == {"nvidia-device-plugin-daemonset", "gpu-feature-discovery"}, 60)

    previous = to_pause(state.labels())
    assert previous == {DP: "true", GFD: "true"}
    operands.pause(previous)
    labels = state.labels()
    assert labels[DP] == labels[GFD] == keys.PAUSED_FOR_MIG_CHANGE
    assert labels[DCGM] == "false"
    operands.wait_gone(previous, timeout=60)
    assert operands.remaining_pods(previous) == []

    operands.restore(previous)
    labels = state.labels()
    assert (labels[DP], labels[GFD], labels[DCGM]) == ("true", "true", "false")
    assert EXPORTER not in labels  # absent stays absent
    wait_until(lambda: pods_on_node() == {"nvidia-device-plugin-daemonset", "gpu-feature-discovery"}, 60)


def test_wait_gone_times_out_naming_the_pods(workload_plane: Any) -> None:
    api = workload_plane.api
    namespace = f"gpu-op-{uuid.uuid4().hex[:6]}"
    ensure_namespace(api, namespace)
    node = f"op-{uuid.uuid4().hex[:6]}"
    create_gpu_node(api, node, labels={DP: "true"})
    # A device-plugin pod that no DaemonSet owns does not leave when the label is paused.
    k8s.CoreV1Api(api).create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "stray-plugin", "labels": {"app": "nvidia-device-plugin-daemonset"}},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "nvidia/operand"}]},
        },
    )
    operands = Operands(NodeState(api, node), namespace=namespace, poll_seconds=0.2)
    with pytest.raises(OperandTimeoutError, match=f"{namespace}/stray-plugin"):
        operands.wait_gone({DP: "true"}, timeout=1)
