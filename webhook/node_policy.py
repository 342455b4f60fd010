"""Who may write a Node's protected keys, as a ValidatingAdmissionPolicy the API server evaluates
itself (CEL; admissionregistration.k8s.io/v1, GA since Kubernetes 1.30).

The identity rules need no MIG model, so they need no webhook: the API server judges them in
process, for every write of a Node (main resource and status subresource), also while the
webhook is down or after its configurations were deleted. Together they are what
`webhook.writers` and rule 5 of `webhook.validation` check for the writes that reach the webhook:

- a reconciler identity writes only the node its pod-bound token names (any field: like
  NodeRestriction for kubelets), never `nvidia.com/mig.config` (except, with a default layout
  configured, setting exactly that one on a node that has none); a token that names no node is
  refused unless `allow_unbound`;
- anyone else leaves the protected keys alone, except what the mutating webhook sets in an
  accepted change of the layout (state `pending`, the pending reason, a hold record by the
  webhook for that layout; on CREATE only a taint hold).

Every expression has a constant cost (direct key lookups, a size-capped regular expression), so
no Node, however large, can make it fail; a failing policy would refuse kubelet heartbeats too.
Keys under `mig-guard.io/` other than mig-guard's own are left to the webhook (a scan of all keys
would not have a constant cost), which judges them as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from migcore import keys
from migcore.hold import BY_WEBHOOK, pending_reason
from webhook import cel

HOLD_PATTERN = (
    r'^\\{"at":"[0-9TZ:.+-]*","by":"' + BY_WEBHOOK + r'","config":"[A-Za-z0-9._-]*",'
    r'"cordon":(true|false),"taint":(true|false)\\}$'
)
HOLD_MAX_CHARS = 400
PROTECTED_LABELS = (keys.LABEL_MIG_STATE,)
PROTECTED_ANNOTATIONS = (
    keys.ANNOTATION_GPUS,
    keys.ANNOTATION_REASON,
    keys.ANNOTATION_HOLD,
    keys.ANNOTATION_PROGRESS,
    keys.ANNOTATION_USAGE,
)
REASON_PREFIX = pending_reason("")


def _in(obj: str, field: str, key: str) -> str:
    return f"({quote_key(key)} in variables.{obj}{field.capitalize()})"


def quote_key(key: str) -> str:
    return cel.quote(key)


def _value(obj: str, field: str, key: str) -> str:
    return f"variables.{obj}{field.capitalize()}[{quote_key(key)}]"


def _changed(field: str, key: str) -> str:
    new, old = _in("new", field, key), _in("old", field, key)
    return f"({new} != {old} || ({new} && {_value('new', field, key)} != {_value('old', field, key)}))"


def _variables(users: str) -> list[dict[str, str]]:
    old_map = "request.operation == 'CREATE' || !has(oldObject.metadata.{f}) ? {{}} : oldObject.metadata.{f}"
    new_map = "has(object.metadata.{f}) ? object.metadata.{f} : {{}}"
    node_key = cel.quote(cel.NODE_NAME_EXTRA)
    layout = cel.quote(keys.LABEL_MIG_CONFIG)
    return [
        {"name": "reconciler", "expression": f"request.userInfo.username in {users}"},
        {
            "name": "boundNodes",
            "expression": f"has(request.userInfo.extra) && {node_key} in request.userInfo.extra ? "
            f"request.userInfo.extra[{node_key}] : []",
        },
        {"name": "newLabels", "expression": new_map.format(f="labels")},
        {"name": "oldLabels", "expression": old_map.format(f="labels")},
        {"name": "newAnnotations", "expression": new_map.format(f="annotations")},
        {"name": "oldAnnotations", "expression": old_map.format(f="annotations")},
        # The layout this request sets (empty when it sets none, or the same as before).
        {
            "name": "layout",
            "expression": f"{layout} in variables.newLabels && variables.newLabels[{layout}] != '' && "
            f"!({layout} in variables.oldLabels && variables.oldLabels[{layout}] == variables.newLabels[{layout}]) "
            f"? variables.newLabels[{layout}] : ''",
        },
    ]


def _mutation_allows(field: str, key: str) -> str:
    """What the mutating webhook may have set for `key` in an accepted change of the layout."""
    if key == keys.LABEL_MIG_STATE:
        return f"{_in('new', field, key)} && {_value('new', field, key)} == {cel.quote(keys.STATE_PENDING)}"
    if key == keys.ANNOTATION_REASON:
        return f"{_in('new', field, key)} && {_value('new', field, key)} == {cel.quote(REASON_PREFIX)} + variables.layout"
    if key == keys.ANNOTATION_HOLD:
        hold = _value("new", field, key)
        return (
            f"{_in('new', field, key)} && !(has(request.subResource) && request.subResource == 'status') && size({hold}) <= {HOLD_MAX_CHARS} && "
            f"{hold}.matches('{HOLD_PATTERN}') && "
            f"{hold}.contains('\"config\":\"' + variables.layout + '\"') && "
            f"(request.operation != 'CREATE' || {hold}.contains('\"cordon\":false,\"taint\":true'))"
        )
    return "false"


def _protected() -> list[tuple[str, str]]:
    return [("labels", k) for k in PROTECTED_LABELS] + [("annotations", k) for k in PROTECTED_ANNOTATIONS]


def validations(allow_unbound: str, default_config: str = "''") -> list[dict[str, str]]:
    """The checks, from CEL fragments (`allow_unbound` a CEL literal, `default_config` a CEL string:
    the layout a reconciler may give an unlabelled node, '' for none; the chart passes placeholders)."""
    name = "object.metadata.name"
    user = "request.userInfo.username"
    unbound = (
        f"{user} + ' may not change node ' + {name} + ': its token is not bound to a node. mig-guard "
        "takes the reconciler\\'s writes only with its pod\\'s own token (bound to the pod, carrying the "
        "pod\\'s node since Kubernetes 1.30), not one made by kubectl create token. On clusters whose tokens "
        "carry no node name, allow unbound tokens (--allow-unbound-reconciler-tokens, chart: "
        "reconciler.allowUnboundTokens)'"
    )
    other = (
        f"{user} + ' runs on node ' + variables.boundNodes[0] + ' and may not change node ' + {name} + "
        "': a reconciler writes only the node its pod runs on'"
    )
    layout = (
        f"{user} + ' may not change {keys.LABEL_MIG_CONFIG} on node ' + {name} + ': the desired layout is set by "
        "admins and GitOps tools; the reconciler applies it and reports'"
    )
    touched = cel.any_of(_changed(f, k) for f, k in _protected())
    each_ok = " && ".join(
        f"(!{_changed(f, k)} || (variables.layout != '' && {_mutation_allows(f, k)}))"
        for f, k in _protected()
    )
    names = ", ".join(f"({_changed(f, k)} ? {cel.quote(k)} : '')" for f, k in _protected())
    spoofed = (
        f"{user} + ' may not change ' + [{names}].filter(k, k != '').join(', ') + ' on node ' + {name} + "
        "': only the mig-guard reconciler sets these (they report the state of the GPUs). Change "
        f"{keys.LABEL_MIG_CONFIG} instead, and let the reconciler report progress.'"
    )
    return [
        {
            "expression": f"!variables.reconciler || {allow_unbound} || size(variables.boundNodes) > 0",
            "messageExpression": unbound,
            "reason": "Forbidden",
        },
        {
            "expression": f"!variables.reconciler || size(variables.boundNodes) == 0 || variables.boundNodes == [{name}]",
            "messageExpression": other,
            "reason": "Forbidden",
        },
        {
            "expression": f"!variables.reconciler || !{_changed('labels', keys.LABEL_MIG_CONFIG)} || "
            f"({default_config} != '' && !{_in('old', 'labels', keys.LABEL_MIG_CONFIG)} && "
            f"{_in('new', 'labels', keys.LABEL_MIG_CONFIG)} && "
            f"{_value('new', 'labels', keys.LABEL_MIG_CONFIG)} == {default_config})",
            "messageExpression": layout,
            "reason": "Forbidden",
        },
        {
            "expression": f"variables.reconciler || !{touched} || ({each_ok})",
            "messageExpression": spoofed,
            "reason": "Forbidden",
        },
    ]


RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"],
        "resources": ["nodes", "nodes/status"],
    }
]


def policy_spec(users: str, allow_unbound: str, default_config: str = "''") -> dict[str, Any]:
    """The policy's spec from CEL fragments (`users` a CEL list)."""
    return {
        # A policy that cannot be evaluated refuses the write: it never can fail on its own
        # (constant cost, every lookup guarded), so this only ever catches a broken install.
        "failurePolicy": "Fail",
        "matchConstraints": {"matchPolicy": "Equivalent", "resourceRules": RULES},
        "variables": _variables(users),
        "validations": validations(allow_unbound, default_config),
    }


def node_writers_policy(
    name: str, reconciler_users: Sequence[str], allow_unbound: bool = False, default_config: str = ""
) -> dict[str, Any]:
    """The ValidatingAdmissionPolicy for these reconciler identities."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": policy_spec(
            cel.string_list(reconciler_users), cel.literal(allow_unbound), cel.quote(default_config)
        ),
    }


def node_writers_binding(
    name: str, policy: str, object_selector: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Its binding: deny what the policy rejects (`object_selector` narrows it, e.g. in tests)."""
    spec: dict[str, Any] = {"policyName": policy, "validationActions": ["Deny"]}
    if object_selector is not None:
        spec["matchResources"] = {"objectSelector": object_selector}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": spec,
    }
