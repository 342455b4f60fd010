"""What `kubectl mig` reads from the cluster: Nodes, the mig-parted config, Events. Read only.

Every failure becomes a `PluginError` whose message is one sentence an admin can act on (an unknown
node, no report yet, forbidden, credentials refused, the API server unreachable, no kubeconfig).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client import ApiException
from urllib3.exceptions import HTTPError

from kube.node import MalformedNode, NodeView
from migcore import keys
from migcore.catalog import Catalog
from migcore.config import ConfigError, MigPartedConfig, parse_config
from migcore.hardware import HardwareReportError, NodeGpus
from migcore.usage import NodeUsage, UsageError

# The chart's own ConfigMap (migPartedConfig.mode=create) carries this label.
CHART_LABEL = "app.kubernetes.io/name=mig-guard"
ENV_CONFIGMAP = "KUBECTL_MIG_CONFIGMAP"
REQUEST_TIMEOUT = (5.0, 30.0)
EVENTS_SHOWN = 5
REPORTERS = "mig-guard.io/"  # reportingController of mig-guard's Events


class PluginError(Exception):
    """A failure, said in one sentence (printed as `error: <sentence>`)."""


@dataclass(frozen=True)
class MigConfig:
    """The mig-parted config and where it came from (`ConfigMap NS/NAME`)."""

    config: MigPartedConfig
    origin: str


@dataclass(frozen=True)
class NodeEvent:
    time: str
    type: str
    reason: str
    note: str


def _api_error(exc: ApiException, what: str) -> PluginError:
    """One sentence for an API answer: the API server's own message where it is one."""
    message = ""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    if exc.status == 401:
        return PluginError(
            f"the API server refused your credentials while reading {what} (log in again, or pick "
            "another context with --context)"
        )
    if exc.status == 403:
        return PluginError(f"{message or 'forbidden'} (ask your cluster admin for read access)")
    return PluginError(f"reading {what} failed: {message or exc.reason} (HTTP {exc.status})")


class Cluster:
    """The cluster of the current (or given) kubeconfig and context."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        try:
            if (
                kubeconfig
                or context
                or os.environ.get("KUBECONFIG")
                or Path("~/.kube/config").expanduser().exists()
            ):
                self.api: Any = k8s_config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
            else:
                k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
                self.api = k8s.ApiClient()
        except (k8s_config.ConfigException, OSError, ValueError, TypeError) as exc:
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise PluginError(f"no usable kubeconfig ({where}): {exc}") from exc
        self.core: Any = k8s.CoreV1Api(self.api)
        self.server = str(self.api.configuration.host)

    def _call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise PluginError(f"cannot reach the API server at {self.server}: {exc.reason}") from exc
            raise _api_error(exc, what) from exc
        except (HTTPError, OSError) as exc:
            raise PluginError(f"cannot reach the API server at {self.server}: {exc}") from exc

    # --- nodes -------------------------------------------------------------------------------------

    def node(self, name: str) -> NodeView:
        try:
            response = self._call(f"node {name}", self.core.read_node, name, _preload_content=False)
        except PluginError as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
                raise PluginError(f'node "{name}" not found (kubectl get nodes lists the nodes)') from None
            raise
        return _view(response.data, name)

    def gpu_nodes(self) -> list[NodeView]:
        """Every node mig-guard has to do with: a layout label, a hardware report, or GPUs by GFD."""
        response = self._call("nodes", self.core.list_node, _preload_content=False)
        items = json.loads(response.data).get("items") or []
        out = []
        for item in items:
            view = _view(json.dumps(item).encode(), "?")
            if (
                keys.LABEL_MIG_CONFIG in view.labels
                or keys.LABEL_GPU_PRODUCT in view.labels
                or keys.ANNOTATION_GPUS in view.annotations
            ):
                out.append(view)
        return sorted(out, key=lambda v: v.name)

    # --- the mig-parted config ---------------------------------------------------------------------

    def mig_config(self, catalog: Catalog, ref: str | None = None) -> MigConfig:
        """The mig-parted config: `ref` (NAMESPACE/NAME), else $KUBECTL_MIG_CONFIGMAP, else the one
        ConfigMap mig-guard's chart made, else the GPU Operator's default-mig-parted-config."""
        ref = ref or os.environ.get(ENV_CONFIGMAP)
        if ref:
            namespace, _, name = ref.partition("/")
            if not namespace or not name:
                raise PluginError(f"--configmap {ref!r}: expected NAMESPACE/NAME")
            return self._parse(self._configmap(namespace, name), catalog)
        found = self._chart_configmaps()
        if len(found) > 1:
            names = ", ".join(f"{c.metadata.namespace}/{c.metadata.name}" for c in found)
            raise PluginError(
                f"several mig-guard ConfigMaps ({names}): pick one with --configmap NAMESPACE/NAME"
            )
        if found:
            return self._parse(found[0], catalog)
        try:
            cm = self._configmap(keys.GPU_OPERATOR_NAMESPACE, keys.DEFAULT_MIG_PARTED_CONFIGMAP)
        except PluginError as exc:
            raise PluginError(
                f"no mig-parted config found (no ConfigMap labelled {CHART_LABEL}, and "
                f"{keys.GPU_OPERATOR_NAMESPACE}/{keys.DEFAULT_MIG_PARTED_CONFIGMAP}: {exc}); "
                "name it with --configmap NAMESPACE/NAME"
            ) from None
        return self._parse(cm, catalog)

    def _configmap(self, namespace: str, name: str) -> Any:
        try:
            return self._call(
                f"ConfigMap {namespace}/{name}", self.core.read_namespaced_config_map, name, namespace
            )
        except PluginError as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
                raise PluginError(f"ConfigMap {namespace}/{name} not found") from None
            raise

    def _chart_configmaps(self) -> list[Any]:
        try:
            listed = self._call(
                "ConfigMaps", self.core.list_config_map_for_all_namespaces, label_selector=CHART_LABEL
            )
        except PluginError:
            return []  # may not list them cluster-wide: try the GPU Operator's default
        return [cm for cm in listed.items if _config_text(cm) is not None]

    @staticmethod
    def _parse(cm: Any, catalog: Catalog) -> MigConfig:
        origin = f"ConfigMap {cm.metadata.namespace}/{cm.metadata.name}"
        text = _config_text(cm)
        if text is None:
            raise PluginError(f"{origin} has no {keys.MIG_PARTED_CONFIG_KEY} (nor a single key to use)")
        try:
            return MigConfig(parse_config(text, catalog), origin)
        except ConfigError as exc:
            raise PluginError(f"{origin} cannot be used: {'; '.join(exc.errors)}") from exc

    # --- events --------------------------------------------------------------------------------------

    def events(self, node: str, limit: int = EVENTS_SHOWN) -> list[NodeEvent] | str:
        """mig-guard's latest Events about `node`, newest last (a string: why there are none)."""
        try:
            listed = self._call(
                "Events",
                self.core.list_event_for_all_namespaces,
                field_selector=f"involvedObject.kind=Node,involvedObject.name={node}",
            )
        except PluginError as exc:
            return f"not shown: {exc}"
        ours = []
        for e in listed.items:
            if not str(e.reporting_component or "").startswith(REPORTERS):
                continue
            when = e.event_time or e.last_timestamp or e.metadata.creation_timestamp
            ours.append((when.isoformat() if when else "", e))
        ours.sort(key=lambda pair: pair[0])
        return [
            NodeEvent(when, e.type or "", e.reason or "", e.message or e.note or "")
            for when, e in ours[-limit:]
        ]


def _config_text(cm: Any) -> str | None:
    data = cm.data or {}
    if keys.MIG_PARTED_CONFIG_KEY in data:
        return str(data[keys.MIG_PARTED_CONFIG_KEY])
    if len(data) == 1:
        return str(next(iter(data.values())))
    return None


def _view(data: bytes, name: str) -> NodeView:
    try:
        return NodeView.of(json.loads(data))
    except (MalformedNode, ValueError) as exc:
        raise PluginError(f"node {name} cannot be read: {exc}") from exc


def gpu_report(node: NodeView) -> NodeGpus:
    """The node's hardware report, or why there is none, as one sentence."""
    text = node.annotations.get(keys.ANNOTATION_GPUS)
    if not text:
        raise PluginError(
            f"node {node.name} has no GPU report yet ({keys.ANNOTATION_GPUS}): mig-guard's reconciler "
            "has not reported from it (is its pod running on that node?)"
        )
    try:
        return NodeGpus.from_annotation(text)
    except HardwareReportError as exc:
        raise PluginError(f"node {node.name}: {exc}") from exc


def usage_report(node: NodeView) -> NodeUsage | None:
    """The pods on the node's GPUs as its reconciler reports them (None: not reported, or unreadable)."""
    text = node.annotations.get(keys.ANNOTATION_USAGE)
    if not text:
        return None
    try:
        return NodeUsage.from_annotation(text)
    except UsageError:
        return None
