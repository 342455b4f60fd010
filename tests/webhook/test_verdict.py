"""The AdmissionReview answer: envelope, status codes, warning length."""

from __future__ import annotations

import base64
import json

from migcore.wording import shorten
from webhook.verdict import MAX_WARNING_CHARS, Verdict


def test_denial_carries_uid_envelope_code_and_message() -> None:
    answer = Verdict.deny(403, "no").to_review("u-1")
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "u-1"
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 403


def test_warnings_are_cut_at_a_word_boundary_within_120_characters() -> None:
    long = "GPU product 'Tesla-T4' is not in mig-guard's catalog: layout not checked " * 4
    answer = Verdict.allow(warnings=[long, "short"]).to_review("u")
    first, second = answer["response"]["warnings"]
    assert len(first) <= MAX_WARNING_CHARS
    assert first.endswith("…")
    assert first[:-1] == long[: len(first) - 1].rstrip(" ,;:")
    assert second == "short"


def test_patch_is_base64_json_and_only_on_allowed_answers() -> None:
    ops = ({"op": "add", "path": "/a", "value": 1},)
    allowed = Verdict.allow(patch=ops).to_review("u")["response"]
    assert allowed["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(allowed["patch"])) == list(ops)


def test_shorten_leaves_short_text_alone() -> None:
    assert shorten("a  b", 10) == "a b"
    assert len(shorten("x" * 500, 50)) == 50
