"""What every webhook answer must look like (shared by the app, fuzz and server tests)."""

from __future__ import annotations

import base64
import json
from typing import Any


def check_well_formed(status: int, body: Any, sent: Any) -> None:
    """A 200 is a valid AdmissionReview answer for `sent`; anything else a 4xx with a JSON error."""
    assert status in (200, 400, 413), (status, body)
    assert isinstance(body, dict), body
    if status != 200:
        assert isinstance(body.get("error"), str)
        assert body["error"]
        assert body["code"] == status
        return
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == sent["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert response["status"]["code"] in (400, 403)
        assert isinstance(response["status"]["message"], str)
        assert response["status"]["message"]
    for warning in response.get("warnings", []):
        assert isinstance(warning, str)
        assert 0 < len(warning) <= 120, warning
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        assert isinstance(ops, list)
        assert all(op["op"] in ("add", "replace") and op["path"].startswith("/") for op in ops)
