"""The mig-parted v1 config file (`version: v1`, `mig-configs: {name: [entries]}`).

Upstream semantics (see mig-parted `api/spec/v1/spec.go`), but stricter where upstream is
silently wrong: a device filter mig-parted cannot parse (it would match nothing) is an error,
unknown fields and duplicate keys are errors. A `mig-devices` profile no catalog product has is
a warning here (a GPU outside the catalog may offer it) and an error in the verdict for any GPU
that does not offer it (upstream turns an unknown profile into an empty layout and reports
success). Every deliberate difference is listed in docs/reference.md. All problems are
collected and raised at once; each message names its place in the file, e.g.
`mig-configs.all-balanced[3].device-filter: "0x20B" is not a PCI device id ...`.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from migcore.catalog import Catalog
from migcore.profiles import MigProfile, ProfileError, parse_profile

SUPPORTED_VERSION = "v1"
MAX_CONFIG_BYTES = 1024 * 1024
_TOP_LEVEL_FIELDS = ("version", "mig-configs")
_ENTRY_FIELDS = ("devices", "device-filter", "mig-enabled", "mig-devices")


class ConfigError(ValueError):
    """A config that cannot be used; `errors` holds every problem found, each naming its place."""

    def __init__(self, errors: list[str] | tuple[str, ...]) -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class DeviceFilter:
    """One `device-filter` item: `0x<device><vendor>` with an optional `:0x<subdevice><subvendor>`."""

    device_id: int
    subsystem_id: int | None
    text: str

    def matches(self, pci_device_id: int, subsystem_id: int | None = None) -> bool:
        """True when the GPU's ids match; a filter with a subsystem needs the GPU's subsystem too."""
        if pci_device_id != self.device_id:
            return False
        return self.subsystem_id is None or self.subsystem_id == subsystem_id


@dataclass(frozen=True)
class ConfigEntry:
    """One entry of a named config: which GPUs it selects and the layout it wants on them."""

    path: str
    devices: tuple[int, ...] | None
    device_filters: tuple[DeviceFilter, ...]
    mig_enabled: bool
    mig_devices: tuple[tuple[MigProfile, int], ...]

    def requests(self) -> dict[MigProfile, int]:
        """The `mig-devices` map with zero counts dropped (what placement takes)."""
        return {profile: count for profile, count in self.mig_devices if count}


@dataclass(frozen=True)
class MigPartedConfig:
    """A parsed config file. `digest` identifies the exact source bytes (for caching verdicts);
    `warnings` name what parses but looks wrong (a profile no catalog GPU has: a typo, or a GPU
    only its driver's table describes)."""

    configs: Mapping[str, tuple[ConfigEntry, ...]]
    digest: str
    warnings: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return list(self.configs)


_FastSafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_FastSafeLoader):  # type: ignore[valid-type,misc]
    """Safe loader (libyaml when present) that rejects duplicate mapping keys.

    PyYAML silently keeps the last of two equal keys; in a config that hides a mistake.
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in mapping
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f'duplicate key "{key}"', key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return f"YAML error: {exc}"


def parse_go_uint32(text: str) -> int | None:
    """`text` as Go's `strconv.ParseUint(text, 0, 32)` reads it (how mig-parted reads a filter), or
    None where Go fails (then mig-parted's filter silently matches nothing).

    Base prefixes 0x/0o/0b, a bare leading 0 for octal, decimal otherwise; `_` only between
    digits or after a base prefix; no sign, no spaces; at most 2**32 - 1."""
    if not text:
        return None
    base, body = 10, text
    if text[0] == "0":
        prefix = text[1:2].lower()
        if len(text) >= 3 and prefix in ("x", "o", "b"):
            base, body = {"x": 16, "o": 8, "b": 2}[prefix], text[2:]
        else:
            base, body = 8, text[1:]
    value = 0
    for char in body:
        if char == "_":
            continue
        digit = int(char, 36) if char.isascii() and char.isalnum() else base
        if digit >= base:
            return None
        value = value * base + digit
    if not _underscores_ok(text) or value > 0xFFFFFFFF:
        return None
    return value


def _underscores_ok(text: str) -> bool:
    """Go's `underscoreOK`: an underscore only between digits, or between a base prefix and a digit."""
    saw, i, hexadecimal = "^", 0, False
    if len(text) >= 2 and text[0] == "0" and text[1].lower() in "box":
        saw, i, hexadecimal = "0", 2, text[1].lower() == "x"
    for char in text[i:]:
        if char.isdigit() or (hexadecimal and char.lower() in "abcdef"):
            saw = "0"
        elif char == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def _filter_problem(text: str) -> str:
    """Why `text` is not a filter mig-parted can match, with the form to write instead."""
    if text != text.strip() or " " in text or "\t" in text:
        squeezed = "".join(text.split())
        return (
            f'"{text}" has spaces; mig-parted reads it as no PCI id at all, so the entry would never'
            f' apply (write "{squeezed}")'
        )
    hint = 'expected "0x<device><vendor>", e.g. "0x20B010DE", optionally ":0x<subsystem ids>"'
    parts = text.split(":")
    if len(parts) <= 2 and all(re.fullmatch(r"[0-9A-Fa-f]{8}", p) for p in parts):
        hint = f'a hexadecimal id needs its 0x: write "{":".join("0x" + p.upper() for p in parts)}"'
    return f'"{text}" is not a PCI device id ({hint})'


def parse_device_filter(text: Any, where: str) -> DeviceFilter | str:
    """A filter item, or an error message naming `where` and the right form.

    Every integer form mig-parted accepts (Go's base-0 parsing: hexadecimal with 0x, decimal,
    0o/0b, `_` separators) is accepted with its meaning; what it cannot parse, and so would
    silently never match, is refused."""
    if not isinstance(text, str):
        return f'{where}: {text!r} is not a PCI device id string like "0x20B010DE"'
    parts = text.split(":")
    ids = [parse_go_uint32(p) for p in parts]
    if len(parts) > 2 or any(i is None for i in ids):
        return f"{where}: {_filter_problem(text)}"
    for part, value in zip(parts, ids, strict=True):
        assert value is not None
        if value > 0xFFFF:
            continue
        if part[:2].lower() != "0x":
            return f"{where}: {_filter_problem(text)}"
        what = "a device id" if part is parts[0] else "a subsystem id"
        return (
            f'{where}: "{text}" is not a PCI device id ({what} needs its vendor id too: write'
            f' "0x{value:04X}10DE" for an NVIDIA GPU)'
        )
    device, subsystem = ids[0], ids[1] if len(ids) == 2 else None
    assert device is not None
    return DeviceFilter(device, subsystem, text)


@lru_cache(maxsize=8)
def _known_profiles(catalog: Catalog) -> dict[MigProfile, tuple[str, ...]]:
    """Every profile name (GI, CI, aliases) the catalog knows, with the products that offer it."""
    known: dict[MigProfile, list[str]] = {}
    for product in catalog.products.values():
        for gi in product.profiles:
            for name in (gi.name, *gi.aliases):
                for ci in gi.compute_profiles:
                    known.setdefault(name.with_compute_slices(ci.slices), []).append(product.key)
    return {name: tuple(dict.fromkeys(keys)) for name, keys in known.items()}


def _closest_profiles(profile: MigProfile, catalog: Catalog, limit: int = 3) -> str:
    """The known profiles most like `profile`: same slices and attributes, nearest memory first."""
    known = _known_profiles(catalog)
    by_text = {str(name): keys for name, keys in known.items()}
    alike = [
        n
        for n in known
        if (n.gi_slices, n.compute_slices, n.attributes, n.negative)
        == (profile.gi_slices, profile.compute_slices, profile.attributes, profile.negative)
    ]
    if alike:
        alike.sort(key=lambda n: (abs(n.memory_gb - profile.memory_gb), n.memory_gb))
        close = [str(n) for n in alike[:limit]]
    else:
        close = difflib.get_close_matches(str(profile), list(by_text), n=limit, cutoff=0.0)
    parts = []
    for name in close:
        keys = by_text[name]
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        parts.append(f"{name} ({shown})")
    return "; ".join(parts)


class _EntryParser:
    """Collects the errors of one config file while building its entries."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def entry(self, raw: Any, path: str) -> ConfigEntry | None:
        if not isinstance(raw, dict):
            self.errors.append(f"{path}: expected a mapping with devices, mig-enabled and mig-devices")
            return None
        count_before = len(self.errors)
        for key in raw:
            if key not in _ENTRY_FIELDS:
                self.errors.append(f'{path}: unknown field "{key}" (allowed: {", ".join(_ENTRY_FIELDS)})')
        devices = self._devices(raw, path)
        filters = self._filters(raw.get("device-filter"), f"{path}.device-filter")
        enabled = raw.get("mig-enabled")
        if "mig-enabled" not in raw:
            self.errors.append(f"{path}: missing required field mig-enabled (true or false)")
        elif not isinstance(enabled, bool):
            self.errors.append(f"{path}.mig-enabled: {enabled!r} is not true or false")
        mig_devices = self._mig_devices(raw, path, enabled if isinstance(enabled, bool) else None)
        if len(self.errors) != count_before or not isinstance(enabled, bool):
            return None
        return ConfigEntry(path, devices, filters, enabled, mig_devices)

    def _devices(self, raw: Mapping[str, Any], path: str) -> tuple[int, ...] | None:
        where = f"{path}.devices"
        if "devices" not in raw:
            self.errors.append(f"{path}: missing required field devices (all, or a list of GPU indexes)")
            return None
        value = raw["devices"]
        if value == "all":
            return None
        if not isinstance(value, list):
            hint = (
                f" (write [{value}] for one GPU)"
                if isinstance(value, int) and not isinstance(value, bool)
                else ""
            )
            self.errors.append(f'{where}: {value!r} is not "all" nor a list of GPU indexes{hint}')
            return None
        if not value:
            self.errors.append(f"{where}: an empty list selects no GPU")
            return None
        indexes: list[int] = []
        for i, item in enumerate(value):
            if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                self.errors.append(f"{where}[{i}]: {item!r} is not a GPU index (a non-negative integer)")
            elif item in indexes:
                self.errors.append(f"{where}[{i}]: GPU {item} is listed twice")
            else:
                indexes.append(item)
        return tuple(indexes)

    def _filters(self, value: Any, where: str) -> tuple[DeviceFilter, ...]:
        if value is None:
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML reads an unquoted 0x20B010DE as a number.
            self.errors.append(f'{where}: {value} is a number; quote the PCI id: "0x{value:08X}"')
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.errors.append(f"{where}: expected a PCI device id or a list of them")
            return ()
        filters: list[DeviceFilter] = []
        for i, item in enumerate(items):
            parsed = parse_device_filter(item, where if isinstance(value, str) else f"{where}[{i}]")
            if isinstance(parsed, str):
                self.errors.append(parsed)
            else:
                filters.append(parsed)
        return tuple(filters)

    def _mig_devices(
        self, raw: Mapping[str, Any], path: str, enabled: bool | None
    ) -> tuple[tuple[MigProfile, int], ...]:
        where = f"{path}.mig-devices"
        value = raw.get("mig-devices")
        if value is None:
            if enabled:
                self.errors.append(
                    f"{path}: missing required field mig-devices when mig-enabled is true"
                    " (use {} for MIG on with no devices)"
                )
            return ()
        if not isinstance(value, dict):
            self.errors.append(f"{where}: expected a mapping of profile to count")
            return ()
        if value and enabled is False:
            self.errors.append(f"{where}: MIG devices are listed but mig-enabled is false")
            return ()
        parsed: list[tuple[MigProfile, int]] = []
        seen: dict[MigProfile, str] = {}
        for key, count in value.items():
            place = f'{where}."{key}"'
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                self.errors.append(f"{place}: count {count!r} is not a non-negative integer")
                continue
            try:
                profile = parse_profile(key) if isinstance(key, str) else parse_profile(str(key))
            except ProfileError as exc:
                self.errors.append(f"{place}: {exc}")
                continue
            if profile in seen:
                self.errors.append(f'{place}: same profile as "{seen[profile]}" (write it once)')
                continue
            seen[profile] = str(key)
            if profile not in _known_profiles(self.catalog):
                # Not an error: a GPU the catalog does not know may offer it (its driver table says).
                closest = _closest_profiles(profile, self.catalog)
                self.warnings.append(
                    f"{place}: profile {profile} exists on no GPU in mig-guard's catalog (closest: {closest});"
                    " only a GPU whose driver reports it can take it"
                )
            parsed.append((profile, count))
        if value and parsed and len(parsed) == len(value) and not any(c for _, c in parsed):
            self.errors.append(f"{where}: all counts are 0 (use {{}} for MIG on with no devices)")
        return tuple(parsed)


def _decode(text: str | bytes) -> tuple[str, bytes]:
    if isinstance(text, str):
        return text, text.encode("utf-8")
    try:
        return text.decode("utf-8"), text
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config is not UTF-8 text: {exc}"]) from exc


def parse_config(text: str | bytes, catalog: Catalog) -> MigPartedConfig:
    """Parse a v1 config; raise ConfigError listing every problem. A profile that no product of
    `catalog` has is a warning (a typo, or a GPU only its driver's table describes)."""
    size = len(text.encode("utf-8")) if isinstance(text, str) else len(text)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"config is {size} bytes; the limit is {MAX_CONFIG_BYTES} bytes (1 MiB)"])
    source, raw_bytes = _decode(text)
    try:
        data = yaml.load(source, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc)]) from exc
    if data is None:
        raise ConfigError(["config is empty: expected version: v1 and mig-configs"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"config: expected a mapping with version and mig-configs, not {type(data).__name__}"]
        )
    errors: list[str] = []
    warnings: list[str] = []
    if "version" not in data:
        errors.append(f'version: missing (must be "{SUPPORTED_VERSION}")')
    elif data["version"] != SUPPORTED_VERSION:
        errors.append(f'version: "{data["version"]}" is not supported (must be "{SUPPORTED_VERSION}")')
    for key in data:
        if key not in _TOP_LEVEL_FIELDS:
            errors.append(f"{key}: unknown field (allowed: {', '.join(_TOP_LEVEL_FIELDS)})")
    raw_configs = data.get("mig-configs")
    configs: dict[str, tuple[ConfigEntry, ...]] = {}
    if raw_configs is None:
        errors.append("mig-configs: missing (a mapping of config name to entries)")
    elif not isinstance(raw_configs, dict):
        errors.append("mig-configs: expected a mapping of config name to a list of entries")
    elif not raw_configs:
        errors.append("mig-configs: no configs defined")
    else:
        parser = _EntryParser(catalog)
        for raw_name, raw_entries in raw_configs.items():
            name = str(raw_name)
            path = f"mig-configs.{name}"
            if not isinstance(raw_name, str | int) or isinstance(raw_name, bool):
                parser.errors.append(f"{path}: a config name must be a string")
                continue
            if not isinstance(raw_entries, list) or not raw_entries:
                parser.errors.append(f"{path}: expected a non-empty list of entries")
                continue
            entries = [parser.entry(raw, f"{path}[{i}]") for i, raw in enumerate(raw_entries)]
            configs[name] = tuple(e for e in entries if e is not None)
        errors.extend(parser.errors)
        warnings.extend(parser.warnings)
    if errors:
        raise ConfigError(errors)
    return MigPartedConfig(configs, hashlib.sha256(raw_bytes).hexdigest(), tuple(warnings))


def load_config_file(path: str | Path, catalog: Catalog) -> MigPartedConfig:
    """Read and parse a config file; an unreadable or oversized file is a ConfigError too."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from exc
    return parse_config(data, catalog)


def load_default_config(catalog: Catalog) -> MigPartedConfig:
    """The GPU Operator's default config, shipped as `migcore/data/default-mig-parted-config.yaml`."""
    data = resources.files("migcore").joinpath("data/default-mig-parted-config.yaml").read_bytes()
    return parse_config(data, catalog)
