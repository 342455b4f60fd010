"""A change of the node's GPUs to a new layout: a transaction of named steps, its record, and
how it ends.

The steps, in order (one method each; the phase is recorded before the step acts):

    take_slot          STARTING              a rollout slot of the node's pool (`reconciler.rollout`),
                                             or the node waits, not held (`wait`): nothing recorded
    begin              STARTING -> PAUSING   hold the node, pause the GPU operands, record: one Node write
    announce                                 the plan and the pods it moves, in an Event
    drain_operands     PAUSING               wait for the paused operands' pods to leave the node (a
                                             warning when the labels name operands that are nowhere);
                                             delete the operator's CUDA and plugin validator pods
    evict              EVICTING              evict the pods on what changes (PodDisruptionBudgets respected)
    stop_host_clients  STOPPING_HOST_CLIENTS the host's GPU clients (systemd units) that run: recorded,
                                             then stopped (host drivers only, `reconciler.host_clients`)
    refuse_busy_gpus                         refuse GPUs that still run compute processes there
    apply              APPLYING              apply the plan GPU by GPU, each read back
    publish            PUBLISHING            the MIG device nodes and the management CDI spec
                                             (`reconciler.cdi`), before the operands come back
    prepare_reboot     REBOOTING             a mode change only a host reboot activates (or, with the
                                             reboot on, a GPU reset that failed): evict every GPU pod,
                                             set the other pending modes, record
    finish                                   the host side of the exit (`close_out`), then operands
                                             back, hold lifted, GPUs published, state reported: one
                                             Node write; then the slot freed (a failure recorded
                                             against the pool first)
    reboot                                   the host, once per change (after `prepare_reboot`), its
                                             slot kept over the reboot

What happens in each phase is decided by the phase itself (`Phase.on_failure`, `Phase.on_restart`),
never by comparing names, so a new step must say it:

- A step that fails, in every phase but PUBLISHING, rolls back: every GPU that differs from
  `before` is put back (all of them are tried; one that cannot be is named in the reason with what
  it holds), then the change finishes as failed. In PUBLISHING the GPUs hold the new layout and
  keep it (`OnFailure.KEEP_LAYOUT`): the change ends failed, saying that containers cannot use
  the layout yet, and the refresh is owed until the loop's next look succeeds. The invariant: every GPU holds its layout from before or the new one,
  with no MIG mode left pending, and the reason says which. A Kubernetes API error is no verdict on
  the config: the change still rolls back and finishes, and the error goes to the loop, which
  retries soon.
- A change interrupted (the agent killed, the host rebooted) resumes from its record when the
  agent comes back: STARTING, PAUSING, EVICTING and APPLYING resume by planning again from the
  GPUs as they are, to the same layout, with the same rollback target and operand values;
  REBOOTING resumes after checking that the reboot activated every mode change (a mode still
  pending or not activated fails the change, which rolls back). STOPPING_HOST_CLIENTS and
  PUBLISHING resume the same way: the units recorded as stopped stay in the record (and are
  started at the end), and GPUs that already hold the layout leave only the exit to do, whose
  CDI refresh runs because the record says the GPUs were touched. Whatever the phase, a label
  removed or a config no longer usable rolls back instead (`abandon`, `reject`).
- The rollout slot: taken first, in STARTING, before anything is held or recorded, so a change
  that waits leaves nothing to undo, and a restart there simply asks again. It is renewed while
  the change runs and checked before each disruptive step (evicting, applying): a slot lost (its
  Lease expired unrenewed and another node took it) stops the change there, like an API error:
  rolled back, retried, waiting again. It is freed in every way a change ends (`finish`, and
  `release` for settle, reject and abandon), after the node's last write, so a node is never held
  without a slot. Every phase's restart takes it again first: the agent's own Lease if it still
  stands (a quick restart, a host reboot: REBOOTING stretches it over the reboot), else a free
  slot, waiting held if there is none (its GPUs may be half-way).
- Every exit (a change finishing, `settle`, `reject`, `abandon`) runs `close_out` before the
  operands come back: the CDI refresh when the GPUs were touched (or a refresh is owed), the
  recorded host GPU clients started, the operator validator restarted.

The collaborators (the Node, the GPU operands, the evictor, the GPUs, the workload finder, the
record's store, the hardware report, the host's CDI and GPU clients, the operator's validators,
the rollout slot) come in through `Parts`, so each step runs without an API
server in the unit tests (tests/reconciler/test_change.py).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from kube.errors import API_ERRORS, describe
from kube.node import NodeView
from migcore import keys
from migcore.check import CheckResult
from migcore.geometry import GpuGeometry
from migcore.hold import HoldMode
from migcore.planning import GpuPlan, NodePlan, Operation, desired_geometries
from migcore.usage import DevicePlace, NodeUsage
from reconciler.cdi import CdiError, not_usable_yet
from reconciler.eviction import EvictionError
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.gpu_apply import apply_with_rollback, clear_pending_mode, roll_back
from reconciler.host import HostCommandError
from reconciler.host_clients import HostClientsError
from reconciler.metrics import Metrics
from reconciler.node_state import NodeEdit, now_rfc3339
from reconciler.operands import OperandTimeoutError, to_pause
from reconciler.operands import describe as describe_operands
from reconciler.rollout import UNLIMITED, RolloutSlot, SlotLostError, Waiting
from reconciler.workloads import PodRef

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BUSY_POLL_SECONDS = 1.0


# --- the phases -------------------------------------------------------------------------------------


class OnFailure(enum.Enum):
    """What a step failing in a phase does."""

    ROLL_BACK = "every GPU that differs from before the change is put back"
    KEEP_LAYOUT = "the GPUs keep the new layout; the change ends failed, the step owed to the next look"


class OnRestart(enum.Enum):
    """What an agent that finds a change interrupted in a phase does."""

    RESUME = "plan again from the GPUs as they are, to the same layout and rollback target"
    CHECK_REBOOT = "check that the reboot activated every mode change, then resume (else roll back)"


class Phase(enum.StrEnum):
    """Where a change is; its value is what the record on the Node says."""

    on_failure: OnFailure
    on_restart: OnRestart

    def __new__(cls, value: str, on_failure: OnFailure, on_restart: OnRestart) -> Phase:
        member = str.__new__(cls, value)
        member._value_ = value
        member.on_failure = on_failure
        member.on_restart = on_restart
        return member

    STARTING = ("starting", OnFailure.ROLL_BACK, OnRestart.RESUME)
    PAUSING = ("pausing", OnFailure.ROLL_BACK, OnRestart.RESUME)
    EVICTING = ("evicting", OnFailure.ROLL_BACK, OnRestart.RESUME)
    STOPPING_HOST_CLIENTS = ("stopping-host-clients", OnFailure.ROLL_BACK, OnRestart.RESUME)
    APPLYING = ("applying", OnFailure.ROLL_BACK, OnRestart.RESUME)
    PUBLISHING = ("publishing", OnFailure.KEEP_LAYOUT, OnRestart.RESUME)
    REBOOTING = ("rebooting", OnFailure.ROLL_BACK, OnRestart.CHECK_REBOOT)

    @staticmethod
    def parse(text: object) -> Phase:
        """The phase a record names; one this version does not know (a newer agent's) resumes
        like STARTING: planned again, rolled back on failure."""
        for phase in Phase:
            if phase.value == text:
                return phase
        return Phase.STARTING


# --- the record -------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What a change has done so far, persisted before each step (crash safety): the operand
    labels it paused and their exact previous values (restored, not guessed), the GPUs' layouts
    before the change (the rollback target, even when the GPUs are half-way), whether a
    reboot was attempted (at most one per change), the host GPU clients it stopped (started again
    on every exit), whether it deleted the operator's validators (the operator validator is
    restarted on exit), and whether it touched the GPUs (the CDI refresh is then due on exit)."""

    config: str
    config_digest: str
    before: dict[int, GpuGeometry]
    operands: dict[str, str] = field(default_factory=dict)
    phase: Phase = Phase.STARTING
    step: int = 0
    reboot_attempted: bool = False
    # The host's boot id when the reboot was asked for ("": unknown), and whether it was asked once
    # more because the host had not rebooted (the agent killed before the reboot, say).
    boot_id: str = ""
    reboot_retried: bool = False
    started_at: str = field(default_factory=now_rfc3339)
    host_clients: list[str] = field(default_factory=list)
    validators: bool = False
    gpus_touched: bool = False

    def __post_init__(self) -> None:
        self.phase = Phase.parse(self.phase)  # a plain "applying" too

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "config": self.config,
            "configDigest": self.config_digest,
            "before": {str(i): g.to_json() for i, g in sorted(self.before.items())},
            "operands": dict(sorted(self.operands.items())),
            "phase": str(self.phase),
            "step": self.step,
            "rebootAttempted": self.reboot_attempted,
            "bootId": self.boot_id,
            "rebootRetried": self.reboot_retried,
            "startedAt": self.started_at,
            "hostClients": list(self.host_clients),
            "validatorsRemoved": self.validators,
            "gpusTouched": self.gpus_touched,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def loads(text: str) -> Progress:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"progress record: expected an object with version {FORMAT_VERSION}")
        return Progress(
            config=str(raw["config"]),
            config_digest=str(raw.get("configDigest", "")),
            before={int(i): GpuGeometry.from_json(g) for i, g in raw.get("before", {}).items()},
            operands={str(k): str(v) for k, v in raw.get("operands", {}).items()},
            phase=Phase.parse(raw.get("phase")),
            step=int(raw.get("step", 0)),
            reboot_attempted=bool(raw.get("rebootAttempted", False)),
            boot_id=str(raw.get("bootId", "")),
            reboot_retried=bool(raw.get("rebootRetried", False)),
            started_at=str(raw.get("startedAt", "")),
            host_clients=[str(u) for u in raw.get("hostClients", [])],
            validators=bool(raw.get("validatorsRemoved", False)),
            gpus_touched=bool(raw.get("gpusTouched", False)),
        )


# --- the collaborators ------------------------------------------------------------------------------


class NodeWriter(Protocol):
    """The reconciler's own Node (`reconciler.node_state.NodeState`)."""

    def apply(self, edit: NodeEdit | Callable[[NodeView], NodeEdit]) -> NodeEdit: ...
    def event(self, event_type: str, reason: str, note: str, action: str = "Reconcile") -> None: ...


class OperandPods(Protocol):
    """The GPU Operator's operands on this node (`reconciler.operands.Operands`)."""

    def wait_gone(self, paused: Mapping[str, str], timeout: float) -> None: ...


class PodEvictor(Protocol):
    """`reconciler.eviction.Evictor`."""

    def evict(self, pods: Sequence[PodRef]) -> list[PodRef]: ...


class WorkloadFinder(Protocol):
    """Which pods use which GPU (`reconciler.workloads.WorkloadFinder`)."""

    def usage(self, places: Mapping[int, Mapping[str, DevicePlace]]) -> NodeUsage: ...


class ProgressStore(Protocol):
    """Where the record lives (`reconciler.progress`). `on_node`: the record is the Node
    annotation, written together with the rest of a step (one Node write) instead of through
    save/clear."""

    on_node: bool

    def load(self) -> Progress | None: ...
    def save(self, progress: Progress) -> None: ...
    def clear(self) -> None: ...


class HardwareReport(Protocol):
    """The GPUs annotation a change's last write carries (`reconciler.discovery`)."""

    def patch(self) -> dict[str, str | None]:
        """The annotation when it changed (else empty), remembered for `written`."""
        ...

    def written(self) -> None:
        """The Node write that carried `patch()` succeeded."""
        ...


class CdiDevices(Protocol):
    """The node's CDI devices (`reconciler.cdi.Cdi`)."""

    def enabled(self) -> bool: ...
    def owed(self) -> str | None: ...

    def refresh(self) -> None:
        """Raises CdiError (the refresh then stays owed)."""
        ...


class HostGpuClients(Protocol):
    """The host's GPU clients (`reconciler.host_clients.HostClients`)."""

    def enabled(self) -> bool: ...
    def listed(self, mode_change: bool) -> list[str]: ...
    def running(self, units: Sequence[str]) -> list[str]: ...
    def stop(self, units: Sequence[str]) -> None: ...
    def start(self, units: Sequence[str]) -> list[str]: ...


class OperatorPods(Protocol):
    """The GPU Operator's pods besides the paused operands (`reconciler.operands.Operands`)."""

    def remove_validators(self) -> list[str]: ...
    def restart_validator(self) -> list[str]: ...
    def missing(self, paused: Mapping[str, str]) -> list[str]: ...
    def where(self) -> str: ...


class NoHost:
    """No CDI, no host GPU clients, no GPU Operator: the collaborators of a node without them."""

    def enabled(self) -> bool:
        return False

    def owed(self) -> str | None:
        return None

    def refresh(self) -> None:
        return None

    def listed(self, mode_change: bool) -> list[str]:
        return []

    def running(self, units: Sequence[str]) -> list[str]:
        return []

    def stop(self, units: Sequence[str]) -> None:
        return None

    def start(self, units: Sequence[str]) -> list[str]:
        return []

    def remove_validators(self) -> list[str]:
        return []

    def restart_validator(self) -> list[str]:
        return []

    def missing(self, paused: Mapping[str, str]) -> list[str]:
        return []

    def where(self) -> str:
        return keys.GPU_OPERATOR_NAMESPACE


class ChangeSettings(Protocol):
    hold_mode: HoldMode
    operand_timeout: float
    busy_gpu_timeout: float
    reboot_enabled: bool


@dataclass
class Parts:
    """Everything a change acts on."""

    node: NodeWriter
    gpus: GpuAccess
    operands: OperandPods
    evictor: PodEvictor
    workloads: WorkloadFinder
    store: ProgressStore
    metrics: Metrics
    report: HardwareReport
    reboot: Callable[[], None]
    # The host's boot id ("": unknown): whether the host rebooted since the change asked it to.
    boot_id: Callable[[], str] = str
    cdi: CdiDevices = field(default_factory=NoHost)
    host_clients: HostGpuClients = field(default_factory=NoHost)
    operator: OperatorPods = field(default_factory=NoHost)
    slot: RolloutSlot = UNLIMITED


class BusyGpuError(Exception):
    """A GPU that is about to change still runs compute processes; it is not touched."""


class RebootRefusedError(Exception):
    """A host reboot would end work that cannot be moved first; the change is rolled back."""


# --- shared by a change and the other ways a change ends --------------------------------------------


def join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def success_reason(name: str, result: CheckResult) -> str:
    return f"{name} applied: {result.summary()}"


def target_layouts(
    result: CheckResult, current: Mapping[int, GpuGeometry], progress: Progress | None
) -> dict[int, GpuGeometry]:
    """The config's layouts; while a change is in flight, a GPU no entry covers is due its layout
    from before the change (a host reboot for the change emptied it)."""
    desired = desired_geometries(result, current)
    if progress is not None:
        for verdict in result.gpus:
            if verdict.entry is None or verdict.mig_enabled is None:
                before = progress.before.get(verdict.index)
                if before is not None and verdict.index in desired:
                    desired[verdict.index] = before
    return desired


def record(store: ProgressStore, progress: Progress | None) -> dict[str, str | None]:
    """Annotations that record `progress` (None: no change in flight) in the Node write they
    join; a record kept on the host is written now instead (before that Node write)."""
    if store.on_node:
        return {keys.ANNOTATION_PROGRESS: progress.dumps() if progress is not None else None}
    if progress is not None:
        store.save(progress)
    return {}


def restore(gpus: GpuAccess, before: Mapping[int, GpuGeometry]) -> str:
    """Put every GPU that differs from `before` back, trying every one of them; says how that
    went, naming each GPU that could not be restored and what it holds now."""
    restored: list[int] = []
    failed: list[str] = []
    for index, target in sorted(before.items()):
        try:
            now = gpus.geometry(index)
            if now in (target, target.settled()):
                continue
            final = roll_back(gpus, index, target)
            if final in (target, target.settled()):
                restored.append(index)
                continue
            problem = f"it read back {final.summary()}"
        except GpuError as exc:
            problem = str(exc)
        # Whatever else it holds, no MIG mode left pending for the next reboot to activate.
        with contextlib.suppress(GpuError):
            clear_pending_mode(gpus, index)
        try:
            holds = gpus.geometry(index).summary()
        except GpuError as exc:
            holds = f"unreadable ({exc})"
        failed.append(f"GPU {index} was not restored, it holds: {holds} (rollback: {problem})")
    done = [f"GPU {', '.join(map(str, restored))} rolled back to the previous layout"] if restored else []
    return join(*done, *failed)


def close_out(parts: Parts, progress: Progress | None, layout: str, *, cdi_done: bool = False) -> list[str]:
    """The host side of every exit, before the operands come back (mig-manager's order): the CDI
    refresh when the GPUs were touched or a refresh is owed (unless `cdi_done`), the host GPU
    clients the record says were stopped started again, the operator validator restarted.
    Returns what went wrong, a sentence each (the state is then failed); `layout` says what the
    GPUs hold, for the CDI sentence."""
    problems: list[str] = []
    touched = progress is not None and progress.gpus_touched
    if not cdi_done and (touched or parts.cdi.owed() is not None) and parts.cdi.enabled():
        try:
            parts.cdi.refresh()
        except CdiError as exc:
            problems.append(not_usable_yet(layout, str(exc)))
    if progress is not None and progress.host_clients:
        problems += parts.host_clients.start(progress.host_clients)
    if progress is not None and progress.validators:
        try:
            parts.operator.restart_validator()
        except API_ERRORS as exc:  # the validations re-run late, the layout is fine: a warning
            log.warning("could not restart the operator validator: %s", describe(exc))
            parts.node.event(
                "Warning",
                "ValidatorNotRestarted",
                f"the GPU Operator's validator was not restarted after the change: {describe(exc)}",
            )
    return problems


def release(
    parts: Parts,
    progress: Progress | None,
    state: str,
    reason: str,
    *,
    condition_reason: str | None = None,
    layout: str = "their previous layout",
) -> None:
    """The end of anything that held the node: the host side (`close_out`), then operands back,
    hold lifted, record gone, GPUs published, the state reported: one Node write (and the
    condition, an Event)."""
    problems = close_out(parts, progress, layout)
    if problems:
        state, reason = keys.STATE_FAILED, join(reason, *problems)
    parts.node.apply(
        NodeEdit(
            state=state,
            reason=reason,
            annotations={**record(parts.store, None), **parts.report.patch()},
            restore=progress.operands if progress is not None else {},
            lift_hold=True,
            condition_reason=condition_reason,
        )
    )
    if not parts.store.on_node:
        parts.store.clear()
    parts.report.written()
    if progress is not None:  # an interrupted change ends here: its slot too
        parts.slot.release(succeeded=state == keys.STATE_SUCCESS)


def settle(parts: Parts, progress: Progress | None, reason: str, layout: str) -> None:
    """The GPUs already hold the layout: say so (and finish what an interrupted change left: the
    exit's host side, an owed CDI refresh)."""
    release(parts, progress, keys.STATE_SUCCESS, reason, layout=layout)


def reject(parts: Parts, hold_mode: HoldMode, name: str, progress: Progress | None, reason: str) -> None:
    """An unusable config: hold the node while judging it (works without the webhook), leave the
    GPUs as they are (or roll back an interrupted change), report, release."""
    parts.node.apply(NodeEdit(take_hold=(hold_mode, name)))
    try:
        if progress is not None:
            reason = join(reason, restore(parts.gpus, progress.before))
    finally:
        parts.metrics.outcomes.labels(outcome=keys.STATE_FAILED).inc()
        release(parts, progress, keys.STATE_FAILED, reason, condition_reason="InvalidConfig")


def abandon(parts: Parts, progress: Progress | None) -> None:
    """The layout label was removed: roll back an interrupted change, release the node."""
    back = restore(parts.gpus, progress.before) if progress is not None else ""
    release(parts, progress, keys.STATE_FAILED, join(f"the {keys.LABEL_MIG_CONFIG} label was removed", back))


# --- the change ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a change ended: the state reported (rebooting: the host reboots now), the reason, an
    API error that ended it (no verdict on the config; the loop retries), and whether a newer
    layout label is waiting (the loop applies it next)."""

    state: str
    reason: str
    api_failure: BaseException | None = None
    newer: bool = False
    waiting: bool = False  # no rollout slot: nothing was done, the node waits


def _indexes(gpus: Sequence[GpuPlan]) -> str:
    return ", ".join(str(g.index) for g in gpus)


def _not_activated(gpu: GpuPlan) -> str:
    """Why a mode change that the reboot should have activated is not: it says "pending"."""
    want = "enabled" if gpu.desired.mig_enabled else "disabled"
    still = "still pending" if gpu.current.mig_pending == gpu.desired.mig_enabled else "no longer pending"
    return f"GPU {gpu.index}: the reboot did not activate MIG {want} (the mode change is {still}; the GPU holds {gpu.current.summary()})"


class Change:
    """One change to config `name` on this node (see the module docstring)."""

    def __init__(
        self,
        parts: Parts,
        settings: ChangeSettings,
        *,
        name: str,
        digest: str,
        result: CheckResult,
        plan: NodePlan,
        current: Mapping[int, GpuGeometry],
        progress: Progress | None,
    ) -> None:
        self.parts = parts
        self.settings = settings
        self.name = name
        self.result = result
        self.plan = plan
        self.note = ""
        self.resumed = progress is not None  # a change in flight: the node is held already
        if progress is None:
            progress = Progress(config=name, config_digest=digest, before=dict(current))
        elif progress.config != name:
            # The label changed while a change was interrupted or rebooting: this is a new change
            # (its own reboot allowed), rolling back to the same GPUs as before the first one.
            self.note = f"{keys.LABEL_MIG_CONFIG} changed from {progress.config} while that change was {progress.phase}"
            progress = Progress(
                config=name,
                config_digest=digest,
                before=progress.before,
                operands=progress.operands,
                host_clients=progress.host_clients,
                validators=progress.validators,
                gpus_touched=progress.gpus_touched,
            )
        else:  # an interrupted change: keep what it recorded (the original GPUs, the operand values)
            progress.config_digest = digest
        self.progress = progress
        self._published = False  # the CDI refresh ran as a step (not again on the way out)

    def run(self) -> Outcome:
        """Every step in order; whatever fails, the GPUs end as before or as planned (see above)."""
        started = time.monotonic()
        waiting = self.take_slot()
        if waiting is not None:
            return self.wait(waiting)
        outcome = Outcome(keys.STATE_FAILED, "")
        try:
            resumed_rebooting = self.progress.phase.on_restart is OnRestart.CHECK_REBOOT
            outcome = self.reboot_again() if resumed_rebooting and self.check_reboot() else self.steps()
        except CdiError as exc:  # PUBLISHING: the GPUs keep the new layout
            outcome = Outcome(keys.STATE_FAILED, not_usable_yet(self.name, str(exc)))
        except (
            OperandTimeoutError,
            EvictionError,
            HostClientsError,
            HostCommandError,
            BusyGpuError,
            GpuError,
            RebootRefusedError,
        ) as exc:
            outcome = Outcome(keys.STATE_FAILED, f"{self.name} not applied: {exc}")
        except API_ERRORS as exc:
            log.warning("change to %s failed: %s", self.name, exc)
            outcome = Outcome(keys.STATE_FAILED, f"{self.name} not applied: {describe(exc)}", exc)
        except SlotLostError as exc:  # no verdict on the layout either: retried, waiting again
            log.warning("change to %s stopped: %s", self.name, exc)
            outcome = Outcome(keys.STATE_FAILED, f"{self.name} not applied: {exc}", exc)
        except Exception as exc:
            log.exception("change to %s failed", self.name)
            outcome = Outcome(keys.STATE_FAILED, f"{self.name} not applied: unexpected error: {exc}")
        finally:
            if outcome.state == keys.STATE_FAILED and self.progress.phase.on_failure is OnFailure.ROLL_BACK:
                outcome = replace(outcome, reason=join(outcome.reason, self.roll_back()))
            if outcome.state == keys.STATE_REBOOTING:
                self.parts.metrics.outcomes.labels(outcome=outcome.state).inc()
            else:
                outcome = self.finish(outcome, started)
        if outcome.state == keys.STATE_REBOOTING:
            outcome = self.reboot(started)
        return outcome

    # --- the steps ------------------------------------------------------------------------------------

    def take_slot(self) -> Waiting | None:
        """The node's rollout slot (None: held now), else why it waits. An API error here leaves
        everything as it was and goes to the loop, which retries."""
        return self.parts.slot.take()

    def wait(self, waiting: Waiting) -> Outcome:
        """No slot: the node says why it waits (when that is due: not at every handover of a slot)
        and is not held, so it keeps running what it runs and takes new pods; a change in flight
        (resumed, its GPUs maybe half-way) stays held."""
        if waiting.report:
            self.parts.node.apply(
                NodeEdit(
                    state=keys.STATE_PENDING,
                    reason=join(waiting.reason, self.note),
                    lift_hold=not self.resumed,
                    condition_reason=waiting.condition_reason,
                )
            )
        elif not self.resumed:
            self.parts.node.apply(NodeEdit(lift_hold=True))  # a hold taken meanwhile (a webhook's)
        return Outcome(keys.STATE_PENDING, waiting.reason, waiting=True)

    def steps(self) -> Outcome:
        """From the hold to the CDI refresh (see the module's table)."""
        self.begin()
        movers = self.announce()
        self.drain_operands()
        self.evict(movers)
        self.stop_host_clients()
        self.refuse_busy_gpus()
        outcome = self.apply()
        if outcome.state == keys.STATE_SUCCESS:
            self.publish()
        return outcome

    def check_reboot(self) -> bool:
        """Resumed in REBOOTING: True when the host has not rebooted yet (its boot id is the one
        recorded before the reboot: the agent was stopped before the reboot took place), so it is
        asked once more; else every mode change the reboot was for must be active now."""
        booted = self.parts.boot_id()
        if self.progress.boot_id and booted == self.progress.boot_id:
            if not self.progress.reboot_retried:
                return True
            raise GpuError(f"the host did not reboot although asked twice (its boot id is still {booted})")
        stuck = [g for g in self.plan.changed if g.mode_changes]
        if stuck:
            raise GpuError("; ".join(_not_activated(g) for g in stuck))
        return False

    def reboot_again(self) -> Outcome:
        """The host was asked to reboot and has not: ask once more (recorded first, so never a third time)."""
        self.progress.reboot_retried = True
        reason = f"the host has not rebooted for {self.name} yet: rebooting it (asked once more)"
        self.parts.node.apply(
            NodeEdit(
                state=keys.STATE_REBOOTING, reason=reason, annotations=record(self.parts.store, self.progress)
            )
        )
        return Outcome(keys.STATE_REBOOTING, reason)

    def begin(self) -> None:
        """Pending, held, operands paused, progress recorded: one Node write (and the condition)."""
        progress = self.progress

        def begin(node: NodeView) -> NodeEdit:
            if not progress.operands:
                progress.operands = to_pause(dict(node.labels))
            progress.phase = Phase.PAUSING
            progress.validators = True  # deleted in drain_operands; the exit restarts the validator
            what = f"applying {self.name}: {self.plan.describe()}"
            if progress.operands:
                what += f"; pausing GPU operands ({describe_operands(progress.operands)})"
            return NodeEdit(
                state=keys.STATE_PENDING,
                reason=join(what, self.note),
                labels=dict.fromkeys(progress.operands, keys.PAUSED_FOR_MIG_CHANGE),
                annotations=record(self.parts.store, progress),
                take_hold=(self.settings.hold_mode, self.name),
                event_reason="Reconfiguring",
            )

        self.parts.node.apply(begin)

    def announce(self) -> list[PodRef]:
        """The plan and the pods it moves, in an Event; returns those pods (picked from the usage
        the way a preview picks them from the published one: `NodeUsage.movers`)."""
        usage = self.parts.workloads.usage(self._device_places())
        movers = usage.movers(self.plan)
        self.parts.node.event(
            "Normal",
            "Plan",
            f"{self.plan.describe()}; pods to move ({usage.source}): {', '.join(map(str, movers)) or 'none'}",
        )
        return movers

    def drain_operands(self) -> None:
        """Wait for the paused operands' pods to leave the node, then delete the operator's CUDA
        and plugin validator pods (as mig-manager does). Operands the labels name but whose
        DaemonSet is not where the operands are looked for get a warning: they may still use the
        GPUs, unseen."""
        if self.progress.operands:
            try:
                missing = self.parts.operator.missing(self.progress.operands)
            except API_ERRORS as exc:  # only a warning is at stake
                log.warning("could not look for the GPU Operator's DaemonSets: %s", describe(exc))
                missing = []
            if missing:
                namespace = self.parts.operator.where()
                note = (
                    f"{', '.join(f'{k}={self.progress.operands[k]}' for k in missing)} say GPU operands run on "
                    f"this node, but no GPU Operator DaemonSet for them is in namespace {namespace}: their "
                    "pods, if any, are not waited for. Give the operands' namespace "
                    "(--operands-namespace, chart: reconciler.operandsNamespace)"
                )
                log.warning("%s", note)
                self.parts.node.event("Warning", "OperandsNotFound", note)
            paused = describe_operands(self.progress.operands)
            self.parts.node.event(
                "Normal", "PausingOperands", f"{self.name}: waiting for GPU operands to go ({paused})"
            )
        self.parts.operands.wait_gone(self.progress.operands, self.settings.operand_timeout)
        try:
            removed = self.parts.operator.remove_validators()
        except API_ERRORS as exc:  # they validated the old layout; the change goes on without that
            note = f"the GPU Operator's CUDA and plugin validator pods were not deleted: {describe(exc)}"
            log.warning("%s", note)
            self.parts.node.event("Warning", "ValidatorsNotRemoved", note)
            removed = []
        if removed:
            log.info("deleted validator pods: %s", ", ".join(removed))

    def evict(self, movers: Sequence[PodRef]) -> None:
        self.parts.slot.check()
        if movers:
            self._step(
                Phase.EVICTING, "Evicting", f"evicting {len(movers)} pods: {', '.join(map(str, movers))}"
            )
        evicted = self.parts.evictor.evict(movers)
        self.parts.metrics.evictions.inc(len(evicted))

    def stop_host_clients(self) -> None:
        """With host GPU clients on (a host-installed driver): the listed systemd units that run
        (and kubelet when a MIG mode changes) are recorded, then stopped; every exit starts them
        again (`close_out`). A unit recorded by an interrupted run stays recorded."""
        clients = self.parts.host_clients
        if not clients.enabled():
            return
        mode_change = any(g.mode_changes for g in self.plan.changed)
        running = clients.running(clients.listed(mode_change))
        units = list(dict.fromkeys([*self.progress.host_clients, *running]))
        if not units:
            return
        self.progress.host_clients = units
        self._step(
            Phase.STOPPING_HOST_CLIENTS,
            "StoppingHostClients",
            f"stopping host GPU clients: {', '.join(units)}",
        )
        clients.stop(units)

    def refuse_busy_gpus(self) -> None:
        """Wait up to `busy_gpu_timeout` for compute processes on what changes to end (0: refuse
        at once)."""
        deadline = time.monotonic() + self.settings.busy_gpu_timeout
        while (why := self._busy(self.plan.changed)) is not None:
            if time.monotonic() >= deadline:
                raise BusyGpuError(f"{why}; it was not touched")
            time.sleep(BUSY_POLL_SECONDS)

    def apply(self) -> Outcome:
        """The plan, GPU by GPU (each rolled back by itself if it fails), then read back whole."""
        changed = self.plan.changed
        self.parts.slot.check()
        self.progress.gpus_touched = True  # recorded with the step: every exit refreshes CDI then
        self._step(
            Phase.APPLYING,
            "Applying",
            f"applying {len(self.plan.operations)} NVML operations on GPU {_indexes(changed)}",
        )

        def done(op: Operation, _i: int) -> None:
            self.progress.step += 1  # in the record at its next write, not a write per operation
            self.parts.metrics.nvml_operations.labels(op=op.op).inc()

        for n, gpu_plan in enumerate(changed):
            reboot_allowed = self.settings.reboot_enabled and not self.progress.reboot_attempted
            outcome = apply_with_rollback(self.parts.gpus, gpu_plan, done, reboot_allowed=reboot_allowed)
            if outcome.ok:
                continue
            if outcome.needs_reboot:
                return self.prepare_reboot(changed, n, outcome.reason)
            return Outcome(keys.STATE_FAILED, f"{self.name} not applied: {outcome.reason}")
        final = self.parts.gpus.geometries()
        wrong = [g.index for g in self.plan.gpus if final.get(g.index) != g.desired]
        if wrong:
            return Outcome(
                keys.STATE_FAILED,
                f"{self.name} not applied: GPU {', '.join(map(str, wrong))} read back a different layout than planned",
            )
        return Outcome(keys.STATE_SUCCESS, success_reason(self.name, self.result))

    def publish(self) -> None:
        """The GPUs hold the new layout: their device nodes and the management CDI spec, before
        the operands come back. Raises CdiError; the layout stays (PUBLISHING: KEEP_LAYOUT)."""
        if not self.parts.cdi.enabled():
            return
        self._step(
            Phase.PUBLISHING,
            "PublishingDevices",
            "creating the MIG device nodes and the management CDI spec",
        )
        self._published = True
        self.parts.cdi.refresh()

    def prepare_reboot(self, changed: Sequence[GpuPlan], n: int, why: str) -> Outcome:
        """Before the one host reboot: it ends every process on every GPU of the node, so every
        pod on any GPU is evicted first (PodDisruptionBudgets respected), or there is no reboot.
        Then the pending MIG mode is set on every other GPU whose mode changes, so that the one
        reboot activates them all."""
        self.parts.slot.check()
        everyone = self.parts.workloads.usage(self._device_places()).pods()
        if everyone:
            pods = ", ".join(map(str, everyone))
            self._step(Phase.EVICTING, "Evicting", f"a host reboot ends every GPU pod: evicting {pods}")
            try:
                self.parts.metrics.evictions.inc(len(self.parts.evictor.evict(everyone)))
            except EvictionError as exc:
                raise RebootRefusedError(
                    f"the host was not rebooted: a reboot ends every GPU pod, and {exc}"
                ) from exc
        busy = self._busy()
        if busy is not None:
            raise RebootRefusedError(f"the host was not rebooted: {busy}, which a reboot would end")
        self.progress.reboot_attempted = True
        self.progress.boot_id = self.parts.boot_id()
        self._set_pending_modes(changed[n + 1 :])
        reason = f"{why}: rebooting the host (once for {self.name})"
        self.progress.phase = Phase.REBOOTING
        self.parts.node.apply(
            NodeEdit(
                state=keys.STATE_REBOOTING, reason=reason, annotations=record(self.parts.store, self.progress)
            )
        )
        return Outcome(keys.STATE_REBOOTING, reason)

    def roll_back(self) -> str:
        """Every GPU that differs from before the change, back (see `restore`)."""
        return restore(self.parts.gpus, self.progress.before)

    def finish(self, outcome: Outcome, started: float) -> Outcome:
        """Every exit: operands back, hold lifted (unless a newer change is waiting), record gone,
        GPUs published, state reported: one Node write (and the condition, an Event)."""
        layout = self.name if outcome.state == keys.STATE_SUCCESS else "their previous layout"
        problems = close_out(self.parts, self.progress, layout, cdi_done=self._published)
        if problems:
            outcome = replace(outcome, state=keys.STATE_FAILED, reason=join(outcome.reason, *problems))
        gpus = self.parts.report.patch()
        newer: list[str] = []

        def end(node: NodeView) -> NodeEdit:
            desired_now = node.labels.get(keys.LABEL_MIG_CONFIG, "")
            annotations = {**record(self.parts.store, None), **gpus}
            newer[:] = [desired_now] if desired_now != self.name else []
            if newer:
                # Not pending for long: the label change queued a wake that applies the new value now.
                return NodeEdit(
                    state=keys.STATE_PENDING,
                    reason=f"{outcome.reason}; {keys.LABEL_MIG_CONFIG} changed to {desired_now or '(none)'} meanwhile: applying that next",
                    annotations=annotations,
                    restore=self.progress.operands,
                )
            return NodeEdit(
                state=outcome.state,
                reason=outcome.reason,
                annotations=annotations,
                restore=self.progress.operands,
                lift_hold=True,
            )

        self.parts.node.apply(end)
        if not self.parts.store.on_node:
            self.parts.store.clear()
        self.parts.report.written()
        if not newer:  # the node is released: so is its slot (kept for the newer layout)
            verdict = outcome.state == keys.STATE_FAILED and outcome.api_failure is None
            self.parts.slot.release(
                failed=outcome.reason if verdict else None,
                succeeded=outcome.state == keys.STATE_SUCCESS,
                config=self.name,
            )
        self.parts.metrics.outcomes.labels(outcome=outcome.state).inc()
        self.parts.metrics.reconcile_seconds.observe(time.monotonic() - started)
        return replace(outcome, newer=bool(newer))

    def reboot(self, started: float) -> Outcome:
        """The host, once; if that fails, never stay in "rebooting" with the operands paused."""
        try:
            self.parts.slot.keep_through_reboot()
            self.parts.reboot()
        except Exception as exc:
            log.exception("reboot failed")
            back = self.roll_back()
            reason = join(f"{self.name} not applied: the host reboot failed: {exc}", back)
            return self.finish(Outcome(keys.STATE_FAILED, reason), started)
        return Outcome(keys.STATE_REBOOTING, "")

    # --- helpers --------------------------------------------------------------------------------------

    def _step(self, phase: Phase, event_reason: str, what: str) -> None:
        """A step of a change: progress recorded and the step in the reason, one Node write (the
        condition keeps the change's message; the step is in the Event)."""
        self.progress.phase = phase
        self.parts.node.apply(
            NodeEdit(
                state=keys.STATE_PENDING,
                reason=f"{self.progress.config}: {what}",
                annotations=record(self.parts.store, self.progress),
                condition=False,
                event_reason=event_reason,
            )
        )

    def _device_places(self) -> dict[int, dict[str, DevicePlace]]:
        return {i: self.parts.gpus.device_places(i) for i in range(self.parts.gpus.gpu_count())}

    def _busy(self, gpus: Sequence[GpuPlan] | None = None) -> str | None:
        """Why a GPU about to change cannot be touched yet (compute processes on what changes);
        with `gpus` None, any compute process on any GPU (what a host reboot would end)."""
        indexes = (
            [(g.index, g) for g in gpus if g.disturbs_workloads]
            if gpus is not None
            else [(i, None) for i in range(self.parts.gpus.gpu_count())]
        )
        for index, gpu in indexes:
            for gi_start, pids in self.parts.gpus.processes(index).items():
                if not pids:
                    continue
                if gpu is None or gpu.mode_changes or gi_start is None or gi_start in gpu.affected_gi_starts:
                    where = "the GPU" if gi_start is None else f"the GPU instance at {gi_start}"
                    return (
                        f"GPU {index} still runs compute processes on {where} "
                        f"(pids {', '.join(map(str, sorted(pids)))})"
                    )
        return None

    def _set_pending_modes(self, gpu_plans: Sequence[GpuPlan]) -> None:
        """Set the pending MIG mode on every GPU whose mode changes (the steps up to its reset)."""
        for gpu_plan in gpu_plans:
            if not gpu_plan.mode_changes:
                continue
            ops = gpu_plan.operations
            upto = next((k for k, op in enumerate(ops) if op.op == "reset-gpu"), len(ops))
            try:
                self.parts.gpus.apply(replace(gpu_plan, operations=ops[:upto]))
            except GpuError as exc:
                if not exc.needs_reboot:  # the check after the reboot reports what did not change
                    log.warning("GPU %d: could not set the pending MIG mode: %s", gpu_plan.index, exc)
