"""Helpers for tests and the demo: GPU nodes, webhook registrations, ServiceAccount clients."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client import ApiException

from devcluster.kubeconfig import kubeconfig_dict, token_client, write_kubeconfig
from migcore import keys
from migcore.catalog import Product, UnknownProductError, load_catalog

#: The annotation kwok's node selector is configured with (``ControlPlane.start_workloads``).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"


def gpu_model_file(name: str) -> str:
    """The path of a simulated GPU model shipped for tests and the demo (`x100.json`, a GPU no
    catalog knows, and `x100-mig-parted-config.yaml`, layouts for it)."""
    return str(resources.files("devcluster").joinpath("gpu-models", name))


_CAPABILITY = re.compile(r"^(\w+)[^(]*\(.*\bCC (\d+)\.(\d+)\)")


def gfd_labels(
    product: str,
    gpu_count: int,
    mig_capable: bool = True,
    *,
    mig_profile: str | None = None,
    memory_mib: int | None = None,
) -> dict[str, str]:
    """Node labels the way NVIDIA GPU Feature Discovery sets them for ``product``, from mig-guard's
    catalog (memory, family, compute capability). ``mig_profile``: GFD's ``single`` MIG strategy
    with every GPU split into that profile as far as it goes (``all-<profile>``): the product label
    gets ``-MIG-<profile>``, ``gpu.count`` counts the MIG devices and ``gpu.memory`` is one MIG
    device's. ``memory_mib``: for a GPU the catalog does not know (else read from its name)."""
    try:
        known: Product | None = load_catalog().by_label(product)
    except UnknownProductError:
        known = None
    memory = memory_mib or (known.memory_mib if known else None)
    if memory is None:
        m = re.search(r"(\d+)GB", product)
        memory = int(m.group(1)) * 1024 if m else 0
    count, label = gpu_count, product
    if mig_profile is not None:
        if known is None:
            raise ValueError(f"{product}: not in the catalog, so its MIG devices are unknown")
        gi = known.gpu_instance_profile(mig_profile)
        if gi is None:
            raise ValueError(f"{product} has no MIG profile {mig_profile}")
        count, label = gpu_count * gi.max_count, f"{product}-MIG-{gi.name.resource_suffix}"
        memory = gi.memory_mib or int((gi.memory_fraction or 0) * memory)
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": label,
        "nvidia.com/gpu.count": str(count),
        "nvidia.com/gpu.memory": str(memory),
        "nvidia.com/mig.capable": "true" if mig_capable else "false",
        "nvidia.com/gpu.deploy.gpu-feature-discovery": "true",
    }
    if mig_profile is not None:
        labels["nvidia.com/mig.strategy"] = "single"
    capability = _CAPABILITY.match(known.architecture or "") if known else None
    if capability is not None:
        labels["nvidia.com/gpu.family"] = capability.group(1).lower()
        labels["nvidia.com/gpu.compute.major"] = capability.group(2)
        labels["nvidia.com/gpu.compute.minor"] = capability.group(3)
    return labels


def create_gpu_node(
    api: Any,
    name: str,
    product: str = "NVIDIA-A100-SXM4-40GB",
    gpu_count: int = 8,
    *,
    labels: Mapping[str, str] | None = None,
    fake: bool = True,
    mig_capable: bool = True,
    annotations: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    extended_resources: Mapping[str, str] | None = None,
) -> Any:
    """Create a Node labelled like GPU Feature Discovery labels a GPU node; returns the V1Node.

    ``fake=True`` annotates it for kwok (``kwok.x-k8s.io/node=fake``): with workloads started, kwok
    keeps it Ready and "runs" the pods bound to it. ``labels`` are added over the GFD labels.
    """
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **gfd_labels(product, gpu_count, mig_capable),
        **(labels or {}),
    }
    all_annotations = {**({KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"} if fake else {})}
    all_annotations.update(annotations or {})
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpu_count)}
    resources.update(extended_resources or {})
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": all_labels, "annotations": all_annotations},
        "spec": {"taints": [dict(t) for t in taints]} if taints else {},
        # Nodes accept status on create (the kubelet registers itself that way).
        "status": {"capacity": resources, "allocatable": resources},
    }
    core: Any = k8s.CoreV1Api(api)
    return core.create_node(body)


def register_webhook(
    api: Any,
    kind: str,
    name: str,
    url: str,
    ca_bundle_pem: bytes,
    *,
    rules: Sequence[Mapping[str, Any]],
    match_conditions: Sequence[Mapping[str, str]] | None = None,
    failure_policy: str = "Fail",
    side_effects: str = "None",
    timeout_seconds: int = 5,
    namespace_selector: Mapping[str, Any] | None = None,
    object_selector: Mapping[str, Any] | None = None,
    reinvocation_policy: str | None = None,
    webhook_name: str | None = None,
) -> Any:
    """Create (or replace) a Validating/MutatingWebhookConfiguration with one webhook calling ``url``.

    ``kind``: ``"validating"`` or ``"mutating"``. ``rules``: dicts like
    ``{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}``.
    ``match_conditions``: ``[{"name": ..., "expression": <CEL>}]``. Returns the created object.

    The API server picks new configurations up asynchronously (usually well under a second): tests
    should poll for the webhook's effect rather than assume it is active at once.
    """
    if kind not in ("validating", "mutating"):
        raise ValueError("kind must be 'validating' or 'mutating'")
    if not url.startswith("https://"):
        raise ValueError("webhook URLs must be https")
    hook: dict[str, Any] = {
        "name": webhook_name or f"{name}.mig-guard.test",
        "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_bundle_pem).decode()},
        "rules": [dict(r) for r in rules],
        "failurePolicy": failure_policy,
        "sideEffects": side_effects,
        "timeoutSeconds": timeout_seconds,
        "admissionReviewVersions": ["v1"],
        "matchPolicy": "Equivalent",
    }
    if match_conditions:
        hook["matchConditions"] = [dict(c) for c in match_conditions]
    if namespace_selector is not None:
        hook["namespaceSelector"] = dict(namespace_selector)
    if object_selector is not None:
        hook["objectSelector"] = dict(object_selector)
    if kind == "mutating" and reinvocation_policy is not None:
        hook["reinvocationPolicy"] = reinvocation_policy
    config_kind = "ValidatingWebhookConfiguration" if kind == "validating" else "MutatingWebhookConfiguration"
    body: dict[str, Any] = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": config_kind,
        "metadata": {"name": name},
        "webhooks": [hook],
    }
    adm: Any = k8s.AdmissionregistrationV1Api(api)
    create = (
        adm.create_validating_webhook_configuration
        if kind == "validating"
        else adm.create_mutating_webhook_configuration
    )
    read = (
        adm.read_validating_webhook_configuration
        if kind == "validating"
        else adm.read_mutating_webhook_configuration
    )
    replace = (
        adm.replace_validating_webhook_configuration
        if kind == "validating"
        else adm.replace_mutating_webhook_configuration
    )
    try:
        return create(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    body["metadata"]["resourceVersion"] = read(name).metadata.resource_version
    return replace(name, body)


def delete_webhook(api: Any, kind: str, name: str) -> None:
    adm: Any = k8s.AdmissionregistrationV1Api(api)
    delete = (
        adm.delete_validating_webhook_configuration
        if kind == "validating"
        else adm.delete_mutating_webhook_configuration
    )
    try:
        delete(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def ensure_namespace(api: Any, name: str) -> None:
    try:
        core: Any = k8s.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def _apply(create: Any, replace: Any, name: str, body: Any, *args: Any) -> None:
    try:
        create(*args, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        replace(name, *args, body)


def service_account_client(
    api: Any,
    namespace: str,
    name: str,
    rules: Sequence[Mapping[str, Any]] = (),
    *,
    cluster_wide: bool = False,
    expiration_seconds: int = 3600,
) -> Any:
    """Make ServiceAccount ``namespace/name`` with ``rules`` (a Role + RoleBinding, or a ClusterRole +
    ClusterRoleBinding when ``cluster_wide``; nothing when ``rules`` is empty) and return an ApiClient
    that authenticates with a token for it from the TokenRequest API.

    ``rules``: dicts like ``{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}``.
    """
    core: Any = k8s.CoreV1Api(api)
    rbac: Any = k8s.RbacAuthorizationV1Api(api)
    ensure_namespace(api, namespace)
    try:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    if rules:
        role_name = f"{name}-rules" if not cluster_wide else f"{namespace}:{name}-rules"
        role = {"metadata": {"name": role_name}, "rules": [dict(r) for r in rules]}
        subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
        if cluster_wide:
            _apply(rbac.create_cluster_role, rbac.replace_cluster_role, role_name, role)
            binding = {
                "metadata": {"name": role_name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role_name,
                },
                "subjects": [subject],
            }
            _apply(rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding, role_name, binding)
        else:
            _apply(
                rbac.create_namespaced_role,
                rbac.replace_namespaced_role,
                role_name,
                role,
                namespace,
            )
            binding = {
                "metadata": {"name": role_name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
                "subjects": [subject],
            }
            _apply(
                rbac.create_namespaced_role_binding,
                rbac.replace_namespaced_role_binding,
                role_name,
                binding,
                namespace,
            )
    token = core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}
    )
    return token_client(api, token.status.token)


def service_account_kubeconfig(api: Any, path: Path, name: str, rules: Sequence[Mapping[str, Any]]) -> Path:
    """A kubeconfig file for ServiceAccount mig-guard/`name`, bound cluster-wide to exactly `rules`."""
    client = service_account_client(api, "mig-guard", name, rules, cluster_wide=True)
    cfg = client.configuration
    token = cfg.api_key["authorization"]
    ca = Path(cfg.ssl_ca_cert).read_bytes()
    return write_kubeconfig(path, kubeconfig_dict(cfg.host, ca, user=f"mig-guard-{name}", token=token))


def user_client(plane: Any, cn: str, groups: Sequence[str] = ()) -> Any:
    """An ApiClient that authenticates as user ``cn`` in ``groups`` with a client certificate signed
    by the cluster CA of ``plane`` (a :class:`devcluster.controlplane.ControlPlane`)."""
    return plane.user_client(cn, groups)


def pod_bound_token(
    api: Any, namespace: str, service_account: str, node: str, *, expiration_seconds: int = 3600
) -> str:
    """A token of ServiceAccount ``namespace/service_account`` bound to a Pod on ``node``: what the
    kubelet mounts into a DaemonSet's pod. The API server then authenticates it with the pod's node
    in ``userInfo.extra["authentication.kubernetes.io/node-name"]`` (Kubernetes 1.30 and later).

    The Pod (``<service_account>-<node>``, created if missing, never run) must outlive the token's
    use: the token stops working when it is deleted. The ServiceAccount must exist.
    """
    core: Any = k8s.CoreV1Api(api)
    name = f"{service_account}-{node}"[:63].rstrip("-.")
    pod = {
        "metadata": {"name": name, "labels": {"mig-guard.test/token-holder": "true"}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "containers": [{"name": "holder", "image": "registry.invalid/token-holder"}],
        },
    }
    try:
        created = core.create_namespaced_pod(namespace, pod)
    except ApiException as exc:
        if exc.status != 409:
            raise
        created = core.read_namespaced_pod(name, namespace)
    request = {
        "spec": {
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": created.metadata.uid},
        }
    }
    token = core.create_namespaced_service_account_token(service_account, namespace, request)
    return str(token.status.token)


def node_bound_client(api: Any, namespace: str, service_account: str, node: str) -> Any:
    """An ApiClient for ServiceAccount ``namespace/service_account`` with a token bound to a Pod on
    ``node`` (see :func:`pod_bound_token`; the ServiceAccount and its RBAC must exist)."""
    return token_client(api, pod_bound_token(api, namespace, service_account, node))


def watch_node(
    api: Any,
    name: str,
    until: Callable[[Any], bool],
    *,
    timeout: float,
    since: str | None = None,
    check: Callable[[], None] | None = None,
) -> Any:
    """Watch Node ``name`` until ``until(node)`` holds; return that node, or None on timeout.

    A state that lasts only a moment is seen too: from the node as it is now, or with ``since`` (a
    resourceVersion, e.g. of a write that started a change) from every update after it, including
    those before this call. ``check`` runs between watch rounds (at most 5 s apart) and may raise.
    """
    core: Any = k8s.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    version = since
    while (left := deadline - time.monotonic()) > 0:
        if check is not None:
            check()
        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in w.stream(
                core.list_node,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=max(1, min(5, int(left))),
            ):
                node = event["object"]
                version = node.metadata.resource_version
                if until(node):
                    w.stop()
                    return node
        except ApiException as exc:
            if exc.status != 410:
                raise
            version = None  # too old to resume from (not within a test): the node as it is now
    return None


def wait_for_mig_state(
    api: Any,
    name: str,
    state: str,
    reason_has: str,
    *,
    timeout: float,
    since: str | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[bool, tuple[str | None, str]]:
    """Watch (:func:`watch_node`) until the node's `nvidia.com/mig.config.state` is ``state`` with a
    reason containing ``reason_has``. Returns (reached, (last state, last reason) seen)."""
    last: tuple[str | None, str] = (None, "")

    def reached(node: Any) -> bool:
        nonlocal last
        last = (
            (node.metadata.labels or {}).get(keys.LABEL_MIG_STATE),
            (node.metadata.annotations or {}).get(keys.ANNOTATION_REASON, ""),
        )
        return last[0] == state and reason_has in last[1]

    found = watch_node(api, name, reached, timeout=timeout, since=since, check=check)
    return found is not None, last
