"""The canonical webhook configurations: rules, CEL `matchConditions`, knobs.

One place for the chart and the tests. Both webhooks see Nodes through the main resource and the
status subresource (a status write can change labels and annotations too). The match conditions
(`webhook.cel`, bounded cost) make the API server call the webhook only when
`nvidia.com/mig.config` or a protected key (`keys.is_protected_key`) is set on CREATE or changes
on UPDATE, and never for a reconciler writing its own node (the ValidatingAdmissionPolicy of
`webhook.node_policy` judges those in the API server): kubelet heartbeats, GPU Feature Discovery
relabels and the reconciler's reports never reach the webhook.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from kube.config_source import ConfigMapRef
from migcore import keys
from webhook import cel

VALIDATE_PATH = "/validate"
MUTATE_PATH = "/mutate"
NODE_VALIDATOR = "nodes.validate.mig-guard.io"
NODE_MUTATOR = "nodes.mutate.mig-guard.io"
CONFIGMAP_GUARD = "configmap.validate.mig-guard.io"
DEFAULT_TIMEOUT_SECONDS = 5

NODE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"],
        "resources": ["nodes", "nodes/status"],
        "scope": "Cluster",
    }
]

CONFIGMAP_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "operations": ["UPDATE", "DELETE"],
        "resources": ["configmaps"],
        "scope": "Namespaced",
    }
]

# Labels looked up directly; any other key under mig-guard.io/ is found by a (bounded) scan.
WATCHED_LABELS = (keys.LABEL_MIG_CONFIG, keys.LABEL_MIG_STATE)


def _watched_set() -> str:
    direct = [cel.has_key("object", "labels", k) for k in WATCHED_LABELS]
    scans = [cel.prefix_set("labels", keys.PREFIX), cel.prefix_set("annotations", keys.PREFIX)]
    big = [cel.large("object", "labels"), cel.large("object", "annotations")]
    return f"{cel.any_of(direct)} || ({cel.any_of(big)} ? true : {cel.any_of(scans)})"


def _watched_changed() -> str:
    direct = [cel.key_changed("labels", k) for k in WATCHED_LABELS]
    scans = [cel.prefix_changed("labels", keys.PREFIX), cel.prefix_changed("annotations", keys.PREFIX)]
    big = [cel.large(o, f) for o in ("object", "oldObject") for f in ("labels", "annotations")]
    return f"{cel.any_of(direct)} || ({cel.any_of(big)} ? true : {cel.any_of(scans)})"


def watched_keys_change() -> str:
    """CEL: the layout label or a protected key is set (CREATE) or changed (UPDATE); always true
    for a Node with more than `cel.LARGE_MAP_ENTRIES` labels or annotations."""
    return f"request.operation == 'CREATE' ? ({_watched_set()}) : ({_watched_changed()})"


def own_node_reconciler(users: str, allow_unbound: str) -> str:
    """CEL: one of the reconciler identities (`users`, a CEL list) writing the node its token is
    bound to (or any node, when `allow_unbound` is the CEL literal true and the token is unbound)."""
    unbound = f"({allow_unbound} && !{cel.bound_to_a_node()})"
    return f"(request.userInfo.username in {users} && ({unbound} || {cel.bound_node_is('object.metadata.name')}))"


def node_conditions(users: str | None, allow_unbound: str) -> list[dict[str, str]]:
    """The node match conditions from CEL fragments (the chart generator passes placeholders)."""
    conditions = []
    if users is not None:
        conditions.append(
            {
                "name": "not-a-reconciler-on-its-own-node",
                "expression": f"!{own_node_reconciler(users, allow_unbound)}",
            }
        )
    conditions.append({"name": "mig-config-or-protected-key-changes", "expression": watched_keys_change()})
    return conditions


def node_match_conditions(
    reconciler_users: Sequence[str] = (), allow_unbound: bool = False
) -> list[dict[str, str]]:
    """CEL: a write of the layout or of a protected key, by anyone but a reconciler on its own node."""
    users = cel.string_list(reconciler_users) if reconciler_users else None
    return node_conditions(users, cel.literal(allow_unbound))


def configmap_match_conditions(ref: ConfigMapRef) -> list[dict[str, str]]:
    """CEL: the watched ConfigMap, deleted or with its config key changed.

    The name comes from the object, not `request.name`: a collection delete sends no name (the
    field is then absent, and reading it would be an error), only the ConfigMap in `oldObject`.
    """
    key = cel.quote(ref.key)
    data_changed = (
        "!has(object.data) || !has(oldObject.data) || "
        f"!({key} in object.data) || !({key} in oldObject.data) || object.data[{key}] != oldObject.data[{key}]"
    )
    name = "(request.operation == 'DELETE' ? oldObject.metadata.name : object.metadata.name)"
    return [
        {
            "name": "watched-configmap",
            "expression": f"request.namespace == {cel.quote(ref.namespace)} && {name} == {cel.quote(ref.name)}",
        },
        {"name": "config-key-changes", "expression": f"request.operation == 'DELETE' || ({data_changed})"},
    ]


def url_client_config(url: str, ca_pem: bytes) -> dict[str, Any]:
    return {"url": url, "caBundle": base64.b64encode(ca_pem).decode()}


def service_client_config(
    namespace: str, service: str, path: str, ca_pem: bytes, port: int = 443
) -> dict[str, Any]:
    return {
        "service": {"namespace": namespace, "name": service, "path": path, "port": port},
        "caBundle": base64.b64encode(ca_pem).decode(),
    }


def _webhook(
    name: str,
    client_config: dict[str, Any],
    rules: list[dict[str, Any]],
    conditions: list[dict[str, str]],
    *,
    failure_policy: str,
    timeout_seconds: int,
) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": client_config,
        "rules": rules,
        "matchConditions": conditions,
        "failurePolicy": failure_policy,
        "sideEffects": "None",  # no side effects at all: dry-run requests are judged the same
        "timeoutSeconds": timeout_seconds,
        "admissionReviewVersions": ["v1"],
        "matchPolicy": "Equivalent",
    }


def validating_configuration(
    name: str,
    client_config: dict[str, Any],
    configmap: ConfigMapRef | None,
    *,
    failure_policy: str = "Fail",
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
    reconciler_users: Sequence[str] = (),
    allow_unbound: bool = False,
) -> dict[str, Any]:
    """ValidatingWebhookConfiguration: the Node rules, plus the ConfigMap guard when `configmap`.

    `client_config` must point at the server root's `/validate` (url or service path).
    """
    hooks = [
        _webhook(
            NODE_VALIDATOR,
            client_config,
            NODE_RULES,
            node_match_conditions(reconciler_users, allow_unbound),
            failure_policy=failure_policy,
            timeout_seconds=timeout_seconds,
        )
    ]
    if configmap is not None:
        hooks.append(
            _webhook(
                CONFIGMAP_GUARD,
                client_config,
                CONFIGMAP_RULES,
                configmap_match_conditions(configmap),
                failure_policy=failure_policy,
                timeout_seconds=timeout_seconds,
            )
        )
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": hooks,
    }


def mutating_configuration(
    name: str,
    client_config: dict[str, Any],
    *,
    failure_policy: str = "Fail",
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
    reconciler_users: Sequence[str] = (),
    allow_unbound: bool = False,
) -> dict[str, Any]:
    """MutatingWebhookConfiguration: the hold patch (`client_config` points at `/mutate`)."""
    hook = _webhook(
        NODE_MUTATOR,
        client_config,
        NODE_RULES,
        node_match_conditions(reconciler_users, allow_unbound),
        failure_policy=failure_policy,
        timeout_seconds=timeout_seconds,
    )
    hook["reinvocationPolicy"] = "IfNeeded"
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [hook],
    }
