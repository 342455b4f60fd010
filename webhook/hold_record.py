"""The `mig-guard.io/hold` annotation: what mig-guard did to hold a node during a change.

Compact JSON, e.g. `{"taint":true,"cordon":false,"config":"all-1g.5gb","by":"webhook","at":"..."}`.
`cordon` is true only when mig-guard set `spec.unschedulable` itself, so the reconciler undoes
exactly that and never uncordons a node an admin cordoned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

BY_WEBHOOK = "webhook"


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
        return json.dumps(body, separators=(",", ":"))

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
        """The record in `text`, or None when absent or not a hold record."""
        if not text or len(text) > 4096:
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


def pending_reason(config: str) -> str:
    """The `mig-guard.io/reason` text the webhook sets on an accepted change."""
    return f"waiting for the reconciler to apply {config}"
