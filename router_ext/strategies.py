"""Routing strategies: pick a primary pod and ordered fallbacks from a snapshot.

Hot path. No I/O, no locks, nothing that grows with the pool: metric strategies compare at most
`sample_size` candidates (power-of-d choices over a uniform sample), and everything derivable
from metrics alone (cold/stale estimates, per-request KV cost) is precomputed in the snapshot.

Degradation is part of the interface, not a special case inside each strategy:
`MetricStrategy` scores pods from `PodStatus.score_metrics` (live for warm pods, a conservative
estimate for cold/stale ones, filled in by the lifecycle) and hands over to `random` when no
pod has fresh metrics, reporting it as e.g. ``least-kv-cache>random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from router_ext.config import STRATEGY_NAMES, RoutingSection
from router_ext.snapshot import EngineMetrics, PodStatus, Snapshot


@dataclass(slots=True)
class PoolView:
    """A snapshot plus the mutable per-snapshot pick counters.

    `picks[i]` counts primaries chosen for pod i since this snapshot was published, minus the
    ones Envoy's access log reported finished: the load this router added that the scraped
    metrics cannot show yet. `started[i]` counts the same picks but is never decremented: the
    slow-start cap limits a new pod's share of the *rate*, not of what is in flight. A new
    snapshot (next scrape) starts both from zero; the new metrics include those requests.
    """

    snapshot: Snapshot
    picks: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    total: int = 0  # primaries chosen since this snapshot (all pods)
    # Per metric strategy: each pod's score before this router's own picks, by pod index
    # (inf for pods that cannot be scored). Filled at publish time (Router.publish), so a
    # pick only adds `picks[i] * weight` to a number it looks up.
    base: dict[str, list[float]] = field(default_factory=dict)
    # Indexes of the routable pods, shuffled once per snapshot: metric strategies compare a
    # window of it starting at a random offset, a cheap uniform sample.
    order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.snapshot.pods)
        if not self.picks:
            self.picks = [0] * n
        if not self.started:
            self.started = [0] * n


@dataclass(frozen=True, slots=True)
class Decision:
    pods: tuple[PodStatus, ...]  # primary first, then fallbacks; never empty
    used: str  # strategy actually used, e.g. "least-kv-cache>random"
    degraded: str = ""  # why the requested strategy could not be used ("" = it was)

    @property
    def header_value(self) -> str:
        return ",".join(p.address for p in self.pods)


class NoPodError(Exception):
    """No pod can take the request (empty pool, or every pod unreachable/not ready)."""


class Strategy:
    name = ""

    def __init__(self, cfg: RoutingSection) -> None:
        self.cfg = cfg

    def pick(self, view: PoolView, rng: random.Random) -> Decision:
        raise NotImplementedError

    # --- shared mechanics -----------------------------------------------------------------
    def _finish(
        self,
        view: PoolView,
        ordered: list[PodStatus],
        rng: random.Random,
        used: str,
        degraded: str = "",
    ) -> Decision:
        """Apply slow start to the primary, fill fallbacks, count the pick."""
        snap = view.snapshot
        want = 1 + self.cfg.fallbacks
        started = view.started
        # Slow start: a ramping pod may take at most `ramp` x its fair share of this scrape
        # window's picks (+1, so it is never starved). A cap, not a probability: several idle
        # new pods cannot jointly take most of the traffic however the strategy ranks them.
        fair = (view.total + 1) / (len(snap.routable) or 1)
        primary_i = 0
        for i, p in enumerate(ordered):
            if p.ramp >= 1.0 or started[p.index] < p.ramp * fair + 1.0:
                primary_i = i
                break
        if primary_i:
            ordered.insert(0, ordered.pop(primary_i))
        out = ordered[:want]
        if len(out) < want:
            out = _fill(out, snap.routable, want, rng)
        if len(out) < want and snap.draining:
            # Draining pods: never a primary while others exist, but a last-resort fallback.
            out = _fill(out, snap.draining, want, rng)
        i = out[0].index
        view.picks[i] += 1
        started[i] += 1
        view.total += 1
        return Decision(tuple(out), used, degraded)


def _fill(
    out: list[PodStatus], pool: tuple[PodStatus, ...], want: int, rng: random.Random
) -> list[PodStatus]:
    have = {p.index for p in out}
    n = len(pool)
    if n == 0:
        return out
    start = rng.randrange(n)
    for k in range(n):
        p = pool[(start + k) % n]
        if p.index not in have:
            out.append(p)
            have.add(p.index)
            if len(out) >= want:
                break
    return out


def _candidates(view: PoolView) -> tuple[PodStatus, ...]:
    snap = view.snapshot
    if snap.routable:
        return snap.routable
    if snap.draining:
        return snap.draining  # nothing else left: draining pods beat a 503
    raise NoPodError("no routable pod")


class RandomStrategy(Strategy):
    name = "random"

    def pick(self, view: PoolView, rng: random.Random, used: str = "", why: str = "") -> Decision:
        pool = _candidates(view)
        k = min(len(pool), 1 + self.cfg.fallbacks + 2)
        return self._finish(view, rng.sample(pool, k), rng, used or self.name, why)


class RoundRobinStrategy(Strategy):
    name = "round-robin"

    def __init__(self, cfg: RoutingSection) -> None:
        super().__init__(cfg)
        self._next = 0

    def pick(self, view: PoolView, rng: random.Random) -> Decision:
        pool = _candidates(view)
        n = len(pool)
        i = self._next % n
        self._next = i + 1
        k = min(n, 1 + self.cfg.fallbacks + 2)
        ordered = [pool[(i + j) % n] for j in range(k)]
        return self._finish(view, ordered, rng, self.name)


class MetricStrategy(Strategy):
    """Scores candidates from metrics; lower is better. Degrades to random when it must."""

    def __init__(self, cfg: RoutingSection, fallback: RandomStrategy) -> None:
        super().__init__(cfg)
        self.fallback = fallback

    def unusable(self, snap: Snapshot) -> str:
        """Why this strategy cannot score the pool right now ("" if it can)."""
        if not snap.warm:
            return "no_fresh_metrics"
        return ""

    def base_score(self, m: EngineMetrics, snap: Snapshot) -> float:
        """Score from metrics alone (lower is better)."""
        raise NotImplementedError

    def pick_weight(self, snap: Snapshot) -> float:
        """What one more pick since the scrape adds to a pod's score."""
        return 1.0

    def score(self, m: EngineMetrics, picks: int, snap: Snapshot) -> float:
        return self.base_score(m, snap) + picks * self.pick_weight(snap)

    def prepare(self, view: PoolView) -> list[float]:
        """Base scores for every pod of the snapshot: O(pool), done once per snapshot."""
        snap = view.snapshot
        median = snap.warm_median
        base = [INF] * len(snap.pods)
        for p in snap.routable:
            m = p.score_metrics or median
            if m is not None:
                base[p.index] = self.base_score(m, snap)
        view.base[self.name] = base
        return base

    def pick(self, view: PoolView, rng: random.Random) -> Decision:
        snap = view.snapshot
        if not snap.routable:
            return self.fallback.pick(view, rng)  # draining pods only: nothing to score
        why = self.unusable(snap)
        if why:
            return self.fallback.pick(view, rng, used=f"{self.name}>random", why=why)
        base = view.base.get(self.name)
        if base is None:  # Router.publish prepares eagerly; direct callers get it here
            base = self.prepare(view)
        order = view.order
        if not order:  # as above: Router.publish shuffles once per snapshot
            order = view.order = _shuffled(snap.routable, rng)
        n = len(order)
        k = self.cfg.sample_size
        # A window of k from a random offset in a per-snapshot shuffled order: uniform
        # enough, O(k), and the random start also breaks ties between equal scores.
        start = rng.randrange(n)
        if n <= k:
            ids = order[start:] + order[:start]
        elif start + k <= n:
            ids = order[start : start + k]
        else:
            ids = order[start:] + order[: start + k - n]
        picks = view.picks
        w = self.pick_weight(snap)
        scored = sorted([(base[i] + picks[i] * w, i) for i in ids])
        pods = snap.pods
        return self._finish(view, [pods[i] for _, i in scored], rng, self.name)


INF = float("inf")


def _shuffled(pods: tuple[PodStatus, ...], rng: random.Random) -> list[int]:
    out = [p.index for p in pods]
    rng.shuffle(out)
    return out


def make_view(snap: Snapshot, strategies: dict[str, Strategy], rng: random.Random) -> PoolView:
    """Everything a pick needs that depends only on the snapshot, computed once, off the hot
    path: the shuffled candidate order and each metric strategy's base scores."""
    view = PoolView(snap, order=_shuffled(snap.routable, rng))
    for s in strategies.values():
        if isinstance(s, MetricStrategy):
            s.prepare(view)
    return view


class LeastRequestStrategy(MetricStrategy):
    """running + waiting as scraped, plus the picks this router made since that scrape."""

    name = "least-request"

    def base_score(self, m: EngineMetrics, snap: Snapshot) -> float:
        return m.running + m.waiting


class LeastQueueStrategy(MetricStrategy):
    """Fewest waiting first, then fewest running (a pick adds to running: it may start)."""

    name = "least-queue"

    def base_score(self, m: EngineMetrics, snap: Snapshot) -> float:
        return m.waiting * 1e4 + m.running


class LeastKVCacheStrategy(MetricStrategy):
    """Lowest KV-cache use; each pick since the scrape adds one request's typical KV share."""

    name = "least-kv-cache"

    def unusable(self, snap: Snapshot) -> str:
        why = super().unusable(snap)
        if why:
            return why
        if snap.warm_median is None or snap.warm_median.kv_cache_usage is None:
            return "no_kv_metric"
        return ""

    def base_score(self, m: EngineMetrics, snap: Snapshot) -> float:
        kv = m.kv_cache_usage
        if kv is None:  # this engine does not export KV use: assume the pool's median
            med = snap.warm_median
            kv = med.kv_cache_usage if med is not None and med.kv_cache_usage is not None else 0.5
        return kv

    def pick_weight(self, snap: Snapshot) -> float:
        return snap.kv_per_request


def build_strategies(cfg: RoutingSection) -> dict[str, Strategy]:
    rnd = RandomStrategy(cfg)
    out: dict[str, Strategy] = {
        "random": rnd,
        "round-robin": RoundRobinStrategy(cfg),
        "least-request": LeastRequestStrategy(cfg, rnd),
        "least-kv-cache": LeastKVCacheStrategy(cfg, rnd),
        "least-queue": LeastQueueStrategy(cfg, rnd),
    }
    assert tuple(out) == STRATEGY_NAMES
    return out
