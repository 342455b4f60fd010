"""One reconcile at a time, in-process: the real API server, simulated GPUs (the only stand-in),
the shipped GPU Operator config. Each test drives `Reconciler.reconcile` directly, so the
outcome of every step is checked without waiting on the loop's timers."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from devcluster.helpers import create_gpu_node, ensure_namespace
from kube.config_source import ConfigSource, FileFeed
from migcore import keys
from migcore.catalog import Catalog, catalog_from_data, load_catalog
from migcore.geometry import GpuGeometry
from migcore.hardware import NodeGpus
from reconciler.change import Progress
from reconciler.gpu_access import GpuAccess
from reconciler.loop import Reconciler, Settings
from reconciler.nvml_sim import SimulatedNvml
from reconciler.rollout import Budget, RolloutSettings

A100 = "NVIDIA-A100-SXM4-40GB"
DP = "nvidia.com/gpu.deploy.device-plugin"
DCGM = "nvidia.com/gpu.deploy.dcgm"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(resources.files("migcore").joinpath("data/default-mig-parted-config.yaml").read_text())
    return path


def _make(
    k8s_api: Any,
    tmp_path: Path,
    config_file: Path,
    gpus: int = 2,
    faults: str | None = None,
    labels: dict[str, str] | None = None,
    reboot: Callable[[], None] | None = None,
    rollout: RolloutSettings | None = None,
) -> tuple[Reconciler, SimulatedNvml]:
    name = f"loop-{uuid.uuid4().hex[:6]}"
    create_gpu_node(k8s_api, name, A100, gpus, labels=labels, fake=False)
    sim = SimulatedNvml([A100] * gpus, state_file=tmp_path / "gpus.json", faults=faults)
    access = GpuAccess(sim)
    access.start()
    settings = Settings(
        node_name=name,
        podresources_socket=str(tmp_path / "no-kubelet.sock"),
        reboot_enabled=reboot is not None,
        rollout=rollout,
    )
    return Reconciler(
        k8s_api, access, ConfigSource(FileFeed(config_file), load_catalog()), settings, reboot=reboot
    ), sim


def _label(rec: Reconciler, config: str) -> None:
    rec.node.patch_metadata(labels={keys.LABEL_MIG_CONFIG: config})


def _node(rec: Reconciler) -> tuple[dict[str, str], dict[str, str]]:
    node = rec.node.read()
    return dict(node.metadata.labels or {}), dict(node.metadata.annotations or {})


def _no_hold(rec: Reconciler) -> bool:
    node = rec.node.read()
    return keys.ANNOTATION_HOLD not in (node.metadata.annotations or {}) and not any(
        t.key == keys.TAINT_KEY for t in node.spec.taints or []
    )


def test_label_change_applies_and_reports_success(k8s_api: Any, tmp_path: Path, config_file: Path) -> None:
    rec, _ = _make(k8s_api, tmp_path, config_file, labels={DP: "true", DCGM: "false"})
    rec.publish_hardware()
    _label(rec, "all-1g.5gb")
    rec.reconcile("label")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success", annotations[keys.ANNOTATION_REASON]
    assert annotations[keys.ANNOTATION_REASON].startswith("all-1g.5gb applied")
    assert (labels[DP], labels[DCGM]) == ("true", "false")  # operands restored exactly
    assert keys.ANNOTATION_PROGRESS not in annotations
    assert _no_hold(rec)
    report = NodeGpus.from_annotation(annotations[keys.ANNOTATION_GPUS])
    for gpu in report.gpus:
        assert gpu.geometry is not None and gpu.geometry.device_counts() == {"1g.5gb": 7}
    assert rec.access.geometry(0).device_counts() == {"1g.5gb": 7}
    cond = rec.node.condition()
    assert (cond.status, cond.reason) == ("True", "Applied")

    # Level-triggered: nothing to do now, and nothing is written.
    version = rec.node.read().metadata.resource_version
    rec.reconcile("resync")
    assert rec.node.read().metadata.resource_version == version


def test_invalid_config_fails_with_the_reason_and_leaves_gpus_alone(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    rec, _ = _make(k8s_api, tmp_path, config_file)
    before = rec.access.geometries()
    _label(rec, "all-1g.10gb.me")  # an 80GB profile: not on an A100-40GB
    rec.reconcile("label")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "failed"
    assert "all-1g.10gb.me cannot be applied on this node" in annotations[keys.ANNOTATION_REASON]
    assert rec.access.geometries() == before
    assert _no_hold(rec)
    assert rec.node.condition().reason == "InvalidConfig"


def test_busy_gpu_is_not_touched(k8s_api: Any, tmp_path: Path, config_file: Path) -> None:
    rec, sim = _make(k8s_api, tmp_path, config_file)
    _label(rec, "all-3g.20gb")
    rec.reconcile("label")
    sim.simAddProcess(1, 4242, gi_start=4)
    before = rec.access.geometries()
    _label(rec, "all-7g.40gb")
    rec.reconcile("label")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "failed"
    assert (
        "GPU 1 still runs compute processes on the GPU instance at 4 (pids 4242)"
        in annotations[keys.ANNOTATION_REASON]
    )
    assert rec.access.geometries() == before
    assert _no_hold(rec)


def test_nvml_fault_rolls_back_and_fails(k8s_api: Any, tmp_path: Path, config_file: Path) -> None:
    rec, _ = _make(
        k8s_api,
        tmp_path,
        config_file,
        faults="nvmlDeviceCreateGpuInstanceWithPlacement@13=InsufficientResources",
    )
    _label(rec, "all-3g.20gb")
    rec.reconcile("label")  # 2 GPUs x 2 GIs: 4 creates
    before = rec.access.geometries()
    _label(rec, "all-1g.5gb")  # 4 + 7 creates on GPU 0, then the 13th overall fails on GPU 1
    rec.reconcile("label")
    labels, annotations = _node(rec)
    reason = annotations[keys.ANNOTATION_REASON]
    assert labels[keys.LABEL_MIG_STATE] == "failed"
    assert "InsufficientResources" in reason and "rolled back" in reason
    assert rec.access.geometries() == before  # both GPUs, including the one that had succeeded
    assert _no_hold(rec)


def test_interrupted_change_restores_the_recorded_operand_values(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    rec, _ = _make(k8s_api, tmp_path, config_file, labels={DP: keys.PAUSED_FOR_MIG_CHANGE})
    # A previous run paused the device plugin (it was "custom") and took the hold, then died.
    before = rec.access.geometries()
    rec.store.save(Progress("all-2g.10gb", "x", dict(before), {DP: "custom"}, phase="evicting"))
    rec.node.hold("taint", "all-2g.10gb")
    _label(rec, "all-2g.10gb")
    rec.reconcile("start")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success"
    assert labels[DP] == "custom"
    assert keys.ANNOTATION_PROGRESS not in annotations
    assert _no_hold(rec)
    assert rec.access.geometry(0).device_counts() == {"2g.10gb": 3}


def test_already_applied_layout_only_reports(k8s_api: Any, tmp_path: Path, config_file: Path) -> None:
    rec, sim = _make(k8s_api, tmp_path, config_file, labels={DP: "true"})
    _label(rec, "all-disabled")
    calls = len(sim.calls)
    rec.reconcile("start")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success"
    assert labels[DP] == "true"
    assert not any(c.startswith(("nvmlDeviceSetMigMode", "nvmlDeviceCreate")) for c in sim.calls[calls:])
    assert (
        json.loads(annotations[keys.ANNOTATION_GPUS])["gpus"][0]["geometry"] == GpuGeometry(False).to_json()
    )


def test_resync_reapplies_after_the_gpus_lost_their_instances(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    rec, sim = _make(k8s_api, tmp_path, config_file)
    _label(rec, "all-2g.10gb")
    rec.reconcile("label")
    sim.simReboot()  # a host reboot or driver reload: MIG mode stays, instances are gone
    assert rec.access.geometry(0).device_counts() == {}
    rec.reconcile("resync")
    labels, _ = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success"
    assert all(g.device_counts() == {"2g.10gb": 3} for g in rec.access.geometries().values())


def test_label_removed_after_an_interrupted_change_rolls_back_and_releases(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    rec, _ = _make(k8s_api, tmp_path, config_file, labels={DP: keys.PAUSED_FOR_MIG_CHANGE})
    before = rec.access.geometries()
    _label(rec, "all-7g.40gb")
    rec.reconcile("label")
    # As if a change to all-7g.40gb from the original layout had died half-way:
    rec.store.save(Progress("all-7g.40gb", "x", dict(before), {DP: "true"}, phase="applying"))
    rec.node.hold("taint", "all-7g.40gb")
    rec.node.patch_metadata(labels={keys.LABEL_MIG_CONFIG: None, DP: keys.PAUSED_FOR_MIG_CHANGE})
    rec.reconcile("label")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "failed"
    assert "label was removed" in annotations[keys.ANNOTATION_REASON]
    assert rec.access.geometries() == before
    assert labels[DP] == "true"
    assert _no_hold(rec)
    assert keys.ANNOTATION_PROGRESS not in annotations


def test_a_failed_reboot_ends_in_failed_with_operands_restored(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    def broken_reboot() -> None:
        raise RuntimeError("systemctl reboot: access denied")

    rec, sim = _make(k8s_api, tmp_path, config_file, labels={DP: "true"}, reboot=broken_reboot)
    for gpu in range(2):
        sim.simSetResetRequiresReboot(gpu, True)
    before = rec.access.geometries()
    _label(rec, "all-3g.20gb")
    rec.reconcile("label")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "failed"
    assert "the host reboot failed: systemctl reboot: access denied" in annotations[keys.ANNOTATION_REASON]
    assert labels[DP] == "true"
    assert _no_hold(rec)
    assert rec.access.geometries() == before
    assert all(rec.access.mig_mode(i) == (False, False) for i in range(2))  # no mode left pending


def test_waits_for_processes_to_end_when_configured(k8s_api: Any, tmp_path: Path, config_file: Path) -> None:
    rec, sim = _make(k8s_api, tmp_path, config_file)
    _label(rec, "all-3g.20gb")
    rec.reconcile("label")
    sim.simAddProcess(1, 4242, gi_start=4)
    rec.settings.busy_gpu_timeout = 60
    ended = threading.Timer(1.0, sim.simRemoveProcess, args=(4242,))  # the job finishes meanwhile
    ended.start()
    _label(rec, "all-7g.40gb")
    rec.reconcile("label")
    ended.join()
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success", annotations[keys.ANNOTATION_REASON]
    assert rec.access.geometry(1).device_counts() == {"7g.40gb": 1}


def test_a_failed_change_is_retried_on_resync_not_on_a_wake_that_changes_nothing(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    rec, _ = _make(
        k8s_api,
        tmp_path,
        config_file,
        faults="nvmlDeviceCreateGpuInstanceWithPlacement@5=InsufficientResources",
    )
    _label(rec, "all-3g.20gb")
    rec.reconcile("start")  # 4 creates
    before = rec.access.geometries()
    _label(rec, "all-1g.5gb")
    rec.reconcile("label")  # the 5th create fails (one-shot: the same change would now succeed)
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "failed", annotations[keys.ANNOTATION_REASON]
    assert rec.access.geometries() == before

    # A config file that was polled but not edited, a node update, both at once: not a retry.
    version = rec.node.read().metadata.resource_version
    for why in ("config", "label", "config,label"):
        rec.reconcile(why)
    assert rec.node.read().metadata.resource_version == version
    assert rec.access.geometries() == before

    rec.reconcile("resync")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success", annotations[keys.ANNOTATION_REASON]


def _catalog_without(product_key: str) -> Catalog:
    """The shipped catalog minus one product: stands in for a GPU that ships after the catalog."""
    text = resources.files("migcore").joinpath("data/catalog.yaml").read_text()
    data = yaml.safe_load(text)
    del data["products"][product_key]
    return catalog_from_data(data)


def _without_tables(discover: Callable[[], NodeGpus]) -> Callable[[], NodeGpus]:
    """The report as a reconciler that cannot read the driver's MIG table gives it."""

    def without() -> NodeGpus:
        report = discover()
        gpus = tuple(replace(g, mig_table=None) if hasattr(g, "mig_table") else g for g in report.gpus)
        return replace(report, gpus=gpus)

    return without


def test_a_gpu_no_catalog_and_no_driver_table_can_judge_is_never_wiped(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    """Regression (issue 9): a product outside the catalog, reported without the driver's MIG table,
    used to get "MIG on, no instances": its instances destroyed and the node reporting success."""
    rec, sim = _make(k8s_api, tmp_path, config_file)
    _label(rec, "all-3g.20gb")
    rec.reconcile("label")
    before = rec.access.geometries()
    assert all(g.device_counts() == {"3g.20gb": 2} for g in before.values())

    unknown = _catalog_without("A100-40GB")
    rec.catalog = unknown
    rec.access = GpuAccess(sim, catalog=unknown)
    rec.access.discover = _without_tables(rec.access.discover)  # type: ignore[method-assign]
    calls = len(sim.calls)
    _label(rec, "all-1g.5gb")
    rec.reconcile("label")
    labels, annotations = _node(rec)
    reason = annotations[keys.ANNOTATION_REASON]
    assert labels[keys.LABEL_MIG_STATE] == "failed", reason
    assert "not in mig-guard's catalog" in reason
    assert rec.node.condition().reason == "InvalidConfig"
    assert rec.access.geometries() == before
    assert not any(c.endswith(("Destroy", "WithPlacement", "SetMigMode")) for c in sim.calls[calls:])
    assert _no_hold(rec)


def test_a_catalog_the_driver_contradicts_is_logged_and_counted(
    k8s_api: Any, tmp_path: Path, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec, _ = _make(k8s_api, tmp_path, config_file)
    data = yaml.safe_load(resources.files("migcore").joinpath("data/catalog.yaml").read_text())
    (three,) = [p for p in data["products"]["A100-40GB"]["profiles"] if p["name"] == "3g.20gb"]
    three["max_count"] = 3  # a catalog error: the (simulated) driver allows 2
    rec.catalog = catalog_from_data(data)
    _label(rec, "all-3g.20gb")
    with caplog.at_level("WARNING", logger="reconciler.loop"):
        rec.reconcile("label")
    labels, annotations = _node(rec)
    assert labels[keys.LABEL_MIG_STATE] == "success", annotations[keys.ANNOTATION_REASON]
    assert any(
        "the driver's MIG table disagrees with the catalog's A100-40GB" in r.message
        and "profile 2 (3g.20gb): at most 2; the catalog says 3" in r.message
        for r in caplog.records
    ), caplog.text
    metrics = rec.metrics.render().decode()
    assert 'mig_guard_catalog_disagreements{gpu="0",product="A100-40GB"} 1.0' in metrics


def test_a_slot_taken_for_a_change_no_longer_needed_is_freed(
    k8s_api: Any, tmp_path: Path, config_file: Path
) -> None:
    """The waker claims a free slot before the loop looks again; if the loop then finds nothing to
    do (the label went back meanwhile), the slot must not stay held (renewed for nothing)."""
    namespace = f"rollout-{uuid.uuid4().hex[:6]}"
    ensure_namespace(k8s_api, namespace)
    rec, _ = _make(k8s_api, tmp_path, config_file, rollout=RolloutSettings(Budget(count=1), namespace))
    assert rec.rollout is not None
    rec.publish_hardware()
    assert rec.rollout.take(A100) is None  # as the waker does
    leases = k8s.CoordinationV1Api(k8s_api).list_namespaced_lease(namespace).items
    assert [lease.spec.holder_identity for lease in leases] == [rec.settings.node_name]
    rec.reconcile("slot")  # no layout label: nothing to change
    assert rec.rollout.held is None
    assert k8s.CoordinationV1Api(k8s_api).list_namespaced_lease(namespace).items == []
