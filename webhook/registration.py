"""The canonical webhook configurations: rules, CEL `matchConditions`, knobs.

One place for the chart and the tests. The match conditions make the API server call the
webhook only when `nvidia.com/mig.config` or a protected key (`keys.is_protected_key`) is set
on CREATE or changes on UPDATE: kubelet heartbeats, GPU Feature Discovery relabels and other
patches never reach it. CEL notes: `metadata.labels`/`annotations` are absent when empty
(hence `has()`), and `oldObject` is null on CREATE (hence the operation test first).
"""

from __future__ import annotations

import base64
from typing import Any

from migcore import keys
from webhook.config_source import ConfigMapRef

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
        "resources": ["nodes"],
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

_LABEL_KEY = (
    f"(k == '{keys.LABEL_MIG_CONFIG}' || k == '{keys.LABEL_MIG_STATE}' || k.startsWith('{keys.PREFIX}'))"
)
_ANNOTATION_KEY = f"k.startsWith('{keys.PREFIX}')"


def _cel_string(text: str) -> str:
    if "'" in text or "\\" in text:
        raise ValueError(f"unexpected quote in {text!r}")
    return f"'{text}'"


def _set_on(field: str, predicate: str) -> str:
    new = f"object.metadata.{field}"
    return f"(has({new}) && {new}.exists(k, {predicate}))"


def _changed(field: str, predicate: str) -> str:
    new, old = f"object.metadata.{field}", f"oldObject.metadata.{field}"
    added_or_changed = (
        f"(has({new}) && {new}.exists(k, {predicate} && !(has({old}) && k in {old} && {old}[k] == {new}[k])))"
    )
    removed = f"(has({old}) && {old}.exists(k, {predicate} && !(has({new}) && k in {new})))"
    return f"{added_or_changed} || {removed}"


def node_match_conditions() -> list[dict[str, str]]:
    """CEL: the layout label or a protected key is set (CREATE) or changed (UPDATE)."""
    on_create = f"{_set_on('labels', _LABEL_KEY)} || {_set_on('annotations', _ANNOTATION_KEY)}"
    on_update = f"{_changed('labels', _LABEL_KEY)} || {_changed('annotations', _ANNOTATION_KEY)}"
    return [
        {
            "name": "mig-config-or-protected-key-changes",
            "expression": f"request.operation == 'CREATE' ? ({on_create}) : ({on_update})",
        }
    ]


def configmap_match_conditions(ref: ConfigMapRef) -> list[dict[str, str]]:
    """CEL: the watched ConfigMap, deleted or with its config key changed."""
    key = _cel_string(ref.key)
    data_changed = (
        "!has(object.data) || !has(oldObject.data) || "
        f"!({key} in object.data) || !({key} in oldObject.data) || object.data[{key}] != oldObject.data[{key}]"
    )
    return [
        {
            "name": "watched-configmap",
            "expression": f"request.namespace == {_cel_string(ref.namespace)} && request.name == {_cel_string(ref.name)}",
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
    failure_policy: str = "Fail",
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """ValidatingWebhookConfiguration: the Node rules, plus the ConfigMap guard when `configmap`.

    `client_config` must point at the server root's `/validate` (url or service path).
    """
    hooks = [
        _webhook(
            NODE_VALIDATOR,
            client_config,
            NODE_RULES,
            node_match_conditions(),
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
    failure_policy: str = "Fail",
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """MutatingWebhookConfiguration: the hold patch (`client_config` points at `/mutate`)."""
    hook = _webhook(
        NODE_MUTATOR,
        client_config,
        NODE_RULES,
        node_match_conditions(),
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
