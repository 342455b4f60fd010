"""The CA and serving certificate: a real TLS client (OpenSSL via ssl) accepts the chain for the
Service's names, and certificates carry the properties the API server and auditors look for."""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.authority import (
    CertificateError,
    KeySpec,
    KeyType,
    generate_ca,
    issue_serving_cert,
    load_certified_key,
    service_dns_names,
    signed_by,
    subject_alt_names,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
YEAR = dt.timedelta(days=365)
NAMES = [*service_dns_names("mig-guard-webhook", "mig-guard"), "127.0.0.1"]


def handshake(
    server_cert_pem: bytes, server_key_pem: bytes, ca_bundle_pem: bytes, server_hostname: str
) -> None:
    """An in-memory TLS handshake through OpenSSL. Raises ssl.SSLError (SSLCertVerificationError)
    when a client trusting ``ca_bundle_pem`` and dialling ``server_hostname`` rejects the server."""
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_file.write_bytes(server_cert_pem)
        key_file.write_bytes(server_key_pem)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca_bundle_pem.decode())
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if client_done and server_done:
            return
    raise AssertionError("TLS handshake did not finish")


def test_service_dns_names_cover_every_form_the_api_server_may_dial() -> None:
    assert service_dns_names("svc", "ns") == ["svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local"]


@pytest.mark.parametrize("hostname", ["mig-guard-webhook.mig-guard.svc", "mig-guard-webhook", "127.0.0.1"])
def test_a_tls_client_trusting_the_ca_accepts_the_serving_cert(hostname: str) -> None:
    # Real clock here: OpenSSL checks validity against the current time.
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca("test-ca", now, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, now, YEAR)
    handshake(leaf.cert_pem(), leaf.key_pem(), ca.cert_pem(), hostname)


def test_a_tls_client_rejects_a_name_not_in_the_certificate() -> None:
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca("test-ca", now, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, now, YEAR)
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(leaf.cert_pem(), leaf.key_pem(), ca.cert_pem(), "other.mig-guard.svc")


def test_a_tls_client_rejects_the_serving_cert_under_another_ca() -> None:
    now = dt.datetime.now(dt.UTC)
    ca, stranger = generate_ca("test-ca", now, 10 * YEAR), generate_ca("stranger", now, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, now, YEAR)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(leaf.cert_pem(), leaf.key_pem(), stranger.cert_pem(), NAMES[2])


def test_an_rsa_chain_also_works() -> None:
    now = dt.datetime.now(dt.UTC)
    spec = KeySpec(KeyType.RSA, 2048)
    ca = generate_ca("test-ca", now, 10 * YEAR, spec)
    leaf = issue_serving_cert(ca, NAMES, now, YEAR, spec)
    assert isinstance(leaf.key, rsa.RSAPrivateKey)
    assert leaf.key.key_size == 2048
    handshake(leaf.cert_pem(), leaf.key_pem(), ca.cert_pem(), NAMES[2])


def test_rsa_keys_below_2048_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="2048"):
        KeySpec(KeyType.RSA, 1024)


def test_default_keys_are_ecdsa_p256() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, NOW, YEAR)
    for key in (ca.key, leaf.key):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"


def test_serving_cert_is_for_server_auth_only_and_not_a_ca() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, NOW, YEAR)
    ext = leaf.cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert subject_alt_names(leaf.cert) == set(NAMES)
    assert signed_by(leaf.cert, ca.cert)


def test_ca_signs_certificates_but_no_intermediate_cas() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    assert constraints.path_length == 0
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_validity_window_is_as_asked_and_back_dated_for_clock_skew() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, NOW, YEAR)
    assert leaf.cert.not_valid_after_utc == NOW + YEAR
    assert NOW - dt.timedelta(minutes=10) < leaf.cert.not_valid_before_utc < NOW
    assert ca.cert.not_valid_after_utc == NOW + 10 * YEAR


def test_serving_cert_never_outlives_its_ca() -> None:
    ca = generate_ca("test-ca", NOW, dt.timedelta(days=100))
    leaf = issue_serving_cert(ca, NAMES, NOW, YEAR)
    assert leaf.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_an_expired_ca_issues_nothing() -> None:
    ca = generate_ca("test-ca", NOW, dt.timedelta(days=10))
    with pytest.raises(CertificateError, match="expired"):
        issue_serving_cert(ca, NAMES, NOW + dt.timedelta(days=11), YEAR)


def test_serving_cert_needs_a_name() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    with pytest.raises(ValueError, match="subject alternative name"):
        issue_serving_cert(ca, [], NOW, YEAR)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        generate_ca("test-ca", dt.datetime(2026, 1, 1), YEAR)


def test_stored_pem_round_trips_and_mismatched_keys_are_detected() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    leaf = issue_serving_cert(ca, NAMES, NOW, YEAR)
    loaded = load_certified_key(leaf.cert_pem(), leaf.key_pem())
    assert loaded.fingerprint == leaf.fingerprint
    with pytest.raises(CertificateError, match="does not belong"):
        load_certified_key(leaf.cert_pem(), ca.key_pem())
    with pytest.raises(CertificateError, match="unparsable"):
        load_certified_key(b"not a certificate", leaf.key_pem())


def test_fingerprint_is_the_sha256_of_the_certificate() -> None:
    ca = generate_ca("test-ca", NOW, 10 * YEAR)
    assert ca.fingerprint.startswith("sha256:")
    assert len(ca.fingerprint) == len("sha256:") + 64
    assert ca.fingerprint != generate_ca("test-ca", NOW, 10 * YEAR).fingerprint
