"""`mig-guard uninstall` (the chart's uninstall hooks) on the real API server: it removes what
mig-guard created and only that; the admin's label, taints and cordon stay."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

from devcluster.helpers import create_gpu_node, ensure_namespace, register_webhook
from migcore import keys
from migcore.hold import HoldRecord


def uninstall(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig_guard.cli", "uninstall", "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def held_node(api: Any, name: str, *, cordon_by_us: bool) -> None:
    create_gpu_node(
        api, name, fake=False, labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_MIG_STATE: "pending"}
    )
    hold = HoldRecord(
        taint=True, cordon=cordon_by_us, config="all-1g.5gb", by="webhook", at="2026-01-01T00:00:00Z"
    )
    core: Any = k8s.CoreV1Api(api)
    core.patch_node(
        name,
        {
            "metadata": {
                "annotations": {
                    keys.ANNOTATION_HOLD: hold.to_annotation(),
                    keys.ANNOTATION_REASON: "applying",
                    keys.ANNOTATION_GPUS: "{}",
                    "example.com/keep": "yes",
                }
            },
            "spec": {
                "unschedulable": True,
                "taints": [
                    {"key": keys.TAINT_KEY, "effect": keys.TAINT_EFFECT},
                    {"key": "example.com/admin", "value": "x", "effect": "NoSchedule"},
                ],
            },
        },
    )
    condition = {"type": keys.CONDITION_READY, "status": "False", "reason": "Applying", "message": "m"}
    core.patch_node_status(name, {"status": {"conditions": [condition]}})


def test_node_keys_go_and_the_admins_own_stay(k8s_api: Any, kubeconfig: Path) -> None:
    ours, admins = f"un-{uuid.uuid4().hex[:6]}", f"un-{uuid.uuid4().hex[:6]}"
    held_node(k8s_api, ours, cordon_by_us=True)
    held_node(k8s_api, admins, cordon_by_us=False)  # cordoned by the admin, not by mig-guard
    result = uninstall(kubeconfig, "--node-keys")
    assert result.returncode == 0, result.stderr
    core: Any = k8s.CoreV1Api(k8s_api)
    for name, cordoned in ((ours, False), (admins, True)):
        node = core.read_node(name)
        labels, annotations = node.metadata.labels, node.metadata.annotations
        assert labels[keys.LABEL_MIG_CONFIG] == "all-1g.5gb"
        assert keys.LABEL_MIG_STATE not in labels
        assert not [k for k in annotations if k.startswith(keys.PREFIX)]
        assert annotations["example.com/keep"] == "yes"
        # (The node lifecycle controller adds and removes node.kubernetes.io/unschedulable itself.)
        assert [t.key for t in node.spec.taints or [] if not t.key.startswith("node.kubernetes.io/")] == [
            "example.com/admin"
        ]
        assert bool(node.spec.unschedulable) is cordoned
        assert keys.CONDITION_READY not in [c.type for c in node.status.conditions or []]
        assert f"node {name}: removed" in result.stdout
    again = uninstall(kubeconfig, "--node-keys")
    assert again.returncode == 0
    assert ours not in again.stdout and admins not in again.stdout


def test_webhook_configurations_and_certificate_secrets_go(k8s_api: Any, kubeconfig: Path) -> None:
    name, namespace = f"un-{uuid.uuid4().hex[:6]}", "uninstall-test"
    ensure_namespace(k8s_api, namespace)
    core: Any = k8s.CoreV1Api(k8s_api)
    for secret in (name, f"{name}-ca", f"{name}-other"):
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": secret}, "data": {"k": base64.b64encode(b"v").decode()}}
        )
    rules = [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["configmaps"]}
    ]
    selector = {"matchLabels": {"never": name}}
    for kind in ("validating", "mutating"):
        register_webhook(
            k8s_api, kind, name, "https://127.0.0.1:1/x", b"ca", rules=rules, object_selector=selector
        )
    result = uninstall(kubeconfig, "--webhook-config", name, "--namespace", namespace, "--secret-name", name)
    assert result.returncode == 0, result.stderr
    adm: Any = k8s.AdmissionregistrationV1Api(k8s_api)
    for read in (adm.read_validating_webhook_configuration, adm.read_mutating_webhook_configuration):
        try:
            read(name)
            raise AssertionError(f"{name} still there")
        except ApiException as exc:
            assert exc.status == 404
    left = {s.metadata.name for s in core.list_namespaced_secret(namespace).items}
    assert name not in left and f"{name}-ca" not in left
    assert f"{name}-other" in left


def test_usage_errors_exit_2(kubeconfig: Path) -> None:
    assert uninstall(kubeconfig).returncode == 2
    assert uninstall(kubeconfig, "--secret-name", "x").returncode == 2
