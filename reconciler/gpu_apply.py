"""Apply one GPU's plan and prove it: read the layout back, and on any error or mismatch put the
GPU back the way it was.

mig-parted reports success without re-reading the GPU and, on failure, leaves a GPU cleared. Here
the outcome is always one of: the desired layout is on the GPU (ok), or the layout from before is
(rolled back), or, only if the rollback failed too, a reason that says what the GPU holds now.
"""

from __future__ import annotations

from dataclasses import dataclass

from migcore.geometry import GpuGeometry
from migcore.planning import GpuPlan, plan_gpu
from reconciler.gpu_access import GpuAccess, GpuError, OnOperation


@dataclass(frozen=True)
class ApplyOutcome:
    """What happened to one GPU. `geometry` is the layout read back at the end (None if unreadable)."""

    index: int
    ok: bool
    error: GpuError | None
    rolled_back: bool
    geometry: GpuGeometry | None
    rollback_error: GpuError | None = None
    needs_reboot: bool = False

    @property
    def reason(self) -> str:
        """One sentence for the node's reason annotation and the Event."""
        if self.ok:
            summary = self.geometry.summary() if self.geometry else "?"
            return f"GPU {self.index}: applied ({summary})"
        assert self.error is not None
        if self.needs_reboot:
            return f"{self.error}; a reboot is needed to activate the MIG mode change"
        if self.rolled_back:
            return f"{self.error}; GPU {self.index} was rolled back to its previous layout"
        now = self.geometry.summary() if self.geometry else "unreadable"
        extra = f" ({self.rollback_error})" if self.rollback_error else ""
        return f"{self.error}; rolling GPU {self.index} back failed{extra}, it now holds: {now}"


def _read(access: GpuAccess, index: int) -> GpuGeometry | None:
    try:
        return access.geometry(index)
    except GpuError:
        return None


def clear_pending_mode(access: GpuAccess, index: int) -> bool:
    """Set a pending MIG mode back to the current one; True if there was one.

    A change interrupted between `set-mig-mode` and `reset-gpu` (or a mode set outside mig-guard)
    leaves a pending mode that the next reset or reboot would silently activate. Used as the last
    step of a rollback that failed: whatever else the GPU holds, it keeps its mode.
    """
    now = access.geometry(index)
    if now.mig_pending is None:
        return False
    access.apply(plan_gpu(index, now, now.settled()))
    return True


def roll_back(access: GpuAccess, index: int, target: GpuGeometry) -> GpuGeometry:
    """Return GPU `index` to `target` from whatever it holds now; the layout read at the end.

    The way back is planned like any change, so a half-done mode change's pending mode is set
    back (or completed) too. Raises GpuError when an operation of the way back fails.
    """
    now = access.geometry(index)
    access.apply(plan_gpu(index, now, target))
    return access.geometry(index)


def apply_with_rollback(
    access: GpuAccess,
    plan: GpuPlan,
    done: OnOperation | None = None,
    reboot_allowed: bool = False,
) -> ApplyOutcome:
    """Run `plan`, verify by reading the GPU back, roll back to `plan.current` on error or mismatch.

    With `reboot_allowed`, an error that a reboot clears (ResetRequired on a mode change, or the
    mode change's GPU reset failing) is returned as `needs_reboot` without rolling back, so the
    caller can reboot into the new mode.
    """
    index = plan.index
    error: GpuError
    try:
        access.apply(plan, done)
        after = access.geometry(index)
        if after == plan.desired:
            return ApplyOutcome(index, True, None, False, after)
        error = GpuError(
            f"GPU {index}: the layout read back ({after.summary()}) is not the one applied ({plan.desired.summary()})",
            gpu=index,
            operation="verify the layout",
        )
    except GpuError as exc:
        error = exc
    if reboot_allowed and (error.needs_reboot or error.reset_failed):
        return ApplyOutcome(index, False, error, False, _read(access, index), needs_reboot=True)
    try:
        final = roll_back(access, index, plan.current)
        return ApplyOutcome(index, False, error, final == plan.current.settled(), final)
    except GpuError as rollback_error:
        return ApplyOutcome(index, False, error, False, _read(access, index), rollback_error)
