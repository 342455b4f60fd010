"""Flag types the commands share, so that `webhook` and `reconcile` parse them one way: a listen
address, a log level (either case), the hold mode, a ConfigMap reference."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kube.config_source import ConfigMapRef
from migcore import keys
from migcore.hold import HoldMode

LOG_LEVELS = ("debug", "info", "warning", "error")
ANY_HOST = "0.0.0.0"  # noqa: S104 - a pod's ports are reached through its Service or the node's IP
DEFAULT_CONFIGMAP = f"{keys.GPU_OPERATOR_NAMESPACE}/{keys.DEFAULT_MIG_PARTED_CONFIGMAP}"


def listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8443` for IPv6; an empty host listens on every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or ANY_HOST, int(port)


def log_level(text: str) -> str:
    """One of LOG_LEVELS, in lower case (INFO and info alike)."""
    level = text.lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def python_log_level(level: str) -> int:
    """The `logging` level for a LOG_LEVELS name."""
    return int(getattr(logging, level.upper()))


def add_hold(parser: argparse.ArgumentParser) -> None:
    """`--hold taint|cordon` (read it with `HoldMode(args.hold)`)."""
    parser.add_argument(
        "--hold",
        choices=[m.value for m in HoldMode],
        default=HoldMode.TAINT.value,
        help="how to keep new pods off the node while its GPUs change (default %(default)s)",
    )


def add_log_level(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=default,
        metavar="|".join(LOG_LEVELS),
        help=f"default {default}",
    )


def add_configmap(parser: argparse.ArgumentParser, group: Any, default: str | None) -> None:
    """`--configmap NAMESPACE/NAME` (in `group`, beside `--mig-config-file`) and `--configmap-key`."""
    group.add_argument(
        "--configmap",
        default=default,
        metavar="NAMESPACE/NAME",
        help="the mig-parted ConfigMap, watched" + (" (default %(default)s)" if default else ""),
    )
    parser.add_argument(
        "--configmap-key",
        default=keys.MIG_PARTED_CONFIG_KEY,
        metavar="KEY",
        help="its key holding the config (default %(default)s)",
    )


def configmap_ref(args: argparse.Namespace) -> ConfigMapRef:
    """The ConfigMap `--configmap` and `--configmap-key` name; ValueError when malformed."""
    try:
        return ConfigMapRef.parse(args.configmap, args.configmap_key)
    except ValueError as exc:
        raise ValueError(f"--configmap: {exc}") from exc


def add_simulated_gpus(parser: argparse.ArgumentParser, note: str = "") -> None:
    """`--simulated-gpus` or `--simulated-gpu-spec` (one at most): simulated GPUs instead of NVML,
    as `reconciler.gpu_backend.make_gpu_access` reads them; `note` ends both helps."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--simulated-gpus",
        metavar="LABEL:N[,LABEL:N]",
        help=f"simulated catalog GPUs instead of NVML, e.g. NVIDIA-A100-SXM4-40GB:8{note}",
    )
    group.add_argument(
        "--simulated-gpu-spec",
        metavar="FILE:N[,FILE:N]",
        help=f"simulated GPUs from driver-table files (mig-guard hardware --json output), e.g. x100.json:8{note}",
    )
