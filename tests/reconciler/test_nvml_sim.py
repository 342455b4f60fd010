"""The simulated NVML behaves like NVML where mig-guard depends on it.

Behaviours marked "nvml.h" are NVML's documented behaviour (nvml.h as vendored in go-nvml, see
/work/shared/research/mig-hardware.md section 5); the others come from the hardware catalog
(placements, max counts, profile ids) or are the simulator's own test hooks.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import signal
from pathlib import Path
from typing import Any

import pynvml
import pytest

from devcluster.helpers import gpu_model_file
from migcore.catalog import load_catalog
from reconciler.nvml_sim import (
    SimulatedNvml,
    SimulationSpecError,
    load_gpu_model,
    parse_faults_spec,
    parse_gpu_spec_files,
    parse_gpus_spec,
    parse_latency_spec,
)

A100 = "NVIDIA-A100-SXM4-40GB"
# NVML constants (the lookup argument) and the A100's device-specific ids (info.id).
P_1G, P_1G_ME, P_2G, P_3G, P_7G = 0, 7, 1, 2, 4


def started(*labels: str, **kwargs: Any) -> SimulatedNvml:
    nvml = SimulatedNvml(list(labels) or [A100], **kwargs)
    nvml.nvmlInit()
    return nvml


def enable_mig(nvml: SimulatedNvml, index: int = 0) -> Any:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE)
    nvml.simResetGpu(index)
    return handle


def create_gi(nvml: SimulatedNvml, handle: Any, const: int, start: int) -> Any:
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, const)
    placement = pynvml.c_nvmlGpuInstancePlacement_t()
    placement.start, placement.size = start, {P_1G: 1, P_1G_ME: 1, P_2G: 2, P_3G: 4, P_7G: 8}[const]
    return nvml.nvmlDeviceCreateGpuInstanceWithPlacement(handle, info.id, ctypes.byref(placement))


def create_ci(nvml: SimulatedNvml, gi: Any, const: int = 0) -> Any:
    info = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, const, 0)
    return nvml.nvmlGpuInstanceCreateComputeInstance(gi, info.id)


def list_gis(nvml: SimulatedNvml, handle: Any, const: int) -> list[tuple[int, int]]:
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, const)
    array = (pynvml.c_nvmlGpuInstance_t * info.instanceCount)()
    count = ctypes.c_uint(0)
    nvml.nvmlDeviceGetGpuInstances(handle, info.id, array, ctypes.byref(count))
    out = []
    for i in range(count.value):
        gi_info = nvml.nvmlGpuInstanceGetInfo(array[i])
        out.append((gi_info.placement.start, gi_info.placement.size))
    return sorted(out)


def test_devices_report_catalog_identity() -> None:
    nvml = started(A100, "NVIDIA-H100-80GB-HBM3")
    assert nvml.nvmlDeviceGetCount() == 2
    a100, h100 = (nvml.nvmlDeviceGetHandleByIndex(i) for i in range(2))
    assert isinstance(a100, pynvml.c_nvmlDevice_t)
    assert nvml.nvmlDeviceGetName(a100) == "NVIDIA A100-SXM4-40GB"
    assert nvml.nvmlDeviceGetPciInfo(a100).pciDeviceId == 0x20B010DE
    assert nvml.nvmlDeviceGetPciInfo(h100).pciDeviceId == 0x233010DE
    assert nvml.nvmlDeviceGetUUID(a100) != nvml.nvmlDeviceGetUUID(h100)


def test_profile_info_id_is_device_specific_not_the_lookup_constant() -> None:
    nvml = started(A100, "NVIDIA-A30")
    a100 = enable_mig(nvml, 0)
    a30 = enable_mig(nvml, 1)
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(a100, P_1G)
    assert isinstance(info, pynvml.c_nvmlGpuInstanceProfileInfo_v2_t)
    assert (info.id, info.sliceCount, info.instanceCount, info.name) == (19, 1, 7, "MIG 1g.5gb")
    assert nvml.nvmlDeviceGetGpuInstanceProfileInfo(a100, P_3G).id == 9
    assert nvml.nvmlDeviceGetGpuInstanceProfileInfo(a30, P_1G).id == 14  # A30: 1g.6gb is id 14
    # A profile the product lacks (A100 has no 2-slice +me profile) and a value past COUNT.
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(a100, 8)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(a100, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)


def test_possible_placements_follow_the_catalog_whatever_the_mig_mode() -> None:
    nvml = started(A100, "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition")
    # nvml.h: placements are returned regardless of whether MIG is enabled.
    for index, profile_id, expected in [(0, 9, [(0, 4), (4, 4)]), (1, 14, [(0, 3), (3, 3), (6, 3), (9, 3)])]:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        count = ctypes.c_uint(0)
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, profile_id, None, ctypes.byref(count))
        array = (pynvml.c_nvmlGpuInstancePlacement_t * count.value)()
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, profile_id, array, ctypes.byref(count))
        assert [(array[i].start, array[i].size) for i in range(count.value)] == expected


def test_mig_mode_change_stays_pending_until_a_gpu_reset() -> None:
    nvml = started()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    assert nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE) == pynvml.NVML_SUCCESS
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 1]  # nvml.h: pending = mode after the next trigger
    with pytest.raises(pynvml.NVMLError_NotSupported):  # not enabled yet: nothing can be created
        create_gi(nvml, handle, P_1G, 0)
    nvml.simResetGpu(0)
    assert nvml.nvmlDeviceGetMigMode(handle) == [1, 1]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(handle) == 7


def test_profiles_and_instances_need_mig_enabled() -> None:
    nvml = started()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    # nvml.h (GetGpuInstanceProfileInfoV, CreateGpuInstance): NOT_SUPPORTED while MIG is disabled.
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, P_1G)
    placement = pynvml.c_nvmlGpuInstancePlacement_t(0, 1)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceCreateGpuInstanceWithPlacement(handle, 19, ctypes.byref(placement))
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(handle) == 0


def test_reset_required_platform_needs_a_reboot() -> None:
    nvml = started(reset_requires_reboot=True)
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    # nvml.h: on pass-through platforms activationStatus is NVML_ERROR_RESET_REQUIRED.
    status = nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE)
    assert status == pynvml.NVML_ERROR_RESET_REQUIRED
    with pytest.raises(pynvml.NVMLError_ResetRequired):
        nvml.simResetGpu(0)
    nvml.simReboot()
    assert nvml.nvmlDeviceGetMigMode(handle) == [1, 1]


def test_placements_counts_and_overlaps_are_enforced() -> None:
    nvml = started()
    handle = enable_mig(nvml)
    create_gi(nvml, handle, P_3G, 4)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # nvml.h: invalid placement
        create_gi(nvml, handle, P_3G, 2)
    with pytest.raises(pynvml.NVMLError_InsufficientResources):  # nvml.h: overlaps occupied slices
        create_gi(nvml, handle, P_2G, 4)
    create_gi(nvml, handle, P_1G_ME, 0)
    with pytest.raises(pynvml.NVMLError_InsufficientResources):  # +me: max 1 per GPU
        create_gi(nvml, handle, P_1G_ME, 1)
    create_gi(nvml, handle, P_2G, 2)
    assert list_gis(nvml, handle, P_3G) == [(4, 4)]
    assert list_gis(nvml, handle, P_2G) == [(2, 2)]
    # Remaining capacity: only slot 1 is left, for a 1g.
    assert nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, 19) == 1
    assert nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, 14) == 0


def test_instances_in_use_cannot_be_destroyed() -> None:
    nvml = started()
    handle = enable_mig(nvml)
    gi = create_gi(nvml, handle, P_3G, 0)
    ci = create_ci(nvml, gi)
    # nvml.h: destroying a GI that still has compute instances (or processes) fails with IN_USE.
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlGpuInstanceDestroy(gi)
    with pytest.raises(pynvml.NVMLError_InUse):  # MIG cannot be disabled while instances exist
        nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_DISABLE)
    nvml.simAddProcess(0, 4242, gi_start=0)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlComputeInstanceDestroy(ci)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.simResetGpu(0)
    nvml.simRemoveProcess(4242)
    nvml.nvmlComputeInstanceDestroy(ci)
    nvml.nvmlGpuInstanceDestroy(gi)
    assert list_gis(nvml, handle, P_3G) == []
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # a destroyed instance's handle
        nvml.nvmlGpuInstanceGetInfo(gi)


def test_compute_instances_follow_the_gi_and_are_mig_devices() -> None:
    nvml = started()
    handle = enable_mig(nvml)
    gi = create_gi(nvml, handle, P_3G, 4)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # 7c is not offered inside a 3g GI
        nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 4, 0)
    one = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 0, 0)
    assert (one.sliceCount, one.instanceCount, one.name) == (1, 3, "MIG 1c.3g.20gb")
    cis = [nvml.nvmlGpuInstanceCreateComputeInstance(gi, one.id) for _ in range(3)]
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        nvml.nvmlGpuInstanceCreateComputeInstance(gi, one.id)
    starts = sorted(nvml.nvmlComputeInstanceGetInfo(ci).placement.start for ci in cis)
    assert starts == [0, 1, 2]
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 2)
    assert nvml.nvmlDeviceGetGpuInstanceId(mig) == nvml.nvmlGpuInstanceGetInfo(gi).id
    assert nvml.nvmlDeviceGetUUID(mig).startswith("MIG-")
    with pytest.raises(pynvml.NVMLError_NotFound):  # nvml.h: NOT_FOUND for an empty index
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 3)


def test_processes_are_reported_per_instance() -> None:
    nvml = started()
    handle = enable_mig(nvml)
    gi = create_gi(nvml, handle, P_2G, 2)
    create_ci(nvml, gi)
    nvml.simAddProcess(0, 77, gi_start=2)
    gi_id = nvml.nvmlGpuInstanceGetInfo(gi).id
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert [(p.pid, p.gpuInstanceId) for p in procs] == [(77, gi_id)]
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 0)
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(mig)] == [77]


def test_fault_injection_hits_the_nth_call_only_with_the_real_exception() -> None:
    nvml = started(faults="nvmlDeviceGetHandleByIndex@2=Unknown;nvmlDeviceGetCount@1=GpuIsLost")
    nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_Unknown):
        nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError):  # calling code catching the base class works too
        nvml.nvmlDeviceGetCount()
    assert nvml.nvmlDeviceGetCount() == 1
    assert nvml.call_count("nvmlDeviceGetHandleByIndex") == 3


def test_a_sigkill_fault_kills_the_process_at_that_call(tmp_path: Path) -> None:
    state = tmp_path / "gpus.json"
    nvml = SimulatedNvml(["NVIDIA-A100-SXM4-40GB"], state_file=state, faults="nvmlDeviceSetMigMode@2=SIGKILL")
    nvml.nvmlInit()
    pid = os.fork()
    if pid == 0:  # the child: the first call passes, the second kills it before it takes effect
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(0)
            nvml.nvmlDeviceSetMigMode(handle, 1)
            nvml.nvmlDeviceSetMigMode(handle, 0)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after = SimulatedNvml(state_file=state)
    after.nvmlInit()
    assert after.nvmlDeviceGetMigMode(after.nvmlDeviceGetHandleByIndex(0)) == [0, 1]  # the first call only


def test_latency_is_charged_per_call() -> None:
    nvml = started(latency="default=0,nvmlDeviceGetCount=0.01")
    for _ in range(3):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.simulated_seconds == pytest.approx(0.03)
    nvml.set_latency("default=0.005")
    nvml.nvmlDeviceGetCount()
    assert nvml.simulated_seconds == pytest.approx(0.035)


def test_calls_before_init_fail_like_nvml() -> None:
    nvml = SimulatedNvml([A100])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


def test_state_file_keeps_gpus_across_restarts_and_processes(tmp_path: Path) -> None:
    state = tmp_path / "gpus.json"
    first = started(A100, A100, state_file=state)
    handle = enable_mig(first, 1)
    gi = create_gi(first, handle, P_3G, 4)
    create_ci(first, gi)
    # A restarted reconciler (new process, same file; the spec is ignored once the file exists).
    second = started(state_file=state)
    assert second.nvmlDeviceGetCount() == 2
    other = second.nvmlDeviceGetHandleByIndex(1)
    assert second.nvmlDeviceGetMigMode(other) == [1, 1]
    assert list_gis(second, other, P_3G) == [(4, 4)]
    # A test in another process marks the GI busy; the first instance sees it at its next call.
    second.simAddProcess(1, 999, gi_start=4)
    with pytest.raises(pynvml.NVMLError_InUse):
        first.nvmlGpuInstanceDestroy(gi)
    assert not list(tmp_path.glob(".*.tmp"))  # writes are atomic (temp file + rename)


def test_spec_parsers_name_the_bad_part() -> None:
    assert parse_gpus_spec("NVIDIA-A100-SXM4-40GB:2,NVIDIA-H100-80GB-HBM3:1") == [
        A100,
        A100,
        "NVIDIA-H100-80GB-HBM3",
    ]
    assert parse_faults_spec("nvmlDeviceSetMigMode@1=ResetRequired") == {
        "nvmlDeviceSetMigMode": {1: "ResetRequired"}
    }
    assert parse_latency_spec("default=0.002,nvmlDeviceSetMigMode=0.5") == {
        "default": 0.002,
        "nvmlDeviceSetMigMode": 0.5,
    }
    for bad, parser in [
        ("A100", parse_gpus_spec),
        ("nvmlDeviceSetMigMode=InUse", parse_faults_spec),
        ("nvmlDeviceSetMigMode@1=NoSuchError", parse_faults_spec),
        ("nvmlDeviceSetMigMode=slow", parse_latency_spec),
    ]:
        with pytest.raises(SimulationSpecError, match='"'):
            parser(bad)
    with pytest.raises(LookupError, match="unknown GPU product"):
        SimulatedNvml(["NVIDIA-GeForce-RTX-4090"])


def test_every_simulated_function_has_pynvmls_signature() -> None:
    """The access layer calls these by pynvml's parameter names and defaults: they must match."""
    simulated = [name for name in dir(SimulatedNvml) if name.startswith("nvml")]
    assert len(simulated) > 30
    for name in simulated:
        real = inspect.signature(inspect.unwrap(getattr(pynvml, name)))
        ours = inspect.signature(inspect.unwrap(getattr(SimulatedNvml, name)))
        ours_params = list(ours.parameters.values())[1:]  # without self
        assert [(p.name, p.default) for p in ours_params] == [
            (p.name, p.default) for p in real.parameters.values()
        ], name


@pytest.mark.parametrize("key", sorted(load_catalog().products))
def test_every_catalog_product_simulates_with_distinct_profile_ids(key: str) -> None:
    product = load_catalog().products[key]
    nvml = started(key)
    handle = enable_mig(nvml)
    ids = {}
    for profile in product.profiles:
        info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile.nvml_profile_id)
        assert info.instanceCount == profile.max_count and info.name == f"MIG {profile.name}"
        ids[profile.nvml_profile_id] = info.id
    assert len(set(ids.values())) == len(ids)  # create/list calls take info.id: it must be unambiguous


X100_FILE = gpu_model_file("x100.json")


def test_a_gpu_from_a_driver_table_file_runs_as_its_driver_reports_it(tmp_path: Path) -> None:
    model = load_gpu_model(str(X100_FILE))
    nvml = SimulatedNvml([model, model], state_file=tmp_path / "gpus.json", mig_enabled=True)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetName(handle) == "NVIDIA X100"
    pci = nvml.nvmlDeviceGetPciInfo(handle)
    assert (pci.pciDeviceId, pci.pciSubSystemId) == (0x2FFF10DE, 0x1A2B10DE)
    assert nvml.nvmlDeviceGetMemoryInfo(handle).total == 98304 * 1024 * 1024
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, 2)
    assert (info.id, info.sliceCount, info.instanceCount, info.memorySizeMB, info.name) == (
        11,
        3,
        2,
        48896,
        "MIG 3g.48gb",
    )
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, 4)  # no 7-slice profile on this GPU
    # The driver's placements, sizes included: a 3g at 0 or 3, size 3.
    assert create_gi_at(nvml, handle, 2, 3, 3) is not None
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        create_gi_at(nvml, handle, 2, 4, 3)
    # A restarted process finds the GPU model in the state file (the file itself is not needed).
    again = SimulatedNvml(state_file=tmp_path / "gpus.json")
    again.nvmlInit()
    assert again.nvmlDeviceGetName(again.nvmlDeviceGetHandleByIndex(0)) == "NVIDIA X100"


def create_gi_at(nvml: SimulatedNvml, handle: Any, const: int, start: int, size: int) -> Any:
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, const)
    placement = pynvml.c_nvmlGpuInstancePlacement_t()
    placement.start, placement.size = start, size
    return nvml.nvmlDeviceCreateGpuInstanceWithPlacement(handle, info.id, ctypes.byref(placement))


def _ci_placements(nvml: SimulatedNvml, gi: Any, profile_id: int) -> list[tuple[int, int]]:
    count = ctypes.c_uint(0)
    nvml.nvmlGpuInstanceGetComputeInstancePossiblePlacements(gi, profile_id, None, ctypes.byref(count))
    array = (pynvml.c_nvmlComputeInstancePlacement_t * count.value)()
    nvml.nvmlGpuInstanceGetComputeInstancePossiblePlacements(gi, profile_id, array, ctypes.byref(count))
    return [(array[i].start, array[i].size) for i in range(count.value)]


def test_compute_instance_possible_placements_follow_nvml() -> None:
    nvml = started()
    handle = enable_mig(nvml)
    gi = create_gi(nvml, handle, P_7G, 0)
    # nvml.h: every possible placement of the profile, whether taken or not; NULL gives the count.
    assert _ci_placements(nvml, gi, 2) == [(0, 3), (4, 3)]  # 3c.7g.40gb
    create_ci(nvml, gi, 2)
    assert _ci_placements(nvml, gi, 2) == [(0, 3), (4, 3)]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        _ci_placements(nvml, gi, 6)  # no 6-slice compute profile on an A100
    count = ctypes.c_uint(1)
    with pytest.raises(pynvml.NVMLError_InsufficientSize):
        nvml.nvmlGpuInstanceGetComputeInstancePossiblePlacements(
            gi, 0, (pynvml.c_nvmlComputeInstancePlacement_t * 1)(), ctypes.byref(count)
        )
    assert count.value == 7
    x100 = SimulatedNvml([load_gpu_model(str(X100_FILE))], mig_enabled=True)
    x100.nvmlInit()
    six = create_gi_at(x100, x100.nvmlDeviceGetHandleByIndex(0), 6, 0, 6)
    assert _ci_placements(x100, six, 2) == [(0, 3), (3, 3)]  # the table's, not a power-of-two rule


def test_a_gpu_model_file_must_be_a_report_with_a_table_or_one_gpu(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2, "migTables": [], "gpus": [{"index": 0}]}')
    with pytest.raises(SimulationSpecError, match="no GPU that has a MIG table"):
        load_gpu_model(str(bad))
    bad.write_text("not json")
    with pytest.raises(SimulationSpecError, match="cannot read a GPU model"):
        load_gpu_model(str(bad))
    with pytest.raises(SimulationSpecError, match=r'expected FILE:N like "x100\.json:8"'):
        parse_gpu_spec_files(f"{bad}")
    assert len(parse_gpu_spec_files(f"{X100_FILE}:3")) == 3
