"""Who may write a Node's protected keys, by identity: the reconciler, bound to its own node.

Every reconciler pod runs as the same ServiceAccount, so RBAC alone would let one compromised GPU
node report for the whole fleet. The token a pod gets from the kubelet is bound to that pod, and
the API server puts the pod's node in `userInfo.extra["authentication.kubernetes.io/node-name"]`
(feature ServiceAccountTokenPodNodeInfo: alpha in Kubernetes 1.29, on by default since 1.30, GA in
1.32). Like the API server's NodeRestriction for kubelets, a reconciler identity may then write
only that node, and never the desired layout (but for one exception, off by default: the configured
default layout on a node that has none, as the GPU Operator labels unlabelled MIG-capable nodes
`all-disabled`). A token with no node (one made by `kubectl create
token`, or any token on a cluster older than 1.30) is refused unless `allow_unbound` is set.

The same rules run in the API server itself (`webhook.node_policy`), which is what judges a
reconciler's writes to its own node: those never reach this webhook. These are for what does.
"""

from __future__ import annotations

from collections.abc import Collection

from migcore import keys
from webhook.cel import NODE_NAME_EXTRA
from webhook.verdict import CODE_FORBIDDEN, Verdict

UNBOUND_FLAG = "--allow-unbound-reconciler-tokens"


def bound_node(extra: dict[str, tuple[str, ...]]) -> str | None:
    """The node a pod-bound ServiceAccount token belongs to, from `userInfo.extra` (None: unbound)."""
    values = extra.get(NODE_NAME_EXTRA, ())
    return values[0] if len(values) == 1 and values[0] else None


def unbound_message(username: str, node: str) -> str:
    return (
        f"{username} may not change node {node}: its token is not bound to a node. mig-guard takes the "
        "reconciler's writes only with its pod's own token (bound to the pod, carrying the pod's node "
        "since Kubernetes 1.30), not one made by `kubectl create token`. On clusters whose tokens carry "
        f"no node name, allow unbound tokens ({UNBOUND_FLAG}, chart: reconciler.allowUnboundTokens)"
    )


def other_node_message(username: str, own: str, node: str) -> str:
    return (
        f"{username} runs on node {own} and may not change node {node}: "
        "a reconciler writes only the node its pod runs on"
    )


def layout_message(username: str, node: str) -> str:
    return (
        f"{username} may not change {keys.LABEL_MIG_CONFIG} on node {node}: the desired layout is set by "
        "admins and GitOps tools; the reconciler applies it and reports"
    )


class ReconcilerIdentities:
    """The reconciler's user names and whether tokens without a node are accepted."""

    def __init__(self, users: Collection[str], allow_unbound: bool = False, default_config: str = "") -> None:
        self.users = frozenset(users)
        self.allow_unbound = allow_unbound
        self.default_config = default_config

    def defaults(self, old: str | None, new: str | None) -> bool:
        """The write gives a node without a layout the configured default one."""
        return bool(self.default_config) and old is None and new == self.default_config

    def __contains__(self, username: object) -> bool:
        return username in self.users

    def verdict(self, username: str, node: str | None, target: str, layout_changed: bool) -> Verdict:
        """The verdict on a write of node `target` by reconciler identity `username` whose credential
        is bound to `node` (None: not bound)."""
        if node is None and not self.allow_unbound:
            return Verdict.deny(CODE_FORBIDDEN, unbound_message(username, target))
        if node is not None and node != target:
            return Verdict.deny(CODE_FORBIDDEN, other_node_message(username, node, target))
        if layout_changed:
            return Verdict.deny(CODE_FORBIDDEN, layout_message(username, target))
        return Verdict.allow()
