"""The device plugin's single MIG strategy, judged on the layouts a config leaves on each GPU."""

from __future__ import annotations

from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_labels
from migcore.config import parse_config
from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec
from migcore.strategy import final_layouts, single_strategy_problem

CATALOG = load_catalog()
A100 = "NVIDIA-A100-SXM4-40GB"
CONFIG = parse_config(
    """\
version: v1
mig-configs:
  gpu0-3g:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  all-3g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  gpu1-off:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [1]
      mig-enabled: false
""",
    CATALOG,
)


def gi(start: int, profile: str, size: int) -> GpuInstanceSpec:
    return GpuInstanceSpec(start, size, profile, (ComputeInstanceSpec(profile, 0),))


THREE_G = GpuGeometry(True, (gi(0, "3g.20gb", 4), gi(4, "3g.20gb", 4)))
SEVEN_G = GpuGeometry(True, (gi(0, "7g.40gb", 8),))


def judged(name: str, current: dict[int, GpuGeometry | None]) -> str | None:
    result = check_config(CONFIG, name, hardware_from_labels(CATALOG, A100, 2))
    assert result.valid, result.errors
    return single_strategy_problem(final_layouts(result, current))


def test_a_gpu_the_config_leaves_alone_counts_with_its_current_layout() -> None:
    # gpu0-3g touches GPU 0 only: GPU 1 keeps what it holds.
    assert judged("gpu0-3g", {0: None, 1: THREE_G}) is None
    problem = judged("gpu0-3g", {0: None, 1: SEVEN_G})
    assert problem is not None and "the MIG devices would be of 2 profiles (3g.20gb, 7g.40gb)" in problem
    # GPU 1's layout unknown (labels only): judged on what is known.
    assert judged("gpu0-3g", {}) is None


def test_mig_on_some_gpus_and_off_on_others_is_named() -> None:
    problem = judged("gpu1-off", {})
    assert problem is not None and "GPU 1 would have MIG disabled and GPU 0 enabled" in problem
    assert judged("all-3g", {}) is None


def test_every_gpu_with_mig_off_is_whole_gpus_and_fine() -> None:
    assert single_strategy_problem({0: GpuGeometry(False), 1: GpuGeometry(False)}) is None
    assert single_strategy_problem({}) is None
