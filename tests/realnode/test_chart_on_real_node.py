"""The chart, installed for real with helm on the real node, with the image from the real
Dockerfile: the certificate hook Jobs run, the API server calls both webhook replicas through
their Service, the reconciler DaemonSet pod (simulated GPUs, the only stand-in) applies a layout,
reads the real kubelet's PodResources API and evicts exactly the pods on instances that change
(through the Eviction API, PodDisruptionBudgets honoured); then upgrade and uninstall.

The node is dressed as a GPU Operator node: the `nvidia` RuntimeClass (here on runc), the
operator's namespace with its host GPU clients list, the driver's validation marker, and a host
root (the chart's `reconciler.hostRoot`) whose systemctl, nvidia-ctk and nvidia-smi are recording
stand-ins (devcluster.hostroot): the pod waits for the marker, then chroots into that root.

The tests run in file order on one release (installed by the module's fixture): each step
builds on the state the one before left, as an admin's session would.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client import ApiException

from devcluster import binaries
from devcluster.deviceplugin.server import DevicePlugins, wait_for_capacity
from devcluster.helpers import ensure_namespace, gfd_labels, wait_for_mig_state
from devcluster.hostroot import HostRootFixture
from devcluster.images import ImageArchive
from devcluster.node import RealNode
from devcluster.processes import wait_until
from migcore import keys
from migcore.geometry import GpuGeometry
from migcore.usage import NodeUsage
from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import SimulatedNvml
from reconciler.workloads import list_pod_devices

CHART = Path(__file__).resolve().parents[2] / "charts" / "mig-guard"
RELEASE = "mig-guard"
NAMESPACE = "mig-guard"
WORKLOADS = "workloads"
PRODUCT = "NVIDIA-A100-SXM4-40GB"
DCGM = "nvidia-dcgm.service"
MIG_1G = "nvidia.com/mig-1g.5gb"
CONFIG = """\
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-1g.5gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  gpu1-3g.20gb:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: [1]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  gpu1-7g.40gb:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: [1]
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
"""


@dataclass
class Release:
    """One helm release of the chart on the real node, and ways to look at it."""

    node: RealNode
    image: ImageArchive
    workdir: Path
    host: HostRootFixture
    installed_in: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def api(self) -> Any:
        return self.node.api

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.node.api)

    @property
    def host_state(self) -> Path:
        """reconciler.hostStateDir on the host: the simulated GPUs' state lives there."""
        return self.workdir / "host-state"

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.node.kubeconfig_path),
            "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
        }
        return subprocess.run(
            [str(binaries.find_binary("helm")), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binaries.find_binary("kubectl")), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "KUBECONFIG": str(self.node.kubeconfig_path)},
            check=False,
        )

    def values(self) -> list[str]:
        name, tag = self.image.name.rsplit(":", 1)
        config = self.workdir / "mig-parted-config.yaml"
        config.write_text(CONFIG)
        return [
            f"--set=image.repository={name}",
            f"--set=image.tag={tag}",
            "--set=image.pullPolicy=Never",
            "--set=reconciler.gpuBackend=simulated",
            f"--set=reconciler.simulatedGpus={PRODUCT}:2",
            f"--set=reconciler.podResourcesDir={self.node.pod_resources_dir}",
            f"--set=reconciler.hostStateDir={self.host_state}",
            "--set=reconciler.extraArgs={--eviction-timeout=15}",
            f"--set-file=migPartedConfig.config={config}",
            f"--set=reconciler.hostRoot={self.host.root}",
            f"--set=reconciler.driver.root={self.host.file('/run/nvidia/driver')}",
        ]

    # --- the node ---------------------------------------------------------------------------------
    def label(self, config: str) -> str:
        node = self.core.patch_node(self.node.name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: config}}})
        return str(node.metadata.resource_version)

    def wait_state(self, state: str, reason_has: str, since: str, timeout: float = 120) -> str:
        """Watch the node from `since` until the state label is `state` with a matching reason."""
        reached, last = wait_for_mig_state(
            self.api, self.node.name, state, reason_has, timeout=timeout, since=since
        )
        if not reached:
            raise AssertionError(
                f"state {state} ({reason_has}) not reached; last {last}\n{self.reconciler_log()}"
            )
        return last[1]

    def reconciler_log(self) -> str:
        return self.kubectl("logs", "-n", NAMESPACE, f"ds/{RELEASE}-reconciler", "--tail=40").stdout

    def geometries(self) -> dict[int, GpuGeometry]:
        """The simulated GPUs as the reconciler pod left them (its state file, on the host)."""
        access = GpuAccess(SimulatedNvml(state_file=self.host_state / "simulated-gpus.json"))
        access.start()
        try:
            return access.geometries()
        finally:
            access.stop()

    def mig_devices(self) -> dict[tuple[int, int], tuple[str, str]]:
        """(GPU, GI start) -> (resource name, MIG device UUID), as NVIDIA's device plugin sees them."""
        access = GpuAccess(SimulatedNvml(state_file=self.host_state / "simulated-gpus.json"))
        access.start()
        try:
            out = {}
            for gpu, geometry in access.geometries().items():
                profile_at = {gi.start: gi.profile for gi in geometry.instances}
                for uuid, start in access.device_ids(gpu).items():
                    if start is not None:
                        out[(gpu, start)] = (f"nvidia.com/mig-{profile_at[start]}", uuid)
            return out
        finally:
            access.stop()

    def webhook_pods(self) -> list[Any]:
        pods = self.core.list_namespaced_pod(
            NAMESPACE, label_selector="app.kubernetes.io/component=webhook"
        ).items
        return [p for p in pods if p.metadata.deletion_timestamp is None]

    def webhook_denials(self, pod: Any) -> float:
        """`mig_guard_webhook_requests_total{endpoint=validate,verdict=denied}` of one replica."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a pod IP is not in the serving certificate's names
        url = f"https://{pod.status.pod_ip}:8443/metrics"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("mig_guard_webhook_requests_total{") and 'verdict="denied"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def typo_label(release: Release, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["label", "node", release.node.name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb", "--overwrite"]
    return release.kubectl(*args, *(["--dry-run=server"] if dry_run else []))


@pytest.fixture(scope="module")
def release(
    real_node: RealNode, mig_guard_image: ImageArchive, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    workdir = tmp_path_factory.mktemp("release")
    # Mounted as a host is: a shared root (for the pod's HostToContainer mounts), /run a tmpfs of
    # its own (writable under the pod's read-only /host); the driver root inside it.
    host = HostRootFixture.build(
        workdir / "host", units={DCGM: True, "kubelet.service": True}, host_mounts=True
    )
    host.file("/run/nvidia/driver").mkdir(parents=True)
    rel = Release(real_node, mig_guard_image, workdir, host)
    # No hardware report from an earlier module's reconciler: this one's shows when it has used NVML.
    rel.core.patch_node(
        real_node.name,
        {"metadata": {"labels": gfd_labels(PRODUCT, 2), "annotations": {keys.ANNOTATION_GPUS: None}}},
    )
    # What the GPU Operator has on the cluster: its runtime class (its handler here is runc), its
    # namespace (the chart's Role goes there) and its host GPU clients list.
    k8s.NodeV1Api(rel.api).create_runtime_class({"metadata": {"name": "nvidia"}, "handler": "runc"})
    ensure_namespace(rel.api, keys.GPU_OPERATOR_NAMESPACE)
    rel.core.create_namespaced_config_map(
        keys.GPU_OPERATOR_NAMESPACE,
        {
            "metadata": {"name": "default-gpu-clients"},
            "data": {"clients.yaml": f"version: v1\nsystemd-services:\n  - nvsm.service\n  - {DCGM}\n"},
        },
    )
    t0 = time.monotonic()
    try:
        installed = rel.helm(
            "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
            "--wait", "--timeout=5m", *rel.values(),
        )  # fmt: skip
        rel.installed_in = time.monotonic() - t0
        assert installed.returncode == 0, installed.stdout + installed.stderr
        # The reconciler waits for the driver's validation marker before any NVML call, and says so.
        reached = wait_until_reason(rel, "waiting for the NVIDIA driver")
        annotations = rel.core.read_node(real_node.name).metadata.annotations or {}
        rel.notes["driver wait"] = (reached, list(host.calls()), annotations.get(keys.ANNOTATION_GPUS))
        marker = host.file("/run/nvidia/validations/driver-ready")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("IS_HOST_DRIVER=true\nNVIDIA_DRIVER_ROOT=/\nNVIDIA_DEV_ROOT=/\n")
        yield rel
    finally:
        if rel.helm("status", RELEASE, "--namespace", NAMESPACE).returncode == 0:
            rel.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait")
        wait_until(
            lambda: not rel.core.list_namespaced_pod(NAMESPACE).items, 120, what="mig-guard's pods gone"
        )
        k8s.NodeV1Api(rel.api).delete_runtime_class("nvidia")
        host.close()


def wait_until_reason(release: Release, text: str, timeout: float = 120) -> str:
    """The node's reason once it contains `text`."""
    found: list[str] = []

    def said() -> bool:
        reason = (release.core.read_node(release.node.name).metadata.annotations or {}).get(
            keys.ANNOTATION_REASON, ""
        )
        found[:] = [reason]
        return text in reason

    wait_until(said, timeout, what=f"the node's reason to say {text!r}")
    return found[0]


def test_install_ran_the_certificate_hooks_and_patched_the_ca_bundles(release: Release) -> None:
    serving = release.core.read_namespaced_secret(f"{RELEASE}-webhook-tls", NAMESPACE)
    ca = release.core.read_namespaced_secret(f"{RELEASE}-webhook-tls-ca", NAMESPACE)
    assert serving.type == "kubernetes.io/tls"
    assert serving.data["ca.crt"] == ca.data["tls.crt"]
    adm = k8s.AdmissionregistrationV1Api(release.api)
    hooks = [
        *adm.read_validating_webhook_configuration(RELEASE).webhooks,
        *adm.read_mutating_webhook_configuration(RELEASE).webhooks,
    ]
    assert len(hooks) >= 2
    for hook in hooks:
        assert hook.client_config.ca_bundle == ca.data["tls.crt"], hook.name
        assert hook.client_config.service.name == f"{RELEASE}-webhook"
    # Both hook Jobs succeeded and were deleted by their hook-delete-policy.
    jobs = k8s.BatchV1Api(release.api).list_namespaced_job(NAMESPACE).items
    assert not [j.metadata.name for j in jobs if j.metadata.name.startswith(f"{RELEASE}-certs-p")]


def test_both_webhook_replicas_are_ready_behind_the_service(release: Release) -> None:
    deployment = k8s.AppsV1Api(release.api).read_namespaced_deployment(f"{RELEASE}-webhook", NAMESPACE)
    assert deployment.status.ready_replicas == 2
    pods = release.webhook_pods()
    assert {p.spec.node_name for p in pods} == {release.node.name}
    slices = (
        k8s.DiscoveryV1Api(release.api)
        .list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={RELEASE}-webhook"
        )
        .items
    )
    ready = {
        address for s in slices for e in s.endpoints or [] if e.conditions.ready for address in e.addresses
    }
    assert ready == {p.status.pod_ip for p in pods}
    assert len(ready) == 2


def test_a_typo_is_denied_by_the_installed_webhook_through_its_service(release: Release) -> None:
    denied = typo_label(release)
    assert denied.returncode != 0
    assert 'admission webhook "nodes.validate.mig-guard.io" denied the request' in denied.stderr
    assert "is not a config in ConfigMap mig-guard/mig-guard-mig-parted-config" in denied.stderr
    assert "did you mean all-1g.5gb" in denied.stderr
    assert keys.LABEL_MIG_CONFIG not in (release.core.read_node(release.node.name).metadata.labels or {})
    # The API server reaches the replicas through the Service. It keeps its connection, and
    # kube-proxy picks a replica per connection: once the replica it talks to is gone, its calls
    # reach another one.
    pods = {p.metadata.name: p for p in release.webhook_pods()}
    before = {name: release.webhook_denials(p) for name, p in pods.items()}
    for _ in range(5):
        assert "denied the request" in typo_label(release, dry_run=True).stderr
    middle = {name: release.webhook_denials(p) for name, p in pods.items()}
    assert sum(middle.values()) - sum(before.values()) == 5
    serving = max(pods, key=lambda name: middle[name] - before[name])
    release.core.delete_namespaced_pod(serving, NAMESPACE)
    wait_until(lambda: not _exists(release, serving), 60, what="replica terminated")
    wait_until(
        lambda: (
            k8s.AppsV1Api(release.api)
            .read_namespaced_deployment(f"{RELEASE}-webhook", NAMESPACE)
            .status.ready_replicas
            == 2
            and len(release.webhook_pods()) == 2
        ),
        120,
        what="the replaced webhook replica ready",
    )
    now = {p.metadata.name: p for p in release.webhook_pods()}
    counts = {name: release.webhook_denials(p) for name, p in now.items()}
    for _ in range(3):
        result = typo_label(release, dry_run=True)
        assert "denied the request" in result.stderr, result.stderr
    assert sum(release.webhook_denials(p) for p in now.values()) == sum(counts.values()) + 3
    assert serving not in now  # so another replica than the first one answered, reached the same way


def _exists(release: Release, pod: str) -> bool:
    try:
        release.core.read_namespaced_pod(pod, NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_the_reconciler_pod_applies_a_valid_layout_and_the_node_reaches_success(release: Release) -> None:
    since = release.label("all-1g.5gb")
    reason = release.wait_state("success", "all-1g.5gb applied", since)
    assert "GPUs 0-1: 1g.5gb@0" in reason
    assert {i: dict(g.device_counts()) for i, g in release.geometries().items()} == {
        0: {"1g.5gb": 7},
        1: {"1g.5gb": 7},
    }
    node = release.core.read_node(release.node.name)
    assert not any(t.key == keys.TAINT_KEY for t in node.spec.taints or [])
    assert keys.ANNOTATION_HOLD not in (node.metadata.annotations or {})
    # The condition is written right after the state label (its own write, on the status subresource).
    wait_until(lambda: _ready_condition(release) == "True", 30, what="MIGConfigReady=True")


def _ready_condition(release: Release) -> str | None:
    node = release.core.read_node(release.node.name)
    return next((c.status for c in node.status.conditions or [] if c.type == keys.CONDITION_READY), None)


def test_on_a_gpu_operator_node_the_pod_waits_for_the_driver_then_runs_the_host_steps(
    release: Release,
) -> None:
    # Before the marker: said on the node, no GPU read (no hardware report, which the reconciler
    # publishes once NVML has started), no host command run.
    reason, calls, report = release.notes["driver wait"]
    assert "/host/run/nvidia/validations/driver-ready does not exist yet" in reason
    assert calls == [] and report is None
    pod = release.core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=reconciler")
    assert [p.spec.runtime_class_name for p in pod.items] == ["nvidia"]
    # The change to all-1g.5gb (a MIG mode change) ran in the pod, chrooted into the host root: the
    # running host GPU clients of the operator's list and kubelet stopped, the CDI refresh, then
    # the clients started again.
    host = release.host
    calls = host.calls()
    assert [c for c in calls if c.startswith("systemctl stop")] == [
        f"systemctl stop {DCGM}",
        "systemctl stop kubelet.service",
    ]
    refresh = [c for c in calls if c.startswith(("nvidia-smi", "nvidia-ctk"))]
    assert refresh[:3] == [
        "nvidia-smi ",
        "nvidia-ctk system create-device-nodes --control-devices --dev-root=/",
        "nvidia-ctk cdi generate --mode=management --driver-root=/ --dev-root=/ --vendor=management.nvidia.com "
        "--class=gpu --nvidia-cdi-hook-path=/usr/local/nvidia/toolkit/nvidia-cdi-hook "
        "--output=/var/run/cdi/management.nvidia.com-gpu.yaml",
    ]
    assert calls.index("systemctl stop kubelet.service") < calls.index("nvidia-smi ")
    assert calls.index("nvidia-smi ") < calls.index(f"systemctl start {DCGM}")
    assert host.running(DCGM) and host.running("kubelet.service")
    assert host.file("/var/run/cdi/management.nvidia.com-gpu.yaml").exists()


@pytest.fixture
def device_plugins(release: Release) -> Iterator[DevicePlugins]:
    with DevicePlugins(release.node.device_plugin_dir) as plugins:
        yield plugins


def workload(release: Release, name: str, resource: str) -> Any:
    return release.core.create_namespaced_pod(
        WORKLOADS,
        {
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "nodeName": release.node.name,
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "main",
                        "image": release.node.images[0].name,
                        "imagePullPolicy": "Never",
                        "command": [
                            "python3",
                            "-c",
                            "import os, time; print(os.environ['NVIDIA_VISIBLE_DEVICES'], flush=True); time.sleep(100000)",
                        ],
                        "resources": {"limits": {resource: "1"}},
                    }
                ],
            },
        },
    )


def usage_names(release: Release) -> set[str]:
    """The pods the node's usage report (mig-guard.io/usage) names."""
    text = (release.core.read_node(release.node.name).metadata.annotations or {}).get(keys.ANNOTATION_USAGE)
    return {str(p) for p in NodeUsage.from_annotation(text).pods()} if text else set()


def kubectl_mig(release: Release, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl mig ARGS` as an admin runs it: kubectl finds kubectl-mig on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        [str(binaries.find_binary("kubectl")), "mig", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": str(release.node.kubeconfig_path), "PATH": path},
        check=False,
    )


def running(release: Release) -> dict[str, str]:
    """Workload pod name -> uid, for pods Running and not being deleted."""
    pods = release.core.list_namespaced_pod(WORKLOADS).items
    return {
        p.metadata.name: p.metadata.uid
        for p in pods
        if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
    }


def test_a_change_evicts_exactly_the_pods_on_changing_instances_and_honours_pdbs(
    release: Release, device_plugins: DevicePlugins
) -> None:
    devices = release.mig_devices()
    on_gpu0, on_gpu1 = devices[(0, 0)][1], devices[(1, 0)][1]
    # One MIG device advertised on each GPU, so each of the two pods lands on another GPU.
    device_plugins.set({MIG_1G: [on_gpu0, on_gpu1]})
    wait_for_capacity(release.core, release.node.name, {MIG_1G: 2})
    release.core.create_namespace({"metadata": {"name": WORKLOADS}})
    for name in ("workload-a", "workload-b"):
        workload(release, name, MIG_1G)
    wait_until(lambda: len(running(release)) == 2, 90, what="workload pods running")
    before = running(release)

    # What the real kubelet reports through PodResources (the socket the reconciler pod reads).
    socket = str(release.node.pod_resources_dir / "kubelet.sock")
    assigned = {
        entry.pod.name: entry.devices[MIG_1G]
        for entry in list_pod_devices(socket)
        if entry.pod.namespace == WORKLOADS
    }
    assert sorted(assigned.values()) == sorted([(on_gpu0,), (on_gpu1,)])
    assert sorted(i for ids in device_plugins.allocations(MIG_1G) for i in ids) == sorted([on_gpu0, on_gpu1])
    mover = next(name for name, ids in assigned.items() if ids == (on_gpu1,))
    stayer = next(name for name in assigned if name != mover)
    log = release.core.read_namespaced_pod_log(mover, WORKLOADS)
    assert log.strip() == on_gpu1  # Allocate's environment reached the container

    # A PodDisruptionBudget that forbids moving it: the change fails and nothing moves.
    policy = k8s.PolicyV1Api(release.api)
    policy.create_namespaced_pod_disruption_budget(
        WORKLOADS,
        {
            "metadata": {"name": "keep-mover"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": mover}}},
        },
    )
    wait_until(
        lambda: (
            (
                policy.read_namespaced_pod_disruption_budget(
                    "keep-mover", WORKLOADS
                ).status.disruptions_allowed
                == 0
            )
            and policy.read_namespaced_pod_disruption_budget(
                "keep-mover", WORKLOADS
            ).status.observed_generation
            == 1
        ),
        60,
        what="PDB status",
    )
    geometries = release.geometries()
    since = release.label("gpu1-3g.20gb")
    reason = release.wait_state("failed", "gpu1-3g.20gb not applied", since)
    assert f"PodDisruptionBudget {WORKLOADS}/keep-mover blocks eviction of pod {WORKLOADS}/{mover}" in reason
    assert release.geometries() == geometries
    assert running(release) == before

    # Without it, the next change moves exactly the pod on GPU 1; the one on GPU 0 keeps running.
    # Seen before it is made: the reconciler publishes who uses which MIG device (from the real
    # kubelet's PodResources), and the webhook's warnings on a dry run and `kubectl mig plan` name
    # the pod the change then evicts.
    policy.delete_namespaced_pod_disruption_budget("keep-mover", WORKLOADS)
    wait_until(
        lambda: usage_names(release) == {f"{WORKLOADS}/{mover}", f"{WORKLOADS}/{stayer}"}, 60, what="usage"
    )
    label = f"{keys.LABEL_MIG_CONFIG}=gpu1-7g.40gb"
    dry = release.kubectl("label", "node", release.node.name, label, "--overwrite", "--dry-run=server")
    assert dry.returncode == 0, dry.stderr
    assert f"Warning: GPU 1: 1g.5gb x7 -> 7g.40gb, evicts {WORKLOADS}/{mover}\n" in dry.stderr
    assert "Warning: GPU 0 untouched" in dry.stderr
    planned = kubectl_mig(release, "plan", release.node.name, "gpu1-7g.40gb", "-o", "json")
    assert planned.returncode == 0, planned.stderr
    preview = json.loads(planned.stdout)
    assert preview["configSource"] == f"ConfigMap {NAMESPACE}/{RELEASE}-mig-parted-config"  # found by itself
    assert preview["evicts"] == [f"{WORKLOADS}/{mover}"]
    since = release.label("gpu1-7g.40gb")
    release.wait_state("success", "gpu1-7g.40gb applied", since)
    assert running(release) == {stayer: before[stayer]}
    assert {f"{WORKLOADS}/{name}" for name in before} - {f"{WORKLOADS}/{stayer}"} == set(preview["evicts"])
    assert {i: dict(g.device_counts()) for i, g in release.geometries().items()} == {
        0: {"1g.5gb": 7},
        1: {"7g.40gb": 1},
    }
    with pytest.raises(ApiException) as gone:
        release.core.read_namespaced_pod(mover, WORKLOADS)
    assert gone.value.status == 404
    plan = [
        e.message
        for e in release.core.list_namespaced_event(
            "default", field_selector=f"involvedObject.name={release.node.name}"
        ).items
        if e.reason == "Evicting"
    ]
    assert plan and all(mover in m and stayer not in m for m in plan), plan

    # The device plugin advertises the new instance (as NVIDIA's would after the change) and a
    # pod that asks for it runs there.
    new = release.mig_devices()
    resource, uuid = new[(1, 0)]
    assert resource == "nvidia.com/mig-7g.40gb"
    device_plugins.set({MIG_1G: [on_gpu0], resource: [uuid]})
    wait_for_capacity(release.core, release.node.name, {resource: 1})
    workload(release, "workload-7g", resource)
    wait_until(lambda: "workload-7g" in running(release), 90, what="a pod on the 7g instance")
    assert release.core.read_namespaced_pod_log("workload-7g", WORKLOADS).strip() == uuid


def test_upgrade_keeps_the_ca_and_the_ca_bundle_and_the_webhook_never_stops_judging(release: Release) -> None:
    def bundles() -> list[str]:
        adm = k8s.AdmissionregistrationV1Api(release.api)
        hooks = [
            *adm.read_validating_webhook_configuration(RELEASE).webhooks,
            *adm.read_mutating_webhook_configuration(RELEASE).webhooks,
        ]
        return [h.client_config.ca_bundle for h in hooks]

    ca_before = release.core.read_namespaced_secret(f"{RELEASE}-webhook-tls-ca", NAMESPACE).data
    bundles_before = bundles()
    pods_before = {p.metadata.name for p in release.webhook_pods()}
    verdicts: list[str] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            result = typo_label(release, dry_run=True)
            verdicts.append(
                "denied" if "denied the request" in result.stderr else result.stderr.strip() or "allowed"
            )
            time.sleep(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        upgraded = release.helm(
            "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--wait", "--timeout=5m",
            *release.values(), "--set=webhook.workers=1",
        )  # fmt: skip
    finally:
        stop.set()
        prober.join(timeout=30)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert release.core.read_namespaced_secret(f"{RELEASE}-webhook-tls-ca", NAMESPACE).data == ca_before
    assert bundles() == bundles_before
    assert not pods_before & {p.metadata.name for p in release.webhook_pods()}  # the replicas were replaced
    # Safety: the typo was never admitted. Availability: every call was judged. No call found a
    # replica that had stopped listening (the preStop sleep keeps it serving until its endpoint is
    # gone everywhere), and none was reset by one that was stopping (webhook.worker drains: every
    # request on an open connection answered, idle ones closed cleanly between requests).
    assert verdicts
    assert set(verdicts) == {"denied"}, [v for v in verdicts if v != "denied"]


def test_uninstall_leaves_nothing_behind(release: Release) -> None:
    # The ConfigMap guard protects the mig-parted ConfigMap while a node uses a config in it: a
    # plain delete is denied. The chart's pre-delete hook removes the webhook configurations
    # first, so Helm's own delete of that ConfigMap is never judged by it.
    configmap = f"{RELEASE}-mig-parted-config"
    guarded = release.kubectl("delete", "configmap", configmap, "-n", NAMESPACE, "--dry-run=server")
    assert guarded.returncode != 0
    assert 'admission webhook "configmap.validate.mig-guard.io" denied the request' in guarded.stderr
    removed = release.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    # Pods of deleted workloads go on terminating a while (the webhook waits out its preStop).
    wait_until(
        lambda: not release.core.list_namespaced_pod(NAMESPACE).items, 120, what="mig-guard's pods gone"
    )
    left = leftovers(release)
    assert left == [], left
    node = release.core.read_node(release.node.name)
    assert node.metadata.labels[keys.LABEL_MIG_CONFIG] == "gpu1-7g.40gb"  # the admin's label stays


#: What Kubernetes puts in every namespace (the namespace itself is the admin's: --create-namespace).
NAMESPACE_DEFAULTS = {("kube-root-ca.crt", NAMESPACE), ("default", NAMESPACE)}


def leftovers(release: Release) -> list[str]:
    """Everything mig-guard's chart or components created that still exists."""
    found = []
    listed = release.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
    skip = {"events", "events.events.k8s.io", "componentstatuses"}
    for resource in listed:
        if resource in skip:
            continue
        out = release.kubectl("get", resource, "--all-namespaces", "-o", "json")
        if out.returncode != 0:
            continue
        for item in json.loads(out.stdout).get("items", []):
            meta = item["metadata"]
            text = json.dumps(
                {"name": meta.get("name"), "labels": meta.get("labels"), "ns": meta.get("namespace")}
            )
            if not re.search(r"mig-guard", text) or resource in ("nodes", "namespaces"):
                continue
            if (
                meta["name"] == release.node.name
                or (meta["name"], meta.get("namespace")) in NAMESPACE_DEFAULTS
            ):
                continue  # the node's own objects; what every namespace gets
            found.append(f"{resource} {meta.get('namespace', '')}/{meta['name']}")
    node = release.core.read_node(release.node.name)
    for key in {**(node.metadata.labels or {}), **(node.metadata.annotations or {})}:
        if key.startswith("mig-guard.io/") or key == keys.LABEL_MIG_STATE:
            found.append(f"node key {key}")
    found += [f"node taint {t.key}" for t in node.spec.taints or [] if t.key.startswith("mig-guard.io/")]
    found += [f"node condition {c.type}" for c in node.status.conditions or [] if c.type == "MIGConfigReady"]
    return found
