"""Which pods on this node use which GPU or MIG device.

The kubelet's PodResources API (v1 `List`, gRPC on a unix socket) says which device ids each
container got; `GpuAccess.device_places` maps every id form device plugins use (GPU and MIG UUIDs,
the older `MIG-GPU-<uuid>/<gi>/<ci>`, index ids) to a GPU index, GPU-instance and compute-instance
start, and a `::N` replica suffix (time-slicing, MPS) is dropped first. The answer is a
`migcore.usage.NodeUsage`: the change picks the pods it evicts from it, and the reconciler
publishes it for previews, which pick pods from it the same way. So only pods on instances that a
plan destroys need to move. A device counts as a GPU when its resource name is a GPU resource (the
defaults below, or the admin's patterns: the GPU Operator can rename shared GPUs to anything) or
when its id is a GPU or MIG id. Without the socket we cannot tell, and every pod on the node that
requests a GPU resource counts as affected (the conservative answer).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from kubernetes import client as k8s

from migcore.usage import SOURCE_POD_SPEC, SOURCE_PODRESOURCES, DevicePlace, NodeUsage, PodRef
from reconciler.podresources import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# What the NVIDIA device plugin advertises: whole GPUs, GPUs shared by time-slicing or MPS with
# `renameByDefault`, and MIG devices (`nvidia.com/mig-1g.5gb`, `...-1g.5gb.shared`).
DEFAULT_GPU_RESOURCES: tuple[str, ...] = ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*")
TERMINAL_PHASES = ("Succeeded", "Failed")
_UUID_PREFIXES = ("GPU-", "MIG-")


__all__ = ["PodRef", "WorkloadFinder"]


@dataclass(frozen=True)
class PodDevices:
    """GPU resource name -> device ids, for one pod (all containers)."""

    pod: PodRef
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict)


def is_gpu_resource(name: str, patterns: Sequence[str] = DEFAULT_GPU_RESOURCES) -> bool:
    """True when `name` matches one of `patterns` (shell-style, e.g. `nvidia.com/mig-*`)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def device_key(device_id: str) -> str:
    """The device behind a PodResources id: `GPU-<uuid>::3` (replica 3 of a shared GPU) -> `GPU-<uuid>`."""
    return device_id.split("::", 1)[0]


def is_gpu_device_id(device_id: str) -> bool:
    """A GPU or MIG UUID (any of its forms), whatever resource name carries it."""
    return device_key(device_id).startswith(_UUID_PREFIXES)


def list_pod_devices(
    socket_path: str, timeout: float = 10.0, patterns: Sequence[str] = DEFAULT_GPU_RESOURCES
) -> list[PodDevices]:
    """Call PodResources v1 `List` on the kubelet socket; keep only GPU devices: those of a GPU
    resource name, and those with a GPU or MIG UUID under any name (an index id like "0" only
    counts under a GPU resource name: other device plugins use such ids too)."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        response = stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout)
    out: list[PodDevices] = []
    for pod in response.pod_resources:
        devices: dict[str, list[str]] = {}
        for container in pod.containers:
            for dev in container.devices:
                named = is_gpu_resource(dev.resource_name, patterns)
                ids = [i for i in dev.device_ids if named or is_gpu_device_id(i)]
                if ids:
                    devices.setdefault(dev.resource_name, []).extend(ids)
        if devices:
            out.append(PodDevices(PodRef(pod.namespace, pod.name), {k: tuple(v) for k, v in devices.items()}))
    return out


def requests_gpu(pod: Any, patterns: Sequence[str] = DEFAULT_GPU_RESOURCES) -> bool:
    """True when any container (or init container) requests or limits a GPU/MIG resource."""
    spec = pod.spec
    for container in [*(spec.containers or []), *(spec.init_containers or [])]:
        resources = container.resources
        if resources is None:
            continue
        for amounts in (resources.requests or {}, resources.limits or {}):
            if any(is_gpu_resource(name, patterns) for name in amounts):
                return True
    return False


@dataclass
class WorkloadFinder:
    """Finds the pods on this node and where on the GPUs they run."""

    api: Any
    node_name: str
    socket_path: str = DEFAULT_SOCKET
    timeout: float = 10.0
    patterns: Sequence[str] = DEFAULT_GPU_RESOURCES
    _said_no_socket: bool = field(default=False, init=False, repr=False)

    def _live_pods(self) -> dict[PodRef, Any]:
        core: Any = k8s.CoreV1Api(self.api)
        pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node_name}").items
        return {
            PodRef(p.metadata.namespace, p.metadata.name): p
            for p in pods
            if (p.status is None or p.status.phase not in TERMINAL_PHASES)
        }

    def usage(self, places: Mapping[int, Mapping[str, DevicePlace]]) -> NodeUsage:
        """Which pods use which device of the GPUs in `places` (per GPU index, every id of its
        devices -> where it lives; `GpuAccess.device_places`).

        A GPU device whose id matches none of them counts on every GPU: better to move a pod than
        to pull a GPU from under it. Without the PodResources socket every pod that requests a GPU
        resource counts on every GPU.
        """
        live = self._live_pods()
        if not os.path.exists(self.socket_path):
            if not self._said_no_socket:
                log.info("no PodResources socket at %s: every GPU pod on the node counts", self.socket_path)
                self._said_no_socket = True
            users = {ref: [None] for ref, pod in live.items() if requests_gpu(pod, self.patterns)}
            return NodeUsage.build(places, users, SOURCE_POD_SPEC)
        where_is = {device: place for ids in places.values() for device, place in ids.items()}
        out: dict[PodRef, list[DevicePlace | None]] = {}
        for entry in list_pod_devices(self.socket_path, self.timeout, self.patterns):
            if entry.pod not in live:
                continue  # already gone, or not bound here any more
            out[entry.pod] = [
                where_is.get(device_key(device)) for assigned in entry.devices.values() for device in assigned
            ]
        return NodeUsage.build(places, out, SOURCE_PODRESOURCES)
