"""`mig-guard certs` against the real API server: Secrets created once and then left alone, the CA
and caBundle stable across runs, a near-expiry serving certificate renewed under the same CA, a CA
near its end rotated with the old CA still trusted, and the webhook configurations' caBundle kept
equal to the Secret's ca.crt."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client as k8s
from kubernetes.client import ApiException

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
from devcluster.controlplane import free_port
from migcore import keys
from webhook import registration

NAMESPACE = "certs-e2e"
SECRET = "webhook-tls"
SERVICE = "mig-guard-webhook"
CONFIG = "certs-e2e"
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "migcore" / "data" / "default-mig-parted-config.yaml"


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


WEBHOOK_CONFIG = "certs-e2e-live"


@pytest.fixture
def webhook_with_issued_certs(cluster: Any, kubeconfig: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The real `mig-guard webhook` serving the certificate `mig-guard certs` wrote to --write-dir."""
    certs_dir = tmp_path / "tls"
    issued = run_certs(kubeconfig, "--write-dir", str(certs_dir))
    assert issued.returncode == 0, issued.stderr
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mig_guard", "webhook", "--listen", f"127.0.0.1:{port}",
            "--tls-cert-file", str(certs_dir / "tls.crt"), "--tls-key-file", str(certs_dir / "tls.key"),
            "--mig-config-file", str(SHIPPED_CONFIG), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(certs_dir / "ca.crt"))
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the webhook did not become ready"
                time.sleep(0.2)
        yield f"https://127.0.0.1:{port}/validate", certs_dir
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_api_server_trusts_the_issued_certificate_through_the_patched_ca_bundle(
    cluster: Any, kubeconfig: Path, webhook_with_issued_certs: tuple[str, Path]
) -> None:
    """End to end: the configuration starts without a caBundle; `mig-guard certs` patches it; the API
    server then calls the webhook over TLS and relays its denial of a typo."""
    url, _ = webhook_with_issued_certs
    admission: Any = k8s.AdmissionregistrationV1Api(cluster)
    core: Any = k8s.CoreV1Api(cluster)
    selector = {"matchLabels": {"mig-guard-test": WEBHOOK_CONFIG}}  # only this test's node
    hook = {
        "name": "nodes.validate.mig-guard.io",
        "clientConfig": {"url": url},
        "rules": registration.NODE_RULES,
        "matchConditions": registration.node_match_conditions(),
        "objectSelector": selector,
        "failurePolicy": "Fail",
        "sideEffects": "None",
        "timeoutSeconds": 5,
        "admissionReviewVersions": ["v1"],
    }
    admission.create_validating_webhook_configuration(
        {"metadata": {"name": WEBHOOK_CONFIG}, "webhooks": [hook]}
    )
    node = f"certs-e2e-{uuid.uuid4().hex[:6]}"
    core.create_node({"metadata": {"name": node, "labels": {"mig-guard-test": WEBHOOK_CONFIG}}})
    try:
        patched = run_certs(kubeconfig, "--webhook-config", WEBHOOK_CONFIG)
        assert patched.returncode == 0, patched.stderr
        assert f"ValidatingWebhookConfiguration {WEBHOOK_CONFIG}: patched (1 webhooks)" in patched.stdout
        deadline = time.monotonic() + 30
        while True:  # the API server picks the patched configuration up asynchronously
            try:
                core.patch_node(node, {"metadata": {"labels": {keys.LABEL_MIG_CONFIG: "all-1g.5gbb"}}})
            except ApiException as exc:
                if "denied the request" in str(exc.body):
                    assert "did you mean" in str(exc.body)
                    break
                assert time.monotonic() < deadline, exc.body
            else:
                pytest.fail("a typo was accepted")
            time.sleep(0.2)
    finally:
        admission.delete_validating_webhook_configuration(WEBHOOK_CONFIG)
        core.delete_node(node)
