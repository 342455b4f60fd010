"""JSON log lines: one object per line, fields under `extra={"fields": {...}}`.

Admission decisions log uid, node, user, operation and verdict: enough to answer "who was
refused what and why", never request bodies or certificate material.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """Formats a record as compact JSON with a UTC time stamp."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def configure(level: str = "INFO") -> None:
    """Send mig-guard's logs (logger `mig_guard`) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("mig_guard")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
