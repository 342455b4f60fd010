"""End to end: the real `mig-guard reconcile` (a subprocess per kwok node, simulated GPUs, the
PodResources API served on a unix socket) publishes which pods use which MIG device, refreshes it
as pods come and go at a bounded rate, and a change then evicts exactly the pods a preview computed
from that published usage names."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch

from devcluster.processes import wait_until
from migcore import keys
from migcore.catalog import load_catalog
from migcore.config import parse_config
from migcore.hardware import NodeGpus
from migcore.impact import preview
from migcore.usage import NodeUsage, PodRef

GpuNodeFactory = Callable[..., Any]


def usage_of(node: Any) -> NodeUsage | None:
    text = (node.read().metadata.annotations or {}).get(keys.ANNOTATION_USAGE)
    return NodeUsage.from_annotation(text) if text else None


def where(usage: NodeUsage | None) -> dict[str, list[tuple[int | None, int | None, str | None]]]:
    """pod -> [(GPU, GI start, profile)] as the usage report says."""
    out: dict[str, list[tuple[int | None, int | None, str | None]]] = {}
    for use in usage.devices if usage else ():
        for pod in use.pods:
            place = use.place
            spot = (None, None, None) if place is None else (place.gpu, place.gi, place.profile)
            out.setdefault(pod.name, []).append(spot)
    return out


def record_usage_writes(node: Any, stop: threading.Event, seen: list[str]) -> None:
    """Every distinct value the usage annotation takes (one per write of it)."""
    w = watch.Watch()
    for event in w.stream(
        k8s.CoreV1Api(node.api).list_node, field_selector=f"metadata.name={node.name}", timeout_seconds=120
    ):
        value = (event["object"].metadata.annotations or {}).get(keys.ANNOTATION_USAGE)
        if value and (not seen or seen[-1] != value):
            seen.append(value)
        if stop.is_set():
            w.stop()


def test_usage_is_published_refreshed_and_names_the_pods_a_change_evicts(
    gpu_node: GpuNodeFactory, reconciler_kubeconfig: Path
) -> None:
    node = gpu_node(gpus=2, initial="all-3g")
    node.start_agent("--usage-interval", "1", kubeconfig=reconciler_kubeconfig)
    node.wait_outcome("success", "all-3g applied")
    wait_until(lambda: usage_of(node) is not None, 60, what="the usage report")
    empty = usage_of(node)
    assert empty is not None and empty.devices == () and empty.gpus == (0, 1)
    assert empty.source == "podresources"

    seen: list[str] = []
    stop = threading.Event()
    recorder = threading.Thread(target=record_usage_writes, args=(node, stop, seen), daemon=True)
    recorder.start()
    # The kubelet hands out devices when it admits a pod: PodResources says so from then on.
    spots = {"stays": (0, 0), "moves-a": (1, 0), "moves-b": (1, 4)}
    node.assign(spots)
    started = time.monotonic()
    for name in spots:
        node.run_pod(name)
    node.wait_running(set(spots))

    def published() -> bool:
        return where(usage_of(node)) == {
            "stays": [(0, 0, "3g.20gb")],
            "moves-a": [(1, 0, "3g.20gb")],
            "moves-b": [(1, 4, "3g.20gb")],
        }

    wait_until(published, 60, what="the usage report naming the three pods")
    # A pod that goes is gone from the report too.
    node.run_pod("brief")
    node.assign({**spots, "brief": (0, 4)})
    wait_until(lambda: "brief" in where(usage_of(node)), 60, what="the brief pod in the report")
    node.assign(spots)
    node.core.delete_namespaced_pod("brief", node.namespace, grace_period_seconds=0)
    wait_until(published, 60, what="the brief pod gone from the report")
    elapsed = time.monotonic() - started
    stop.set()
    node.core.patch_node(node.name, {"metadata": {"labels": {"probe": "1"}}})  # ends the watch
    recorder.join(30)
    # Bounded: at most one write per interval (1 s here), however many pod events came (the first
    # value seen is the one the node had before).
    writes = len(seen) - 1
    print(f"\nusage writes: {writes} in {elapsed:.1f}s for 4 pods (5 pod changes, ~15 pod events)")
    assert 1 <= writes <= elapsed / 1.0 + 1

    # The preview, from what the node publishes, through the reconciler's own planner...
    annotations = node.read().metadata.annotations
    catalog = load_catalog()
    impact = preview(
        parse_config(node.config_file.read_text(), catalog),
        "gpu1-7g",
        NodeGpus.from_annotation(annotations[keys.ANNOTATION_GPUS]),
        NodeUsage.from_annotation(annotations[keys.ANNOTATION_USAGE]),
        catalog,
    )
    assert [str(p) for p in impact.evicts] == [f"{node.namespace}/moves-a", f"{node.namespace}/moves-b"]
    assert impact.lines(node.name)[1] == (
        f"GPU 1: 3g.20gb x2 -> 7g.40gb, evicts {node.namespace}/moves-a, {node.namespace}/moves-b"
    )
    # ...and what the change then does.
    node.label("gpu1-7g")
    node.wait_outcome("success", "gpu1-7g applied")
    evicted = {PodRef(node.namespace, n) for n in spots} - {PodRef(node.namespace, n) for n in node.pods()}
    assert sorted(evicted) == list(impact.evicts)
    # The change's last write carried the usage as it is now.
    wait_until(lambda: where(usage_of(node)) == {"stays": [(0, 0, "3g.20gb")]}, 30, what="usage after")
    last = json.loads(node.read().metadata.annotations[keys.ANNOTATION_USAGE])
    assert last["since"]
