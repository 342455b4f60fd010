"""Does a set of MIG devices fit one GPU, and where exactly?

Input is a `mig-devices` map (profile -> count, where each count is one compute instance,
as in mig-parted). Compute instances are packed into the fewest GPU instances of their profile
(an exhaustive search, never a first fit), then GPU instances are placed on the product's
placement grid by an exhaustive search over placements (never over creation orders). The answer is either a concrete
geometry (a start slot per instance) or a sentence saying why it cannot fit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from migcore.catalog import ComputeProfile, GpuInstanceProfile, Product, ProfileNotOnProductError
from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec, slot_mask
from migcore.profiles import MigProfile


@dataclass(frozen=True)
class FitResult:
    """Verdict of `fit`: a geometry when it fits, else the reason in words."""

    fits: bool
    geometry: GpuGeometry | None = None
    reason: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class _PendingGi:
    profile: GpuInstanceProfile
    compute: list[ComputeInstanceSpec] = field(default_factory=list)


@dataclass(frozen=True)
class _Content:
    """What one GPU instance can hold: a count per compute profile, and one placement of them."""

    counts: tuple[int, ...]
    compute: tuple[ComputeInstanceSpec, ...]


def _describe(counts: Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())


@lru_cache(maxsize=4096)
def _contents(gi: GpuInstanceProfile, cis: tuple[ComputeProfile, ...]) -> tuple[_Content, ...]:
    """Every distinct set of these compute instances one `gi` instance can hold (within each
    compute profile's max count, on its placements, never overlapping), each with a placement."""
    found: dict[tuple[int, ...], _Content] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()

    def walk(first: int, used: int, counts: tuple[int, ...], specs: tuple[ComputeInstanceSpec, ...]) -> None:
        if (used, counts) in seen:
            return
        seen.add((used, counts))
        if any(counts):
            found.setdefault(counts, _Content(counts, tuple(sorted(specs))))
        for j in range(first, len(cis)):
            ci = cis[j]
            if counts[j] >= ci.max_count:
                continue
            for start in ci.placements(gi.slices):
                mask = slot_mask(start, ci.slices)
                if used & mask:
                    continue
                # Named as mig-parted reads it back: the GI's attributes kept (`1g.5gb+me`).
                spec = ComputeInstanceSpec(str(gi.name.with_compute_slices(ci.slices)), start)
                more = (*counts[:j], counts[j] + 1, *counts[j + 1 :])
                walk(j, used | mask, more, (*specs, spec))

    walk(0, 0, (0,) * len(cis), ())
    # Fuller contents first: the search below tries them first and finds few-instance packings early.
    return tuple(sorted(found.values(), key=lambda c: (-sum(c.counts), c.counts)))


def _fewest_instances(target: tuple[int, ...], contents: tuple[_Content, ...]) -> tuple[_Content, ...] | None:
    """The fewest GPU instances whose contents add up to exactly `target` (None: impossible).

    Exhaustive (memoised on what is left): the compute instance of the first profile still
    needed must sit in some instance, so only contents holding one of it are tried there."""
    memo: dict[tuple[int, ...], tuple[_Content, ...] | None] = {}

    def best(left: tuple[int, ...]) -> tuple[_Content, ...] | None:
        if not any(left):
            return ()
        if left in memo:
            return memo[left]
        first = next(i for i, n in enumerate(left) if n)
        choice: tuple[_Content, ...] | None = None
        for content in contents:
            if not content.counts[first] or any(c > n for c, n in zip(content.counts, left, strict=True)):
                continue
            rest = best(tuple(n - c for n, c in zip(left, content.counts, strict=True)))
            if rest is not None and (choice is None or len(rest) + 1 < len(choice)):
                choice = (content, *rest)
        memo[left] = choice
        return choice

    return best(target)


def _pack_compute(
    product: Product, requests: Mapping[MigProfile, int]
) -> tuple[list[_PendingGi], str | None]:
    """Group compute instances into the fewest GPU instances of their profile (exhaustively: a
    first fit would call `2c.7g.40gb` x2 + `3c.7g.40gb` two instances; it fits one)."""
    wanted: dict[GpuInstanceProfile, Counter[ComputeProfile]] = {}
    for profile, count in requests.items():
        if count < 0:
            return [], f"{profile}: count {count} is negative"
        try:
            gi, ci = product.resolve(profile)
        except ProfileNotOnProductError as exc:
            return [], str(exc)
        wanted.setdefault(gi, Counter())[ci] += count
    gis: list[_PendingGi] = []
    # Largest GI first: the order mig-parted flattens in, and the order reasons name them.
    for gi in sorted(wanted, key=lambda g: (-g.placement_size, -g.slices, str(g.name))):
        cis = tuple(sorted(wanted[gi], key=lambda c: (-c.slices, c.nvml_ci_profile_id)))
        target = tuple(wanted[gi][ci] for ci in cis)
        names = _describe(
            Counter({str(gi.name.with_compute_slices(c.slices)): n for c, n in zip(cis, target, strict=True)})
        )
        # A bound first, so that the exact search below never runs on absurd counts.
        least = max(
            -(-sum(c.slices * n for c, n in zip(cis, target, strict=True)) // gi.slices),
            *(-(-n // max(1, c.max_count)) for c, n in zip(cis, target, strict=True)),
        )
        if least > gi.max_count:
            if all(c.slices == gi.slices for c in cis):  # one whole instance each: the bound is exact
                need = f"{gi.name} x{least} needs {least} GPU instances"
            else:
                need = (
                    f"{names} need{'s' if sum(target) == 1 else ''} at least {least} {gi.name} GPU instances"
                )
            return [], f"{need}; {product.key} allows at most {gi.max_count} of {gi.name}"
        contents = _contents(gi, cis)
        for ci, n in zip(cis, target, strict=True):
            if n and not any(c.counts[cis.index(ci)] for c in contents):
                return (
                    [],
                    f"compute profile {gi.name.with_compute_slices(ci.slices)} does not fit in a {gi.name} GPU instance",
                )
        packing = _fewest_instances(target, contents)
        if packing is None:  # pragma: no cover - every single compute instance fits (checked above)
            return [], f"{names} do not fit in {gi.name} GPU instances"
        gis.extend(_PendingGi(gi, list(content.compute)) for content in packing)
    return gis, None


def _check_counts(product: Product, gis: list[_PendingGi]) -> str | None:
    per_profile: Counter[GpuInstanceProfile] = Counter(g.profile for g in gis)
    for profile, n in per_profile.items():
        if n > profile.max_count:
            return (
                f"{profile.name} x{n} needs {n} GPU instances; {product.key} allows at most "
                f"{profile.max_count} of {profile.name}"
            )
    if len(gis) > product.max_instances:
        return f"{len(gis)} GPU instances requested; {product.key} holds at most {product.max_instances}"
    media = [g for g in gis if g.profile.name.has_media_extension]
    if len(media) > 1:
        names = _describe(Counter(str(g.profile.name) for g in media))
        return f"{names}: only one media-extension (+me) instance fits on a GPU"
    if any(g.profile.name.has_all_media for g in gis):
        others = [g for g in gis if not g.profile.name.has_all_media and not g.profile.name.negative]
        if others:
            names = _describe(Counter(str(g.profile.name) for g in others))
            return f"a +me.all instance takes every media engine; only -me profiles may sit beside it, not {names}"
    slices = sum(g.profile.slices for g in gis)
    if slices > product.compute_slices:
        return f"{_describe(_counts(gis))} need {slices} compute slices; {product.key} has {product.compute_slices}"
    return None


def _counts(gis: list[_PendingGi]) -> Counter[str]:
    return Counter(str(g.profile.name) for g in gis)


def _memory_reason(product: Product, gis: list[_PendingGi]) -> str | None:
    grid = product.placement_grid
    used = 0
    placed: list[_PendingGi] = []
    for gi in gis:
        if used + gi.profile.placement_size > grid:
            so_far = _describe(_counts(placed))
            verb = "uses" if len(_counts(placed)) == 1 else "use"
            amount = f"all {grid}" if used == grid else f"{used} of {grid}"
            return f"{so_far} {verb} {amount} memory slices; no room for {gi.profile.name}"
        used += gi.profile.placement_size
        placed.append(gi)
    return None


def _search(gis: list[_PendingGi], grid: int) -> list[int] | None:
    """Exhaustive placement search with memo on (position, occupied mask)."""
    order = sorted(
        range(len(gis)), key=lambda i: (len(gis[i].profile.placements), -gis[i].profile.placement_size)
    )
    profiles = [gis[i].profile for i in order]
    starts: list[int] = [0] * len(order)
    dead: set[tuple[int, int, int]] = set()
    full = slot_mask(0, grid)

    def place(k: int, occupied: int, min_start: int) -> bool:
        if k == len(profiles):
            return True
        if (k, occupied, min_start) in dead:
            return False
        profile = profiles[k]
        for start in profile.placements:
            if start < min_start:
                continue  # identical profiles are placed in increasing order (no symmetric retries)
            mask = slot_mask(start, profile.placement_size)
            if occupied & mask or mask & ~full:
                continue
            starts[k] = start
            same_next = k + 1 < len(profiles) and profiles[k + 1] is profile
            if place(k + 1, occupied | mask, start + 1 if same_next else 0):
                return True
        dead.add((k, occupied, min_start))
        return False

    if not place(0, 0, 0):
        return None
    result = [0] * len(gis)
    for k, i in enumerate(order):
        result[i] = starts[k]
    return result


def _placement_reason(product: Product, gis: list[_PendingGi]) -> str:
    """Name the first instance (largest first) for which no placement is left."""
    for n in range(1, len(gis) + 1):
        if _search(gis[:n], product.placement_grid) is None:
            blocked = gis[n - 1].profile
            before = _describe(_counts(gis[: n - 1]))
            starts = ", ".join(str(s) for s in blocked.placements)
            where = (
                f"{blocked.name} can only start at slot {starts}"
                if len(blocked.placements) == 1
                else (f"{blocked.name} can only start at slots {starts}")
            )
            if before:
                return f"no arrangement fits: with {before} placed, {where} and each is taken"
            return f"no arrangement fits: {where}"
    return "no arrangement fits"


def fit(product: Product, requests: Mapping[MigProfile, int]) -> FitResult:
    """Decide whether `requests` (a mig-devices map) fits one GPU of `product`."""
    key = tuple(sorted((p, c) for p, c in requests.items() if c != 0))
    return _fit_cached(product, key)


@lru_cache(maxsize=65536)
def _fit_cached(product: Product, items: tuple[tuple[MigProfile, int], ...]) -> FitResult:
    requests = dict(items)
    gis, reason = _pack_compute(product, requests)
    if reason is None:
        reason = _check_counts(product, gis) or _memory_reason(product, gis)
    if reason is not None:
        return FitResult(False, reason=reason)
    starts = _search(gis, product.placement_grid)
    if starts is None:
        return FitResult(False, reason=_placement_reason(product, gis))
    instances = tuple(
        GpuInstanceSpec(start, gi.profile.placement_size, str(gi.profile.name), tuple(sorted(gi.compute)))
        for gi, start in zip(gis, starts, strict=True)
    )
    warnings: list[str] = []
    unconfirmed = sorted({str(g.profile.name) for g in gis if not g.profile.placements_confirmed})
    if unconfirmed:
        warnings.append(
            f"placements of {', '.join(unconfirmed)} on {product.key} are inferred, not confirmed"
        )
    return FitResult(True, GpuGeometry(True, instances), warnings=tuple(warnings))


def clear_fit_cache() -> None:
    """Forget memoised placements (benchmarks measuring a cold start)."""
    _fit_cached.cache_clear()
