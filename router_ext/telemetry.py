"""router-ext's own Prometheus metrics.

Two kinds, on purpose:
- Hot-path counts (decisions, decision latency, picks per pod) are plain Python ints bumped by
  the ext_proc handler and turned into metric families only when Prometheus scrapes us, by a
  custom collector. prometheus_client's Counter/Histogram take a mutex on every `inc()`; the
  hot path takes no lock, so it does not use them.
- Everything else (scrape results, pod states, health) changes once per scrape round or state
  change and uses ordinary prometheus_client metrics.

Pod labels only ever come from discovery (bounded), never from request input.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from router_ext.snapshot import PodState, ScrapeResult, Snapshot

PREFIX = "router_ext"

#: Decision latency buckets (seconds): 10 µs .. 50 ms.
DECISION_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 50e-3
)  # fmt: skip

OUTCOMES = ("picked", "degraded", "no_pod", "bad_request", "not_ready", "saturated")

#: Fallback-list length buckets (entries after the primary; config caps it at 16). A list
#: shorter than `routing.fallbacks` means the pool is too small to fail over as configured.
FALLBACK_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)


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


class _HotPathCollector(Collector):
    def __init__(self, stats: HotPathStats, labels: Callable[[], dict[str, str]]) -> None:
        self.stats = stats
        self.labels = labels  # address -> pod label (from discovery)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self.stats
        names = self.labels()
        c = CounterMetricFamily(
            f"{PREFIX}_decisions",
            "Routing decisions by strategy actually used and outcome.",
            labels=["strategy", "outcome"],
        )
        for (strat, outcome), n in sorted(s.decisions.items()):
            c.add_metric([strat, outcome], n)
        yield c
        d = CounterMetricFamily(
            f"{PREFIX}_degraded_decisions",
            "Decisions where the requested metric strategy fell back, by reason.",
            labels=["strategy", "reason"],
        )
        for (strat, reason), n in sorted(s.degraded.items()):
            d.add_metric([strat, reason], n)
        yield d
        h = HistogramMetricFamily(
            f"{PREFIX}_decision_duration_seconds",
            "Time from request headers received to answer built (strategy + encoding).",
        )
        acc = 0
        buckets = []
        for bound, n in zip((*DECISION_BUCKETS, float("inf")), s.latency_buckets, strict=True):
            acc += n
            buckets.append((_fmt(bound), acc))
        h.add_metric([], buckets, s.latency_sum)
        yield h
        p = CounterMetricFamily(
            f"{PREFIX}_pod_picks", "Primary picks per pod.", labels=["pod", "address"]
        )
        for addr, n in sorted(s.picks.items()):
            p.add_metric([names.get(addr, addr), addr], n)
        yield p
        cp = CounterMetricFamily(
            f"{PREFIX}_cold_pod_requests",
            "Primary picks that went to a pod in the cold state (no metrics yet).",
            labels=["pod"],
        )
        for addr, n in sorted(s.cold_picks.items()):
            cp.add_metric([names.get(addr, addr)], n)
        yield cp
        yield CounterMetricFamily(
            f"{PREFIX}_client_target_header",
            "Requests that reached the router still carrying a client-sent x-target-pod "
            "(Envoy should strip it; the router overwrites it anyway).",
            value=s.client_target_header,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_fallback_entries",
            "Sum of fallback entries sent (divide by decisions for the mean list length).",
            value=s.fallback_len_sum,
        )
        fh = HistogramMetricFamily(
            f"{PREFIX}_fallback_list_length",
            "Fallback entries per routed answer (after the primary).",
        )
        acc = 0
        fb = []
        for bound, n in zip((*FALLBACK_BUCKETS, float("inf")), s.fallback_len_buckets, strict=True):
            acc += n
            fb.append((_fmt(float(bound)), acc))
        fh.add_metric([], fb, float(s.fallback_len_sum if s.fallback_len_count else 0))
        yield fh
        yield GaugeMetricFamily(
            f"{PREFIX}_ext_proc_streams_open", "ext_proc streams open now.", value=s.streams_open
        )
        yield CounterMetricFamily(
            f"{PREFIX}_ext_proc_streams", "ext_proc streams opened.", value=s.streams_total
        )


def _fmt(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)


class Telemetry:
    """All router metrics, on one registry (one per router instance; tests may run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hot = HotPathStats()
        self._pod_labels: dict[str, str] = {}
        self.registry.register(_HotPathCollector(self.hot, lambda: self._pod_labels))
        r = self.registry
        self.scrape_duration = Histogram(
            f"{PREFIX}_scrape_duration_seconds",
            "Fetch+parse time of one pod's /metrics.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.scrape_round_duration = Histogram(
            f"{PREFIX}_scrape_round_duration_seconds",
            "Wall time of one scrape round over the whole pool.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.scrape_errors = Counter(
            f"{PREFIX}_scrape_errors",
            "Failed scrapes by pod and reason (refused, reset, timeout, http_500, parse, ...).",
            ["pod", "reason"],
            registry=r,
        )
        self.pods_by_state = Gauge(
            f"{PREFIX}_pods", "Pods per lifecycle state.", ["state"], registry=r
        )
        self.pod_state = Gauge(
            f"{PREFIX}_pod_state",
            "1 for the state each pod is in now (one series per pod and state).",
            ["pod", "state"],
            registry=r,
        )
        self.metrics_age = Gauge(
            f"{PREFIX}_pod_metrics_age_seconds",
            "Age of each pod's last good metrics (absent while cold).",
            ["pod"],
            registry=r,
        )
        self.state_changes = Counter(
            f"{PREFIX}_pod_state_changes",
            "Pod state transitions.",
            ["from_state", "to_state"],
            registry=r,
        )
        self.coldstart = Histogram(
            f"{PREFIX}_pod_coldstart_duration_seconds",
            "Time from a pod turning Ready to its first good metrics.",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=r,
        )
        self.health = Gauge(
            f"{PREFIX}_health_serving",
            "1 while the router's gRPC health reports SERVING.",
            registry=r,
        )
        self.snapshot_version = Gauge(
            f"{PREFIX}_snapshot_version", "Version of the published snapshot.", registry=r
        )
        self.discovery_errors = Counter(
            f"{PREFIX}_discovery_errors", "Pods-file loads that failed.", registry=r
        )
        self.als_entries = Counter(
            f"{PREFIX}_access_log_entries",
            "Access-log entries received from Envoy.",
            registry=r,
        )
        self.als_unreachable = Counter(
            f"{PREFIX}_access_log_unreachable_marks",
            "Pods marked unreachable from Envoy access-log feedback.",
            ["pod"],
            registry=r,
        )

    def on_snapshot(self, snap: Snapshot, counts: dict[PodState, int]) -> None:
        self._pod_labels = {p.address: p.pod.label for p in snap.pods}
        self.snapshot_version.set(snap.version)
        for st, n in counts.items():
            self.pods_by_state.labels(st.value).set(n)
        now = time.monotonic()
        self.metrics_age.clear()
        self.pod_state.clear()
        for p in snap.pods:
            label = p.pod.label
            if p.metrics_at is not None:
                self.metrics_age.labels(label).set(max(0.0, now - p.metrics_at))
            self.pod_state.labels(label, p.state.value).set(1)
            # Create the per-pod counter at 0 before its first mark: Prometheus cannot see
            # the increase of a series whose first sample is already 1.
            self.als_unreachable.labels(label)

    def on_scrape_round(self, results: Sequence[ScrapeResult], wall_s: float) -> None:
        self.scrape_round_duration.observe(wall_s)
        for r in results:
            self.scrape_duration.observe(r.duration_s)
            if not r.ok:
                self.scrape_errors.labels(
                    self._pod_labels.get(r.address, r.address), r.reason
                ).inc()

    def on_state_change(self, old: PodState, new: PodState) -> None:
        self.state_changes.labels(old.value, new.value).inc()
