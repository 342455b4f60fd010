"""A GPU Operator node end to end: the real `mig-guard reconcile` on a kwok node of the real API
server, with the least privilege the chart grants it (a Role in the operands' namespace included),
simulated GPUs, and its host commands chrooted into a test host root of recording stand-ins
(devcluster.hostroot): the driver marker waited for, the operands' namespace found from the
operator's DaemonSets, host GPU clients stopped and started, the CDI refresh before the operands
come back, the validators deleted and restarted, a killed agent restarting what it stopped, the
single MIG strategy refused. Root is needed for the chroot (CI runs as root)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import service_account_kubeconfig
from devcluster.hostroot import HostRootFixture
from devcluster.processes import wait_until
from migcore import keys
from reconciler.rbac import OPERATOR_RULES, RULES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root (CI runs as root)")

GpuNodeFactory = Callable[..., Any]
DCGM = "nvidia-dcgm.service"
KUBELET = "kubelet.service"
READY = "run/nvidia/validations/driver-ready"
VALIDATOR_APP = "nvidia-operator-validator"


def grant_operator_role(api: Any, namespace: str) -> None:
    """What the chart's Role in the GPU Operator's namespace grants the reconciler there."""
    rbac: Any = k8s.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace, {"metadata": {"name": "reconciler-gpu-operator"}, "rules": list(OPERATOR_RULES)}
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reconciler-gpu-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "reconciler-gpu-operator",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reconciler", "namespace": "mig-guard"}],
        },
    )


def operator_node(gpu_node: GpuNodeFactory, tmp_path: Path, **options: Any) -> tuple[Any, HostRootFixture]:
    """A node whose namespace holds what the GPU Operator has there: its DaemonSets (the device
    plugin's from the factory, the operator validator's), validator pods, the clients ConfigMap."""
    node = gpu_node(gpus=2, initial="all-3g", **options)
    host = HostRootFixture.build(tmp_path / "host", units={DCGM: True, KUBELET: True, "nvsm.service": False})
    core, apps = node.core, k8s.AppsV1Api(node.api)
    core.create_namespaced_config_map(
        node.namespace,
        {
            "metadata": {"name": "default-gpu-clients"},
            "data": {"clients.yaml": f"version: v1\nsystemd-services:\n  - nvsm.service\n  - {DCGM}\n"},
        },
    )
    apps.create_namespaced_daemon_set(
        node.namespace,
        {
            "metadata": {"name": VALIDATOR_APP, "labels": {"app": VALIDATOR_APP}},
            "spec": {
                "selector": {"matchLabels": {"app": VALIDATOR_APP}},
                "template": {
                    "metadata": {"labels": {"app": VALIDATOR_APP}},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": node.name},
                        "tolerations": [{"operator": "Exists"}],
                        "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "main", "image": "gpu-operator-validator"}],
                    },
                },
            },
        },
    )
    for app in ("nvidia-cuda-validator", "nvidia-device-plugin-validator"):
        core.create_namespaced_pod(
            node.namespace,
            {
                "metadata": {"name": app, "labels": {"app": app}},
                "spec": {"nodeName": node.name, "containers": [{"name": "main", "image": "validator"}]},
            },
        )
    wait_until(lambda: validator_uid(node) is not None, 60, what="operator validator running")
    grant_operator_role(node.api, node.namespace)
    return node, host


def validator_uid(node: Any) -> str | None:
    pods = node.core.list_namespaced_pod(node.namespace, label_selector=f"app={VALIDATOR_APP}").items
    live = [p for p in pods if p.metadata.deletion_timestamp is None]
    return str(live[0].metadata.uid) if live else None


def pod_names(node: Any) -> set[str]:
    return {p.metadata.name for p in node.core.list_namespaced_pod(node.namespace).items}


def agent(node: Any, host: HostRootFixture, kubeconfig: Path, *extra: str) -> Any:
    return node.start_agent(
        "--operands-namespace=auto",
        f"--host-root={host.root}",
        f"--driver-ready-file={host.root / READY}",
        *extra,
        kubeconfig=kubeconfig,
    )


def mark_driver_ready(host: HostRootFixture, host_driver: bool = True) -> None:
    ready = host.root / READY
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.write_text(f"IS_HOST_DRIVER={str(host_driver).lower()}\nNVIDIA_DRIVER_ROOT=/\n")


def test_a_change_on_a_gpu_operator_node_with_a_host_driver(
    gpu_node: GpuNodeFactory, tmp_path: Path, reconciler_kubeconfig: Path
) -> None:
    node, host = operator_node(gpu_node, tmp_path)
    agent(node, host, reconciler_kubeconfig)
    wait_until(lambda: "waiting for the NVIDIA driver" in node.state()[1], 60, what="the driver wait said")
    assert f"{host.root / READY} does not exist yet" in node.state()[1]

    def condition() -> tuple[str, str] | None:
        found = [c for c in node.read().status.conditions or [] if c.type == keys.CONDITION_READY]
        return (found[0].status, found[0].reason) if found else None

    wait_until(lambda: condition() == ("False", "DriverNotReady"), 30, what="the DriverNotReady condition")
    assert host.calls() == [] and not node.geometries()[0].mig_pending  # nothing read or done yet
    mark_driver_ready(host)
    node.wait_outcome("success", "all-3g applied")

    host.block("nvidia-ctk")  # hold the change in its CDI step, to look at the node meanwhile
    validator = validator_uid(node)
    since = node.label("all-disabled")  # a MIG mode change: kubelet is stopped too
    wait_until(lambda: any(c.startswith("nvidia-ctk") for c in host.calls()), 90, what="the CDI step")
    assert node.state()[0] == "pending" and node.held()
    assert node.operand_label() == keys.PAUSED_FOR_MIG_CHANGE  # the operands are not back yet
    assert not host.running(DCGM) and not host.running(KUBELET) and not host.running("nvsm.service")
    phase, _ = node.progress_phase()
    assert phase == "publishing"
    assert not {"nvidia-cuda-validator", "nvidia-device-plugin-validator"} & pod_names(node)
    host.unblock("nvidia-ctk")

    node.wait_outcome("success", "all-disabled applied", since=since)
    assert host.running(DCGM) and host.running(KUBELET)
    calls = host.calls()
    stops = [c for c in calls if c.startswith("systemctl stop")]
    assert stops == [f"systemctl stop {DCGM}", f"systemctl stop {KUBELET}"]
    assert calls.index(stops[-1]) < calls.index("nvidia-smi ") < calls.index(f"systemctl start {DCGM}")
    assert host.file("/var/run/cdi/management.nvidia.com-gpu.yaml").exists()
    wait_until(lambda: validator_uid(node) not in (None, validator), 60, what="operator validator restarted")
    assert node.operand_label() == "true" and not node.held()


def test_an_agent_killed_with_the_host_clients_stopped_starts_them_when_it_comes_back(
    gpu_node: GpuNodeFactory, tmp_path: Path, reconciler_kubeconfig: Path
) -> None:
    node, host = operator_node(gpu_node, tmp_path)
    mark_driver_ready(host)
    first = agent(node, host, reconciler_kubeconfig)
    node.wait_outcome("success", "all-3g applied")
    host.block("nvidia-ctk")
    node.label("gpu1-7g")
    wait_until(lambda: any(c.startswith("nvidia-ctk") for c in host.calls()), 90, what="the CDI step")
    node.kill_agent(first, signal.SIGKILL)
    assert not host.running(DCGM)  # stopped, and nobody left to start it
    host.unblock("nvidia-ctk")

    agent(node, host, reconciler_kubeconfig)  # the agent back: it finds the record
    node.wait_outcome("success", "gpu1-7g applied")
    assert host.running(DCGM) and host.running(KUBELET)
    assert node.counts()[1] == {"7g.40gb": 1}
    assert node.progress_phase() == (None, 0) and not node.held()


def test_a_failed_cdi_refresh_is_reported_and_retried_on_resync(
    gpu_node: GpuNodeFactory, tmp_path: Path, reconciler_kubeconfig: Path
) -> None:
    node, host = operator_node(gpu_node, tmp_path)
    mark_driver_ready(host, host_driver=False)  # the driver container: no host client is touched
    agent(node, host, reconciler_kubeconfig, "--resync-seconds=3")
    node.wait_outcome("success", "all-3g applied")
    host.fail("nvidia-ctk", "open /var/run/cdi/management.nvidia.com-gpu.yaml: read-only file system")
    since = node.label("gpu1-7g")
    reason = node.wait_outcome("failed", "containers cannot use it yet", since=since)
    assert reason.startswith("the GPUs hold gpu1-7g but containers cannot use it yet: ")
    assert "read-only file system" in reason
    assert node.counts()[1] == {"7g.40gb": 1}  # the new layout stays
    assert node.operand_label() == "true" and not node.held()
    assert not any(c.startswith("systemctl") for c in host.calls())
    host.heal("nvidia-ctk")
    node.wait_outcome("success", "gpu1-7g applied")  # the next resync refreshes what is owed


def test_operand_labels_without_their_daemonset_are_warned_about(
    gpu_node: GpuNodeFactory, tmp_path: Path
) -> None:
    node = gpu_node(gpus=2, initial="all-3g", daemonset=False)  # the label says it runs; it does not
    node.start_agent(f"--host-root={tmp_path}", "--cdi=off")
    node.wait_outcome("success", "all-3g applied")
    since = node.label("gpu1-7g")
    node.wait_outcome("success", "gpu1-7g applied", since=since)
    events = node.core.list_namespaced_event(
        "default", field_selector=f"involvedObject.name={node.name},reason=OperandsNotFound"
    )
    notes = [e.message for e in events.items]
    assert notes, "no OperandsNotFound event"
    assert notes[0].startswith("nvidia.com/gpu.deploy.device-plugin=true, ")
    assert (
        f"say GPU operands run on this node, but no GPU Operator DaemonSet for them is in namespace {node.namespace}"
        in notes[0]
    )


def test_the_single_mig_strategy_refuses_a_layout_of_several_profiles(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    node.core.patch_node(node.name, {"metadata": {"labels": {keys.LABEL_MIG_STRATEGY: "single"}}})
    before = node.geometries()
    node.start_agent("--cdi=off")
    node.wait_outcome("success", "all-3g applied")
    since = node.label("gpu1-7g")
    reason = node.wait_outcome("failed", "mig.strategy", since=since)
    assert reason.startswith("config gpu1-7g cannot be applied on this node: nvidia.com/mig.strategy=single")
    assert "(3g.20gb, 7g.40gb)" in reason and "-MIG-INVALID" in reason
    assert node.geometries() == before and not node.held()


def test_a_default_layout_is_given_to_an_unlabelled_mig_capable_node_when_asked(
    gpu_node: GpuNodeFactory,
) -> None:
    node = gpu_node(gpus=2, initial=None)  # MIG-capable GPUs, no layout label
    node.start_agent("--cdi=off", "--default-mig-config=all-disabled")
    node.wait_outcome("success", "all-disabled applied")
    assert node.read().metadata.labels[keys.LABEL_MIG_CONFIG] == "all-disabled"
    events = node.core.list_namespaced_event(
        "default", field_selector=f"involvedObject.name={node.name},reason=DefaultLayout"
    )
    assert [e.message for e in events.items] == [
        f"{keys.LABEL_MIG_CONFIG}=all-disabled set: the node's GPUs are MIG-capable and it had no layout "
        "(--default-mig-config)"
    ]
    # Without the flag (the default), an unlabelled node is left alone.
    other = gpu_node(gpus=2, initial=None)
    other.start_agent("--cdi=off")
    wait_until(lambda: keys.ANNOTATION_GPUS in (other.read().metadata.annotations or {}), 60, what="report")
    assert keys.LABEL_MIG_CONFIG not in other.read().metadata.labels


def test_a_clients_list_it_may_not_read_fails_the_change_before_any_gpu_changes(
    gpu_node: GpuNodeFactory, workload_plane: Any, tmp_path: Path
) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    # The agent's rules without any ConfigMap access (it reads its config from a file here), and no
    # Role in the operands' namespace: the clients list is not readable.
    rules = [r for r in RULES if "configmaps" not in r["resources"]]
    kubeconfig = service_account_kubeconfig(workload_plane.api, tmp_path / "no-cm.kubeconfig", "no-cm", rules)
    host = HostRootFixture.build(tmp_path / "host", units={DCGM: True})
    mark_driver_ready(host)
    agent(node, host, kubeconfig, f"--operands-namespace={node.namespace}")
    node.wait_outcome("success", "all-3g applied")
    before = node.geometries()
    since = node.label("gpu1-7g")
    reason = node.wait_outcome("failed", "gpu1-7g not applied", since=since)
    assert (
        f"could not read the host GPU clients list (ConfigMap {node.namespace}/default-gpu-clients)" in reason
    )
    assert "403" in reason and "reconciler.operatorRbac" in reason
    assert node.geometries() == before and host.running(DCGM) and not node.held()
