"""The real node (devcluster.node): pods run under a real kubelet and containerd, reach the API
server through the `kubernetes` Service, the kubelet admits only authenticated and authorized
callers, and no pod traffic leaves the machine. (Every host change being undone on stop is
checked by the `real_node` fixture's teardown.)"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from typing import Any

from kubernetes import client as k8s

from devcluster.node import RealNode, guard_drops


def run_pod(node: RealNode, script: str) -> tuple[str, str]:
    """Run `python3 -c script` in a pod of the Debian base image; returns (phase, log)."""
    return node.run_pod(node.images[0].name, command=["python3", "-c", script])


def test_a_pod_reaches_the_api_server_through_the_kubernetes_service(real_node: RealNode) -> None:
    script = """
import json, os, ssl, urllib.error, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
url = "https://%s:%s/api/v1/nodes" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
req = urllib.request.Request(url, headers={"Authorization": "Bearer " + open(sa + "/token").read()})
try:
    urllib.request.urlopen(req, context=ssl.create_default_context(cafile=sa + "/ca.crt"), timeout=10)
except urllib.error.HTTPError as exc:
    print(exc.code, json.load(exc)["message"])
"""
    phase, log = run_pod(real_node, script)
    assert phase == "Succeeded", log
    # TLS verified against the cluster CA, the token accepted, and RBAC judged the ServiceAccount.
    assert log.startswith("403 "), log
    assert "system:serviceaccount:default:default" in log, log


def test_the_kubelet_admits_only_authenticated_and_authorized_callers(real_node: RealNode) -> None:
    core: Any = k8s.CoreV1Api(real_node.api)
    node = core.read_node(real_node.name)
    port = node.status.daemon_endpoints.kubelet_endpoint.port
    url = f"https://{real_node.address}:{port}/pods"
    ca = str(real_node.plane.pki_dir / "ca.crt")

    def status(context: ssl.SSLContext) -> int:
        try:
            with urllib.request.urlopen(url, context=context, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    anonymous = ssl.create_default_context(cafile=ca)  # also proves the kubelet's serving cert
    assert status(anonymous) == 401
    stranger = ssl.create_default_context(cafile=ca)
    assert real_node.plane.pki is not None
    pair = real_node.plane.pki.ca.issue_client("someone-without-rbac")
    cert, key = pair.write(real_node.workdir / "stranger", "client")
    stranger.load_cert_chain(str(cert), str(key))
    assert status(stranger) == 403  # authenticated by certificate, refused by the API server's RBAC
    admin = ssl.create_default_context(cafile=ca)
    admin.load_cert_chain(
        str(real_node.plane.pki_dir / "admin.crt"), str(real_node.plane.pki_dir / "admin.key")
    )
    assert status(admin) == 200


def test_pod_traffic_to_elsewhere_is_dropped_before_it_leaves(real_node: RealNode) -> None:
    before = guard_drops()
    # TEST-NET-3: routed through the machine's own interface if it were allowed to leave.
    script = """
import socket
try:
    socket.create_connection(("203.0.113.7", 80), timeout=3)
    print("connected")
except OSError as exc:
    print("blocked", type(exc).__name__)
"""
    phase, log = run_pod(real_node, script)
    assert phase == "Succeeded", log
    assert log.startswith("blocked"), log
    assert guard_drops() > before
