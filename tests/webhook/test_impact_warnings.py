"""Impact warnings for accepted layout changes, through the Flask app (no HTTP server): the node's
hardware report comes from the simulated NVML through the reconciler's own discovery code, its
usage report from `migcore.usage`, as the reconciler writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from test_app import make_settings, post
from webhook_harness import annotate, gfd_labels, node, relabel, review

from migcore import keys
from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import load_config_file
from migcore.planning import desired_geometries, plan_node
from migcore.usage import NodeUsage, PodRef
from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import SimulatedNvml
from webhook.app import create_app
from webhook.verdict import MAX_WARNINGS

A100 = "NVIDIA-A100-SXM4-40GB"


@pytest.fixture(scope="module")
def gpus(default_config_file: Path) -> GpuAccess:
    """8 simulated A100s holding all-1g.5gb, applied by the reconciler's planner and NVML code."""
    access = GpuAccess(SimulatedNvml([A100] * 8))
    access.start()
    catalog = load_catalog()
    parsed = load_config_file(default_config_file, catalog)
    result = check_config(parsed, "all-1g.5gb", hardware_from_report(catalog, access.discover()))
    current = access.geometries()
    for gpu_plan in plan_node(current, desired_geometries(result, current)).changed:
        access.apply(gpu_plan)
    return access


@pytest.fixture
def client(default_config_file: Path) -> FlaskClient:
    return create_app(make_settings(default_config_file)).test_client()


def reported_node(gpus: GpuAccess, usage: NodeUsage | None, config: str = "all-1g.5gb") -> dict[str, Any]:
    notes = {keys.ANNOTATION_GPUS: gpus.discover().to_annotation()}
    if usage is not None:
        notes[keys.ANNOTATION_USAGE] = usage.to_annotation()
    return node("gpu-7", labels={**gfd_labels(), keys.LABEL_MIG_CONFIG: config}, annotations=notes)


def warnings_for(client: FlaskClient, old: dict[str, Any], config: str, dry_run: bool = False) -> list[str]:
    sent = review(relabel(old, {keys.LABEL_MIG_CONFIG: config}), old)
    sent["request"]["dryRun"] = dry_run
    status, body = post(client, "/validate", sent)
    assert status == 200 and body["response"]["allowed"], body
    return list(body["response"].get("warnings", []))


def pods_on(gpus: GpuAccess, spots: dict[str, tuple[int, int]]) -> NodeUsage:
    places = {i: gpus.device_places(i) for i in range(gpus.gpu_count())}
    by_spot = {(p.gpu, p.gi): p for ids in places.values() for p in ids.values()}
    pods = {PodRef(*name.split("/")): [by_spot[spot]] for name, spot in spots.items()}
    return NodeUsage.build(places, pods, "podresources")


def test_an_accepted_change_says_what_it_changes_and_whom_it_evicts(
    client: FlaskClient, gpus: GpuAccess
) -> None:
    # all-balanced keeps two 1g.5gb instances per GPU where they are and replaces the rest.
    usage = pods_on(gpus, {"ml/train-7": (2, 6), "ml/infer-3": (2, 5), "ml/keeps": (2, 0)})
    old = reported_node(gpus, usage)
    warnings = warnings_for(client, old, "all-balanced")
    assert warnings == [
        "impact of all-balanced: 8 of 8 GPUs change, 2 pods to evict",
        "GPUs 0-1,3-7: 1g.5gb x5 -> 2g.10gb, 3g.20gb, evicts no pods",
        "GPU 2: 1g.5gb x5 -> 2g.10gb, 3g.20gb, evicts ml/infer-3, ml/train-7",
    ]
    assert len(warnings) <= MAX_WARNINGS
    # A server-side dry run gets the same answer (and the webhook stores nothing either way).
    assert warnings_for(client, old, "all-balanced", dry_run=True) == warnings


def test_the_warnings_stay_within_their_limits_and_count_the_pods_not_named(
    client: FlaskClient, gpus: GpuAccess
) -> None:
    spots = {
        f"inference/a-rather-long-replica-name-{gpu}-{gi}": (gpu, gi) for gpu in range(8) for gi in range(7)
    }
    out = warnings_for(client, reported_node(gpus, pods_on(gpus, spots)), "all-3g.20gb")
    assert out[0] == "impact of all-3g.20gb: 8 of 8 GPUs change, 56 pods to evict"
    assert len(out) <= MAX_WARNINGS and all(len(line) <= 120 for line in out)
    named = sum(line.count("inference/") for line in out)
    assert (
        out[-1]
        == f"{56 - named} of 56 pods to evict not named here: kubectl mig plan gpu-7 all-3g.20gb names them"
    )


def test_without_reports_the_change_is_accepted_and_says_why_no_impact_is_shown(
    client: FlaskClient, gpus: GpuAccess
) -> None:
    bare = node("gpu-7", labels=gfd_labels())
    assert warnings_for(client, bare, "all-1g.5gb") == [
        "impact not shown: node gpu-7 has no mig-guard.io/gpus report yet (is mig-guard's reconciler running there?)"
    ]
    no_usage = reported_node(gpus, None)
    assert warnings_for(client, no_usage, "all-3g.20gb")[0] == (
        "impact of all-3g.20gb: 8 of 8 GPUs change, pods on them unknown (no mig-guard.io/usage on the node yet)"
    )
    broken = annotate(no_usage, {keys.ANNOTATION_USAGE: "{"})
    out = warnings_for(client, broken, "all-3g.20gb")
    assert out[-1].startswith("mig-guard.io/usage ignored: usage report is not JSON")


def test_no_impact_for_denials_creates_or_other_writes(client: FlaskClient, gpus: GpuAccess) -> None:
    old = reported_node(gpus, pods_on(gpus, {"ml/a": (0, 0)}))
    status, body = post(
        client, "/validate", review(relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gbb"}), old)
    )
    assert not body["response"]["allowed"] and "warnings" not in body["response"]
    created = review(old, None, operation="CREATE")
    status, body = post(client, "/validate", created)
    assert status == 200 and "warnings" not in body["response"], json.dumps(body)[:300]
    status, body = post(client, "/validate", review(relabel(old, {"team": "ml"}), old))
    assert body["response"] == {"uid": "uid-1", "allowed": True}
