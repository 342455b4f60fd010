"""How a change ends when something goes wrong (issue 11), in-process on the real API server with
simulated GPUs: every touched GPU rolled back, pending MIG modes seen, GPU users found by every
resource name and device id form, pods drained before a host reboot, every GPU back after it.

Each test reproduces a failure a review found; the invariant they share: after a change ends,
each GPU holds its old layout or the new one, and the reason says which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from node_harness import DP, DP_VALUE, SimNode, layouts, make_node

from migcore import keys
from reconciler.podresources.server import PodResourcesServer


def _released(node: SimNode) -> None:
    """Operands restored exactly, hold lifted, no change record left."""
    labels, annotations = node.labels(), node.annotations()
    assert labels.get(DP) == DP_VALUE
    assert not node.held()
    assert keys.ANNOTATION_PROGRESS not in annotations


def _settled_modes(node: SimNode) -> None:
    assert all(current == pending for current, pending in node.modes().values()), node.modes()


# --- 1. a mode change still pending after the reboot ------------------------------------------------


def test_a_mode_change_still_pending_after_the_reboot_rolls_every_gpu_back(
    k8s_api: Any, tmp_path: Path
) -> None:
    node = make_node(k8s_api, tmp_path, gpus=2, initial="all-1g", reset_requires_reboot=[1])
    before = node.geometries()
    reboots: list[str] = []
    # The host came back but the GPU did not switch modes (a warm reboot that does not reset it).

    def warm_reboot() -> None:
        reboots.append("reboot")
        node.nvml().simReboot(reset_gpus=False)

    rec = node.reconciler(reboot=warm_reboot)
    rec.reconcile("start")
    node.label("gpu0-3g-gpu1-off")
    rec.reconcile("label")
    assert node.state()[0] == "rebooting" and reboots == ["reboot"]

    node.reconciler(reboot=lambda: reboots.append("again")).reconcile("start")  # the agent after it
    state, reason = node.state()
    assert state == "failed", reason
    assert "pending" in reason, reason
    assert node.geometries() == before  # GPU 0 too, which had taken the new layout
    _settled_modes(node)  # no "MIG off" left for the next reboot to activate
    assert reboots == ["reboot"]  # one reboot per change
    _released(node)


# --- 2. rollback tries every GPU ----------------------------------------------------------------------


def test_rollback_tries_every_gpu_and_names_each_one_not_restored(k8s_api: Any, tmp_path: Path) -> None:
    node = make_node(k8s_api, tmp_path, gpus=3, initial="all-1g")
    before = node.geometries()
    # The 5th GI create (GPU 2's first) fails; the 13th (GPU 0's first on the way back) fails too.
    create = "nvmlDeviceCreateGpuInstanceWithPlacement"
    rec = node.reconciler(faults=f"{create}@5=InsufficientResources;{create}@13=InsufficientResources")
    rec.reconcile("start")
    node.label("all-3g")
    rec.reconcile("label")
    state, reason = node.state()
    now = node.geometries()
    assert state == "failed", reason
    assert now[1] == before[1] and now[2] == before[2], reason  # tried although GPU 0 failed
    assert now[0] != before[0]
    assert f"GPU 0 was not restored, it holds: {now[0].summary()}" in reason, reason
    assert "GPU 1" in reason and "GPU 2" in reason  # and what happened to them
    _released(node)


# --- 3. GPU users by every resource name and device id form ------------------------------------------


def test_pods_on_renamed_shared_gpus_move_and_old_mig_ids_are_placed(
    workload_plane: Any, tmp_path: Path
) -> None:
    node = make_node(workload_plane.api, tmp_path, gpus=2, initial="gpu0-3g-gpu1-off", fake=True)
    node.run_pod("shared", {"nvidia.com/gpu.shared": "1"})  # time-slicing with renameByDefault
    node.run_pod("old-id", {"nvidia.com/mig-3g.20gb": "1"})  # a plugin naming MIG devices by GPU/GI/CI
    node.wait_running({"shared", "old-id"})
    _, gi, ci = node.mig_devices(0)[4]
    socket = tmp_path / f"{node.name}.sock"
    server = PodResourcesServer(
        str(socket),
        {
            (node.namespace, "shared"): [("nvidia.com/gpu.shared", [f"{node.uuid(1)}::0"])],
            (node.namespace, "old-id"): [("nvidia.com/mig-3g.20gb", [f"MIG-{node.uuid(0)}/{gi}/{ci}"])],
        },
    ).start()
    try:
        rec = node.reconciler(socket=socket)
        node.label("all-3g")  # GPU 1: MIG off -> on; GPU 0 keeps its instances
        rec.reconcile("label")
    finally:
        server.stop()
    state, reason = node.state()
    assert state == "success", reason
    assert node.pods() == {"old-id"}  # the shared GPU's pod moved; the pod on GPU 0 stayed


def test_without_podresources_every_pod_on_a_gpu_resource_counts(workload_plane: Any, tmp_path: Path) -> None:
    node = make_node(workload_plane.api, tmp_path, gpus=2, initial="all-3g", fake=True)
    node.run_pod("shared", {"nvidia.com/gpu.shared": "1"})
    node.run_pod("renamed", {"example.com/timesliced-a100": "1"})  # the admin's own name
    node.run_pod("cpu", {"cpu": "100m"})
    node.wait_running({"shared", "renamed", "cpu"})
    rec = node.reconciler(gpu_resources=("example.com/timesliced-*",))
    node.label("all-7g")
    rec.reconcile("label")
    state, reason = node.state()
    assert state == "success", reason
    assert node.pods() == {"cpu"}


# --- 4. a pending MIG mode ---------------------------------------------------------------------------


def _set_pending_off_outside(node: SimNode) -> None:
    """`nvidia-smi -i 0 -mig 0` without a reset: MIG off pending on GPU 0."""
    nvml = node.nvml()
    nvml.nvmlInit()
    nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(0), 0)


def test_a_pending_mode_set_outside_is_a_change_that_clears_it(k8s_api: Any, tmp_path: Path) -> None:
    node = make_node(k8s_api, tmp_path, gpus=1, initial="all-enabled")
    rec = node.reconciler()
    rec.reconcile("start")
    assert node.state()[0] == "success"
    _set_pending_off_outside(node)
    assert node.modes()[0] == (True, False)
    rec.reconcile("resync")
    state, reason = node.state()
    assert state == "success", reason
    assert node.modes()[0] == (True, True)  # the next reboot no longer turns MIG off
    _released(node)


def test_an_apply_on_a_gpu_with_a_pending_mode_succeeds(k8s_api: Any, tmp_path: Path) -> None:
    node = make_node(k8s_api, tmp_path, gpus=1, initial="all-enabled")
    rec = node.reconciler()
    rec.reconcile("start")
    _set_pending_off_outside(node)
    node.label("all-7g")
    rec.reconcile("label")
    state, reason = node.state()
    assert state == "success", reason
    assert node.geometries() == layouts("all-7g", 1)
    assert node.modes()[0] == (True, True)


# --- the reboot ---------------------------------------------------------------------------------------


def test_before_a_reboot_pods_on_every_gpu_move_and_after_it_every_gpu_is_back(
    workload_plane: Any, tmp_path: Path
) -> None:
    node = make_node(
        workload_plane.api, tmp_path, gpus=2, initial="all-3g", fake=True, reset_requires_reboot=[0]
    )
    node.run_pod("on-gpu1", {"nvidia.com/mig-3g.20gb": "1"})
    node.wait_running({"on-gpu1"})
    before = node.geometries()
    socket = tmp_path / f"{node.name}.sock"
    uid, _, _ = node.mig_devices(1)[0]
    server = PodResourcesServer(
        str(socket), {(node.namespace, "on-gpu1"): [("nvidia.com/mig-3g.20gb", [uid])]}
    ).start()
    pods_at_reboot: list[set[str]] = []

    def reboot() -> None:
        pods_at_reboot.append(node.pods())
        node.nvml().simReboot()

    try:
        node.reconciler(socket=socket, reboot=reboot).reconcile("start")
        node.label("gpu0-off")  # GPU 0 MIG off (only a reboot activates it); GPU 1 not in the config
        node.reconcilers[-1].reconcile("label")
        assert pods_at_reboot == [set()]  # the pod on GPU 1 was evicted: the reboot would kill it
        node.reconciler(socket=socket, reboot=reboot).reconcile("start")
    finally:
        server.stop()
    state, reason = node.state()
    assert state == "success", reason
    now = node.geometries()
    assert not now[0].mig_enabled
    assert now[1] == before[1]  # the reboot emptied GPU 1 too; its layout is restored
    _released(node)


def test_a_reboot_that_would_break_a_disruption_budget_is_refused(
    workload_plane: Any, tmp_path: Path
) -> None:
    node = make_node(
        workload_plane.api, tmp_path, gpus=2, initial="all-3g", fake=True, reset_requires_reboot=[0]
    )
    node.run_pod("guarded", {"nvidia.com/mig-3g.20gb": "1"})
    node.wait_running({"guarded"})
    k8s.PolicyV1Api(node.api).create_namespaced_pod_disruption_budget(
        node.namespace,
        {
            "metadata": {"name": "guarded-pdb"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
        },
    )
    before = node.geometries()
    socket = tmp_path / f"{node.name}.sock"
    uid, _, _ = node.mig_devices(1)[0]
    server = PodResourcesServer(
        str(socket), {(node.namespace, "guarded"): [("nvidia.com/mig-3g.20gb", [uid])]}
    ).start()
    reboots: list[str] = []
    try:
        rec = node.reconciler(socket=socket, reboot=lambda: reboots.append("reboot"), eviction_timeout=2.0)
        rec.reconcile("start")
        node.label("gpu0-off")
        rec.reconcile("label")
    finally:
        server.stop()
    state, reason = node.state()
    assert state == "failed", reason
    assert reboots == []
    assert "reboot" in reason and f"PodDisruptionBudget {node.namespace}/guarded-pdb" in reason, reason
    assert node.geometries() == before
    _settled_modes(node)
    assert node.pods() == {"guarded"}
    _released(node)


def test_a_label_change_while_rebooting_is_applied_after_the_reboot(k8s_api: Any, tmp_path: Path) -> None:
    node = make_node(k8s_api, tmp_path, gpus=2, initial="all-disabled", reset_requires_reboot=[0, 1])
    reboots: list[str] = []

    def reboot() -> None:
        reboots.append("reboot")
        node.nvml().simReboot()
        if len(reboots) == 1:
            node.label("all-disabled")  # the admin changes their mind while the host is down

    node.reconciler(reboot=reboot).reconcile("start")
    node.label("all-3g")
    node.reconcilers[-1].reconcile("label")
    assert node.state()[0] == "rebooting"
    node.reconciler(reboot=reboot).reconcile("start")  # after the first reboot: all-disabled now
    state, reason = node.state()
    # A new change (MIG off needs its own reboot here), not "the reboot did not take effect".
    assert state == "rebooting" and "for all-disabled" in reason, reason
    node.reconciler(reboot=reboot).reconcile("start")  # after the second reboot
    state, reason = node.state()
    assert state == "success", reason
    assert reason.startswith("all-disabled applied"), reason
    assert node.geometries() == layouts("all-disabled", 2)
    _settled_modes(node)
    _released(node)
