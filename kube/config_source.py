"""The mig-parted config, from a file (polled) or a ConfigMap (listed, then watched): one source
for the webhook and the reconciler.

Each version is parsed once (cached by content). Two ways to use it:
- the webhook keeps `state` current from a thread (`start`): a version that is missing or does not
  parse leaves the last good config in use and says so (`last_good_in_use`, the log, the
  observer), because admission must go on judging;
- the reconciler calls `load()`, which reads the source now and raises ConfigError for such a
  version (it must not apply a stale config), and runs `watch(on_change)` in a thread to be woken
  when the content changes: editing the config under the same name must be re-applied (upstream
  never does, mig-parted#108).
A transient API error is never a verdict on the config: `load()` raises it as it came (the caller
retries), the watch backs off and lists again (`kube.watching`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client as k8s
from kubernetes.client import ApiException

from kube.errors import is_transient
from kube.watching import DEFAULT_BACKOFF, Backoff, follow
from migcore import keys
from migcore.catalog import Catalog
from migcore.config import MAX_CONFIG_BYTES, ConfigError, MigPartedConfig, parse_config

log = logging.getLogger("mig_guard.kube.config_source")

FILE_POLL_SECONDS = 1.0
ERRORS_SHOWN = 3
_UNSET: Any = object()


@dataclass(frozen=True)
class ConfigMapRef:
    namespace: str
    name: str
    key: str = keys.MIG_PARTED_CONFIG_KEY

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    @staticmethod
    def parse(text: str, key: str = keys.MIG_PARTED_CONFIG_KEY) -> ConfigMapRef:
        """`NAMESPACE/NAME` as given on the command line."""
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"expected NAMESPACE/NAME, got {text!r}")
        return ConfigMapRef(namespace, name, key)


@dataclass(frozen=True)
class ConfigView:
    """The mig-parted config in use and where it came from (named in denials)."""

    config: MigPartedConfig
    origin: str


@dataclass(frozen=True)
class Version:
    """What the source holds at one look: the config's text, or None and why there is none."""

    text: bytes | None
    problem: str = ""
    digest: str | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        digest = None if self.text is None else hashlib.sha256(self.text).hexdigest()
        object.__setattr__(self, "digest", digest)


Deliver = Callable[[Version, bool], None]  # a version, and whether it comes from a (re)list


class Feed(Protocol):
    """Where versions come from."""

    @property
    def origin(self) -> str:
        """The source as messages name it (`file F`, `ConfigMap NAMESPACE/NAME`)."""
        ...

    def describe(self) -> str: ...

    def read(self) -> Version:
        """What the source holds now; raises only a transient API error."""
        ...

    def follow(self, deliver: Deliver, stop: threading.Event, on_error: Callable[[str], None]) -> None:
        """Deliver every new look at the source until `stop` is set (runs in a thread)."""
        ...


class FileFeed:
    """A local file (a mounted ConfigMap, or the CLI's), read again every `poll_seconds`."""

    def __init__(self, path: str | Path, poll_seconds: float = FILE_POLL_SECONDS) -> None:
        self.path = Path(path)
        self.poll_seconds = poll_seconds

    @property
    def origin(self) -> str:
        return f"file {self.path}"

    def describe(self) -> str:
        return self.origin

    def read(self) -> Version:
        try:
            with self.path.open("rb") as handle:
                return Version(handle.read(MAX_CONFIG_BYTES + 1))
        except OSError as exc:
            return Version(None, f"cannot read {self.path}: {exc.strerror or exc}")

    def follow(self, deliver: Deliver, stop: threading.Event, on_error: Callable[[str], None]) -> None:
        """One unreadable look is not a change (a transient error under load would flap the
        source twice); two in a row are."""
        unreadable = 0
        while not stop.wait(self.poll_seconds):
            version = self.read()
            unreadable = unreadable + 1 if version.text is None else 0
            if unreadable != 1:
                deliver(version, False)


class ConfigMapFeed:
    """One key of a ConfigMap: read with a GET, followed by a list and a watch."""

    def __init__(self, api: Any, ref: ConfigMapRef, backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.core: Any = k8s.CoreV1Api(api)
        self.ref = ref
        self.backoff = backoff

    @property
    def origin(self) -> str:
        return str(self.ref)

    def describe(self) -> str:
        return f"{self.ref} key {self.ref.key}"

    def _version(self, configmap: Any) -> Version:
        text = (configmap.data or {}).get(self.ref.key)
        if text is None:
            return Version(None, f"{self.ref} has no key {self.ref.key}")
        return Version(text.encode())

    def read(self) -> Version:
        try:
            return self._version(self.core.read_namespaced_config_map(self.ref.name, self.ref.namespace))
        except ApiException as exc:
            if is_transient(exc):
                raise  # the API server, not the config
            return Version(None, f"cannot read {self.ref}: {exc.status} {exc.reason}")

    def follow(self, deliver: Deliver, stop: threading.Event, on_error: Callable[[str], None]) -> None:
        def listed(items: Any) -> None:
            deliver(self._version(items[0]) if items else Version(None, f"{self.ref} not found"), True)

        def changed(kind: str, configmap: Any) -> None:
            gone = Version(None, f"{self.ref} was deleted")
            deliver(gone if kind == "DELETED" else self._version(configmap), False)

        follow(
            self.core.list_namespaced_config_map,
            self.ref.namespace,
            field_selector=f"metadata.name={self.ref.name}",
            on_list=listed,
            on_event=changed,
            stop=stop,
            what=str(self.ref),
            on_error=lambda exc: on_error(f"cannot read {self.ref}: {str(exc)[:200]}"),
            backoff=self.backoff,
        )


class ReloadObserver(Protocol):
    """Told about every load attempt (the webhook's metrics implement it)."""

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


class ConfigSource:
    """The config from `feed`, parsed against `catalog` (see the module docstring)."""

    def __init__(self, feed: Feed, catalog: Catalog, observer: ReloadObserver | None = None) -> None:
        self.feed = feed
        self._catalog = catalog
        self._observer = observer
        self._lock = threading.Lock()
        self._state = SourceState(None, None, False, f"waiting for the first load of {feed.origin}")
        self._parsed: str | None = None  # the digest of the version in use, while it is the latest
        self._seen: Any = _UNSET  # the digest of the latest version looked at (None: no text)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> SourceState:
        return self._state

    def describe(self) -> str:
        return self.feed.describe()

    # --- the reconciler's way: read now, be woken on change ---------------------------------------
    def load(self) -> MigPartedConfig:
        """The config the source holds now; ConfigError when it is missing or does not parse."""
        version = self.feed.read()
        with self._lock:
            self._seen = version.digest
        return self._take(version)

    def watch(self, on_change: Callable[[], None], stop: threading.Event) -> None:
        """Follow the source until `stop` is set (in a thread): every version is taken in, and
        `on_change` is called when its content differs from the last one looked at (by `load` or
        here; before any, the first look is the baseline), and on the first look after each
        (re)list of a ConfigMap."""

        def deliver(version: Version, listed: bool) -> None:
            with self._lock:
                changed = self._seen is not _UNSET and version.digest != self._seen
                self._seen = version.digest
            self.offer(version)
            if changed:
                log.info("%s changed", self.describe())
            if changed or listed:
                on_change()

        self.feed.follow(deliver, stop, self.note)

    # --- the webhook's way: a thread keeps `state` current ----------------------------------------
    def refresh(self) -> bool:
        """Read the source now; True when what it holds is the config in use."""
        return self.offer(self.feed.read())

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.watch, args=(lambda: None, self._stop), name="config-source", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # --- versions ---------------------------------------------------------------------------------
    def offer(self, version: Version) -> bool:
        """Take in a version of the source; True when it is now the config in use."""
        try:
            self._take(version)
        except ConfigError:
            return False
        return True

    def _take(self, version: Version) -> MigPartedConfig:
        if version.text is None:
            self._fail(version.problem)
            raise ConfigError([version.problem])
        with self._lock:
            state = self._state
            if version.digest == self._parsed and state.view is not None:
                return state.view.config
        try:
            config = parse_config(version.text, self._catalog)
        except ConfigError as exc:
            more = len(exc.errors) - ERRORS_SHOWN
            shown = "; ".join(exc.errors[:ERRORS_SHOWN]) + (f" (and {more} more)" if more > 0 else "")
            self._fail(f"{self.describe()} does not parse: {shown}")
            raise
        now = time.time()
        with self._lock:
            self._parsed = version.digest
            self._state = SourceState(ConfigView(config, self.feed.origin), now, False, "")
        log.info(
            "config loaded from %s: %d configs",
            self.describe(),
            len(config.configs),
            extra={"fields": {"source": self.describe(), "configs": len(config.configs)}},
        )
        if self._observer:
            self._observer.config_loaded(True, now, False)
        return config

    def note(self, problem: str) -> None:
        """Say why nothing is loaded yet (an API error, not a rejected config: no metric)."""
        with self._lock:
            if self._state.view is None:
                self._state = SourceState(None, None, False, problem)

    def _fail(self, problem: str) -> None:
        """A version that is not usable; the last good config (if any) stays in use."""
        with self._lock:
            old = self._state
            self._parsed = None
            self._state = SourceState(old.view, old.loaded_at, old.view is not None, problem)
        if problem != old.problem:  # said once, not on every look at the same broken version
            if old.view is not None:
                log.error(
                    "config rejected, last good version stays in use: %s",
                    problem,
                    extra={"fields": {"problem": problem}},
                )
            else:
                log.error("config not loaded: %s", problem, extra={"fields": {"problem": problem}})
        if self._observer:
            self._observer.config_loaded(False, old.loaded_at, old.view is not None)
