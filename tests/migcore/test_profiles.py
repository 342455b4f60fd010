"""Profile strings: the go-nvlib grammar, canonical printing, errors that name the bad part."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migcore.profiles import KNOWN_ATTRIBUTES, MigProfile, ProfileError, parse_profile


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("1g.5gb", "1g.5gb"),
        ("1c.1g.5gb", "1g.5gb"),
        ("2c.3g.20gb", "2c.3g.20gb"),
        ("7c.7g.40gb", "7g.40gb"),
        ("1g.5gb+me", "1g.5gb+me"),
        ("1g.24gb+me.all", "1g.24gb+me.all"),
        ("1g.24gb-me", "1g.24gb-me"),
        ("4g.96gb+gfx", "4g.96gb+gfx"),
        ("1g.24gb+me,gfx", "1g.24gb+gfx,me"),
        # mig-parted reads the numbers as integers: leading zeros mean the same profile.
        ("01g.5gb", "1g.5gb"),
        ("1c.03g.020gb+me", "1c.3g.20gb+me"),
        ("007c.7g.40gb", "7g.40gb"),
    ],
)
def test_canonical_form(text: str, canonical: str) -> None:
    assert str(parse_profile(text)) == canonical


def test_compute_profile_knows_its_gpu_instance() -> None:
    profile = parse_profile("1c.3g.20gb")
    assert profile.is_compute_profile
    assert str(profile.gpu_instance) == "3g.20gb"
    assert not parse_profile("3g.20gb").is_compute_profile


def test_attribute_order_does_not_matter() -> None:
    assert parse_profile("1g.24gb+me,gfx") == parse_profile("1g.24gb+gfx,me")


def test_resource_suffix_replaces_plus() -> None:
    assert parse_profile("1g.10gb+me").resource_suffix == "1g.10gb.me"


@pytest.mark.parametrize(
    ("text", "named_part"),
    [
        ("1g.5gx", '"5gx"'),
        ("1x.5gb", '"1x"'),
        ("0g.5gb", '"0g"'),
        ("00g.5gb", '"00g"'),
        ("1g.0gb", '"0gb"'),
        ("4c.3g.20gb", "4 compute slices"),
        ("1g.5gb+me-gfx", 'both "+" and "-"'),
        ("1g.5gb+", "empty attribute list"),
        ("1g.5gb+foo", 'unknown attribute "foo"'),
        ("1g.5gb+me,me", "listed twice"),
        (" 1g.5gb", "spaces"),
        ("1g", "expected"),
        ("1c.2c.3g.20gb", "expected"),
    ],
)
def test_errors_name_the_bad_part(text: str, named_part: str) -> None:
    with pytest.raises(ProfileError) as raised:
        parse_profile(text)
    assert named_part in str(raised.value)


_attributes = st.sampled_from([(), ("me",), ("me.all",), ("gfx",), ("gfx", "me"), ("gfx", "me.all")])


@st.composite
def _profiles(draw: st.DrawFn) -> MigProfile:
    gi = draw(st.integers(1, 8))
    ci = draw(st.integers(1, gi))
    memory = draw(st.integers(1, 300))
    attributes = draw(_attributes)
    negative = bool(attributes) and draw(st.booleans()) and attributes == ("me",)
    return MigProfile(gi, memory, ci, attributes, negative)


@given(_profiles())
def test_print_parse_round_trip(profile: MigProfile) -> None:
    assert parse_profile(str(profile)) == profile


@given(_profiles())
def test_printed_attributes_are_known(profile: MigProfile) -> None:
    assert set(profile.attributes) <= KNOWN_ATTRIBUTES
    again = parse_profile(str(profile))
    assert str(again) == str(profile)
