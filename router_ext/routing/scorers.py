"""Built-in scorers: load signals from the scraped engine metrics.

Each pod's load is what `PodStatus.score_metrics` says (live when warm, the lifecycle's
conservative estimate when cold or stale) plus what this router's own picks since that scrape
added. The snapshot part is computed once per snapshot in `prepare`; a request adds the picks
and maps the candidates onto [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from router_ext.fleet.snapshot import EngineMetrics, PodStatus, Snapshot
from router_ext.routing.context import RequestContext
from router_ext.routing.plugins import PluginParams, Prepared, Scorer
from router_ext.routing.view import PoolView

INF = float("inf")


@dataclass(frozen=True, slots=True)
class LoadState:
    base: list[float]  # by pod index: load from metrics alone; inf = cannot judge this pod
    per_pick: float  # what one pick since the scrape adds


class LoadScorer(Scorer[LoadState]):
    """A load (lower is better) mapped onto [0, 1] over the candidates compared: the least
    loaded candidate scores 1, the most loaded 0, all equal 1 (as llm-d's queue scorer). The
    order of the candidates is exactly the order of their loads. A pod without metrics or an
    estimate scores 0 (never seen: only a pool with no warm pod has one, and then the whole
    snapshot abstains)."""

    partial = False

    def load(self, m: EngineMetrics, snap: Snapshot) -> float:
        raise NotImplementedError

    def per_pick(self, snap: Snapshot) -> float:
        return 1.0

    def unusable(self, snap: Snapshot) -> str:
        """Why no pod of this snapshot can be judged ("" if some can)."""
        return "" if snap.warm else "no_fresh_metrics"

    def prepare(self, snap: Snapshot) -> Prepared[LoadState]:
        why = self.unusable(snap)
        if why:
            return Prepared(LoadState([], 0.0), why)
        median = snap.warm_median
        base = [INF] * len(snap.pods)
        for p in snap.routable:
            m = p.score_metrics or median
            if m is not None:
                base[p.index] = self.load(m, snap)
        return Prepared(LoadState(base, self.per_pick(snap)))

    def score(
        self,
        ctx: RequestContext,
        view: PoolView,
        state: LoadState,
        candidates: Sequence[PodStatus],
    ) -> Sequence[float | None] | None:
        raw = self.rank(ctx, view, state, candidates)
        if max(raw) == INF:
            return _without_unjudged(self, raw)
        return self.normalise(raw)

    def rank(
        self,
        ctx: RequestContext,
        view: PoolView,
        state: LoadState,
        candidates: Sequence[PodStatus],
    ) -> list[float]:
        """The load itself (lower is better): base from metrics + picks since the scrape."""
        base = state.base
        w = state.per_pick
        if not w:
            return [base[p.index] for p in candidates]
        picks = view.picks
        return [base[p.index] + picks[p.index] * w for p in candidates]

    def normalise(self, raw: list[float]) -> list[float]:
        hi, lo = max(raw), min(raw)
        span = hi - lo
        return [1.0] * len(raw) if span <= 0.0 else [(hi - x) / span for x in raw]


def _without_unjudged(scorer: LoadScorer, raw: list[float]) -> list[float] | None:
    judged = [x for x in raw if x != INF]
    if not judged:
        return None
    it = iter(scorer.normalise(judged))
    return [0.0 if x == INF else next(it) for x in raw]


class QueueScorer(LoadScorer):
    """Requests waiting in the engine's queue. A pick does not add to the queue (it may start
    at once), so alone it cannot spread picks between equal queues: pair it with `running`,
    or set `running_tie_break` (the built-in least-queue does): equal queues are then ordered
    by running requests plus picks, and any difference in queue still decides first."""

    class Params(PluginParams):
        running_tie_break: bool = Field(
            default=False, description="Order equal queues by running requests + picks."
        )

    params: Params

    def load(self, m: EngineMetrics, snap: Snapshot) -> float:
        if self.params.running_tie_break:
            # Lexicographic (waiting, running) as one number, exact while running < 1e4.
            return m.waiting * 1e4 + m.running
        return m.waiting

    def per_pick(self, snap: Snapshot) -> float:
        return 1.0 if self.params.running_tie_break else 0.0


class RunningScorer(LoadScorer):
    """Requests running in the engine, plus this router's picks since the scrape."""

    def load(self, m: EngineMetrics, snap: Snapshot) -> float:
        return m.running


class RequestsScorer(LoadScorer):
    """Running + waiting, plus this router's picks since the scrape (least-request)."""

    def load(self, m: EngineMetrics, snap: Snapshot) -> float:
        return m.running + m.waiting


class KVCacheScorer(LoadScorer):
    """1 - estimated KV-cache use: the scraped use plus one request's typical share per pick
    since the scrape. Absolute, not relative to the candidates, so 1 % more KV use weighs
    1 % in a weighted profile; if picks push an estimate past 100 %, every candidate is
    scaled by the largest estimate so the order is kept."""

    def unusable(self, snap: Snapshot) -> str:
        why = super().unusable(snap)
        if why:
            return why
        if snap.warm_median is None or snap.warm_median.kv_cache_usage is None:
            return "no_kv_metric"
        return ""

    def load(self, m: EngineMetrics, snap: Snapshot) -> float:
        kv = m.kv_cache_usage
        if kv is None:  # this engine does not export KV use: assume the pool's median
            med = snap.warm_median
            kv = med.kv_cache_usage if med is not None and med.kv_cache_usage is not None else 0.5
        return kv

    def per_pick(self, snap: Snapshot) -> float:
        return snap.kv_per_request

    def normalise(self, raw: list[float]) -> list[float]:
        hi = max(raw)
        scale = hi if hi > 1.0 else 1.0
        return [1.0 - x / scale for x in raw]
