"""Unit tests for the devcluster PKI, kubeconfig and process pieces: no Kubernetes binaries needed."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devcluster import binaries, versions
from devcluster.controlplane import KWOK_STAGES
from devcluster.helpers import gfd_labels
from devcluster.kubeconfig import api_client, kubeconfig_dict, read_kubeconfig, write_kubeconfig
from devcluster.pki import CertificateAuthority, ClusterPKI
from devcluster.processes import ManagedProcess, tail, wait_until


def _verify(ca: CertificateAuthority, cert: x509.Certificate) -> None:
    pub = ca.cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca.cert.subject


def test_cluster_pki_has_what_the_apiserver_needs(tmp_path: Path) -> None:
    pki = ClusterPKI.create()
    serving = pki.apiserver.cert
    _verify(pki.ca, serving)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    eku = serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    admin = pki.admin.cert
    _verify(pki.ca, admin)
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )

    paths = pki.write(tmp_path)
    for name in (
        "ca.crt",
        "ca.key",
        "apiserver.crt",
        "apiserver.key",
        "admin.crt",
        "admin.key",
        "sa.key",
        "sa.pub",
    ):
        assert paths[name].is_file()
    for key in ("ca.key", "apiserver.key", "admin.key", "sa.key"):
        assert paths[key].stat().st_mode & 0o077 == 0, key
    # Loadable by the ssl module the way clients and the readiness probe use them.
    ctx = ssl.create_default_context(cafile=str(paths["ca.crt"]))
    ctx.load_cert_chain(str(paths["admin.crt"]), str(paths["admin.key"]))


def test_client_cert_groups_and_ca_roundtrip() -> None:
    ca = CertificateAuthority.create("t")
    pair = ca.issue_client("alice", ["team-a", "team-b"])
    orgs = [a.value for a in pair.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert orgs == ["team-a", "team-b"]
    again = CertificateAuthority.load(ca.pair)
    _verify(again, again.issue_client("bob").cert)
    with pytest.raises(ValueError, match="server use"):
        ca.issue("nobody")


def test_kubeconfig_roundtrip(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    pair = ca.issue_client("admin", ["system:masters"])
    cfg = kubeconfig_dict(
        "https://127.0.0.1:6443", ca.cert_pem, client_cert_pem=pair.cert_pem, client_key_pem=pair.key_pem
    )
    path = write_kubeconfig(tmp_path / "k" / "admin.kubeconfig", cfg)
    assert path.stat().st_mode & 0o077 == 0
    loaded = read_kubeconfig(path)
    assert loaded["current-context"] == "admin@mig-guard-dev"
    cluster = loaded["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == ca.cert_pem
    assert base64.b64decode(loaded["users"][0]["user"]["client-key-data"]) == pair.key_pem
    token_cfg = kubeconfig_dict("https://127.0.0.1:1", ca.cert_pem, user="sa", token="abc", namespace="ns")
    assert token_cfg["users"][0]["user"] == {"token": "abc"}
    assert token_cfg["contexts"][0]["context"]["namespace"] == "ns"
    with pytest.raises(ValueError):
        kubeconfig_dict("https://127.0.0.1:1", ca.cert_pem)


def test_kubeconfig_is_accepted_by_the_kubernetes_client(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    pair = ca.issue_client("admin")
    path = write_kubeconfig(
        tmp_path / "c",
        kubeconfig_dict(
            "https://127.0.0.1:6443", ca.cert_pem, client_cert_pem=pair.cert_pem, client_key_pem=pair.key_pem
        ),
    )
    client = api_client(path)
    assert client.configuration.host == "https://127.0.0.1:6443"
    assert Path(client.configuration.cert_file).read_bytes() == pair.cert_pem


def test_staging_replacements_from_a_kubernetes_gomod() -> None:
    gomod = """module k8s.io/kubernetes
go 1.25.0
godebug default=go1.25
require (
\tk8s.io/api v0.0.0
)
replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
)
replace k8s.io/externaljwt => ./staging/src/k8s.io/externaljwt
"""
    assert binaries.staging_replacements(gomod, "v1.35.4") == {
        "k8s.io/api": "v0.35.4",
        "k8s.io/client-go": "v0.35.4",
        "k8s.io/externaljwt": "v0.35.4",
    }
    assert binaries._godebug_lines(gomod) == ["godebug default=go1.25"]
    with pytest.raises(binaries.BuildError):
        binaries.staging_replacements(gomod, "1.35")


def test_bin_dir_env_and_missing_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.delenv("MIG_GUARD_BIN_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert binaries.bin_dir() == tmp_path / "cache" / "mig-guard" / "k8s-bin" / binaries.versions_hash()
    monkeypatch.setenv("MIG_GUARD_BIN_DIR", str(tmp_path / "bins"))
    assert binaries.bin_dir() == tmp_path / "bins"
    with pytest.raises(binaries.BinariesMissingError, match=r"make binaries.*KUBEBUILDER_ASSETS"):
        binaries.find_binary("kube-apiserver")
    # A binary without the stamp does not count (a build was interrupted) ...
    (tmp_path / "bins").mkdir()
    fake = tmp_path / "bins" / "etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    with pytest.raises(binaries.BinariesMissingError):
        binaries.find_binary("etcd")
    (tmp_path / "bins" / binaries.STAMP).write_text(json.dumps({"versions": {"kubernetes": "v1.0.0"}}))
    with pytest.raises(binaries.BinariesMissingError):  # a stamp of other versions does not count either
        binaries.find_binary("etcd")
    (tmp_path / "bins" / binaries.STAMP).write_text(json.dumps({"versions": versions.ALL}))
    assert binaries.find_binary("etcd") == fake
    # ... and KUBEBUILDER_ASSETS wins over the cache.
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "etcd").write_text("#!/bin/sh\n")
    (assets / "etcd").chmod(0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    assert binaries.find_binary("etcd") == assets / "etcd"


def test_versions_are_pinned_and_new_enough() -> None:
    major, minor, _ = (int(x) for x in versions.KUBERNETES.removeprefix("v").split("."))
    assert (major, minor) >= (1, 30), "matchConditions on admission webhooks is GA from 1.30"
    assert versions.ETCD.startswith("v3.")


def test_managed_process_logs_and_group_kill(tmp_path: Path) -> None:
    # The child starts a grandchild in the same process group: stop() must end both.
    script = "import subprocess,sys,time; print('hello', flush=True); subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    proc = ManagedProcess("sleeper", [sys.executable, "-c", script], tmp_path / "logs" / "s.log").start()
    wait_until(lambda: "hello" in proc.log_tail(), 10, what="output")
    assert proc.running
    pgid = proc.pid
    assert pgid is not None
    t0 = time.monotonic()
    proc.stop(timeout=5)
    assert time.monotonic() - t0 < 5
    assert not proc.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_sigterm_to_parent_tears_children_down(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = f"""
import sys, time
from pathlib import Path
from devcluster.processes import ManagedProcess
p = ManagedProcess("c", [sys.executable, "-c", "import time; time.sleep(60)"], Path({str(tmp_path)!r}) / "c.log").start()
Path({str(pidfile)!r}).write_text(str(p.pid))
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", code])
    wait_until(pidfile.exists, 20, what="child pid")
    child = int(pidfile.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=20) == -signal.SIGTERM
    wait_until(lambda: not _alive(child), 10, what="child gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == "line 97\nline 98\nline 99"
    assert tail(tmp_path / "missing") == ""


def test_kwok_stages_file_is_valid_yaml() -> None:
    docs = [d for d in yaml.safe_load_all(KWOK_STAGES.read_text()) if d]
    names = {d["metadata"]["name"] for d in docs}
    assert {
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-complete",
        "pod-delete",
    } <= names
    assert all(d["kind"] == "Stage" for d in docs)


def test_gfd_labels_come_from_the_catalog() -> None:
    labels = gfd_labels("NVIDIA-A100-SXM4-40GB", 8)
    assert labels["nvidia.com/gpu.memory"] == "40960"
    assert labels["nvidia.com/mig.capable"] == "true"
    assert labels["nvidia.com/gpu.family"] == "ampere"
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("8", "0")
    h200 = gfd_labels("NVIDIA-H200", 8)
    assert (h200["nvidia.com/gpu.memory"], h200["nvidia.com/gpu.family"]) == ("143771", "hopper")
    assert (
        gfd_labels("NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", 1)["nvidia.com/gpu.compute.major"] == "12"
    )
    assert gfd_labels("NVIDIA-X-24GB", 1)["nvidia.com/gpu.memory"] == str(24 * 1024)
    assert gfd_labels("NVIDIA-X100", 1, memory_mib=98304)["nvidia.com/gpu.memory"] == "98304"


def test_gfd_labels_of_the_single_mig_strategy_describe_mig_devices() -> None:
    # The seed's example: one A100 with all-1g.5gb.
    labels = gfd_labels("A100-SXM4-40GB", 1, mig_profile="1g.5gb")
    assert labels["nvidia.com/gpu.product"] == "A100-SXM4-40GB-MIG-1g.5gb"
    assert (labels["nvidia.com/gpu.count"], labels["nvidia.com/gpu.memory"]) == ("7", "4864")
    assert labels["nvidia.com/mig.strategy"] == "single"
    assert gfd_labels("NVIDIA-H100-80GB-HBM3", 2, mig_profile="1g.10gb+me")["nvidia.com/gpu.product"] == (
        "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb.me"
    )
