"""The one decision pipeline every profile runs.

    routable candidates -> sample -> filters -> sum of weight x score -> picker
    -> slow-start cap -> ordered fallbacks (draining pods last resort)

Hot path: no I/O, no locks, nothing that grows with the pool. Scored profiles look at a window
of at most `routing.sample_size` candidates of a per-snapshot shuffled order (power-of-d
choices over a uniform sample); profiles without filters or scorers (random, round-robin) hand
the whole candidate tuple to a picker that is O(fallbacks) by construction. Everything that
depends only on the snapshot (each scorer's per-pod base, which scorers can judge it at all)
was computed at publish time (`Profile.plan`).

Degradation is part of the pipeline, not of each plugin: when every scorer abstains for every
candidate, or a plugin raises, the answer is random over the routable pods and says so
(``NAME>random`` plus a reason), so an operator sees it and a client still gets a pod.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router_ext.config import MODEL_NOT_JSON, ProfileSpec, RoutingSection
from router_ext.fleet.snapshot import PodStatus
from router_ext.routing import registry
from router_ext.routing.context import RequestContext
from router_ext.routing.errors import INVALID_BODY, MODEL_REQUIRED, ClientError, model_not_found
from router_ext.routing.plugins import Filter, Picker, Scorer, overrides
from router_ext.routing.stats import HotPathStats, PluginCost
from router_ext.routing.view import Decision, ModelPool, NoPodError, PoolView

log = logging.getLogger("router_ext.routing")

#: Total of a pod no scorer judged: below every judged pod (judged totals are >= 0).
UNJUDGED = -1.0

_pc = time.perf_counter

#: One decision in this many has its plugins timed (router_ext_plugin_duration_seconds).
TIMED_EVERY = 16

_ROLE = {"filter": "filter", "score": "scorer", "pick": "picker"}


@dataclass(slots=True)
class Plan:
    """What one profile needs from one snapshot, computed at publish."""

    # (scorer, its prepared state, weight, cost histogram) for scorers that can judge the pool.
    scorers: tuple[tuple[Scorer[Any], Any, float, PluginCost], ...]
    # Every scorer abstains for the whole snapshot: why ("" = some can judge it).
    degraded: str = ""
    # Scorers that abstain for the whole snapshot, and why (Explain).
    abstained: tuple[tuple[str, str], ...] = ()
    # The fast path: the only active scorer offers Scorer.rank and the picker is order-only.
    ranked: tuple[Scorer[Any], Any, PluginCost] | None = None
    # Active scorers that name pods worth comparing beyond the sample (Scorer.hint).
    hinters: tuple[tuple[Scorer[Any], Any], ...] = ()


@dataclass(slots=True)
class Trace:
    """What a decision looked at, recorded only for Explain (None on the hot path)."""

    candidates: list[PodStatus] = field(default_factory=list)
    removed: list[tuple[str, PodStatus]] = field(default_factory=list)  # (filter, pod)
    ignored_filters: list[str] = field(default_factory=list)  # would have left none
    # (scorer, weight, scores aligned with candidates or None = abstained for all)
    scores: list[tuple[str, float, Sequence[float | None] | None]] = field(default_factory=list)
    abstained: list[tuple[str, str]] = field(default_factory=list)
    totals: list[float] | None = None


def finish(
    view: PoolView,
    mp: ModelPool,
    ordered: list[PodStatus],
    rng: random.Random,
    want: int,
    used: str,
    degraded: str = "",
) -> Decision:
    """Apply slow start to the primary, fill fallbacks from the same pool, count the pick."""
    started = view.started
    # Slow start: a ramping pod may take at most `ramp` x its fair share of this scrape
    # window's picks (+1, so it is never starved). A cap, not a probability: several idle
    # new pods cannot jointly take most of the traffic however the profile ranks them.
    fair = (view.total + 1) / (len(view.snapshot.routable) or 1)
    primary_i = 0
    for i, p in enumerate(ordered):
        if p.ramp >= 1.0 or started[p.index] < p.ramp * fair + 1.0:
            primary_i = i
            break
    if primary_i:
        ordered.insert(0, ordered.pop(primary_i))
    out = ordered[:want]
    if len(out) < want:
        out = _fill(out, mp.routable, want, rng)
    if len(out) < want and mp.draining:
        # Draining pods: never a primary while others exist, but a last-resort fallback.
        out = _fill(out, mp.draining, want, rng)
    warm = mp.warm
    if len(out) > 1 and warm and all(p.metrics is None for p in out):
        # Every entry is a pod the router has never seen answer (new, cold). If they are all
        # dead on arrival (197 unstarted pods added to a 3-pod fleet), Envoy's retries would
        # walk only dead pods: the last fallback is always one that answered recently.
        out[-1] = warm[rng.randrange(len(warm))]
    i = out[0].index
    view.picks[i] += 1
    started[i] += 1
    view.total += 1
    return Decision(tuple(out), used, degraded)


class Rejected(Exception):
    """The request cannot be served as asked: answer the client with `error`."""

    def __init__(self, error: ClientError, outcome: str) -> None:
        super().__init__(error.code)
        self.error = error
        self.outcome = outcome  # decision-counter label: "bad_request" or "unknown_model"


def pool_for(ctx: RequestContext, view: PoolView) -> ModelPool:
    """The pods this request may go to (the model stage, before sampling).

    - No model named: a single-model pool serves it; a multi-model pool cannot guess (400),
      except for requests without a body (GET), which any pod answers.
    - A model some routable pod serves: those pods, and only those, for primary and fallbacks.
    - A model no pod is known to serve: pods nothing is known about yet (no model list from
      discovery, metrics or /v1/models) may serve it, so they get it; when every pod's list is
      known, it is a 404 as vLLM would answer.
    """
    assert view.all is not None  # set by make_view / PoolView
    model = ctx.model
    if model is None:
        hdr = ctx.model_header
        if hdr is None or not view.snapshot.multi_model:
            return view.all
        if hdr == MODEL_NOT_JSON:
            raise Rejected(INVALID_BODY, "bad_request")
        raise Rejected(MODEL_REQUIRED, "bad_request")
    mp = view.by_model.get(model)
    if mp is not None:
        return mp
    if view.unknown is not None:
        return view.unknown
    if not view.by_model:
        return view.all  # nothing in the pool says what it serves: do not guess a 404
    raise Rejected(model_not_found(model), "unknown_model")


def _hinted(
    ctx: RequestContext, view: PoolView, mp: ModelPool, plan: Plan, room: int
) -> list[PodStatus]:
    """The pods the scorers name (the pod holding this prompt's prefix, the session's pod), in
    scorer order, at most `room`: a uniform sample of 16 out of 1,000 pods would miss them."""
    out: list[PodStatus] = []
    have: set[int] = set()
    members = mp.members
    for sc, state in plan.hinters:
        for p in sc.hint(ctx, view, state):
            i = p.index
            if i in members and i not in have:
                have.add(i)
                out.append(p)
                if len(out) >= room:
                    return out
    return out


def _window(order: list[PodStatus], k: int, rng: random.Random) -> list[PodStatus]:
    """`k` consecutive entries of the per-snapshot shuffled order from a random offset
    (wrapping): uniform enough, O(k), and the random start also randomises the order ties
    are met in. The whole order (rotated) when it has at most `k`."""
    n = len(order)
    start = int(rng.random() * n) % n
    if n <= k:
        return order[start:] + order[:start]
    if start + k <= n:
        return order[start : start + k]
    return order[start:] + order[: start + k - n]


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


class Profile:
    """A named, compiled profile: its plugins plus the pipeline that runs them."""

    def __init__(
        self,
        name: str,
        spec: ProfileSpec,
        cfg: RoutingSection,
        scorer_pool: dict[tuple[str, str], Scorer[Any]] | None = None,
    ) -> None:
        self.name = name
        self.degraded_name = f"{name}>random"
        self.want = 1 + cfg.fallbacks
        self.sample_size = cfg.sample_size
        self.filters: tuple[Filter, ...] = tuple(
            _as(Filter, registry.build("filter", f.name, f.params)) for f in spec.filters
        )
        pool = scorer_pool if scorer_pool is not None else {}
        scorers: list[tuple[Scorer[Any], float]] = []
        for s in spec.scorers:
            # Scorers keep no state of their own: profiles share an instance per (name,
            # params), so its per-snapshot prepare runs once however many profiles use it.
            key = (s.name, repr(sorted(s.params.items())))
            sc = pool.get(key)
            if sc is None:
                sc = pool[key] = _as(Scorer, registry.build("scorer", s.name, s.params))
            scorers.append((sc, s.weight))
        self.scorers = tuple(scorers)
        pick = spec.picker
        self.picker: Picker = _as(
            Picker,
            registry.build("picker", pick.name, pick.params)
            if pick
            else registry.build("picker", "max-score", {}),
        )
        self.samples = bool(self.filters or self.scorers)
        plugins = [*self.filters, *(s for s, _ in self.scorers), self.picker]
        self.reads_body = any(p.reads_body for p in plugins)
        # How the body is hashed: the parameters of its (first) body-reading plugin.
        self.body_params = next(
            (
                (p.params.block_chars, p.params.max_blocks)
                for p in plugins
                if p.reads_body and hasattr(p.params, "block_chars")
            ),
            (256, 128),
        )
        self.pick_hooks = tuple(p for p in plugins if overrides(p, "on_pick"))
        self.completion_hooks = tuple(p for p in plugins if overrides(p, "on_completion"))
        self.placement_hooks = tuple(p for p in plugins if overrides(p, "on_placement"))
        self._errors_logged: set[str] = set()  # shared with forks: log a plugin error once
        self.bind(None)

    def bind(self, stats: HotPathStats | None) -> None:
        """Where the per-plugin costs go (None: nowhere, for Explain's private copies)."""

        def cost(plugin: str, phase: str) -> PluginCost:
            return stats.plugin_cost(plugin, phase) if stats is not None else PluginCost()

        if stats is not None:
            for p in (*self.filters, *(s for s, _ in self.scorers), self.picker):
                p.bind_stats(stats)

        self._filter_costs = tuple(cost(f.name, "filter") for f in self.filters)
        self._score_costs = {id(s): cost(s.name, "score") for s, _ in self.scorers}
        self._prepare_costs = {id(s): cost(s.name, "prepare") for s, _ in self.scorers}
        self._pick_cost = cost(self.picker.name, "pick")

    def fork(self) -> Profile:
        """A private copy for Explain: its own picker and filters (a round-robin cursor must
        not move), no cost accounting; scorers are shared (stateless)."""
        other = copy.copy(self)
        other.filters = tuple(copy.copy(f) for f in self.filters)
        other.picker = copy.copy(self.picker)
        other.pick_hooks = ()  # Explain must not teach a prefix index a placement it never made
        other.bind(None)
        other._next_timed = -1
        return other

    # --- publish time ---------------------------------------------------------------------
    def plan(self, view: PoolView) -> Plan:
        """Prepare this profile's scorers for the view's snapshot (once per scorer instance
        and snapshot) and decide which can judge it. Off the hot path."""
        active = []
        abstained = []
        for sc, w in self.scorers:
            prep = view.prepared.get(id(sc))
            if prep is None:
                t0 = _pc()
                prep = view.prepared[id(sc)] = sc.prepare(view.snapshot)
                self._prepare_costs[id(sc)].observe(_pc() - t0)
            if prep.abstain:
                abstained.append((sc.name, prep.abstain))
            else:
                active.append((sc, prep.state, w, self._score_costs[id(sc)]))
        degraded = ""
        if self.scorers and not active:
            degraded = "+".join(dict.fromkeys(why for _, why in abstained))
        ranked = None
        if len(active) == 1 and self.picker.order_only and overrides(active[0][0], "rank", Scorer):
            # One scorer: a positive weight cannot change the order, and an order-only picker
            # needs nothing else. Same answer as scoring, less work per request.
            sc, state, _w, cost = active[0]
            ranked = (sc, state, cost)
        hinters = tuple((sc, st) for sc, st, _w, _c in active if overrides(sc, "hint", Scorer))
        plan = Plan(tuple(active), degraded, tuple(abstained), ranked, hinters)
        view.plans[self.name] = plan
        return plan

    # --- per request ------------------------------------------------------------------------
    def decide(
        self,
        ctx: RequestContext,
        view: PoolView,
        rng: random.Random,
        trace: Trace | None = None,
    ) -> Decision:
        mp = pool_for(ctx, view)  # raises Rejected (400/404) for a model no pod serves
        pool: Sequence[PodStatus] = mp.routable
        want = self.want
        if not pool:
            pool = mp.draining  # nothing else left: draining pods beat a 503
            if not pool:
                raise NoPodError("no routable pod")
            if self.scorers:  # draining pods are never scored
                return self.degrade(view, mp, pool, rng, "only_draining")
        # Per-plugin cost: one decision in TIMED_EVERY is timed, so the clock reads and
        # histogram updates stay off most requests (the decision histogram times them all).
        self._tick = tick = self._tick + 1
        timed = tick == self._next_timed
        if timed:
            self._next_timed = tick + TIMED_EVERY
        phase = "pick"
        ranked = None
        try:
            if not self.samples:
                if timed:
                    t0 = _pc()
                ordered = self.picker.pick(ctx, view, pool, None, rng, want)
                if timed:
                    self._pick_cost.observe(_pc() - t0)
                if trace is not None:
                    trace.candidates = list(pool)
                if self.pick_hooks:
                    return self._done(ctx, view, mp, ordered, rng)
                return finish(view, mp, ordered, rng, want, self.name)
            plan = view.plans.get(self.name) or self.plan(view)
            if trace is not None:
                trace.abstained = list(plan.abstained)
            if plan.degraded:
                return self.degrade(view, mp, pool, rng, plan.degraded)
            # The sample, at most sample_size candidates: the pods the scorers name (up to
            # half of it) and a uniform window of the shuffled order for the rest.
            order = mp.order
            k = self.sample_size
            cands: Sequence[PodStatus]
            if len(order) <= k:
                cands = _window(order, k, rng)
            elif plan.hinters and (hinted := _hinted(ctx, view, mp, plan, max(1, k // 2))):
                have = {p.index for p in hinted}
                window = _window(order, k - len(hinted), rng)
                cands = hinted + [p for p in window if p.index not in have]
            else:
                cands = _window(order, k, rng)
            if trace is not None:
                trace.candidates = list(cands)
            if self.filters:
                phase = "filter"
                cands = self._filter(ctx, view, cands, timed, trace)
            phase = "score"
            ranked = plan.ranked
            if ranked is not None:
                sc, state, cost = ranked
                if timed:
                    t0 = _pc()
                keys = sc.rank(ctx, view, state, cands)
                if timed:
                    cost.observe(_pc() - t0)
                if keys is None:
                    return self.degrade(view, mp, pool, rng, "scorers_abstained")
                if trace is not None:
                    self._score(ctx, view, plan, cands, False, trace)  # what Explain shows
                phase = "pick"
                if timed:
                    t0 = _pc()
                ordered = self.picker.pick_ranked(ctx, view, cands, keys, rng, want)
                if timed:
                    self._pick_cost.observe(_pc() - t0)
                if self.pick_hooks:
                    return self._done(ctx, view, mp, ordered, rng)
                return finish(view, mp, ordered, rng, want, self.name)
            scores: list[float] | None = None
            if plan.scorers:
                scores = self._score(ctx, view, plan, cands, timed, trace)
                if scores is None:
                    return self.degrade(view, mp, pool, rng, "scorers_abstained")
            phase = "pick"
            if timed:
                t0 = _pc()
            ordered = self.picker.pick(ctx, view, cands, scores, rng, want)
            if timed:
                self._pick_cost.observe(_pc() - t0)
        except Exception:
            if phase == "pick":
                failed = self.picker.name
            elif self._failed:
                failed = self._failed
            else:  # the scorer fast path: its one scorer
                failed = ranked[0].name if ranked is not None else "?"
            self._failed = ""
            self._log_error(phase, failed)
            return self.degrade(view, mp, pool, rng, f"{phase}_error")
        if self.pick_hooks:
            return self._done(ctx, view, mp, ordered, rng)
        return finish(view, mp, ordered, rng, want, self.name)

    _tick = 0
    _next_timed = TIMED_EVERY  # -1 in Explain's copies: what Explain costs is not the hot path's
    _failed = ""  # the plugin running when one raised

    def _log_error(self, phase: str, plugin: str) -> None:
        key = f"{phase}:{plugin}"
        if key not in self._errors_logged:
            self._errors_logged.add(key)
            log.exception(
                "profile %s: %s %s raised; such decisions degrade to random (logged once per "
                "profile and plugin)",
                self.name,
                _ROLE[phase],
                plugin,
            )

    def _filter(
        self,
        ctx: RequestContext,
        view: PoolView,
        cands: Sequence[PodStatus],
        timed: bool,
        trace: Trace | None,
    ) -> Sequence[PodStatus]:
        for f, cost in zip(self.filters, self._filter_costs, strict=True):
            self._failed = f.name
            if timed:
                t0 = _pc()
            kept = f.filter(ctx, view, cands)
            if timed:
                cost.observe(_pc() - t0)
            if not kept:
                if trace is not None:
                    trace.ignored_filters.append(f.name)
                continue  # a filter narrows the choice, never empties it
            if trace is not None:
                left = {p.index for p in kept}
                trace.removed += [(f.name, p) for p in cands if p.index not in left]
                trace.candidates = list(kept)
            cands = kept
        self._failed = ""
        return cands

    def _score(
        self,
        ctx: RequestContext,
        view: PoolView,
        plan: Plan,
        cands: Sequence[PodStatus],
        timed: bool,
        trace: Trace | None,
    ) -> list[float] | None:
        """Sum of weight x score per candidate; None when every scorer abstained for all."""
        totals: list[float] | None = None
        partial = False
        for sc, state, w, cost in plan.scorers:
            self._failed = sc.name
            if timed:
                t0 = _pc()
            s = sc.score(ctx, view, state, cands)
            if timed:
                cost.observe(_pc() - t0)
            if trace is not None:
                trace.scores.append((sc.name, w, s))
            if s is None:
                continue
            if len(s) != len(cands):
                raise ValueError(f"scorer {sc.name} returned {len(s)} scores for {len(cands)}")
            if sc.partial:
                partial = True
                js = [UNJUDGED if x is None else w * x for x in s]
                if totals is None:
                    totals = js
                else:  # a pod no scorer judged stays UNJUDGED, below every judged one
                    totals = [
                        x if t == UNJUDGED else t if x == UNJUDGED else t + x
                        for t, x in zip(totals, js, strict=True)
                    ]
                continue
            ws: Sequence[float] = s  # type: ignore[assignment]  # partial=False: no None
            if totals is None:
                totals = list(ws) if w == 1.0 else [w * x for x in ws]
            elif partial:
                totals = [
                    w * x if t == UNJUDGED else t + w * x for t, x in zip(totals, ws, strict=True)
                ]
            else:
                totals = [t + w * x for t, x in zip(totals, ws, strict=True)]
        self._failed = ""
        if partial and totals is not None and max(totals) == UNJUDGED:
            totals = None  # every scorer abstained for every candidate, pod by pod
        if trace is not None:
            trace.totals = totals
        return totals

    def _done(
        self,
        ctx: RequestContext,
        view: PoolView,
        mp: ModelPool,
        ordered: list[PodStatus],
        rng: random.Random,
    ) -> Decision:
        d = finish(view, mp, ordered, rng, self.want, self.name)
        for h in self.pick_hooks:
            h.on_pick(ctx, view, d)
        return d

    def degrade(
        self,
        view: PoolView,
        mp: ModelPool,
        pool: Sequence[PodStatus],
        rng: random.Random,
        why: str,
    ) -> Decision:
        """Random over `pool`, reported as NAME>random with the reason."""
        ordered = rng.sample(pool, min(len(pool), self.want + 2))
        return finish(view, mp, ordered, rng, self.want, self.degraded_name, why)


def _as(cls: type[Any], plugin: object) -> Any:
    if not isinstance(plugin, cls):  # the registry checked the kind; this is for mypy
        raise TypeError(f"{plugin!r} is not a {cls.__name__}")
    return plugin
