"""End to end: the rollout budget with real `mig-guard reconcile` processes (one per kwok node,
simulated GPUs, a least-privilege ServiceAccount: the reconciler's rules plus the rollout's Role in
its namespace) against the real API server.

- a push to a whole pool never holds more nodes than the budget: every update of every node is
  watched (not sampled), and so is every rollout Lease;
- a holder killed with SIGKILL frees its slot when its Lease expires, and the rollout goes on;
- failed changes stop the pool until `mig-guard rollout resume`; the pause switch stops every start.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch
from node_harness import A100

from devcluster.helpers import ensure_namespace, service_account_client
from devcluster.kubeconfig import kubeconfig_dict, write_kubeconfig
from devcluster.processes import wait_until
from migcore import keys
from reconciler.rbac import ROLLOUT_RULES, RULES

GpuNode = Any  # tests/reconciler/conftest.py's GpuNode (a conftest is not imported by name)
GpuNodeFactory = Callable[..., GpuNode]
SLOW = "nvmlDeviceCreateGpuInstanceWithPlacement=0.3"  # a change takes a few seconds: they overlap


@dataclass
class Watched:
    """Every update of the test's nodes and rollout Leases, in the API server's order."""

    nodes: set[str]
    held: dict[str, bool] = field(default_factory=dict)
    most_held: int = 0
    slots: set[str] = field(default_factory=set)
    most_slots: int = 0
    reasons: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # (state, reason) per node
    conditions: dict[str, set[str]] = field(default_factory=dict)

    def node(self, obj: Any) -> None:
        name = obj.metadata.name
        if name not in self.nodes:
            return
        self.held[name] = keys.ANNOTATION_HOLD in (obj.metadata.annotations or {}) or any(
            t.key == keys.TAINT_KEY for t in obj.spec.taints or []
        )
        self.most_held = max(self.most_held, sum(self.held.values()))
        seen = (
            (obj.metadata.labels or {}).get(keys.LABEL_MIG_STATE, ""),
            (obj.metadata.annotations or {}).get(keys.ANNOTATION_REASON, ""),
        )
        history = self.reasons.setdefault(name, [])
        if not history or history[-1] != seen:
            history.append(seen)
        for condition in (obj.status.conditions if obj.status else None) or []:
            if condition.type == keys.CONDITION_READY:
                self.conditions.setdefault(name, set()).add(condition.reason)

    def lease(self, kind: str, obj: Any) -> None:
        if (obj.metadata.labels or {}).get(keys.LABEL_ROLLOUT) != keys.ROLLOUT_SLOT:
            return
        if kind == "DELETED":
            self.slots.discard(obj.metadata.name)
        else:
            self.slots.add(obj.metadata.name)
        self.most_slots = max(self.most_slots, len(self.slots))

    def said(self, name: str, text: str) -> bool:
        return any(text in reason for _, reason in self.reasons.get(name, []))


@contextlib.contextmanager
def watching(api: Any, namespace: str, nodes: list[GpuNode]) -> Iterator[Watched]:
    """Watch from the current resourceVersion of each list, so no update is missed."""
    seen = Watched({n.name for n in nodes})
    core: Any = k8s.CoreV1Api(api)
    coordination: Any = k8s.CoordinationV1Api(api)
    stop = threading.Event()
    listed = core.list_node()
    for item in listed.items:
        seen.node(item)
    leases = coordination.list_namespaced_lease(namespace)
    for item in leases.items:
        seen.lease("ADDED", item)

    def follow(call: Callable[..., Any], version: str, on: Callable[[str, Any], None], *args: Any) -> None:
        w = watch.Watch()
        with contextlib.suppress(Exception):  # the stream breaks when the plane stops at the end
            for event in w.stream(call, *args, resource_version=version, timeout_seconds=600):
                if stop.is_set():
                    w.stop()
                    return
                on(event["type"], event["object"])

    threads = [
        threading.Thread(
            target=follow,
            args=(core.list_node, listed.metadata.resource_version, lambda _k, o: seen.node(o)),
            daemon=True,
        ),
        threading.Thread(
            target=follow,
            args=(
                coordination.list_namespaced_lease,
                leases.metadata.resource_version,
                seen.lease,
                namespace,
            ),
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        stop.set()


@pytest.fixture
def rollout_kubeconfig(workload_plane: Any, tmp_path: Path) -> tuple[str, Path]:
    """(rollout namespace, kubeconfig of a ServiceAccount with exactly the reconciler's rules and
    the rollout's Role in that namespace)."""
    namespace = f"mg-{uuid.uuid4().hex[:6]}"
    ensure_namespace(workload_plane.api, namespace)
    service_account_client(workload_plane.api, namespace, "reconciler", RULES, cluster_wide=True)
    client = service_account_client(workload_plane.api, namespace, "reconciler", ROLLOUT_RULES)
    cfg = client.configuration
    ca = Path(cfg.ssl_ca_cert).read_bytes()
    path = write_kubeconfig(
        tmp_path / "rollout.kubeconfig",
        kubeconfig_dict(cfg.host, ca, user="reconciler", token=cfg.api_key["authorization"]),
    )
    return namespace, path


def start(
    node: GpuNode, namespace: str, kubeconfig: Path, budget: str, *extra: str, latency: str = SLOW, **kw: Any
) -> subprocess.Popen[bytes]:
    return node.start_agent(
        "--rollout-budget",
        budget,
        "--rollout-namespace",
        namespace,
        *extra,
        latency=latency,
        kubeconfig=kubeconfig,
        **kw,
    )


def push(nodes: list[GpuNode], config: str) -> None:
    """Relabel every node at once, as a GitOps tool applying one commit does."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: n.label(config), nodes))


def rollout_cli(kubeconfig: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mig_guard.cli", "rollout", *args, "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def waiting_condition(node: GpuNode, reason: str) -> None:
    """The MIGConfigReady condition says why the node waits (written right after the state)."""

    def says() -> bool:
        conditions = node.read().status.conditions or []
        return any(c.type == keys.CONDITION_READY and c.reason == reason for c in conditions)

    wait_until(says, 30, what=f"condition {reason}")


def test_a_push_to_a_pool_never_holds_more_nodes_than_the_budget(
    workload_plane: Any, gpu_node: GpuNodeFactory, rollout_kubeconfig: tuple[str, Path]
) -> None:
    namespace, kubeconfig = rollout_kubeconfig
    nodes = [gpu_node(gpus=2, initial="all-3g", operand=None) for _ in range(5)]
    for node in nodes:
        start(node, namespace, kubeconfig, "2")
    for node in nodes:
        node.wait_outcome("success", "all-3g")
    with watching(workload_plane.api, namespace, nodes) as seen:
        push(nodes, "all-1g")
        for node in nodes:
            node.wait_outcome("success", "all-1g applied", timeout=180)
    assert all(node.counts() == {0: {"1g.5gb": 7}, 1: {"1g.5gb": 7}} for node in nodes)
    assert seen.most_slots <= 2, seen.most_slots
    assert seen.most_held <= 2, seen.most_held
    assert seen.most_held == 2  # the budget is used, not only respected
    waited = [
        n.name
        for n in nodes
        if seen.said(n.name, f"waiting for a rollout slot (pool {A100}: 2 of 2 in use: ")
    ]
    assert len(waited) >= 3, seen.reasons  # the last three at least waited, and said so
    assert all("WaitingForRolloutSlot" in seen.conditions[name] for name in waited)
    assert all(not node.held() for node in nodes)
    assert k8s.CoordinationV1Api(workload_plane.api).list_namespaced_lease(namespace).items == []


def test_a_killed_holder_frees_its_slot_when_its_lease_expires_and_the_rollout_goes_on(
    workload_plane: Any, gpu_node: GpuNodeFactory, rollout_kubeconfig: tuple[str, Path]
) -> None:
    namespace, kubeconfig = rollout_kubeconfig
    first, second = (gpu_node(gpus=2, initial="all-3g", operand=None) for _ in range(2))
    lease = ("--rollout-lease-seconds", "3")
    # The first applies slowly, so that it is killed holding its slot and its node.
    victim = start(
        first, namespace, kubeconfig, "1", *lease, latency="nvmlDeviceCreateGpuInstanceWithPlacement=2"
    )
    start(second, namespace, kubeconfig, "1", *lease)
    first.wait_outcome("success", "all-3g")
    second.wait_outcome("success", "all-3g")
    first.label("all-1g")
    wait_until(lambda: first.progress_phase()[0] == "applying", 60, what="first applying")
    since = second.label("all-1g")
    second.wait_outcome(
        "pending", f"waiting for a rollout slot (pool {A100}: 1 of 1 in use: {first.name})", since=since
    )
    first.kill_agent(victim)  # SIGKILL: nothing frees or renews its slot
    second.wait_outcome("success", "all-1g applied", timeout=120)
    assert first.held()  # its change is still in flight (its GPUs may be half-way)
    # Restarted, the first resumes: it waits for a slot, takes it and finishes.
    start(first, namespace, kubeconfig, "1", *lease)
    first.wait_outcome("success", "all-1g applied", timeout=120)
    assert not first.held() and first.counts() == {0: {"1g.5gb": 7}, 1: {"1g.5gb": 7}}


def test_failed_changes_stop_the_pool_until_a_human_resumes_it(
    workload_plane: Any, gpu_node: GpuNodeFactory, rollout_kubeconfig: tuple[str, Path]
) -> None:
    namespace, kubeconfig = rollout_kubeconfig
    broken, healthy = (gpu_node(gpus=2, initial="all-3g", operand=None) for _ in range(2))
    limit = ("--rollout-failure-limit", "1")
    start(
        broken,
        namespace,
        kubeconfig,
        "1",
        *limit,
        faults="nvmlDeviceCreateGpuInstanceWithPlacement@1=Unknown",
    )
    start(healthy, namespace, kubeconfig, "1", *limit)
    for node in (broken, healthy):
        node.wait_outcome("success", "all-3g")
    broken.label("all-1g")
    broken.wait_outcome("failed", "all-1g not applied")
    since = healthy.label("all-1g")
    reason = healthy.wait_outcome(
        "pending",
        f"waiting: the rollout in pool {A100} stopped after 1 failed changes: {broken.name} (",
        since=since,
    )
    assert f"mig-guard rollout resume -n {namespace} --pool={A100}" in reason
    waiting_condition(healthy, "RolloutStopped")
    assert not healthy.held() and healthy.counts() == {0: {"3g.20gb": 2}, 1: {"3g.20gb": 2}}
    assert "1 failed" in rollout_cli(workload_plane.kubeconfig_path, "status", "-n", namespace)
    rollout_cli(workload_plane.kubeconfig_path, "resume", "-n", namespace, f"--pool={A100}")
    healthy.wait_outcome("success", "all-1g applied", timeout=120)


def test_the_pause_switch_stops_new_starts_until_resumed(
    workload_plane: Any, gpu_node: GpuNodeFactory, rollout_kubeconfig: tuple[str, Path]
) -> None:
    namespace, kubeconfig = rollout_kubeconfig
    node = gpu_node(gpus=2, initial="all-3g", operand=None)
    start(node, namespace, kubeconfig, "3")
    node.wait_outcome("success", "all-3g")
    rollout_cli(workload_plane.kubeconfig_path, "pause", "-n", namespace, "--reason", "freeze")
    since = node.label("all-1g")
    reason = node.wait_outcome("pending", "waiting: rollouts are paused by ", since=since)
    assert ": freeze; resume with" in reason
    waiting_condition(node, "RolloutPaused")
    assert not node.held() and node.counts() == {0: {"3g.20gb": 2}, 1: {"3g.20gb": 2}}
    rollout_cli(workload_plane.kubeconfig_path, "resume", "-n", namespace)
    node.wait_outcome("success", "all-1g applied", timeout=120)
