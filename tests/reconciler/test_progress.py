"""The persisted progress record: survives a restart in a host file or a Node annotation."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from devcluster.helpers import create_gpu_node
from migcore import keys
from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec
from reconciler.change import Progress
from reconciler.node_state import NodeState
from reconciler.progress import FileProgressStore, NodeProgressStore

BEFORE = {
    0: GpuGeometry(True, (GpuInstanceSpec(0, 4, "3g.20gb", (ComputeInstanceSpec("3g.20gb", 0),)),)),
    1: GpuGeometry(False),
}


def _progress() -> Progress:
    return Progress(
        "all-1g.5gb",
        "digest",
        dict(BEFORE),
        {"nvidia.com/gpu.deploy.device-plugin": "true"},
        phase="applying",
        step=3,
        reboot_attempted=True,
    )


def test_file_store_round_trips_and_clears(tmp_path: Path) -> None:
    store = FileProgressStore(tmp_path / "state")
    assert store.load() is None
    record = _progress()
    store.save(record)
    again = FileProgressStore(tmp_path / "state").load()  # a restarted reconciler
    assert again == record
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["progress.json"]  # no temp files left
    store.clear()
    assert store.load() is None


def test_an_unreadable_record_is_dropped_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_text("{not json")
    assert FileProgressStore(tmp_path).load() is None


def test_node_store_round_trips(k8s_api: Any) -> None:
    name = f"pg-{uuid.uuid4().hex[:6]}"
    create_gpu_node(k8s_api, name, fake=False)
    node = NodeState(k8s_api, name)
    store = NodeProgressStore(node)
    record = _progress()
    store.save(record)
    assert NodeProgressStore(NodeState(k8s_api, name)).load() == record
    store.clear()
    assert keys.ANNOTATION_PROGRESS not in node.annotations()
    assert store.load() is None
