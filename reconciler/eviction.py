"""Move workloads off GPUs that are about to change, the way `kubectl drain` does: through the
Eviction API, so PodDisruptionBudgets are respected, then wait until the pods are gone.

A 429 means a PodDisruptionBudget forbids the eviction right now; it is retried until the
timeout, and the failure names the budget and the pod, which is what an admin needs to act.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

from kube.errors import is_conflict, is_not_found, is_too_many_requests
from reconciler.workloads import PodRef

log = logging.getLogger(__name__)


class EvictionError(Exception):
    """Eviction did not complete; the message is the sentence for the reason annotation."""


@dataclass
class Evictor:
    api: Any
    timeout: float = 300.0
    poll_seconds: float = 0.5

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.api)

    def blocking_budget(self, pod: PodRef) -> str | None:
        """`namespace/name` of a PodDisruptionBudget whose selector matches the pod, if any."""
        policy: Any = k8s.PolicyV1Api(self.api)
        try:
            labels = self.core.read_namespaced_pod(pod.name, pod.namespace).metadata.labels or {}
            budgets = policy.list_namespaced_pod_disruption_budget(pod.namespace).items
        except ApiException:
            return None
        for pdb in budgets:
            selector = pdb.spec.selector if pdb.spec else None
            if selector is not None and _selects(selector, labels):
                return f"{pdb.metadata.namespace}/{pdb.metadata.name}"
        return None

    def evict(self, pods: Sequence[PodRef]) -> list[PodRef]:
        """Evict `pods` and wait until they are gone; return them. Raise EvictionError on timeout."""
        deadline = time.monotonic() + self.timeout
        uids: dict[PodRef, str] = {}
        for pod in pods:
            try:
                uids[pod] = self.core.read_namespaced_pod(pod.name, pod.namespace).metadata.uid
            except ApiException as exc:
                if not is_not_found(exc):
                    raise
        pending = list(uids)
        while pending:
            still: list[PodRef] = []
            for pod in pending:
                body = {
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": pod.name, "namespace": pod.namespace},
                    "deleteOptions": {"preconditions": {"uid": uids[pod]}},
                }
                try:
                    self.core.create_namespaced_pod_eviction(pod.name, pod.namespace, body)
                    log.info("evicted pod %s", pod)
                except ApiException as exc:
                    if is_not_found(exc) or is_conflict(exc):  # gone, or replaced by a new pod (uid)
                        continue
                    if not is_too_many_requests(exc):  # a PodDisruptionBudget's answer: try again
                        raise
                    still.append(pod)
            pending = still
            if not pending:
                break
            if time.monotonic() >= deadline:
                pod = pending[0]
                budget = self.blocking_budget(pod)
                if budget:
                    raise EvictionError(f"PodDisruptionBudget {budget} blocks eviction of pod {pod}")
                raise EvictionError(
                    f"eviction of pod {pod} refused for {self.timeout:g}s (too many requests)"
                )
            time.sleep(self.poll_seconds)
        self.wait_gone(uids, deadline)
        return list(uids)

    def wait_gone(self, uids: dict[PodRef, str], deadline: float) -> None:
        while True:
            left = [pod for pod, uid in uids.items() if self._exists(pod, uid)]
            if not left:
                return
            if time.monotonic() >= deadline:
                raise EvictionError(
                    f"evicted pods still terminating after {self.timeout:g}s: {', '.join(map(str, left))}"
                )
            time.sleep(self.poll_seconds)

    def _exists(self, pod: PodRef, uid: str) -> bool:
        try:
            return bool(self.core.read_namespaced_pod(pod.name, pod.namespace).metadata.uid == uid)
        except ApiException as exc:
            if is_not_found(exc):
                return False
            raise


def _selects(selector: Any, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) matching `labels`; empty selects all."""
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.match_expressions or []:
        present = expr.key in labels
        values = expr.values or []
        if expr.operator == "In" and labels.get(expr.key) not in values:
            return False
        if expr.operator == "NotIn" and present and labels[expr.key] in values:
            return False
        if expr.operator == "Exists" and not present:
            return False
        if expr.operator == "DoesNotExist" and present:
            return False
    return True
