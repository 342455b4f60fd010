"""`mig-guard webhook`: serve the admission webhook (gunicorn over TLS).

    mig-guard webhook --listen HOST:PORT --tls-cert-file F --tls-key-file F
        [--mig-config-file F | --configmap NAMESPACE/NAME] [--configmap-key KEY]
        [--reconciler-user USER ...] [--allow-unbound-reconciler-tokens] [--workers N] [--kubeconfig F]
        [--hold taint|cordon] [--no-admission-hold] [--configmap-guard deny|warn]

With --mig-config-file a Node in an AdmissionReview is judged from the request alone: no
API server is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mig_guard.commands import flags
from migcore.catalog import load_catalog
from migcore.config import ConfigError, load_config_file
from migcore.hold import HoldMode
from webhook.configmap_guard import GuardMode
from webhook.settings import WebhookSettings


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
    parser.add_argument(
        "--listen", type=flags.listen_address, default=(flags.ANY_HOST, 8443), metavar="HOST:PORT"
    )
    parser.add_argument("--tls-cert-file", type=Path, required=True, metavar="FILE")
    parser.add_argument("--tls-key-file", type=Path, required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mig-config-file", type=Path, metavar="FILE", help="a local mig-parted config.yaml")
    flags.add_configmap(parser, source, default=flags.DEFAULT_CONFIGMAP)
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
    parser.add_argument(
        "--default-mig-config",
        default="",
        metavar="NAME",
        help="the one layout a reconciler may set on a node that has no nvidia.com/mig.config (the "
        "reconciler's --default-mig-config; default: none)",
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
    flags.add_hold(parser)
    parser.add_argument(
        "--no-admission-hold",
        dest="admission_hold",
        action="store_false",
        help="accept a layout change without holding the node (state pending only): with a rollout budget "
        "the reconciler holds it when its turn comes",
    )
    parser.add_argument(
        "--configmap-guard", choices=[m.value for m in GuardMode], default=GuardMode.DENY.value
    )
    flags.add_log_level(parser)
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
        configmap=flags.configmap_ref(args),
        reconciler_users=tuple(args.reconciler_user),
        allow_unbound_reconciler_tokens=args.allow_unbound_reconciler_tokens,
        default_mig_config=args.default_mig_config,
        kubeconfig=args.kubeconfig,
        hold=HoldMode(args.hold),
        admission_hold=args.admission_hold,
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
            load_config_file(settings.mig_config_file, load_catalog())
        except ConfigError as exc:
            print(
                f"mig-guard webhook: {settings.mig_config_file} is not a usable mig-parted config:",
                file=sys.stderr,
            )
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            return 2
    else:
        from kube.client import api_client  # noqa: PLC0415 - the Kubernetes client loads only when needed

        try:
            api_client(settings.kubeconfig)  # fail here, not in every worker, without API access
        except Exception as exc:  # the client raises several types for a missing or bad kubeconfig
            print(
                f"mig-guard webhook: no Kubernetes API access to watch {settings.configmap}: {exc}",
                file=sys.stderr,
            )
            return 2
    from webhook.server import serve  # noqa: PLC0415 - gunicorn and Flask load only for this command

    return serve(settings)
