"""The ConfigMap guard: an update of the watched mig-parted ConfigMap must not break a node.

Denied (or, configured so, allowed with warnings): a version that does not parse, or one that
removes or changes a config a node is labelled with so that it no longer fits that node.
Only breakage caused by this update counts: a node whose config was already missing or
invalid before is not blamed on it. Nodes are listed (label selector on
`nvidia.com/mig.config`) when such an update arrives, which is rare.

Whatever the verdict, the new version's own warnings (what parses but looks wrong, such as a
profile no GPU in the catalog has) come back as admission warnings, which `kubectl apply` and
GitOps tools show: at most ten in all, the last one saying how many more there are.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kube.config_source import ConfigMapRef
from kube.node import NodeView
from migcore import keys
from migcore.catalog import Catalog
from migcore.check import check_config
from migcore.config import ConfigError, MigPartedConfig, parse_config
from migcore.wording import shorten
from webhook.node_hardware import HardwareResolver
from webhook.review import AdmissionRequest, ReviewError
from webhook.verdict import API_WARNING_CHARS, CODE_INVALID, MAX_WARNINGS, Verdict

NODES_NAMED = 5


class GuardMode(enum.StrEnum):
    DENY = "deny"
    WARN = "warn"


class NodeLister(Protocol):
    def labelled_nodes(self) -> Sequence[NodeView]: ...


class ApiNodeLister:
    """Nodes that carry `nvidia.com/mig.config`, from the API server."""

    def __init__(self, core_api: Any) -> None:
        self._core = core_api

    def labelled_nodes(self) -> list[NodeView]:
        response = self._core.list_node(label_selector=keys.LABEL_MIG_CONFIG, _preload_content=False)
        items = json.loads(response.data).get("items") or []
        return [NodeView.of(item) for item in items]


def _config_text(obj: Mapping[str, Any] | None, key: str) -> str | None:
    if obj is None:
        return None
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise ReviewError("ConfigMap data must be an object of strings")
    text = data.get(key)
    if text is not None and not isinstance(text, str):
        raise ReviewError(f"ConfigMap data[{key!r}] must be a string")
    return text


def _printable(text: str) -> str:
    """`text` with control characters escaped: the API server drops a warning that has any (a
    config name can, in a quoted YAML key)."""
    return "".join(
        c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" else c for c in text
    )


def _parse(text: str | None, catalog: Catalog) -> MigPartedConfig | None:
    if text is None:
        return None
    try:
        return parse_config(text, catalog)
    except ConfigError:
        return None


class ConfigMapGuard:
    """Judges UPDATE and DELETE of the watched ConfigMap."""

    def __init__(
        self, ref: ConfigMapRef, nodes: NodeLister, hardware: HardwareResolver, mode: GuardMode
    ) -> None:
        self.ref = ref
        self._nodes = nodes
        self._hardware = hardware
        self._mode = mode

    def _fits(self, config: MigPartedConfig | None, node: NodeView) -> str | None:
        """None when the node's config fits it under `config`; else why not."""
        name = node.mig_config
        if config is None:
            return "no usable config"
        if name not in config.configs:
            return f"{name} removed"
        hardware = self._hardware.find(node).hardware
        if hardware is None:
            return None
        result = check_config(config, name, hardware)
        return None if result.valid else f"{name} no longer fits: {result.errors[0] if result.errors else ''}"

    def _answer(self, problem: str, details: Sequence[str] = (), notes: Sequence[str] = ()) -> Verdict:
        """Deny with the whole story, or (warn mode) allow with one short warning per detail; the
        config's own warnings (`notes`) after those either way."""
        if self._mode is GuardMode.WARN:
            breakage = [problem] if not details else [f"{self.ref}: breaks {d}" for d in details]
            return Verdict.allow(warnings=self._warnings(breakage, notes))
        return Verdict.deny(CODE_INVALID, problem, warnings=self._warnings([], notes))

    def _warnings(self, breakage: Sequence[str], notes: Sequence[str]) -> list[str]:
        """Breakage first, then the config's warnings (each prefixed with its key); within
        MAX_WARNINGS, the last place saying how many are left out and where to see them all."""
        warnings = [*breakage, *(f"{self.ref.key}: {_printable(n)}" for n in notes)]
        if len(warnings) <= MAX_WARNINGS:
            return warnings
        shown = warnings[: MAX_WARNINGS - 1]
        left = len(warnings) - len(shown)
        return [
            *shown,
            f"{left} more warnings left out; `mig-guard check --config FILE --all` on the {self.ref.key} "
            "of this ConfigMap lists them all",
        ]

    def judge(self, request: AdmissionRequest) -> Verdict:
        """The verdict, with the new version's warnings as long as the API server keeps them."""
        return dataclasses.replace(self._judge(request), warning_chars=API_WARNING_CHARS)

    def _judge(self, request: AdmissionRequest) -> Verdict:
        # `object_name`: a collection delete (the namespace controller's way) carries no request name.
        if request.namespace != self.ref.namespace or request.object_name != self.ref.name:
            return Verdict.allow()
        if request.operation not in ("UPDATE", "DELETE"):
            return Verdict.allow()
        new_text = _config_text(request.object, self.ref.key) if request.operation == "UPDATE" else None
        if request.operation == "UPDATE":
            if new_text is None:
                return self._answer(f"{self.ref}: key {self.ref.key} is missing; mig-guard needs it")
            try:
                new_config: MigPartedConfig | None = parse_config(new_text, self._hardware.catalog)
            except ConfigError as exc:
                errors = "; ".join(exc.errors[:3])
                return self._answer(f"{self.ref} key {self.ref.key} does not parse: {errors}")
        else:
            new_config = None
        old_config = _parse(_config_text(request.old_object, self.ref.key), self._hardware.catalog)
        broken: list[str] = []
        for node in self._nodes.labelled_nodes():
            if not node.mig_config or self._fits(old_config, node) is not None:
                continue
            why = self._fits(new_config, node)
            if why is not None:
                broken.append(f"{node.name} ({shorten(why, 100)})")
        notes = new_config.warnings if new_config is not None else ()
        if not broken:
            return Verdict.allow(warnings=self._warnings([], notes))
        shown = ", ".join(broken[:NODES_NAMED])
        more = f" and {len(broken) - NODES_NAMED} more" if len(broken) > NODES_NAMED else ""
        verb = "deleting" if request.operation == "DELETE" else "this change to"
        return self._answer(
            f"{verb} {self.ref} would break {len(broken)} labelled node(s): {shown}{more}. "
            f"Relabel those nodes ({keys.LABEL_MIG_CONFIG}) first, or keep their configs.",
            broken,
            notes,
        )
