"""`mig-guard webhook`: serve the admission webhook (gunicorn over TLS).

    mig-guard webhook --listen HOST:PORT --tls-cert-file F --tls-key-file F
        [--mig-config-file F | --configmap NAMESPACE/NAME] [--configmap-key KEY]
        [--reconciler-user USER ...] [--allow-unbound-reconciler-tokens] [--workers N] [--kubeconfig F]
        [--hold taint|cordon] [--configmap-guard deny|warn]

With --mig-config-file a Node in an AdmissionReview is judged from the request alone: no
API server is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from migcore.config import ConfigError, load_config_file
from migcore.hold import HoldMode
from webhook.config_source import (
    DEFAULT_CONFIGMAP_KEY,
    DEFAULT_CONFIGMAP_NAME,
    DEFAULT_CONFIGMAP_NAMESPACE,
    ConfigMapRef,
)
from webhook.configmap_guard import GuardMode
from webhook.settings import WebhookSettings


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "webhook",
        help="serve the admission webhook",
        description="Serve the admission webhook (validates and mutates Node changes of nvidia.com/mig.config).",
    )
    parser.add_argument("--listen", type=_listen, default=("0.0.0.0", 8443), metavar="HOST:PORT")  # noqa: S104
    parser.add_argument("--tls-cert-file", type=Path, required=True, metavar="FILE")
    parser.add_argument("--tls-key-file", type=Path, required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mig-config-file", type=Path, metavar="FILE", help="a local mig-parted config.yaml")
    source.add_argument(
        "--configmap",
        default=f"{DEFAULT_CONFIGMAP_NAMESPACE}/{DEFAULT_CONFIGMAP_NAME}",
        metavar="NAMESPACE/NAME",
        help="the mig-parted ConfigMap to watch (default %(default)s)",
    )
    parser.add_argument("--configmap-key", default=DEFAULT_CONFIGMAP_KEY, metavar="KEY")
    parser.add_argument(
        "--reconciler-user",
        action="append",
        default=[],
        metavar="USER",
        help="user allowed to change nvidia.com/mig.config.state and mig-guard.io/* on the node its token "
        "is bound to (repeatable)",
    )
    parser.add_argument(
        "--allow-unbound-reconciler-tokens",
        action="store_true",
        help="also accept reconciler writes with tokens that name no node (clusters before Kubernetes 1.30, "
        "where pod-bound tokens carry no node name); any node may then be written by any reconciler",
    )
    parser.add_argument("--workers", type=_positive, default=2)
    parser.add_argument(
        "--threads",
        type=_positive,
        default=4,
        help="request threads per worker (default 4: kept-alive connections need no thread, but a client "
        "that stalls holds one until --read-timeout; measured in bench/bench_webhook.py)",
    )
    parser.add_argument(
        "--read-timeout",
        type=_positive,
        default=5,
        metavar="SECONDS",
        help="close a connection whose client sends nothing for this long (TLS handshake, headers, body)",
    )
    parser.add_argument(
        "--health-port",
        type=_positive,
        metavar="PORT",
        help="also serve /healthz, /readyz and /metrics on this port (TLS), apart from admission",
    )
    parser.add_argument("--kubeconfig", type=Path, metavar="FILE")
    parser.add_argument("--hold", choices=[m.value for m in HoldMode], default=HoldMode.TAINT.value)
    parser.add_argument(
        "--configmap-guard", choices=[m.value for m in GuardMode], default=GuardMode.DENY.value
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # benchmark baseline
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> WebhookSettings:
    host, port = args.listen
    return WebhookSettings(
        host=host,
        port=port,
        cert_file=args.tls_cert_file,
        key_file=args.tls_key_file,
        mig_config_file=args.mig_config_file,
        configmap=ConfigMapRef.parse(args.configmap, args.configmap_key),
        reconciler_users=tuple(args.reconciler_user),
        allow_unbound_reconciler_tokens=args.allow_unbound_reconciler_tokens,
        kubeconfig=args.kubeconfig,
        hold=HoldMode(args.hold),
        configmap_guard=GuardMode(args.configmap_guard),
        workers=args.workers,
        threads=args.threads,
        read_timeout=float(args.read_timeout),
        health_port=args.health_port,
        log_level=args.log_level,
        floor=args.floor,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"mig-guard webhook: {exc}", file=sys.stderr)
        return 2
    for path in (settings.cert_file, settings.key_file, settings.mig_config_file):
        if path is not None and not path.is_file():
            print(f"mig-guard webhook: {path}: no such file", file=sys.stderr)
            return 2
    if settings.mig_config_file is not None:
        try:
            load_config_file(settings.mig_config_file)
        except ConfigError as exc:
            print(
                f"mig-guard webhook: {settings.mig_config_file} is not a usable mig-parted config:",
                file=sys.stderr,
            )
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            return 2
    else:
        from webhook.kube_api import core_v1  # noqa: PLC0415 - the Kubernetes client loads only when needed

        try:
            core_v1(settings.kubeconfig)  # fail here, not in every worker, without API access
        except Exception as exc:  # the client raises several types for a missing or bad kubeconfig
            print(
                f"mig-guard webhook: no Kubernetes API access to watch {settings.configmap}: {exc}",
                file=sys.stderr,
            )
            return 2
    from webhook.server import serve  # noqa: PLC0415 - gunicorn and Flask load only for this command

    return serve(settings)
