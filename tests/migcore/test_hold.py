"""The hold record shared by the webhook (writes it in the admin's request) and the reconciler."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migcore.hold import HoldRecord


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
