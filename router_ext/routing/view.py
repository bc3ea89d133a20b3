"""What one decision reads and writes: the published snapshot plus this router's own counters.

`PoolView` is built off the hot path (`make_view`, on every publish) and swapped in one
assignment; a request then only does O(sample_size) work on it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router_ext.fleet.snapshot import PodState, PodStatus, Snapshot

if TYPE_CHECKING:
    from router_ext.routing.pipeline import Plan


class NoPodError(Exception):
    """No pod can take the request (empty pool, or every pod unreachable/not ready)."""


@dataclass(frozen=True, slots=True)
class Decision:
    pods: tuple[PodStatus, ...]  # primary first, then fallbacks; never empty
    used: str  # profile actually used, e.g. "least-kv-cache>random"
    degraded: str = ""  # why the requested profile could not be used ("" = it was)

    @property
    def header_value(self) -> str:
        return ",".join(p.address for p in self.pods)


@dataclass(slots=True)
class ModelPool:
    """The pods a request may go to: every routable pod, or those serving one model.

    Built per model at publish (`make_view`), so a request for a model indexes a dict instead
    of filtering the pool. Fallbacks, the draining last resort and the warm last fallback are
    drawn from the same pool: a request is never retried on a pod that lacks its model.
    """

    routable: tuple[PodStatus, ...]
    # `routable`, shuffled once per snapshot: scored profiles sample a window of it.
    order: list[PodStatus]
    warm: tuple[PodStatus, ...]
    draining: tuple[PodStatus, ...]
    # Indices of `routable` (hinted pods are checked against it).
    members: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not self.members and self.routable:
            self.members = frozenset(p.index for p in self.routable)

    @staticmethod
    def of(
        routable: Sequence[PodStatus], draining: Sequence[PodStatus], rng: random.Random
    ) -> ModelPool:
        order = list(routable)
        rng.shuffle(order)
        warm = tuple(p for p in routable if p.state is PodState.WARM and p.metrics is not None)
        return ModelPool(tuple(routable), order, warm, tuple(draining))


@dataclass(slots=True)
class PoolView:
    """A snapshot plus the mutable pick counters.

    `picks[i]` counts primaries chosen for pod i since its metrics were scraped, minus the ones
    Envoy's access log reported finished: the load this router added that the metrics cannot
    show yet. It resets only when that pod's metrics change (see `make_view`), never because
    something else was published. `started[i]` counts the same picks but is never decremented
    and restarts with each scrape round: the slow-start cap limits a new pod's share of the
    *rate* of new requests, not of what is in flight. `total` is the sum of `started`.
    """

    snapshot: Snapshot
    picks: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    total: int = 0
    # The routable pods, shuffled once per snapshot: scored profiles compare a window of it
    # starting at a random offset, a cheap uniform sample.
    order: list[PodStatus] = field(default_factory=list)
    # Per scorer instance (id): its per-snapshot state from Scorer.prepare.
    prepared: dict[int, Any] = field(default_factory=dict)
    # Per profile name: what it needs from this snapshot (scorers that can judge it, or why
    # none can), computed at publish.
    plans: dict[str, Plan] = field(default_factory=dict)
    # Every routable pod (`all`), and the pods serving each model by name (`by_model`).
    all: ModelPool | None = None
    by_model: dict[str, ModelPool] = field(default_factory=dict)
    # Routable pods nothing says the model of, when others are known (see pipeline.pool_for).
    unknown: ModelPool | None = None

    def __post_init__(self) -> None:
        if not self.order and self.snapshot.routable:
            # Built directly (tests, tools) rather than by make_view: the window must still
            # be a uniform sample, so shuffle here (deterministically, per snapshot version).
            self.order = list(self.snapshot.routable)
            random.Random(self.snapshot.version).shuffle(self.order)
        snap = self.snapshot
        if self.all is None:
            rng = random.Random(snap.version)
            self.all = ModelPool(
                snap.routable,
                self.order,
                snap.warm,
                snap.draining,
            )
            self.by_model = _model_pools(snap, rng)
            self.unknown = _unknown_pool(snap, rng)
        n = len(self.snapshot.pods)
        if not self.picks:
            self.picks = [0] * n
        if not self.started:
            self.started = [0] * n


def make_view(snap: Snapshot, old: PoolView | None, rng: random.Random) -> PoolView:
    """A new view for `snap`, carrying this router's counters over from `old`.

    A pod keeps its `picks` when it is the same pod (address and Pod.identity) and its
    metrics are the very same scrape as before: those picks are still load the metrics cannot
    show. Publishes that bring no new metrics (an Envoy feedback mark, a warm-up finishing, a
    discovery touch, a scrape of only new pods) must not reset them, or every pod looks as
    idle as its last scrape again and traffic herds onto whichever pod looked least loaded
    then. The slow-start window (`started`, `total`) restarts when any pod brings new metrics
    (a scrape round), as it always did; a pod without metrics (cold) keeps its picks only
    while that window continues, since no scrape will ever "include" them.
    """
    n = len(snap.pods)
    picks = [0] * n
    started = [0] * n
    total = 0
    if old is not None and old.snapshot.pods:
        before = old.snapshot
        same: list[tuple[int, int]] = []  # (new index, old index) of unchanged pods
        window_continues = True
        for p in snap.pods:
            j = before.index_of.get(p.address)
            q = before.pods[j] if j is not None else None
            if q is None or q.pod.identity != p.pod.identity:  # e.g. a reused IP
                if p.metrics is not None:
                    window_continues = False  # a new pod's first metrics: a scrape happened
                continue
            if q.metrics is p.metrics and q.metrics_at == p.metrics_at:
                same.append((p.index, q.index))
            elif p.metrics is not None:
                window_continues = False
        old_picks, old_started = old.picks, old.started
        pods = snap.pods
        for i, j in same:
            if window_continues:
                picks[i] = old_picks[j]
                started[i] = old_started[j]
                total += old_started[j]
            elif pods[i].metrics is not None:
                picks[i] = old_picks[j]
    order = list(snap.routable)
    rng.shuffle(order)
    return PoolView(
        snap,
        picks=picks,
        started=started,
        total=total,
        order=order,
        all=ModelPool(snap.routable, order, snap.warm, snap.draining),
        by_model=_model_pools(snap, rng),
        unknown=_unknown_pool(snap, rng),
    )


def _unknown_pool(snap: Snapshot, rng: random.Random) -> ModelPool | None:
    if not snap.by_model:
        return None
    pods = [p for p in snap.routable if not p.served]
    return ModelPool.of(pods, [], rng) if pods else None


def _model_pools(snap: Snapshot, rng: random.Random) -> dict[str, ModelPool]:
    """One pool per served model name (base models and adapters). Off the hot path: O(pods x
    models) once per publish."""
    names = dict.fromkeys(snap.by_model)
    for p in snap.draining:  # a model served only by draining pods still beats a 404
        names.update(dict.fromkeys(sorted(p.served)))
    return {
        name: ModelPool.of(
            snap.by_model.get(name, ()), [p for p in snap.draining if name in p.served], rng
        )
        for name in names
    }
