"""What to do with the stored certificates: create, keep, renew the leaf, or renew the CA.

Pure: it looks at certificates and a clock reading passed in, so every branch is unit-testable
at any moment in a certificate's life. The CA is renewed only when the CA itself nears its end,
never because of the leaf: a stable CA means a stable ``caBundle`` across Helm upgrades and
Argo CD re-renders.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from certs.authority import CertifiedKey, KeySpec, is_ca, key_spec_of, signed_by, subject_alt_names


class Action(Enum):
    CREATE = "create"  # nothing usable stored: new CA, new leaf
    KEEP = "keep"  # both fine: change nothing
    RENEW_LEAF = "renew-leaf"  # new serving certificate from the same CA
    RENEW_CA = "renew-ca"  # CA near its end: new CA and leaf; the old CA stays in the bundle while valid


@dataclass(frozen=True)
class Policy:
    """Lifetimes and renewal windows. A window must be shorter than the lifetime, or every run renews."""

    leaf_validity: dt.timedelta = dt.timedelta(days=365)
    leaf_renew_before: dt.timedelta = dt.timedelta(days=30)
    ca_validity: dt.timedelta = dt.timedelta(days=3650)
    ca_renew_before: dt.timedelta = dt.timedelta(days=365)

    def __post_init__(self) -> None:
        if self.leaf_renew_before >= self.leaf_validity:
            raise ValueError("the leaf renew-before window must be shorter than the leaf validity")
        if self.ca_renew_before >= self.ca_validity:
            raise ValueError("the CA renew-before window must be shorter than the CA validity")
        if self.leaf_renew_before < dt.timedelta(0) or self.ca_renew_before < dt.timedelta(0):
            raise ValueError("renew-before windows cannot be negative")


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(
    ca: CertifiedKey | None,
    leaf: CertifiedKey | None,
    names: Iterable[str],
    *,
    key_spec: KeySpec,
    policy: Policy,
    now: dt.datetime,
) -> Decision:
    """Decide from what is stored (``None`` = missing or unusable) what the run must do.

    ``names`` are the subject alternative names the leaf must carry exactly; ``key_spec`` is the
    wanted leaf key (a change re-issues the leaf, the CA keeps its key).
    """
    if ca is None:
        return Decision(Action.CREATE, "no usable CA stored")
    if not is_ca(ca.cert):
        return Decision(Action.RENEW_CA, "the stored CA certificate is not a CA")
    if now < ca.cert.not_valid_before_utc:  # made by a clock running ahead: nothing it signs verifies
        return Decision(Action.RENEW_CA, "the stored CA is not valid yet")
    ca_end = ca.cert.not_valid_after_utc
    if now >= ca_end - policy.ca_renew_before:
        return Decision(Action.RENEW_CA, f"the CA expires at {ca_end.isoformat()}")
    if leaf is None:
        return Decision(Action.RENEW_LEAF, "no usable serving certificate stored")
    if not signed_by(leaf.cert, ca.cert):
        return Decision(Action.RENEW_LEAF, "the serving certificate was not issued by the stored CA")
    wanted = set(names)
    have = subject_alt_names(leaf.cert)
    if have != wanted:
        added, removed = sorted(wanted - have), sorted(have - wanted)
        return Decision(Action.RENEW_LEAF, f"names changed (add {added}, remove {removed})")
    if key_spec_of(leaf.key) != key_spec:
        return Decision(Action.RENEW_LEAF, f"key type changed to {key_spec.key_type.value}")
    if now < leaf.cert.not_valid_before_utc:
        return Decision(Action.RENEW_LEAF, "the serving certificate is not valid yet")
    leaf_end = leaf.cert.not_valid_after_utc
    if now >= leaf_end - policy.leaf_renew_before:
        return Decision(Action.RENEW_LEAF, f"the serving certificate expires at {leaf_end.isoformat()}")
    return Decision(Action.KEEP, f"valid until {leaf_end.isoformat()}, CA until {ca_end.isoformat()}")
