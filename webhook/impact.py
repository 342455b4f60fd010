"""The impact of an accepted layout change, as admission warnings: which GPUs change, what is
destroyed and created on each, which pods are evicted, which GPUs stay untouched.

It reads the node as it was before the request: its hardware report (`mig-guard.io/gpus`: the GPUs
and their layouts) and its usage report (`mig-guard.io/usage`: the pods on each device), and plans
with the reconciler's planner (`migcore.impact`). The same answer comes with `kubectl label
--dry-run=server`, which stores nothing. Pure: no I/O; plans are memoised on what they depend on.
"""

from __future__ import annotations

from kube.config_source import ConfigView
from kube.node import NodeView
from migcore import keys
from migcore.check import check_config, hardware_from_report
from migcore.hardware import HardwareReportError, NodeGpus
from migcore.impact import current_layouts, impact_of, plan_for
from migcore.memo import LruCache
from migcore.planning import NodePlan
from migcore.usage import NodeUsage, UsageError
from webhook.node_hardware import HardwareResolver

CACHE_SIZE = 256


class ImpactPreview:
    """Impact warnings for accepted changes of `nvidia.com/mig.config`."""

    def __init__(self, hardware: HardwareResolver) -> None:
        self._hardware = hardware
        self._plans: LruCache[tuple[str, str, str, str], NodePlan | str] = LruCache(CACHE_SIZE)
        self._usages: LruCache[str, NodeUsage | str] = LruCache(CACHE_SIZE)

    def warnings(self, node: NodeView, name: str, config: ConfigView, room: int) -> tuple[str, ...]:
        """At most `room` lines saying what changing `node` (as it is before the request) to
        config `name` does; `name` was judged valid for it."""
        if room <= 0:
            return ()
        report_text = node.annotations.get(keys.ANNOTATION_GPUS)
        if not report_text:
            return (
                f"impact not shown: node {node.name} has no {keys.ANNOTATION_GPUS} report yet "
                "(is mig-guard's reconciler running there?)",
            )
        key = (config.config.digest, config.origin, name, report_text)
        plan = self._plans.get_or_make(key, lambda: self._plan(report_text, name, config))
        if isinstance(plan, str):
            return (f"impact not shown: {plan}",)
        usage = self._usage(node.annotations.get(keys.ANNOTATION_USAGE))
        if isinstance(usage, str):
            lines = impact_of(name, plan, None).lines(node.name, room - 1)
            return (*lines, f"{keys.ANNOTATION_USAGE} ignored: {usage}")[:room]
        return tuple(impact_of(name, plan, usage).lines(node.name, room))

    def _plan(self, report_text: str, name: str, config: ConfigView) -> NodePlan | str:
        """The reconciler's plan for config `name` on the reported GPUs (a string: why there is none)."""
        try:
            report = NodeGpus.from_annotation(report_text)
            result = check_config(config.config, name, hardware_from_report(self._hardware.catalog, report))
            return plan_for(result, current_layouts(report))
        except (HardwareReportError, ValueError, LookupError) as exc:
            return str(exc)

    def _usage(self, text: str | None) -> NodeUsage | str | None:
        if not text:
            return None

        def parse() -> NodeUsage | str:
            try:
                return NodeUsage.from_annotation(text)
            except UsageError as exc:
                return str(exc)

        return self._usages.get_or_make(text, parse)
