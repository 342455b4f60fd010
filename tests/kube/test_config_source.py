"""The mig-parted config source: a polled file and a watched ConfigMap wake the reconciler when the
content changes; the webhook's view keeps the last good version when a new one is broken."""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import ensure_namespace
from kube.config_source import ConfigMapFeed, ConfigMapRef, ConfigSource, FileFeed, Version
from migcore.catalog import load_catalog
from migcore.config import ConfigError

CATALOG = load_catalog()
ONE = "version: v1\nmig-configs:\n  all-disabled:\n    - devices: all\n      mig-enabled: false\n"
TWO = ONE + "  all-1g.5gb:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: 7}\n"


def file_source(path: Path, poll_seconds: float = 1.0) -> ConfigSource:
    return ConfigSource(FileFeed(path, poll_seconds), CATALOG)


def _watch(source: ConfigSource) -> tuple[queue.Queue[str], threading.Event]:
    wakes: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=source.watch, args=(lambda: wakes.put("config"), stop), daemon=True).start()
    return wakes, stop


def test_file_source_parses_and_wakes_on_change(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(ONE)
    source = file_source(path, poll_seconds=0.05)
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
    source = ConfigSource(ConfigMapFeed(k8s_api, ConfigMapRef(namespace, "mig-parted-config")), CATALOG)
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
    source = file_source(path)
    woken: list[str] = []

    def edit_then_load() -> None:  # the reconcile thread loads after the watch thread has started
        path.write_text(TWO)
        source.load()

    source.watch(lambda: woken.append("config"), _Polls(edit_then_load, _nothing, _nothing))
    assert woken == []  # load() already read TWO: nothing changed since

    source.watch(lambda: woken.append("config"), _Polls(lambda: path.write_text(ONE), _nothing, _nothing))
    assert woken == ["config"]  # an edit after load() wakes, once while load() has not run


def test_file_watch_ignores_one_unreadable_poll_but_not_a_deleted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(ONE)
    feed = FileFeed(path)
    source = ConfigSource(feed, CATALOG)
    source.load()
    woken: list[str] = []
    real_read = feed.read
    failures = iter([Version(None, "cannot read")])  # one read fails (an OSError under load)
    monkeypatch.setattr(feed, "read", lambda: next(failures, real_read()))
    source.watch(lambda: woken.append("config"), _Polls(_nothing, _nothing, _nothing))
    assert woken == []

    source.watch(lambda: woken.append("config"), _Polls(path.unlink, _nothing, _nothing, _nothing))
    assert woken == ["config"]


# --- the webhook's view: the last good version stays in use ------------------------------------------

GOOD = """version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-1g.5gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
"""


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[bool, bool]] = []

    def config_loaded(self, ok: bool, loaded_at: float | None, last_good_in_use: bool) -> None:
        self.events.append((ok, last_good_in_use))


def rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a visibly new mtime


def test_a_broken_version_keeps_the_last_good_one_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    source = ConfigSource(FileFeed(path), CATALOG, recorder)
    source.refresh()
    assert source.state.ready
    assert set(source.state.view.config.configs) == {"all-disabled", "all-1g.5gb"}  # type: ignore[union-attr]

    rewrite(path, GOOD.replace("version: v1", "version: v2"))
    source.refresh()
    state = source.state
    assert state.ready
    assert state.last_good_in_use
    assert "does not parse" in state.problem
    assert "all-1g.5gb" in state.view.config.configs  # type: ignore[union-attr]

    rewrite(path, GOOD.replace("all-1g.5gb", "all-1g.5gb-renamed"))
    source.refresh()
    assert not source.state.last_good_in_use
    assert "all-1g.5gb-renamed" in source.state.view.config.configs  # type: ignore[union-attr]
    assert recorder.events == [(True, False), (False, True), (True, False)]


def test_a_missing_file_is_not_ready_with_a_reason(tmp_path: Path) -> None:
    source = ConfigSource(FileFeed(tmp_path / "absent.yaml"), CATALOG)
    source.refresh()
    assert not source.state.ready
    assert "cannot read" in source.state.problem


def test_configmap_reference_parsing() -> None:
    ref = ConfigMapRef.parse("gpu-operator/default-mig-parted-config", "config.yaml")
    assert (ref.namespace, ref.name, ref.key) == ("gpu-operator", "default-mig-parted-config", "config.yaml")
    for bad in ("no-slash", "/name", "ns/", "a/b/c"):
        try:
            ConfigMapRef.parse(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
