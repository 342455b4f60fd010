"""A GitOps push to a whole fleet: every GPU node relabelled in one concurrent server-side apply.

Real parts: kube-apiserver + etcd, the controller manager, the scheduler and kwok (which keeps the
GPU nodes Ready and heartbeating), the real `mig-guard webhook` (gunicorn, TLS, registered with
the chart's webhook configurations and the node-writers ValidatingAdmissionPolicy), and one real
reconciler per node on simulated GPUs: `Reconciler` objects in this process, each with its own API
client and watches (`--agents thread`, the default), or one `mig-guard reconcile` process per node
(`--agents process`, as a DaemonSet runs them).

The push is what Argo CD does: `nvidia.com/mig.config` set on every node by server-side apply
(field manager `argocd-controller`), all at once. Writes that fail are counted (what a client
without retries sees) and retried after 1 s, 2 s, 4 s, ... (at most 30 s apart) until they land.

Measured, per rollout budget (`--budgets`: `none` is no budget at all, as before issue 15):
- the writes: failed first attempts, time until all landed, p50/p99 per write (the API server's
  own timing, from its audit log);
- the webhook during the burst: admission requests, p50/p99 time to answer (its own log), CPU
  seconds per gunicorn worker;
- the peak number of nodes held at once, from a watch of every Node (never sampled), and of rollout
  slots (Leases) in use; time until every node reports `success` for the new layout; nodes that
  ended `failed`; reconcilers that exited;
- the reconcilers' API requests per node change, by verb and resource (audit log);
- after the last run, each reconciler's API load at rest: requests and watches per hour.

The machine's load average is printed next to the figures: this bench shares its cores with the
API server, etcd, kwok, the webhook and every reconciler.

    python bench/bench_fleet.py [--nodes 200] [--gpus 2] [--budgets none,1,10%] [--agents thread]
        [--rest-seconds 300] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import http.client
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client import ApiException

from devcluster.controlplane import ControlPlane
from devcluster.helpers import create_gpu_node, ensure_namespace, service_account_client
from devcluster.kubeconfig import kubeconfig_dict, token_client, write_kubeconfig
from devcluster.pki import CertificateAuthority
from kube.client import RetryPolicy, retrying
from kube.config_source import ConfigMapFeed, ConfigMapRef, ConfigSource
from migcore import keys
from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import parse_config
from migcore.planning import desired_geometries, plan_node
from reconciler.gpu_access import GpuAccess
from reconciler.loop import Reconciler, Settings
from reconciler.nvml_sim import SimulatedNvml
from reconciler.rbac import ROLLOUT_RULES, RULES
from reconciler.rollout import Budget, RolloutSettings
from webhook import node_policy, registration

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "migcore" / "data" / "default-mig-parted-config.yaml"
MIG_GUARD = str(Path(sys.executable).with_name("mig-guard"))
PRODUCT = "NVIDIA-A100-SXM4-40GB"
BEFORE, AFTER = "all-3g.20gb", "all-1g.5gb"
NAMESPACE = "mig-guard"
RECONCILER_SA = "reconciler"
RECONCILER_USER = f"system:serviceaccount:{NAMESPACE}:{RECONCILER_SA}"
GITOPS_USER = "argocd"
FLEET_LABEL = "bench.mig-guard.io/fleet"
CONFIGMAP = ConfigMapRef(NAMESPACE, "mig-parted-config")
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: ["{RECONCILER_USER}", "{GITOPS_USER}"]
  - level: None
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} ({os.cpu_count()} cores)"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def rfc3339(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- the webhook ---------------------------------------------------------------------------------


class Webhook:
    """`mig-guard webhook` watching the ConfigMap, registered like the chart registers it."""

    def __init__(self, plane: ControlPlane, workdir: Path, extra: Sequence[str] = ()) -> None:
        self.plane = plane
        ca = CertificateAuthority.create("bench-webhook-ca")
        self.ca_pem = ca.cert_pem
        cert, key = ca.issue_server().write(workdir, "webhook-tls")
        self.port = free_port()
        self.log_path = workdir / "webhook.log"
        self.argv = [
            MIG_GUARD, "webhook", "--listen", f"127.0.0.1:{self.port}",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--configmap", f"{CONFIGMAP.namespace}/{CONFIGMAP.name}",
            "--kubeconfig", str(plane.kubeconfig_path),
            "--reconciler-user", RECONCILER_USER, "--allow-unbound-reconciler-tokens",
            "--workers", "2", *extra,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.admission_hold = True
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=self._log)
        self.names = ("mig-guard-bench",)

    def hold_at_admission(self, hold: bool) -> None:
        """Restart on the same port and certificate with or without the admission hold (the chart
        turns it off with a rollout budget: the reconciler holds a node when its slot is free)."""
        if hold == self.admission_hold:
            return
        self.process.terminate()
        self.process.wait(timeout=20)
        argv = self.argv if hold else [*self.argv, "--no-admission-hold"]
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=self._log)
        self.admission_hold = hold
        self.wait_ready()

    def register(self) -> None:
        admission: Any = k8s.AdmissionregistrationV1Api(self.plane.api)
        users = {"reconciler_users": [RECONCILER_USER], "allow_unbound": True}
        url = f"https://127.0.0.1:{self.port}"
        validating = registration.validating_configuration(
            self.names[0], registration.url_client_config(url + registration.VALIDATE_PATH, self.ca_pem),
            CONFIGMAP, **users,
        )  # fmt: skip
        mutating = registration.mutating_configuration(
            self.names[0],
            registration.url_client_config(url + registration.MUTATE_PATH, self.ca_pem),
            **users,
        )
        policy = node_policy.node_writers_policy("mig-guard-bench-node-writers", [RECONCILER_USER], True)
        binding = node_policy.node_writers_binding(policy["metadata"]["name"], policy["metadata"]["name"])
        admission.create_validating_webhook_configuration(validating)
        admission.create_mutating_webhook_configuration(mutating)
        admission.create_validating_admission_policy(policy)
        admission.create_validating_admission_policy_binding(binding)

    def wait_ready(self, timeout: float = 60) -> None:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"webhook did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) per gunicorn worker so far."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        ticks = os.sysconf("SC_CLK_TCK")
        cpu: dict[int, float] = {}
        for pid in (int(p) for p in out.stdout.split()):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
        return cpu

    def admissions(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """Admission log records after byte offset `since`, and the new offset."""
        with self.log_path.open("rb") as handle:
            handle.seek(since)
            data = handle.read()
        records = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("msg") == "admission" or record.get("message") == "admission":
                    records.append(record)
        return records, since + len(data)

    def offset(self) -> int:
        return self.log_path.stat().st_size

    def stop(self) -> None:
        admission: Any = k8s.AdmissionregistrationV1Api(self.plane.api)
        for delete in (
            admission.delete_validating_webhook_configuration,
            admission.delete_mutating_webhook_configuration,
        ):
            with contextlib.suppress(ApiException):
                delete(self.names[0])
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self._log.close()


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the agents ----------------------------------------------------------------------------------


def prepare_gpus(state_file: Path, gpus: int, config_text: str) -> None:
    """Simulated GPUs already holding the layout BEFORE (as a node that has run for a while)."""
    access = GpuAccess(SimulatedNvml([PRODUCT] * gpus, state_file=state_file))
    access.start()
    catalog = load_catalog()
    result = check_config(
        parse_config(config_text, catalog), BEFORE, hardware_from_report(catalog, access.discover())
    )
    current = access.geometries()
    for gpu_plan in plan_node(current, desired_geometries(result, current)).changed:
        access.apply(gpu_plan)


@dataclass
class Agents:
    """One reconciler per node: threads of this process, or `mig-guard reconcile` processes."""

    mode: str
    workdir: Path
    plane: ControlPlane
    token: str
    gpus: int
    extra_args: Sequence[str] = ()
    settings: Callable[[str], dict[str, Any]] | None = None
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    reconcilers: dict[str, Any] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    crashed: dict[str, str] = field(default_factory=dict)
    rollout: RolloutSettings | None = None

    def kubeconfig(self) -> Path:
        path = self.workdir / "reconciler.kubeconfig"
        if not path.exists():
            config = kubeconfig_dict(
                self.plane.server_url, self.plane.ca_pem, user="reconciler", token=self.token
            )
            write_kubeconfig(path, config)
        return path

    def start(self, node: str) -> None:
        state_file = self.workdir / f"{node}-gpus.json"
        if self.mode == "process":
            argv = [
                MIG_GUARD, "reconcile", "--node-name", node, "--kubeconfig", str(self.kubeconfig()),
                "--gpu-backend", "simulated", "--simulated-gpus", f"{PRODUCT}:{self.gpus}",
                "--simulated-state-file", str(state_file),
                "--configmap", f"{CONFIGMAP.namespace}/{CONFIGMAP.name}",
                "--podresources-socket", str(self.workdir / "no-kubelet.sock"),
                "--operands-namespace", NAMESPACE, *self.extra_args,
            ]  # fmt: skip
            if self.rollout is not None:
                argv += ["--rollout-budget", str(self.rollout.budget), "--rollout-namespace", NAMESPACE]
            out = (self.workdir / f"agent-{node}.log").open("wb")
            self.processes[node] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            return
        admin = self.plane.api
        api = retrying(token_client(admin, self.token), RetryPolicy(budget=60.0))
        catalog = load_catalog()
        access = GpuAccess(SimulatedNvml([PRODUCT] * self.gpus, state_file=state_file))
        source = ConfigSource(ConfigMapFeed(api, CONFIGMAP), catalog)
        options = self.settings(node) if self.settings is not None else {}
        settings = Settings(
            node_name=node,
            operands_namespace=NAMESPACE,
            podresources_socket=str(self.workdir / "no-kubelet.sock"),
            rollout=self.rollout,
            **options.pop("settings", {}),
        )
        reconciler = Reconciler(api, access, source, settings, catalog=catalog, **options)
        self.reconcilers[node] = reconciler

        def run() -> None:
            try:
                reconciler.run(self.stop_event)
            except BaseException as exc:  # an agent that dies is a finding, not a bench crash
                self.crashed[node] = repr(exc)
                raise

        thread = threading.Thread(target=run, name=f"agent-{node}", daemon=True)
        self.threads[node] = thread
        thread.start()

    def restart_all(self, nodes: Sequence[str], rollout: RolloutSettings | None) -> None:
        """Every agent stopped and started again with this rollout budget (None: none)."""
        self.stop()
        self.stop_event = threading.Event()
        self.threads, self.reconcilers, self.processes = {}, {}, {}
        self.rollout = rollout
        for node in nodes:
            self.start(node)

    def exited(self) -> dict[str, str]:
        if self.mode == "process":
            return {n: f"exit {p.returncode}" for n, p in self.processes.items() if p.poll() is not None}
        return {n: self.crashed.get(n, "ended") for n, t in self.threads.items() if not t.is_alive()}

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self.threads.values():
            thread.join(timeout=30)


# --- watching the fleet --------------------------------------------------------------------------


@dataclass
class FleetWatch:
    """Every Node of the fleet and every rollout Lease, watched from a resourceVersion: the peak
    held at once is counted at every event, never sampled."""

    api: Any
    nodes: set[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    held: set[str] = field(default_factory=set)
    state: dict[str, tuple[str, str]] = field(default_factory=dict)
    done_at: dict[str, float] = field(default_factory=dict)
    peak_held: int = 0
    leases: dict[str, str] = field(default_factory=dict)  # name -> pool
    peak_slots: dict[str, int] = field(default_factory=dict)
    target: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        core: Any = k8s.CoreV1Api(self.api)
        coord: Any = k8s.CoordinationV1Api(self.api)
        for call, args, kwargs, handle in (
            (core.list_node, (), {"label_selector": FLEET_LABEL}, self._node_raw),
            (coord.list_namespaced_lease, (NAMESPACE,), {}, self._lease_raw),
        ):
            listed = json.loads(call(*args, _preload_content=False, **kwargs).data)
            for item in listed.get("items", []):
                handle("ADDED", item)
            version = listed["metadata"]["resourceVersion"]
            threading.Thread(
                target=self._follow, args=(call, version, handle, *args), kwargs=kwargs, daemon=True
            ).start()

    def _follow(
        self, call: Any, version: str, handle: Callable[[str, dict[str, Any]], None], *args: Any, **kw: Any
    ) -> None:
        while not self.stop.is_set():
            w: Any = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in w.stream(
                    call, *args, resource_version=version, timeout_seconds=60, deserialize=False,
                    allow_watch_bookmarks=True, **kw,
                ):  # fmt: skip
                    raw = event if isinstance(event, dict) else json.loads(event)
                    obj = raw.get("object") or {}
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if raw.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        handle(raw["type"], obj)
            except Exception as exc:  # keep watching; a 410 here would be a bench bug
                if self.stop.is_set():
                    return
                log(f"fleet watch: {exc}")
                time.sleep(1)

    def _node_raw(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        name = meta.get("name", "")
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        taints = (obj.get("spec") or {}).get("taints") or []
        held = keys.ANNOTATION_HOLD in annotations or any(t.get("key") == keys.TAINT_KEY for t in taints)
        state = (labels.get(keys.LABEL_MIG_STATE, ""), annotations.get(keys.ANNOTATION_REASON, ""))
        with self.changed:
            if held and kind != "DELETED":
                self.held.add(name)
            else:
                self.held.discard(name)
            self.peak_held = max(self.peak_held, len(self.held))
            self.state[name] = state
            if (
                self.target
                and name not in self.done_at
                and labels.get(keys.LABEL_MIG_CONFIG) == self.target
                and state[0] in (keys.STATE_SUCCESS, keys.STATE_FAILED)
                and self.target in state[1]
                and not held
            ):
                self.done_at[name] = time.time()
            self.changed.notify_all()

    def _lease_raw(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        labels = meta.get("labels") or {}
        if labels.get("mig-guard.io/rollout") != "slot":
            return
        with self.changed:
            if kind == "DELETED":
                self.leases.pop(meta["name"], None)
            else:
                self.leases[meta["name"]] = labels.get("mig-guard.io/pool", "")
            counts = collections.Counter(self.leases.values())
            for pool, n in counts.items():
                self.peak_slots[pool] = max(self.peak_slots.get(pool, 0), n)

    def reset(self, target: str) -> None:
        with self.changed:
            self.target = target
            self.done_at.clear()
            self.peak_held = len(self.held)
            self.peak_slots = {}

    def wait_all_done(self, timeout: float, alive: Callable[[], None]) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.done_at) < len(self.nodes):
                if time.monotonic() > deadline:
                    return False
                self.changed.wait(timeout=2)
                alive()
        return True


# --- the audit log -------------------------------------------------------------------------------


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def events(self, since: int, until: int | None = None) -> list[dict[str, Any]]:
        with self.path.open("rb") as handle:
            handle.seek(since)
            data = handle.read() if until is None else handle.read(until - since)
        out = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def by_verb(events: Sequence[dict[str, Any]], user: str) -> collections.Counter[str]:
    """Requests by `user`, as "VERB resource[/subresource]" (a watch counted when it starts)."""
    counts: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("user", {}).get("username") != user:
            continue
        verb = event.get("verb", "")
        stage = event.get("stage")
        if (verb == "watch" and stage != "ResponseStarted") or (
            verb != "watch" and stage != "ResponseComplete"
        ):
            continue
        ref = event.get("objectRef") or {}
        what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[f"{verb} {what}"] += 1
    return counts


def write_latencies(events: Sequence[dict[str, Any]], user: str) -> list[float]:
    return [
        rfc3339(e["stageTimestamp"]) - rfc3339(e["requestReceivedTimestamp"])
        for e in events
        if e.get("user", {}).get("username") == user
        and e.get("stage") == "ResponseComplete"
        and e.get("verb") == "patch"
    ]


# --- the push ------------------------------------------------------------------------------------


@dataclass
class PushResult:
    failed_first: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    landed_s: float = 0.0
    attempts: int = 0
    latencies: list[float] = field(default_factory=list)


def push(api: Any, nodes: Sequence[str], config: str) -> PushResult:
    """Server-side apply of the layout label to every node at once (one thread per node, like a
    sync of one commit); failed writes retried 1 s, 2 s, 4 s, ... later until they land."""
    core: Any = k8s.CoreV1Api(api)
    result = PushResult()
    lock = threading.Lock()
    start = time.monotonic()
    barrier = threading.Barrier(len(nodes))

    def apply(name: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {keys.LABEL_MIG_CONFIG: config}},
        }
        delay, first = 1.0, True
        barrier.wait()
        while True:
            t0 = time.monotonic()
            try:
                core.patch_node(
                    name, body, field_manager="argocd-controller", force=True,
                    _content_type="application/apply-patch+yaml",
                )  # fmt: skip
                with lock:
                    result.attempts += 1
                    result.latencies.append(time.monotonic() - t0)
                return
            except ApiException as exc:
                message = (json.loads(exc.body or "{}").get("message") if exc.body else str(exc)) or str(exc)
                with lock:
                    result.attempts += 1
                    result.latencies.append(time.monotonic() - t0)
                    if first:
                        result.failed_first += 1
                        result.errors[_short(message)] += 1
                first = False
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        list(pool.map(apply, nodes))
    result.landed_s = time.monotonic() - start
    return result


def _short(message: str) -> str:
    for marker in ("context deadline exceeded", "Timeout", "connection refused", "i/o timeout"):
        if marker in message:
            return f"...{marker}"
    return message[:120]


# --- one rollout ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    plane: ControlPlane
    webhook: Webhook
    agents: Agents
    nodes: list[str]
    watcher: FleetWatch
    audit: Audit
    gitops: Any


def rollout(fleet: Fleet, target: str, budget: str, timeout: float) -> dict[str, Any]:
    log(f"push: {target} to {len(fleet.nodes)} nodes (budget {budget})")
    fleet.watcher.reset(target)
    audit_from = fleet.audit.offset()
    hook_from = fleet.webhook.offset()
    cpu_before = fleet.webhook.worker_cpu()
    started = time.time()
    pushed = push(fleet.gitops, fleet.nodes, target)
    log(f"push landed in {pushed.landed_s:.1f}s ({pushed.failed_first} first attempts failed)")

    def alive() -> None:
        if fleet.agents.exited():
            pass  # counted below; the fleet may still converge without them

    converged = fleet.watcher.wait_all_done(timeout, alive)
    ended = time.time()
    time.sleep(1.0)  # the audit and webhook logs catch up
    cpu_after = fleet.webhook.worker_cpu()
    events = fleet.audit.events(audit_from)
    admissions, _ = fleet.webhook.admissions(hook_from)
    window = [a for a in admissions if started - 1 <= _when(a) <= started + pushed.landed_s + 1]
    states = collections.Counter(fleet.watcher.state[n][0] for n in fleet.nodes)
    failed = [n for n in fleet.nodes if fleet.watcher.state[n][0] == keys.STATE_FAILED]
    return {
        "budget": budget,
        "push": pushed,
        "converged": converged,
        "converge_s": (max(fleet.watcher.done_at.values()) - started)
        if fleet.watcher.done_at
        else float("nan"),
        "done": len(fleet.watcher.done_at),
        "peak_held": fleet.watcher.peak_held,
        "peak_slots": dict(fleet.watcher.peak_slots),
        "states": dict(states),
        "failed": {n: fleet.watcher.state[n][1] for n in failed[:5]},
        "exited": fleet.agents.exited(),
        "requests": by_verb(events, RECONCILER_USER),
        "write_latencies": write_latencies(events, GITOPS_USER),
        "admissions": len(admissions),
        "admissions_by_endpoint": collections.Counter(a.get("endpoint", "?") for a in admissions),
        "burst_ms": [float(a["ms"]) for a in window if "ms" in a],
        "worker_cpu": {pid: cpu_after.get(pid, 0) - cpu_before.get(pid, 0) for pid in cpu_after},
        "seconds": ended - started,
        "load": load_average(),
    }


def _when(record: dict[str, Any]) -> float:
    for key in ("time", "ts", "timestamp"):
        if key in record:
            value = record[key]
            return float(value) if isinstance(value, int | float) else rfc3339(str(value))
    return 0.0


def report(run: dict[str, Any], nodes: int) -> None:
    pushed: PushResult = run["push"]
    print(f"\n== budget {run['budget']}: {nodes} nodes  ({run['load']})")
    print(
        f"  GitOps writes: {pushed.failed_first} of {nodes} failed without retries"
        + (f" ({', '.join(f'{n}x {m}' for m, n in pushed.errors.most_common(3))})" if pushed.errors else "")
    )
    lat = run["write_latencies"] or pushed.latencies
    print(
        f"  with retries all landed in {pushed.landed_s:.1f}s ({pushed.attempts} attempts); per write "
        f"p50 {percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms (API server)"
    )
    burst = run["burst_ms"]
    print(
        f"  webhook during the burst: {len(burst)} admissions, p50 {percentile(burst, 50):.1f} ms, "
        f"p99 {percentile(burst, 99):.1f} ms; {run['admissions']} admission calls in the rollout "
        f"({', '.join(f'{k} {v}' for k, v in sorted(run['admissions_by_endpoint'].items()))})"
    )
    cpu = ", ".join(f"{v:.1f}s" for v in sorted(run["worker_cpu"].values(), reverse=True))
    print(f"  webhook worker CPU: {cpu}")
    slots = ", ".join(f"{p or '(none)'} {n}" for p, n in run["peak_slots"].items()) or "no slots"
    print(f"  peak held at once: {run['peak_held']} nodes (rollout slots in use at most: {slots})")
    verdict = "converged" if run["converged"] else f"NOT converged ({run['done']} of {nodes} done)"
    print(
        f"  {verdict}: every node reported for the new layout after {run['converge_s']:.1f}s; states {run['states']}"
    )
    if run["failed"]:
        for name, reason in run["failed"].items():
            print(f"    failed {name}: {reason[:200]}")
    print(
        f"  reconcilers exited: {len(run['exited'])}"
        + (f" {dict(list(run['exited'].items())[:3])}" if run["exited"] else "")
    )
    total = sum(run["requests"].values())
    print(f"  reconciler API requests per node change: {total / nodes:.1f}")
    for what, n in run["requests"].most_common():
        print(f"    {what:<40} {n / nodes:6.2f}")


def configure(fleet: Fleet, budget: str) -> None:
    """The webhook and every reconciler as the chart runs them for this budget ("none": no budget,
    the webhook holds at admission)."""
    wanted = None if budget == "none" else RolloutSettings(Budget.parse(budget), NAMESPACE)
    if wanted == fleet.agents.rollout and fleet.webhook.admission_hold == (wanted is None):
        return
    log(f"restarting the webhook and {len(fleet.nodes)} reconcilers for budget {budget}")
    fleet.webhook.hold_at_admission(wanted is None)
    fleet.agents.restart_all(fleet.nodes, wanted)
    time.sleep(15)  # their first reconcile (nothing to do) is not counted as the rollout's


def at_rest(fleet: Fleet, seconds: float) -> None:
    log(f"at rest for {seconds:.0f}s")
    start = fleet.audit.offset()
    time.sleep(seconds)
    counts = by_verb(fleet.audit.events(start), RECONCILER_USER)
    per_hour = 3600 / seconds / len(fleet.nodes)
    watches = sum(n for k, n in counts.items() if k.startswith("watch "))
    requests = sum(counts.values()) - watches
    print(f"\n== at rest ({seconds:.0f}s, {load_average()})")
    print(f"  per reconciler and hour: {requests * per_hour:.1f} requests, {watches * per_hour:.1f} watches")
    for what, n in counts.most_common():
        print(f"    {what:<40} {n * per_hour:8.1f}/h")


# --- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def fleet_up(args: argparse.Namespace, workdir: Path) -> Iterator[Fleet]:
    audit_path = workdir / "audit.log"
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    plane = ControlPlane(
        workdir / "plane",
        extra_apiserver_args=[
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_path}",
            "--audit-log-maxsize=0",
        ],
    )
    (workdir / "plane").mkdir()
    plane.start()
    stack = contextlib.ExitStack()
    stack.callback(plane.stop)
    try:
        plane.start_workloads()
        api = plane.api
        ensure_namespace(api, NAMESPACE)
        config_text = CONFIG_FILE.read_text()
        k8s.CoreV1Api(api).create_namespaced_config_map(
            NAMESPACE, {"metadata": {"name": CONFIGMAP.name}, "data": {CONFIGMAP.key: config_text}}
        )
        reconciler_api = service_account_client(api, NAMESPACE, RECONCILER_SA, RULES, cluster_wide=True)
        service_account_client(api, NAMESPACE, RECONCILER_SA, ROLLOUT_RULES)  # the chart's Role
        token = reconciler_api.configuration.api_key["authorization"]
        webhook = Webhook(plane, workdir, args.webhook_arg)
        stack.callback(webhook.stop)
        webhook.wait_ready()
        webhook.register()
        time.sleep(2)
        names = [f"gpu-{i:03d}" for i in range(args.nodes)]
        log(f"creating {len(names)} kwok GPU nodes")
        for name in names:
            prepare_gpus(workdir / f"{name}-gpus.json", args.gpus, config_text)
            create_gpu_node(
                api, name, PRODUCT, args.gpus, labels={keys.LABEL_MIG_CONFIG: BEFORE, FLEET_LABEL: "true"}
            )
        agents = Agents(args.agents, workdir, plane, token, args.gpus, extra_args=args.reconciler_arg)
        stack.callback(agents.stop)
        watcher = FleetWatch(api, set(names))
        watcher.start()
        stack.callback(watcher.stop.set)
        watcher.reset(BEFORE)
        log(f"starting {len(names)} reconcilers ({args.agents})")
        for name in names:
            agents.start(name)
        if not watcher.wait_all_done(600, lambda: None):
            raise RuntimeError(
                f"the fleet did not settle on {BEFORE}: {collections.Counter(s for s, _ in watcher.state.values())}"
            )
        log("fleet settled")
        gitops = plane.user_client(GITOPS_USER, ["system:masters"])
        yield Fleet(plane, webhook, agents, names, watcher, Audit(audit_path), gitops)
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--budgets", default="none,1,10%")
    parser.add_argument("--agents", choices=("thread", "process"), default="thread")
    parser.add_argument("--rest-seconds", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per rollout")
    parser.add_argument("--webhook-arg", action="append", default=[])
    parser.add_argument("--reconciler-arg", action="append", default=[])
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, filename=None)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # the push client's pool, 200 threads wide
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    log(f"work directory {workdir}; {load_average()}")
    targets = [AFTER, BEFORE]
    failures = 0
    try:
        with fleet_up(args, workdir) as fleet:
            for i, budget in enumerate(b.strip() for b in args.budgets.split(",")):
                configure(fleet, budget)
                run = rollout(fleet, targets[i % 2], budget, args.timeout)
                report(run, len(fleet.nodes))
                failures += (not run["converged"]) + len(run["failed"]) + len(run["exited"])
            if args.rest_seconds > 0:
                at_rest(fleet, args.rest_seconds)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
