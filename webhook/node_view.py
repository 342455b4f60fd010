"""A typed view of the parts of a Node object that mig-guard reads.

The object comes from the request body; wrong types there are a `ReviewError` (HTTP 400),
never an exception deeper in the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from migcore import keys
from webhook.review import ReviewError

_EMPTY: Mapping[str, str] = {}


def _string_map(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ReviewError(f"{where} must be an object of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise ReviewError(f"{where}[{str(key)[:80]!r}] must be a string, got {type(value).__name__}")
    return raw


@dataclass(frozen=True)
class NodeView:
    """Labels, annotations, taints and cordon state of one Node."""

    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...]
    unschedulable: bool
    has_spec: bool

    @staticmethod
    def of(obj: Mapping[str, Any] | None, where: str = "object") -> NodeView:
        """The view of `obj` (None, for a CREATE's old object, is an empty node)."""
        if obj is None:
            return NodeView("", _EMPTY, _EMPTY, (), False, False)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ReviewError(f"{where}.metadata must be an object")
        name = metadata.get("name") or ""
        if not isinstance(name, str):
            raise ReviewError(f"{where}.metadata.name must be a string")
        spec = obj.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise ReviewError(f"{where}.spec must be an object")
        taints_raw = (spec or {}).get("taints") or []
        if not isinstance(taints_raw, list) or not all(isinstance(t, dict) for t in taints_raw):
            raise ReviewError(f"{where}.spec.taints must be a list of objects")
        unschedulable = (spec or {}).get("unschedulable", False)
        if unschedulable is None:
            unschedulable = False
        if not isinstance(unschedulable, bool):
            raise ReviewError(f"{where}.spec.unschedulable must be a boolean")
        return NodeView(
            name=name,
            labels=_string_map(metadata.get("labels"), f"{where}.metadata.labels"),
            annotations=_string_map(metadata.get("annotations"), f"{where}.metadata.annotations"),
            taints=tuple(taints_raw),
            unschedulable=unschedulable,
            has_spec=spec is not None,
        )

    @property
    def mig_config(self) -> str:
        """The desired layout, "" when the label is absent or empty."""
        return self.labels.get(keys.LABEL_MIG_CONFIG, "")


def changed_protected_keys(old: NodeView, new: NodeView) -> dict[str, str | None]:
    """Protected labels and annotations whose value differs: "label:key"/"annotation:key" -> new value
    (None when removed)."""
    changes: dict[str, str | None] = {}
    for kind, before, after in (
        ("label", old.labels, new.labels),
        ("annotation", old.annotations, new.annotations),
    ):
        for key in before.keys() | after.keys():
            if keys.is_protected_key(key) and before.get(key) != after.get(key):
                changes[f"{kind}:{key}"] = after.get(key)
    return changes
