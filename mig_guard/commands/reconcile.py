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

from kube.client import RetryPolicy, api_client, retrying
from kube.config_source import ConfigMapFeed, ConfigSource, FileFeed
from mig_guard.commands import flags
from migcore import keys
from migcore.catalog import load_catalog
from migcore.hold import HoldMode
from reconciler.cdi import DEFAULT_TOOLKIT_DIR, CdiMode
from reconciler.change import ProgressStore
from reconciler.driver import DEFAULT_READY_FILE
from reconciler.gpu_backend import make_gpu_access
from reconciler.host import DEFAULT_HOST_ROOT
from reconciler.host_clients import DEFAULT_CLIENTS_CONFIGMAP, DEFAULT_KUBELET_SERVICE, HostClientsMode
from reconciler.loop import Reconciler, Settings
from reconciler.metrics import Metrics, serve
from reconciler.node_state import NodeState
from reconciler.operands import AUTO_NAMESPACE
from reconciler.progress import FileProgressStore, NodeProgressStore
from reconciler.rollout import Budget, RolloutSettings
from reconciler.workloads import DEFAULT_GPU_RESOURCES, DEFAULT_SOCKET


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "reconcile", help="run the node agent: apply nvidia.com/mig.config to this node's GPUs"
    )
    parser.add_argument("--node-name", required=True, help="the Node this agent runs on")
    parser.add_argument("--gpu-backend", choices=("nvml", "simulated"), default="nvml")
    flags.add_simulated_gpus(parser, note=" (with --gpu-backend simulated)")
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
    flags.add_configmap(parser, source, default=None)
    source.add_argument("--mig-config-file", metavar="F", help="the mig-parted config file (polled)")
    parser.add_argument("--kubeconfig", metavar="F", help="default: in-cluster config, else ~/.kube/config")
    flags.add_hold(parser)
    parser.add_argument("--podresources-socket", default=DEFAULT_SOCKET, metavar="PATH")
    parser.add_argument(
        "--operands-namespace",
        default=AUTO_NAMESPACE,
        help=f"namespace of the GPU Operator's operands and validators (default {AUTO_NAMESPACE}: where the "
        f"operator's DaemonSets are, else {keys.GPU_OPERATOR_NAMESPACE})",
    )
    parser.add_argument(
        "--default-mig-config",
        default="",
        metavar="NAME",
        help="give a MIG-capable node without nvidia.com/mig.config this layout (as the GPU Operator "
        "labels such nodes all-disabled; the webhook needs the same flag; default: none)",
    )
    host = parser.add_argument_group("the host and the GPU Operator's node components")
    host.add_argument(
        "--driver-ready-file",
        default="",
        metavar="PATH",
        help=f"wait for this file before the first NVML call (the GPU Operator's: {DEFAULT_READY_FILE}; "
        "default: no wait)",
    )
    host.add_argument(
        "--driver-root",
        default="",
        metavar="DIR",
        help="the driver container's root, mounted here: NVML is loaded from it when the container "
        "runtime did not provide it (--gpu-backend nvml)",
    )
    host.add_argument(
        "--host-root",
        default=DEFAULT_HOST_ROOT,
        metavar="DIR",
        help="the host's / in this container; host commands run chrooted there (default %(default)s)",
    )
    host.add_argument(
        "--cdi",
        choices=[m.value for m in CdiMode],
        default=CdiMode.AUTO.value,
        help="after each change, create the MIG device nodes and the management CDI spec (auto: when the "
        "node has an NVIDIA CDI spec; default %(default)s)",
    )
    host.add_argument(
        "--toolkit-dir",
        default=DEFAULT_TOOLKIT_DIR,
        metavar="DIR",
        help="the NVIDIA Container Toolkit's directory on the host (nvidia-ctk, nvidia-cdi-hook; default "
        "%(default)s, else nvidia-ctk on the host's PATH)",
    )
    host.add_argument(
        "--host-gpu-clients",
        choices=[m.value for m in HostClientsMode],
        default=HostClientsMode.AUTO.value,
        help="stop the host's GPU clients (systemd units) during a change (auto: when the driver marker says "
        "the driver is installed on the host; default %(default)s)",
    )
    clients = host.add_mutually_exclusive_group()
    clients.add_argument(
        "--gpu-clients-configmap",
        default=DEFAULT_CLIENTS_CONFIGMAP,
        metavar="NAME",
        help="the GPU Operator's clients ConfigMap in the operands' namespace (key clients.yaml; "
        "default %(default)s)",
    )
    clients.add_argument("--gpu-clients-file", metavar="F", help="the clients list in a file instead")
    host.add_argument(
        "--kubelet-service",
        default=DEFAULT_KUBELET_SERVICE,
        metavar="UNIT",
        help="also stopped on a MIG mode change with host GPU clients on ('' never; default %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=flags.listen_address,
        metavar="HOST:PORT",
        help="serve /metrics and /healthz there",
    )
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
        "--usage-interval",
        type=float,
        default=Settings.usage_interval,
        metavar="S",
        help="write which pods use which GPU (mig-guard.io/usage) at most once per S seconds while "
        "pods come and go (default %(default)s)",
    )
    parser.add_argument(
        "--host-state-dir", metavar="DIR", help="persist progress there instead of in a Node annotation"
    )
    rollout = parser.add_argument_group(
        "rollout budget", "at most N nodes (or N% of a pool) change at once, coordinated through Leases"
    )
    rollout.add_argument(
        "--rollout-budget",
        metavar="N|N%",
        help="nodes of a pool that may change at the same time, e.g. 1 or 10%% (of the pool, rounded down, "
        "at least 1); default: no budget, every change starts at once",
    )
    rollout.add_argument(
        "--rollout-namespace", metavar="NS", help="where the rollout's Leases live (the release namespace)"
    )
    rollout.add_argument(
        "--rollout-pool-label",
        default=keys.LABEL_GPU_PRODUCT,
        metavar="KEY",
        help="nodes with the same value of this label form a pool (default %(default)s)",
    )
    rollout.add_argument(
        "--rollout-failure-limit",
        type=int,
        default=RolloutSettings.failure_limit,
        metavar="F",
        help="failed changes in a pool that stop new starts there until resumed (0: never; default %(default)s)",
    )
    rollout.add_argument(
        "--rollout-lease-seconds",
        type=int,
        default=RolloutSettings.lease_seconds,
        metavar="S",
        help="a slot whose holder stops renewing it frees after S seconds (default %(default)s)",
    )
    flags.add_log_level(parser)
    parser.set_defaults(func=run)


def rollout_settings(args: argparse.Namespace) -> RolloutSettings | None:
    """The rollout budget the flags ask for (None: none); ValueError saying what is wrong."""
    if not args.rollout_budget:
        return None
    if not args.rollout_namespace:
        raise ValueError("--rollout-budget needs --rollout-namespace (where the rollout's Leases live)")
    if args.rollout_failure_limit < 0:
        raise ValueError("--rollout-failure-limit: 0 (never stop) or more")
    if args.rollout_lease_seconds < 3:
        raise ValueError("--rollout-lease-seconds: at least 3")
    return RolloutSettings(
        budget=Budget.parse(args.rollout_budget),
        namespace=args.rollout_namespace,
        pool_label=args.rollout_pool_label,
        lease_seconds=args.rollout_lease_seconds,
        failure_limit=args.rollout_failure_limit,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=flags.python_log_level(args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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
        ref = flags.configmap_ref(args) if args.configmap else None
        rollout = rollout_settings(args)
    except ValueError as exc:
        print(f"mig-guard reconcile: {exc}", file=sys.stderr)
        return 2
    # One client for everything, retrying transient API errors (kube.client).
    api = retrying(api_client(args.kubeconfig), RetryPolicy(budget=args.api_retry_seconds))
    catalog = load_catalog()
    feed = ConfigMapFeed(api, ref) if ref is not None else FileFeed(args.mig_config_file)
    source = ConfigSource(feed, catalog)
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
        usage_interval=args.usage_interval,
        driver_ready_file=args.driver_ready_file,
        driver_root=args.driver_root if args.gpu_backend == "nvml" else "",
        host_root=args.host_root,
        host_state_dir=args.host_state_dir or "",
        cdi=CdiMode(args.cdi),
        toolkit_dir=args.toolkit_dir,
        host_clients=HostClientsMode(args.host_gpu_clients),
        gpu_clients_file=args.gpu_clients_file or "",
        gpu_clients_configmap=args.gpu_clients_configmap,
        kubelet_service=args.kubelet_service,
        default_config=args.default_mig_config,
        rollout=rollout,
    )
    metrics = Metrics()
    store: ProgressStore = (
        FileProgressStore(args.host_state_dir)
        if args.host_state_dir
        else NodeProgressStore(NodeState(api, args.node_name))
    )
    reconciler = Reconciler(api, access, source, settings, metrics=metrics, store=store, catalog=catalog)
    if args.metrics_listen is not None:
        host, port = args.metrics_listen
        server = serve(metrics, host, port, reconciler.healthy)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", *server.server_address[:2])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reconciler.run(stop)
    return 0
