"""The device plugin's MIG strategy, as GPU Feature Discovery labels it on the node
(`nvidia.com/mig.strategy`, from the GPU Operator's `mig.strategy`).

With `single`, NVIDIA's device plugin advertises every MIG device of the node as `nvidia.com/gpu`,
and only when they are all alike: every GPU with MIG enabled and holding MIG devices, all of one
profile (or every GPU with MIG disabled: whole GPUs, as with no MIG at all). Any other layout makes
the device plugin refuse the node's MIG devices ("more than one MIG device type present on
node", "all devices on the node must be configured with the same migEnabled value") and GPU
Feature Discovery label the product `<product>-MIG-INVALID`: pods asking for `nvidia.com/gpu`
no longer land on the node. `mixed` (one resource per profile) and `none` take any layout.
"""

from __future__ import annotations

from collections.abc import Mapping

from migcore import keys
from migcore.check import CheckResult
from migcore.geometry import GpuGeometry
from migcore.wording import gpus_text, names_text

STRATEGY_SINGLE = "single"
PROFILES_SHOWN = 4


def final_layouts(
    result: CheckResult, current: Mapping[int, GpuGeometry | None]
) -> dict[int, GpuGeometry | None]:
    """Each GPU's layout once a (valid) config is applied: the config's, or, where no entry applies,
    the current one (None where that is not known)."""
    out: dict[int, GpuGeometry | None] = {}
    for verdict in result.gpus:
        if verdict.entry is None or verdict.mig_enabled is None:
            out[verdict.index] = current.get(verdict.index)
        elif not verdict.mig_enabled:
            out[verdict.index] = GpuGeometry(False)
        else:
            out[verdict.index] = verdict.geometry
    return out


def single_strategy_problem(layouts: Mapping[int, GpuGeometry | None]) -> str | None:
    """Why the node's final layouts (per GPU; None: not known) do not suit the single strategy,
    naming it and what the device plugin would do; None when they do (or nothing is known)."""
    known = {i: g for i, g in layouts.items() if g is not None}
    enabled = sorted(i for i, g in known.items() if g.mig_enabled)
    if not enabled:
        return None
    problems: list[str] = []
    disabled = sorted(set(known) - set(enabled))
    if disabled:
        problems.append(f"{gpus_text(disabled)} would have MIG disabled and {gpus_text(enabled)} enabled")
    empty = [i for i in enabled if not known[i].device_counts()]
    if empty:
        problems.append(f"{gpus_text(empty)} would have MIG enabled but no MIG device")
    profiles = sorted({p for i in enabled for p in known[i].device_counts()})
    if len(profiles) > 1:
        problems.append(
            f"the MIG devices would be of {len(profiles)} profiles ({names_text(profiles, PROFILES_SHOWN)})"
        )
    if not problems:
        return None
    return (
        f"{keys.LABEL_MIG_STRATEGY}={STRATEGY_SINGLE} needs one MIG profile on every GPU (or MIG disabled on "
        f"all of them), but {'; '.join(problems)}: NVIDIA's device plugin would refuse the node's MIG devices "
        "(no nvidia.com/gpu advertised) and GPU Feature Discovery would label the product <product>-MIG-INVALID. "
        "Choose a layout of one profile, or set the GPU Operator's mig.strategy to mixed"
    )
