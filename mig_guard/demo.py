"""`mig-guard demo`: the whole product on one machine, with no GPU and no cluster.

It starts a real control plane (devcluster: etcd, kube-apiserver, controller-manager, scheduler,
kwok), the real webhook (`mig-guard webhook`, gunicorn over TLS, registered with a caBundle) and
one real reconciler per simulated GPU node (`mig-guard reconcile --gpu-backend simulated`), then
plays a short script with the real kubectl: a typo rejected, an incompatible layout rejected, a
valid layout applied (pending, then success, and the resulting geometry), and a GPU no catalog
knows (simulated from its driver's MIG table) judged exactly from that table, and, with pods on MIG
devices, a change seen before it is made (`kubectl mig`, and the webhook's warnings on a server-side
dry run) and then made, evicting exactly the pods the preview named. It then stays up for the user
to try kubectl until Ctrl-C, and cleans everything up on the way out.

Nodes are kwok's (no kubelet): each gets a PodResources server on a unix socket standing in for
its kubelet's, told which MIG device each demo pod got.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from kubernetes import client as k8s

from certs.authority import generate_ca, issue_serving_cert
from devcluster import binaries
from devcluster.controlplane import ControlPlane, free_port
from devcluster.helpers import create_gpu_node, ensure_namespace, gfd_labels, gpu_model_file, pod_bound_token
from devcluster.kubeconfig import kubeconfig_dict, write_kubeconfig
from kube.config_source import ConfigMapRef
from migcore import keys
from migcore.catalog import sanitise_product_name
from migcore.hardware import NodeGpus
from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import SimulatedNvml, load_gpu_model
from reconciler.podresources.server import PodResourcesServer
from reconciler.rbac import RULES
from webhook.node_policy import node_writers_binding, node_writers_policy
from webhook.registration import (
    MUTATE_PATH,
    VALIDATE_PATH,
    mutating_configuration,
    url_client_config,
    validating_configuration,
)

CONFIGMAP = ConfigMapRef(keys.GPU_OPERATOR_NAMESPACE, keys.DEFAULT_MIG_PARTED_CONFIGMAP)
RECONCILER_NAMESPACE = "mig-guard"
RECONCILER_SA = "reconciler"
RECONCILER_USER = f"system:serviceaccount:{RECONCILER_NAMESPACE}:{RECONCILER_SA}"
WEBHOOK_CONFIG_NAME = "mig-guard"


@dataclass(frozen=True)
class DemoNode:
    name: str
    product: str
    gpus: int
    model: str | None = None  # a driver-table file: a GPU no catalog knows


X100_MODEL = gpu_model_file("x100.json")
NODES = (
    DemoNode("gpu-a100", "NVIDIA-A100-SXM4-40GB", 8),
    DemoNode("gpu-h100", "NVIDIA-H100-80GB-HBM3", 8),
    DemoNode("gpu-a30", "NVIDIA-A30", 4),
    DemoNode("gpu-x100", sanitise_product_name(load_gpu_model(X100_MODEL).name), 2, X100_MODEL),
)
# Layouts for the X100 beside the GPU Operator's default ones (which know nothing of it).
X100_CONFIGS = Path(gpu_model_file("x100-mig-parted-config.yaml")).read_text().split("mig-configs:\n", 1)[1]
# Pods on gpu-a100's MIG devices once it holds all-balanced (2g.10gb@0, 1g.5gb@2, 1g.5gb@3, 3g.20gb@4
# on each GPU): pod -> (GPU, GPU-instance start). all-1g.5gb then keeps the 1g.5gb instances.
WORKLOADS = "ml"
DEMO_PODS = {"train-0": (0, 4), "infer-0": (0, 2), "infer-1": (3, 0), "notebook": (5, 3)}
A100_MIG_RESOURCES = {
    "nvidia.com/mig-1g.5gb": "16",
    "nvidia.com/mig-2g.10gb": "8",
    "nvidia.com/mig-3g.20gb": "8",
}


class DemoError(RuntimeError):
    """The demo could not go on; the message says which step and why."""


@dataclass
class Output:
    """Progress lines for a person: numbered steps, indented details, nothing else."""

    stream: TextIO = sys.stdout
    started: float = field(default_factory=time.monotonic)

    def step(self, text: str) -> None:
        self.stream.write(f"[{time.monotonic() - self.started:6.1f}s] {text}\n")
        self.stream.flush()

    def detail(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self.stream.write(f"           {line}\n")
        self.stream.flush()


class Demo:
    """Owns every process it starts; `close()` stops them all (also on errors and Ctrl-C)."""

    def __init__(self, out: Output, workdir: Path, webhook_workers: int = 1) -> None:
        self.out = out
        self.workdir = workdir
        self.webhook_workers = webhook_workers
        self.plane: ControlPlane | None = None
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.podresources: dict[str, PodResourcesServer] = {}
        self.mig_guard = [sys.executable, "-m", "mig_guard.cli"]

    # --- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in reversed(self.processes):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.out.detail(f"{name} did not stop in 10s; killing it")
                proc.kill()
                proc.wait(timeout=10)
        self.processes.clear()
        for server in self.podresources.values():
            server.stop()
        self.podresources.clear()
        if self.plane is not None:
            self.plane.stop()
            self.plane = None

    @property
    def api(self) -> Any:
        assert self.plane is not None
        return self.plane.api

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child process
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def _check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise DemoError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if condition():
                return
            time.sleep(0.2)
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")

    # --- setting up -----------------------------------------------------------------------------
    def start_control_plane(self) -> None:
        report = binaries.ensure()
        self.out.detail(f"binaries: {report.directory}")
        self.plane = ControlPlane(workdir=self.workdir / "cluster", keep_dir=True, workloads=True)
        self.plane.start()
        self.out.detail(f"kube-apiserver {self.plane.server_url}, logs in {self.plane.log_dir}")

    def publish_config(self) -> None:
        text = resources.files("migcore").joinpath("data/default-mig-parted-config.yaml").read_text()
        text = text.rstrip("\n") + "\n" + X100_CONFIGS
        ensure_namespace(self.api, CONFIGMAP.namespace)
        body = {"metadata": {"name": CONFIGMAP.name}, "data": {CONFIGMAP.key: text}}
        core: Any = k8s.CoreV1Api(self.api)
        core.create_namespaced_config_map(CONFIGMAP.namespace, body)

    def grant_reconciler(self) -> None:
        """The reconciler's ServiceAccount with its RBAC rules; each agent gets a token bound to a Pod
        on its node (what the kubelet mounts), so it may write only that node."""
        ensure_namespace(self.api, RECONCILER_NAMESPACE)
        core: Any = k8s.CoreV1Api(self.api)
        core.create_namespaced_service_account(RECONCILER_NAMESPACE, {"metadata": {"name": RECONCILER_SA}})
        rbac: Any = k8s.RbacAuthorizationV1Api(self.api)
        rbac.create_cluster_role({"metadata": {"name": "mig-guard-reconciler"}, "rules": list(RULES)})
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": "mig-guard-reconciler"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "mig-guard-reconciler",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": RECONCILER_SA, "namespace": RECONCILER_NAMESPACE}
                ],
            }
        )

    def reconciler_kubeconfig(self, node: str) -> Path:
        assert self.plane is not None
        token = pod_bound_token(self.api, RECONCILER_NAMESPACE, RECONCILER_SA, node, expiration_seconds=86400)
        config = kubeconfig_dict(self.plane.server_url, self.plane.ca_pem, user=RECONCILER_SA, token=token)
        return write_kubeconfig(self.workdir / f"reconciler-{node}.kubeconfig", config)

    def start_webhook(self) -> None:
        assert self.plane is not None
        now = dt.datetime.now(dt.UTC)
        ca = generate_ca("mig-guard-demo-ca", now, dt.timedelta(days=1))
        leaf = issue_serving_cert(ca, ["localhost", "127.0.0.1"], now, dt.timedelta(days=1))
        tls = self.workdir / "tls"
        tls.mkdir(exist_ok=True)
        (tls / "ca.crt").write_bytes(ca.cert_pem())
        (tls / "tls.crt").write_bytes(leaf.cert_pem())
        key_file = tls / "tls.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(leaf.key_pem())
        port = free_port()
        self._spawn(
            "webhook",
            [
                *self.mig_guard, "webhook",
                "--listen", f"127.0.0.1:{port}",
                "--tls-cert-file", str(tls / "tls.crt"),
                "--tls-key-file", str(key_file),
                "--configmap", f"{CONFIGMAP.namespace}/{CONFIGMAP.name}",
                "--configmap-key", CONFIGMAP.key,
                "--kubeconfig", str(self.plane.kubeconfig_path),
                "--reconciler-user", RECONCILER_USER,
                "--workers", str(self.webhook_workers),
            ],
        )  # fmt: skip
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))

        def ready() -> bool:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/readyz", context=context, timeout=2
                ) as r:
                    return bool(r.status == 200)
            except (OSError, ValueError):
                return False

        self._wait(ready, 60, "the webhook to be ready")
        base = f"https://127.0.0.1:{port}"
        admission: Any = k8s.AdmissionregistrationV1Api(self.api)
        users = [RECONCILER_USER]
        admission.create_validating_webhook_configuration(
            validating_configuration(
                WEBHOOK_CONFIG_NAME,
                url_client_config(base + VALIDATE_PATH, ca.cert_pem()),
                CONFIGMAP,
                reconciler_users=users,
            )
        )
        admission.create_mutating_webhook_configuration(
            mutating_configuration(
                WEBHOOK_CONFIG_NAME,
                url_client_config(base + MUTATE_PATH, ca.cert_pem()),
                reconciler_users=users,
            )
        )
        policy = f"{WEBHOOK_CONFIG_NAME}-node-writers"
        admission.create_validating_admission_policy(node_writers_policy(policy, users))
        admission.create_validating_admission_policy_binding(node_writers_binding(policy, policy))
        self.out.detail(
            f"webhook on {base} (gunicorn, TLS), registered for Nodes and the ConfigMap; "
            "node-writers policy installed"
        )

    def start_nodes(self) -> None:
        core: Any = k8s.CoreV1Api(self.api)
        for node in NODES:
            state_file = self.workdir / f"gpus-{node.name}.json"
            gpus = ("--simulated-gpus", f"{node.product}:{node.gpus}")
            labels = None
            if node.model is not None:
                # A GPU no catalog knows, MIG already on: its driver reports its MIG table.
                model = load_gpu_model(node.model)
                SimulatedNvml([model] * node.gpus, state_file=state_file, mig_enabled=True)
                gpus = ("--simulated-gpu-spec", f"{node.model}:{node.gpus}")
                labels = gfd_labels(node.product, node.gpus, memory_mib=model.memory_mib)
            extra = A100_MIG_RESOURCES if node is NODES[0] else None
            create_gpu_node(
                self.api, node.name, product=node.product, gpu_count=node.gpus, labels=labels,
                extended_resources=extra,
            )  # fmt: skip
            socket = self.workdir / f"{node.name}-kubelet.sock"
            self.podresources[node.name] = PodResourcesServer(str(socket)).start()
            reconciler_kubeconfig = self.reconciler_kubeconfig(node.name)
            self._spawn(
                f"reconciler-{node.name}",
                [
                    *self.mig_guard, "reconcile",
                    "--node-name", node.name,
                    "--kubeconfig", str(reconciler_kubeconfig),
                    "--gpu-backend", "simulated",
                    *gpus,
                    "--simulated-state-file", str(state_file),
                    "--simulated-latency", "default=0.005,nvmlDeviceSetMigMode=0.2",
                    "--configmap", f"{CONFIGMAP.namespace}/{CONFIGMAP.name}",
                    "--configmap-key", CONFIGMAP.key,
                    "--podresources-socket", str(socket),
                    "--resync-seconds", "60",
                    "--usage-interval", "2",
                ],
            )  # fmt: skip

        def reported(name: str) -> Callable[[], bool]:
            def check() -> bool:
                annotations = core.read_node(name).metadata.annotations or {}
                return keys.ANNOTATION_GPUS in annotations

            return check

        for node in NODES:
            self._wait(reported(node.name), 90, f"the reconciler on {node.name} to report its GPUs")
            where = " (in no catalog: simulated from its driver's MIG table)" if node.model else ""
            self.out.detail(
                f"{node.name}: {node.gpus} x {node.product}{where}, reconciler running (simulated NVML)"
            )

    # --- the script -----------------------------------------------------------------------------
    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """kubectl with the demo's kubeconfig, and `kubectl mig` (this Python's kubectl-mig) on PATH."""
        assert self.plane is not None
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig_path), "PATH": path}
        argv = [str(self.plane.binary("kubectl")), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)

    def show_kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.out.detail("$ kubectl " + " ".join(args))
        result = self.kubectl(*args)
        self.out.detail(result.stdout + result.stderr)
        return result

    def node_state(self, name: str) -> tuple[str | None, str | None, bool]:
        node: Any = k8s.CoreV1Api(self.api).read_node(name)
        labels = node.metadata.labels or {}
        annotations = node.metadata.annotations or {}
        tainted = any(t.key == keys.TAINT_KEY for t in node.spec.taints or [])
        return labels.get(keys.LABEL_MIG_STATE), annotations.get(keys.ANNOTATION_REASON), tainted

    def geometry_lines(self, name: str) -> list[str]:
        node: Any = k8s.CoreV1Api(self.api).read_node(name)
        report = NodeGpus.from_annotation((node.metadata.annotations or {})[keys.ANNOTATION_GPUS])
        lines = []
        for gpu in report.gpus:
            summary = gpu.geometry.summary() if gpu.geometry is not None else "unknown"
            lines.append(f"GPU {gpu.index}: {summary}")
        return lines

    def play(self) -> None:
        a100, a30 = NODES[0].name, NODES[2].name
        self.out.step(f"1. A typo is rejected at write time: {a100} gets 'all-1g.5gbb'")
        typo = self.show_kubectl("label", "node", a100, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb")
        if typo.returncode == 0:
            raise DemoError("the typo was accepted: the webhook did not answer")

        self.out.step(f"2. A layout the GPU cannot hold is rejected: {a30} (A30) gets 'all-3g.20gb'")
        wrong = self.show_kubectl("label", "node", a30, f"{keys.LABEL_MIG_CONFIG}=all-3g.20gb")
        if wrong.returncode == 0:
            raise DemoError("the incompatible layout was accepted")

        self.out.step("3. --dry-run=server gives the verdict and stores nothing")
        self.show_kubectl("label", "node", a100, f"{keys.LABEL_MIG_CONFIG}=all-balanced", "--dry-run=server")

        self.out.step(f"4. A valid layout is applied: {a100} gets 'all-balanced'")
        ok = self.show_kubectl("label", "node", a100, f"{keys.LABEL_MIG_CONFIG}=all-balanced")
        if ok.returncode != 0:
            raise DemoError("the valid layout was rejected")
        state, reason, tainted = self.node_state(a100)
        self.out.detail(f"right after the write: state={state}, tainted={tainted}, reason: {reason}")
        seen: list[str] = [state or ""]

        def settled() -> bool:
            state, _, _ = self.node_state(a100)
            if state and state != seen[-1]:
                seen.append(state)
            return state in (keys.STATE_SUCCESS, keys.STATE_FAILED)

        self._wait(settled, 120, f"{a100} to finish reconfiguring")
        state, reason, tainted = self.node_state(a100)
        self.out.detail(f"states seen: {' -> '.join(s for s in seen if s)}")
        self.out.detail(f"now: state={state}, tainted={tainted}, reason: {reason}")
        if state != keys.STATE_SUCCESS:
            raise DemoError(f"{a100} ended in {state}: {reason}")
        self.out.step(f"5. The geometry on {a100} now")
        self.out.detail("\n".join(self.geometry_lines(a100)))
        self.play_unknown_gpu()
        self.play_preview()

    def play_unknown_gpu(self) -> None:
        """A GPU no catalog knows is judged from the table its driver reports, exactly."""
        x100 = NODES[3].name
        self.out.step(
            f"6. A GPU no catalog knows is judged from its driver's MIG table: {x100} gets 'x100-three-3g'"
        )
        wrong = self.show_kubectl("label", "node", x100, f"{keys.LABEL_MIG_CONFIG}=x100-three-3g")
        if wrong.returncode == 0:
            raise DemoError("a layout the X100's driver table cannot hold was accepted")
        self.out.step(f"7. A layout its table holds is applied: {x100} gets 'x100-two-3g'")
        ok = self.show_kubectl("label", "node", x100, f"{keys.LABEL_MIG_CONFIG}=x100-two-3g")
        if ok.returncode != 0:
            raise DemoError("the X100 layout its driver table holds was rejected")
        self._wait(lambda: self.node_state(x100)[0] in (keys.STATE_SUCCESS, keys.STATE_FAILED), 120, x100)
        state, reason, _ = self.node_state(x100)
        if state != keys.STATE_SUCCESS:
            raise DemoError(f"{x100} ended in {state}: {reason}")
        self.out.detail(f"state={state}, reason: {reason}")
        self.out.detail("\n".join(f"{x100} {line}" for line in self.geometry_lines(x100)))

    def run_pods(self, node: str, pods: dict[str, tuple[int, int]]) -> None:
        """Pods on `node`'s MIG devices: each asks for its instance's profile, and the node's
        PodResources stand-in says it got that device (as a kubelet would once it admits it)."""
        state = self.workdir / f"gpus-{node}.json"
        access = GpuAccess(SimulatedNvml(state_file=state))
        access.start()
        try:
            places = {p.gpu * 100 + (p.gi or 0): (uuid, p) for i in range(access.gpu_count())
                      for uuid, p in access.device_places(i).items() if uuid.startswith("MIG-") and "/" not in uuid}  # fmt: skip
        finally:
            access.stop()
        ensure_namespace(self.api, WORKLOADS)
        assigned: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
        core: Any = k8s.CoreV1Api(self.api)
        for name, (gpu, gi) in pods.items():
            uuid, place = places[gpu * 100 + gi]
            resource = f"nvidia.com/mig-{place.profile}"
            assigned[(WORKLOADS, name)] = [(resource, [uuid])]
            self.podresources[node].set(assigned)
            container = {"name": "main", "image": "cuda", "resources": {"limits": {resource: "1"}}}
            spec = {"nodeName": node, "terminationGracePeriodSeconds": 0, "containers": [container]}
            core.create_namespaced_pod(WORKLOADS, {"metadata": {"name": name}, "spec": spec})

    def running(self, node: str) -> set[str]:
        core: Any = k8s.CoreV1Api(self.api)
        pods = core.list_namespaced_pod(WORKLOADS, field_selector=f"spec.nodeName={node}")
        return {
            f"{WORKLOADS}/{p.metadata.name}"
            for p in pods.items
            if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
        }

    def usage_names(self, node: str) -> set[str]:
        core: Any = k8s.CoreV1Api(self.api)
        text = (core.read_node(node).metadata.annotations or {}).get(keys.ANNOTATION_USAGE)
        if not text:
            return set()
        return {pod for device in json.loads(text)["devices"] for pod in device["pods"]}

    def play_preview(self) -> None:
        """See before you change: the pods on each MIG device, the plan and the pods it evicts, as
        `kubectl mig` and as the webhook's warnings on a dry run; then the change, evicting those."""
        a100, target = NODES[0].name, "all-1g.5gb"
        self.out.step(f"8. Pods run on {a100}'s MIG devices; its reconciler reports who uses which")
        self.run_pods(a100, DEMO_PODS)
        everyone = {f"{WORKLOADS}/{name}" for name in DEMO_PODS}
        self._wait(lambda: self.running(a100) == everyone, 60, "the demo pods to run")
        self._wait(lambda: self.usage_names(a100) == everyone, 60, f"{keys.ANNOTATION_USAGE} to name them")
        self.show_kubectl("mig", "status")
        self.out.step(f"9. Which configs fit {a100}, and why the others do not")
        self.show_kubectl("mig", "configs", a100)
        self.out.step(
            f"10. What {target} would do on {a100}: the plan and the pods it evicts (writes nothing)"
        )
        self.show_kubectl("mig", "plan", a100, target)
        planned = self.kubectl("mig", "plan", a100, target, "-o", "json")
        if planned.returncode != 0:
            raise DemoError(f"kubectl mig plan failed: {planned.stderr}")
        previewed = set(json.loads(planned.stdout)["evicts"])
        self.out.step(
            "11. The same preview as the webhook's warnings, on a server-side dry run (nothing stored)"
        )
        label = f"{keys.LABEL_MIG_CONFIG}={target}"
        self.show_kubectl("label", "node", a100, label, "--overwrite", "--dry-run=server")
        self.out.step(f"12. The change itself: {a100} gets {target}")
        if self.show_kubectl("label", "node", a100, label, "--overwrite").returncode != 0:
            raise DemoError(f"{target} was rejected")
        self._wait(lambda: self.node_state(a100)[0] in (keys.STATE_SUCCESS, keys.STATE_FAILED), 120, a100)
        state, reason, _ = self.node_state(a100)
        if state != keys.STATE_SUCCESS:
            raise DemoError(f"{a100} ended in {state}: {reason}")
        evicted = everyone - self.running(a100)
        self.out.detail(f"evicted: {', '.join(sorted(evicted)) or 'none'}")
        self.out.detail(f"kept running: {', '.join(sorted(everyone - evicted)) or 'none'}")
        if evicted != previewed:
            raise DemoError(f"the change evicted {sorted(evicted)}, the preview said {sorted(previewed)}")
        self.out.detail("the change evicted exactly the pods the preview named")
        self.show_kubectl("mig", "why", a100)


@contextlib.contextmanager
def _interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `finally` blocks run and every process is stopped."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(wait: bool = True, keep: bool = False, out: Output | None = None) -> int:
    """Run the demo; returns the exit status. `wait=False` ends after the script (for tests/CI)."""
    out = out or Output()
    workdir = Path(tempfile.mkdtemp(prefix="mig-guard-demo-"))
    demo = Demo(out, workdir)
    status = 0
    with _interrupts_as_exceptions():
        try:
            out.step(
                "Starting a local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)"
            )
            demo.start_control_plane()
            out.step("Publishing the GPU Operator's default mig-parted config as a ConfigMap")
            demo.publish_config()
            out.step("Starting the mig-guard webhook")
            demo.start_webhook()
            out.step("Creating GPU nodes and a reconciler for each (simulated GPUs)")
            demo.grant_reconciler()
            demo.start_nodes()
            demo.play()
            assert demo.plane is not None
            out.step("Scripted part done. The cluster stays up; try it:")
            out.detail(f"export KUBECONFIG={demo.plane.kubeconfig_path}")
            out.detail(f"export PATH={demo.plane.binary('kubectl').parent}:$PATH")
            out.detail("kubectl get nodes -L nvidia.com/mig.config,nvidia.com/mig.config.state")
            out.detail("kubectl label node gpu-h100 nvidia.com/mig.config=all-1g.10gb --overwrite")
            out.detail("kubectl describe node gpu-h100   # MIGConfigReady condition and events")
            if wait:
                out.detail("Press Ctrl-C to stop and clean up.")
                threading.Event().wait()
        except KeyboardInterrupt:
            out.step("Interrupted")
        except DemoError as exc:
            out.step(f"Demo failed: {exc}")
            out.detail(f"logs are in {workdir}")
            keep = True
            status = 1
        finally:
            out.step("Stopping everything")
            demo.close()
            if keep:
                out.detail(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return status
