"""The reconciler's writes on its Node, against the real API server: state, reason, condition,
Events, and a hold that is lifted exactly as recorded."""

from __future__ import annotations

import json
import uuid
from typing import Any

from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node
from migcore import keys
from migcore.hold import HoldRecord
from reconciler.node_state import NodeState


def _node(k8s_api: Any, **kwargs: Any) -> NodeState:
    name = f"ns-{uuid.uuid4().hex[:8]}"
    create_gpu_node(k8s_api, name, fake=False, **kwargs)
    return NodeState(k8s_api, name)


def _taint_keys(state: NodeState) -> list[str]:
    return [t.key for t in state.read().spec.taints or []]


def test_report_sets_label_reason_condition_and_event(k8s_api: Any) -> None:
    state = _node(k8s_api, labels={"team": "ml"})
    state.report(keys.STATE_PENDING, "applying all-1g.5gb to GPUs 0, 1")
    node = state.read()
    assert node.metadata.labels[keys.LABEL_MIG_STATE] == "pending"
    assert node.metadata.labels["team"] == "ml"  # others' labels untouched
    assert node.metadata.annotations[keys.ANNOTATION_REASON] == "applying all-1g.5gb to GPUs 0, 1"
    # Its fields carry its own manager (GitOps tools ignore them by manager).
    owned = {(m.manager, m.subresource or "") for m in node.metadata.managed_fields}
    assert {("mig-guard-reconciler", ""), ("mig-guard-reconciler", "status")} <= owned
    cond = state.condition()
    assert cond is not None
    assert (cond.status, cond.reason) == ("False", "Reconfiguring")
    first_transition = cond.last_transition_time

    state.report(keys.STATE_FAILED, "PodDisruptionBudget ml/pdb blocks eviction of pod ml/train-0")
    cond = state.condition()
    assert (cond.status, cond.reason) == ("False", "Failed")
    assert cond.message == "PodDisruptionBudget ml/pdb blocks eviction of pod ml/train-0"
    assert cond.last_transition_time == first_transition  # status stayed False

    state.report(keys.STATE_SUCCESS, "applied all-1g.5gb")
    cond = state.condition()
    assert (cond.status, cond.reason) == ("True", "Applied")
    assert state.read().metadata.labels[keys.LABEL_MIG_STATE] == "success"

    # The core/v1 view of the events.k8s.io Events: what `kubectl describe node` lists.
    events = k8s.CoreV1Api(k8s_api).list_namespaced_event(
        "default", field_selector=f"involvedObject.kind=Node,involvedObject.name={state.node_name}"
    )
    seen = [(e.type, e.reason, e.message, e.reporting_component) for e in events.items]
    assert len(seen) == 3
    assert (
        "Warning",
        "Failed",
        "PodDisruptionBudget ml/pdb blocks eviction of pod ml/train-0",
        "mig-guard.io/reconciler",
    ) in seen
    assert ("Normal", "Applied", "applied all-1g.5gb", "mig-guard.io/reconciler") in seen


def test_patch_metadata_deletes_only_the_given_keys(k8s_api: Any) -> None:
    state = _node(k8s_api, annotations={"other.io/keep": "1"})
    state.annotate(keys.ANNOTATION_PROGRESS, '{"phase": "paused"}')
    assert state.annotations()[keys.ANNOTATION_PROGRESS] == '{"phase": "paused"}'
    state.annotate(keys.ANNOTATION_PROGRESS, None)
    annotations = state.annotations()
    assert keys.ANNOTATION_PROGRESS not in annotations
    assert annotations["other.io/keep"] == "1"


def test_taint_hold_keeps_other_taints_and_is_lifted(k8s_api: Any) -> None:
    other = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
    state = _node(k8s_api, taints=[other])
    record = state.hold("taint", "all-1g.5gb")
    assert (record.taint, record.cordon, record.by, record.config) == (
        True,
        False,
        "reconciler",
        "all-1g.5gb",
    )
    node = state.read()
    ours = [t for t in node.spec.taints if t.key == keys.TAINT_KEY]
    assert [(t.value, t.effect) for t in ours] == [("all-1g.5gb", "NoSchedule")]
    assert HoldRecord.from_annotation(node.metadata.annotations[keys.ANNOTATION_HOLD]) == record
    assert not node.spec.unschedulable

    assert state.lift_hold() == record
    node = state.read()
    remaining = _taint_keys(state)
    assert "dedicated" in remaining
    assert keys.TAINT_KEY not in remaining
    assert keys.ANNOTATION_HOLD not in (node.metadata.annotations or {})
    assert state.lift_hold() is None  # nothing left to lift


def test_cordon_hold_is_undone(k8s_api: Any) -> None:
    state = _node(k8s_api)
    record = state.hold("cordon", "all-2g.10gb")
    assert (record.taint, record.cordon) == (False, True)
    assert state.read().spec.unschedulable is True
    state.lift_hold()
    assert not state.read().spec.unschedulable


def test_never_uncordons_a_node_an_admin_cordoned(k8s_api: Any) -> None:
    state = _node(k8s_api)
    state.core.patch_node(state.node_name, {"spec": {"unschedulable": True}})
    record = state.hold("cordon", "all-2g.10gb")
    assert record.cordon is False
    state.lift_hold()
    assert state.read().spec.unschedulable is True


def test_an_existing_webhook_hold_is_kept_and_lifted_as_recorded(k8s_api: Any) -> None:
    webhook_hold = {
        "taint": True,
        "cordon": True,
        "config": "all-3g.20gb",
        "by": "webhook",
        "at": "2026-11-28T14:00:00Z",
    }
    state = _node(
        k8s_api,
        annotations={keys.ANNOTATION_HOLD: json.dumps(webhook_hold)},
        taints=[{"key": keys.TAINT_KEY, "value": "all-3g.20gb", "effect": "NoSchedule"}],
    )
    state.core.patch_node(state.node_name, {"spec": {"unschedulable": True}})
    record = state.hold("taint", "all-3g.20gb")
    assert record.by == "webhook"
    assert _taint_keys(state).count(keys.TAINT_KEY) == 1  # not added twice
    state.lift_hold()
    node = state.read()
    assert keys.TAINT_KEY not in _taint_keys(state)
    assert not node.spec.unschedulable
