"""The one interface between mig-guard and NVML: read the GPUs, run a plan's operations.

Everything here calls the pynvml API exactly as it is (ctypes structs, placement arrays, `byref`
counts, `pynvml.NVMLError_*`), on the module it is given: the real `pynvml` on a node, or
`reconciler.nvml_sim.SimulatedNvml` in tests and the demo. Profile names come from the hardware
catalog through the NVML profile constant (`nvml_profile_id`); the device-specific `info.id` that
NVML returns is what create/list calls take, never a hard-coded number.

A GPU reset is not in NVML: it goes through the host (`nvidia-smi -r -i <PCI bus id>`), or the simulator's
`simResetGpu`. Every NVML failure becomes a GpuError that says which GPU, which step and which
NVML error, in a sentence fit for the node's reason annotation.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from migcore.catalog import Catalog, Product, UnknownProductError, aligned_compute_starts, load_catalog
from migcore.driver_table import (
    ComputeProfileEntry,
    GpuInstanceProfileEntry,
    MigTable,
    gpu_instance_profile_name,
)
from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec
from migcore.hardware import DiscoveredGpu, NodeGpus
from migcore.planning import GpuPlan, Operation
from migcore.profiles import MigProfile, ProfileError, parse_profile
from migcore.usage import DevicePlace

log = logging.getLogger(__name__)

# Told after each operation of a plan ran (the operation, its index): counts and records steps.
OnOperation = Callable[[Operation, int], None]
Model = tuple[int, int | None, str]  # (PCI device id, subsystem id, name): one driver table each
_NOT_A_MIG_ID = 0xFFFFFFFF
_MIB = 1024 * 1024
# NVML errors that mean "this driver (or this user) cannot list placements": no table, not a failure.
_NO_TABLE = ("NotSupported", "FunctionNotFound", "NoPermission")


class GpuError(Exception):
    """An NVML step that failed: `gpu`, `operation` (what was being done), `nvml_error` (e.g. InUse)."""

    def __init__(
        self,
        message: str,
        *,
        gpu: int | None = None,
        operation: Operation | str = "",
        nvml_error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.gpu = gpu
        self.op = operation if isinstance(operation, Operation) else None
        self.operation = operation.describe() if isinstance(operation, Operation) else operation
        self.nvml_error = nvml_error

    @property
    def needs_reboot(self) -> bool:
        """The GPU cannot activate a MIG mode change without a host reboot (pass-through VMs)."""
        return self.nvml_error == "ResetRequired"

    @property
    def reset_failed(self) -> bool:
        """The GPU reset of a mode change failed or did not take effect (a host reboot, which the
        GPU Operator's mig-manager does with WITH_REBOOT, activates the mode instead)."""
        return self.op is not None and self.op.op == "reset-gpu"


def nvml_error_name(exc: BaseException) -> str:
    """`InUse` for pynvml.NVMLError_InUse, and so on (the class names pynvml generates)."""
    name = type(exc).__name__
    return name.removeprefix("NVMLError_") if name.startswith("NVMLError_") else name


def _failed(gpu: int | None, step: Operation | str, fn: Callable[..., Any], exc: BaseException) -> GpuError:
    """`GPU 0: destroy-gi 3g.20gb@4 failed: NVML nvmlGpuInstanceDestroy returned InUse (...)`."""
    name = nvml_error_name(exc)
    what = step.describe(with_gpu=gpu is None) if isinstance(step, Operation) else step
    where = "" if gpu is None else f"GPU {gpu}: "
    function = getattr(fn, "__name__", str(fn))
    return GpuError(
        f"{where}{what} failed: NVML {function} returned {name} ({exc})",
        gpu=gpu,
        operation=step,
        nvml_error=name,
    )


@dataclass(frozen=True)
class _GiRecord:
    handle: Any
    id: int
    const: int  # NVML_GPU_INSTANCE_PROFILE_*
    profile: MigProfile
    start: int
    size: int
    compute: tuple[tuple[Any, int, ComputeInstanceSpec], ...]  # (handle, CI id, spec)


def reset_gpu_with_nvidia_smi(bus_id: str) -> None:
    """The real GPU reset: NVML has no reset call; like mig-parted, `nvidia-smi -r` by PCI bus id
    (an index could name another GPU if enumeration order differs between NVML and nvidia-smi)."""
    done = subprocess.run(["nvidia-smi", "-r", "-i", bus_id], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError((done.stdout + done.stderr).strip() or f"nvidia-smi -r exited {done.returncode}")


class GpuAccess:
    """Reads and changes the MIG layout of a node's GPUs through an NVML module."""

    def __init__(
        self,
        nvml: Any,
        reset_gpu: Callable[[int], None] | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.nvml = nvml
        self._catalog = catalog or load_catalog()
        if reset_gpu is None:
            reset_gpu = getattr(nvml, "simResetGpu", None) or self._reset_by_bus_id
        self._reset_gpu = reset_gpu
        self._products: dict[int, Product | None] = {}
        self._gi_infos: dict[int, dict[int, Any]] = {}  # GPU -> NVML GI profile constant -> info
        self._ci_infos: dict[tuple[int, int], dict[int, Any]] = {}  # (GPU, GI constant) -> CI const -> info
        self._placements: dict[tuple[int, int], dict[int, int]] = {}  # (GPU, info.id) -> start -> size
        self._memory: dict[int, int] = {}  # GPU -> total memory in MiB (0: unknown)
        # What this process learned of each GPU model's compute profiles (NVML reports them only
        # through an existing GPU instance): they stay known when the instances are gone.
        self._compute_tables: dict[tuple[Model, int], tuple[ComputeProfileEntry, ...]] = {}
        self._tables: dict[Model, MigTable] = {}

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._call(None, "initialise NVML", self.nvml.nvmlInit)

    def stop(self) -> None:
        self._call(None, "shut NVML down", self.nvml.nvmlShutdown)

    def _reset_by_bus_id(self, index: int) -> None:
        pci = self._call(index, "read the PCI bus id", self.nvml.nvmlDeviceGetPciInfo, self._handle(index))
        reset_gpu_with_nvidia_smi(str(pci.busId))

    def _call(self, gpu: int | None, step: Operation | str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call NVML; turn its error into a GpuError naming the GPU and the step."""
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            raise _failed(gpu, step, fn, exc) from exc

    def _handle(self, index: int, step: Operation | str = "open the GPU") -> Any:
        return self._call(index, step, self.nvml.nvmlDeviceGetHandleByIndex, index)

    def gpu_count(self) -> int:
        return int(self._call(None, "count GPUs", self.nvml.nvmlDeviceGetCount))

    # --- what the GPU is --------------------------------------------------------------------------

    def product(self, index: int) -> Product | None:
        """The catalog product of GPU `index` (by PCI id, else by name), None if unknown."""
        if index not in self._products:
            handle = self._handle(index)
            pci = self._call(index, "read the PCI id", self.nvml.nvmlDeviceGetPciInfo, handle).pciDeviceId
            try:
                self._products[index] = self._catalog.by_pci_id(int(pci))
            except UnknownProductError:
                name = self._call(index, "read the name", self.nvml.nvmlDeviceGetName, handle)
                try:
                    self._products[index] = self._catalog.by_nvml_name(str(name))
                except UnknownProductError:
                    self._products[index] = None
        return self._products[index]

    def mig_mode(self, index: int) -> tuple[bool, bool]:
        """(current, pending) MIG mode; (False, False) for a GPU without MIG."""
        handle = self._handle(index, "read the MIG mode")
        try:
            current, pending = self.nvml.nvmlDeviceGetMigMode(handle)
        except self.nvml.NVMLError_NotSupported:
            return False, False
        except self.nvml.NVMLError as exc:
            raise _failed(index, "read the MIG mode", self.nvml.nvmlDeviceGetMigMode, exc) from exc
        return bool(current), bool(pending)

    def _mig_capable(self, index: int) -> bool:
        handle = self._handle(index)
        try:
            self._call(index, "read the MIG mode", self.nvml.nvmlDeviceGetMigMode, handle)
        except GpuError as exc:
            if exc.nvml_error == "NotSupported":
                return False
            raise
        return True

    def _memory_mib(self, index: int) -> int:
        if index not in self._memory:
            info = self._call(
                index, "read the memory size", self.nvml.nvmlDeviceGetMemoryInfo, self._handle(index)
            )
            self._memory[index] = int(info.total) // _MIB
        return self._memory[index]

    @staticmethod
    def _driver_name(info: Any) -> MigProfile | None:
        """The name in a version-2 profile info (`MIG 1g.5gb`), if it has a valid one."""
        raw = getattr(info, "name", b"")
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        try:
            return parse_profile(text.removeprefix("MIG ").strip())
        except ProfileError:
            return None

    def _profile_name(self, index: int, profile_const: int, info: Any) -> MigProfile:
        """The name go-nvlib (mig-parted, the device plugin, GFD) gives this GPU-instance profile,
        computed from the memory sizes; else the driver's own name; else the catalog's."""
        total, memory = self._memory_mib(index), int(getattr(info, "memorySizeMB", 0))
        if total > 0 and memory > 0:
            return gpu_instance_profile_name(profile_const, int(info.sliceCount), memory, total)
        named = self._driver_name(info)
        if named is not None:
            return named
        product = self.product(index)
        found = product.profile_by_nvml_id(profile_const) if product else None
        if found is not None:
            return found.name
        raise GpuError(
            f"GPU {index}: cannot name GPU-instance profile {profile_const} (driver says {getattr(info, 'name', '')!r})",
            gpu=index,
            operation="name a profile",
        )

    def _gi_profile_infos(self, index: int, handle: Any) -> dict[int, Any]:
        """NVML profile constant -> profile info, for the profiles this GPU offers (MIG on)."""
        if index not in self._gi_infos:
            infos: dict[int, Any] = {}
            for const in range(self.nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
                try:
                    infos[const] = self.nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, const)
                except (self.nvml.NVMLError_NotSupported, self.nvml.NVMLError_InvalidArgument):
                    continue  # go-nvlib VisitMigProfiles: the profile is not offered here
                except self.nvml.NVMLError as exc:
                    step = f"read GPU-instance profile {const}"
                    raise _failed(index, step, self.nvml.nvmlDeviceGetGpuInstanceProfileInfo, exc) from exc
            self._gi_infos[index] = infos
        return self._gi_infos[index]

    def _ci_profile_infos(self, index: int, gi_const: int, gi_handle: Any) -> dict[int, Any]:
        key = (index, gi_const)
        if key not in self._ci_infos:
            infos: dict[int, Any] = {}
            for const in range(self.nvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
                try:
                    infos[const] = self.nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                        gi_handle, const, self.nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
                    )
                except (self.nvml.NVMLError_NotSupported, self.nvml.NVMLError_InvalidArgument):
                    continue
                except self.nvml.NVMLError as exc:
                    step = f"read compute-instance profile {const}"
                    fn = self.nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo
                    raise _failed(index, step, fn, exc) from exc
            self._ci_infos[key] = infos
        return self._ci_infos[key]

    def _forget(self, index: int) -> None:
        """Drop cached profile data of a GPU whose mode changed (a reset re-enumerates it)."""
        self._gi_infos.pop(index, None)
        for key in [k for k in self._ci_infos if k[0] == index]:
            del self._ci_infos[key]
        for key in [k for k in self._placements if k[0] == index]:
            del self._placements[key]

    # --- reading the layout -----------------------------------------------------------------------

    def _walk(
        self, index: int, handle: Any, step: Operation | str = "read the MIG layout", only: int | None = None
    ) -> list[_GiRecord]:
        """Every GPU instance of a MIG-enabled GPU (of profile constant `only`, if given), with its
        compute instances, from NVML."""
        records: list[_GiRecord] = []
        nvml = self.nvml
        for const, info in self._gi_profile_infos(index, handle).items():
            if only is not None and const != only:
                continue
            name = self._profile_name(index, const, info)
            array = (nvml.c_nvmlGpuInstance_t * max(1, int(info.instanceCount)))()
            count = ctypes.c_uint(0)
            self._call(
                index, step, nvml.nvmlDeviceGetGpuInstances, handle, info.id, array, ctypes.byref(count)
            )
            for i in range(count.value):
                gi = array[i]
                gi_info = self._call(index, step, nvml.nvmlGpuInstanceGetInfo, gi)
                compute: list[tuple[Any, int, ComputeInstanceSpec]] = []
                for ci_info in self._ci_profile_infos(index, const, gi).values():
                    ci_array = (nvml.c_nvmlComputeInstance_t * max(1, int(ci_info.instanceCount)))()
                    ci_count = ctypes.c_uint(0)
                    self._call(
                        index,
                        step,
                        nvml.nvmlGpuInstanceGetComputeInstances,
                        gi,
                        ci_info.id,
                        ci_array,
                        ctypes.byref(ci_count),
                    )
                    ci_name = str(name.with_compute_slices(int(ci_info.sliceCount)))
                    for j in range(ci_count.value):
                        ci = ci_array[j]
                        c_info = self._call(index, step, nvml.nvmlComputeInstanceGetInfo, ci)
                        spec = ComputeInstanceSpec(ci_name, int(c_info.placement.start))
                        compute.append((ci, int(c_info.id), spec))
                records.append(
                    _GiRecord(
                        gi,
                        int(gi_info.id),
                        const,
                        name,
                        int(gi_info.placement.start),
                        int(gi_info.placement.size),
                        tuple(sorted(compute, key=lambda c: c[2])),
                    )
                )
        return sorted(records, key=lambda r: r.start)

    def geometry(self, index: int) -> GpuGeometry:
        """The current layout of GPU `index`, placements, compute instances and a pending MIG
        mode included."""
        current, pending = self.mig_mode(index)
        if not current:
            return GpuGeometry(False, mig_pending=pending)
        return self._geometry_of(self._walk(index, self._handle(index)), pending)

    @staticmethod
    def _geometry_of(records: list[_GiRecord], pending: bool | None = None) -> GpuGeometry:
        return GpuGeometry(
            True,
            tuple(
                GpuInstanceSpec(r.start, r.size, str(r.profile), tuple(c[2] for c in r.compute))
                for r in records
            ),
            pending,
        )

    def geometries(self) -> dict[int, GpuGeometry]:
        return {i: self.geometry(i) for i in range(self.gpu_count())}

    def discover(self) -> NodeGpus:
        """The node's GPUs for the `mig-guard.io/gpus` annotation: ids, memory, layout, and the
        driver's MIG table (readable only with MIG on: NVML answers NotSupported otherwise; once
        read, a GPU model's table is kept for this process)."""
        gpus: list[DiscoveredGpu] = []
        for index in range(self.gpu_count()):
            handle = self._handle(index)
            name = str(self._call(index, "read the name", self.nvml.nvmlDeviceGetName, handle))
            uuid = str(self._call(index, "read the UUID", self.nvml.nvmlDeviceGetUUID, handle))
            pci = self._call(index, "read the PCI id", self.nvml.nvmlDeviceGetPciInfo, handle)
            device, subsystem = int(pci.pciDeviceId), int(getattr(pci, "pciSubSystemId", 0)) or None
            model: Model = (device, subsystem, name)
            capable = self._mig_capable(index)
            geometry = GpuGeometry(False)
            current, pending = self.mig_mode(index) if capable else (False, False)
            if current:
                records = self._walk(index, handle)
                geometry = self._geometry_of(records, pending)
                self._read_table(index, handle, model, records)
            elif pending:
                geometry = GpuGeometry(False, mig_pending=True)
            gpus.append(
                DiscoveredGpu(
                    index,
                    device,
                    name,
                    capable,
                    geometry=geometry if capable else None,
                    uuid=uuid,
                    pci_subsystem_id=subsystem,
                    memory_mib=self._memory_mib(index) or None,
                    mig_table=self._tables.get(model) if capable else None,
                )
            )
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return NodeGpus(tuple(gpus), stamp)

    def _read_table(self, index: int, handle: Any, model: Model, records: list[_GiRecord]) -> None:
        """Read the driver's MIG table of GPU `index` (MIG on) into `_tables[model]`: every
        GPU-instance profile with its placements, and the compute profiles of those it has an
        instance of. A driver that cannot list placements leaves the model without a table."""
        for record in records:
            if (model, record.const) not in self._compute_tables:
                self._compute_tables[(model, record.const)] = self._compute_entries(index, record)
        entries: list[GpuInstanceProfileEntry] = []
        for const, info in self._gi_profile_infos(index, handle).items():
            try:
                spots = self._possible_placements(index, handle, info, "read the MIG table")
            except GpuError as exc:
                if exc.nvml_error not in _NO_TABLE:
                    raise
                log.warning(
                    "GPU %d: the driver lists no GPU-instance placements (%s); no MIG table", index, exc
                )
                return
            sizes = set(spots.values())
            if len(sizes) != 1:
                log.warning("GPU %d: profile %d has placements of several sizes; no MIG table", index, const)
                return
            name = self._profile_name(index, const, info)
            driver_name = self._driver_name(info)
            entries.append(
                GpuInstanceProfileEntry(
                    name=name,
                    profile_id=const,
                    id=int(info.id),
                    slices=int(info.sliceCount),
                    memory_mib=int(info.memorySizeMB),
                    max_count=int(info.instanceCount),
                    placements=tuple(sorted(spots)),
                    placement_size=sizes.pop(),
                    compute_profiles=self._compute_tables.get((model, const)),
                    driver_name=driver_name if driver_name not in (None, name) else None,
                )
            )
        self._tables[model] = MigTable(tuple(entries))

    def _compute_entries(self, index: int, record: _GiRecord) -> tuple[ComputeProfileEntry, ...]:
        """The compute profiles the driver offers in `record`'s GPU-instance profile, with the
        possible placements it reports for each (NVML's alignment where it cannot list them)."""
        nvml, step = self.nvml, "read the MIG table"
        entries: list[ComputeProfileEntry] = []
        seen: set[str] = set()
        for const, info in sorted(self._ci_profile_infos(index, record.const, record.handle).items()):
            slices = int(info.sliceCount)
            name = record.profile.with_compute_slices(slices)
            if str(name) in seen:
                continue  # e.g. 1_SLICE_REV1 beside 1_SLICE: go-nvlib finds the first
            seen.add(str(name))
            count = ctypes.c_uint(0)
            fn = nvml.nvmlGpuInstanceGetComputeInstancePossiblePlacements
            try:
                self._call(index, step, fn, record.handle, info.id, None, ctypes.byref(count))
                array = (nvml.c_nvmlComputeInstancePlacement_t * max(1, count.value))()
                self._call(index, step, fn, record.handle, info.id, array, ctypes.byref(count))
                starts = tuple(sorted(int(array[i].start) for i in range(count.value)))
            except GpuError as exc:
                if exc.nvml_error not in _NO_TABLE:
                    raise
                starts = aligned_compute_starts(slices, record.profile.gi_slices)
            entries.append(
                ComputeProfileEntry(name, const, int(info.id), slices, int(info.instanceCount), starts)
            )
        return tuple(entries)

    def _possible_placements(
        self, index: int, handle: Any, info: Any, step: Operation | str
    ) -> dict[int, int]:
        """start -> size of every placement NVML allows for GI profile `info` (cached per GPU)."""
        nvml = self.nvml
        key = (index, int(info.id))
        if key not in self._placements:
            count = ctypes.c_uint(0)
            fn = nvml.nvmlDeviceGetGpuInstancePossiblePlacements
            self._call(index, step, fn, handle, info.id, None, ctypes.byref(count))
            array = (nvml.c_nvmlGpuInstancePlacement_t * max(1, count.value))()
            self._call(index, step, fn, handle, info.id, array, ctypes.byref(count))
            self._placements[key] = {int(array[i].start): int(array[i].size) for i in range(count.value)}
        return self._placements[key]

    # --- workloads ----------------------------------------------------------------------------------

    def processes(self, index: int) -> dict[int | None, list[int]]:
        """Compute processes by GI start (None: the whole GPU, or a process NVML does not place).

        With MIG on, each MIG device is asked for its processes; the parent GPU's list (which
        without privileges may not say the GPU instance) only adds processes not placed that way.
        """
        step = "list processes"
        handle = self._handle(index, step)
        found: dict[int | None, set[int]] = {}
        current, _ = self.mig_mode(index)
        starts: dict[int, int] = {}
        placed: set[int] = set()
        if current:
            starts = {r.id: r.start for r in self._walk(index, handle, step)}
            for mig, gi_id in self._mig_devices(index, handle, step):
                for proc in self._call(index, step, self.nvml.nvmlDeviceGetComputeRunningProcesses, mig):
                    found.setdefault(starts.get(gi_id), set()).add(int(proc.pid))
                    placed.add(int(proc.pid))
        for proc in self._call(index, step, self.nvml.nvmlDeviceGetComputeRunningProcesses, handle):
            pid = int(proc.pid)
            start = starts.get(getattr(proc, "gpuInstanceId", _NOT_A_MIG_ID)) if current else None
            if pid not in placed or start is not None:
                found.setdefault(start, set()).add(pid)
        return {start: sorted(pids) for start, pids in found.items()}

    def _mig_devices(self, index: int, handle: Any, step: str) -> list[tuple[Any, int]]:
        """(MIG device handle, its GI id) for every MIG device of the GPU."""
        out: list[tuple[Any, int]] = []
        count = int(self._call(index, step, self.nvml.nvmlDeviceGetMaxMigDeviceCount, handle))
        for i in range(count):
            try:
                mig = self.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
            except self.nvml.NVMLError_NotFound:
                continue  # MIG device indexes can be sparse (go-nvlib skips NOT_FOUND)
            except self.nvml.NVMLError as exc:
                raise _failed(index, step, self.nvml.nvmlDeviceGetMigDeviceHandleByIndex, exc) from exc
            out.append((mig, int(self._call(index, step, self.nvml.nvmlDeviceGetGpuInstanceId, mig))))
        return out

    def device_ids(self, index: int) -> dict[str, int | None]:
        """Every id a device plugin may give a device of GPU `index` -> its GI start (None: the
        whole GPU); see `device_places`."""
        return {device: place.gi for device, place in self.device_places(index).items()}

    def device_places(self, index: int) -> dict[str, DevicePlace]:
        """Every id a device plugin may give a device of GPU `index` -> where it lives (the GPU;
        for a MIG device its GPU instance, compute instance and profile), to place the ids
        PodResources reports.

        The GPU: its UUID and, for `deviceIDStrategy: index`, its index (`"0"`). Each MIG device:
        its UUID (`MIG-<uuid>`), the form of drivers before R470 (`MIG-GPU-<gpu uuid>/<GI id>/<CI
        id>`) and its index form (`"<GPU index>:<MIG device index>"`).
        """
        step = "list device ids"
        nvml = self.nvml
        handle = self._handle(index, step)
        gpu_uuid = str(self._call(index, step, nvml.nvmlDeviceGetUUID, handle))
        whole = DevicePlace(index)
        out: dict[str, DevicePlace] = {gpu_uuid: whole, str(index): whole}
        if not self.mig_mode(index)[0]:
            return out
        records = {r.id: r for r in self._walk(index, handle, step)}
        count = int(self._call(index, step, nvml.nvmlDeviceGetMaxMigDeviceCount, handle))
        for k in range(count):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
            except nvml.NVMLError_NotFound:
                continue
            except nvml.NVMLError as exc:
                raise _failed(index, step, nvml.nvmlDeviceGetMigDeviceHandleByIndex, exc) from exc
            gi_id = int(self._call(index, step, nvml.nvmlDeviceGetGpuInstanceId, mig))
            ci_id = int(self._call(index, step, nvml.nvmlDeviceGetComputeInstanceId, mig))
            record = records.get(gi_id)
            ci = None if record is None else next((c[2] for c in record.compute if c[1] == ci_id), None)
            place = DevicePlace(
                index,
                None if record is None else record.start,
                None if ci is None else ci.start,
                None if ci is None else ci.profile,
            )
            out[str(self._call(index, step, nvml.nvmlDeviceGetUUID, mig))] = place
            out[f"MIG-{gpu_uuid}/{gi_id}/{ci_id}"] = place
            out[f"{index}:{k}"] = place
        return out

    # --- changing the layout ----------------------------------------------------------------------

    def reset_gpu(self, index: int, step: Operation | str = "reset-gpu") -> None:
        """Reset through the host; a pending MIG mode takes effect and every instance is gone."""
        what = step.describe(with_gpu=False) if isinstance(step, Operation) else step
        try:
            self._reset_gpu(index)
        except self.nvml.NVMLError as exc:
            name = nvml_error_name(exc)
            hint = "; only a reboot can activate the MIG mode change" if name == "ResetRequired" else ""
            raise GpuError(
                f"GPU {index}: {what} failed: the GPU reset was refused ({name}){hint}",
                gpu=index,
                operation=step,
                nvml_error=name,
            ) from exc
        except (OSError, RuntimeError) as exc:
            raise GpuError(f"GPU {index}: {what} failed: {exc}", gpu=index, operation=step) from exc
        finally:
            self._forget(index)

    def apply(self, plan: GpuPlan, done: OnOperation | None = None) -> None:
        """Run the plan's operations in order; `done(op, i)` after each. The first failure raises
        a GpuError and stops (the caller rolls back: `reconciler.gpu_apply`)."""
        for i, op in enumerate(plan.operations):
            self._run(op)
            if done is not None:
                done(op, i)

    def _run(self, op: Operation) -> None:
        index, nvml = op.gpu, self.nvml
        handle = self._handle(index, op)
        if op.op == "set-mig-mode":
            mode = nvml.NVML_DEVICE_MIG_ENABLE if op.enabled else nvml.NVML_DEVICE_MIG_DISABLE
            status = int(self._call(index, op, nvml.nvmlDeviceSetMigMode, handle, mode))
            if status == nvml.NVML_ERROR_RESET_REQUIRED:
                raise GpuError(
                    f"GPU {index}: {op.describe(with_gpu=False)} needs a reboot to take effect (activation status ResetRequired)",
                    gpu=index,
                    operation=op,
                    nvml_error="ResetRequired",
                )
            if status not in (nvml.NVML_SUCCESS,):
                name = nvml_error_name(nvml.NVMLError(status))
                raise GpuError(
                    f"GPU {index}: {op.describe(with_gpu=False)} was not activated (activation status {name})",
                    gpu=index,
                    operation=op,
                    nvml_error=name,
                )
            self._forget(index)
        elif op.op == "reset-gpu":
            self.reset_gpu(index, op)
            current, pending = self.mig_mode(index)
            if current != pending:
                raise GpuError(
                    f"GPU {index}: after the reset MIG mode is still {'on' if current else 'off'}",
                    gpu=index,
                    operation=op,
                )
        elif op.op == "create-gi":
            self._create_gi(index, handle, op)
        elif op.op == "destroy-gi":
            self._call(index, op, nvml.nvmlGpuInstanceDestroy, self._find_gi(index, handle, op).handle)
        elif op.op == "create-ci":
            self._create_ci(index, handle, op)
        elif op.op == "destroy-ci":
            record = self._find_gi(index, handle, op)
            for ci, _, spec in record.compute:
                if spec.profile == op.profile and spec.start == op.start:
                    self._call(index, op, nvml.nvmlComputeInstanceDestroy, ci)
                    return
            raise GpuError(
                f"GPU {index}: {op.describe(with_gpu=False)}: no such compute instance",
                gpu=index,
                operation=op,
                nvml_error="NotFound",
            )
        else:  # pragma: no cover - OpName is closed
            raise GpuError(f"unknown operation {op.op}", gpu=index, operation=op)

    def _gi_const(self, index: int, handle: Any, profile: MigProfile, op: Operation) -> tuple[int, Any]:
        """The NVML profile constant and info for a GI profile name on this GPU."""
        infos = self._gi_profile_infos(index, handle)
        product = self.product(index)
        known = product.gpu_instance_profile(profile) if product else None
        if known is not None and known.nvml_profile_id in infos:
            return known.nvml_profile_id, infos[known.nvml_profile_id]
        for const, info in infos.items():
            if self._profile_name(index, const, info) == profile:
                return const, info
        raise GpuError(
            f"GPU {index}: {op.describe(with_gpu=False)}: the driver offers no {profile} profile",
            gpu=index,
            operation=op,
            nvml_error="NotSupported",
        )

    def _create_gi(self, index: int, handle: Any, op: Operation) -> None:
        nvml = self.nvml
        assert op.profile is not None and op.start is not None
        _, info = self._gi_const(index, handle, parse_profile(op.profile).gpu_instance, op)
        spots = self._possible_placements(index, handle, info, op)
        size = spots.get(op.start)
        if size is None:
            starts = ", ".join(str(s) for s in sorted(spots))
            raise GpuError(
                f"GPU {index}: {op.describe(with_gpu=False)}: {op.profile} can only start at {starts}",
                gpu=index,
                operation=op,
                nvml_error="InvalidArgument",
            )
        placement = nvml.c_nvmlGpuInstancePlacement_t()
        placement.start, placement.size = op.start, size
        self._call(
            index, op, nvml.nvmlDeviceCreateGpuInstanceWithPlacement, handle, info.id, ctypes.byref(placement)
        )

    def _find_gi(self, index: int, handle: Any, op: Operation) -> _GiRecord:
        start = op.start if op.op == "destroy-gi" else op.gi_start
        assert op.profile is not None
        gi_profile = parse_profile(op.profile).gpu_instance
        const, _ = self._gi_const(index, handle, gi_profile, op)
        for record in self._walk(index, handle, op, only=const):
            if record.start == start and record.profile == gi_profile:
                return record
        raise GpuError(
            f"GPU {index}: {op.describe(with_gpu=False)}: no {gi_profile} GPU instance at {start}",
            gpu=index,
            operation=op,
            nvml_error="NotFound",
        )

    def _create_ci(self, index: int, handle: Any, op: Operation) -> None:
        nvml = self.nvml
        assert op.profile is not None and op.start is not None
        profile = parse_profile(op.profile)
        record = self._find_gi(index, handle, op)
        gi_const, _ = self._gi_const(index, handle, record.profile, op)
        infos = self._ci_profile_infos(index, gi_const, record.handle)
        product = self.product(index)
        known = product.gpu_instance_profile(record.profile) if product else None
        ci_known = known.compute_profile(profile.compute_slices) if known else None
        info = infos.get(ci_known.nvml_ci_profile_id) if ci_known else None
        if info is None:
            info = next((i for i in infos.values() if int(i.sliceCount) == profile.compute_slices), None)
        if info is None:
            raise GpuError(
                f"GPU {index}: {op.describe(with_gpu=False)}: the GPU instance offers no {profile.compute_slices}-slice compute profile",
                gpu=index,
                operation=op,
                nvml_error="NotSupported",
            )
        placement = nvml.c_nvmlComputeInstancePlacement_t()
        placement.start, placement.size = op.start, int(info.sliceCount)
        self._call(
            index,
            op,
            nvml.nvmlGpuInstanceCreateComputeInstanceWithPlacement,
            record.handle,
            info.id,
            ctypes.byref(placement),
        )
