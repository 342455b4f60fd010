"""pytest fixtures for the local control plane. Register with
``pytest_plugins = ["devcluster.pytest_plugin"]`` in the top-level conftest.py.

Fixtures:

* ``control_plane`` (session): a started :class:`~devcluster.controlplane.ControlPlane`
  (etcd + kube-apiserver + a service-account-only controller manager);
* ``k8s_api``: its admin ``kubernetes.client.ApiClient``; ``kubeconfig``: the admin kubeconfig path;
* ``workload_plane`` (session): the same plane with the full controller manager, kube-scheduler and
  kwok started (lazily, on first use);
* ``user_client``: ``user_client(cn, groups=())`` -> ApiClient with a client certificate for that user;
* ``kubectl``: a function running the kubectl binary against the admin kubeconfig, returning a
  ``subprocess.CompletedProcess[str]``;
* ``real_node`` (session): a :class:`~devcluster.node.RealNode` (a control plane of its own plus a
  real kubelet, kube-proxy and containerd; root only) with the Debian base image imported. When it
  stops, every host change must have been undone, or its teardown fails.

Tests using them are marked ``cluster`` (and ``workloads``, or ``realnode``) automatically. When such a test fails,
the tails of the component logs are added to its report. Missing binaries are an error that says how
to get them, never a skip.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

from devcluster import binaries
from devcluster.controlplane import ControlPlane
from devcluster.node import RealNode

KubectlRunner = Callable[..., "subprocess.CompletedProcess[str]"]

_plane_key = pytest.StashKey[ControlPlane]()
_node_key = pytest.StashKey[RealNode]()
REAL_NODE_FIXTURES = {"real_node"}
CLUSTER_FIXTURES = {
    "control_plane", "k8s_api", "kubeconfig", "workload_plane", "kubectl", "user_client", *REAL_NODE_FIXTURES,
}  # fmt: skip


#: Test files using the real node live in folders of this name: under pytest-xdist they all run on
#: one worker (one real node per machine, started once), see :class:`_ParallelRun`.
REAL_NODE_DIR = "realnode"


class _ParallelRun:
    """Under pytest-xdist with ``--dist loadfile``: each test file runs on one worker (its module
    fixtures, a webhook or a cluster of nodes, start once), every file under a ``realnode/`` folder on
    the same worker, and that group first, as it is the longest."""

    SCOPE = "real node"

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") != "loadfile":
            return None
        from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]  # noqa: PLC0415

        scope = self.SCOPE

        class RealNodeFirst(LoadScopeScheduling):  # type: ignore[misc]
            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::", 1)[0]
                return scope if REAL_NODE_DIR in path.split("/")[:-1] else path

            def _assign_work_unit(self, node: Any) -> None:
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
                super()._assign_work_unit(node)

        return RealNodeFirst(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_ParallelRun(), "devcluster-parallel-run")
    # Also declared in pyproject.toml; repeated here so the plugin works in any project.
    config.addinivalue_line("markers", "cluster: needs the local control plane (kube-apiserver + etcd)")
    config.addinivalue_line("markers", "workloads: needs controller-manager, scheduler and kwok as well")
    config.addinivalue_line(
        "markers", "realnode: needs root and a real node (kubelet, containerd; devcluster.node)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if "workload_plane" in names:
            item.add_marker(pytest.mark.workloads)
        if names & REAL_NODE_FIXTURES:
            item.add_marker(pytest.mark.realnode)
        item.user_properties.append((_KIND, _kind(item)))
        if names & REAL_NODE_FIXTURES and REAL_NODE_DIR not in item.path.parts:
            raise pytest.UsageError(
                f"{item.nodeid} uses the real node: put it under a {REAL_NODE_DIR}/ folder, where the "
                "parallel run gives all real-node tests to one worker (one real node per machine)"
            )


_KIND = "mig_guard_kind"
_kind_seconds: dict[str, float] = {}  # this process's session (the controller's under xdist)


def _kind(item: pytest.Item) -> str:
    if item.get_closest_marker("realnode"):
        return "real node"
    if item.get_closest_marker("cluster"):
        return "control plane"
    return "unit"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Where the time went: unit tests, control-plane tests, real-node tests (setup and teardown
    of the session fixtures included in the kind that used them first/last; summed over workers)."""
    if _kind_seconds:
        parts = ", ".join(f"{kind} {secs:.0f}s" for kind, secs in sorted(_kind_seconds.items()))
        terminalreporter.write_line(f"test time by kind: {parts}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Runs where reports are collected (the controller under xdist), so every worker's count."""
    kind = dict(report.user_properties).get(_KIND)
    if isinstance(kind, str):
        _kind_seconds[kind] = _kind_seconds.get(kind, 0.0) + report.duration


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    if not set(getattr(item, "fixturenames", ())) & CLUSTER_FIXTURES:
        return
    names = set(getattr(item, "fixturenames", ()))
    node = item.config.stash.get(_node_key, None)
    if node is not None and names & REAL_NODE_FIXTURES:
        report.sections.append(("real node logs (tails)", node.log_tails(lines=25)))
        return
    plane = item.config.stash.get(_plane_key, None)
    if plane is not None:
        report.sections.append(("devcluster logs (tails)", plane.log_tails(lines=25)))


def _require(names: Sequence[str]) -> None:
    """Fail (not skip) with the how-to-get-them message when a binary is missing."""
    message = None
    try:
        binaries.find_all(names)
    except binaries.BinariesMissingError as exc:
        message = str(exc)
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Generator[ControlPlane]:
    _require(("etcd", "kube-apiserver", "kube-controller-manager"))
    workdir = tmp_path_factory.mktemp("devcluster")
    plane = ControlPlane(workdir=workdir)
    request.config.stash[_plane_key] = plane
    try:
        plane.start()
    except Exception:
        print(plane.log_tails(lines=40))
        raise
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def workload_plane(control_plane: ControlPlane) -> ControlPlane:
    _require(("kube-scheduler", "kwok"))
    control_plane.start_workloads()
    return control_plane


@pytest.fixture(scope="session")
def k8s_api(control_plane: ControlPlane) -> Any:
    return control_plane.api


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig_path


@pytest.fixture(scope="session")
def user_client(control_plane: ControlPlane) -> Callable[..., Any]:
    """``user_client(cn, groups=())`` -> ApiClient authenticating with a client certificate for that
    user and groups, signed by the cluster CA."""
    return control_plane.user_client


@pytest.fixture(scope="session")
def kubectl_binary() -> Path:
    _require(("kubectl",))
    return binaries.find_binary("kubectl")


@pytest.fixture
def kubectl(kubectl_binary: Path, kubeconfig: Path) -> KubectlRunner:
    def run(
        *args: str | Sequence[str],
        input: str | None = None,
        check: bool = False,
        timeout: float = 60,
        kubeconfig_path: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv: list[str] = []
        for arg in args:
            argv.extend([arg] if isinstance(arg, str) else list(arg))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig_path or kubeconfig)}
        return subprocess.run(
            [str(kubectl_binary), *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=env,
        )

    return run


@pytest.fixture(scope="session")
def real_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Generator[RealNode]:
    """A real node for the session (see :mod:`devcluster.node`); fails (never skips) when the host
    cannot run one, saying why."""
    from devcluster.images import debian_base_image  # noqa: PLC0415 - only real-node sessions build it

    _require(("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"))
    node = RealNode(tmp_path_factory.mktemp("realnode"), images=[debian_base_image()])
    request.config.stash[_node_key] = node
    try:
        node.start()
    except Exception:
        print(node.log_tails(lines=40))
        raise
    try:
        yield node
    finally:
        node.stop()
        print(f"real node stopped: {len(node.undone)} host changes undone")
    if node.leftovers:
        pytest.fail(
            "the real node left host changes behind:\n  " + "\n  ".join(node.leftovers), pytrace=False
        )
