"""Reconfiguring an 8-GPU node: mig-guard's plans against a mig-parted-like baseline.

Both run through the same NVML code (reconciler.gpu_access) on the simulated NVML with a latency per
call, so "time" is real wall-clock time of real calls whose NVML cost is simulated.

Baseline, as mig-parted + k8s-mig-manager behave (research: mig-parted-internals.md §1.6, §2.3, §3.3):
every GPU whose layout differs is cleared (all CIs, then all GIs destroyed) and rebuilt from scratch;
a MIG mode change clears every GPU of the config, sets the mode, resets ALL GPUs and rebuilds them; all
GPU pods on the node are stopped. It is a lower bound for mig-parted: its trial-and-error creation
orders (one clear + rebuild per failed ordering) are not counted.

mig-guard: `migcore.planning` (instances kept in place, destroy before create, reset only the GPUs
whose mode changes), executed and verified by `reconciler.gpu_apply.apply_with_rollback`; evicted pods
are `migcore.planning.pods_to_move` (pods on destroyed or changed instances, or on a mode-changed GPU).

Latency model per NVML call (ASSUMPTIONS, order of magnitude of nvidia-smi timings on A100/H100; no
published per-call figures exist): create GI 30 ms, create CI 15 ms, destroy GI or CI 20 ms, set MIG
mode 200 ms, GPU reset (`nvidia-smi -r`) 2 s, every query 0.5 ms. Pods: PODS_PER_GI pods on every GPU
instance (and on every MIG-disabled GPU), as a pod -> (GPU, GI start) table.

Run: `python bench/bench_reconcile.py` (about a minute: the baseline's resets sleep 2 s each).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from migcore.catalog import load_catalog
from migcore.geometry import GpuGeometry
from migcore.placement import fit
from migcore.planning import GpuPlan, Operation, keep_in_place, plan_node, pods_to_move
from migcore.profiles import parse_profile
from reconciler.gpu_access import GpuAccess
from reconciler.gpu_apply import apply_with_rollback
from reconciler.nvml_sim import SimulatedNvml

GPUS = 8
PODS_PER_GI = 2
LATENCY = ",".join(
    [
        "default=0.0005",
        "nvmlDeviceCreateGpuInstanceWithPlacement=0.030",
        "nvmlDeviceCreateGpuInstance=0.030",
        "nvmlGpuInstanceCreateComputeInstanceWithPlacement=0.015",
        "nvmlGpuInstanceCreateComputeInstance=0.015",
        "nvmlGpuInstanceDestroy=0.020",
        "nvmlComputeInstanceDestroy=0.020",
        "nvmlDeviceSetMigMode=0.200",
        "simResetGpu=2.0",
    ]
)
PRODUCTS = {
    # label: (catalog key, 1g, 2g, 3g, the 2-memory-slice 1g profile)
    "NVIDIA-A100-SXM4-40GB": ("A100-40GB", "1g.5gb", "2g.10gb", "3g.20gb", "1g.10gb"),
    "NVIDIA-H100-80GB-HBM3": ("H100-80GB", "1g.10gb", "2g.20gb", "3g.40gb", "1g.20gb"),
}
Layouts = dict[int, GpuGeometry]


def _layout(key: str, counts: Mapping[str, int]) -> GpuGeometry:
    result = fit(load_catalog().products[key], {parse_profile(p): n for p, n in counts.items()})
    assert result.geometry is not None, result.reason
    return result.geometry


def scenarios(label: str) -> dict[str, tuple[Layouts, Layouts]]:
    """name -> (layouts before, layouts wanted) for an 8-GPU node of `label`."""
    key, one, two, three, one_wide = PRODUCTS[label]
    balanced = _layout(key, {one: 2, two: 1, three: 1})
    sevens = _layout(key, {one: 7})
    merged = _layout(key, {one: 5, two: 1})
    more_small = _layout(key, {one: 4, three: 1})
    replaced = _layout(key, {one: 2, one_wide: 1, three: 1})
    all_balanced = dict.fromkeys(range(GPUS), balanced)
    all_sevens = dict.fromkeys(range(GPUS), sevens)
    return {
        "1 of 8 GPUs changes (two 1g merged into a 2g)": (all_sevens, {**all_sevens, 3: merged}),
        "1 of 8 GPUs re-laid out (2g -> two 1g)": (all_balanced, {**all_balanced, 3: more_small}),
        "all 8 GPUs change (balanced -> 7x1g)": (all_balanced, dict.fromkeys(range(GPUS), sevens)),
        "mode change on 1 GPU (MIG off)": (all_balanced, {**all_balanced, 5: GpuGeometry(False)}),
        f"partial: one GI replaced ({two} -> {one_wide})": (all_balanced, {**all_balanced, 2: replaced}),
    }


def pod_table(layouts: Layouts) -> dict[str, tuple[int, int | None]]:
    pods: dict[str, tuple[int, int | None]] = {}
    for gpu, geometry in layouts.items():
        starts: list[int | None] = [gi.start for gi in geometry.instances] if geometry.mig_enabled else [None]
        for start in starts:
            for n in range(PODS_PER_GI):
                pods[f"gpu{gpu}-gi{start}-pod{n}"] = (gpu, start)
    return pods


@dataclass
class Run:
    gpus_touched: int = 0
    operations: int = 0
    nvml_calls: int = 0
    resets: int = 0
    evicted: int = 0
    simulated_s: float = 0.0
    wall_s: float = 0.0
    ok: bool = True


def _node(label: str, before: Layouts) -> GpuAccess:
    """A fresh simulated node already holding `before` (set up without latency)."""
    nvml = SimulatedNvml([label] * GPUS)
    access = GpuAccess(nvml)
    access.start()
    plan = plan_node(access.geometries(), before)
    for gpu in plan.changed:
        access.apply(gpu)
    nvml.set_latency(LATENCY)  # the latency model applies from here on
    return access


def _measure(access: GpuAccess, work: Callable[[], Run]) -> Run:
    nvml = access.nvml
    calls, simulated = len(nvml.calls), nvml.simulated_seconds
    started = time.perf_counter()
    run = work()
    run.wall_s = time.perf_counter() - started
    run.nvml_calls = len(nvml.calls) - calls
    run.simulated_s = nvml.simulated_seconds - simulated
    return run


def run_mig_guard(label: str, before: Layouts, wanted: Layouts) -> Run:
    access = _node(label, before)

    def work() -> Run:
        current = access.geometries()
        desired = {i: keep_in_place(g, current[i], load_catalog().by_label(label)) for i, g in wanted.items()}
        plan = plan_node(current, desired)
        run = Run(gpus_touched=len(plan.changed), operations=len(plan.operations))
        run.resets = sum(1 for gpu in plan.changed if gpu.needs_reset)
        run.evicted = len(pods_to_move(plan, pod_table(current)))
        for gpu in plan.changed:
            run.ok &= apply_with_rollback(access, gpu).ok
        run.ok &= access.geometries() == {**current, **desired}
        return run

    return _measure(access, work)


def _clear(index: int, geometry: GpuGeometry) -> list[Operation]:
    ops = [
        Operation("destroy-ci", index, ci.profile, ci.start, gi.start)
        for gi in geometry.instances
        for ci in gi.compute
    ]
    return ops + [Operation("destroy-gi", index, gi.profile, gi.start) for gi in geometry.instances]


def _build(index: int, geometry: GpuGeometry) -> list[Operation]:
    ops = [Operation("create-gi", index, gi.profile, gi.start) for gi in geometry.instances]
    return ops + [
        Operation("create-ci", index, ci.profile, ci.start, gi.start)
        for gi in geometry.instances
        for ci in gi.compute
    ]


def run_baseline(label: str, before: Layouts, wanted: Layouts) -> Run:
    access = _node(label, before)

    def work() -> Run:
        current = access.geometries()
        mode_change = any(current[i].mig_enabled != g.mig_enabled for i, g in wanted.items())
        # mig-parted compares per-GPU profile counts; with a mode change every GPU of the config is cleared.
        touched = (
            sorted(wanted)
            if mode_change
            else [
                i
                for i, g in wanted.items()
                if g.device_counts() != current[i].device_counts() or g.mig_enabled != current[i].mig_enabled
            ]
        )
        phases: list[list[Operation]] = [[], [], []]
        for i in touched:
            phases[0] += _clear(i, current[i])
            if current[i].mig_enabled != wanted[i].mig_enabled:
                phases[0].append(Operation("set-mig-mode", i, enabled=wanted[i].mig_enabled))
            phases[2] += _build(i, wanted[i])
        if mode_change:
            phases[1] = [Operation("reset-gpu", i) for i in range(GPUS)]  # `nvidia-smi -r` on all GPUs
        ops = [op for phase in phases for op in phase]
        run = Run(gpus_touched=len(touched), operations=len(ops), resets=len(phases[1]))
        run.evicted = len(pod_table(current))  # every GPU pod on the node is stopped
        for op in ops:
            access.apply(GpuPlan(op.gpu, current[op.gpu], wanted[op.gpu], (op,)))
        run.ok = access.geometries() == {**current, **wanted}
        return run

    return _measure(access, work)


def _ratio(a: float, b: float) -> str:
    return "inf" if b == 0 else f"{a / b:.1f}x"


def main() -> int:
    print(__doc__.split("\n\n")[0])
    print(
        f"node: {GPUS} simulated GPUs per product; {PODS_PER_GI} pods per GPU instance; latency: {LATENCY}\n"
    )
    header = f"{'scenario':<46} {'tool':<10} {'GPUs':>4} {'ops':>5} {'calls':>6} {'resets':>6} {'evicted':>7} {'NVML s':>7} {'wall s':>7} {'over s':>6}"
    failures: list[str] = []
    for label in PRODUCTS:
        print(f"== {label} x{GPUS}")
        print(header)
        for name, (before, wanted) in scenarios(label).items():
            ours = run_mig_guard(label, before, wanted)
            base = run_baseline(label, before, wanted)
            for tool, run in (("mig-guard", ours), ("baseline", base)):
                print(
                    f"{name:<46} {tool:<10} {run.gpus_touched:>4} {run.operations:>5} {run.nvml_calls:>6} {run.resets:>6} "
                    f"{run.evicted:>7} {run.simulated_s:>7.2f} {run.wall_s:>7.2f} {run.wall_s - run.simulated_s:>6.2f}"
                    + ("" if run.ok else "  LAYOUT WRONG")
                )
                if not run.ok:
                    failures.append(f"{label} {name} {tool}: layout read back differs")
            print(
                f"{'':<46} {'ratio':<10} ops {_ratio(base.operations, ours.operations)}, evictions "
                f"{_ratio(base.evicted, ours.evicted)}, resets {base.resets}:{ours.resets}, time {_ratio(base.wall_s, ours.wall_s)}"
            )
            overhead = ours.wall_s - ours.simulated_s
            if overhead > 2.0:
                failures.append(
                    f"{label} {name}: mig-guard took {overhead:.2f} s beyond the simulated NVML time"
                )
            if name.startswith("1 of 8 GPUs changes"):
                for what, b, o in (
                    ("operations", base.operations, ours.operations),
                    ("evictions", base.evicted, ours.evicted),
                ):
                    verdict = "met" if o * 4 <= b else "MISSED"
                    print(f"{'':<46} target {what} >= 4x fewer: {verdict} ({b} vs {o})")
                    if verdict == "MISSED":
                        failures.append(f"{label} {name}: {what} {b} vs {o}")
        print()
    if failures:
        print("targets missed:\n  " + "\n  ".join(failures))
        return 1
    print(
        "targets: all met (1 of 8 GPUs: >= 4x fewer operations and evictions; apply within 2 s of NVML time)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
