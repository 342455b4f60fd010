"""`mig-guard certs` against the real API server: Secrets created once and then left alone, the CA
and caBundle stable across runs, a near-expiry serving certificate renewed under the same CA, a CA
near its end rotated with the old CA still trusted, and the webhook configurations' caBundle kept
equal to the Secret's ca.crt."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client as k8s

from certs.authority import (
    fingerprint,
    issue_serving_cert,
    load_certificates,
    load_certified_key,
    service_dns_names,
    signed_by,
    subject_alt_names,
)
from certs.ca_bundle import CABundlePatcher
from certs.provision import Request, provision
from certs.rotation import Action
from certs.secret_store import SecretStore

NAMESPACE = "certs-e2e"
SECRET = "webhook-tls"
SERVICE = "mig-guard-webhook"
CONFIG = "certs-e2e"


def run_certs(kubeconfig: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "mig_guard", "certs",
        "--namespace", NAMESPACE, "--secret-name", SECRET, "--service-name", SERVICE,
        "--webhook-config", CONFIG, "--extra-san", "127.0.0.1", "--kubeconfig", str(kubeconfig), *extra,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _webhook(name: str, *, mutating: bool = False) -> dict[str, Any]:
    # Never called: it only matches namespaces labelled for it, and none is.
    hook: dict[str, Any] = {
        "name": name,
        "clientConfig": {"service": {"name": SERVICE, "namespace": NAMESPACE, "path": "/validate"}},
        "rules": [
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["configmaps"]}
        ],
        "namespaceSelector": {"matchLabels": {"mig-guard-test": "never"}},
        "failurePolicy": "Ignore",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    }
    if mutating:
        hook["reinvocationPolicy"] = "IfNeeded"
    return hook


@pytest.fixture(scope="module")
def cluster(k8s_api: Any) -> Iterator[Any]:
    core: Any = k8s.CoreV1Api(k8s_api)
    admission: Any = k8s.AdmissionregistrationV1Api(k8s_api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    admission.create_validating_webhook_configuration(
        {"metadata": {"name": CONFIG}, "webhooks": [_webhook("a.certs.test"), _webhook("b.certs.test")]}
    )
    admission.create_mutating_webhook_configuration(
        {"metadata": {"name": CONFIG}, "webhooks": [_webhook("m.certs.test", mutating=True)]}
    )
    try:
        yield k8s_api
    finally:
        admission.delete_validating_webhook_configuration(CONFIG)
        admission.delete_mutating_webhook_configuration(CONFIG)
        core.delete_namespace(NAMESPACE)


def secret(api: Any, name: str) -> Any:
    core: Any = k8s.CoreV1Api(api)
    return core.read_namespaced_secret(name, NAMESPACE)


def data(api: Any, name: str) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret(api, name).data.items()}


def ca_bundles(api: Any) -> list[bytes]:
    admission: Any = k8s.AdmissionregistrationV1Api(api)
    configs = [
        admission.read_validating_webhook_configuration(CONFIG),
        admission.read_mutating_webhook_configuration(CONFIG),
    ]
    return [base64.b64decode(h.client_config.ca_bundle or "") for c in configs for h in c.webhooks]


def resource_versions(api: Any) -> dict[str, str]:
    admission: Any = k8s.AdmissionregistrationV1Api(api)
    return {
        "serving": secret(api, SECRET).metadata.resource_version,
        "ca": secret(api, SECRET + "-ca").metadata.resource_version,
        "validating": admission.read_validating_webhook_configuration(CONFIG).metadata.resource_version,
        "mutating": admission.read_mutating_webhook_configuration(CONFIG).metadata.resource_version,
    }


def test_certs_lifecycle_on_the_api_server(cluster: Any, kubeconfig: Path, tmp_path: Path) -> None:
    # 1. First run: everything is created.
    first = run_certs(kubeconfig, "--write-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "decision: create" in first.stdout
    assert "PRIVATE KEY" not in first.stdout + first.stderr
    serving = secret(cluster, SECRET)
    assert serving.type == "kubernetes.io/tls"
    stored = data(cluster, SECRET)
    assert set(stored) == {"tls.crt", "tls.key", "ca.crt"}
    leaf = load_certified_key(stored["tls.crt"], stored["tls.key"])
    ca_cert = load_certificates(stored["ca.crt"])[0]
    assert signed_by(leaf.cert, ca_cert)
    assert subject_alt_names(leaf.cert) == {*service_dns_names(SERVICE, NAMESPACE), "127.0.0.1"}
    assert fingerprint(ca_cert) in first.stdout and leaf.fingerprint in first.stdout
    assert ca_bundles(cluster) == [stored["ca.crt"]] * 3  # every webhook of both configurations
    # Attributed to its own field manager, which GitOps tools can be told to ignore.
    managers = {f.manager for f in serving.metadata.managed_fields}
    assert managers == {"mig-guard-certs"}
    admission: Any = k8s.AdmissionregistrationV1Api(cluster)
    webhook_managers = {
        f.manager for f in admission.read_validating_webhook_configuration(CONFIG).metadata.managed_fields
    }
    assert "mig-guard-certs" in webhook_managers
    # The CA's key stays out of the Secret that the webhook pods mount.
    ca_secret = data(cluster, SECRET + "-ca")
    assert load_certified_key(ca_secret["tls.crt"], ca_secret["tls.key"]).cert == ca_cert
    # --write-dir wrote the same material, the key private to its owner.
    assert (tmp_path / "tls.crt").read_bytes() == stored["tls.crt"]
    assert (tmp_path / "ca.crt").read_bytes() == stored["ca.crt"]
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600

    # 2. Second run: nothing changes, nothing is even written.
    before = resource_versions(cluster)
    second = run_certs(kubeconfig)
    assert second.returncode == 0, second.stderr
    assert "decision: keep" in second.stdout
    assert resource_versions(cluster) == before
    assert data(cluster, SECRET) == stored

    # 3. A serving certificate one day from expiry is renewed; the CA and the caBundle stay.
    ca = load_certified_key(ca_secret["tls.crt"], ca_secret["tls.key"])
    now = dt.datetime.now(dt.UTC)
    names = [*service_dns_names(SERVICE, NAMESPACE), "127.0.0.1"]
    expiring = issue_serving_cert(ca, names, now - dt.timedelta(days=364), dt.timedelta(days=365))
    SecretStore(cluster, NAMESPACE).write(
        SECRET, {"tls.crt": expiring.cert_pem(), "tls.key": expiring.key_pem(), "ca.crt": stored["ca.crt"]}
    )
    third = run_certs(kubeconfig)
    assert third.returncode == 0, third.stderr
    assert "decision: renew-leaf" in third.stdout
    renewed = data(cluster, SECRET)
    new_leaf = load_certified_key(renewed["tls.crt"], renewed["tls.key"])
    assert new_leaf.fingerprint not in (leaf.fingerprint, expiring.fingerprint)
    assert new_leaf.cert.not_valid_after_utc > now + dt.timedelta(days=300)
    assert signed_by(new_leaf.cert, ca_cert)
    assert renewed["ca.crt"] == stored["ca.crt"]
    assert data(cluster, SECRET + "-ca") == ca_secret
    assert ca_bundles(cluster) == [stored["ca.crt"]] * 3


def test_a_ca_near_its_end_is_replaced_and_the_old_one_stays_trusted(cluster: Any) -> None:
    # Runs after the lifecycle test (same module, file order): a CA exists. Clock: 9.5 years on.
    old_ca = load_certificates(data(cluster, SECRET + "-ca")["tls.crt"])[0]
    later = old_ca.not_valid_after_utc - dt.timedelta(days=180)
    request = Request(namespace=NAMESPACE, secret_name=SECRET, service_name=SERVICE, webhook_configs=[CONFIG])
    outcome = provision(request, SecretStore(cluster, NAMESPACE), CABundlePatcher(cluster), now=lambda: later)
    assert outcome.decision.action is Action.RENEW_CA
    bundle = [fingerprint(c) for c in load_certificates(data(cluster, SECRET)["ca.crt"])]
    assert bundle == [outcome.ca.fingerprint, fingerprint(old_ca)]
    assert ca_bundles(cluster) == [outcome.bundle_pem] * 3
    leaf = x509.load_pem_x509_certificate(data(cluster, SECRET)["tls.crt"])
    assert signed_by(leaf, outcome.ca.cert)


def test_a_missing_webhook_configuration_fails_unless_allowed(cluster: Any, kubeconfig: Path) -> None:
    missing = run_certs(kubeconfig, "--webhook-config", "does-not-exist")
    assert missing.returncode == 1
    assert "does-not-exist" in missing.stderr
    allowed = run_certs(kubeconfig, "--webhook-config", "does-not-exist", "--allow-missing-webhook-configs")
    assert allowed.returncode == 0, allowed.stderr


def test_bad_flags_are_a_usage_error(kubeconfig: Path) -> None:
    result = run_certs(kubeconfig, "--validity-days", "10", "--renew-before-days", "30")
    assert result.returncode == 2
    assert "renew-before" in result.stderr
