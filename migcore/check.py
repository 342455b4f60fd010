"""Checking a named mig-parted config against one node's GPUs.

This is the verdict the webhook gives at `kubectl label` time and `mig-guard check` prints:
which entries apply to each GPU (upstream semantics: `device-filter` and `devices` select,
the last applying entry wins), whether each applied layout exists on that product and fits
its placement grid, and, when the reconciler reported them, whether the driver offers the
profiles. Error messages are what an admin reads in `kubectl` output, so they name the
config, the GPUs (identical GPUs grouped), the profile and the reason.

Matching rule with only the `nvidia.com/gpu.product` label: the exact board id is unknown,
so a `device-filter` item matches when its device id is ANY of the catalog's PCI ids for the
product (products in the catalog group boards with identical MIG geometry, so any of them
gives the same verdict). A filter's subsystem part is matched exactly against a (version 2)
hardware report, as mig-parted matches it; from a label it cannot be verified and is assumed
to match, with a warning.

Where the report carries the driver's MIG table (migcore.driver_table), placement and fit are
decided from it: exactly for a GPU no catalog knows, and over the catalog where they disagree
(a warning says so). A GPU with neither gets no MIG instances: nothing could judge them.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from migcore import keys
from migcore.catalog import Catalog, Product, UnknownProductError, format_pci_device_id
from migcore.config import ConfigEntry, DeviceFilter, MigPartedConfig
from migcore.driver_table import MigTable, compare, table_product, unread_compute_profiles
from migcore.geometry import GpuGeometry
from migcore.hardware import DiscoveredGpu, NodeGpus
from migcore.memo import LruCache
from migcore.placement import fit
from migcore.profiles import MigProfile, ProfileError, parse_profile
from migcore.wording import gpus_text, names_text, shorten

SOURCE_LABELS = "labels"
SOURCE_REPORT = "report"
VALID_NAMES_SHOWN = 6
NAME_SHOWN_CHARS = 80
DEFAULT_ORIGIN = "the mig-parted config"
_MEMO_SIZE = 4096


@dataclass(frozen=True)
class GpuTarget:
    """One GPU as far as a check knows it (from labels: a product; from the report: ids too, and
    the driver's MIG table when the reconciler could read it)."""

    index: int
    product: Product | None
    name: str
    pci_device_id: int | None
    mig_capable: bool
    driver_profiles: Mapping[str, int] | None
    subsystem_id: int | None = None
    mig_table: MigTable | None = None
    table: Product | None = None  # the driver's table as a product: it judges when present
    disagreements: tuple[str, ...] = ()  # where the driver's table and the catalog disagree

    @property
    def judge(self) -> Product | None:
        """What placement and fit are decided from: the driver's table, else the catalog."""
        return self.table if self.table is not None else self.product

    def key(self) -> tuple[object, ...]:
        """Hashable identity of everything a verdict reads from this GPU."""
        profiles = None if self.driver_profiles is None else tuple(sorted(self.driver_profiles.items()))
        product = None if self.product is None else self.product.key
        table = None if self.mig_table is None else self.mig_table.digest
        return (
            self.index,
            product,
            self.name,
            self.pci_device_id,
            self.subsystem_id,
            self.mig_capable,
            profiles,
            table,
        )


@dataclass(frozen=True)
class NodeHardware:
    """The GPUs of a node. `product` is set when every GPU is the same catalog product.

    With the count unknown, `gpus` are the GPUs known to exist (one stands for them all when
    nothing is known) and `count_note` says why the count is unknown, when labels say something
    else than a GPU count (GPU Feature Discovery's single MIG strategy)."""

    product: Product | None
    gpus: tuple[GpuTarget, ...]
    gpu_count_known: bool
    source: str
    count_note: str = ""
    # The catalog the GPUs were looked up in (messages name its products).
    catalog: Catalog = field(kw_only=True, repr=False, compare=False)
    _key: tuple[object, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = (self.source, self.gpu_count_known, self.count_note, *(gpu.key() for gpu in self.gpus))
        object.__setattr__(self, "_key", key)

    def cache_key(self) -> tuple[object, ...]:
        """Everything a verdict depends on, hashable (computed once: checks are memoised on it)."""
        return self._key

    def describe(self) -> str:
        """The node's GPUs in words, for messages ("NVIDIA-A100-SXM4-40GB x8")."""
        if not self.gpus:
            return "a node without GPUs"
        names = list(dict.fromkeys(gpu.name for gpu in self.gpus))
        if self.count_note:
            return f"{', '.join(names)} ({self.count_note})"
        if not self.gpu_count_known:
            return f"{', '.join(names)} (GPU count unknown)"
        return f"{', '.join(names)} x{len(self.gpus)}"


def _single_strategy_profile(label: str) -> str | None:
    """`1g.5gb` for a `...-MIG-1g.5gb[-SHARED]` product label, `INVALID` for `-MIG-INVALID`,
    None for a label that names whole GPUs."""
    value = label.strip().removesuffix("-SHARED")
    mig = value.find("-MIG-")
    return value[mig + 5 :] if mig > 0 else None


def _per_gpu(product: Product, suffix: str) -> int | None:
    """At most how many MIG devices of the label's profile one GPU holds (None: unknown)."""
    for text in (
        suffix,
        *(suffix[: -len(a) - 1] + "+" + a for a in ("me.all", "me", "gfx") if suffix.endswith("." + a)),
    ):
        try:
            profile = parse_profile(text)
        except ProfileError:
            continue
        gi = product.gpu_instance_profile(profile)
        ci = None if gi is None else gi.compute_profile(profile.compute_slices)
        if gi is not None and ci is not None:
            return gi.max_count * (ci.max_count if profile.is_compute_profile else 1)
    return None


def hardware_from_labels(catalog: Catalog, product_label: str, gpu_count: int | None) -> NodeHardware:
    """Hardware as GPU Feature Discovery labels describe it (`gpu.product`, `gpu.count`).

    Raises UnknownProductError. Without a count the node is one representative GPU and
    `gpu_count_known` is False (device indexes then cannot be checked). Under GFD's single MIG
    strategy (`-MIG-<profile>`, `-MIG-INVALID`) `gpu.count` counts MIG devices, not GPUs: the
    GPUs are then known only as far as the count implies (at least count / max per GPU).
    """
    product = catalog.by_label(product_label)
    if gpu_count is not None and gpu_count < 0:
        raise ValueError(f"GPU count {gpu_count} is negative")
    name = product_label.strip()

    def gpus(n: int) -> tuple[GpuTarget, ...]:
        return tuple(GpuTarget(i, product, name, None, True, None) for i in range(n))

    suffix = _single_strategy_profile(product_label)
    if suffix is None:
        count = 1 if gpu_count is None else gpu_count
        return NodeHardware(product, gpus(count), gpu_count is not None, SOURCE_LABELS, catalog=catalog)
    strategy = "GPU Feature Discovery's single MIG strategy"
    if suffix == "INVALID" or not gpu_count:
        note = f"GPU count unknown: with {strategy} the labels do not count GPUs"
        return NodeHardware(product, gpus(1), False, SOURCE_LABELS, note, catalog=catalog)
    per_gpu = _per_gpu(product, suffix)
    least = 1 if per_gpu is None else -(-gpu_count // per_gpu)
    if least == gpu_count:  # e.g. one MIG device: exactly one GPU
        return NodeHardware(product, gpus(least), True, SOURCE_LABELS, catalog=catalog)
    most = "" if per_gpu is None else f", at most {per_gpu} per GPU"
    note = (
        f"at least {least} GPU{'s' if least > 1 else ''}: with {strategy} gpu.count counts the"
        f" {gpu_count} MIG devices of {suffix}{most}"
    )
    return NodeHardware(product, gpus(least), False, SOURCE_LABELS, note, catalog=catalog)


def _product_of(catalog: Catalog, pci_device_id: int, name: str) -> Product | None:
    try:
        return catalog.by_pci_id(pci_device_id)
    except UnknownProductError:
        pass
    try:
        return catalog.by_nvml_name(name)
    except UnknownProductError:
        return None


def _target(catalog: Catalog, gpu: DiscoveredGpu) -> GpuTarget:
    product = _product_of(catalog, gpu.pci_device_id, gpu.name)
    table = disagreements = None
    if gpu.mig_table is not None:
        table = table_product(gpu.mig_table, gpu.name, gpu.pci_device_id, gpu.memory_mib, product)
        disagreements = compare(gpu.mig_table, product) if product is not None else ()
    return GpuTarget(
        index=gpu.index,
        product=product,
        name=gpu.name,
        pci_device_id=gpu.pci_device_id,
        mig_capable=gpu.mig_capable,
        driver_profiles=dict(gpu.profiles) if gpu.profiles and gpu.mig_table is None else None,
        subsystem_id=gpu.pci_subsystem_id,
        mig_table=gpu.mig_table,
        table=table,
        disagreements=disagreements or (),
    )


def hardware_from_report(catalog: Catalog, report: NodeGpus) -> NodeHardware:
    """Hardware as the reconciler reported it: products by PCI id, falling back to the NVML name;
    the driver's MIG table, where reported, judges instead of the catalog."""
    gpus = tuple(_target(catalog, gpu) for gpu in report.gpus)
    products = {id(g.product): g.product for g in gpus}
    product = next(iter(products.values())) if len(products) == 1 else None
    return NodeHardware(product, gpus, True, SOURCE_REPORT, catalog=catalog)


@dataclass(frozen=True)
class GpuVerdict:
    """What the config does to one GPU: the entry that wins (None: untouched) and its layout."""

    index: int
    entry: str | None
    mig_enabled: bool | None
    geometry: GpuGeometry | None
    # What judged the layout (the driver's table, else the catalog product): where else it may go.
    judge: Product | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "entry": self.entry,
            "migEnabled": self.mig_enabled,
            "geometry": None if self.geometry is None else self.geometry.to_json(),
        }


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one config name for one node."""

    name: str
    valid: bool
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    gpus: tuple[GpuVerdict, ...]
    gpu_count_known: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "valid": self.valid,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "gpuCountKnown": self.gpu_count_known,
            "gpus": [gpu.to_json() for gpu in self.gpus],
        }

    def summary(self) -> str:
        """One line: the layouts per GPU group, or the first error."""
        if not self.valid:
            return self.errors[0] if self.errors else "invalid"
        groups: dict[str, list[int]] = {}
        for gpu in self.gpus:
            text = "untouched" if gpu.geometry is None else gpu.geometry.summary()
            groups.setdefault(text, []).append(gpu.index)
        everyone = len(groups) == 1
        return "; ".join(
            f"{_gpus(indexes, everyone and not self.gpu_count_known)}: {text}"
            for text, indexes in groups.items()
        )


def closest_names(name: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """Candidates most like `name` (typos, case, separators), best first; difflib-based."""
    pool = list(dict.fromkeys(candidates))
    folded: dict[str, list[str]] = {}
    for candidate in pool:
        folded.setdefault(_fold(candidate), []).append(candidate)
    target = _fold(name)
    found: list[str] = list(folded.get(target, ()))
    for match in difflib.get_close_matches(target, list(folded), n=limit + len(found), cutoff=0.6):
        found.extend(c for c in folded[match] if c not in found)
    return [c for c in found if c != name][:limit]


def _fold(text: str) -> str:
    return text.casefold().replace("_", "-").replace(" ", "-")


def _gpus(indexes: list[int], all_gpus: bool = False) -> str:
    return "every GPU" if all_gpus else gpus_text(indexes)


def _filter_applies(filters: tuple[DeviceFilter, ...], gpu: GpuTarget) -> bool:
    if not filters:
        return True
    if gpu.pci_device_id is not None:
        if gpu.subsystem_id is not None:  # the report has the board's ids: exact, as mig-parted
            return any(f.matches(gpu.pci_device_id, gpu.subsystem_id) for f in filters)
        return any(f.device_id == gpu.pci_device_id for f in filters)
    if gpu.product is None:
        return False
    return any(f.device_id in gpu.product.pci_device_ids for f in filters)


def _expand_unknown_count(config_entries: tuple[ConfigEntry, ...], hardware: NodeHardware) -> list[GpuTarget]:
    """Without a GPU count, stand in one GPU per listed index plus one for 'any other GPU'."""
    template = hardware.gpus[0]
    listed = sorted({i for entry in config_entries for i in entry.devices or ()})
    other = next(i for i in range(len(listed) + 1) if i not in listed)
    return [replace(template, index=i) for i in sorted({*listed, other})]


class _Report:
    """Per-GPU messages, grouped so that identical GPUs produce one line."""

    def __init__(self, name: str, gpus: list[GpuTarget], count_known: bool) -> None:
        self.name = name
        self.gpus = gpus
        self.count_known = count_known
        self._errors: dict[tuple[str, str], list[int]] = {}
        self._warnings: dict[tuple[str, str], list[int]] = {}
        self.plain_errors: list[str] = []
        self.plain_warnings: list[str] = []

    def error(self, gpu: GpuTarget, text: str) -> None:
        self._errors.setdefault((gpu.name, text), []).append(gpu.index)

    def warning(self, gpu: GpuTarget, text: str) -> None:
        self._warnings.setdefault((gpu.name, text), []).append(gpu.index)

    def _lines(self, grouped: dict[tuple[str, str], list[int]]) -> list[str]:
        lines = []
        for (gpu_name, text), indexes in grouped.items():
            everyone = not self.count_known and len(indexes) == len(self.gpus)
            lines.append(f'config "{self.name}" on {gpu_name} ({_gpus(indexes, everyone)}): {text}')
        return lines

    def errors(self) -> tuple[str, ...]:
        return (*self._lines(self._errors), *self.plain_errors)

    def warnings(self) -> tuple[str, ...]:
        return (*self._lines(self._warnings), *self.plain_warnings)


def _entry_label(entry: ConfigEntry) -> str:
    """`[3]` for `mig-configs.<name>[3]` (config names contain dots, so cut at the bracket)."""
    return entry.path[entry.path.rindex("[") :]


def _describe_requests(entry: ConfigEntry) -> str:
    return ", ".join(f"{p} x{c}" if c != 1 else str(p) for p, c in entry.mig_devices if c)


def _check_driver_profiles(gpu: GpuTarget, geometry: GpuGeometry) -> list[str]:
    """Requested GPU-instance profiles must be offered by the driver, within its max counts
    (a version-1 report: the driver's profile list without placements)."""
    offered = gpu.driver_profiles
    if offered is None:
        return []
    problems: list[str] = []
    wanted: Counter[str] = Counter(gi.profile for gi in geometry.instances)
    for profile, count in wanted.items():
        if not count:
            continue
        names = [profile]
        if gpu.product is not None:
            gi = gpu.product.gpu_instance_profile(profile)
            if gi is not None:
                names = [str(gi.name), *(str(a) for a in gi.aliases)]
        reported = next((n for n in names if n in offered), None)
        if reported is None:
            listing = ", ".join(sorted(offered)) or "none"
            problems.append(f"the driver does not offer {profile} (it offers {listing})")
        elif count > offered[reported]:
            problems.append(
                f"{profile} x{count} needs {count} GPU instances; the driver allows at most {offered[reported]}"
            )
    return problems


def _check_entry_on_gpu(report: _Report, gpu: GpuTarget, entry: ConfigEntry) -> GpuGeometry | None:
    """Judge one applied entry on one GPU; record problems, return the layout when it fits."""
    where = _entry_label(entry)
    if not entry.mig_enabled:
        return GpuGeometry(False)
    if not gpu.mig_capable:
        report.error(gpu, f"entry {where} enables MIG, but this GPU is not MIG-capable")
        return None
    product = gpu.judge
    if product is None:
        if not entry.requests():
            return GpuGeometry(True)  # MIG on, no instances: nothing to place
        ids = "" if gpu.pci_device_id is None else f", PCI id {format_pci_device_id(gpu.pci_device_id)}"
        report.error(
            gpu,
            f"{_describe_requests(entry)}: this GPU ({gpu.name}{ids}) is not in mig-guard's catalog and"
            " the node reports no driver MIG table for it, so nothing can judge where instances fit;"
            " refused rather than guessed (with MIG on, e.g. all-enabled, the reconciler reports the"
            " driver's table)",
        )
        return None
    missing = [p for p, c in entry.mig_devices if c and _resolves(product, p) is not None]
    if missing:
        for profile in missing:
            report.error(gpu, f"{profile} {_resolves(product, profile)}")
        return None
    requests = entry.requests()
    result = fit(product, requests)
    if not result.fits or result.geometry is None:
        # A single-profile request is named by the reason itself; a mix is named first.
        prefix = "" if len(requests) == 1 else f"{_describe_requests(entry)}: "
        report.error(gpu, f"{prefix}{result.reason}")
        return None
    for warning in result.warnings:
        report.warning(gpu, warning)
    for profile in requests:
        gi = product.gpu_instance_profile(profile)
        if gi is None:
            continue
        if gi.name != profile.gpu_instance:
            if gpu.table is not None:
                report.warning(
                    gpu,
                    f"{profile} is this driver's own name (nvidia-smi's) for {gi.name}; mig-parted and the"
                    f" device plugin call it {gi.name}",
                )
            else:
                report.warning(
                    gpu,
                    f"{profile} is another driver's name for {gi.name} on {product.key};"
                    " tools that match names (mig-parted, device plugin) see only one of them",
                )
        if (
            profile.is_compute_profile
            and gpu.mig_table is not None
            and unread_compute_profiles(gpu.mig_table, gi.name)
        ):
            source = "the catalog" if gpu.product is not None else "NVML's usual alignment"
            report.warning(
                gpu,
                f"{profile}: the driver's compute profiles of {gi.name} are not known yet (NVML reports"
                f" them only for an existing {gi.name} instance); judged by {source}",
            )
    for problem in _check_driver_profiles(gpu, result.geometry):
        report.error(gpu, f"{_describe_requests(entry)}: {problem}")
    return result.geometry


def _resolves(product: Product, profile: MigProfile) -> str | None:
    """None when `profile` exists on `product`, else why not (naming what does exist)."""
    gi = product.gpu_instance_profile(profile)
    if gi is None:
        return f"does not exist on {product.key}; it has {product.profile_names_text()}"
    if gi.compute_profile(profile.compute_slices) is None:
        offered = ", ".join(str(gi.name.with_compute_slices(c.slices)) for c in gi.compute_profiles)
        return f"does not exist on {product.key}: a {gi.name} instance offers {offered}"
    return None


def _check_uncached(config: MigPartedConfig, name: str, hardware: NodeHardware) -> CheckResult:
    entries = config.configs.get(name)
    if entries is None:
        return _unknown_name(config, name, hardware)
    known_only = hardware.gpu_count_known or bool(hardware.count_note)
    gpus = list(hardware.gpus) if known_only else _expand_unknown_count(entries, hardware)
    report = _Report(name, gpus, hardware.gpu_count_known)
    if hardware.count_note:
        # Labels that count something else than GPUs: an index past those known to exist may not
        # exist at all, and then the entry would silently do nothing there.
        for entry in entries:
            if entry.devices is None or not any(_filter_applies(entry.device_filters, g) for g in gpus):
                continue
            for i, index in enumerate(entry.devices):
                if index >= len(gpus):
                    report.plain_errors.append(
                        f'config "{name}": {entry.path}.devices[{i}]: GPU {index} may not exist on this'
                        f" node ({hardware.count_note})"
                    )
    if hardware.gpu_count_known:
        count = len(hardware.gpus)
        for entry in entries:
            if entry.devices is None or not any(_filter_applies(entry.device_filters, g) for g in gpus):
                continue
            for i, index in enumerate(entry.devices):
                if index >= count:
                    have = f"{count} GPU" if count == 1 else f"{count} GPUs"
                    report.plain_errors.append(
                        f'config "{name}": {entry.path}.devices[{i}]: GPU {index} does not exist;'
                        f" this node has {have}"
                    )
    subsystem_filters = sorted(
        {f.text for e in entries for f in e.device_filters if f.subsystem_id is not None}
    )
    verdicts: list[GpuVerdict] = []
    for gpu in gpus:
        applied = [
            e
            for e in entries
            if _filter_applies(e.device_filters, gpu) and (e.devices is None or gpu.index in e.devices)
        ]
        if not applied:
            verdicts.append(GpuVerdict(gpu.index, None, None, None))
            continue
        if len(applied) > 1:
            paths = ", ".join(_entry_label(e) for e in applied)
            report.warning(gpu, f"entries {paths} all apply; the last one wins, as in mig-parted")
        entry = applied[-1]
        if hardware.source == SOURCE_LABELS:
            _warn_partial_filter(report, gpu, entry)
        geometry = _check_entry_on_gpu(report, gpu, entry)
        if entry.mig_enabled and gpu.disagreements:
            more = len(gpu.disagreements) - 1
            report.warning(
                gpu,
                f"the driver's MIG table and mig-guard's catalog ({gpu.product.key if gpu.product else '?'})"
                f" disagree: {gpu.disagreements[0]}{f' (and {more} more)' if more else ''}; judged by the"
                " driver's table",
            )
        verdicts.append(GpuVerdict(gpu.index, entry.path, entry.mig_enabled, geometry, gpu.judge))
    unknown_subsystem = any(g.subsystem_id is None for g, v in zip(gpus, verdicts, strict=True) if v.entry)
    if subsystem_filters and unknown_subsystem:
        report.plain_warnings.append(
            f'config "{name}": the subsystem part of {", ".join(subsystem_filters)} cannot be checked'
            " here; assumed to match"
        )
    untouched = [v.index for v in verdicts if v.entry is None]
    if len(untouched) == len(verdicts):
        report.plain_errors.append(
            f'config "{name}" has no entry for {hardware.describe()}: applying it would silently do nothing'
            f" (its entries target {_targets(entries, hardware.catalog)})"
        )
    elif untouched and hardware.gpu_count_known:
        report.plain_warnings.append(
            f'config "{name}" leaves {gpus_text(untouched)} untouched (no entry applies to them)'
        )
    errors = report.errors()
    return CheckResult(name, not errors, errors, report.warnings(), tuple(verdicts), hardware.gpu_count_known)


def _warn_partial_filter(report: _Report, gpu: GpuTarget, entry: ConfigEntry) -> None:
    """With only a label, say when a filter names just some of the product's boards."""
    if not entry.device_filters or gpu.product is None:
        return
    named = {f.device_id for f in entry.device_filters}
    others = [i for i in gpu.product.pci_device_ids if i not in named]
    if others:
        ids = ", ".join(format_pci_device_id(i) for i in others)
        report.warning(
            gpu,
            f"entry {_entry_label(entry)} filters on some {gpu.product.key} boards only; it would not"
            f" apply to a board with PCI id {ids}",
        )


def _targets(entries: tuple[ConfigEntry, ...], catalog: Catalog) -> str:
    """Which GPUs a config's entries select, in words (for the 'does nothing' error)."""
    targets: list[str] = []
    for entry in entries:
        if not entry.device_filters:
            text = "every GPU"
        else:
            products = []
            for f in entry.device_filters:
                try:
                    products.append(catalog.by_pci_id(f.device_id).key)
                except UnknownProductError:
                    products.append(f.text)
            text = ", ".join(dict.fromkeys(products))
        if entry.devices is not None:
            text += f" at index {','.join(str(i) for i in entry.devices)}"
        targets.append(text)
    return "; ".join(dict.fromkeys(targets))


def _unknown_name(config: MigPartedConfig, name: str, hardware: NodeHardware) -> CheckResult:
    text = unknown_config_message(config, name, origin=DEFAULT_ORIGIN, hardware=hardware)
    return CheckResult(name, False, (text,), (), (), hardware.gpu_count_known)


def quoted_name(name: str) -> str:
    """`nvidia.com/mig.config="NAME"`, the name cut to fit a message."""
    return f'{keys.LABEL_MIG_CONFIG}="{shorten(name, NAME_SHOWN_CHARS)}"'


def valid_names_text(names: list[str], intro: str) -> str:
    """` Valid for X: a, b and 3 more` ('' when there are none)."""
    return f"{intro}: {names_text(names, VALID_NAMES_SHOWN)}" if names else ""


def unknown_config_message(
    config: MigPartedConfig,
    name: str,
    *,
    origin: str,
    hardware: NodeHardware | None,
    where: str | None = None,
) -> str:
    """The one message for a layout name that is no config in `origin` (the CLI's, the webhook's
    and the reconciler's): the closest names, then, when the GPUs are known, the configs valid for
    them (`where` names them; by default their description)."""
    text = f"{quoted_name(name)} is not a config in {origin}"
    close = closest_names(name, config.names())
    if close:
        text += f"; did you mean {', '.join(close)}?"
    if hardware is not None:
        valid = [n for n in valid_config_names(config, hardware) if n not in close]
        text += valid_names_text(valid, f" Valid for {where or hardware.describe()}")
    return text


_memo: LruCache[tuple[object, ...], CheckResult] = LruCache(_MEMO_SIZE)


def check_config(config: MigPartedConfig, name: str, hardware: NodeHardware) -> CheckResult:
    """Check config `name` for this node; memoised on (config digest, name, hardware)."""
    key = (config.digest, name, hardware.cache_key())
    return _memo.get_or_make(key, lambda: _check_uncached(config, name, hardware))


def clear_check_cache() -> None:
    """Forget memoised verdicts (benchmarks; tests that swap configs under one digest)."""
    _memo.clear()


def valid_config_names(config: MigPartedConfig, hardware: NodeHardware) -> list[str]:
    """Names of the configs that are valid for this node, in file order."""
    return [n for n in config.names() if check_config(config, n, hardware).valid]
