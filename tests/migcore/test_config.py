"""The mig-parted v1 config parser: upstream semantics, stricter where upstream is silently wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from migcore.catalog import load_catalog
from migcore.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    DeviceFilter,
    load_config_file,
    load_default_config,
    parse_config,
)
from migcore.profiles import parse_profile

DEFAULT_CONFIG = Path(__file__).parents[1] / "data" / "default-mig-parted-config.yaml"
CATALOG = load_catalog()


def _errors(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, CATALOG)
    assert str(raised.value) == "\n".join(raised.value.errors)
    return raised.value.errors


def _one(entry: str, name: str = "c") -> str:
    """A config with one named config holding one entry (YAML, indented as an entry body)."""
    body = "\n".join("      " + line for line in entry.strip().splitlines())
    return f"version: v1\nmig-configs:\n  {name}:\n    -\n{body}\n"


def test_the_upstream_default_file_loads() -> None:
    config = load_config_file(DEFAULT_CONFIG, CATALOG)
    assert len(config.names()) == 81
    assert config.names()[:3] == ["all-disabled", "all-enabled", "all-1g.5gb"]
    (disabled,) = config.configs["all-disabled"]
    assert disabled.devices is None and not disabled.mig_enabled and disabled.mig_devices == ()
    (enabled,) = config.configs["all-enabled"]
    assert enabled.mig_enabled and enabled.mig_devices == ()
    (one_g,) = config.configs["all-1g.5gb"]
    assert one_g.mig_devices == ((parse_profile("1g.5gb"), 7),)
    assert one_g.path == "mig-configs.all-1g.5gb[0]"


def test_device_filters_in_string_and_list_form() -> None:
    config = load_config_file(DEFAULT_CONFIG, CATALOG)
    balanced = config.configs["all-balanced"]
    assert len(balanced) == 12
    a30 = balanced[8]
    assert a30.device_filters == (DeviceFilter(0x20B710DE, None, "0x20B710DE"),)
    assert [f.device_id for f in balanced[0].device_filters] == [0x294110DE]
    first, second = config.configs["all-1g.10gb"]
    assert len(first.device_filters) == 8 and len(second.device_filters) == 4
    assert second.mig_devices == ((parse_profile("1g.10gb"), 4),)


def test_the_packaged_default_is_the_same_file() -> None:
    assert load_default_config(CATALOG).digest == load_config_file(DEFAULT_CONFIG, CATALOG).digest


def test_digest_follows_the_bytes() -> None:
    a = parse_config(_one("devices: all\nmig-enabled: false"), CATALOG)
    b = parse_config(_one("devices: all\nmig-enabled: false") + "\n", CATALOG)
    assert a.digest != b.digest
    assert a.digest == parse_config(_one("devices: all\nmig-enabled: false").encode(), CATALOG).digest


def test_device_filter_matching() -> None:
    plain = DeviceFilter(0x20B010DE, None, "0x20B010DE")
    assert plain.matches(0x20B010DE)
    assert plain.matches(0x20B010DE, 0x134F10DE)
    assert not plain.matches(0x20B110DE)
    with_subsystem = DeviceFilter(0x20B510DE, 0x153710DE, "0x20B510DE:0x153710DE")
    assert with_subsystem.matches(0x20B510DE, 0x153710DE)
    assert not with_subsystem.matches(0x20B510DE, 0x153310DE)
    assert not with_subsystem.matches(0x20B510DE)


def test_subsystem_filter_and_mixed_forms_parse() -> None:
    config = parse_config(
        _one('devices: [0, 3]\ndevice-filter: ["0x20B510DE:0x153710DE", "0x20b010de"]\nmig-enabled: false'),
        CATALOG,
    )
    (entry,) = config.configs["c"]
    assert entry.devices == (0, 3)
    assert [(f.device_id, f.subsystem_id) for f in entry.device_filters] == [
        (0x20B510DE, 0x153710DE),
        (0x20B010DE, None),
    ]


@pytest.mark.parametrize(
    ("text", "device", "subsystem"),
    [
        # Every form Go's strconv.ParseUint(s, 0, 32) reads, as mig-parted does, with its meaning.
        ("0x20B010DE", 0x20B010DE, None),
        ("0X20b0_10de", 0x20B010DE, None),
        ("548409566", 0x20B010DE, None),
        ("548_409_566", 0x20B010DE, None),
        ("0o4054010336", 0x20B010DE, None),
        ("04054010336", 0x20B010DE, None),
        ("0b100000101100000001000011011110", 0x20B010DE, None),
        ("0x20B510DE:355930334", 0x20B510DE, 0x153710DE),
    ],
)
def test_every_integer_form_mig_parted_reads_is_accepted(
    text: str, device: int, subsystem: int | None
) -> None:
    config = parse_config(_one(f'devices: all\ndevice-filter: "{text}"\nmig-enabled: false'), CATALOG)
    (f,) = config.configs["c"][0].device_filters
    assert (f.device_id, f.subsystem_id, f.text) == (device, subsystem, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (" 0x20B010DE", '" 0x20B010DE" has spaces; mig-parted reads it as no PCI id at all, so the entry'
         ' would never apply (write "0x20B010DE")'),
        ("0x20B010DE ", 'has spaces'),
        ("0x20B510DE: 0x153710DE", 'has spaces; mig-parted reads it as no PCI id at all, so the entry'
         ' would never apply (write "0x20B510DE:0x153710DE")'),
        ("20B010DE", 'a hexadecimal id needs its 0x: write "0x20B010DE"'),
        ("0x20B0__10DE", 'is not a PCI device id (expected "0x<device><vendor>"'),
        ("0x20B010DE_", "is not a PCI device id"),
        ("0x1_0000_0000", "is not a PCI device id"),
        ("-548409566", "is not a PCI device id"),
        ("0x20B510DE:0x1537", 'a subsystem id needs its vendor id too: write "0x153710DE"'),
        ("A100-SXM4-40GB", "is not a PCI device id"),
    ],
)  # fmt: skip
def test_filters_mig_parted_would_silently_never_match_are_refused(text: str, message: str) -> None:
    (error,) = _errors(_one(f'devices: all\ndevice-filter: "{text}"\nmig-enabled: false'))
    assert error.startswith('mig-configs.c[0].device-filter: "')
    assert message in error


def test_a_leading_zero_profile_is_the_canonical_profile() -> None:
    config = parse_config(_one('devices: all\nmig-enabled: true\nmig-devices: {"01g.5gb": 7}'), CATALOG)
    assert config.configs["c"][0].mig_devices == ((parse_profile("1g.5gb"), 7),)
    (error,) = _errors(_one('devices: all\nmig-enabled: true\nmig-devices: {"01g.5gb": 3, "1g.5gb": 4}'))
    assert error == 'mig-configs.c[0].mig-devices."1g.5gb": same profile as "01g.5gb" (write it once)'


def test_mig_enabled_with_empty_devices_and_disabled_with_empty_map_are_fine() -> None:
    parse_config(_one("devices: all\nmig-enabled: true\nmig-devices: {}"), CATALOG)
    parse_config(_one("devices: all\nmig-enabled: false\nmig-devices: {}"), CATALOG)


def test_zero_counts_beside_a_positive_one_are_fine() -> None:
    config = parse_config(
        _one('devices: all\nmig-enabled: true\nmig-devices: {"1g.5gb": 0, "3g.20gb": 2}'), CATALOG
    )
    (entry,) = config.configs["c"]
    assert entry.requests() == {parse_profile("3g.20gb"): 2}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "devices: 7\nmig-enabled: false",
            'mig-configs.c[0].devices: 7 is not "all" nor a list of GPU indexes (write [7]',
        ),
        ("devices: some\nmig-enabled: false", "mig-configs.c[0].devices: 'some' is not \"all\""),
        ("devices: [0, -1]\nmig-enabled: false", "mig-configs.c[0].devices[1]: -1 is not a GPU index"),
        ("devices: [0, true]\nmig-enabled: false", "mig-configs.c[0].devices[1]: True is not a GPU index"),
        ("devices: [1, 1]\nmig-enabled: false", "mig-configs.c[0].devices[1]: GPU 1 is listed twice"),
        ("devices: []\nmig-enabled: false", "mig-configs.c[0].devices: an empty list selects no GPU"),
        ("mig-enabled: false", "mig-configs.c[0]: missing required field devices"),
        ("devices: all", "mig-configs.c[0]: missing required field mig-enabled"),
        ('devices: all\nmig-enabled: "true"', "mig-configs.c[0].mig-enabled: 'true' is not true or false"),
        (
            "devices: all\nmig-enabled: true",
            "mig-configs.c[0]: missing required field mig-devices when mig-enabled is true",
        ),
        (
            'devices: all\nmig-enabled: false\nmig-devices: {"1g.5gb": 1}',
            "mig-configs.c[0].mig-devices: MIG devices are listed but mig-enabled is false",
        ),
        (
            'devices: all\nmig-enabled: true\nmig-devices: {"1g.5gb": -1}',
            'mig-configs.c[0].mig-devices."1g.5gb": count -1 is not a non-negative integer',
        ),
        (
            'devices: all\nmig-enabled: true\nmig-devices: {"1g.5gb": 1.5}',
            'mig-configs.c[0].mig-devices."1g.5gb": count 1.5 is not',
        ),
        (
            'devices: all\nmig-enabled: true\nmig-devices: {"1g.5gb": 0}',
            "mig-configs.c[0].mig-devices: all counts are 0",
        ),
        (
            'devices: all\nmig-enabled: true\nmig-devices: {"1g.5gx": 1}',
            'mig-configs.c[0].mig-devices."1g.5gx": "1g.5gx": "5gx" is not a memory size',
        ),
        (
            'devices: all\nmig-enabled: true\nmig-devices: {"1g.5gb": 1, "1c.1g.5gb": 1}',
            'mig-configs.c[0].mig-devices."1c.1g.5gb": same profile as "1g.5gb"',
        ),
        (
            'devices: all\nmig-enabled: true\nmig-devices: ["1g.5gb"]',
            "mig-configs.c[0].mig-devices: expected a mapping of profile to count",
        ),
        ("devices: all\nmig-enabled: false\nmig-device: {}", 'mig-configs.c[0]: unknown field "mig-device"'),
        (
            'devices: all\ndevice-filter: "0x20B"\nmig-enabled: false',
            'mig-configs.c[0].device-filter: "0x20B" is not a PCI device id',
        ),
        (
            'devices: all\ndevice-filter: ["0x20B010DE", "0x20B0"]\nmig-enabled: false',
            'mig-configs.c[0].device-filter[1]: "0x20B0" is not a PCI device id (a device id needs its vendor id too: write "0x20B010DE"',
        ),
        (
            'devices: all\ndevice-filter: "A100-SXM4-40GB"\nmig-enabled: false',
            'mig-configs.c[0].device-filter: "A100-SXM4-40GB" is not a PCI device id (expected "0x<device><vendor>"',
        ),
        (
            'devices: all\ndevice-filter: "0x20B010DE:0x1"\nmig-enabled: false',
            'mig-configs.c[0].device-filter: "0x20B010DE:0x1" is not a PCI device id',
        ),
        (
            "devices: all\ndevice-filter: 0x20B010DE\nmig-enabled: false",
            'mig-configs.c[0].device-filter: 548409566 is a number; quote the PCI id: "0x20B010DE"',
        ),
    ],
)
def test_each_problem_names_its_place(entry: str, expected: str) -> None:
    errors = _errors(_one(entry))
    assert any(e.startswith(expected) for e in errors), errors


def test_profile_on_no_catalog_gpu_is_a_warning_naming_the_closest() -> None:
    # A GPU outside the catalog may offer it (its driver table says so): the verdict per GPU decides.
    config = parse_config(_one('devices: all\nmig-enabled: true\nmig-devices: {"2g.11gb": 1}'), CATALOG)
    assert config.configs["c"][0].mig_devices == ((parse_profile("2g.11gb"), 1),)
    (warning,) = config.warnings
    assert warning.startswith(
        'mig-configs.c[0].mig-devices."2g.11gb": profile 2g.11gb exists on no GPU in mig-guard\'s catalog'
    )
    assert "2g.10gb (A100-40GB)" in warning and "2g.12gb (A30-24GB)" in warning
    assert not load_default_config(CATALOG).warnings


def test_known_aliases_are_accepted() -> None:
    parse_config(
        _one('devices: all\nmig-enabled: true\nmig-devices: {"1g.24gb+me": 1, "3g.39gb": 1}'), CATALOG
    )


def test_all_problems_are_reported_at_once() -> None:
    text = """
version: v1
extra: 1
mig-configs:
  a:
    - devices: 7
      mig-enabled: false
  b: []
  all-balanced:
    - devices: all
      mig-enabled: false
    - devices: all
      mig-enabled: false
    - devices: all
      mig-enabled: false
    - devices: all
      device-filter: ["0x20B"]
      mig-enabled: false
"""
    errors = _errors(text)
    assert errors == (
        "extra: unknown field (allowed: version, mig-configs)",
        'mig-configs.a[0].devices: 7 is not "all" nor a list of GPU indexes (write [7] for one GPU)',
        "mig-configs.b: expected a non-empty list of entries",
        'mig-configs.all-balanced[3].device-filter[0]: "0x20B" is not a PCI device id'
        ' (a device id needs its vendor id too: write "0x020B10DE" for an NVIDIA GPU)',
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "config is empty"),
        ("- 1\n- 2\n", "config: expected a mapping"),
        ("mig-configs: {}\n", 'version: missing (must be "v1")'),
        (
            "version: v2\nmig-configs: {a: [{devices: all, mig-enabled: false}]}\n",
            'version: "v2" is not supported',
        ),
        ("version: v1\n", "mig-configs: missing"),
        ("version: v1\nmig-configs: {}\n", "mig-configs: no configs defined"),
        ("version: v1\nmig-configs: [a]\n", "mig-configs: expected a mapping"),
        (
            "version: v1\nmig-configs:\n  a:\n    - devices: all\n  a: []\n",
            'line 5, column 3: duplicate key "a"',
        ),
        ("version: v1\nmig-configs:\n  a: [\n", "YAML error at line"),
    ],
)
def test_document_level_problems(text: str, expected: str) -> None:
    errors = _errors(text)
    assert any(expected in e for e in errors), errors


def test_duplicate_profile_keys_are_caught() -> None:
    text = _one('devices: all\nmig-enabled: true\nmig-devices:\n  "1g.5gb": 1\n  "1g.5gb": 2')
    (error,) = _errors(text)
    assert 'duplicate key "1g.5gb"' in error


def test_oversized_input_is_refused() -> None:
    text = _one("devices: all\nmig-enabled: false") + "#" * MAX_CONFIG_BYTES
    (error,) = _errors(text)
    assert "limit is 1048576 bytes" in error


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml", CATALOG)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: v1\n# \xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(path, CATALOG)
