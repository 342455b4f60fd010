"""Applying one GPU's plan: verified by reading back, rolled back on any error or mismatch."""

from __future__ import annotations

from dataclasses import replace

from migcore.catalog import load_catalog
from migcore.geometry import GpuGeometry
from migcore.placement import fit
from migcore.planning import plan_gpu
from migcore.profiles import parse_profile
from reconciler.gpu_access import GpuAccess
from reconciler.gpu_apply import apply_with_rollback, clear_pending_mode
from reconciler.nvml_sim import SimulatedNvml

A100 = "NVIDIA-A100-SXM4-40GB"


def layout(**counts: int) -> GpuGeometry:
    result = fit(load_catalog().products["A100-40GB"], {parse_profile(p): n for p, n in counts.items()})
    assert result.geometry is not None, result.reason
    return result.geometry


BALANCED = layout(**{"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1})
SEVEN = layout(**{"1g.5gb": 7})
HALVES = layout(**{"3g.20gb": 2})
DISABLED = GpuGeometry(False)


def gpu(start: GpuGeometry, **kwargs: object) -> GpuAccess:
    access = GpuAccess(SimulatedNvml([A100], **kwargs))  # type: ignore[arg-type]
    access.start()
    access.apply(plan_gpu(0, access.geometry(0), start))
    return access


def test_success_is_verified_on_the_gpu() -> None:
    access = gpu(BALANCED)
    steps: list[int] = []
    outcome = apply_with_rollback(access, plan_gpu(0, BALANCED, SEVEN), lambda op, i: steps.append(i))
    assert outcome.ok and not outcome.rolled_back and outcome.error is None
    assert outcome.geometry == SEVEN == access.geometry(0)
    assert steps == list(range(len(plan_gpu(0, BALANCED, SEVEN).operations)))
    assert outcome.reason.startswith("GPU 0: applied (1g.5gb@0")


def test_a_busy_instance_fails_the_change_and_the_gpu_is_rolled_back() -> None:
    access = gpu(BALANCED)
    access.nvml.simAddProcess(0, 31337, gi_start=4)  # a workload on the 3g.20gb GI at slot 4
    outcome = apply_with_rollback(access, plan_gpu(0, BALANCED, SEVEN))
    assert not outcome.ok and outcome.rolled_back
    assert outcome.error is not None and outcome.error.nvml_error == "InUse"
    assert access.geometry(0) == BALANCED == outcome.geometry
    assert "rolled back to its previous layout" in outcome.reason and "InUse" in outcome.reason


def test_a_layout_that_reads_back_differently_counts_as_a_failure() -> None:
    access = gpu(BALANCED)
    # Operations that build HALVES while the plan claims SEVEN: the read-back must catch it.
    lying = replace(plan_gpu(0, BALANCED, HALVES), desired=SEVEN)
    outcome = apply_with_rollback(access, lying)
    assert not outcome.ok and outcome.rolled_back
    assert outcome.error is not None and outcome.error.operation == "verify the layout"
    assert "read back" in str(outcome.error)
    assert access.geometry(0) == BALANCED


def test_a_failed_mode_change_leaves_no_pending_mode_behind() -> None:
    # The reset fails after MIG was set to disabled-pending: rolling back must clear the pending
    # mode too, or the next reset or reboot would silently switch MIG off.
    access = gpu(BALANCED, faults="simResetGpu@2=Unknown")
    outcome = apply_with_rollback(access, plan_gpu(0, BALANCED, DISABLED))
    assert not outcome.ok and outcome.rolled_back
    assert access.mig_mode(0) == (True, True) and access.geometry(0) == BALANCED


def test_a_mode_change_that_needs_a_reboot_is_left_for_the_reboot_when_allowed() -> None:
    access = gpu(DISABLED)
    access.nvml.simSetResetRequiresReboot(0, True)
    plan = plan_gpu(0, DISABLED, BALANCED)
    refused = apply_with_rollback(access, plan)
    assert not refused.ok and refused.rolled_back and not refused.needs_reboot
    assert access.mig_mode(0) == (False, False)

    waiting = apply_with_rollback(access, plan, reboot_allowed=True)
    assert waiting.needs_reboot and not waiting.rolled_back
    assert "reboot" in waiting.reason
    assert access.mig_mode(0) == (False, True)
    access.nvml.simReboot()
    after = apply_with_rollback(access, plan_gpu(0, access.geometry(0), BALANCED))
    assert after.ok and access.geometry(0) == BALANCED


def test_when_the_rollback_fails_too_the_reason_says_what_the_gpu_holds() -> None:
    # First create fails (the change), then the first create of the way back fails as well.
    access = gpu(
        BALANCED,
        faults="nvmlDeviceCreateGpuInstanceWithPlacement@6=Unknown;nvmlDeviceCreateGpuInstanceWithPlacement@7=Unknown",
    )
    outcome = apply_with_rollback(access, plan_gpu(0, BALANCED, SEVEN))
    assert not outcome.ok and not outcome.rolled_back
    assert outcome.rollback_error is not None and outcome.rollback_error.nvml_error == "Unknown"
    assert outcome.geometry is not None and outcome.geometry == access.geometry(0) != BALANCED
    assert "rolling GPU 0 back failed" in outcome.reason and outcome.geometry.summary() in outcome.reason


def test_a_reset_refused_by_the_platform_leaves_the_pending_mode_for_a_reboot() -> None:
    # What `--simulated-faults simResetGpu@1=ResetRequired` gives the reconciler (see nvml_sim).
    access = gpu(DISABLED, faults="simResetGpu@1=ResetRequired")
    outcome = apply_with_rollback(access, plan_gpu(0, DISABLED, SEVEN), reboot_allowed=True)
    assert (
        outcome.needs_reboot and outcome.error is not None and outcome.error.operation == "reset-gpu on GPU 0"
    )
    assert access.mig_mode(0) == (False, True)
    access.nvml.simReboot()
    assert access.geometry(0) == GpuGeometry(True)
    assert apply_with_rollback(access, plan_gpu(0, access.geometry(0), SEVEN)).ok


def test_a_pending_mode_left_by_an_interrupted_change_can_be_cleared() -> None:
    access = gpu(BALANCED)
    # Interrupted after set-mig-mode (the instances were destroyed first, as the plan does).
    plan = plan_gpu(0, BALANCED, DISABLED)
    stop = [op.op for op in plan.operations].index("reset-gpu")
    access.apply(replace(plan, operations=plan.operations[:stop]))
    assert access.mig_mode(0) == (True, False) and access.geometry(0) == GpuGeometry(True, mig_pending=False)
    assert "MIG disabled pending" in access.geometry(0).summary()
    assert clear_pending_mode(access, 0)
    assert access.mig_mode(0) == (True, True)
    assert not clear_pending_mode(access, 0)
