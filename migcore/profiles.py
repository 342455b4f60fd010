"""MIG profile strings: `[Cc.]Gg.NGBgb[+attr[,attr]]` or `...-attr[,attr]`.

This is the grammar mig-parted and go-nvlib use for `mig-devices` keys and Kubernetes
resource names. A profile names either a GPU instance (`3g.20gb`) or a compute instance
inside one (`1c.3g.20gb`, C < G). Parsing is strict and every error names the bad part,
because these strings come straight from admins' YAML. Numbers with leading zeros (`01g.5gb`)
mean what mig-parted reads them as (`1g.5gb`, its integer parsing drops the zeros) and are
returned in canonical form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ATTR_MEDIA: str = "me"
ATTR_MEDIA_ALL: str = "me.all"
ATTR_GRAPHICS: str = "gfx"
KNOWN_ATTRIBUTES: frozenset[str] = frozenset({ATTR_MEDIA, ATTR_MEDIA_ALL, ATTR_GRAPHICS})

_NUMBERED = re.compile(r"^(0*[1-9][0-9]*)(c|g|gb)$")
_ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9.]*$")


class ProfileError(ValueError):
    """A profile string that does not follow the grammar; the message names the bad part."""


@dataclass(frozen=True, order=True)
class MigProfile:
    """A parsed profile. Attributes are kept sorted so equal profiles compare equal."""

    gi_slices: int
    memory_gb: int
    compute_slices: int
    attributes: tuple[str, ...] = ()
    negative: bool = False

    @property
    def is_compute_profile(self) -> bool:
        """True for `Cc.Gg...` with C < G: a compute instance that shares its GPU instance."""
        return self.compute_slices != self.gi_slices

    @property
    def gpu_instance(self) -> MigProfile:
        """The GPU-instance profile this profile lives in (itself when C == G)."""
        if not self.is_compute_profile:
            return self
        return MigProfile(self.gi_slices, self.memory_gb, self.gi_slices, self.attributes, self.negative)

    def with_compute_slices(self, compute_slices: int) -> MigProfile:
        return MigProfile(self.gi_slices, self.memory_gb, compute_slices, self.attributes, self.negative)

    @property
    def has_media_extension(self) -> bool:
        return not self.negative and (ATTR_MEDIA in self.attributes or ATTR_MEDIA_ALL in self.attributes)

    @property
    def has_all_media(self) -> bool:
        return not self.negative and ATTR_MEDIA_ALL in self.attributes

    @property
    def resource_suffix(self) -> str:
        """The form used in `nvidia.com/mig-<suffix>` resources and GFD labels ('+' becomes '.')."""
        return str(self).replace("+", ".")

    def __str__(self) -> str:
        base = f"{self.gi_slices}g.{self.memory_gb}gb"
        if self.is_compute_profile:
            base = f"{self.compute_slices}c.{base}"
        if self.attributes:
            base += ("-" if self.negative else "+") + ",".join(self.attributes)
        return base


def _number(part: str, unit: str, text: str) -> int:
    match = _NUMBERED.match(part)
    if match is None or match.group(2) != unit:
        example = {"c": "1c", "g": "3g", "gb": "20gb"}[unit]
        raise ProfileError(f'"{text}": "{part}" is not a {_UNIT_NAMES[unit]} like "{example}"')
    return int(match.group(1))


_UNIT_NAMES = {"c": "compute-slice count", "g": "GPU-slice count", "gb": "memory size"}


def _split_attributes(text: str) -> tuple[str, tuple[str, ...], bool]:
    plus, minus = text.find("+"), text.find("-")
    if plus >= 0 and minus >= 0:
        raise ProfileError(f'"{text}": cannot have both "+" and "-" attributes')
    cut = plus if plus >= 0 else minus
    if cut < 0:
        return text, (), False
    body, raw = text[:cut], text[cut + 1 :]
    if not raw:
        raise ProfileError(f'"{text}": empty attribute list after "{text[cut]}"')
    attributes = raw.split(",")
    for attribute in attributes:
        if not _ATTRIBUTE.match(attribute) or attribute.endswith("."):
            raise ProfileError(f'"{text}": attribute "{attribute}" is not valid (letters, digits and dots)')
        if attribute not in KNOWN_ATTRIBUTES:
            known = ", ".join(sorted(KNOWN_ATTRIBUTES))
            raise ProfileError(f'"{text}": unknown attribute "{attribute}" (known: {known})')
    if len(set(attributes)) != len(attributes):
        raise ProfileError(f'"{text}": attribute listed twice')
    return body, tuple(sorted(attributes)), minus >= 0 and plus < 0


@lru_cache(maxsize=4096)
def parse_profile(text: str) -> MigProfile:
    """Parse a profile string; raise ProfileError naming the bad part."""
    if not isinstance(text, str):
        raise ProfileError(f"profile must be a string, not {type(text).__name__}")
    if text != text.strip() or not text:
        raise ProfileError(f'"{text}": empty, or leading or trailing spaces')
    body, attributes, negative = _split_attributes(text)
    parts = body.split(".")
    if len(parts) == 2:
        g_part, gb_part = parts
        c_slices = None
    elif len(parts) == 3:
        c_part, g_part, gb_part = parts
        c_slices = _number(c_part, "c", text)
    else:
        raise ProfileError(f'"{text}": expected "<G>g.<N>gb" or "<C>c.<G>g.<N>gb"')
    g_slices = _number(g_part, "g", text)
    memory_gb = _number(gb_part, "gb", text)
    if c_slices is None:
        c_slices = g_slices
    if c_slices > g_slices:
        raise ProfileError(f'"{text}": {c_slices} compute slices do not fit in a {g_slices}g GPU instance')
    return MigProfile(g_slices, memory_gb, c_slices, attributes, negative)
