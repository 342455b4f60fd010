"""The `mig-guard.io/hold` annotation: what mig-guard did to hold a node during a change.

Written by the webhook (in the admin's own write) or by the reconciler (when no webhook held the
node), read by both. Compact JSON, e.g.
`{"at":"...","by":"webhook","config":"all-1g.5gb","cordon":false,"taint":true}`. `cordon` is true
only when mig-guard set `spec.unschedulable` itself, so the reconciler undoes exactly that and
never uncordons a node an admin cordoned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_ANNOTATION_BYTES = 4096


def pending_reason(config: str) -> str:
    """The `mig-guard.io/reason` the webhook sets with an accepted layout (the reconciler knows it
    as the one reason that is not its own, see `reconciler.ownership`)."""
    return f"waiting for the reconciler to apply {config}"


@dataclass(frozen=True)
class HoldRecord:
    taint: bool
    cordon: bool
    config: str
    by: str
    at: str

    def to_annotation(self) -> str:
        body = {
            "taint": self.taint,
            "cordon": self.cordon,
            "config": self.config,
            "by": self.by,
            "at": self.at,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    def same_hold(self, other: HoldRecord) -> bool:
        """Equal apart from the time stamp (so re-invocation does not rewrite it)."""
        return (self.taint, self.cordon, self.config, self.by) == (
            other.taint,
            other.cordon,
            other.config,
            other.by,
        )

    @staticmethod
    def from_annotation(text: str | None) -> HoldRecord | None:
        """The record in `text`, or None when absent or not a well-formed hold record."""
        if not text or len(text) > MAX_ANNOTATION_BYTES:
            return None
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        taint, cordon = raw.get("taint"), raw.get("cordon")
        config, by, at = raw.get("config"), raw.get("by"), raw.get("at", "")
        if not isinstance(taint, bool) or not isinstance(cordon, bool):
            return None
        if not isinstance(config, str) or not isinstance(by, str) or not isinstance(at, str):
            return None
        return HoldRecord(taint, cordon, config, by, at)

    @staticmethod
    def recorded(text: str | None) -> HoldRecord | None:
        """For undoing a hold: None only when no record exists at all.

        An unreadable record still says "mig-guard held this node": it is replaced by one that
        claims nothing (no cordon to undo; mig-guard's own taint goes anyway), so the annotation
        is cleaned up and no second hold is stacked on top.
        """
        if not text:
            return None
        return HoldRecord.from_annotation(text) or HoldRecord(False, False, "", "", "")
