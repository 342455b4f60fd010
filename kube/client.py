"""The Kubernetes API client both parts use: built from a kubeconfig, else the pod's in-cluster
credentials, else the user's default kubeconfig; for the reconciler, retrying transient errors.

Transient errors are retried where they happen, with backoff, so that one overloaded API server,
one webhook timing out or one dropped connection never fails a change (and rolls GPUs back) or
stops the agent. `RetryingApiClient` sends each request that fails with a 5xx, a 429 (API Priority
and Fairness; an Eviction's 429 is a PodDisruptionBudget's answer and goes back to the evictor), a
timeout or a broken connection again after 0.2 s, 0.4 s, ... (at most `max_delay` apart) until
`budget` seconds have passed; then the error is raised as it came. Every request also gets a
timeout, so a server that stops answering is an error, not a hang (watches excepted: they wait by
design). Conflicts (409) are not resent blindly: a guarded write must be recomputed from a fresh
read, which `reconciler.node_state.NodeState.apply` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from kube.errors import TRANSIENT_STATUSES, is_transient

log = logging.getLogger("mig_guard.kube.client")


def api_client(kubeconfig: str | Path | None = None) -> Any:
    """An ApiClient from `kubeconfig`, else in-cluster, else the default kubeconfig. Raises what
    the client raises for a missing or bad kubeconfig. Build one per process after any fork
    (connection pools do not survive one)."""
    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request is retried (`budget`, seconds) and how long it may take."""

    budget: float = 60.0
    first_delay: float = 0.2
    max_delay: float = 5.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


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
