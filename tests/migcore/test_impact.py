"""The impact of a change, worded for admission warnings and `kubectl mig plan`."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from migcore.catalog import load_catalog
from migcore.check import check_config, hardware_from_labels
from migcore.config import parse_config
from migcore.geometry import GpuGeometry
from migcore.impact import LINE_CHARS, change_text, impact_of, plan_for
from migcore.planning import desired_geometries, plan_node
from migcore.usage import DevicePlace, NodeUsage, PodRef

CATALOG = load_catalog()
A100 = "NVIDIA-A100-SXM4-40GB"
CONFIG = parse_config(
    """
version: v1
mig-configs:
  all-1g:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  gpu2-2g:
    - devices: [0, 1, 3, 4, 5, 6, 7]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: [2]
      mig-enabled: true
      mig-devices: {"2g.10gb": 1, "1g.5gb": 5}
  all-3g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  all-7g:
    - devices: all
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
  all-disabled:
    - devices: all
      mig-enabled: false
  half-disabled:
    - devices: [0, 1, 2, 3]
      mig-enabled: false
    - devices: [4, 5, 6, 7]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
""",
    CATALOG,
)
HARDWARE = hardware_from_labels(CATALOG, A100, 8)


def layouts(name: str, current: dict[int, GpuGeometry] | None = None) -> dict[int, GpuGeometry]:
    now = current or {i: GpuGeometry(False) for i in range(8)}
    return desired_geometries(check_config(CONFIG, name, HARDWARE), now)


ALL_1G = layouts("all-1g")


def plan(name: str, current: dict[int, GpuGeometry] = ALL_1G) -> object:
    return plan_for(check_config(CONFIG, name, HARDWARE), current)


def one_per_instance(current: dict[int, GpuGeometry], prefix: str = "p") -> NodeUsage:
    """A pod on every GPU instance of `current`."""
    pods = {
        PodRef("ml", f"{prefix}{gpu}-{gi.start}"): [DevicePlace(gpu, gi.start, 0, gi.profile)]
        for gpu, geometry in current.items()
        for gi in geometry.instances
    }
    return NodeUsage.build(current, pods, "podresources")


def test_the_issue_example_names_the_gpu_what_changes_and_the_pods() -> None:
    p = plan_for(check_config(CONFIG, "gpu2-2g", HARDWARE), ALL_1G)
    (gpu2,) = p.changed
    destroyed = sorted(gpu2.affected_gi_starts)
    kept = next(gi.start for gi in ALL_1G[2].instances if gi.start not in destroyed)
    usage = NodeUsage.build(
        ALL_1G,
        {
            PodRef("ml", "train-7"): [DevicePlace(2, destroyed[0], 0, "1g.5gb")],
            PodRef("ml", "infer-3"): [DevicePlace(2, destroyed[1], 0, "1g.5gb")],
            PodRef("ml", "stays"): [DevicePlace(2, kept, 0, "1g.5gb")],
            PodRef("ml", "other-gpu"): [DevicePlace(5, 0, 0, "1g.5gb")],
        },
        "podresources",
    )
    impact = impact_of("gpu2-2g", p, usage)
    assert impact.lines("gpu-7") == [
        "impact of gpu2-2g: 1 of 8 GPUs change, 2 pods to evict",
        "GPU 2: 1g.5gb x2 -> 2g.10gb, evicts ml/infer-3, ml/train-7",
        "GPUs 0-1,3-7 untouched",
    ]
    assert impact.evicts == (PodRef("ml", "infer-3"), PodRef("ml", "train-7"))
    assert impact.to_json()["gpus"][0]["operations"][0].startswith("destroy-ci 1g.5gb@0 in GI@")


def test_changes_are_worded_in_device_profiles_and_mig_modes() -> None:
    seven = layouts("all-7g")
    disabled = {i: GpuGeometry(False) for i in range(8)}
    cases = {
        ("all-1g", "all-3g"): "1g.5gb x7 -> 3g.20gb x2",
        ("all-1g", "all-disabled"): "1g.5gb x7 -> MIG disabled",
        ("all-disabled", "all-7g"): "MIG disabled -> 7g.40gb",
        ("all-7g", "all-1g"): "7g.40gb -> 1g.5gb x7",
    }
    start = {"all-1g": ALL_1G, "all-disabled": disabled, "all-7g": seven}
    for (before, after), text in cases.items():
        p = plan_for(check_config(CONFIG, after, HARDWARE), start[before])
        assert {change_text(g) for g in p.changed} == {text}, (before, after)
    empty = {i: GpuGeometry(True) for i in range(8)}
    p = plan_node(empty, {i: GpuGeometry(False) for i in range(8)})
    assert change_text(p.gpus[0]) == "MIG enabled -> MIG disabled"


def test_a_mode_change_says_it_resets_and_evicts_every_pod_on_the_gpu() -> None:
    usage = one_per_instance(ALL_1G)
    impact = impact_of(
        "half-disabled", plan_for(check_config(CONFIG, "half-disabled", HARDWARE), ALL_1G), usage
    )
    assert (
        impact.headline()
        == "impact of half-disabled: 8 of 8 GPUs change (4 with a GPU reset), 56 pods to evict"
    )
    assert impact.evict_count == 56


def test_lines_fit_the_warning_limits_grouping_gpus_and_counting_pods_not_named() -> None:
    usage = one_per_instance(ALL_1G, prefix="a-rather-long-pod-name-")
    impact = impact_of(
        "half-disabled", plan_for(check_config(CONFIG, "half-disabled", HARDWARE), ALL_1G), usage
    )
    lines = impact.lines("gpu-7", limit=5)
    assert len(lines) == 4 and all(len(line) <= LINE_CHARS for line in lines)  # no GPU untouched
    assert lines[1].startswith("GPUs 0-3: 1g.5gb x7 -> MIG disabled, evicts ml/a-rather-long-pod-name-0-0")
    assert lines[2].startswith("GPUs 4-7: 1g.5gb x7 -> 3g.20gb x2, evicts ")
    named = {m for line in lines[1:3] for m in re.findall(r"ml/[\w-]+", line)}
    assert (
        lines[3]
        == f"{56 - len(named)} of 56 pods to evict not named here: kubectl mig plan gpu-7 half-disabled names them"
    )
    assert impact.lines("gpu-7", limit=1) == [impact.headline()]


def test_unknown_pods_are_said_to_be_unknown() -> None:
    impact = impact_of("all-3g", plan("all-3g"), None)  # type: ignore[arg-type]
    lines = impact.lines("gpu-7")
    assert (
        lines[0]
        == "impact of all-3g: 8 of 8 GPUs change, pods on them unknown (no mig-guard.io/usage on the node yet)"
    )
    assert lines[1:] == ["GPUs 0-7: 1g.5gb x7 -> 3g.20gb x2"]
    nothing = impact_of("all-1g", plan("all-1g"), None)  # type: ignore[arg-type]
    assert nothing.lines("gpu-7") == ["impact of all-1g: none, all 8 GPUs already hold it"]


def test_pods_without_podresources_count_on_every_gpu() -> None:
    usage = NodeUsage.build(ALL_1G, {PodRef("ml", "somewhere"): [None]}, "pod-spec")
    impact = impact_of("gpu2-2g", plan("gpu2-2g"), usage)  # type: ignore[arg-type]
    assert impact.lines("gpu-7")[:2] == [
        "impact of gpu2-2g: 1 of 8 GPUs change, 1 pod to evict (no PodResources on the node: every GPU pod counts)",
        "GPU 2: 1g.5gb x2 -> 2g.10gb, evicts ml/somewhere",
    ]


def test_pods_the_report_does_not_name_are_counted() -> None:
    crowded = {PodRef("ml", f"replica-{i:04d}"): [DevicePlace(0, 0, 0, "1g.5gb")] for i in range(1500)}
    usage = NodeUsage.from_annotation(NodeUsage.build(ALL_1G, crowded, "podresources").to_annotation())
    assert usage.not_named() > 0
    impact = impact_of("all-3g", plan("all-3g"), usage)  # type: ignore[arg-type]
    assert impact.evict_count == 1500
    lines = impact.lines("gpu-7")
    named = sum(len(re.findall("replica-", line)) for line in lines)
    assert lines[-1] == (
        f"{1500 - named} of 1500 pods to evict not named here ({usage.not_named()} not in "
        "mig-guard.io/usage either): kubectl mig plan gpu-7 all-3g"
    )


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["all-3g", "all-7g", "gpu2-2g", "all-disabled", "half-disabled"]),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 6), st.integers(1, 40)), max_size=40),
    st.integers(1, 10),
)
def test_every_pod_to_evict_is_named_or_counted_within_the_limits(
    target: str, spots: list[tuple[int, int, int]], limit: int
) -> None:
    pods = {
        PodRef(f"ns{gpu}", f"pod-{gi}-{'x' * length}"): [DevicePlace(gpu, gi, 0, "1g.5gb")]
        for gpu, gi, length in spots
    }
    usage = NodeUsage.build(ALL_1G, pods, "podresources")
    impact = impact_of(target, plan(target), usage)  # type: ignore[arg-type]
    lines = impact.lines("gpu-7", limit=limit)
    assert 1 <= len(lines) <= limit
    assert all(len(line) <= LINE_CHARS for line in lines)
    if limit < 3:
        return  # no room for the count: the headline says how many
    named = {
        m for line in lines if not line.startswith("impact") for m in re.findall(r"ns\d/pod-\d-x+", line)
    }
    counted = re.match(r"(\d+) of \d+ pods to evict not named", lines[-1])
    more = int(counted.group(1)) if counted else 0
    assert named <= {str(p) for p in impact.evicts}
    assert len(named) + more == impact.evict_count
