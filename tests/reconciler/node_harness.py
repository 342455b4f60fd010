"""In-process support for the reconciler's failure tests: a Node on the real API server, simulated
GPUs in a state file, and `Reconciler` objects built on them the way `mig-guard reconcile` builds
one (a new one models a restarted agent). Tests drive the public entry points (`reconcile`,
`run`) and read the outcome from the Node and the GPUs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from devcluster.processes import wait_until
from kube.config_source import ConfigSource, FileFeed
from migcore import keys
from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import parse_config
from migcore.geometry import GpuGeometry
from migcore.planning import desired_geometries, plan_node
from reconciler.gpu_access import GpuAccess
from reconciler.loop import Reconciler, Settings
from reconciler.nvml_sim import SimulatedNvml

A100 = "NVIDIA-A100-SXM4-40GB"
DP = "nvidia.com/gpu.deploy.device-plugin"
DP_VALUE = "custom-v2"  # not "true": only a recorded value restores it exactly

CONFIG = """\
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-enabled:
    - devices: all
      mig-enabled: true
      mig-devices: {}
  all-1g:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  all-3g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  all-7g:
    - devices: all
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
  gpu0-3g-gpu1-off:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [1]
      mig-enabled: false
  gpu0-off:
    - devices: [0]
      mig-enabled: false
  gpu0-3g:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  gpu0-7g-gpu1-off:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
    - devices: [1]
      mig-enabled: false
  mixed-a:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [1]
      mig-enabled: false
    - devices: [2]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  mixed-b:
    - devices: [0]
      mig-enabled: false
    - devices: [1]
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
    - devices: [2]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
"""


def layouts(config_name: str, gpus: int) -> dict[int, GpuGeometry]:
    """The layouts `config_name` of CONFIG gives `gpus` A100s that hold nothing yet (MIG off)."""
    access = GpuAccess(SimulatedNvml([A100] * gpus))
    access.start()
    result = check_config(
        parse_config(CONFIG, load_catalog()),
        config_name,
        hardware_from_report(load_catalog(), access.discover()),
    )
    current = access.geometries()
    return desired_geometries(result, current)


class NodeFiles:
    """What every test node here has (SimNode, and the e2e tests' GpuNode in conftest.py): the API,
    a work folder holding its config file and its simulated GPUs' state file, read by any process."""

    api: Any
    workdir: Path

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.api)

    @property
    def state_file(self) -> Path:
        return self.workdir / "gpus.json"

    @property
    def config_file(self) -> Path:
        return self.workdir / "config.yaml"

    # --- the GPUs ---------------------------------------------------------------------------------
    def nvml(self, faults: str | None = None) -> SimulatedNvml:
        return SimulatedNvml(state_file=self.state_file, faults=faults)

    def access(self, faults: str | None = None) -> GpuAccess:
        """The simulated GPUs as they are now (the same state file as the agent's, another process)."""
        access = GpuAccess(self.nvml(faults))
        access.start()
        return access

    def geometries(self) -> dict[int, GpuGeometry]:
        """What the GPUs hold now, pending MIG modes included."""
        return self.access().geometries()


@dataclass
class SimNode(NodeFiles):
    """A Node (plain API object, or a kwok node with `fake=True`) and its simulated GPUs."""

    api: Any
    name: str
    workdir: Path
    gpus: int
    namespace: str = ""
    reconcilers: list[Reconciler] = field(default_factory=list)

    def modes(self) -> dict[int, tuple[bool, bool]]:
        access = self.access()
        return {i: access.mig_mode(i) for i in range(self.gpus)}

    def put(self, geometries: Mapping[int, GpuGeometry]) -> None:
        """Set the GPUs to `geometries` directly (test setup, no reconciler)."""
        access = self.access()
        for gpu_plan in plan_node(access.geometries(), geometries).changed:
            access.apply(gpu_plan)

    def uuid(self, index: int) -> str:
        access = self.access()
        return next(u for u, start in access.device_ids(index).items() if start is None)

    def mig_devices(self, index: int) -> dict[int, tuple[str, int, int]]:
        """GI start -> (MIG device UUID, GPU-instance id, compute-instance id) on GPU `index`."""
        access = self.access()
        nvml = access.nvml
        starts = access.device_ids(index)
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        out: dict[int, tuple[str, int, int]] = {}
        for k in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
            except nvml.NVMLError_NotFound:
                continue
            uid = str(nvml.nvmlDeviceGetUUID(mig))
            start = starts[uid]
            assert start is not None
            out[start] = (uid, nvml.nvmlDeviceGetGpuInstanceId(mig), nvml.nvmlDeviceGetComputeInstanceId(mig))
        return out

    # --- reconcilers ------------------------------------------------------------------------------
    def reconciler(
        self,
        *,
        api: Any = None,
        faults: str | None = None,
        reboot: Callable[[], None] | None = None,
        socket: Path | None = None,
        **settings: Any,
    ) -> Reconciler:
        """A new reconciler for this node: a restarted agent, with its own NVML (and `faults`)."""
        access = self.access(faults)
        options = {
            "podresources_socket": str(socket or self.workdir / "no-kubelet.sock"),
            "operand_timeout": 20.0,
            "eviction_timeout": 20.0,
            **settings,
        }
        if reboot is not None:
            options.setdefault("reboot_enabled", True)
        rec = Reconciler(
            api or self.api,
            access,
            ConfigSource(FileFeed(self.config_file), load_catalog()),
            Settings(node_name=self.name, **options),
            reboot=reboot,
        )
        self.reconcilers.append(rec)
        return rec

    # --- the Node ---------------------------------------------------------------------------------
    def read(self) -> Any:
        return self.core.read_node(self.name)

    def label(self, config: str | None) -> None:
        self.core.patch_node(self.name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: config}}})

    def labels(self) -> dict[str, str]:
        return dict(self.read().metadata.labels or {})

    def annotations(self) -> dict[str, str]:
        return dict(self.read().metadata.annotations or {})

    def state(self) -> tuple[str | None, str]:
        node = self.read()
        return (
            (node.metadata.labels or {}).get(keys.LABEL_MIG_STATE),
            (node.metadata.annotations or {}).get(keys.ANNOTATION_REASON, ""),
        )

    def held(self) -> bool:
        node = self.read()
        return (
            keys.ANNOTATION_HOLD in (node.metadata.annotations or {})
            or any(t.key == keys.TAINT_KEY for t in node.spec.taints or [])
            or bool(node.spec.unschedulable)
        )

    def unrecorded_hold(self) -> bool:
        """Tainted or cordoned by us with no hold record saying so (what must never happen)."""
        node = self.read()
        recorded = keys.ANNOTATION_HOLD in (node.metadata.annotations or {})
        tainted = any(t.key == keys.TAINT_KEY for t in node.spec.taints or [])
        return tainted and not recorded

    # --- workloads (kwok nodes) -------------------------------------------------------------------
    def run_pod(
        self, name: str, resources: Mapping[str, str], labels: Mapping[str, str] | None = None
    ) -> None:
        self.core.create_namespaced_pod(
            self.namespace,
            {
                "metadata": {"name": name, "labels": {"app": name, **(labels or {})}},
                "spec": {
                    "nodeName": self.name,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "main",
                            "image": "cuda",
                            "resources": {"limits": dict(resources), "requests": dict(resources)},
                        }
                    ],
                },
            },
        )

    def pods(self) -> set[str]:
        items = self.core.list_namespaced_pod(
            self.namespace, field_selector=f"spec.nodeName={self.name}"
        ).items
        return {p.metadata.name for p in items if p.metadata.deletion_timestamp is None}

    def wait_running(self, names: set[str]) -> None:
        def running() -> bool:
            items = self.core.list_namespaced_pod(self.namespace).items
            phase = {p.metadata.name: p.status.phase for p in items}
            return all(phase.get(n) == "Running" for n in names)

        wait_until(running, 60, what=f"pods {sorted(names)} running")


def make_node(
    api: Any,
    workdir: Path,
    *,
    gpus: int = 2,
    initial: str | None = "all-3g",
    operand: str | None = DP_VALUE,
    fake: bool = False,
    reset_requires_reboot: Sequence[int] = (),
    label: bool = True,
) -> SimNode:
    """A node whose simulated GPUs hold `initial` (a CONFIG name), labelled with it."""
    suffix = uuid.uuid4().hex[:6]
    workdir = workdir / f"node-{suffix}"
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(CONFIG)
    sim = SimulatedNvml([A100] * gpus, state_file=workdir / "gpus.json")
    node = SimNode(api, f"fail-{suffix}", workdir, gpus)
    if initial is not None:
        node.put(layouts(initial, gpus))
    for index in reset_requires_reboot:
        sim.simSetResetRequiresReboot(index, True)
    node_labels = {DP: operand} if operand else {}
    if initial is not None and label:
        node_labels[keys.LABEL_MIG_CONFIG] = initial
    create_gpu_node(api, node.name, A100, gpus, labels=node_labels, fake=fake)
    if fake:
        node.namespace = f"fail-{suffix}"
        ensure_namespace(api, node.namespace)
    return node
