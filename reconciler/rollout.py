"""The rollout budget: at most N nodes (or N% of a pool) change their GPUs at the same time, per
pool (the nodes sharing the value of a label key, `nvidia.com/gpu.product` by default), so that a
GitOps commit that relabels a whole pool never takes the pool out of service at once.

No controller: the reconcilers coordinate through coordination.k8s.io Leases in the release
namespace, each labelled `mig-guard.io/rollout` (its role) and `mig-guard.io/pool`:

- **Slots**, `mig-guard-slot-<pool id>-<i>` for i below the budget. A reconciler takes one before
  it holds and drains its node: it creates a free one, or takes over an expired one with an update
  guarded by the Lease's resourceVersion (the API server lets one writer win either way; the loser
  gets 409 and looks again). It renews it every third of its duration while the change runs and
  deletes it (guarded the same way) on every exit; before a host reboot it stretches the duration
  over the reboot. A crashed holder's slot frees when its Lease expires: expiry is judged by how
  long this reconciler has seen the Lease unchanged, as client-go's leader election does, never by
  comparing clocks across nodes.
- **Failed changes**, `mig-guard-failed-<node>`: a change that failed (a verdict on the layout or
  the node, not an API error) leaves one; `failure_limit` of them in a pool stop new starts in it
  until a human deletes them (`mig-guard rollout resume --pool`). A later success of that node deletes its
  own.
- **The pause switch**, `mig-guard-rollout-pause`: while it exists no node starts a change.

A node without a slot waits: it is not held (it keeps running what it runs and takes new pods,
which move like any other when its turn comes), reports `pending` with why it waits, and is woken
when a slot may have freed (a watch of the Leases while it waits, then a random delay of up to
`JITTER_SECONDS` so that one freed slot does not send every waiting node at the API server).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes import client as k8s

from kube.errors import API_ERRORS, is_conflict, is_not_found
from kube.watching import Backoff, follow
from migcore import keys
from reconciler.metrics import Metrics

log = logging.getLogger(__name__)

JITTER_SECONDS = 1.0
JITTER_MOST_SECONDS = 16.0  # a waiting node that keeps losing the race spreads its claims up to this
POOL_SIZE_SECONDS = 300.0  # how long a counted pool size is used for an N% budget
REASON_REFRESH_SECONDS = 60.0  # a waiting node's reason is rewritten at most this often
WATCH_SECONDS = 60  # a watch left behind when waiting ends closes at its next event or after this
FAILURES_SHOWN = 3
HOLDERS_SHOWN = 10
NAME_MAX = 253
_BUDGET = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


# --- the budget -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """At most `count` nodes of a pool, or `percent` of its nodes (rounded down, at least 1), like
    a Deployment's maxUnavailable."""

    count: int | None = None
    percent: int | None = None

    @staticmethod
    def parse(text: str) -> Budget:
        match = _BUDGET.match(text)
        if match is None:
            raise ValueError(
                f"rollout budget: expected a number of nodes (3) or a percentage (10%), got {text!r}"
            )
        value = int(match.group(1))
        if match.group(2):
            if not 0 < value <= 100:
                raise ValueError(f"rollout budget: a percentage from 1% to 100%, got {text!r}")
            return Budget(percent=value)
        if value < 1:
            raise ValueError(f"rollout budget: at least 1 node, got {text!r}")
        return Budget(count=value)

    @property
    def needs_pool_size(self) -> bool:
        return self.percent is not None

    def slots(self, pool_size: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, pool_size * self.percent // 100)

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent}%"


@dataclass(frozen=True)
class RolloutSettings:
    budget: Budget
    namespace: str
    pool_label: str = keys.LABEL_GPU_PRODUCT
    lease_seconds: int = 60
    # Failed changes in a pool that stop new starts there (0: never stop).
    failure_limit: int = 3
    # How long a slot is kept for a host reboot (its holder cannot renew it meanwhile).
    reboot_seconds: int = 1800


# --- what a change sees -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """Why a change cannot start now. `cause`: slots, stopped or paused (the condition's reason
    tells them apart); `report`: whether the node's reason is due to be (re)written."""

    cause: str
    reason: str
    report: bool = True

    @property
    def condition_reason(self) -> str:
        return {"slots": "WaitingForRolloutSlot", "stopped": "RolloutStopped", "paused": "RolloutPaused"}[
            self.cause
        ]


class SlotLostError(Exception):
    """This node's slot was taken over (its Lease expired unrenewed): the change stops before its
    next disruptive step and is retried, waiting for a slot again."""


class RolloutSlot(Protocol):
    """A change's rollout slot (`reconciler.change.Parts.slot`)."""

    def take(self) -> Waiting | None:
        """Take this node's slot (or keep the one it holds): None when held, else why it waits."""
        ...

    def check(self) -> None:
        """Raise SlotLostError when the slot is no longer this node's."""
        ...

    def keep_through_reboot(self) -> None: ...

    def release(self, *, failed: str | None = None, succeeded: bool = False, config: str = "") -> None:
        """Free the slot (if held). `failed`: the change failed (it counts against the pool);
        `succeeded`: an earlier failure of this node no longer counts."""
        ...


class Unlimited:
    """No rollout budget: every change starts at once."""

    def take(self) -> Waiting | None:
        return None

    def check(self) -> None:
        pass

    def keep_through_reboot(self) -> None:
        pass

    def release(self, *, failed: str | None = None, succeeded: bool = False, config: str = "") -> None:
        pass


UNLIMITED = Unlimited()


# --- the Leases as this reconciler sees them ------------------------------------------------------------


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pool_id(pool: str) -> str:
    """A DNS-safe stand-in for a pool's label value (values may hold capitals and `_`)."""
    return hashlib.sha256(pool.encode()).hexdigest()[:10]


def slot_name(pool: str, index: int) -> str:
    return f"mig-guard-slot-{pool_id(pool)}-{index}"


def failure_name(node: str) -> str:
    name = f"mig-guard-failed-{node}"
    if len(name) > NAME_MAX:
        name = f"mig-guard-failed-{hashlib.sha256(node.encode()).hexdigest()[:16]}"
    return name


def describe_pool(pool: str, label: str) -> str:
    return pool if pool else f"(no {label} label)"


@dataclass
class Lease:
    """What the rollout reads of a Lease, and when this reconciler first saw this version of it."""

    name: str
    role: str
    pool: str
    holder: str
    duration: float
    version: str
    seen_at: float
    annotations: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def of(raw: dict[str, Any], seen_at: float) -> Lease:
        meta = raw.get("metadata") or {}
        labels = meta.get("labels") or {}
        spec = raw.get("spec") or {}
        return Lease(
            name=str(meta.get("name", "")),
            role=str(labels.get(keys.LABEL_ROLLOUT, "")),
            pool=str(labels.get(keys.LABEL_POOL, "")),
            holder=str(spec.get("holderIdentity") or ""),
            duration=float(spec.get("leaseDurationSeconds") or 0),
            version=str(meta.get("resourceVersion", "")),
            seen_at=seen_at,
            annotations=dict(meta.get("annotations") or {}),
        )

    def expired(self, now: float) -> bool:
        """Unchanged, as seen here, for longer than its duration (a slot that says no duration
        never expires: only a human frees it)."""
        return self.duration > 0 and now - self.seen_at > self.duration


class LeaseView:
    """The rollout's Leases in the namespace, listed and then watched (while this node waits)."""

    def __init__(self, api: Any, namespace: str, on_change: Callable[[], None]) -> None:
        self.coordination: Any = k8s.CoordinationV1Api(api)
        self.namespace = namespace
        self.on_change = on_change
        self.lock = threading.Lock()
        self.leases: dict[str, Lease] = {}
        self._stop: threading.Event | None = None
        self._version = ""  # of the last list, while no watch has started from it

    @property
    def watching(self) -> bool:
        return self._stop is not None and not self._stop.is_set()

    def refresh(self) -> str:
        """List now (one request); returns the list's resourceVersion."""
        raw = json.loads(
            self.coordination.list_namespaced_lease(
                self.namespace, label_selector=keys.LABEL_ROLLOUT, _preload_content=False
            ).data
        )
        self._replace(raw.get("items") or [])
        self._version = str((raw.get("metadata") or {}).get("resourceVersion", ""))
        return self._version

    def _replace(self, items: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self.lock:
            fresh: dict[str, Lease] = {}
            for item in items:
                lease = Lease.of(item, now)
                old = self.leases.get(lease.name)
                if old is not None and old.version == lease.version:
                    lease.seen_at = old.seen_at  # seen unchanged since then: expiry counts from there
                fresh[lease.name] = lease
            self.leases = fresh

    def saw(self, kind: str, raw: dict[str, Any]) -> None:
        lease = Lease.of(raw, time.monotonic())
        with self.lock:
            if kind == "DELETED":
                self.leases.pop(lease.name, None)
            else:
                old = self.leases.get(lease.name)
                if old is not None and old.version == lease.version:
                    lease.seen_at = old.seen_at
                self.leases[lease.name] = lease
        self.on_change()

    def start(self) -> None:
        """Watch from the last list (or a new one) in a thread (idempotent)."""
        if self.watching:
            return
        version = self._version or self.refresh()
        self._version = ""
        stop = threading.Event()
        self._stop = stop

        def run() -> None:
            def listed(items: Any) -> None:
                self._replace([_raw(i) for i in items])
                self.on_change()

            follow(
                self.coordination.list_namespaced_lease,
                self.namespace,
                field_selector="",
                label_selector=keys.LABEL_ROLLOUT,
                on_list=listed,
                on_event=lambda kind, obj: self.saw(kind, _raw(obj)),
                stop=stop,
                what=f"rollout leases in {self.namespace}",
                backoff=Backoff(first=1.0, most=15.0),
                watch_seconds=WATCH_SECONDS,
                start_version=version,
            )

        threading.Thread(target=run, name="watch-rollout", daemon=True).start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self._version = ""

    def snapshot(self) -> list[Lease]:
        with self.lock:
            return list(self.leases.values())

    def put(self, lease: Lease) -> None:
        with self.lock:
            self.leases[lease.name] = lease

    def drop(self, name: str) -> None:
        with self.lock:
            self.leases.pop(name, None)


def _raw(obj: Any) -> dict[str, Any]:
    """A watched or listed Lease as plain JSON (the client hands over models)."""
    if isinstance(obj, dict):
        return obj
    data: dict[str, Any] = k8s.ApiClient().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    return data


# --- this node's part in the rollout ----------------------------------------------------------------


@dataclass
class Held:
    """The slot this node holds: its Lease's name and version (every write is guarded by it)."""

    name: str
    pool: str
    version: str
    renewed: float  # monotonic time of the last successful renewal
    lost: str = ""


class Rollout:
    """One reconciler's side of the rollout (see the module docstring); `for_pool` gives a change
    its slot. `wake` is called (from a thread) when a slot may have freed for a waiting node."""

    def __init__(
        self,
        api: Any,
        settings: RolloutSettings,
        node_name: str,
        wake: Callable[[], None],
        metrics: Metrics,
        *,
        jitter: float = JITTER_SECONDS,
    ) -> None:
        self.settings = settings
        self.node_name = node_name
        self.core: Any = k8s.CoreV1Api(api)
        self.coordination: Any = k8s.CoordinationV1Api(api)
        self.wake = wake
        self.metrics = metrics
        self.jitter = jitter
        self.view = LeaseView(api, settings.namespace, self._changed)
        self.lock = threading.RLock()
        self.held: Held | None = None
        self.waiting_for: str | None = None  # the pool this node waits in
        self._reported: tuple[str, str, float] | None = None  # (cause, reason, when) last reported
        self._sizes: dict[str, tuple[int, float]] = {}
        self._renewer: threading.Event | None = None
        self._nudge = threading.Event()
        self._spread = jitter  # doubled at each lost race for a slot, back to `jitter` when it wins
        self._waker: threading.Thread | None = None
        self._stopped = threading.Event()

    def for_pool(self, pool: str) -> PoolSlot:
        return PoolSlot(self, pool)

    def close(self) -> None:
        self._stopped.set()
        self._nudge.set()
        self.view.stop()
        self._stop_renewing()

    # --- waiting --------------------------------------------------------------------------------

    def stop_waiting(self) -> None:
        """Nothing to wait for (the node took its slot, or needs no change): stop watching."""
        with self.lock:
            if self.waiting_for is not None:
                self.metrics.rollout_waiting.labels(pool=self.waiting_for).set(0)
            self.waiting_for = None
            self._reported = None
        self.view.stop()

    def _changed(self) -> None:
        self._nudge.set()

    def _wait_in(self, pool: str) -> None:
        with self.lock:
            if self.waiting_for not in (None, pool):
                self.metrics.rollout_waiting.labels(pool=self.waiting_for).set(0)
            self.waiting_for = pool
            self.metrics.rollout_waiting.labels(pool=pool).set(1)
            if self._waker is None or not self._waker.is_alive():
                self._waker = threading.Thread(target=self._wake_when_free, name="rollout-waker", daemon=True)
                self._waker.start()
        self.view.start()

    def _wake_when_free(self) -> None:
        """While this node waits: on every change of the Leases (and when the oldest slot would
        expire), if a start looks possible, after a random delay (checked again after it: another
        node may have taken the slot meanwhile), claim the slot here and then wake the loop. The
        claim is one create (or a 409 for the nodes that lost the race, which learn of the winner
        through the watch): waking every waiting node's loop instead, each reading its Node and
        config to find the slot gone, made a rollout cost O(waiting nodes) requests per handover
        (measured: 14 Node GETs per change with 40 nodes and a budget of 2). A loser's delay
        doubles, up to JITTER_MOST_SECONDS (measured: 28 creates per change with 200 nodes and
        10%, when every loser kept a delay of up to 1 s)."""
        while not self._stopped.is_set():
            pool = self.waiting_for
            if pool is None:
                return
            self._nudge.wait(timeout=self._next_expiry(pool))
            self._nudge.clear()
            if self._stopped.is_set() or self.waiting_for is None:
                return
            if self._blocked(pool) is not None:
                continue
            if self._stopped.wait(random.uniform(0, self._spread)):  # noqa: S311 - spreading, not secrecy
                return
            with self.lock:
                if self.waiting_for != pool or self.held is not None or self._blocked(pool) is not None:
                    continue
                try:
                    claimed = self._claim_free(pool)
                except API_ERRORS as exc:  # the loop takes it from here, and retries
                    log.warning("could not take a free rollout slot: %s", exc)
                    claimed = True
                else:
                    if claimed:
                        self._started(pool)
                # Many nodes waiting: each loser waits longer before its next try, so a handover
                # costs a few 409s, while the first of many short delays still comes soon.
                self._spread = self.jitter if claimed else min(self._spread * 2, JITTER_MOST_SECONDS)
            if claimed:
                self.wake()

    def _next_expiry(self, pool: str) -> float:
        now = time.monotonic()
        times = [
            lease.seen_at + lease.duration - now
            for lease in self.view.snapshot()
            if lease.role == keys.ROLLOUT_SLOT and lease.pool == pool and lease.duration > 0
        ]
        return max(0.5, min([*times, self.settings.lease_seconds]) + 0.1)

    # --- the decision ---------------------------------------------------------------------------

    def _pool_size(self, pool: str) -> int:
        """Nodes in the pool, counted from the API server's cache (metadata only), reused for
        POOL_SIZE_SECONDS."""
        cached = self._sizes.get(pool)
        if cached is not None and time.monotonic() - cached[1] < POOL_SIZE_SECONDS:
            return cached[0]
        label = self.settings.pool_label
        selector = f"{label}={pool}" if pool else f"!{label},{keys.LABEL_MIG_CONFIG}"
        response = self.core.list_node(
            label_selector=selector,
            resource_version="0",
            _headers={"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"},
            _preload_content=False,
        )
        size = len(json.loads(response.data).get("items") or [])
        self._sizes[pool] = (size, time.monotonic())
        return size

    def _blocked(self, pool: str) -> Waiting | None:
        """Why a new start in `pool` must wait, from the Leases as seen (None: it may start)."""
        now = time.monotonic()
        leases = self.view.snapshot()
        label = self.settings.pool_label
        shown = describe_pool(pool, label)
        pause = next((lease for lease in leases if lease.role == keys.ROLLOUT_PAUSE), None)
        if pause is not None:
            why = pause.annotations.get(keys.ANNOTATION_REASON, "")
            by = f" by {pause.holder}" if pause.holder else ""
            return Waiting(
                "paused",
                f"waiting: rollouts are paused{by}{': ' + why if why else ''}; resume with "
                f"`mig-guard rollout resume -n {self.settings.namespace}` or "
                f"`kubectl -n {self.settings.namespace} delete lease {keys.PAUSE_LEASE}`",
            )
        limit = self.settings.failure_limit
        failed = sorted(
            (lease for lease in leases if lease.role == keys.ROLLOUT_FAILED and lease.pool == pool),
            key=lambda lease: lease.holder,
        )
        if limit and len(failed) >= limit:
            selector = f"{keys.LABEL_ROLLOUT}={keys.ROLLOUT_FAILED},{keys.LABEL_POOL}={pool}"
            names = ", ".join(
                f"{lease.holder} ({lease.annotations.get(keys.ANNOTATION_REASON, '')[:120]})"
                for lease in failed[:FAILURES_SHOWN]
            )
            more = f" and {len(failed) - FAILURES_SHOWN} more" if len(failed) > FAILURES_SHOWN else ""
            return Waiting(
                "stopped",
                f"waiting: the rollout in pool {shown} stopped after {len(failed)} failed changes: {names}{more}; "
                f"resume with `mig-guard rollout resume -n {self.settings.namespace} --pool={pool}` or "
                f"`kubectl -n {self.settings.namespace} delete leases -l {selector}`",
            )
        slots = self._slots(pool)
        live = sorted(
            (
                lease
                for lease in leases
                if lease.role == keys.ROLLOUT_SLOT and lease.pool == pool and not lease.expired(now)
            ),
            key=lambda lease: lease.holder,
        )
        if len(live) >= slots:
            holders = ", ".join(lease.holder for lease in live[:HOLDERS_SHOWN])
            more = f", and {len(live) - HOLDERS_SHOWN} more" if len(live) > HOLDERS_SHOWN else ""
            return Waiting(
                "slots",
                f"waiting for a rollout slot (pool {shown}: {len(live)} of {slots} in use: {holders}{more})",
            )
        return None

    def _slots(self, pool: str) -> int:
        budget = self.settings.budget
        return budget.slots(self._pool_size(pool) if budget.needs_pool_size else 0)

    # --- taking, keeping, freeing -----------------------------------------------------------------

    def take(self, pool: str) -> Waiting | None:
        with self.lock:  # never at the same time as the waker's claim (one slot per node)
            return self._take(pool)

    def _take(self, pool: str) -> Waiting | None:
        if self.held is not None and self.held.pool != pool:  # the node moved to another pool
            self.release(self.held.pool)
        if self.held is not None and not self.held.lost:  # e.g. claimed by the waker
            return None
        if not self.view.watching:
            self.view.refresh()
        for _attempt in range(5):
            mine = self._own_slot(pool)
            if mine is not None:  # a restarted agent, a change resumed, a reboot over
                if self._renew(mine.name, mine.version, pool):
                    self._started(pool)
                    return None
                self.view.refresh()
                continue
            blocked = self._blocked(pool)
            if blocked is not None:
                self._wait_in(pool)
                return self._to_report(blocked)
            if self._claim_free(pool):
                self._started(pool)
                return None
            self.view.refresh()  # another node was faster: look again
        blocked = self._blocked(pool) or Waiting(
            "slots", "waiting for a rollout slot (other nodes took the free ones first)"
        )
        self._wait_in(pool)
        return self._to_report(blocked)

    def _to_report(self, waiting: Waiting) -> Waiting:
        """Rewrite the reason when the cause changed or REASON_REFRESH_SECONDS passed (a waiting
        node is not rewritten at every handover of a slot: each write reaches every watcher)."""
        now = time.monotonic()
        last = self._reported
        due = (
            last is None
            or last[0] != waiting.cause
            or (last[1] != waiting.reason and now - last[2] >= REASON_REFRESH_SECONDS)
        )
        if due:
            self._reported = (waiting.cause, waiting.reason, now)
        return Waiting(waiting.cause, waiting.reason, report=due)

    def _own_slot(self, pool: str) -> Lease | None:
        return next(
            (
                lease
                for lease in self.view.snapshot()
                if lease.role == keys.ROLLOUT_SLOT and lease.pool == pool and lease.holder == self.node_name
            ),
            None,
        )

    def _claim_free(self, pool: str) -> bool:
        """Create the first free slot, or take over the first expired one; False on a lost race."""
        now = time.monotonic()
        taken = {lease.name: lease for lease in self.view.snapshot() if lease.role == keys.ROLLOUT_SLOT}
        for index in range(self._slots(pool)):
            name = slot_name(pool, index)
            lease = taken.get(name)
            if lease is not None and not lease.expired(now):
                continue
            body = self._body(name, pool)
            try:
                if lease is None:
                    raw = self.coordination.create_namespaced_lease(
                        self.settings.namespace, body, _preload_content=False
                    )
                else:
                    body["metadata"]["resourceVersion"] = lease.version
                    raw = self.coordination.replace_namespaced_lease(
                        name, self.settings.namespace, body, _preload_content=False
                    )
                    log.info("took over rollout slot %s from %s (expired)", name, lease.holder)
            except API_ERRORS as exc:
                if is_conflict(exc):  # 409: created or renewed by another node meanwhile
                    return False
                raise
            created = Lease.of(json.loads(raw.data), time.monotonic())
            self.view.put(created)
            with self.lock:
                self.held = Held(name, pool, created.version, time.monotonic())
            return True
        return False

    def _body(self, name: str, pool: str, duration: int | None = None) -> dict[str, Any]:
        now = now_micro()
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.settings.namespace,
                "labels": {keys.LABEL_ROLLOUT: keys.ROLLOUT_SLOT, keys.LABEL_POOL: pool},
            },
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": duration or self.settings.lease_seconds,
                "acquireTime": now,
                "renewTime": now,
            },
        }

    def _renew(self, name: str, version: str, pool: str, duration: int | None = None) -> bool:
        """Write the slot again (guarded by `version`); False when it is no longer this node's."""
        body = self._body(name, pool, duration)
        body["metadata"]["resourceVersion"] = version
        try:
            raw = self.coordination.replace_namespaced_lease(
                name, self.settings.namespace, body, _preload_content=False
            )
        except API_ERRORS as exc:
            if is_conflict(exc) or is_not_found(exc):
                return False
            raise
        lease = Lease.of(json.loads(raw.data), time.monotonic())
        self.view.put(lease)
        with self.lock:
            self.held = Held(name, pool, lease.version, time.monotonic())
        return True

    def _started(self, pool: str) -> None:
        self.stop_waiting()
        self.metrics.rollout_active.labels(pool=pool).set(1)
        self._start_renewing()
        held = self.held
        log.info("rollout slot %s held (pool %s)", held.name if held else "?", pool)

    def _start_renewing(self) -> None:
        self._stop_renewing()
        stop = threading.Event()
        self._renewer = stop
        threading.Thread(target=self._renew_until, args=(stop,), name="rollout-renew", daemon=True).start()

    def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.set()
            self._renewer = None

    def _renew_until(self, stop: threading.Event) -> None:
        period = max(1.0, self.settings.lease_seconds / 3)
        while not stop.wait(period):
            with self.lock:
                held = self.held
            if held is None or held.lost:
                return
            try:
                if not self._renew(held.name, held.version, held.pool):
                    with self.lock:
                        held.lost = (
                            f"slot {held.name} was taken over by another node (its lease expired unrenewed)"
                        )
                    log.warning("%s", held.lost)
                    return
            except API_ERRORS as exc:
                log.warning("could not renew rollout slot %s: %s", held.name, exc)
                if time.monotonic() - held.renewed > self.settings.lease_seconds:
                    with self.lock:
                        held.lost = f"slot {held.name} not renewed for {self.settings.lease_seconds}s ({exc})"

    def check(self) -> None:
        with self.lock:
            held = self.held
        if held is None:
            return
        if not held.lost and time.monotonic() - held.renewed > self.settings.lease_seconds:
            held.lost = f"slot {held.name} not renewed for {self.settings.lease_seconds}s"
        if held.lost:
            raise SlotLostError(
                f"the rollout slot was lost ({held.lost}): the change stops here and waits again"
            )

    def keep_through_reboot(self) -> None:
        """The host reboots now and nothing renews the slot meanwhile: stretch it over the reboot."""
        with self.lock:
            held = self.held
        self._stop_renewing()
        if held is None:
            return
        try:
            self._renew(held.name, held.version, held.pool, duration=self.settings.reboot_seconds)
        except API_ERRORS as exc:
            log.warning("could not keep rollout slot %s over the reboot: %s", held.name, exc)

    def release(
        self, pool: str, *, failed: str | None = None, succeeded: bool = False, config: str = ""
    ) -> None:
        """Free this node's slot. `failed`: the change failed, recorded against the pool first (so
        that no node starts in its place before it counts); `succeeded`: an earlier failure of this
        node is forgotten. Best effort: a slot that cannot be freed expires by itself."""
        try:
            self._record(pool, failed, succeeded, config)
        except API_ERRORS as exc:
            log.warning("could not record the outcome in the rollout: %s", exc)
        with self.lock:
            held, self.held = self.held, None
        self._stop_renewing()
        self.metrics.rollout_active.labels(pool=pool).set(0)
        try:
            if held is None:  # a slot from before a restart, if any
                if not self.view.watching:
                    self.view.refresh()
                mine = self._own_slot(pool)
                if mine is None:
                    return
                held = Held(mine.name, pool, mine.version, 0.0)
            self.coordination.delete_namespaced_lease(
                held.name,
                self.settings.namespace,
                body={"preconditions": {"resourceVersion": held.version}},
            )
        except API_ERRORS as exc:
            if not (is_conflict(exc) or is_not_found(exc)):  # taken over, or gone: not ours to free
                log.warning("could not free the rollout slot (it expires by itself): %s", exc)
        if held is not None:
            self.view.drop(held.name)

    def release_stale(self) -> None:
        """At start with no change in flight: free a slot this node still holds from before (an
        agent killed after the change ended, before it freed the slot)."""
        self.view.refresh()
        mine = [
            lease
            for lease in self.view.snapshot()
            if lease.role == keys.ROLLOUT_SLOT and lease.holder == self.node_name
        ]
        for lease in mine:
            with contextlib.suppress(*API_ERRORS):
                self.coordination.delete_namespaced_lease(
                    lease.name,
                    self.settings.namespace,
                    body={"preconditions": {"resourceVersion": lease.version}},
                )
            self.view.drop(lease.name)

    def _record(self, pool: str, failure: str | None, succeeded: bool, config: str) -> None:
        name = failure_name(self.node_name)
        if failure is None:
            if succeeded and any(lease.name == name for lease in self.view.snapshot()):
                with contextlib.suppress(*API_ERRORS):
                    self.coordination.delete_namespaced_lease(name, self.settings.namespace)
                self.view.drop(name)
            return
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.settings.namespace,
                "labels": {keys.LABEL_ROLLOUT: keys.ROLLOUT_FAILED, keys.LABEL_POOL: pool},
                "annotations": {
                    keys.ANNOTATION_REASON: failure[:1024],
                    keys.ANNOTATION_ROLLOUT_CONFIG: config,
                },
            },
            # No duration: a failed change counts until a human resumes the pool (or the node succeeds).
            "spec": {"holderIdentity": self.node_name, "acquireTime": now_micro()},
        }
        try:
            raw = self.coordination.create_namespaced_lease(
                self.settings.namespace, body, _preload_content=False
            )
        except API_ERRORS as exc:
            if not is_conflict(exc):
                raise
            raw = self.coordination.replace_namespaced_lease(
                name, self.settings.namespace, body, _preload_content=False
            )
        self.view.put(Lease.of(json.loads(raw.data), time.monotonic()))


@dataclass
class PoolSlot:
    """`RolloutSlot` for a change of a node in `pool`."""

    rollout: Rollout
    pool: str

    def take(self) -> Waiting | None:
        return self.rollout.take(self.pool)

    def check(self) -> None:
        self.rollout.check()

    def keep_through_reboot(self) -> None:
        self.rollout.keep_through_reboot()

    def release(self, *, failed: str | None = None, succeeded: bool = False, config: str = "") -> None:
        self.rollout.release(self.pool, failed=failed, succeeded=succeeded, config=config)
