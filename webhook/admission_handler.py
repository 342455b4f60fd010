"""Turns an AdmissionReview request into a Verdict: routes Nodes to the rules and the mutation,
the watched ConfigMap to the guard, and lets anything else through."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace

from kube.config_source import ConfigView
from kube.node import MalformedNode, NodeView
from migcore.hold import HoldMode
from webhook.configmap_guard import ConfigMapGuard
from webhook.impact import ImpactPreview
from webhook.mutation import mutation_patch
from webhook.review import AdmissionRequest, ReviewError
from webhook.validation import NodeChange, NodeRules
from webhook.verdict import MAX_WARNINGS, Verdict
from webhook.writers import bound_node

JUDGED_OPERATIONS = ("CREATE", "UPDATE")


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_core(request: AdmissionRequest, kind: str) -> bool:
    return request.kind == kind and request.group == ""


def node_change(request: AdmissionRequest) -> NodeChange:
    """Old and new Node of a CREATE/UPDATE (a missing object is a malformed review)."""
    if request.object is None:
        raise ReviewError(f"request.object is required for {request.operation} of a Node")
    if request.operation == "UPDATE" and request.old_object is None:
        raise ReviewError("request.oldObject is required for UPDATE of a Node")
    try:
        old, new = NodeView.of(request.old_object, "oldObject"), NodeView.of(request.object, "object")
    except MalformedNode as exc:
        raise ReviewError(str(exc)) from exc
    return NodeChange(
        old, new, creating=request.operation == "CREATE", status=request.sub_resource == "status"
    )


class AdmissionHandler:
    """The decisions behind /validate and /mutate. No I/O except the guard's node listing."""

    def __init__(
        self,
        rules: NodeRules,
        hold: HoldMode | None,
        guard: ConfigMapGuard | None,
        clock: Callable[[], str] = rfc3339_now,
        impact: ImpactPreview | None = None,
    ) -> None:
        self._rules = rules
        self._hold = hold
        self._guard = guard
        self._clock = clock
        self._impact = impact

    def validate(self, request: AdmissionRequest, config: ConfigView) -> tuple[Verdict, str]:
        """The verdict and the object's name (for logs)."""
        if _is_core(request, "Node") and request.operation in JUDGED_OPERATIONS:
            change = node_change(request)
            verdict = self._rules.judge(
                change, request.username, config, bound_node=bound_node(request.extra)
            )
            return self._with_impact(verdict, change, config), change.node_name
        if _is_core(request, "ConfigMap") and self._guard is not None:
            return self._guard.judge(request), f"{request.namespace}/{request.object_name}"
        return Verdict.allow(), request.name

    def _with_impact(self, verdict: Verdict, change: NodeChange, config: ConfigView) -> Verdict:
        """An accepted change of the layout of an existing node, with warnings saying what it does
        (in the room the other warnings leave)."""
        if self._impact is None or not verdict.allowed or not change.config_changed or change.creating:
            return verdict
        room = MAX_WARNINGS - len(verdict.warnings)
        lines = self._impact.warnings(change.old, change.new.mig_config, config, room)
        return replace(verdict, warnings=(*verdict.warnings, *lines)) if lines else verdict

    def mutate(self, request: AdmissionRequest, config: ConfigView) -> tuple[Verdict, str]:
        """A patch for an accepted change of the layout; no patch otherwise (never a denial)."""
        if not (_is_core(request, "Node") and request.operation in JUDGED_OPERATIONS):
            return Verdict.allow(), request.name
        change = node_change(request)
        if not change.config_changed:
            return Verdict.allow(), change.node_name
        verdict = self._rules.judge(change, request.username, config, bound_node=bound_node(request.extra))
        if not verdict.allowed:
            return Verdict.allow(), change.node_name
        patch = mutation_patch(change, self._hold, change.creating, self._clock())
        return Verdict.allow(patch=patch), change.node_name
