"""Where the mig-parted config comes from: a local file here, a ConfigMap in `configmap_watch`.

Each source keeps a parsed cache (no API call per admission request). A new version that
does not parse leaves the last good one in use and says so (log, `last_good_in_use`); a
deleted ConfigMap likewise. Nothing here raises into a request: the watch thread catches,
logs, backs off and lists again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from migcore.config import ConfigError, parse_config
from webhook.validation import ConfigView

log = logging.getLogger("mig_guard.webhook.config")

DEFAULT_CONFIGMAP_NAMESPACE = "gpu-operator"
DEFAULT_CONFIGMAP_NAME = "default-mig-parted-config"
DEFAULT_CONFIGMAP_KEY = "config.yaml"
FILE_POLL_SECONDS = 2.0


class ReloadObserver(Protocol):
    """Told about every load attempt (the metrics implement it)."""

    def config_loaded(self, ok: bool, loaded_at: float | None, last_good_in_use: bool) -> None: ...


@dataclass(frozen=True)
class SourceState:
    """What /readyz and /metrics report about the source."""

    view: ConfigView | None
    loaded_at: float | None
    last_good_in_use: bool
    problem: str

    @property
    def ready(self) -> bool:
        return self.view is not None


@dataclass(frozen=True)
class ConfigMapRef:
    namespace: str
    name: str
    key: str = DEFAULT_CONFIGMAP_KEY

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    @staticmethod
    def parse(text: str, key: str = DEFAULT_CONFIGMAP_KEY) -> ConfigMapRef:
        """`NAMESPACE/NAME` as given on the command line."""
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"expected NAMESPACE/NAME, got {text!r}")
        return ConfigMapRef(namespace, name, key)


class ConfigCache:
    """The last good parsed config plus what went wrong since (thread-safe)."""

    def __init__(self, origin: str, observer: ReloadObserver | None = None) -> None:
        self.origin = origin
        self._observer = observer
        self._lock = threading.Lock()
        self._state = SourceState(None, None, False, f"waiting for the first load of {origin}")
        self._text_digest: str | None = None

    @property
    def state(self) -> SourceState:
        return self._state

    def offer(self, text: str | bytes | None, what: str) -> bool:
        """Parse `text` (a new version of the source); True when it is now the config in use."""
        if text is None:
            return self.fail(f"{what}: no config found")
        raw = text.encode() if isinstance(text, str) else text
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._text_digest and self._state.view is not None and not self._state.last_good_in_use:
            return True
        try:
            config = parse_config(raw)
        except ConfigError as exc:
            shown = "; ".join(exc.errors[:3]) + (
                f" (and {len(exc.errors) - 3} more)" if len(exc.errors) > 3 else ""
            )
            return self.fail(f"{what} does not parse: {shown}")
        now = time.time()
        with self._lock:
            self._text_digest = digest
            self._state = SourceState(ConfigView(config, self.origin), now, False, "")
        log.info("config loaded", extra={"fields": {"source": what, "configs": len(config.configs)}})
        if self._observer:
            self._observer.config_loaded(True, now, False)
        return True

    def note(self, problem: str) -> None:
        """Say why nothing is loaded yet (an API error, not a rejected config: no metric)."""
        if self._state.view is None:
            self._state = SourceState(None, None, False, problem)

    def fail(self, problem: str) -> bool:
        """Record a failed load; the last good config (if any) stays in use."""
        with self._lock:
            old = self._state
            self._text_digest = None
            self._state = SourceState(old.view, old.loaded_at, old.view is not None, problem)
        if old.view is not None:
            log.error(
                "config rejected, last good version stays in use", extra={"fields": {"problem": problem}}
            )
        else:
            log.error("config not loaded", extra={"fields": {"problem": problem}})
        if self._observer:
            self._observer.config_loaded(False, old.loaded_at, old.view is not None)
        return False


class ConfigSource(Protocol):
    cache: ConfigCache

    def start(self) -> None: ...
    def stop(self) -> None: ...


class FileConfigSource:
    """A local file, read at start and again when its mtime or size changes."""

    def __init__(
        self, path: Path, observer: ReloadObserver | None = None, poll: float = FILE_POLL_SECONDS
    ) -> None:
        self.path = path
        self.cache = ConfigCache(f"file {path}", observer)
        self._poll = poll
        self._seen: tuple[float, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.check()

    def check(self) -> None:
        """Load the file if it changed since the last look."""
        try:
            stat = os.stat(self.path)
            seen = (stat.st_mtime, stat.st_size, stat.st_ino)
            if seen == self._seen:
                return
            self._seen = seen
            self.cache.offer(self.path.read_bytes(), str(self.path))
        except OSError as exc:
            if self._seen is not None or self.cache.state.problem.startswith("waiting"):
                self._seen = None
                self.cache.fail(f"{self.path}: cannot read: {exc.strerror or exc}")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="config-file-poll", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self.check()

    def stop(self) -> None:
        self._stop.set()
