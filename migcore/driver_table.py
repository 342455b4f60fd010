"""The driver's MIG table: what NVML says one GPU model can be partitioned into.

The reconciler reads it through NVML (every GPU-instance profile with its max count and possible
placements, and the compute-instance profiles inside each GPU-instance profile it has seen an
instance of: NVML answers those only through an instance) and publishes it in the hardware
report. Wherever a report carries it, the check judges from it: exact for a GPU no catalog
knows, and it wins over the catalog where the two disagree (`compare` lists where; that shows a
catalog error or a new driver).

Profile names are computed as go-nvlib computes them, because mig-parted configs, GPU Feature
Discovery and the device plugin all use that name: the slice count, the memory rounded up to an
eighth of the GPU's, and the attribute of the NVML profile constant. The driver's own name (what
nvidia-smi prints) is kept beside it when it differs.

Wire format (a report's `migTables` item, also a simulated GPU's model, see reconciler.nvml_sim):

    {"gpuInstanceProfiles": [
        {"name": "3g.20gb", "profileId": 2, "id": 9, "slices": 3, "memoryMiB": 19968, "maxCount": 2,
         "placements": [{"start": 0, "size": 4}, {"start": 4, "size": 4}],
         "computeProfiles": [{"name": "1c.3g.20gb", "profileId": 0, "id": 0, "slices": 1,
                              "maxCount": 3, "placements": [0, 1, 2]}, ...]}, ...]}

`computeProfiles` is absent for a GPU-instance profile whose compute profiles were not read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any

from migcore.catalog import ComputeProfile, GpuInstanceProfile, Product
from migcore.profiles import (
    ATTR_GRAPHICS,
    ATTR_MEDIA,
    ATTR_MEDIA_ALL,
    MigProfile,
    ProfileError,
    parse_profile,
)

# NVML_GPU_INSTANCE_PROFILE_* constant -> (attributes, negative), as go-nvlib names them.
_ATTRIBUTES: dict[int, tuple[tuple[str, ...], bool]] = {
    7: ((ATTR_MEDIA,), False),  # 1_SLICE_REV1
    8: ((ATTR_MEDIA,), False),  # 2_SLICE_REV1
    10: ((ATTR_GRAPHICS,), False),  # 1_SLICE_GFX
    11: ((ATTR_GRAPHICS,), False),
    12: ((ATTR_GRAPHICS,), False),
    13: ((ATTR_MEDIA,), True),  # 1_SLICE_NO_ME
    14: ((ATTR_MEDIA,), True),
    15: ((ATTR_MEDIA_ALL,), False),  # 1_SLICE_ALL_ME
    16: ((ATTR_MEDIA_ALL,), False),
    17: ((ATTR_GRAPHICS,), False),  # 3_SLICE_GFX
}
# NVML_COMPUTE_INSTANCE_PROFILE_* constant for a compute-slice count (the plain ones).
COMPUTE_PROFILE_CONSTANTS: dict[int, int] = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}
NOT_READ = "not read from the driver (NVML reports compute profiles only through an existing instance)"


class DriverTableError(ValueError):
    """A driver table that cannot be used; the message names the place."""


def memory_gb(memory_mib: int, total_mib: int) -> int:
    """The GB in a profile name, as go-nvlib computes it: the share of the GPU's memory rounded
    up to an eighth, times the GPU's memory in whole GiB, rounded half away from zero (Go)."""
    fraction = math.ceil(memory_mib / total_mib * 8) / 8
    return math.floor(fraction * math.ceil(total_mib / 1024) + 0.5)


def gpu_instance_profile_name(profile_id: int, slices: int, memory_mib: int, total_mib: int) -> MigProfile:
    """The name go-nvlib gives NVML GPU-instance profile `profile_id` (`3g.20gb`, `1g.10gb+me`)."""
    attributes, negative = _ATTRIBUTES.get(profile_id, ((), False))
    return MigProfile(slices, memory_gb(memory_mib, total_mib), slices, attributes, negative)


@dataclass(frozen=True)
class ComputeProfileEntry:
    """A compute-instance profile the driver offers inside one GPU-instance profile."""

    name: MigProfile
    profile_id: int  # NVML_COMPUTE_INSTANCE_PROFILE_* constant
    id: int  # the driver's profile id (what create/list calls take)
    slices: int
    max_count: int
    placements: tuple[int, ...]  # start slices inside the GPU instance

    def to_json(self) -> dict[str, Any]:
        return {
            "name": str(self.name),
            "profileId": self.profile_id,
            "id": self.id,
            "slices": self.slices,
            "maxCount": self.max_count,
            "placements": list(self.placements),
        }


@dataclass(frozen=True)
class GpuInstanceProfileEntry:
    """A GPU-instance profile as the driver reports it."""

    name: MigProfile
    profile_id: int  # NVML_GPU_INSTANCE_PROFILE_* constant
    id: int  # the driver's profile id (nvidia-smi's "ID" column)
    slices: int
    memory_mib: int
    max_count: int
    placements: tuple[int, ...]  # start, in memory slices
    placement_size: int
    compute_profiles: tuple[ComputeProfileEntry, ...] | None = None  # None: not read
    driver_name: MigProfile | None = None  # the driver's own name, where it differs

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": str(self.name),
            "profileId": self.profile_id,
            "id": self.id,
            "slices": self.slices,
            "memoryMiB": self.memory_mib,
            "maxCount": self.max_count,
            "placements": [{"start": s, "size": self.placement_size} for s in self.placements],
        }
        if self.driver_name is not None:
            out["driverName"] = str(self.driver_name)
        if self.compute_profiles is not None:
            out["computeProfiles"] = [c.to_json() for c in self.compute_profiles]
        return out


@dataclass(frozen=True, eq=False)
class MigTable:
    """Every GPU-instance profile of one GPU model. Equal (and hashed) by content."""

    profiles: tuple[GpuInstanceProfileEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"gpuInstanceProfiles": [p.to_json() for p in self.profiles]}

    @cached_property
    def digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MigTable) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def profile(self, profile_id: int) -> GpuInstanceProfileEntry | None:
        return next((p for p in self.profiles if p.profile_id == profile_id), None)

    def with_compute_profiles_of(self, other: MigTable) -> MigTable:
        """This table, its unread compute profiles filled in from `other` (the same GPU model)."""
        merged = []
        for entry in self.profiles:
            known = other.profile(entry.profile_id)
            if entry.compute_profiles is None and known is not None and known.compute_profiles is not None:
                merged.append(replace(entry, compute_profiles=known.compute_profiles))
            else:
                merged.append(entry)
        return MigTable(tuple(merged))

    @staticmethod
    def from_json(raw: Any, where: str = "migTable") -> MigTable:
        if not isinstance(raw, dict) or not isinstance(raw.get("gpuInstanceProfiles"), list):
            raise DriverTableError(f"{where}: expected an object with a gpuInstanceProfiles list")
        profiles = tuple(
            _gi_entry(p, f"{where}.gpuInstanceProfiles[{i}]")
            for i, p in enumerate(raw["gpuInstanceProfiles"])
        )
        ids = [p.profile_id for p in profiles]
        if len(set(ids)) != len(ids):
            raise DriverTableError(f"{where}: a profileId repeats")
        return MigTable(profiles)


def _int(raw: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DriverTableError(f"{where}.{key}: expected an integer >= {minimum}")
    return value


def _name(raw: dict[str, Any], key: str, where: str) -> MigProfile:
    try:
        return parse_profile(raw[key])
    except (KeyError, ProfileError, TypeError) as exc:
        raise DriverTableError(f"{where}.{key}: expected a MIG profile name ({exc})") from exc


def _ci_entry(raw: Any, where: str, gi_slices: int) -> ComputeProfileEntry:
    if not isinstance(raw, dict):
        raise DriverTableError(f"{where}: expected an object")
    slices = _int(raw, "slices", where, 1)
    starts = raw.get("placements")
    if not isinstance(starts, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= gi_slices - slices for s in starts
    ):
        raise DriverTableError(f"{where}.placements: expected start slices inside the GPU instance")
    return ComputeProfileEntry(
        _name(raw, "name", where),
        _int(raw, "profileId", where),
        _int(raw, "id", where),
        slices,
        _int(raw, "maxCount", where),
        tuple(sorted(set(starts))),
    )


def _gi_entry(raw: Any, where: str) -> GpuInstanceProfileEntry:
    if not isinstance(raw, dict):
        raise DriverTableError(f"{where}: expected an object")
    placements = raw.get("placements")
    if not isinstance(placements, list) or not placements:
        raise DriverTableError(f"{where}.placements: expected a non-empty list of {{start, size}}")
    spots = [
        (_int(p, "start", f"{where}.placements[{i}]"), _int(p, "size", f"{where}.placements[{i}]", 1))
        if isinstance(p, dict)
        else (-1, -1)
        for i, p in enumerate(placements)
    ]
    sizes = {size for _, size in spots}
    if (-1, -1) in spots or len(sizes) != 1:
        raise DriverTableError(f"{where}.placements: expected {{start, size}} objects of one size")
    slices = _int(raw, "slices", where, 1)
    computes = raw.get("computeProfiles")
    if computes is not None and not isinstance(computes, list):
        raise DriverTableError(f"{where}.computeProfiles: expected a list")
    driver_name = _name(raw, "driverName", where) if "driverName" in raw else None
    return GpuInstanceProfileEntry(
        name=_name(raw, "name", where),
        profile_id=_int(raw, "profileId", where),
        id=_int(raw, "id", where),
        slices=slices,
        memory_mib=_int(raw, "memoryMiB", where),
        max_count=_int(raw, "maxCount", where),
        placements=tuple(sorted({start for start, _ in spots})),
        placement_size=sizes.pop(),
        compute_profiles=None
        if computes is None
        else tuple(_ci_entry(c, f"{where}.computeProfiles[{i}]", slices) for i, c in enumerate(computes)),
        driver_name=driver_name,
    )


# --- the table as a Product: placement, the check and the simulator all read it that way --------


def _compute_profiles(
    entry: GpuInstanceProfileEntry, fallback: GpuInstanceProfile | None
) -> tuple[ComputeProfile, ...]:
    if entry.compute_profiles is not None:
        return tuple(
            ComputeProfile(
                name=c.name,
                slices=c.slices,
                nvml_ci_profile_const=f"compute profile {c.profile_id}",
                nvml_ci_profile_id=c.profile_id,
                max_count=c.max_count,
                starts=c.placements,
            )
            for c in entry.compute_profiles
        )
    if fallback is not None:
        return fallback.compute_profiles
    # go-nvlib's rule for compute profiles it cannot read (`VisitMigProfiles`): every C up to G
    # but those with C < G and 2C > G + 1; NVML's alignment; as many as fit.
    g = entry.slices
    return tuple(
        ComputeProfile(
            name=entry.name.with_compute_slices(c),
            slices=c,
            nvml_ci_profile_const=f"compute profile {COMPUTE_PROFILE_CONSTANTS[c]}",
            nvml_ci_profile_id=COMPUTE_PROFILE_CONSTANTS[c],
            max_count=g // c,
            unconfirmed={"compute_profiles": NOT_READ},
        )
        for c in range(1, g + 1)
        if c in COMPUTE_PROFILE_CONSTANTS and not (c < g and 2 * c > g + 1)
    )


@lru_cache(maxsize=256)
def table_product(
    table: MigTable, name: str, pci_device_id: int, memory_mib: int | None, fallback: Product | None
) -> Product:
    """The table as a catalog Product (one object per distinct input, so placements memoised per
    product are shared by identical GPUs). `fallback`: the catalog's product for this GPU, whose
    compute profiles stand in where the table has none."""
    profiles = tuple(
        GpuInstanceProfile(
            name=entry.name,
            aliases=() if entry.driver_name is None else (entry.driver_name,),
            nvml_profile_const=f"profile {entry.profile_id}",
            nvml_profile_id=entry.profile_id,
            smi_profile_id=entry.id,
            slices=entry.slices,
            memory_fraction=None,
            memory_mib=entry.memory_mib,
            max_count=entry.max_count,
            placement_size=entry.placement_size,
            placements=entry.placements,
            compute_profiles=_compute_profiles(
                entry, None if fallback is None else fallback.gpu_instance_profile(entry.name)
            ),
        )
        for entry in table.profiles
    )
    grid = max((p.placements[-1] + p.placement_size for p in profiles), default=0)
    return Product(
        key=f"{name} (driver table)",
        marketing_name=name,
        nvml_names=(name,),
        gfd_labels=(),
        pci_device_ids=(pci_device_id,),
        memory_mib=memory_mib,
        compute_slices=max((p.slices for p in profiles), default=0),
        memory_slices=grid,
        placement_grid=grid,
        max_instances=max((p.max_count for p in profiles), default=0),
        profiles=profiles,
    )


def catalog_table(product: Product) -> MigTable:
    """`product`'s table as a driver that agrees with the catalog would report it (compute
    profiles included): for tests and benchmarks of judging from a table."""
    if product.memory_mib is None:
        raise ValueError(f"{product.key}: the catalog has no memory size to name its profiles by")
    entries = []
    for gi in product.profiles:
        memory = gi.memory_mib or int((gi.memory_fraction or 0) * product.memory_mib)
        name = gpu_instance_profile_name(gi.nvml_profile_id, gi.slices, memory, product.memory_mib)
        computes = tuple(
            ComputeProfileEntry(
                name.with_compute_slices(ci.slices),
                ci.nvml_ci_profile_id,
                ci.nvml_ci_profile_id,
                ci.slices,
                ci.max_count,
                ci.placements(gi.slices),
            )
            for ci in gi.compute_profiles
        )
        entries.append(
            GpuInstanceProfileEntry(
                name,
                gi.nvml_profile_id,
                gi.smi_profile_id or 0,
                gi.slices,
                memory,
                gi.max_count,
                gi.placements,
                gi.placement_size,
                computes,
            )
        )
    return MigTable(tuple(entries))


def unread_compute_profiles(table: MigTable, gi_name: MigProfile) -> bool:
    """True when the driver's compute profiles of this GPU-instance profile were not read."""
    entry = next((p for p in table.profiles if gi_name in (p.name, p.driver_name)), None)
    return entry is not None and entry.compute_profiles is None


@lru_cache(maxsize=256)
def compare(table: MigTable, product: Product) -> tuple[str, ...]:
    """Where the driver's table and the catalog's `product` disagree, one sentence each
    (empty when they agree on every profile, max count and placement both report)."""
    found: list[str] = []
    cat = {p.nvml_profile_id: p for p in product.profiles}
    for entry in table.profiles:
        known = cat.pop(entry.profile_id, None)
        label = f"profile {entry.profile_id} ({entry.name})"
        if known is None:
            found.append(f"the driver offers {entry.name} (profile {entry.profile_id}); the catalog does not")
            continue
        names = {known.name, *known.aliases}
        if entry.name not in names:
            also = "" if entry.driver_name is None else f", nvidia-smi {entry.driver_name}"
            found.append(
                f"profile {entry.profile_id}: the driver names it {entry.name}{also}; the catalog {known.name}"
            )
        if entry.slices != known.slices:
            found.append(f"{label}: {entry.slices} slices; the catalog says {known.slices}")
        if entry.max_count != known.max_count:
            found.append(f"{label}: at most {entry.max_count}; the catalog says {known.max_count}")
        if (entry.placements, entry.placement_size) != (known.placements, known.placement_size):
            found.append(
                f"{label}: placements {_spots(entry.placements, entry.placement_size)};"
                f" the catalog says {_spots(known.placements, known.placement_size)}"
            )
        for ci in entry.compute_profiles or ():
            cat_ci = next((c for c in known.compute_profiles if c.slices == ci.slices), None)
            if cat_ci is None:
                found.append(f"{label}: the driver offers compute profile {ci.name}; the catalog does not")
                continue
            if ci.max_count != cat_ci.max_count:
                found.append(
                    f"{label}: {ci.name} at most {ci.max_count}; the catalog says {cat_ci.max_count}"
                )
            if ci.placements != cat_ci.placements(known.slices):
                found.append(
                    f"{label}: {ci.name} starts at {_starts(ci.placements)};"
                    f" the catalog says {_starts(cat_ci.placements(known.slices))}"
                )
        if entry.compute_profiles is not None:
            read = {c.slices for c in entry.compute_profiles}
            for cat_ci in known.compute_profiles:
                if cat_ci.slices not in read:
                    found.append(
                        f"{label}: the catalog has compute profile {known.name.with_compute_slices(cat_ci.slices)}; the driver does not"
                    )
    for known in cat.values():
        found.append(
            f"the catalog has {known.name} (profile {known.nvml_profile_id}); the driver does not offer it"
        )
    return tuple(found)


def _spots(starts: tuple[int, ...], size: int) -> str:
    return "{" + ",".join(str(s) for s in starts) + f"}}:{size}"


def _starts(starts: tuple[int, ...]) -> str:
    return "{" + ",".join(str(s) for s in starts) + "}"
