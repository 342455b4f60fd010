"""The ConfigMap guard's judgement, on AdmissionRequests and a fixed list of labelled nodes."""

from __future__ import annotations

from collections.abc import Sequence

import yaml
from webhook_harness import gfd_labels, node, review

from kube.config_source import ConfigMapRef
from kube.node import NodeView
from migcore import keys
from webhook.configmap_guard import ConfigMapGuard, GuardMode
from webhook.node_hardware import HardwareResolver
from webhook.review import request_from_review
from webhook.verdict import Verdict

REF = ConfigMapRef("gpu-operator", "default-mig-parted-config")
BASE = {
    "version": "v1",
    "mig-configs": {
        "all-disabled": [{"devices": "all", "mig-enabled": False}],
        "all-1g.5gb": [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.5gb": 7}}],
        "all-2g.10gb": [{"devices": "all", "mig-enabled": True, "mig-devices": {"2g.10gb": 3}}],
    },
}


class Nodes:
    def __init__(self, *labelled: tuple[str, str]) -> None:
        self.views = [
            NodeView.of(node(name, {**gfd_labels(), keys.LABEL_MIG_CONFIG: cfg})) for name, cfg in labelled
        ]

    def labelled_nodes(self) -> Sequence[NodeView]:
        return self.views


def configmap(document: object) -> dict:
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    return {"metadata": {"name": REF.name, "namespace": REF.namespace}, "data": {"config.yaml": text}}


def judge(
    guard: ConfigMapGuard, new: object, old: object = BASE, operation: str = "UPDATE", name: str = REF.name
) -> Verdict:
    sent = review(
        None if operation == "DELETE" else configmap(new),
        configmap(old),
        operation=operation,
        kind="ConfigMap",
        namespace=REF.namespace,
        name=name,
    )
    return guard.judge(request_from_review(sent))


def without(name: str) -> dict:
    return {**BASE, "mig-configs": {k: v for k, v in BASE["mig-configs"].items() if k != name}}


def test_removing_a_config_in_use_is_denied_naming_the_node(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(
        REF, Nodes(("gpu-1", "all-1g.5gb"), ("gpu-2", "all-2g.10gb")), resolver, GuardMode.DENY
    )
    verdict = judge(guard, without("all-1g.5gb"))
    assert not verdict.allowed
    assert "gpu-1 (all-1g.5gb removed)" in verdict.message
    assert "gpu-2" not in verdict.message
    assert judge(guard, without("all-disabled")).allowed


def test_unparsable_or_keyless_update_is_denied(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(REF, Nodes(), resolver, GuardMode.DENY)
    assert "does not parse" in judge(guard, "version: v1\nmig-configs: [").message
    keyless = review(
        {"metadata": {"name": REF.name}, "data": {"other": "x"}},
        configmap(BASE),
        kind="ConfigMap",
        namespace=REF.namespace,
        name=REF.name,
    )
    assert "key config.yaml is missing" in guard.judge(request_from_review(keyless)).message


def test_breakage_that_was_there_before_is_not_blamed_on_this_update(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(REF, Nodes(("gpu-1", "gone-long-ago")), resolver, GuardMode.DENY)
    assert judge(guard, without("all-2g.10gb")).allowed


def test_warn_mode_allows_with_one_warning_per_node(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(
        REF, Nodes(("gpu-1", "all-1g.5gb"), ("gpu-2", "all-1g.5gb")), resolver, GuardMode.WARN
    )
    verdict = judge(guard, without("all-1g.5gb"))
    assert verdict.allowed
    assert len(verdict.warnings) == 2
    assert all("all-1g.5gb removed" in w for w in verdict.warnings)


def test_deleting_the_configmap_is_judged_like_removing_everything(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(REF, Nodes(("gpu-1", "all-1g.5gb")), resolver, GuardMode.DENY)
    verdict = judge(guard, None, operation="DELETE")
    assert not verdict.allowed
    assert "deleting" in verdict.message


def test_a_collection_delete_is_judged_by_the_object_it_deletes(resolver: HardwareResolver) -> None:
    """DELETECOLLECTION sends no request name, only the ConfigMap being deleted in oldObject."""
    guard = ConfigMapGuard(REF, Nodes(("gpu-1", "all-1g.5gb")), resolver, GuardMode.DENY)
    verdict = judge(guard, None, operation="DELETE", name="")
    assert not verdict.allowed
    assert "gpu-1" in verdict.message


def test_other_configmaps_are_not_judged(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(REF, Nodes(("gpu-1", "all-1g.5gb")), resolver, GuardMode.DENY)
    sent = review(configmap("junk"), configmap(BASE), kind="ConfigMap", namespace="default", name=REF.name)
    assert guard.judge(request_from_review(sent)).allowed
