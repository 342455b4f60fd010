"""The pynvml-calling layer, run unchanged against the simulated NVML.

The fault-injection tests record the exact NVML call sequence of an apply, then, for every call
in it, inject an NVML error at that call and check that the error names the step and that the
GPU can be put back (reconciler.gpu_apply.apply_with_rollback) to the layout from before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devcluster.helpers import gpu_model_file
from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import parse_config
from migcore.driver_table import MigTable, compare
from migcore.geometry import GpuGeometry, GpuInstanceSpec
from migcore.placement import fit
from migcore.planning import desired_geometries, keep_in_place, plan_gpu, plan_node
from migcore.profiles import MigProfile, parse_profile
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.gpu_apply import apply_with_rollback
from reconciler.gpu_backend import make_gpu_access
from reconciler.nvml_sim import SimulatedNvml, SimulationSpecError, load_gpu_model

A100 = "NVIDIA-A100-SXM4-40GB"


def layout(product: str, **counts: int) -> GpuGeometry:
    """A catalog layout: layout("A100-40GB", **{"1g.5gb": 2}) (keyword names are profiles)."""
    result = fit(load_catalog().products[product], {parse_profile(p): n for p, n in counts.items()})
    assert result.geometry is not None, result.reason
    return result.geometry


BALANCED = layout("A100-40GB", **{"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1})
SPLIT = layout("A100-40GB", **{"1g.5gb": 2, "2g.10gb": 1, "1c.3g.20gb": 3})
SEVEN = layout("A100-40GB", **{"1g.5gb": 7})
DISABLED = GpuGeometry(False)


def access_for(*labels: str, **kwargs: str) -> GpuAccess:
    access = GpuAccess(SimulatedNvml(list(labels) or [A100], **kwargs))  # type: ignore[arg-type]
    access.start()
    return access


def put(access: GpuAccess, index: int, geometry: GpuGeometry) -> None:
    access.apply(plan_gpu(index, access.geometry(index), geometry))


def test_applies_a_plan_and_reads_the_same_layout_back() -> None:
    access = access_for(A100, A100)
    seen: list[str] = []
    plan = plan_gpu(1, access.geometry(1), SPLIT)
    access.apply(plan, lambda op, i: seen.append(f"{i}:{op.op}"))
    assert access.geometry(1) == SPLIT
    assert access.geometry(0) == DISABLED  # the other GPU is untouched
    assert seen[:2] == ["0:set-mig-mode", "1:reset-gpu"] and len(seen) == len(plan.operations)
    assert access.mig_mode(1) == (True, True)


def test_reads_profiles_through_the_product_on_other_products() -> None:
    access = access_for("NVIDIA-H100-80GB-HBM3", "NVIDIA-A30", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition")
    layouts = {
        0: layout("H100-80GB", **{"1g.20gb": 1, "1g.10gb+me": 1, "1g.10gb": 1, "3g.40gb": 1}),
        1: layout("A30-24GB", **{"2g.12gb+me": 1, "1c.2g.12gb": 2}),
        2: layout("RTX-PRO-6000-Blackwell", **{"1g.24gb": 2, "2g.48gb": 1}),
    }
    for index, geometry in layouts.items():
        put(access, index, geometry)
        assert access.geometry(index) == geometry


def test_discover_reports_ids_the_driver_table_and_layout() -> None:
    access = access_for(A100, "NVIDIA-H100-80GB-HBM3")
    put(access, 0, BALANCED)
    report = access.discover()
    a100, h100 = report.gpus
    assert (a100.index, a100.pci_device_id, a100.name, a100.mig_capable) == (
        0,
        0x20B010DE,
        "NVIDIA A100-SXM4-40GB",
        True,
    )
    assert a100.pci_subsystem_id == 0x20B010DE and a100.memory_mib == 40960
    assert a100.geometry == BALANCED and a100.uuid
    table = a100.mig_table
    assert table is not None
    by_name = {str(p.name): p for p in table.profiles}
    assert (by_name["1g.5gb"].max_count, by_name["3g.20gb"].max_count, by_name["7g.40gb"].max_count) == (
        7,
        2,
        1,
    )
    assert (by_name["3g.20gb"].placements, by_name["3g.20gb"].placement_size) == ((0, 4), 4)
    assert by_name["1g.10gb"].placements == (0, 2, 4, 6) and by_name["1g.10gb"].id == 15
    # Compute profiles only for GPU-instance profiles with an instance (NVML answers them only there).
    assert {str(p.name) for p in table.profiles if p.compute_profiles is not None} == {
        "1g.5gb",
        "2g.10gb",
        "3g.20gb",
    }
    assert [(str(c.name), c.max_count, c.placements) for c in by_name["3g.20gb"].compute_profiles or ()] == [
        ("1c.3g.20gb", 3, (0, 1, 2)),
        ("2c.3g.20gb", 1, (0,)),
        ("3g.20gb", 1, (0,)),
    ]
    assert compare(table, load_catalog().products["A100-40GB"]) == ()
    # MIG off: NVML does not answer profile queries, so there is no table to report.
    assert h100.mig_table is None and h100.geometry == DISABLED
    assert report.gpus == type(report).from_annotation(report.to_annotation()).gpus


def test_a_learned_table_is_kept_when_the_instances_and_mig_are_gone() -> None:
    access = access_for(A100, A100)
    put(access, 0, BALANCED)
    first = access.discover()
    put(access, 0, DISABLED)
    put(access, 1, SEVEN)
    again = access.discover()
    assert again.gpus[0].mig_table == again.gpus[1].mig_table == first.gpus[0].mig_table
    text = again.to_annotation()
    assert text.count("gpuInstanceProfiles") == 1  # identical GPUs share one table


def test_processes_and_device_ids_map_to_gi_starts() -> None:
    access = access_for(A100, A100)
    put(access, 0, BALANCED)
    nvml = access.nvml
    nvml.simAddProcess(0, 101, gi_start=4)
    nvml.simAddProcess(0, 102, gi_start=2)
    nvml.simAddProcess(1, 103)
    assert access.processes(0) == {4: [101], 2: [102]}
    assert access.processes(1) == {None: [103]}
    ids = access.device_ids(0)
    gpu_uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(0))
    assert sorted(k for k, v in ids.items() if v is None) == sorted([gpu_uuid, "0"])
    # Each MIG device under the three names device plugins use: its UUID, the pre-R470 form and
    # the index form; all three place it on the same GPU instance.
    uuids = {k: v for k, v in ids.items() if k.startswith("MIG-") and "/" not in k}
    old_form = {k: v for k, v in ids.items() if k.startswith(f"MIG-{gpu_uuid}/")}
    by_index = {k: v for k, v in ids.items() if k.startswith("0:")}
    assert len(ids) == 2 + len(uuids) + len(old_form) + len(by_index)
    for names in (uuids, old_form, by_index):
        assert sorted(names.values()) == [0, 2, 3, 4]  # type: ignore[type-var]
    assert access.device_ids(1) == {
        nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(1)): None,
        "1": None,
    }


def test_errors_name_the_gpu_the_step_and_the_nvml_error() -> None:
    access = access_for(A100)
    put(access, 0, BALANCED)
    access.nvml.simAddProcess(0, 55, gi_start=0)
    plan = plan_gpu(0, BALANCED, SEVEN)
    with pytest.raises(GpuError) as caught:
        access.apply(plan)
    error = caught.value
    assert (error.gpu, error.nvml_error) == (0, "InUse")
    assert error.operation == "destroy-ci 2g.10gb@0 in GI@0 on GPU 0"
    assert str(error).startswith(
        "GPU 0: destroy-ci 2g.10gb@0 in GI@0 failed: NVML nvmlComputeInstanceDestroy returned InUse"
    )
    assert isinstance(error.__cause__, pynvml.NVMLError_InUse)


def test_mode_change_that_needs_a_reboot_is_reported_as_such() -> None:
    access = GpuAccess(SimulatedNvml([A100], reset_requires_reboot=True))
    access.start()
    with pytest.raises(GpuError) as caught:
        access.apply(plan_gpu(0, DISABLED, BALANCED))
    assert caught.value.needs_reboot and caught.value.operation == "set-mig-mode enabled on GPU 0"


def test_backend_factory_builds_simulated_gpus_and_rejects_bad_specs(tmp_path: Path) -> None:
    state = tmp_path / "gpus.json"
    access = make_gpu_access("simulated", f"{A100}:2,NVIDIA-H100-80GB-HBM3:1", str(state))
    access.start()
    assert access.gpu_count() == 3
    put(access, 2, layout("H100-80GB", **{"7g.80gb": 1}))
    restarted = make_gpu_access("simulated", None, str(state))
    restarted.start()
    assert restarted.geometry(2) == layout("H100-80GB", **{"7g.80gb": 1})
    with pytest.raises(SimulationSpecError):
        make_gpu_access("simulated", "A100")
    with pytest.raises(SimulationSpecError):
        make_gpu_access("nvml", f"{A100}:1")
    with pytest.raises(SimulationSpecError):
        make_gpu_access("cuda")


# --- fault injection at every NVML call -------------------------------------------------------------


SCENARIOS = {
    "enable MIG and build": (DISABLED, BALANCED),
    "change compute instances and GIs": (BALANCED, SPLIT),
    "replace GIs": (SPLIT, SEVEN),
    "tear down and disable MIG": (BALANCED, DISABLED),
}


def _fresh(start: GpuGeometry, faults: str | None = None) -> GpuAccess:
    """Two A100s, GPU 0 holding `start`. Faults count calls from construction, set-up included."""
    access = GpuAccess(SimulatedNvml([A100, A100], faults=faults))
    access.start()
    put(access, 0, start)
    return access


def _call_sequence(start: GpuGeometry, work: Callable[[GpuAccess], object]) -> list[tuple[str, int]]:
    """(function, n) for every NVML call `work` makes: the nth call of that function overall."""
    clean = _fresh(start)
    first = len(clean.nvml.calls)
    work(clean)
    calls = clean.nvml.calls
    return [(calls[k], calls[: k + 1].count(calls[k])) for k in range(first, len(calls))]


def _apply_work(start: GpuGeometry, target: GpuGeometry) -> Callable[[GpuAccess], object]:
    def work(access: GpuAccess) -> object:
        outcome = apply_with_rollback(access, plan_gpu(0, start, target))
        assert outcome.ok, outcome.reason
        return outcome

    return work


APPLY_CALLS = [
    pytest.param(name, function, nth, id=f"{name.replace(' ', '-')}/{k:03d}-{function}#{nth}")
    for name, (start, target) in sorted(SCENARIOS.items())
    for k, (function, nth) in enumerate(_call_sequence(start, _apply_work(start, target)))
]
DISCOVERY_CALLS = [
    pytest.param(function, nth, id=f"{k:03d}-{function}#{nth}")
    for k, (function, nth) in enumerate(_call_sequence(BALANCED, GpuAccess.discover))
]


def test_every_scenario_makes_many_nvml_calls() -> None:
    for name in SCENARIOS:
        assert sum(1 for p in APPLY_CALLS if p.values[0] == name) > 20, name
    assert len(DISCOVERY_CALLS) > 20


@pytest.mark.parametrize(("scenario", "function", "nth"), APPLY_CALLS)
def test_a_fault_at_any_nvml_call_of_an_apply_is_named_and_rolled_back(
    scenario: str, function: str, nth: int
) -> None:
    start, target = SCENARIOS[scenario]
    access = _fresh(start, f"{function}@{nth}=Unknown")  # nth counts the set-up calls too
    outcome = apply_with_rollback(access, plan_gpu(0, start, target))
    assert not outcome.ok
    assert outcome.error is not None and outcome.error.nvml_error == "Unknown"
    assert outcome.error.gpu == 0 and outcome.error.operation
    step = outcome.error.op.describe(with_gpu=False) if outcome.error.op else outcome.error.operation
    assert str(outcome.error).startswith(f"GPU 0: {step} failed: ")  # names the step, then the NVML error
    assert outcome.rolled_back, outcome.reason
    assert access.geometry(0) == start
    assert access.mig_mode(0) == (start.mig_enabled, start.mig_enabled)


@pytest.mark.parametrize(("function", "nth"), DISCOVERY_CALLS)
def test_a_fault_at_any_nvml_call_of_discovery_raises_a_gpu_error(function: str, nth: int) -> None:
    access = _fresh(BALANCED, f"{function}@{nth}=Unknown")
    with pytest.raises(GpuError) as caught:
        access.discover()
    assert caught.value.nvml_error == "Unknown" and caught.value.operation


# --- the planner's plans, run through NVML ----------------------------------------------------------

PRODUCTS = {
    "A100-40GB": A100,
    "H100-80GB": "NVIDIA-H100-80GB-HBM3",
    "A30-24GB": "NVIDIA-A30",
    "RTX-PRO-6000-Blackwell": "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition",
    "B200": "NVIDIA-B200",
}


@st.composite
def nvml_layout_pairs(draw: st.DrawFn) -> tuple[str, GpuGeometry, GpuGeometry]:
    key = draw(st.sampled_from(sorted(PRODUCTS)))
    product = load_catalog().products[key]
    names = [gi.name.with_compute_slices(ci.slices) for gi in product.profiles for ci in gi.compute_profiles]

    def one() -> GpuGeometry:
        if draw(st.integers(0, 5)) == 0:
            return DISABLED
        requests: Counter[MigProfile] = Counter()
        for name in draw(st.lists(st.sampled_from(names), max_size=5)):
            requests[name] += 1
            if not fit(product, requests).fits:
                requests[name] -= 1
        geometry = fit(product, +requests).geometry
        assert geometry is not None
        return geometry

    return PRODUCTS[key], one(), one()


@settings(max_examples=100, deadline=None)
@given(nvml_layout_pairs())
def test_planned_changes_applied_through_nvml_read_back_as_desired(
    pair: tuple[str, GpuGeometry, GpuGeometry],
) -> None:
    label, current, wanted = pair
    access = access_for(label)
    put(access, 0, current)
    assert access.geometry(0) == current
    desired = keep_in_place(wanted, current, load_catalog().by_label(label))
    outcome = apply_with_rollback(access, plan_gpu(0, current, desired))
    assert outcome.ok, outcome.reason
    assert access.geometry(0) == desired


def test_the_nvml_backend_is_the_real_pynvml_and_says_when_no_driver_is_there() -> None:
    access = make_gpu_access("nvml")
    assert access.nvml is pynvml
    if Path("/dev/nvidiactl").exists():
        pytest.skip("an NVIDIA driver is present on this machine")
    with pytest.raises(GpuError) as caught:
        access.start()
    assert caught.value.nvml_error == "LibraryNotFound"
    assert str(caught.value).startswith("initialise NVML failed: NVML nvmlInit returned LibraryNotFound")


def test_a_gpu_outside_the_catalog_reports_its_table_and_takes_a_layout_judged_from_it() -> None:
    model = load_gpu_model(gpu_model_file("x100.json"))
    access = GpuAccess(SimulatedNvml([model], mig_enabled=True))
    access.start()
    assert access.product(0) is None  # no catalog entry
    report = access.discover()
    (gpu,) = report.gpus
    assert (gpu.name, gpu.pci_device_id, gpu.pci_subsystem_id, gpu.memory_mib) == (
        "NVIDIA X100",
        0x2FFF10DE,
        0x1A2B10DE,
        98304,
    )
    assert gpu.mig_table is not None
    # What NVML gave back is the file's table, but for compute profiles (no instance to ask yet).
    assert gpu.mig_table == MigTable(tuple(replace(p, compute_profiles=None) for p in model.table.profiles))
    hardware = hardware_from_report(load_catalog(), report)
    config = parse_config(
        "version: v1\nmig-configs:\n  two-3c:\n    - devices: all\n      mig-enabled: true\n"
        '      mig-devices: {"3c.6g.96gb": 2}\n',
        load_catalog(),
    )
    result = check_config(config, "two-3c", hardware)
    assert result.valid is False  # compute profiles not read yet: NVML's alignment puts one 3c at 0 only
    put(access, 0, GpuGeometry(True, (GpuInstanceSpec(0, 6, "6g.96gb"),)))
    learned = access.discover()
    result = check_config(config, "two-3c", hardware_from_report(load_catalog(), learned))
    assert result.valid, result.errors  # now the driver's own placements: 3c at 0 and at 3
    table = learned.gpus[0].mig_table
    assert table is not None and table.profile(6) == model.table.profile(6)  # 6g's compute profiles learned
    current = access.geometries()
    for plan in plan_node(current, desired_geometries(result, current)).changed:
        access.apply(plan)
    assert access.geometry(0).device_counts() == {"3c.6g.96gb": 2}
    assert [c.start for c in access.geometry(0).instances[0].compute] == [0, 3]
