"""Where the mig-parted config comes from: a ConfigMap (watched) or a file (polled).

Editing the config under the same name must be re-applied (upstream never does, issue
mig-parted#108), so both sources wake the loop when the content changes; the parsed config is
cached by content so an unchanged source is not re-parsed on every reconcile.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client import ApiException

from migcore.config import ConfigError, MigPartedConfig, parse_config
from reconciler.api_retry import is_transient

log = logging.getLogger(__name__)

DEFAULT_KEY = "config.yaml"
Wake = Callable[[str], None]
_UNSET = object()


class ConfigSource(Protocol):
    def load(self) -> MigPartedConfig:
        """The current config; raise ConfigError when it is missing or does not parse."""
        ...

    def watch(self, wake: Wake, stop: threading.Event) -> None:
        """Call `wake("config")` whenever the content changes, until `stop` is set (runs in a thread)."""
        ...

    def describe(self) -> str: ...


class _ParseCache:
    def __init__(self) -> None:
        self._digest: str | None = None
        self._config: MigPartedConfig | None = None

    def parse(self, text: str) -> MigPartedConfig:
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest != self._digest or self._config is None:
            self._config = parse_config(text)
            self._digest = digest
        return self._config


def _digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


class FileConfigSource:
    def __init__(self, path: str | Path, poll_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.poll_seconds = poll_seconds
        self._cache = _ParseCache()
        # The digest of the content the last load() read (None: unreadable); _UNSET before any.
        self._loaded: object = _UNSET

    def describe(self) -> str:
        return f"file {self.path}"

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except OSError:
            return None

    def load(self) -> MigPartedConfig:
        text = self._read()
        self._loaded = _digest(text)
        if text is None:
            raise ConfigError([f"cannot read the config file {self.path}"])
        return self._cache.parse(text)

    def watch(self, wake: Wake, stop: threading.Event) -> None:
        """Wake when the content differs from what load() last read (so an edit between load() and
        the first poll wakes too, and content load() already read does not), once per content.

        Before the first load() the baseline is the first read here. One unreadable poll is not a
        change (a transient OSError under load would wake twice for nothing); two in a row are."""
        baseline: object = _UNSET
        notified: object = _UNSET
        unreadable = 0
        while not stop.wait(self.poll_seconds):
            digest = _digest(self._read())
            unreadable = unreadable + 1 if digest is None else 0
            if unreadable == 1:
                continue
            if baseline is _UNSET:
                baseline = digest
            loaded = self._loaded  # set by load() in the reconcile thread
            reference = baseline if loaded is _UNSET else loaded
            if digest == reference:
                notified = _UNSET
            elif digest != notified:
                notified = digest
                log.info("config file %s changed", self.path)
                wake("config")


class ConfigMapConfigSource:
    def __init__(self, api: Any, namespace: str, name: str, key: str = DEFAULT_KEY) -> None:
        self.core: Any = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.name = name
        self.key = key
        self._cache = _ParseCache()

    def describe(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name} key {self.key}"

    def load(self) -> MigPartedConfig:
        try:
            cm = self.core.read_namespaced_config_map(self.name, self.namespace)
        except ApiException as exc:
            if is_transient(exc):
                raise  # the API server, not the config: the loop retries with backoff
            raise ConfigError([f"cannot read {self.describe()}: {exc.status} {exc.reason}"]) from exc
        text = (cm.data or {}).get(self.key)
        if text is None:
            raise ConfigError([f"{self.describe()}: no such key"])
        return self._cache.parse(text)

    def watch(self, wake: Wake, stop: threading.Event) -> None:
        last: object = _UNSET  # the first sight wakes too: a ConfigMap created after start counts
        while not stop.is_set():
            w: Any = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in w.stream(
                    self.core.list_namespaced_config_map,
                    self.namespace,
                    field_selector=f"metadata.name={self.name}",
                    timeout_seconds=30,
                ):
                    if stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    text = None if event["type"] == "DELETED" else (obj.data or {}).get(self.key)
                    if text != last:
                        log.info("%s changed", self.describe())
                        wake("config")
                        last = text
            except Exception as exc:  # the API server restarting must not kill the watch thread
                log.warning("watch of %s failed (%s); retrying", self.describe(), exc)
                stop.wait(1.0)
