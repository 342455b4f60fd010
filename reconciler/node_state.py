"""What the reconciler writes on its own Node: the state label, the reason annotation, the
`MIGConfigReady` condition, Events, and the hold (taint and/or cordon) around a change.

Every write is a patch that leaves other writers' keys alone, read-modify-write guarded by the
resourceVersion and retried on conflict (409), because a list patch would clobber other taints.
One `NodeEdit` carries everything a step changes (state, reason, progress record, operand
labels, hold) in one write: a change writes the Node a handful of times, not once per step.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from kubernetes import client as k8s
from kubernetes.client import ApiException

from kube.errors import API_ERRORS, is_conflict
from kube.node import Condition, NodeView
from migcore import keys
from migcore.hold import (
    BY_RECONCILER,
    HoldMode,
    HoldRecord,
    decide_hold,
    decide_release,
    with_hold_taint,
    without_hold_taint,
)

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "mig-guard.io/reconciler"
MERGE_PATCH = "application/merge-patch+json"
CONFLICT_RETRIES = 10
# Every write to the Node names this manager, so GitOps tools can ignore exactly its fields
# (Argo CD managedFieldsManagers).
FIELD_MANAGER = "mig-guard-reconciler"

T = TypeVar("T")
_UNREAD: Any = object()
ConditionStatus = Literal["True", "False", "Unknown"]

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
    def view(self) -> NodeView:
        """The Node as it is now (one read)."""
        return NodeView.from_response(self.core.read_node(self.node_name, _preload_content=False))

    def read(self) -> Any:
        """The Node as the Kubernetes client models it (a V1Node)."""
        return self.core.read_node(self.node_name)

    def labels(self) -> dict[str, str]:
        return dict(self.view().labels)

    def annotations(self) -> dict[str, str]:
        return dict(self.view().annotations)

    def condition(self) -> Condition | None:
        """The current `MIGConfigReady` condition, or None."""
        return self.view().condition(keys.CONDITION_READY)

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

    # -- one write: state, reason, labels, annotations and the hold together -----------------------
    def apply(self, edit: NodeEdit | Callable[[NodeView], NodeEdit]) -> NodeEdit:
        """Make `edit` (or what `edit(node)` returns for the node as read) in ONE write of the Node;
        keys that already have their value are left out, and nothing is written when nothing
        changes. A write that depends on what was read (taints, restored labels, an edit computed
        from the node) is guarded by the resourceVersion and retried on conflict. With a state,
        then the `MIGConfigReady` condition (only when it changes) and an Event. Returns the edit."""

        def change(node: NodeView) -> tuple[dict[str, Any] | None, bool, tuple[NodeEdit, NodeView]]:
            made = edit(node) if callable(edit) else edit
            body = _body(node, made)
            guard = body is not None and (callable(edit) or "spec" in body or bool(made.restore))
            return body, guard, (made, node)

        made, node = self._read_modify_write(change)
        if made.state is not None:
            reason = made.reason or ""
            status, default_reason = CONDITION_BY_STATE[made.state]
            if made.condition:
                current = node.condition(keys.CONDITION_READY)
                self.set_condition(status, made.condition_reason or default_reason, reason, current)
            self.event(
                made.event_type or ("Warning" if made.state == keys.STATE_FAILED else "Normal"),
                made.event_reason or (made.condition_reason or default_reason),
                reason,
            )
            log.info("state %s: %s", made.state, reason)
        return made

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
        self.apply(
            NodeEdit(
                state=state,
                reason=reason,
                event_reason=event_reason,
                event_type=event_type,
                condition_reason=condition_reason,
            )
        )

    def set_condition(
        self, status: ConditionStatus, reason: str, message: str, current: Condition | None = _UNREAD
    ) -> None:
        """Patch `MIGConfigReady` on the status subresource (merged by type: other conditions stay);
        nothing is written when it already says exactly that."""
        if current is _UNREAD:
            current = self.condition()
        message = message[:32768]
        if current is not None and (current.status, current.reason, current.message) == (
            status,
            reason,
            message,
        ):
            return
        now = now_rfc3339()
        transition = now
        if current is not None and current.status == status and current.last_transition_time is not None:
            transition = current.last_transition_time
        body = {
            "status": {
                "conditions": [
                    {
                        "type": keys.CONDITION_READY,
                        "status": status,
                        "reason": reason,
                        "message": message,
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": transition,
                    }
                ]
            }
        }
        for attempt in range(CONFLICT_RETRIES):  # a merge by condition type: safe to send again
            try:
                self.core.patch_node_status(self.node_name, body, field_manager=FIELD_MANAGER)
                return
            except ApiException as exc:
                if not is_conflict(exc) or attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

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
        except API_ERRORS as exc:  # informative only: never fail a reconcile for it
            log.warning("could not record event %s: %s", reason, exc)

    # -- hold ------------------------------------------------------------------------------------------
    def hold(self, mode: HoldMode, config: str) -> HoldRecord:
        """Keep new pods off the node unless a hold is already recorded (the webhook's, or ours)."""
        self.apply(NodeEdit(take_hold=(mode, config)))
        record = HoldRecord.recorded(self.annotations().get(keys.ANNOTATION_HOLD))
        assert record is not None
        return record

    def lift_hold(self) -> HoldRecord | None:
        """Undo exactly what the hold record says (never uncordon a node an admin cordoned)."""
        record = HoldRecord.recorded(self.annotations().get(keys.ANNOTATION_HOLD))
        self.apply(NodeEdit(lift_hold=True))
        return record

    def _read_modify_write(self, change: Callable[[NodeView], tuple[dict[str, Any] | None, bool, T]]) -> T:
        """Apply `change(node)`'s merge patch, guarded by the node's resourceVersion when it says so
        (a merge patch of plain keys needs no guard: it is the same whatever else changed)."""
        for attempt in range(CONFLICT_RETRIES):
            node = self.view()
            body, guard, result = change(node)
            if body is None:
                return result
            if guard:
                body.setdefault("metadata", {})["resourceVersion"] = node.resource_version
            try:
                self.core.patch_node(
                    self.node_name, body, _content_type=MERGE_PATCH, field_manager=FIELD_MANAGER
                )
                return result
            except ApiException as exc:
                if not is_conflict(exc):
                    raise
                log.debug("conflict updating node %s (attempt %d); retrying", self.node_name, attempt + 1)
                time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"node {self.node_name}: still conflicting after {CONFLICT_RETRIES} attempts")


@dataclass
class NodeEdit:
    """What one write of the Node changes: the state label and reason annotation, other labels and
    annotations (None deletes), the hold taken or lifted, operand labels restored. A change makes
    a handful of these (not one per step), because every Node write also costs the webhook calls
    and an update to every watcher of the Node."""

    state: str | None = None
    reason: str | None = None
    labels: Mapping[str, str | None] = field(default_factory=dict)
    annotations: Mapping[str, str | None] = field(default_factory=dict)
    take_hold: tuple[HoldMode, str] | None = None
    lift_hold: bool = False
    # Operand labels back to these values, each only while it still says paused-for-mig-change
    # (a label someone changed meanwhile is theirs now).
    restore: Mapping[str, str] = field(default_factory=dict)
    condition: bool = True  # with a state: update MIGConfigReady too (its message is the reason)
    condition_reason: str | None = None
    event_reason: str | None = None
    event_type: str | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in keys.STATES:
            raise ValueError(f"unknown state {self.state!r}")
        if self.take_hold is not None and self.lift_hold:
            raise ValueError("a hold cannot be taken and lifted in one write")


def _body(node: NodeView, edit: NodeEdit) -> dict[str, Any] | None:
    """The guarded merge patch that makes `edit` on `node` (None: nothing to change)."""
    labels_now = node.labels
    annotations_now = node.annotations
    labels = dict(edit.labels)
    annotations = dict(edit.annotations)
    if edit.state is not None:
        labels[keys.LABEL_MIG_STATE] = edit.state
    if edit.reason is not None:
        annotations[keys.ANNOTATION_REASON] = edit.reason
    for key, value in edit.restore.items():
        if labels_now.get(key) == keys.PAUSED_FOR_MIG_CHANGE:
            labels[key] = value
    spec: dict[str, Any] = {}
    taints = node.taints
    unschedulable = node.unschedulable
    recorded = HoldRecord.recorded(annotations_now.get(keys.ANNOTATION_HOLD))
    if edit.take_hold is not None and recorded is None:  # a hold recorded (the webhook's) stays
        mode, config = edit.take_hold
        hold = decide_hold(mode, config, by=BY_RECONCILER, at=now_rfc3339(), unschedulable=unschedulable)
        held = with_hold_taint(taints, config) if hold.taint else None
        if held is not None:
            spec["taints"] = held
        if hold.cordon and not unschedulable:
            spec["unschedulable"] = True
        annotations[keys.ANNOTATION_HOLD] = hold.record.to_annotation()
    if edit.lift_hold:
        release = decide_release(recorded, taints, unschedulable)
        if release.untaint:
            spec["taints"] = without_hold_taint(taints) or None
        if release.uncordon:
            spec["unschedulable"] = None
        if release.forget:
            annotations[keys.ANNOTATION_HOLD] = None
    labels = {k: v for k, v in labels.items() if labels_now.get(k) != v}
    annotations = {k: v for k, v in annotations.items() if annotations_now.get(k) != v}
    meta: dict[str, Any] = {}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    if not meta and not spec:
        return None
    body: dict[str, Any] = {"metadata": meta}
    if spec:
        body["spec"] = spec
    return body
