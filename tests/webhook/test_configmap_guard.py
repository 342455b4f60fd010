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
from webhook.verdict import API_WARNING_CHARS, MAX_WARNINGS, Verdict

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


def with_profiles(*profiles: str, name: str = "custom") -> dict:
    entry = {"devices": "all", "mig-enabled": True, "mig-devices": dict.fromkeys(profiles, 1)}
    return {**BASE, "mig-configs": {**BASE["mig-configs"], name: [entry]}}


def test_the_configs_own_warnings_come_back_as_admission_warnings(resolver: HardwareResolver) -> None:
    """A profile no catalog GPU has parses (a GPU outside the catalog may offer it) but is most
    likely a typo: the writer sees it, with the closest real profiles, at `kubectl apply`."""
    guard = ConfigMapGuard(REF, Nodes(("gpu-1", "all-1g.5gb")), resolver, GuardMode.DENY)
    verdict = judge(guard, with_profiles("2g.11gb"))
    assert verdict.allowed
    (warning,) = verdict.to_review("u")["response"]["warnings"]
    assert warning.startswith('config.yaml: mig-configs.custom[0].mig-devices."2g.11gb": profile 2g.11gb')
    assert "closest: 2g.10gb (A100-40GB)" in warning  # kept whole, not cut at 120 characters
    assert len(warning) <= API_WARNING_CHARS
    assert judge(guard, without("all-2g.10gb")).warnings == ()  # a clean config: no warnings


def test_a_denied_update_shows_the_configs_warnings_too(resolver: HardwareResolver) -> None:
    guard = ConfigMapGuard(REF, Nodes(("gpu-1", "all-1g.5gb")), resolver, GuardMode.DENY)
    update = with_profiles("2g.11gb")
    del update["mig-configs"]["all-1g.5gb"]
    verdict = judge(guard, update)
    assert not verdict.allowed
    assert "gpu-1 (all-1g.5gb removed)" in verdict.message
    assert [w[:40] for w in verdict.warnings] == ["config.yaml: mig-configs.custom[0].mig-d"]


def test_warnings_past_ten_are_counted_not_dropped(resolver: HardwareResolver) -> None:
    """The node breakage (warn mode) first, then the config's warnings, ten at most: the tenth says
    how many more there are."""
    guard = ConfigMapGuard(
        REF, Nodes(("gpu-1", "all-1g.5gb"), ("gpu-2", "all-1g.5gb")), resolver, GuardMode.WARN
    )
    unknown = [f"1g.{m}gb" for m in range(30, 45)]  # 12 of them exist on no GPU in the catalog
    update = with_profiles(*unknown)
    del update["mig-configs"]["all-1g.5gb"]
    verdict = judge(guard, update)
    sent = verdict.to_review("u")["response"]["warnings"]
    assert len(sent) == MAX_WARNINGS
    assert all("all-1g.5gb removed" in w for w in sent[:2])
    assert all(w.startswith("config.yaml: mig-configs.custom[0]") for w in sent[2:9])
    # 2 + 12 warnings, 9 shown: 5 more.
    assert sent[9].startswith("5 more warnings left out; `mig-guard check --config FILE --all`")
    assert sum(len(w) for w in sent) <= 4096  # the API server's total: nothing cut or dropped there


def test_control_characters_in_a_config_name_are_escaped(resolver: HardwareResolver) -> None:
    """The API server drops a warning with a control character in it, silently."""
    guard = ConfigMapGuard(REF, Nodes(), resolver, GuardMode.DENY)
    (warning,) = judge(guard, with_profiles("2g.11gb", name="bell\x07name")).warnings
    assert "mig-configs.bell\\x07name[0]" in warning
    assert not any(ord(c) < 32 for c in warning)
