"""`mig-guard certs`: create or rotate the webhook's TLS material and patch the caBundles.

Run by the chart's hook Jobs (install/upgrade) and renewal CronJob; also useful locally with
``--kubeconfig`` and ``--write-dir``. Prints fingerprints and dates only, never key material.
Exit codes: 0 done, 1 the API refused or a configuration is missing, 2 usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Any

from kubernetes.client import ApiException

from certs.authority import KeySpec, KeyType
from certs.ca_bundle import CABundleError, CABundlePatcher
from certs.provision import ProvisionError, Request, describe, provision, write_files
from certs.rotation import Policy
from certs.secret_store import SecretStore, SecretStoreError
from kube.client import api_client


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "certs",
        help="create/rotate the webhook's CA and serving certificate, store them, patch caBundles",
        description="Create or rotate the webhook's TLS material (kept in Secrets) and patch the "
        "caBundle of the webhook configurations. The CA stays the same across runs until it nears expiry.",
    )
    parser.add_argument("--namespace", required=True, help="namespace of the Secrets and the Service")
    parser.add_argument("--secret-name", required=True, help="serving Secret; the CA goes to <name>-ca")
    parser.add_argument("--service-name", required=True, help="webhook Service (its DNS names become SANs)")
    parser.add_argument(
        "--webhook-config",
        action="append",
        default=[],
        metavar="NAME",
        help="Validating and Mutating webhook configurations of this name get the caBundle (repeatable)",
    )
    parser.add_argument(
        "--allow-missing-webhook-configs",
        action="store_true",
        help="do not fail when a --webhook-config does not exist yet (the pre-install run)",
    )
    parser.add_argument("--validity-days", type=int, default=365, help="serving certificate lifetime")
    parser.add_argument("--renew-before-days", type=int, default=30, help="renew the serving cert this early")
    parser.add_argument("--ca-validity-days", type=int, default=3650, help="CA lifetime")
    parser.add_argument("--ca-renew-before-days", type=int, default=365, help="renew the CA this early")
    parser.add_argument(
        "--key-type", choices=[k.value for k in KeyType], default=KeyType.ECDSA_P256.value, help="leaf key"
    )
    parser.add_argument("--rsa-bits", type=int, default=2048, help="RSA key size (>= 2048)")
    parser.add_argument(
        "--extra-san", action="append", default=[], metavar="NAME", help="extra DNS name or IP (repeatable)"
    )
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, then ~/.kube)")
    parser.add_argument("--write-dir", type=Path, help="also write tls.crt, tls.key and ca.crt here")
    parser.set_defaults(func=run)


def request_from_args(args: argparse.Namespace) -> Request:
    """The provisioning request the flags describe; ValueError for inconsistent lifetimes."""
    days = dt.timedelta(days=1)
    policy = Policy(
        leaf_validity=args.validity_days * days,
        leaf_renew_before=args.renew_before_days * days,
        ca_validity=args.ca_validity_days * days,
        ca_renew_before=args.ca_renew_before_days * days,
    )
    return Request(
        namespace=args.namespace,
        secret_name=args.secret_name,
        service_name=args.service_name,
        extra_sans=tuple(args.extra_san),
        webhook_configs=tuple(args.webhook_config),
        allow_missing_webhook_configs=args.allow_missing_webhook_configs,
        policy=policy,
        key_spec=KeySpec(KeyType(args.key_type), args.rsa_bits),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        request = request_from_args(args)
    except ValueError as exc:
        print(f"mig-guard certs: {exc}", file=sys.stderr)
        return 2
    try:
        client = api_client(args.kubeconfig)
        outcome = provision(request, SecretStore(client, request.namespace), CABundlePatcher(client))
    except (ProvisionError, SecretStoreError, CABundleError) as exc:
        print(f"mig-guard certs: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        print(f"mig-guard certs: Kubernetes API refused: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    for line in describe(outcome):
        print(line)
    if args.write_dir is not None:
        for path in write_files(args.write_dir, outcome):
            print(f"wrote {path}")
    return 0
