"""Placement: does a mig-devices map fit one GPU, and where exactly.

Known-valid and known-invalid A100-40GB layouts come from NVIDIA's MIG User Guide:
the "Supported MIG Profiles" page (profile table: max counts 7/1/4/3/2/1/1, and the A100
placement diagram), the "Getting Started" page (`nvidia-smi mig -lgipp` placements
1g {0..6}:1, 1g.10gb {0,2,4,6}:2, 2g {0,2,4}:2, 3g {0,4}:4, 4g {0}:4, 7g {0}:8; 4g.20gb +
3g.20gb supported since R510; `-cgi 9,19,14,19` i.e. 3g+1g+2g+1g succeeds). The combinations
listed below are the ones the guide's A100 combination diagram shows, read as start slots.
A30 uses its 4-unit table and RTX PRO 6000 its 12-unit table (1g {0,3,6,9}:3, 2g {0,6}:6,
4g {0}:12) from the same guide, plus nvml.h's rule that a *_ALL_ME instance "prevents
allocation of all but _NO_ME profiles".
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from migcore.catalog import Catalog, ComputeProfile, GpuInstanceProfile, Product, load_catalog
from migcore.geometry import GpuGeometry
from migcore.placement import FitResult, fit
from migcore.profiles import MigProfile, parse_profile

CATALOG: Catalog = load_catalog()


def _fit(product: str, layout: dict[str, int]) -> FitResult:
    return fit(CATALOG.products[product], {parse_profile(p): n for p, n in layout.items()})


A100_VALID = [
    {"7g.40gb": 1},
    {"4g.20gb": 1, "3g.20gb": 1},
    {"4g.20gb": 1, "2g.10gb": 1, "1g.5gb": 1},
    {"4g.20gb": 1, "1g.5gb": 3},
    {"3g.20gb": 2},
    {"3g.20gb": 1, "2g.10gb": 2},
    {"3g.20gb": 1, "2g.10gb": 1, "1g.5gb": 2},
    {"3g.20gb": 1, "1g.5gb": 4},
    {"2g.10gb": 3, "1g.5gb": 1},
    {"2g.10gb": 2, "1g.5gb": 3},
    {"2g.10gb": 1, "1g.5gb": 5},
    {"1g.5gb": 7},
    {"1g.10gb": 4},
    {"1g.10gb": 2, "3g.20gb": 1},
    {"1g.5gb+me": 1, "1g.5gb": 6},
    {"4g.20gb": 1, "1g.10gb": 1, "1g.5gb": 1},
    # compute instances packed into GPU instances
    {"1c.7g.40gb": 7},
    {"4c.7g.40gb": 1, "3c.7g.40gb": 1},
    {"2c.3g.20gb": 1, "1c.3g.20gb": 1, "3g.20gb": 1},
    {"1c.4g.20gb": 4, "3g.20gb": 1},
]

A100_INVALID = [
    ({"4g.20gb": 2}, "allows at most 1 of 4g.20gb"),
    ({"3g.20gb": 3}, "allows at most 2 of 3g.20gb"),
    ({"1g.5gb": 8}, "allows at most 7"),
    ({"1g.5gb+me": 2}, "allows at most 1"),
    ({"7g.40gb": 1, "1g.5gb": 1}, "need 8 compute slices; A100-40GB has 7"),
    ({"3g.20gb": 2, "1g.5gb": 1}, "no room for 1g.5gb"),
    ({"1g.10gb": 4, "1g.5gb": 1}, "no room for 1g.5gb"),
    ({"4g.20gb": 1, "2g.10gb": 2}, "compute slices"),
    ({"2g.10gb": 3, "1g.5gb": 2}, "compute slices"),
    ({"4g.20gb": 1, "1g.5gb": 4}, "compute slices"),
    ({"1c.7g.40gb": 8}, "allows at most 1 of 7g.40gb"),
    ({"2g.20gb": 1}, "does not exist on A100-40GB"),
]


@pytest.mark.parametrize("layout", A100_VALID, ids=lambda d: "+".join(f"{k}x{v}" for k, v in d.items()))
def test_a100_published_combinations_fit(layout: dict[str, int]) -> None:
    result = _fit("A100-40GB", layout)
    assert result.fits, result.reason
    assert result.geometry is not None
    assert result.geometry.device_counts() == Counter({str(parse_profile(k)): v for k, v in layout.items()})


@pytest.mark.parametrize(("layout", "reason"), A100_INVALID, ids=str)
def test_a100_impossible_combinations_are_refused_with_a_reason(layout: dict[str, int], reason: str) -> None:
    result = _fit("A100-40GB", layout)
    assert not result.fits
    assert result.reason is not None and reason in result.reason


def test_a100_four_plus_three_uses_the_only_placements() -> None:
    result = _fit("A100-40GB", {"4g.20gb": 1, "3g.20gb": 1})
    assert result.geometry is not None
    assert result.geometry.summary() == "4g.20gb@0, 3g.20gb@4"


def test_reason_names_what_fills_the_gpu() -> None:
    result = _fit("A100-40GB", {"3g.20gb": 2, "1g.5gb": 1})
    assert result.reason == "3g.20gb x2 uses all 8 memory slices; no room for 1g.5gb"


@pytest.mark.parametrize(
    ("layout", "fits"),
    [
        ({"4g.24gb": 1}, True),
        ({"2g.12gb": 2}, True),
        ({"2g.12gb": 1, "1g.6gb": 2}, True),
        ({"1g.6gb": 4}, True),
        ({"2g.12gb+me": 1, "2g.12gb": 1}, True),
        ({"1g.6gb+me": 1, "1g.6gb": 3}, True),
        ({"2g.12gb": 2, "1g.6gb": 1}, False),
        ({"1g.6gb": 5}, False),
        ({"4g.24gb": 1, "1g.6gb": 1}, False),
        ({"2g.12gb+me": 2}, False),
        # one JPEG/OFA on A30: the two +me profiles exclude each other
        ({"1g.6gb+me": 1, "2g.12gb+me": 1}, False),
    ],
)
def test_a30(layout: dict[str, int], fits: bool) -> None:
    assert _fit("A30-24GB", layout).fits is fits


@pytest.mark.parametrize(
    ("layout", "fits"),
    [
        ({"4g.96gb": 1}, True),
        ({"2g.48gb": 2}, True),
        ({"2g.48gb": 1, "1g.24gb": 2}, True),
        ({"1g.24gb": 4}, True),
        ({"1g.24gb+gfx": 4}, True),
        ({"1g.24gb+me.all": 1, "1g.24gb-me": 3}, True),
        ({"2g.48gb+me.all": 1, "2g.48gb-me": 1}, True),
        ({"1g.24gb+me.all": 1, "1g.24gb": 1}, False),
        ({"1g.24gb+me.all": 1, "2g.48gb+me.all": 1}, False),
        ({"1g.24gb+me": 1, "1g.24gb+me.all": 1}, False),
        ({"2g.48gb": 2, "1g.24gb": 1}, False),
        ({"1g.24gb": 5}, False),
    ],
)
def test_rtx_pro_6000(layout: dict[str, int], fits: bool) -> None:
    assert _fit("RTX-PRO-6000-Blackwell", layout).fits is fits


def test_rtx_pro_6000_starts_are_on_its_twelve_unit_grid() -> None:
    result = _fit("RTX-PRO-6000-Blackwell", {"2g.48gb": 1, "1g.24gb": 2})
    assert result.geometry is not None
    assert {(gi.profile, gi.start, gi.size) for gi in result.geometry.instances} == {
        ("2g.48gb", 0, 6),
        ("1g.24gb", 6, 3),
        ("1g.24gb", 9, 3),
    }


def test_media_instance_keeps_its_attribute_in_compute_names() -> None:
    result = _fit("A100-40GB", {"1g.5gb+me": 1})
    assert result.geometry is not None
    assert result.geometry.device_counts() == Counter({"1g.5gb+me": 1})


def test_inferred_placements_are_warned_about() -> None:
    result = _fit("H200-141GB", {"3g.71gb": 2})
    assert result.fits
    assert any("inferred" in w for w in result.warnings)
    assert not _fit("A100-40GB", {"3g.20gb": 2}).warnings


# --- properties -------------------------------------------------------------------------------

_PRODUCTS = [CATALOG.products[k] for k in ("A100-40GB", "A30-24GB", "RTX-PRO-6000-Blackwell", "H100-80GB")]


def _names(product: Product) -> list[MigProfile]:
    return [gi.name.with_compute_slices(ci.slices) for gi in product.profiles for ci in gi.compute_profiles]


@st.composite
def _requests(draw: st.DrawFn, gi_only: bool = False) -> tuple[Product, dict[MigProfile, int]]:
    product = draw(st.sampled_from(_PRODUCTS))
    names = [p for p in _names(product) if not (gi_only and p.is_compute_profile)]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    return product, {p: draw(st.integers(1, 4)) for p in chosen}


def _check_geometry(product: Product, geometry: GpuGeometry) -> None:
    occupied = 0
    per_profile: Counter[str] = Counter()
    for gi in geometry.instances:
        profile = product.gpu_instance_profile(gi.profile)
        assert profile is not None
        assert gi.start in profile.placements
        assert gi.size == profile.placement_size
        assert gi.start + gi.size <= product.placement_grid
        mask = ((1 << gi.size) - 1) << gi.start
        assert not occupied & mask, "overlapping GPU instances"
        occupied |= mask
        per_profile[gi.profile] += 1
        used = 0
        for ci in gi.compute:
            ci_slices = parse_profile(ci.profile).compute_slices
            ci_mask = ((1 << ci_slices) - 1) << ci.start
            assert not used & ci_mask and ci.start + ci_slices <= profile.slices
            used |= ci_mask
    for name, count in per_profile.items():
        profile = product.gpu_instance_profile(name)
        assert profile is not None and count <= profile.max_count
    assert len(geometry.instances) <= product.max_instances
    assert sum(product.gpu_instance_profile(gi.profile).slices for gi in geometry.instances) <= (  # type: ignore[union-attr]
        product.compute_slices
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_every_returned_placement_is_legal(case: tuple[Product, dict[MigProfile, int]]) -> None:
    product, requests = case
    result = fit(product, requests)
    if result.fits:
        assert result.geometry is not None
        _check_geometry(product, result.geometry)
        assert result.geometry.device_counts() == Counter({str(p): n for p, n in requests.items()})
    else:
        assert result.reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests(), st.data())
def test_adding_an_instance_never_makes_a_layout_fit(
    case: tuple[Product, dict[MigProfile, int]], data: st.DataObject
) -> None:
    product, requests = case
    if fit(product, requests).fits:
        return
    extra = data.draw(st.sampled_from(_names(product)))
    bigger = dict(requests)
    bigger[extra] = bigger.get(extra, 0) + 1
    assert not fit(product, bigger).fits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests(), st.randoms())
def test_fit_does_not_depend_on_request_order(
    case: tuple[Product, dict[MigProfile, int]], rnd: object
) -> None:
    product, requests = case
    items = list(requests.items())
    rnd.shuffle(items)  # type: ignore[attr-defined]
    assert fit(product, dict(items)) == fit(product, requests)


def _brute_force_fits(product: Product, requests: dict[MigProfile, int]) -> bool:
    """Oracle: try every assignment of starts (GPU-instance profiles only, small requests)."""
    gis = []
    for profile, count in requests.items():
        gi = product.gpu_instance_profile(profile)
        if gi is None:
            return False
        gis.extend([gi] * count)
    counts = Counter(id(g) for g in gis)
    if any(counts[id(g)] > g.max_count for g in gis) or len(gis) > product.max_instances:
        return False
    if sum(g.slices for g in gis) > product.compute_slices:
        return False
    if sum(1 for g in gis if g.name.has_media_extension) > 1:
        return False
    if any(g.name.has_all_media for g in gis) and any(
        not g.name.has_all_media and not g.name.negative for g in gis
    ):
        return False
    for starts in itertools.product(*(g.placements for g in gis)):
        occupied = 0
        for gi, start in zip(gis, starts, strict=True):
            mask = ((1 << gi.placement_size) - 1) << start
            if occupied & mask:
                break
            occupied |= mask
        else:
            return True
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests(gi_only=True))
def test_search_agrees_with_brute_force(case: tuple[Product, dict[MigProfile, int]]) -> None:
    product, requests = case
    while sum(requests.values()) > 5:  # keep the oracle's search small
        profile = next(iter(requests))
        requests = {p: c for p, c in requests.items() if p is not profile}
        if not requests:
            return
    assert fit(product, requests).fits is _brute_force_fits(product, requests)


def test_compute_instances_are_packed_exhaustively_not_first_fit() -> None:
    # mig-parted's own tests: one 7g instance holds 2c@0, 2c@2 and 3c@4; a first fit that puts the
    # 3c at 0 leaves no room for the second 2c and called it "needs 2 GPU instances".
    result = _fit("A100-40GB", {"2c.7g.40gb": 2, "3c.7g.40gb": 1})
    assert result.fits, result.reason
    assert result.geometry is not None
    ((gi),) = result.geometry.instances
    assert [(c.profile, c.start) for c in gi.compute] == [
        ("2c.7g.40gb", 0),
        ("2c.7g.40gb", 2),
        ("3c.7g.40gb", 4),
    ]
    assert _fit("A100-40GB", {"1c.3g.20gb": 1, "2c.3g.20gb": 1, "3g.20gb": 1}).fits
    assert _fit("A100-40GB", {"2c.7g.40gb": 3, "1c.7g.40gb": 1}).fits
    refused = _fit("A100-40GB", {"3c.7g.40gb": 2, "2c.7g.40gb": 1})
    assert (
        refused.reason
        == "3c.7g.40gb x2, 2c.7g.40gb need at least 2 7g.40gb GPU instances; A100-40GB allows at most 1 of 7g.40gb"
    )


def _brute_force_instances(gi: GpuInstanceProfile, cis: list[ComputeProfile]) -> int | None:
    """Oracle: the fewest `gi` instances holding `cis`, trying every assignment to instances and
    every start of every compute instance (None: some compute instance fits no instance at all)."""

    def holds(group: list[ComputeProfile]) -> bool:
        per_profile = Counter(id(c) for c in group)
        if any(per_profile[id(c)] > c.max_count for c in group):
            return False
        for starts in itertools.product(*(c.placements(gi.slices) for c in group)):
            used = 0
            for ci, start in zip(group, starts, strict=True):
                mask = ((1 << ci.slices) - 1) << start
                if used & mask or start + ci.slices > gi.slices:
                    break
                used |= mask
            else:
                return True
        return False

    if not all(holds([c]) for c in cis):
        return None
    for k in range(1, len(cis) + 1):
        for assignment in itertools.product(range(k), repeat=len(cis)):
            groups = [[c for c, a in zip(cis, assignment, strict=True) if a == b] for b in range(k)]
            if all(holds(g) for g in groups if g):
                return k
    raise AssertionError("unreachable: one instance per compute instance always works")


@st.composite
def _compute_requests(draw: st.DrawFn) -> tuple[Product, GpuInstanceProfile, dict[ComputeProfile, int]]:
    product = draw(st.sampled_from(_PRODUCTS))
    gi = draw(st.sampled_from([g for g in product.profiles if len(g.compute_profiles) > 1]))
    chosen = draw(st.lists(st.sampled_from(gi.compute_profiles), min_size=1, max_size=3, unique_by=id))
    counts = {ci: draw(st.integers(1, 3)) for ci in chosen}
    while sum(counts.values()) > 6:  # keep the oracle's search small
        counts.pop(next(iter(counts)))
    return product, gi, counts


_A100_7G = CATALOG.products["A100-40GB"].profiles[-1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_compute_requests())
@example(
    (
        CATALOG.products["A100-40GB"],
        _A100_7G,
        {_A100_7G.compute_profiles[1]: 2, _A100_7G.compute_profiles[2]: 1},
    )
)
def test_compute_packing_agrees_with_brute_force(
    case: tuple[Product, GpuInstanceProfile, dict[ComputeProfile, int]],
) -> None:
    product, gi, counts = case
    least = _brute_force_instances(gi, [ci for ci, n in counts.items() for _ in range(n)])
    assert least is not None  # every catalog compute profile fits its GPU instance
    requests = {gi.name.with_compute_slices(ci.slices): n for ci, n in counts.items()}
    result = fit(product, requests)
    placeable = least <= gi.max_count and _brute_force_fits(product, {gi.name: least})
    assert result.fits is placeable, (requests, least, result.reason)
    if result.fits:
        assert result.geometry is not None
        assert len(result.geometry.instances) == least
        _check_geometry(product, result.geometry)
