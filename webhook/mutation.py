"""The JSONPatch for an accepted change of `nvidia.com/mig.config`.

Sets `nvidia.com/mig.config.state=pending`, holds the node (a NoSchedule taint, or a cordon
when mig-guard is configured so and the node was not cordoned already), and records what it
did in `mig-guard.io/hold` plus a sentence in `mig-guard.io/reason`. Idempotent: applied to
its own output the patch is empty (the API server may invoke it again, `reinvocationPolicy:
IfNeeded`). Never denies: the validating webhook does.

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

import enum
from collections.abc import Mapping
from typing import Any

from migcore import keys
from migcore.hold import HoldRecord
from webhook.admission_types import PatchOperation
from webhook.hold_record import BY_WEBHOOK, pending_reason
from webhook.node_view import NodeView
from webhook.validation import NodeChange


class HoldMode(enum.StrEnum):
    """How a node is kept free of new pods while its GPUs are repartitioned."""

    TAINT = "taint"
    CORDON = "cordon"


def pointer(*parts: str) -> str:
    """An RFC 6901 JSON pointer (`/` and `~` escaped)."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _hold_record(change: NodeChange, mode: HoldMode, creating: bool, now: str) -> HoldRecord:
    config = change.new.mig_config
    if creating:  # nothing in the new object is trusted (see the module docstring)
        return HoldRecord(True, False, config, BY_WEBHOOK, now)
    # On UPDATE the stored object's record counts, whoever wrote it (the reconciler too; a user
    # cannot fake it in the request).
    previous = HoldRecord.from_annotation(change.old.annotations.get(keys.ANNOTATION_HOLD))
    if mode is HoldMode.TAINT:
        cordon = previous.cordon if previous else False
        return HoldRecord(True, cordon, config, BY_WEBHOOK, now)
    # True only if mig-guard cordons it now, or already did for an earlier change.
    cordon = (previous is not None and previous.cordon) or not change.old.unschedulable
    taint = previous.taint if previous else False
    return HoldRecord(taint, cordon, config, BY_WEBHOOK, now)


def _taint_ops(node: NodeView, config: str) -> list[PatchOperation]:
    wanted: dict[str, Any] = {"key": keys.TAINT_KEY, "value": config, "effect": keys.TAINT_EFFECT}
    for index, taint in enumerate(node.taints):
        if taint.get("key") == keys.TAINT_KEY and taint.get("effect") == keys.TAINT_EFFECT:
            if taint.get("value") == config:
                return []
            return [{"op": "add", "path": pointer("spec", "taints", str(index), "value"), "value": config}]
    if not node.has_spec:
        return [{"op": "add", "path": "/spec", "value": {"taints": [wanted]}}]
    if not node.taints:
        return [{"op": "add", "path": "/spec/taints", "value": [wanted]}]
    return [{"op": "add", "path": "/spec/taints/-", "value": wanted}]


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


def mutation_patch(change: NodeChange, mode: HoldMode, creating: bool, now: str) -> list[PatchOperation]:
    """The patch for an accepted change (the caller checked that validation allows it).

    `now` is the RFC 3339 time written into a new hold record; an equivalent record already on
    the node is kept as it is, so a second invocation yields no patch.
    """
    if not change.config_changed:
        return []
    node = change.new
    config = node.mig_config
    ops: list[PatchOperation] = []
    ops += _map_ops("labels", node.labels, {keys.LABEL_MIG_STATE: keys.STATE_PENDING})
    if change.status:
        return ops + _map_ops(
            "annotations", node.annotations, {keys.ANNOTATION_REASON: pending_reason(config)}
        )
    record = _hold_record(change, mode, creating, now)
    current_text = node.annotations.get(keys.ANNOTATION_HOLD)
    current = HoldRecord.from_annotation(current_text)
    keep = current_text is not None and current is not None and current.same_hold(record)
    hold_text = current_text if keep and current_text is not None else record.to_annotation()
    ops += _map_ops(
        "annotations",
        node.annotations,
        {keys.ANNOTATION_HOLD: hold_text, keys.ANNOTATION_REASON: pending_reason(config)},
    )
    if mode is HoldMode.TAINT or creating:
        ops += _taint_ops(node, config)
    else:
        ops += _cordon_ops(node)
    return ops
