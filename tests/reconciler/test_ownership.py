"""The reconciler owns the state it reports (issue 10, point 4): at start and on resync a state or
reason it did not write is removed with an Event, and the truth is reported. The real API server
(its managedFields say who wrote what), simulated GPUs; nothing else stands in."""

from __future__ import annotations

import json
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node
from kube.config_source import ConfigSource, FileFeed
from migcore import keys
from migcore.catalog import load_catalog
from migcore.hold import pending_reason
from reconciler.gpu_access import GpuAccess
from reconciler.loop import Reconciler, Settings
from reconciler.nvml_sim import SimulatedNvml
from reconciler.ownership import EVENT_REASON, foreign_report

A100 = "NVIDIA-A100-SXM4-40GB"


@pytest.fixture
def reconciler(k8s_api: Any, tmp_path: Path) -> Reconciler:
    config = tmp_path / "config.yaml"
    config.write_text(resources.files("migcore").joinpath("data/default-mig-parted-config.yaml").read_text())
    name = f"owned-{uuid.uuid4().hex[:6]}"
    create_gpu_node(k8s_api, name, A100, 2, fake=False)
    access = GpuAccess(SimulatedNvml([A100] * 2, state_file=tmp_path / "gpus.json"))
    access.start()
    settings = Settings(node_name=name, podresources_socket=str(tmp_path / "no-kubelet.sock"))
    return Reconciler(k8s_api, access, ConfigSource(FileFeed(config), load_catalog()), settings)


def spoof(api: Any, name: str, labels: dict[str, str | None], annotations: dict[str, str | None]) -> None:
    """A write by someone else (here the admin, as `kubectl patch` would, with no admission in the way)."""
    k8s.CoreV1Api(api).patch_node(
        name, {"metadata": {"labels": labels, "annotations": annotations}}, field_manager="kubectl-patch"
    )


def report(rec: Reconciler) -> tuple[str | None, str | None]:
    node = rec.node.read()
    return (node.metadata.labels or {}).get(keys.LABEL_MIG_STATE), (node.metadata.annotations or {}).get(
        keys.ANNOTATION_REASON
    )


def corrections(api: Any, name: str) -> list[str]:
    # Raw JSON: Events of other writers (the core/v1 kind, no eventTime) do not fit the client's model.
    raw = k8s.EventsV1Api(api).list_namespaced_event("default", _preload_content=False)
    events = json.loads(raw.data)["items"]
    return [e["note"] for e in events if e["regarding"]["name"] == name and e["reason"] == EVENT_REASON]


def test_a_success_with_no_layout_applied_is_corrected_at_start(k8s_api: Any, reconciler: Reconciler) -> None:
    name = reconciler.settings.node_name
    reconciler.publish_hardware()
    reconciler.node.patch_metadata(labels={keys.LABEL_MIG_CONFIG: "all-2g.10gb"})
    spoof(k8s_api, name, {keys.LABEL_MIG_STATE: "success"}, {keys.ANNOTATION_REASON: "all good"})
    reconciler.reconcile("start")
    notes = corrections(k8s_api, name)
    assert len(notes) == 1
    assert "nvidia.com/mig.config.state='success' (written by kubectl-patch)" in notes[0]
    assert "mig-guard.io/reason='all good'" in notes[0]
    state, reason = report(reconciler)
    assert state == keys.STATE_SUCCESS and reason is not None and reason.startswith("all-2g.10gb applied")
    assert foreign_report(reconciler.node.view(), "all-2g.10gb") is None  # its own report now


def test_a_state_with_no_layout_requested_is_removed_on_resync(k8s_api: Any, reconciler: Reconciler) -> None:
    name = reconciler.settings.node_name
    spoof(k8s_api, name, {keys.LABEL_MIG_STATE: "success"}, {keys.ANNOTATION_REASON: "spoofed"})
    reconciler.reconcile("resync")
    assert report(reconciler) == (None, None)
    assert len(corrections(k8s_api, name)) == 1


def test_its_own_reports_and_the_webhooks_pending_are_left_alone(
    k8s_api: Any, reconciler: Reconciler
) -> None:
    name = reconciler.settings.node_name
    reconciler.publish_hardware()
    reconciler.node.patch_metadata(labels={keys.LABEL_MIG_CONFIG: "all-1g.5gb"})
    reconciler.reconcile("label")
    reported = report(reconciler)
    assert reported[0] == keys.STATE_SUCCESS
    reconciler.reconcile("resync")
    assert report(reconciler) == reported
    # The mutating webhook writes "pending" in the admin's own request (the admin's field manager).
    spoof(
        k8s_api,
        name,
        {keys.LABEL_MIG_CONFIG: "all-2g.10gb", keys.LABEL_MIG_STATE: keys.STATE_PENDING},
        {keys.ANNOTATION_REASON: pending_reason("all-2g.10gb")},
    )
    assert foreign_report(reconciler.node.view(), "all-2g.10gb") is None
    reconciler.reconcile("start")
    assert report(reconciler)[0] == keys.STATE_SUCCESS
    assert corrections(k8s_api, name) == []
