"""A tiny PKI for the local control plane (and for test webhook servers), made with ``cryptography``.

ECDSA P-256 keys throughout: quick to generate, accepted by kube-apiserver for serving, client
certificates and service-account token signing (ES256).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY = dt.timedelta(days=7)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.crt`` and ``<stem>.key`` (mode 0600) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(self.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        return crt, key


class CertificateAuthority:
    """A self-signed CA that issues serving and client certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert

    @classmethod
    def create(
        cls, common_name: str = "mig-guard-dev-ca", validity: dt.timedelta = DEFAULT_VALIDITY
    ) -> CertificateAuthority:
        key = new_key()
        now = dt.datetime.now(dt.UTC)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, pair: KeyPair) -> CertificateAuthority:
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("CA key must be an EC key")
        return cls(key, pair.cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def pair(self) -> KeyPair:
        return KeyPair(self.cert_pem, key_pem(self._key))

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        validity: dt.timedelta = DEFAULT_VALIDITY,
    ) -> KeyPair:
        """Issue a leaf certificate. For a Kubernetes client cert, CN is the user name and O the groups."""
        if not (server or client):
            raise ValueError("a certificate must be for server use, client use or both")
        key = new_key()
        now = dt.datetime.now(dt.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))

    def issue_server(
        self, common_name: str = "localhost", hosts: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> KeyPair:
        """A serving certificate for the given hosts (IP literals become IP SANs, the rest DNS SANs)."""
        ips, names = [], []
        for host in hosts:
            try:
                ipaddress.ip_address(host)
                ips.append(host)
            except ValueError:
                names.append(host)
        return self.issue(common_name, dns_names=names, ip_addresses=ips, server=True)

    def issue_client(self, user: str, groups: Sequence[str] = ()) -> KeyPair:
        return self.issue(user, organizations=groups, client=True)


#: The user kube-apiserver is when it calls a kubelet (logs, exec, port-forward).
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"


@dataclass(frozen=True)
class ClusterPKI:
    """Everything the control plane needs: one CA for serving and client certs, the apiserver serving
    cert, the admin client cert, the apiserver's client cert for kubelets and the service-account
    signing key pair."""

    ca: CertificateAuthority
    apiserver: KeyPair
    admin: KeyPair
    kubelet_client: KeyPair
    sa_private_pem: bytes
    sa_public_pem: bytes

    @classmethod
    def create(cls, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> ClusterPKI:
        ca = CertificateAuthority.create("mig-guard-dev-cluster-ca")
        # The in-cluster service names too, so a kubeconfig written for pods would also verify.
        serving_hosts = [*hosts, "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        apiserver = ca.issue_server("kube-apiserver", serving_hosts)
        admin = ca.issue_client("admin", ["system:masters"])
        # No group: a real node's harness grants it system:kubelet-api-admin (devcluster.node).
        kubelet_client = ca.issue_client(KUBELET_CLIENT_USER)
        sa = new_key()
        return cls(ca, apiserver, admin, kubelet_client, key_pem(sa), public_key_pem(sa))

    def write(self, directory: Path) -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        (directory / "ca.crt").write_bytes(self.ca.cert_pem)
        ca_key = directory / "ca.key"
        ca_key.touch(mode=0o600)
        ca_key.write_bytes(self.ca.pair.key_pem)
        paths["ca.crt"], paths["ca.key"] = directory / "ca.crt", ca_key
        paths["apiserver.crt"], paths["apiserver.key"] = self.apiserver.write(directory, "apiserver")
        paths["admin.crt"], paths["admin.key"] = self.admin.write(directory, "admin")
        paths["apiserver-kubelet-client.crt"], paths["apiserver-kubelet-client.key"] = (
            self.kubelet_client.write(directory, "apiserver-kubelet-client")
        )
        sa_key = directory / "sa.key"
        sa_key.touch(mode=0o600)
        sa_key.write_bytes(self.sa_private_pem)
        (directory / "sa.pub").write_bytes(self.sa_public_pem)
        paths["sa.key"], paths["sa.pub"] = sa_key, directory / "sa.pub"
        return paths
