"""The usage publisher's rules, without an API server: written only when what it says changes, at
most once per interval for pod churn, never failing the write it rides on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc

from migcore import keys
from migcore.usage import DevicePlace, NodeUsage, PodRef
from reconciler.node_state import NodeEdit
from reconciler.pod_usage import UsagePublisher
from reconciler.workloads import DEFAULT_GPU_RESOURCES

MIG = DevicePlace(0, 0, 0, "3g.20gb")


@dataclass
class Node:
    notes: dict[str, str] = field(default_factory=dict)
    writes: int = 0

    def annotations(self) -> dict[str, str]:
        return dict(self.notes)

    def apply(self, edit: NodeEdit) -> NodeEdit:
        self.writes += 1
        self.notes.update({k: v for k, v in edit.annotations.items() if v is not None})
        return edit


@dataclass
class Finder:
    pods: dict[PodRef, list[DevicePlace | None]] = field(default_factory=dict)
    failure: Exception | None = None
    patterns: tuple[str, ...] = DEFAULT_GPU_RESOURCES

    def usage(self, places: Mapping[int, Mapping[str, DevicePlace]]) -> NodeUsage:
        if self.failure is not None:
            raise self.failure
        return NodeUsage.build([0, 1], self.pods, "podresources")


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def publisher(node: Node, finder: Finder, clock: Clock) -> UsagePublisher:
    return UsagePublisher(node, finder, lambda: {}, interval=10.0, clock=clock)  # type: ignore[arg-type]


def test_written_only_when_it_changes_and_the_next_write_waits_an_interval() -> None:
    node, finder, clock = Node(), Finder(), Clock()
    usage = publisher(node, finder, clock)
    assert usage.next_write_at() == 100.0  # nothing written yet: at once
    assert usage.publish() and node.writes == 1
    assert not usage.publish() and node.writes == 1  # the same pods: nothing to write
    finder.pods = {PodRef("ml", "a"): [MIG]}
    clock.now = 103.0
    assert usage.next_write_at() == 110.0  # pod churn waits for the interval
    clock.now = 110.0
    assert usage.publish() and node.writes == 2
    raw = json.loads(node.notes[keys.ANNOTATION_USAGE])
    assert raw["devices"] == [{"gpu": 0, "gi": 0, "ci": 0, "profile": "3g.20gb", "pods": ["ml/a"]}]
    assert raw["since"]


def test_a_new_agent_compares_with_what_the_node_says() -> None:
    finder, clock = Finder({PodRef("ml", "a"): [MIG]}), Clock()
    node = Node({keys.ANNOTATION_USAGE: NodeUsage.build([0, 1], finder.pods, "podresources").to_annotation()})
    assert not publisher(node, finder, clock).publish()
    assert node.writes == 0


def test_a_report_that_cannot_be_read_now_is_left_out_of_the_write() -> None:
    node, clock = Node(), Clock()
    usage = publisher(node, Finder(failure=grpc.RpcError("kubelet away")), clock)
    assert usage.patch() == {}
    usage.written()  # the write it rode on succeeded: nothing was published
    assert usage.published is None and usage.next_write_at() == 100.0


def test_pod_events_that_concern_the_report() -> None:
    node, finder, clock = Node(), Finder({PodRef("ml", "a"): [MIG]}), Clock()
    usage = publisher(node, finder, clock)
    usage.publish()

    def pod(name: str, resources: dict[str, str] | None = None) -> Any:
        container = SimpleNamespace(resources=SimpleNamespace(requests=resources, limits=None))
        return SimpleNamespace(
            metadata=SimpleNamespace(namespace="ml", name=name),
            spec=SimpleNamespace(containers=[container], init_containers=None),
        )

    assert usage.concerns(pod("new", {"nvidia.com/mig-1g.5gb": "1"}))  # asks for a GPU
    assert usage.concerns(pod("a"))  # named in the report (e.g. deleted)
    assert not usage.concerns(pod("web", {"cpu": "1"}))
