"""The Node rules, on NodeChange values (no HTTP)."""

from __future__ import annotations

from conftest import RECONCILER
from webhook_harness import A100, annotate, gfd_labels, node, relabel

from kube.config_source import ConfigView
from kube.node import NodeView
from migcore import keys
from migcore.catalog import load_catalog
from migcore.hardware import DiscoveredGpu, NodeGpus
from migcore.hold import HoldRecord, pending_reason
from webhook.node_hardware import HardwareResolver
from webhook.validation import NodeChange, NodeRules


def change(old: dict | None, new: dict) -> NodeChange:
    return NodeChange(NodeView.of(old), NodeView.of(new))


def labelled(config: str | None, **extra: str) -> dict:
    labels = {**gfd_labels(), **extra}
    if config is not None:
        labels[keys.LABEL_MIG_CONFIG] = config
    return node(labels=labels)


def a30_report(count: int = 4) -> str:
    a30 = load_catalog().by_label("NVIDIA-A30")
    gpus = tuple(DiscoveredGpu(i, a30.pci_device_ids[0], "NVIDIA A30", True) for i in range(count))
    return NodeGpus(gpus).to_annotation()


def test_typo_is_denied_with_the_closest_names_and_valid_configs(
    rules: NodeRules, config_view: ConfigView
) -> None:
    verdict = rules.judge(change(labelled(None), labelled("all-1g.5gbb")), "admin", config_view)
    assert not verdict.allowed
    assert verdict.code == 400
    assert "all-1g.5gbb" in verdict.message
    assert "did you mean all-1g.5gb" in verdict.message
    assert "gpu-operator/default-mig-parted-config" in verdict.message
    assert "Valid for node gpu-1" in verdict.message


def test_layout_that_does_not_fit_the_gpus_is_denied_with_what_would_fit(
    rules: NodeRules, config_view: ConfigView
) -> None:
    verdict = rules.judge(change(labelled(None), labelled("all-3g.40gb")), "admin", config_view)
    assert not verdict.allowed
    assert verdict.code == 400
    assert "does not fit node gpu-1" in verdict.message
    assert "all-1g.5gb" in verdict.message.split("Valid for this node:")[1]


def test_valid_layout_is_allowed(rules: NodeRules, config_view: ConfigView) -> None:
    verdict = rules.judge(change(labelled("all-disabled"), labelled("all-1g.5gb")), "admin", config_view)
    assert verdict.allowed
    assert verdict.message == ""


def test_create_with_the_label_is_judged(rules: NodeRules, config_view: ConfigView) -> None:
    assert not rules.judge(change(None, labelled("all-3g.40gb")), "system:node:gpu-1", config_view).allowed
    assert rules.judge(change(None, labelled("all-3g.20gb")), "system:node:gpu-1", config_view).allowed


def test_without_product_label_or_report_it_is_allowed_with_a_warning(
    rules: NodeRules, config_view: ConfigView
) -> None:
    new = node(labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    verdict = rules.judge(change(node(), new), "admin", config_view)
    assert verdict.allowed
    assert any("not checked" in w for w in verdict.warnings)


def test_a_typo_is_denied_even_when_the_hardware_is_unknown(
    rules: NodeRules, config_view: ConfigView
) -> None:
    new = node(labels={keys.LABEL_MIG_CONFIG: "all-1g.5gbb"})
    verdict = rules.judge(change(node(), new), "admin", config_view)
    assert not verdict.allowed
    assert "did you mean all-1g.5gb" in verdict.message


def test_unknown_product_is_allowed_with_a_warning(rules: NodeRules, config_view: ConfigView) -> None:
    new = node(labels={keys.LABEL_GPU_PRODUCT: "Tesla-T4", keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    verdict = rules.judge(change(node(), new), "admin", config_view)
    assert verdict.allowed
    assert any("Tesla-T4" in w for w in verdict.warnings)


def test_hardware_report_wins_over_the_product_label(rules: NodeRules, config_view: ConfigView) -> None:
    # Labels say A100 (where all-1g.5gb fits); the reconciler found A30s (where it does not).
    old = annotate(labelled(None), {keys.ANNOTATION_GPUS: a30_report()})
    verdict = rules.judge(
        change(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})), "admin", config_view
    )
    assert not verdict.allowed
    assert "A30" in verdict.message
    assert rules.judge(
        change(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.6gb"})), "admin", config_view
    ).allowed


def test_unreadable_report_falls_back_to_labels_with_a_warning(
    rules: NodeRules, config_view: ConfigView
) -> None:
    old = annotate(labelled(None), {keys.ANNOTATION_GPUS: "{not json"})
    verdict = rules.judge(
        change(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})), "admin", config_view
    )
    assert verdict.allowed
    assert any(keys.ANNOTATION_GPUS in w for w in verdict.warnings)


def test_removing_the_label_is_allowed(rules: NodeRules, config_view: ConfigView) -> None:
    assert rules.judge(change(labelled("all-1g.5gb"), labelled(None)), "admin", config_view).allowed


def test_unchanged_label_is_not_judged_again(rules: NodeRules, config_view: ConfigView) -> None:
    # A node labelled before the ConfigMap lost its config keeps working for other edits.
    old = labelled("gone-config")
    assert rules.judge(change(old, relabel(old, {"team": "a"})), "admin", config_view).allowed


def test_other_changes_are_allowed(rules: NodeRules, config_view: ConfigView) -> None:
    old = labelled("all-1g.5gb")
    new = relabel(old, {"nvidia.com/gfd.timestamp": "1700000000"})
    new["spec"]["unschedulable"] = True
    assert rules.judge(change(old, new), "system:node:gpu-1", config_view).allowed


def test_user_may_not_set_the_state_label(rules: NodeRules, config_view: ConfigView) -> None:
    old = labelled("all-1g.5gb", **{keys.LABEL_MIG_STATE: "pending"})
    new = relabel(old, {keys.LABEL_MIG_STATE: "success"})
    verdict = rules.judge(change(old, new), "mallory", config_view)
    assert not verdict.allowed
    assert verdict.code == 403
    assert keys.LABEL_MIG_STATE in verdict.message
    assert "mallory" in verdict.message


def test_reconciler_may_set_the_state_label_and_its_annotations(
    rules: NodeRules, config_view: ConfigView
) -> None:
    old = labelled("all-1g.5gb", **{keys.LABEL_MIG_STATE: "pending"})
    new = annotate(
        relabel(old, {keys.LABEL_MIG_STATE: "success"}),
        {keys.ANNOTATION_REASON: "applied", keys.ANNOTATION_HOLD: None},
    )
    assert rules.judge(change(old, new), RECONCILER, config_view, bound_node="gpu-1").allowed


def test_a_reconciler_writes_only_the_node_its_token_is_bound_to(
    rules: NodeRules, config_view: ConfigView
) -> None:
    old = labelled("all-1g.5gb", **{keys.LABEL_MIG_STATE: "pending"})
    new = relabel(old, {keys.LABEL_MIG_STATE: "success"})
    other = rules.judge(change(old, new), RECONCILER, config_view, bound_node="gpu-2")
    assert (other.allowed, other.code) == (False, 403)
    assert "runs on node gpu-2 and may not change node gpu-1" in other.message
    unbound = rules.judge(change(old, new), RECONCILER, config_view)
    assert (unbound.allowed, unbound.code) == (False, 403)
    assert "not bound to a node" in unbound.message
    assert "--allow-unbound-reconciler-tokens" in unbound.message
    layout = rules.judge(
        change(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-7g.40gb"})),
        RECONCILER,
        config_view,
        bound_node="gpu-1",
    )
    assert (layout.allowed, layout.code) == (False, 403)
    assert f"may not change {keys.LABEL_MIG_CONFIG}" in layout.message


def test_unbound_reconciler_tokens_are_accepted_when_allowed(
    resolver: HardwareResolver, config_view: ConfigView
) -> None:
    rules = NodeRules(resolver, [RECONCILER], allow_unbound=True)
    old = labelled("all-1g.5gb", **{keys.LABEL_MIG_STATE: "pending"})
    new = relabel(old, {keys.LABEL_MIG_STATE: "success"})
    assert rules.judge(change(old, new), RECONCILER, config_view).allowed
    # A token that is bound still binds.
    assert not rules.judge(change(old, new), RECONCILER, config_view, bound_node="gpu-2").allowed


def test_gpu_labels_changed_in_the_same_request_do_not_count(
    rules: NodeRules, config_view: ConfigView
) -> None:
    a30 = node(labels=gfd_labels("NVIDIA-A30", 4))
    swapped = relabel(a30, {keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_GPU_PRODUCT: A100})
    verdict = rules.judge(change(a30, swapped), "admin", config_view)
    assert not verdict.allowed
    assert "A30" in verdict.message
    hidden = relabel(a30, {keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_GPU_PRODUCT: None})
    assert not rules.judge(change(a30, hidden), "admin", config_view).allowed
    fits = relabel(a30, {keys.LABEL_MIG_CONFIG: "all-1g.6gb", keys.LABEL_GPU_PRODUCT: A100})
    allowed = rules.judge(change(a30, fits), "admin", config_view)
    assert allowed.allowed
    assert any("judged against the GPUs before it" in w for w in allowed.warnings)
    # Labels set with the layout on a node that had none are all there is to judge by.
    bare = relabel(node(), {keys.LABEL_MIG_CONFIG: "all-1g.5gb", **gfd_labels("NVIDIA-A30", 4)})
    assert not rules.judge(change(node(), bare), "admin", config_view).allowed


def test_protected_annotations_and_removals_are_denied_to_users(
    rules: NodeRules, config_view: ConfigView
) -> None:
    old = annotate(labelled("all-1g.5gb", **{keys.LABEL_MIG_STATE: "failed"}), {keys.ANNOTATION_REASON: "x"})
    for new in (
        annotate(old, {keys.ANNOTATION_REASON: "all good"}),
        annotate(old, {keys.ANNOTATION_GPUS: a30_report()}),
        annotate(old, {keys.ANNOTATION_USAGE: '{"version": 1, "devices": []}'}),
        annotate(old, {"mig-guard.io/anything": "1"}),
        relabel(old, {keys.LABEL_MIG_STATE: None}),
        relabel(old, {"mig-guard.io/label": "x"}),
    ):
        verdict = rules.judge(change(old, new), "admin", config_view)
        assert (verdict.allowed, verdict.code) == (False, 403), new["metadata"]


def test_what_the_mutating_webhook_sets_with_an_accepted_change_is_allowed(
    rules: NodeRules, config_view: ConfigView
) -> None:
    old = labelled("all-disabled", **{keys.LABEL_MIG_STATE: "success"})
    hold = HoldRecord(True, False, "all-1g.5gb", "webhook", "2026-01-01T00:00:00Z").to_annotation()
    new = annotate(
        relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_MIG_STATE: "pending"}),
        {keys.ANNOTATION_HOLD: hold, keys.ANNOTATION_REASON: pending_reason("all-1g.5gb")},
    )
    assert rules.judge(change(old, new), "admin", config_view).allowed


def test_on_create_only_the_taint_hold_of_the_mutation_is_allowed(
    rules: NodeRules, config_view: ConfigView
) -> None:
    def created(hold: HoldRecord) -> dict:
        return annotate(
            labelled("all-1g.5gb", **{keys.LABEL_MIG_STATE: "pending"}),
            {
                keys.ANNOTATION_HOLD: hold.to_annotation(),
                keys.ANNOTATION_REASON: pending_reason("all-1g.5gb"),
            },
        )

    def judged(new: dict) -> bool:
        return rules.judge(
            NodeChange(NodeView.of(None), NodeView.of(new), creating=True), "admin", config_view
        ).allowed

    assert judged(created(HoldRecord(True, False, "all-1g.5gb", "webhook", "t")))
    assert not judged(created(HoldRecord(False, True, "all-1g.5gb", "webhook", "t")))


def test_no_hold_record_through_the_status_subresource(rules: NodeRules, config_view: ConfigView) -> None:
    old = labelled("all-disabled")
    pending = relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_MIG_STATE: "pending"})
    pending = annotate(pending, {keys.ANNOTATION_REASON: pending_reason("all-1g.5gb")})
    status = NodeChange(NodeView.of(old), NodeView.of(pending), status=True)
    assert rules.judge(status, "admin", config_view).allowed
    hold = HoldRecord(True, False, "all-1g.5gb", "webhook", "t").to_annotation()
    held = NodeChange(
        NodeView.of(old), NodeView.of(annotate(pending, {keys.ANNOTATION_HOLD: hold})), status=True
    )
    assert rules.judge(held, "admin", config_view).code == 403


def test_a_spoofed_state_rides_no_accepted_change(rules: NodeRules, config_view: ConfigView) -> None:
    old = labelled("all-disabled", **{keys.LABEL_MIG_STATE: "failed"})
    success = relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_MIG_STATE: "success"})
    assert rules.judge(change(old, success), "admin", config_view).code == 403
    hold_for_other = HoldRecord(False, True, "all-7g.40gb", "webhook", "t").to_annotation()
    wrong_hold = annotate(
        relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), {keys.ANNOTATION_HOLD: hold_for_other}
    )
    assert rules.judge(change(old, wrong_hold), "admin", config_view).code == 403
    # Without a change of mig.config the mutation sets nothing, so "pending" is a spoof too.
    pending = relabel(old, {keys.LABEL_MIG_STATE: "pending"})
    assert rules.judge(change(old, pending), "admin", config_view).code == 403


def test_product_label_spellings(rules: NodeRules, config_view: ConfigView) -> None:
    for product in (
        A100,
        "A100-SXM4-40GB",
        "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
        "NVIDIA-A100-SXM4-40GB-SHARED",
    ):
        new = node(labels={**gfd_labels(product), keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
        verdict = rules.judge(change(node(), new), "admin", config_view)
        assert verdict.allowed, (product, verdict)
        assert not verdict.warnings, (product, verdict.warnings)


# --- the device plugin's MIG strategy ------------------------------------------------------------------


def test_under_the_single_strategy_a_mixed_layout_is_denied_naming_what_the_device_plugin_would_do(
    rules: NodeRules, config_view: ConfigView
) -> None:
    single = {keys.LABEL_MIG_STRATEGY: "single"}
    verdict = rules.judge(
        change(labelled(None, **single), labelled("all-balanced", **single)), "admin", config_view
    )
    assert not verdict.allowed and verdict.code == 400
    message = verdict.message
    assert message.startswith('nvidia.com/mig.config="all-balanced" does not suit node gpu-1: ')
    assert "nvidia.com/mig.strategy=single needs one MIG profile on every GPU" in message
    assert "the MIG devices would be of 3 profiles (1g.5gb, 2g.10gb, 3g.20gb)" in message
    assert "device plugin would refuse the node's MIG devices" in message and "-MIG-INVALID" in message
    suggested = message.split("Valid for this node:")[1]
    assert "all-1g.5gb" in suggested and "all-balanced" not in suggested
    # MIG on without any device is as invalid to the device plugin; one profile, or MIG off, is fine.
    assert (
        "no MIG device"
        in rules.judge(
            change(labelled(None, **single), labelled("all-enabled", **single)), "admin", config_view
        ).message
    )
    for fine in ("all-1g.5gb", "all-disabled", "all-3g.20gb"):
        assert rules.judge(
            change(labelled(None, **single), labelled(fine, **single)), "admin", config_view
        ).allowed


def test_the_mixed_strategy_takes_any_layout_and_the_strategy_is_the_one_before_the_request(
    rules: NodeRules, config_view: ConfigView
) -> None:
    mixed = {keys.LABEL_MIG_STRATEGY: "mixed"}
    assert rules.judge(
        change(labelled(None, **mixed), labelled("all-balanced", **mixed)), "admin", config_view
    ).allowed
    # Relabelling the strategy in the same request does not pick the verdict.
    single = {keys.LABEL_MIG_STRATEGY: "single"}
    assert not rules.judge(
        change(labelled(None, **single), labelled("all-balanced", **mixed)), "admin", config_view
    ).allowed


def test_with_a_default_layout_a_reconciler_may_set_only_that_and_only_where_there_is_none(
    resolver: HardwareResolver, config_view: ConfigView
) -> None:
    rules = NodeRules(resolver, [RECONCILER], allow_unbound=True, default_config="all-disabled")
    assert rules.judge(change(labelled(None), labelled("all-disabled")), RECONCILER, config_view).allowed
    for old, new in ((None, "all-1g.5gb"), ("all-1g.5gb", "all-disabled"), ("all-disabled", None)):
        verdict = rules.judge(change(labelled(old), labelled(new)), RECONCILER, config_view)
        assert not verdict.allowed and f"may not change {keys.LABEL_MIG_CONFIG}" in verdict.message
    without = NodeRules(resolver, [RECONCILER], allow_unbound=True)
    assert not without.judge(
        change(labelled(None), labelled("all-disabled")), RECONCILER, config_view
    ).allowed
