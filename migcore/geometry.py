"""The MIG layout of one GPU as placed instances: what placement produces, NVML reports,
the hardware annotation carries and the planner diffs.

Profiles are stored as canonical strings so a geometry is plain, hashable data that
serialises to JSON without the catalog.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from migcore.profiles import parse_profile


@dataclass(frozen=True, order=True)
class ComputeInstanceSpec:
    """A compute instance: its profile (e.g. `1c.3g.20gb`, or `3g.20gb` for a full one) and start."""

    profile: str
    start: int


def slot_mask(start: int, size: int) -> int:
    """The bit mask of `size` slots from `start` (placement-grid units for a GPU instance, compute
    slices for a compute instance): how every placement search tests for overlap."""
    return ((1 << size) - 1) << start


@dataclass(frozen=True, order=True)
class GpuInstanceSpec:
    """A GPU instance at `start` (placement-grid units), covering `size` units, with its CIs."""

    start: int
    size: int
    profile: str
    compute: tuple[ComputeInstanceSpec, ...] = ()

    def occupies(self) -> range:
        return range(self.start, self.start + self.size)

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "start": self.start,
            "size": self.size,
            "computeInstances": [{"profile": c.profile, "start": c.start} for c in self.compute],
        }

    @staticmethod
    def from_json(raw: Any, where: str = "gpuInstance") -> GpuInstanceSpec:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object")
        try:
            profile = str(parse_profile(raw["profile"]))
            start, size = raw["start"], raw["size"]
            cis = raw.get("computeInstances", [])
            if not (isinstance(start, int) and isinstance(size, int) and isinstance(cis, list)):
                raise TypeError("start/size must be integers, computeInstances a list")
            compute = tuple(
                sorted(ComputeInstanceSpec(str(parse_profile(c["profile"])), int(c["start"])) for c in cis)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        return GpuInstanceSpec(start, size, profile, compute)


@dataclass(frozen=True)
class GpuGeometry:
    """The whole layout of one GPU: MIG mode and its instances, sorted by start.

    `mig_pending` is the MIG mode the next GPU reset or host reboot would activate, when it differs
    from `mig_enabled` (None: nothing pending). NVML reports it; a layout one asks for never has one,
    so a GPU with a pending mode never matches a desired layout and the plan clears (or completes)
    it: left alone, it would silently change the mode at the next reboot.
    """

    mig_enabled: bool
    instances: tuple[GpuInstanceSpec, ...] = ()
    mig_pending: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(sorted(self.instances)))
        if self.mig_pending == self.mig_enabled:
            object.__setattr__(self, "mig_pending", None)

    def settled(self) -> GpuGeometry:
        """The same layout with no MIG mode pending."""
        return GpuGeometry(self.mig_enabled, self.instances)

    def device_counts(self) -> Counter[str]:
        """Counts per `mig-devices` key, the way mig-parted compares layouts (one per CI)."""
        counts: Counter[str] = Counter()
        for gi in self.instances:
            for ci in gi.compute:
                counts[ci.profile] += 1
        return counts

    def summary(self) -> str:
        if not self.mig_enabled:
            text = "MIG disabled"
        elif not self.instances:
            text = "MIG enabled, no instances"
        else:
            text = ", ".join(f"{gi.profile}@{gi.start}" for gi in self.instances)
        if self.mig_pending is not None:
            text += f" (MIG {'enabled' if self.mig_pending else 'disabled'} pending)"
        return text

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "migEnabled": self.mig_enabled,
            "gpuInstances": [gi.to_json() for gi in self.instances],
        }
        if self.mig_pending is not None:
            out["migPending"] = self.mig_pending
        return out

    @staticmethod
    def from_json(raw: Any, where: str = "geometry") -> GpuGeometry:
        if not isinstance(raw, dict) or not isinstance(raw.get("migEnabled"), bool):
            raise ValueError(f"{where}: expected an object with a boolean migEnabled")
        gis = raw.get("gpuInstances", [])
        if not isinstance(gis, list):
            raise ValueError(f"{where}.gpuInstances: expected a list")
        pending = raw.get("migPending")
        if pending is not None and not isinstance(pending, bool):
            raise ValueError(f"{where}.migPending: expected a boolean")
        return GpuGeometry(
            raw["migEnabled"],
            tuple(GpuInstanceSpec.from_json(g, f"{where}.gpuInstances[{i}]") for i, g in enumerate(gis)),
            pending,
        )
