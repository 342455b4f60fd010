"""End to end on a real kube-apiserver (devcluster): the real `mig-guard webhook` command
(gunicorn, TLS) registered with the canonical rules and CEL match conditions of
`webhook.registration`, driven by the real kubectl binary and API clients.

Each server's registrations carry an objectSelector on a test label, so nodes of other tests
in the same session never reach it; everything is deregistered at teardown.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from cluster_webhook import (
    CONFIGMAP,
    CONFIGMAP_WARN,
    NAMESPACE,
    NODE_RULES,
    RECONCILER_SA,
    Deployment,
    our_taints,
    read_node,
    wait_active,
    wait_for,
)
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from webhook_harness import TestAuthority, served_serial

from devcluster.helpers import node_bound_client, service_account_client
from devcluster.pytest_plugin import KubectlRunner
from migcore import keys
from migcore.hold import HoldRecord
from webhook import registration


def test_typo_is_rejected_at_kubectl_label(webhook: Deployment, kubectl: KubectlRunner) -> None:
    name = webhook.node("typo")
    result = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb")
    assert result.returncode != 0
    assert "denied the request" in result.stderr
    assert (
        'nvidia.com/mig.config="all-1g.5gbb" is not a config in ConfigMap mig-guard-e2e/mig-parted-config'
        in result.stderr
    )
    assert "did you mean all-1g.5gb" in result.stderr
    node = read_node(webhook.api, name)
    assert keys.LABEL_MIG_CONFIG not in node.metadata.labels
    assert our_taints(node) == []


def test_incompatible_layout_is_rejected_with_the_valid_ones(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("a30", product="NVIDIA-A30", gpu_count=4)
    result = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb")
    assert result.returncode != 0
    assert "does not fit node" in result.stderr
    assert "all-1g.6gb" in result.stderr  # what would fit an A30


def test_valid_layout_is_accepted_tainted_and_pending(webhook: Deployment, kubectl: KubectlRunner) -> None:
    name = webhook.node("valid")
    result = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb")
    assert result.returncode == 0, result.stderr
    node = read_node(webhook.api, name)
    assert node.metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert [(t.value, t.effect) for t in our_taints(node)] == [("all-1g.5gb", "NoSchedule")]
    hold = HoldRecord.from_annotation(node.metadata.annotations[keys.ANNOTATION_HOLD])
    assert hold is not None
    assert (hold.taint, hold.cordon, hold.config, hold.by) == (True, False, "all-1g.5gb", "webhook")
    assert not node.spec.unschedulable
    # A second change re-targets the same taint instead of adding one.
    assert (
        kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-7g.40gb", "--overwrite").returncode == 0
    )
    assert [t.value for t in our_taints(read_node(webhook.api, name))] == ["all-7g.40gb"]


def test_server_side_apply_by_a_gitops_field_manager_gets_the_same_answers(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("gitops")

    def apply(config: str) -> Any:
        manifest = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {keys.LABEL_MIG_CONFIG: config}},
        }
        return kubectl(
            "apply", "--server-side", "--field-manager=argocd", "-f", "-", input=yaml.safe_dump(manifest)
        )

    denied = apply("all-1g.5gbb")
    assert denied.returncode != 0
    assert "did you mean all-1g.5gb" in denied.stderr
    accepted = apply("all-2g.10gb")
    assert accepted.returncode == 0, accepted.stderr
    node = read_node(webhook.api, name)
    assert node.metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert [t.value for t in our_taints(node)] == ["all-2g.10gb"]
    managers = {entry.manager for entry in node.metadata.managed_fields}
    assert "argocd" in managers


def test_server_dry_run_gives_the_verdict_and_changes_nothing(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("dryrun")
    before = read_node(webhook.api, name)
    denied = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb", "--dry-run=server")
    assert denied.returncode != 0
    assert "did you mean all-1g.5gb" in denied.stderr
    accepted = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb", "--dry-run=server")
    assert accepted.returncode == 0, accepted.stderr
    assert "(server dry run)" in accepted.stdout
    # The API's dry run (what Argo CD's server-side diff uses) returns the object as it would be.
    would_be = k8s.CoreV1Api(webhook.api).patch_node(
        name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}}}, dry_run="All"
    )
    assert would_be.metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert [t.value for t in our_taints(would_be)] == ["all-1g.5gb"]
    after = read_node(webhook.api, name)

    # Nothing of ours was stored. (The resourceVersion may still move: with the workload plane up,
    # the node lifecycle controller updates the status and taints of this kubelet-less node.)
    def ours(values: dict[str, str] | None) -> dict[str, str]:
        return {k: v for k, v in (values or {}).items() if k.startswith(("nvidia.com/", keys.PREFIX))}

    assert ours(after.metadata.labels) == ours(before.metadata.labels)
    assert ours(after.metadata.annotations) == ours(before.metadata.annotations)
    assert keys.LABEL_MIG_CONFIG not in after.metadata.labels
    assert our_taints(after) == []
    assert not after.spec.unschedulable


def test_patches_of_other_labels_never_reach_the_webhook(webhook: Deployment, kubectl: KubectlRunner) -> None:
    name = webhook.node("quiet", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    core = k8s.CoreV1Api(webhook.api)
    seen = webhook.requests_seen()
    for i in range(5):
        core.patch_node(name, {"metadata": {"labels": {"nvidia.com/gfd.timestamp": str(1700000000 + i)}}})
    core.patch_node(name, {"metadata": {"annotations": {"example.com/note": "x"}}})
    assert kubectl("label", "node", name, "team=ml").returncode == 0
    assert kubectl("cordon", name).returncode == 0
    assert webhook.requests_seen() == seen
    # ...while a change of the layout does (validate + mutate, at least once each).
    assert (
        kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-2g.10gb", "--overwrite").returncode == 0
    )
    assert webhook.requests_seen() >= seen + 2


def test_only_the_reconciler_may_set_the_state_label(webhook: Deployment) -> None:
    name = webhook.node("state", labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    patch = {"metadata": {"labels": {keys.LABEL_MIG_STATE: keys.STATE_SUCCESS}}}
    mallory = service_account_client(webhook.api, NAMESPACE, "mallory", NODE_RULES, cluster_wide=True)
    with pytest.raises(ApiException) as refused:
        k8s.CoreV1Api(mallory).patch_node(name, patch)
    assert refused.value.status == 403
    assert (
        f"system:serviceaccount:{NAMESPACE}:mallory may not change nvidia.com/mig.config.state"
        in refused.value.body
    )
    # Nor may anyone take mig-guard's taint record or report apart.
    with pytest.raises(ApiException) as refused_annotation:
        k8s.CoreV1Api(webhook.api).patch_node(
            name, {"metadata": {"annotations": {keys.ANNOTATION_REASON: "fine"}}}
        )
    assert refused_annotation.value.status == 403
    service_account_client(webhook.api, NAMESPACE, RECONCILER_SA, NODE_RULES, cluster_wide=True)
    reconciler = node_bound_client(webhook.api, NAMESPACE, RECONCILER_SA, name)
    k8s.CoreV1Api(reconciler).patch_node(name, patch)
    assert read_node(webhook.api, name).metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_SUCCESS


def test_configmap_guard_protects_labelled_nodes(webhook: Deployment, default_config_text: str) -> None:
    name = webhook.node("guarded")
    core = k8s.CoreV1Api(webhook.api)
    core.patch_node(name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-3g.20gb"}}})

    def update(text: str) -> None:
        core.patch_namespaced_config_map(CONFIGMAP.name, NAMESPACE, {"data": {"config.yaml": text}})

    document = yaml.safe_load(default_config_text)
    without = {
        **document,
        "mig-configs": {k: v for k, v in document["mig-configs"].items() if k != "all-3g.20gb"},
    }
    with pytest.raises(ApiException) as removed:
        update(yaml.safe_dump(without))
    assert removed.value.status == 400
    assert name in removed.value.body
    assert "all-3g.20gb removed" in removed.value.body
    changed = {
        **document,
        "mig-configs": {
            **document["mig-configs"],
            "all-3g.20gb": [{"devices": "all", "mig-enabled": True, "mig-devices": {"3g.40gb": 2}}],
        },
    }
    with pytest.raises(ApiException) as broken:
        update(yaml.safe_dump(changed))
    assert name in broken.value.body
    assert "no longer fits" in broken.value.body
    with pytest.raises(ApiException) as unparsable:
        update("version: v1\nmig-configs: [")
    assert "does not parse" in unparsable.value.body
    # Adding a config is fine, and the watch makes it usable without a restart.
    added = {
        **document,
        "mig-configs": {**document["mig-configs"], "team-a": document["mig-configs"]["all-2g.10gb"]},
    }
    update(yaml.safe_dump(added))
    deadline = time.monotonic() + 20
    while True:
        try:
            core.patch_node(name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "team-a"}}})
            break
        except ApiException as exc:
            assert exc.status == 400 and time.monotonic() < deadline, exc.body
            time.sleep(0.3)
    # Removing team-a again is refused while the node uses it; after relabelling it is fine.
    with pytest.raises(ApiException):
        update(default_config_text)
    core.patch_node(name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}}})
    update(default_config_text)


def test_kubectl_apply_of_the_configmap_prints_the_configs_warnings(
    webhook: Deployment, kubectl: KubectlRunner, default_config_text: str
) -> None:
    document = yaml.safe_load(default_config_text)

    def apply(configs: dict[str, Any], *flags: str) -> Any:
        text = yaml.safe_dump({**document, "mig-configs": configs})
        manifest = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP.name, "namespace": NAMESPACE},
            "data": {"config.yaml": text},
        }
        return kubectl("apply", "-f", "-", *flags, input=json.dumps(manifest))

    def layout(*profiles: str) -> list[dict[str, Any]]:
        return [{"devices": "all", "mig-enabled": True, "mig-devices": dict.fromkeys(profiles, 1)}]

    configs = document["mig-configs"]
    try:
        typo = apply({**configs, "team-a": layout("2g.11gb")})
        assert typo.returncode == 0, typo.stderr
        assert (
            'Warning: config.yaml: mig-configs.team-a[0].mig-devices."2g.11gb": profile 2g.11gb exists on no GPU'
            in typo.stderr
        )
        assert "(closest: 2g.10gb (A100-40GB); 2g.12gb (A30-24GB)" in typo.stderr
        # Twelve such profiles: ten warnings, the last saying how many more there are.
        many = apply({**configs, "team-a": layout(*(f"1g.{m}gb" for m in range(30, 45)))}, "--dry-run=server")
        assert many.returncode == 0, many.stderr
        ours = [line for line in many.stderr.splitlines() if line.startswith("Warning: ") and "mig-" in line]
        assert len(ours) == 10, many.stderr
        assert ours[-1].startswith("Warning: 3 more warnings left out;"), many.stderr
        # A denied update shows them as well.
        name = webhook.node("warned")
        k8s.CoreV1Api(webhook.api).patch_node(
            name, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-2g.10gb"}}}
        )
        denied = apply(
            {**{k: v for k, v in configs.items() if k != "all-2g.10gb"}, "team-a": layout("2g.11gb")},
            "--dry-run=server",
        )
        assert denied.returncode != 0
        # Other tests of the session may have left nodes on that config too (the message names a
        # few and counts the rest), so only the cause is checked here.
        assert "would break" in denied.stderr and "(all-2g.10gb removed)" in denied.stderr, denied.stderr
        assert 'Warning: config.yaml: mig-configs.team-a[0].mig-devices."2g.11gb"' in denied.stderr
    finally:
        restored = apply(configs)
        assert restored.returncode == 0, restored.stderr


def test_rotated_certificate_is_used_by_the_api_server_without_restart(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    process = webhook.process
    pid = process.process.pid  # type: ignore[union-attr]
    new_serial = process.authority.issue(process.cert_file, process.key_file)
    wait_for(
        lambda: served_serial(process.host, process.port, process.ca_file) == new_serial,
        "the new certificate",
    )
    name = webhook.node("rotated")
    result = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb")
    assert "did you mean all-1g.5gb" in result.stderr
    assert kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb").returncode == 0
    assert process.process.pid == pid and process.process.poll() is None  # type: ignore[union-attr]


def test_cordon_mode_cordons_only_nodes_that_were_schedulable(
    cordon_webhook: Deployment, kubectl: KubectlRunner
) -> None:
    wait_active(kubectl, cordon_webhook)
    free = cordon_webhook.node("cordon")
    assert kubectl("label", "node", free, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb").returncode == 0
    node = read_node(cordon_webhook.api, free)
    assert node.spec.unschedulable is True
    assert node.metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert our_taints(node) == []
    assert HoldRecord.from_annotation(node.metadata.annotations[keys.ANNOTATION_HOLD]).cordon is True  # type: ignore[union-attr]

    admin_cordoned = cordon_webhook.node("admin-cordoned")
    assert kubectl("cordon", admin_cordoned).returncode == 0
    assert kubectl("label", "node", admin_cordoned, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb").returncode == 0
    node = read_node(cordon_webhook.api, admin_cordoned)
    assert node.spec.unschedulable is True
    assert HoldRecord.from_annotation(node.metadata.annotations[keys.ANNOTATION_HOLD]).cordon is False  # type: ignore[union-attr]


def test_unparsable_configmap_keeps_the_last_good_config_and_says_so(
    cordon_webhook: Deployment, kubectl: KubectlRunner, default_config_text: str
) -> None:
    wait_active(kubectl, cordon_webhook)
    process = cordon_webhook.process
    broken = kubectl(
        "patch",
        "configmap",
        "-n",
        NAMESPACE,
        CONFIGMAP_WARN.name,
        "--type=merge",
        "-p",
        json.dumps({"data": {"config.yaml": "version: v1\nmig-configs: ["}}),
    )
    assert broken.returncode == 0, broken.stderr  # warn mode: allowed...
    assert "Warning:" in broken.stderr and "does not parse" in broken.stderr  # ...with a warning
    wait_for(lambda: process.metric("mig_guard_webhook_config_last_good_in_use") == 1, "last good in use")
    status, text = process.get("/readyz")
    assert status == 200
    assert "last good version in use" in text
    assert "does not parse" in process.logs()
    # The last good config still judges.
    name = cordon_webhook.node("lastgood")
    assert (
        "did you mean all-1g.5gb"
        in kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb").stderr
    )
    restored = kubectl(
        "patch",
        "configmap",
        "-n",
        NAMESPACE,
        CONFIGMAP_WARN.name,
        "--type=merge",
        "-p",
        json.dumps({"data": {"config.yaml": default_config_text}}),
    )
    assert restored.returncode == 0, restored.stderr
    wait_for(lambda: process.metric("mig_guard_webhook_config_last_good_in_use") == 0, "the fixed config")


def test_unknown_hardware_is_allowed_with_a_warning_at_kubectl(
    webhook: Deployment, kubectl: KubectlRunner
) -> None:
    name = webhook.node("nogfd")
    k8s.CoreV1Api(webhook.api).patch_node(name, {"metadata": {"labels": {keys.LABEL_GPU_PRODUCT: None}}})
    result = kubectl("label", "node", name, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb")
    assert result.returncode == 0, result.stderr
    assert "Warning: GPU hardware unknown" in result.stderr
    assert read_node(webhook.api, name).metadata.labels[keys.LABEL_MIG_STATE] == keys.STATE_PENDING


def test_the_canonical_configurations_are_accepted_by_the_api_server(
    k8s_api: Any, authority: TestAuthority
) -> None:
    """What the chart copies: the API server validates them (CEL compiles, schema holds); dry run, stores nothing."""
    admission = k8s.AdmissionregistrationV1Api(k8s_api)
    for client_config in (
        registration.url_client_config("https://127.0.0.1:9443/validate", authority.pem),
        registration.service_client_config("mig-guard", "mig-guard-webhook", "/validate", authority.pem),
    ):
        validating = registration.validating_configuration("mig-guard-canonical", client_config, CONFIGMAP)
        created = admission.create_validating_webhook_configuration(validating, dry_run="All")
        assert [w.name for w in created.webhooks] == [
            registration.NODE_VALIDATOR,
            registration.CONFIGMAP_GUARD,
        ]
        assert created.webhooks[0].side_effects == "None"
        assert (
            created.webhooks[0].match_conditions[0].expression
            == registration.node_match_conditions()[0]["expression"]
        )
        mutating = registration.mutating_configuration("mig-guard-canonical", client_config)
        created_mutating = admission.create_mutating_webhook_configuration(mutating, dry_run="All")
        assert created_mutating.webhooks[0].reinvocation_policy == "IfNeeded"
    with pytest.raises(ApiException):
        admission.read_validating_webhook_configuration("mig-guard-canonical")
