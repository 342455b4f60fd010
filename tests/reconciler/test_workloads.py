"""Mapping pods to GPUs: the real gRPC PodResources client against a PodResources server on a unix
socket (there is no kubelet here: the nodes are plain API objects), pods on the real API server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from migcore.usage import DevicePlace
from reconciler.podresources.server import PodResourcesServer
from reconciler.workloads import DEFAULT_GPU_RESOURCES, PodRef, WorkloadFinder, list_pod_devices

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-11111111-1111-1111-1111-111111111111"
MIG_1_AT_0 = "MIG-aaaaaaaa-0000-0000-0000-000000000001"
MIG_1_AT_4 = "MIG-aaaaaaaa-0000-0000-0000-000000000002"
MIG_AT_0 = DevicePlace(1, 0, 0, "1g.5gb")
MIG_AT_4 = DevicePlace(1, 4, 0, "1g.5gb")
DEVICE_IDS = {
    0: {GPU0: DevicePlace(0)},
    1: {GPU1: DevicePlace(1), MIG_1_AT_0: MIG_AT_0, MIG_1_AT_4: MIG_AT_4},
}


def _pod(core: Any, namespace: str, name: str, node: str, resources: dict[str, str] | None) -> None:
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    if resources:
        container["resources"] = {"limits": resources, "requests": resources}
    core.create_namespaced_pod(
        namespace, {"metadata": {"name": name}, "spec": {"nodeName": node, "containers": [container]}}
    )


def _setup(k8s_api: Any) -> tuple[str, str]:
    node = f"wl-{uuid.uuid4().hex[:6]}"
    namespace = f"wl-{uuid.uuid4().hex[:6]}"
    create_gpu_node(k8s_api, node, fake=False, extended_resources={"nvidia.com/mig-1g.5gb": "7"})
    ensure_namespace(k8s_api, namespace)
    core = k8s.CoreV1Api(k8s_api)
    _pod(core, namespace, "whole", node, {"nvidia.com/gpu": "1"})
    _pod(core, namespace, "mig-a", node, {"nvidia.com/mig-1g.5gb": "1"})
    _pod(core, namespace, "mig-b", node, {"nvidia.com/mig-1g.5gb": "1"})
    _pod(core, namespace, "cpu-only", node, None)
    return node, namespace


def test_podresources_maps_device_ids_to_gpu_instances(k8s_api: Any, tmp_path: Path) -> None:
    node, ns = _setup(k8s_api)
    socket = str(tmp_path / "kubelet.sock")
    server = PodResourcesServer(
        socket,
        {
            (ns, "whole"): [("nvidia.com/gpu", [GPU0])],
            (ns, "mig-a"): [("nvidia.com/mig-1g.5gb", [MIG_1_AT_0])],
            (ns, "mig-b"): [("nvidia.com/mig-1g.5gb", [MIG_1_AT_4]), ("example.com/nic", ["eth1"])],
            (ns, "gone-already"): [("nvidia.com/gpu", [GPU1])],
        },
    ).start()
    try:
        listed = {p.pod.name: p.devices for p in list_pod_devices(socket)}
        assert listed["mig-b"] == {"nvidia.com/mig-1g.5gb": (MIG_1_AT_4,)}  # non-GPU resources dropped
        usage = WorkloadFinder(k8s_api, node, socket).usage(DEVICE_IDS)
    finally:
        server.stop()
    assert usage.source == "podresources"
    assert usage.gpus == (0, 1)
    assert {str(u.pods[0]): u.place for u in usage.devices} == {
        f"{ns}/whole": DevicePlace(0),
        f"{ns}/mig-a": MIG_AT_0,
        f"{ns}/mig-b": MIG_AT_4,
    }
    assert usage.placements() == {
        PodRef(ns, "whole"): [(0, None)],
        PodRef(ns, "mig-a"): [(1, 0)],
        PodRef(ns, "mig-b"): [(1, 4)],
    }  # the pod the API server does not know is ignored


def test_unknown_device_id_counts_on_every_gpu(k8s_api: Any, tmp_path: Path) -> None:
    node, ns = _setup(k8s_api)
    socket = str(tmp_path / "kubelet.sock")
    server = PodResourcesServer(socket, {(ns, "mig-a"): [("nvidia.com/mig-1g.5gb", ["MIG-unknown"])]}).start()
    try:
        usage = WorkloadFinder(k8s_api, node, socket).usage(DEVICE_IDS)
    finally:
        server.stop()
    assert usage.placements() == {PodRef(ns, "mig-a"): [(0, None), (1, None)]}


def test_without_the_socket_every_gpu_pod_on_the_node_counts(k8s_api: Any, tmp_path: Path) -> None:
    node, ns = _setup(k8s_api)
    usage = WorkloadFinder(k8s_api, node, str(tmp_path / "missing.sock")).usage(DEVICE_IDS)
    placements = usage.placements()
    assert usage.source == "pod-spec"
    assert sorted(placements) == [PodRef(ns, "mig-a"), PodRef(ns, "mig-b"), PodRef(ns, "whole")]
    assert all(spots == [(0, None), (1, None)] for spots in placements.values())


def test_shared_renamed_and_older_device_ids_are_placed(k8s_api: Any, tmp_path: Path) -> None:
    node, ns = _setup(k8s_api)
    socket = str(tmp_path / "kubelet.sock")
    # What GpuAccess.device_places gives: every id form of each device (UUID, MIG-GPU-<uuid>/GI/CI, index).
    ids = {
        0: {GPU0: DevicePlace(0), "0": DevicePlace(0)},
        1: {
            GPU1: DevicePlace(1),
            "1": DevicePlace(1),
            MIG_1_AT_4: MIG_AT_4,
            f"MIG-{GPU1}/2/0": MIG_AT_4,
            "1:1": MIG_AT_4,
        },
    }
    server = PodResourcesServer(
        socket,
        {
            (ns, "whole"): [("nvidia.com/gpu.shared", [f"{GPU0}::2"])],  # time-slicing, renamed
            (ns, "mig-a"): [("nvidia.com/mig-1g.5gb", [f"MIG-{GPU1}/2/0"])],  # drivers before R470
            # deviceIDStrategy=index with MPS replicas; "0" of another plugin is no GPU.
            (ns, "mig-b"): [("nvidia.com/mig-1g.5gb.shared", ["1:1::0"]), ("example.com/nic", ["0"])],
            (ns, "cpu-only"): [("acme.io/renamed-gpu", [f"{MIG_1_AT_4}::1"])],  # any name, a GPU id
        },
    ).start()
    try:
        usage = WorkloadFinder(k8s_api, node, socket).usage(ids)
    finally:
        server.stop()
    assert usage.placements() == {
        PodRef(ns, "whole"): [(0, None)],
        PodRef(ns, "mig-a"): [(1, 4)],
        PodRef(ns, "mig-b"): [(1, 4)],
        PodRef(ns, "cpu-only"): [(1, 4)],
    }


def test_without_the_socket_shared_and_configured_resource_names_count(k8s_api: Any, tmp_path: Path) -> None:
    node, ns = _setup(k8s_api)
    core = k8s.CoreV1Api(k8s_api)
    _pod(core, ns, "shared", node, {"nvidia.com/gpu.shared": "1"})
    _pod(core, ns, "renamed", node, {"example.com/timesliced-a100": "1"})
    finder = WorkloadFinder(
        k8s_api,
        node,
        str(tmp_path / "missing.sock"),
        patterns=(*DEFAULT_GPU_RESOURCES, "example.com/timesliced-*"),
    )
    placements = finder.usage(DEVICE_IDS).placements()
    assert PodRef(ns, "shared") in placements and PodRef(ns, "renamed") in placements
    assert PodRef(ns, "cpu-only") not in placements
    default = WorkloadFinder(k8s_api, node, str(tmp_path / "missing.sock")).usage(DEVICE_IDS).placements()
    assert PodRef(ns, "shared") in default and PodRef(ns, "renamed") not in default
