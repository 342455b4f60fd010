"""A simulated NVML: the pynvml functions the access layer calls, backed by the hardware catalog
or by a driver's MIG table (a GPU no catalog knows).

GPUs are the only hardware mig-guard cannot have in CI, so this is the one stand-in the project
allows. It offers the same function names, signatures and return shapes as `pynvml` (the real
ctypes structs and handle types, `byref` counts and placement arrays) and raises the real
`pynvml.NVMLError_*` classes, so `reconciler.gpu_access` runs against it unchanged.

Behaviour follows nvml.h and the catalog: MIG mode changes stay pending until a GPU reset; GPU
instances only at the product's placements, within max counts, never overlapping
(InsufficientResources); nothing is created with MIG off (NotSupported); instances holding
compute instances or processes cannot be destroyed (InUse). `info.id` is the driver's
device-specific profile id (`smi_profile_id`) while the lookup argument is the NVML constant.

A GPU is given as a catalog label (`NVIDIA-A100-SXM4-40GB`) or as a `GpuModel`: a name, PCI
ids, memory and the driver's MIG table in the hardware report's format (`load_gpu_model` reads
one from a `mig-guard hardware --json` file), so tests and the demo can run a GPU no catalog
knows. Its compute profiles follow the table; where the table has none for a GPU-instance
profile, go-nvlib's rule stands in (see migcore.driver_table).

For tests and the demo it adds what hardware cannot: fault injection (an error at the Nth call of
a function), a latency per call, and a state file that keeps the GPUs (instances and the
processes holding them) across reconciler restarts and is shared by every process that opens it.
The `sim*` methods are not NVML: they model the host (`nvidia-smi -r`, a reboot) and workloads.
A platform that cannot reset a GPU (pass-through VMs) is `reset_requires_reboot=True`, or from the
command line `--simulated-faults simResetGpu@1=ResetRequired`; `simReboot` then activates the mode.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pynvml

from migcore.catalog import (
    GpuInstanceProfile,
    Product,
    format_pci_device_id,
    load_catalog,
    parse_pci_device_id,
)
from migcore.driver_table import DriverTableError, MigTable, table_product
from migcore.geometry import slot_mask

F = TypeVar("F", bound=Callable[..., Any])

# info.id for products whose driver ids the research did not find: A100's ids per NVML constant.
_FALLBACK_SMI_IDS = {0: 19, 7: 20, 9: 15, 1: 14, 2: 9, 3: 5, 4: 0}
_NOT_A_MIG_ID = 0xFFFFFFFF
STATE_VERSION = 1
KILL = "SIGKILL"  # a fault that kills the process at that call (crash tests)


class SimulationSpecError(ValueError):
    """A `--simulated-*` spec string that cannot be parsed; the message names the bad part."""


def _error(name: str) -> pynvml.NVMLError:
    """The real pynvml exception for an NVML error name like `InUse` or `InsufficientResources`."""
    cls = getattr(pynvml, f"NVMLError_{name}", None)
    if cls is None:
        raise SimulationSpecError(f'unknown NVML error "{name}"')
    return cast(pynvml.NVMLError, cls())


T = TypeVar("T")


def _per_gpu(spec: str, form: str, item: Callable[[str], T]) -> list[T]:
    """`X:N[,X:N]` -> `item(X)` once per GPU, in index order (`form` shows the right spelling)."""
    out: list[T] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, count = part.rpartition(":")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise SimulationSpecError(f'"{part}": expected {form}')
        out += [item(name)] * int(count)
    if not out:
        raise SimulationSpecError("no simulated GPUs given")
    return out


def parse_gpus_spec(spec: str) -> list[str]:
    """`LABEL:N[,LABEL:N]` -> one product label per GPU, in index order."""
    return _per_gpu(spec, 'LABEL:N like "NVIDIA-A100-SXM4-40GB:8"', str)


@dataclass(frozen=True)
class GpuModel:
    """A GPU the catalog need not know: what its driver reports (the report's per-GPU fields)."""

    name: str
    pci_device_id: int
    pci_subsystem_id: int | None
    memory_mib: int | None
    table: MigTable

    def product(self) -> Product:
        return table_product(self.table, self.name, self.pci_device_id, self.memory_mib, None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "pciDeviceId": format_pci_device_id(self.pci_device_id),
            "migTable": self.table.to_json(),
        }
        if self.pci_subsystem_id is not None:
            out["pciSubsystemId"] = format_pci_device_id(self.pci_subsystem_id)
        if self.memory_mib is not None:
            out["memoryMiB"] = self.memory_mib
        return out

    @staticmethod
    def from_json(raw: Any, where: str) -> GpuModel:
        """One GPU's model, or the first GPU with a MIG table of a hardware report (version 2)."""
        if isinstance(raw, dict) and isinstance(raw.get("gpus"), list):
            tables = raw.get("migTables") or []
            gpu = next(
                (g for g in raw["gpus"] if isinstance(g, dict) and g.get("migTable") is not None), None
            )
            if gpu is None or not isinstance(tables, list) or not isinstance(gpu["migTable"], int):
                raise SimulationSpecError(f"{where}: a hardware report with no GPU that has a MIG table")
            if not 0 <= gpu["migTable"] < len(tables):
                raise SimulationSpecError(f"{where}: migTable {gpu['migTable']} is not in migTables")
            raw = {**gpu, "migTable": tables[gpu["migTable"]]}
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise SimulationSpecError(
                f"{where}: expected a GPU (name, pciDeviceId, migTable) or a hardware report"
            )
        try:
            memory = raw.get("memoryMiB")
            subsystem = raw.get("pciSubsystemId")
            return GpuModel(
                raw["name"],
                parse_pci_device_id(raw["pciDeviceId"]),
                None if subsystem is None else parse_pci_device_id(subsystem),
                memory if isinstance(memory, int) and memory > 0 else None,
                MigTable.from_json(raw.get("migTable"), "migTable"),
            )
        except (KeyError, ValueError, DriverTableError) as exc:
            raise SimulationSpecError(f"{where}: {exc}") from exc


def load_gpu_model(path: str | os.PathLike[str]) -> GpuModel:
    """A GPU model from a file: `mig-guard hardware --json` output, or one GPU's model."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SimulationSpecError(f"{path}: cannot read a GPU model: {exc}") from exc
    return GpuModel.from_json(raw, str(path))


def parse_gpu_spec_files(spec: str) -> list[GpuModel]:
    """`FILE:N[,FILE:N]` -> one GPU model per GPU, in index order (each file read once)."""
    return _per_gpu(spec, 'FILE:N like "x100.json:8"', load_gpu_model)


def parse_faults_spec(spec: str | None) -> dict[str, dict[int, str]]:
    """`fn@N=Error[;fn@N=Error]` -> {fn: {N: Error}} (N counts calls of fn from 1). The error
    `SIGKILL` kills the calling process there instead (a crash at exactly that step)."""
    faults: dict[str, dict[int, str]] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        target, sep, error = part.partition("=")
        function, at, nth = target.partition("@")
        if not sep or not at or not nth.isdigit() or int(nth) < 1 or not function:
            raise SimulationSpecError(
                f'"{part}": expected FUNCTION@N=ERROR like "nvmlGpuInstanceDestroy@1=InUse"'
            )
        if error.strip() != KILL:
            _error(error.strip())  # validate the name now, not at the Nth call
        faults.setdefault(function.strip(), {})[int(nth)] = error.strip()
    return faults


def parse_latency_spec(spec: str | None) -> dict[str, float]:
    """`default=0.002,fn=0.5` -> seconds per call, by function (`default` for the rest)."""
    latency: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, value = part.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not sep or not name or seconds < 0:
            raise SimulationSpecError(f'"{part}": expected NAME=SECONDS like "nvmlDeviceSetMigMode=0.5"')
        latency[name.strip()] = seconds
    return latency


@dataclass
class _Ci:
    id: int
    profile_id: int  # NVML_COMPUTE_INSTANCE_PROFILE_* (equals the CI profile info.id)
    start: int
    size: int
    uuid: str
    pids: list[int] = field(default_factory=list)


@dataclass
class _Gi:
    id: int
    profile_const: int  # NVML_GPU_INSTANCE_PROFILE_*
    start: int
    size: int
    cis: dict[int, _Ci] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)  # processes with no CI (tests' "busy GI")


@dataclass
class _Gpu:
    index: int
    label: str
    uuid: str
    bus_id: str
    mig_current: bool = False
    mig_pending: bool = False
    reset_requires_reboot: bool = False
    gis: dict[int, _Gi] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)  # processes on the whole GPU (MIG off)
    next_uuid: int = 1
    model: GpuModel | None = None  # a GPU from a driver table instead of a catalog label


def _gpu_to_json(gpu: _Gpu) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "label": gpu.label,
        "uuid": gpu.uuid,
        "busId": gpu.bus_id,
        "migCurrent": gpu.mig_current,
        "migPending": gpu.mig_pending,
        "resetRequiresReboot": gpu.reset_requires_reboot,
        "pids": gpu.pids,
        "nextUuid": gpu.next_uuid,
        **({"model": gpu.model.to_json()} if gpu.model is not None else {}),
        "gpuInstances": [
            {
                "id": gi.id,
                "profileConst": gi.profile_const,
                "start": gi.start,
                "size": gi.size,
                "pids": gi.pids,
                "computeInstances": [
                    {
                        "id": ci.id,
                        "profileId": ci.profile_id,
                        "start": ci.start,
                        "size": ci.size,
                        "uuid": ci.uuid,
                        "pids": ci.pids,
                    }
                    for ci in gi.cis.values()
                ],
            }
            for gi in gpu.gis.values()
        ],
    }


def _gpu_from_json(raw: dict[str, Any]) -> _Gpu:
    gpu = _Gpu(
        index=raw["index"],
        label=raw["label"],
        uuid=raw["uuid"],
        bus_id=raw["busId"],
        mig_current=raw["migCurrent"],
        mig_pending=raw["migPending"],
        reset_requires_reboot=raw.get("resetRequiresReboot", False),
        pids=list(raw.get("pids", [])),
        next_uuid=raw.get("nextUuid", 1),
        model=GpuModel.from_json(raw["model"], "model") if raw.get("model") is not None else None,
    )
    for g in raw.get("gpuInstances", []):
        gi = _Gi(g["id"], g["profileConst"], g["start"], g["size"], pids=list(g.get("pids", [])))
        for c in g.get("computeInstances", []):
            gi.cis[c["id"]] = _Ci(
                c["id"], c["profileId"], c["start"], c["size"], c["uuid"], list(c.get("pids", []))
            )
        gpu.gis[gi.id] = gi
    return gpu


def _unwrap(ref: Any) -> Any:
    """The object behind a `byref(x)`, a `pointer(x)` or `x` itself (what C would dereference)."""
    if hasattr(ref, "_obj"):
        return ref._obj
    if hasattr(ref, "contents"):
        return ref.contents
    return ref


def nvml_call(mutates: bool = False) -> Callable[[F], F]:
    """Wrap a simulated NVML function: count the call, wait its latency, inject its fault, and
    keep the shared state file in step (reload before, save after a mutating call)."""

    def wrap(fn: F) -> F:
        name = fn.__name__

        @functools.wraps(fn)
        def call(self: SimulatedNvml, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if (
                    name not in ("nvmlInit", "nvmlShutdown")
                    and not name.startswith("sim")
                    and self._init_count == 0
                ):
                    raise _error("Uninitialized")
                self.calls.append(name)
                count = self._counts[name] = self._counts.get(name, 0) + 1
                delay = self._latency.get(name, self._latency.get("default", 0.0))
                if delay:
                    time.sleep(delay)
                self.simulated_seconds += delay
                fault = self._faults.get(name, {}).get(count)
                if fault == KILL:
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault is not None:
                    raise _error(fault)
                with self._shared_state(save=mutates):
                    return fn(self, *args, **kwargs)

        return cast(F, call)

    return wrap


class SimulatedNvml:
    """The simulated NVML: build it from product labels (`gpus=["NVIDIA-A100-SXM4-40GB"] * 8`) or
    GPU models (`gpus=[load_gpu_model("x100.json")] * 2`). `mig_enabled`: new GPUs start with
    MIG on (as after an earlier `nvidia-smi -mig 1` and reset)."""

    def __init__(
        self,
        gpus: Sequence[str | GpuModel] | None = None,
        state_file: str | os.PathLike[str] | None = None,
        faults: str | None = None,
        latency: str | None = None,
        reset_requires_reboot: bool = False,
        *,
        mig_enabled: bool = False,
    ) -> None:
        self._catalog = load_catalog()
        self._lock = threading.RLock()
        self._state_file = Path(state_file) if state_file else None
        self._state_stamp: tuple[int, int, int] | None = None
        self._faults = parse_faults_spec(faults)
        self._latency = parse_latency_spec(latency)
        self._counts: dict[str, int] = {}
        self._init_count = 0
        self.calls: list[str] = []  # every NVML function called, in order (tests walk this)
        self.simulated_seconds = 0.0  # the latency model's total so far
        self._handles: dict[tuple[Any, ...], Any] = {}
        self._handle_keys: dict[int, tuple[Any, ...]] = {}
        self._buffers: list[Any] = []
        self._gpus: list[_Gpu] = []
        self._boots = 1  # the host's boots so far: simBootId changes with each simReboot
        loaded = self._load_state() if self._state_file is not None else False
        if not loaded:
            if not gpus:
                raise SimulationSpecError("simulated GPUs: give product labels or an existing state file")
            self._gpus = [self._new_gpu(i, spec, reset_requires_reboot) for i, spec in enumerate(gpus)]
            for gpu in self._gpus:
                self._product(gpu)  # fail now on an unknown label
                gpu.mig_current = gpu.mig_pending = mig_enabled
            self._save_state()

    # --- not NVML: construction, persistence, handles ---------------------------------------------

    def _new_gpu(self, index: int, spec: str | GpuModel, reset_requires_reboot: bool) -> _Gpu:
        uuid = f"GPU-5a5a{index:04x}-0000-4000-8000-{index:012x}"
        model = spec if isinstance(spec, GpuModel) else None
        return _Gpu(
            index,
            spec.name.replace(" ", "-") if isinstance(spec, GpuModel) else spec,
            uuid,
            f"00000000:{0x10 + index:02X}:00.0",
            reset_requires_reboot=reset_requires_reboot,
            model=model,
        )

    def _product(self, gpu: _Gpu) -> Product:
        if gpu.model is not None:
            return gpu.model.product()
        return self._catalog.find(gpu.label)

    def _stamp(self) -> tuple[int, int, int] | None:
        assert self._state_file is not None
        try:
            st = self._state_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load_state(self) -> bool:
        assert self._state_file is not None
        try:
            raw = json.loads(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        if raw.get("version") != STATE_VERSION:
            raise SimulationSpecError(
                f"{self._state_file}: not a simulated-GPU state file of version {STATE_VERSION}"
            )
        self._gpus = [_gpu_from_json(g) for g in raw["gpus"]]
        self._boots = int(raw.get("boots", 1))
        self._state_stamp = self._stamp()
        return True

    def _save_state(self) -> None:
        if self._state_file is None:
            return
        body = json.dumps(
            {"version": STATE_VERSION, "boots": self._boots, "gpus": [_gpu_to_json(g) for g in self._gpus]},
            indent=1,
        )
        tmp = self._state_file.with_name(f".{self._state_file.name}.{os.getpid()}.tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, self._state_file)  # atomic: a SIGKILL leaves the old or the new state
        self._state_stamp = self._stamp()

    @contextmanager
    def _shared_state(self, save: bool) -> Iterator[None]:
        """Hold the state file's lock, pick up changes other processes made, save ours after."""
        if self._state_file is None:
            yield
            return
        lock_path = self._state_file.with_name(self._state_file.name + ".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._stamp() != self._state_stamp:
                    self._load_state()
                try:
                    yield
                finally:
                    if save:
                        self._save_state()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _handle(self, kind: Any, key: tuple[Any, ...]) -> Any:
        """A real ctypes handle of `kind` (a pynvml POINTER type) that stands for `key`."""
        full = (kind, *key)
        handle = self._handles.get(full)
        if handle is None:
            buffer = ctypes.c_uint64(len(self._buffers) + 1)
            self._buffers.append(buffer)
            handle = ctypes.cast(ctypes.pointer(buffer), kind)
            self._handles[full] = handle
            self._handle_keys[ctypes.addressof(buffer)] = key
        return handle

    def _key(self, handle: Any) -> tuple[Any, ...]:
        address = ctypes.cast(handle, ctypes.c_void_p).value
        key = self._handle_keys.get(address or 0)
        if key is None:
            raise _error("InvalidArgument")
        return key

    def _gpu(self, handle: Any) -> _Gpu:
        key = self._key(handle)
        if key[0] != "gpu":
            raise _error("InvalidArgument")
        gpu: _Gpu = self._gpus[int(key[1])]
        return gpu

    def _gi(self, handle: Any) -> tuple[_Gpu, _Gi]:
        key = self._key(handle)
        if key[0] != "gi":
            raise _error("InvalidArgument")
        gpu = self._gpus[key[1]]
        gi = gpu.gis.get(key[2])
        if gi is None:
            raise _error("InvalidArgument")  # a handle of a destroyed instance
        return gpu, gi

    def _ci(self, handle: Any) -> tuple[_Gpu, _Gi, _Ci]:
        key = self._key(handle)
        if key[0] not in ("ci", "mig"):
            raise _error("InvalidArgument")
        gpu = self._gpus[key[1]]
        gi = gpu.gis.get(key[2])
        ci = None if gi is None else gi.cis.get(key[3])
        if gi is None or ci is None:
            raise _error("NotFound" if key[0] == "mig" else "InvalidArgument")
        return gpu, gi, ci

    def _gi_profile(self, gpu: _Gpu, profile_const: int) -> GpuInstanceProfile | None:
        return self._product(gpu).profile_by_nvml_id(profile_const)

    def _smi_id(self, profile: GpuInstanceProfile) -> int:
        if profile.smi_profile_id is not None:
            return profile.smi_profile_id
        return _FALLBACK_SMI_IDS.get(profile.nvml_profile_id, 32 + profile.nvml_profile_id)

    def _by_smi_id(self, gpu: _Gpu, profile_id: int) -> GpuInstanceProfile:
        for profile in self._product(gpu).profiles:
            if self._smi_id(profile) == profile_id:
                return profile
        raise _error("InvalidArgument")

    def _require_mig(self, gpu: _Gpu) -> None:
        if not gpu.mig_current:
            raise _error("NotSupported")

    def _memory_mib(self, gpu: _Gpu, profile: GpuInstanceProfile) -> int:
        if profile.memory_mib:
            return int(profile.memory_mib)
        total = self._product(gpu).memory_mib or 0
        return int((profile.memory_fraction or 0) * total)

    def _next_uuid(self, gpu: _Gpu) -> str:
        gpu.next_uuid += 1
        return f"MIG-{gpu.uuid[4:12]}-{gpu.next_uuid:04x}-4000-8000-{gpu.index:04x}{gpu.next_uuid:08x}"

    # --- NVML: init, devices ----------------------------------------------------------------------

    @nvml_call()
    def nvmlInit(self) -> None:
        self._init_count += 1

    @nvml_call()
    def nvmlShutdown(self) -> None:
        if self._init_count == 0:
            raise _error("Uninitialized")
        self._init_count -= 1

    @nvml_call()
    def nvmlDeviceGetCount(self) -> int:
        return len(self._gpus)

    @nvml_call()
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not 0 <= index < len(self._gpus):
            raise _error("InvalidArgument")
        return self._handle(pynvml.c_nvmlDevice_t, ("gpu", index))

    @nvml_call()
    def nvmlDeviceGetName(self, handle: Any) -> str:
        key = self._key(handle)
        gpu = self._gpus[key[1]]
        product = self._product(gpu)
        name = next(
            (n for n in product.nvml_names if n.replace(" ", "-") == gpu.label), product.nvml_names[0]
        )
        if gpu.model is not None:
            name = gpu.model.name
        if key[0] == "mig":
            _, gi, _ = self._ci(handle)
            profile = self._gi_profile(gpu, gi.profile_const)
            return f"{name} MIG {profile.name if profile else '?'}"
        return name

    @nvml_call()
    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        key = self._key(handle)
        if key[0] == "mig":
            return self._ci(handle)[2].uuid
        return self._gpu(handle).uuid

    @nvml_call()
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        gpu = self._gpu(handle)
        info = pynvml.nvmlPciInfo_t()
        info.pciDeviceId = self._product(gpu).pci_device_ids[0]
        # A model's own subsystem id; a catalog GPU's is its device id (as on reference boards).
        subsystem = gpu.model.pci_subsystem_id if gpu.model is not None else None
        info.pciSubSystemId = info.pciDeviceId if subsystem is None else subsystem
        info.busId = gpu.bus_id
        info.busIdLegacy = gpu.bus_id
        info.bus = 0x10 + gpu.index
        return info

    @nvml_call()
    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> Any:
        gpu = self._gpu(handle)
        info = pynvml.c_nvmlMemory_t()
        info.total = (self._product(gpu).memory_mib or 0) * 1024 * 1024
        info.free = info.total
        return info

    # --- NVML: MIG mode (nvml.h: "pending" is the mode after the next activation trigger) ---------

    @nvml_call()
    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        gpu = self._gpu(device)
        return [int(gpu.mig_current), int(gpu.mig_pending)]

    @nvml_call(mutates=True)
    def nvmlDeviceSetMigMode(self, device: Any, mode: int) -> int:
        gpu = self._gpu(device)
        if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
            raise _error("InvalidArgument")
        if not mode and gpu.gis:
            raise _error("InUse")  # instances must be destroyed before MIG can be disabled
        gpu.mig_pending = bool(mode)
        if gpu.mig_pending == gpu.mig_current:
            return int(pynvml.NVML_SUCCESS)
        if gpu.reset_requires_reboot:
            return int(pynvml.NVML_ERROR_RESET_REQUIRED)  # pass-through VM: only a reboot activates it
        return int(pynvml.NVML_SUCCESS)

    # --- NVML: GPU-instance profiles and placements ------------------------------------------------

    @nvml_call()
    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: Any, profile: int, version: int = 2) -> Any:
        gpu = self._gpu(device)
        if not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
            raise _error("InvalidArgument")
        self._require_mig(gpu)  # nvml.h (...InfoV): NOT_SUPPORTED if MIG mode is not enabled
        found = self._gi_profile(gpu, profile)
        if found is None:
            raise _error("NotSupported")
        if version == 2:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            # A driver table keeps the driver's own name (nvidia-smi's) where it differs.
            shown = found.aliases[0] if gpu.model is not None and found.aliases else found.name
            info.name = f"MIG {shown}"
        else:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_t()
        info.id = self._smi_id(found)
        info.isP2pSupported = 0
        info.sliceCount = found.slices
        info.instanceCount = found.max_count
        info.multiprocessorCount = 14 * found.slices
        info.memorySizeMB = self._memory_mib(gpu, found)
        return info

    nvmlDeviceGetGpuInstanceProfileInfoV = nvmlDeviceGetGpuInstanceProfileInfo

    @nvml_call()
    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self, device: Any, profileId: int, placementsRef: Any, countRef: Any
    ) -> int:
        # nvml.h: returns the possible placements regardless of whether MIG is enabled.
        gpu = self._gpu(device)
        profile = self._by_smi_id(gpu, profileId)
        count = _unwrap(countRef)
        if placementsRef is None:
            count.value = len(profile.placements)
            return int(pynvml.NVML_SUCCESS)
        if count.value < len(profile.placements):
            count.value = len(profile.placements)
            raise _error("InsufficientSize")
        for i, start in enumerate(profile.placements):
            placementsRef[i].start = start
            placementsRef[i].size = profile.placement_size
        count.value = len(profile.placements)
        return int(pynvml.NVML_SUCCESS)

    def _occupied(self, gpu: _Gpu) -> int:
        mask = 0
        for gi in gpu.gis.values():
            mask |= slot_mask(gi.start, gi.size)
        return mask

    def _why_not(self, gpu: _Gpu, profile: GpuInstanceProfile, start: int) -> str | None:
        """The NVML error creating `profile` at `start` would give, or None if it can be created."""
        if start not in profile.placements:
            return "InvalidArgument"  # nvml.h: invalid placement
        product = self._product(gpu)
        same = sum(1 for gi in gpu.gis.values() if gi.profile_const == profile.nvml_profile_id)
        if same >= profile.max_count or len(gpu.gis) >= product.max_instances:
            return "InsufficientResources"
        mask = slot_mask(start, profile.placement_size)
        if self._occupied(gpu) & mask:
            return "InsufficientResources"  # nvml.h: fails if the placement overlaps occupied slices
        others = [self._gi_profile(gpu, gi.profile_const) for gi in gpu.gis.values()]
        media = [p for p in others if p is not None and p.name.has_media_extension]
        if profile.name.has_media_extension and media:
            return "InsufficientResources"  # one media-extension instance per GPU
        # nvml.h: allocating a *_ALL_ME profile prevents allocation of all but *_NO_ME profiles.
        if any(p is not None and p.name.has_all_media for p in others) and not profile.name.negative:
            return "InsufficientResources"
        if profile.name.has_all_media and any(p is not None and not p.name.negative for p in others):
            return "InsufficientResources"
        used = sum(p.slices for p in others if p is not None)
        if used + profile.slices > product.compute_slices:
            return "InsufficientResources"
        return None

    @nvml_call()
    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, device: Any, profileId: int) -> int:
        gpu = self._gpu(device)
        self._require_mig(gpu)
        profile = self._by_smi_id(gpu, profileId)
        trial = _Gpu(gpu.index, gpu.label, gpu.uuid, gpu.bus_id, True, True, gis=dict(gpu.gis))
        count = 0
        for start in profile.placements:
            if self._why_not(trial, profile, start) is None:
                trial.gis[-1 - count] = _Gi(
                    -1 - count, profile.nvml_profile_id, start, profile.placement_size
                )
                count += 1
        return count

    # --- NVML: GPU instances -----------------------------------------------------------------------

    def _create_gi(self, gpu: _Gpu, profile: GpuInstanceProfile, start: int) -> Any:
        error = self._why_not(gpu, profile, start)
        if error is not None:
            raise _error(error)
        gi_id = min(set(range(1, len(gpu.gis) + 2)) - set(gpu.gis))
        gpu.gis[gi_id] = _Gi(gi_id, profile.nvml_profile_id, start, profile.placement_size)
        return self._handle(pynvml.c_nvmlGpuInstance_t, ("gi", gpu.index, gi_id))

    @nvml_call(mutates=True)
    def nvmlDeviceCreateGpuInstance(self, device: Any, profileId: int) -> Any:
        gpu = self._gpu(device)
        self._require_mig(gpu)
        profile = self._by_smi_id(gpu, profileId)
        for start in profile.placements:
            if self._why_not(gpu, profile, start) is None:
                return self._create_gi(gpu, profile, start)
        raise _error("InsufficientResources")

    @nvml_call(mutates=True)
    def nvmlDeviceCreateGpuInstanceWithPlacement(self, device: Any, profileId: int, placement: Any) -> Any:
        gpu = self._gpu(device)
        self._require_mig(gpu)  # nvml.h: NOT_SUPPORTED if MIG is not enabled
        profile = self._by_smi_id(gpu, profileId)
        where = _unwrap(placement)
        if where.size != profile.placement_size:
            raise _error("InvalidArgument")
        return self._create_gi(gpu, profile, int(where.start))

    @nvml_call()
    def nvmlDeviceGetGpuInstances(
        self, device: Any, profileId: int, gpuInstancesRef: Any, countRef: Any
    ) -> int:
        gpu = self._gpu(device)
        self._require_mig(gpu)
        profile = self._by_smi_id(gpu, profileId)
        found = [
            gi
            for gi in sorted(gpu.gis.values(), key=lambda g: g.id)
            if gi.profile_const == profile.nvml_profile_id
        ]
        count = _unwrap(countRef)
        if gpuInstancesRef is None or len(gpuInstancesRef) < len(found):
            raise _error("InsufficientSize" if gpuInstancesRef is not None else "InvalidArgument")
        for i, gi in enumerate(found):
            gpuInstancesRef[i] = self._handle(pynvml.c_nvmlGpuInstance_t, ("gi", gpu.index, gi.id))
        count.value = len(found)
        return int(pynvml.NVML_SUCCESS)

    @nvml_call()
    def nvmlDeviceGetGpuInstanceById(self, device: Any, gpuInstanceId: int) -> Any:
        gpu = self._gpu(device)
        self._require_mig(gpu)
        if gpuInstanceId not in gpu.gis:
            raise _error("NotFound")
        return self._handle(pynvml.c_nvmlGpuInstance_t, ("gi", gpu.index, gpuInstanceId))

    @nvml_call()
    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> Any:
        gpu, gi = self._gi(gpuInstance)
        profile = self._gi_profile(gpu, gi.profile_const)
        assert profile is not None
        info = pynvml.c_nvmlGpuInstanceInfo_t()
        info.device = self._handle(pynvml.c_nvmlDevice_t, ("gpu", gpu.index))
        info.id = gi.id
        info.profileId = self._smi_id(profile)
        info.placement.start = gi.start
        info.placement.size = gi.size
        return info

    @nvml_call(mutates=True)
    def nvmlGpuInstanceDestroy(self, gpuInstance: Any) -> int:
        gpu, gi = self._gi(gpuInstance)
        if gi.cis or gi.pids:
            raise _error("InUse")  # nvml.h: IN_USE if compute instances or processes exist
        del gpu.gis[gi.id]
        return int(pynvml.NVML_SUCCESS)

    # --- NVML: compute instances -------------------------------------------------------------------

    def _ci_profiles(self, gpu: _Gpu, gi: _Gi) -> dict[int, Any]:
        profile = self._gi_profile(gpu, gi.profile_const)
        assert profile is not None
        return {ci.nvml_ci_profile_id: ci for ci in profile.compute_profiles}

    @nvml_call()
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, device: Any, profile: int, engProfile: int, version: int = 2
    ) -> Any:
        gpu, gi = self._gi(device)
        if not 0 <= profile < pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT or engProfile != 0:
            raise _error("InvalidArgument")
        found = self._ci_profiles(gpu, gi).get(profile)
        if found is None:
            raise _error("NotSupported")  # this CI profile is not offered in this GI
        if version == 2:
            info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
            gi_profile = self._gi_profile(gpu, gi.profile_const)
            assert gi_profile is not None
            info.name = f"MIG {gi_profile.name.with_compute_slices(found.slices)}"
        else:
            info = pynvml.c_nvmlComputeInstanceProfileInfo_t()
        info.id = found.nvml_ci_profile_id
        info.sliceCount = found.slices
        info.instanceCount = found.max_count
        info.multiprocessorCount = 14 * found.slices
        return info

    nvmlGpuInstanceGetComputeInstanceProfileInfoV = nvmlGpuInstanceGetComputeInstanceProfileInfo

    @nvml_call()
    def nvmlGpuInstanceGetComputeInstancePossiblePlacements(
        self, gpuInstance: Any, profileId: int, placementsRef: Any, countRef: Any
    ) -> int:
        # nvml.h: every possible placement of the profile (occupied or not); NULL placements
        # returns the count; NOT_SUPPORTED if profileId isn't supported.
        gpu, gi = self._gi(gpuInstance)
        found = self._ci_profiles(gpu, gi).get(profileId)
        gi_profile = self._gi_profile(gpu, gi.profile_const)
        if found is None or gi_profile is None:
            raise _error("NotSupported")
        starts = found.placements(gi_profile.slices)
        count = _unwrap(countRef)
        if placementsRef is None:
            count.value = len(starts)
            return int(pynvml.NVML_SUCCESS)
        if count.value < len(starts):
            count.value = len(starts)
            raise _error("InsufficientSize")
        for i, start in enumerate(starts):
            placementsRef[i].start = start
            placementsRef[i].size = found.slices
        count.value = len(starts)
        return int(pynvml.NVML_SUCCESS)

    def _create_ci(self, gpu: _Gpu, gi: _Gi, profile_id: int, start: int | None) -> Any:
        found = self._ci_profiles(gpu, gi).get(profile_id)
        gi_profile = self._gi_profile(gpu, gi.profile_const)
        if found is None or gi_profile is None:
            raise _error("InvalidArgument")
        starts = found.placements(gi_profile.slices)
        if start is not None and start not in starts:
            raise _error("InvalidArgument")
        used = 0
        for ci in gi.cis.values():
            used |= slot_mask(ci.start, ci.size)
        same = sum(1 for ci in gi.cis.values() if ci.profile_id == profile_id)
        for candidate in starts if start is None else (start,):
            mask = slot_mask(candidate, found.slices)
            if not used & mask and same < found.max_count:
                ci_id = min(set(range(len(gi.cis) + 1)) - set(gi.cis))
                gi.cis[ci_id] = _Ci(ci_id, profile_id, candidate, found.slices, self._next_uuid(gpu))
                return self._handle(pynvml.c_nvmlComputeInstance_t, ("ci", gpu.index, gi.id, ci_id))
        raise _error("InsufficientResources")

    @nvml_call(mutates=True)
    def nvmlGpuInstanceCreateComputeInstance(self, gpuInstance: Any, profileId: int) -> Any:
        gpu, gi = self._gi(gpuInstance)
        return self._create_ci(gpu, gi, profileId, None)

    @nvml_call(mutates=True)
    def nvmlGpuInstanceCreateComputeInstanceWithPlacement(
        self, gpuInstance: Any, profileId: int, placement: Any
    ) -> Any:
        gpu, gi = self._gi(gpuInstance)
        where = _unwrap(placement)
        found = self._ci_profiles(gpu, gi).get(profileId)
        if found is not None and where.size != found.slices:
            raise _error("InvalidArgument")
        return self._create_ci(gpu, gi, profileId, int(where.start))

    @nvml_call()
    def nvmlGpuInstanceGetComputeInstances(
        self, gpuInstance: Any, profileId: int, computeInstancesRef: Any, countRef: Any
    ) -> int:
        gpu, gi = self._gi(gpuInstance)
        if profileId not in self._ci_profiles(gpu, gi):
            raise _error("NotSupported")
        found = [ci for ci in sorted(gi.cis.values(), key=lambda c: c.id) if ci.profile_id == profileId]
        count = _unwrap(countRef)
        if computeInstancesRef is None or len(computeInstancesRef) < len(found):
            raise _error("InsufficientSize" if computeInstancesRef is not None else "InvalidArgument")
        for i, ci in enumerate(found):
            computeInstancesRef[i] = self._handle(
                pynvml.c_nvmlComputeInstance_t, ("ci", gpu.index, gi.id, ci.id)
            )
        count.value = len(found)
        return int(pynvml.NVML_SUCCESS)

    @nvml_call()
    def nvmlComputeInstanceGetInfo(self, computeInstance: Any) -> Any:
        gpu, gi, ci = self._ci(computeInstance)
        info = pynvml.c_nvmlComputeInstanceInfo_t()
        info.device = self._handle(pynvml.c_nvmlDevice_t, ("gpu", gpu.index))
        info.gpuInstance = self._handle(pynvml.c_nvmlGpuInstance_t, ("gi", gpu.index, gi.id))
        info.id = ci.id
        info.profileId = ci.profile_id
        info.placement.start = ci.start
        info.placement.size = ci.size
        return info

    @nvml_call(mutates=True)
    def nvmlComputeInstanceDestroy(self, computeInstance: Any) -> int:
        _, gi, ci = self._ci(computeInstance)
        if ci.pids:
            raise _error("InUse")  # processes run on it
        del gi.cis[ci.id]
        return int(pynvml.NVML_SUCCESS)

    # --- NVML: MIG devices and processes -----------------------------------------------------------

    def _mig_devices(self, gpu: _Gpu) -> list[tuple[_Gi, _Ci]]:
        return [
            (gi, ci)
            for gi in sorted(gpu.gis.values(), key=lambda g: g.id)
            for ci in sorted(gi.cis.values(), key=lambda c: c.id)
        ]

    @nvml_call()
    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        gpu = self._gpu(device)
        return self._product(gpu).compute_slices if gpu.mig_current else 0

    @nvml_call()
    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> Any:
        gpu = self._gpu(device)
        self._require_mig(gpu)
        devices = self._mig_devices(gpu)
        if not 0 <= index < len(devices):
            raise _error("NotFound")
        gi, ci = devices[index]
        return self._handle(pynvml.c_nvmlDevice_t, ("mig", gpu.index, gi.id, ci.id))

    @nvml_call()
    def nvmlDeviceIsMigDeviceHandle(self, device: Any) -> int:
        return int(self._key(device)[0] == "mig")

    @nvml_call()
    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        if self._key(device)[0] != "mig":
            raise _error("NotSupported")
        return int(self._ci(device)[1].id)

    @nvml_call()
    def nvmlDeviceGetComputeInstanceId(self, device: Any) -> int:
        if self._key(device)[0] != "mig":
            raise _error("NotSupported")
        return int(self._ci(device)[2].id)

    @nvml_call()
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: Any) -> Any:
        gpu, _, _ = self._ci(migDevice)
        return self._handle(pynvml.c_nvmlDevice_t, ("gpu", gpu.index))

    @staticmethod
    def _process(pid: int, gi_id: int, ci_id: int) -> Any:
        return pynvml.nvmlFriendlyObject(
            {"pid": pid, "usedGpuMemory": None, "gpuInstanceId": gi_id, "computeInstanceId": ci_id}
        )

    @nvml_call()
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        key = self._key(handle)
        if key[0] == "mig":
            _, gi, ci = self._ci(handle)
            return [self._process(pid, gi.id, ci.id) for pid in ci.pids]
        gpu = self._gpu(handle)
        out = [self._process(pid, _NOT_A_MIG_ID, _NOT_A_MIG_ID) for pid in gpu.pids]
        for gi in gpu.gis.values():
            out += [self._process(pid, gi.id, _NOT_A_MIG_ID) for pid in gi.pids]
            for ci in gi.cis.values():
                out += [self._process(pid, gi.id, ci.id) for pid in ci.pids]
        return out

    # --- not NVML: the host and the workloads ------------------------------------------------------

    @nvml_call(mutates=True)
    def simResetGpu(self, index: int) -> None:
        """`nvidia-smi -r -i N`: activates a pending MIG mode and clears every instance."""
        gpu = self._gpus[index]
        if gpu.reset_requires_reboot:
            raise _error("ResetRequired")  # this platform cannot reset a GPU: reboot the host
        if gpu.pids or any(gi.pids or any(ci.pids for ci in gi.cis.values()) for gi in gpu.gis.values()):
            raise _error("InUse")
        gpu.mig_current = gpu.mig_pending
        gpu.gis.clear()

    @nvml_call(mutates=True)
    def simReboot(self, reset_gpus: bool = True) -> None:
        """A host reboot: pending modes take effect, instances and processes are gone. With
        `reset_gpus=False`, a warm reboot that leaves the GPUs as they were (modes still pending)."""
        self._boots += 1
        if not reset_gpus:
            return
        for gpu in self._gpus:
            gpu.mig_current = gpu.mig_pending
            gpu.gis.clear()
            gpu.pids.clear()

    @nvml_call()
    def simBootId(self) -> str:
        """The simulated host's boot id (as /proc/sys/kernel/random/boot_id): new at each reboot."""
        return f"00000000-0000-4000-8000-{self._boots:012x}"

    @nvml_call(mutates=True)
    def simAddProcess(self, index: int, pid: int, gi_start: int | None = None) -> None:
        """A process on GPU `index`: on the GI at `gi_start` (on its first CI if it has one)."""
        gpu = self._gpus[index]
        if gi_start is None:
            gpu.pids.append(pid)
            return
        gi = next((g for g in gpu.gis.values() if g.start == gi_start), None)
        if gi is None:
            raise _error("NotFound")
        if gi.cis:
            gi.cis[min(gi.cis)].pids.append(pid)
        else:
            gi.pids.append(pid)

    @nvml_call(mutates=True)
    def simRemoveProcess(self, pid: int) -> None:
        for gpu in self._gpus:
            holders = [gpu.pids]
            for gi in gpu.gis.values():
                holders += [gi.pids, *(ci.pids for ci in gi.cis.values())]
            for pids in holders:
                while pid in pids:
                    pids.remove(pid)

    @nvml_call(mutates=True)
    def simSetResetRequiresReboot(self, index: int, value: bool) -> None:
        """Model a platform (pass-through VM) where only a reboot activates a MIG mode change."""
        self._gpus[index].reset_requires_reboot = value

    def simPciDeviceIds(self) -> list[str]:
        return [format_pci_device_id(self._product(g).pci_device_ids[0]) for g in self._gpus]

    def set_latency(self, spec: str | None) -> None:
        """Replace the latency model (`default=0.002,fn=0.5`), e.g. after setting up a scenario."""
        self._latency = parse_latency_spec(spec)

    def call_count(self, name: str) -> int:
        return self._counts.get(name, 0)

    # Constants, structs and exception classes are the real pynvml ones.
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "NVMLError", "c_nvml", "nvmlPciInfo", "nvmlFriendlyObject")):
            return getattr(pynvml, name)
        raise AttributeError(f"the simulated NVML has no {name}")
