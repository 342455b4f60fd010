"""A real Kubernetes node on this machine: containerd + runc + the CNI bridge plugin, a kubelet
and kube-proxy, joined to a control plane of its own (:class:`~devcluster.controlplane.ControlPlane`).

    with RealNode(workdir) as node:           # root only; one per machine (fixed host paths)
        node.import_image(archive)            # images come from OCI archives, never a registry
        core = kubernetes.client.CoreV1Api(node.api)

Network: the node owns a bridge (``mgbr0``, 10.88.0.1/24). Pods get addresses from 10.88.0.0/24
on it; kube-apiserver and the kubelet listen on the bridge address only, so pods reach the API
server through the ``kubernetes`` Service (kube-proxy, iptables mode) and the API server reaches
webhooks in pods through their Services. Guard rules (iptables chains ``MIGGUARD-*``) drop anything
to or from the pod and service ranges on any other interface, and anything forwarded that does
not stay on the bridge: no pod or service traffic leaves the machine, and nothing from outside
reaches the node's addresses.

Security: the kubelet authenticates callers by client certificate or token (webhook) and asks the
API server to authorize them (``Webhook`` mode); no anonymous access, no read-only port. The API
server calls it with its own client certificate (granted ``system:kubelet-api-admin``).

Host changes (sysctls, iptables rules and chains, nftables tables, cgroups, mounts, fixed paths,
the bridge) are recorded before the start (:mod:`devcluster.hoststate`) and undone on stop; a
marker file (``/run/mig-guard-node.json``) lets the next start clean up after a run that was
killed. Processes run in their own process groups and die with the thread that started them; the
container shims (which containerd starts in process groups of their own) and any container left
are found by this node's containerd socket and cgroup, and killed by process id.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

from devcluster import binaries as bins
from devcluster import hostprep, hoststate
from devcluster.controlplane import SERVICE_CIDR, ControlPlane, free_port
from devcluster.images import ImageArchive, pause_image
from devcluster.kubeconfig import api_client
from devcluster.pki import KUBELET_CLIENT_USER
from devcluster.processes import ManagedProcess, wait_until

NODE_NAME = "mig-guard-node"
BRIDGE = "mgbr0"
POD_SUBNET = "10.88.0.0/24"
NODE_ADDRESS = "10.88.0.1"
#: Addresses that must never be seen on another interface than the bridge (pods, services).
GUARDED_RANGES = ("10.88.0.0/16", SERVICE_CIDR)
#: cgroup (in every hierarchy) under which the kubelet puts all pods.
CGROUP_PARENT = "mig-guard-node"
MARKER = Path("/run/mig-guard-node.json")
#: Held while a node runs. In root's home, not in a cache directory that the environment can
#: move ($MIG_GUARD_NODE_CACHE, $XDG_CACHE_HOME): two sessions must always find the same lock.
MACHINE_LOCK = Path.home() / ".cache" / "mig-guard" / "real-node.lock"
#: Fixed in the kubelet (the device plugin API's well-known directory).
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
#: Paths outside the work directory that containerd 1.6, its shims, runc, libcni and the kubelet
#: use whatever they are told; each is removed on stop if it did not exist before.
FIXED_PATHS = (
    "/run/containerd",
    "/run/runc",
    "/run/netns",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    str(MARKER),
)
#: Where new mounts may appear (pod volumes, sandboxes' /dev/shm, network namespaces, overlays).
MOUNT_AREAS = ("/run/containerd", "/run/netns", "/var/lib/kubelet")
GUARD_CHAINS = {"raw": "MIGGUARD-IN", "mangle": "MIGGUARD-OUT", "filter": "MIGGUARD-FWD"}


class NodeError(RuntimeError):
    """The node could not start; the message says what is missing or which component failed."""


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", "-w", *args], check=True, capture_output=True)


def guard_rules() -> dict[str, list[list[str]]]:
    """The guard chains' rules, by table (see the module docstring)."""
    inbound = [["-i", "lo", "-j", "RETURN"], ["-i", BRIDGE, "-j", "RETURN"]]
    inbound += [["-d", cidr, "-j", "DROP"] for cidr in GUARDED_RANGES]
    outbound = [["-o", BRIDGE, "-j", "RETURN"], ["-o", "lo", "-j", "RETURN"]]
    outbound += [["-d", cidr, "-j", "DROP"] for cidr in GUARDED_RANGES]
    outbound += [["-s", cidr, "-j", "DROP"] for cidr in GUARDED_RANGES]
    forward = [["-i", BRIDGE, "-o", BRIDGE, "-j", "RETURN"], ["-j", "DROP"]]
    return {"raw": inbound, "mangle": outbound, "filter": forward}


_HOOKS = {"raw": "PREROUTING", "mangle": "POSTROUTING", "filter": "FORWARD"}


def guard_drops() -> int:
    """Packets the guard chains dropped so far (a test can check that something was stopped)."""
    total = 0
    for table, chain in GUARD_CHAINS.items():
        out = subprocess.run(
            ["iptables", "-w", "-t", table, "-L", chain, "-n", "-v", "-x"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines()[2:]:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "DROP":
                total += int(fields[0])
    return total


class RealNode:
    """A control plane on the bridge address plus one real node (kubelet, kube-proxy, containerd).

    ``labels``: added to the Node once it registered (e.g. GPU Feature Discovery's labels).
    ``images``: OCI archives imported into containerd before the kubelet starts.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = NODE_NAME,
        labels: Mapping[str, str] | None = None,
        images: Sequence[ImageArchive] = (),
        startup_timeout: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.name = name
        self.labels = dict(labels or {})
        self.images = list(images)
        self.startup_timeout = startup_timeout
        self.plane = ControlPlane(
            self.workdir / "plane", address=NODE_ADDRESS, workloads=True, fake_nodes=False
        )
        self.processes: dict[str, ManagedProcess] = {}
        self.snapshot: hoststate.HostSnapshot | None = None
        self.startup_seconds: dict[str, float] = {}
        #: What stop() undid on the host, and what it found still different afterwards.
        self.undone: list[str] = []
        self.leftovers: list[str] = []
        self._kubelet_port = 0
        self._kubelet_healthz = 0
        self._proxy_healthz = 0
        self._stopped = True
        self._lock: IO[str] | None = None

    # ------------------------------------------------------------------ paths

    @property
    def address(self) -> str:
        return NODE_ADDRESS

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.workdir / "kubelet"

    @property
    def pod_resources_dir(self) -> Path:
        """The kubelet's PodResources socket lives here (``kubelet.sock``)."""
        return self.kubelet_root / "pod-resources"

    @property
    def device_plugin_dir(self) -> Path:
        return DEVICE_PLUGIN_DIR

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def pod_logs_dir(self) -> Path:
        return self.workdir / "pod-logs"

    @property
    def api(self) -> Any:
        return self.plane.api

    @property
    def kubeconfig_path(self) -> Path:
        return self.plane.kubeconfig_path

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> RealNode:
        t0 = time.monotonic()
        self._preflight()
        self._take_machine()
        try:
            cleanup_stale()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.snapshot = hoststate.HostSnapshot.take(list(FIXED_PATHS))
            self._write_marker()
        except BaseException:
            self._release_machine()
            raise
        self._stopped = False
        atexit.register(self.stop)
        try:
            self._setup_network()
            self._make_cgroup_parent()
            self.startup_seconds["host"] = time.monotonic() - t0
            t1 = time.monotonic()
            self.plane.start()
            self.startup_seconds["control plane"] = time.monotonic() - t1
            self._start_containerd()
            t1 = time.monotonic()
            for image in [pause_image(), *self.images]:
                self.import_image(image)
            self.startup_seconds["images"] = time.monotonic() - t1
            self._write_marker()
            self._start_kubelet()
            self._start_kube_proxy()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds["total"] = time.monotonic() - t0
        return self

    def _preflight(self) -> None:
        if not hostprep.is_root():
            raise NodeError("a real node needs root (containerd, runc, iptables, cgroups)")
        missing = hostprep.missing_packages()
        if missing:
            raise NodeError(
                f"a real node needs the Debian packages {', '.join(missing)}: "
                "run `make node-prep` (apt-get, as root)"
            )
        for name in ("kubelet", "kube-proxy"):
            bins.find_binary(name)
        routes = subprocess.run(
            ["ip", "-4", "route", "show"], capture_output=True, text=True, check=False
        ).stdout
        if any(line.startswith("10.88.") for line in routes.splitlines()) and not os.path.exists(MARKER):
            raise NodeError(f"10.88.0.0/16 is already routed on this host:\n{routes}")

    def _take_machine(self, timeout: float = 1800.0) -> None:
        """One real node per machine (fixed host paths): wait for another session's to stop.
        Whoever holds the lock owns the marker, so a marker found afterwards is a dead run's."""
        MACHINE_LOCK.parent.mkdir(parents=True, exist_ok=True)
        lock = MACHINE_LOCK.open("w")
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = lock
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise NodeError(f"another real node kept this machine for {timeout:.0f}s") from None
                if not announced:
                    print("devcluster: another session runs a real node here; waiting for it", flush=True)
                    announced = True
                time.sleep(2.0)

    def _release_machine(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _write_marker(self) -> None:
        assert self.snapshot is not None
        record = {
            "workdir": str(self.workdir),
            "containerd_socket": str(self.containerd_socket),
            "pids": {name: proc.pid for name, proc in self.processes.items() if proc.pid},
            "snapshot": json.loads(self.snapshot.to_json()),
        }
        tmp = MARKER.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(MARKER)

    def _setup_network(self) -> None:
        for table, rules in guard_rules().items():
            chain = GUARD_CHAINS[table]
            _iptables("-t", table, "-N", chain)
            for rule in rules:
                _iptables("-t", table, "-A", chain, *rule)
            _iptables("-t", table, "-I", _HOOKS[table], "1", "-j", chain)
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", f"{NODE_ADDRESS}/24", "dev", BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)

    def _make_cgroup_parent(self) -> None:
        """The kubelet's cgroupRoot must exist in every hierarchy; cpuset needs cpus and mems."""
        for hierarchy in hoststate.CGROUP_ROOT.iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            target = hierarchy / CGROUP_PARENT
            target.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (target / knob).exists() and not (target / knob).read_text().strip():
                    (target / knob).write_text((hierarchy / knob).read_text())

    # ------------------------------------------------------------------ containerd

    def _spawn(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log", cwd=self.workdir).start()
        self.processes[name] = proc
        return proc

    def _alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.poll() is not None:
            raise NodeError(f"{name} exited with code {proc.poll()}; log tail:\n{proc.log_tail(40)}")

    def _wait(self, name: str, condition: Any, what: str) -> None:
        t0 = time.monotonic()
        try:
            wait_until(condition, self.startup_timeout, 0.1, what, alive=lambda: self._alive(name))
        except TimeoutError as exc:
            raise NodeError(f"{exc}; {name} log tail:\n{self.processes[name].log_tail(40)}") from None
        self.startup_seconds[name] = time.monotonic() - t0

    def containerd_config(self) -> str:
        w = self.workdir / "containerd"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{w}/root"
state = "{w}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/opt"
[{cri}]
  sandbox_image = "{pause_image().name}"
  enable_selinux = false
  # This kind of VM drops CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (pause asks for -998).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{w}/runc"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.workdir}/cni/net.d"
"""

    def cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "mig-guard",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_ADDRESS}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }

    def _start_containerd(self) -> None:
        (self.workdir / "containerd").mkdir(parents=True, exist_ok=True)
        (self.workdir / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "containerd" / "config.toml"
        config.write_text(self.containerd_config())
        (self.workdir / "cni" / "net.d" / "10-mig-guard.conflist").write_text(
            json.dumps(self.cni_config(), indent=1)
        )
        self._spawn("containerd", ["containerd", "--config", str(config)])

        def ready() -> bool:
            return self.containerd_socket.exists() and self._ctr("version").returncode == 0

        self._wait("containerd", ready, "containerd socket")

    def _ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def import_image(self, image: ImageArchive) -> None:
        """Put an OCI archive into containerd's ``k8s.io`` namespace (pods: ``imagePullPolicy: Never``)."""
        proc = self._ctr("images", "import", str(image.path))
        if proc.returncode != 0:
            raise NodeError(f"ctr images import {image.path} failed:\n{proc.stdout}{proc.stderr}")
        listed = self._ctr("images", "ls", "-q").stdout.split()
        if image.name not in listed:
            raise NodeError(f"{image.path} was imported but {image.name} is not among {listed}")

    def image_names(self) -> list[str]:
        return sorted(self._ctr("images", "ls", "-q").stdout.split())

    # ------------------------------------------------------------------ kubelet and kube-proxy

    def kubelet_config(self) -> dict[str, Any]:
        pki = self.workdir / "kubelet-pki"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # Only the bridge address: the API server (same host) reaches it, nothing outside does.
            "address": NODE_ADDRESS,
            "port": self._kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self._kubelet_healthz,
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True, "cacheTTL": "10s"},
                "x509": {"clientCAFile": str(self.plane.pki_dir / "ca.crt")},
            },
            "authorization": {
                "mode": "Webhook",
                "webhook": {"cacheAuthorizedTTL": "10s", "cacheUnauthorizedTTL": "5s"},
            },
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_PARENT}",
            # Machines like this one run cgroup v1 (the kubelet >= 1.35 refuses it unless told).
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(self.pod_logs_dir),
            "volumePluginDir": str(self.workdir / "volume-plugins"),
            # No cluster DNS, and pods must not use the host's resolvers (traffic stays here).
            "resolvConf": "",
            # Locally imported images can never be pulled back: never garbage-collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "registerNode": True,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }

    def _start_kubelet(self) -> None:
        plane = self.plane
        pki = self.workdir / "kubelet-pki"
        pki.mkdir(parents=True, exist_ok=True)
        assert plane.pki is not None
        serving = plane.pki.ca.issue_server(self.name, [NODE_ADDRESS, self.name])
        serving.write(pki, "kubelet")
        # kube-apiserver calls the kubelet as this user; grant it the kubelet API (logs, exec, ...).
        rbac: Any = k8s.RbacAuthorizationV1Api(plane.api)
        with contextlib.suppress(ApiException):
            rbac.create_cluster_role_binding(
                {
                    "metadata": {"name": "devcluster:kube-apiserver-kubelet-client"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin",
                    },
                    "subjects": [
                        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBELET_CLIENT_USER}
                    ],
                }
            )
        kubeconfig = plane.write_user_kubeconfig(
            f"system:node:{self.name}", ["system:nodes"], self.workdir / "kubelet.kubeconfig"
        )
        self._kubelet_port = free_port(NODE_ADDRESS)
        self._kubelet_healthz = free_port()
        config = self.workdir / "kubelet-config.json"
        config.write_text(json.dumps(self.kubelet_config(), indent=1))
        self._spawn(
            "kubelet",
            [
                str(bins.find_binary("kubelet")),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_ADDRESS}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={pki}",
                "--v=2",
            ],
        )
        self._write_marker()
        core: Any = k8s.CoreV1Api(plane.api)

        def ready() -> bool:
            node = core.read_node(self.name)
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

        self._wait("kubelet", ready, f"node {self.name} Ready")
        if self.labels:
            core.patch_node(self.name, {"metadata": {"labels": self.labels}})

    def _start_kube_proxy(self) -> None:
        kubeconfig = self.plane.write_user_kubeconfig(
            "system:kube-proxy", [], self.workdir / "kube-proxy.kubeconfig"
        )
        self._proxy_healthz = free_port()
        self._spawn(
            "kube-proxy",
            [
                str(bins.find_binary("kube-proxy")),
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_SUBNET}",
                "--bind-address=127.0.0.1",
                f"--healthz-bind-address=127.0.0.1:{self._proxy_healthz}",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                # NodePorts only on the bridge address, never on the machine's own interfaces.
                f"--nodeport-addresses={NODE_ADDRESS}/32",
                # Leave the host's sysctls alone (route_localnet, conntrack limits and timeouts).
                "--iptables-localhost-nodeports=false",
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--v=2",
            ],
        )
        self._write_marker()

        def healthy() -> bool:
            url = f"http://127.0.0.1:{self._proxy_healthz}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)

        self._wait("kube-proxy", healthy, "kube-proxy /healthz")

    # ------------------------------------------------------------------ clients, logs

    def new_api_client(self) -> Any:
        return api_client(self.kubeconfig_path)

    def log_tails(self, lines: int = 30) -> str:
        parts = [self.plane.log_tails(lines)]
        for name, proc in self.processes.items():
            state = "running" if proc.running else f"exited {proc.poll()}"
            parts.append(f"===== {name} ({state}) {proc.log_path} =====\n{proc.log_tail(lines)}")
        return "\n".join(parts)

    def run_pod(
        self,
        image: str,
        *,
        command: Sequence[str] | None = None,
        args: Sequence[str] | None = None,
        namespace: str = "default",
        timeout: float = 90.0,
    ) -> tuple[str, str]:
        """Run one container of ``image`` on this node to its end; returns (phase, log). The log is
        read through the API server, which asks the kubelet for it."""
        core: Any = k8s.CoreV1Api(self.plane.api)
        name = f"run-{uuid.uuid4().hex[:8]}"
        container: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "Never"}
        if command is not None:
            container["command"] = list(command)
        if args is not None:
            container["args"] = list(args)
        body = {
            "metadata": {"name": name},
            "spec": {
                "nodeName": self.name,
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [container],
            },
        }
        core.create_namespaced_pod(namespace, body)
        try:

            def finished() -> bool:
                return str(core.read_namespaced_pod(name, namespace).status.phase) in ("Succeeded", "Failed")

            wait_until(finished, timeout, 0.25, f"pod {namespace}/{name} finished")
            phase = str(core.read_namespaced_pod(name, namespace).status.phase)
            return phase, str(core.read_namespaced_pod_log(name, namespace, container="main"))
        finally:
            with contextlib.suppress(ApiException):
                core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's log from the kubelet's log files (newest restart last)."""
        texts = []
        for path in sorted(self.pod_logs_dir.glob(f"{namespace}_{pod}_*/{container}/*.log")):
            texts.append(path.read_text(errors="replace"))
        return "".join(texts)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Remove the pods (kubelet still running, so volumes and networks are torn down properly),
        stop everything, and undo the host changes. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._remove_pods()
        for name in ("kube-proxy", "kubelet"):
            proc = self.processes.get(name)
            if proc is not None:
                proc.stop(timeout=10)
        self._remove_containers()
        proc = self.processes.get("containerd")
        if proc is not None:
            proc.stop(timeout=10)
        self.plane.stop()
        if self.snapshot is not None:
            self.undone = restore_host(self.snapshot, str(self.containerd_socket), self.workdir)
            self.leftovers = self.snapshot.differences()
        self._release_machine()

    def _remove_pods(self) -> None:
        if not self.plane.running or "kubelet" not in self.processes or not self.processes["kubelet"].running:
            return
        # No controller may recreate what we delete now.
        for name in ("kube-controller-manager", "kube-scheduler"):
            proc = self.plane.processes.get(name)
            if proc is not None:
                proc.stop(timeout=5)
        with contextlib.suppress(Exception):
            core: Any = k8s.CoreV1Api(self.plane.api)
            selector = f"spec.nodeName={self.name}"
            for pod in core.list_pod_for_all_namespaces(field_selector=selector).items:
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1
                    )

            def gone() -> bool:
                return not core.list_pod_for_all_namespaces(field_selector=selector).items

            wait_until(gone, 60, 0.25, "pods removed by the kubelet")

    def _remove_containers(self) -> None:
        proc = self.processes.get("containerd")
        if proc is None or not proc.running:
            return
        with contextlib.suppress(Exception):
            for task in self._ctr("tasks", "ls", "-q", timeout=20).stdout.split():
                self._ctr("tasks", "kill", "--signal", "SIGKILL", task, timeout=20)
                self._ctr("tasks", "delete", "--force", task, timeout=20)
            for container in self._ctr("containers", "ls", "-q", timeout=20).stdout.split():
                self._ctr("containers", "delete", container, timeout=20)


def _pids_using(socket: str) -> list[int]:
    """Processes whose command line names this containerd socket: its container shims."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if socket.encode() in argv:
                found.append(int(entry.name))
    return found


def restore_host(snapshot: hoststate.HostSnapshot, containerd_socket: str, workdir: Path) -> list[str]:
    """Kill what a node left running, then undo its host changes (also for a killed earlier run)."""
    done: list[str] = []
    for pid in _pids_using(containerd_socket):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed shim {pid}")
    cgroups = [h / CGROUP_PARENT for h in hoststate.CGROUP_ROOT.iterdir() if (h / CGROUP_PARENT).is_dir()]
    done += hoststate.kill_cgroup_processes(cgroups)
    time.sleep(0.2)
    done += hoststate.unmount_new(snapshot, [*MOUNT_AREAS, str(workdir)])
    done += hoststate.delete_new_links(snapshot, [BRIDGE])
    done += hoststate.restore_iptables(snapshot)
    done += hoststate.flush_conntrack(GUARDED_RANGES)
    done += hoststate.restore_sysctls(snapshot)
    done += hoststate.remove_cgroups(snapshot)
    done += hoststate.remove_new_paths(snapshot)
    return done


def kill_recorded_processes(pids: dict[str, int]) -> list[str]:
    """Kill the process groups a killed node recorded, each only while its pid still runs the binary
    it was recorded for (a pid is reused; most are simply gone, which is no error)."""
    done = []
    for name, pid in pids.items():
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if Path(exe).name in (name, "containerd"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                done.append(f"killed stale {name} ({pid})")
    return done


def cleanup_stale() -> list[str]:
    """Undo what a node killed before its stop() left (it wrote :data:`MARKER` at its start)."""
    if not MARKER.exists():
        return []
    record = json.loads(MARKER.read_text())
    done = kill_recorded_processes(record.get("pids", {}))
    snapshot = hoststate.HostSnapshot.from_json(json.dumps(record["snapshot"]))
    done += restore_host(snapshot, record["containerd_socket"], Path(record["workdir"]))
    MARKER.unlink(missing_ok=True)
    return done


def prepare(images: Sequence[tuple[str, Path]] = ()) -> dict[str, float]:
    """What a real node needs before it starts, timed: the Debian packages (apt-get), the pause and
    Debian base images, and ``images`` (name, Dockerfile context) built on that base."""
    from devcluster.images import build_dockerfile, debian_base_image  # noqa: PLC0415

    seconds = {"packages": hostprep.ensure_packages()}
    t0 = time.monotonic()
    pause_image()
    seconds["pause image"] = time.monotonic() - t0
    t0 = time.monotonic()
    base = debian_base_image()
    seconds["debian base image"] = time.monotonic() - t0
    for name, context in images:
        t0 = time.monotonic()
        build_dockerfile(context.resolve(), name, base)
        seconds[f"image {name}"] = time.monotonic() - t0
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m devcluster.node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_prepare = sub.add_parser("prepare", help="install the packages, build the images (cached)")
    p_prepare.add_argument(
        "--image", action="append", default=[], metavar="NAME=CONTEXT", help="also build CONTEXT/Dockerfile"
    )
    sub.add_parser("cleanup", help="undo what a killed real node left on this host")
    args = parser.parse_args(argv)
    if args.cmd == "cleanup":
        holder = RealNode(Path("/nonexistent"))
        try:
            holder._take_machine(timeout=0)
        except NodeError:
            print("a real node is running on this machine; nothing to clean up", file=sys.stderr)
            return 1
        try:
            for line in cleanup_stale():
                print(line)
        finally:
            holder._release_machine()
        return 0
    if not hostprep.is_root():
        print(
            "node-prep: not root, nothing prepared (the real-node tests need root; deselect them with -m 'not realnode')"
        )
        return 0
    images = []
    for spec in args.image:
        name, sep, context = spec.partition("=")
        if not sep:
            parser.error(f"--image {spec!r}: expected NAME=CONTEXT")
        images.append((name, Path(context)))
    try:
        seconds = prepare(images)
    except (hostprep.HostPrepError, OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"node-prep: {exc}", file=sys.stderr)
        return 1
    print("node-prep: " + ", ".join(f"{step} {secs:.1f}s" for step, secs in seconds.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
