"""A small kubelet device plugin (API v1beta1) for tests on a real node.

:class:`DevicePlugins` advertises extended resources (e.g. ``nvidia.com/mig-1g.5gb``) with the
device ids it is given, one plugin server per resource as the API requires: each serves
``DevicePlugin`` on its own unix socket in the kubelet's device plugin directory and registers
there with the kubelet's ``Registration`` service. The kubelet then counts the devices as node
capacity, hands them to pods that request the resource (calling ``Allocate``) and reports the
assignment through its PodResources API, which is what a MIG-aware agent reads.

``set({resource: [device ids]})`` changes what is advertised at any time (``ListAndWatch``
streams the new list), the way NVIDIA's device plugin re-reads the MIG devices after a change.
``Allocate`` answers with ``NVIDIA_VISIBLE_DEVICES=<ids>``, as NVIDIA's plugin does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from devcluster.deviceplugin import api_pb2, api_pb2_grpc

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"


class _Servicer(api_pb2_grpc.DevicePluginServicer):  # type: ignore[misc]
    def __init__(self, plugin: _Plugin) -> None:
        self.plugin = plugin

    def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:
        return api_pb2.DevicePluginOptions()

    def ListAndWatch(self, request: Any, context: Any) -> Iterator[Any]:
        version = -1
        while context.is_active() and not self.plugin.stopped.is_set():
            with self.plugin.changed:
                if version == self.plugin.version:
                    self.plugin.changed.wait(timeout=1.0)
                    continue
                version = self.plugin.version
                ids = list(self.plugin.ids)
            yield api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=i, health=HEALTHY) for i in ids])

    def GetPreferredAllocation(self, request: Any, context: Any) -> Any:
        return api_pb2.PreferredAllocationResponse()

    def Allocate(self, request: Any, context: Any) -> Any:
        responses = []
        for req in request.container_requests:
            ids = list(req.devices_ids)
            self.plugin.allocations.append(ids)
            responses.append(
                api_pb2.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids)})
            )
        return api_pb2.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request: Any, context: Any) -> Any:
        return api_pb2.PreStartContainerResponse()


class _Plugin:
    """One resource: its gRPC server, socket and current device ids."""

    def __init__(self, directory: Path, resource: str, ids: Sequence[str]) -> None:
        self.resource = resource
        self.socket = directory / f"mig-guard-test-{resource.replace('/', '_')}.sock"
        self.ids = list(ids)
        self.version = 0
        self.changed = threading.Condition()
        self.stopped = threading.Event()
        self.allocations: list[list[str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_DevicePluginServicer_to_server(_Servicer(self), self.server)

    def start(self, kubelet_socket: Path, timeout: float = 10.0) -> None:
        self.socket.unlink(missing_ok=True)
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()
        request = api_pb2.RegisterRequest(
            version=API_VERSION,
            endpoint=self.socket.name,
            resource_name=self.resource,
            options=api_pb2.DevicePluginOptions(),
        )
        with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
            api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=timeout)

    def set(self, ids: Sequence[str]) -> None:
        with self.changed:
            if list(ids) != self.ids:
                self.ids = list(ids)
                self.version += 1
                self.changed.notify_all()

    def stop(self) -> None:
        self.stopped.set()
        with self.changed:
            self.changed.notify_all()
        self.server.stop(grace=None)
        with contextlib.suppress(OSError):
            self.socket.unlink()


class DevicePlugins:
    """The advertised resources of one node; ``directory``: the kubelet's device plugin directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._plugins: dict[str, _Plugin] = {}
        self._lock = threading.Lock()

    @property
    def kubelet_socket(self) -> Path:
        return self.directory / KUBELET_SOCKET

    def set(self, resources: Mapping[str, Sequence[str]]) -> None:
        """Advertise exactly these resources and ids (a resource left out is advertised empty)."""
        with self._lock:
            for resource, ids in resources.items():
                plugin = self._plugins.get(resource)
                if plugin is None:
                    plugin = _Plugin(self.directory, resource, ids)
                    plugin.start(self.kubelet_socket)
                    self._plugins[resource] = plugin
                else:
                    plugin.set(ids)
            for resource, plugin in self._plugins.items():
                if resource not in resources:
                    plugin.set([])

    def allocations(self, resource: str) -> list[list[str]]:
        """The device ids of every Allocate call for ``resource`` so far."""
        plugin = self._plugins.get(resource)
        return list(plugin.allocations) if plugin else []

    def stop(self) -> None:
        with self._lock:
            for plugin in self._plugins.values():
                plugin.stop()
            self._plugins.clear()

    def __enter__(self) -> DevicePlugins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_capacity(
    core: Any, node: str, expected: Mapping[str, int], timeout: float = 60.0
) -> dict[str, str]:
    """Wait until the Node's allocatable shows ``expected`` counts; returns its allocatable."""
    deadline = time.monotonic() + timeout
    allocatable: dict[str, str] = {}
    while time.monotonic() < deadline:
        allocatable = core.read_node(node).status.allocatable or {}
        if all(str(allocatable.get(k, "0")) == str(v) for k, v in expected.items()):
            return allocatable
        time.sleep(0.25)
    raise TimeoutError(
        f"node {node} allocatable {allocatable} did not reach {dict(expected)} in {timeout:.0f}s"
    )
