"""One way to follow Kubernetes objects: list them, then watch from the list's resourceVersion.

After a watch times out it resumes from the last version it saw (nothing is missed, nothing is
listed again); after a 410 Gone it lists again at once; after any other error it logs, backs off
(0.5 s, 1 s, ... at most `Backoff.most` apart, reset by a successful list) and lists again. The
thread that runs it never dies of an API server restarting, and stops when `stop` is set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import watch

from kube.errors import is_gone

log = logging.getLogger("mig_guard.kube.watching")

WATCH_SECONDS = 240
EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED")


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5
    most: float = 15.0


DEFAULT_BACKOFF = Backoff()


def follow(
    list_call: Callable[..., Any],
    *args: Any,
    field_selector: str,
    on_list: Callable[[Sequence[Any]], None],
    on_event: Callable[[str, Any], None],
    stop: threading.Event,
    what: str,
    on_error: Callable[[BaseException], None] | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    watch_seconds: int = WATCH_SECONDS,
    label_selector: str | None = None,
    start_version: str | None = None,
) -> None:
    """Follow the objects `list_call(*args, field_selector=...)` lists until `stop` is set: each
    (re)list is given to `on_list`, each watch event after it to `on_event(type, object)` (ADDED,
    MODIFIED, DELETED; bookmarks are only used to resume). `what` names them in logs; `on_error`
    hears of every failure (the loop goes on). `label_selector` narrows both too. `start_version`:
    the caller has just listed at that resourceVersion; the first watch starts there, unlisted."""
    delay = backoff.first
    selectors = {"field_selector": field_selector}
    if label_selector is not None:
        selectors["label_selector"] = label_selector
    while not stop.is_set():
        try:
            if start_version:
                version, start_version = start_version, None
            else:
                listed = list_call(*args, **selectors)
                on_list(list(listed.items or ()))
                delay = backoff.first
                version = listed.metadata.resource_version
            while not stop.is_set():
                w: Any = watch.Watch()  # type: ignore[no-untyped-call]
                for event in w.stream(
                    list_call,
                    *args,
                    **selectors,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=watch_seconds,
                    _request_timeout=watch_seconds + 30,
                ):
                    if stop.is_set():
                        w.stop()
                        return
                    if event and event["type"] in EVENT_TYPES:
                        on_event(event["type"], event["object"])
                version = w.resource_version or version  # resume where the timed-out watch ended
        except Exception as exc:  # an API server restarting must not kill the thread
            if stop.is_set():
                return
            if is_gone(exc):
                log.debug("watch of %s expired; listing again", what)
                continue
            log.warning(
                "watch of %s failed (%s); retrying in %.1fs",
                what,
                exc,
                delay,
                extra={"fields": {"error": str(exc)[:300]}},
            )
            if on_error is not None:
                on_error(exc)
            if stop.wait(delay):
                return
            delay = min(delay * 2, backoff.most)
