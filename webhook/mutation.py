"""The JSONPatch for an accepted change of `nvidia.com/mig.config`.

Sets `nvidia.com/mig.config.state=pending`, holds the node (a NoSchedule taint, or a cordon
when mig-guard is configured so and the node was not cordoned already), and records what it
did in `mig-guard.io/hold` plus a sentence in `mig-guard.io/reason`. Idempotent: applied to
its own output the patch is empty (the API server may invoke it again, `reinvocationPolicy:
IfNeeded`). Never denies: the validating webhook does.

With no hold at admission (`--no-admission-hold`, set with a rollout budget), only the state and
the reason: the reconciler holds the node itself when its turn comes (`reconciler.rollout`), so a
push to a whole pool does not hold every node of it at once.

Two writes get less:
- CREATE is held by the taint in either mode. A hold record in a new object cannot be told apart
  from the creator's (the API server sends a re-invocation the same way), so none is trusted,
  and a record of a cordon would make the reconciler later uncordon a node created cordoned on
  purpose. A new node has no pods yet; the taint keeps new ones off the same way.
- A write through the status subresource gets no hold: the API server drops spec changes made
  there, so a taint or cordon could not be set. The reconciler holds the node itself, as it
  does whenever it finds no hold record.
"""

from __future__ import annotations

from collections.abc import Mapping

from kube.node import NodeView
from migcore import keys
from migcore.hold import (
    BY_WEBHOOK,
    HoldMode,
    HoldRecord,
    decide_hold,
    hold_taint,
    hold_taint_index,
    pending_reason,
)
from webhook.admission_types import PatchOperation
from webhook.validation import NodeChange


def pointer(*parts: str) -> str:
    """An RFC 6901 JSON pointer (`/` and `~` escaped)."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _taint_ops(node: NodeView, config: str) -> list[PatchOperation]:
    index = hold_taint_index(node.taints)
    if index is not None:
        if node.taints[index].get("value") == config:
            return []
        return [{"op": "add", "path": pointer("spec", "taints", str(index), "value"), "value": config}]
    if not node.has_spec:
        return [{"op": "add", "path": "/spec", "value": {"taints": [hold_taint(config)]}}]
    if not node.taints:
        return [{"op": "add", "path": "/spec/taints", "value": [hold_taint(config)]}]
    return [{"op": "add", "path": "/spec/taints/-", "value": hold_taint(config)}]


def _cordon_ops(node: NodeView) -> list[PatchOperation]:
    if node.unschedulable:
        return []
    if not node.has_spec:
        return [{"op": "add", "path": "/spec", "value": {"unschedulable": True}}]
    return [{"op": "add", "path": "/spec/unschedulable", "value": True}]


def _map_ops(field: str, current: Mapping[str, str], wanted: Mapping[str, str]) -> list[PatchOperation]:
    missing = {k: v for k, v in wanted.items() if current.get(k) != v}
    if not missing:
        return []
    if not current:
        return [{"op": "add", "path": pointer("metadata", field), "value": dict(wanted)}]
    return [{"op": "add", "path": pointer("metadata", field, k), "value": v} for k, v in missing.items()]


def mutation_patch(
    change: NodeChange, mode: HoldMode | None, creating: bool, now: str
) -> list[PatchOperation]:
    """The patch for an accepted change (the caller checked that validation allows it); `mode`
    None: no hold at admission.

    `now` is the RFC 3339 time written into a new hold record; an equivalent record already on
    the node is kept as it is, so a second invocation yields no patch.
    """
    if not change.config_changed:
        return []
    node = change.new
    config = node.mig_config
    ops: list[PatchOperation] = []
    ops += _map_ops("labels", node.labels, {keys.LABEL_MIG_STATE: keys.STATE_PENDING})
    if change.status or mode is None:
        return ops + _map_ops(
            "annotations", node.annotations, {keys.ANNOTATION_REASON: pending_reason(config)}
        )
    # On UPDATE the stored object's record counts, whoever wrote it (the reconciler too; a user
    # cannot fake it in the request); on CREATE nothing in the new object is trusted.
    previous = (
        None if creating else HoldRecord.from_annotation(change.old.annotations.get(keys.ANNOTATION_HOLD))
    )
    hold = decide_hold(
        mode,
        config,
        by=BY_WEBHOOK,
        at=now,
        unschedulable=change.old.unschedulable,
        previous=previous,
        creating=creating,
    )
    ops += _map_ops(
        "annotations",
        node.annotations,
        {
            keys.ANNOTATION_HOLD: hold.record.annotation_over(node.annotations.get(keys.ANNOTATION_HOLD)),
            keys.ANNOTATION_REASON: pending_reason(config),
        },
    )
    if hold.taint:
        ops += _taint_ops(node, config)
    if hold.cordon:
        ops += _cordon_ops(node)
    return ops
