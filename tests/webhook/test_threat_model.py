"""The threat model of docs/security.md, row by row, on the real kube-apiserver with the real webhook
and the node-writers policy: every way a Node can be written (one test per write path, with the real
kubectl) by every identity (the admin, a GitOps account, a kubelet, the reconciler on this node and
on another, the webhook's own account), for three intents: spoof the state, write a typo of the
layout, write a valid layout. Then the adversarial inputs of issue 10, point 6."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster_webhook import NAMESPACE, RECONCILER_SA, SCOPE_LABEL, Deployment, our_taints, read_node, wait_for
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from devcluster.controlplane import ControlPlane
from devcluster.helpers import gfd_labels, pod_bound_token, service_account_client
from devcluster.kubeconfig import api_client, kubeconfig_dict, write_kubeconfig
from devcluster.pytest_plugin import KubectlRunner
from migcore import keys
from migcore.hold import HoldRecord
from reconciler.rbac import RULES

ADMIN, GITOPS, KUBELET = "admin", "gitops", "kubelet"
THIS_RECONCILER, OTHER_RECONCILER, WEBHOOK_ACCOUNT = (
    "reconciler (this node)",
    "reconciler (other node)",
    "webhook",
)
# Denied ones first: an allowed write changes the node (a valid layout: each identity its own; the
# reconciler's own state last, or the others would write the same value again: no change at all).
IDENTITIES = (WEBHOOK_ACCOUNT, OTHER_RECONCILER, KUBELET, GITOPS, ADMIN, THIS_RECONCILER)
VALID = {ADMIN: "all-1g.5gb", GITOPS: "all-2g.10gb", KUBELET: "all-3g.20gb", THIS_RECONCILER: "all-7g.40gb"}
VALID |= {OTHER_RECONCILER: "all-4g.20gb", WEBHOOK_ACCOUNT: "all-balanced"}
GITOPS_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "create", "update", "patch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch", "update"]},
]
WEBHOOK_RULES = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]

OK, ADMISSION, RBAC = "allowed", "refused by admission", "refused by RBAC"
# What each identity gets for each intent on the paths it may use at all (RBAC aside).
EXPECTED: dict[str, dict[str, str]] = {
    "spoof": {
        ADMIN: ADMISSION,
        GITOPS: ADMISSION,
        KUBELET: ADMISSION,
        THIS_RECONCILER: OK,
        OTHER_RECONCILER: ADMISSION,
    },
    "typo": {
        ADMIN: ADMISSION,
        GITOPS: ADMISSION,
        KUBELET: ADMISSION,
        THIS_RECONCILER: ADMISSION,
        OTHER_RECONCILER: ADMISSION,
    },
    "valid": {ADMIN: OK, GITOPS: OK, KUBELET: OK, THIS_RECONCILER: ADMISSION, OTHER_RECONCILER: ADMISSION},
}
# Write paths an identity's RBAC does not grant at all (the webhook's account writes nothing).
NO_RBAC = {
    "replace": {THIS_RECONCILER, OTHER_RECONCILER},  # the reconciler patches, never updates
    "create": {THIS_RECONCILER, OTHER_RECONCILER},
}


def modified_meanwhile(result: subprocess.CompletedProcess[str]) -> bool:
    """A whole-object replace that met a 409: the node changed between its read and the replace (the
    controller manager settles a new node moments after its creation), so it never reached admission."""
    return result.returncode != 0 and "the object has been modified" in result.stderr


def outcome(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode == 0:
        return OK
    err = result.stderr
    if "cannot " in err and "forbidden" in err.lower():  # the authorizer: User "x" cannot patch ...
        return RBAC
    if "denied the request" in err or "ValidatingAdmissionPolicy" in err:
        return ADMISSION
    return f"unexpected: {err.strip()[:300]}"


def intent_labels(intent: str, who: str) -> dict[str, str]:
    if intent == "spoof":
        return {keys.LABEL_MIG_STATE: keys.STATE_SUCCESS}
    return {keys.LABEL_MIG_CONFIG: "all-1g.5gbb" if intent == "typo" else VALID[who]}


def pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class Writer:
    """One identity's kubectl."""

    def __init__(self, kubectl: KubectlRunner, kubeconfig: Path, admin: Any) -> None:
        self.kubectl, self.kubeconfig, self.admin = kubectl, kubeconfig, admin

    def run(self, *args: str, body: Any = None) -> subprocess.CompletedProcess[str]:
        text = json.dumps(body) if body is not None else None
        return self.kubectl(*args, input=text, kubeconfig_path=self.kubeconfig)

    def write(self, path: str, node: str, labels: dict[str, str]) -> subprocess.CompletedProcess[str]:
        meta = {"metadata": {"labels": labels}}
        if path == "label":
            return self.run("label", "node", node, *(f"{k}={v}" for k, v in labels.items()), "--overwrite")
        if path == "merge patch":
            return self.run("patch", "node", node, "--type=merge", "-p", json.dumps(meta))
        if path == "strategic patch":
            return self.run("patch", "node", node, "-p", json.dumps(meta))
        if path == "JSON patch":
            ops = [
                {"op": "add", "path": f"/metadata/labels/{pointer(k)}", "value": v} for k, v in labels.items()
            ]
            return self.run("patch", "node", node, "--type=json", "-p", json.dumps(ops))
        if path == "status subresource":
            # A plain PATCH, as kubelets and the reconciler send it (kubectl would GET the status first,
            # which their narrow RBAC does not grant).
            try:
                k8s.CoreV1Api(api_client(self.kubeconfig)).patch_node_status(node, meta)
            except ApiException as exc:
                return subprocess.CompletedProcess([], 1, "", str(exc.body))
            return subprocess.CompletedProcess([], 0, "", "")
        if path == "replace":
            for _ in range(5):  # read and replace again when the node changed in between
                obj = self.admin.sanitize_for_serialization(k8s.CoreV1Api(self.admin).read_node(node))
                obj["metadata"]["labels"].update(labels)
                result = self.run("replace", "-f", "-", body=obj)
                if not modified_meanwhile(result):
                    break
            return result
        if path.startswith("server-side apply"):
            manifest = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": labels}}
            force = ["--force-conflicts"] if "force" in path else []
            return self.run(
                "apply", "--server-side", "--field-manager=threat-test", *force, "-f", "-", body=manifest
            )
        if path == "create":
            all_labels = {**gfd_labels("NVIDIA-A100-SXM4-40GB", 8), SCOPE_LABEL: node.split("|")[1], **labels}
            name = node.split("|", maxsplit=1)[0]
            return self.run(
                "create",
                "-f",
                "-",
                body={"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}},
            )
        raise ValueError(path)


@pytest.fixture(scope="module")
def accounts(
    k8s_api: Any, tmp_path_factory: pytest.TempPathFactory, control_plane: ControlPlane
) -> dict[str, Path]:
    """Kubeconfigs of the identities that are not bound to a node."""
    folder = tmp_path_factory.mktemp("identities")
    service_account_client(k8s_api, NAMESPACE, RECONCILER_SA, RULES, cluster_wide=True)
    out = {ADMIN: control_plane.kubeconfig_path}
    for who, sa, rules in ((GITOPS, "argocd", GITOPS_RULES), (WEBHOOK_ACCOUNT, "webhook", WEBHOOK_RULES)):
        client = service_account_client(k8s_api, NAMESPACE, sa, rules, cluster_wide=True)
        token = client.configuration.api_key["authorization"]
        config = kubeconfig_dict(control_plane.server_url, control_plane.ca_pem, user=sa, token=token)
        out[who] = write_kubeconfig(folder / f"{sa}.kubeconfig", config)
    return out


@pytest.fixture
def writers(
    accounts: dict[str, Path], control_plane: ControlPlane, kubectl: KubectlRunner, tmp_path: Path
) -> Callable[[str, str], dict[str, Writer]]:
    """writers(node, other) -> every identity's Writer, the node-bound ones bound for `node`/`other`."""

    def bound(node: str) -> Path:
        token = pod_bound_token(control_plane.api, NAMESPACE, RECONCILER_SA, node)
        config = kubeconfig_dict(
            control_plane.server_url, control_plane.ca_pem, user="reconciler", token=token
        )
        return write_kubeconfig(tmp_path / f"reconciler-{node}.kubeconfig", config)

    def make(node: str, other: str) -> dict[str, Writer]:
        configs = dict(accounts)
        configs[KUBELET] = control_plane.write_user_kubeconfig(f"system:node:{node}", ["system:nodes"])
        configs[THIS_RECONCILER] = bound(node)
        configs[OTHER_RECONCILER] = bound(other)
        return {who: Writer(kubectl, path, control_plane.api) for who, path in configs.items()}

    return make


PATHS = [
    "label",
    "merge patch",
    "strategic patch",
    "JSON patch",
    "replace",
    "server-side apply",
    "server-side apply with force",
    "status subresource",
]


@pytest.mark.parametrize("path", PATHS)
def test_every_identity_on_this_write_path(
    webhook: Deployment, writers: Callable[[str, str], dict[str, Writer]], path: str
) -> None:
    other = webhook.node("other")
    wrong: list[str] = []
    for intent in ("spoof", "typo", "valid"):
        node = webhook.node(f"{intent}")
        by = writers(node, other)
        for who in IDENTITIES:
            expected = (
                RBAC if who == WEBHOOK_ACCOUNT or who in NO_RBAC.get(path, ()) else EXPECTED[intent][who]
            )
            got = outcome(by[who].write(path, node, intent_labels(intent, who)))
            if got != expected:
                wrong.append(f"{path} / {intent} / {who}: {got} (expected {expected})")
    assert not wrong, "\n".join(wrong)


def test_every_identity_creating_a_node(
    webhook: Deployment, writers: Callable[[str, str], dict[str, Writer]]
) -> None:
    """CREATE: the kubelet registers its own Node; admins and GitOps tools may create one too."""
    other = webhook.node("other")
    wrong: list[str] = []
    for intent in ("spoof", "typo", "valid"):
        for who in IDENTITIES:
            name = f"new-{uuid.uuid4().hex[:6]}"
            by = writers(name, other)  # the kubelet's identity names the node it creates
            expected = RBAC if who == WEBHOOK_ACCOUNT or who in NO_RBAC["create"] else EXPECTED[intent][who]
            got = outcome(by[who].write("create", f"{name}|{webhook.scope}", intent_labels(intent, who)))
            if got != expected:
                wrong.append(f"create / {intent} / {who}: {got} (expected {expected})")
            if got == OK and intent == "valid":
                node = read_node(webhook.api, name)
                if node.metadata.labels.get(keys.LABEL_MIG_STATE) != keys.STATE_PENDING or not our_taints(
                    node
                ):
                    wrong.append(f"create / valid / {who}: not pending and held")
    assert not wrong, "\n".join(wrong)


def test_without_the_policy_the_webhook_still_refuses_spoofing(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    """Deleting the policy's binding (an admin's act) leaves the webhook's own identity rules."""
    admission: Any = k8s.AdmissionregistrationV1Api(webhook.api)
    admission.delete_validating_admission_policy_binding(webhook.policy_name)
    try:
        name = webhook.node("no-policy")
        results: list[subprocess.CompletedProcess[str]] = []

        def refused_by_the_webhook() -> bool:  # the API server drops the binding asynchronously
            results.append(kubectl("label", "node", name, f"{keys.LABEL_MIG_STATE}=success"))
            assert results[-1].returncode != 0, results[-1].stdout
            return "admission webhook" in results[-1].stderr

        wait_for(refused_by_the_webhook, "the binding to be gone")
        assert "only the mig-guard reconciler sets these" in results[-1].stderr
    finally:
        webhook.register()


# --- adversarial inputs (issue 10, point 6) --------------------------------------------------------


def test_json_patch_with_escaped_keys_and_remove_then_add(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("escaped", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    state = f"/metadata/labels/{pointer(keys.LABEL_MIG_STATE)}"
    layout = f"/metadata/labels/{pointer(keys.LABEL_MIG_CONFIG)}"

    def patch(ops: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        return kubectl("patch", "node", name, "--type=json", "-p", json.dumps(ops))

    assert outcome(patch([{"op": "replace", "path": state, "value": "success"}])) == ADMISSION
    assert outcome(patch([{"op": "remove", "path": state}])) == ADMISSION
    # Removing and re-adding the layout in one patch: judged on the result.
    typo = patch([{"op": "remove", "path": layout}, {"op": "add", "path": layout, "value": "all-1g.5gbb"}])
    assert outcome(typo) == ADMISSION and "did you mean" in typo.stderr
    same = patch([{"op": "remove", "path": layout}, {"op": "add", "path": layout, "value": "all-1g.5gb"}])
    assert outcome(same) == OK  # no change at all
    assert read_node(webhook.api, name).metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    # A hold record slipped in with the layout's removal and re-adding is not the mutation's.
    hold = HoldRecord(False, True, "all-2g.10gb", "webhook", "2024-01-01T00:00:00Z").to_annotation()
    forged = patch(
        [
            {"op": "remove", "path": layout},
            {"op": "add", "path": layout, "value": "all-2g.10gb"},
            {"op": "add", "path": f"/metadata/annotations/{pointer(keys.ANNOTATION_HOLD)}", "value": hold},
        ]
    )
    assert outcome(forged) == OK
    record = HoldRecord.from_annotation(
        read_node(webhook.api, name).metadata.annotations[keys.ANNOTATION_HOLD]
    )
    assert record is not None and not record.cordon  # the mutation wrote its own record over it


def test_a_whole_object_replace_that_drops_the_hold_is_refused(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("replaced")
    api = k8s.CoreV1Api(webhook.api)
    stale = webhook.api.sanitize_for_serialization(api.read_node(name))  # e.g. a manifest kept in Git
    assert kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb").returncode == 0
    for _ in range(5):  # the stale object, replaced at the node's current version
        current = webhook.api.sanitize_for_serialization(api.read_node(name))
        stale["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        result = kubectl("replace", "-f", "-", input=json.dumps(stale))
        if not modified_meanwhile(result):
            break
    assert outcome(result) == ADMISSION
    assert keys.ANNOTATION_HOLD in result.stderr and keys.LABEL_MIG_STATE in result.stderr
    assert keys.ANNOTATION_HOLD in read_node(webhook.api, name).metadata.annotations


def test_protected_keys_taken_over_with_force_conflicts_are_refused(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("forced", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    manifest = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {keys.LABEL_MIG_STATE: "success"}},
    }
    for force in ([], ["--force-conflicts"]):
        result = kubectl(
            "apply", "--server-side", "--field-manager=flux", *force, "-f", "-", input=json.dumps(manifest)
        )
        assert outcome(result) == ADMISSION, result.stderr
    assert read_node(webhook.api, name).metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING


def test_annotations_near_the_size_limit(webhook: Deployment, kubectl: KubectlRunner) -> None:
    """The API server takes at most 256 KiB of annotations: a node near it is still judged, and a
    hold record of that size is refused, not a reason for an error."""
    name = webhook.node("big-annotations")
    api = k8s.CoreV1Api(webhook.api)
    api.patch_node(name, {"metadata": {"annotations": {"example.com/blob": "x" * 250_000}}})
    typo = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb")
    assert outcome(typo) == ADMISSION and "did you mean" in typo.stderr
    assert outcome(kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb")) == OK
    huge = {"metadata": {"annotations": {keys.ANNOTATION_HOLD: "{" + "x" * 4000 + "}"}}}
    result = kubectl("patch", "node", name, "--type=merge", "-p", json.dumps(huge))
    assert outcome(result) == ADMISSION


def test_labels_absent_or_null(webhook: Deployment, kubectl: KubectlRunner) -> None:
    api = k8s.CoreV1Api(webhook.api)
    bare = f"bare-{uuid.uuid4().hex[:6]}"
    # A node with no labels at all (the scope label set afterwards, as the objectSelector needs it).
    api.create_node({"metadata": {"name": bare}})
    try:
        assert outcome(kubectl("label", "node", bare, f"{SCOPE_LABEL}={webhook.scope}")) == OK
        assert outcome(kubectl("label", "node", bare, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb")) == ADMISSION
        held = webhook.node("null-labels", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
        # `labels: null` removes every label, the state with them: refused (a protected key).
        cleared = kubectl(
            "patch", "node", held, "--type=merge", "-p", json.dumps({"metadata": {"labels": None}})
        )
        assert outcome(cleared) != OK
        assert read_node(webhook.api, held).metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
        # Removing the layout label alone is allowed (the reconciler then reports and releases).
        assert outcome(kubectl("label", "node", held, f"{keys.LABEL_MIG_CONFIG}-")) == OK
    finally:
        api.delete_node(bare)


def test_create_with_protected_keys_is_refused(webhook: Deployment, kubectl: KubectlRunner) -> None:
    for labels, notes in (
        ({keys.LABEL_MIG_STATE: "success"}, {}),
        ({}, {keys.ANNOTATION_REASON: "applied"}),
        ({}, {keys.ANNOTATION_PROGRESS: "{}"}),
        ({}, {"mig-guard.io/anything": "1"}),
        ({keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_MIG_STATE: "success"}, {}),
    ):
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"born-{uuid.uuid4().hex[:6]}",
                "labels": {SCOPE_LABEL: webhook.scope, **gfd_labels("NVIDIA-A100-SXM4-40GB", 8), **labels},
                "annotations": notes,
            },
        }
        result = kubectl("create", "-f", "-", input=json.dumps(body))
        assert outcome(result) == ADMISSION, (labels, notes, result.stderr)
