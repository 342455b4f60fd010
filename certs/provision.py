"""One `mig-guard certs` run: read what is stored, decide, issue, store, patch the caBundles.

Two Secrets, so that the CA's private key never reaches the webhook pods:

* ``<secret-name>`` (type kubernetes.io/tls): ``tls.crt``, ``tls.key`` and ``ca.crt`` (the CA
  bundle) - the webhook Deployment mounts this one;
* ``<secret-name>-ca`` (type kubernetes.io/tls): the CA certificate and key as ``tls.crt`` /
  ``tls.key``, plus ``previous.crt``, the CA being retired, kept in the bundle until it expires.

Order of writes, chosen so that a crash at any point leaves a working webhook: the CA Secret,
then the caBundles (which trust old and new CA during a CA rotation), then the serving Secret.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certs.authority import (
    CertificateError,
    CertifiedKey,
    KeySpec,
    generate_ca,
    is_ca,
    issue_serving_cert,
    load_certificates,
    load_certified_key,
    service_dns_names,
    split_sans,
)
from certs.ca_bundle import PatchOutcome, PatchResult
from certs.rotation import Action, Decision, Policy, decide
from certs.secret_store import WriteResult

log = logging.getLogger(__name__)

TLS_CRT = "tls.crt"
TLS_KEY = "tls.key"
CA_CRT = "ca.crt"
PREVIOUS_CA_CRT = "previous.crt"
CA_SECRET_SUFFIX = "-ca"  # noqa: S105 - a name suffix, not a password
MANAGED_BY = {"app.kubernetes.io/managed-by": "mig-guard-certs"}


class Store(Protocol):
    def read(self, name: str) -> dict[str, bytes] | None: ...

    def write(self, name: str, data: dict[str, bytes], *, labels: dict[str, str]) -> WriteResult: ...


class BundlePatcher(Protocol):
    def patch(self, names: Sequence[str], bundle_pem: bytes) -> list[PatchResult]: ...


class ProvisionError(RuntimeError):
    """The run could not complete (the message says what to fix)."""


@dataclass(frozen=True)
class Request:
    namespace: str
    secret_name: str
    service_name: str
    extra_sans: Sequence[str] = ()
    webhook_configs: Sequence[str] = ()
    allow_missing_webhook_configs: bool = False
    policy: Policy = field(default_factory=Policy)
    key_spec: KeySpec = field(default_factory=KeySpec)

    @property
    def ca_secret_name(self) -> str:
        return self.secret_name + CA_SECRET_SUFFIX

    def names(self) -> list[str]:
        """All SANs of the serving certificate, normalised (IPs as their canonical strings)."""
        dns, ips = split_sans([*service_dns_names(self.service_name, self.namespace), *self.extra_sans])
        return [*dns, *(str(ip) for ip in ips)]


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    ca: CertifiedKey
    serving: CertifiedKey
    bundle_pem: bytes
    secrets: dict[str, WriteResult]
    patches: list[PatchResult]


def _load_pair(data: dict[str, bytes] | None, what: str) -> CertifiedKey | None:
    if data is None or TLS_CRT not in data or TLS_KEY not in data:
        return None
    try:
        return load_certified_key(data[TLS_CRT], data[TLS_KEY])
    except CertificateError as exc:
        log.warning("stored %s is unusable (%s); it will be replaced", what, exc)
        return None


def _still_valid_ca(cert: x509.Certificate | None, now: dt.datetime) -> x509.Certificate | None:
    if cert is None or not is_ca(cert) or not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    return cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def provision(
    request: Request,
    store: Store,
    patcher: BundlePatcher,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Outcome:
    """Make the Secrets and caBundles right; idempotent (a second run changes nothing)."""
    clock = now()
    ca_data = store.read(request.ca_secret_name)
    serving_data = store.read(request.secret_name)
    ca = _load_pair(ca_data, "CA")
    leaf = _load_pair(serving_data, "serving certificate")
    previous_certs = load_certificates((ca_data or {}).get(PREVIOUS_CA_CRT, b""))
    previous = _still_valid_ca(previous_certs[0] if previous_certs else None, clock)
    names = request.names()

    decision = decide(ca, leaf, names, key_spec=request.key_spec, policy=request.policy, now=clock)
    log.info("certificates: %s (%s)", decision.action.value, decision.reason)
    if decision.action in (Action.CREATE, Action.RENEW_CA):
        retiring = _still_valid_ca(ca.cert, clock) if ca is not None else None
        previous = retiring if retiring is not None else previous
        ca = generate_ca(f"mig-guard-ca.{request.namespace}", clock, request.policy.ca_validity)
    assert ca is not None
    if decision.action is not Action.KEEP:
        leaf = issue_serving_cert(ca, names, clock, request.policy.leaf_validity, request.key_spec)
    assert leaf is not None

    bundle = ca.cert_pem() + (_pem(previous) if previous is not None else b"")
    ca_secret = {TLS_CRT: ca.cert_pem(), TLS_KEY: ca.key_pem()}
    if previous is not None:
        ca_secret[PREVIOUS_CA_CRT] = _pem(previous)
    secrets = {request.ca_secret_name: store.write(request.ca_secret_name, ca_secret, labels=MANAGED_BY)}

    patches = patcher.patch(request.webhook_configs, bundle) if request.webhook_configs else []
    for name in request.webhook_configs:
        found = [p for p in patches if p.name == name and p.outcome is not PatchOutcome.MISSING]
        if not found and not request.allow_missing_webhook_configs:
            raise ProvisionError(
                f"no ValidatingWebhookConfiguration or MutatingWebhookConfiguration named {name!r}"
            )

    serving_secret = {TLS_CRT: leaf.cert_pem(), TLS_KEY: leaf.key_pem(), CA_CRT: bundle}
    secrets[request.secret_name] = store.write(request.secret_name, serving_secret, labels=MANAGED_BY)
    return Outcome(decision, ca, leaf, bundle, secrets, patches)


def describe(outcome: Outcome) -> list[str]:
    """Human-readable lines about a run: fingerprints and dates, never key material."""
    lines = [
        f"decision: {outcome.decision.action.value} ({outcome.decision.reason})",
        f"CA: {outcome.ca.fingerprint} valid until {outcome.ca.cert.not_valid_after_utc.isoformat()}",
        f"serving certificate: {outcome.serving.fingerprint} "
        f"valid until {outcome.serving.cert.not_valid_after_utc.isoformat()}",
    ]
    lines += [f"Secret {name}: {result.value}" for name, result in outcome.secrets.items()]
    for patch in outcome.patches:
        detail = f" ({patch.webhooks_patched} webhooks)" if patch.outcome is PatchOutcome.PATCHED else ""
        lines.append(f"{patch.kind.value} {patch.name}: {patch.outcome.value}{detail}")
    return lines


def write_files(target: Path, outcome: Outcome) -> list[Path]:
    """Write tls.crt, tls.key (mode 0600) and ca.crt into ``target``; returns the paths."""
    target.mkdir(parents=True, exist_ok=True)
    files = {
        TLS_CRT: outcome.serving.cert_pem(),
        TLS_KEY: outcome.serving.key_pem(),
        CA_CRT: outcome.bundle_pem,
    }
    written = []
    for name, content in files.items():
        path = target / name
        path.touch(mode=0o600 if name == TLS_KEY else 0o644, exist_ok=True)
        if name == TLS_KEY:
            path.chmod(0o600)
        path.write_bytes(content)
        written.append(path)
    return written
