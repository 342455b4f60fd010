"""Rotation decisions across a certificate's life, with the clock passed in."""

from __future__ import annotations

import datetime as dt

import pytest

from certs.authority import CertifiedKey, KeySpec, KeyType, generate_ca, issue_serving_cert, service_dns_names
from certs.rotation import Action, Policy, decide

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
POLICY = Policy(
    leaf_validity=365 * DAY, leaf_renew_before=30 * DAY, ca_validity=3650 * DAY, ca_renew_before=365 * DAY
)
NAMES = service_dns_names("wh", "ns")
ECDSA = KeySpec()


@pytest.fixture(scope="module")
def ca() -> CertifiedKey:
    return generate_ca("ca", T0, POLICY.ca_validity)


@pytest.fixture(scope="module")
def leaf(ca: CertifiedKey) -> CertifiedKey:
    return issue_serving_cert(ca, NAMES, T0, POLICY.leaf_validity)


def action_at(ca: CertifiedKey | None, leaf: CertifiedKey | None, when: dt.datetime, **kw: object) -> Action:
    names = kw.pop("names", NAMES)
    spec = kw.pop("key_spec", ECDSA)
    return decide(ca, leaf, names, key_spec=spec, policy=POLICY, now=when).action  # type: ignore[arg-type]


def test_nothing_stored_creates_everything() -> None:
    assert action_at(None, None, T0) is Action.CREATE


def test_a_lost_ca_recreates_everything_even_with_a_leaf(leaf: CertifiedKey) -> None:
    assert action_at(None, leaf, T0) is Action.CREATE


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0 * DAY, Action.KEEP),
        (200 * DAY, Action.KEEP),
        (334 * DAY, Action.KEEP),  # 31 days left
        (335 * DAY, Action.RENEW_LEAF),  # exactly 30 days left: the window starts
        (364 * DAY, Action.RENEW_LEAF),
        (400 * DAY, Action.RENEW_LEAF),  # already expired
    ],
)
def test_leaf_is_renewed_inside_its_window_only(
    ca: CertifiedKey, leaf: CertifiedKey, age: dt.timedelta, expected: Action
) -> None:
    assert action_at(ca, leaf, T0 + age) is expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (3284 * DAY, Action.KEEP),  # CA: 366 days left; its leaf issued a day ago
        (3285 * DAY, Action.RENEW_CA),  # 365 days left
        (3700 * DAY, Action.RENEW_CA),  # expired
    ],
)
def test_ca_is_renewed_only_when_it_nears_its_own_end(
    ca: CertifiedKey, age: dt.timedelta, expected: Action
) -> None:
    issued = min(T0 + age - DAY, ca.cert.not_valid_after_utc - 2 * DAY)  # a recently renewed leaf
    fresh_leaf = issue_serving_cert(ca, NAMES, issued, POLICY.leaf_validity)
    assert action_at(ca, fresh_leaf, T0 + age) is expected


def test_leaf_expiry_never_renews_the_ca(ca: CertifiedKey, leaf: CertifiedKey) -> None:
    for days in range(0, 1000, 7):
        assert action_at(ca, leaf, T0 + days * DAY) in (Action.KEEP, Action.RENEW_LEAF)


def test_a_ca_from_a_clock_running_ahead_is_replaced(ca: CertifiedKey, leaf: CertifiedKey) -> None:
    decision = decide(ca, leaf, NAMES, key_spec=ECDSA, policy=POLICY, now=T0 - DAY)
    assert decision.action is Action.RENEW_CA
    assert "not valid yet" in decision.reason


def test_missing_leaf_is_reissued_from_the_same_ca(ca: CertifiedKey) -> None:
    assert action_at(ca, None, T0) is Action.RENEW_LEAF


def test_leaf_from_another_ca_is_reissued(ca: CertifiedKey) -> None:
    other = generate_ca("other", T0, POLICY.ca_validity)
    foreign = issue_serving_cert(other, NAMES, T0, POLICY.leaf_validity)
    assert action_at(ca, foreign, T0) is Action.RENEW_LEAF


def test_changed_names_reissue_the_leaf(ca: CertifiedKey, leaf: CertifiedKey) -> None:
    decision = decide(ca, leaf, [*NAMES, "127.0.0.1"], key_spec=ECDSA, policy=POLICY, now=T0)
    assert decision.action is Action.RENEW_LEAF
    assert "127.0.0.1" in decision.reason
    assert action_at(ca, leaf, T0, names=NAMES[:2]) is Action.RENEW_LEAF


def test_changed_key_type_reissues_the_leaf(ca: CertifiedKey, leaf: CertifiedKey) -> None:
    assert action_at(ca, leaf, T0, key_spec=KeySpec(KeyType.RSA, 2048)) is Action.RENEW_LEAF


def test_a_leaf_where_the_ca_slot_is_is_replaced(leaf: CertifiedKey) -> None:
    assert action_at(leaf, leaf, T0) is Action.RENEW_CA


@pytest.mark.parametrize(
    "kwargs",
    [
        {"leaf_validity": 30 * DAY, "leaf_renew_before": 30 * DAY},
        {"ca_validity": 100 * DAY, "ca_renew_before": 200 * DAY},
        {"leaf_renew_before": -DAY},
    ],
)
def test_policies_that_would_renew_on_every_run_are_refused(kwargs: dict[str, dt.timedelta]) -> None:
    with pytest.raises(ValueError, match="renew-before"):
        Policy(**kwargs)
