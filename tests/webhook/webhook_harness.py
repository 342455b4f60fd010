"""Test support for the webhook: certificates, AdmissionReview builders, a JSONPatch applier,
and the real `mig-guard webhook` command as a subprocess."""

from __future__ import annotations

import copy
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from migcore import keys

A100 = "NVIDIA-A100-SXM4-40GB"
MIG_GUARD = str(Path(sys.executable).with_name("mig-guard"))


# --- certificates -------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TestAuthority:
    """A throw-away CA that issues serving certificates for 127.0.0.1."""

    __test__ = False

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("mig-guard-test-ca"))
            .issuer_name(_name("mig-guard-test-ca"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path

    def issue(self, cert_file: Path, key_file: Path, cn: str = "mig-guard-webhook") -> int:
        """Write a serving certificate + key (atomically, like a Secret update); returns its serial."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for path, data in ((key_file, key_pem), (cert_file, cert.public_bytes(serialization.Encoding.PEM))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return serial


def client_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    return context


def served_serial(host: str, port: int, ca_file: Path) -> int:
    """The serial number of the certificate a fresh TLS handshake sees."""
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        client_context(ca_file).wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# --- AdmissionReview builders --------------------------------------------------------------------


def gfd_labels(product: str = A100, count: int = 8) -> dict[str, str]:
    return {
        keys.LABEL_GPU_PRODUCT: product,
        keys.LABEL_GPU_COUNT: str(count),
        "nvidia.com/gpu.present": "true",
    }


def node(
    name: str = "gpu-1",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    unschedulable: bool | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if taints:
        spec["taints"] = [dict(t) for t in taints]
    if unschedulable is not None:
        spec["unschedulable"] = unschedulable
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata, "spec": spec}


def relabel(obj: Mapping[str, Any], changes: Mapping[str, str | None]) -> dict[str, Any]:
    """A copy of a node with these labels set (None removes them)."""
    out = copy.deepcopy(dict(obj))
    labels = out["metadata"].setdefault("labels", {})
    for key, value in changes.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    return out


def annotate(obj: Mapping[str, Any], changes: Mapping[str, str | None]) -> dict[str, Any]:
    """A copy of a node with these annotations set (None removes them)."""
    out = copy.deepcopy(dict(obj))
    annotations = out["metadata"].setdefault("annotations", {})
    for key, value in changes.items():
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    return out


def review(
    obj: Mapping[str, Any] | None,
    old: Mapping[str, Any] | None = None,
    operation: str = "UPDATE",
    user: str = "admin",
    uid: str = "uid-1",
    kind: str = "Node",
    namespace: str = "",
    name: str | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": kind.lower() + "s"},
            "operation": operation,
            "name": name if name is not None else (obj or old or {}).get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
        },
    }


# --- RFC 6902 (the subset the webhook emits, plus remove/test) -------------------------------------


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, ops: Sequence[Mapping[str, Any]]) -> Any:
    """Apply a JSON Patch to a copy of `doc` and return it; raises on an inapplicable operation."""
    out = copy.deepcopy(doc)
    for op in ops:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        parent = out
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                if index > len(parent):
                    raise IndexError(op["path"])
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[index]
            elif kind == "test":
                assert parent[index] == op["value"]
        else:
            if not isinstance(parent, dict):
                raise TypeError(f"{op['path']}: parent is not an object")
            if kind == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "replace":
                if last not in parent:
                    raise KeyError(op["path"])
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                assert parent[last] == op["value"]
    return out


# --- the real command -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WebhookProcess:
    """`mig-guard webhook` on 127.0.0.1 with a fresh port; waits until /readyz answers 200."""

    def __init__(self, workdir: Path, authority: TestAuthority, *extra: str, workers: int = 2) -> None:
        self.workdir = workdir
        self.authority = authority
        self.cert_file = workdir / "tls.crt"
        self.key_file = workdir / "tls.key"
        self.ca_file = authority.write_ca(workdir / "ca.crt")
        self.serial = authority.issue(self.cert_file, self.key_file)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.log_file = workdir / "webhook.log"
        self.argv = [
            MIG_GUARD,
            "webhook",
            "--listen",
            f"{self.host}:{self.port}",
            "--tls-cert-file",
            str(self.cert_file),
            "--tls-key-file",
            str(self.key_file),
            "--workers",
            str(workers),
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return f"https://{self.host}:{self.port}{path}"

    def start(self, timeout: float = 30) -> WebhookProcess:
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=log, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mig-guard webhook exited {self.process.returncode}:\n{self.logs()}")
            try:
                status, body = self.get("/readyz")
                if status == 200:
                    return self
                last = body
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mig-guard webhook not ready after {timeout}s ({last}):\n{self.logs()}")

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace")[-6000:]

    def connection(self, port: int | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, port or self.port, context=client_context(self.ca_file), timeout=10
        )

    def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        """GET over TLS from the admission port (or `port`, e.g. the health port)."""
        conn = self.connection(port)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def post(self, path: str, body: bytes | Mapping[str, Any]) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = self.connection()
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw)
        finally:
            conn.close()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` with these labels (0 when absent)."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> WebhookProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
