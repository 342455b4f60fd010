"""Config sources wake the loop when the content changes: a polled file, a watched ConfigMap."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import ensure_namespace
from migcore.config import ConfigError
from reconciler.config_source import ConfigMapConfigSource, FileConfigSource

ONE = "version: v1\nmig-configs:\n  all-disabled:\n    - devices: all\n      mig-enabled: false\n"
TWO = ONE + "  all-1g.5gb:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: 7}\n"


def _watch(source: Any) -> tuple[queue.Queue[str], threading.Event]:
    wakes: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=source.watch, args=(wakes.put, stop), daemon=True).start()
    return wakes, stop


def test_file_source_parses_and_wakes_on_change(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(ONE)
    source = FileConfigSource(path, poll_seconds=0.05)
    assert source.load().names() == ["all-disabled"]
    wakes, stop = _watch(source)
    try:
        path.write_text(TWO)
        assert wakes.get(timeout=10) == "config"
        assert sorted(source.load().names()) == ["all-1g.5gb", "all-disabled"]
    finally:
        stop.set()
    path.write_text("version: v2\n")
    with pytest.raises(ConfigError):
        source.load()


def test_configmap_source_wakes_on_edit(k8s_api: Any) -> None:
    namespace = f"cfg-{uuid.uuid4().hex[:6]}"
    ensure_namespace(k8s_api, namespace)
    core = k8s.CoreV1Api(k8s_api)
    source = ConfigMapConfigSource(k8s_api, namespace, "mig-parted-config")
    with pytest.raises(ConfigError, match="cannot read ConfigMap"):
        source.load()
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "mig-parted-config"}, "data": {"config.yaml": ONE}}
    )
    assert source.load().names() == ["all-disabled"]
    wakes, stop = _watch(source)
    try:
        assert wakes.get(timeout=10) == "config"  # first sight
        core.patch_namespaced_config_map("mig-parted-config", namespace, {"data": {"config.yaml": TWO}})
        assert wakes.get(timeout=10) == "config"
        assert "all-1g.5gb" in source.load().names()
    finally:
        stop.set()


class _Polls(threading.Event):
    """A `stop` for running `watch` in the test's thread: before poll N it runs `steps[N]`, then
    says "go on"; once the steps are used up it says "stop"."""

    def __init__(self, *steps: Callable[[], object]) -> None:
        super().__init__()
        self.steps = list(steps)

    def wait(self, timeout: float | None = None) -> bool:
        if not self.steps:
            return True
        self.steps.pop(0)()
        return False


def _nothing() -> None:
    pass


def test_file_watch_compares_with_what_load_read_not_with_its_own_first_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(ONE)
    source = FileConfigSource(path)
    woken: list[str] = []

    def edit_then_load() -> None:  # the reconcile thread loads after the watch thread has started
        path.write_text(TWO)
        source.load()

    source.watch(woken.append, _Polls(edit_then_load, _nothing, _nothing))
    assert woken == []  # load() already read TWO: nothing changed since

    source.watch(woken.append, _Polls(lambda: path.write_text(ONE), _nothing, _nothing))
    assert woken == ["config"]  # an edit after load() wakes, once while load() has not run


def test_file_watch_ignores_one_unreadable_poll_but_not_a_deleted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(ONE)
    source = FileConfigSource(path)
    source.load()
    woken: list[str] = []
    real_read = source._read
    failures = iter([None])  # one read fails (an OSError under load), the next ones work
    monkeypatch.setattr(source, "_read", lambda: next(failures, real_read()))
    source.watch(woken.append, _Polls(_nothing, _nothing, _nothing))
    assert woken == []

    source.watch(woken.append, _Polls(path.unlink, _nothing, _nothing, _nothing))
    assert woken == ["config"]
