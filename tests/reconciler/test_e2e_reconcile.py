"""End to end: the real `mig-guard reconcile` (a subprocess per kwok node, simulated GPUs) on the
real API server, with no webhook installed. Label changes end in `success` or `failed` with a
reason, the node usable again either way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from kubernetes import client as k8s

from devcluster.controlplane import free_port
from devcluster.helpers import gpu_model_file
from devcluster.processes import wait_until
from migcore import keys
from migcore.geometry import GpuGeometry
from migcore.hardware import NodeGpus
from reconciler.node_state import REPORTING_CONTROLLER

GpuNodeFactory = Callable[..., Any]


def test_label_change_succeeds_and_moves_only_pods_on_changed_gpus(
    gpu_node: GpuNodeFactory, reconciler_kubeconfig: Path
) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    node.run_pod("stays-gpu0")
    node.run_pod("moves-gpu1-a")
    node.run_pod("moves-gpu1-b")
    node.wait_running({"stays-gpu0", "moves-gpu1-a", "moves-gpu1-b"})
    node.assign({"stays-gpu0": (0, 4), "moves-gpu1-a": (1, 0), "moves-gpu1-b": (1, 4)})
    # Least privilege: the agent runs with exactly the RBAC rules the chart grants it.
    node.start_agent(kubeconfig=reconciler_kubeconfig)
    node.wait_outcome("success", "all-3g applied")  # already applied at start: only reported
    assert node.pods() == {"stays-gpu0", "moves-gpu1-a", "moves-gpu1-b"}

    stop = threading.Event()
    recorder = threading.Thread(target=node.record_updates, args=(stop,), daemon=True)
    recorder.start()
    node.label("gpu1-7g")
    reason = node.wait_outcome("success", "gpu1-7g applied")
    stop.set()
    assert node.counts() == {0: {"3g.20gb": 2}, 1: {"7g.40gb": 1}}
    assert node.pods() == {"stays-gpu0"}  # the pod on the untouched GPU kept running
    assert ("pending", True) in node.seen  # held (tainted) while pending, without any webhook
    assert not node.held()
    assert node.operand_label() == "true"
    wait_until(lambda: node.operand_pods() == 1, 60, what="device plugin back")
    annotations = node.read().metadata.annotations
    assert keys.ANNOTATION_PROGRESS not in annotations
    assert "7g.40gb" in annotations[keys.ANNOTATION_GPUS]
    assert "GPU 1" in reason
    events = k8s.CoreV1Api(node.api).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={node.name},reason=Plan"
    )
    plans = [e.message for e in events.items]
    assert any("moves-gpu1-a" in p and "moves-gpu1-b" in p and "stays-gpu0" not in p for p in plans), plans
    steps = k8s.CoreV1Api(node.api).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={node.name},type=Normal"
    )
    ours = [e for e in steps.items if e.reporting_component == REPORTING_CONTROLLER]  # not the KCM's
    reasons = [e.reason for e in sorted(ours, key=lambda e: e.event_time or e.metadata.creation_timestamp)]
    # Every step of the change is an Event, in order (the start's own report comes first).
    change = reasons[reasons.index("Reconfiguring") :]
    assert change == ["Reconfiguring", "Plan", "PausingOperands", "Evicting", "Applying", "Applied"], reasons


def test_invalid_config_fails_with_the_check_reason_and_gpus_untouched(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    node.start_agent()
    node.wait_outcome("success", "all-3g applied")
    before = node.geometries()
    stop = threading.Event()
    threading.Thread(target=node.record_updates, args=(stop,), daemon=True).start()
    since = node.label("too-many-3g")
    reason = node.wait_outcome("failed", "too-many-3g cannot be applied on this node", since=since)
    stop.set()
    assert "3g.20gb" in reason
    assert node.geometries() == before
    assert any(tainted for _, tainted in node.seen)  # it held the node while judging the config
    assert not node.held()
    assert node.operand_label() == "true"


def test_pod_disruption_budget_blocks_and_the_node_is_usable_again(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    node.run_pod("guarded")
    node.wait_running({"guarded"})
    node.assign({"guarded": (1, 0)})
    k8s.PolicyV1Api(node.api).create_namespaced_pod_disruption_budget(
        node.namespace,
        {
            "metadata": {"name": "guarded-pdb"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
        },
    )
    before = node.geometries()
    node.start_agent("--eviction-timeout", "3")
    node.wait_outcome("success", "all-3g applied")
    since = node.label("gpu1-7g")
    reason = node.wait_outcome("failed", "gpu1-7g not applied", since=since)
    assert (
        f"PodDisruptionBudget {node.namespace}/guarded-pdb blocks eviction of pod {node.namespace}/guarded"
        in reason
    )
    assert node.geometries() == before
    assert node.pods() == {"guarded"}
    assert not node.held()
    assert node.operand_label() == "true"
    wait_until(lambda: node.operand_pods() == 1, 60, what="device plugin back")


def test_configmap_edit_is_reapplied_with_cordon_hold_and_metrics(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    core = k8s.CoreV1Api(node.api)
    core.create_namespaced_config_map(
        node.namespace,
        {"metadata": {"name": "mig-parted-config"}, "data": {"config.yaml": node.config_file.read_text()}},
    )
    port = free_port()
    node.start_agent(
        "--hold",
        "cordon",
        "--metrics-listen",
        f"127.0.0.1:{port}",
        configmap=f"{node.namespace}/mig-parted-config",
    )
    node.wait_outcome("success", "all-3g applied")
    stop = threading.Event()
    cordoned: list[bool] = []

    def record() -> None:
        while not stop.is_set():
            cordoned.append(bool(node.read().spec.unschedulable))
            stop.wait(0.05)

    threading.Thread(target=record, daemon=True).start()
    # Same config name, new meaning: upstream never re-applies this (mig-parted#108); here it is.
    edited = node.config_file.read_text().replace(
        'mig-devices: {"3g.20gb": 2}\n  gpu1-7g', 'mig-devices: {"1g.5gb": 7}\n  gpu1-7g', 1
    )
    assert edited != node.config_file.read_text()
    core.patch_namespaced_config_map("mig-parted-config", node.namespace, {"data": {"config.yaml": edited}})
    node.wait_outcome("success", "all-3g applied: GPUs 0-1: 1g.5gb@0")
    stop.set()
    assert node.counts() == {0: {"1g.5gb": 7}, 1: {"1g.5gb": 7}}
    assert True in cordoned  # held by cordon this time
    assert not node.read().spec.unschedulable
    success = 'mig_guard_reconcile_outcomes_total{outcome="success"} 1.0'

    def scrape() -> str:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    # The outcome is counted after the change's last Node write and the condition and Event that
    # follow it, so a scrape right after the state shows may come a moment early.
    wait_until(lambda: success in scrape(), 10, what="the outcome counted")
    metrics = scrape()
    assert success in metrics
    assert 'mig_guard_mig_instances{gpu="1",profile="1g.5gb"} 7.0' in metrics
    assert 'mig_guard_nvml_operations_total{op="create-gi"} 14.0' in metrics
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


X100 = gpu_model_file("x100.json")
X100_CONFIG = Path(gpu_model_file("x100-mig-parted-config.yaml")).read_text() + (
    "  all-enabled:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {}\n"
)


def test_a_gpu_outside_the_catalog_is_judged_from_its_driver_table(gpu_node: GpuNodeFactory) -> None:
    """Issue 9, end to end: GPUs no catalog knows are never wiped on a guess; once MIG is on the
    reconciler reports the driver's table, and a layout is applied or refused exactly by it."""
    node = gpu_node(gpus=2, initial=None, model=X100, config=X100_CONFIG, daemonset=False)
    node.start_agent()
    wait_until(lambda: keys.ANNOTATION_GPUS in (node.read().metadata.annotations or {}), 60, what="report")
    # MIG off: the driver reports no table yet, and nothing else can judge where instances go.
    since = node.label("x100-two-3g")
    reason = node.wait_outcome("failed", "x100-two-3g cannot be applied", since=since)
    assert "not in mig-guard's catalog and the node reports no driver MIG table" in reason
    assert node.geometries() == {0: GpuGeometry(False), 1: GpuGeometry(False)}
    wait_until(
        lambda: any(c.reason == "InvalidConfig" for c in node.read().status.conditions or []),
        30,
        what="the InvalidConfig condition",
    )

    since = node.label("all-enabled")
    node.wait_outcome("success", "all-enabled applied", since=since)
    report = NodeGpus.from_annotation(node.read().metadata.annotations[keys.ANNOTATION_GPUS])
    assert all(g.mig_table is not None for g in report.gpus)  # read from the driver, MIG on

    since = node.label("x100-two-3g")
    node.wait_outcome("success", "x100-two-3g applied", since=since)
    after = node.geometries()
    assert {i: g.summary() for i, g in after.items()} == {
        0: "3g.48gb@0, 3g.48gb@3",
        1: "3g.48gb@0, 3g.48gb@3",
    }

    since = node.label("x100-three-3g")
    reason = node.wait_outcome("failed", "x100-three-3g cannot be applied", since=since)
    assert "allows at most 2 of 3g.48gb" in reason
    assert node.geometries() == after  # refused without touching the GPUs
    assert not node.held()
