"""The decision path's own counters: plain numbers the hot path bumps without a lock.

The ext_proc handler runs on one event loop, so plain ints are safe; prometheus_client's
Counter/Histogram take a mutex per `inc()`. The app layer's telemetry turns these into metric
families only when Prometheus scrapes (router_ext.app.telemetry). They live here, with the
router, so routing never imports the app layer.
"""

from __future__ import annotations

import bisect
from collections.abc import Container

from router_ext.fleet.histogram import PlainHistogram

#: Decision latency buckets (seconds): 10 µs .. 50 ms.
DECISION_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 50e-3
)  # fmt: skip

OUTCOMES = (
    "picked",
    "degraded",
    "no_pod",
    "bad_request",
    "unknown_model",
    "not_ready",
    "saturated",
)

#: Why a body-reading profile routed a request from its headers alone (no body read, or a
#: body that gave no prompt): router_ext_body_skipped_total{reason}.
BODY_SKIP_REASONS = (
    "not_completion_path",
    "no_length",  # chunked upload: the size is unknown until it has arrived
    "too_large",
    "encoded",  # content-encoding (gzip...): the router does not inflate bodies
    "not_json",
    "not_object",
    "bad_messages",
    "empty_prompt",
)

#: Fallback-list length buckets (entries after the primary; config caps it at 16). A list
#: shorter than `routing.fallbacks` means the pool is too small to fail over as configured.
FALLBACK_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)

#: Per-plugin cost buckets (seconds): 1 µs .. 10 ms. A scorer runs on at most
#: routing.sample_size pods, so its cost sits at the bottom; prepare (whole pool) higher.
PLUGIN_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 2.5e-3, 10e-3
)  # fmt: skip


class PluginCost(PlainHistogram):
    """One (plugin, phase) histogram. The pipeline holds a reference, so an observation is a
    bisect and three additions: no dict lookup, no lock."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(PLUGIN_BUCKETS)


class HotPathStats:
    """Lock-free counters for the ext_proc handler (single event loop, so plain ints are safe)."""

    def __init__(self) -> None:
        # (strategy_used, outcome) -> count; strategy_used is bounded by the strategy set.
        self.decisions: dict[tuple[str, str], int] = {}
        # (requested strategy, reason) -> count of degraded decisions.
        self.degraded: dict[tuple[str, str], int] = {}
        self.latency_buckets = [0] * (len(DECISION_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        # pod address -> primary picks; pod address -> picks while the pod was cold.
        self.picks: dict[str, int] = {}
        self.cold_picks: dict[str, int] = {}
        self.fallback_len_sum = 0
        self.fallback_len_buckets = [0] * (len(FALLBACK_BUCKETS) + 1)
        self.fallback_len_count = 0
        self.client_target_header = 0
        self.streams_open = 0
        self.streams_total = 0
        # (plugin, phase) -> cost; phase is prepare | filter | score | pick.
        self.plugin_costs: dict[tuple[str, str], PluginCost] = {}
        # (model, profile) -> decisions. Models are only those the pool serves (a request's
        # unknown model counts under outcome unknown_model, never as a label).
        self.by_model: dict[tuple[str, str], int] = {}
        self.body_reads = 0
        self.body_bytes = 0
        self.body_skipped: dict[str, int] = dict.fromkeys(BODY_SKIP_REASONS, 0)
        # Prefix blocks of routed prompts, and how many of them the chosen pod was predicted
        # to hold (router_ext_prefix_predicted_hit_ratio = matched / total).
        self.prefix_blocks = 0
        self.prefix_blocks_matched = 0

    def observe_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(DECISION_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def observe_fallbacks(self, n: int) -> None:
        """One answer sent `n` fallbacks (replaces `fallback_len_sum += n` on the hot path)."""
        self.fallback_len_buckets[bisect.bisect_left(FALLBACK_BUCKETS, n)] += 1
        self.fallback_len_sum += n
        self.fallback_len_count += 1

    def count(self, strategy: str, outcome: str) -> None:
        key = (strategy, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def plugin_cost(self, plugin: str, phase: str) -> PluginCost:
        """The histogram for (plugin, phase), created on first use (at start-up: the router
        binds every configured plugin before serving). Labels come from the registry and the
        config, never from a request."""
        return self.plugin_costs.setdefault((plugin, phase), PluginCost())

    def forget_pods(self, present: Container[str]) -> None:
        """Drop the per-pod series of pods no longer in discovery (called on publish): under
        pod churn they would otherwise grow without bound."""
        for series in (self.picks, self.cold_picks):
            for addr in [a for a in series if a not in present]:
                del series[addr]
