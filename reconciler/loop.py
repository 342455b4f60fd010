"""The node reconciler's loop: when to act. It makes the GPUs match `nvidia.com/mig.config`,
level-triggered: whenever the desired layout differs from what NVML reports (at start, after a
reboot or driver reload, on a label or config change, on the periodic resync), not only on label
edits. A MIG mode pending on a GPU (set but not yet activated by a reset or reboot) is part of what
NVML reports, so a pending mode the config does not want is a change too.

Before its first NVML call the loop waits for the NVIDIA driver (the GPU Operator's validation
marker, `reconciler.driver`), saying so on the node, and for NVML to load.

Wakes (`Wake`) arrive from the watch threads (the Node's label, the config source), the resync
timer and the retry backoff; those arriving during a reconcile are coalesced into the next one.
A reconcile reads the node and the config, judges the layout, and then either reports what is
true, rejects an unusable config, or runs a change (`reconciler.change`: the transaction, its
steps, its rollback and resume). A change that failed on these GPUs is not tried again on every
wake, only on a fresh look (a resync, a restart) or when the label or the config changes. The
Kubernetes API failing is never a reason to exit: each request is retried with backoff
(`kube.client`), and a reconcile that still failed is retried with backoff.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from kube.client import RetryPolicy, retrying
from kube.config_source import ConfigSource
from kube.errors import API_ERRORS, describe
from kube.node import NodeView
from kube.watching import follow
from migcore import keys
from migcore.catalog import Catalog, load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import ConfigError
from migcore.geometry import GpuGeometry
from migcore.hardware import NodeGpus
from migcore.hold import HoldMode
from migcore.planning import plan_node
from migcore.strategy import STRATEGY_SINGLE, single_strategy_problem
from migcore.usage import DevicePlace
from reconciler import change
from reconciler.cdi import DEFAULT_TOOLKIT_DIR, Cdi, CdiMode
from reconciler.change import Change, Parts, Progress, ProgressStore
from reconciler.discovery import HardwarePublisher, Reports
from reconciler.driver import POLL_SECONDS, DriverInfo, load_nvml, read_driver_ready, waiting_reason
from reconciler.eviction import Evictor
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.host import DEFAULT_HOST_ROOT, HostRoot
from reconciler.host_clients import (
    DEFAULT_CLIENTS_CONFIGMAP,
    DEFAULT_KUBELET_SERVICE,
    ConfigMapClients,
    FileClients,
    HostClients,
    HostClientsMode,
)
from reconciler.metrics import Metrics
from reconciler.node_state import NodeEdit, NodeState
from reconciler.operands import AUTO_NAMESPACE, Operands
from reconciler.ownership import claim_report
from reconciler.pod_usage import DEFAULT_INTERVAL_SECONDS, UsagePublisher
from reconciler.progress import NodeProgressStore
from reconciler.rollout import UNLIMITED, Rollout, RolloutSettings, RolloutSlot
from reconciler.workloads import DEFAULT_GPU_RESOURCES, DEFAULT_SOCKET, WorkloadFinder

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
NVML_RETRY_MAX_SECONDS = 60.0
NODE_WATCH_SECONDS = 30


class Wake(enum.StrEnum):
    """Why the loop reconciles."""

    START = "start"  # the agent started (or the simulated host came back from its reboot)
    RESYNC = "resync"  # the periodic resync
    RETRY = "retry"  # the last reconcile failed (the API server or NVML away)
    LABEL = "label"  # the layout label changed
    CONFIG = "config"  # the mig-parted config changed
    PODS = "pods"  # a GPU pod came, went or changed: the usage report is refreshed (rate-bounded)
    SLOT = "slot"  # a rollout slot may have freed for this waiting node

    @property
    def fresh_look(self) -> bool:
        """A look at everything again: the resync clock restarts, a report the reconciler did not
        write is claimed, and a change that failed on these GPUs is tried again."""
        return self in (Wake.START, Wake.RESYNC)


def wakes(why: Wake | str | Collection[Wake | str]) -> frozenset[Wake]:
    """`why` as a set of wakes (a string may join several with commas: "config,label")."""
    items = why.split(",") if isinstance(why, str) else why
    return frozenset(Wake(item) for item in items)


@dataclass
class Settings:
    node_name: str
    hold_mode: HoldMode = HoldMode.TAINT
    # Where the GPU Operator's operands run; AUTO_NAMESPACE: where its DaemonSets are.
    operands_namespace: str = AUTO_NAMESPACE
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
    # At most one write of the pods' usage (mig-guard.io/usage) per this many seconds of pod churn.
    usage_interval: float = DEFAULT_INTERVAL_SECONDS
    # The rollout budget per pool (None: every change starts at once).
    rollout: RolloutSettings | None = None
    # The GPU Operator's driver validation marker, waited for before the first NVML call ("": none).
    driver_ready_file: str = ""
    # The host's root filesystem in this container, where host commands run (chroot).
    host_root: str = DEFAULT_HOST_ROOT
    # Where records that outlive this process are kept on the host ("": in memory / on the Node).
    host_state_dir: str = ""
    cdi: CdiMode = CdiMode.AUTO
    toolkit_dir: str = DEFAULT_TOOLKIT_DIR
    host_clients: HostClientsMode = HostClientsMode.AUTO
    # The host GPU clients list: a file, else this ConfigMap in the operands' namespace.
    gpu_clients_file: str = ""
    gpu_clients_configmap: str = DEFAULT_CLIENTS_CONFIGMAP
    kubelet_service: str = DEFAULT_KUBELET_SERVICE
    # Where the driver container's root is mounted ("": none): NVML is loaded from there when the
    # container runtime did not put it in the container.
    driver_root: str = ""
    # The layout given to a MIG-capable node without nvidia.com/mig.config ("": none).
    default_config: str = ""


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
        self.host = HostRoot(Path(settings.host_root))
        self.cdi = Cdi(
            self.host,
            settings.cdi,
            toolkit_dir=settings.toolkit_dir,
            state_dir=Path(settings.host_state_dir) if settings.host_state_dir else None,
        )
        clients = (
            FileClients(Path(settings.gpu_clients_file))
            if settings.gpu_clients_file
            else ConfigMapClients(self.api, self.operands.where, settings.gpu_clients_configmap)
        )
        self.host_clients = HostClients(
            self.host, clients, settings.host_clients, kubelet_service=settings.kubelet_service
        )
        patterns = (*DEFAULT_GPU_RESOURCES, *settings.gpu_resources)
        self.finder = WorkloadFinder(
            self.api, settings.node_name, settings.podresources_socket, patterns=patterns
        )
        self.evictor = Evictor(self.api, settings.eviction_timeout)
        self.catalog = catalog or load_catalog()
        self.reboot = reboot or self._default_reboot()
        self.hardware = HardwarePublisher(self.node, self.metrics)
        self.usage = UsagePublisher(self.node, self.finder, self._device_places, settings.usage_interval)
        self.rollout = (
            Rollout(
                self.api, settings.rollout, settings.node_name, lambda: self.wake(Wake.SLOT), self.metrics
            )
            if settings.rollout is not None
            else None
        )
        self._wakes: queue.Queue[Wake] = queue.Queue()
        # The change that failed last: (config, config digest, GPUs before). It is retried on a
        # fresh look (a resync, a restart), not on every wake (a config edit changes the digest).
        self._failed: tuple[str, str, str] | None = None

    def _default_reboot(self) -> Callable[[], None]:
        simulated = getattr(self.access.nvml, "simReboot", None)
        if simulated is None:
            return self.host.reboot

        def simulated_reboot() -> None:
            # What a reboot does to the GPUs; this process lives on and resumes like a restart.
            simulated()
            self.wake(Wake.START)

        return simulated_reboot

    def parts(self, pool: str = "") -> Parts:
        """What a change acts on (built per reconcile: the GPUs and the catalog may be swapped;
        the rollout slot is the one of the node's pool, the value of its pool label now)."""
        slot: RolloutSlot = self.rollout.for_pool(pool) if self.rollout is not None else UNLIMITED
        return Parts(
            node=self.node,
            gpus=self.access,
            operands=self.operands,
            evictor=self.evictor,
            workloads=self.finder,
            store=self.store,
            metrics=self.metrics,
            report=Reports((self.hardware.report(self.access, self.catalog), self.usage)),
            reboot=self.reboot,
            boot_id=getattr(self.access.nvml, "simBootId", None) or self.host.boot_id,
            slot=slot,
            cdi=self.cdi,
            host_clients=self.host_clients,
            operator=self.operands,
        )

    def _device_places(self) -> dict[int, dict[str, DevicePlace]]:
        return {i: self.access.device_places(i) for i in range(self.access.gpu_count())}

    # --- the loop ---------------------------------------------------------------------------------

    def wake(self, why: Wake) -> None:
        self._wakes.put(why)

    def healthy(self) -> bool:
        return self.metrics.seconds_since_heartbeat() < max(60.0, 3 * self.settings.resync_seconds)

    def run(self, stop: threading.Event) -> None:
        """Reconcile until `stop` is set (one reconcile at a time; wakes arriving meanwhile coalesce).

        A reconcile that fails (the API server away, even at start) is retried after 1 s, 2 s, ...
        at most a minute apart, until one succeeds; the agent never exits for it.
        """
        if not self.wait_for_driver(stop):
            return
        try:
            watches = (
                (self._watch_node, "watch-node"),
                (self._watch_config, "watch-config"),
                (self._watch_pods, "watch-pods"),
            )
            for target, name in watches:
                threading.Thread(target=target, args=(stop,), name=name, daemon=True).start()
            self.wake(Wake.START)
            next_resync = time.monotonic() + self.settings.resync_seconds
            retry_at: float | None = None
            usage_at: float | None = None  # when the pods' usage is refreshed next (pods changed)
            backoff = RETRY_FIRST_SECONDS
            while not stop.is_set():
                self.metrics.heartbeat()
                now = time.monotonic()
                due = min(t for t in (next_resync, retry_at, usage_at) if t is not None)
                try:
                    why = self._wakes.get(timeout=max(0.0, min(1.0, due - now)))
                except queue.Empty:
                    now = time.monotonic()
                    if retry_at is not None and now >= retry_at:
                        why = Wake.RETRY
                    elif now >= next_resync:
                        why = Wake.RESYNC
                    elif usage_at is not None and now >= usage_at:
                        usage_at = None
                        self.publish_usage_safely()
                        continue
                    else:
                        continue
                whys = {why}
                while not self._wakes.empty():
                    whys.add(self._wakes.get_nowait())
                if Wake.PODS in whys:
                    whys.discard(Wake.PODS)
                    if usage_at is None:
                        usage_at = self.usage.next_write_at()
                    if not whys:
                        continue
                if any(w.fresh_look for w in whys):
                    next_resync = time.monotonic() + self.settings.resync_seconds
                if self.reconcile_safely(frozenset(whys)):
                    retry_at, backoff = None, RETRY_FIRST_SECONDS
                else:
                    retry_at = time.monotonic() + backoff
                    log.info("retrying in %.0fs", backoff)
                    backoff = min(backoff * 2, RETRY_MAX_SECONDS)
        finally:
            if self.rollout is not None:
                self.rollout.close()
            self.access.stop()

    def wait_for_driver(self, stop: threading.Event) -> bool:
        """Wait for the driver's validation marker (when configured), then for NVML to start,
        saying on the node what is waited for; False when stopped meanwhile."""
        path = self.settings.driver_ready_file
        said = ""
        backoff = RETRY_FIRST_SECONDS
        while not stop.is_set():
            self.metrics.heartbeat()
            info = read_driver_ready(path) if path else DriverInfo()
            if info is None:
                said = self._waiting(said, waiting_reason(path), "DriverNotReady")
                stop.wait(POLL_SECONDS)
                continue
            if self.settings.driver_root:
                log.info("NVML: %s", load_nvml(self.settings.driver_root))
            try:
                self.access.start()
            except GpuError as exc:
                why = (
                    f"cannot use NVML: {exc}; the reconciler needs the driver's NVML library (run it "
                    "with the NVIDIA runtime class, chart: reconciler.runtimeClassName); retrying"
                )
                said = self._waiting(said, why, "NvmlUnavailable")
                stop.wait(backoff)
                backoff = min(backoff * 2, NVML_RETRY_MAX_SECONDS)
                continue
            self.cdi.driver = self.host_clients.driver = info
            if path:
                log.info("NVIDIA driver ready: %s", info.describe())
            return True
        return False

    def _waiting(self, said: str, reason: str, condition: str) -> str:
        """Say once on the node (reason, condition) what the agent waits for; returns what is said."""
        if reason == said:
            return said
        log.info("%s", reason)
        try:
            self.node.apply(NodeEdit(reason=reason))
            self.node.set_condition("False", condition, reason)
        except API_ERRORS as exc:  # said again on the next poll
            log.warning("could not say on the node that %s: %s", reason, describe(exc))
            return said
        return reason

    def reconcile_safely(self, why: Collection[Wake]) -> bool:
        """One reconcile; False when it failed (logged) and should be retried soon."""
        try:
            self.reconcile(why)
        except Exception:
            # The API server or NVML being away is no reason to die; the loop retries with backoff.
            log.exception("reconcile (%s) failed", ",".join(sorted(why)))
            return False
        return True

    def _watch_node(self, stop: threading.Event) -> None:
        """Wake on every change of the layout label (only this Node: field selector)."""
        last: object = object()

        def seen(node: Any) -> None:
            nonlocal last
            value = (node.metadata.labels or {}).get(keys.LABEL_MIG_CONFIG)
            if value != last:
                last = value
                failed = self._failed  # once: the reconcile thread may reset it meanwhile
                if failed is not None and failed[0] != value:
                    self._failed = None
                self.wake(Wake.LABEL)

        def listed(nodes: Sequence[Any]) -> None:
            for node in nodes:
                seen(node)

        name = self.settings.node_name
        follow(
            k8s.CoreV1Api(self.api).list_node,
            field_selector=f"metadata.name={name}",
            on_list=listed,
            on_event=lambda _kind, node: seen(node),
            stop=stop,
            what=f"node {name}",
            watch_seconds=NODE_WATCH_SECONDS,
        )

    def _watch_config(self, stop: threading.Event) -> None:
        self.source.watch(lambda: self.wake(Wake.CONFIG), stop)

    def _watch_pods(self, stop: threading.Event) -> None:
        """Wake (for the usage report) when a GPU pod on this node comes, goes or changes; after
        each (re)list too, since events may have been missed meanwhile."""
        name = self.settings.node_name

        def seen(_kind: str, pod: Any) -> None:
            if self.usage.concerns(pod):
                self.wake(Wake.PODS)

        follow(
            k8s.CoreV1Api(self.api).list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={name}",
            on_list=lambda _pods: self.wake(Wake.PODS),
            on_event=seen,
            stop=stop,
            what=f"pods on node {name}",
            watch_seconds=NODE_WATCH_SECONDS,
        )

    def publish_usage_safely(self) -> None:
        """Refresh the pods' usage report, unless a change is in flight (its last write carries
        it); a failure is logged and waits for the next pod event or resync."""
        try:
            if self.store.load() is None:
                self.usage.publish()
        except Exception:
            log.exception("publishing the pods' usage failed")

    # --- one reconcile ----------------------------------------------------------------------------

    def publish_hardware(self, report: NodeGpus | None = None, *, usage: bool = False) -> NodeGpus:
        """Publish the GPUs in `mig-guard.io/gpus` when they differ from what was published (and,
        with `usage`, the pods' usage in the same write)."""
        return self.hardware.publish(self.access, self.catalog, report, also=self.usage if usage else None)

    def reconcile(self, why: Wake | str | Collection[Wake | str]) -> None:
        whys = wakes(why)
        if self.rollout is None:
            self._reconcile(whys)
            return
        # Whatever this reconcile ends in, except waiting for a slot or a change still holding its
        # node (a newer layout next, a reboot), this node neither waits nor holds a slot after it;
        # after an error too (a slot held with no change in flight would be renewed for nothing).
        outcome: change.Outcome | None = None
        ended = False
        try:
            outcome = self._reconcile(whys)
            ended = True
        finally:
            if ended and (outcome is None or not outcome.waiting):
                self.rollout.stop_waiting()
            keeps = outcome is not None and (outcome.newer or outcome.state == keys.STATE_REBOOTING)
            held = self.rollout.held
            if not keeps and held is not None:
                try:
                    in_flight = self.store.load() is not None
                except API_ERRORS:
                    in_flight = True  # cannot tell: keep it (it expires if this agent dies)
                if not in_flight:
                    self.rollout.release(held.pool)

    def _reconcile(self, whys: frozenset[Wake]) -> change.Outcome | None:
        progress = self.store.load()
        fresh = any(w.fresh_look for w in whys)
        # The GPUs first: the webhook judges the first label with them (on a fresh look, the
        # pods' usage too, in the same write). While a change is in flight they go with the
        # change's last Node write instead (one write less).
        if progress is None:
            report = self.publish_hardware(usage=fresh)
        else:
            report, _ = self.hardware.look(self.access, self.catalog)
        node = self.node.view()
        labels, annotations = dict(node.labels), dict(node.annotations)
        name = node.mig_config
        log.debug(
            "reconcile (%s): desired %r, progress %s",
            ",".join(sorted(whys)),
            name,
            progress and progress.phase,
        )
        if progress is None and fresh and claim_report(self.node, node, name):
            labels.pop(keys.LABEL_MIG_STATE, None)  # removed: what follows reports what is true
            annotations.pop(keys.ANNOTATION_REASON, None)
        if self.rollout is not None and progress is None and Wake.START in whys:
            self.rollout.release_stale()  # a slot left by an agent killed after its change ended
        pool = labels.get(self.settings.rollout.pool_label, "") if self.settings.rollout is not None else ""
        parts = self.parts(pool)
        if not name:
            if progress is None and self._give_default(report, labels):
                return None  # the label's watch wakes the loop to apply it
            self._no_layout(parts, progress, labels, annotations)
            return None
        try:
            config = self.source.load()
        except ConfigError as exc:
            reason = f"cannot use the mig-parted config ({self.source.describe()}): {'; '.join(exc.errors)}"
            self._reject(parts, name, reason, progress=progress, labels=labels, annotations=annotations)
            return None
        result = check_config(config, name, hardware_from_report(self.catalog, report))
        if not result.valid:
            reason = f"config {name} cannot be applied on this node: {'; '.join(result.errors)}"
            self._reject(parts, name, reason, progress=progress, labels=labels, annotations=annotations)
            return None
        current = self.access.geometries()
        targets = change.target_layouts(result, current, progress)
        if labels.get(keys.LABEL_MIG_STRATEGY) == STRATEGY_SINGLE:
            problem = single_strategy_problem(dict(targets))
            if problem is not None:
                reason = f"config {name} cannot be applied on this node: {problem}"
                self._reject(parts, name, reason, progress=progress, labels=labels, annotations=annotations)
                return None
        plan = plan_node(current, targets)
        if not plan.changed:
            self._failed = None
            reason = change.success_reason(name, result)
            owed = self.cdi.owed() is not None and self.cdi.enabled()
            if owed or not _already_reported(keys.STATE_SUCCESS, reason, progress, labels, annotations):
                change.settle(parts, progress, reason, name)
            return None
        attempt = (name, config.digest, _fingerprint(current))
        # An edited config or another label value is another attempt (its key differs); the same
        # attempt again only on a fresh look.
        if progress is None and self._failed == attempt and not fresh:
            log.debug("%s failed on these GPUs already; waiting for a resync or a change", name)
            return None
        outcome = Change(
            parts,
            self.settings,
            name=name,
            digest=config.digest,
            result=result,
            plan=plan,
            current=current,
            progress=progress,
        ).run()
        if outcome.waiting:
            return outcome
        if outcome.state != keys.STATE_REBOOTING:
            # An API failure is no verdict on the config: the loop retries it soon (below).
            verdict = outcome.state == keys.STATE_FAILED and outcome.api_failure is None
            self._failed = attempt if verdict else None
        if outcome.newer:
            self.wake(Wake.LABEL)
        if outcome.api_failure is not None:
            raise outcome.api_failure
        return outcome

    def _give_default(self, report: NodeGpus, labels: Mapping[str, str]) -> bool:
        """With a default layout configured, label a MIG-capable node that has no layout with it
        (as the GPU Operator labels such nodes all-disabled); True when the label was set."""
        default = self.settings.default_config
        if not default or keys.LABEL_MIG_CONFIG in labels or not any(g.mig_capable for g in report.gpus):
            return False
        try:
            known = default in self.source.load().configs
        except ConfigError:
            return False  # judged (and reported) once the label is there; without it, nothing to do
        if not known:
            log.warning(
                "the default layout %s is not a config of %s: not set", default, self.source.describe()
            )
            return False

        def give(node: NodeView) -> NodeEdit:
            absent = keys.LABEL_MIG_CONFIG not in node.labels
            return NodeEdit(labels={keys.LABEL_MIG_CONFIG: default}) if absent else NodeEdit()

        if not self.node.apply(give).labels:
            return False
        self.node.event(
            "Normal",
            "DefaultLayout",
            f"{keys.LABEL_MIG_CONFIG}={default} set: the node's GPUs are MIG-capable and it had no layout "
            "(--default-mig-config)",
        )
        return True

    def _no_layout(
        self,
        parts: Parts,
        progress: Progress | None,
        labels: Mapping[str, str],
        annotations: Mapping[str, str],
    ) -> None:
        """No label: nothing to apply; an interrupted change is rolled back and the node released."""
        if progress is None and keys.ANNOTATION_HOLD not in annotations:
            if labels.get(keys.LABEL_MIG_STATE) == keys.STATE_PENDING:
                self.node.report(
                    keys.STATE_FAILED, f"the {keys.LABEL_MIG_CONFIG} label was removed; nothing to apply"
                )
            return
        change.abandon(parts, progress)

    def _reject(
        self,
        parts: Parts,
        name: str,
        reason: str,
        *,
        progress: Progress | None,
        labels: Mapping[str, str],
        annotations: Mapping[str, str],
    ) -> None:
        if not _already_reported(keys.STATE_FAILED, reason, progress, labels, annotations):
            change.reject(parts, self.settings.hold_mode, name, progress, reason)
