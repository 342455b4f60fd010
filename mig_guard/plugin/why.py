"""`kubectl mig why NODE`: why the node is in its state: the reason, the MIGConfigReady condition,
mig-guard's recent Events, the hold, the change in flight and what the reconciler is waiting for.

What the reconciler waits for is read from what it wrote (the state, the reason, the record of a
change in flight), never guessed from elsewhere: a reason that says `waiting for ...` (the
webhook's, a rollout's) is shown as it is.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from kube.node import NodeView
from mig_guard.plugin.cluster import Cluster
from mig_guard.plugin.status import held, parse_time, state_since
from migcore import keys
from migcore.hold import HoldRecord
from migcore.wording import age_text, shorten

NOTE_SHOWN = 160
# What a change in each phase of its record waits for (reconciler.change.Phase).
PHASE_WAITS = {
    "starting": "the change to begin (holding the node, pausing the GPU operands)",
    "pausing": "the paused GPU operands' pods to leave the node",
    "evicting": "the pods on changing GPU instances to be evicted (PodDisruptionBudgets respected)",
    "applying": "NVML to apply the plan, GPU by GPU",
    "rebooting": "the host to come back from the reboot that activates a MIG mode change",
}


def _progress(node: NodeView) -> dict[str, Any] | None:
    raw = node.annotations.get(keys.ANNOTATION_PROGRESS)
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    return {
        "config": body.get("config"),
        "phase": body.get("phase"),
        "step": body.get("step"),
        "startedAt": body.get("startedAt"),
    }


def waiting_for(node: NodeView, change: dict[str, Any] | None) -> str:
    """What the reconciler waits for, from what is written on the node."""
    state = node.labels.get(keys.LABEL_MIG_STATE)
    reason = node.annotations.get(keys.ANNOTATION_REASON, "")
    config = node.mig_config
    if keys.ANNOTATION_GPUS not in node.annotations:
        return "mig-guard's reconciler to report from this node (no GPU report yet)"
    if reason.startswith("waiting for"):
        return reason.removeprefix("waiting for").strip()
    if change is not None and change.get("phase") in PHASE_WAITS:
        return PHASE_WAITS[str(change["phase"])]
    if state == keys.STATE_PENDING:
        return f"the reconciler to take up {config or 'the change'}"
    if state == keys.STATE_REBOOTING:
        return PHASE_WAITS["rebooting"]
    if not config:
        return f"nothing: no {keys.LABEL_MIG_CONFIG} label"
    if state == keys.STATE_SUCCESS:
        return f"nothing: the GPUs hold {config}"
    if state == keys.STATE_FAILED:
        return (
            f"a change of {keys.LABEL_MIG_CONFIG} or of the mig-parted config; the reconciler tries "
            "the same change again at its next resync"
        )
    return f"the reconciler's first report on {config}"


def collect(cluster: Cluster, node_name: str) -> dict[str, Any]:
    node = cluster.node(node_name)
    now = dt.datetime.now(dt.UTC)
    condition = node.condition(keys.CONDITION_READY)
    record = HoldRecord.recorded(node.annotations.get(keys.ANNOTATION_HOLD))
    change = _progress(node)
    since = state_since(node)
    when = parse_time(since)
    events = cluster.events(node.name)
    return {
        "node": node.name,
        "config": node.mig_config or None,
        "state": node.labels.get(keys.LABEL_MIG_STATE) or None,
        "since": since,
        "forSeconds": None if when is None else max(0, int((now - when).total_seconds())),
        "reason": node.annotations.get(keys.ANNOTATION_REASON) or None,
        "condition": None
        if condition is None
        else {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": condition.last_transition_time,
        },
        "hold": {
            "held": held(node),
            "by": None if record is None else record.by,
            "for": None if record is None else record.config,
            "since": None if record is None else record.at,
        },
        "change": change,
        "waitingFor": waiting_for(node, change),
        "events": events
        if isinstance(events, str)
        else [{"time": e.time, "type": e.type, "reason": e.reason, "note": e.note} for e in events],
    }


def _ago(text: str | None, now: dt.datetime) -> str:
    when = parse_time(text)
    return "" if when is None else f" ({age_text((now - when).total_seconds())} ago)"


def render(data: dict[str, Any]) -> str:
    now = dt.datetime.now(dt.UTC)
    state = data["state"] or "(no state yet)"
    duration = "" if data["forSeconds"] is None else f" for {age_text(data['forSeconds'])}"
    out = [f"node {data['node']}: {data['config'] or '(no layout label)'}, {state}{duration}"]
    out.append(f"reason:       {data['reason'] or '-'}")
    cond = data["condition"]
    if cond is None:
        out.append(f"condition:    no {keys.CONDITION_READY} condition yet")
    else:
        out.append(
            f"condition:    {cond['type']}={cond['status']} ({cond['reason']}), since "
            f"{cond['lastTransitionTime'] or '?'}{_ago(cond['lastTransitionTime'], now)}"
        )
    hold = data["hold"]
    if hold["held"]:
        by = f" by the {hold['by']} for {hold['for']}, since {hold['since']}" if hold["by"] else ""
        out.append(f"hold:         {' and '.join(hold['held'])}{by}")
    else:
        out.append("hold:         none (new pods may land on its GPUs)")
    change = data["change"]
    if change is None:
        out.append("change:       none in flight")
    else:
        out.append(
            f"change:       to {change['config']}, phase {change['phase']}, started {change['startedAt']}"
            f"{_ago(change['startedAt'], now)}"
        )
    out.append(f"waiting for:  {data['waitingFor']}")
    events = data["events"]
    if isinstance(events, str):
        out.append(f"events:       {events}")
    elif not events:
        out.append("events:       none from mig-guard")
    else:
        out.append(f"events (mig-guard's latest {len(events)}):")
        for e in events:
            age = _ago(e["time"], now).strip(" ()").removesuffix(" ago") or "?"
            out.append(f"  {age:>5}  {e['type']:<7}  {e['reason']:<15}  {shorten(e['note'], NOTE_SHOWN)}")
    return "\n".join(out)
