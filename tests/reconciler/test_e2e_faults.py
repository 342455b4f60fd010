"""End to end: an NVML error at each kind of step ends in `failed` with the NVML error in the
reason, every GPU back in its previous layout, and the node usable again; a mode change that only
a reboot can activate reboots once (simulated host) when enabled, and fails cleanly when not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from devcluster.processes import wait_until
from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import SimulatedNvml

GpuNodeFactory = Callable[..., Any]

FAULTS = [
    # (layout before, layout asked for, the NVML call that fails at its Nth call, the error)
    ("all-3g", "gpu1-7g", "nvmlComputeInstanceDestroy@2", "InUse"),
    ("all-3g", "gpu1-7g", "nvmlGpuInstanceDestroy@2", "InUse"),
    ("all-3g", "gpu1-7g", "nvmlDeviceCreateGpuInstanceWithPlacement@1", "InsufficientResources"),
    ("all-3g", "gpu1-7g", "nvmlGpuInstanceCreateComputeInstanceWithPlacement@1", "InsufficientResources"),
    ("all-disabled", "all-3g", "nvmlDeviceSetMigMode@2", "NotSupported"),  # GPU 1, after GPU 0 changed
    ("all-disabled", "all-3g", "simResetGpu@2", "InUse"),  # the host's GPU reset
]


@pytest.mark.parametrize(
    ("initial", "target", "call", "error"), FAULTS, ids=[f[2].split("@")[0] for f in FAULTS]
)
def test_nvml_fault_fails_and_rolls_back(
    gpu_node: GpuNodeFactory, initial: str, target: str, call: str, error: str
) -> None:
    node = gpu_node(gpus=2, initial=initial)
    before = node.geometries()
    node.start_agent(faults=f"{call}={error}")
    node.wait_outcome("success", f"{initial} applied")
    since = node.label(target)
    reason = node.wait_outcome("failed", f"{target} not applied", since=since)  # seen however short
    assert error in reason
    assert "rolled back" in reason
    assert node.geometries() == before
    access = node.access()
    assert all(access.mig_mode(i)[0] == access.mig_mode(i)[1] for i in range(2))  # no mode left pending
    assert not node.held()
    assert node.operand_label() == "true"
    wait_until(lambda: node.operand_pods() == 1, 60, what="device plugin back")
    assert node.state()[0] == "failed"  # not retried by itself (the one-shot fault would let it pass)


def _reset_needs_reboot(node: Any) -> None:
    sim = SimulatedNvml(state_file=node.state_file)
    GpuAccess(sim).start()
    for gpu in range(node.gpus):
        sim.simSetResetRequiresReboot(gpu, True)


def test_mode_change_reboots_once_when_enabled(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-disabled")
    _reset_needs_reboot(node)
    node.start_agent("--reboot-enabled")
    node.wait_outcome("success", "all-disabled applied")
    since = node.label("all-3g")
    # Both waits replay every update of the node after the label write, so a short-lived
    # `rebooting` is seen even when the simulated reboot is over before the first poll.
    node.wait_outcome("rebooting", "", since=since)
    node.wait_outcome("success", "all-3g applied", since=since)
    assert node.counts() == {0: {"3g.20gb": 2}, 1: {"3g.20gb": 2}}
    assert not node.held()
    assert node.operand_label() == "true"


def test_an_agent_killed_as_it_reboots_the_host_reboots_it_when_it_comes_back(
    gpu_node: GpuNodeFactory,
) -> None:
    """Killed after it wrote `rebooting` and before the reboot took place (the simulated host
    keeps its boot id): the agent back finds the host not rebooted and asks again, instead of
    judging the mode change as not activated."""
    node = gpu_node(gpus=2, initial="all-disabled")
    _reset_needs_reboot(node)
    agent = node.start_agent("--reboot-enabled", faults="simReboot@1=SIGKILL")
    node.wait_outcome("success", "all-disabled applied")
    since = node.label("all-3g")
    node.wait_outcome("rebooting", "", since=since)
    assert agent.wait(60) == -9  # SIGKILL at the reboot: the host has not rebooted
    assert node.held()
    node.start_agent("--reboot-enabled")
    reason = node.wait_outcome("success", "all-3g applied", since=since)
    assert node.counts() == {0: {"3g.20gb": 2}, 1: {"3g.20gb": 2}}, reason
    assert not node.held()
    assert node.operand_label() == "true"


def test_mode_change_needing_a_reboot_fails_when_reboot_is_disabled(gpu_node: GpuNodeFactory) -> None:
    node = gpu_node(gpus=2, initial="all-disabled")
    _reset_needs_reboot(node)
    before = node.geometries()
    node.start_agent()
    node.wait_outcome("success", "all-disabled applied")
    since = node.label("all-3g")
    reason = node.wait_outcome("failed", "all-3g not applied", since=since)
    assert "ResetRequired" in reason
    assert node.geometries() == before
    assert not node.held()
