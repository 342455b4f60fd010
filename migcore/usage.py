"""Which pods use which GPU or MIG device on a node: the usage half of the node's report.

The reconciler reads it from the kubelet's PodResources API and publishes it as the annotation
`mig-guard.io/usage`; the webhook and `kubectl mig` read it back to say, before a change, which
pods it would evict. Both sides turn it into placements with `NodeUsage.placements` and ask the
planner's `pods_to_move`, so the preview and the change pick pods the same way.

    {"version": 1, "source": "podresources", "since": "2026-11-28T14:00:00Z", "gpus": [0, 1],
     "devices": [{"gpu": 0, "gi": 0, "ci": 0, "profile": "3g.20gb", "pods": ["ml/train-7"]},
                 {"gpu": 1, "pods": ["ml/big"]},
                 {"pods": ["ml/odd"], "notNamed": 2}]}

A device with a `gi` is a MIG device (a compute instance: `ci` is its start, `profile` its
profile); without one it is the whole GPU. A device without a `gpu` is a GPU device that no GPU's
ids match: it counts on every GPU (moving a pod beats pulling a GPU from under it). `since` is when
the usage last changed (it is rewritten only then). The annotation is kept under
`MAX_USAGE_BYTES`: when the names do not fit, names are dropped from the longest lists first and
counted in `notNamed`, so a preview can still say how many pods it cannot name.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from migcore.planning import DevicePlacement, NodePlan, pods_to_move

FORMAT_VERSION = 1
# Far below the API server's 256 KiB for all of a Node's annotations together, beside the 64 KiB
# hardware report; a Node write costs every watcher of Nodes the whole object.
MAX_USAGE_BYTES = 16 * 1024
SOURCE_PODRESOURCES = "podresources"  # the kubelet said which device each pod got
SOURCE_POD_SPEC = "pod-spec"  # no PodResources: every GPU pod counts on every GPU
SOURCES = (SOURCE_PODRESOURCES, SOURCE_POD_SPEC)
MAX_NAME_CHARS = 317  # namespace (63) + "/" + pod name (253)


class UsageError(ValueError):
    """An annotation that is not a usage report; the message says where."""


@dataclass(frozen=True, order=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @staticmethod
    def parse(text: str) -> PodRef:
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name or len(text) > MAX_NAME_CHARS:
            raise UsageError(f"{text[:80]!r} is not namespace/name")
        return PodRef(namespace, name)


@dataclass(frozen=True, order=True)
class DevicePlace:
    """Where one device a device plugin hands out lives: a GPU, and for a MIG device its GPU
    instance's start, its compute instance's start and its profile."""

    gpu: int
    gi: int | None = None
    ci: int | None = None
    profile: str | None = None


@dataclass(frozen=True)
class DeviceUse:
    """The pods on one device (`place` None: a GPU device placed on no GPU, so on all of them)."""

    place: DevicePlace | None
    pods: tuple[PodRef, ...] = ()
    not_named: int = 0  # pods on it whose names did not fit the annotation

    @property
    def count(self) -> int:
        return len(self.pods) + self.not_named

    def placements(self, gpus: Iterable[int]) -> list[DevicePlacement]:
        """Where pods on this device run, as the planner's `pods_to_move` reads it."""
        if self.place is None:
            return [(gpu, None) for gpu in gpus]
        return [(self.place.gpu, self.place.gi)]

    def describe(self) -> str:
        """`GPU 0 1g.5gb@2` (a MIG device), `GPU 1` (the whole GPU) or `a GPU (unplaced)`."""
        place = self.place
        if place is None:
            return "a GPU device on no known GPU"
        if place.gi is None:
            return f"GPU {place.gpu}"
        return f"GPU {place.gpu} {place.profile or 'MIG device'}@{place.gi}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.place is not None:
            out["gpu"] = self.place.gpu
            for key, value in (("gi", self.place.gi), ("ci", self.place.ci), ("profile", self.place.profile)):
                if value is not None:
                    out[key] = value
        out["pods"] = [str(p) for p in self.pods]
        if self.not_named:
            out["notNamed"] = self.not_named
        return out

    @staticmethod
    def from_json(raw: Any, where: str) -> DeviceUse:
        if not isinstance(raw, dict):
            raise UsageError(f"usage: {where}: expected an object")
        gpu, gi, ci, profile = raw.get("gpu"), raw.get("gi"), raw.get("ci"), raw.get("profile")
        for key, value in (("gpu", gpu), ("gi", gi), ("ci", ci)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise UsageError(f"usage: {where}.{key}: expected a non-negative integer")
        if profile is not None and not isinstance(profile, str):
            raise UsageError(f"usage: {where}.profile: expected a string")
        if gpu is None and (gi is not None or ci is not None):
            raise UsageError(f"usage: {where}: a GPU instance needs its gpu")
        pods = raw.get("pods", [])
        if not isinstance(pods, list) or not all(isinstance(p, str) for p in pods):
            raise UsageError(f"usage: {where}.pods: expected a list of namespace/name")
        not_named = raw.get("notNamed", 0)
        if not isinstance(not_named, int) or isinstance(not_named, bool) or not_named < 0:
            raise UsageError(f"usage: {where}.notNamed: expected a count")
        try:
            refs = tuple(PodRef.parse(p) for p in pods)
        except UsageError as exc:
            raise UsageError(f"usage: {where}.pods: {exc}") from exc
        place = None if gpu is None else DevicePlace(gpu, gi, ci, profile)
        return DeviceUse(place, refs, not_named)


def _device_order(use: DeviceUse) -> tuple[int, ...]:
    place = use.place
    if place is None:
        return (1,)
    return (0, place.gpu, -1 if place.gi is None else place.gi, -1 if place.ci is None else place.ci)


@dataclass(frozen=True)
class NodeUsage:
    """The pods on each GPU and MIG device of a node (see the module docstring)."""

    gpus: tuple[int, ...]
    devices: tuple[DeviceUse, ...]
    source: str = SOURCE_PODRESOURCES
    since: str | None = field(default=None, compare=False)

    @staticmethod
    def build(
        gpus: Iterable[int], pods: Mapping[PodRef, Iterable[DevicePlace | None]], source: str
    ) -> NodeUsage:
        """From each pod's devices (None: a GPU device placed on no GPU)."""
        by_place: dict[DevicePlace | None, set[PodRef]] = {}
        for pod, places in pods.items():
            for place in places:
                by_place.setdefault(place, set()).add(pod)
        devices = [DeviceUse(place, tuple(sorted(refs))) for place, refs in by_place.items()]
        return NodeUsage(tuple(sorted(set(gpus))), tuple(sorted(devices, key=_device_order)), source)

    def pods(self) -> list[PodRef]:
        """Every pod named, each once, sorted."""
        return sorted({pod for use in self.devices for pod in use.pods})

    def not_named(self) -> int:
        return sum(use.not_named for use in self.devices)

    def placements(self) -> dict[PodRef, list[DevicePlacement]]:
        """Each named pod -> where it runs, for `migcore.planning.pods_to_move`."""
        out: dict[PodRef, list[DevicePlacement]] = {}
        for use in self.devices:
            for pod in use.pods:
                out.setdefault(pod, []).extend(use.placements(self.gpus))
        return out

    def movers(self, plan: NodePlan) -> list[PodRef]:
        """The named pods `plan` disturbs: what the reconciler evicts (sorted)."""
        return sorted(pods_to_move(plan, self.placements()))

    def unnamed_movers(self, plan: NodePlan) -> int:
        """Pods `plan` disturbs that the report counts but does not name."""
        counted = {i: use.placements(self.gpus) for i, use in enumerate(self.devices) if use.not_named}
        return sum(self.devices[i].not_named for i in pods_to_move(plan, counted))

    def on(self, gpus: Collection[int]) -> NodeUsage:
        """Only the devices of `gpus` (and those on no known GPU)."""
        kept = tuple(u for u in self.devices if u.place is None or u.place.gpu in gpus)
        return replace(self, gpus=tuple(g for g in self.gpus if g in gpus), devices=kept)

    # --- the annotation --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "source": self.source,
            "gpus": list(self.gpus),
            "devices": [use.to_json() for use in self.devices],
        }
        if self.since:
            out["since"] = self.since
        return out

    def to_annotation(self, max_bytes: int = MAX_USAGE_BYTES) -> str:
        """The annotation text, at most `max_bytes`: names that do not fit are counted instead
        (from the longest lists first). Raises UsageError when even the counts do not fit."""
        return json.dumps(self.bounded(max_bytes).to_json(), separators=(",", ":"), sort_keys=True)

    def bounded(self, max_bytes: int = MAX_USAGE_BYTES) -> NodeUsage:
        """This usage with as many names as fit `max_bytes` once serialised (see to_annotation)."""

        def size(usage: NodeUsage) -> int:
            return len(json.dumps(usage.to_json(), separators=(",", ":"), sort_keys=True).encode())

        over = size(self) - max_bytes
        if over <= 0:
            return self
        devices = [list(use.pods) for use in self.devices]
        dropped = [0] * len(devices)
        # Each name costs its JSON string, quotes and a comma; the counts cost a few bytes more.
        while over > 0:
            longest = max(range(len(devices)), key=lambda i: (len(devices[i]), -i))
            if not devices[longest]:
                raise UsageError(f"usage does not fit {max_bytes} bytes even without pod names")
            name = devices[longest].pop()
            dropped[longest] += 1
            over -= len(json.dumps(str(name)).encode()) + 1
            if dropped[longest] == 1:
                over += len(',"notNamed":') + 1
            elif len(str(dropped[longest])) > len(str(dropped[longest] - 1)):
                over += 1
        out = replace(
            self,
            devices=tuple(
                replace(use, pods=tuple(names), not_named=use.not_named + n)
                for use, names, n in zip(self.devices, devices, dropped, strict=True)
            ),
        )
        if size(out) > max_bytes:  # the estimate was short (it never is): drop one more
            return out.bounded(max_bytes)
        return out

    @staticmethod
    def from_annotation(text: str) -> NodeUsage:
        if len(text) > MAX_USAGE_BYTES * 4:
            raise UsageError(f"usage report is larger than {MAX_USAGE_BYTES * 4} bytes")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"usage report is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise UsageError(f"usage report: expected an object with version {FORMAT_VERSION}")
        source = raw.get("source")
        if source not in SOURCES:
            raise UsageError(f"usage report: source must be one of {', '.join(SOURCES)}")
        gpus = raw.get("gpus")
        if not isinstance(gpus, list) or not all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus
        ):
            raise UsageError("usage report: gpus must be a list of GPU indexes")
        devices = raw.get("devices")
        if not isinstance(devices, list):
            raise UsageError("usage report: devices must be a list")
        since = raw.get("since")
        return NodeUsage(
            tuple(gpus),
            tuple(DeviceUse.from_json(d, f"devices[{i}]") for i, d in enumerate(devices)),
            source,
            since if isinstance(since, str) else None,
        )

    def same_as(self, other: NodeUsage | None) -> bool:
        """The same pods on the same devices (`since` aside)."""
        return other is not None and self == other
