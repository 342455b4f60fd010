"""The catalog regenerates from the sources in the repository to exactly the shipped file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _tool() -> object:
    spec = importlib.util.spec_from_file_location("build_catalog", ROOT / "tools" / "build_catalog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_catalog", module)
    spec.loader.exec_module(module)
    return module


def test_the_catalog_regenerates_to_the_shipped_file() -> None:
    tool = _tool()
    source = tool.DEFAULT_SOURCE  # type: ignore[attr-defined]
    assert source.is_relative_to(ROOT), "the research table must live in the repository"
    shipped = (ROOT / "migcore" / "data" / "catalog.yaml").read_text()
    assert tool.render(source) == shipped  # type: ignore[attr-defined]
