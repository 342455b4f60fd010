"""The usage report: which pods use which device, as an annotation of bounded size."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migcore.geometry import GpuGeometry, GpuInstanceSpec
from migcore.planning import plan_node, pods_to_move
from migcore.usage import MAX_USAGE_BYTES, DevicePlace, DeviceUse, NodeUsage, PodRef, UsageError

MIG_0 = DevicePlace(0, 0, 0, "3g.20gb")
MIG_4 = DevicePlace(0, 4, 0, "3g.20gb")


def pod(name: str, namespace: str = "ml") -> PodRef:
    return PodRef(namespace, name)


def test_devices_group_pods_and_round_trip_through_the_annotation() -> None:
    usage = NodeUsage.build(
        [1, 0],
        {
            pod("train"): [MIG_4],
            pod("infer"): [MIG_0, MIG_4],
            pod("whole"): [DevicePlace(1)],
            pod("odd"): [None],
        },
        "podresources",
    )
    assert usage.gpus == (0, 1)
    assert [(u.place, [str(p) for p in u.pods]) for u in usage.devices] == [
        (MIG_0, ["ml/infer"]),
        (MIG_4, ["ml/infer", "ml/train"]),
        (DevicePlace(1), ["ml/whole"]),
        (None, ["ml/odd"]),
    ]
    text = usage.to_annotation()
    raw = json.loads(text)
    assert raw["devices"][0] == {"gpu": 0, "gi": 0, "ci": 0, "profile": "3g.20gb", "pods": ["ml/infer"]}
    assert raw["devices"][2] == {"gpu": 1, "pods": ["ml/whole"]}
    assert raw["devices"][3] == {"pods": ["ml/odd"]}
    back = NodeUsage.from_annotation(text)
    assert back == usage
    # A pod on a device no GPU's ids match counts on every GPU.
    assert back.placements()[pod("odd")] == [(0, None), (1, None)]
    assert back.placements()[pod("infer")] == [(0, 0), (0, 4)]


def test_the_time_it_changed_is_not_part_of_what_it_says() -> None:
    usage = NodeUsage.build([0], {pod("a"): [MIG_0]}, "podresources")
    dated = NodeUsage(usage.gpus, usage.devices, usage.source, "2026-01-01T00:00:00Z")
    assert dated == usage
    assert NodeUsage.from_annotation(dated.to_annotation()).since == "2026-01-01T00:00:00Z"


def test_movers_are_what_the_planner_picks_from_its_placements() -> None:
    current = {0: GpuGeometry(True, (GpuInstanceSpec(0, 4, "3g.20gb"), GpuInstanceSpec(4, 4, "3g.20gb")))}
    desired = {0: GpuGeometry(True, (GpuInstanceSpec(0, 4, "3g.20gb"), GpuInstanceSpec(4, 2, "2g.10gb")))}
    plan = plan_node(current, desired)
    usage = NodeUsage.build([0], {pod("stays"): [MIG_0], pod("moves"): [MIG_4]}, "podresources")
    assert usage.movers(plan) == [pod("moves")] == pods_to_move(plan, usage.placements())


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", "not JSON"),
        ('{"version": 2}', "version 1"),
        ('{"version": 1, "source": "guess", "gpus": [], "devices": []}', "source must be"),
        ('{"version": 1, "source": "podresources", "gpus": [-1], "devices": []}', "GPU indexes"),
        ('{"version": 1, "source": "podresources", "gpus": [0], "devices": {}}', "devices must be a list"),
        (
            '{"version": 1, "source": "podresources", "gpus": [0], "devices": [{"gpu": 0, "pods": ["nons"]}]}',
            "devices[0].pods: 'nons' is not namespace/name",
        ),
        (
            '{"version": 1, "source": "podresources", "gpus": [0], "devices": [{"gi": 0, "pods": []}]}',
            "a GPU instance needs its gpu",
        ),
        (
            '{"version": 1, "source": "podresources", "gpus": [0], "devices": [{"gpu": 0, "notNamed": -2}]}',
            "notNamed: expected a count",
        ),
    ],
)
def test_a_broken_annotation_is_an_error_that_says_where(text: str, error: str) -> None:
    with pytest.raises(UsageError, match=None) as caught:
        NodeUsage.from_annotation(text)
    assert error in str(caught.value)


def test_too_many_names_are_counted_instead_longest_lists_first() -> None:
    crowded = {pod(f"replica-{i:04d}", "inference"): [MIG_0] for i in range(2000)}
    few = {pod(f"train-{i}"): [MIG_4] for i in range(3)}
    usage = NodeUsage.build([0], {**crowded, **few}, "podresources")
    text = usage.to_annotation()
    assert len(text.encode()) <= MAX_USAGE_BYTES < len(json.dumps(usage.to_json()).encode())
    back = NodeUsage.from_annotation(text)
    shared, small = back.devices
    assert shared.count == 2000 and shared.not_named > 0 and shared.pods  # some names stay
    assert small.pods == usage.devices[1].pods and small.not_named == 0  # the short list is intact
    assert back.not_named() == shared.not_named


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 6), st.integers(1, 400), st.integers(5, 60)),
        min_size=1,
        max_size=30,
    ),
    st.integers(2_000, 20_000),
)
def test_bounded_annotations_fit_and_lose_no_pod(
    devices: list[tuple[int, int, int, int]], limit: int
) -> None:
    pods: dict[PodRef, list[DevicePlace | None]] = {}
    for gpu, gi, count, length in devices:
        for i in range(count):
            name = f"p{gpu}-{gi}-{i}-".ljust(length, "x")
            pods.setdefault(pod(name), []).append(DevicePlace(gpu, gi, 0, "1g.5gb"))
    usage = NodeUsage.build(range(8), pods, "podresources")
    try:
        text = usage.to_annotation(limit)
    except UsageError:
        return  # not even the counts fit: said so, nothing written
    assert len(text.encode()) <= limit
    back = NodeUsage.from_annotation(text)
    assert [u.count for u in back.devices] == [u.count for u in usage.devices]
    for kept, full in zip(back.devices, usage.devices, strict=True):
        assert set(kept.pods) <= set(full.pods)


def test_a_device_describes_where_it_is() -> None:
    assert DeviceUse(MIG_4).describe() == "GPU 0 3g.20gb@4"
    assert DeviceUse(DevicePlace(3)).describe() == "GPU 3"
    assert DeviceUse(None).describe() == "a GPU device on no known GPU"
