"""Publishing which pods use which GPU and MIG device (`mig-guard.io/usage`), so that the webhook
and `kubectl mig plan` can name the pods a change would evict before it is made.

The usage changes whenever GPU pods come and go; each write of it costs a Node update to every
watcher of Nodes, so it is written at a bounded rate: at most one write per `interval` seconds for
pod churn (the first at once, the next when the interval has passed, carrying everything seen
meanwhile), only when it changed, never by itself while a change is in flight (it rides the
change's last write instead), and within `migcore.usage.MAX_USAGE_BYTES`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import grpc

from kube.errors import API_ERRORS
from migcore import keys
from migcore.usage import DevicePlace, NodeUsage, PodRef, UsageError
from reconciler.gpu_access import GpuError
from reconciler.node_state import NodeEdit, NodeState, now_rfc3339
from reconciler.workloads import requests_gpu

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 10.0


class Finder(Protocol):
    """`reconciler.workloads.WorkloadFinder`."""

    patterns: Sequence[str]

    def usage(self, places: Mapping[int, Mapping[str, DevicePlace]]) -> NodeUsage: ...


class UsagePublisher:
    """Keeps `mig-guard.io/usage` true, at most one write per `interval` for pod churn. Also the
    usage part of a Node write that carries reports (`patch` / `written`, as
    `reconciler.change.HardwareReport`)."""

    def __init__(
        self,
        node: NodeState,
        finder: Finder,
        places: Callable[[], Mapping[int, Mapping[str, DevicePlace]]],
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.finder = finder
        self.places = places
        self.interval = interval
        self.clock = clock
        self.published: NodeUsage | None = None  # what the node carries (read once at start)
        self._read_node = False
        self._pending: NodeUsage | None = None
        self.last_write = -math.inf
        self.writes = 0

    def look(self) -> NodeUsage:
        """The usage now (PodResources, the GPUs' device ids, the pods on the node)."""
        return self.finder.usage(self.places())

    def patch(self) -> dict[str, str | None]:
        """The annotation when the usage changed (else empty; also when it cannot be read now:
        a report is never worth failing a change's last write)."""
        self._pending = None
        try:
            usage = self.look()
        except (GpuError, grpc.RpcError, *API_ERRORS) as exc:
            log.warning("could not read which pods use the GPUs: %s", exc)
            return {}
        if not self._read_node:
            self._read_node = True
            self.published = _parse(self.node.annotations().get(keys.ANNOTATION_USAGE))
        try:
            bounded = usage.bounded()  # as the annotation says it: compared with what it says
        except UsageError as exc:
            log.warning("usage not published: %s", exc)
            return {}
        if bounded == self.published:
            return {}
        self._pending = bounded
        return {keys.ANNOTATION_USAGE: replace(bounded, since=now_rfc3339()).to_annotation()}

    def written(self) -> None:
        """The Node write that carried `patch()` succeeded."""
        if self._pending is not None:
            self.published = self._pending
            self._pending = None
            self.last_write = self.clock()
            self.writes += 1

    def publish(self) -> bool:
        """Write the usage when it changed (one Node write); True when written."""
        patch = self.patch()
        if not patch:
            return False
        self.node.apply(NodeEdit(annotations=patch))
        self.written()
        return True

    def next_write_at(self) -> float:
        """The earliest time (clock) the next write for pod churn may happen."""
        return max(self.clock(), self.last_write + self.interval)

    def concerns(self, pod: Any) -> bool:
        """A pod event that may change the usage: the pod asks for a GPU, or the usage names it."""
        if requests_gpu(pod, self.finder.patterns):
            return True
        published = self.published
        if published is None:
            return False
        ref = PodRef(pod.metadata.namespace, pod.metadata.name)
        return any(ref in use.pods for use in published.devices)


def _parse(text: str | None) -> NodeUsage | None:
    if not text:
        return None
    try:
        return NodeUsage.from_annotation(text)
    except UsageError:
        return None
