"""A real, local Kubernetes control plane: etcd + kube-apiserver (+ kube-controller-manager,
kube-scheduler and kwok for workloads), all on 127.0.0.1.

    with ControlPlane() as plane:
        core = kubernetes.client.CoreV1Api(plane.api)
        ...

``workloads=True`` (or :meth:`ControlPlane.start_workloads` later) adds the full controller manager,
the scheduler and kwok, so Deployments/DaemonSets get pods that are scheduled and "run" on fake nodes
(Nodes annotated ``kwok.x-k8s.io/node=fake``, see :func:`devcluster.helpers.create_gpu_node`).

Without workloads a controller manager still runs, limited to the service-account controllers, so the
ServiceAccount admission plugin stays on (as in a real cluster) and pods can be created in any namespace
(its ``default`` ServiceAccount appears within a second or so).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from devcluster import binaries as bins
from devcluster.kubeconfig import api_client, kubeconfig_dict, write_kubeconfig
from devcluster.pki import ClusterPKI
from devcluster.processes import ManagedProcess, wait_until

LOOPBACK = "127.0.0.1"
KWOK_STAGES = Path(__file__).with_name("kwok-stages.yaml")
SERVICE_CIDR = "10.96.0.0/16"
#: The ClusterIP of the ``kubernetes`` Service (the first address of SERVICE_CIDR).
KUBERNETES_SERVICE_IP = "10.96.0.1"
FAKE_NODE_IP = "10.244.0.1"
FAKE_POD_CIDR = "10.244.0.0/16"
#: Controllers the base plane runs (so ServiceAccount admission works without workloads).
SA_CONTROLLERS = ("serviceaccount-controller", "root-ca-certificate-publisher-controller")


class ControlPlaneError(RuntimeError):
    """A component failed to start; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ControlPlane:
    """etcd + kube-apiserver (+ KCM, scheduler, kwok) in a work directory; a context manager.

    ``workdir``: where PKI, kubeconfigs, etcd data and logs go (default: a new temp dir).
    ``keep_dir``: keep the work directory after :meth:`stop` (always kept when ``workdir`` is given;
    etcd data is removed on stop unless ``keep_dir``). ``binaries``: name -> path overrides
    (default: :func:`devcluster.binaries.find_binary`).

    ``address``: where kube-apiserver listens and what it advertises. Loopback (the default) for
    tests with kwok nodes; a real node's bridge address (:mod:`devcluster.node`) so that pods reach
    the API server through the ``kubernetes`` Service, which then gets endpoints. ``fake_nodes``:
    start kwok with the workloads (not needed next to a real node).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        keep_dir: bool = False,
        workloads: bool = False,
        binaries: Mapping[str, Path] | None = None,
        startup_timeout: float = 90.0,
        extra_apiserver_args: Sequence[str] = (),
        address: str = LOOPBACK,
        fake_nodes: bool = True,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mig-guard-k8s-"))
        )
        self.keep_dir = keep_dir or not self._own_dir
        self.want_workloads = workloads
        self._binaries = dict(binaries or {})
        self.startup_timeout = startup_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.address = address
        self.fake_nodes = fake_nodes
        self.processes: dict[str, ManagedProcess] = {}
        self.pki: ClusterPKI | None = None
        self.etcd_port = 0
        self.apiserver_port = 0
        self._api: Any = None
        self.workloads_running = False
        self.startup_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ paths and properties

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def kubeconfig_path(self) -> Path:
        """The admin kubeconfig (user ``admin``, group ``system:masters``)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def server_url(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def ca_pem(self) -> bytes:
        return self._pki().ca.cert_pem

    @property
    def api(self) -> Any:
        """The admin ``kubernetes.client.ApiClient`` (shared; create more with :meth:`new_api_client`)."""
        if self._api is None:
            raise ControlPlaneError("control plane not started")
        return self._api

    def binary(self, name: str) -> Path:
        if name not in self._binaries:
            self._binaries[name] = bins.find_binary(name)
        return self._binaries[name]

    def _pki(self) -> ClusterPKI:
        if self.pki is None:
            raise ControlPlaneError("control plane not started")
        return self.pki

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start etcd and kube-apiserver (and the workload components if asked); wait until ready."""
        t0 = time.monotonic()
        # Resolve every binary first: a missing one fails here with the how-to-get-it message.
        names = ["etcd", "kube-apiserver", "kube-controller-manager"]
        if self.want_workloads:
            names += ["kube-scheduler", "kwok"] if self.fake_nodes else ["kube-scheduler"]
        for name in names:
            self.binary(name)
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.pki = ClusterPKI.create(
                (self.address, LOOPBACK, "localhost", KUBERNETES_SERVICE_IP)
                if self.address != LOOPBACK
                else (LOOPBACK, "localhost")
            )
            self.pki.write(self.pki_dir)
            self.startup_seconds["pki"] = time.monotonic() - t0
            self._with_port_retry("etcd", self._start_etcd)
            self._with_port_retry("kube-apiserver", self._start_apiserver)
            self._start_kcm(SA_CONTROLLERS)
            if self.want_workloads:
                self.start_workloads()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds["total"] = time.monotonic() - t0
        return self

    def _with_port_retry(self, name: str, start: Callable[[], None], attempts: int = 3) -> None:
        """Free ports are picked by binding port 0 and closing; another process may take one in
        between. Retry with new ports when the component says so."""
        for attempt in range(attempts):
            try:
                start()
                return
            except ControlPlaneError:
                proc = self.processes.get(name)
                if (
                    proc is None
                    or attempt == attempts - 1
                    or "address already in use" not in proc.log_tail(60)
                ):
                    raise
                proc.stop()
                del self.processes[name]

    def _spawn(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log", cwd=self.workdir).start()
        self.processes[name] = proc
        return proc

    def _check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.poll()} during startup; log tail:\n{proc.log_tail(40)}"
                )

    def _wait(self, name: str, condition: Any, what: str) -> None:
        t0 = time.monotonic()
        try:
            wait_until(condition, self.startup_timeout, 0.1, what, alive=lambda: self._check_alive(name))
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}; {name} log tail:\n{self.processes[name].log_tail(40)}") from None
        self.startup_seconds[name] = time.monotonic() - t0

    def _start_etcd(self) -> None:
        self.etcd_port, peer_port = free_port(), free_port()
        client_url, peer_url = f"http://{LOOPBACK}:{self.etcd_port}", f"http://{LOOPBACK}:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.binary("etcd")),
                "--name=devcluster",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=devcluster={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=1073741824",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1) as resp:  # noqa: S310
                return bool(json.load(resp).get("health") == "true")

        self._wait("etcd", healthy, "etcd /health")

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return ctx

    def _start_apiserver(self) -> None:
        self.apiserver_port = free_port(self.address)
        p = self.pki_dir
        self._spawn(
            "kube-apiserver",
            [
                str(self.binary("kube-apiserver")),
                f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={p}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--service-account-issuer={self.server_url}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # On loopback: no `kubernetes` Service endpoints (nothing in the cluster could reach
                # them, and a loopback address is only allowed with `none`). Elsewhere: the usual lease.
                f"--endpoint-reconciler-type={'none' if self.address == LOOPBACK else 'lease'}",
                # How it reaches kubelets (logs, exec): its own client certificate, and it checks theirs.
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={p / 'ca.crt'}",
                # Node names need not resolve: use the address the kubelet reports.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--profiling=false",
                "--v=1",
                *self.extra_apiserver_args,
            ],
        )
        ctx = self._ssl_context()

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.server_url}/readyz", context=ctx, timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)

        self._wait("kube-apiserver", ready, "kube-apiserver /readyz")
        cfg = kubeconfig_dict(
            self.server_url,
            self.ca_pem,
            user="admin",
            client_cert_pem=self._pki().admin.cert_pem,
            client_key_pem=self._pki().admin.key_pem,
        )
        write_kubeconfig(self.kubeconfig_path, cfg)
        self._api = api_client(self.kubeconfig_path)

        def default_namespace() -> bool:
            req = urllib.request.Request(f"{self.server_url}/api/v1/namespaces/default")  # noqa: S310
            with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)

        t0 = time.monotonic()
        wait_until(default_namespace, self.startup_timeout, 0.1, "namespace default")
        self.startup_seconds["namespace default"] = time.monotonic() - t0

    def _start_kcm(self, controllers: Sequence[str] | None) -> None:
        p = self.pki_dir
        argv = [
            str(self.binary("kube-controller-manager")),
            f"--kubeconfig={self.kubeconfig_path}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--root-ca-file={p / 'ca.crt'}",
            f"--service-account-private-key-file={p / 'sa.key'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}",
            f"--cluster-signing-key-file={p / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=false",
            # Its default (/usr/libexec/kubernetes/...) is created on the host when missing.
            f"--flex-volume-plugin-dir={self.workdir / 'flexvolume'}",
            "--node-monitor-grace-period=60s",
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--v=1",
        ]
        if controllers:
            argv.append(f"--controllers={','.join(controllers)}")
        # The controller manager has no readiness endpoint without a secure port; just make sure it
        # did not die at once (bad flags) -- callers wait for what they need (e.g. a ServiceAccount).
        proc = self._spawn("kube-controller-manager", argv)
        time.sleep(0.2)
        self._check_alive(proc.name)

    def start_workloads(self) -> None:
        """Add the full controller manager, the scheduler and kwok (idempotent)."""
        if self.workloads_running:
            return
        t0 = time.monotonic()
        for name in ("kube-scheduler", "kwok") if self.fake_nodes else ("kube-scheduler",):
            self.binary(name)
        old = self.processes.pop("kube-controller-manager", None)
        if old is not None:
            old.stop()
        self._start_kcm(None)
        sched_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(self.binary("kube-scheduler")),
                f"--kubeconfig={self.kubeconfig_path}",
                f"--authentication-kubeconfig={self.kubeconfig_path}",
                f"--authorization-kubeconfig={self.kubeconfig_path}",
                "--leader-elect=false",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={sched_port}",
                "--v=1",
            ],
        )
        if self.fake_nodes:
            self._start_kwok()
        sched_ctx = ssl.create_default_context()
        sched_ctx.check_hostname = False
        sched_ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert of the scheduler

        def scheduler_healthy() -> bool:
            url = f"https://{LOOPBACK}:{sched_port}/healthz"
            with urllib.request.urlopen(url, context=sched_ctx, timeout=2) as resp:
                return bool(resp.status == 200)

        self._wait("kube-scheduler", scheduler_healthy, "kube-scheduler /healthz")
        time.sleep(0.2)
        self._check_alive("kube-controller-manager", *(("kwok",) if self.fake_nodes else ()))
        self.workloads_running = True
        self.startup_seconds["workloads"] = time.monotonic() - t0

    def _start_kwok(self) -> None:
        self._spawn(
            "kwok",
            [
                str(self.binary("kwok")),
                f"--kubeconfig={self.kubeconfig_path}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={FAKE_POD_CIDR}",
                f"--node-ip={FAKE_NODE_IP}",
                "--node-lease-duration-seconds=40",
                # No --server-address and no --node-port: kwok serves nothing (with --node-port alone
                # it would listen on 0.0.0.0).
            ],
        )

    def stop(self) -> None:
        """Stop all components (newest first). Logs stay; etcd data goes unless ``keep_dir``."""
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self.workloads_running = False
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.close()
            self._api = None
        if not self.keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            shutil.rmtree(self.workdir / "etcd", ignore_errors=True)

    @property
    def running(self) -> bool:
        return bool(self.processes) and all(p.running for p in self.processes.values())

    # ------------------------------------------------------------------ clients and logs

    def new_api_client(self) -> Any:
        """A fresh admin ApiClient (its own connection pool)."""
        return api_client(self.kubeconfig_path)

    def write_user_kubeconfig(self, user: str, groups: Sequence[str] = (), path: Path | None = None) -> Path:
        """Issue a client certificate (CN=user, O=groups) from the cluster CA; write a kubeconfig."""
        pair = self._pki().ca.issue_client(user, groups)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        target = path or self.workdir / "users" / f"{safe}.kubeconfig"
        cfg = kubeconfig_dict(
            self.server_url,
            self.ca_pem,
            user=user,
            client_cert_pem=pair.cert_pem,
            client_key_pem=pair.key_pem,
        )
        return write_kubeconfig(target, cfg)

    def user_client(self, user: str, groups: Sequence[str] = ()) -> Any:
        """An ApiClient authenticating as ``user`` in ``groups`` (client certificate)."""
        return api_client(self.write_user_kubeconfig(user, groups))

    def log_tails(self, lines: int = 30) -> str:
        """The last ``lines`` lines of each component's log."""
        parts = []
        for name, proc in self.processes.items():
            state = "running" if proc.running else f"exited {proc.poll()}"
            parts.append(f"===== {name} ({state}) {proc.log_path} =====\n{proc.log_tail(lines)}")
        return "\n".join(parts)
