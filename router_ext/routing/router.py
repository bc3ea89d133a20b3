"""The routing decision, independent of the transport (ext_proc adapter, admin explain, benches).

Hot path: `Router.route` reads one attribute (the current `PoolView`), runs a profile's
pipeline (router_ext.routing.pipeline) and counts the outcome in plain ints. `publish` is the
only writer and swaps that attribute in one assignment, so a request sees either the old pool
or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from router_ext.config import RouterConfig
from router_ext.fleet.snapshot import EMPTY_SNAPSHOT, PodState, Snapshot
from router_ext.routing import (
    Decision,
    NoPodError,
    PoolView,
    Profile,
    RequestContext,
    Trace,
    build_profiles,
    make_view,
)
from router_ext.routing.errors import NO_POD, SATURATED, ClientError, unknown_strategy
from router_ext.routing.ledger import Ledger
from router_ext.routing.pipeline import Rejected
from router_ext.routing.prompt import BodySkip, PromptFacts, encode_prefix, read_body
from router_ext.routing.stats import HotPathStats

log = logging.getLogger("router_ext.routing.router")


class NotReady:
    """Marker: the router has no usable snapshot yet; let Envoy's own balancer decide."""


NOT_READY = NotReady()


class Router:
    def __init__(self, cfg: RouterConfig, stats: HotPathStats, seed: int | None = None) -> None:
        rc = cfg.routing
        self.cfg = cfg
        self.stats = stats
        self.profiles = build_profiles(rc)
        for p in self.profiles.values():
            p.bind(stats)
        self.default_strategy = rc.default_strategy
        #: What a request may ask for by header: the allowlist plus the default (asking for
        #: the default by name gets what not asking gets).
        self.selectable: dict[str, Profile] = {
            n: self.profiles[n] for n in (*rc.client_selectable, rc.default_strategy)
        }
        self._selectable_names = tuple(n for n in rc.client_selectable)
        self._completion_hooks = tuple(
            dict.fromkeys(h for p in self.profiles.values() for h in p.completion_hooks)
        )
        self._placement_hooks = tuple(
            dict.fromkeys(h for p in self.profiles.values() for h in p.placement_hooks)
        )
        #: Every replica's placements and completions, from Envoy's access log.
        self.ledger = Ledger(self.add_pick, self.completed, self.learn_placement)
        self.view = PoolView(EMPTY_SNAPSHOT)
        self.rng = random.Random(seed if seed is not None else rc.seed)
        self._models_cache: tuple[Snapshot, bytes] | None = None
        self._degraded_state: dict[str, str] = {}  # profile -> last degradation reason logged
        self._no_pod_logged = False

    @property
    def snapshot(self) -> Snapshot:
        return self.view.snapshot

    def publish(self, snap: Snapshot) -> None:
        # Built completely before the swap: the hot path sees the old view or the new one.
        view = make_view(snap, self.view, self.rng)
        for p in self.profiles.values():
            if p.samples:
                p.plan(view)
        self.view = view
        self.stats.forget_pods(snap.index_of)

    def wants_body(self, ctx: RequestContext) -> bool:
        """Whether the profile this request gets reads the prompt (hot path: a dict lookup)."""
        p = self.selectable.get(ctx.profile or self.default_strategy)
        return p is not None and p.reads_body

    def read_prompt(self, ctx: RequestContext, raw: bytes) -> PromptFacts | BodySkip:
        """Parse a body the profile asked for, with the hashing parameters of its prefix
        plugin. Bounded by routing.max_body_bytes (Envoy never sends a bigger one)."""
        p = self.selectable.get(ctx.profile or self.default_strategy)
        block_chars, max_blocks = p.body_params if p is not None else (256, 128)
        return read_body(raw, block_chars, max_blocks)

    def prefix_value(self, ctx: RequestContext) -> bytes:
        """PREFIX_HEADER for this request's answer: the chain its decision used, in the block
        size it was hashed with ("" without a prompt read)."""
        if not ctx.prefix_hashes:
            return b""
        p = self.selectable.get(ctx.profile or self.default_strategy)
        block_chars = p.body_params[0] if p is not None else 256
        return encode_prefix(block_chars, ctx.prefix_hashes)

    def models_body(self) -> bytes | None:
        """`GET /v1/models` from the snapshot: the union over routable pods, so one dead pod
        never breaks the listing. None (let a pod answer) while nothing is known."""
        snap = self.view.snapshot
        if not snap.ready or not snap.models:
            return None
        cached = self._models_cache
        if cached is not None and cached[0] is snap:
            return cached[1]
        created = int(time.time())
        data = [
            {
                "id": c.id,
                "object": "model",
                "created": created,
                "owned_by": "router-ext",
                "root": c.id,
                "parent": c.parent,
            }
            for c in snap.models
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        self._models_cache = (snap, body)
        return body

    def add_pick(self, address: str) -> None:
        """Another replica sent a request to `address`: load the metrics cannot show yet."""
        view = self.view
        i = view.snapshot.index_of.get(address)
        if i is not None:
            view.picks[i] += 1

    def learn_placement(self, address: str, block_chars: int, hashes: tuple[int, ...]) -> None:
        for h in self._placement_hooks:
            h.on_placement(address, block_chars, hashes)

    def completed(self, address: str) -> None:
        """Envoy reported a request to `address` finished: it no longer adds load."""
        view = self.view
        i = view.snapshot.index_of.get(address)
        if i is not None and view.picks[i] > 0:
            view.picks[i] -= 1
        for h in self._completion_hooks:
            h.on_completion(address)

    def route(
        self, ctx: RequestContext, dry: DryRun | None = None
    ) -> Decision | ClientError | NotReady:
        """The answer for one request, counted in the hot-path stats.

        With `dry`, the same decision over Explain's private copies (view, profiles, random
        generator), counting nothing: one function, so Explain can never disagree with the
        hot path about which checks come first.
        """
        t0 = time.perf_counter()
        profiles: Mapping[str, Profile]
        if dry is None:
            view = self.view
            rng = self.rng
            profiles = self.selectable
            trace = None
        else:
            view = dry.view
            rng = dry.rng
            profiles = dry.profiles
            trace = dry.trace
        stats = self.stats
        name = ctx.profile or self.default_strategy
        profile = profiles.get(name)
        if profile is None:
            if dry is None:
                # The label is fixed: a request-chosen name must never become a label value.
                stats.count("invalid", "bad_request")
            return unknown_strategy(name, self._selectable_names)
        snap = view.snapshot
        if not snap.ready:
            if dry is None:
                stats.count(name, "not_ready")
            return NOT_READY
        if snap.saturated:
            if dry is None:
                stats.count(name, "saturated")
            return SATURATED
        try:
            d = profile.decide(ctx, view, rng, trace)
        except Rejected as r:
            if dry is None:
                stats.count(name, r.outcome)
            return r.error
        except NoPodError:
            if dry is None:
                stats.count(name, "no_pod")
                if not self._no_pod_logged:
                    self._no_pod_logged = True
                    log.error("no routable pod: answering 503 until a pod becomes available")
            return NO_POD
        if dry is not None:
            return d
        if self._no_pod_logged:
            self._no_pod_logged = False
            log.info("routable pods available again")
        primary = d.pods[0]
        addr = primary.address
        if ctx.request_id:
            self.ledger.decided(ctx.request_id, addr)
        stats.picks[addr] = stats.picks.get(addr, 0) + 1
        if primary.state is PodState.COLD:
            stats.cold_picks[addr] = stats.cold_picks.get(addr, 0) + 1
        stats.observe_fallbacks(len(d.pods) - 1)
        if d.degraded:
            stats.count(d.used, "degraded")
            key = (name, d.degraded)
            stats.degraded[key] = stats.degraded.get(key, 0) + 1
            if d.degraded.endswith("_error"):
                pass  # a plugin error: logged once by the pipeline, not a state to toggle
            elif self._degraded_state.get(name) != d.degraded:
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
        model = ctx.model
        if model is not None and model in view.by_model:
            key2 = (model, name)
            stats.by_model[key2] = stats.by_model.get(key2, 0) + 1
        stats.observe_latency(time.perf_counter() - t0)
        return d


@dataclass(slots=True)
class DryRun:
    """Private copies for a decision that must change nothing (admin Explain)."""

    view: PoolView
    rng: random.Random
    profiles: Mapping[str, Profile]
    trace: Trace | None = None
