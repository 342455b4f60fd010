"""The hold record shared by the webhook (writes it in the admin's request) and the reconciler."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migcore import keys
from migcore.hold import (
    BY_RECONCILER,
    BY_WEBHOOK,
    HoldMode,
    HoldRecord,
    Release,
    decide_hold,
    decide_release,
    hold_taint,
    hold_taint_index,
    with_hold_taint,
    without_hold_taint,
)


@given(
    st.booleans(),
    st.booleans(),
    st.text(max_size=40),
    st.sampled_from(["webhook", "reconciler"]),
    st.text(max_size=25),
)
def test_round_trip(taint: bool, cordon: bool, config: str, by: str, at: str) -> None:
    record = HoldRecord(taint, cordon, config, by, at)
    assert HoldRecord.from_annotation(record.to_annotation()) == record


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        '{"taint":"yes","cordon":false,"config":"x","by":"webhook"}',
        '{"taint":true}',
        "x" * 5000,
    ],
)
def test_malformed_records_are_not_records(text: str) -> None:
    assert HoldRecord.from_annotation(text) is None


def test_an_unreadable_record_still_counts_as_held_but_claims_no_cordon() -> None:
    assert HoldRecord.recorded(None) is None
    assert HoldRecord.recorded("") is None
    held = HoldRecord.recorded("{garbage")
    assert held is not None
    assert held.cordon is False  # never uncordon on the word of an unreadable record


def test_same_hold_ignores_only_the_time() -> None:
    a = HoldRecord(True, False, "all-1g.5gb", "webhook", "2026-01-01T00:00:00Z")
    assert a.same_hold(HoldRecord(True, False, "all-1g.5gb", "webhook", "2026-02-02T00:00:00Z"))
    assert not a.same_hold(HoldRecord(True, True, "all-1g.5gb", "webhook", a.at))
    assert not a.same_hold(HoldRecord(True, False, "all-2g.10gb", "webhook", a.at))


# --- the policy: the webhook and the reconciler take and lift holds by these decisions ------------

OURS = {"key": keys.TAINT_KEY, "value": "all-1g.5gb", "effect": keys.TAINT_EFFECT}


def test_taint_mode_taints_and_keeps_a_cordon_mig_guard_set_earlier() -> None:
    hold = decide_hold(HoldMode.TAINT, "all-2g.10gb", by=BY_WEBHOOK, at="t", unschedulable=True)
    assert (hold.taint, hold.cordon) == (True, False)
    assert hold.record == HoldRecord(True, False, "all-2g.10gb", BY_WEBHOOK, "t")
    earlier = HoldRecord(False, True, "all-1g.5gb", BY_RECONCILER, "s")
    again = decide_hold(
        HoldMode.TAINT, "all-2g.10gb", by=BY_WEBHOOK, at="t", unschedulable=True, previous=earlier
    )
    assert again.record.cordon  # still mig-guard's cordon to undo later


def test_cordon_mode_records_a_cordon_only_where_mig_guard_sets_it() -> None:
    fresh = decide_hold(HoldMode.CORDON, "x", by=BY_RECONCILER, at="t", unschedulable=False)
    assert (fresh.taint, fresh.cordon, fresh.record.cordon, fresh.record.taint) == (False, True, True, False)
    admins = decide_hold(HoldMode.CORDON, "x", by=BY_RECONCILER, at="t", unschedulable=True)
    assert not admins.record.cordon  # the admin's cordon: never ours to undo


def test_a_node_being_created_is_held_by_the_taint_in_either_mode() -> None:
    for mode in HoldMode:
        hold = decide_hold(mode, "x", by=BY_WEBHOOK, at="t", unschedulable=True, creating=True)
        assert (hold.taint, hold.cordon, hold.record.cordon) == (True, False, False)


def test_the_taint_is_matched_by_key_and_effect() -> None:
    other_effect = {**OURS, "effect": "NoExecute"}
    assert hold_taint_index([other_effect]) is None
    assert with_hold_taint([other_effect], "x") == [other_effect, hold_taint("x")]
    assert with_hold_taint([OURS], "all-1g.5gb") is None  # already there
    assert with_hold_taint([other_effect, OURS], "y") == [other_effect, {**OURS, "value": "y"}]
    assert without_hold_taint([other_effect]) is None
    assert without_hold_taint([other_effect, OURS]) == [other_effect]


def test_release_undoes_what_the_record_says() -> None:
    ours = HoldRecord(True, True, "x", BY_WEBHOOK, "t")
    assert decide_release(ours, [OURS], unschedulable=True) == Release(True, True, True)
    assert decide_release(ours, [], unschedulable=False) == Release(False, False, True)
    assert decide_release(HoldRecord(True, False, "x", BY_WEBHOOK, "t"), [], True).uncordon is False
    assert decide_release(None, [OURS], unschedulable=True) == Release(True, False, False)


def test_a_record_of_the_same_hold_is_not_rewritten() -> None:
    now = HoldRecord(True, False, "x", BY_WEBHOOK, "later")
    current = HoldRecord(True, False, "x", BY_WEBHOOK, "earlier").to_annotation()
    assert now.annotation_over(current) == current
    assert now.annotation_over(None) == now.to_annotation()
    assert now.annotation_over("{garbage") == now.to_annotation()
