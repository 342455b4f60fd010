"""Transient Kubernetes API errors are retried where they happen, with backoff, so that one
overloaded API server, one webhook timing out or one dropped connection never fails a change
(and rolls GPUs back) or stops the agent.

`RetryingApiClient` is the kubernetes `ApiClient` every part of the reconciler talks through:
each request that fails with a 5xx, a 429 (API Priority and Fairness; an Eviction's 429 is a
PodDisruptionBudget's answer and goes back to the evictor), a timeout or a broken connection is
sent again after 0.2 s, 0.4 s, ... (at most `max_delay` apart) until `budget` seconds have passed;
then the error is raised as it came. Every request also gets a timeout, so a server that stops
answering is an error, not a hang (watches excepted: they wait by design). Conflicts (409) are
not resent blindly: a guarded write must be recomputed from a fresh read, which
`NodeState.apply` does.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client import ApiException

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# What urllib3 and the socket layer raise for a timeout, a refused or dropped connection.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
# Everything a Kubernetes API call raises when the API server answers an error or not at all.
API_ERRORS: tuple[type[BaseException], ...] = (ApiException, *TRANSPORT_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request is retried (`budget`, seconds) and how long it may take."""

    budget: float = 60.0
    first_delay: float = 0.2
    max_delay: float = 5.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


def is_transient(exc: BaseException) -> bool:
    """An error that the same request may not meet again a moment later."""
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES or not exc.status  # 0: no answer (TLS, connection)
    return isinstance(exc, TRANSPORT_ERRORS)


def _is_eviction(url: str) -> bool:
    return url.split("?", 1)[0].endswith("/eviction")


def _is_watch(url: str) -> bool:
    _, _, query = url.partition("?")
    return any(part in ("watch=true", "watch=True", "watch=1") for part in query.split("&"))


class RetryingApiClient(k8s.ApiClient):
    """An ApiClient that retries transient failures of every request (see the module)."""

    def __init__(
        self,
        configuration: Any,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(configuration)
        self.policy = policy or RetryPolicy()
        self._sleep = sleep

    def call_api(
        self,
        method: str,
        url: str,
        header_params: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        policy = self.policy
        if _request_timeout is None and not _is_watch(url):
            _request_timeout = (policy.connect_timeout, policy.read_timeout)
        deadline = time.monotonic() + policy.budget
        delay = policy.first_delay
        while True:
            failure: BaseException | None = None
            try:
                response = super().call_api(method, url, header_params, body, post_params, _request_timeout)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failure = exc
            else:
                transient = response.status in TRANSIENT_STATUSES and not (
                    response.status == 429 and _is_eviction(url)
                )
                if not transient or time.monotonic() + delay > deadline:
                    return response
                response.read()  # type: ignore[no-untyped-call]  # frees the connection for the next try
            if time.monotonic() + delay > deadline:
                assert failure is not None
                raise failure
            log.warning(
                "%s %s: %s; retrying in %.1fs",
                method,
                url.split("?", 1)[0],
                failure or f"HTTP {response.status}",
                delay,
            )
            self._sleep(delay)
            delay = min(delay * 2, policy.max_delay)


def retrying(api: Any, policy: RetryPolicy | None = None) -> RetryingApiClient:
    """`api` (its configuration and default headers) as a RetryingApiClient; `api` itself if it
    already is one (its own policy stays)."""
    if isinstance(api, RetryingApiClient):
        return api
    out = RetryingApiClient(api.configuration, policy)
    out.default_headers.update(getattr(api, "default_headers", {}))
    return out
