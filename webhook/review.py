"""Parse an AdmissionReview body into a typed request.

Anything that is not a well-formed `admission.k8s.io/v1` AdmissionReview is a `ReviewError`,
which the HTTP layer turns into a 400 with the message: the API server never sends such a
body, so whoever did gets a clear reason instead of a stack trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from webhook.admission_types import API_VERSION, KIND

MAX_UID_LENGTH = 128


class ReviewError(ValueError):
    """A body that is not a usable AdmissionReview; the message says what is wrong."""


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of an AdmissionReview request the handlers use, type-checked."""

    uid: str
    group: str
    version: str
    kind: str
    operation: str
    name: str
    namespace: str
    username: str
    groups: tuple[str, ...]
    object: dict[str, Any] | None
    old_object: dict[str, Any] | None
    dry_run: bool
    sub_resource: str = ""
    # userInfo.extra: what the authenticator attached, e.g. the node a pod-bound token belongs to.
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def object_name(self) -> str:
        """The object's name: `request.name`, or (a collection delete sends none) the object's own."""
        if self.name:
            return self.name
        for obj in (self.object, self.old_object):
            metadata = (obj or {}).get("metadata")
            if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
                return str(metadata["name"])
        return ""


def decode_json(body: bytes) -> Any:
    """The JSON value of a request body, or a ReviewError saying why it is not JSON."""
    if not body:
        raise ReviewError("empty body: expected an AdmissionReview (admission.k8s.io/v1) as JSON")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReviewError(f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ReviewError("body is nested too deeply") from exc


def _string(raw: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise ReviewError(f"{where}.{key} is missing")
        return ""
    if not isinstance(value, str):
        raise ReviewError(f"{where}.{key} must be a string, got {type(value).__name__}")
    return value


def _object(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReviewError(f"request.{key} must be an object or null, got {type(value).__name__}")
    return value


def parse_review(body: bytes) -> AdmissionRequest:
    """The AdmissionRequest inside `body`, or ReviewError."""
    return request_from_review(decode_json(body))


def request_from_review(review: Any) -> AdmissionRequest:
    """Check the envelope and the request fields the handlers rely on."""
    if not isinstance(review, dict):
        raise ReviewError(f"expected a JSON object (AdmissionReview), got {type(review).__name__}")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        raise ReviewError(
            f"expected apiVersion {API_VERSION} and kind {KIND}, "
            f"got {str(review.get('apiVersion'))[:60]!r} / {str(review.get('kind'))[:60]!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise ReviewError("request is missing or not an object")
    uid = _string(request, "uid", "request", required=True)
    if not uid or len(uid) > MAX_UID_LENGTH:
        raise ReviewError(f"request.uid must be a non-empty string of at most {MAX_UID_LENGTH} characters")
    kind = request.get("kind")
    if not isinstance(kind, dict):
        raise ReviewError("request.kind is missing or not an object")
    operation = _string(request, "operation", "request", required=True)
    user = request.get("userInfo", {})
    if not isinstance(user, dict):
        raise ReviewError("request.userInfo must be an object")
    groups = user.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ReviewError("request.userInfo.groups must be a list of strings")
    extra = user.get("extra") or {}
    if not isinstance(extra, dict) or not all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in extra.values()
    ):
        raise ReviewError("request.userInfo.extra must be an object of string lists")
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise ReviewError("request.dryRun must be a boolean")
    return AdmissionRequest(
        uid=uid,
        group=_string(kind, "group", "request.kind"),
        version=_string(kind, "version", "request.kind"),
        kind=_string(kind, "kind", "request.kind", required=True),
        operation=operation,
        name=_string(request, "name", "request"),
        namespace=_string(request, "namespace", "request"),
        username=_string(user, "username", "request.userInfo"),
        groups=tuple(groups),
        object=_object(request, "object"),
        old_object=_object(request, "oldObject"),
        dry_run=dry_run,
        sub_resource=_string(request, "subResource", "request"),
        extra={str(k): tuple(v) for k, v in extra.items()},
    )
