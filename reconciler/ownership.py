"""The reconciler owns the state it reports: a state label or reason it did not write is removed.

Only the reconciler may write `nvidia.com/mig.config.state` and `mig-guard.io/reason` (the
admission policy and the webhook see to it), except the webhook's "pending" with its reason for
the layout just accepted. Anything else found there was written before mig-guard was installed,
while its admission was off, or by someone allowed to bypass it: not a report of the GPUs. The
API server records who last wrote each field (`managedFields`); at start and on every resync the
reconciler removes such a state and reason, with a Warning Event that says what was there and who
wrote it, and the reconcile that follows reports what is true ("success" with no layout applied
becomes the layout's real outcome; a state with no layout requested goes away).
"""

from __future__ import annotations

import logging

from kube.node import NodeView
from migcore import keys
from migcore.hold import pending_reason
from reconciler.node_state import FIELD_MANAGER, NodeState

log = logging.getLogger(__name__)

EVENT_REASON = "StateCorrected"


def foreign_report(node: NodeView, desired: str) -> str | None:
    """What the node reports that the reconciler did not write (None: all of it is its own, or the
    webhook's pending for `desired`)."""
    state, reason = node.labels.get(keys.LABEL_MIG_STATE), node.annotations.get(keys.ANNOTATION_REASON)
    if desired and state == keys.STATE_PENDING and reason == pending_reason(desired):
        return None
    found: list[str] = []
    for field, key, value in (
        ("labels", keys.LABEL_MIG_STATE, state),
        ("annotations", keys.ANNOTATION_REASON, reason),
    ):
        if value is None:
            continue
        owners = node.writers(field, key) - {FIELD_MANAGER}
        if owners or not node.writers(field, key):
            by = ", ".join(sorted(owners)) or "an unknown writer"
            found.append(f"{key}={value[:200]!r} (written by {by})")
    return "; ".join(found) or None


def claim_report(node_state: NodeState, node: NodeView, desired: str) -> bool:
    """Remove a state and reason the reconciler did not write, with an Event; True when it did."""
    found = foreign_report(node, desired)
    if found is None:
        return False
    node_state.patch_metadata(labels={keys.LABEL_MIG_STATE: None}, annotations={keys.ANNOTATION_REASON: None})
    note = f"not written by the mig-guard reconciler, removed: {found}. The next report says what is true."
    node_state.event("Warning", EVENT_REASON, note)
    log.warning("%s", note)
    return True
