"""Smoke tests proving the local control plane is real: real apiserver, real watch, real admission
webhook calls over TLS, real RBAC, real controllers/scheduler with kwok nodes."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.rest import ApiException

from devcluster import controlplane as cp_module
from devcluster import versions
from devcluster.admission import AdmissionTestServer, allow, deny
from devcluster.controlplane import ControlPlane
from devcluster.helpers import (
    create_gpu_node,
    delete_webhook,
    ensure_namespace,
    register_webhook,
    service_account_client,
)
from devcluster.processes import wait_until
from devcluster.pytest_plugin import KubectlRunner


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_version_is_stamped(k8s_api: Any, kubectl: KubectlRunner) -> None:
    info = k8s.VersionApi(k8s_api).get_code()
    assert info.git_version == versions.KUBERNETES
    assert info.minor == versions.KUBERNETES.split(".")[1]
    out = kubectl("version", "-o", "json", check=True).stdout
    assert f'"gitVersion": "{versions.KUBERNETES}"' in out


def test_label_patch_is_seen_by_a_watch(k8s_api: Any) -> None:
    core = k8s.CoreV1Api(k8s_api)
    name = _name("watched")
    node = create_gpu_node(k8s_api, name, fake=False)
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    seen: list[dict[str, str]] = []
    started = threading.Event()

    def watch_node() -> None:
        w = watch.Watch()
        started.set()
        for event in w.stream(
            core.list_node,
            field_selector=f"metadata.name={name}",
            resource_version=node.metadata.resource_version,
            timeout_seconds=20,
        ):
            if event["type"] == "MODIFIED":
                seen.append(dict(event["object"].metadata.labels or {}))
                if event["object"].metadata.labels.get("nvidia.com/mig.config") == "all-1g.5gb":
                    w.stop()

    thread = threading.Thread(target=watch_node, daemon=True)
    thread.start()
    started.wait(5)
    core.patch_node(name, {"metadata": {"labels": {"nvidia.com/mig.config": "all-1g.5gb"}}})
    thread.join(25)
    assert any(labels.get("nvidia.com/mig.config") == "all-1g.5gb" for labels in seen), seen
    core.delete_node(name)


def test_webhook_denial_reaches_kubectl(k8s_api: Any, kubectl: KubectlRunner) -> None:
    node = _name("guarded")
    create_gpu_node(k8s_api, node, fake=False)
    message = "mig-guard test webhook: MIG layout change refused"

    def decide(request: dict[str, Any]) -> dict[str, Any]:
        labels = request["object"]["metadata"].get("labels", {})
        return deny(message) if labels.get("mig-guard.test/deny") == "yes" else allow()

    with AdmissionTestServer(decide) as server:
        hook = _name("deny-node-labels")
        register_webhook(
            k8s_api,
            "validating",
            hook,
            server.url("/validate"),
            server.ca_pem,
            rules=[
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
            ],
            # Only our node reaches the webhook (matchConditions, GA in 1.30).
            match_conditions=[{"name": "only-this-node", "expression": f"object.metadata.name == '{node}'"}],
        )
        try:
            # The apiserver picks webhook configurations up asynchronously: retry until it is active.
            result: list[Any] = []

            def denied() -> bool:
                proc = kubectl("label", "node", node, "mig-guard.test/deny=yes", "--overwrite")
                result[:] = [proc]
                return proc.returncode != 0

            wait_until(denied, 20, 0.2, "webhook to be active")
            proc = result[0]
            assert message in proc.stderr, proc.stderr
            assert "admission webhook" in proc.stderr and "denied the request" in proc.stderr
            assert any(c["request"]["name"] == node for c in server.calls)
            # Allowed change goes through the webhook too, and another node bypasses it (matchConditions).
            calls = len(server.calls)
            assert kubectl("label", "node", node, "mig-guard.test/deny=no", "--overwrite").returncode == 0
            assert len(server.calls) > calls
            other = _name("unguarded")
            create_gpu_node(k8s_api, other, fake=False)
            calls = len(server.calls)
            assert kubectl("label", "node", other, "mig-guard.test/deny=yes").returncode == 0
            assert len(server.calls) == calls
        finally:
            delete_webhook(k8s_api, "validating", hook)


def test_service_account_without_rights_is_refused(k8s_api: Any) -> None:
    ns = _name("rbac")
    nobody = service_account_client(k8s_api, ns, "nobody")
    with pytest.raises(ApiException) as exc:
        k8s.CoreV1Api(nobody).list_node()
    assert exc.value.status == 403
    assert f"system:serviceaccount:{ns}:nobody" in exc.value.body
    reader = service_account_client(
        k8s_api,
        ns,
        "node-reader",
        [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}],
        cluster_wide=True,
    )
    k8s.CoreV1Api(reader).list_node()  # allowed
    with pytest.raises(ApiException) as exc:
        k8s.CoreV1Api(reader).patch_node("anything", {"metadata": {"labels": {"a": "b"}}})
    assert exc.value.status == 403


def test_user_client_certificate(
    control_plane: ControlPlane, user_client: Callable[..., Any], kubectl: KubectlRunner
) -> None:
    alice = user_client("alice", ["mig-guard:testers"])
    with pytest.raises(ApiException) as exc:
        k8s.CoreV1Api(alice).list_node()
    assert exc.value.status == 403
    assert 'User "alice"' in json.loads(exc.value.body)["message"]
    path = control_plane.write_user_kubeconfig("alice", ["mig-guard:testers"])
    proc = kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.groups}", kubeconfig_path=path)
    assert proc.returncode == 0, proc.stderr
    assert "mig-guard:testers" in proc.stdout


def test_pods_get_service_account_token_volume(k8s_api: Any) -> None:
    """ServiceAccount admission is on (a service-account controller runs even without workloads)."""
    core = k8s.CoreV1Api(k8s_api)
    ns = _name("sa")
    ensure_namespace(k8s_api, ns)
    wait_until(lambda: core.read_namespaced_service_account("default", ns) is not None, 30, what="default SA")
    pod = core.create_namespaced_pod(
        ns, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    )
    assert pod.spec.service_account_name == "default"
    assert any(v.name.startswith("kube-api-access-") for v in pod.spec.volumes)


def test_daemonset_pod_runs_on_kwok_node(workload_plane: ControlPlane) -> None:
    api = workload_plane.api
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    node = _name("gpu-node")
    create_gpu_node(api, node, product="NVIDIA-H100-80GB-HBM3", gpu_count=8)
    ns = _name("ds")
    ensure_namespace(api, ns)
    labels = {"app": "mig-agent"}
    apps.create_namespaced_daemon_set(
        ns,
        {
            "metadata": {"name": "mig-agent"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"nvidia.com/gpu.present": "true", "kubernetes.io/hostname": node},
                        "containers": [{"name": "agent", "image": "example.invalid/mig-agent:1"}],
                    },
                },
            },
        },
    )
    t0 = time.monotonic()
    running: list[Any] = []

    def pod_running() -> bool:
        pods = core.list_namespaced_pod(ns, label_selector="app=mig-agent").items
        running[:] = [p for p in pods if p.status.phase == "Running" and p.spec.node_name == node]
        return bool(running)

    wait_until(pod_running, 90, 0.5, "DaemonSet pod Running on the kwok node")
    pod = running[0]
    assert pod.status.pod_ip and pod.status.container_statuses[0].ready
    ready = {c.type: c.status for c in core.read_node(node).status.conditions}
    assert ready.get("Ready") == "True"
    print(f"DaemonSet pod running after {time.monotonic() - t0:.1f}s")


def test_logs_are_kept(control_plane: ControlPlane) -> None:
    tails = control_plane.log_tails(5)
    assert "kube-apiserver" in tails and "etcd" in tails
    assert Path(control_plane.processes["kube-apiserver"].log_path).stat().st_size > 0


def test_port_collision_is_retried(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second, independent plane; its first etcd port is taken by someone else."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real_free_port = cp_module.free_port
    monkeypatch.setattr(
        cp_module, "free_port", lambda host="127.0.0.1": ports.pop() if ports else real_free_port(host)
    )
    try:
        with ControlPlane(binaries=control_plane._binaries) as other:
            assert other.etcd_port != taken.getsockname()[1]
            assert k8s.VersionApi(other.api).get_code().git_version == versions.KUBERNETES
            assert "address already in use" in other.processes["etcd"].log_tail(200)
    finally:
        taken.close()
