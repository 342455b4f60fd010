"""The Helm chart: lint, schema, rendered content, and - on the real API server - server-side schema
validation, `helm install`, what each ServiceAccount may and may not do, and which node and
ConfigMap writes the webhook configurations send to the webhook (matchConditions)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from certs.ca_bundle import CABundlePatcher
from certs.provision import provision
from certs.rotation import Action
from certs.secret_store import SecretStore
from devcluster import binaries
from devcluster import helpers as cluster
from devcluster.helpers import service_account_client
from kube.config_source import ConfigMapRef
from mig_guard.cli import build_parser
from mig_guard.commands.certs import request_from_args
from migcore import keys
from tools import render_chart_cel
from webhook import node_policy, registration
from webhook.server import GRACEFUL_TIMEOUT_SECONDS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mig-guard"
SHIPPED_CONFIG = REPO / "migcore" / "data" / "default-mig-parted-config.yaml"
CEL_TEMPLATE = CHART / "templates" / "_cel.tpl"

# Value sets every rendering check runs against.
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "cert-manager+reference": [
        "--set=certs.mode=cert-manager",
        "--set=migPartedConfig.mode=reference",
        "--set=metrics.serviceMonitor.enabled=true",
    ],
    "cordon+rsa+no-renewal": [
        "--set=hold=cordon",
        "--set=certs.keyType=rsa",
        "--set=certs.rsaBits=3072",
        "--set=certs.renewal.enabled=false",
        "--set=reconciler.privileged=false",
        "--set=reconciler.defaultMigConfig=all-disabled",
        "--set=reconciler.rebootEnabled=true",
        "--set=rollout.enabled=false",
    ],
    "simulated-gpus": [
        "--set=reconciler.gpuBackend=simulated",
        "--set=reconciler.simulatedGpus=NVIDIA-A100-SXM4-40GB:2",
    ],
}

Run = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    try:
        return binaries.find_binary("helm")
    except binaries.BinariesMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def helm(helm_binary: Path) -> Run:
    def run(
        *args: str, kubeconfig: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": "/tmp/mig-guard-helm/cache",
            "HELM_CONFIG_HOME": "/tmp/mig-guard-helm/config",
        }
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return subprocess.run(
            [str(helm_binary), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    return run


def render(
    helm: Run, *values: str, namespace: str = "mig-guard", release: str = "mg"
) -> list[dict[str, Any]]:
    result = helm("template", release, str(CHART), "--namespace", namespace, *values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def certs_jobs(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        j for j in by_kind(docs, "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == "certs"
    ]


def one(docs: Sequence[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


# ------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strict", [False, True])
def test_helm_lint_is_clean(helm: Run, variant: str, strict: bool) -> None:
    result = helm("lint", str(CHART), *(["--strict"] if strict else []), *VARIANTS[variant])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("webhook.bogus=1", "bogus"),
        ("hold=drain", "hold"),
        ("webhook.timeoutSeconds=60", "timeoutSeconds"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("certs.rsaBits=1024", "rsaBits"),
        ("certs.mode=helm-genca", "mode"),
        ("image.digest=latest", "digest"),
        ("reconciler.gpuBackend=cuda", "gpuBackend"),
        ("reconciler.gpuBackend=simulated", "simulatedGpus"),  # which GPUs, then?
        ("reconciler.simulatedGpus=NVIDIA-A100-SXM4-40GB", "simulatedGpus"),
        ("reconciler.simulatedGpus=NVIDIA-A100-SXM4-40GB:2", "simulatedGpus"),  # but nvml
        ("certs.renewBeforeDays=400", "renewBeforeDays"),
        ("rollout.maxUnavailable=0", "maxUnavailable"),
        ("rollout.maxUnavailable=150%", "maxUnavailable"),
        ("rollout.leaseSeconds=1", "leaseSeconds"),
        ("rollout.failureLimit=-1", "failureLimit"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(helm: Run, value: str, complaint: str) -> None:
    result = helm("template", "mg", str(CHART), f"--set={value}")
    assert result.returncode != 0
    assert complaint in result.stderr


def test_clusters_without_ga_match_conditions_are_refused(helm: Run) -> None:
    too_old = helm("template", "mg", str(CHART), "--kube-version", "1.29.9")
    assert too_old.returncode != 0
    assert "kubeVersion" in too_old.stderr or "Kubernetes version" in too_old.stderr
    assert helm("template", "mg", str(CHART), "--kube-version", "1.30.0").returncode == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_rbac_rule_uses_a_wildcard(helm: Run, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    roles = by_kind(docs, "Role") + by_kind(docs, "ClusterRole")
    assert roles
    for role in roles:
        for rule in role.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(field, [])), (role["metadata"]["name"], rule)


def test_shipped_mig_parted_config_is_the_domain_cores(helm: Run) -> None:
    assert (CHART / "files" / "default-mig-parted-config.yaml").read_bytes() == SHIPPED_CONFIG.read_bytes()
    configmap = one(render(helm), "ConfigMap", "mig-parted-config")
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == yaml.safe_load(SHIPPED_CONFIG.read_text())


def test_reference_mode_points_both_components_at_the_gpu_operators_configmap(helm: Run) -> None:
    docs = render(helm, "--set=migPartedConfig.mode=reference")
    assert not by_kind(docs, "ConfigMap")
    ref = "--configmap=gpu-operator/default-mig-parted-config"
    assert ref in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ref in one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    namespaces = {
        d["metadata"]["namespace"] for d in by_kind(docs, "Role") if "configmaps" in str(d["rules"])
    }
    assert namespaces == {"gpu-operator"}


def test_webhook_pods_are_hardened_replicated_and_spread(helm: Run) -> None:
    docs = render(helm)
    deployment = one(docs, "Deployment", "-webhook")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = spec["containers"][0]
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The probes use the health port: clients stalling the admission port cannot fail them.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health", "scheme": "HTTPS"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health", "scheme": "HTTPS"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    # Keeps answering until its endpoint is gone everywhere (a rolling upgrade refused calls without).
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    # ...and then drains within gunicorn's graceful timeout, before the kubelet would kill it.
    assert spec["terminationGracePeriodSeconds"] > 5 + GRACEFUL_TIMEOUT_SECONDS
    longer = one(render(helm, "--set=webhook.preStopSleepSeconds=60"), "Deployment", "-webhook")
    assert longer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 60 + GRACEFUL_TIMEOUT_SECONDS
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    assert "podAntiAffinity" in spec["affinity"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mg-mig-guard-webhook-tls"
    assert "emptyDir" in volumes["tmp"]
    assert all("subPath" not in m for m in container["volumeMounts"])  # subPath mounts never see rotation
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"},
        {"name": "metrics", "port": 8081, "targetPort": "health", "protocol": "TCP"},
    ]


def test_the_admission_port_admits_the_api_server_only(helm: Run) -> None:
    docs = render(
        helm,
        "--set=webhook.networkPolicy.apiServerCIDRs={10.0.0.1/32,fd00::1/128}",
        "--set=webhook.networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    )
    admission, health = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert admission == {
        "ports": [{"port": 8443, "protocol": "TCP"}],
        "from": [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "fd00::1/128"}}],
    }
    assert health == {
        "ports": [{"port": 8081, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    }
    # Rendered without a cluster (helm template, GitOps), the addresses are unknown: any source may
    # reach the admission port, and the policy and the install notes say so.
    result = helm("template", "mg", str(CHART), "--namespace", "mig-guard")
    assert "NOT KNOWN at render time" in result.stdout
    notes = helm("install", "mg", str(CHART), "--namespace", "mig-guard", "--dry-run=client")
    assert "WARNING: the API server's addresses were not known" in notes.stdout
    assert one(render(helm), "NetworkPolicy")["spec"]["ingress"][0] == {
        "ports": [{"port": 8443, "protocol": "TCP"}]
    }


def test_reconciler_runs_on_gpu_nodes_only_and_survives_its_own_taint(helm: Run) -> None:
    spec = one(render(helm), "DaemonSet")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {keys.LABEL_MIG_CAPABLE: "true"}  # as the operator's mig-manager
    assert {"key": keys.TAINT_KEY, "operator": "Exists"} in spec["tolerations"]
    container = spec["containers"][0]
    assert "--node-name=$(NODE_NAME)" in container["args"]
    node_name = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["pod-resources"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert volumes["host-state"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_rollout_budget_is_on_by_default_and_both_components_agree(helm: Run) -> None:
    """With a budget the reconciler holds a node when its slot is free, so the webhook must not hold
    every node of a push at admission; without one the webhook holds as before."""
    docs = render(helm, "--set=rollout.maxUnavailable=2", namespace="gpu-system")
    reconciler = build_parser().parse_args(
        one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert (reconciler.rollout_budget, reconciler.rollout_namespace) == ("2", "gpu-system")
    assert (reconciler.rollout_pool_label, reconciler.rollout_failure_limit) == ("nvidia.com/gpu.product", 3)
    webhook = build_parser().parse_args(
        one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert webhook.admission_hold is False
    role = one(docs, "Role", "-rollout")
    assert role["metadata"]["namespace"] == "gpu-system"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update", "delete"],
        }
    ]
    off = render(helm, "--set=rollout.enabled=false")
    assert (
        build_parser()
        .parse_args(one(off, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"])
        .rollout_budget
        is None
    )
    assert (
        build_parser()
        .parse_args(one(off, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])
        .admission_hold
    )
    assert not [r for r in by_kind(off, "Role") if r["metadata"]["name"].endswith("-rollout")]
    no_agent = render(helm, "--set=reconciler.enabled=false")  # nobody would hold the node later
    assert (
        build_parser()
        .parse_args(one(no_agent, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])
        .admission_hold
    )


def test_reconciler_runs_nvml_as_the_gpu_operators_mig_manager_does(helm: Run) -> None:
    spec = one(render(helm), "DaemonSet")["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"  # the operator's: the NVML library and nvidia-smi
    container = spec["containers"][0]
    args = container["args"]
    for arg in (
        "--driver-ready-file=/host/run/nvidia/validations/driver-ready",
        "--driver-root=/driver-root",
        "--host-root=/host",
        "--cdi=auto",
        "--host-gpu-clients=auto",
        "--operands-namespace=auto",
    ):
        assert arg in args
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"] if "hostPath" in v}
    assert (mounts["host-root"]["mountPath"], mounts["host-root"]["readOnly"]) == ("/host", True)
    assert mounts["host-root"]["mountPropagation"] == "HostToContainer"
    assert volumes["host-root"] == {"path": "/", "type": "Directory"}
    assert mounts["driver-root"]["mountPath"] == "/driver-root"
    assert volumes["driver-root"] == {"path": "/run/nvidia/driver", "type": "DirectoryOrCreate"}
    # Without the GPU Operator: the node's default runtime, no driver marker to wait for.
    other = one(
        render(helm, "--set=reconciler.runtimeClassName=", "--set=reconciler.driver.readyFile="), "DaemonSet"
    )["spec"]["template"]["spec"]
    assert "runtimeClassName" not in other
    assert not [a for a in other["containers"][0]["args"] if a.startswith("--driver-ready-file")]


def test_the_reconciler_may_delete_pods_only_in_the_gpu_operators_namespace(helm: Run) -> None:
    docs = render(helm)
    role = one(docs, "Role", "-reconciler-gpu-operator")
    assert role["metadata"]["namespace"] == "gpu-operator"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["default-gpu-clients"],
            "verbs": ["get"],
        },
    ]
    binding = one(docs, "RoleBinding", "-reconciler-gpu-operator")
    assert binding["metadata"]["namespace"] == "gpu-operator"
    for doc in by_kind(docs, "ClusterRole"):
        for rule in doc["rules"]:
            assert "delete" not in rule["verbs"] or rule["resources"] != ["pods"], doc["metadata"]["name"]
    openshift = render(helm, "--set=reconciler.operandsNamespace=nvidia-gpu-operator")
    assert (
        one(openshift, "Role", "-reconciler-gpu-operator")["metadata"]["namespace"] == "nvidia-gpu-operator"
    )
    args = one(openshift, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--operands-namespace=nvidia-gpu-operator" in args
    assert not [
        d
        for d in render(helm, "--set=reconciler.operatorRbac=false")
        if d["metadata"]["name"].endswith("-gpu-operator")
    ]


def test_webhook_configurations_are_shaped_as_the_values_say(helm: Run) -> None:
    docs = render(helm, "--set=webhook.failurePolicy=Ignore", "--set=webhook.timeoutSeconds=3")
    validating = one(docs, "ValidatingWebhookConfiguration")
    mutating = one(docs, "MutatingWebhookConfiguration")
    hooks = validating["webhooks"] + mutating["webhooks"]
    assert len(hooks) == 3
    for hook in hooks:
        assert hook["failurePolicy"] == "Ignore"
        assert hook["timeoutSeconds"] == 3
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert "caBundle" not in hook["clientConfig"]  # filled by `mig-guard certs`, never by a render
        assert hook["matchConditions"]
    assert mutating["webhooks"][0]["reinvocationPolicy"] == "IfNeeded"


@pytest.mark.parametrize("variant", VARIANTS)
def test_webhook_rules_and_match_conditions_are_the_canonical_ones(helm: Run, variant: str) -> None:
    """The chart and webhook/registration.py (used by the webhook's own tests) must not drift."""
    docs = render(helm, *VARIANTS[variant])
    validating = one(docs, "ValidatingWebhookConfiguration")
    mutating = one(docs, "MutatingWebhookConfiguration")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    ref = ConfigMapRef.parse(next(a for a in args if a.startswith("--configmap=")).split("=", 1)[1])
    users = {
        "reconciler_users": [a.split("=", 1)[1] for a in args if a.startswith("--reconciler-user=")],
        "allow_unbound": "--allow-unbound-reconciler-tokens" in args,
    }
    reference = registration.validating_configuration("x", {}, ref, **users)["webhooks"]
    reference += registration.mutating_configuration("x", {}, **users)["webhooks"]
    for ours, theirs in zip(validating["webhooks"] + mutating["webhooks"], reference, strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["rules"] == theirs["rules"]
        assert ours["matchConditions"] == theirs["matchConditions"]
        path = registration.MUTATE_PATH if ".mutate." in ours["name"] else registration.VALIDATE_PATH
        assert ours["clientConfig"]["service"]["path"] == path


def test_the_charts_cel_is_generated_from_the_code() -> None:
    assert CEL_TEMPLATE.read_text() == render_chart_cel.render(), "run python tools/render_chart_cel.py"


@pytest.mark.parametrize(("allow_unbound", "default"), [(False, ""), (True, ""), (False, "all-disabled")])
def test_the_node_writers_policy_is_the_canonical_one(helm: Run, allow_unbound: bool, default: str) -> None:
    """The API server evaluates the chart's policy; the e2e tests prove webhook/node_policy.py's."""
    docs = render(
        helm,
        f"--set=reconciler.allowUnboundTokens={str(allow_unbound).lower()}",
        f"--set=reconciler.defaultMigConfig={default}",
    )
    policy = one(docs, "ValidatingAdmissionPolicy")
    user = "system:serviceaccount:mig-guard:mg-mig-guard-reconciler"
    reference = node_policy.node_writers_policy("x", [user], allow_unbound, default)
    assert policy["spec"] == reference["spec"]
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ("--allow-unbound-reconciler-tokens" in args) is allow_unbound
    # The webhook and the reconciler take the same default (the reconciler sets it, the webhook allows it).
    reconciler = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    for component in (args, reconciler):
        assert (
            [a for a in component if a.startswith("--default-mig-config")]
            == [f"--default-mig-config={default}"]
        ) is bool(default)


@pytest.mark.parametrize("variant", VARIANTS)
def test_component_arguments_are_accepted_by_their_commands(helm: Run, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    webhook_args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    args = build_parser().parse_args(webhook_args)
    assert args.command == "webhook"
    assert args.reconciler_user == ["system:serviceaccount:mig-guard:mg-mig-guard-reconciler"]
    reconciler_args = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    args = build_parser().parse_args(reconciler_args)
    assert args.command == "reconcile"
    assert args.node_name == "$(NODE_NAME)"  # expanded by the kubelet from the downward-API env


@pytest.mark.parametrize("variant", VARIANTS)
def test_uninstall_hooks_remove_webhooks_first_and_the_rest_after(helm: Run, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    jobs = {
        j["metadata"]["annotations"]["helm.sh/hook"]: j
        for j in by_kind(docs, "Job")
        if "uninstall" in j["metadata"]["name"]
    }
    assert set(jobs) == {"pre-delete", "post-delete"}
    pre = jobs["pre-delete"]["spec"]["template"]["spec"]["containers"][0]["args"]
    post = jobs["post-delete"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert pre == ["uninstall", "--webhook-config=mg-mig-guard"]
    assert "--node-keys" in post
    assert ("--secret-name=mg-mig-guard-webhook-tls" in post) == (
        "certs.mode=cert-manager" not in str(VARIANTS[variant])
    )
    assert "--wait-for-pods=app.kubernetes.io/instance=mg,app.kubernetes.io/component=reconciler" in post
    parser = build_parser()
    for args in (pre, post):
        assert parser.parse_args(args).command == "uninstall"
    none = render(helm, *VARIANTS[variant], "--set=cleanupOnUninstall=false")
    assert not [d for d in none if "uninstall" in d["metadata"]["name"]]


def test_cert_manager_mode_uses_the_ca_injector_and_no_jobs(helm: Run) -> None:
    docs = render(helm, "--set=certs.mode=cert-manager")
    assert not certs_jobs(docs) and not by_kind(docs, "CronJob")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        annotations = one(docs, kind)["metadata"]["annotations"]
        assert annotations["cert-manager.io/inject-ca-from"] == "mig-guard/mg-mig-guard-webhook"
    serving = one(docs, "Certificate", "-webhook")
    assert serving["spec"]["secretName"] == "mg-mig-guard-webhook-tls"
    assert "mg-mig-guard-webhook.mig-guard.svc" in serving["spec"]["dnsNames"]
    assert one(docs, "Certificate", "-ca")["spec"]["isCA"] is True


def test_certs_jobs_run_before_and_after_install_with_arguments_the_command_accepts(helm: Run) -> None:
    docs = render(helm)
    jobs = {d["metadata"]["annotations"]["helm.sh/hook"]: d for d in certs_jobs(docs)}
    assert set(jobs) == {"pre-install,pre-upgrade", "post-install,post-upgrade"}
    cron = one(docs, "CronJob")["spec"]["jobTemplate"]
    pod_specs = [j["spec"]["template"]["spec"] for j in jobs.values()] + [cron["spec"]["template"]["spec"]]
    for pod_spec in pod_specs:
        args = build_parser().parse_args(pod_spec["containers"][0]["args"])
        assert args.namespace == "mig-guard"
        assert args.secret_name == "mg-mig-guard-webhook-tls"
        assert args.service_name == "mg-mig-guard-webhook"
        assert args.webhook_config == ["mg-mig-guard"]
        assert pod_spec["containers"][0]["securityContext"]["runAsNonRoot"] is True
    pre = jobs["pre-install,pre-upgrade"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--allow-missing-webhook-configs" in pre  # the configurations do not exist before install


# ------------------------------------------------------------------ on the real API server


def apply_dry_run(kubectl: Run, manifest: str) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest)


def ensure_namespace(kubectl: Run, name: str) -> None:
    kubectl("create", "namespace", name)  # AlreadyExists is fine
    assert kubectl("get", "namespace", name).returncode == 0


@pytest.mark.parametrize("variant", ["defaults", "cordon+rsa+no-renewal"])
def test_rendered_manifests_pass_the_api_servers_own_validation(
    helm: Run, kubectl: Run, variant: str
) -> None:
    ensure_namespace(kubectl, "mig-guard-dry")
    ensure_namespace(kubectl, keys.GPU_OPERATOR_NAMESPACE)  # the operator's, where its Role goes
    result = helm("template", "dry", str(CHART), "--namespace", "mig-guard-dry", *VARIANTS[variant])
    assert result.returncode == 0, result.stderr
    applied = apply_dry_run(kubectl, result.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "(server dry run)" in applied.stdout
    assert applied.stdout.count("(server dry run)") == result.stdout.count("\nkind: ")


def test_invalid_cel_would_be_refused_by_the_api_server(kubectl: Run, helm: Run) -> None:
    # Guards the test above: the dry run does compile matchConditions.
    docs = render(helm, "--namespace", "mig-guard-dry", release="dry")
    config = one(docs, "ValidatingWebhookConfiguration")
    config["webhooks"][0]["matchConditions"][0]["expression"] = "object.metadata.labels.exists(k, "
    applied = apply_dry_run(kubectl, yaml.safe_dump(config))
    assert applied.returncode != 0
    assert "matchConditions" in applied.stderr


NAMESPACE = "mig-guard-e2e"


@pytest.fixture(scope="module")
def release(helm: Run, control_plane: Any, kubeconfig: Path) -> Iterator[str]:
    """The chart installed (hooks skipped: no kubelet runs the Jobs here) and removed afterwards, so
    its failurePolicy=Fail webhooks never outlive this module."""
    name = "mg-" + uuid.uuid4().hex[:6]
    cluster.ensure_namespace(control_plane.api, keys.GPU_OPERATOR_NAMESPACE)  # its Role goes there
    installed = helm(
        "install", name, str(CHART), "--namespace", NAMESPACE, "--create-namespace", "--no-hooks",
        kubeconfig=kubeconfig, timeout=180,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    try:
        yield name
    finally:
        # Helm deletes the webhook configurations first, but the API server drops them from its
        # cache asynchronously; with no webhook pod, a ConfigMap DELETE in that gap would fail.
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            subprocess.run(
                [str(binaries.find_binary("kubectl")), "delete", kind, f"{name}-mig-guard"],
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                capture_output=True,
                check=False,
            )
        time.sleep(2)
        removed = helm(
            "uninstall", name, "--namespace", NAMESPACE, "--no-hooks", kubeconfig=kubeconfig, timeout=180
        )
        assert removed.returncode == 0, removed.stderr


def test_helm_install_creates_every_object(helm: Run, kubectl: Run, kubeconfig: Path, release: str) -> None:
    status = helm("status", release, "--namespace", NAMESPACE, "-o", "json", kubeconfig=kubeconfig)
    assert json.loads(status.stdout)["info"]["status"] == "deployed"
    full = f"{release}-mig-guard"
    for kind, name in [
        ("deployment", f"{full}-webhook"),
        ("service", f"{full}-webhook"),
        ("poddisruptionbudget", f"{full}-webhook"),
        ("networkpolicy", f"{full}-webhook"),
        ("daemonset", f"{full}-reconciler"),
        ("cronjob", f"{full}-certs-renewal"),
        ("configmap", f"{full}-mig-parted-config"),
        ("serviceaccount", f"{full}-webhook"),
        ("serviceaccount", f"{full}-reconciler"),
        ("serviceaccount", f"{full}-certs"),
        ("validatingadmissionpolicy", f"{full}-node-writers"),
        ("validatingadmissionpolicybinding", f"{full}-node-writers"),
    ]:
        got = kubectl("get", kind, name, "-n", NAMESPACE)
        assert got.returncode == 0, got.stderr
    for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
        assert kubectl("get", kind, full).returncode == 0


def can_i(kubectl: Run, sa: str, verb: str, resource: str, namespace: str | None) -> bool:
    """``resource`` is ``kind[/name][:subresource]``."""
    where = ["--all-namespaces"] if namespace == ALL_NAMESPACES else ["-n", namespace] if namespace else []
    resource, _, subresource = resource.partition(":")
    sub = [f"--subresource={subresource}"] if subresource else []
    as_sa = f"--as=system:serviceaccount:{NAMESPACE}:{sa}"
    result = kubectl("auth", "can-i", verb, resource, *sub, *where, as_sa)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


ALL_NAMESPACES = "(all)"
# (ServiceAccount suffix, verb, kind[/name][:subresource], namespace (None: cluster-scoped kinds, "@": the
# release namespace, ALL_NAMESPACES: across all namespaces), allowed)
PERMISSIONS: list[tuple[str, str, str, str | None, bool]] = [
    # webhook: its ConfigMap (by name), node list for the ConfigMap guard; nothing else.
    ("webhook", "get", "configmaps/{cm}", "@", True),
    ("webhook", "watch", "configmaps/{cm}", "@", True),
    ("webhook", "list", "configmaps/{cm}", "@", True),
    ("webhook", "list", "nodes", None, True),
    ("webhook", "list", "configmaps", "@", False),
    ("webhook", "list", "configmaps", "kube-system", False),
    ("webhook", "list", "configmaps", ALL_NAMESPACES, False),
    ("webhook", "watch", "configmaps", ALL_NAMESPACES, False),
    ("webhook", "get", "configmaps/other", "@", False),
    ("webhook", "update", "configmaps/{cm}", "@", False),
    ("webhook", "get", "secrets", "@", False),
    ("webhook", "list", "secrets", "@", False),
    ("webhook", "patch", "nodes", None, False),
    ("webhook", "patch", "nodes:status", None, False),
    ("webhook", "create", "pods:eviction", "default", False),
    ("webhook", "delete", "nodes", None, False),
    ("webhook", "list", "pods", None, False),
    ("webhook", "create", "pods:exec", "@", False),
    # reconciler: nodes and their status, pods, evictions, events, its ConfigMap.
    ("reconciler", "get", "nodes", None, True),
    ("reconciler", "watch", "nodes", None, True),
    ("reconciler", "patch", "nodes", None, True),
    ("reconciler", "patch", "nodes:status", None, True),
    ("reconciler", "update", "nodes:status", None, False),
    ("reconciler", "list", "pods", ALL_NAMESPACES, True),
    ("reconciler", "create", "pods:eviction", "default", True),
    ("reconciler", "list", "poddisruptionbudgets.policy", "default", True),
    ("reconciler", "create", "events.events.k8s.io", "default", True),
    ("reconciler", "watch", "configmaps/{cm}", "@", True),
    ("reconciler", "create", "leases.coordination.k8s.io", "@", True),
    ("reconciler", "update", "leases.coordination.k8s.io", "@", True),
    ("reconciler", "delete", "leases.coordination.k8s.io", "@", True),
    ("reconciler", "watch", "leases.coordination.k8s.io", "@", True),
    ("reconciler", "create", "leases.coordination.k8s.io", "kube-node-lease", False),
    ("reconciler", "update", "leases.coordination.k8s.io", "kube-system", False),
    ("reconciler", "list", "leases.coordination.k8s.io", ALL_NAMESPACES, False),
    ("reconciler", "patch", "leases.coordination.k8s.io", "@", False),
    ("webhook", "get", "leases.coordination.k8s.io", "@", False),
    ("reconciler", "delete", "nodes", None, False),
    ("reconciler", "update", "nodes", None, False),
    ("reconciler", "create", "nodes", None, False),
    ("reconciler", "delete", "pods", "default", False),
    ("reconciler", "create", "pods:exec", "default", False),
    ("reconciler", "get", "secrets", "@", False),
    ("reconciler", "list", "configmaps", "@", False),
    ("reconciler", "list", "secrets", ALL_NAMESPACES, False),
    ("reconciler", "patch", "validatingwebhookconfigurations", None, False),
    # certs (renewal CronJob; the hook Jobs get the same rules): its Secrets, the two configurations.
    ("certs", "get", "secrets/{secret}", "@", True),
    ("certs", "update", "secrets/{secret}", "@", True),
    ("certs", "update", "secrets/{secret}-ca", "@", True),
    ("certs", "create", "secrets", "@", True),
    ("certs", "patch", "validatingwebhookconfigurations/{full}", None, True),
    ("certs", "patch", "mutatingwebhookconfigurations/{full}", None, True),
    ("certs", "get", "secrets/other", "@", False),
    ("certs", "list", "secrets", "@", False),
    ("certs", "get", "secrets", ALL_NAMESPACES, False),
    ("certs", "delete", "secrets/{secret}", "@", False),
    ("certs", "get", "secrets", "kube-system", False),
    ("certs", "patch", "validatingwebhookconfigurations/other", None, False),
    ("certs", "delete", "validatingwebhookconfigurations/{full}", None, False),
    ("certs", "list", "nodes", None, False),
]


def test_each_service_account_can_do_what_it_needs_and_nothing_more(kubectl: Run, release: str) -> None:
    full = f"{release}-mig-guard"
    names = {"cm": f"{full}-mig-parted-config", "secret": f"{full}-webhook-tls", "full": full}
    wrong = []
    for suffix, verb, resource, namespace, allowed in PERMISSIONS:
        ns = NAMESPACE if namespace == "@" else namespace
        if can_i(kubectl, f"{full}-{suffix}", verb, resource.format(**names), ns) != allowed:
            wrong.append(f"{suffix} {verb} {resource} in {ns}: expected {'allowed' if allowed else 'denied'}")
    assert not wrong, "\n".join(wrong)


def test_the_webhook_identity_reads_its_configmap_the_way_the_code_does(kubectl: Run, release: str) -> None:
    full = f"{release}-mig-guard"
    as_webhook = f"--as=system:serviceaccount:{NAMESPACE}:{full}-webhook"
    selected = kubectl(
        "get",
        "configmaps",
        "-n",
        NAMESPACE,
        f"--field-selector=metadata.name={full}-mig-parted-config",
        as_webhook,
    )
    assert selected.returncode == 0, selected.stderr
    assert f"{full}-mig-parted-config" in selected.stdout
    unselected = kubectl("get", "configmaps", "-n", NAMESPACE, as_webhook)
    assert unselected.returncode != 0
    assert "forbidden" in unselected.stderr


def test_the_certs_job_does_its_work_with_exactly_its_own_permissions(
    helm: Run, k8s_api: Any, kubectl: Run, kubeconfig: Path, release: str
) -> None:
    """The renewal CronJob's command line, run as its ServiceAccount (a real token, no admin rights):
    first as on install (Secrets created, caBundles patched), then again (nothing to do); then a
    `helm upgrade` leaves the caBundle alone."""
    docs = render(helm, namespace=NAMESPACE, release=release)
    cron = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    request = request_from_args(build_parser().parse_args(cron["containers"][0]["args"]))
    as_certs_job = service_account_client(k8s_api, NAMESPACE, cron["serviceAccountName"])
    store, patcher = SecretStore(as_certs_job, NAMESPACE), CABundlePatcher(as_certs_job)
    first = provision(request, store, patcher)
    assert first.decision.action is Action.CREATE
    assert {(p.kind.value, p.outcome.value) for p in first.patches} == {
        ("ValidatingWebhookConfiguration", "patched"),
        ("MutatingWebhookConfiguration", "patched"),
    }
    bundle = kubectl(
        "get", "validatingwebhookconfiguration", f"{release}-mig-guard",
        "-o", "jsonpath={.webhooks[*].clientConfig.caBundle}",
    )  # fmt: skip
    assert bundle.stdout.split() == [base64.b64encode(first.bundle_pem).decode()] * 2
    second = provision(request, store, patcher)
    assert second.decision.action is Action.KEEP
    assert second.ca.fingerprint == first.ca.fingerprint
    assert {p.outcome.value for p in second.patches} == {"unchanged"}

    # `helm upgrade` re-renders and re-applies the webhook configurations: the caBundle must survive.
    upgraded = helm(
        "upgrade", release, str(CHART), "--namespace", NAMESPACE, "--no-hooks", "--reuse-values",
        "--set=webhook.timeoutSeconds=4", kubeconfig=kubeconfig, timeout=180,
    )  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr
    after = kubectl(
        "get", "validatingwebhookconfiguration", f"{release}-mig-guard",
        "-o", "jsonpath={.webhooks[*].timeoutSeconds} {.webhooks[*].clientConfig.caBundle}",
    )  # fmt: skip
    assert after.stdout.split() == ["4", "4", *[base64.b64encode(first.bundle_pem).decode()] * 2]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_only_mig_keys_reach_the_webhook(kubectl: Run, release: str) -> None:
    """No webhook pod runs here, so with failurePolicy Fail every write the configurations send to
    the webhook fails ("failed calling webhook") and every write they skip succeeds."""
    node = f"chart-test-{uuid.uuid4().hex[:6]}"
    created = kubectl(
        "create",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
    )
    assert created.returncode == 0, created.stderr
    try:
        # The API server picks new webhook configurations up asynchronously.
        attempt = iter(range(1000))
        wait_for(
            lambda: (
                "failed calling webhook"
                in kubectl(
                    "label", "node", node, f"{keys.LABEL_MIG_CONFIG}=probe-{next(attempt)}", "--overwrite"
                ).stderr
            ),
            "the webhook configurations to be active",
        )
        sent = {
            "set mig.config": ["label", "node", node, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gb", "--overwrite"],
            "set the state": ["label", "node", node, f"{keys.LABEL_MIG_STATE}=success"],
            "set a mig-guard annotation": ["annotate", "node", node, f"{keys.ANNOTATION_REASON}=spoofed"],
        }
        skipped = {
            "another label": ["label", "node", node, "team=ml"],
            "a GFD label": ["label", "node", node, "nvidia.com/gfd.timestamp=1700000000"],
            "another annotation": ["annotate", "node", node, "note=hi"],
            "a taint": ["taint", "node", node, "dedicated=ml:NoSchedule"],
        }
        for what, argv in sent.items():
            result = kubectl(*argv)
            assert result.returncode != 0, what
            assert "failed calling webhook" in result.stderr, (what, result.stderr)
        for what, argv in skipped.items():
            result = kubectl(*argv)
            assert result.returncode == 0, (what, result.stderr)
        cm = f"{release}-mig-guard-mig-parted-config"
        new_config = json.dumps({"data": {"config.yaml": "version: v1\nmig-configs: {}\n"}})
        edited = kubectl("patch", "configmap", cm, "-n", NAMESPACE, "--type=merge", "-p", new_config)
        assert "failed calling webhook" in edited.stderr, edited.stderr
        labelled = kubectl("label", "configmap", cm, "-n", NAMESPACE, "touched=yes")
        assert labelled.returncode == 0, labelled.stderr  # the config key did not change
        other = kubectl("create", "configmap", "unrelated", "-n", NAMESPACE, "--from-literal=config.yaml=x")
        assert other.returncode == 0, other.stderr
        unrelated = kubectl(
            "patch", "configmap", "unrelated", "-n", NAMESPACE, "--type=merge", "-p", new_config
        )
        assert unrelated.returncode == 0, unrelated.stderr
    finally:
        kubectl("delete", "node", node, "--wait=false")
        kubectl("delete", "configmap", "unrelated", "-n", NAMESPACE)
