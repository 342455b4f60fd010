"""The MIG hardware catalog: what each GPU product can be partitioned into.

The data lives in `migcore/data/catalog.yaml` (generated from the research table by
`tools/build_catalog.py`); this module gives it types and lookups. A product is found by
its GPU Feature Discovery label (`nvidia.com/gpu.product`, any spelling), its PCI device id
or its NVML name. Values the research could not confirm stay marked (`unconfirmed`) so a
caller can soften a verdict that rests on them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from importlib import resources
from typing import Any

import yaml

from migcore.profiles import MigProfile, ProfileError, parse_profile

NVIDIA_VENDOR_ID = 0x10DE
_GFD_UNSAFE = re.compile(r"[^A-Za-z0-9_. -]")


class UnknownProductError(LookupError):
    """No catalog product matches a label, PCI id or NVML name."""

    def __init__(self, what: str, value: str, known: Iterable[str] = ()) -> None:
        self.value = value
        hint = ""
        known = sorted(known)
        if known:
            hint = f" (known products: {', '.join(known)})"
        super().__init__(f'unknown GPU product: no catalog entry for {what} "{value}"{hint}')


class ProfileNotOnProductError(LookupError):
    """A well-formed profile that this product does not offer."""


@dataclass(frozen=True, eq=False)
class ComputeProfile:
    """A compute-instance profile offered inside one GPU instance."""

    name: MigProfile
    slices: int
    nvml_ci_profile_const: str
    nvml_ci_profile_id: int
    max_count: int
    unconfirmed: Mapping[str, str] = field(default_factory=dict)
    starts: tuple[int, ...] | None = None  # the driver's own placements, when it reported them

    def placements(self, gi_slices: int) -> tuple[int, ...]:
        """Start slices of this CI inside a `gi_slices` GI.

        The driver's placements when known; otherwise NVML's alignment of compute instances to
        the next power of two of their size (a 3c CI in a 7g GI starts at 0 or 4), which
        reproduces the published CI counts per GI.
        """
        if self.starts is not None:
            return self.starts
        return aligned_compute_starts(self.slices, gi_slices)


def aligned_compute_starts(ci_slices: int, gi_slices: int) -> tuple[int, ...]:
    """Where NVML places a `ci_slices` compute instance in a `gi_slices` GPU instance on every
    GPU the catalog knows: aligned to the next power of two of its size."""
    step = 1 << (ci_slices - 1).bit_length()
    return tuple(range(0, gi_slices - ci_slices + 1, step))


@dataclass(frozen=True, eq=False)
class GpuInstanceProfile:
    """A GPU-instance profile of one product, with where it may sit on the placement grid."""

    name: MigProfile
    aliases: tuple[MigProfile, ...]
    nvml_profile_const: str
    nvml_profile_id: int
    smi_profile_id: int | None
    slices: int
    memory_fraction: Fraction | None
    memory_mib: int | None
    max_count: int
    placement_size: int
    placements: tuple[int, ...]
    compute_profiles: tuple[ComputeProfile, ...]
    unconfirmed: Mapping[str, str] = field(default_factory=dict)

    def compute_profile(self, compute_slices: int) -> ComputeProfile | None:
        for ci in self.compute_profiles:
            if ci.slices == compute_slices:
                return ci
        return None

    @property
    def placements_confirmed(self) -> bool:
        return "placements" not in self.unconfirmed and "placement_size" not in self.unconfirmed


@dataclass(frozen=True, eq=False)
class Product:
    """One GPU product (possibly several boards with the same MIG geometry).

    Compared by identity: products are singletons of a loaded catalog, and identity hashing
    lets placement results be cached per product.
    """

    key: str
    marketing_name: str
    nvml_names: tuple[str, ...]
    gfd_labels: tuple[str, ...]
    pci_device_ids: tuple[int, ...]
    memory_mib: int | None
    compute_slices: int
    memory_slices: int
    placement_grid: int
    max_instances: int
    profiles: tuple[GpuInstanceProfile, ...]
    notes: tuple[str, ...] = ()
    unconfirmed: Mapping[str, str] = field(default_factory=dict)
    architecture: str | None = None  # e.g. "Ampere (GA100, CC 8.0)"

    @cached_property
    def _by_name(self) -> dict[MigProfile, GpuInstanceProfile]:
        table: dict[MigProfile, GpuInstanceProfile] = {}
        for profile in self.profiles:
            table[profile.name] = profile
            for alias in profile.aliases:
                table.setdefault(alias, profile)
        return table

    def gpu_instance_profile(self, profile: MigProfile | str) -> GpuInstanceProfile | None:
        """The GI profile a (GI or CI) profile names on this product, through aliases."""
        parsed = parse_profile(profile) if isinstance(profile, str) else profile
        return self._by_name.get(parsed.gpu_instance)

    def resolve(self, profile: MigProfile | str) -> tuple[GpuInstanceProfile, ComputeProfile]:
        """The GI profile and the CI profile a profile string means on this product."""
        parsed = parse_profile(profile) if isinstance(profile, str) else profile
        gi = self._by_name.get(parsed.gpu_instance)
        if gi is None:
            raise ProfileNotOnProductError(
                f'profile "{parsed}" does not exist on {self.key}; it has {self.profile_names_text()}'
            )
        ci = gi.compute_profile(parsed.compute_slices)
        if ci is None:
            offered = ", ".join(str(c.name) for c in gi.compute_profiles)
            raise ProfileNotOnProductError(
                f'compute profile "{parsed}" does not exist in a {gi.name} GPU instance on {self.key};'
                f" it offers {offered}"
            )
        return gi, ci

    def profile_names_text(self) -> str:
        return ", ".join(str(p.name) for p in self.profiles)

    def profile_by_nvml_id(self, nvml_profile_id: int) -> GpuInstanceProfile | None:
        for profile in self.profiles:
            if profile.nvml_profile_id == nvml_profile_id:
                return profile
        return None

    @property
    def placements_confirmed(self) -> bool:
        return "placement_grid" not in self.unconfirmed and all(p.placements_confirmed for p in self.profiles)


def sanitise_product_name(name: str) -> str:
    """GPU Feature Discovery's label value for an NVML device name (spaces become '-')."""
    return _GFD_UNSAFE.sub("", name.strip()).replace(" ", "-")


def normalise_product_label(label: str) -> str:
    """Reduce any spelling of `nvidia.com/gpu.product` to a lookup key.

    GFD writes `NVIDIA-A100-SXM4-40GB`, old drivers `A100-SXM4-40GB`; the MIG `single`
    strategy appends `-MIG-<profile>` or `-MIG-INVALID`, and time-slicing `-SHARED`.
    """
    value = label.strip()
    value = value.removesuffix("-SHARED")
    mig = value.find("-MIG-")
    if mig > 0:
        value = value[:mig]
    if value[:7].upper() == "NVIDIA-":
        value = value[7:]
    return value.casefold()


def parse_pci_device_id(value: str | int) -> int:
    """`0x20B010DE` (device << 16 | vendor) as NVML reports it; a bare `0x20B0` means NVIDIA's."""
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        if not re.fullmatch(r"0[xX][0-9A-Fa-f]{1,8}", text):
            raise ValueError(f'"{value}" is not a PCI device id like "0x20B010DE"')
        number = int(text, 16)
    if number <= 0xFFFF:
        number = (number << 16) | NVIDIA_VENDOR_ID
    return number


def format_pci_device_id(value: int) -> str:
    return f"0x{value:08X}"


class Catalog:
    """All products, with the lookups the webhook and the reconciler need."""

    def __init__(self, products: Iterable[Product], nvml_gi_constants: Mapping[str, int]) -> None:
        self.products: dict[str, Product] = {p.key: p for p in products}
        self.nvml_gi_constants = dict(nvml_gi_constants)
        self._by_label: dict[str, Product] = {}
        self._by_pci: dict[int, Product] = {}
        for product in self.products.values():
            spellings = [*product.gfd_labels, *(sanitise_product_name(n) for n in product.nvml_names)]
            for spelling in spellings:
                self._claim(self._by_label, normalise_product_label(spelling), product, "label")
            for pci in product.pci_device_ids:
                self._claim(self._by_pci, pci, product, "PCI id")

    @staticmethod
    def _claim(table: dict[Any, Product], key: Any, product: Product, what: str) -> None:
        other = table.get(key)
        if other is not None and other.key != product.key:
            raise ValueError(f"catalog: {what} {key!r} belongs to both {other.key} and {product.key}")
        table[key] = product

    def by_label(self, label: str) -> Product:
        product = self._by_label.get(normalise_product_label(label))
        if product is None:
            raise UnknownProductError("nvidia.com/gpu.product", label, self.products)
        return product

    def by_pci_id(self, pci_device_id: str | int) -> Product:
        number = parse_pci_device_id(pci_device_id)
        product = self._by_pci.get(number)
        if product is None:
            raise UnknownProductError("PCI device id", format_pci_device_id(number), self.products)
        return product

    def by_nvml_name(self, name: str) -> Product:
        product = self._by_label.get(normalise_product_label(sanitise_product_name(name)))
        if product is None:
            raise UnknownProductError("NVML name", name, self.products)
        return product

    def find(self, text: str) -> Product:
        """Look up by catalog key, GFD label, NVML name or PCI id, whichever `text` is."""
        if text in self.products:
            return self.products[text]
        if text.lower().startswith("0x"):
            return self.by_pci_id(text)
        try:
            return self.by_label(text)
        except UnknownProductError:
            return self.by_nvml_name(text)

    def products_with_profile(self, profile: MigProfile) -> list[Product]:
        """Products that offer this (GI or CI) profile, aliases included."""
        found = []
        for product in self.products.values():
            gi = product.gpu_instance_profile(profile)
            if gi is not None and gi.compute_profile(profile.compute_slices) is not None:
                found.append(product)
        return found


def _fraction(text: str | None) -> Fraction | None:
    if not text:
        return None
    num, _, den = text.partition("/")
    return Fraction(int(num), int(den))


def _compute_profile(raw: Mapping[str, Any]) -> ComputeProfile:
    return ComputeProfile(
        name=parse_profile(raw["name"]),
        slices=int(raw["slices"]),
        nvml_ci_profile_const=raw["nvml_ci_profile_const"],
        nvml_ci_profile_id=int(raw["nvml_ci_profile_id"]),
        max_count=int(raw["max_count"]),
        unconfirmed=dict(raw.get("unconfirmed") or {}),
    )


def _gpu_instance_profile(raw: Mapping[str, Any], grid: int) -> GpuInstanceProfile:
    unconfirmed = dict(raw.get("unconfirmed") or {})
    fraction = _fraction(raw.get("memory_fraction"))
    size, placements = raw.get("placement_size"), raw.get("placements")
    if size is None or placements is None:
        # No -lgipp output was found: assume aligned placements on a grid of memory slices.
        assert fraction is not None, f"{raw['name']}: needs memory_fraction to derive placements"
        size = int(fraction * grid)
        placements = list(range(0, grid - size + 1, size))
        unconfirmed.setdefault("placements", "derived: aligned on the memory-slice grid")
    return GpuInstanceProfile(
        name=parse_profile(raw["name"]),
        aliases=tuple(parse_profile(a) for a in raw.get("aliases") or ()),
        nvml_profile_const=raw["nvml_profile_const"],
        nvml_profile_id=int(raw["nvml_profile_id"]),
        smi_profile_id=raw.get("smi_profile_id"),
        slices=int(raw["slices"]),
        memory_fraction=fraction,
        memory_mib=raw.get("memory_mib"),
        max_count=int(raw["max_count"]),
        placement_size=int(size),
        placements=tuple(int(p) for p in placements),
        compute_profiles=tuple(_compute_profile(c) for c in raw.get("compute_profiles") or ()),
        unconfirmed=unconfirmed,
    )


def _product(key: str, raw: Mapping[str, Any]) -> Product:
    unconfirmed = dict(raw.get("unconfirmed") or {})
    grid = raw.get("placement_grid")
    if grid is None:
        grid = int(raw["memory_slices"])
        unconfirmed.setdefault("placement_grid", "derived: memory slices")
    return Product(
        key=key,
        marketing_name=raw["marketing_name"],
        nvml_names=tuple(raw.get("nvml_names") or ()),
        gfd_labels=tuple(raw.get("gfd_labels") or ()),
        pci_device_ids=tuple(parse_pci_device_id(p) for p in raw.get("pci_device_ids") or ()),
        memory_mib=raw.get("memory_mib"),
        compute_slices=int(raw["compute_slices"]),
        memory_slices=int(raw["memory_slices"]),
        placement_grid=int(grid),
        max_instances=int(raw["max_instances"]),
        profiles=tuple(_gpu_instance_profile(p, int(grid)) for p in raw["profiles"]),
        notes=tuple(raw.get("notes") or ()),
        unconfirmed=unconfirmed,
        architecture=raw.get("architecture"),
    )


def catalog_from_data(data: Mapping[str, Any]) -> Catalog:
    if data.get("schema_version") != 1:
        raise ValueError(f"catalog: unsupported schema_version {data.get('schema_version')!r}")
    try:
        products = [_product(key, raw) for key, raw in data["products"].items()]
    except (KeyError, TypeError, ProfileError) as exc:
        raise ValueError(f"catalog: malformed data: {exc}") from exc
    return Catalog(products, data["nvml"]["gpu_instance_profile_constants"])


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The catalog shipped in the package (parsed once per process)."""
    text = resources.files("migcore").joinpath("data/catalog.yaml").read_text(encoding="utf-8")
    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return catalog_from_data(yaml.load(text, Loader=loader))  # noqa: S506 - a safe loader (libyaml when present)
