"""The reconciler when the Kubernetes API fails, at fleet scale: a fault proxy in front of the real
API server (devcluster.faultproxy) answers chosen requests with a 5xx, a 429, a 409, or not at all,
and counts every request. The reconciler never exits for it, retries a transient error before
anything is rolled back, and writes the Node a handful of times per change.

Why a proxy: the API server stays real (every request that gets through is served by it), and the
faults are the ones a client meets on the wire; one test also fails a real admission webhook so
the API server itself answers with the error it gives when a webhook times out."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from node_harness import SimNode, layouts, make_node

from devcluster.admission import AdmissionTestServer, allow
from devcluster.faultproxy import Fault, FaultProxy, any_request, node_write
from devcluster.helpers import delete_webhook, register_webhook
from devcluster.processes import wait_until
from migcore import keys

WEBHOOK_TIMEOUT = (
    'Internal error occurred: failed calling webhook "nodes.validate.mig-guard.io": failed to call '
    'webhook: Post "https://mig-guard-webhook.mig-guard.svc:443/validate?timeout=10s": context deadline exceeded'
)
CONFLICT = (
    'Operation cannot be fulfilled on nodes "x": the object has been modified; please apply your changes '
    "to the latest version and try again"
)


def _writes(proxy: FaultProxy, node: SimNode) -> int:
    return proxy.count(node_write(node.name), succeeded=True)


# --- never exit ------------------------------------------------------------------------------------


def test_the_agent_survives_an_api_outage_at_start_and_reports_once_it_can(
    k8s_api: Any, tmp_path: Path, faults: FaultProxy
) -> None:
    node = make_node(k8s_api, tmp_path, gpus=2, initial="all-3g")
    outage = faults.add(Fault(any_request, status=503, times=None))
    rec = node.reconciler(api=faults.api_client(), api_retry_seconds=0.3)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rec.run(stop)
        except BaseException as exc:
            errors.append(exc)
            raise

    agent = threading.Thread(target=run, daemon=True)
    agent.start()
    try:
        wait_until(lambda: outage.hits >= 8 or not agent.is_alive(), 30, what="the agent meeting the outage")
        assert agent.is_alive(), errors  # not CrashLoopBackOff: it keeps trying
        faults.clear()  # the API server is back
        wait_until(
            lambda: node.state()[0] == "success" and keys.ANNOTATION_GPUS in node.annotations(),
            30,
            what="hardware published and state reported",
        )
        assert agent.is_alive()
    finally:
        stop.set()
        agent.join(timeout=30)
    assert not errors


# --- transient errors inside a change ----------------------------------------------------------------


def _lost_answer(request: Any, status: int) -> None:
    time.sleep(2.0)  # the write took effect; the client gives up waiting for the answer


TRANSIENT = {
    "503 unavailable": Fault(any_request, status=503),
    "500 webhook timed out": Fault(any_request, status=500, message=WEBHOOK_TIMEOUT),
    "429 throttled": Fault(any_request, status=429),
    "504 gateway timeout": Fault(any_request, status=504),
    "409 conflict": Fault(any_request, status=409, message=CONFLICT),
    "no answer": Fault(any_request, hang=2.0),
    "answer lost after the write": Fault(any_request, after=_lost_answer),
    "connection dropped": Fault(any_request, drop=True),
}


@pytest.mark.parametrize("kind", list(TRANSIENT))
@pytest.mark.parametrize("write", [0, 1, 2], ids=["first-write", "second-write", "third-write"])
def test_a_transient_api_error_inside_a_change_is_retried_not_rolled_back(
    k8s_api: Any, tmp_path: Path, faults: FaultProxy, kind: str, write: int
) -> None:
    node = make_node(k8s_api, tmp_path, gpus=2, initial="all-3g")
    rec = node.reconciler(api=faults.api_client(), api_timeout_seconds=1.0)
    rec.reconcile("start")
    template = TRANSIENT[kind]
    fault = faults.add(
        Fault(
            node_write(node.name, status=False),
            status=template.status,
            message=template.message,
            hang=template.hang,
            drop=template.drop,
            after=template.after,
            skip=write,
        )
    )
    node.label("all-1g")
    rec.reconcile("label")
    assert fault.hits == 1
    state, reason = node.state()
    assert state == "success", reason
    assert node.geometries() == layouts("all-1g", 2)
    assert not node.held()
    assert keys.ANNOTATION_PROGRESS not in node.annotations()


def test_a_webhook_that_times_out_once_is_retried(k8s_api: Any, tmp_path: Path) -> None:
    node = make_node(k8s_api, tmp_path, gpus=2, initial="all-3g")
    rec = node.reconciler()
    rec.reconcile("start")
    armed = threading.Event()
    timed_out: list[str] = []

    def decide(request: dict[str, Any]) -> dict[str, Any]:
        if armed.is_set() and not timed_out:
            timed_out.append(request["uid"])
            time.sleep(2.0)  # past the webhook's 1 s timeout: the API server answers 500
        return allow()

    name = f"slow-{node.name}"
    with AdmissionTestServer(decide) as server:
        register_webhook(
            k8s_api,
            "validating",
            name,
            server.url("/validate"),
            server.ca_pem,
            rules=[
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
            ],
            match_conditions=[{"name": "this-node", "expression": f"object.metadata.name == '{node.name}'"}],
            timeout_seconds=1,
        )
        try:
            wait_until(lambda: _webhook_active(node, server), 30, what="webhook active")
            node.label("all-1g")
            armed.set()
            rec.reconcile("label")
        finally:
            delete_webhook(k8s_api, "validating", name)
    assert timed_out  # the reconciler's write met the timeout
    state, reason = node.state()
    assert state == "success", reason
    assert node.geometries() == layouts("all-1g", 2)


def _webhook_active(node: SimNode, server: AdmissionTestServer) -> bool:
    calls = len(server.calls)
    node.core.patch_node(node.name, {"metadata": {"annotations": {"test/probe": str(time.monotonic())}}})
    return len(server.calls) > calls


# --- how often a change writes the Node --------------------------------------------------------------

SCENARIOS = {
    # name: (GPUs, layout before, layout asked for, GPUs whose reset needs a reboot)
    "relayout of 2 GPUs": (2, "all-3g", "all-1g", ()),
    "mode change on 2 GPUs": (2, "all-3g", "all-disabled", ()),
    "mode change needing a reboot": (2, "all-disabled", "all-3g", (0, 1)),
    "mixed MIG and non-MIG, 3 GPUs": (3, "mixed-a", "mixed-b", ()),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_change_writes_the_node_at_most_ten_times(
    k8s_api: Any, tmp_path: Path, faults: FaultProxy, scenario: str
) -> None:
    gpus, initial, target, reboot_only = SCENARIOS[scenario]
    node = make_node(k8s_api, tmp_path, gpus=gpus, initial=initial, reset_requires_reboot=reboot_only)
    api = faults.api_client()
    reboot = node.nvml().simReboot if reboot_only else None
    node.reconciler(api=api, reboot=reboot).reconcile("start")
    before = _writes(faults, node)
    node.label(target)
    node.reconcilers[-1].reconcile("label")
    if reboot_only:
        assert node.state()[0] == "rebooting"
        node.reconciler(api=api, reboot=reboot).reconcile("start")  # the agent after the reboot
    writes = _writes(faults, node) - before
    print(f"\nNode writes for one change ({scenario}): {writes}")
    state, reason = node.state()
    assert state == "success", reason
    assert node.geometries() == layouts(target, gpus)
    assert writes <= 10
