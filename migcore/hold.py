"""The hold: what mig-guard does to keep new pods off a node while its GPUs are repartitioned, and
the `mig-guard.io/hold` annotation that records it. One policy for the webhook (which holds the
node in the admin's own write) and the reconciler (which holds it when no webhook did, and lifts
every hold); each of them only encodes the decision as its own kind of patch.

The record is compact JSON, e.g.
`{"at":"...","by":"webhook","config":"all-1g.5gb","cordon":false,"taint":true}`. `cordon` is true
only when mig-guard set `spec.unschedulable` itself, so lifting the hold undoes exactly that and
never uncordons a node an admin cordoned. mig-guard's taint is its key with its effect (a taint is
identified by both); its value names the layout being applied.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from migcore import keys

MAX_ANNOTATION_BYTES = 4096
BY_WEBHOOK = "webhook"
BY_RECONCILER = "reconciler"

Taint = Mapping[str, Any]  # a taint as the API's JSON has it: key, value, effect, timeAdded


class HoldMode(enum.StrEnum):
    """How a node is kept free of new pods while its GPUs are repartitioned."""

    TAINT = "taint"
    CORDON = "cordon"


def pending_reason(config: str) -> str:
    """The `mig-guard.io/reason` the webhook sets with an accepted layout (the reconciler knows it
    as the one reason that is not its own, see `reconciler.ownership`)."""
    return f"waiting for the reconciler to apply {config}"


@dataclass(frozen=True)
class HoldRecord:
    taint: bool
    cordon: bool
    config: str
    by: str
    at: str

    def to_annotation(self) -> str:
        body = {
            "taint": self.taint,
            "cordon": self.cordon,
            "config": self.config,
            "by": self.by,
            "at": self.at,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    def same_hold(self, other: HoldRecord) -> bool:
        """Equal apart from the time stamp (so re-invocation does not rewrite it)."""
        return (self.taint, self.cordon, self.config, self.by) == (
            other.taint,
            other.cordon,
            other.config,
            other.by,
        )

    def annotation_over(self, current: str | None) -> str:
        """The annotation to write where `current` stands: `current` itself when it records the same
        hold (its time stamp kept, so writing again changes nothing), else this record."""
        found = HoldRecord.from_annotation(current)
        if current is not None and found is not None and found.same_hold(self):
            return current
        return self.to_annotation()

    @staticmethod
    def from_annotation(text: str | None) -> HoldRecord | None:
        """The record in `text`, or None when absent or not a well-formed hold record."""
        if not text or len(text) > MAX_ANNOTATION_BYTES:
            return None
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        taint, cordon = raw.get("taint"), raw.get("cordon")
        config, by, at = raw.get("config"), raw.get("by"), raw.get("at", "")
        if not isinstance(taint, bool) or not isinstance(cordon, bool):
            return None
        if not isinstance(config, str) or not isinstance(by, str) or not isinstance(at, str):
            return None
        return HoldRecord(taint, cordon, config, by, at)

    @staticmethod
    def recorded(text: str | None) -> HoldRecord | None:
        """For undoing a hold: None only when no record exists at all.

        An unreadable record still says "mig-guard held this node": it is replaced by one that
        claims nothing (no cordon to undo; mig-guard's own taint goes anyway), so the annotation
        is cleaned up and no second hold is stacked on top.
        """
        if not text:
            return None
        return HoldRecord.from_annotation(text) or HoldRecord(False, False, "", "", "")


# --- the taint ------------------------------------------------------------------------------------


def is_hold_taint(taint: Taint) -> bool:
    """mig-guard's own taint: its key with its effect."""
    return taint.get("key") == keys.TAINT_KEY and taint.get("effect") == keys.TAINT_EFFECT


def hold_taint(config: str) -> dict[str, Any]:
    return {"key": keys.TAINT_KEY, "value": config, "effect": keys.TAINT_EFFECT}


def hold_taint_index(taints: Sequence[Taint]) -> int | None:
    """Where mig-guard's taint stands in `taints` (None: not there)."""
    return next((i for i, taint in enumerate(taints) if is_hold_taint(taint)), None)


def with_hold_taint(taints: Sequence[Taint], config: str) -> list[Taint] | None:
    """`taints` with mig-guard's taint naming `config` (added, or its value set; the others as they
    are); None when it is there already."""
    index = hold_taint_index(taints)
    if index is None:
        return [*taints, hold_taint(config)]
    if taints[index].get("value") == config:
        return None
    return [{**t, "value": config} if i == index else t for i, t in enumerate(taints)]


def without_hold_taint(taints: Sequence[Taint]) -> list[Taint] | None:
    """`taints` without mig-guard's taint; None when it is not there."""
    if hold_taint_index(taints) is None:
        return None
    return [t for t in taints if not is_hold_taint(t)]


# --- the decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """A hold to take: the record to write, and what it asks of the node (`taint`: mig-guard's taint
    naming the layout; `cordon`: the node unschedulable, set only where it is not)."""

    record: HoldRecord
    taint: bool
    cordon: bool


def decide_hold(
    mode: HoldMode,
    config: str,
    *,
    by: str,
    at: str,
    unschedulable: bool,
    previous: HoldRecord | None = None,
    creating: bool = False,
) -> Hold:
    """The hold for a change to `config` on a node that is `unschedulable` or not, over the hold
    `previous` recorded for an earlier change (kept: what mig-guard did then is undone later too).

    A node being created is held by the taint in either mode: a record of a cordon in a new object
    could not be told apart from its creator's, and would make the reconciler later uncordon a node
    created cordoned on purpose (a new node has no pods; the taint keeps new ones off the same way).
    """
    mode = HoldMode(mode)  # a plain "taint" or "cordon" too
    if creating:
        return Hold(HoldRecord(True, False, config, by, at), taint=True, cordon=False)
    if mode is HoldMode.TAINT:
        cordoned = previous.cordon if previous is not None else False
        return Hold(HoldRecord(True, cordoned, config, by, at), taint=True, cordon=False)
    # True only if mig-guard cordons it now, or already did for an earlier change.
    cordon = (previous is not None and previous.cordon) or not unschedulable
    tainted = previous.taint if previous is not None else False
    return Hold(HoldRecord(tainted, cordon, config, by, at), taint=False, cordon=True)


@dataclass(frozen=True)
class Release:
    """What lifting a hold undoes: mig-guard's taint, the cordon it set, the record."""

    untaint: bool
    uncordon: bool
    forget: bool


def decide_release(record: HoldRecord | None, taints: Sequence[Taint], unschedulable: bool) -> Release:
    """Undo exactly what `record` says (never uncordon a node an admin cordoned). mig-guard's taint
    goes whatever the record says: nobody else sets it."""
    return Release(
        untaint=hold_taint_index(taints) is not None,
        uncordon=record is not None and record.cordon and unschedulable,
        forget=record is not None,
    )
