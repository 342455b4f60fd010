"""The webhook's side of the hold: who it writes as, and the reason it sets (the record format
itself, shared with the reconciler, is `migcore.hold.HoldRecord`)."""

from __future__ import annotations

BY_WEBHOOK = "webhook"


def pending_reason(config: str) -> str:
    """The `mig-guard.io/reason` text the webhook sets on an accepted change."""
    return f"waiting for the reconciler to apply {config}"
