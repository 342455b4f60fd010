"""A typed view of the parts of a Node object that mig-guard reads, for the webhook (the objects
of an admission request) and the reconciler (its own Node, read from the API) alike.

Both give it the Node's JSON. A field of the wrong type is a `MalformedNode` (the webhook answers
it with HTTP 400), never an exception deeper in the rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from migcore import keys

_EMPTY: Mapping[str, str] = {}


class MalformedNode(ValueError):
    """A Node object with a field of the wrong type; the message names the field."""


@dataclass(frozen=True)
class Condition:
    """One of `status.conditions`."""

    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str | None = None
    last_heartbeat_time: str | None = None  # when it was last written (mig-guard: its reason changed)


@dataclass(frozen=True)
class FieldManager:
    """One entry of `metadata.managedFields`: a writer and the fields it owns."""

    manager: str
    subresource: str
    fields: Mapping[str, Any]

    def owns(self, *path: str) -> bool:
        """True when the fields include `path` (e.g. "f:metadata", "f:labels", "f:<key>")."""
        node: Any = self.fields
        for step in path:
            node = node.get(step) if isinstance(node, dict) else None
            if node is None:
                return False
        return True


def _string_map(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MalformedNode(f"{where} must be an object of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise MalformedNode(f"{where}[{str(key)[:80]!r}] must be a string, got {type(value).__name__}")
    return raw


def _conditions(status: Any) -> tuple[Condition, ...]:
    """The conditions, leniently: the webhook never judges them, so a status it cannot read is no
    reason to refuse a write."""
    raw = status.get("conditions") if isinstance(status, dict) else None
    return tuple(
        Condition(
            str(c.get("type", "")),
            str(c.get("status", "")),
            str(c.get("reason") or ""),
            str(c.get("message") or ""),
            c.get("lastTransitionTime"),
            c.get("lastHeartbeatTime"),
        )
        for c in (raw if isinstance(raw, list) else ())
        if isinstance(c, dict)
    )


def _managers(metadata: dict[str, Any]) -> tuple[FieldManager, ...]:
    raw = metadata.get("managedFields") or []
    if not isinstance(raw, list):
        return ()
    return tuple(
        FieldManager(
            str(m.get("manager") or "(no manager)"), str(m.get("subresource") or ""), m.get("fieldsV1") or {}
        )
        for m in raw
        if isinstance(m, dict)
    )


@dataclass(frozen=True)
class NodeView:
    """Labels, annotations, taints and cordon state of one Node (and, read from the API, its
    resourceVersion, conditions and field managers)."""

    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...]
    unschedulable: bool
    has_spec: bool
    resource_version: str = ""
    conditions: tuple[Condition, ...] = ()
    managers: tuple[FieldManager, ...] = ()

    @staticmethod
    def of(obj: Mapping[str, Any] | None, where: str = "object") -> NodeView:
        """The view of the Node JSON `obj` (None, for a CREATE's old object, is an empty node)."""
        if obj is None:
            return NodeView("", _EMPTY, _EMPTY, (), False, False)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise MalformedNode(f"{where}.metadata must be an object")
        name = metadata.get("name") or ""
        if not isinstance(name, str):
            raise MalformedNode(f"{where}.metadata.name must be a string")
        spec = obj.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise MalformedNode(f"{where}.spec must be an object")
        taints_raw = (spec or {}).get("taints") or []
        if not isinstance(taints_raw, list) or not all(isinstance(t, dict) for t in taints_raw):
            raise MalformedNode(f"{where}.spec.taints must be a list of objects")
        unschedulable = (spec or {}).get("unschedulable", False)
        if unschedulable is None:
            unschedulable = False
        if not isinstance(unschedulable, bool):
            raise MalformedNode(f"{where}.spec.unschedulable must be a boolean")
        return NodeView(
            name=name,
            labels=_string_map(metadata.get("labels"), f"{where}.metadata.labels"),
            annotations=_string_map(metadata.get("annotations"), f"{where}.metadata.annotations"),
            taints=tuple(taints_raw),
            unschedulable=unschedulable,
            has_spec=spec is not None,
            resource_version=str(metadata.get("resourceVersion") or ""),
            conditions=_conditions(obj.get("status")),
            managers=_managers(metadata),
        )

    @staticmethod
    def from_response(response: Any) -> NodeView:
        """The view of an API response read with `_preload_content=False` (the Node's JSON)."""
        return NodeView.of(json.loads(response.data))

    @property
    def mig_config(self) -> str:
        """The desired layout, "" when the label is absent or empty."""
        return self.labels.get(keys.LABEL_MIG_CONFIG, "")

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    def writers(self, field: str, key: str) -> set[str]:
        """The field managers that own `metadata.<field>[key]` (field: labels or annotations)."""
        path = ("f:metadata", f"f:{field}", f"f:{key}")
        return {m.manager for m in self.managers if m.owns(*path)}
