"""The webhook's side of the hold: who it writes as, and the reason it sets (the record format
and the reason text, shared with the reconciler, are in `migcore.hold`)."""

from __future__ import annotations

from migcore.hold import pending_reason

BY_WEBHOOK = "webhook"

__all__ = ["BY_WEBHOOK", "pending_reason"]
