"""A private CA and the webhook's serving certificate: generate, load and check them.

The API server only trusts the webhook through the ``caBundle`` of the webhook configurations,
so the CA is private to mig-guard and long-lived; the serving (leaf) certificate is short-lived
and re-issued from the same CA, which keeps the ``caBundle`` (and GitOps diffs) stable.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

MIN_RSA_BITS = 2048
#: Certificates are back-dated a little so that a node with a slightly slow clock accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


class KeyType(Enum):
    """The key algorithms mig-guard issues: ECDSA P-256 (default, small and fast) or RSA."""

    ECDSA_P256 = "ecdsa-p256"
    RSA = "rsa"


@dataclass(frozen=True)
class KeySpec:
    """Which key to generate; ``rsa_bits`` only matters for RSA and must be >= 2048."""

    key_type: KeyType = KeyType.ECDSA_P256
    rsa_bits: int = 2048

    def __post_init__(self) -> None:
        if self.key_type is KeyType.RSA and self.rsa_bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits, got {self.rsa_bits}")

    def generate(self) -> PrivateKey:
        if self.key_type is KeyType.RSA:
            return rsa.generate_private_key(public_exponent=65537, key_size=self.rsa_bits)
        return ec.generate_private_key(ec.SECP256R1())


class CertificateError(ValueError):
    """Stored certificate material that cannot be used (unparsable, mismatched key, wrong kind)."""


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: it only ever goes into a Secret or a 0600 file."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, the only thing about certificates that mig-guard logs."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use to reach a Service: it dials ``<svc>.<ns>.svc``."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def split_sans(names: Sequence[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Sort subject alternative names into DNS names and IP addresses (order kept, duplicates dropped)."""
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for name in names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if name and name not in dns:
                dns.append(name)
            continue
        if ip not in ips:
            ips.append(ip)
    return dns, ips


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(dt.UTC)


def _key_usage(*, ca: bool, key: PrivateKey) -> x509.KeyUsage:
    # RSA key exchange needs keyEncipherment; ECDHE with an ECDSA key only signs.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca and isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def generate_ca(
    common_name: str, now: dt.datetime, validity: dt.timedelta, spec: KeySpec | None = None
) -> CertifiedKey:
    """A self-signed CA that can only sign end-entity certificates (path length 0)."""
    key = (spec or KeySpec()).generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _utc(now) - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(_utc(now) + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True, key=key), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(cert, key)


def issue_serving_cert(
    ca: CertifiedKey,
    names: Sequence[str],
    now: dt.datetime,
    validity: dt.timedelta,
    spec: KeySpec | None = None,
) -> CertifiedKey:
    """A TLS server certificate for ``names`` (DNS names and/or IP addresses), signed by ``ca``.

    It never outlives its CA: a leaf valid past the CA's end would fail verification anyway.
    """
    dns, ips = split_sans(names)
    if not dns and not ips:
        raise ValueError("a serving certificate needs at least one subject alternative name")
    not_after = min(_utc(now) + validity, ca.cert.not_valid_after_utc)
    if not_after <= _utc(now):
        raise CertificateError(f"the CA expired at {not_after.isoformat()}: renew the CA first")
    key = (spec or KeySpec()).generate()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or [str(ips[0])])[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now) - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, key=key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return CertifiedKey(cert, key)


def load_certified_key(cert_pem: bytes, key_pem: bytes) -> CertifiedKey:
    """Parse a PEM certificate and key; raises :class:`CertificateError` unless they belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise CertificateError(f"unparsable certificate or key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"unsupported key type {type(key).__name__}")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise CertificateError("the private key does not belong to the certificate")
    return CertifiedKey(cert, key)


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM bundle (empty list if none parse)."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` is named as the issuer of ``cert`` and its key made the signature."""
    if cert.issuer != issuer.subject:
        return False
    public_key = issuer.public_key()
    hash_algorithm = cert.signature_hash_algorithm
    if hash_algorithm is None:
        return False
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hash_algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def subject_alt_names(cert: x509.Certificate) -> set[str]:
    """DNS names and IP addresses (as strings) the certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(ext.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return names


def key_spec_of(key: PrivateKey) -> KeySpec:
    if isinstance(key, rsa.RSAPrivateKey):
        return KeySpec(KeyType.RSA, key.key_size)
    return KeySpec(KeyType.ECDSA_P256)
