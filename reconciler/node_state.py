"""What the reconciler writes on its own Node: the state label, the reason annotation, the
`MIGConfigReady` condition, Events, and the hold (taint and/or cordon) around a change.

Every write is a patch that leaves other writers' keys alone: labels and annotations go through
merge patches; taints and `spec.unschedulable` are read-modify-write guarded by the
resourceVersion, retried on conflict, because a list patch would clobber other taints.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from kubernetes import client as k8s
from kubernetes.client import ApiException

from migcore import keys
from migcore.hold import HoldRecord

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "mig-guard.io/reconciler"
MERGE_PATCH = "application/merge-patch+json"
CONFLICT_RETRIES = 10
# Every write to the Node names this manager, so GitOps tools can ignore exactly its fields
# (Argo CD managedFieldsManagers).
FIELD_MANAGER = "mig-guard-reconciler"

T = TypeVar("T")
ConditionStatus = Literal["True", "False", "Unknown"]
HoldMode = Literal["taint", "cordon"]

# Condition reason (CamelCase, as Kubernetes conventions ask) per state label value.
CONDITION_BY_STATE: dict[str, tuple[ConditionStatus, str]] = {
    keys.STATE_PENDING: ("False", "Reconfiguring"),
    keys.STATE_REBOOTING: ("False", "Rebooting"),
    keys.STATE_SUCCESS: ("True", "Applied"),
    keys.STATE_FAILED: ("False", "Failed"),
}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeState:
    """The reconciler's view of and writes to its own Node object."""

    def __init__(self, api: Any, node_name: str, *, instance: str | None = None) -> None:
        self.core: Any = k8s.CoreV1Api(api)
        self.events: Any = k8s.EventsV1Api(api)
        self.node_name = node_name
        self.instance = instance or f"{socket.gethostname()}/{node_name}"

    # -- reads -------------------------------------------------------------------------------------
    def read(self) -> Any:
        return self.core.read_node(self.node_name)

    def labels(self) -> dict[str, str]:
        return dict(self.read().metadata.labels or {})

    def annotations(self) -> dict[str, str]:
        return dict(self.read().metadata.annotations or {})

    def condition(self) -> Any | None:
        """The current `MIGConfigReady` condition object, or None."""
        node = self.read()
        for cond in (node.status.conditions if node.status else None) or []:
            if cond.type == keys.CONDITION_READY:
                return cond
        return None

    # -- label / annotation writes -------------------------------------------------------------------
    def patch_metadata(
        self,
        labels: Mapping[str, str | None] | None = None,
        annotations: Mapping[str, str | None] | None = None,
    ) -> None:
        """JSON merge patch of labels/annotations: only the given keys change (None deletes one)."""
        meta: dict[str, Any] = {}
        if labels:
            meta["labels"] = dict(labels)
        if annotations:
            meta["annotations"] = dict(annotations)
        if meta:
            self.core.patch_node(
                self.node_name, {"metadata": meta}, _content_type=MERGE_PATCH, field_manager=FIELD_MANAGER
            )

    def annotate(self, key: str, value: str | None) -> None:
        self.patch_metadata(annotations={key: value})

    # -- state, condition, events ---------------------------------------------------------------------
    def report(
        self,
        state: str,
        reason: str,
        *,
        event_reason: str | None = None,
        event_type: str | None = None,
        condition_reason: str | None = None,
    ) -> None:
        """Set the state label, the reason annotation and the condition, and emit an Event."""
        if state not in keys.STATES:
            raise ValueError(f"unknown state {state!r}")
        self.patch_metadata(
            labels={keys.LABEL_MIG_STATE: state}, annotations={keys.ANNOTATION_REASON: reason}
        )
        status, default_reason = CONDITION_BY_STATE[state]
        self.set_condition(status, condition_reason or default_reason, reason)
        self.event(
            event_type or ("Warning" if state == keys.STATE_FAILED else "Normal"),
            event_reason or (condition_reason or default_reason),
            reason,
        )
        log.info("state %s: %s", state, reason)

    def set_condition(self, status: ConditionStatus, reason: str, message: str) -> None:
        """Patch `MIGConfigReady` on the status subresource (merged by type: other conditions stay)."""
        now = now_rfc3339()
        current = self.condition()
        transition = now
        if current is not None and current.status == status and current.last_transition_time is not None:
            last = current.last_transition_time
            transition = last.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(last, datetime) else str(last)
        body = {
            "status": {
                "conditions": [
                    {
                        "type": keys.CONDITION_READY,
                        "status": status,
                        "reason": reason,
                        "message": message[:32768],
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": transition,
                    }
                ]
            }
        }
        self.core.patch_node_status(self.node_name, body, field_manager=FIELD_MANAGER)

    def event(self, event_type: str, reason: str, note: str, action: str = "Reconcile") -> None:
        """An events.k8s.io/v1 Event about the Node (shown by `kubectl describe node`); best effort."""
        now = datetime.now(UTC)
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{self.node_name}.{uuid.uuid4().hex[:16]}", "namespace": "default"},
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance[:128],
            "action": action,
            "reason": reason,
            "type": event_type,
            "note": note[:1024],
            # uid = name: how the kubelet refers to its Node, and what `kubectl describe node` looks up.
            "regarding": {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self.node_name},
        }
        try:
            self.events.create_namespaced_event("default", body)
        except ApiException as exc:  # an Event is informative; never fail a reconcile for it
            log.warning("could not record event %s: %s %s", reason, exc.reason, exc.body)

    # -- hold ------------------------------------------------------------------------------------------
    def hold(self, mode: HoldMode, config: str) -> HoldRecord:
        """Keep new pods off the node unless a hold is already recorded (the webhook's, or ours)."""

        def change(node: Any) -> tuple[dict[str, Any] | None, HoldRecord]:
            annotations = node.metadata.annotations or {}
            existing = HoldRecord.recorded(annotations.get(keys.ANNOTATION_HOLD))
            if existing is not None:
                return None, existing
            taints = _taints(node)
            spec: dict[str, Any] = {}
            taint = False
            cordon = False
            if mode == "taint":
                taint = True
                if not any(t["key"] == keys.TAINT_KEY for t in taints):
                    spec["taints"] = [
                        *taints,
                        {"key": keys.TAINT_KEY, "value": config, "effect": keys.TAINT_EFFECT},
                    ]
            elif not (node.spec and node.spec.unschedulable):
                cordon = True
                spec["unschedulable"] = True
            record = HoldRecord(taint=taint, cordon=cordon, config=config, by="reconciler", at=now_rfc3339())
            body: dict[str, Any] = {
                "metadata": {"annotations": {keys.ANNOTATION_HOLD: record.to_annotation()}}
            }
            if spec:
                body["spec"] = spec
            return body, record

        return self._read_modify_write(change)

    def lift_hold(self) -> HoldRecord | None:
        """Undo exactly what the hold record says (never uncordon a node an admin cordoned)."""

        def change(node: Any) -> tuple[dict[str, Any] | None, HoldRecord | None]:
            annotations = node.metadata.annotations or {}
            record = HoldRecord.recorded(annotations.get(keys.ANNOTATION_HOLD))
            taints = _taints(node)
            ours = [t for t in taints if t["key"] == keys.TAINT_KEY]
            if record is None and not ours:
                return None, None
            body: dict[str, Any] = {}
            spec: dict[str, Any] = {}
            # The taint key is mig-guard's own: nobody else sets it, so it always goes.
            if ours:
                spec["taints"] = [t for t in taints if t["key"] != keys.TAINT_KEY] or None
            if record is not None and record.cordon and node.spec and node.spec.unschedulable:
                spec["unschedulable"] = None
            if spec:
                body["spec"] = spec
            if record is not None:
                body["metadata"] = {"annotations": {keys.ANNOTATION_HOLD: None}}
            return body, record

        return self._read_modify_write(change)

    def _read_modify_write(self, change: Callable[[Any], tuple[dict[str, Any] | None, T]]) -> T:
        """Apply `change(node)`'s merge patch guarded by the node's resourceVersion; retry conflicts."""
        for attempt in range(CONFLICT_RETRIES):
            node = self.read()
            body, result = change(node)
            if body is None:
                return result
            body.setdefault("metadata", {})["resourceVersion"] = node.metadata.resource_version
            try:
                self.core.patch_node(
                    self.node_name, body, _content_type=MERGE_PATCH, field_manager=FIELD_MANAGER
                )
                return result
            except ApiException as exc:
                if exc.status != 409:
                    raise
                log.debug("conflict updating node %s (attempt %d); retrying", self.node_name, attempt + 1)
                time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"node {self.node_name}: still conflicting after {CONFLICT_RETRIES} attempts")


def _taints(node: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in (node.spec.taints if node.spec else None) or []:
        item: dict[str, Any] = {"key": t.key, "effect": t.effect}
        if t.value is not None:
            item["value"] = t.value
        if t.time_added is not None:
            added = t.time_added
            item["timeAdded"] = added.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(added, datetime) else added
        out.append(item)
    return out
