"""The hardware report the reconciler publishes for the webhook."""

from __future__ import annotations

import pytest

from migcore.catalog import load_catalog
from migcore.hardware import HardwareReportError, NodeGpus
from migcore.keys import ANNOTATION_GPUS
from migcore.placement import fit
from migcore.planning import plan_gpu
from migcore.profiles import parse_profile
from reconciler.discovery import discover, gpus_annotation, report_changed
from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import SimulatedNvml

_FIT = fit(load_catalog().products["A100-40GB"], {parse_profile("2g.10gb"): 1, parse_profile("3g.20gb"): 1})
assert _FIT.geometry is not None
BALANCED = _FIT.geometry


def node(*labels: str) -> GpuAccess:
    access = GpuAccess(SimulatedNvml(list(labels)))
    access.start()
    return access


def test_annotation_round_trips_through_the_domain_format() -> None:
    access = node("NVIDIA-A100-SXM4-40GB", "NVIDIA-H100-80GB-HBM3")
    access.apply(plan_gpu(0, access.geometry(0), BALANCED))
    report = discover(access)
    patch = gpus_annotation(report)
    assert list(patch) == [ANNOTATION_GPUS]
    parsed = NodeGpus.from_annotation(patch[ANNOTATION_GPUS])
    assert [g.name for g in parsed.gpus] == ["NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"]
    assert parsed.gpus[0].geometry == BALANCED


def test_the_annotation_is_rewritten_only_when_the_gpus_change() -> None:
    access = node("NVIDIA-A100-SXM4-40GB")
    published = gpus_annotation(discover(access))[ANNOTATION_GPUS]
    again = NodeGpus(discover(access).gpus, "2030-01-01T00:00:00Z")  # same GPUs, later
    assert not report_changed(published, again)
    access.apply(plan_gpu(0, access.geometry(0), BALANCED))
    assert report_changed(published, discover(access))
    assert report_changed(None, again) and report_changed("{not json", again)


def test_an_oversized_report_is_refused() -> None:
    access = node(*["NVIDIA-A100-SXM4-40GB"] * 8)
    report = discover(access)
    huge = NodeGpus(report.gpus * 200, report.reported_at)
    with pytest.raises(HardwareReportError, match="over"):
        gpus_annotation(huge)
