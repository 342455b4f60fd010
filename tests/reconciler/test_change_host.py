"""The change transaction's host steps, as on a GPU Operator node: host GPU clients stopped and
started again, the operator's validators, the CDI refresh. The GPUs are the simulated NVML and the
Node is in memory (test_change.py's bench); the host commands are the real `HostRoot` code path,
chrooted into a test host root of recording stand-ins (devcluster.hostroot), so these need root.
The same against the real API server and the real agent: test_e2e_host.py."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_change import DP, Bench, bench

from devcluster.hostroot import HostRootFixture
from migcore import keys
from reconciler import change
from reconciler.cdi import Cdi, CdiMode
from reconciler.change import Phase
from reconciler.driver import DriverInfo
from reconciler.host import HostRoot
from reconciler.host_clients import FileClients, HostClients, HostClientsMode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root (CI runs as root)")

DCGM = "nvidia-dcgm.service"
KUBELET = "kubelet.service"
HOST_DRIVER = DriverInfo(host_driver=True)


@dataclass
class Validators:
    """The operator's validator pods (the real ones: reconciler.operands, against the API server)."""

    bench: Bench
    seen: list[tuple[str, bool, bool]] = field(default_factory=list)  # (what, operands paused?, held?)
    missing_labels: list[str] = field(default_factory=list)

    def _see(self, what: str) -> list[str]:
        paused = self.bench.node.labels.get(DP) == keys.PAUSED_FOR_MIG_CHANGE
        self.seen.append((what, paused, self.bench.node.held()))
        return [f"gpu-operator/{what}"]

    def remove_validators(self) -> list[str]:
        return self._see("removed")

    def restart_validator(self) -> list[str]:
        return self._see("restarted")

    def missing(self, paused: Mapping[str, str]) -> list[str]:
        return [k for k in self.missing_labels if k in paused]

    def where(self) -> str:
        return "nvidia-gpu-operator"


class Watched(Cdi):
    """The real Cdi; each refresh notes whether the operands were still paused and the node held."""

    seen: list[tuple[bool, bool]]
    bench: Bench

    def refresh(self) -> None:
        self.seen.append(
            (self.bench.node.labels.get(DP) == keys.PAUSED_FOR_MIG_CHANGE, self.bench.node.held())
        )
        super().refresh()


def host_bench(
    tmp_path: Path, initial: str = "all-3g", faults: str | None = None
) -> tuple[Bench, HostRootFixture]:
    b = bench(initial=initial, faults=faults)
    host = HostRootFixture.build(tmp_path / "host", units={DCGM: True, KUBELET: True, "nvsm.service": False})
    clients = tmp_path / "clients.yaml"
    clients.write_text(f"version: v1\nsystemd-services: [nvsm.service, {DCGM}]\n")
    root = HostRoot(host.root)
    b.host_clients = HostClients(root, FileClients(clients), HostClientsMode.AUTO, HOST_DRIVER)
    cdi = Watched(root, CdiMode.AUTO, HOST_DRIVER, state_dir=tmp_path / "state")
    cdi.seen, cdi.bench = [], b
    b.cdi = cdi
    b.operator = Validators(b)
    return b, host


def systemctl(host: HostRootFixture, verb: str) -> list[str]:
    return [c.split()[-1] for c in host.calls() if c.startswith(f"systemctl {verb} ")]


def test_host_clients_are_recorded_stopped_and_started_again_after_cdi_and_before_the_operands(
    tmp_path: Path,
) -> None:
    b, host = host_bench(tmp_path)
    stopped_with: list[Any] = []
    stop = b.host_clients.stop

    def watch_stop(units: Sequence[str]) -> None:  # the record is on the node before any stops
        stopped_with.append(b.record())
        stop(units)

    b.host_clients.stop = watch_stop
    outcome = b.change("gpu0-3g-gpu1-off").run()  # GPU 1's MIG mode changes: kubelet too
    assert outcome.state == keys.STATE_SUCCESS, outcome.reason
    (record,) = stopped_with
    assert record.phase is Phase.STOPPING_HOST_CLIENTS and record.host_clients == [DCGM, KUBELET]
    assert systemctl(host, "stop") == [DCGM, KUBELET]
    assert systemctl(host, "start") == [DCGM, KUBELET]
    assert host.running(DCGM) and host.running(KUBELET) and not host.running("nvsm.service")
    calls = host.calls()
    first_start = calls.index(f"systemctl start {DCGM}")
    cdi = [i for i, c in enumerate(calls) if c.startswith(("nvidia-smi", "nvidia-ctk"))]
    assert len(cdi) == 3 and max(cdi) < first_start  # CDI, then the host clients (mig-manager's order)
    assert b.cdi.seen == [(True, True)]  # refreshed while the operands were paused and the node held
    assert b.operator.seen == [("removed", True, True), ("restarted", True, True)]
    assert b.node.labels[DP] == "custom" and not b.node.held() and b.record() is None


def test_a_change_without_a_mode_change_leaves_kubelet_running(tmp_path: Path) -> None:
    b, host = host_bench(tmp_path, initial="all-1g")
    assert b.change("all-3g").run().state == keys.STATE_SUCCESS
    assert systemctl(host, "stop") == [DCGM]


def test_a_failed_cdi_refresh_keeps_the_new_layout_and_is_owed_until_it_succeeds(tmp_path: Path) -> None:
    b, host = host_bench(tmp_path)
    host.fail("nvidia-ctk", "open /var/run/cdi/management.nvidia.com-gpu.yaml: permission denied")
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert outcome.reason.startswith("the GPUs hold gpu0-3g-gpu1-off but containers cannot use it yet: ")
    assert "permission denied" in outcome.reason and "rolled back" not in outcome.reason
    assert not b.gpus.geometry(1).mig_enabled  # the new layout stays
    assert host.running(DCGM) and host.running(KUBELET)  # every exit starts them again
    assert b.node.labels[DP] == "custom" and not b.node.held() and b.record() is None
    assert b.cdi.owed() is not None
    # The loop's next look: the GPUs already hold the layout; the refresh is owed, so it runs.
    host.heal("nvidia-ctk")
    change.settle(b.parts(), None, "gpu0-3g-gpu1-off applied", "gpu0-3g-gpu1-off")
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_SUCCESS
    assert b.cdi.owed() is None


def test_a_rollback_refreshes_cdi_too_and_starts_the_clients(tmp_path: Path) -> None:
    b, host = host_bench(
        tmp_path,
        initial="all-disabled",
        faults="nvmlDeviceCreateGpuInstanceWithPlacement@4=InsufficientResources",
    )
    outcome = b.change("all-3g").run()
    assert outcome.state == keys.STATE_FAILED and "rolled back" in outcome.reason
    assert all(not g.mig_enabled for g in b.gpus.geometries().values())
    assert any(c.startswith("nvidia-ctk cdi generate") for c in host.calls())
    assert host.running(DCGM) and host.running(KUBELET)


def test_a_change_that_fails_before_the_gpus_leaves_cdi_alone(tmp_path: Path) -> None:
    b, host = host_bench(tmp_path)
    b.operands.still_there = "gpu-operator/nvidia-device-plugin-x"
    assert b.change("gpu0-3g-gpu1-off").run().state == keys.STATE_FAILED
    assert not any(c.startswith(("nvidia-smi", "nvidia-ctk")) for c in host.calls())
    assert systemctl(host, "stop") == []  # the operands never left: nothing went further
    assert b.operator.seen[-1][0] == "restarted"


def test_an_agent_killed_after_stopping_the_clients_starts_them_when_it_comes_back(tmp_path: Path) -> None:
    b, host = host_bench(tmp_path)
    killed = b.change("gpu0-3g-gpu1-off")
    killed.begin()
    killed.drain_operands()
    killed.stop_host_clients()  # then killed: the units are stopped, the record names them
    assert not host.running(DCGM) and not host.running(KUBELET)
    record = b.record()
    assert record is not None and record.host_clients == [DCGM, KUBELET]

    outcome = b.change("gpu0-3g-gpu1-off").run()  # the agent back: the loop hands it the record
    assert outcome.state == keys.STATE_SUCCESS, outcome.reason
    assert host.running(DCGM) and host.running(KUBELET)


def test_a_label_removed_after_the_clients_stopped_still_starts_them(tmp_path: Path) -> None:
    b, host = host_bench(tmp_path)
    killed = b.change("gpu0-3g-gpu1-off")
    killed.begin()
    killed.stop_host_clients()
    change.abandon(b.parts(), b.record())
    assert host.running(DCGM) and host.running(KUBELET)
    assert b.node.labels[keys.LABEL_MIG_STATE] == keys.STATE_FAILED and not b.node.held()


def test_a_client_that_cannot_be_stopped_fails_the_change_untouched(tmp_path: Path) -> None:
    b, host = host_bench(tmp_path)
    before = b.gpus.geometries()
    host.fail("systemctl-stop", "Failed to stop nvidia-dcgm.service: Access denied")
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert outcome.state == keys.STATE_FAILED
    assert "could not stop the host GPU client nvidia-dcgm.service" in outcome.reason
    assert "Access denied" in outcome.reason
    assert b.gpus.geometries() == before
    host.heal("systemctl-stop")
    host.fail("systemctl", "Failed to connect to bus: No such file or directory")
    outcome = b.change("gpu0-3g-gpu1-off").run()
    assert "could not ask the host's systemd whether nvsm.service runs: Failed to connect" in outcome.reason
    assert b.gpus.geometries() == before


def test_operand_labels_without_their_daemonset_are_warned_about(tmp_path: Path) -> None:
    b, _ = host_bench(tmp_path)
    b.operator.missing_labels = [DP]
    assert b.change("gpu0-3g-gpu1-off").run().state == keys.STATE_SUCCESS
    (warning,) = [note for reason, note in b.node.events if reason == "OperandsNotFound"]
    assert warning.startswith(f"{DP}=custom say GPU operands run on this node, but no GPU Operator DaemonSet")
    assert "namespace nvidia-gpu-operator" in warning and "--operands-namespace" in warning


def test_a_failed_gpu_reset_reboots_the_host_once_when_reboots_are_on(tmp_path: Path) -> None:
    b = bench(initial="all-disabled", faults="simResetGpu@1=InUse")
    b.settings.reboot_enabled = True
    outcome = b.change("all-3g").run()
    assert outcome.state == keys.STATE_REBOOTING and b.reboots == ["reboot"]
    reason = b.node.annotations[keys.ANNOTATION_REASON]
    assert (
        "reset-gpu failed" in reason
        and "InUse" in reason
        and reason.endswith("rebooting the host (once for all-3g)")
    )
    b.sim.simReboot()
    assert b.change("all-3g").run().state == keys.STATE_SUCCESS
