"""`kubectl mig` on the real API server, run the way an admin runs it: the real kubectl finds the
`kubectl-mig` executable on PATH (kubectl's plugin convention) and it reads the current kubeconfig.
Nodes carry what the real code writes: the hardware report from the simulated NVML through the
reconciler's discovery, the usage report of `migcore.usage`, the state, reason, condition and
Events through the reconciler's `NodeState`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devcluster import binaries
from devcluster.controlplane import ControlPlane
from devcluster.helpers import create_gpu_node, ensure_namespace
from devcluster.kubeconfig import kubeconfig_dict, write_kubeconfig
from migcore import keys
from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_report, valid_config_names
from migcore.config import parse_config
from migcore.impact import preview
from migcore.planning import desired_geometries, plan_node
from migcore.usage import NodeUsage, PodRef
from reconciler.gpu_access import GpuAccess
from reconciler.node_state import NodeState
from reconciler.nvml_sim import SimulatedNvml

A100 = "NVIDIA-A100-SXM4-40GB"
NAMESPACE = "kubectl-mig-test"
CONFIGMAP = f"{NAMESPACE}/mig-parted-config"
CONFIG = """\
version: v1
mig-configs:
  all-3g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  gpu1-7g:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [1]
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
  all-1g.10gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
"""
Mig = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def mig(control_plane: ControlPlane) -> Mig:
    """`kubectl mig ARGS` with the admin's kubeconfig (or `kubeconfig=`), kubectl-mig on PATH."""
    kubectl = str(binaries.find_binary("kubectl"))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def run(*args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": path, "KUBECONFIG": str(kubeconfig or control_plane.kubeconfig_path)}
        env.pop("KUBECTL_MIG_CONFIGMAP", None)
        return subprocess.run(
            [kubectl, "mig", *args], capture_output=True, text=True, timeout=60, env=env, check=False
        )

    return run


@pytest.fixture(scope="module")
def gpus() -> GpuAccess:
    """Two simulated A100s holding all-3g (applied through the reconciler's planner and NVML code)."""
    access = GpuAccess(SimulatedNvml([A100] * 2))
    access.start()
    catalog = load_catalog()
    result = check_config(
        parse_config(CONFIG, catalog), "all-3g", hardware_from_report(catalog, access.discover())
    )
    current = access.geometries()
    for gpu_plan in plan_node(current, desired_geometries(result, current)).changed:
        access.apply(gpu_plan)
    return access


@pytest.fixture(scope="module")
def configmap(k8s_api: Any) -> str:
    ensure_namespace(k8s_api, NAMESPACE)
    body = {"metadata": {"name": "mig-parted-config"}, "data": {keys.MIG_PARTED_CONFIG_KEY: CONFIG}}
    k8s.CoreV1Api(k8s_api).create_namespaced_config_map(NAMESPACE, body)
    return CONFIGMAP


def usage_on(gpus: GpuAccess, spots: dict[str, tuple[int, int]]) -> NodeUsage:
    places = {i: gpus.device_places(i) for i in range(gpus.gpu_count())}
    by_spot = {(p.gpu, p.gi): p for ids in places.values() for p in ids.values()}
    return NodeUsage.build(
        places, {PodRef(*n.split("/")): [by_spot[s]] for n, s in spots.items()}, "podresources"
    )


def reported_node(k8s_api: Any, gpus: GpuAccess, usage: NodeUsage | None = None, **labels: str) -> str:
    """A node as its reconciler leaves it after applying all-3g: reports, state, condition, Event."""
    name = f"mig-{uuid.uuid4().hex[:6]}"
    notes = {keys.ANNOTATION_GPUS: gpus.discover().to_annotation()}
    if usage is not None:
        notes[keys.ANNOTATION_USAGE] = usage.to_annotation()
    create_gpu_node(
        k8s_api,
        name,
        A100,
        2,
        fake=False,
        annotations=notes,
        labels={keys.LABEL_MIG_CONFIG: "all-3g", **labels},
    )
    NodeState(k8s_api, name).report(keys.STATE_SUCCESS, "all-3g applied: GPUs 0-1: 3g.20gb@0, 3g.20gb@4")
    return name


def test_status_shows_each_node_at_a_glance(mig: Mig, k8s_api: Any, gpus: GpuAccess, viewer: Path) -> None:
    done = reported_node(k8s_api, gpus)
    bare = f"mig-{uuid.uuid4().hex[:6]}"
    create_gpu_node(k8s_api, bare, "NVIDIA-H100-80GB-HBM3", 8, fake=False)
    result = mig("status", done, bare, kubeconfig=viewer)
    assert result.returncode == 0, result.stderr
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["NODE", "GPUS", "CONFIG", "STATE", "FOR", "HELD", "REASON"]
    assert first.split()[:6] == [done, "A100-SXM4-40GB", "x2", "all-3g", "success", first.split()[5]]
    assert first.split()[6] == "-" and first.endswith("all-3g applied: GPUs 0-1: 3g.20gb@0, 3g.20gb@4")
    assert second.split() == [bare, "H100-80GB-HBM3", "x8", "(labels)", "-", "-", "-", "-", "-"]
    data = json.loads(mig("status", done, "-o", "json").stdout)
    # kubectl's habit: the output flag before the command works the same.
    assert json.loads(mig("-o", "json", "status", done).stdout)["nodes"][0]["node"] == done
    (node,) = data["nodes"]
    assert node["gpus"] == {"text": "A100-SXM4-40GB x2", "count": 2, "source": keys.ANNOTATION_GPUS}
    assert (node["config"], node["state"], node["held"]) == ("all-3g", "success", [])
    assert node["forSeconds"] is not None and node["forSeconds"] >= 0
    every = mig("status", "-o", "json")
    assert {done, bare} <= {n["node"] for n in json.loads(every.stdout)["nodes"]}


@pytest.fixture(scope="module")
def viewer(control_plane: ControlPlane, k8s_api: Any) -> Path:
    """A kubeconfig of a user with only the read access docs/reference.md says `kubectl mig` needs
    (and no write at all: whatever it tried to write would be refused, and it would fail)."""
    rbac = k8s.RbacAuthorizationV1Api(k8s_api)
    name = f"kubectl-mig-viewer-{uuid.uuid4().hex[:6]}"
    rules = [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    ]
    rbac.create_cluster_role({"metadata": {"name": name}, "rules": rules})
    subject = {"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}
    role = {"kind": "ClusterRole", "name": name, "apiGroup": "rbac.authorization.k8s.io"}
    rbac.create_cluster_role_binding({"metadata": {"name": name}, "subjects": [subject], "roleRef": role})
    return control_plane.write_user_kubeconfig(name)


def test_plan_names_the_pods_a_change_evicts_and_writes_nothing(
    mig: Mig, k8s_api: Any, gpus: GpuAccess, configmap: str, viewer: Path
) -> None:
    usage = usage_on(gpus, {"ml/stays": (0, 0), "ml/train": (1, 0), "ml/infer": (1, 4)})
    name = reported_node(k8s_api, gpus, usage)
    notes_before = k8s.CoreV1Api(k8s_api).read_node(name).metadata.annotations
    # Run as a user who may only read: a write would be refused and the plan would fail.
    result = mig("plan", name, "gpu1-7g", "--configmap", configmap, kubeconfig=viewer)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"node {name}: all-3g -> gpu1-7g (ConfigMap {configmap})"
    assert lines[1] == "impact of gpu1-7g: 1 of 2 GPUs change, 2 pods to evict"
    assert lines[2] == "GPU 1: 3g.20gb x2 -> 7g.40gb, evicts ml/infer, ml/train"
    assert lines[3] == "    3g.20gb@0, 3g.20gb@4 -> 7g.40gb@0 (6 NVML operations)"
    assert lines[4] == "GPU 0 untouched"
    assert "evicts (2): ml/infer, ml/train" in lines
    assert (
        lines[-1]
        == f"nothing was changed; to apply: kubectl label node {name} nvidia.com/mig.config=gpu1-7g --overwrite"
    )
    # The same answer as the preview from the node's reports, with every NVML operation on request.
    data = json.loads(mig("plan", name, "gpu1-7g", "--configmap", configmap, "-o", "json").stdout)
    node = k8s.CoreV1Api(k8s_api).read_node(name)
    catalog = load_catalog()
    impact = preview(
        parse_config(CONFIG, catalog),
        "gpu1-7g",
        gpus.discover(),
        NodeUsage.from_annotation(node.metadata.annotations[keys.ANNOTATION_USAGE]),
        catalog,
    )
    assert data["evicts"] == [str(p) for p in impact.evicts] == ["ml/infer", "ml/train"]
    assert data["gpus"][0]["operations"][0] == "destroy-ci 3g.20gb@0 in GI@0"
    verbose = mig("plan", name, "gpu1-7g", "--configmap", configmap, "--operations").stdout
    assert "    create-gi 7g.40gb@0" in verbose.splitlines()
    # Nothing of mig-guard's changed (the controller manager may settle the new node meanwhile).
    mine = {k: v for k, v in (node.metadata.annotations or {}).items() if k.startswith(keys.PREFIX)}
    assert mine == {k: v for k, v in (notes_before or {}).items() if k.startswith(keys.PREFIX)}
    assert node.metadata.labels[keys.LABEL_MIG_CONFIG] == "all-3g"


def test_plan_refuses_what_the_webhook_refuses_in_one_sentence(
    mig: Mig, k8s_api: Any, gpus: GpuAccess, configmap: str
) -> None:
    name = reported_node(k8s_api, gpus)
    typo = mig("plan", name, "all-3gg", "--configmap", configmap)
    assert typo.returncode == 1
    assert typo.stderr.startswith(
        f'error: nvidia.com/mig.config="all-3gg" is not a config in ConfigMap {configmap}; did you mean all-3g'
    )
    assert len(typo.stderr.strip().splitlines()) == 1
    wrong = mig("plan", name, "all-1g.10gb", "--configmap", configmap)
    assert wrong.returncode == 1
    assert (
        f'error: nvidia.com/mig.config="all-1g.10gb" does not fit node {name} (NVIDIA A100-SXM4-40GB x2'
        in wrong.stderr
    )
    assert (
        "1g.10gb x7 needs 7 GPU instances; NVIDIA A100-SXM4-40GB (driver table) allows at most 4"
        in wrong.stderr
    )


def test_configs_lists_what_fits_and_why_the_rest_does_not(
    mig: Mig, k8s_api: Any, gpus: GpuAccess, configmap: str, viewer: Path
) -> None:
    name = reported_node(k8s_api, gpus)
    result = mig("configs", name, "--configmap", configmap, kubeconfig=viewer)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[1].split()[:3] == ["*", "all-3g", "yes"]  # the current layout, marked
    assert rows[2].split()[:2] == ["gpu1-7g", "yes"]
    assert (
        rows[3].startswith("  all-1g.10gb") and "no     GPUs 0-1: 1g.10gb x7 needs 7 GPU instances" in rows[3]
    )
    assert rows[-1] == (
        f"2 of 3 configs in ConfigMap {configmap} fit node {name} (NVIDIA A100-SXM4-40GB x2, from "
        "mig-guard.io/gpus); * marks its current layout"
    )
    data = json.loads(mig("configs", name, "--configmap", configmap, "-o", "json").stdout)
    catalog = load_catalog()
    expected = valid_config_names(
        parse_config(CONFIG, catalog), hardware_from_report(catalog, gpus.discover())
    )
    assert [c["name"] for c in data["configs"] if c["valid"]] == expected


def test_why_shows_the_reason_condition_events_hold_and_what_it_waits_for(
    mig: Mig, k8s_api: Any, gpus: GpuAccess, viewer: Path
) -> None:
    name = reported_node(k8s_api, gpus)
    out = mig("why", name, kubeconfig=viewer).stdout
    assert f"node {name}: all-3g, success for " in out
    assert "reason:       all-3g applied: GPUs 0-1: 3g.20gb@0, 3g.20gb@4" in out
    assert "condition:    MIGConfigReady=True (Applied), since " in out
    assert "hold:         none" in out and "change:       none in flight" in out
    assert "waiting for:  nothing: the GPUs hold all-3g" in out
    assert "Normal   Applied          all-3g applied" in out  # the reconciler's Event
    # A change in flight: what its phase waits for, and the hold.
    progress = {"version": 1, "config": "gpu1-7g", "phase": "evicting", "startedAt": "2026-01-01T00:00:00Z"}
    hold = {
        "at": "2026-01-01T00:00:00Z",
        "by": "webhook",
        "config": "gpu1-7g",
        "cordon": False,
        "taint": True,
    }
    k8s.CoreV1Api(k8s_api).patch_node(
        name,
        {
            "metadata": {
                "labels": {keys.LABEL_MIG_CONFIG: "gpu1-7g", keys.LABEL_MIG_STATE: keys.STATE_PENDING},
                "annotations": {
                    keys.ANNOTATION_PROGRESS: json.dumps(progress),
                    keys.ANNOTATION_HOLD: json.dumps(hold),
                    keys.ANNOTATION_REASON: "gpu1-7g: evicting 2 pods: ml/infer, ml/train",
                },
            },
            "spec": {"taints": [{"key": keys.TAINT_KEY, "effect": keys.TAINT_EFFECT, "value": "gpu1-7g"}]},
        },
    )
    data = json.loads(mig("why", name, "-o", "json").stdout)
    assert (
        data["waitingFor"]
        == "the pods on changing GPU instances to be evicted (PodDisruptionBudgets respected)"
    )
    assert data["hold"] == {
        "held": ["taint"],
        "by": "webhook",
        "for": "gpu1-7g",
        "since": "2026-01-01T00:00:00Z",
    }
    assert data["change"]["phase"] == "evicting"
    # What a reason says it waits for (a rollout's, the webhook's) is shown as it says it.
    k8s.CoreV1Api(k8s_api).patch_node(
        name,
        {
            "metadata": {
                "annotations": {
                    keys.ANNOTATION_PROGRESS: None,
                    keys.ANNOTATION_REASON: "waiting for a rollout slot (3 of 3 nodes are changing)",
                }
            }
        },
    )
    assert "waiting for:  a rollout slot (3 of 3 nodes are changing)" in mig("why", name).stdout


def test_errors_are_one_sentence(mig: Mig, k8s_api: Any, control_plane: ControlPlane, tmp_path: Path) -> None:
    unknown = mig("why", "no-such-node")
    assert (unknown.returncode, unknown.stderr) == (
        1,
        'error: node "no-such-node" not found (kubectl get nodes lists the nodes)\n',
    )
    bare = f"mig-{uuid.uuid4().hex[:6]}"
    create_gpu_node(k8s_api, bare, A100, 2, fake=False)
    no_report = mig("plan", bare, "all-3g")
    assert no_report.returncode == 1
    assert no_report.stderr == (
        f"error: node {bare} has no GPU report yet (mig-guard.io/gpus): mig-guard's reconciler has not "
        "reported from it (is its pod running on that node?)\n"
    )
    stranger = control_plane.write_user_kubeconfig("stranger")
    forbidden = mig("status", bare, kubeconfig=stranger)
    assert forbidden.returncode == 1
    assert forbidden.stderr == (
        f'error: nodes "{bare}" is forbidden: User "stranger" cannot get resource "nodes" in API group "" '
        "at the cluster scope (ask your cluster admin for read access)\n"
    )
    away = write_kubeconfig(
        tmp_path / "away.kubeconfig",
        kubeconfig_dict("https://127.0.0.1:1", control_plane.ca_pem, token="t"),
    )
    unreachable = mig("status", kubeconfig=away)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("error: cannot reach the API server at https://127.0.0.1:1: ")
    assert len(unreachable.stderr.strip().splitlines()) == 1
    context = mig("status", "--context", "nope")
    assert context.returncode == 1 and context.stderr.startswith("error: no usable kubeconfig (")
    usage = mig("plan", bare)
    assert usage.returncode == 2 and "error: the following arguments are required: CONFIG" in usage.stderr
