"""The node-hardware report: the GPUs a reconciler discovered, as a node annotation.

The reconciler writes it (`mig-guard.io/gpus`), the webhook reads it to judge a layout
against what the driver actually offers instead of the `gpu.product` label alone. The wire
format is versioned JSON; version 2 carries the driver's MIG table (migcore.driver_table),
one per distinct table, which identical GPUs share by index:

    {"version": 2, "reportedAt": "2026-11-28T14:00:00Z",
     "migTables": [{"gpuInstanceProfiles": [...]}],
     "gpus": [{"index": 0, "pciDeviceId": "0x20B010DE", "pciSubsystemId": "0x134F10DE",
               "name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-...", "migCapable": true,
               "memoryMiB": 40960, "migTable": 0,
               "geometry": {"migEnabled": true, "gpuInstances": [...]}}]}

Version 1 (still read, from reconcilers of earlier releases) has no tables, ids or memory; it
has `profiles`, the driver's max count per GPU-instance profile, instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from migcore.catalog import format_pci_device_id, parse_pci_device_id
from migcore.driver_table import DriverTableError, MigTable
from migcore.geometry import GpuGeometry
from migcore.profiles import ProfileError, parse_profile

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MAX_ANNOTATION_BYTES = 64 * 1024


class HardwareReportError(ValueError):
    """An annotation that is not a valid hardware report; the message says where."""


@dataclass(frozen=True)
class DiscoveredGpu:
    index: int
    pci_device_id: int
    name: str
    mig_capable: bool
    profiles: Mapping[str, int] = field(default_factory=dict)  # version 1 only: max counts
    geometry: GpuGeometry | None = None
    uuid: str | None = None
    pci_subsystem_id: int | None = None
    memory_mib: int | None = None
    mig_table: MigTable | None = None

    def to_json(self, table_index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "pciDeviceId": format_pci_device_id(self.pci_device_id),
            "name": self.name,
            "migCapable": self.mig_capable,
        }
        if self.pci_subsystem_id is not None:
            out["pciSubsystemId"] = format_pci_device_id(self.pci_subsystem_id)
        if self.memory_mib is not None:
            out["memoryMiB"] = self.memory_mib
        if table_index is not None:
            out["migTable"] = table_index
        if self.uuid:
            out["uuid"] = self.uuid
        if self.geometry is not None:
            out["geometry"] = self.geometry.to_json()
        return out


@dataclass(frozen=True)
class NodeGpus:
    gpus: tuple[DiscoveredGpu, ...]
    reported_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        tables: list[MigTable] = []
        gpus = []
        for gpu in self.gpus:
            index = None
            if gpu.mig_table is not None:
                if gpu.mig_table not in tables:
                    tables.append(gpu.mig_table)
                index = tables.index(gpu.mig_table)
            gpus.append(gpu.to_json(index))
        body: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "migTables": [t.to_json() for t in tables],
            "gpus": gpus,
        }
        if self.reported_at:
            body["reportedAt"] = self.reported_at
        return body

    def to_annotation(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def from_annotation(text: str) -> NodeGpus:
        if len(text) > MAX_ANNOTATION_BYTES:
            raise HardwareReportError(f"hardware report is larger than {MAX_ANNOTATION_BYTES} bytes")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HardwareReportError(f"hardware report is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") not in READ_VERSIONS:
            raise HardwareReportError(
                f"hardware report: expected an object with version {' or '.join(map(str, READ_VERSIONS))}"
            )
        gpus = raw.get("gpus")
        if not isinstance(gpus, list):
            raise HardwareReportError("hardware report: gpus must be a list")
        tables: list[MigTable] = []
        if raw["version"] >= 2:
            raw_tables = raw.get("migTables", [])
            if not isinstance(raw_tables, list):
                raise HardwareReportError("hardware report: migTables must be a list")
            try:
                tables = [MigTable.from_json(t, f"migTables[{i}]") for i, t in enumerate(raw_tables)]
            except DriverTableError as exc:
                raise HardwareReportError(f"hardware report: {exc}") from exc
        parsed = tuple(_gpu(g, f"gpus[{i}]", tables) for i, g in enumerate(gpus))
        indexes = [g.index for g in parsed]
        if len(set(indexes)) != len(indexes):
            raise HardwareReportError("hardware report: GPU indexes repeat")
        reported_at = raw.get("reportedAt")
        return NodeGpus(
            tuple(sorted(parsed, key=lambda g: g.index)),
            reported_at if isinstance(reported_at, str) else None,
        )


def _gpu(raw: Any, where: str, tables: list[MigTable]) -> DiscoveredGpu:
    if not isinstance(raw, dict):
        raise HardwareReportError(f"hardware report: {where}: expected an object")
    try:
        index = raw["index"]
        if not isinstance(index, int) or index < 0:
            raise HardwareReportError(f"hardware report: {where}.index: expected a non-negative integer")
        name = raw["name"]
        capable = raw["migCapable"]
        if not isinstance(name, str) or not isinstance(capable, bool):
            raise HardwareReportError(
                f"hardware report: {where}: name must be a string, migCapable a boolean"
            )
        profiles_raw = raw.get("profiles", {})
        if not isinstance(profiles_raw, dict):
            raise HardwareReportError(f"hardware report: {where}.profiles: expected an object")
        profiles: dict[str, int] = {}
        for key, count in profiles_raw.items():
            if not isinstance(count, int) or count < 0:
                raise HardwareReportError(f"hardware report: {where}.profiles.{key}: expected a count")
            profiles[str(parse_profile(key))] = count
        table = raw.get("migTable")
        if table is not None and (not isinstance(table, int) or not 0 <= table < len(tables)):
            raise HardwareReportError(f"hardware report: {where}.migTable: expected an index into migTables")
        memory = raw.get("memoryMiB")
        if memory is not None and (not isinstance(memory, int) or memory <= 0):
            raise HardwareReportError(f"hardware report: {where}.memoryMiB: expected a positive integer")
        subsystem = raw.get("pciSubsystemId")
        geometry = raw.get("geometry")
        uuid = raw.get("uuid")
        return DiscoveredGpu(
            index=index,
            pci_device_id=parse_pci_device_id(raw["pciDeviceId"]),
            name=name,
            mig_capable=capable,
            profiles=profiles,
            geometry=None if geometry is None else GpuGeometry.from_json(geometry, f"{where}.geometry"),
            uuid=uuid if isinstance(uuid, str) else None,
            pci_subsystem_id=None if subsystem is None else parse_pci_device_id(subsystem),
            memory_mib=memory,
            mig_table=None if table is None else tables[table],
        )
    except KeyError as exc:
        raise HardwareReportError(f"hardware report: {where}: missing {exc.args[0]}") from exc
    except (ProfileError, ValueError) as exc:
        if isinstance(exc, HardwareReportError):
            raise
        raise HardwareReportError(f"hardware report: {where}: {exc}") from exc
