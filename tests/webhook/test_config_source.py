"""The file config source: loads, reloads on change, keeps the last good version."""

from __future__ import annotations

import os
from pathlib import Path

from webhook.config_source import ConfigMapRef, FileConfigSource

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
    source = FileConfigSource(path, recorder)
    assert source.cache.state.ready
    assert set(source.cache.state.view.config.configs) == {"all-disabled", "all-1g.5gb"}  # type: ignore[union-attr]

    rewrite(path, GOOD.replace("version: v1", "version: v2"))
    source.check()
    state = source.cache.state
    assert state.ready
    assert state.last_good_in_use
    assert "does not parse" in state.problem
    assert "all-1g.5gb" in state.view.config.configs  # type: ignore[union-attr]

    rewrite(path, GOOD.replace("all-1g.5gb", "all-1g.5gb-renamed"))
    source.check()
    assert not source.cache.state.last_good_in_use
    assert "all-1g.5gb-renamed" in source.cache.state.view.config.configs  # type: ignore[union-attr]
    assert recorder.events == [(True, False), (False, True), (True, False)]


def test_a_missing_file_is_not_ready_with_a_reason(tmp_path: Path) -> None:
    source = FileConfigSource(tmp_path / "absent.yaml")
    assert not source.cache.state.ready
    assert "cannot read" in source.cache.state.problem


def test_configmap_reference_parsing() -> None:
    ref = ConfigMapRef.parse("gpu-operator/default-mig-parted-config", "config.yaml")
    assert (ref.namespace, ref.name, ref.key) == ("gpu-operator", "default-mig-parted-config", "config.yaml")
    for bad in ("no-slash", "/name", "ns/", "a/b/c"):
        try:
            ConfigMapRef.parse(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
