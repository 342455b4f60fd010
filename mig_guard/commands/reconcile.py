"""`mig-guard reconcile`: the node agent (one per GPU node, as a DaemonSet).

Wires the parts of `reconciler` together: the GPU backend, the config source, the progress
store, metrics/health, and runs the level-triggered loop until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from migcore.hold import HoldMode
from reconciler.api_retry import RetryPolicy, retrying
from reconciler.config_source import DEFAULT_KEY, ConfigMapConfigSource, ConfigSource, FileConfigSource
from reconciler.gpu_backend import make_gpu_access
from reconciler.loop import Reconciler, Settings
from reconciler.metrics import Metrics, serve
from reconciler.node_state import NodeState
from reconciler.progress import FileProgressStore, NodeProgressStore, ProgressStore
from reconciler.workloads import DEFAULT_GPU_RESOURCES, DEFAULT_SOCKET


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "reconcile", help="run the node agent: apply nvidia.com/mig.config to this node's GPUs"
    )
    parser.add_argument("--node-name", required=True, help="the Node this agent runs on")
    parser.add_argument("--gpu-backend", choices=("nvml", "simulated"), default="nvml")
    simulated = parser.add_mutually_exclusive_group()
    simulated.add_argument(
        "--simulated-gpus", metavar="LABEL:N[,LABEL:N]", help="e.g. NVIDIA-A100-SXM4-40GB:8"
    )
    simulated.add_argument(
        "--simulated-gpu-spec",
        metavar="FILE:N[,FILE:N]",
        help="GPUs from driver-table files (mig-guard hardware --json output), e.g. x100.json:8",
    )
    parser.add_argument("--simulated-state-file", metavar="F", help="keep the simulated GPUs' state in F")
    parser.add_argument(
        "--simulated-faults",
        metavar="SPEC",
        help="e.g. nvmlDeviceCreateGpuInstanceWithPlacement@3=InsufficientResources",
    )
    parser.add_argument(
        "--simulated-latency", metavar="SPEC", help="e.g. default=0.002,nvmlDeviceSetMigMode=0.5"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--configmap", metavar="NAMESPACE/NAME", help="the mig-parted config ConfigMap (watched)"
    )
    source.add_argument("--mig-config-file", metavar="F", help="the mig-parted config file (polled)")
    parser.add_argument(
        "--configmap-key", default=DEFAULT_KEY, help=f"key in the ConfigMap (default {DEFAULT_KEY})"
    )
    parser.add_argument("--kubeconfig", metavar="F", help="default: in-cluster config, else ~/.kube/config")
    parser.add_argument(
        "--hold",
        choices=[m.value for m in HoldMode],
        default=HoldMode.TAINT.value,
        help="how to keep pods off during a change",
    )
    parser.add_argument("--podresources-socket", default=DEFAULT_SOCKET, metavar="PATH")
    parser.add_argument(
        "--operands-namespace", default="gpu-operator", help="namespace of the GPU Operator's operands"
    )
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve /metrics and /healthz there")
    parser.add_argument("--resync-seconds", type=float, default=300.0)
    parser.add_argument("--eviction-timeout", type=float, default=300.0, metavar="S")
    parser.add_argument("--operand-timeout", type=float, default=300.0, metavar="S")
    parser.add_argument(
        "--busy-gpu-timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for compute processes on changing GPUs to end (default 0: fail at once)",
    )
    parser.add_argument(
        "--reboot-enabled", action="store_true", help="reboot the host once when a MIG mode change needs it"
    )
    parser.add_argument(
        "--gpu-resource",
        action="append",
        default=[],
        metavar="PATTERN",
        help="an extended resource that means a GPU (shell pattern, repeatable), besides "
        + ", ".join(DEFAULT_GPU_RESOURCES),
    )
    parser.add_argument(
        "--api-retry-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="retry a Kubernetes API request that failed transiently (5xx, 429, timeout) for up to S seconds",
    )
    parser.add_argument(
        "--host-state-dir", metavar="DIR", help="persist progress there instead of in a Node annotation"
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=run)


def _api_client(kubeconfig: str | None) -> Any:
    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


def _listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics-listen {spec!r}: expected HOST:PORT")
    return host or "0.0.0.0", int(port)  # noqa: S104 - a DaemonSet's metrics port is scraped from outside


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        access = make_gpu_access(
            args.gpu_backend,
            simulated_gpus=args.simulated_gpus,
            simulated_gpu_spec=args.simulated_gpu_spec,
            state_file=args.simulated_state_file,
            faults=args.simulated_faults,
            latency=args.simulated_latency,
        )
        listen = _listen(args.metrics_listen) if args.metrics_listen else None
    except ValueError as exc:
        print(f"mig-guard reconcile: {exc}", file=sys.stderr)
        return 2
    # One client for everything, retrying transient API errors (reconciler.api_retry).
    api = retrying(_api_client(args.kubeconfig), RetryPolicy(budget=args.api_retry_seconds))
    source: ConfigSource
    if args.configmap:
        namespace, sep, name = args.configmap.partition("/")
        if not sep or not namespace or not name:
            print("mig-guard reconcile: --configmap expects NAMESPACE/NAME", file=sys.stderr)
            return 2
        source = ConfigMapConfigSource(api, namespace, name, args.configmap_key)
    else:
        source = FileConfigSource(args.mig_config_file)
    settings = Settings(
        node_name=args.node_name,
        hold_mode=HoldMode(args.hold),
        operands_namespace=args.operands_namespace,
        operand_timeout=args.operand_timeout,
        eviction_timeout=args.eviction_timeout,
        resync_seconds=args.resync_seconds,
        reboot_enabled=args.reboot_enabled,
        busy_gpu_timeout=args.busy_gpu_timeout,
        podresources_socket=args.podresources_socket,
        gpu_resources=tuple(args.gpu_resource),
        api_retry_seconds=args.api_retry_seconds,
    )
    metrics = Metrics()
    store: ProgressStore = (
        FileProgressStore(args.host_state_dir)
        if args.host_state_dir
        else NodeProgressStore(NodeState(api, args.node_name))
    )
    reconciler = Reconciler(api, access, source, settings, metrics=metrics, store=store)
    if listen is not None:
        server = serve(metrics, listen[0], listen[1], reconciler.healthy)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", *server.server_address[:2])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reconciler.run(stop)
    return 0
