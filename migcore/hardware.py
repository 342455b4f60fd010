"""The node-hardware report: the GPUs a reconciler discovered, as a node annotation.

The reconciler writes it (`mig-guard.io/gpus`), the webhook reads it to judge a layout
against what the driver actually offers instead of the `gpu.product` label alone. The wire
format is versioned JSON:

    {"version": 1, "reportedAt": "2026-11-28T14:00:00Z",
     "gpus": [{"index": 0, "pciDeviceId": "0x20B010DE", "name": "NVIDIA A100-SXM4-40GB",
               "uuid": "GPU-...", "migCapable": true,
               "profiles": {"1g.5gb": 7, "2g.10gb": 3, ...},     # max counts the driver reports
               "geometry": {"migEnabled": true, "gpuInstances": [...]}}]}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from migcore.catalog import format_pci_device_id, parse_pci_device_id
from migcore.geometry import GpuGeometry
from migcore.profiles import ProfileError, parse_profile

FORMAT_VERSION = 1
MAX_ANNOTATION_BYTES = 64 * 1024


class HardwareReportError(ValueError):
    """An annotation that is not a valid hardware report; the message says where."""


@dataclass(frozen=True)
class DiscoveredGpu:
    index: int
    pci_device_id: int
    name: str
    mig_capable: bool
    profiles: Mapping[str, int] = field(default_factory=dict)
    geometry: GpuGeometry | None = None
    uuid: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "pciDeviceId": format_pci_device_id(self.pci_device_id),
            "name": self.name,
            "migCapable": self.mig_capable,
            "profiles": dict(self.profiles),
        }
        if self.uuid:
            out["uuid"] = self.uuid
        if self.geometry is not None:
            out["geometry"] = self.geometry.to_json()
        return out


@dataclass(frozen=True)
class NodeGpus:
    gpus: tuple[DiscoveredGpu, ...]
    reported_at: str | None = None

    def to_annotation(self) -> str:
        body: dict[str, Any] = {"version": FORMAT_VERSION, "gpus": [g.to_json() for g in self.gpus]}
        if self.reported_at:
            body["reportedAt"] = self.reported_at
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @staticmethod
    def from_annotation(text: str) -> NodeGpus:
        if len(text) > MAX_ANNOTATION_BYTES:
            raise HardwareReportError(f"hardware report is larger than {MAX_ANNOTATION_BYTES} bytes")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HardwareReportError(f"hardware report is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise HardwareReportError(f"hardware report: expected an object with version {FORMAT_VERSION}")
        gpus = raw.get("gpus")
        if not isinstance(gpus, list):
            raise HardwareReportError("hardware report: gpus must be a list")
        parsed = tuple(_gpu(g, f"gpus[{i}]") for i, g in enumerate(gpus))
        indexes = [g.index for g in parsed]
        if len(set(indexes)) != len(indexes):
            raise HardwareReportError("hardware report: GPU indexes repeat")
        reported_at = raw.get("reportedAt")
        return NodeGpus(
            tuple(sorted(parsed, key=lambda g: g.index)),
            reported_at if isinstance(reported_at, str) else None,
        )


def _gpu(raw: Any, where: str) -> DiscoveredGpu:
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
        )
    except KeyError as exc:
        raise HardwareReportError(f"hardware report: {where}: missing {exc.args[0]}") from exc
    except (ProfileError, ValueError) as exc:
        if isinstance(exc, HardwareReportError):
            raise
        raise HardwareReportError(f"hardware report: {where}: {exc}") from exc
