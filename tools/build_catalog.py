"""Regenerate migcore/data/catalog.yaml from the research table and the overlay.

The research file (shared/research/mig-hardware.yaml) marks values it could not confirm
with a trailing `# unconfirmed` comment. Comments do not survive a YAML load, so this tool
turns each mark into data (an `unconfirmed` map on the product, profile or compute profile)
before loading. `tools/catalog-overlay.yaml` adds what the research lists only as prose:
profile-name aliases for known driver name drift.

Usage: python tools/build_catalog.py [RESEARCH_YAML] > migcore/data/catalog.yaml
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "research" / "mig-hardware.yaml"
KEY_MARK = re.compile(r"^(\s*)([A-Za-z_]+): (.*?)\s+# unconfirmed:?\s*(.*)$")
ITEM_MARK = re.compile(r"^(\s*)- (.*?)\s+# unconfirmed:?\s*(.*)$")


def _mark_to_data(text: str) -> str:
    out: list[str] = []
    for line in text.splitlines():
        if m := KEY_MARK.match(line):
            indent, key, value, note = m.groups()
            out.append(f"{indent}{key}: {value}")
            out.append(f"{indent}{key}__unconfirmed: {json.dumps(note or 'unconfirmed')}")
        elif m := ITEM_MARK.match(line):
            indent, value, note = m.groups()
            note_yaml = json.dumps(note or "unconfirmed")
            out.append(f"{indent}- {{__value: {value}, __unconfirmed: {note_yaml}}}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _clean_name(name: str) -> str:
    """Drop the research's parenthetical remarks: 'A100-SXM4-40GB (name on R450...)'."""
    return name.split(" (", maxsplit=1)[0].strip()


def _values(items: list[Any] | None, field: str, unconfirmed: dict[str, str]) -> list[str]:
    result: list[str] = []
    for item in items or []:
        if isinstance(item, dict) and "__value" in item:
            value = item["__value"]
            if value is None:
                continue
            value = _clean_name(str(value))
            unconfirmed[f"{field}[{value}]"] = item["__unconfirmed"]
        elif item is None:
            continue
        else:
            value = _clean_name(str(item))
        if value not in result:
            result.append(value)
    return result


def _pop_marks(raw: dict[str, Any]) -> dict[str, str]:
    marks = {}
    for key in [k for k in raw if k.endswith("__unconfirmed")]:
        marks[key.removesuffix("__unconfirmed")] = str(raw.pop(key))
    return marks


def _fraction(text: str | None) -> str | None:
    return None if text is None else text.split(" ")[0]


def _compute_profile(raw: dict[str, Any]) -> dict[str, Any]:
    marks = _pop_marks(raw)
    return {
        "name": raw["name"],
        "slices": raw["ci_slices"],
        "nvml_ci_profile_const": raw["nvml_ci_profile_const"],
        "nvml_ci_profile_id": raw["nvml_ci_profile_id"],
        "max_count": raw["max_count"],
        "unconfirmed": marks,
    }


def _profile(raw: dict[str, Any], aliases: list[str]) -> dict[str, Any]:
    marks = _pop_marks(raw)
    return {
        "name": raw["name"],
        "aliases": aliases,
        "nvml_profile_const": raw["nvml_profile_const"],
        "nvml_profile_id": raw["nvml_profile_id"],
        "smi_profile_id": raw.get("smi_profile_id"),
        "slices": raw["slices"],
        "memory_fraction": _fraction(raw.get("memory_fraction")),
        "memory_mib": raw.get("memory_mib"),
        "max_count": raw["max_count"],
        "placement_size": raw.get("placement_size"),
        "placements": raw.get("placements"),
        "compute_profiles": [_compute_profile(c) for c in raw.get("compute_profiles") or []],
        "unconfirmed": marks,
    }


def build(source: Path, overlay: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(_mark_to_data(source.read_text()))
    products: dict[str, Any] = {}
    alias_table: dict[str, dict[str, list[str]]] = overlay.get("aliases", {})
    for key, raw in data["products"].items():
        marks = _pop_marks(raw)
        product_aliases = alias_table.get(key, {})
        profiles = [_profile(p, product_aliases.get(p["name"], [])) for p in raw.get("profiles") or []]
        unknown = set(product_aliases) - {p["name"] for p in profiles}
        if unknown:
            raise SystemExit(f"overlay aliases for {key} name unknown profiles: {sorted(unknown)}")
        products[key] = {
            "marketing_name": raw["marketing_name"],
            "architecture": raw.get("architecture"),
            "nvml_names": _values(raw.get("product_names"), "nvml_names", marks),
            "gfd_labels": [
                v for v in _values(raw.get("gfd_product_labels"), "gfd_labels", marks) if "-MIG-" not in v
            ],
            "pci_device_ids": _values(raw.get("pci_device_ids"), "pci_device_ids", marks),
            "memory_mib": raw.get("memory_mib"),
            "compute_slices": raw["slices"],
            "memory_slices": raw["memory_slices"],
            "placement_grid": raw.get("placement_grid"),
            "max_instances": raw["max_instances"],
            "notes": list(raw.get("notes") or []),
            "unconfirmed": marks,
            "profiles": profiles,
        }
    return {
        "schema_version": 1,
        "nvml": {
            "gpu_instance_profile_constants": data["nvml"]["gpu_instance_profile_constants"],
            "compute_instance_profile_constants": data["nvml"]["compute_instance_profile_constants"],
        },
        "products": products,
    }


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    overlay = yaml.safe_load((HERE / "catalog-overlay.yaml").read_text())
    header = (
        "# GENERATED by tools/build_catalog.py from the research table mig-hardware.yaml and\n"
        "# tools/catalog-overlay.yaml. Do not edit by hand: edit those and regenerate.\n"
        "# 'unconfirmed' maps name the fields (or list items) that no source confirmed for that\n"
        "# product; the value says why. Placements are start:size in placement-grid units.\n"
    )
    sys.stdout.write(header + yaml.safe_dump(build(source, overlay), sort_keys=False, width=110))


if __name__ == "__main__":
    main()
