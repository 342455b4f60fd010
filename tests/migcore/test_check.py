"""Checking a named config for a node: entry selection, per-GPU verdicts, messages admins read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from driver_tables import X100_TABLE, from_catalog, with_profile, x100

from devcluster.helpers import gpu_model_file
from migcore.catalog import Catalog, Product, UnknownProductError, load_catalog, sanitise_product_name
from migcore.check import (
    CheckResult,
    GpuVerdict,
    NodeHardware,
    check_config,
    clear_check_cache,
    closest_names,
    hardware_from_labels,
    hardware_from_report,
    valid_config_names,
)
from migcore.config import ConfigEntry, MigPartedConfig, load_config_file, parse_config
from migcore.driver_table import MigTable
from migcore.geometry import GpuGeometry, GpuInstanceSpec
from migcore.hardware import MAX_ANNOTATION_BYTES, DiscoveredGpu, NodeGpus
from migcore.planning import desired_geometries

CATALOG: Catalog = load_catalog()
DEFAULT = load_config_file(Path(__file__).parents[1] / "data" / "default-mig-parted-config.yaml", CATALOG)
A100 = "NVIDIA-A100-SXM4-40GB"


def _label(product: Product) -> str:
    return product.gfd_labels[0] if product.gfd_labels else sanitise_product_name(product.nvml_names[0])


def _config(body: str) -> MigPartedConfig:
    return parse_config("version: v1\nmig-configs:\n" + body, CATALOG)


def _expected_verdict(entries: tuple[ConfigEntry, ...], product: Product) -> str:
    """Independent of the checker: which entry targets the product (by the catalog's PCI ids),
    and whether its profiles exist there within their max counts (the default file's mixed
    layouts are the published all-balanced ones, which fit wherever the counts do)."""
    applicable = [
        e
        for e in entries
        if not e.device_filters or any(f.device_id in product.pci_device_ids for f in e.device_filters)
    ]
    if not applicable:
        return "would silently do nothing"
    entry = applicable[-1]
    if not entry.mig_enabled:
        return "valid"
    for profile, count in entry.mig_devices:
        gi = product.gpu_instance_profile(profile)
        if gi is None:
            return f"does not exist on {product.key}"
        if count > gi.max_count:
            return f"allows at most {gi.max_count}"
    return "valid"


_CASES = [(name, key) for name in DEFAULT.names() for key in CATALOG.products]


@pytest.mark.parametrize(("name", "product_key"), _CASES)
def test_every_default_config_on_every_product(name: str, product_key: str) -> None:
    product = CATALOG.products[product_key]
    result = check_config(DEFAULT, name, hardware_from_labels(CATALOG, _label(product), 8))
    expected = _expected_verdict(DEFAULT.configs[name], product)
    if expected == "valid":
        assert result.valid, result.errors
        assert len(result.gpus) == 8 and all(g.geometry is not None for g in result.gpus)
    else:
        assert not result.valid
        assert len(result.errors) == 1, result.errors
        assert expected in result.errors[0]


@pytest.mark.parametrize(
    ("name", "label", "valid", "text"),
    [
        ("all-1g.5gb", A100, True, ""),
        ("all-1g.5gb", "NVIDIA-H100-80GB-HBM3", False, "1g.5gb does not exist on H100-80GB; it has 1g.10gb,"),
        ("all-1g.10gb", A100, True, ""),
        ("all-1g.10gb", "NVIDIA-H100-80GB-HBM3", True, ""),
        ("all-balanced", "NVIDIA-A30", True, ""),
        ("all-balanced", "NVIDIA-H20-3e", False, "would silently do nothing"),
        ("all-disabled", "NVIDIA-RTX-PRO-4500-Blackwell", True, ""),
        ("all-1g.24gb.me.all", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", True, ""),
        ("all-3g.95gb", "NVIDIA-GB200", True, ""),  # an older name of 3g.93gb
        ("all-7g.80gb", A100, False, "7g.80gb does not exist on A100-40GB"),
    ],
)
def test_spot_checks(name: str, label: str, valid: bool, text: str) -> None:
    result = check_config(DEFAULT, name, hardware_from_labels(CATALOG, label, 8))
    assert result.valid is valid
    assert text in " ".join(result.errors)


def test_a_profile_known_only_by_an_older_driver_name_is_flagged() -> None:
    result = check_config(DEFAULT, "all-3g.95gb", hardware_from_labels(CATALOG, "NVIDIA-GB200", 4))
    assert result.valid
    assert any("3g.95gb is another driver's name for 3g.93gb on GB200" in w for w in result.warnings)
    assert not any(
        "another driver's name" in w
        for w in check_config(
            DEFAULT, "all-3g.93gb", hardware_from_labels(CATALOG, "NVIDIA-GB200", 4)
        ).warnings
    )


def test_identical_gpus_give_one_grouped_message() -> None:
    config = _config(
        '  all-3g.20gb:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {"3g.20gb": 3}\n'
    )
    result = check_config(config, "all-3g.20gb", hardware_from_labels(CATALOG, A100, 8))
    assert result.errors == (
        'config "all-3g.20gb" on NVIDIA-A100-SXM4-40GB (GPUs 0-7): 3g.20gb x3 needs 3 GPU instances;'
        " A100-40GB allows at most 2 of 3g.20gb",
    )


def test_mixed_request_names_the_request() -> None:
    config = _config(
        '  mix:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {"3g.20gb": 2, "1g.5gb": 1}\n'
    )
    (error,) = check_config(config, "mix", hardware_from_labels(CATALOG, A100, 2)).errors
    assert error == (
        'config "mix" on NVIDIA-A100-SXM4-40GB (GPUs 0-1): 3g.20gb x2, 1g.5gb:'
        " 3g.20gb x2 uses all 8 memory slices; no room for 1g.5gb"
    )


PER_GPU = """  custom:
    - devices: [0, 1, 2, 3]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: [4, 5, 9]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
"""


def test_device_index_beyond_the_gpu_count() -> None:
    result = check_config(_config(PER_GPU), "custom", hardware_from_labels(CATALOG, A100, 8))
    assert not result.valid
    assert result.errors == (
        'config "custom": mig-configs.custom[1].devices[2]: GPU 9 does not exist; this node has 8 GPUs',
    )
    assert 'config "custom" leaves GPUs 6-7 untouched (no entry applies to them)' in result.warnings


def test_unknown_gpu_count_checks_every_listed_index() -> None:
    hardware = hardware_from_labels(CATALOG, A100, None)
    assert not hardware.gpu_count_known and len(hardware.gpus) == 1
    result = check_config(_config(PER_GPU), "custom", hardware)
    assert result.valid, result.errors
    by_index = {g.index: g for g in result.gpus}
    assert by_index[0].geometry is not None and by_index[0].geometry.summary().count("1g.5gb") == 7
    assert by_index[9].geometry is not None and by_index[9].geometry.summary() == "3g.20gb@0, 3g.20gb@4"
    assert by_index[6].entry is None  # stands for every unlisted GPU


def test_last_applying_entry_wins_with_a_warning() -> None:
    body = """  c:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: [0]
      mig-enabled: false
"""
    result = check_config(_config(body), "c", hardware_from_labels(CATALOG, A100, 2))
    assert result.valid
    gpu0, gpu1 = result.gpus
    assert gpu0.entry == "mig-configs.c[1]" and gpu0.mig_enabled is False
    assert gpu1.entry == "mig-configs.c[0]" and gpu1.mig_enabled is True
    assert result.warnings == (
        'config "c" on NVIDIA-A100-SXM4-40GB (GPU 0): entries [0], [1] all apply; the last one wins, as in mig-parted',
    )


def test_a_config_that_targets_other_gpus_does_nothing_here() -> None:
    body = '  a30-only:\n    - devices: all\n      device-filter: "0x20B710DE"\n      mig-enabled: false\n'
    (error,) = check_config(_config(body), "a30-only", hardware_from_labels(CATALOG, A100, 8)).errors
    assert error == (
        'config "a30-only" has no entry for NVIDIA-A100-SXM4-40GB x8: applying it would silently do nothing'
        " (its entries target A30-24GB)"
    )


def test_label_only_filter_matching_warns_about_other_boards() -> None:
    result = check_config(DEFAULT, "all-1g.35gb", hardware_from_labels(CATALOG, "NVIDIA-H200-NVL", 8))
    assert result.valid
    assert any("would not apply to a board with PCI id 0x233B10DE" in w for w in result.warnings)


def test_subsystem_filters_are_assumed_to_match_with_a_warning() -> None:
    body = (
        '  c:\n    - devices: all\n      device-filter: "0x20B010DE:0x134F10DE"\n      mig-enabled: false\n'
    )
    result = check_config(_config(body), "c", hardware_from_labels(CATALOG, A100, 1))
    assert result.valid
    assert any("subsystem part of 0x20B010DE:0x134F10DE cannot be checked" in w for w in result.warnings)


A100_DRIVER = {"1g.5gb": 7, "1g.5gb+me": 1, "2g.10gb": 3, "3g.20gb": 2, "4g.20gb": 1, "7g.40gb": 1}


def _report(*gpus: DiscoveredGpu) -> NodeHardware:
    return hardware_from_report(CATALOG, NodeGpus(gpus))


def _a100(index: int, profiles: dict[str, int] | None = None) -> DiscoveredGpu:
    return DiscoveredGpu(
        index, 0x20B010DE, "NVIDIA A100-SXM4-40GB", True, A100_DRIVER if profiles is None else profiles
    )


def test_report_products_come_from_pci_ids_then_names() -> None:
    hardware = _report(_a100(0), DiscoveredGpu(1, 0xFFFF10DE, "NVIDIA H100 80GB HBM3", True))
    assert [g.product.key if g.product else None for g in hardware.gpus] == ["A100-40GB", "H100-80GB"]
    assert hardware.product is None and hardware.gpu_count_known
    same = _report(_a100(0), _a100(1))
    assert same.product is not None and same.product.key == "A100-40GB"


def test_the_driver_profile_list_is_enforced() -> None:
    old_driver = _report(_a100(0), _a100(1))  # no 1g.10gb before R525
    (error,) = check_config(DEFAULT, "all-1g.10gb", old_driver).errors
    assert error.startswith('config "all-1g.10gb" on NVIDIA A100-SXM4-40GB (GPUs 0-1): 1g.10gb x4:')
    assert "the driver does not offer 1g.10gb" in error
    limited = _report(_a100(0, {**A100_DRIVER, "1g.5gb": 4}))
    (error,) = check_config(DEFAULT, "all-1g.5gb", limited).errors
    assert error.endswith("1g.5gb x7 needs 7 GPU instances; the driver allows at most 4")
    assert check_config(DEFAULT, "all-3g.20gb", limited).valid


def test_a_gpu_that_is_not_mig_capable() -> None:
    display = DiscoveredGpu(1, 0x1FB010DE, "NVIDIA DGX Display", False)
    hardware = _report(_a100(0), display)
    result = check_config(DEFAULT, "all-1g.5gb", hardware)
    assert not result.valid
    assert any(
        e
        == 'config "all-1g.5gb" on NVIDIA DGX Display (GPU 1): entry [0] enables MIG, but this GPU is not MIG-capable'
        for e in result.errors
    )
    balanced = check_config(DEFAULT, "all-balanced", hardware)
    assert balanced.valid  # filtered by PCI id: the display GPU is left alone
    assert [g.entry is None for g in balanced.gpus] == [False, True]
    assert check_config(DEFAULT, "all-disabled", hardware).valid


def test_a_gpu_nothing_can_judge_gets_no_instances_and_is_never_wiped() -> None:
    """Regression (issue 9): no catalog entry and no driver table used to mean "valid, layout not
    checked", which the planner turned into MIG on with no instances (a wiped GPU, `success`)."""
    for future in (
        DiscoveredGpu(0, 0x3FFF10DE, "NVIDIA Future GPU", True),
        DiscoveredGpu(0, 0x3FFF10DE, "NVIDIA Future GPU", True, {"1g.5gb": 7}),  # v1: max counts only
    ):
        result = check_config(DEFAULT, "all-1g.5gb", _report(future))
        assert not result.valid
        assert result.errors == (
            'config "all-1g.5gb" on NVIDIA Future GPU (GPU 0): 1g.5gb x7: this GPU (NVIDIA Future GPU,'
            " PCI id 0x3FFF10DE) is not in mig-guard's catalog and the node reports no driver MIG table"
            " for it, so nothing can judge where instances fit; refused rather than guessed (with MIG"
            " on, e.g. all-enabled, the reconciler reports the driver's table)",
        )
        with pytest.raises(ValueError, match="is not valid"):
            desired_geometries(result, {0: GpuGeometry(True, (GpuInstanceSpec(0, 8, "7g.40gb"),))})
        # What can be judged without a table still can: MIG off, or on with no instances.
        assert check_config(DEFAULT, "all-disabled", _report(future)).valid
        enabled = check_config(DEFAULT, "all-enabled", _report(future))
        assert enabled.valid and enabled.gpus[0].geometry == GpuGeometry(True)


def test_the_planner_never_reads_a_missing_layout_as_no_instances() -> None:
    verdict = GpuVerdict(0, "mig-configs.x[0]", True, None)
    result = CheckResult("x", True, (), (), (verdict,))
    with pytest.raises(ValueError, match="no layout was judged for GPU 0"):
        desired_geometries(result, {0: GpuGeometry(True, (GpuInstanceSpec(0, 8, "7g.40gb"),))})


def test_unknown_name_suggests_names_and_valid_configs() -> None:
    result = check_config(DEFAULT, "all-1g-5gb", hardware_from_labels(CATALOG, A100, 8))
    (error,) = result.errors
    assert error.startswith(
        'nvidia.com/mig.config="all-1g-5gb" is not a config in the mig-parted config; did you mean all-1g.5gb'
    )
    assert "Valid for NVIDIA-A100-SXM4-40GB x8: all-disabled, all-enabled" in error


def test_closest_names() -> None:
    names = DEFAULT.names()
    assert closest_names("all-balancd", names)[0] == "all-balanced"
    assert closest_names("ALL-BALANCED", names)[0] == "all-balanced"
    assert closest_names("all_1g_5gb", names)[0] == "all-1g.5gb"
    assert closest_names("something-else-entirely", names) == []
    assert len(closest_names("all-1g.5gb.mx", names, limit=2)) == 2


def test_valid_config_names_for_a100() -> None:
    assert valid_config_names(DEFAULT, hardware_from_labels(CATALOG, A100, 8)) == [
        "all-disabled",
        "all-enabled",
        "all-1g.5gb",
        "all-1g.5gb.me",
        "all-2g.10gb",
        "all-3g.20gb",
        "all-4g.20gb",
        "all-7g.40gb",
        "all-1g.10gb",
        "all-balanced",
    ]


def test_verdicts_are_memoised_per_config_name_and_hardware() -> None:
    hardware = hardware_from_labels(CATALOG, A100, 8)
    first = check_config(DEFAULT, "all-balanced", hardware)
    assert check_config(DEFAULT, "all-balanced", hardware_from_labels(CATALOG, A100, 8)) is first
    assert check_config(DEFAULT, "all-balanced", hardware_from_labels(CATALOG, A100, 4)) is not first
    clear_check_cache()
    again = check_config(DEFAULT, "all-balanced", hardware)
    assert again is not first and again == first


def test_json_carries_the_placement() -> None:
    data = check_config(DEFAULT, "all-balanced", hardware_from_labels(CATALOG, A100, 1)).to_json()
    assert data["name"] == "all-balanced" and data["valid"] is True
    assert data["errors"] == [] and isinstance(data["warnings"], list)
    (gpu,) = data["gpus"]
    assert gpu["entry"] == "mig-configs.all-balanced[7]"
    placed = [(gi["profile"], gi["start"]) for gi in gpu["geometry"]["gpuInstances"]]
    assert placed == [("2g.10gb", 0), ("1g.5gb", 2), ("1g.5gb", 3), ("3g.20gb", 4)]


def test_unknown_label() -> None:
    with pytest.raises(UnknownProductError, match="unknown GPU product"):
        hardware_from_labels(CATALOG, "NVIDIA-GeForce-RTX-4090", 1)


def test_a_node_without_gpus() -> None:
    (error,) = check_config(DEFAULT, "all-disabled", hardware_from_labels(CATALOG, A100, 0)).errors
    assert error.startswith('config "all-disabled" has no entry for a node without GPUs')


# --- the driver's table (issue 9) ------------------------------------------------------------------

X100_CONFIG = load_config_file(gpu_model_file("x100-mig-parted-config.yaml"), CATALOG)


def test_a_gpu_outside_the_catalog_is_judged_exactly_from_its_driver_table() -> None:
    hardware = _report(x100(0), x100(1))
    assert [g.product for g in hardware.gpus] == [None, None]
    two = check_config(X100_CONFIG, "x100-two-3g", hardware)
    assert two.valid, two.errors
    assert two.summary() == "GPUs 0-1: 3g.48gb@0, 3g.48gb@3"
    assert not two.warnings
    (error,) = check_config(X100_CONFIG, "x100-three-3g", hardware).errors
    assert error == (
        'config "x100-three-3g" on NVIDIA X100 (GPUs 0-1): 3g.48gb x3 needs 3 GPU instances;'
        " NVIDIA X100 (driver table) allows at most 2 of 3g.48gb"
    )
    assert check_config(X100_CONFIG, "x100-two-3c", hardware).valid  # 3c at 0 and 3: the driver's placements
    # The shipped configs know nothing of it: nothing applies, and that is said.
    assert "has no entry for NVIDIA X100 x2" in check_config(DEFAULT, "all-1g.10gb", hardware).errors[0]


def test_unread_compute_profiles_are_judged_with_a_warning() -> None:
    bare = MigTable(tuple(replace(p, compute_profiles=None) for p in X100_TABLE.profiles))
    result = check_config(X100_CONFIG, "x100-two-3c", _report(x100(0, bare)))
    assert not result.valid  # NVML's usual alignment puts a 3c only at 0: two need two 6g instances
    one = _config('  c:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {"1c.6g.96gb": 6}\n')
    ok = check_config(one, "c", _report(x100(0, bare)))
    assert ok.valid
    assert ok.warnings == (
        'config "c" on NVIDIA X100 (GPU 0): 1c.6g.96gb: the driver\'s compute profiles of 6g.96gb are'
        " not known yet (NVML reports them only for an existing 6g.96gb instance); judged by NVML's"
        " usual alignment",
    )


def _a100_table(**changes: object) -> DiscoveredGpu:
    table = from_catalog(CATALOG.products["A100-40GB"])
    if changes:
        table = with_profile(table, "3g.20gb", **changes)
    return replace(_a100(0, {}), mig_table=table, pci_subsystem_id=0x134F10DE, memory_mib=40960)


def test_the_driver_table_wins_over_the_catalog_with_a_warning() -> None:
    agreeing = _report(_a100_table())
    assert check_config(DEFAULT, "all-3g.20gb", agreeing).warnings == ()
    assert check_config(DEFAULT, "all-3g.20gb", agreeing).valid
    # A driver that allows one 3g.20gb where the catalog says two: the driver is right about itself.
    stricter = _report(_a100_table(max_count=1, placements=(0,)))
    result = check_config(DEFAULT, "all-3g.20gb", stricter)
    assert result.errors == (
        'config "all-3g.20gb" on NVIDIA A100-SXM4-40GB (GPU 0): 3g.20gb x2 needs 2 GPU instances;'
        " NVIDIA A100-SXM4-40GB (driver table) allows at most 1 of 3g.20gb",
    )
    assert result.warnings == (
        "config \"all-3g.20gb\" on NVIDIA A100-SXM4-40GB (GPU 0): the driver's MIG table and mig-guard's"
        " catalog (A100-40GB) disagree: profile 2 (3g.20gb): at most 1; the catalog says 2 (and 1 more);"
        " judged by the driver's table",
    )
    # And one that allows more than the catalog knows of: a fourth 1g.10gb slot.
    looser = _report(
        replace(
            _a100_table(),
            mig_table=with_profile(from_catalog(CATALOG.products["A100-40GB"]), "1g.10gb", max_count=5),
        )
    )
    five = _config('  c:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {"1g.10gb": 5}\n')
    assert not check_config(five, "c", _report(_a100(0, {}))).valid
    assert "no room" in check_config(five, "c", looser).errors[0]  # the placements still say 4
    # Where the driver has no such profile, the catalog's opinion does not count.
    without = MigTable(
        tuple(p for p in from_catalog(CATALOG.products["A100-40GB"]).profiles if str(p.name) != "1g.10gb")
    )
    gone = _report(replace(_a100_table(), mig_table=without))
    assert (
        "does not exist on NVIDIA A100-SXM4-40GB (driver table)"
        in check_config(DEFAULT, "all-1g.10gb", gone).errors[0]
    )


SIBLINGS = _config(
    """  per-board:
    - devices: all
      device-filter: "0x20B010DE:0x134F10DE"
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: all
      device-filter: "0x20B010DE:0x147F10DE"
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
"""
)


def test_subsystem_ids_from_the_report_give_each_board_its_own_entry() -> None:
    boards = _report(_a100_table(), replace(_a100_table(), index=1, pci_subsystem_id=0x147F10DE))
    result = check_config(SIBLINGS, "per-board", boards)
    assert result.valid
    assert [g.entry for g in result.gpus] == ["mig-configs.per-board[0]", "mig-configs.per-board[1]"]
    assert result.summary().startswith("GPU 0: 1g.5gb@0")
    assert result.warnings == ()  # exact: no "assumed to match", no "last one wins"
    # With labels only the subsystem cannot be told: both entries apply, the last wins, said twice.
    labels = check_config(SIBLINGS, "per-board", hardware_from_labels(CATALOG, A100, 2))
    assert any("the last one wins" in w for w in labels.warnings)
    assert any("cannot be checked here; assumed to match" in w for w in labels.warnings)


def test_single_strategy_labels_count_mig_devices_not_gpus() -> None:
    # The seed's example: one A100 with all-1g.5gb is labelled -MIG-1g.5gb, gpu.count=7 (devices).
    seed = _config('  gpu5:\n    - devices: [5]\n      mig-enabled: true\n      mig-devices: {"1g.5gb": 7}\n')
    hardware = hardware_from_labels(CATALOG, "A100-SXM4-40GB-MIG-1g.5gb", 7)
    assert len(hardware.gpus) == 1 and not hardware.gpu_count_known
    result = check_config(seed, "gpu5", hardware)
    assert not result.valid
    assert result.errors == (
        'config "gpu5": mig-configs.gpu5[0].devices[0]: GPU 5 may not exist on this node (at least 1 GPU:'
        " with GPU Feature Discovery's single MIG strategy gpu.count counts the 7 MIG devices of 1g.5gb,"
        " at most 7 per GPU)",
        'config "gpu5" has no entry for A100-SXM4-40GB-MIG-1g.5gb (at least 1 GPU: with GPU Feature'
        " Discovery's single MIG strategy gpu.count counts the 7 MIG devices of 1g.5gb, at most 7 per"
        " GPU): applying it would silently do nothing (its entries target every GPU at index 5)",
    )
    assert check_config(DEFAULT, "all-3g.20gb", hardware).valid  # `devices: all` still judged
    # 56 MIG devices of at most 7 per GPU: at least 8 GPUs, so indexes 0-7 are known to exist.
    eight = hardware_from_labels(CATALOG, "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED", 56)
    assert len(eight.gpus) == 8
    assert check_config(_config(PER_GPU.replace(", 9]", "]")), "custom", eight).valid
    # One MIG device: exactly one GPU.
    assert hardware_from_labels(CATALOG, "NVIDIA-A100-SXM4-40GB-MIG-7g.40gb", 1).gpu_count_known
    invalid = hardware_from_labels(CATALOG, "NVIDIA-A100-SXM4-40GB-MIG-INVALID", 0)
    assert len(invalid.gpus) == 1 and "do not count GPUs" in invalid.describe()
    # Time-slicing alone (-SHARED) keeps gpu.count a GPU count.
    assert hardware_from_labels(CATALOG, "NVIDIA-A100-SXM4-40GB-SHARED", 4).gpu_count_known


def test_version_1_reports_are_still_read() -> None:
    text = (
        '{"version":1,"gpus":[{"index":0,"pciDeviceId":"0x20B010DE","name":"NVIDIA A100-SXM4-40GB",'
        '"migCapable":true,"profiles":{"1g.5gb":4}}]}'
    )
    hardware = hardware_from_report(CATALOG, NodeGpus.from_annotation(text))
    assert hardware.gpus[0].mig_table is None and hardware.gpus[0].driver_profiles == {"1g.5gb": 4}
    (error,) = check_config(DEFAULT, "all-1g.5gb", hardware).errors
    assert error.endswith("the driver allows at most 4")


def test_eight_of_the_largest_gpus_share_one_table_far_under_the_annotation_limit() -> None:
    largest = max(
        CATALOG.products.values(),
        key=lambda p: sum(len(g.placements) for g in p.profiles) if p.memory_mib else 0,
    )
    table = from_catalog(largest)
    gpus = tuple(
        DiscoveredGpu(
            i,
            largest.pci_device_ids[0],
            largest.nvml_names[0],
            True,
            uuid=f"GPU-{i:036d}",
            mig_table=table,
            memory_mib=largest.memory_mib,
            pci_subsystem_id=0x1A2B10DE,
        )
        for i in range(8)
    )
    text = NodeGpus(gpus, "2026-11-28T14:00:00Z").to_annotation()
    assert text.count("gpuInstanceProfiles") == 1
    assert len(text) < MAX_ANNOTATION_BYTES // 4, len(text)
    assert NodeGpus.from_annotation(text).gpus == gpus
