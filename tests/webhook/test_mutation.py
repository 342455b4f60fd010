"""The hold patch: what it sets, and that it is idempotent (a property over many node shapes)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from webhook_harness import annotate, apply_patch, gfd_labels, node, relabel

from kube.node import NodeView
from migcore import keys
from migcore.hold import HoldMode, HoldRecord
from webhook.mutation import mutation_patch, pointer
from webhook.validation import NodeChange

NOW = "2026-11-28T15:00:00Z"
LATER = "2026-11-28T15:00:07Z"


def mutate(old: dict | None, new: dict, mode: HoldMode | None, now: str = NOW) -> tuple[list[Any], dict]:
    creating = old is None
    ops = mutation_patch(NodeChange(NodeView.of(old), NodeView.of(new)), mode, creating, now)
    return list(ops), apply_patch(new, ops)


def hold_of(obj: dict) -> HoldRecord:
    record = HoldRecord.from_annotation(obj["metadata"]["annotations"][keys.ANNOTATION_HOLD])
    assert record is not None
    return record


def our_taints(obj: dict) -> list[dict]:
    return [t for t in obj["spec"].get("taints", []) if t["key"] == keys.TAINT_KEY]


def test_pointer_escapes_slashes_and_tildes() -> None:
    assert (
        pointer("metadata", "labels", "nvidia.com/mig.config.state")
        == "/metadata/labels/nvidia.com~1mig.config.state"
    )
    assert pointer("a~b") == "/a~0b"


def test_accepted_change_sets_pending_taints_and_records_the_hold() -> None:
    old = node(labels=gfd_labels())
    new = relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    _, result = mutate(old, new, HoldMode.TAINT)
    assert result["metadata"]["labels"][keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert our_taints(result) == [{"key": keys.TAINT_KEY, "value": "all-1g.5gb", "effect": "NoSchedule"}]
    assert hold_of(result) == HoldRecord(True, False, "all-1g.5gb", "webhook", NOW)
    assert (
        result["metadata"]["annotations"][keys.ANNOTATION_REASON]
        == "waiting for the reconciler to apply all-1g.5gb"
    )
    assert "unschedulable" not in result["spec"]


def test_without_an_admission_hold_the_change_is_pending_and_the_node_not_held() -> None:
    """With a rollout budget the reconciler holds the node when its slot is free: a push to a whole
    pool must not hold the pool at admission."""
    old = node(labels=gfd_labels())
    for before in (old, None):  # a change, and a node created with the label
        _, result = mutate(before, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), None)
        assert result["metadata"]["labels"][keys.LABEL_MIG_STATE] == keys.STATE_PENDING
        assert result["metadata"]["annotations"][keys.ANNOTATION_REASON] == (
            "waiting for the reconciler to apply all-1g.5gb"
        )
        assert keys.ANNOTATION_HOLD not in result["metadata"]["annotations"]
        assert our_taints(result) == [] and "unschedulable" not in result["spec"]


def test_a_second_change_replaces_the_taint_value_without_duplicating() -> None:
    old = node(
        labels=gfd_labels(), taints=[{"key": keys.TAINT_KEY, "value": "all-1g.5gb", "effect": "NoSchedule"}]
    )
    old = relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    _, result = mutate(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-7g.40gb"}), HoldMode.TAINT)
    assert our_taints(result) == [{"key": keys.TAINT_KEY, "value": "all-7g.40gb", "effect": "NoSchedule"}]


def test_other_taints_are_kept() -> None:
    other = {"key": "dedicated", "value": "ml", "effect": "NoExecute"}
    old = node(labels=gfd_labels(), taints=[other])
    _, result = mutate(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), HoldMode.TAINT)
    assert result["spec"]["taints"][0] == other
    assert len(our_taints(result)) == 1


def test_cordon_mode_cordons_and_records_it() -> None:
    old = node(labels=gfd_labels())
    _, result = mutate(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), HoldMode.CORDON)
    assert result["spec"]["unschedulable"] is True
    assert hold_of(result).cordon is True
    assert our_taints(result) == []


def test_a_node_an_admin_cordoned_is_not_recorded_as_ours() -> None:
    old = node(labels=gfd_labels(), unschedulable=True)
    _, result = mutate(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), HoldMode.CORDON)
    assert result["spec"]["unschedulable"] is True
    assert hold_of(result).cordon is False


def test_a_cordon_mig_guard_made_earlier_stays_recorded() -> None:
    earlier = HoldRecord(False, True, "all-1g.5gb", "webhook", NOW).to_annotation()
    old = annotate(node(labels=gfd_labels(), unschedulable=True), {keys.ANNOTATION_HOLD: earlier})
    old = relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb", keys.LABEL_MIG_STATE: "pending"})
    for mode in HoldMode:
        _, result = mutate(old, relabel(old, {keys.LABEL_MIG_CONFIG: "all-2g.10gb"}), mode, LATER)
        assert hold_of(result).cordon is True, mode
        assert hold_of(result).config == "all-2g.10gb"


def test_a_user_cannot_fake_an_earlier_cordon_record_in_the_request() -> None:
    fake = HoldRecord(False, True, "all-1g.5gb", "webhook", NOW).to_annotation()
    old = node(labels=gfd_labels(), unschedulable=True)  # cordoned by an admin
    new = annotate(relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), {keys.ANNOTATION_HOLD: fake})
    _, result = mutate(old, new, HoldMode.CORDON)
    assert hold_of(result).cordon is False


def test_create_with_the_label_is_held() -> None:
    new = relabel(node(labels=gfd_labels()), {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    new["metadata"].pop("annotations", None)
    new.pop("spec")
    _, result = mutate(None, new, HoldMode.TAINT)
    assert result["spec"]["taints"][0]["key"] == keys.TAINT_KEY
    assert mutate(None, result, HoldMode.TAINT, LATER)[0] == []


def test_a_hold_record_forged_on_create_is_replaced_and_a_new_node_is_held_by_taint() -> None:
    forged = HoldRecord(False, True, "all-1g.5gb", "webhook", NOW).to_annotation()
    new = annotate(
        relabel(node(labels=gfd_labels(), unschedulable=True), {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}),
        {keys.ANNOTATION_HOLD: forged},
    )
    for mode in HoldMode:
        _, result = mutate(None, new, mode)
        record = hold_of(result)
        assert (record.taint, record.cordon) == (True, False)
        assert [t["key"] for t in our_taints(result)] == [keys.TAINT_KEY]
        assert mutate(None, result, mode, LATER)[0] == []


def test_a_change_through_the_status_subresource_gets_no_hold() -> None:
    """The API server drops spec changes made through nodes/status: the reconciler holds instead."""
    old = node(labels=gfd_labels())
    new = relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    change = NodeChange(NodeView.of(old), NodeView.of(new), status=True)
    ops = mutation_patch(change, HoldMode.TAINT, False, NOW)
    result = apply_patch(new, ops)
    assert result["metadata"]["labels"][keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    assert keys.ANNOTATION_HOLD not in result["metadata"].get("annotations", {})
    assert all(not op["path"].startswith("/spec") for op in ops)


def test_no_patch_without_a_change_of_the_layout() -> None:
    old = relabel(node(labels=gfd_labels()), {keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    assert mutate(old, relabel(old, {"team": "x"}), HoldMode.TAINT)[0] == []
    assert mutate(old, relabel(old, {keys.LABEL_MIG_CONFIG: None}), HoldMode.TAINT)[0] == []


# --- idempotency as a property -------------------------------------------------------------------

CONFIGS = st.sampled_from(["all-1g.5gb", "all-2g.10gb", "all-7g.40gb", "all-disabled"])
TAINT = st.fixed_dictionaries(
    {
        "key": st.sampled_from([keys.TAINT_KEY, "dedicated", "gpu"]),
        "effect": st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"]),
    },
    optional={"value": st.sampled_from(["all-1g.5gb", "all-7g.40gb", "x", ""])},
)
HOLD = st.builds(
    lambda t, c, cfg, by: HoldRecord(t, c, cfg, by, NOW).to_annotation(),
    st.booleans(),
    st.booleans(),
    CONFIGS,
    st.sampled_from(["webhook", "reconciler"]),
)


@st.composite
def node_objects(draw: st.DrawFn, config: str | None) -> dict:
    labels = {**gfd_labels()}
    if config is not None:
        labels[keys.LABEL_MIG_CONFIG] = config
    if draw(st.booleans()):
        labels[keys.LABEL_MIG_STATE] = draw(st.sampled_from(keys.STATES))
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "gpu-1", "labels": labels},
    }
    annotations = {}
    if draw(st.booleans()):
        annotations[keys.ANNOTATION_HOLD] = draw(st.one_of(HOLD, st.just("garbage")))
    if draw(st.booleans()):
        annotations["other"] = "x"
    if annotations or draw(st.booleans()):
        obj["metadata"]["annotations"] = annotations
    if draw(st.booleans()):
        spec: dict[str, Any] = {}
        taints = draw(st.lists(TAINT, max_size=3, unique_by=lambda t: (t["key"], t["effect"])))
        if taints or draw(st.booleans()):
            spec["taints"] = taints
        if draw(st.booleans()):
            spec["unschedulable"] = draw(st.booleans())
        obj["spec"] = spec
    return obj


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    old_config=st.one_of(st.none(), CONFIGS),
    new_config=CONFIGS,
    mode=st.sampled_from(list(HoldMode)),
    creating=st.booleans(),
)
def test_patch_is_idempotent_and_holds_exactly_once(
    data: st.DataObject, old_config: str | None, new_config: str, mode: HoldMode, creating: bool
) -> None:
    old = None if creating else data.draw(node_objects(old_config))
    new = data.draw(node_objects(new_config))
    ops, once = mutate(old, new, mode)
    if not creating and old_config == new_config:
        assert ops == []
        return
    assert mutate(old, once, mode, LATER)[0] == []  # re-invocation: nothing more to do
    assert once["metadata"]["labels"][keys.LABEL_MIG_STATE] == keys.STATE_PENDING
    record = hold_of(once)
    assert record.config == new_config
    if mode is HoldMode.TAINT or creating:  # a new node is held by the taint in either mode
        ours = [t for t in our_taints(once) if t["effect"] == "NoSchedule"]
        assert len(ours) == 1
        assert ours[0]["value"] == new_config
        assert record.taint
    else:
        assert once["spec"]["unschedulable"] is True
    if creating:  # nothing in a new object is trusted: no cordon is ever recorded
        assert not record.cordon
        return
    assert old is not None
    was_cordoned = bool(old.get("spec", {}).get("unschedulable"))
    earlier = HoldRecord.from_annotation((old["metadata"].get("annotations") or {}).get(keys.ANNOTATION_HOLD))
    if record.cordon:
        # Only mig-guard's own cordon is recorded: set now, or recorded before.
        assert (mode is HoldMode.CORDON and not was_cordoned) or (earlier is not None and earlier.cordon)
    json.dumps(ops)  # the patch is plain JSON
