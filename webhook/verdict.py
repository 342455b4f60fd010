"""The webhook's answer: allowed or denied, why, warnings, and an optional JSONPatch.

Builds the AdmissionReview response the API server expects (uid echoed, apiVersion and
kind set: without them the API server rejects the answer) and keeps warnings short (120
characters, or the API server's 256 where a verdict quotes longer text) and at most ten.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from migcore.wording import shorten
from webhook.admission_types import (
    API_VERSION,
    KIND,
    AdmissionResponseWire,
    AdmissionReviewResponseWire,
    PatchOperation,
)

MAX_WARNING_CHARS = 120
MAX_WARNINGS = 10
# The API server's own limit (k8s.io/apiserver filters/warning.go): once the warnings of a response
# pass 4096 characters in all it cuts each to 256 and drops the rest. MAX_WARNINGS of this length
# stay under that total, so a verdict may allow its warnings this long (see `warning_chars`).
API_WARNING_CHARS = 256
MAX_MESSAGE_CHARS = 2000

CODE_INVALID = 400
CODE_FORBIDDEN = 403


@dataclass(frozen=True)
class Verdict:
    """What a handler decided about one admission request."""

    allowed: bool
    code: int = 200
    message: str = ""
    warnings: tuple[str, ...] = ()
    patch: tuple[PatchOperation, ...] = field(default=())
    # Longer warnings are cut to this (at most API_WARNING_CHARS): quoted text such as a config's
    # own warnings is worth more than the 120 characters kubectl users read at a glance.
    warning_chars: int = MAX_WARNING_CHARS

    @staticmethod
    def allow(warnings: Sequence[str] = (), patch: Sequence[PatchOperation] = ()) -> Verdict:
        return Verdict(True, warnings=tuple(warnings), patch=tuple(patch))

    @staticmethod
    def deny(code: int, message: str, warnings: Sequence[str] = ()) -> Verdict:
        return Verdict(False, code=code, message=message, warnings=tuple(warnings))

    @property
    def label(self) -> str:
        """A short name for logs and metrics: allowed, patched, warned or denied."""
        if not self.allowed:
            return "denied"
        if self.patch:
            return "patched"
        return "warned" if self.warnings else "allowed"

    def to_review(self, uid: str) -> AdmissionReviewResponseWire:
        response: AdmissionResponseWire = {"uid": uid, "allowed": self.allowed}
        if not self.allowed:
            response["status"] = {
                "code": self.code,
                "message": shorten(self.message, MAX_MESSAGE_CHARS),
                "reason": "Forbidden" if self.code == CODE_FORBIDDEN else "Invalid",
            }
        if self.warnings:
            limit = min(self.warning_chars, API_WARNING_CHARS)
            response["warnings"] = [shorten(w, limit) for w in self.warnings[:MAX_WARNINGS]]
        if self.allowed and self.patch:
            response["patchType"] = "JSONPatch"
            raw = json.dumps(list(self.patch), separators=(",", ":")).encode()
            response["patch"] = base64.b64encode(raw).decode()
        return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
