"""Crash safety: what a change has done so far, persisted before each step.

A reconciler killed mid-change restarts with this record: the operand labels it paused and
their exact previous values (so they are restored, not guessed), the GPUs' geometry before the
change (the rollback target, even when the GPUs are now half-way), and whether a reboot was
already attempted (at most one per change). It lives in the Node annotation
`mig-guard.io/progress` or, with `--host-state-dir`, in a file on the host that survives the
node object being recreated.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from migcore import keys
from migcore.geometry import GpuGeometry
from reconciler.node_state import NodeState, now_rfc3339

FORMAT_VERSION = 1
STATE_FILE = "progress.json"


@dataclass
class Progress:
    config: str
    config_digest: str
    before: dict[int, GpuGeometry]
    operands: dict[str, str] = field(default_factory=dict)
    phase: str = "starting"
    step: int = 0
    reboot_attempted: bool = False
    started_at: str = field(default_factory=now_rfc3339)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "config": self.config,
            "configDigest": self.config_digest,
            "before": {str(i): g.to_json() for i, g in sorted(self.before.items())},
            "operands": dict(sorted(self.operands.items())),
            "phase": self.phase,
            "step": self.step,
            "rebootAttempted": self.reboot_attempted,
            "startedAt": self.started_at,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def loads(text: str) -> Progress:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"progress record: expected an object with version {FORMAT_VERSION}")
        return Progress(
            config=str(raw["config"]),
            config_digest=str(raw.get("configDigest", "")),
            before={int(i): GpuGeometry.from_json(g) for i, g in raw.get("before", {}).items()},
            operands={str(k): str(v) for k, v in raw.get("operands", {}).items()},
            phase=str(raw.get("phase", "")),
            step=int(raw.get("step", 0)),
            reboot_attempted=bool(raw.get("rebootAttempted", False)),
            started_at=str(raw.get("startedAt", "")),
        )


class ProgressStore(Protocol):
    # True when the record is the Node annotation: the reconciler then writes it together with
    # the rest of a step (one Node write) instead of through save/clear.
    on_node: bool

    def load(self) -> Progress | None: ...
    def save(self, progress: Progress) -> None: ...
    def clear(self) -> None: ...


def _parse(text: str | None) -> Progress | None:
    """A record, or None; an unreadable record is dropped rather than wedging the node forever."""
    if not text:
        return None
    try:
        return Progress.loads(text)
    except (ValueError, KeyError, TypeError):
        return None


class NodeProgressStore:
    """The record in the Node annotation `mig-guard.io/progress`."""

    on_node = True

    def __init__(self, node: NodeState) -> None:
        self.node = node

    def load(self) -> Progress | None:
        return _parse(self.node.annotations().get(keys.ANNOTATION_PROGRESS))

    def save(self, progress: Progress) -> None:
        self.node.annotate(keys.ANNOTATION_PROGRESS, progress.dumps())

    def clear(self) -> None:
        self.node.annotate(keys.ANNOTATION_PROGRESS, None)


class FileProgressStore:
    """The record in `<dir>/progress.json`, written atomically (temp file, fsync, rename)."""

    on_node = False

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / STATE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> Progress | None:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, progress: Progress) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".progress.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(progress.dumps())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
