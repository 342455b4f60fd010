"""The smallest set of NVML operations that turns each GPU's current MIG layout into the desired one.

mig-parted clears and rebuilds every GPU whose layout differs and resets every GPU on a mode
change; here a GPU that already matches gets no operation, GPU instances that can stay where
they are stay (with their compute instances, or with only the compute instances that change),
everything is destroyed before anything is created, and only GPUs whose MIG mode changes get
`set-mig-mode` + `reset-gpu`. The plan is plain data: the reconciler executes it through NVML,
logs `describe()` and publishes it in an Event; `pods_to_move` says which workloads it disturbs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar, get_args

from migcore.catalog import Product, aligned_compute_starts
from migcore.geometry import ComputeInstanceSpec, GpuGeometry, GpuInstanceSpec, slot_mask
from migcore.profiles import parse_profile
from migcore.wording import index_ranges

OpName = Literal["set-mig-mode", "reset-gpu", "destroy-ci", "destroy-gi", "create-gi", "create-ci"]
OP_NAMES: tuple[str, ...] = get_args(OpName)

K = TypeVar("K")
# Where a workload runs: (GPU index, start of its GPU instance; None = the whole GPU or unknown).
DevicePlacement = tuple[int, int | None]


@dataclass(frozen=True)
class Operation:
    """One NVML step. `start`: GI start (placement units) for *-gi, CI start (compute slices) for *-ci."""

    op: OpName
    gpu: int
    profile: str | None = None
    start: int | None = None
    gi_start: int | None = None
    enabled: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        for name in ("gpu", "profile", "start", "gi_start", "enabled"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> Operation:
        """The inverse of `to_json` (for plans persisted across a reconciler restart)."""
        op = raw.get("op")
        if op not in OP_NAMES:
            raise ValueError(f"unknown operation {op!r} (known: {', '.join(OP_NAMES)})")
        gpu = raw.get("gpu")
        if not isinstance(gpu, int):
            raise ValueError(f"operation {op}: gpu must be an integer")
        return Operation(
            op=op,
            gpu=gpu,
            profile=raw.get("profile"),
            start=raw.get("start"),
            gi_start=raw.get("gi_start"),
            enabled=raw.get("enabled"),
        )

    def describe(self, with_gpu: bool = True) -> str:
        """`create-gi 3g.20gb@4 on GPU 0`: the wording used in reasons and logs."""
        on = f" on GPU {self.gpu}" if with_gpu else ""
        if self.op == "set-mig-mode":
            return f"set-mig-mode {'enabled' if self.enabled else 'disabled'}{on}"
        if self.op == "reset-gpu":
            return f"reset-gpu{on}"
        where = f"{self.profile}@{self.start}"
        if self.gi_start is not None:
            where += f" in GI@{self.gi_start}"
        return f"{self.op} {where}{on}"


@dataclass(frozen=True)
class GpuPlan:
    """The operations for one GPU, from `current` to `desired`, in execution order."""

    index: int
    current: GpuGeometry
    desired: GpuGeometry
    operations: tuple[Operation, ...]
    affected_gi_starts: frozenset[int] = field(default_factory=frozenset)

    @property
    def changes(self) -> bool:
        return bool(self.operations)

    @property
    def needs_reset(self) -> bool:
        return any(op.op == "reset-gpu" for op in self.operations)

    @property
    def mode_changes(self) -> bool:
        """A MIG mode change disturbs the whole GPU (every workload on it must move)."""
        return self.current.mig_enabled != self.desired.mig_enabled

    @property
    def disturbs_workloads(self) -> bool:
        """False for a plan that only clears a pending MIG mode: no instance or process is touched."""
        return self.mode_changes or any(op.op != "set-mig-mode" for op in self.operations)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "operations": [op.to_json() for op in self.operations]}

    def counts(self) -> Counter[str]:
        return Counter(op.op for op in self.operations)

    def describe(self) -> str:
        if not self.changes:
            return f"GPU {self.index}: unchanged ({self.current.summary()})"
        counts = self.counts()
        parts = [f"{n} {name}" for name, n in counts.items()]  # in execution order
        return (
            f"GPU {self.index}: {self.current.summary()} -> {self.desired.summary()} "
            f"({len(self.operations)} operations: {', '.join(parts)})"
        )


@dataclass(frozen=True)
class NodePlan:
    gpus: tuple[GpuPlan, ...]

    @property
    def changed(self) -> tuple[GpuPlan, ...]:
        return tuple(gpu for gpu in self.gpus if gpu.changes)

    @property
    def operations(self) -> tuple[Operation, ...]:
        return tuple(op for gpu in self.gpus for op in gpu.operations)

    def to_json(self) -> dict[str, Any]:
        return {"gpus": [gpu.to_json() for gpu in self.gpus]}

    def summary(self) -> str:
        """`2 of 8 GPUs change, 14 operations, 0 GPU resets` (or that nothing changes)."""
        changed = self.changed
        if not changed:
            return f"no change: all {len(self.gpus)} GPUs already match"
        resets = sum(1 for gpu in changed if gpu.needs_reset)
        return (
            f"{len(changed)} of {len(self.gpus)} GPUs change, {len(self.operations)} operations, "
            f"{resets} GPU reset{'s' if resets != 1 else ''}"
        )

    def describe(self) -> str:
        """Human text for logs and the Event: what changes per GPU, and which GPUs stay."""
        changed = self.changed
        if not changed:
            return self.summary()
        lines = [gpu.describe() for gpu in changed]
        unchanged = [gpu.index for gpu in self.gpus if not gpu.changes]
        if unchanged:
            lines.append(f"unchanged: GPU {index_ranges(unchanged)}")
        return self.summary() + "; " + "; ".join(lines)


def _plan_mode_change(index: int, current: GpuGeometry, desired: GpuGeometry) -> GpuPlan:
    """Empty the GPU (NVML refuses to disable MIG while instances exist), flip the mode, reset, build."""
    ops = [
        Operation("destroy-ci", index, ci.profile, ci.start, gi.start)
        for gi in current.instances
        for ci in gi.compute
    ]
    ops += [Operation("destroy-gi", index, gi.profile, gi.start) for gi in current.instances]
    ops.append(Operation("set-mig-mode", index, enabled=desired.mig_enabled))
    ops.append(Operation("reset-gpu", index))
    ops += [Operation("create-gi", index, gi.profile, gi.start) for gi in desired.instances]
    ops += [
        Operation("create-ci", index, ci.profile, ci.start, gi.start)
        for gi in desired.instances
        for ci in gi.compute
    ]
    return GpuPlan(index, current, desired, tuple(ops), frozenset(gi.start for gi in current.instances))


def plan_gpu(index: int, current: GpuGeometry, desired: GpuGeometry) -> GpuPlan:
    """The operations that turn `current` into exactly `desired` on GPU `index` (none if equal).

    Order: destroy compute instances, destroy GPU instances, (mode change + reset), create GPU
    instances, create compute instances. A GPU instance with the same profile at the same start
    in both layouts is kept; only its differing compute instances are destroyed and created.
    A plan never leaves a MIG mode pending (`desired.mig_pending` is not planned for): a mode
    pending on `current` is activated by the mode change that wants it, or else set back first.
    Only a GPU left exactly as it is (`desired == current`, e.g. one no config entry covers)
    keeps its pending mode.
    """
    if current == desired:
        return GpuPlan(index, current, desired, ())
    desired = desired.settled()
    if current == desired:
        return GpuPlan(index, current, desired, ())
    if current.mig_enabled != desired.mig_enabled:
        return _plan_mode_change(index, current, desired)
    ops: list[Operation] = []
    if current.mig_pending is not None:
        ops.append(Operation("set-mig-mode", index, enabled=current.mig_enabled))
        if current.settled() == desired:
            return GpuPlan(index, current, desired, tuple(ops))
    current_by_key = {(gi.start, gi.profile): gi for gi in current.instances}
    desired_by_key = {(gi.start, gi.profile): gi for gi in desired.instances}
    destroy_ci: list[Operation] = []
    destroy_gi: list[Operation] = []
    create_gi: list[Operation] = []
    create_ci: list[Operation] = []
    affected: set[int] = set()
    for key, gi in current_by_key.items():
        target = desired_by_key.get(key)
        if target is None:
            destroy_ci += [
                Operation("destroy-ci", index, ci.profile, ci.start, gi.start) for ci in gi.compute
            ]
            destroy_gi.append(Operation("destroy-gi", index, gi.profile, gi.start))
            affected.add(gi.start)
            continue
        kept = set(target.compute)
        gone = [ci for ci in gi.compute if ci not in kept]
        destroy_ci += [Operation("destroy-ci", index, ci.profile, ci.start, gi.start) for ci in gone]
        if gone:
            affected.add(gi.start)
    for key, gi in desired_by_key.items():
        source = current_by_key.get(key)
        have = set() if source is None else set(source.compute)
        if source is None:
            create_gi.append(Operation("create-gi", index, gi.profile, gi.start))
        create_ci += [
            Operation("create-ci", index, ci.profile, ci.start, gi.start)
            for ci in gi.compute
            if ci not in have
        ]
    ops += destroy_ci + destroy_gi + create_gi + create_ci
    return GpuPlan(index, current, desired, tuple(ops), frozenset(affected))


def plan_node(current: Mapping[int, GpuGeometry], desired: Mapping[int, GpuGeometry]) -> NodePlan:
    """A plan for every GPU in `current`; GPUs absent from `desired` are untouched."""
    missing = sorted(set(desired) - set(current))
    if missing:
        raise ValueError(
            f"the desired layout names GPU {index_ranges(missing)}, which the node does not have"
        )
    return NodePlan(tuple(plan_gpu(i, current[i], desired.get(i, current[i])) for i in sorted(current)))


class _Verdict(Protocol):
    """The part of `migcore.check.GpuVerdict` the planner reads."""

    @property
    def index(self) -> int: ...
    @property
    def entry(self) -> str | None: ...
    @property
    def mig_enabled(self) -> bool | None: ...
    @property
    def geometry(self) -> GpuGeometry | None: ...
    @property
    def judge(self) -> Product | None: ...


class _Result(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def valid(self) -> bool: ...
    @property
    def errors(self) -> tuple[str, ...]: ...
    @property
    def gpus(self) -> Sequence[_Verdict]: ...


def desired_geometries(result: _Result, current: Mapping[int, GpuGeometry]) -> dict[int, GpuGeometry]:
    """The layout each GPU should have under a checked config (`migcore.check.CheckResult`).

    A GPU no entry applies to keeps its current layout. Where the config's layout holds the same
    instances as the GPU, in other places, it is moved onto the current places (`keep_in_place`,
    with the placements of what judged that GPU: its driver's table, else its catalog product)
    so that the plan leaves those instances alone.
    """
    if not result.valid:
        raise ValueError(f'config "{result.name}" is not valid: {"; ".join(result.errors)}')
    out: dict[int, GpuGeometry] = {}
    for verdict in result.gpus:
        now = current.get(verdict.index)
        if verdict.entry is None or verdict.mig_enabled is None:
            if now is not None:  # no entry applies (or nothing is said about the mode): untouched
                out[verdict.index] = now
            continue
        if not verdict.mig_enabled:
            out[verdict.index] = GpuGeometry(False)
            continue
        if verdict.geometry is None:
            # Never "MIG on, no instances" by default: that would destroy what nothing judged.
            raise ValueError(f'config "{result.name}": no layout was judged for GPU {verdict.index}')
        target = verdict.geometry
        out[verdict.index] = target if now is None else keep_in_place(target, now, verdict.judge)
    return out


# --- keeping instances where they are -------------------------------------------------------------


def _valid_starts(product: Product | None, profile: str, size: int) -> tuple[int, ...]:
    """Where `product` places this GI profile (none when it has no such profile of that size)."""
    gi = None if product is None else product.gpu_instance_profile(profile)
    if gi is None or gi.placement_size != size or str(gi.name) != profile:
        return ()
    return gi.placements


def _rebase_compute(
    gi_profile: str, want: Sequence[ComputeInstanceSpec], have: Sequence[ComputeInstanceSpec]
) -> tuple[ComputeInstanceSpec, ...]:
    """`want`'s CI profiles, keeping as many of `have`'s CIs (same profile and start) as can stay
    while the rest still fit (an exhaustive search: CI sets are a handful; `want` if nothing stays)."""
    needed = Counter(ci.profile for ci in want)
    keepable = [ci for ci in sorted(have) if ci.profile in needed]
    for r in range(len(keepable), 0, -1):
        for kept in itertools.combinations(keepable, r):
            kept_counts = Counter(ci.profile for ci in kept)
            if any(n > needed[p] for p, n in kept_counts.items()):
                continue
            left = needed - kept_counts
            used = 0
            for ci in kept:
                mask = slot_mask(ci.start, parse_profile(ci.profile).compute_slices)
                if used & mask:
                    break
                used |= mask
            else:
                rest = _place_compute(gi_profile, sorted(left.elements()), used)
                if rest is not None:
                    return tuple(sorted((*kept, *rest)))
    return tuple(sorted(want))


def _place_compute(gi_profile: str, profiles: Sequence[str], used: int) -> list[ComputeInstanceSpec] | None:
    """Starts for `profiles` inside a `gi_profile` GI around the `used` slices (backtracking)."""
    order = sorted(profiles, key=lambda p: -parse_profile(p).compute_slices)
    gi_slices = parse_profile(gi_profile).gi_slices
    placed: list[ComputeInstanceSpec] = []

    def place(k: int, taken: int) -> bool:
        if k == len(order):
            return True
        size = parse_profile(order[k]).compute_slices
        for start in aligned_compute_starts(size, gi_slices):
            mask = slot_mask(start, size)
            if not taken & mask:
                placed.append(ComputeInstanceSpec(order[k], start))
                if place(k + 1, taken | mask):
                    return True
                placed.pop()
        return False

    return placed if place(0, used) else None


def _place_rest(
    rest: Sequence[GpuInstanceSpec], occupied: int, candidates: Mapping[GpuInstanceSpec, Sequence[int]]
) -> list[int] | None:
    """Starts for `rest` that avoid `occupied` and each other (small backtracking search)."""
    order = sorted(range(len(rest)), key=lambda i: (len(candidates[rest[i]]), -rest[i].size))
    starts = [0] * len(rest)

    def place(k: int, used: int) -> bool:
        if k == len(order):
            return True
        gi = rest[order[k]]
        for start in candidates[gi]:
            mask = slot_mask(start, gi.size)
            if not used & mask:
                starts[order[k]] = start
                if place(k + 1, used | mask):
                    return True
        return False

    return starts if place(0, occupied) else None


def keep_in_place(desired: GpuGeometry, current: GpuGeometry, product: Product | None) -> GpuGeometry:
    """An equivalent of `desired` (same instances, same compute instances) that keeps as many of
    `current`'s GPU instances at their starts as possible, and their compute instances too.

    `desired` comes from a placement search that knows nothing of the GPU's state, so the same
    instances may land elsewhere; moving them back saves destroying and recreating them (and
    evicting their pods). Starts are only ever taken from `current`, from `desired` itself, or
    from `product`'s placements (what judged the GPU: its driver's table, else its catalog
    product; None: no other starts).
    """
    if not (desired.mig_enabled and current.mig_enabled) or desired == current:
        return desired
    wanted = list(desired.instances)
    candidates: dict[GpuInstanceSpec, list[int]] = {}
    for gi in wanted:
        options = set(_valid_starts(product, gi.profile, gi.size))
        options |= {d.start for d in wanted if d.profile == gi.profile}
        options |= {c.start for c in current.instances if c.profile == gi.profile and c.size == gi.size}
        candidates[gi] = sorted(options)
    best: (
        tuple[
            tuple[int, int, int, int],
            list[tuple[GpuInstanceSpec, GpuInstanceSpec]],
            list[GpuInstanceSpec],
            list[int],
        ]
        | None
    ) = None
    olds = list(current.instances)
    for r in range(min(len(olds), len(wanted)), -1, -1):
        for keep in itertools.combinations(olds, r):
            pairs = _pair(keep, wanted)
            if pairs is None:
                continue
            occupied = 0
            for old in keep:
                occupied |= slot_mask(old.start, old.size)
            paired = {id(new) for _, new in pairs}
            rest = [gi for gi in wanted if id(gi) not in paired]
            starts = _place_rest(rest, occupied, candidates)
            if starts is None:
                continue
            exact = sum(_same_instance(o, n) for o, n in pairs)
            overlap = sum(_ci_overlap(o.compute, n.compute) for o, n in pairs)
            score = (r, exact, overlap, sum(o.size for o in keep))
            if best is None or score > best[0]:
                best = (score, pairs, rest, starts)
        if best is not None:
            break
    if best is None:
        return desired
    _, pairs, rest, starts = best
    instances = [
        GpuInstanceSpec(
            old.start, old.size, old.profile, _rebase_compute(old.profile, new.compute, old.compute)
        )
        for old, new in pairs
    ]
    instances += [replace(gi, start=s) for gi, s in zip(rest, starts, strict=True)]
    return GpuGeometry(True, tuple(instances))


def _ci_overlap(have: Iterable[ComputeInstanceSpec], want: Iterable[ComputeInstanceSpec]) -> int:
    return sum((Counter(c.profile for c in have) & Counter(c.profile for c in want)).values())


def _pair(
    keep: Sequence[GpuInstanceSpec], wanted: Sequence[GpuInstanceSpec]
) -> list[tuple[GpuInstanceSpec, GpuInstanceSpec]] | None:
    """Pair each kept current GI with a distinct wanted GI of the same profile: every exact match
    (the same compute instances: it stays as it is, and so do its pods) first, then the most CI
    profiles in common. Exact matches are paired before any other choice, which could take one."""
    free = list(wanted)
    pairs: list[tuple[GpuInstanceSpec, GpuInstanceSpec]] = []
    others: list[GpuInstanceSpec] = []
    for old in keep:
        same = next((gi for gi in free if _same_instance(gi, old)), None)
        if same is None:
            others.append(old)
            continue
        free.remove(same)
        pairs.append((old, same))
    for old in others:
        options = [gi for gi in free if gi.profile == old.profile and gi.size == old.size]
        if not options:
            return None
        choice = max(options, key=lambda gi: _ci_overlap(old.compute, gi.compute))
        free.remove(choice)
        pairs.append((old, choice))
    return pairs


def _same_instance(a: GpuInstanceSpec, b: GpuInstanceSpec) -> bool:
    """The same GPU instance wherever it starts: profile, size and compute instances."""
    return (a.profile, a.size, a.compute) == (b.profile, b.size, b.compute)


# --- applying a plan to data (for tests, the benchmark and the CLI's preview) ----------------------


class PlanError(ValueError):
    """An operation that does not apply to the layout it is given (the plan is wrong)."""


def apply_operations(
    geometry: GpuGeometry, operations: Iterable[Operation], sizes: Mapping[str, int]
) -> GpuGeometry:
    """The layout after `operations`, computed on data (no NVML): the planner's own model.

    `sizes` gives each GI profile's placement size (the same name can differ across products).
    Enforces what NVML enforces about order: no GI destroyed while it holds CIs, no instance
    created with MIG off or on an occupied place, no duplicate CI, MIG not disabled while
    instances exist; `set-mig-mode` only sets the pending mode, `reset-gpu` activates it.
    """
    enabled = geometry.mig_enabled
    pending = geometry.mig_enabled if geometry.mig_pending is None else geometry.mig_pending
    gis: dict[int, GpuInstanceSpec] = {gi.start: gi for gi in geometry.instances}
    for op in operations:
        if op.op == "set-mig-mode":
            if not op.enabled and gis:
                raise PlanError(f"{op.describe()}: GPU still has instances")
            pending = bool(op.enabled)
        elif op.op == "reset-gpu":
            if gis:
                raise PlanError(f"{op.describe()}: GPU still has instances")
            enabled = pending
        elif op.op == "destroy-gi":
            gi = gis.get(op.start if op.start is not None else -1)
            if gi is None or gi.profile != op.profile:
                raise PlanError(f"{op.describe()}: no such GPU instance")
            if gi.compute:
                raise PlanError(f"{op.describe()}: it still has compute instances")
            del gis[gi.start]
        elif op.op == "create-gi":
            if not enabled or op.profile is None or op.start is None:
                raise PlanError(f"{op.describe()}: MIG is disabled or the operation is incomplete")
            size = sizes.get(op.profile)
            if size is None:
                raise PlanError(f"{op.describe()}: size of {op.profile} unknown")
            new = set(range(op.start, op.start + size))
            if any(new & set(other.occupies()) for other in gis.values()):
                raise PlanError(f"{op.describe()}: overlaps an existing GPU instance")
            gis[op.start] = GpuInstanceSpec(op.start, size, op.profile)
        else:
            gi = gis.get(op.gi_start if op.gi_start is not None else -1)
            if gi is None or op.profile is None or op.start is None:
                raise PlanError(f"{op.describe()}: no such GPU instance")
            ci = ComputeInstanceSpec(op.profile, op.start)
            if op.op == "destroy-ci":
                if ci not in gi.compute:
                    raise PlanError(f"{op.describe()}: no such compute instance")
                gis[gi.start] = replace(gi, compute=tuple(c for c in gi.compute if c != ci))
            else:
                if ci in gi.compute:
                    raise PlanError(f"{op.describe()}: already exists")
                gis[gi.start] = replace(gi, compute=tuple(sorted((*gi.compute, ci))))
    return GpuGeometry(enabled, tuple(gis.values()) if enabled else (), pending)


def apply_plan(plan: GpuPlan) -> GpuGeometry:
    """`apply_operations` on the plan's own current layout, sizes taken from its two layouts."""
    sizes = {gi.profile: gi.size for gi in (*plan.current.instances, *plan.desired.instances)}
    return apply_operations(plan.current, plan.operations, sizes)


# --- who has to move -----------------------------------------------------------------------------


def pods_to_move(
    plan: NodePlan, pod_placements: Mapping[K, DevicePlacement | Collection[DevicePlacement]]
) -> list[K]:
    """The workloads a plan disturbs: those on a GPU whose MIG mode changes, on a GPU instance
    that is destroyed, or on a GPU instance losing a compute instance. A workload whose GPU
    instance is unknown (None) on a changing GPU is counted as disturbed. Order follows the input.
    """
    touched: dict[int, GpuPlan] = {gpu.index: gpu for gpu in plan.changed}
    out: list[K] = []
    for pod, where in pod_placements.items():
        devices: Collection[DevicePlacement]
        if isinstance(where, tuple) and len(where) == 2 and isinstance(where[0], int):
            devices = [where]
        else:
            devices = where
        for gpu, gi_start in devices:
            gpu_plan = touched.get(gpu)
            if gpu_plan is None or not gpu_plan.disturbs_workloads:
                continue
            if gpu_plan.mode_changes or gi_start is None or gi_start in gpu_plan.affected_gi_starts:
                out.append(pod)
                break
    return out
