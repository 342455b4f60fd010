"""The Node rules: is this change of a Node allowed?

1. A new or changed `nvidia.com/mig.config` must name a config of the mig-parted config;
2. it must fit the node's GPUs (hardware report, else GPU Feature Discovery labels), and, when the
   node's `nvidia.com/mig.strategy` is `single`, give every GPU one and the same profile
   (`migcore.strategy`);
3. with no way to tell the hardware it is allowed, with a warning;
4. removing the label is allowed;
5. protected keys (`keys.is_protected_key`) change only by the reconciler's identities,
   except exactly what the mutating webhook sets for an accepted change in the same request;
6. a reconciler identity writes only the node its token is bound to, and never the layout
   (`webhook.writers`), except the configured default layout on a node without one;
7. anything else is allowed.
The layout is judged against the GPUs (and the MIG strategy) as they were before the request: GPU
Feature Discovery labels changed (or removed) in the same request do not count.
Pure: no I/O, no side effects (dry-run requests get the same verdict and store nothing).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from kube.config_source import ConfigView
from kube.node import NodeView
from migcore import keys
from migcore.check import (
    NAME_SHOWN_CHARS,
    check_config,
    quoted_name,
    unknown_config_message,
    valid_config_names,
    valid_names_text,
)
from migcore.hold import BY_WEBHOOK, HoldRecord, pending_reason
from migcore.memo import LruCache
from migcore.strategy import STRATEGY_SINGLE, final_layouts, single_strategy_problem
from migcore.wording import shorten
from webhook.node_hardware import HardwareFinding, HardwareResolver
from webhook.verdict import CODE_FORBIDDEN, CODE_INVALID, Verdict
from webhook.writers import ReconcilerIdentities

VERDICT_CACHE_SIZE = 1024
# Stands for the node's name in memoised messages (filled in per request).
NODE_NAME_SLOT = "\x00node\x00"


@dataclass(frozen=True)
class NodeChange:
    """Old and new Node of one request (old is empty on CREATE)."""

    old: NodeView
    new: NodeView
    creating: bool = False
    # A write through the status subresource: the API server keeps its metadata, drops its spec.
    status: bool = False

    @property
    def config_changed(self) -> bool:
        """True when the desired layout is set to a new non-empty value (the case that needs a check)."""
        return bool(self.new.mig_config) and self.new.mig_config != self.old.mig_config

    @property
    def layout_touched(self) -> bool:
        """The layout label was set, changed or removed."""
        return self.old.labels.get(keys.LABEL_MIG_CONFIG) != self.new.labels.get(keys.LABEL_MIG_CONFIG)

    @property
    def node_name(self) -> str:
        return self.new.name or self.old.name

    @property
    def mig_strategy(self) -> str:
        """The device plugin's MIG strategy label as it was before the request."""
        before = self.new if self.creating else self.old
        return before.labels.get(keys.LABEL_MIG_STRATEGY, "")


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


class NodeRules:
    """Judges Node CREATE/UPDATE requests against the config in use."""

    def __init__(
        self,
        hardware: HardwareResolver,
        reconciler_users: Collection[str],
        *,
        allow_unbound: bool = False,
        default_config: str = "",
    ) -> None:
        self._hardware = hardware
        self.reconcilers = ReconcilerIdentities(reconciler_users, allow_unbound, default_config)
        self._verdicts: LruCache[tuple[object, ...], Verdict] = LruCache(VERDICT_CACHE_SIZE)

    def config_verdict(self, change: NodeChange, config: ConfigView) -> Verdict:
        """Rules 1 to 4: the verdict on the `nvidia.com/mig.config` value alone.

        Memoised on (config, name, hardware): a denial's suggestions (closest names, configs
        valid for the node) cost milliseconds, and the same few mistakes come back.
        """
        if not change.config_changed:
            return Verdict.allow()
        name = change.new.mig_config
        finding = self.hardware(change)
        hardware_key = finding.hardware.cache_key() if finding.hardware is not None else None
        single = change.mig_strategy == STRATEGY_SINGLE
        key = (
            config.config.digest,
            config.origin,
            name,
            hardware_key,
            finding.source,
            finding.warnings,
            single and finding.layouts,
        )
        cached = self._verdicts.get_or_make(key, lambda: self._config_verdict(name, finding, config, single))
        if NODE_NAME_SLOT in cached.message:
            return replace(cached, message=cached.message.replace(NODE_NAME_SLOT, change.node_name))
        return cached

    def hardware(self, change: NodeChange) -> HardwareFinding:
        """The GPUs to judge against: as the node had them before the request, so that labels changed
        in the same request cannot pick the verdict; the new object only when nothing was known."""
        before = self._hardware.find(change.old)
        if before.hardware is None:
            return self._hardware.find(change.new)
        after = self._hardware.find(change.new)
        if after.source == before.source:
            return before
        note = f"GPU labels changed in the same request: judged against the GPUs before it ({before.source})"
        return replace(before, warnings=(*before.warnings, note))

    def _config_verdict(
        self, name: str, finding: HardwareFinding, config: ConfigView, single: bool
    ) -> Verdict:
        if name not in config.config.configs:
            text = unknown_config_message(
                config.config,
                name,
                origin=config.origin,
                hardware=finding.hardware,
                where=f"node {NODE_NAME_SLOT} ({finding.source})",
            )
            return Verdict.deny(CODE_INVALID, text)
        if finding.hardware is None:
            return Verdict.allow(warnings=finding.warnings)
        result = check_config(config.config, name, finding.hardware)
        if not result.valid:
            message = f"{quoted_name(name)} does not fit node {NODE_NAME_SLOT} ({finding.source}): {'; '.join(result.errors)}."
            message += valid_names_text(
                valid_config_names(config.config, finding.hardware), " Valid for this node"
            )
            return Verdict.deny(CODE_INVALID, message, warnings=finding.warnings)
        current = dict(finding.layouts)
        problem = single_strategy_problem(final_layouts(result, current)) if single else None
        if problem is not None:
            hardware = finding.hardware
            suited = [
                n
                for n in valid_config_names(config.config, hardware)
                if single_strategy_problem(final_layouts(check_config(config.config, n, hardware), current))
                is None
            ]
            message = f"{quoted_name(name)} does not suit node {NODE_NAME_SLOT}: {problem}."
            message += valid_names_text(suited, " Valid for this node")
            return Verdict.deny(CODE_INVALID, message, warnings=finding.warnings)
        return Verdict.allow(warnings=(*finding.warnings, *result.warnings))

    def spoofed_keys(self, change: NodeChange, username: str, config_accepted: bool) -> list[str]:
        """Rule 5: protected keys this user changed and may not (empty when all is fine)."""
        changes = changed_protected_keys(change.old, change.new)
        if not changes or username in self.reconcilers:
            return []
        name = change.new.mig_config
        allowed: dict[str, str] = {}
        if config_accepted and change.config_changed:
            # What the mutating webhook sets for this very change (it runs before validation).
            allowed = {
                f"label:{keys.LABEL_MIG_STATE}": keys.STATE_PENDING,
                f"annotation:{keys.ANNOTATION_REASON}": pending_reason(name),
            }
        spoofed: list[str] = []
        for key, value in changes.items():
            # The hold record: never through the status subresource (no hold is set there); on
            # CREATE only the taint the mutation sets (a record of a cordon could be the creator's).
            if (
                key == f"annotation:{keys.ANNOTATION_HOLD}"
                and config_accepted
                and change.config_changed
                and not change.status
            ):
                hold = HoldRecord.from_annotation(value)
                if (
                    hold is not None
                    and hold.config == name
                    and hold.by == BY_WEBHOOK
                    and (not change.creating or (hold.taint and not hold.cordon))
                ):
                    continue
            if value is not None and allowed.get(key) == value:
                continue
            spoofed.append(key.split(":", 1)[1])
        return sorted(spoofed)

    def judge(
        self, change: NodeChange, username: str, config: ConfigView, *, bound_node: str | None = None
    ) -> Verdict:
        """The verdict on a Node CREATE or UPDATE by `username`, whose credential is bound to the node
        `bound_node` (a pod-bound ServiceAccount token; None when not bound)."""
        if username in self.reconcilers:
            layout = change.layout_touched and not self.reconcilers.defaults(
                change.old.labels.get(keys.LABEL_MIG_CONFIG), change.new.labels.get(keys.LABEL_MIG_CONFIG)
            )
            return self.reconcilers.verdict(username, bound_node, change.node_name, layout)
        verdict = self.config_verdict(change, config)
        spoofed = self.spoofed_keys(change, username, verdict.allowed)
        if spoofed:
            who = shorten(username or "an anonymous user", NAME_SHOWN_CHARS)
            return Verdict.deny(
                CODE_FORBIDDEN,
                f"{who} may not change {', '.join(spoofed)} on node {change.node_name}: only the mig-guard "
                "reconciler sets these (they report the state of the GPUs). Change "
                f"{keys.LABEL_MIG_CONFIG} instead, and let the reconciler report progress.",
            )
        return verdict
