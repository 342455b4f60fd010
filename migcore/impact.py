"""What a change of layout would do to a node, before it happens: which GPUs change, what is
destroyed and created on each, which pods are evicted, which GPUs stay untouched.

The webhook answers an accepted `kubectl label` (and `--dry-run=server`) with these lines as
warnings, and `kubectl mig plan` prints them. The plan comes from the planner the reconciler runs
(`check_config`, `desired_geometries`, `plan_node`) on the GPUs of the node's hardware report, and
the pods from its usage report through the same `pods_to_move`, so the preview names the pods the
change then evicts (as long as the GPUs and pods stay as reported).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from migcore import keys
from migcore.catalog import Catalog
from migcore.check import CheckResult, check_config, hardware_from_report
from migcore.config import MigPartedConfig
from migcore.geometry import GpuGeometry
from migcore.hardware import NodeGpus
from migcore.planning import GpuPlan, NodePlan, desired_geometries, plan_node
from migcore.usage import SOURCE_POD_SPEC, NodeUsage, PodRef
from migcore.wording import gpus_text, shorten

ANNOTATION_USAGE = keys.ANNOTATION_USAGE
# What kubectl shows of a warning in full, and how many of them the webhook sends (the API server
# keeps at most 4096 characters of warnings per response).
LINE_CHARS = 120


def _counts(profiles: Iterable[str]) -> str:
    """`1g.5gb x2, 2g.10gb` (in order of first appearance)."""
    return ", ".join(p if n == 1 else f"{p} x{n}" for p, n in Counter(profiles).items())


def change_text(gpu: GpuPlan) -> str:
    """What one GPU's plan destroys and creates, in MIG device profiles (the `mig-devices` names of
    a mig-parted config): `1g.5gb x2 -> 2g.10gb`, `MIG disabled -> 7g.40gb`, `3g.20gb x2 -> MIG
    disabled`. A GPU instance without compute instances counts by its own profile."""
    ops = gpu.operations
    with_ci_gone = {op.gi_start for op in ops if op.op == "destroy-ci"}
    with_ci_new = {op.gi_start for op in ops if op.op == "create-ci"}
    gone = [op.profile or "" for op in ops if op.op == "destroy-ci"]
    gone += [op.profile or "" for op in ops if op.op == "destroy-gi" and op.start not in with_ci_gone]
    new = [op.profile or "" for op in ops if op.op == "create-ci"]
    new += [op.profile or "" for op in ops if op.op == "create-gi" and op.start not in with_ci_new]
    before = _counts(gone) or ("MIG disabled" if not gpu.current.mig_enabled else "")
    after = _counts(new) or ("MIG disabled" if not gpu.desired.mig_enabled else "")
    if gpu.mode_changes and gpu.current.mig_enabled and not before:
        before = "MIG enabled"
    if gpu.mode_changes and gpu.desired.mig_enabled and not after:
        after = "MIG enabled"
    if not before and not after:
        return "a pending MIG mode cleared"
    return f"{before or 'no instances'} -> {after or 'no instances'}"


@dataclass(frozen=True)
class GpuImpact:
    """One GPU that changes: what becomes of it and the pods on it that are evicted."""

    index: int
    change: str
    evicts: tuple[PodRef, ...]
    not_named: int  # pods evicted from it that the usage report counts but does not name
    reset: bool
    operations: tuple[str, ...]
    layout: str = ""  # `<layout before> -> <layout after>`, instances with their starts

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "change": self.change,
            "layout": self.layout,
            "reset": self.reset,
            "evicts": [str(p) for p in self.evicts],
            "notNamed": self.not_named,
            "operations": list(self.operations),
        }


@dataclass(frozen=True)
class Impact:
    """A config's effect on a node (`usage` None: the pods on it are unknown)."""

    config: str
    plan: NodePlan
    gpus: tuple[GpuImpact, ...]
    untouched: tuple[int, ...]
    evicts: tuple[PodRef, ...]
    not_named: int
    usage: NodeUsage | None

    @property
    def pods_known(self) -> bool:
        return self.usage is not None

    @property
    def evict_count(self) -> int:
        return len(self.evicts) + self.not_named

    def headline(self) -> str:
        """`impact of all-1g.5gb: 1 of 8 GPUs change (0 resets), 2 pods to evict`."""
        plan = self.plan
        if not plan.changed:
            return f"impact of {self.config}: none, all {len(plan.gpus)} GPUs already hold it"
        resets = sum(g.reset for g in self.gpus)
        head = (
            f"impact of {self.config}: {len(self.gpus)} of {len(plan.gpus)} GPUs change"
            f"{f' ({resets} with a GPU reset)' if resets else ''}, "
        )
        if self.usage is None:
            return head + f"pods on them unknown (no {ANNOTATION_USAGE} on the node yet)"
        pods = f"{self.evict_count} pod{'' if self.evict_count == 1 else 's'} to evict"
        if self.usage.source == SOURCE_POD_SPEC:
            pods += " (no PodResources on the node: every GPU pod counts)"
        return head + pods

    def lines(self, node: str, limit: int = 10, width: int = LINE_CHARS) -> list[str]:
        """At most `limit` lines of at most `width` characters: the headline, one line per changed
        GPU (GPUs with the same change grouped when they do not all fit), the untouched GPUs, and
        how many pods to evict are not named (with where to see them)."""
        if limit <= 0:
            return []
        head = shorten(self.headline(), width)
        if not self.gpus:
            return [head]
        tail: list[str] = []
        if self.untouched:
            tail.append(f"{gpus_text(self.untouched)} untouched")
        room = max(1, limit - 1 - len(tail))
        body, unnamed = self._gpu_lines(room, width)
        if unnamed and room > 1 and self.usage is not None:  # a slot for the count of pods not named
            body, unnamed = self._gpu_lines(room - 1, width)
        if unnamed and self.usage is not None:
            tail.append(shorten(self._not_named_line(unnamed, node), width))
        return [head, *body, *tail][:limit]

    def _gpu_lines(self, room: int, width: int) -> tuple[list[str], int]:
        """The GPU lines that fit `room` lines, and how many evicted pods they leave unnamed."""
        # GPUs that change alike and evict nothing share a line; a GPU that evicts pods has its
        # own, unless there is no room: then GPUs that change alike share one, pods and all.
        groups = self._groups(lambda g: (g.change, g.index if g.evicts or g.not_named else -1))
        if len(groups) > room:
            groups = self._groups(lambda g: (g.change, -1))
        shown = groups if len(groups) <= room else groups[: room - 1]
        lines: list[str] = []
        named: set[PodRef] = set()
        for indexes, change, pods, _ in shown:
            line, listed = self._gpu_line(gpus_text(indexes), change, pods, width)
            lines.append(line)
            named.update(listed)
        if len(shown) < len(groups):
            rest = sorted(i for indexes, *_ in groups[len(shown) :] for i in indexes)
            lines.append(shorten(f"{gpus_text(rest)} change too", width))
        return lines, self.evict_count - len(named)

    def _groups(
        self, key: Callable[[GpuImpact], tuple[str, int]]
    ) -> list[tuple[list[int], str, list[PodRef], int]]:
        """(GPU indexes, change, pods evicted, pods not named) per group of changed GPUs."""
        by_key: dict[tuple[str, int], tuple[list[int], list[PodRef], list[int]]] = {}
        for g in self.gpus:
            indexes, pods, unnamed = by_key.setdefault(key(g), ([], [], [0]))
            indexes.append(g.index)
            pods.extend(p for p in g.evicts if p not in pods)
            unnamed[0] += g.not_named
        return [(i, change, pods, n[0]) for (change, _), (i, pods, n) in by_key.items()]

    def _gpu_line(self, where: str, change: str, pods: list[PodRef], width: int) -> tuple[str, list[PodRef]]:
        line = shorten(f"{where}: {change}", width - 20)
        if self.usage is None:
            return line, []
        if not pods:
            return f"{line}, evicts no pods", []
        listed: list[PodRef] = []
        text = f"{line}, evicts"
        for n, pod in enumerate(pods):
            more = len(pods) - n - 1
            candidate = f"{text}{',' if listed else ''} {pod}"
            # Leave room for " and N more" when more follow.
            reserve = len(f" and {more} more") if more else 0
            if len(candidate) + reserve > width:
                break
            text = candidate
            listed.append(pod)
        left = len(pods) - len(listed)
        if not listed:
            text = f"{line}, evicts {len(pods)} pod{'' if len(pods) == 1 else 's'}"
        elif left:
            text += f" and {left} more"
        return text, listed

    def _not_named_line(self, unnamed: int, node: str) -> str:
        text = f"{unnamed} of {self.evict_count} pods to evict not named here"
        if self.not_named:
            text += f" ({self.not_named} not in {ANNOTATION_USAGE} either)"
        if unnamed > self.not_named:
            text += f": kubectl mig plan {node} {self.config}" + ("" if self.not_named else " names them")
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": self.plan.summary(),
            "gpus": [g.to_json() for g in self.gpus],
            "untouched": list(self.untouched),
            "podsKnown": self.pods_known,
            "evicts": [str(p) for p in self.evicts],
            "notNamed": self.not_named,
            "usage": None if self.usage is None else {"source": self.usage.source, "since": self.usage.since},
        }


def impact_of(config: str, plan: NodePlan, usage: NodeUsage | None) -> Impact:
    """The impact of `plan` (for config `config`) on pods as `usage` reports them."""
    gpus: list[GpuImpact] = []
    for gpu in plan.changed:
        alone = NodePlan((gpu,))
        evicts = tuple(usage.movers(alone)) if usage is not None else ()
        unnamed = usage.unnamed_movers(alone) if usage is not None else 0
        ops = tuple(op.describe(with_gpu=False) for op in gpu.operations)
        layout = f"{gpu.current.summary()} -> {gpu.desired.summary()}"
        gpus.append(GpuImpact(gpu.index, change_text(gpu), evicts, unnamed, gpu.needs_reset, ops, layout))
    untouched = tuple(g.index for g in plan.gpus if not g.changes)
    evicts = tuple(usage.movers(plan)) if usage is not None else ()
    not_named = usage.unnamed_movers(plan) if usage is not None else 0
    return Impact(config, plan, tuple(gpus), untouched, evicts, not_named, usage)


def current_layouts(report: NodeGpus) -> dict[int, GpuGeometry]:
    """Each reported GPU's layout (GPUs the report gives none for are left out)."""
    return {g.index: g.geometry for g in report.gpus if g.geometry is not None}


def plan_for(result: CheckResult, current: Mapping[int, GpuGeometry]) -> NodePlan:
    """The reconciler's plan for a valid checked config on GPUs holding `current`."""
    desired = desired_geometries(result, current)
    return plan_node(current, {i: g for i, g in desired.items() if i in current})


def preview(
    config: MigPartedConfig, name: str, report: NodeGpus, usage: NodeUsage | None, catalog: Catalog
) -> Impact:
    """The impact of config `name` on the node of `report` (ValueError: it does not apply there)."""
    result = check_config(config, name, hardware_from_report(catalog, report))
    return impact_of(name, plan_for(result, current_layouts(report)), usage)
