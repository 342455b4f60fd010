"""The mig-parted ConfigMap, listed then watched through the API into a `ConfigCache`.

One watch thread per gunicorn worker (started by the app factory after the fork). Any API or
network error is logged, backed off, and followed by a fresh list: the thread never dies and
the last good config stays in use meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import watch

from webhook.config_source import ConfigCache, ConfigMapRef, ReloadObserver

log = logging.getLogger("mig_guard.webhook.config")

WATCH_TIMEOUT_SECONDS = 240
MAX_BACKOFF_SECONDS = 15.0


class ConfigMapConfigSource:
    """The mig-parted ConfigMap, listed then watched (one thread); relists after any error."""

    def __init__(
        self,
        core_api: Any,
        ref: ConfigMapRef,
        observer: ReloadObserver | None = None,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.ref = ref
        self.cache = ConfigCache(str(ref), observer)
        self._core = core_api
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread: threading.Thread | None = None
        self._watch: Any = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="config-map-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _apply(self, event_type: str, data: dict[str, str] | None) -> None:
        if event_type == "DELETED":
            self.cache.fail(f"{self.ref} was deleted")
            return
        self.cache.offer((data or {}).get(self.ref.key), f"{self.ref} key {self.ref.key}")

    def _list(self) -> str:
        selector = f"metadata.name={self.ref.name}"
        found = self._core.list_namespaced_config_map(self.ref.namespace, field_selector=selector)
        if not found.items:
            self.cache.fail(f"{self.ref} not found")
        for item in found.items:
            self._apply("ADDED", item.data)
        return str(found.metadata.resource_version)

    def _watch_once(self, resource_version: str) -> None:
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        stream = self._watch.stream(
            self._core.list_namespaced_config_map,
            self.ref.namespace,
            field_selector=f"metadata.name={self.ref.name}",
            resource_version=resource_version,
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            _request_timeout=WATCH_TIMEOUT_SECONDS + 30,
        )
        for event in stream:
            if self._stop.is_set():
                return
            if event["type"] == "ERROR":
                return  # e.g. 410 Gone: list again
            self._apply(event["type"], event["object"].data)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                version = self._list()
                backoff = 0.5
                self._watch_once(version)
            except Exception as exc:  # the watch must outlive any API or network error
                log.warning("ConfigMap watch failed, retrying", extra={"fields": {"error": str(exc)[:300]}})
                self.cache.note(f"cannot read {self.ref}: {str(exc)[:200]}")
                if self._sleep(backoff):
                    return
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
