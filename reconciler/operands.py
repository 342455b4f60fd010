"""Pause and restore the GPU Operator's operands on this node the way mig-manager does.

The operator schedules its DaemonSets (device plugin, GFD, DCGM, ...) with node selectors on
`nvidia.com/gpu.deploy.<component>`. Setting such a label to `paused-for-mig-change` makes
the DaemonSet controller remove that operand from the node; restoring the exact previous value
brings it back. A label that is `false` (admin turned the operand off) or absent is never
touched: the restore must not create what was not there (mig-parted-internals §3.3, §7.8).

Like mig-manager, the operator's validators are handled too: the CUDA and plugin validator pods
are deleted before a change (they hold a GPU, and validated the old layout), the operator
validator pod after it (its DaemonSet starts it again, which re-runs every validation).

The operands' namespace (`gpu-operator`; `nvidia-gpu-operator` on OpenShift) is where the
operator's DaemonSets are (`detect_namespace`), unless given (`--operands-namespace`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s

from kube.errors import is_not_found
from migcore import keys
from reconciler.node_state import NodeState

log = logging.getLogger(__name__)

# Components mig-manager pauses (reconfigure.go), with the label selector of their pods.
COMPONENTS: dict[str, str | None] = {
    "device-plugin": "app=nvidia-device-plugin-daemonset",
    "gpu-feature-discovery": "app=gpu-feature-discovery",
    "dcgm-exporter": "app=nvidia-dcgm-exporter",
    "dcgm": "app=nvidia-dcgm",
    "nvsm": None,  # mig-manager does not wait for nvsm pods either
    "client": None,  # third-party clients: DaemonSet pods selecting on the label, any namespace
}
CLIENT_LABEL = keys.LABEL_GPU_DEPLOY_PREFIX + "client"
# The operator's validator pods (app label): deleted before a change, and after it.
VALIDATORS_BEFORE = ("nvidia-cuda-validator", "nvidia-device-plugin-validator")
VALIDATOR_AFTER = "nvidia-operator-validator"
# DaemonSets that only the GPU Operator runs (app label): where they are is the operands' namespace.
OPERATOR_DAEMONSETS = (
    *(s.removeprefix("app=") for s in COMPONENTS.values() if s is not None),
    VALIDATOR_AFTER,
    "nvidia-container-toolkit-daemonset",
    "nvidia-driver-daemonset",
)
AUTO_NAMESPACE = "auto"
DETECT_AGAIN_SECONDS = 60.0


class OperandTimeoutError(Exception):
    """Operand pods still on the node after the timeout; the message names them."""


def label_of(component: str) -> str:
    return keys.LABEL_GPU_DEPLOY_PREFIX + component


def to_pause(labels: Mapping[str, str]) -> dict[str, str]:
    """The operand labels to pause, with the values to restore later.

    Present and not `false` (and, for `client`, non-empty). A label already paused was paused by
    an interrupted run that left no record: `true` is what the operator had set.
    """
    out: dict[str, str] = {}
    for component in COMPONENTS:
        key = label_of(component)
        value = labels.get(key)
        if value is None or value == "false" or (component == "client" and value == ""):
            continue
        out[key] = "true" if value == keys.PAUSED_FOR_MIG_CHANGE else value
    return out


def detect_namespace(api: Any) -> str | None:
    """The namespace of the GPU Operator's DaemonSets (the one with most of them), None if none."""
    selector = f"app in ({','.join(OPERATOR_DAEMONSETS)})"
    apps: Any = k8s.AppsV1Api(api)
    items = apps.list_daemon_set_for_all_namespaces(label_selector=selector).items
    counts = Counter(str(ds.metadata.namespace) for ds in items)
    if not counts:
        return None
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


@dataclass
class Operands:
    """Pauses operands on one node and waits for their pods to go; deletes the validator pods.

    `namespace` AUTO_NAMESPACE: found from the operator's DaemonSets (looked for again at most
    once a minute while none is found; `keys.GPU_OPERATOR_NAMESPACE` meanwhile)."""

    node: NodeState
    namespace: str = AUTO_NAMESPACE
    poll_seconds: float = 0.5
    _found: str | None = None
    _looked_at: float | None = None

    def where(self) -> str:
        """The operands' namespace now."""
        if self.namespace != AUTO_NAMESPACE:
            return self.namespace
        now = time.monotonic()
        if self._found is None and (self._looked_at is None or now - self._looked_at >= DETECT_AGAIN_SECONDS):
            self._looked_at = now
            self._found = detect_namespace(self.node.core.api_client)
            if self._found is not None:
                log.info("GPU Operator operands found in namespace %s", self._found)
        return self._found or keys.GPU_OPERATOR_NAMESPACE

    def missing(self, paused: Mapping[str, str]) -> list[str]:
        """Paused operand labels (that mig-manager would wait for) whose DaemonSet is not in the
        operands' namespace: the labels say the operand runs, but it is not found where looked."""
        apps: Any = k8s.AppsV1Api(self.node.core.api_client)
        namespace = self.where()
        out: list[str] = []
        for component, selector in COMPONENTS.items():
            if label_of(component) not in paused or selector is None:
                continue
            if not apps.list_namespaced_daemon_set(namespace, label_selector=selector).items:
                out.append(label_of(component))
        return out

    def _delete_pods(self, app: str) -> list[str]:
        core: Any = self.node.core
        namespace = self.where()
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"app={app}", field_selector=f"spec.nodeName={self.node.node_name}"
        ).items
        deleted: list[str] = []
        for pod in pods:
            try:
                core.delete_namespaced_pod(pod.metadata.name, namespace)
            except k8s.ApiException as exc:
                if not is_not_found(exc):
                    raise
            deleted.append(f"{namespace}/{pod.metadata.name}")
        return deleted

    def remove_validators(self) -> list[str]:
        """Delete the CUDA and plugin validator pods on this node (before a change)."""
        return [name for app in VALIDATORS_BEFORE for name in self._delete_pods(app)]

    def restart_validator(self) -> list[str]:
        """Delete the operator validator pod on this node (after a change): its DaemonSet starts
        it again, which re-runs the validations on the new layout."""
        return self._delete_pods(VALIDATOR_AFTER)

    def pause(self, previous: Mapping[str, str]) -> None:
        """Set each label in `previous` to `paused-for-mig-change` (one merge patch)."""
        if previous:
            self.node.patch_metadata(labels=dict.fromkeys(previous, keys.PAUSED_FOR_MIG_CHANGE))
            log.info("paused operands: %s", ", ".join(sorted(previous)))

    def restore(self, previous: Mapping[str, str]) -> None:
        """Put back the exact previous values of the labels this run paused.

        A label that someone changed away from `paused-for-mig-change` meanwhile is theirs now.
        """
        labels = self.node.labels()
        back = {k: v for k, v in previous.items() if labels.get(k) == keys.PAUSED_FOR_MIG_CHANGE}
        if back:
            self.node.patch_metadata(labels=back)
            log.info("restored operands: %s", ", ".join(f"{k}={v}" for k, v in sorted(back.items())))

    def remaining_pods(self, paused: Mapping[str, str]) -> list[str]:
        """`namespace/name` of the paused operands' pods still on this node."""
        core: Any = self.node.core
        on_node = f"spec.nodeName={self.node.node_name}"
        namespace = self.where()
        left: list[str] = []
        for component, selector in COMPONENTS.items():
            if label_of(component) not in paused or selector is None:
                continue
            pods = core.list_namespaced_pod(namespace, label_selector=selector, field_selector=on_node)
            left.extend(f"{p.metadata.namespace}/{p.metadata.name}" for p in pods.items)
        if CLIENT_LABEL in paused:
            for pod in core.list_pod_for_all_namespaces(field_selector=on_node).items:
                selector_keys = (pod.spec.node_selector or {}) if pod.spec else {}
                owners = pod.metadata.owner_references or []
                if CLIENT_LABEL in selector_keys and any(o.kind == "DaemonSet" for o in owners):
                    left.append(f"{pod.metadata.namespace}/{pod.metadata.name}")
        return left

    def wait_gone(self, paused: Mapping[str, str], timeout: float) -> None:
        """Wait until the paused operands' pods left the node; raise OperandTimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.remaining_pods(paused)
            if not left:
                return
            if time.monotonic() >= deadline:
                raise OperandTimeoutError(
                    f"GPU operand pods still on the node after {timeout:g}s: {', '.join(sorted(left))}"
                )
            time.sleep(self.poll_seconds)


def describe(previous: Mapping[str, str]) -> str:
    return ", ".join(
        f"{k.removeprefix(keys.LABEL_GPU_DEPLOY_PREFIX)}={v}" for k, v in sorted(previous.items())
    )
