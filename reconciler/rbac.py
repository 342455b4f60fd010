"""The API permissions the node agent needs, as RBAC rules (the chart's ClusterRole mirrors them;
the end-to-end tests run the agent with exactly these, so a missing verb fails a test)."""

from __future__ import annotations

from typing import Any, Final

from reconciler.host_clients import DEFAULT_CLIENTS_CONFIGMAP

RULES: Final[tuple[dict[str, Any], ...]] = (
    # Its own Node: read and watch (field selector), labels/annotations/taints/cordon.
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
    # The MIGConfigReady condition.
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    # Pods on the node (workloads, operand pods; watched for the usage report) and evicting them.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
    # Naming the PodDisruptionBudget that blocks an eviction.
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["list"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    # Where the GPU Operator's DaemonSets are (the operands' namespace; operands that exist).
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["list"]},
    # The mig-parted config ConfigMap (a namespaced Role suffices when it lives in one namespace).
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
)

# With a rollout budget (reconciler.rollout), in the release namespace only (a Role): slots, failed
# changes and the pause switch are Leases there. Their names are made per pool and node, so RBAC
# cannot narrow them by name.
ROLLOUT_RULES: Final[tuple[dict[str, Any], ...]] = (
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "list", "watch", "create", "update", "delete"],
    },
)

# In the GPU Operator's namespace only (a Role there): its validator pods deleted, its host GPU
# clients list read by name.
OPERATOR_RULES: Final[tuple[dict[str, Any], ...]] = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [DEFAULT_CLIENTS_CONFIGMAP],
        "verbs": ["get"],
    },
)
