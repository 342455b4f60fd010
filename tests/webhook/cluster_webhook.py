"""The real `mig-guard webhook` deployed on the session's kube-apiserver for end-to-end tests:
registered with the canonical configurations of `webhook.registration` and the policy of
`webhook.node_policy`, scoped to the nodes of one test module by an objectSelector on a test
label (so nodes of other tests never reach them), and always unregistered at teardown."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from webhook_harness import TestAuthority, WebhookProcess

from devcluster.helpers import create_gpu_node, delete_webhook, ensure_namespace
from devcluster.pytest_plugin import KubectlRunner
from kube.config_source import ConfigMapRef
from migcore import keys
from webhook import node_policy, registration

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
    """A running webhook server plus its registrations (both webhook configurations, the policy and
    its binding, as `webhook.registration` and `webhook.node_policy` build them for the chart),
    scoped to nodes labelled SCOPE_LABEL=scope."""

    def __init__(
        self,
        api: Any,
        process: WebhookProcess,
        scope: str,
        guard: ConfigMapRef | None,
        reconciler_users: Sequence[str] = (),
    ) -> None:
        self.api = api
        self.guard = guard
        self.process = process
        self.scope = scope
        self.reconciler_users = tuple(reconciler_users)
        self.config_name = f"mig-guard-e2e-{scope}"
        self.policy_name = f"mig-guard-e2e-{scope}-node-writers"
        self.selector = {"matchLabels": {SCOPE_LABEL: scope}}
        self.register()

    def register(self) -> None:
        """Create (or re-create) the configurations, the policy and its binding."""
        admission: Any = k8s.AdmissionregistrationV1Api(self.api)
        users = {"reconciler_users": self.reconciler_users, "timeout_seconds": 5}
        ca = self.process.authority.pem
        validating = registration.validating_configuration(
            self.config_name,
            registration.url_client_config(self.process.url(registration.VALIDATE_PATH), ca),
            self.guard,
            **users,
        )
        mutating = registration.mutating_configuration(
            self.config_name,
            registration.url_client_config(self.process.url(registration.MUTATE_PATH), ca),
            **users,
        )
        for hook in validating["webhooks"] + mutating["webhooks"]:
            if hook["name"] != registration.CONFIGMAP_GUARD:
                hook["objectSelector"] = self.selector
        policy = node_policy.node_writers_policy(self.policy_name, self.reconciler_users)
        binding = node_policy.node_writers_binding(self.policy_name, self.policy_name, self.selector)
        for create, body in (
            (admission.create_validating_webhook_configuration, validating),
            (admission.create_mutating_webhook_configuration, mutating),
            (admission.create_validating_admission_policy, policy),
            (admission.create_validating_admission_policy_binding, binding),
        ):
            try:
                create(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise

    def unregister_webhooks(self) -> None:
        """Delete both webhook configurations (the policy stays)."""
        delete_webhook(self.api, "validating", self.config_name)
        delete_webhook(self.api, "mutating", self.config_name)

    def node(self, prefix: str, **kwargs: Any) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        labels = {SCOPE_LABEL: self.scope, **kwargs.pop("labels", {})}
        create_gpu_node(self.api, name, labels=labels, fake=False, **kwargs)
        return name

    def requests_seen(self) -> float:
        return self.process.metric("mig_guard_webhook_requests_total")

    def close(self) -> None:
        self.unregister_webhooks()
        admission: Any = k8s.AdmissionregistrationV1Api(self.api)
        for delete, name in (
            (admission.delete_validating_admission_policy_binding, self.policy_name),
            (admission.delete_validating_admission_policy, self.policy_name),
        ):
            try:
                delete(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        self.process.stop()


def wait_active(kubectl: KubectlRunner, deployment: Deployment) -> None:
    """The API server picks registrations and bindings up asynchronously: probe with server-side dry
    runs until the webhook refuses a typo and the policy (it answers before the webhooks) a spoof."""
    probe = deployment.node("probe")

    def active() -> bool:
        typo = kubectl("label", "node", probe, f"{keys.LABEL_MIG_CONFIG}=all-1g.5gbb", "--dry-run=server")
        spoof = kubectl("label", "node", probe, f"{keys.LABEL_MIG_STATE}=success", "--dry-run=server")
        return typo.returncode != 0 and "ValidatingAdmissionPolicy" in spoof.stderr

    wait_for(active, "the webhook registrations and the policy binding to take effect")


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


@contextlib.contextmanager
def deployed(
    api: Any,
    kubeconfig: Path,
    workdir: Path,
    authority: TestAuthority,
    scope: str,
    guard: ConfigMapRef,
    config_text: str,
    *extra: str,
    reconciler_users: Sequence[str] = (),
    workers: int = 2,
) -> Iterator[Deployment]:
    """Publish the config, start `mig-guard webhook` watching it (plus `extra` arguments), register it;
    always stopped and unregistered after."""
    users = [arg for user in reconciler_users for arg in ("--reconciler-user", user)]
    process = WebhookProcess(
        workdir,
        authority,
        *("--configmap", f"{guard.namespace}/{guard.name}", "--kubeconfig", str(kubeconfig)),
        *users,
        *extra,
        workers=workers,
    )
    put_configmap(api, guard, config_text)
    process.start()
    try:
        deployment = Deployment(api, process, scope, guard=guard, reconciler_users=reconciler_users)
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
