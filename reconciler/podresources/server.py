"""A PodResources v1 server that reports given pod -> device assignments on a unix socket.

Where there is no kubelet (kwok nodes in the tests and the demo) this stands in for the
kubelet's endpoint so the reconciler's real gRPC client has something real to talk to.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc

from reconciler.podresources import api_pb2, api_pb2_grpc

# (namespace, pod name) -> [(resource name, [device ids])]
Assignments = Mapping[tuple[str, str], Sequence[tuple[str, Sequence[str]]]]


class _Lister(api_pb2_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    def __init__(self, owner: PodResourcesServer) -> None:
        self.owner = owner

    def List(self, request: Any, context: Any) -> Any:
        return api_pb2.ListPodResourcesResponse(pod_resources=self.owner.pod_resources())


class PodResourcesServer:
    """Serve `assignments` (mutable through `set`) on `socket_path` until `stop`."""

    def __init__(self, socket_path: str, assignments: Assignments | None = None) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._assignments: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
        self.set(assignments or {})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Lister(self), self._server)
        self._server.add_insecure_port(f"unix://{socket_path}")

    def set(self, assignments: Assignments) -> None:
        with self._lock:
            self._assignments = {
                pod: [(res, list(ids)) for res, ids in devices] for pod, devices in assignments.items()
            }

    def pod_resources(self) -> list[Any]:
        with self._lock:
            items = list(self._assignments.items())
        return [
            api_pb2.PodResources(
                name=name,
                namespace=namespace,
                containers=[
                    api_pb2.ContainerResources(
                        name="main",
                        devices=[
                            api_pb2.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in devices
                        ],
                    )
                ],
            )
            for (namespace, name), devices in items
        ]

    def start(self) -> PodResourcesServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
