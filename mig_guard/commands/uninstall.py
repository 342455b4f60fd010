"""`mig-guard uninstall`: remove what mig-guard created that Helm does not know about.

Run by the chart's uninstall hooks, or by hand after removing mig-guard some other way:

* ``--webhook-config NAME`` (the pre-delete hook): delete the Validating and Mutating webhook
  configurations first. Otherwise Helm deletes the mig-parted ConfigMap while the API server may
  still send that DELETE to the ConfigMap guard (it drops deleted configurations from its cache
  asynchronously), which denies it while nodes are labelled with a config in it, so the ConfigMap
  would stay behind; and no ``failurePolicy: Fail`` webhook may outlive its pods.
* ``--secret-name NAME`` (post-delete): the serving Secret and ``NAME-ca``, which
  ``mig-guard certs`` created.
* ``--node-keys`` (post-delete): on every Node, mig-guard's labels and annotations
  (``mig-guard.io/*`` and ``nvidia.com/mig.config.state``), its taint, a cordon that its hold
  record says it set, and the ``MIGConfigReady`` condition. The admin's ``nvidia.com/mig.config``
  stays, and so do the GPUs' MIG layout and an admin's own cordon.
* ``--wait-for-pods SELECTOR``: first wait until no pod in ``--namespace`` matches (the reconcilers,
  which would write the keys again while they shut down).

Exit codes: 0 done, 1 the API refused or the wait timed out, 2 usage error.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

from kube.client import api_client
from migcore import keys
from migcore.hold import HoldRecord, decide_release, without_hold_taint

#: Deleted webhook configurations leave the API servers' caches asynchronously (usually well
#: under a second); Helm deletes the ConfigMap only after this hook has ended.
SETTLE_SECONDS = 2.0


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "uninstall",
        help="remove what mig-guard created outside its chart (webhook configurations, Secrets, node keys)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--namespace", help="namespace of the Secrets and of --wait-for-pods")
    parser.add_argument(
        "--webhook-config", action="append", default=[], metavar="NAME", help="delete (repeatable)"
    )
    parser.add_argument("--secret-name", help="delete this Secret and NAME-ca")
    parser.add_argument("--node-keys", action="store_true", help="remove mig-guard's keys from every node")
    parser.add_argument("--wait-for-pods", metavar="SELECTOR", help="first wait until no such pod is left")
    parser.add_argument("--timeout", type=float, default=180.0, metavar="S", help="for --wait-for-pods")
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, then ~/.kube)")
    parser.set_defaults(func=run)


def delete_webhook_configs(api: Any, names: list[str]) -> list[str]:
    adm: Any = k8s.AdmissionregistrationV1Api(api)
    done = []
    for name in names:
        for kind, delete in (
            ("ValidatingWebhookConfiguration", adm.delete_validating_webhook_configuration),
            ("MutatingWebhookConfiguration", adm.delete_mutating_webhook_configuration),
        ):
            try:
                delete(name)
                done.append(f"deleted {kind} {name}")
            except ApiException as exc:
                if exc.status != 404:
                    raise
    return done


def delete_secrets(api: Any, namespace: str, name: str) -> list[str]:
    core: Any = k8s.CoreV1Api(api)
    done = []
    for secret in (name, f"{name}-ca"):
        try:
            core.delete_namespaced_secret(secret, namespace)
            done.append(f"deleted Secret {namespace}/{secret}")
        except ApiException as exc:
            if exc.status != 404:
                raise
    return done


def wait_for_no_pods(api: Any, namespace: str, selector: str, timeout: float) -> None:
    core: Any = k8s.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while core.list_namespaced_pod(namespace, label_selector=selector).items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pods {selector} in {namespace} still there after {timeout:.0f}s")
        time.sleep(1.0)


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def node_cleanup_patch(node: Any) -> list[dict[str, Any]]:
    """The JSON patch that removes mig-guard's keys from ``node`` (empty when there are none),
    guarded by its resourceVersion so a concurrent write makes it fail instead of being undone."""
    ops: list[dict[str, Any]] = []
    meta = node.metadata
    for field, values in (("labels", meta.labels or {}), ("annotations", meta.annotations or {})):
        ops += [
            {"op": "remove", "path": f"/metadata/{field}/{_pointer(k)}"}
            for k in values
            if keys.is_protected_key(k)
        ]
    taints = [
        {k: v for k, v in {"key": t.key, "value": t.value, "effect": t.effect}.items() if v is not None}
        for t in node.spec.taints or []
    ]
    hold = HoldRecord.recorded((meta.annotations or {}).get(keys.ANNOTATION_HOLD))
    release = decide_release(hold, taints, bool(node.spec.unschedulable))  # the reconciler's policy
    if release.untaint:
        ops.append({"op": "replace", "path": "/spec/taints", "value": without_hold_taint(taints)})
    if release.uncordon:
        ops.append({"op": "replace", "path": "/spec/unschedulable", "value": False})
    if not ops:
        return []
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": meta.resource_version}, *ops]


def _retrying(what: str, write: Callable[[], str | None], timeout: float) -> str | None:
    """Run ``write`` until it succeeds. Retried: 409/422 (the node changed under a guarded patch),
    and a refusal by the node-writers ValidatingAdmissionPolicy that Helm has just deleted (the
    API server drops it from its cache asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return write()
        except ApiException as exc:
            if exc.status not in (403, 409, 422) or time.monotonic() > deadline:
                raise
            print(f"{what}: {exc.status} {exc.reason}; retrying", file=sys.stderr)
            time.sleep(1.0)


def clean_nodes(api: Any, timeout: float = 120.0) -> list[str]:
    core: Any = k8s.CoreV1Api(api)
    done: list[str] = []

    def metadata(name: str) -> str | None:
        patch = node_cleanup_patch(core.read_node(name))
        if not patch:
            return None
        core.patch_node(name, patch)
        return f"node {name}: removed {len(patch) - 1} mig-guard keys"

    def condition(name: str) -> str | None:
        for index, cond in enumerate(core.read_node(name).status.conditions or []):
            if cond.type == keys.CONDITION_READY:
                core.patch_node_status(
                    name,
                    [
                        {
                            "op": "test",
                            "path": f"/status/conditions/{index}/type",
                            "value": keys.CONDITION_READY,
                        },
                        {"op": "remove", "path": f"/status/conditions/{index}"},
                    ],
                )
                return f"node {name}: removed condition {keys.CONDITION_READY}"
        return None

    for listed in core.list_node().items:
        name = listed.metadata.name
        for step in (metadata, condition):
            line = _retrying(f"node {name}", functools.partial(step, name), timeout)
            if line:
                done.append(line)
    return done


def run(args: argparse.Namespace) -> int:
    if (args.secret_name or args.wait_for_pods) and not args.namespace:
        print("mig-guard uninstall: --secret-name and --wait-for-pods need --namespace", file=sys.stderr)
        return 2
    if not (args.webhook_config or args.secret_name or args.node_keys):
        print(
            "mig-guard uninstall: nothing to do (give --webhook-config, --secret-name or --node-keys)",
            file=sys.stderr,
        )
        return 2
    try:
        api = api_client(args.kubeconfig)
        done = delete_webhook_configs(api, args.webhook_config)
        if args.webhook_config:
            time.sleep(SETTLE_SECONDS)
        if args.wait_for_pods:
            wait_for_no_pods(api, args.namespace, args.wait_for_pods, args.timeout)
        if args.secret_name:
            done += delete_secrets(api, args.namespace, args.secret_name)
        if args.node_keys:
            done += clean_nodes(api)
    except ApiException as exc:
        print(f"mig-guard uninstall: Kubernetes API refused: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"mig-guard uninstall: {exc}", file=sys.stderr)
        return 1
    for line in done or ["nothing left to remove"]:
        print(line)
    return 0
