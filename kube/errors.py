"""What a failed Kubernetes API call means: transient (the same request may work a moment later:
a 5xx, a 429, a timeout, a dropped connection) or an answer to act on (a conflict, a missing
object, a refusal), and the short sentence a reason annotation or a log line gives for it."""

from __future__ import annotations

import http.client
import json

import urllib3
from kubernetes.client import ApiException

HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_GONE = 410
HTTP_TOO_MANY_REQUESTS = 429
TRANSIENT_STATUSES = frozenset({HTTP_TOO_MANY_REQUESTS, 500, 502, 503, 504})
# What urllib3 and the socket layer raise for a timeout, a refused or dropped connection.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
# Everything a Kubernetes API call raises when the API server answers an error or not at all.
API_ERRORS: tuple[type[BaseException], ...] = (ApiException, *TRANSPORT_ERRORS)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status the API server answered with (None: no answer, or not an API error)."""
    return (exc.status or None) if isinstance(exc, ApiException) else None


def is_transient(exc: BaseException) -> bool:
    """An error that the same request may not meet again a moment later."""
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES or not exc.status  # 0: no answer (TLS, connection)
    return isinstance(exc, TRANSPORT_ERRORS)


def is_conflict(exc: BaseException) -> bool:
    """409: the object changed since it was read (a guarded write must be recomputed), or, for an
    Eviction with a uid precondition, the pod was replaced."""
    return status_of(exc) == HTTP_CONFLICT


def is_not_found(exc: BaseException) -> bool:
    return status_of(exc) == HTTP_NOT_FOUND


def is_gone(exc: BaseException) -> bool:
    """410: a watch's resourceVersion is too old; list again."""
    return status_of(exc) == HTTP_GONE


def is_too_many_requests(exc: BaseException) -> bool:
    """429: API Priority and Fairness, or, for an Eviction, a PodDisruptionBudget's answer."""
    return status_of(exc) == HTTP_TOO_MANY_REQUESTS


def describe(exc: BaseException) -> str:
    """`Kubernetes API 403 Forbidden: <the server's message>`: short enough for a reason."""
    if not isinstance(exc, ApiException):
        return f"Kubernetes API unreachable: {exc}"
    message = ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message", "") if isinstance(body, dict) else ""
    except (TypeError, ValueError):
        pass
    return f"Kubernetes API {exc.status} {exc.reason}" + (f": {message}" if message else "")
