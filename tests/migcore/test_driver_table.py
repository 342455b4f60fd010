"""The driver's MIG table: go-nvlib's names, the wire format, judging from it, and comparing it
with the catalog."""

from __future__ import annotations

import json

import pytest
from driver_tables import X100_PCI, X100_TABLE, from_catalog, with_profile

from migcore.catalog import load_catalog
from migcore.driver_table import (
    NOT_READ,
    DriverTableError,
    MigTable,
    compare,
    gpu_instance_profile_name,
    memory_gb,
    table_product,
)
from migcore.placement import fit
from migcore.profiles import parse_profile

CATALOG = load_catalog()


@pytest.mark.parametrize("key", [k for k, p in CATALOG.products.items() if p.memory_mib])
def test_go_nvlib_names_reproduce_every_catalog_name(key: str) -> None:
    product = CATALOG.products[key]
    assert product.memory_mib is not None
    for gi in product.profiles:
        memory = gi.memory_mib or int((gi.memory_fraction or 0) * product.memory_mib)
        name = gpu_instance_profile_name(gi.nvml_profile_id, gi.slices, memory, product.memory_mib)
        assert name == gi.name, (key, gi.name)


def test_memory_rounds_up_to_an_eighth_and_half_away_from_zero() -> None:
    # go-nvlib: ceil(share * 8) / 8 of the GPU's GiB, then Go's math.Round (70.5 -> 71, not 70).
    assert memory_gb(4864, 40960) == 5
    assert memory_gb(71168, 143771) == 71
    assert memory_gb(22528, 183359) == 23
    assert str(gpu_instance_profile_name(7, 1, 9856, 81559)) == "1g.10gb+me"
    assert str(gpu_instance_profile_name(13, 1, 22528, 183359)) == "1g.23gb-me"
    assert str(gpu_instance_profile_name(15, 1, 22528, 183359)) == "1g.23gb+me.all"


def test_the_wire_format_round_trips_and_names_bad_places() -> None:
    assert MigTable.from_json(json.loads(json.dumps(X100_TABLE.to_json()))) == X100_TABLE
    bad = X100_TABLE.to_json()
    bad["gpuInstanceProfiles"][2]["placements"][1]["size"] = 4
    with pytest.raises(
        DriverTableError, match=r"gpuInstanceProfiles\[2\]\.placements: expected .* of one size"
    ):
        MigTable.from_json(bad)
    bad = X100_TABLE.to_json()
    bad["gpuInstanceProfiles"][3]["computeProfiles"][2]["placements"] = [0, 4]
    with pytest.raises(DriverTableError, match=r"computeProfiles\[2\]\.placements: expected start slices"):
        MigTable.from_json(bad)
    with pytest.raises(DriverTableError, match=r"migTable: expected an object"):
        MigTable.from_json([])


def _x100_fit(layout: dict[str, int]) -> tuple[bool, str | None]:
    product = table_product(X100_TABLE, "NVIDIA X100", X100_PCI, 98304, None)
    result = fit(product, {parse_profile(p): n for p, n in layout.items()})
    return result.fits, result.reason


def test_a_gpu_no_catalog_knows_is_judged_exactly_from_its_table() -> None:
    assert _x100_fit({"3g.48gb": 2}) == (True, None)
    assert _x100_fit({"3g.48gb": 1, "2g.36gb": 1, "1g.24gb": 1}) == (True, None)
    assert _x100_fit({"1g.24gb": 6}) == (True, None)
    assert _x100_fit({"3g.48gb": 3})[1] == (
        "3g.48gb x3 needs 3 GPU instances; NVIDIA X100 (driver table) allows at most 2 of 3g.48gb"
    )
    assert _x100_fit({"2g.36gb": 3, "1g.24gb": 1})[1] == (
        "2g.36gb x3, 1g.24gb need 7 compute slices; NVIDIA X100 (driver table) has 6"
    )
    # Its compute placements are the driver's: a 3c at slice 3, where NVML's usual power-of-two
    # alignment would only allow slice 0 (and so two 3c would need two 6g instances).
    assert _x100_fit({"3c.6g.96gb": 2}) == (True, None)
    fits, reason = _x100_fit({"2c.3g.48gb": 1})
    assert not fits and reason is not None and "offers 1c.3g.48gb, 3g.48gb" in reason


def test_compute_profiles_not_read_fall_back_to_the_catalog_then_to_go_nvlibs_rule() -> None:
    a100 = CATALOG.products["A100-40GB"]
    bare = from_catalog(a100, with_compute=False)
    judged = table_product(bare, "NVIDIA A100-SXM4-40GB", 0x20B010DE, 40960, a100)
    seven = judged.gpu_instance_profile("7g.40gb")
    assert (
        seven is not None and seven.compute_profiles == a100.gpu_instance_profile("7g.40gb").compute_profiles
    )  # type: ignore[union-attr]
    x100_bare = MigTable(
        tuple(p.__class__(**{**p.__dict__, "compute_profiles": None}) for p in X100_TABLE.profiles)
    )
    ruled = table_product(x100_bare, "NVIDIA X100", X100_PCI, 98304, None).gpu_instance_profile("6g.96gb")
    assert ruled is not None
    assert [(c.slices, c.max_count, c.placements(6)) for c in ruled.compute_profiles] == [
        (1, 6, (0, 1, 2, 3, 4, 5)),
        (2, 3, (0, 2, 4)),
        (3, 2, (0,)),
        (6, 1, (0,)),
    ]
    assert all(c.unconfirmed == {"compute_profiles": NOT_READ} for c in ruled.compute_profiles)


def test_a_table_that_agrees_with_the_catalog_compares_empty() -> None:
    for key in ("A100-40GB", "H100-80GB", "A30-24GB", "H200-141GB"):
        product = CATALOG.products[key]
        assert compare(from_catalog(product), product) == (), key


def test_disagreements_name_the_profile_the_driver_value_and_the_catalog_value() -> None:
    a100 = CATALOG.products["A100-40GB"]
    driver = with_profile(from_catalog(a100), "3g.20gb", max_count=3, placements=(0, 2, 4))
    renamed = with_profile(driver, "4g.20gb", name=parse_profile("4g.21gb"))
    assert compare(renamed, a100) == (
        "profile 2 (3g.20gb): at most 3; the catalog says 2",
        "profile 2 (3g.20gb): placements {0,2,4}:4; the catalog says {0,4}:4",
        "profile 3: the driver names it 4g.21gb; the catalog 4g.20gb",
    )
    fewer = MigTable(tuple(p for p in from_catalog(a100).profiles if str(p.name) != "1g.10gb"))
    assert compare(fewer, a100) == ("the catalog has 1g.10gb (profile 9); the driver does not offer it",)
