"""`mig-guard rollout`: see and steer the rollout budget (reconciler.rollout) from outside.

    mig-guard rollout status -n NS [--pool-label KEY]
    mig-guard rollout pause  -n NS [--reason TEXT]
    mig-guard rollout resume -n NS [--pool VALUE ... | --all-pools]

`pause` stops new starts of MIG changes fleet-wide (changes in flight finish); `resume` lifts the
pause, or with `--pool` forgets the failed changes that stopped that pool (`--all-pools`: every
pool's, and the pause). Each is one write of the rollout's Leases in the release namespace, so
`kubectl` does the same (the waiting nodes' reasons say how); the reconcilers see it through their
watch. Exit codes: 0 done, 1 the API refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

from kube.client import api_client
from migcore import keys

WAITING_REASONS = ("WaitingForRolloutSlot", "RolloutStopped", "RolloutPaused")


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "rollout",
        help="show, pause or resume the rollout of MIG changes (the rollout budget)",
        description=__doc__.split("\n\n")[0],
    )
    actions = parser.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="slots in use, failed changes and waiting nodes per pool")
    pause = actions.add_parser("pause", help="stop new starts of MIG changes on every node")
    resume = actions.add_parser("resume", help="lift the pause, or forget a stopped pool's failed changes")
    for each in (status, pause, resume):
        each.add_argument(
            "-n", "--namespace", required=True, help="the release namespace (where the rollout's Leases live)"
        )
        each.add_argument(
            "--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, then ~/.kube)"
        )
    status.add_argument(
        "--pool-label",
        default=keys.LABEL_GPU_PRODUCT,
        metavar="KEY",
        help="the reconcilers' --rollout-pool-label, to count waiting nodes per pool (default %(default)s)",
    )
    pause.add_argument("--reason", default="", help="shown on every waiting node")
    which = resume.add_mutually_exclusive_group()
    which.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="VALUE",
        help="forget this pool's failed changes (repeatable)",
    )
    which.add_argument(
        "--all-pools", action="store_true", help="forget every pool's failed changes, and lift the pause"
    )
    parser.set_defaults(func=run)


def _who(api: Any) -> str:
    """The caller's user name, as the API server knows it (blank where it cannot say)."""
    try:
        authentication: Any = k8s.AuthenticationV1Api(api)
        review = authentication.create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
        return str(review.status.user_info.username or "")
    except (ApiException, AttributeError):
        return ""


def pause(api: Any, namespace: str, reason: str) -> str:
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": keys.PAUSE_LEASE,
            "namespace": namespace,
            "labels": {keys.LABEL_ROLLOUT: keys.ROLLOUT_PAUSE},
            "annotations": {keys.ANNOTATION_REASON: reason[:1024]},
        },
        # No duration: paused until a human resumes.
        "spec": {"holderIdentity": _who(api)},
    }
    coordination: Any = k8s.CoordinationV1Api(api)
    try:
        coordination.create_namespaced_lease(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        coordination.patch_namespaced_lease(keys.PAUSE_LEASE, namespace, {"metadata": body["metadata"]})
        return "rollouts were paused already (reason updated)"
    return "rollouts paused: no node starts a MIG change until `mig-guard rollout resume`"


def resume(api: Any, namespace: str, pools: list[str], all_pools: bool) -> list[str]:
    coordination: Any = k8s.CoordinationV1Api(api)
    done = []
    if not pools:
        try:
            coordination.delete_namespaced_lease(keys.PAUSE_LEASE, namespace)
            done.append("rollouts resumed (the pause is lifted)")
        except ApiException as exc:
            if exc.status != 404:
                raise
            if not all_pools:
                done.append("rollouts were not paused")
    selectors = (
        [f"{keys.LABEL_ROLLOUT}={keys.ROLLOUT_FAILED}"]
        if all_pools
        else [f"{keys.LABEL_ROLLOUT}={keys.ROLLOUT_FAILED},{keys.LABEL_POOL}={pool}" for pool in pools]
    )
    for selector in selectors:
        failed = coordination.list_namespaced_lease(namespace, label_selector=selector).items
        for lease in failed:
            try:
                coordination.delete_namespaced_lease(lease.metadata.name, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        pool = selector.partition(f"{keys.LABEL_POOL}=")[2]
        where = f"pool {pool}" if pool else "every pool"
        done.append(f"{where}: {len(failed)} failed change(s) forgotten; new starts may go on")
    return done


def status(api: Any, namespace: str, pool_label: str) -> list[str]:
    coordination: Any = k8s.CoordinationV1Api(api)
    core: Any = k8s.CoreV1Api(api)
    leases = coordination.list_namespaced_lease(namespace, label_selector=keys.LABEL_ROLLOUT).items
    active: dict[str, list[str]] = defaultdict(list)
    failed: dict[str, list[str]] = defaultdict(list)
    lines = []
    for lease in leases:
        labels = lease.metadata.labels or {}
        role, pool = labels.get(keys.LABEL_ROLLOUT), labels.get(keys.LABEL_POOL, "")
        holder = lease.spec.holder_identity or "?"
        if role == keys.ROLLOUT_PAUSE:
            why = (lease.metadata.annotations or {}).get(keys.ANNOTATION_REASON, "")
            lines.append(f"rollouts are paused by {holder or 'unknown'}{': ' + why if why else ''}")
        elif role == keys.ROLLOUT_SLOT:
            active[pool].append(holder)
        elif role == keys.ROLLOUT_FAILED:
            annotations = lease.metadata.annotations or {}
            config = annotations.get(keys.ANNOTATION_ROLLOUT_CONFIG, "")
            failed[pool].append(f"{holder} ({config}): {annotations.get(keys.ANNOTATION_REASON, '')}")
    waiting: dict[str, list[str]] = defaultdict(list)
    for node in core.list_node(label_selector=keys.LABEL_MIG_CONFIG).items:
        for condition in (node.status.conditions if node.status else None) or []:
            if condition.type == keys.CONDITION_READY and condition.reason in WAITING_REASONS:
                waiting[(node.metadata.labels or {}).get(pool_label, "")].append(node.metadata.name)
    if not lines:
        lines.append("rollouts are not paused")
    pools = sorted(set(active) | set(failed) | set(waiting))
    if not pools:
        lines.append("no node holds a rollout slot, waits for one, or failed")
    for pool in pools:
        lines.append(
            f"pool {pool or '(no ' + pool_label + ' label)'}: {len(active[pool])} active"
            f"{': ' + ', '.join(sorted(active[pool])) if active[pool] else ''}; {len(waiting[pool])} waiting; "
            f"{len(failed[pool])} failed"
        )
        lines.extend(f"  failed: {line}" for line in sorted(failed[pool]))
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        api = api_client(args.kubeconfig)
        if args.action == "pause":
            lines = [pause(api, args.namespace, args.reason)]
        elif args.action == "resume":
            lines = resume(api, args.namespace, args.pool, args.all_pools)
        else:
            lines = status(api, args.namespace, args.pool_label)
    except ApiException as exc:
        print(
            f"mig-guard rollout {args.action}: the API server refused: {exc.status} {exc.reason}",
            file=sys.stderr,
        )
        return 1
    print("\n".join(lines))
    return 0
