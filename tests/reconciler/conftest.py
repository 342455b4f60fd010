"""End-to-end support for the reconciler: the REAL `mig-guard reconcile` as a subprocess per kwok
node, simulated GPUs in a state file the test reads too, and a PodResources server on a unix
socket (kwok nodes have no kubelet, so nothing else would answer the reconciler's gRPC `List`)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch
from node_harness import NodeFiles

from devcluster.faultproxy import FaultProxy
from devcluster.helpers import (
    create_gpu_node,
    ensure_namespace,
    service_account_kubeconfig,
    wait_for_mig_state,
)
from devcluster.processes import wait_until
from migcore import keys
from migcore.catalog import load_catalog, sanitise_product_name
from migcore.check import check_config, hardware_from_report
from migcore.config import parse_config
from migcore.planning import desired_geometries, plan_node
from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import GpuModel, SimulatedNvml, load_gpu_model
from reconciler.podresources.server import PodResourcesServer
from reconciler.rbac import RULES

A100 = "NVIDIA-A100-SXM4-40GB"
DP_LABEL = "nvidia.com/gpu.deploy.device-plugin"
DP_APP = "nvidia-device-plugin-daemonset"

E2E_CONFIG = """\
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-3g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  gpu1-7g:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [1]
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
  all-1g:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  too-many-3g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 3}
"""


@dataclass
class GpuNode(NodeFiles):
    """A kwok node with simulated GPUs, its own namespace, operand DaemonSet and PodResources socket."""

    api: Any
    kubeconfig: Path
    name: str
    namespace: str
    workdir: Path
    gpus: int
    socket: Path
    podresources: PodResourcesServer
    simulated: tuple[str, str] = ("--simulated-gpus", f"{A100}:2")  # how the agent gets its GPUs
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen: list[tuple[str | None, bool]] = field(default_factory=list)  # (state, our taint?) per update

    def counts(self) -> dict[int, dict[str, int]]:
        return {i: dict(g.device_counts()) for i, g in self.geometries().items()}

    # --- the agent --------------------------------------------------------------------------------
    def start_agent(
        self,
        *extra: str,
        faults: str | None = None,
        latency: str | None = None,
        configmap: str | None = None,
        kubeconfig: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `mig-guard reconcile` for this node (config: the file, or ConfigMap NAMESPACE/NAME;
        credentials: the admin's unless `kubeconfig` is given)."""
        argv = [
            sys.executable, "-m", "mig_guard.cli", "reconcile",
            "--node-name", self.name,
            "--kubeconfig", str(kubeconfig or self.kubeconfig),
            "--gpu-backend", "simulated",
            *self.simulated,
            "--simulated-state-file", str(self.state_file),
            *(("--configmap", configmap) if configmap else ("--mig-config-file", str(self.config_file))),
            "--podresources-socket", str(self.socket),
            "--operands-namespace", self.namespace,
            "--operand-timeout", "30",
            "--eviction-timeout", "30",
            "--resync-seconds", "600",
        ]  # fmt: skip
        if faults:
            argv += ["--simulated-faults", faults]
        if latency:
            argv += ["--simulated-latency", latency]
        argv += list(extra)
        log = open(self.workdir / f"agent-{len(self.agents)}.log", "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.agents.append(proc)
        return proc

    def kill_agent(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def agent_logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n" + p.read_text(errors="replace")[-4000:]
            for p in sorted(self.workdir.glob("agent-*.log"))
        )

    # --- the node ---------------------------------------------------------------------------------
    def read(self) -> Any:
        return self.core.read_node(self.name)

    def label(self, config: str | None) -> str:
        """Set the desired config; returns the node's resourceVersion right after (for `since`)."""
        node = self.core.patch_node(self.name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: config}}})
        return str(node.metadata.resource_version)

    def state(self) -> tuple[str | None, str]:
        node = self.read()
        return (
            (node.metadata.labels or {}).get(keys.LABEL_MIG_STATE),
            (node.metadata.annotations or {}).get(keys.ANNOTATION_REASON, ""),
        )

    def wait_outcome(self, state: str, reason_has: str, timeout: float = 90, since: str | None = None) -> str:
        """Wait for `state` with a reason containing `reason_has`; return the reason.

        It watches the node, so a state that lasts only a moment (the agent may move on at once)
        is seen too: from the node as it is now, or with `since` (a resourceVersion, e.g. what
        `label` returned) from every update after it, including those before this call."""

        def alive() -> None:
            for proc in self.agents:
                if proc.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM, 0):
                    raise AssertionError(f"agent exited with {proc.returncode}:\n{self.agent_logs()}")

        reached, last = wait_for_mig_state(
            self.api, self.name, state, reason_has, timeout=timeout, since=since, check=alive
        )
        if reached:
            return last[1]
        raise AssertionError(
            f"state {state} ({reason_has}) not reached in {timeout}s; last seen {last}; now {self.state()}\n"
            f"{self.agent_logs()}"
        )

    def progress_phase(self) -> tuple[str | None, int]:
        raw = (self.read().metadata.annotations or {}).get(keys.ANNOTATION_PROGRESS)
        if not raw:
            return None, 0
        body = json.loads(raw)
        return body.get("phase"), int(body.get("step", 0))

    def held(self) -> bool:
        node = self.read()
        return (
            keys.ANNOTATION_HOLD in (node.metadata.annotations or {})
            or any(t.key == keys.TAINT_KEY for t in node.spec.taints or [])
            or bool(node.spec.unschedulable)
        )

    def operand_label(self) -> str | None:
        return (self.read().metadata.labels or {}).get(DP_LABEL)

    # --- workloads --------------------------------------------------------------------------------
    def run_pod(self, name: str, resource: str = "nvidia.com/mig-3g.20gb") -> None:
        self.core.create_namespaced_pod(
            self.namespace,
            {
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {
                    "nodeName": self.name,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "main",
                            "image": "cuda",
                            "resources": {"limits": {resource: "1"}, "requests": {resource: "1"}},
                        }
                    ],
                },
            },
        )

    def pods(self) -> set[str]:
        """Names of the workload pods (not operands) still on the node and not terminating."""
        items = self.core.list_namespaced_pod(
            self.namespace, field_selector=f"spec.nodeName={self.name}"
        ).items
        return {
            p.metadata.name
            for p in items
            if p.metadata.deletion_timestamp is None and (p.metadata.labels or {}).get("app") != DP_APP
        }

    def wait_running(self, names: set[str]) -> None:
        def running() -> bool:
            items = self.core.list_namespaced_pod(self.namespace).items
            phase = {p.metadata.name: p.status.phase for p in items}
            return all(phase.get(n) == "Running" for n in names)

        wait_until(running, 60, what=f"pods {sorted(names)} running")

    def assign(self, placements: Mapping[str, tuple[int, int]]) -> None:
        """Tell the PodResources server pod -> (GPU, GI start), using the GPUs' real MIG UUIDs."""
        access = self.access()
        by_spot: dict[tuple[int, int | None], str] = {}
        for gpu in range(self.gpus):
            for uid, start in access.device_ids(gpu).items():
                by_spot.setdefault((gpu, start), uid)
        self.podresources.set(
            {
                (self.namespace, pod): [("nvidia.com/mig-3g.20gb", [by_spot[spot]])]
                for pod, spot in placements.items()
            }
        )

    def operand_pods(self) -> int:
        items = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"app={DP_APP}", field_selector=f"spec.nodeName={self.name}"
        ).items
        return len(items)

    def record_updates(self, stop: threading.Event) -> None:
        """Remember (state, tainted?) at every update of the node: proves the hold during a change."""
        w = watch.Watch()
        stream = w.stream(
            self.core.list_node, field_selector=f"metadata.name={self.name}", timeout_seconds=120
        )
        with contextlib.suppress(Exception):  # the stream breaks when the plane stops at the end
            for event in stream:
                if stop.is_set():
                    w.stop()
                    break
                node = event["object"]
                tainted = any(t.key == keys.TAINT_KEY for t in node.spec.taints or [])
                self.seen.append(((node.metadata.labels or {}).get(keys.LABEL_MIG_STATE), tainted))


@pytest.fixture
def reconciler_kubeconfig(workload_plane: Any, tmp_path: Path) -> Path:
    """A kubeconfig for a ServiceAccount bound to exactly `reconciler.rbac.RULES` (least privilege)."""
    return service_account_kubeconfig(
        workload_plane.api, tmp_path / "reconciler.kubeconfig", "reconciler", RULES
    )


def prepare_gpus(
    state_file: Path, gpus: int, config_text: str, config_name: str | None, model: str | None = None
) -> None:
    """Put the simulated GPUs in the layout of `config_name` before any agent runs (`model`: a
    driver-table file for GPUs outside the catalog, instead of A100s)."""
    specs: list[str | GpuModel] = [A100] * gpus if model is None else [load_gpu_model(model)] * gpus
    access = GpuAccess(SimulatedNvml(specs, state_file=state_file))
    access.start()
    if config_name is None:
        return
    result = check_config(
        parse_config(config_text, load_catalog()),
        config_name,
        hardware_from_report(load_catalog(), access.discover()),
    )
    current = access.geometries()
    for gpu_plan in plan_node(current, desired_geometries(result, current)).changed:
        access.apply(gpu_plan)


@pytest.fixture
def gpu_node(workload_plane: Any, tmp_path: Path) -> Generator[Callable[..., GpuNode]]:
    """Factory: `gpu_node(gpus=2, initial="all-3g")` -> a kwok node whose GPUs hold `initial`,
    labelled with it, a device-plugin DaemonSet running on it. Agents are killed at teardown."""
    made: list[GpuNode] = []

    def make(
        gpus: int = 2,
        initial: str | None = "all-3g",
        operand: str | None = "true",
        daemonset: bool = True,
        model: str | None = None,
        config: str = E2E_CONFIG,
    ) -> GpuNode:
        suffix = uuid.uuid4().hex[:6]
        workdir = tmp_path / f"node-{suffix}"
        workdir.mkdir()
        (workdir / "config.yaml").write_text(config)
        prepare_gpus(workdir / "gpus.json", gpus, config, initial, model)
        name = f"gpu-{suffix}"
        namespace = f"e2e-{suffix}"
        ensure_namespace(workload_plane.api, namespace)
        labels = {DP_LABEL: operand} if operand else {}
        if initial:
            labels[keys.LABEL_MIG_CONFIG] = initial
        product = A100 if model is None else sanitise_product_name(load_gpu_model(model).name)
        create_gpu_node(
            workload_plane.api, name, product, gpus, labels=labels,
            extended_resources={"nvidia.com/mig-3g.20gb": "4", "nvidia.com/mig-1g.5gb": "14"},
        )  # fmt: skip
        socket = workdir / "kubelet.sock"
        server = PodResourcesServer(str(socket)).start()
        simulated = (
            ("--simulated-gpus", f"{A100}:{gpus}")
            if model is None
            else ("--simulated-gpu-spec", f"{model}:{gpus}")
        )
        node = GpuNode(
            workload_plane.api,
            workload_plane.kubeconfig_path,
            name,
            namespace,
            workdir,
            gpus,
            socket,
            server,
            simulated,
        )
        if operand and daemonset:
            k8s.AppsV1Api(workload_plane.api).create_namespaced_daemon_set(
                namespace,
                {
                    # Labelled as the GPU Operator labels its DaemonSets (how its namespace is found).
                    "metadata": {"name": "device-plugin", "labels": {"app": DP_APP}},
                    "spec": {
                        "selector": {"matchLabels": {"app": DP_APP}},
                        "template": {
                            "metadata": {"labels": {"app": DP_APP}},
                            "spec": {
                                "nodeSelector": {DP_LABEL: operand, "kubernetes.io/hostname": name},
                                "tolerations": [{"operator": "Exists"}],
                                "terminationGracePeriodSeconds": 0,
                                "containers": [{"name": "main", "image": "nvidia/k8s-device-plugin"}],
                            },
                        },
                    },
                },
            )
            wait_until(lambda: node.operand_pods() == 1, 60, what="device plugin running")
        made.append(node)
        return node

    yield make
    for node in made:
        for proc in node.agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        node.podresources.stop()


@pytest.fixture(scope="session")
def fault_proxy(control_plane: Any) -> Generator[FaultProxy]:
    """One fault-injecting proxy in front of the session's API server (faults cleared per test)."""
    with FaultProxy(control_plane) as proxy:
        yield proxy


@pytest.fixture
def faults(fault_proxy: FaultProxy) -> Generator[FaultProxy]:
    fault_proxy.clear()
    yield fault_proxy
    fault_proxy.clear()
