"""The real `mig-guard webhook` deployed on the session's kube-apiserver for end-to-end tests:
registered with the canonical configurations of `webhook.registration`, scoped to the nodes of
one test module by an objectSelector on a test label (so nodes of other tests never reach it),
and always unregistered at teardown."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from webhook_harness import WebhookProcess

from devcluster.helpers import create_gpu_node, delete_webhook, ensure_namespace, register_webhook
from devcluster.pytest_plugin import KubectlRunner
from migcore import keys
from webhook import registration
from webhook.config_source import ConfigMapRef

NAMESPACE = "mig-guard-e2e"
CONFIGMAP = ConfigMapRef(NAMESPACE, "mig-parted-config")
CONFIGMAP_WARN = ConfigMapRef(NAMESPACE, "mig-parted-config-warn")
SCOPE_LABEL = "mig-guard.test/webhook"
RECONCILER_SA = "reconciler"
RECONCILER_USER = f"system:serviceaccount:{NAMESPACE}:{RECONCILER_SA}"
NODE_RULES = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch", "update"]}]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Deployment:
    """A running webhook server plus its registrations, scoped to nodes labelled SCOPE_LABEL=scope."""

    def __init__(self, api: Any, process: WebhookProcess, scope: str, guard: ConfigMapRef | None) -> None:
        self.api = api
        self.process = process
        self.scope = scope
        self.names = [f"mig-guard-e2e-{scope}-validate", f"mig-guard-e2e-{scope}-mutate"]
        selector = {"matchLabels": {SCOPE_LABEL: scope}}
        common = {"ca_bundle_pem": process.authority.pem, "timeout_seconds": 5, "object_selector": selector}
        register_webhook(
            api,
            "validating",
            self.names[0],
            process.url(registration.VALIDATE_PATH),
            rules=registration.NODE_RULES,
            match_conditions=registration.node_match_conditions(),
            webhook_name=registration.NODE_VALIDATOR,
            **common,
        )
        register_webhook(
            api,
            "mutating",
            self.names[1],
            process.url(registration.MUTATE_PATH),
            rules=registration.NODE_RULES,
            match_conditions=registration.node_match_conditions(),
            reinvocation_policy="IfNeeded",
            webhook_name=registration.NODE_MUTATOR,
            **common,
        )
        if guard is not None:
            self.names.append(f"mig-guard-e2e-{scope}-configmap")
            register_webhook(
                api,
                "validating",
                self.names[2],
                process.url(registration.VALIDATE_PATH),
                process.authority.pem,
                rules=registration.CONFIGMAP_RULES,
                match_conditions=registration.configmap_match_conditions(guard),
                webhook_name=registration.CONFIGMAP_GUARD,
            )

    def node(self, prefix: str, **kwargs: Any) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        labels = {SCOPE_LABEL: self.scope, **kwargs.pop("labels", {})}
        create_gpu_node(self.api, name, labels=labels, fake=False, **kwargs)
        return name

    def requests_seen(self) -> float:
        return self.process.metric("mig_guard_webhook_requests_total")

    def close(self) -> None:
        for name in self.names:
            delete_webhook(self.api, "mutating" if name.endswith("mutate") else "validating", name)
        self.process.stop()


def wait_active(kubectl: KubectlRunner, deployment: Deployment) -> None:
    """The API server picks registrations up asynchronously: probe with a server-side dry run."""
    probe = deployment.node("probe")

    def active() -> bool:
        return (
            kubectl(
                "label", "node", probe, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb", "--dry-run=server"
            ).returncode
            != 0
        )

    wait_for(active, "the webhook registration to take effect")


def put_configmap(api: Any, ref: ConfigMapRef, text: str) -> None:
    ensure_namespace(api, ref.namespace)
    core = k8s.CoreV1Api(api)
    body = {"metadata": {"name": ref.name}, "data": {ref.key: text}}
    try:
        core.create_namespaced_config_map(ref.namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_config_map(ref.name, ref.namespace, body)


def deployed(
    api: Any, process: WebhookProcess, scope: str, guard: ConfigMapRef, config_text: str
) -> Iterator[Deployment]:
    """Publish the config, start the server, register it; always stopped and unregistered after."""
    put_configmap(api, guard, config_text)
    process.start()
    try:
        deployment = Deployment(api, process, scope, guard=guard)
    except BaseException:
        process.stop()
        raise
    try:
        yield deployment
    finally:
        deployment.close()


def read_node(api: Any, name: str) -> Any:
    return k8s.CoreV1Api(api).read_node(name)


def our_taints(node: Any) -> list[Any]:
    return [t for t in (node.spec.taints or []) if t.key == keys.TAINT_KEY]
