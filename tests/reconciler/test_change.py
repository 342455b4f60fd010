"""The change transaction step by step, without an API server: the GPUs are the simulated NVML
(through the real GpuAccess), the Node is kept in memory and changed through the reconciler's own
patch encoding, and the operands, the evictor and the workload finder are in-memory stand-ins of
their protocols. The same behaviour against the real API server: test_loop.py, test_e2e_*.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from kubernetes.client import ApiException
from node_harness import A100, DP
from node_harness import CONFIG as HARNESS_CONFIG

from kube.node import NodeView
from migcore import keys
from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import parse_config
from migcore.hold import HoldMode, HoldRecord
from migcore.planning import DevicePlacement, plan_node
from migcore.usage import DevicePlace, NodeUsage
from reconciler import change
from reconciler.change import Change, OnFailure, OnRestart, Outcome, Parts, Phase, Progress
from reconciler.eviction import EvictionError
from reconciler.gpu_access import GpuAccess
from reconciler.metrics import Metrics
from reconciler.node_state import NodeEdit, _body
from reconciler.nvml_sim import SimulatedNvml
from reconciler.operands import OperandTimeoutError
from reconciler.rollout import RolloutSlot, SlotLostError, Waiting
from reconciler.workloads import PodRef

CATALOG = load_catalog()
CONFIG = parse_config(HARNESS_CONFIG, CATALOG)
POD = PodRef("ml", "train-0")


# --- in-memory stand-ins of the collaborators --------------------------------------------------------


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


class MemoryNode:
    """The Node as JSON in memory; each NodeEdit goes through the reconciler's merge-patch encoding."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.obj: dict[str, Any] = {
            "metadata": {"name": "n", "labels": dict(labels), "annotations": {}},
            "spec": {},
        }
        self.events: list[tuple[str, str]] = []
        self.writes: list[dict[str, Any]] = []
        self.during_write: Callable[[], None] | None = None

    def view(self) -> NodeView:
        return NodeView.of(self.obj)

    def apply(self, edit: NodeEdit | Callable[[NodeView], NodeEdit]) -> NodeEdit:
        if self.during_write is not None:
            self.during_write()
        made = edit(self.view()) if callable(edit) else edit
        body = _body(self.view(), made)
        if body is not None:
            _merge(self.obj, body)
            self.writes.append(body)
        if made.state is not None:
            self.events.append((made.event_reason or made.state, made.reason or ""))
        return made

    def event(self, event_type: str, reason: str, note: str, action: str = "Reconcile") -> None:
        self.events.append((reason, note))

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.view().labels)

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.view().annotations)

    def held(self) -> bool:
        return keys.ANNOTATION_HOLD in self.annotations or bool(self.view().taints)


class NodeStore:
    """The record in the node's annotation, as `reconciler.progress.NodeProgressStore` keeps it."""

    on_node = True

    def __init__(self, node: MemoryNode) -> None:
        self.node = node

    def load(self) -> Progress | None:
        text = self.node.annotations.get(keys.ANNOTATION_PROGRESS)
        return Progress.loads(text) if text else None

    def save(self, progress: Progress) -> None:
        raise AssertionError("a record on the node is written with the step, not saved apart")

    def clear(self) -> None:
        raise AssertionError("a record on the node is removed with the last write")


@dataclass
class Operands:
    still_there: str = ""  # pods left after the timeout
    waited: list[dict[str, str]] = field(default_factory=list)

    def wait_gone(self, paused: Mapping[str, str], timeout: float) -> None:
        self.waited.append(dict(paused))
        if self.still_there:
            raise OperandTimeoutError(
                f"GPU operand pods still on the node after {timeout:g}s: {self.still_there}"
            )


@dataclass
class Evictor:
    refuse: str = ""
    evicted: list[PodRef] = field(default_factory=list)

    def evict(self, pods: Sequence[PodRef]) -> list[PodRef]:
        if pods and self.refuse:
            raise EvictionError(self.refuse)
        self.evicted += pods
        return list(pods)


@dataclass
class Workloads:
    pods: dict[PodRef, list[DevicePlacement]] = field(default_factory=dict)

    def usage(self, places: Mapping[int, Mapping[str, DevicePlace]]) -> NodeUsage:
        return NodeUsage.build(
            places,
            {pod: [DevicePlace(gpu, gi) for gpu, gi in spots] for pod, spots in self.pods.items()},
            "podresources",
        )


class Report:
    def patch(self) -> dict[str, str | None]:
        return {keys.ANNOTATION_GPUS: "{}"}

    def written(self) -> None:
        pass


@dataclass
class Slot:
    """A rollout slot in memory: whether it is free, and every call with whether the node was held
    then (the order against the Node writes is what a budget relies on)."""

    node: MemoryNode
    free: bool = True
    lose_at_check: int = 0  # the n-th check finds the slot taken over (0: never)
    waiting: Waiting = field(
        default_factory=lambda: Waiting("slots", "waiting for a rollout slot (pool P: 1 of 1 in use: gpu-9)")
    )
    calls: list[tuple[str, bool]] = field(default_factory=list)
    released: list[dict[str, Any]] = field(default_factory=list)
    checks: int = 0

    def take(self) -> Waiting | None:
        self.calls.append(("take", self.node.held()))
        return None if self.free else self.waiting

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.lose_at_check:
            raise SlotLostError("the rollout slot was lost (taken over): the change stops here")

    def keep_through_reboot(self) -> None:
        self.calls.append(("keep_through_reboot", self.node.held()))

    def release(self, *, failed: str | None = None, succeeded: bool = False, config: str = "") -> None:
        self.calls.append(("release", self.node.held()))
        self.released.append({"failed": failed, "succeeded": succeeded, "config": config})


@dataclass
class Settings:
    hold_mode: HoldMode = HoldMode.TAINT
    operand_timeout: float = 1.0
    busy_gpu_timeout: float = 0.0
    reboot_enabled: bool = False


@dataclass
class Bench:
    """One node: its GPUs, its Node, and every stand-in, wired as a change sees them."""

    sim: SimulatedNvml
    gpus: GpuAccess
    node: MemoryNode
    operands: Operands = field(default_factory=Operands)
    evictor: Evictor = field(default_factory=Evictor)
    workloads: Workloads = field(default_factory=Workloads)
    settings: Settings = field(default_factory=Settings)
    reboots: list[str] = field(default_factory=list)
    reboot: Callable[[], None] | None = None
    slot: RolloutSlot | None = None
    cdi: Any = field(default_factory=change.NoHost)
    host_clients: Any = field(default_factory=change.NoHost)
    operator: Any = field(default_factory=change.NoHost)

    def parts(self) -> Parts:
        return Parts(
            node=self.node,
            gpus=self.gpus,
            operands=self.operands,
            evictor=self.evictor,
            workloads=self.workloads,
            store=NodeStore(self.node),
            metrics=Metrics(),
            report=Report(),
            reboot=self.reboot or (lambda: self.reboots.append("reboot")),
            boot_id=self.sim.simBootId,
            **({"slot": self.slot} if self.slot is not None else {}),
            cdi=self.cdi,
            host_clients=self.host_clients,
            operator=self.operator,
        )

    def change(self, name: str, progress: Progress | None = None) -> Change:
        """A change to `name` as the loop makes it: judged and planned from the GPUs as they are."""
        progress = progress if progress is not None else NodeStore(self.node).load()
        result = check_config(CONFIG, name, hardware_from_report(CATALOG, self.gpus.discover()))
        assert result.valid, result.errors
        current = self.gpus.geometries()
        plan = plan_node(current, change.target_layouts(result, current, progress))
        self.node.obj["metadata"]["labels"][keys.LABEL_MIG_CONFIG] = name
        return Change(
            self.parts(),
            self.settings,
            name=name,
            digest=CONFIG.digest,
            result=result,
            plan=plan,
            current=current,
            progress=progress,
        )

    def record(self) -> Progress | None:
        return NodeStore(self.node).load()


def bench(initial: str | None = "all-3g", faults: str | None = None) -> Bench:
    sim = SimulatedNvml([A100, A100], faults=faults)
    gpus = GpuAccess(sim)
    gpus.start()
    node = MemoryNode({DP: "custom", keys.LABEL_GPU_PRODUCT: A100})
    made = Bench(sim, gpus, node)
    if initial is not None:
        assert made.change(initial).run().state == keys.STATE_SUCCESS
        node.writes.clear()
        node.events.clear()
        made.operands.waited.clear()
    return made


# --- the phases -----------------------------------------------------------------------------------------


def test_every_phase_says_what_a_failure_and_a_restart_in_it_do() -> None:
    assert [p.value for p in Phase] == [
        "starting",
        "pausing",
        "evicting",
        "stopping-host-clients",
        "applying",
        "publishing",
        "rebooting",
    ]
    # Only once the GPUs hold the new layout (the CDI refresh) does a failure keep it.
    assert {p: p.on_failure for p in Phase if p.on_failure is not OnFailure.ROLL_BACK} == {
        Phase.PUBLISHING: OnFailure.KEEP_LAYOUT
    }
    assert {p: p.on_restart for p in Phase if p.on_restart is not OnRestart.RESUME} == {
        Phase.REBOOTING: OnRestart.CHECK_REBOOT
    }


def test_the_record_keeps_its_wire_format_and_reads_an_unknown_phase_as_starting() -> None:
    record = Progress("all-3g", "d", {}, {DP: "custom"}, phase="evicting")
    assert record.phase is Phase.EVICTING
    assert '"phase":"evicting"' in record.dumps()
    assert Progress.loads(record.dumps()) == record
    assert Progress.loads(record.dumps().replace("evicting", "draining")).phase is Phase.STARTING


# --- each step ----------------------------------------------------------------------------------------


def test_begin_holds_pauses_and_records_in_one_write() -> None:
    b = bench()
    step = b.change("gpu0-3g-gpu1-off")
    step.begin()
    assert len(b.node.writes) == 1
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert b.node.labels[DP] == keys.PAUSED_FOR_MIG_CHANGE
    hold = HoldRecord.from_annotation(b.node.annotations[keys.ANNOTATION_HOLD])
    assert hold is not None and (hold.taint, hold.by) == (True, "reconciler")
    record = b.record()
    assert record is not None and record.phase is Phase.PAUSING and record.operands == {DP: "custom"}


def test_announce_names_only_the_pods_on_what_changes() -> None:
    b = bench()
    on_gpu0, on_gpu1 = PodRef("ml", "a"), PodRef("ml", "b")
    b.workloads.pods = {on_gpu0: [(0, 0)], on_gpu1: [(1, 4)]}
    movers = b.change("gpu0-3g-gpu1-off").announce()
    assert movers == [on_gpu1]
    (plan,) = [note for reason, note in b.node.events if reason == "Plan"]
    assert "pods to move (podresources): ml/b" in plan


def test_drain_operands_waits_for_the_paused_ones() -> None:
    b = bench()
    step = b.change("gpu0-3g-gpu1-off")
    step.begin()
    step.drain_operands()
    assert b.operands.waited == [{DP: "custom"}]
    assert (
        "PausingOperands",
        "gpu0-3g-gpu1-off: waiting for GPU operands to go (device-plugin=custom)",
    ) in b.node.events


def test_evict_records_the_phase_then_evicts() -> None:
    b = bench()
    step = b.change("gpu0-3g-gpu1-off")
    step.begin()
    step.evict([POD])
    assert b.evictor.evicted == [POD]
    record = b.record()
    assert record is not None and record.phase is Phase.EVICTING


def test_refuse_busy_gpus_names_the_process() -> None:
    b = bench()
    b.sim.simAddProcess(1, 4242, gi_start=4)
    with pytest.raises(
        change.BusyGpuError, match="GPU 1 still runs compute processes on the GPU instance at 4"
    ):
        b.change("gpu0-3g-gpu1-off").refuse_busy_gpus()
    b.change("all-3g").refuse_busy_gpus()  # nothing changes there: no refusal


def test_apply_reads_every_gpu_back() -> None:
    b = bench()
    before = b.gpus.geometries()
    step = b.change("gpu0-3g-gpu1-off")
    step.begin()
    outcome = step.apply()
    assert outcome.state == keys.STATE_SUCCESS
    assert not b.gpus.geometry(1).mig_enabled and b.gpus.geometry(0) == before[0]
    record = b.record()
    assert record is not None and record.phase is Phase.APPLYING


def test_a_whole_change_writes_the_node_a_handful_of_times_and_releases_it() -> None:
    b = bench()
    b.workloads.pods = {POD: [(1, 0)]}
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome == Outcome(keys.STATE_SUCCESS, outcome.reason)
    assert outcome.reason.startswith("gpu0-3g-gpu1-off applied")
    assert len(b.node.writes) == 4  # begin, evicting, applying, finish
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_SUCCESS
    assert b.node.labels[DP] == "custom"
    assert not b.node.held() and b.record() is None
    assert b.node.annotations[keys.ANNOTATION_GPUS] == "{}"  # the report goes with the last write


# --- failures roll back -----------------------------------------------------------------------------


def test_operands_that_do_not_go_fail_the_change_before_any_gpu_is_touched() -> None:
    b = bench()
    b.operands.still_there = "gpu-operator/nvidia-device-plugin-x"
    before = b.gpus.geometries()
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert "nvidia-device-plugin-x" in outcome.reason
    assert b.gpus.geometries() == before
    assert b.node.labels[DP] == "custom" and not b.node.held()


def test_a_refused_eviction_fails_the_change_with_the_budget_named() -> None:
    b = bench()
    b.workloads.pods = {POD: [(1, 0)]}
    b.evictor.refuse = "PodDisruptionBudget ml/pdb blocks eviction of pod ml/train-0"
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert (
        outcome.reason
        == "gpu0-3g-gpu1-off not applied: PodDisruptionBudget ml/pdb blocks eviction of pod ml/train-0"
    )


def test_an_nvml_fault_rolls_every_changed_gpu_back() -> None:
    b = bench(
        initial="all-disabled", faults="nvmlDeviceCreateGpuInstanceWithPlacement@4=InsufficientResources"
    )
    before = b.gpus.geometries()
    outcome = b.change("all-3g").run()  # GPU 0 done, then the second create on GPU 1 fails
    assert outcome.state == keys.STATE_FAILED
    assert "InsufficientResources" in outcome.reason and "rolled back" in outcome.reason
    assert b.gpus.geometries() == before  # both GPUs, including the one that had succeeded
    assert all(b.gpus.mig_mode(i) == (False, False) for i in range(2))


def test_an_api_error_rolls_back_finishes_and_goes_to_the_loop() -> None:
    b = bench()
    b.workloads.pods = {POD: [(1, 0)]}

    def evict(pods: Sequence[PodRef]) -> list[PodRef]:
        raise ApiException(status=500, reason="Internal Server Error")

    b.evictor.evict = evict  # type: ignore[method-assign]
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert isinstance(outcome.api_failure, ApiException)
    assert "Kubernetes API 500 Internal Server Error" in outcome.reason
    assert not b.node.held() and b.record() is None


def test_a_newer_label_keeps_the_hold_for_the_next_change() -> None:
    b = bench()
    step = b.change("gpu0-3g-gpu1-off")

    def relabel() -> None:  # the admin relabels while the change runs: seen by its last write
        if b.node.labels.get(keys.LABEL_MIG_STATE) == keys.STATE_PENDING:
            b.node.obj["metadata"]["labels"][keys.LABEL_MIG_CONFIG] = "all-disabled"

    b.node.during_write = relabel
    outcome = step.run()
    assert outcome.newer
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert (
        "changed to all-disabled meanwhile: applying that next" in b.node.annotations[keys.ANNOTATION_REASON]
    )
    assert b.node.held()


# --- interrupted changes resume -----------------------------------------------------------------------


def test_a_change_killed_while_applying_resumes_to_the_same_target() -> None:
    b = bench()
    before = b.gpus.geometries()
    killed = b.change("gpu0-3g-gpu1-off")
    killed.begin()
    killed.progress.phase = Phase.APPLYING
    b.node.apply(NodeEdit(annotations=change.record(NodeStore(b.node), killed.progress)))
    (gpu1,) = killed.plan.changed
    b.gpus.apply(replace(gpu1, operations=gpu1.operations[:3]))  # killed after three operations
    record = b.record()
    assert record is not None and record.phase is Phase.APPLYING and record.before == before
    assert len(b.gpus.geometry(1).instances) == 1  # half-way: one GPU instance left, no compute

    outcome = b.change("gpu0-3g-gpu1-off").run()  # the agent back: the loop hands it the record
    assert outcome.state == keys.STATE_SUCCESS
    assert not b.gpus.geometry(1).mig_enabled
    assert b.node.labels[DP] == "custom"  # the value the first run recorded, not "paused"


def _rebooting(b: Bench) -> None:
    """all-disabled -> all-3g with a host reboot: the change stops in REBOOTING."""
    b.settings.reboot_enabled = True
    for gpu in range(2):
        b.sim.simSetResetRequiresReboot(gpu, True)
    outcome = b.change("all-3g").run()
    assert outcome.state == keys.STATE_REBOOTING and b.reboots == ["reboot"]
    record = b.record()
    assert record is not None and record.phase is Phase.REBOOTING and record.reboot_attempted
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_REBOOTING and b.node.held()


def test_after_the_reboot_the_change_resumes() -> None:
    b = bench(initial="all-disabled")
    _rebooting(b)
    b.sim.simReboot()  # activates the pending modes
    outcome = b.change("all-3g").run()
    assert outcome.state == keys.STATE_SUCCESS, outcome.reason
    assert all(g.device_counts() == {"3g.20gb": 2} for g in b.gpus.geometries().values())
    assert not b.node.held() and b.record() is None


def test_a_mode_change_the_reboot_did_not_activate_fails_and_rolls_back() -> None:
    b = bench(initial="all-disabled")
    before = b.gpus.geometries()
    _rebooting(b)
    b.sim.simReboot(reset_gpus=False)  # a warm reboot that did not reset the GPUs
    outcome = b.change("all-3g").run()  # back after it: the modes are still pending
    assert outcome.state == keys.STATE_FAILED
    assert "the reboot did not activate MIG enabled (the mode change is still pending" in outcome.reason
    assert b.gpus.geometries() == before
    assert all(b.gpus.mig_mode(i) == (False, False) for i in range(2))  # no mode left pending
    assert not b.node.held() and b.record() is None


def test_an_agent_stopped_before_the_reboot_took_place_asks_for_it_once_more() -> None:
    b = bench(initial="all-disabled")
    _rebooting(b)  # the reboot was asked for, but the host has not rebooted (same boot id)
    outcome = b.change("all-3g").run()  # the agent back (killed before the reboot, say)
    assert outcome.state == keys.STATE_REBOOTING, outcome.reason
    assert b.reboots == ["reboot", "reboot"]
    record = b.record()
    assert record is not None and record.phase is Phase.REBOOTING and record.reboot_retried
    assert "has not rebooted for all-3g yet" in b.node.annotations[keys.ANNOTATION_REASON]
    assert b.node.held()
    b.sim.simReboot()  # this time the host reboots
    outcome = b.change("all-3g").run()
    assert outcome.state == keys.STATE_SUCCESS, outcome.reason
    assert all(g.device_counts() == {"3g.20gb": 2} for g in b.gpus.geometries().values())
    assert not b.node.held() and b.record() is None


def test_a_host_that_does_not_reboot_when_asked_twice_fails_and_rolls_back() -> None:
    b = bench(initial="all-disabled")
    before = b.gpus.geometries()
    _rebooting(b)
    assert b.change("all-3g").run().state == keys.STATE_REBOOTING  # asked once more
    outcome = b.change("all-3g").run()  # and still the same boot
    assert outcome.state == keys.STATE_FAILED
    assert "the host did not reboot although asked twice" in outcome.reason
    assert b.reboots == ["reboot", "reboot"]
    assert b.gpus.geometries() == before
    assert all(b.gpus.mig_mode(i) == (False, False) for i in range(2))  # no mode left pending
    assert not b.node.held() and b.record() is None


def test_a_failed_reboot_rolls_back_and_restores_the_operands() -> None:
    b = bench(initial="all-disabled")
    before = b.gpus.geometries()
    b.settings.reboot_enabled = True
    for gpu in range(2):
        b.sim.simSetResetRequiresReboot(gpu, True)

    def broken() -> None:
        raise RuntimeError("systemctl reboot: access denied")

    b.reboot = broken
    outcome = b.change("all-3g").run()
    assert outcome.state == keys.STATE_FAILED
    assert "the host reboot failed: systemctl reboot: access denied" in outcome.reason
    assert b.gpus.geometries() == before
    assert all(b.gpus.mig_mode(i) == (False, False) for i in range(2))  # no mode left pending
    assert b.node.labels[DP] == "custom" and not b.node.held()


# --- the rollout slot --------------------------------------------------------------------------------


def test_a_change_takes_its_slot_before_holding_and_frees_it_after_releasing() -> None:
    b = bench()
    b.slot = slot = Slot(b.node)
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_SUCCESS
    assert slot.calls == [("take", False), ("release", False)]
    assert slot.released == [{"failed": None, "succeeded": True, "config": "gpu0-3g-gpu1-off"}]
    assert slot.checks == 2  # before evicting, before applying


def test_without_a_slot_the_node_waits_unheld_and_nothing_is_done() -> None:
    b = bench()
    before = b.gpus.geometries()
    b.node.apply(NodeEdit(take_hold=(HoldMode.TAINT, "gpu0-3g-gpu1-off")))  # e.g. a webhook held it
    b.slot = Slot(b.node, free=False)
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.waiting and outcome.state == keys.STATE_PENDING
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert b.node.annotations[keys.ANNOTATION_REASON] == (
        "waiting for a rollout slot (pool P: 1 of 1 in use: gpu-9)"
    )
    assert not b.node.held()  # it keeps running what it runs, and takes new pods
    assert b.record() is None and b.node.labels[DP] == "custom"
    assert b.gpus.geometries() == before
    assert b.slot.calls == [("take", True)]  # nothing freed: nothing taken


def test_a_waiting_node_is_not_rewritten_when_nothing_is_due() -> None:
    b = bench()
    b.slot = Slot(b.node, free=False, waiting=Waiting("slots", "waiting ...", report=False))
    writes = len(b.node.writes)
    assert b.change("gpu0-3g-gpu1-off").run().waiting
    assert len(b.node.writes) == writes


def test_a_failed_change_counts_against_the_pool_before_its_slot_frees() -> None:
    b = bench()
    b.operands.still_there = "gpu-operator/nvidia-device-plugin-x"
    b.slot = slot = Slot(b.node)
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert slot.calls[-1] == ("release", False)
    assert slot.released == [{"failed": outcome.reason, "succeeded": False, "config": "gpu0-3g-gpu1-off"}]


def test_an_api_error_frees_the_slot_without_counting_a_failure() -> None:
    b = bench()
    b.workloads.pods = {POD: [(1, 0)]}

    def evict(pods: Sequence[PodRef]) -> list[PodRef]:
        raise ApiException(status=503, reason="Service Unavailable")

    b.evictor.evict = evict  # type: ignore[method-assign]
    b.slot = slot = Slot(b.node)
    assert b.change("gpu0-3g-gpu1-off").run().api_failure is not None
    assert slot.released == [{"failed": None, "succeeded": False, "config": "gpu0-3g-gpu1-off"}]


def test_a_lost_slot_stops_the_change_before_it_disrupts_anything() -> None:
    b = bench()
    before = b.gpus.geometries()
    b.workloads.pods = {POD: [(1, 0)]}
    b.slot = Slot(b.node, lose_at_check=1)  # taken over while the operands drained
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert isinstance(outcome.api_failure, SlotLostError)  # no verdict: the loop retries (and waits)
    assert b.evictor.evicted == [] and b.gpus.geometries() == before
    assert not b.node.held() and b.record() is None and b.node.labels[DP] == "custom"


def test_a_newer_label_keeps_the_slot_with_the_hold() -> None:
    b = bench()
    b.slot = slot = Slot(b.node)

    def relabel() -> None:
        if b.node.labels.get(keys.LABEL_MIG_STATE) == keys.STATE_PENDING:
            b.node.obj["metadata"]["labels"][keys.LABEL_MIG_CONFIG] = "all-disabled"

    b.node.during_write = relabel
    assert b.change("gpu0-3g-gpu1-off").run().newer
    assert b.node.held() and slot.calls == [("take", False)]


def test_a_change_resumed_without_a_slot_waits_held_with_its_record() -> None:
    b = bench()
    killed = b.change("gpu0-3g-gpu1-off")
    killed.begin()  # then the agent died, and its slot expired and went to another node
    b.slot = Slot(b.node, free=False)
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.waiting
    assert b.node.held() and b.record() is not None  # its GPUs may be half-way
    assert "waiting for a rollout slot" in b.node.annotations[keys.ANNOTATION_REASON]


def test_the_slot_is_kept_over_a_host_reboot_and_taken_back_after_it() -> None:
    b = bench(initial="all-disabled")
    b.slot = slot = Slot(b.node)
    _rebooting(b)
    assert slot.calls == [("take", False), ("keep_through_reboot", True)]
    b.sim.simReboot()
    assert b.change("all-3g").run().state == keys.STATE_SUCCESS
    assert slot.calls[2:] == [("take", True), ("release", False)]
