"""The fault-injection sweep over a whole change (issue 11): for each scenario, an NVML fault, an API
error and a SIGKILL at every step, each ending in a state whose reason matches the GPUs as they
are, operands restored, the hold lifted, no change record left.

A step is a call that changes the GPUs (each NVML create/destroy/mode/reset, the host reboot) or a
write of the Node (what the agent has told the cluster). One dry run per scenario lists them; every
case then gets a fresh Node and fresh simulated GPUs on the one session control plane, runs the
change in-process through the fault proxy, and checks the end. A SIGKILL is real: the change runs
in a forked child that the simulated NVML (`fn@N=SIGKILL`) or the proxy (after the API server took
the write, before the agent hears back) kills; the parent then plays the restarted agent.

Each test loops over the steps of one (scenario, fault) pair and reports every wrong end state at
once, so the list is what the sweep found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from node_harness import DP, DP_VALUE, SimNode, layouts, make_node

from devcluster.faultproxy import Fault, FaultProxy, Request, node_write
from migcore import keys
from migcore.geometry import GpuGeometry
from migcore.hardware import NodeGpus
from reconciler.loop import Reconciler

MUTATING = frozenset(
    {
        "nvmlDeviceSetMigMode",
        "nvmlDeviceCreateGpuInstanceWithPlacement",
        "nvmlGpuInstanceCreateComputeInstanceWithPlacement",
        "nvmlGpuInstanceDestroy",
        "nvmlComputeInstanceDestroy",
        "simResetGpu",
    }
)
# A realistic NVML error for each step that fails.
ERRORS = {
    "nvmlDeviceSetMigMode": "NotSupported",
    "nvmlDeviceCreateGpuInstanceWithPlacement": "InsufficientResources",
    "nvmlGpuInstanceCreateComputeInstanceWithPlacement": "InsufficientResources",
    "nvmlGpuInstanceDestroy": "InUse",
    "nvmlComputeInstanceDestroy": "InUse",
    "simResetGpu": "InUse",
}
REBOOT = "reboot"
API_RETRY_SECONDS = 0.2  # an outage outlasts the agent's retries at once


@dataclass(frozen=True)
class Scenario:
    gpus: int
    initial: str
    target: str
    reboot_only: tuple[int, ...] = ()  # GPUs whose MIG mode only a host reboot activates


SCENARIOS = {
    "relayout": Scenario(2, "all-3g", "all-7g"),
    "mode-change": Scenario(2, "all-3g", "all-disabled"),
    "mixed-mig-and-non-mig": Scenario(3, "mixed-a", "mixed-b"),
    "mode-change-with-reboot": Scenario(2, "all-disabled", "all-3g", reboot_only=(0, 1)),
}


@dataclass(frozen=True)
class Step:
    """The `n`th call of `fn` by the agent of boot `phase` (0: before the reboot, 1: after)."""

    phase: int
    fn: str
    n: int

    def __str__(self) -> str:
        return f"{self.fn}#{self.n}" + (" (after the reboot)" if self.phase else "")


@dataclass(frozen=True)
class DryRun:
    steps: tuple[Step, ...]
    writes: int


class Killed(Exception):
    """The agent died (SIGKILL) where the case wanted."""


# --- running a change -------------------------------------------------------------------------------


def _reboot(node: SimNode, kill: bool = False, fail: bool = False) -> Callable[[], None]:
    def reboot() -> None:
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if fail:
            raise RuntimeError("systemctl reboot: failed to start reboot.target")
        node.nvml().simReboot()

    return reboot


def _agent(
    node: SimNode,
    sc: Scenario,
    api: Any,
    faults: str | None = None,
    reboot: Callable[[], None] | None = None,
    retry_seconds: float = API_RETRY_SECONDS,
) -> Reconciler:
    return node.reconciler(
        api=api,
        faults=faults,
        reboot=reboot or (_reboot(node) if sc.reboot_only else None),
        api_retry_seconds=retry_seconds,
    )


def _change(
    node: SimNode,
    sc: Scenario,
    api: Any,
    faults: dict[int, str],
    reboot: Callable[[], None] | None = None,
    retry_seconds: float = API_RETRY_SECONDS,
) -> list[Reconciler]:
    """The agent reconciles the new label; after a host reboot, the agent of the next boot resumes."""
    agents: list[Reconciler] = []
    for phase in range(2):
        rec = _agent(node, sc, api, faults.get(phase), reboot, retry_seconds)
        agents.append(rec)
        rec.reconcile("label" if phase == 0 else "start")
        if rec.node.labels().get(keys.LABEL_MIG_STATE) != keys.STATE_REBOOTING:
            break
    return agents


def _change_in_child(
    node: SimNode, sc: Scenario, proxy: FaultProxy, faults: dict[int, str], reboot: Callable[[], None] | None
) -> None:
    """`_change` for a forked child: its own API client (the parent's connections are not its)."""
    _change(node, sc, proxy.api_client(), faults, reboot)


class Outage:
    """Matches every request from the Node write after the first `after` ones on (the API server
    going away in the middle of a change) until the fault is removed."""

    def __init__(self, writes: Callable[[Request], bool], after: int) -> None:
        self.writes, self.after, self.seen, self.down = writes, after, 0, False

    def __call__(self, request: Request) -> bool:
        if not self.down and self.writes(request):
            self.seen += 1
            self.down = self.seen > self.after
        return self.down


def _converge(node: SimNode, sc: Scenario, api: Any) -> None:
    """The agent coming back (after a crash, or the API server after an outage) until the change
    ends: a new agent per boot or restart, as the DaemonSet would start it."""
    for _ in range(4):
        _agent(node, sc, api).reconcile("start")
        state = node.state()[0]
        if state != keys.STATE_REBOOTING and keys.ANNOTATION_PROGRESS not in node.annotations():
            return


def _forked(run: Callable[[], None], kill_after: tuple[FaultProxy, str, int] | None = None) -> bool:
    """Run `run` in a forked child; True when the child died of SIGKILL (where the case put it).
    `kill_after` (proxy, node, k): the proxy kills it once the API server took Node write k+1."""
    child: list[int] = []
    if kill_after is not None:
        proxy, name, k = kill_after
        taken = [0]

        def kill(_request: Request, status: int) -> None:
            if 200 <= status < 300:  # a write retried after a conflict is one write
                taken[0] += 1
                if taken[0] == k + 1:
                    os.kill(child[0], signal.SIGKILL)

        proxy.add(Fault(node_write(name), after=kill, times=None))
    pid = os.fork()
    if pid == 0:  # the agent: never returns into pytest
        code = 0
        try:
            run()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    child.append(pid)
    _, status = os.waitpid(pid, 0)
    if kill_after is not None:
        kill_after[0].clear()
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# --- the end state --------------------------------------------------------------------------------


def _settled(geometry: GpuGeometry) -> GpuGeometry:
    """The layout without a pending mode (pending modes are checked through NVML on their own)."""
    return GpuGeometry(geometry.mig_enabled, geometry.instances)


def wrong_end(
    node: SimNode, sc: Scenario, before: dict[int, Any], *, must_succeed: bool = False
) -> list[str]:
    """Everything about the end of a change that breaks the invariant (empty: all is well)."""
    problems: list[str] = []
    state, reason = node.state()
    labels, annotations = node.labels(), node.annotations()
    target = layouts(sc.target, sc.gpus)
    gpus = node.geometries()
    modes = node.modes()
    if state not in (keys.STATE_SUCCESS, keys.STATE_FAILED):
        problems.append(f"state {state} ({reason})")
    if must_succeed and state != keys.STATE_SUCCESS:
        problems.append(f"not success after a transient error: {reason}")
    if keys.ANNOTATION_PROGRESS in annotations:
        problems.append("a change record is left")
    if node.held():
        problems.append("the node is still held")
    if labels.get(DP) != DP_VALUE:
        problems.append(f"operand label is {labels.get(DP)!r}, not {DP_VALUE!r}")
    for index in range(sc.gpus):
        gpu = _settled(gpus[index])
        current, pending = modes[index]
        if current != pending:
            problems.append(f"GPU {index}: MIG {'enabled' if pending else 'disabled'} left pending")
        if state == keys.STATE_SUCCESS:
            if gpu != target[index]:
                problems.append(f"success, but GPU {index} holds {gpu.summary()}")
        elif gpu != _settled(before[index]) and not (f"GPU {index}" in reason and gpu.summary() in reason):
            new = " (the new layout)" if gpu == target[index] else ""
            problems.append(
                f"failed, GPU {index} holds {gpu.summary()}{new}, the reason does not say so: {reason}"
            )
    if state == keys.STATE_SUCCESS and not reason.startswith(f"{sc.target} applied"):
        problems.append(f"success with reason {reason!r}")
    published = annotations.get(keys.ANNOTATION_GPUS)
    if published and state in (keys.STATE_SUCCESS, keys.STATE_FAILED):
        report = {g.index: g.geometry for g in NodeGpus.from_annotation(published).gpus}
        stale = [
            i
            for i in range(sc.gpus)
            if (known := report.get(i)) is not None and _settled(known) != _settled(gpus[i])
        ]
        if stale:
            problems.append(f"{keys.ANNOTATION_GPUS} is stale for GPU {', '.join(map(str, stale))}")
    return problems


# --- the sweep -----------------------------------------------------------------------------------------


@dataclass
class Sweep:
    api: Any
    proxy: FaultProxy
    workdir: Path
    dry_runs: dict[str, DryRun]
    outcomes: Counter[str]

    def node(self, name: str) -> tuple[SimNode, dict[int, Any]]:
        sc = SCENARIOS[name]
        node = make_node(
            self.api, self.workdir, gpus=sc.gpus, initial=sc.initial, reset_requires_reboot=sc.reboot_only
        )
        before = node.geometries()
        _agent(node, sc, self.proxy.api_client()).reconcile("start")  # settled: success, nothing held
        node.label(sc.target)
        return node, before

    def dry_run(self, name: str) -> DryRun:
        if name not in self.dry_runs:
            node, _ = self.node(name)
            writes = self.proxy.count(node_write(node.name), succeeded=True)
            agents = _change(node, SCENARIOS[name], self.proxy.api_client(), {})
            steps: list[Step] = []
            for phase, rec in enumerate(agents):
                seen: Counter[str] = Counter()
                for fn in rec.access.nvml.calls:
                    if fn in MUTATING:
                        seen[fn] += 1
                        steps.append(Step(phase, fn, seen[fn]))
                if phase + 1 < len(agents):  # this agent rebooted the host
                    steps.append(Step(phase, REBOOT, 1))
            assert node.state()[0] == keys.STATE_SUCCESS, node.state()
            written = self.proxy.count(node_write(node.name), succeeded=True) - writes
            self.dry_runs[name] = DryRun(tuple(steps), written)
            _delete(node)
        return self.dry_runs[name]

    def finish(self, node: SimNode, sc: Scenario, before: dict[int, Any], what: str, **kw: Any) -> list[str]:
        self.outcomes[node.state()[0] or "none"] += 1
        found = [f"{what}: {p}" for p in wrong_end(node, sc, before, **kw)]
        _delete(node)
        return found


def _delete(node: SimNode) -> None:
    with contextlib.suppress(Exception):
        node.core.delete_node(node.name)


@pytest.fixture(scope="module")
def sweep(k8s_api: Any, fault_proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    started = time.monotonic()
    state = Sweep(k8s_api, fault_proxy, tmp_path_factory.mktemp("sweep"), {}, Counter())
    yield state
    print(
        f"\nfault sweep: {sum(state.outcomes.values())} cases in {time.monotonic() - started:.0f}s; "
        f"ends: {dict(state.outcomes)}; steps per scenario: "
        + ", ".join(
            f"{k}: {len(v.steps)} GPU steps, {v.writes} Node writes" for k, v in state.dry_runs.items()
        )
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_nvml_fault_at_every_step(sweep: Sweep, faults: FaultProxy, scenario: str) -> None:
    sc = SCENARIOS[scenario]
    found: list[str] = []
    for step in sweep.dry_run(scenario).steps:
        node, before = sweep.node(scenario)
        if step.fn == REBOOT:
            _change(node, sc, faults.api_client(), {}, reboot=_reboot(node, fail=True))
        else:
            _change(node, sc, faults.api_client(), {step.phase: f"{step.fn}@{step.n}={ERRORS[step.fn]}"})
        found += sweep.finish(node, sc, before, f"NVML fault at {step}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_nvml_fault_that_persists_at_every_step(sweep: Sweep, faults: FaultProxy, scenario: str) -> None:
    """The step fails and so does every later call of it: the rollback fails too."""
    sc = SCENARIOS[scenario]
    found: list[str] = []
    for step in sweep.dry_run(scenario).steps:
        if step.fn == REBOOT:
            continue
        node, before = sweep.node(scenario)
        error = ERRORS[step.fn]
        spec = ";".join(f"{step.fn}@{n}={error}" for n in range(step.n, step.n + 40))
        _change(node, sc, faults.api_client(), {step.phase: spec})
        found += sweep.finish(node, sc, before, f"persistent NVML fault from {step}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_sigkill_at_every_gpu_step(sweep: Sweep, faults: FaultProxy, scenario: str) -> None:
    sc = SCENARIOS[scenario]
    found: list[str] = []
    for step in sweep.dry_run(scenario).steps:
        node, before = sweep.node(scenario)
        api = faults.api_client()
        if step.fn == REBOOT:
            killed = _forked(partial(_change_in_child, node, sc, faults, {}, _reboot(node, kill=True)))
        else:
            spec = {step.phase: f"{step.fn}@{step.n}=SIGKILL"}
            killed = _forked(partial(_change_in_child, node, sc, faults, spec, None))
        if not killed:
            found.append(f"SIGKILL at {step}: the agent was not killed there")
        _converge(node, sc, api)
        found += sweep.finish(node, sc, before, f"SIGKILL at {step}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_sigkill_at_every_node_write(sweep: Sweep, faults: FaultProxy, scenario: str) -> None:
    """Killed right after the API server took write k, before the agent heard back."""
    sc = SCENARIOS[scenario]
    found: list[str] = []
    for k in range(sweep.dry_run(scenario).writes):
        node, before = sweep.node(scenario)
        api = faults.api_client()
        killed = _forked(partial(_change_in_child, node, sc, faults, {}, None), (faults, node.name, k))
        if not killed:
            found.append(f"SIGKILL after Node write {k + 1}: the agent was not killed there")
        _converge(node, sc, api)
        found += sweep.finish(node, sc, before, f"SIGKILL after Node write {k + 1}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_transient_api_error_at_every_node_write(sweep: Sweep, faults: FaultProxy, scenario: str) -> None:
    """One 503 at write k: retried, the change succeeds (nothing rolled back)."""
    sc = SCENARIOS[scenario]
    found: list[str] = []
    for k in range(sweep.dry_run(scenario).writes):
        node, before = sweep.node(scenario)
        faults.add(Fault(node_write(node.name), status=503, skip=k))
        with contextlib.suppress(Exception):
            _change(node, sc, faults.api_client(), {}, retry_seconds=30.0)
        faults.clear()
        found += sweep.finish(node, sc, before, f"503 at Node write {k + 1}", must_succeed=True)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_api_outage_from_every_node_write(sweep: Sweep, faults: FaultProxy, scenario: str) -> None:
    """From write k on, every request fails (longer than the agent retries); when the API server is
    back, the agent's next attempt ends the change."""
    sc = SCENARIOS[scenario]
    found: list[str] = []
    for k in range(sweep.dry_run(scenario).writes):
        node, before = sweep.node(scenario)
        faults.add(Fault(Outage(node_write(node.name), after=k), status=503, times=None))
        api = faults.api_client()
        with contextlib.suppress(Exception):
            _change(node, sc, api, {})
        faults.clear()
        _converge(node, sc, api)
        found += sweep.finish(node, sc, before, f"API outage from Node write {k + 1}")
    assert not found, "\n".join(found)
