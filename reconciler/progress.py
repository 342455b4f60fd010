"""Where a change's record (`reconciler.change.Progress`) is kept, so that a reconciler killed
mid-change resumes (or rolls back) when it comes back: in the Node annotation
`mig-guard.io/progress`, written with the rest of each step, or, with `--host-state-dir`, in a file
on the host that survives the node object being recreated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from migcore import keys
from reconciler.change import Progress
from reconciler.node_state import NodeState

STATE_FILE = "progress.json"


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
