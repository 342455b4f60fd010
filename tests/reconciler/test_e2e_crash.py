"""End to end: the real `mig-guard reconcile` SIGKILLed at distinct steps of a change (held by a
blocker or slowed by simulated NVML latency so the kill lands there, seen in the GPUs' state) converges after a restart:
the layout asked for, operand labels back to their exact earlier values, hold lifted, no progress
record left. A label change in the middle of an apply ends with the latest value applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.processes import wait_until
from migcore import keys
from reconciler.progress import FileProgressStore

GpuNodeFactory = Callable[..., Any]
OPERAND_VALUE = "custom-v2"  # not "true": only the persisted record can restore it exactly


def _kill_at(
    node: Any,
    proc: Any,
    phase: str,
    host_state: bool = False,
    also: Callable[[], bool] = lambda: True,
) -> None:
    """SIGKILL the agent once its persisted progress says `phase` and `also()` holds (e.g. the
    GPUs are half-way: progress is not written per NVML operation, the GPUs are read instead)."""

    def reached() -> bool:
        if host_state:
            record = FileProgressStore(node.workdir / "host-state").load()
            now = record.phase if record else None
        else:
            now = node.progress_phase()[0]
        return now == phase and also()

    try:
        wait_until(reached, 60, interval=0.05, what=f"phase {phase}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; now {node.state()}\n{node.agent_logs()}") from exc
    node.kill_agent(proc)


def _converged(node: Any, config: str) -> None:
    node.wait_outcome("success", f"{config} applied")
    assert not node.held()
    assert node.operand_label() == OPERAND_VALUE
    assert keys.ANNOTATION_PROGRESS not in (node.read().metadata.annotations or {})


def test_killed_while_waiting_for_operands(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g", operand=OPERAND_VALUE, daemonset=False)
    # A device-plugin pod no DaemonSet owns: it does not leave, so the agent waits in "pausing".
    node.core.create_namespaced_pod(
        node.namespace,
        {
            "metadata": {"name": "stray-plugin", "labels": {"app": "nvidia-device-plugin-daemonset"}},
            "spec": {
                "nodeName": node.name,
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "m", "image": "x"}],
            },
        },
    )
    agent = node.start_agent()
    node.wait_outcome("success", "all-3g applied")
    node.label("gpu1-7g")
    _kill_at(node, agent, "pausing", also=lambda: node.operand_label() == keys.PAUSED_FOR_MIG_CHANGE)
    assert node.operand_label() == keys.PAUSED_FOR_MIG_CHANGE and node.held()
    node.core.delete_namespaced_pod("stray-plugin", node.namespace)
    node.start_agent()
    _converged(node, "gpu1-7g")
    assert node.counts() == {0: {"3g.20gb": 2}, 1: {"7g.40gb": 1}}


def test_killed_while_evicting(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g", operand=OPERAND_VALUE)
    node.run_pod("guarded")
    node.wait_running({"guarded"})
    node.assign({"guarded": (1, 4)})
    policy = k8s.PolicyV1Api(node.api)
    policy.create_namespaced_pod_disruption_budget(
        node.namespace,
        {
            "metadata": {"name": "guarded-pdb"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
        },
    )
    agent = node.start_agent()
    node.wait_outcome("success", "all-3g applied")
    node.label("gpu1-7g")
    _kill_at(node, agent, "evicting")
    policy.delete_namespaced_pod_disruption_budget("guarded-pdb", node.namespace)
    node.start_agent()
    _converged(node, "gpu1-7g")
    assert node.pods() == set()
    assert node.counts() == {0: {"3g.20gb": 2}, 1: {"7g.40gb": 1}}


@pytest.mark.parametrize("store", ["annotation", "host-file"])
def test_killed_in_the_middle_of_the_nvml_operations(gpu_node: GpuNodeFactory, store: str) -> None:
    node = gpu_node(gpus=2, initial="all-3g", operand=OPERAND_VALUE)
    extra = ("--host-state-dir", str(node.workdir / "host-state")) if store == "host-file" else ()
    slow = "nvmlGpuInstanceDestroy=0.4,nvmlDeviceCreateGpuInstanceWithPlacement=0.4"
    agent = node.start_agent(*extra, latency=slow)
    node.wait_outcome("success", "all-3g applied")
    node.label("gpu1-7g")
    # GPU 1 half-way: a GPU instance already gone, the 7g not there yet.
    _kill_at(
        node,
        agent,
        "applying",
        host_state=store == "host-file",
        also=lambda: len(node.geometries()[1].instances) == 1,
    )
    assert node.held()
    node.start_agent(*extra)
    _converged(node, "gpu1-7g")
    assert node.counts() == {0: {"3g.20gb": 2}, 1: {"7g.40gb": 1}}


def test_killed_during_a_mode_change(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g", operand=OPERAND_VALUE)
    agent = node.start_agent(latency="nvmlDeviceSetMigMode=1.0")
    node.wait_outcome("success", "all-3g applied")
    node.label("all-disabled")
    # GPU 0 emptied, its mode being switched.
    _kill_at(node, agent, "applying", also=lambda: node.geometries()[0].instances == ())
    node.start_agent()
    _converged(node, "all-disabled")
    access = node.access()
    assert all(access.mig_mode(i) == (False, False) for i in range(2))
    assert node.counts() == {0: {}, 1: {}}


def test_label_change_during_an_apply_ends_with_the_latest_value(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-disabled", operand=OPERAND_VALUE)
    node.start_agent(latency="nvmlDeviceCreateGpuInstanceWithPlacement=0.3")
    node.wait_outcome("success", "all-disabled applied")
    node.label("all-3g")
    wait_until(lambda: node.progress_phase()[0] == "applying", 60, interval=0.05)
    node.label("all-1g")
    _converged(node, "all-1g")
    assert node.counts() == {0: {"1g.5gb": 7}, 1: {"1g.5gb": 7}}
