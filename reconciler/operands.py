"""Pause and restore the GPU Operator's operands on this node the way mig-manager does.

The operator schedules its DaemonSets (device plugin, GFD, DCGM, ...) with node selectors on
`nvidia.com/gpu.deploy.<component>`. Setting such a label to `paused-for-mig-change` makes
the DaemonSet controller remove that operand from the node; restoring the exact previous value
brings it back. A label that is `false` (admin turned the operand off) or absent is never
touched: the restore must not create what was not there (mig-parted-internals §3.3, §7.8).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Operands:
    """Pauses operands on one node and waits for their pods to go."""

    node: NodeState
    namespace: str = keys.GPU_OPERATOR_NAMESPACE
    poll_seconds: float = 0.5

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
        left: list[str] = []
        for component, selector in COMPONENTS.items():
            if label_of(component) not in paused or selector is None:
                continue
            pods = core.list_namespaced_pod(self.namespace, label_selector=selector, field_selector=on_node)
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
