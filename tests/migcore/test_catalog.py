"""The shipped hardware catalog: lookups by every spelling, and the data's own invariants."""

from __future__ import annotations

import pytest

from migcore.catalog import (
    Catalog,
    UnknownProductError,
    load_catalog,
    normalise_product_label,
    parse_pci_device_id,
)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.mark.parametrize(
    "label",
    [
        "NVIDIA-A100-SXM4-40GB",
        "A100-SXM4-40GB",
        "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
        "NVIDIA-A100-SXM4-40GB-MIG-INVALID",
        "NVIDIA-A100-SXM4-40GB-SHARED",
        "A100-SXM4-40GB-MIG-1g.5gb",
        "NVIDIA-A100-PCIE-40GB",
        "nvidia-a100-sxm4-40gb",
    ],
)
def test_every_label_spelling_finds_the_product(catalog: Catalog, label: str) -> None:
    assert catalog.by_label(label).key == "A100-40GB"


def test_lookup_by_pci_id_and_nvml_name(catalog: Catalog) -> None:
    assert catalog.by_pci_id("0x20B010DE").key == "A100-40GB"
    assert catalog.by_pci_id("0x20B7").key == "A30-24GB"  # bare device id means NVIDIA's
    assert catalog.by_pci_id(0x2BB510DE).key == "RTX-PRO-6000-Blackwell"
    assert catalog.by_nvml_name("NVIDIA H100 80GB HBM3").key == "H100-80GB"
    assert catalog.find("0x233010DE").key == "H100-80GB"
    assert catalog.find("GB200").key == "GB200"


def test_unknown_product_is_a_clear_answer(catalog: Catalog) -> None:
    with pytest.raises(UnknownProductError, match="unknown GPU product") as raised:
        catalog.by_label("NVIDIA-GeForce-RTX-4090")
    assert raised.value.value == "NVIDIA-GeForce-RTX-4090"
    with pytest.raises(UnknownProductError, match="unknown GPU product"):
        catalog.by_pci_id("0x268410DE")


def test_pci_id_parsing() -> None:
    assert parse_pci_device_id("0x20B0") == 0x20B010DE
    assert parse_pci_device_id("0x20b010de") == 0x20B010DE
    with pytest.raises(ValueError, match="is not a PCI device id"):
        parse_pci_device_id("20B0")


def test_label_normalisation_strips_strategy_suffixes() -> None:
    assert normalise_product_label("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb+me") == "h100-80gb-hbm3"


def test_name_drift_resolves_through_aliases(catalog: Catalog) -> None:
    gb200 = catalog.products["GB200"]
    gi = gb200.gpu_instance_profile("1g.24gb")
    assert gi is not None and str(gi.name) == "1g.23gb"
    a100 = catalog.products["A100-80GB"]
    gi = a100.gpu_instance_profile("3g.39gb")
    assert gi is not None and str(gi.name) == "3g.40gb"


def test_rtx_pro_6000_uses_a_twelve_unit_grid(catalog: Catalog) -> None:
    rtx = catalog.products["RTX-PRO-6000-Blackwell"]
    assert rtx.placement_grid == 12
    one_g = rtx.gpu_instance_profile("1g.24gb")
    assert one_g is not None and one_g.placements == (0, 3, 6, 9) and one_g.placement_size == 3


def test_placements_lie_on_the_grid(catalog: Catalog) -> None:
    for product in catalog.products.values():
        for gi in product.profiles:
            for start in gi.placements:
                assert start >= 0 and start + gi.placement_size <= product.placement_grid, (
                    product.key,
                    gi.name,
                )
            assert gi.slices <= product.compute_slices
            assert 1 <= gi.max_count <= product.max_instances


def test_max_counts_fit_the_grid(catalog: Catalog) -> None:
    """A profile's max count can be reached with non-overlapping placements."""
    for product in catalog.products.values():
        for gi in product.profiles:
            taken, count = 0, 0
            for start in gi.placements:
                mask = ((1 << gi.placement_size) - 1) << start
                if not taken & mask:
                    taken |= mask
                    count += 1
            assert count >= gi.max_count, (product.key, str(gi.name))


def test_compute_profiles_follow_the_published_rule(catalog: Catalog) -> None:
    """C-slice CIs in a G-slice GI: C <= G and (C == G or 2C <= G + 1) (MIG guide, go-nvlib)."""
    for product in catalog.products.values():
        for gi in product.profiles:
            sizes = {ci.slices for ci in gi.compute_profiles}
            expected = {c for c in range(1, gi.slices + 1) if c == gi.slices or 2 * c <= gi.slices + 1}
            expected &= {1, 2, 3, 4, 7, 8, 6}
            assert sizes == expected, (product.key, str(gi.name))


def test_labels_ids_and_names_are_unambiguous(catalog: Catalog) -> None:
    # Catalog() raises on a label or PCI id claimed by two products; loading proves it, and
    # every product is reachable by each of its own ids and labels.
    for product in catalog.products.values():
        for pci in product.pci_device_ids:
            assert catalog.by_pci_id(pci) is product
        for label in product.gfd_labels:
            assert catalog.by_label(label) is product
