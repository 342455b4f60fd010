"""The planner: exact, minimal, and safe in the order it does things.

Property tests draw current and desired layouts from real placement results (`migcore.placement.fit`)
of catalog products, so every layout is one the hardware can hold.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from driver_tables import from_catalog, with_profile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migcore.catalog import Product, load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import parse_config
from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec
from migcore.hardware import DiscoveredGpu, NodeGpus
from migcore.placement import fit
from migcore.planning import (
    DevicePlacement,
    NodePlan,
    Operation,
    PlanError,
    apply_operations,
    apply_plan,
    desired_geometries,
    keep_in_place,
    plan_gpu,
    plan_node,
    pods_to_move,
)
from migcore.profiles import MigProfile, parse_profile

CATALOG = load_catalog()
A100_40 = CATALOG.products["A100-40GB"]
PRODUCTS = ["A100-40GB", "H100-80GB", "A30-24GB", "RTX-PRO-6000-Blackwell", "B200"]
DISABLED = GpuGeometry(False)


def layout(product: str, **counts: int) -> GpuGeometry:
    result = fit(CATALOG.products[product], {parse_profile(p): n for p, n in counts.items()})
    assert result.geometry is not None, result.reason
    return result.geometry


BALANCED = layout("A100-40GB", **{"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1})
SEVEN = layout("A100-40GB", **{"1g.5gb": 7})


@st.composite
def geometries(draw: st.DrawFn, product: Product) -> GpuGeometry:
    """A layout the product can hold: MIG off, or the placement of random mig-devices counts."""
    if draw(st.integers(0, 9)) == 0:
        return DISABLED
    names: list[MigProfile] = []
    for gi in product.profiles:
        names += [gi.name.with_compute_slices(ci.slices) for ci in gi.compute_profiles]
    chosen = draw(st.lists(st.sampled_from(names), max_size=5))
    requests: Counter[MigProfile] = Counter()
    for name in chosen:
        requests[name] += 1
        if not fit(product, requests).fits:
            requests[name] -= 1
    result = fit(product, +requests)
    assert result.geometry is not None
    return result.geometry


@st.composite
def layout_pairs(draw: st.DrawFn) -> tuple[Product, GpuGeometry, GpuGeometry]:
    product = CATALOG.products[draw(st.sampled_from(PRODUCTS))]
    return product, draw(geometries(product)), draw(geometries(product))


def _sizes(*geometries: GpuGeometry) -> dict[str, int]:
    return {gi.profile: gi.size for g in geometries for gi in g.instances}


def _check_plan_invariants(current: GpuGeometry, desired: GpuGeometry) -> None:
    plan = plan_gpu(3, current, desired)
    assert apply_plan(plan) == desired
    ops = [op.op for op in plan.operations]
    assert all(op.gpu == 3 for op in plan.operations)
    if current == desired:
        assert plan.operations == ()
        return
    # Destroy before create; mode flips (and resets) only when the mode changes.
    destroys = [i for i, op in enumerate(ops) if op.startswith("destroy")]
    creates = [i for i, op in enumerate(ops) if op.startswith("create")]
    assert not destroys or not creates or max(destroys) < min(creates)
    mode_change = current.mig_enabled != desired.mig_enabled
    assert ops.count("set-mig-mode") == ops.count("reset-gpu") == int(mode_change)
    # Nothing identical in both layouts is destroyed.
    same_gis = set(current.instances) & set(desired.instances)
    for op in plan.operations:
        if op.op == "destroy-gi":
            assert not any(gi.start == op.start and gi.profile == op.profile for gi in same_gis)
        if op.op == "destroy-ci":
            source = next(gi for gi in current.instances if gi.start == op.gi_start)
            target = next(
                (gi for gi in desired.instances if (gi.start, gi.profile) == (source.start, source.profile)),
                None,
            )
            if target is not None:  # the GI stays: only CIs it no longer has may go
                assert all((ci.profile, ci.start) != (op.profile, op.start) for ci in target.compute)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout_pairs())
def test_plan_reaches_exactly_the_desired_layout_and_nothing_more(
    pair: tuple[Product, GpuGeometry, GpuGeometry],
) -> None:
    _, current, desired = pair
    _check_plan_invariants(current, desired)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout_pairs())
def test_a_pending_mode_is_activated_or_cleared_never_left_behind(
    pair: tuple[Product, GpuGeometry, GpuGeometry],
) -> None:
    _, layout_now, desired = pair
    # What NVML reports after `nvidia-smi -mig <other mode>` without a reset.
    current = GpuGeometry(layout_now.mig_enabled, layout_now.instances, not layout_now.mig_enabled)
    assert "pending" in current.summary()
    plan = plan_gpu(3, current, desired)
    after = apply_plan(plan)
    assert after == desired and after.mig_pending is None
    if current.settled() == desired:  # only the pending mode differs: set it back, touch nothing
        assert [op.op for op in plan.operations] == ["set-mig-mode"]
        assert not plan.disturbs_workloads
        node = NodePlan((plan,))
        assert pods_to_move(node, {"on-it": (3, None)}) == []
    # A GPU left exactly as it is (no config entry covers it) keeps what it has.
    assert plan_gpu(3, current, current).operations == ()


def test_a_pending_mode_round_trips_through_json() -> None:
    pending = GpuGeometry(True, SEVEN.instances, mig_pending=False)
    assert GpuGeometry.from_json(pending.to_json()) == pending
    assert "migPending" not in SEVEN.to_json()  # settled layouts serialise as before
    assert GpuGeometry(True, mig_pending=True).mig_pending is None  # same as current: nothing pending
    with pytest.raises(ValueError, match="migPending"):
        GpuGeometry.from_json({"migEnabled": True, "migPending": "off"})


@settings(max_examples=200, deadline=None)
@given(layout_pairs())
def test_kept_in_place_layout_is_equivalent_valid_and_keeps_at_least_as_much(
    pair: tuple[Product, GpuGeometry, GpuGeometry],
) -> None:
    product, current, desired = pair
    moved = keep_in_place(desired, current, product)

    def kinds(g: GpuGeometry) -> Counter[Any]:
        return Counter((gi.profile, tuple(sorted(ci.profile for ci in gi.compute))) for gi in g.instances)

    assert moved.mig_enabled == desired.mig_enabled and kinds(moved) == kinds(desired)
    occupied = 0
    for gi in moved.instances:
        profile = product.gpu_instance_profile(gi.profile)
        assert profile is not None and gi.start in profile.placements
        mask = ((1 << gi.size) - 1) << gi.start
        assert not occupied & mask
        occupied |= mask
    kept = len(set(moved.instances) & set(current.instances))
    assert kept >= len(set(desired.instances) & set(current.instances))
    assert len(plan_gpu(0, current, moved).operations) <= len(plan_gpu(0, current, desired).operations)
    _check_plan_invariants(current, moved)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(PRODUCTS).flatmap(lambda key: geometries(CATALOG.products[key])))
def test_a_gpu_that_already_matches_gets_no_operation(geometry: GpuGeometry) -> None:
    assert plan_gpu(0, geometry, geometry).operations == ()
    assert keep_in_place(geometry, geometry, None) == geometry
    plan = plan_node({0: geometry, 1: DISABLED}, {0: geometry})
    assert plan.changed == () and plan.to_json() == {
        "gpus": [{"index": 0, "operations": []}, {"index": 1, "operations": []}]
    }


def test_instances_that_can_stay_stay() -> None:
    # all-balanced -> four 1g.5gb + 3g.20gb: the 3g.20gb at slot 4 and both 1g.5gb stay; only
    # the 2g.10gb is replaced by two 1g.5gb, even though placement alone puts things elsewhere.
    target = keep_in_place(layout("A100-40GB", **{"1g.5gb": 4, "3g.20gb": 1}), BALANCED, A100_40)
    plan = plan_gpu(0, BALANCED, target)
    assert [op.op for op in plan.operations] == [
        "destroy-ci",
        "destroy-gi",
        "create-gi",
        "create-gi",
        "create-ci",
        "create-ci",
    ]
    assert {op.start for op in plan.operations if op.op == "create-gi"} == {0, 1}
    assert plan.affected_gi_starts == frozenset({0})
    assert not plan.needs_reset


def test_a_gpu_laid_out_elsewhere_by_another_tool_is_left_alone() -> None:
    # mig-parted lets the driver choose placements: the same instances, at other valid starts.
    by_profile = {gi.profile: gi for gi in BALANCED.instances}
    elsewhere = GpuGeometry(
        True,
        tuple(
            GpuInstanceSpec(start, by_profile[profile].size, profile, by_profile[profile].compute)
            for start, profile in [(0, "1g.5gb"), (1, "1g.5gb"), (2, "2g.10gb"), (4, "3g.20gb")]
        ),
    )
    assert elsewhere != BALANCED
    assert keep_in_place(BALANCED, elsewhere, A100_40) == elsewhere
    assert plan_gpu(0, elsewhere, keep_in_place(BALANCED, elsewhere, A100_40)).operations == ()


def test_only_the_compute_instances_that_differ_are_rebuilt() -> None:
    split = keep_in_place(
        layout("A100-40GB", **{"1g.5gb": 2, "2g.10gb": 1, "1c.3g.20gb": 3}), BALANCED, A100_40
    )
    plan = plan_gpu(0, BALANCED, split)
    assert [op.op for op in plan.operations] == ["destroy-ci", "create-ci", "create-ci", "create-ci"]
    assert all(op.gi_start == 4 for op in plan.operations)
    assert plan.affected_gi_starts == frozenset({4})


def test_mode_changes_reset_only_that_gpu() -> None:
    plan = plan_node({0: BALANCED, 1: BALANCED, 2: DISABLED}, {0: DISABLED, 2: SEVEN})
    assert [g.index for g in plan.changed] == [0, 2]
    off = [op.op for op in plan.gpus[0].operations]
    assert off[-2:] == ["set-mig-mode", "reset-gpu"] and off.count("destroy-gi") == 4
    on = [op.op for op in plan.gpus[2].operations]
    assert on[:2] == ["set-mig-mode", "reset-gpu"] and on.count("create-gi") == 7
    assert plan.gpus[1].operations == () and not plan.gpus[1].needs_reset
    text = plan.describe()
    assert text.startswith("2 of 3 GPUs change") and "2 GPU resets" in text and "unchanged: GPU 1" in text
    with pytest.raises(ValueError, match="GPU 5"):
        plan_node({0: BALANCED}, {5: SEVEN})


def test_pods_to_move_are_only_those_on_disturbed_instances() -> None:
    target = keep_in_place(layout("A100-40GB", **{"1g.5gb": 4, "3g.20gb": 1}), BALANCED, A100_40)
    plan = plan_node({0: BALANCED, 1: BALANCED, 2: DISABLED}, {0: target, 2: SEVEN})
    pods: dict[str, DevicePlacement | list[DevicePlacement]] = {
        "on-replaced-2g": (0, 0),
        "on-kept-3g": (0, 4),
        "on-kept-1g": (0, 2),
        "on-untouched-gpu": (1, 0),
        "on-mode-changed-gpu": (2, None),
        "unknown-instance-on-changed-gpu": (0, None),
        "two-devices-one-disturbed": [(1, 2), (0, 0)],
        "two-devices-both-kept": [(1, 2), (0, 3)],
    }
    assert pods_to_move(plan, pods) == [
        "on-replaced-2g",
        "on-mode-changed-gpu",
        "unknown-instance-on-changed-gpu",
        "two-devices-one-disturbed",
    ]


def test_operations_serialise_for_the_cli_and_for_persisted_progress() -> None:
    op = Operation("create-ci", 2, "1c.3g.20gb", 1, 4)
    assert op.to_json() == {"op": "create-ci", "gpu": 2, "profile": "1c.3g.20gb", "start": 1, "gi_start": 4}
    assert Operation.from_json(op.to_json()) == op
    mode = Operation("set-mig-mode", 0, enabled=False)
    assert mode.to_json() == {"op": "set-mig-mode", "gpu": 0, "enabled": False}
    assert Operation.from_json(mode.to_json()) == mode
    with pytest.raises(ValueError, match="unknown operation"):
        Operation.from_json({"op": "format-gpu", "gpu": 0})


def test_the_operation_model_refuses_what_nvml_refuses() -> None:
    gi = BALANCED.instances[0]
    sizes = {gi.profile: gi.size, "1g.5gb": 1}
    with pytest.raises(PlanError, match="compute instances"):
        apply_operations(BALANCED, [Operation("destroy-gi", 0, gi.profile, gi.start)], sizes)
    with pytest.raises(PlanError, match="overlaps"):
        apply_operations(BALANCED, [Operation("create-gi", 0, "1g.5gb", 2)], sizes)
    with pytest.raises(PlanError, match="MIG is disabled"):
        apply_operations(DISABLED, [Operation("create-gi", 0, "1g.5gb", 0)], sizes)


CONFIG = """
version: v1
mig-configs:
  mixed:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"1g.5gb": 4, "3g.20gb": 1}
    - devices: [1]
      mig-enabled: false
"""


def test_desired_geometries_from_a_checked_config() -> None:
    report = NodeGpus(
        tuple(
            DiscoveredGpu(i, 0x20B010DE, "NVIDIA A100-SXM4-40GB", True, {}, BALANCED, f"GPU-{i}")
            for i in range(3)
        )
    )
    result = check_config(parse_config(CONFIG, CATALOG), "mixed", hardware_from_report(CATALOG, report))
    assert result.valid, result.errors
    current = {0: BALANCED, 1: BALANCED, 2: BALANCED}
    desired = desired_geometries(result, current)
    assert desired[1] == DISABLED and desired[2] == BALANCED  # no entry for GPU 2: untouched
    assert sorted(gi.start for gi in desired[0].instances if gi.profile == "3g.20gb") == [4]  # kept in place
    plan: NodePlan = plan_node(current, desired)
    assert [g.index for g in plan.changed] == [0, 1]
    assert isinstance(desired[0].instances[0], GpuInstanceSpec)


def test_kept_in_place_starts_are_the_judging_tables_not_other_products() -> None:
    """A GPU its driver's table judges (here an A100 whose driver places 3g.20gb only at 4) must
    not be given a start that only the catalog's products allow (3g.20gb at 0): applying it would
    fail (and roll back) instead of doing the change."""
    table = with_profile(from_catalog(CATALOG.products["A100-40GB"]), "3g.20gb", placements=(4,))
    gpu = DiscoveredGpu(0, 0x20B010DE, "NVIDIA A100-SXM4-40GB", True, mig_table=table)
    text = 'version: v1\nmig-configs:\n  c:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {"3g.20gb": 1, "1g.5gb": 1}\n'
    result = check_config(parse_config(text, CATALOG), "c", hardware_from_report(CATALOG, NodeGpus((gpu,))))
    assert result.valid, result.errors
    one_g = GpuInstanceSpec(4, 1, "1g.5gb", (ComputeInstanceSpec("1g.5gb", 0),))
    desired = desired_geometries(result, {0: GpuGeometry(True, (one_g,))})
    placed = {gi.profile: gi.start for gi in desired[0].instances}
    assert placed["3g.20gb"] == 4, desired[0].summary()


def test_an_instance_that_already_matches_keeps_its_compute_instances() -> None:
    """Found by the property above: two A30 2g.12gb instances, one to be rebuilt with a 2g compute
    instance, one already right. The right one must stay as it is (its pods keep running); the
    pairing gave it to the other's compute instances and rebuilt both."""
    a30 = CATALOG.products["A30-24GB"]
    right = GpuInstanceSpec(2, 2, "2g.12gb", (ComputeInstanceSpec("1c.2g.12gb", 0),))
    two_cis = (ComputeInstanceSpec("1c.2g.12gb", 0), ComputeInstanceSpec("1c.2g.12gb", 1))
    current = GpuGeometry(True, (GpuInstanceSpec(0, 2, "2g.12gb", two_cis), right))
    desired = GpuGeometry(
        True, (GpuInstanceSpec(0, 2, "2g.12gb", (ComputeInstanceSpec("2g.12gb", 0),)), right)
    )
    moved = keep_in_place(desired, current, a30)
    assert right in moved.instances, moved.summary()
    assert [op.gi_start for op in plan_gpu(0, current, moved).operations] == [0, 0, 0]  # only GI@0's CIs
