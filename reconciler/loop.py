"""The node reconciler: a level-triggered loop that makes the GPUs match `nvidia.com/mig.config`.

It acts whenever the desired layout differs from what NVML reports (at start, after a reboot or
driver reload, on a label or config change, on the periodic resync), not only on label edits.
A MIG mode pending on a GPU (set but not yet activated by a reset or reboot) is part of what
NVML reports, so a pending mode the config does not want is a change too.

A change: hold the node, pause the GPU operands and record progress (one Node write); find the
pods on GPUs that change and evict them; refuse GPUs that still have processes; apply the plan
GPU by GPU, each verified by reading it back. When a mode change needs a host reboot (and that is
enabled), every pod on every GPU of the node is evicted first (the reboot ends them all;
PodDisruptionBudgets are respected, else no reboot), then the host reboots once and the change
resumes after it, restoring GPUs the config does not cover. Then operands back, hold lifted,
state reported (one Node write). A change writes the Node a handful of times, not once per step.

The invariant: after any change ends, every GPU holds either its layout from before the change or
the new one, with no MIG mode left pending, and the reason says which. On every exit of a change
that failed, every GPU that differs from before is rolled back (all of them are tried; a GPU that
cannot be restored is named in the reason with what it holds now); operands are restored and the
hold lifted (or, when a newer label is waiting, kept and recorded). Progress is persisted so an
agent killed at any point resumes (or rolls back) when it comes back. The Kubernetes API failing
is never a reason to roll back or to exit: each request is retried with backoff
(`reconciler.api_retry`), and a reconcile that still failed is retried with backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client import ApiException

from migcore import keys
from migcore.catalog import Catalog, load_catalog
from migcore.check import CheckResult, check_config, hardware_from_report
from migcore.config import ConfigError, MigPartedConfig
from migcore.geometry import GpuGeometry
from migcore.hardware import NodeGpus
from migcore.hold import HoldMode
from migcore.planning import GpuPlan, NodePlan, Operation, desired_geometries, plan_node, pods_to_move
from reconciler.api_retry import API_ERRORS, RetryPolicy, retrying
from reconciler.config_source import ConfigSource
from reconciler.discovery import catalog_disagreements, report_changed
from reconciler.eviction import EvictionError, Evictor
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.gpu_apply import apply_with_rollback, clear_pending_mode, roll_back
from reconciler.metrics import Metrics
from reconciler.node_state import NodeEdit, NodeState
from reconciler.operands import Operands, OperandTimeoutError, to_pause
from reconciler.operands import describe as describe_operands
from reconciler.ownership import claim_report
from reconciler.progress import NodeProgressStore, Progress, ProgressStore
from reconciler.workloads import DEFAULT_GPU_RESOURCES, DEFAULT_SOCKET, WorkloadFinder

log = logging.getLogger(__name__)

HOST_REBOOT = ("chroot", "/host", "systemctl", "reboot")
REBOOT_GRACE_SECONDS = 600.0
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


def api_error(exc: BaseException) -> str:
    """`Kubernetes API 403 Forbidden: <the server's message>`: short enough for a reason."""
    if not isinstance(exc, ApiException):
        return f"Kubernetes API unreachable: {exc}"
    message = ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message", "") if isinstance(body, dict) else ""
    except (TypeError, ValueError):
        pass
    return f"Kubernetes API {exc.status} {exc.reason}" + (f": {message}" if message else "")


def _indexes(gpus: Sequence[GpuPlan]) -> str:
    return ", ".join(str(g.index) for g in gpus)


def _fingerprint(geometries: Mapping[int, GpuGeometry]) -> str:
    return json.dumps({str(i): g.to_json() for i, g in sorted(geometries.items())}, sort_keys=True)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _already_reported(
    state: str,
    reason: str,
    progress: Progress | None,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
) -> bool:
    """The node already says `state` for `reason`, holds nothing and no change is in flight."""
    return (
        progress is None
        and labels.get(keys.LABEL_MIG_STATE) == state
        and annotations.get(keys.ANNOTATION_REASON) == reason
        and keys.ANNOTATION_HOLD not in annotations
    )


def _not_activated(gpu: GpuPlan) -> str:
    """Why a mode change that the reboot should have activated is not: it says "pending"."""
    want = "enabled" if gpu.desired.mig_enabled else "disabled"
    still = "still pending" if gpu.current.mig_pending == gpu.desired.mig_enabled else "no longer pending"
    return f"GPU {gpu.index}: the reboot did not activate MIG {want} (the mode change is {still}; the GPU holds {gpu.current.summary()})"


class BusyGpuError(Exception):
    """A GPU that is about to change still runs compute processes; it is not touched."""


class RebootRefusedError(Exception):
    """A host reboot would end work that cannot be moved first; the change is rolled back."""


@dataclass
class Settings:
    node_name: str
    hold_mode: HoldMode = HoldMode.TAINT
    operands_namespace: str = "gpu-operator"
    operand_timeout: float = 300.0
    eviction_timeout: float = 300.0
    resync_seconds: float = 300.0
    reboot_enabled: bool = False
    busy_gpu_timeout: float = 0.0
    podresources_socket: str = DEFAULT_SOCKET
    # Extended-resource names (shell patterns) that mean a GPU, beyond the NVIDIA device plugin's.
    gpu_resources: tuple[str, ...] = ()
    # How long one Kubernetes API request is retried on a transient error, and may take.
    api_retry_seconds: float = 60.0
    api_timeout_seconds: float = 60.0


def reboot_host() -> None:
    """Reboot the node through the host's systemd (the DaemonSet mounts the host root at /host),
    then wait to be stopped: reconciling again before the host goes down would judge the mode
    change as failed. If the host is still up after the grace period, the restart path decides."""
    subprocess.run(HOST_REBOOT, check=True)
    time.sleep(REBOOT_GRACE_SECONDS)


class Reconciler:
    def __init__(
        self,
        api: Any,
        access: GpuAccess,
        source: ConfigSource,
        settings: Settings,
        *,
        store: ProgressStore | None = None,
        metrics: Metrics | None = None,
        reboot: Callable[[], None] | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        policy = RetryPolicy(budget=settings.api_retry_seconds, read_timeout=settings.api_timeout_seconds)
        self.api = retrying(api, policy)
        self.access = access
        self.source = source
        self.settings = settings
        self.node = NodeState(self.api, settings.node_name)
        self.store: ProgressStore = store or NodeProgressStore(self.node)
        self.metrics = metrics or Metrics()
        self.operands = Operands(self.node, settings.operands_namespace)
        patterns = (*DEFAULT_GPU_RESOURCES, *settings.gpu_resources)
        self.finder = WorkloadFinder(
            self.api, settings.node_name, settings.podresources_socket, patterns=patterns
        )
        self.evictor = Evictor(self.api, settings.eviction_timeout)
        self.catalog = catalog or load_catalog()
        self.reboot = reboot or self._default_reboot()
        self._wakes: queue.Queue[str] = queue.Queue()
        self._published: str | None = None
        self._observed: str | None = None  # the GPUs as last seen (their catalog check done)
        # The change that failed last: (config, config digest, GPUs before). It is retried on a
        # resync or a restart, not on every wake (a config edit changes the digest, so it counts).
        self._failed: tuple[str, str, str] | None = None

    def _default_reboot(self) -> Callable[[], None]:
        simulated = getattr(self.access.nvml, "simReboot", None)
        if simulated is None:
            return reboot_host

        def simulated_reboot() -> None:
            # What a reboot does to the GPUs; this process lives on and resumes like a restart.
            simulated()
            self.wake("start")

        return simulated_reboot

    # --- the loop ---------------------------------------------------------------------------------

    def wake(self, why: str) -> None:
        self._wakes.put(why)

    def healthy(self) -> bool:
        return self.metrics.seconds_since_heartbeat() < max(60.0, 3 * self.settings.resync_seconds)

    def run(self, stop: threading.Event) -> None:
        """Reconcile until `stop` is set (one reconcile at a time; wakes arriving meanwhile coalesce).

        A reconcile that fails (the API server away, even at start) is retried after 1 s, 2 s, ...
        at most a minute apart, until one succeeds; the agent never exits for it.
        """
        self.access.start()
        try:
            for target, name in ((self._watch_node, "watch-node"), (self._watch_config, "watch-config")):
                threading.Thread(target=target, args=(stop,), name=name, daemon=True).start()
            self.wake("start")
            next_resync = time.monotonic() + self.settings.resync_seconds
            retry_at: float | None = None
            backoff = RETRY_FIRST_SECONDS
            while not stop.is_set():
                self.metrics.heartbeat()
                now = time.monotonic()
                due = min(next_resync, retry_at if retry_at is not None else next_resync)
                try:
                    why = self._wakes.get(timeout=max(0.0, min(1.0, due - now)))
                except queue.Empty:
                    now = time.monotonic()
                    if retry_at is not None and now >= retry_at:
                        why = "retry"
                    elif now >= next_resync:
                        why = "resync"
                    else:
                        continue
                whys = {why}
                while not self._wakes.empty():
                    whys.add(self._wakes.get_nowait())
                if "resync" in whys or "start" in whys:
                    next_resync = time.monotonic() + self.settings.resync_seconds
                if self.reconcile_safely(",".join(sorted(whys))):
                    retry_at, backoff = None, RETRY_FIRST_SECONDS
                else:
                    retry_at = time.monotonic() + backoff
                    log.info("retrying in %.0fs", backoff)
                    backoff = min(backoff * 2, RETRY_MAX_SECONDS)
        finally:
            self.access.stop()

    def reconcile_safely(self, why: str) -> bool:
        """One reconcile; False when it failed (logged) and should be retried soon."""
        try:
            self.reconcile(why)
        except Exception:
            # The API server or NVML being away is no reason to die; the loop retries with backoff.
            log.exception("reconcile (%s) failed", why)
            return False
        return True

    def _watch_node(self, stop: threading.Event) -> None:
        """Wake on every change of the desired-config label (only this Node: field selector)."""
        core: Any = k8s.CoreV1Api(self.api)
        last: object = object()
        while not stop.is_set():
            w: Any = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in w.stream(
                    core.list_node,
                    field_selector=f"metadata.name={self.settings.node_name}",
                    timeout_seconds=30,
                ):
                    if stop.is_set():
                        w.stop()
                        break
                    value = (event["object"].metadata.labels or {}).get(keys.LABEL_MIG_CONFIG)
                    if value != last:
                        last = value
                        failed = self._failed  # once: the reconcile thread may reset it meanwhile
                        if failed is not None and failed[0] != value:
                            self._failed = None
                        self.wake("label")
            except Exception as exc:
                log.warning("node watch failed (%s); retrying", exc)
                stop.wait(1.0)

    def _watch_config(self, stop: threading.Event) -> None:
        self.source.watch(self.wake, stop)

    # --- one reconcile ----------------------------------------------------------------------------

    def _hardware(self, report: NodeGpus | None = None) -> tuple[NodeGpus, str | None]:
        """The GPUs now, and their annotation text when it differs from what the node says."""
        report = report or self.access.discover()
        body = replace(report, reported_at=None).to_annotation()
        # A new agent compares with what the node carries (one read), then with what it wrote.
        if self._published is None and not report_changed(
            self.node.annotations().get(keys.ANNOTATION_GPUS), report
        ):
            self._published = body
        if body != self._observed:  # GPUs seen anew: where their driver and the catalog disagree
            self._observed = body
            self._observe_disagreements(report)
        self.metrics.observe_geometry({g.index: g.geometry for g in report.gpus if g.geometry is not None})
        return report, (None if body == self._published else report.to_annotation())

    def _observe_disagreements(self, report: NodeGpus) -> None:
        found = catalog_disagreements(report, self.catalog)
        self.metrics.observe_disagreements(found)
        for product, differences in dict(found.values()).items():
            if differences:
                log.warning(
                    "the driver's MIG table disagrees with the catalog's %s (verdicts use the driver's): %s",
                    product,
                    "; ".join(differences),
                )

    def _gpus_patch(self) -> tuple[dict[str, str | None], str | None]:
        """The GPUs annotation for a Node write (empty when unchanged or unreadable) and what it
        publishes (for `_published`, once written)."""
        try:
            report, text = self._hardware()
        except GpuError as exc:
            log.warning("could not read the GPUs to publish them: %s", exc)
            return {}, None
        if text is None:
            return {}, None
        return {keys.ANNOTATION_GPUS: text}, replace(report, reported_at=None).to_annotation()

    def publish_hardware(self, report: NodeGpus | None = None) -> NodeGpus:
        """Publish the GPUs in `mig-guard.io/gpus` when they differ from what was published."""
        report, text = self._hardware(report)
        if text is not None:
            self.node.apply(NodeEdit(annotations={keys.ANNOTATION_GPUS: text}))
            self._published = replace(report, reported_at=None).to_annotation()
        return report

    def reconcile(self, why: str) -> None:
        progress = self.store.load()
        # The GPUs first: the webhook judges the first label with them. While a change is in
        # flight they go with the change's last Node write instead (one write less).
        report = self.publish_hardware() if progress is None else self._hardware()[0]
        node = self.node.read()
        labels = dict(node.metadata.labels or {})
        annotations = dict(node.metadata.annotations or {})
        name = labels.get(keys.LABEL_MIG_CONFIG, "")
        log.debug("reconcile (%s): desired %r, progress %s", why, name, progress and progress.phase)
        if (
            progress is None
            and {"start", "resync"} & set(why.split(","))
            and claim_report(self.node, node, name)
        ):
            labels.pop(keys.LABEL_MIG_STATE, None)  # removed: what follows reports what is true
            annotations.pop(keys.ANNOTATION_REASON, None)
        if not name:
            self._no_desired_config(progress, labels, annotations)
            return
        try:
            config = self.source.load()
        except ConfigError as exc:
            self._reject(
                name,
                f"cannot use the mig-parted config ({self.source.describe()}): {'; '.join(exc.errors)}",
                progress,
                labels,
                annotations,
            )
            return
        result = check_config(config, name, hardware_from_report(self.catalog, report))
        if not result.valid:
            self._reject(
                name,
                f"config {name} cannot be applied on this node: {'; '.join(result.errors)}",
                progress,
                labels,
                annotations,
            )
            return
        current = self.access.geometries()
        plan = plan_node(current, self._desired(result, current, progress))
        if not plan.changed:
            self._failed = None
            self._settle(name, result, progress, labels, annotations)
            return
        attempt = (name, config.digest, _fingerprint(current))
        # An edited config or another label value is another attempt (its key differs); the same
        # attempt again only on a resync or a restart.
        retry = {"resync", "start"} & set(why.split(","))
        if progress is None and self._failed == attempt and not retry:
            log.debug("%s failed on these GPUs already; waiting for a resync or a change", name)
            return
        self._change(
            name, attempt=attempt, config=config, result=result, plan=plan, current=current, progress=progress
        )

    def _desired(
        self, result: CheckResult, current: Mapping[int, GpuGeometry], progress: Progress | None
    ) -> dict[int, GpuGeometry]:
        """The config's layouts; while a change is in flight, a GPU no entry covers is due its
        layout from before the change (a host reboot for the change emptied it)."""
        desired = desired_geometries(result, current)
        if progress is not None:
            for verdict in result.gpus:
                if verdict.entry is None or verdict.mig_enabled is None:
                    before = progress.before.get(verdict.index)
                    if before is not None and verdict.index in desired:
                        desired[verdict.index] = before
        return desired

    def _success_reason(self, name: str, result: CheckResult) -> str:
        return f"{name} applied: {result.summary()}"

    # --- Node writes ------------------------------------------------------------------------------

    def _record(self, progress: Progress | None) -> dict[str, str | None]:
        """Annotations that record `progress` (None: no change in flight) in the Node write they
        join; a record kept on the host is written now instead (before that Node write)."""
        if self.store.on_node:
            return {keys.ANNOTATION_PROGRESS: progress.dumps() if progress is not None else None}
        if progress is not None:
            self.store.save(progress)
        return {}

    def _release(
        self,
        progress: Progress | None,
        state: str,
        reason: str,
        extra: Mapping[str, str | None] | None = None,
        condition_reason: str | None = None,
    ) -> None:
        """The end of anything that held the node: operands back, hold lifted, record gone, GPUs
        published, the state reported: one Node write (and the condition, an Event)."""
        gpus, published = self._gpus_patch()
        self.node.apply(
            NodeEdit(
                state=state,
                reason=reason,
                annotations={**self._record(None), **gpus, **(extra or {})},
                restore=progress.operands if progress is not None else {},
                lift_hold=True,
                condition_reason=condition_reason,
            )
        )
        if not self.store.on_node:
            self.store.clear()
        if published is not None:
            self._published = published

    def _step(self, progress: Progress, phase: str, event_reason: str, what: str) -> None:
        """A step of a change: progress recorded and the step in the reason, one Node write (the
        condition keeps the change's message; the step is in the Event)."""
        progress.phase = phase
        self.node.apply(
            NodeEdit(
                state=keys.STATE_PENDING,
                reason=f"{progress.config}: {what}",
                annotations=self._record(progress),
                condition=False,
                event_reason=event_reason,
            )
        )

    # --- outcomes without a change ----------------------------------------------------------------

    def _settle(
        self,
        name: str,
        result: CheckResult,
        progress: Progress | None,
        labels: Mapping[str, str],
        annotations: Mapping[str, str],
    ) -> None:
        """The GPUs already match: make the node say so (and undo anything an interrupted run left)."""
        reason = self._success_reason(name, result)
        if _already_reported(keys.STATE_SUCCESS, reason, progress, labels, annotations):
            return
        self._release(progress, keys.STATE_SUCCESS, reason)

    def _no_desired_config(
        self, progress: Progress | None, labels: Mapping[str, str], annotations: Mapping[str, str]
    ) -> None:
        """No label: nothing to apply; an interrupted change is rolled back and the node released."""
        if progress is None and keys.ANNOTATION_HOLD not in annotations:
            if labels.get(keys.LABEL_MIG_STATE) == keys.STATE_PENDING:
                self.node.report(
                    keys.STATE_FAILED, f"the {keys.LABEL_MIG_CONFIG} label was removed; nothing to apply"
                )
            return
        back = self._rollback(progress.before) if progress is not None else ""
        self._release(
            progress, keys.STATE_FAILED, _join(f"the {keys.LABEL_MIG_CONFIG} label was removed", back)
        )

    def _reject(
        self,
        name: str,
        reason: str,
        progress: Progress | None,
        labels: Mapping[str, str],
        annotations: Mapping[str, str],
    ) -> None:
        """An unusable config: hold the node while judging it (works without the webhook), leave the
        GPUs as they are (or as they were before an interrupted change), report, release."""
        if _already_reported(keys.STATE_FAILED, reason, progress, labels, annotations):
            return
        self.node.apply(NodeEdit(take_hold=(self.settings.hold_mode, name)))
        try:
            if progress is not None:
                reason = _join(reason, self._rollback(progress.before))
        finally:
            self.metrics.outcomes.labels(outcome=keys.STATE_FAILED).inc()
            self._release(progress, keys.STATE_FAILED, reason, condition_reason="InvalidConfig")

    # --- a change ---------------------------------------------------------------------------------

    def _change(
        self,
        name: str,
        *,
        attempt: tuple[str, str, str],
        config: MigPartedConfig,
        result: CheckResult,
        plan: NodePlan,
        current: Mapping[int, GpuGeometry],
        progress: Progress | None,
    ) -> None:
        note = ""
        if progress is None:
            progress = Progress(config=name, config_digest=config.digest, before=dict(current))
        elif progress.config != name:
            # The label changed while a change was interrupted or rebooting: this is a new change
            # (its own reboot allowed), rolling back to the same GPUs as before the first one.
            note = f"{keys.LABEL_MIG_CONFIG} changed from {progress.config} while that change was {progress.phase}"
            progress = Progress(
                config=name, config_digest=config.digest, before=progress.before, operands=progress.operands
            )
        else:  # an interrupted change: keep what it recorded (the original GPUs, the operand values)
            progress.config_digest = config.digest
        started = time.monotonic()
        outcome, reason = keys.STATE_FAILED, ""
        api_failure: BaseException | None = None
        try:
            if progress.phase == "rebooting":
                stuck = [g for g in plan.changed if g.mode_changes]
                if stuck:
                    raise GpuError("; ".join(_not_activated(g) for g in stuck))
            self._begin(name, plan, progress, note)
            device_ids = {i: self.access.device_ids(i) for i in range(self.access.gpu_count())}
            placements, source = self.finder.placements(device_ids)
            movers = pods_to_move(plan, placements)
            self.node.event(
                "Normal",
                "Plan",
                f"{plan.describe()}; pods to move ({source}): {', '.join(map(str, movers)) or 'none'}",
            )
            if progress.operands:
                paused = describe_operands(progress.operands)
                self.node.event(
                    "Normal", "PausingOperands", f"{name}: waiting for GPU operands to go ({paused})"
                )
            self.operands.wait_gone(progress.operands, self.settings.operand_timeout)
            if movers:
                self._step(
                    progress,
                    "evicting",
                    "Evicting",
                    f"evicting {len(movers)} pods: {', '.join(map(str, movers))}",
                )
            evicted = self.evictor.evict(movers)
            self.metrics.evictions.inc(len(evicted))
            self._refuse_busy_gpus(plan)
            self._step(
                progress,
                "applying",
                "Applying",
                f"applying {len(plan.operations)} NVML operations on GPU {_indexes(plan.changed)}",
            )
            outcome, reason = self._apply(name, result, plan, progress)
        except (OperandTimeoutError, EvictionError, BusyGpuError, GpuError, RebootRefusedError) as exc:
            reason = f"{name} not applied: {exc}"
        except API_ERRORS as exc:
            log.warning("change to %s failed: %s", name, exc)
            reason = f"{name} not applied: {api_error(exc)}"
            api_failure = exc
        except Exception as exc:
            log.exception("change to %s failed", name)
            reason = f"{name} not applied: unexpected error: {exc}"
        finally:
            if outcome == keys.STATE_FAILED:
                reason = _join(reason, self._rollback(progress.before))
            if outcome == keys.STATE_REBOOTING:
                self.metrics.outcomes.labels(outcome=outcome).inc()
            else:
                # An API failure is no verdict on the config: the loop retries it soon (below).
                failed = outcome == keys.STATE_FAILED and api_failure is None
                self._failed = attempt if failed else None
                self._finish(name, progress=progress, outcome=outcome, reason=reason, started=started)
        if api_failure is not None:
            raise api_failure
        if outcome == keys.STATE_REBOOTING:
            try:
                self.reboot()
            except Exception as exc:  # never stay in "rebooting" with the operands paused
                log.exception("reboot failed")
                back = self._rollback(progress.before)
                self._failed = attempt
                self._finish(
                    name,
                    progress=progress,
                    outcome=keys.STATE_FAILED,
                    reason=_join(f"{name} not applied: the host reboot failed: {exc}", back),
                    started=started,
                )

    def _begin(self, name: str, plan: NodePlan, progress: Progress, note: str) -> None:
        """Pending, held, operands paused, progress recorded: one Node write (and the condition)."""

        def begin(node: Any) -> NodeEdit:
            if not progress.operands:
                progress.operands = to_pause(dict(node.metadata.labels or {}))
            progress.phase = "pausing"
            what = f"applying {name}: {plan.describe()}"
            if progress.operands:
                what += f"; pausing GPU operands ({describe_operands(progress.operands)})"
            return NodeEdit(
                state=keys.STATE_PENDING,
                reason=_join(what, note),
                labels=dict.fromkeys(progress.operands, keys.PAUSED_FOR_MIG_CHANGE),
                annotations=self._record(progress),
                take_hold=(self.settings.hold_mode, name),
                event_reason="Reconfiguring",
            )

        self.node.apply(begin)

    def _busy(self, gpus: Sequence[GpuPlan] | None = None) -> str | None:
        """Why a GPU about to change cannot be touched yet (compute processes on what changes);
        with `gpus` None, any compute process on any GPU (what a host reboot would end)."""
        indexes = (
            [(g.index, g) for g in gpus if g.disturbs_workloads]
            if gpus is not None
            else [(i, None) for i in range(self.access.gpu_count())]
        )
        for index, gpu in indexes:
            for gi_start, pids in self.access.processes(index).items():
                if not pids:
                    continue
                if gpu is None or gpu.mode_changes or gi_start is None or gi_start in gpu.affected_gi_starts:
                    where = "the GPU" if gi_start is None else f"the GPU instance at {gi_start}"
                    return (
                        f"GPU {index} still runs compute processes on {where} "
                        f"(pids {', '.join(map(str, sorted(pids)))})"
                    )
        return None

    def _refuse_busy_gpus(self, plan: NodePlan) -> None:
        """Wait up to `busy_gpu_timeout` for those processes to end (0: refuse at once)."""
        deadline = time.monotonic() + self.settings.busy_gpu_timeout
        while (why := self._busy(plan.changed)) is not None:
            if time.monotonic() >= deadline:
                raise BusyGpuError(f"{why}; it was not touched")
            time.sleep(1.0)

    def _apply(self, name: str, result: CheckResult, plan: NodePlan, progress: Progress) -> tuple[str, str]:
        def step(op: Operation, _i: int) -> None:
            progress.step += 1  # in the record at its next write, not a write per operation
            self.metrics.nvml_operations.labels(op=op.op).inc()

        changed = plan.changed
        for n, gpu_plan in enumerate(changed):
            reboot_allowed = self.settings.reboot_enabled and not progress.reboot_attempted
            outcome = apply_with_rollback(self.access, gpu_plan, step, reboot_allowed=reboot_allowed)
            if outcome.ok:
                continue
            if outcome.needs_reboot:
                return self._prepare_reboot(name, changed, n, progress)
            return keys.STATE_FAILED, f"{name} not applied: {outcome.reason}"
        final = self.access.geometries()
        wrong = [g.index for g in plan.gpus if final.get(g.index) != g.desired]
        if wrong:
            return keys.STATE_FAILED, (
                f"{name} not applied: GPU {', '.join(map(str, wrong))} read back a different layout than planned"
            )
        return keys.STATE_SUCCESS, self._success_reason(name, result)

    def _prepare_reboot(
        self, name: str, changed: Sequence[GpuPlan], n: int, progress: Progress
    ) -> tuple[str, str]:
        """Before the one host reboot: it ends every process on every GPU of the node, so every
        pod on any GPU is evicted first (PodDisruptionBudgets respected), or there is no reboot.
        Then the pending MIG mode is set on every other GPU whose mode changes, so that the one
        reboot activates them all."""
        device_ids = {i: self.access.device_ids(i) for i in range(self.access.gpu_count())}
        placements, _ = self.finder.placements(device_ids)
        everyone = sorted(placements)
        if everyone:
            pods = ", ".join(map(str, everyone))
            self._step(progress, "evicting", "Evicting", f"a host reboot ends every GPU pod: evicting {pods}")
            try:
                self.metrics.evictions.inc(len(self.evictor.evict(everyone)))
            except EvictionError as exc:
                raise RebootRefusedError(
                    f"the host was not rebooted: a reboot ends every GPU pod, and {exc}"
                ) from exc
        busy = self._busy()
        if busy is not None:
            raise RebootRefusedError(f"the host was not rebooted: {busy}, which a reboot would end")
        progress.reboot_attempted = True
        self._set_pending_modes(changed[n + 1 :])
        reason = f"GPU {changed[n].index} needs a host reboot to change MIG mode for {name}: rebooting"
        progress.phase = "rebooting"
        self.node.apply(
            NodeEdit(state=keys.STATE_REBOOTING, reason=reason, annotations=self._record(progress))
        )
        return keys.STATE_REBOOTING, reason

    def _set_pending_modes(self, gpu_plans: Sequence[GpuPlan]) -> None:
        """Set the pending MIG mode on every GPU whose mode changes (the steps up to its reset)."""
        for gpu_plan in gpu_plans:
            if not gpu_plan.mode_changes:
                continue
            ops = gpu_plan.operations
            upto = next((k for k, op in enumerate(ops) if op.op == "reset-gpu"), len(ops))
            try:
                self.access.apply(replace(gpu_plan, operations=ops[:upto]))
            except GpuError as exc:
                if not exc.needs_reboot:  # the check after the reboot reports what did not change
                    log.warning("GPU %d: could not set the pending MIG mode: %s", gpu_plan.index, exc)

    def _rollback(self, before: Mapping[int, GpuGeometry]) -> str:
        """Put every GPU that differs from `before` back, trying every one of them; says how that
        went, naming each GPU that could not be restored and what it holds now."""
        restored: list[int] = []
        failed: list[str] = []
        for index, target in sorted(before.items()):
            try:
                now = self.access.geometry(index)
                if now in (target, target.settled()):
                    continue
                final = roll_back(self.access, index, target)
                if final in (target, target.settled()):
                    restored.append(index)
                    continue
                problem = f"it read back {final.summary()}"
            except GpuError as exc:
                problem = str(exc)
            # Whatever else it holds, no MIG mode left pending for the next reboot to activate.
            with contextlib.suppress(GpuError):
                clear_pending_mode(self.access, index)
            try:
                holds = self.access.geometry(index).summary()
            except GpuError as exc:
                holds = f"unreadable ({exc})"
            failed.append(f"GPU {index} was not restored, it holds: {holds} (rollback: {problem})")
        parts = (
            [f"GPU {', '.join(map(str, restored))} rolled back to the previous layout"] if restored else []
        )
        return _join(*parts, *failed)

    def _finish(self, name: str, *, progress: Progress, outcome: str, reason: str, started: float) -> None:
        """Every exit path: operands back, hold lifted (unless a newer change is waiting), progress
        gone, GPUs published, state reported: one Node write (and the condition, an Event)."""
        gpus, published = self._gpus_patch()
        newer: list[str] = []

        def end(node: Any) -> NodeEdit:
            desired_now = (node.metadata.labels or {}).get(keys.LABEL_MIG_CONFIG, "")
            annotations = {**self._record(None), **gpus}
            newer[:] = [desired_now] if desired_now != name else []
            if newer:
                # Not pending for long: the label change queued a wake that applies the new value now.
                return NodeEdit(
                    state=keys.STATE_PENDING,
                    reason=f"{reason}; {keys.LABEL_MIG_CONFIG} changed to {desired_now or '(none)'} meanwhile: applying that next",
                    annotations=annotations,
                    restore=progress.operands,
                )
            return NodeEdit(
                state=outcome,
                reason=reason,
                annotations=annotations,
                restore=progress.operands,
                lift_hold=True,
            )

        self.node.apply(end)
        if not self.store.on_node:
            self.store.clear()
        if published is not None:
            self._published = published
        self.metrics.outcomes.labels(outcome=outcome).inc()
        self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        if newer:
            self.wake("label")
