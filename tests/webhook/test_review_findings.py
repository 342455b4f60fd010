"""Findings of the security review (issue 10, point 7), each reproduced on the real kube-apiserver
with the real webhook: a Node with very many labels, a collection delete next to the guarded
ConfigMap, GPU labels changed in the same request as the layout, and a forged hold record on
CREATE. (Slow and idle TLS clients: tests/webhook/test_slow_clients.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cluster_webhook import CONFIGMAP, NAMESPACE, SCOPE_LABEL, Deployment, put_configmap, read_node
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from devcluster.helpers import gfd_labels
from devcluster.pytest_plugin import KubectlRunner
from migcore import keys
from migcore.hold import HoldRecord
from reconciler.node_state import NodeState

# About 830 KB of labels: the size at which the review saw the old match condition exceed the API
# server's CEL cost limit (etcd takes objects up to 1.5 MiB, a request body may be 3 MiB).
MANY_LABELS = 60_000


def test_a_node_with_many_labels_can_still_be_written_and_is_still_judged(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = f"crowded-{webhook.scope}"
    labels = {f"example.com/l{i:05d}": "v" for i in range(MANY_LABELS)}
    labels |= {SCOPE_LABEL: webhook.scope, **gfd_labels("NVIDIA-A100-SXM4-40GB", 8)}
    core = k8s.CoreV1Api(webhook.api)
    core.create_node({"metadata": {"name": name, "labels": labels}})
    try:
        # Writes of other fields work for everyone (failurePolicy Fail: a CEL error would refuse them).
        cordoned = kubectl("cordon", name)
        assert cordoned.returncode == 0, cordoned.stderr
        removed = kubectl("label", "node", name, "example.com/l00000-")
        assert removed.returncode == 0, removed.stderr
        # ...and the layout is still judged (the webhook is asked, not skipped).
        typo = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb")
        assert typo.returncode != 0
        assert "did you mean all-1g.5gb" in typo.stderr
        accepted = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb")
        assert accepted.returncode == 0, accepted.stderr
        assert read_node(webhook.api, name).metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    finally:
        core.delete_node(name)


def test_collection_delete_judges_the_guarded_configmap_and_spares_the_others(
    webhook: Deployment, default_config_text: str
) -> None:
    core = k8s.CoreV1Api(webhook.api)
    webhook.node("uses-config", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    bulk = "mig-guard.test/bulk"
    for i in range(3):
        core.create_namespaced_config_map(
            NAMESPACE, {"metadata": {"name": f"scratch-{i}", "labels": {bulk: "yes"}}, "data": {"x": "y"}}
        )
    # Unrelated ConfigMaps go in one bulk delete (the namespace controller deletes this way too).
    core.delete_collection_namespaced_config_map(NAMESPACE, label_selector=bulk)
    left = core.list_namespaced_config_map(NAMESPACE, label_selector=bulk).items
    assert [c.metadata.name for c in left] == []
    # The guarded one is judged in a bulk delete as in a single one: a labelled node uses its configs.
    core.patch_namespaced_config_map(CONFIGMAP.name, NAMESPACE, {"metadata": {"labels": {bulk: "yes"}}})
    try:
        with pytest.raises(ApiException) as refused:
            core.delete_collection_namespaced_config_map(NAMESPACE, label_selector=bulk)
        assert "would break" in refused.value.body
        assert core.read_namespaced_config_map(CONFIGMAP.name, NAMESPACE).data[CONFIGMAP.key]
    finally:
        try:
            core.patch_namespaced_config_map(
                CONFIGMAP.name, NAMESPACE, {"metadata": {"labels": {bulk: None}}}
            )
        except ApiException:
            put_configmap(webhook.api, CONFIGMAP, default_config_text)


def test_gpu_labels_changed_in_the_same_request_do_not_change_the_verdict(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    a30 = webhook.node("a30-swap", product="NVIDIA-A30", gpu_count=4)
    swapped = kubectl(
        "label", "node", a30, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb",
        f"{keys.LABEL_GPU_PRODUCT}=NVIDIA-A100-SXM4-40GB", "--overwrite",
    )  # fmt: skip
    assert swapped.returncode != 0
    assert "does not fit node" in swapped.stderr and "A30" in swapped.stderr
    hidden = kubectl(
        "label", "node", a30, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb", f"{keys.LABEL_GPU_PRODUCT}-"
    )
    assert hidden.returncode != 0
    assert "does not fit node" in hidden.stderr
    labels = read_node(webhook.api, a30).metadata.labels
    assert keys.LABEL_MIG_CONFIG not in labels
    assert labels[keys.LABEL_GPU_PRODUCT] == "NVIDIA-A30"


def test_a_hold_record_forged_on_create_is_not_trusted(
    cordon_webhook: Deployment, kubectl: KubectlRunner
) -> None:
    """A creator claims that mig-guard cordoned the node: the reconciler would later uncordon a node
    that was created cordoned on purpose."""
    name = f"forged-{cordon_webhook.scope}"
    forged = HoldRecord(
        taint=False, cordon=True, config="all-1g.5gb", by="webhook", at="2024-01-01T00:00:00Z"
    )
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                SCOPE_LABEL: cordon_webhook.scope,
                keys.LABEL_MIG_CONFIG: "all-1g.5gb",
                **gfd_labels("NVIDIA-A100-SXM4-40GB", 8),
            },
            "annotations": {keys.ANNOTATION_HOLD: forged.to_annotation()},
        },
        "spec": {"unschedulable": True},
    }
    created = kubectl("create", "-f", "-", input=json.dumps(body))
    core = k8s.CoreV1Api(cordon_webhook.api)
    try:
        if created.returncode != 0:  # refused outright is as good as not trusted
            assert "mig-guard.io/hold" in created.stderr, created.stderr
            return
        node = core.read_node(name)
        record = HoldRecord.from_annotation(node.metadata.annotations.get(keys.ANNOTATION_HOLD))
        assert record is not None and not record.cordon, node.metadata.annotations
        # What the reconciler does at the end of the change: the cordon stays.
        NodeState(cordon_webhook.api, name).lift_hold()
        assert core.read_node(name).spec.unschedulable is True
    finally:
        kubectl("delete", "node", name, "--wait=false")
