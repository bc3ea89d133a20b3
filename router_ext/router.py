"""The routing decision, independent of the transport (ext_proc adapter, admin explain, benches).

Hot path: `Router.route` reads one attribute (the current `PoolView`), calls a strategy and
counts the outcome in plain ints. `publish` is the only writer and swaps that attribute in one
assignment, so a request sees either the old pool or the new one, never a mix.
"""

from __future__ import annotations

import logging
import random
import time

from router_ext.config import RouterConfig
from router_ext.errors import NO_POD, SATURATED, ClientError, unknown_strategy
from router_ext.snapshot import EMPTY_SNAPSHOT, PodState, Snapshot
from router_ext.strategies import Decision, NoPodError, PoolView, build_strategies, make_view
from router_ext.telemetry import HotPathStats

log = logging.getLogger("router_ext.router")


class NotReady:
    """Marker: the router has no usable snapshot yet; let Envoy's own balancer decide."""


NOT_READY = NotReady()


class Router:
    def __init__(self, cfg: RouterConfig, stats: HotPathStats, seed: int | None = None) -> None:
        self.cfg = cfg
        self.stats = stats
        self.strategies = build_strategies(cfg.routing)
        self.default_strategy = cfg.routing.default_strategy
        self.view = PoolView(EMPTY_SNAPSHOT)
        self.rng = random.Random(seed if seed is not None else cfg.routing.seed)
        self._degraded_state: dict[str, str] = {}  # strategy -> last degradation reason logged
        self._no_pod_logged = False

    @property
    def snapshot(self) -> Snapshot:
        return self.view.snapshot

    def publish(self, snap: Snapshot) -> None:
        # Built completely before the swap: the hot path sees the old view or the new one.
        self.view = make_view(snap, self.strategies, self.rng)

    def completed(self, address: str) -> None:
        """Envoy reported a request to `address` finished: it no longer adds load."""
        view = self.view
        i = view.snapshot.index_of.get(address)
        if i is not None and view.picks[i] > 0:
            view.picks[i] -= 1

    def route(self, requested: str | None) -> Decision | ClientError | NotReady:
        t0 = time.perf_counter()
        stats = self.stats
        name = requested or self.default_strategy
        strategy = self.strategies.get(name)
        if strategy is None:
            # The label is fixed: a request-chosen name must never become a label value.
            stats.count("invalid", "bad_request")
            return unknown_strategy(name)
        view = self.view
        snap = view.snapshot
        if not snap.ready:
            stats.count(name, "not_ready")
            return NOT_READY
        if snap.saturated:
            stats.count(name, "saturated")
            return SATURATED
        try:
            d = strategy.pick(view, self.rng)
        except NoPodError:
            stats.count(name, "no_pod")
            if not self._no_pod_logged:
                self._no_pod_logged = True
                log.error("no routable pod: answering 503 until a pod becomes available")
            return NO_POD
        if self._no_pod_logged:
            self._no_pod_logged = False
            log.info("routable pods available again")
        primary = d.pods[0]
        addr = primary.address
        stats.picks[addr] = stats.picks.get(addr, 0) + 1
        if primary.state is PodState.COLD:
            stats.cold_picks[addr] = stats.cold_picks.get(addr, 0) + 1
        stats.observe_fallbacks(len(d.pods) - 1)
        if d.degraded:
            stats.count(d.used, "degraded")
            key = (name, d.degraded)
            stats.degraded[key] = stats.degraded.get(key, 0) + 1
            if self._degraded_state.get(name) != d.degraded:
                self._degraded_state[name] = d.degraded
                log.warning(
                    "strategy %s degraded to random: %s (logged once until it changes)",
                    name,
                    d.degraded,
                )
        else:
            stats.count(d.used, "picked")
            if name in self._degraded_state:
                del self._degraded_state[name]
                log.info("strategy %s uses live metrics again", name)
        stats.observe_latency(time.perf_counter() - t0)
        return d
