"""`kubectl mig status [NODE...]`: the fleet at a glance: each node's GPUs, layout, state, for how
long, why, and whether mig-guard holds it."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from typing import Any

from kube.node import NodeView
from mig_guard.plugin.cluster import Cluster
from mig_guard.plugin.text import table
from migcore import keys
from migcore.hardware import HardwareReportError, NodeGpus
from migcore.hold import HoldRecord
from migcore.wording import age_text, shorten

REASON_SHOWN = 90


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def gpus_of(node: NodeView) -> dict[str, Any]:
    """The node's GPUs in words (`A100-SXM4-40GB x8`), from its report, else from GFD's labels."""
    text = node.annotations.get(keys.ANNOTATION_GPUS)
    if text:
        try:
            report = NodeGpus.from_annotation(text)
            names = Counter(g.name.removeprefix("NVIDIA ") for g in report.gpus)
            words = ", ".join(f"{name} x{n}" for name, n in names.items()) or "no GPUs"
            return {"text": words, "count": len(report.gpus), "source": keys.ANNOTATION_GPUS}
        except HardwareReportError:
            pass
    product = node.labels.get(keys.LABEL_GPU_PRODUCT)
    if not product:
        return {"text": "-", "count": None, "source": None}
    count = node.labels.get(keys.LABEL_GPU_COUNT, "?")
    return {
        "text": f"{product.removeprefix('NVIDIA-')} x{count} (labels)",
        "count": int(count) if count.isdigit() else None,
        "source": "labels",
    }


def held(node: NodeView) -> list[str]:
    """What mig-guard holds the node with (its record; its taint even without one)."""
    record = HoldRecord.recorded(node.annotations.get(keys.ANNOTATION_HOLD))
    out = []
    if (record is not None and record.taint) or any(
        t.get("key") == keys.TAINT_KEY and t.get("effect") == keys.TAINT_EFFECT for t in node.taints
    ):
        out.append("taint")
    if record is not None and record.cordon:
        out.append("cordon")
    return out


def state_since(node: NodeView) -> str | None:
    """When the node entered its state: a change's start while pending, else when its reason was
    last written (the MIGConfigReady condition's heartbeat)."""
    state = node.labels.get(keys.LABEL_MIG_STATE)
    if state == keys.STATE_PENDING:
        raw = node.annotations.get(keys.ANNOTATION_PROGRESS)
        if raw:
            try:
                started = json.loads(raw).get("startedAt")
                if isinstance(started, str) and started:
                    return started
            except ValueError:
                pass
        record = HoldRecord.recorded(node.annotations.get(keys.ANNOTATION_HOLD))
        if record is not None and record.at:
            return record.at
    condition = node.condition(keys.CONDITION_READY)
    if condition is None:
        return None
    return condition.last_heartbeat_time or condition.last_transition_time


def node_status(node: NodeView, now: dt.datetime) -> dict[str, Any]:
    since = state_since(node)
    when = parse_time(since)
    return {
        "node": node.name,
        "gpus": gpus_of(node),
        "config": node.labels.get(keys.LABEL_MIG_CONFIG) or None,
        "state": node.labels.get(keys.LABEL_MIG_STATE) or None,
        "since": since,
        "forSeconds": None if when is None else max(0, int((now - when).total_seconds())),
        "held": held(node),
        "reason": node.annotations.get(keys.ANNOTATION_REASON) or None,
    }


def collect(cluster: Cluster, names: list[str]) -> dict[str, Any]:
    nodes = [cluster.node(n) for n in names] if names else cluster.gpu_nodes()
    now = dt.datetime.now(dt.UTC)
    return {"nodes": [node_status(n, now) for n in nodes]}


def render(data: dict[str, Any]) -> str:
    if not data["nodes"]:
        return f"no GPU nodes (none has {keys.LABEL_MIG_CONFIG}, {keys.LABEL_GPU_PRODUCT} or {keys.ANNOTATION_GPUS})"
    rows = [
        [
            n["node"],
            n["gpus"]["text"],
            n["config"] or "-",
            n["state"] or "-",
            "-" if n["forSeconds"] is None else age_text(n["forSeconds"]),
            ",".join(n["held"]) or "-",
            shorten(n["reason"] or "-", REASON_SHOWN),
        ]
        for n in data["nodes"]
    ]
    return table(["NODE", "GPUS", "CONFIG", "STATE", "FOR", "HELD", "REASON"], rows)
