"""Every write path judged, every reconciler bound to its own node (issue 10), end to end on the
real kube-apiserver: the webhook (both configurations, status subresource included) and the
ValidatingAdmissionPolicy, with the real kubectl, a kubelet-like writer (a `system:node:<name>`
client certificate) and ServiceAccount tokens from the TokenRequest API bound to a Pod on a node."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from cluster_webhook import NAMESPACE, RECONCILER_SA, Deployment, our_taints, read_node
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from devcluster.controlplane import ControlPlane
from devcluster.helpers import create_gpu_node, node_bound_client, service_account_client
from devcluster.kubeconfig import token_client
from devcluster.processes import wait_until
from devcluster.pytest_plugin import KubectlRunner
from migcore import keys
from reconciler.rbac import RULES
from webhook import node_policy

STATUS_TYPO = {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-1g.5gbb"}}}
STATUS_SPOOF = {
    "metadata": {
        "labels": {keys.LABEL_MIG_STATE: "success"},
        "annotations": {keys.ANNOTATION_REASON: "spoofed"},
    }
}
SPOOF_RULE = "only the mig-guard reconciler sets these"


def patch_status(kubectl: KubectlRunner, node: str, body: dict[str, Any]) -> Any:
    return kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps(body))


def test_the_commands_of_the_issue_are_denied_naming_the_rule(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    h100 = webhook.node("gpu-h100", product="NVIDIA-H100-80GB-HBM3")
    typo = patch_status(kubectl, h100, STATUS_TYPO)
    assert typo.returncode != 0
    assert 'nvidia.com/mig.config="all-1g.5gbb" is not a config' in typo.stderr
    assert "did you mean all-1g.5gb" in typo.stderr
    a30 = webhook.node("gpu-a30", product="NVIDIA-A30", gpu_count=4)
    spoof = patch_status(kubectl, a30, STATUS_SPOOF)
    assert spoof.returncode != 0
    assert SPOOF_RULE in spoof.stderr
    assert keys.LABEL_MIG_STATE in spoof.stderr and keys.ANNOTATION_REASON in spoof.stderr
    for name in (h100, a30):
        node = read_node(webhook.api, name)
        assert keys.LABEL_MIG_CONFIG not in node.metadata.labels
        assert keys.LABEL_MIG_STATE not in node.metadata.labels
        assert keys.ANNOTATION_REASON not in (node.metadata.annotations or {})


def test_the_status_subresource_gets_the_same_answers_as_the_node(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    a30 = webhook.node("status-a30", product="NVIDIA-A30", gpu_count=4)
    misfit = patch_status(kubectl, a30, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}}})
    assert misfit.returncode != 0
    assert "does not fit node" in misfit.stderr
    # A valid layout is accepted and pending; no hold is set there (the API server drops spec
    # changes made through status), so the reconciler holds the node itself, as without a webhook.
    accepted = patch_status(kubectl, a30, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-1g.6gb"}}})
    assert accepted.returncode == 0, accepted.stderr
    node = read_node(webhook.api, a30)
    assert node.metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert (
        node.metadata.annotations[keys.ANNOTATION_REASON] == "waiting for the reconciler to apply all-1g.6gb"
    )
    assert keys.ANNOTATION_HOLD not in node.metadata.annotations
    assert our_taints(node) == []


def heartbeat(name: str, at: dt.datetime) -> dict[str, Any]:
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": f"kubelet {name} is posting ready status",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ]
        }
    }


def test_status_heartbeats_never_reach_the_webhook(webhook: Deployment, control_plane: ControlPlane) -> None:
    """A kubelet-like writer (its node's own identity, as the Node authorizer expects) posts status
    heartbeats to a node that carries the layout, the state and a hold: the webhook's request
    metric does not move."""
    name = webhook.node("heartbeat", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})  # pending and held
    assert keys.ANNOTATION_HOLD in read_node(webhook.api, name).metadata.annotations
    kubelet = k8s.CoreV1Api(control_plane.user_client(f"system:node:{name}", ["system:nodes"]))
    seen = webhook.requests_seen()
    start = dt.datetime.now(dt.UTC)
    for i in range(20):
        kubelet.patch_node_status(name, heartbeat(name, start + dt.timedelta(seconds=10 * i)))
    assert webhook.requests_seen() == seen
    # ...while a layout change through the same subresource does reach it.
    k8s.CoreV1Api(webhook.api).patch_node_status(
        name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-2g.10gb"}}}
    )
    assert webhook.requests_seen() >= seen + 2


@pytest.fixture(scope="module")
def reconciler_account(k8s_api: Any) -> str:
    """The reconciler's ServiceAccount with exactly the agent's RBAC rules (cluster-wide, like the chart)."""
    service_account_client(k8s_api, NAMESPACE, RECONCILER_SA, RULES, cluster_wide=True)
    return RECONCILER_SA


def forbidden(call: Any) -> str:
    with pytest.raises(ApiException) as refused:
        call()
    assert refused.value.status == 403, refused.value.body
    return str(json.loads(refused.value.body)["message"])


def test_a_reconciler_writes_only_its_own_node(webhook: Deployment, reconciler_account: str) -> None:
    own, other = webhook.node("own"), webhook.node("other")
    as_reconciler = k8s.CoreV1Api(node_bound_client(webhook.api, NAMESPACE, reconciler_account, own))
    state = {"metadata": {"labels": {keys.LABEL_MIG_STATE: keys.STATE_SUCCESS}}}
    as_reconciler.patch_node(own, state)
    as_reconciler.patch_node_status(own, {"metadata": {"annotations": {keys.ANNOTATION_REASON: "applied"}}})
    labels = read_node(webhook.api, own).metadata.labels
    assert labels[keys.LABEL_MIG_STATE] == keys.STATE_SUCCESS
    message = forbidden(lambda: as_reconciler.patch_node(other, state))
    assert f"runs on node {own} and may not change node {other}" in message
    # Nothing else of another node either (no cordon, no taint, no label), like NodeRestriction.
    assert "may not change node" in forbidden(
        lambda: as_reconciler.patch_node(other, {"spec": {"unschedulable": True}})
    )
    assert "may not change node" in forbidden(
        lambda: as_reconciler.patch_node_status(other, {"metadata": {"labels": {"team": "x"}}})
    )
    # And never the desired layout, not even on its own node.
    layout = forbidden(
        lambda: as_reconciler.patch_node(
            own, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-7g.40gb"}}}
        )
    )
    assert f"may not change {keys.LABEL_MIG_CONFIG}" in layout
    assert read_node(webhook.api, other).metadata.labels.get(keys.LABEL_MIG_STATE) is None
    assert not read_node(webhook.api, other).spec.unschedulable


def test_a_reconciler_token_bound_to_no_node_is_refused(
    webhook: Deployment, reconciler_account: str, kubectl: KubectlRunner
) -> None:
    name = webhook.node("unbound")
    made = kubectl("create", "token", reconciler_account, "-n", NAMESPACE)
    assert made.returncode == 0, made.stderr
    as_reconciler = k8s.CoreV1Api(token_client(webhook.api, made.stdout.strip()))
    state = {"metadata": {"labels": {keys.LABEL_MIG_STATE: keys.STATE_SUCCESS}}}
    message = forbidden(lambda: as_reconciler.patch_node(name, state))
    assert "its token is not bound to a node" in message
    assert "allowUnboundTokens" in message
    assert keys.LABEL_MIG_STATE not in read_node(webhook.api, name).metadata.labels


def test_with_a_default_layout_a_reconciler_may_give_it_to_its_own_unlabelled_node_only(
    webhook: Deployment, reconciler_account: str
) -> None:
    # The policy as the chart renders it with reconciler.defaultMigConfig=all-disabled, bound to
    # nodes of this test only (the Deployment's own policy, without a default, does not select them).
    admission: Any = k8s.AdmissionregistrationV1Api(webhook.api)
    name = f"{webhook.policy_name}-default"
    scope = {"mig-guard.io/e2e-default": name}
    admission.create_validating_admission_policy(
        node_policy.node_writers_policy(name, webhook.reconciler_users, default_config="all-disabled")
    )
    admission.create_validating_admission_policy_binding(
        node_policy.node_writers_binding(name, name, {"matchLabels": scope})
    )
    try:
        unlabelled, labelled = (f"{prefix}-{uuid.uuid4().hex[:6]}" for prefix in ("unlabelled", "labelled"))
        create_gpu_node(webhook.api, unlabelled, labels=scope, fake=False)
        create_gpu_node(
            webhook.api, labelled, labels={**scope, keys.LABEL_MIG_CONFIG: "all-1g.5gb"}, fake=False
        )
        give = {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-disabled"}}}

        def as_reconciler_on(node: str) -> Any:
            return k8s.CoreV1Api(node_bound_client(webhook.api, NAMESPACE, reconciler_account, node))

        def another_value_refused() -> bool:
            other = {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-7g.40gb"}}}
            if _refused(lambda: as_reconciler_on(unlabelled).patch_node(unlabelled, other)):
                return True
            # Allowed before the policy was in force: unlabel again, or the next try changes nothing.
            unlabel = {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: None}}}
            k8s.CoreV1Api(webhook.api).patch_node(unlabelled, unlabel)
            return False

        # Another value is refused (until the policy is in force, the API server may still allow it).
        wait_until(another_value_refused, 30, what="the default-layout policy in force")
        message = forbidden(lambda: as_reconciler_on(labelled).patch_node(labelled, give))
        assert f"may not change {keys.LABEL_MIG_CONFIG}" in message  # the admin's layout stays theirs
        as_reconciler_on(unlabelled).patch_node(unlabelled, give)
        assert read_node(webhook.api, unlabelled).metadata.labels[keys.LABEL_MIG_CONFIG] == "all-disabled"
        assert read_node(webhook.api, labelled).metadata.labels[keys.LABEL_MIG_CONFIG] == "all-1g.5gb"
    finally:
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)


def _refused(call: Any) -> bool:
    try:
        call()
    except ApiException as exc:
        return exc.status == 403
    return False
