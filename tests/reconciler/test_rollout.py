"""The rollout budget against the real API server: several nodes' `Rollout`s (each what one
reconciler runs) coordinating through real Leases. Whole reconcilers, their Nodes and the webhook:
test_e2e_rollout.py."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from devcluster.processes import wait_until
from migcore import keys
from reconciler.metrics import Metrics
from reconciler.rollout import Budget, Rollout, RolloutSettings, SlotLostError, failure_name, slot_name

POOL = "NVIDIA-A100-SXM4-40GB"


def test_a_budget_is_a_number_of_nodes_or_a_share_of_the_pool() -> None:
    assert Budget.parse("3") == Budget(count=3) and str(Budget.parse(" 3 ")) == "3"
    assert Budget.parse("10%") == Budget(percent=10)
    assert Budget.parse("10%").slots(200) == 20
    assert Budget.parse("25%").slots(10) == 2  # rounded down, like maxUnavailable
    assert Budget.parse("10%").slots(5) == 1  # at least one, or a small pool never changes
    for bad, why in (("0", "at least 1 node"), ("0%", "from 1% to 100%"), ("101%", "from 1% to 100%")):
        with pytest.raises(ValueError, match=why):
            Budget.parse(bad)
    with pytest.raises(ValueError, match=r"a number of nodes .3. or a percentage .10%., got 'x'"):
        Budget.parse("x")


class Fleet:
    """Rollouts of several nodes in one namespace; `woken` counts the wakes each node got."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.made: list[Rollout] = []
        self.woken: dict[str, int] = {}

    def node(self, name: str, budget: str = "1", **settings: Any) -> Rollout:
        def wake() -> None:
            self.woken[name] = self.woken.get(name, 0) + 1

        made = Rollout(
            self.api,
            RolloutSettings(Budget.parse(budget), self.namespace, **settings),
            name,
            wake,
            Metrics(),
            jitter=0.0,
        )
        self.made.append(made)
        return made

    def leases(self, role: str = keys.ROLLOUT_SLOT) -> dict[str, Any]:
        items = (
            k8s.CoordinationV1Api(self.api)
            .list_namespaced_lease(self.namespace, label_selector=f"{keys.LABEL_ROLLOUT}={role}")
            .items
        )
        return {lease.metadata.name: lease for lease in items}

    def holders(self) -> list[str]:
        return sorted(lease.spec.holder_identity for lease in self.leases().values())

    def wait_woken(self, name: str, timeout: float = 30) -> None:
        """Until the node has been woken since the last call (a wake may come before this is
        called: the waiting node is not woken while it is blocked, so any wake counts)."""
        wait_until(lambda: self.woken.get(name, 0) > 0, timeout, what=f"{name} woken")
        self.woken[name] = 0


@pytest.fixture
def fleet(k8s_api: Any) -> Iterator[Fleet]:
    namespace = f"rollout-{uuid.uuid4().hex[:6]}"
    ensure_namespace(k8s_api, namespace)
    made = Fleet(k8s_api, namespace)
    yield made
    for rollout in made.made:
        rollout.close()


def gauge(rollout: Rollout, name: str, pool: str = POOL) -> float:
    value = rollout.metrics.registry.get_sample_value(name, {"pool": pool})
    return 0.0 if value is None else value


def test_at_most_the_budget_holds_slots_and_a_waiting_node_says_who_does(fleet: Fleet) -> None:
    a, b, c = (fleet.node(n, budget="2") for n in ("gpu-a", "gpu-b", "gpu-c"))
    assert a.take(POOL) is None and b.take(POOL) is None
    waiting = c.take(POOL)
    assert waiting is not None and waiting.cause == "slots" and waiting.report
    assert waiting.reason == f"waiting for a rollout slot (pool {POOL}: 2 of 2 in use: gpu-a, gpu-b)"
    assert waiting.condition_reason == "WaitingForRolloutSlot"
    assert fleet.holders() == ["gpu-a", "gpu-b"]
    lease = next(iter(fleet.leases().values()))
    assert lease.metadata.labels == {keys.LABEL_ROLLOUT: keys.ROLLOUT_SLOT, keys.LABEL_POOL: POOL}
    assert lease.spec.lease_duration_seconds == 60
    assert (gauge(a, "mig_guard_rollout_active"), gauge(c, "mig_guard_rollout_waiting")) == (1, 1)
    assert c.take("another-pool") is None  # the budget is per pool


def test_a_freed_slot_wakes_the_waiting_node_which_takes_it(fleet: Fleet) -> None:
    a, b = fleet.node("gpu-a"), fleet.node("gpu-b")
    assert a.take(POOL) is None
    assert b.take(POOL) is not None
    a.release(POOL, succeeded=True)
    fleet.wait_woken("gpu-b")
    # Claimed before the loop is woken: a waiting node that lost the race costs one 409, not a
    # reconcile that reads its Node and config to find the slot gone.
    assert fleet.holders() == ["gpu-b"]
    assert b.take(POOL) is None
    assert fleet.holders() == ["gpu-b"]
    assert (gauge(a, "mig_guard_rollout_active"), gauge(b, "mig_guard_rollout_waiting")) == (0, 0)


def test_of_many_waiting_nodes_one_takes_a_freed_slot_and_only_it_is_woken(fleet: Fleet) -> None:
    holder = fleet.node("gpu-a")
    waiting = [fleet.node(f"gpu-w{i}") for i in range(5)]
    assert holder.take(POOL) is None
    assert all(node.take(POOL) is not None for node in waiting)
    holder.release(POOL, succeeded=True)  # no jitter here: all five race for it at once
    wait_until(lambda: sum(fleet.woken.values()) > 0, 30, what="a waiting node woken")
    winners = fleet.holders()
    assert len(winners) == 1 and winners[0].startswith("gpu-w")
    others = [node for node in waiting if node.node_name != winners[0]]
    wait_until(lambda: all(node.view.watching for node in others), 30, what="the losers wait on")
    assert all(node.take(POOL) is not None for node in others)  # still waiting, the slot is taken
    assert fleet.woken == {winners[0]: 1}  # the losers' loops were never woken
    assert fleet.holders() == winners


def test_a_holder_that_stops_renewing_loses_its_slot_when_its_lease_expires(fleet: Fleet) -> None:
    a, b = fleet.node("gpu-a", lease_seconds=3), fleet.node("gpu-b", lease_seconds=3)
    assert a.take(POOL) is None
    a.close()  # as if killed: nothing renews or frees its Lease
    assert b.take(POOL) is not None
    fleet.wait_woken("gpu-b")  # once b has seen the Lease unchanged for its duration
    assert b.take(POOL) is None
    assert fleet.holders() == ["gpu-b"]
    with pytest.raises(SlotLostError, match="the rollout slot was lost"):
        a.check()  # had it lived on, it would stop before its next disruptive step


def test_a_renewed_slot_outlives_its_duration(fleet: Fleet) -> None:
    a, b = fleet.node("gpu-a", lease_seconds=3), fleet.node("gpu-b", lease_seconds=3)
    assert a.take(POOL) is None
    assert b.take(POOL) is not None
    version = next(iter(fleet.leases().values())).metadata.resource_version
    wait_until(
        lambda: next(iter(fleet.leases().values())).metadata.resource_version != version,
        30,
        what="a renewal",
    )
    assert b.take(POOL) is not None and fleet.holders() == ["gpu-a"]
    a.check()


def test_a_restarted_agent_takes_its_own_slot_back(fleet: Fleet) -> None:
    first = fleet.node("gpu-a")
    assert first.take(POOL) is None
    first.close()
    again = fleet.node("gpu-a")  # the same node's next agent, mid-change
    assert again.take(POOL) is None
    assert fleet.holders() == ["gpu-a"] and len(fleet.leases()) == 1
    again.keep_through_reboot()
    (lease,) = fleet.leases().values()
    assert lease.spec.lease_duration_seconds == RolloutSettings.reboot_seconds
    again.close()
    stale = fleet.node("gpu-a")  # one that finds no change in flight frees it
    stale.release_stale()
    assert fleet.leases() == {}


def test_failed_changes_stop_the_pool_until_a_human_resumes_it(fleet: Fleet) -> None:
    nodes = [fleet.node(f"gpu-{i}", budget="3", failure_limit=2) for i in range(3)]
    for node in nodes[:2]:
        assert node.take(POOL) is None
        node.release(POOL, failed=f"all-1g.5gb not applied: {node.node_name} broke", config="all-1g.5gb")
    failed = fleet.leases(keys.ROLLOUT_FAILED)
    assert sorted(failed) == [failure_name("gpu-0"), failure_name("gpu-1")]
    record = failed[failure_name("gpu-0")]
    assert record.metadata.annotations[keys.ANNOTATION_ROLLOUT_CONFIG] == "all-1g.5gb"
    assert record.metadata.labels[keys.LABEL_POOL] == POOL and record.spec.lease_duration_seconds is None
    waiting = nodes[2].take(POOL)
    assert waiting is not None and waiting.cause == "stopped"
    assert waiting.reason.startswith(
        f"waiting: the rollout in pool {POOL} stopped after 2 failed changes: "
        "gpu-0 (all-1g.5gb not applied: gpu-0 broke), gpu-1 (all-1g.5gb not applied: gpu-1 broke); "
        f"resume with `mig-guard rollout resume -n {fleet.namespace} --pool={POOL}` or `kubectl -n {fleet.namespace} delete leases "
        f"-l mig-guard.io/rollout=failed,mig-guard.io/pool={POOL}`"
    )
    assert fleet.node("gpu-9", budget="3", failure_limit=2).take("another-pool") is None
    # The human resumes: the failures are forgotten, the waiting node is woken and starts.
    k8s.CoordinationV1Api(fleet.api).delete_collection_namespaced_lease(
        fleet.namespace, label_selector=f"{keys.LABEL_ROLLOUT}={keys.ROLLOUT_FAILED}"
    )
    fleet.wait_woken("gpu-2")
    assert nodes[2].take(POOL) is None


def test_a_node_that_succeeds_after_failing_no_longer_counts(fleet: Fleet) -> None:
    node = fleet.node("gpu-a", failure_limit=1)
    assert node.take(POOL) is None
    node.release(POOL, failed="it broke")
    assert list(fleet.leases(keys.ROLLOUT_FAILED)) == [failure_name("gpu-a")]
    again = fleet.node("gpu-a", failure_limit=2)  # below the limit: a retry starts
    assert again.take(POOL) is None
    again.release(POOL, succeeded=True)
    assert fleet.leases(keys.ROLLOUT_FAILED) == {}


def test_the_pause_switch_stops_every_pool(fleet: Fleet) -> None:
    node = fleet.node("gpu-a")
    k8s.CoordinationV1Api(fleet.api).create_namespaced_lease(
        fleet.namespace,
        {
            "metadata": {
                "name": keys.PAUSE_LEASE,
                "labels": {keys.LABEL_ROLLOUT: keys.ROLLOUT_PAUSE},
                "annotations": {keys.ANNOTATION_REASON: "change freeze"},
            },
            "spec": {"holderIdentity": "alice"},
        },
    )
    waiting = node.take("any-pool")
    assert waiting is not None and waiting.cause == "paused"
    assert waiting.reason == (
        "waiting: rollouts are paused by alice: change freeze; resume with "
        f"`mig-guard rollout resume -n {fleet.namespace}` or `kubectl -n {fleet.namespace} delete lease {keys.PAUSE_LEASE}`"
    )
    k8s.CoordinationV1Api(fleet.api).delete_namespaced_lease(keys.PAUSE_LEASE, fleet.namespace)
    fleet.wait_woken("gpu-a")
    assert node.take("any-pool") is None


def test_a_share_of_the_pool_counts_its_nodes(fleet: Fleet, k8s_api: Any) -> None:
    pool = f"POOL-{uuid.uuid4().hex[:6]}"
    for i in range(10):
        create_gpu_node(k8s_api, f"{pool.lower()}-{i}", fake=False, labels={keys.LABEL_GPU_PRODUCT: pool})
    nodes = [fleet.node(f"gpu-{i}", budget="20%") for i in range(3)]
    assert [n.take(pool) is None for n in nodes] == [True, True, False]


def test_a_waiting_node_is_told_to_rewrite_its_reason_only_when_due(fleet: Fleet) -> None:
    a, b = fleet.node("gpu-a"), fleet.node("gpu-b")
    assert a.take(POOL) is None
    first, again = b.take(POOL), b.take(POOL)
    assert first is not None and first.report
    assert again is not None and not again.report  # same cause, within REASON_REFRESH_SECONDS
    k8s.CoordinationV1Api(fleet.api).create_namespaced_lease(
        fleet.namespace,
        {"metadata": {"name": keys.PAUSE_LEASE, "labels": {keys.LABEL_ROLLOUT: keys.ROLLOUT_PAUSE}}},
    )
    wait_until(lambda: any(lease.role == keys.ROLLOUT_PAUSE for lease in b.view.snapshot()), 30, what="seen")
    paused = b.take(POOL)
    assert paused is not None and paused.cause == "paused" and paused.report  # another cause: due


def test_a_slot_name_is_dns_safe_whatever_the_pool_value() -> None:
    name = slot_name("NVIDIA_H100.80GB", 3)
    assert re.fullmatch(r"mig-guard-slot-[0-9a-f]{10}-3", name)
