"""The node reconciler: a level-triggered loop that makes the GPUs match `nvidia.com/mig.config`.

It acts whenever the desired layout differs from what NVML reports (at start, after a reboot or
driver reload, on a label or config change, on the periodic resync), not only on label edits.
A change runs the steps of issue 5 §4: pending + hold, find the pods on GPUs that change, pause
the GPU operands, evict those pods, refuse GPUs that still have processes, apply the plan
(rolling back on any error or mismatch; reboot once if a mode change needs it and that is
enabled), then restore the operands, lift the hold and report. Every exit path restores the
operands and leaves a reason; progress is persisted before each step so a reconciler killed at
any point resumes (or rolls back) when it comes back.
"""

from __future__ import annotations

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
from migcore.planning import GpuPlan, NodePlan, Operation, desired_geometries, plan_node, pods_to_move
from reconciler.config_source import ConfigSource
from reconciler.discovery import catalog_disagreements
from reconciler.eviction import EvictionError, Evictor
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.gpu_apply import apply_with_rollback, roll_back
from reconciler.metrics import Metrics
from reconciler.node_state import HoldMode, NodeState
from reconciler.operands import Operands, OperandTimeoutError, to_pause
from reconciler.operands import describe as describe_operands
from reconciler.ownership import claim_report
from reconciler.progress import NodeProgressStore, Progress, ProgressStore
from reconciler.workloads import DEFAULT_SOCKET, WorkloadFinder

log = logging.getLogger(__name__)

HOST_REBOOT = ("chroot", "/host", "systemctl", "reboot")
REBOOT_GRACE_SECONDS = 600.0


def api_error(exc: ApiException) -> str:
    """`Kubernetes API 403 Forbidden: <the server's message>`: short enough for a reason."""
    message = ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message", "") if isinstance(body, dict) else ""
    except (TypeError, ValueError):
        pass
    return f"Kubernetes API {exc.status} {exc.reason}" + (f": {message}" if message else "")


def _indexes(plan: NodePlan) -> str:
    return ", ".join(str(g.index) for g in plan.changed)


def _fingerprint(geometries: Mapping[int, GpuGeometry]) -> str:
    return json.dumps({str(i): g.to_json() for i, g in sorted(geometries.items())}, sort_keys=True)


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


class BusyGpuError(Exception):
    """A GPU that is about to change still runs compute processes; it is not touched."""


@dataclass
class Settings:
    node_name: str
    hold_mode: HoldMode = "taint"
    operands_namespace: str = "gpu-operator"
    operand_timeout: float = 300.0
    eviction_timeout: float = 300.0
    resync_seconds: float = 300.0
    reboot_enabled: bool = False
    busy_gpu_timeout: float = 0.0
    podresources_socket: str = DEFAULT_SOCKET


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
        self.api = api
        self.access = access
        self.source = source
        self.settings = settings
        self.node = NodeState(api, settings.node_name)
        self.store: ProgressStore = store or NodeProgressStore(self.node)
        self.metrics = metrics or Metrics()
        self.operands = Operands(self.node, settings.operands_namespace)
        self.finder = WorkloadFinder(api, settings.node_name, settings.podresources_socket)
        self.evictor = Evictor(api, settings.eviction_timeout)
        self.catalog = catalog or load_catalog()
        self.reboot = reboot or self._default_reboot()
        self._wakes: queue.Queue[str] = queue.Queue()
        self._published: str | None = None
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
        """Reconcile until `stop` is set (one reconcile at a time; wakes arriving meanwhile coalesce)."""
        self.access.start()
        try:
            self.publish_hardware()
            for target, name in ((self._watch_node, "watch-node"), (self._watch_config, "watch-config")):
                threading.Thread(target=target, args=(stop,), name=name, daemon=True).start()
            self.wake("start")
            next_resync = time.monotonic() + self.settings.resync_seconds
            while not stop.is_set():
                self.metrics.heartbeat()
                try:
                    why = self._wakes.get(timeout=max(0.0, min(1.0, next_resync - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() < next_resync:
                        continue
                    why = "resync"
                whys = {why}
                while not self._wakes.empty():
                    whys.add(self._wakes.get_nowait())
                if "resync" in whys or "start" in whys:
                    next_resync = time.monotonic() + self.settings.resync_seconds
                self.reconcile_safely(",".join(sorted(whys)))
        finally:
            self.access.stop()

    def reconcile_safely(self, why: str) -> None:
        try:
            self.reconcile(why)
        except Exception:
            # The API server or NVML being away is no reason to die; the next wake retries.
            log.exception("reconcile (%s) failed", why)

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

    def publish_hardware(self, report: NodeGpus | None = None) -> NodeGpus:
        """Publish the GPUs in `mig-guard.io/gpus` when they differ from what was published."""
        report = report or self.access.discover()
        body = replace(report, reported_at=None).to_annotation()
        if body != self._published:
            self.node.annotate(keys.ANNOTATION_GPUS, report.to_annotation())
            self._published = body
            found = catalog_disagreements(report, self.catalog)
            self.metrics.observe_disagreements(found)
            for product, differences in dict(found.values()).items():
                if differences:
                    log.warning(
                        "the driver's MIG table disagrees with the catalog's %s (verdicts use the driver's): %s",
                        product,
                        "; ".join(differences),
                    )
        self.metrics.observe_geometry({g.index: g.geometry for g in report.gpus if g.geometry is not None})
        return report

    def reconcile(self, why: str) -> None:
        node = self.node.read()
        labels = dict(node.metadata.labels or {})
        annotations = dict(node.metadata.annotations or {})
        name = labels.get(keys.LABEL_MIG_CONFIG, "")
        progress = self.store.load()
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
        report = self.publish_hardware()
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
        desired = desired_geometries(result, current)
        plan = plan_node(current, desired)
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

    def _success_reason(self, name: str, result: CheckResult) -> str:
        return f"{name} applied: {result.summary()}"

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
        self._release(progress)
        self.node.report(keys.STATE_SUCCESS, reason)

    def _release(self, progress: Progress | None) -> None:
        """Undo what a change set up: operand labels back, the recorded hold lifted, progress gone."""
        if progress is not None:
            self.operands.restore(progress.operands)
        self.node.lift_hold()
        self.store.clear()

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
        note = ""
        if progress is not None:
            back = self._rollback(progress.before)
            note = f"; {back}" if back else ""
        self._release(progress)
        self.node.report(keys.STATE_FAILED, f"the {keys.LABEL_MIG_CONFIG} label was removed{note}")

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
        self.node.hold(self.settings.hold_mode, name)
        try:
            if progress is not None:
                reason = "; ".join(filter(None, (reason, self._rollback(progress.before))))
        finally:
            self._release(progress)
            self.metrics.outcomes.labels(outcome=keys.STATE_FAILED).inc()
            self.node.report(keys.STATE_FAILED, reason, condition_reason="InvalidConfig")

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
        if progress is None:
            progress = Progress(config=name, config_digest=config.digest, before=dict(current))
        else:  # an interrupted change: keep what it recorded (the original GPUs, the operand values)
            progress.config, progress.config_digest = name, config.digest
        started = time.monotonic()
        outcome, reason = keys.STATE_FAILED, ""
        try:
            if progress.phase == "rebooting" and any(g.mode_changes for g in plan.changed):
                raise GpuError("the MIG mode change did not take effect after rebooting")
            self._save(progress, "holding")
            self.node.report(
                keys.STATE_PENDING, f"applying {name}: {plan.describe()}", event_reason="Reconfiguring"
            )
            self.node.hold(self.settings.hold_mode, name)

            device_ids = {i: self.access.device_ids(i) for i in range(self.access.gpu_count())}
            placements, source = self.finder.placements(device_ids)
            movers = pods_to_move(plan, placements)
            self.node.event(
                "Normal",
                "Plan",
                f"{plan.describe()}; pods to move ({source}): {', '.join(map(str, movers)) or 'none'}",
            )

            if not progress.operands:
                progress.operands = to_pause(self.node.labels())
            self._save(progress, "pausing")
            if progress.operands:
                self._step(
                    name, "PausingOperands", f"pausing GPU operands ({describe_operands(progress.operands)})"
                )
            self.operands.pause(progress.operands)
            self.operands.wait_gone(progress.operands, self.settings.operand_timeout)

            self._save(progress, "evicting")
            if movers:
                self._step(name, "Evicting", f"evicting {len(movers)} pods: {', '.join(map(str, movers))}")
            evicted = self.evictor.evict(movers)
            self.metrics.evictions.inc(len(evicted))
            self._refuse_busy_gpus(plan)

            self._save(progress, "applying")
            self._step(
                name, "Applying", f"applying {len(plan.operations)} NVML operations on GPU {_indexes(plan)}"
            )
            outcome, reason = self._apply(name, result, plan, progress)
        except (OperandTimeoutError, EvictionError, BusyGpuError, GpuError) as exc:
            reason = f"{name} not applied: {exc}"
        except ApiException as exc:
            log.warning("change to %s failed: %s", name, exc)
            reason = f"{name} not applied: {api_error(exc)}"
        except Exception as exc:
            log.exception("change to %s failed", name)
            reason = f"{name} not applied: unexpected error: {exc}"
        finally:
            if outcome == keys.STATE_FAILED and progress.phase == "applying":
                reason = "; ".join(filter(None, (reason, self._rollback(progress.before))))
            if outcome == keys.STATE_REBOOTING:
                self.metrics.outcomes.labels(outcome=outcome).inc()
            else:
                self._failed = attempt if outcome == keys.STATE_FAILED else None
                self._finish(
                    name, config=config, progress=progress, outcome=outcome, reason=reason, started=started
                )
        if outcome == keys.STATE_REBOOTING:
            try:
                self.reboot()
            except Exception as exc:  # never stay in "rebooting" with the operands paused
                log.exception("reboot failed")
                back = self._rollback(progress.before)
                self._failed = attempt
                self._finish(
                    name,
                    config=config,
                    progress=progress,
                    outcome=keys.STATE_FAILED,
                    reason="; ".join(
                        filter(None, (f"{name} not applied: the host reboot failed: {exc}", back))
                    ),
                    started=started,
                )

    def _step(self, name: str, event_reason: str, what: str) -> None:
        """Make the current step visible: reason annotation, condition message, Event."""
        self.node.report(keys.STATE_PENDING, f"{name}: {what}", event_reason=event_reason)

    def _save(self, progress: Progress, phase: str) -> None:
        progress.phase = phase
        self.store.save(progress)

    def _busy(self, plan: NodePlan) -> str | None:
        """Why a GPU about to change cannot be touched yet (compute processes on what changes)."""
        for gpu in plan.changed:
            for gi_start, pids in self.access.processes(gpu.index).items():
                if pids and (gpu.mode_changes or gi_start is None or gi_start in gpu.affected_gi_starts):
                    where = "the GPU" if gi_start is None else f"the GPU instance at {gi_start}"
                    return (
                        f"GPU {gpu.index} still runs compute processes on {where} "
                        f"(pids {', '.join(map(str, sorted(pids)))}); it was not touched"
                    )
        return None

    def _refuse_busy_gpus(self, plan: NodePlan) -> None:
        """Wait up to `busy_gpu_timeout` for those processes to end (0: refuse at once)."""
        deadline = time.monotonic() + self.settings.busy_gpu_timeout
        while (why := self._busy(plan)) is not None:
            if time.monotonic() >= deadline:
                raise BusyGpuError(why)
            time.sleep(1.0)

    def _apply(self, name: str, result: CheckResult, plan: NodePlan, progress: Progress) -> tuple[str, str]:
        def step(op: Operation, _i: int) -> None:
            progress.step += 1
            self.metrics.nvml_operations.labels(op=op.op).inc()
            self.store.save(progress)

        changed = plan.changed
        for n, gpu_plan in enumerate(changed):
            reboot_allowed = self.settings.reboot_enabled and not progress.reboot_attempted
            outcome = apply_with_rollback(self.access, gpu_plan, step, reboot_allowed=reboot_allowed)
            if outcome.ok:
                continue
            if outcome.needs_reboot:
                progress.reboot_attempted = True
                self._save(progress, "rebooting")
                self._set_pending_modes(changed[n + 1 :])
                reason = f"GPU {gpu_plan.index} needs a host reboot to change MIG mode for {name}: rebooting"
                self.node.report(keys.STATE_REBOOTING, reason)
                return keys.STATE_REBOOTING, reason
            return keys.STATE_FAILED, f"{name} not applied: {outcome.reason}"
        final = self.access.geometries()
        wrong = [g.index for g in plan.gpus if final.get(g.index) != g.desired]
        if wrong:
            return keys.STATE_FAILED, (
                f"{name} not applied: GPU {', '.join(map(str, wrong))} read back a different layout than planned"
            )
        return keys.STATE_SUCCESS, self._success_reason(name, result)

    def _set_pending_modes(self, gpu_plans: Sequence[GpuPlan]) -> None:
        """Before the one reboot: set the pending MIG mode on every other GPU whose mode changes
        (the steps up to its reset), so that the reboot activates them all at once."""
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
        """Put every GPU back as it was before the change; says how that went (for the reason)."""
        restored: list[int] = []
        try:
            for index, geometry in sorted(before.items()):
                if (
                    self.access.geometry(index) != geometry
                    or self.access.mig_mode(index)[1] != geometry.mig_enabled
                ):
                    roll_back(self.access, index, geometry)
                    restored.append(index)
        except GpuError as exc:
            return f"rollback failed: {exc}"
        if not restored:
            return ""
        return f"GPU {', '.join(map(str, restored))} rolled back to the previous layout"

    def _finish(
        self,
        name: str,
        *,
        config: MigPartedConfig,
        progress: Progress,
        outcome: str,
        reason: str,
        started: float,
    ) -> None:
        """Every exit path: operands back, hold lifted (unless a newer change is waiting), report."""
        try:
            self.operands.restore(progress.operands)
        finally:
            desired_now = self.node.labels().get(keys.LABEL_MIG_CONFIG, "")
            if desired_now == name:
                self.node.lift_hold()
            self.store.clear()
            self.metrics.outcomes.labels(outcome=outcome).inc()
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
            try:
                self.publish_hardware()
            except GpuError as exc:
                log.warning("could not publish the GPUs: %s", exc)
            if desired_now != name:
                # Not pending for long: the label change queued a wake that applies the new value now.
                self.node.report(
                    keys.STATE_PENDING,
                    f"{reason}; {keys.LABEL_MIG_CONFIG} changed to {desired_now or '(none)'} meanwhile: applying that next",
                )
                self.wake("label")
            else:
                self.node.report(outcome, reason)
