"""The reconciler's host commands as they run on a GPU node: chrooted into a host root
(`reconciler.host.HostRoot`), here a test host root whose `systemctl`, `nvidia-ctk` and
`nvidia-smi` are recording stand-ins (devcluster.hostroot). The chroot is real, so these need root
(as CI runs); the driver-ready marker is parsed as the GPU Operator's validator writes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devcluster.hostroot import HostRootFixture
from reconciler.cdi import MANAGEMENT_SPEC, Cdi, CdiError, CdiMode
from reconciler.driver import LIB_DIRS, DriverInfo, find_in_root, parse_driver_ready, read_driver_ready
from reconciler.host import HostCommandError, HostRoot
from reconciler.host_clients import (
    FileClients,
    HostClients,
    HostClientsError,
    HostClientsMode,
    parse_gpu_clients,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root (CI runs as root)")

OPERATOR_CLIENTS = """\
version: v1
systemd-services:
  - nvsm.service
  - nvidia-dcgm.service
  - dcgm-exporter.service
"""
HOST_DRIVER = DriverInfo(host_driver=True, driver_root="/", dev_root="/")
CONTAINER_DRIVER = DriverInfo(
    host_driver=False, driver_root="/run/nvidia/driver", dev_root="/run/nvidia/driver"
)


@pytest.fixture
def host(tmp_path: Path) -> HostRootFixture:
    return HostRootFixture.build(
        tmp_path / "host", units={"nvidia-dcgm.service": True, "nvsm.service": False, "kubelet.service": True}
    )


# --- the driver marker ------------------------------------------------------------------------------


def test_the_validators_marker_says_where_the_driver_is() -> None:
    text = (
        "IS_HOST_DRIVER=false\nNVIDIA_DRIVER_ROOT=/run/nvidia/driver\nDRIVER_ROOT_CTR_PATH=/driver-root\n"
        "NVIDIA_DEV_ROOT=/run/nvidia/driver\nDEV_ROOT_CTR_PATH=/driver-root\n"
    )
    assert parse_driver_ready(text) == CONTAINER_DRIVER
    assert parse_driver_ready("IS_HOST_DRIVER=true\nNVIDIA_DRIVER_ROOT=/\n") == HOST_DRIVER
    # Older validators wrote less, or nothing: the roots are the host's, the kind unknown.
    assert parse_driver_ready("") == DriverInfo(None, "/", "/")
    assert parse_driver_ready("garbage\nIS_HOST_DRIVER='true'\n=x\n").host_driver is True


def test_no_marker_means_the_driver_is_not_ready(tmp_path: Path) -> None:
    assert read_driver_ready(tmp_path / "driver-ready") is None
    (tmp_path / "driver-ready").write_text("IS_HOST_DRIVER=true\n")
    assert read_driver_ready(tmp_path / "driver-ready") == HOST_DRIVER


def test_the_nvml_library_is_found_in_a_driver_root(tmp_path: Path) -> None:
    assert find_in_root(tmp_path, LIB_DIRS, "libnvidia-ml.so.1") is None
    lib = tmp_path / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
    lib.parent.mkdir(parents=True)
    lib.touch()
    assert find_in_root(tmp_path, LIB_DIRS, "libnvidia-ml.so.1") == lib


# --- running a command on the host ----------------------------------------------------------------


def test_host_paths_follow_the_hosts_own_links(host: HostRootFixture) -> None:
    root = HostRoot(host.root)
    # /var/run -> /run is an absolute link: the host's /run, not this machine's.
    assert root.path("/var/run/cdi/x.yaml") == host.root / "run/cdi/x.yaml"
    assert root.path("/usr/../var/./run") == host.root / "run"
    (host.root / "loop").symlink_to("/loop")
    assert root.path("/loop/x").is_relative_to(host.root)  # a link loop stays inside the root


def test_a_host_command_runs_chrooted_and_a_failure_names_it_and_its_output(host: HostRootFixture) -> None:
    root = HostRoot(host.root)
    assert root.run(["systemctl", "is-active", "nvidia-dcgm.service"]).stdout.strip() == "active"
    host.fail("systemctl", "Failed to connect to bus")
    with pytest.raises(HostCommandError) as err:
        root.run(["systemctl", "stop", "nvidia-dcgm.service"])
    assert (
        str(err.value)
        == "`systemctl stop nvidia-dcgm.service` on the host exited 1: Failed to connect to bus"
    )
    with pytest.raises(HostCommandError, match="nvidia-smi-nope"):
        root.run(["nvidia-smi-nope"])
    assert host.calls() == ["systemctl is-active nvidia-dcgm.service", "systemctl stop nvidia-dcgm.service"]


# --- CDI --------------------------------------------------------------------------------------------


def test_cdi_runs_nvidia_smi_then_creates_the_control_devices_and_the_management_spec(
    host: HostRootFixture,
) -> None:
    cdi = Cdi(HostRoot(host.root), CdiMode.ON, HOST_DRIVER)
    cdi.refresh()
    toolkit = "/usr/local/nvidia/toolkit"
    assert host.calls() == [
        "nvidia-smi ",
        "nvidia-ctk system create-device-nodes --control-devices --dev-root=/",
        "nvidia-ctk cdi generate --mode=management --driver-root=/ --dev-root=/ --vendor=management.nvidia.com "
        f"--class=gpu --nvidia-cdi-hook-path={toolkit}/nvidia-cdi-hook --output={MANAGEMENT_SPEC}",
    ]
    assert "--mode=management" in host.file(MANAGEMENT_SPEC).read_text()


def test_cdi_with_the_driver_container_runs_nvidia_smi_in_the_driver_root(tmp_path: Path) -> None:
    host = HostRootFixture.build(tmp_path / "host", driver_root="/run/nvidia/driver")
    Cdi(HostRoot(host.root), CdiMode.ON, CONTAINER_DRIVER).refresh()
    calls = host.calls()
    assert calls[0] == "nvidia-smi "  # recorded by the stand-in inside /run/nvidia/driver
    assert "--driver-root=/run/nvidia/driver --dev-root=/run/nvidia/driver" in calls[2]


def test_a_failed_refresh_is_owed_across_a_restart_until_one_succeeds(
    host: HostRootFixture, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    host.fail("nvidia-ctk", "open /var/run/cdi: read-only file system")
    with pytest.raises(CdiError) as err:
        Cdi(HostRoot(host.root), CdiMode.ON, HOST_DRIVER, state_dir=state).refresh()
    assert "creating the MIG device nodes and the management CDI spec failed" in str(err.value)
    assert "read-only file system" in str(err.value)
    again = Cdi(HostRoot(host.root), CdiMode.ON, HOST_DRIVER, state_dir=state)  # a restarted agent
    assert again.owed() == str(err.value)
    host.heal("nvidia-ctk")
    again.refresh()
    assert again.owed() is None


def test_cdi_auto_is_on_where_the_toolkit_wrote_an_nvidia_spec(tmp_path: Path) -> None:
    with_cdi = HostRootFixture.build(tmp_path / "a")
    without = HostRootFixture.build(tmp_path / "b", cdi_spec=False)
    assert Cdi(HostRoot(with_cdi.root)).enabled()
    assert not Cdi(HostRoot(without.root)).enabled()
    assert Cdi(HostRoot(without.root), CdiMode.ON).enabled()
    assert not Cdi(HostRoot(with_cdi.root), CdiMode.OFF).enabled()


# --- host GPU clients ---------------------------------------------------------------------------------


def test_the_operators_clients_list_is_read_and_a_bad_one_is_named() -> None:
    assert parse_gpu_clients(OPERATOR_CLIENTS) == (
        "nvsm.service",
        "nvidia-dcgm.service",
        "dcgm-exporter.service",
    )
    assert parse_gpu_clients("") == ()
    for bad, says in (
        ("version: v2\nsystemd-services: []", "only v1"),
        ("systemd-services: nvsm.service", "must be a list"),
        ("systemd-services: ['--now']", "not a systemd unit name: --now"),
        ("[a, b]", "must be a mapping"),
        ("a: [", "not YAML"),
    ):
        with pytest.raises(HostClientsError, match=says):
            parse_gpu_clients(bad)


def test_only_running_clients_are_stopped_and_kubelet_only_on_a_mode_change(
    host: HostRootFixture, tmp_path: Path
) -> None:
    listed = tmp_path / "clients.yaml"
    listed.write_text(OPERATOR_CLIENTS)
    clients = HostClients(HostRoot(host.root), FileClients(listed), HostClientsMode.ON)
    assert clients.listed(mode_change=False) == [
        "nvsm.service",
        "nvidia-dcgm.service",
        "dcgm-exporter.service",
    ]
    units = clients.running(clients.listed(mode_change=True))
    assert units == ["nvidia-dcgm.service", "kubelet.service"]
    clients.stop(units)
    assert not host.running("nvidia-dcgm.service") and not host.running("kubelet.service")
    assert clients.start(units) == []
    assert host.running("nvidia-dcgm.service") and host.running("kubelet.service")
    assert host.calls()[-2:] == ["systemctl start nvidia-dcgm.service", "systemctl start kubelet.service"]


def test_a_client_that_does_not_start_is_named_and_the_others_still_start(host: HostRootFixture) -> None:
    clients = HostClients(HostRoot(host.root), None, HostClientsMode.ON)
    problems = clients.start(["gone.service", "nvidia-dcgm.service"])
    assert problems == [
        "host GPU client gone.service was not started again: `systemctl start gone.service` on the host "
        "exited 5: Failed to start gone.service: Unit gone.service not found."
    ]
    assert host.running("nvidia-dcgm.service")


def test_host_clients_auto_follow_the_driver_marker(host: HostRootFixture) -> None:
    root = HostRoot(host.root)
    assert HostClients(root, driver=HOST_DRIVER).enabled()
    assert not HostClients(root, driver=CONTAINER_DRIVER).enabled()
    assert not HostClients(root).enabled()  # no marker: nothing known, nothing stopped
    assert HostClients(root, mode=HostClientsMode.ON).enabled()
