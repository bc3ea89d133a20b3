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

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from router_ext.envoy_adapter.xds import EdsStats
from router_ext.fleet.feedback import CUT_REASONS, REJECT_REASONS
from router_ext.fleet.histogram import PlainHistogram
from router_ext.fleet.snapshot import PodState, ScrapeResult, Snapshot
from router_ext.routing.ledger import Ignored, Ledger, Origin
from router_ext.routing.stats import (
    DECISION_BUCKETS,
    FALLBACK_BUCKETS,
    HotPathStats,
)

PREFIX = "router_ext"


class _PodCollector(Collector):
    """`router_ext_pod_state` and `router_ext_pod_metrics_age_seconds`, from the snapshot."""

    def __init__(self, snap: Callable[[], Snapshot | None]) -> None:
        self._snap = snap

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily(
            f"{PREFIX}_pod_state",
            "1 for the state each pod is in now (one series per pod and state).",
            labels=["pod", "state"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_pod_metrics_age_seconds",
            "Age of each pod's last good metrics (absent while cold).",
            labels=["pod"],
        )
        hit = GaugeMetricFamily(
            f"{PREFIX}_pod_prefix_cache_hit_ratio",
            "Each pod's achieved prefix-cache hit ratio since it started "
            "(vllm:prefix_cache_hits_total / queries_total, tokens), where it exports them.",
            labels=["pod"],
        )
        fleet = GaugeMetricFamily(
            f"{PREFIX}_fleet_prefix_cache_hit_ratio",
            "Achieved prefix-cache hit ratio over the routable pods (sum of hits / sum of "
            "queries since each started).",
        )
        snap = self._snap()
        hits = queries = 0.0
        if snap is not None:
            now = time.monotonic()
            for p in snap.pods:
                label = p.pod.label
                state.add_metric([label, p.state.value], 1.0)
                if p.metrics_at is not None:
                    age.add_metric([label], max(0.0, now - p.metrics_at))
                m = p.metrics
                if m is not None and m.prefix_queries:
                    h = m.prefix_hits or 0.0
                    hit.add_metric([label], min(1.0, h / m.prefix_queries))
                    hits += h
                    queries += m.prefix_queries
        if queries:
            fleet.add_metric([], min(1.0, hits / queries))
        yield state
        yield age
        yield hit
        yield fleet


class _HotPathCollector(Collector):
    def __init__(self, stats: HotPathStats, labels: Callable[[], dict[str, str]]) -> None:
        self.stats = stats
        self.labels = labels  # address -> pod label (from discovery)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self.stats
        names = self.labels()
        yield _labelled(
            "decisions",
            "Routing decisions by strategy actually used and outcome.",
            ["strategy", "outcome"],
            s.decisions,
        )
        yield _labelled(
            "degraded_decisions",
            "Decisions where the requested metric strategy fell back, by reason.",
            ["strategy", "reason"],
            s.degraded,
        )
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
        ph = HistogramMetricFamily(
            f"{PREFIX}_plugin_duration_seconds",
            "Time spent in each routing plugin, by phase: prepare (once per snapshot, off the "
            "hot path), filter, score, pick (per decision).",
            labels=["plugin", "phase"],
        )
        for (plugin, phase), cost in sorted(s.plugin_costs.items()):
            ph.add_metric([plugin, phase], _cumulative(cost), cost.sum)
        yield ph
        yield _labelled(
            "model_decisions",
            "Routed decisions by the model the request named (models the pool serves only) and "
            "the profile asked for.",
            ["model", "strategy"],
            s.by_model,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_body_reads",
            "Request bodies the router asked Envoy for and read (body-reading profiles only).",
            value=s.body_reads,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_body_read_bytes", "Bytes of the bodies read.", value=s.body_bytes
        )
        yield _labelled(
            "body_skipped",
            "Requests of a body-reading profile routed from headers alone, by reason "
            "(no_length: chunked upload; too_large: over routing.max_body_bytes; encoded: "
            "content-encoding; not_json, bad_messages, ...: a body that gave no prompt).",
            ["reason"],
            {(reason,): n for reason, n in s.body_skipped.items()},
        )
        yield CounterMetricFamily(
            f"{PREFIX}_prefix_routed_blocks",
            "Prompt blocks of requests routed by the prefix scorer (the denominator of the "
            "predicted hit ratio).",
            value=s.prefix_blocks,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_prefix_predicted_blocks",
            "Of those, blocks the chosen pod was predicted to hold: rate(predicted) / "
            "rate(routed) is the achievable hit ratio, to compare with the pods' achieved one "
            "(router_ext_pod_prefix_cache_hit_ratio).",
            value=s.prefix_blocks_matched,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_ext_proc_streams_open", "ext_proc streams open now.", value=s.streams_open
        )
        yield CounterMetricFamily(
            f"{PREFIX}_ext_proc_streams", "ext_proc streams opened.", value=s.streams_total
        )


class _FleetCollector(Collector):
    """Counts kept by the fleet and Envoy-adapter objects themselves, read at scrape time:
    /v1/models fetch failures (lifecycle) and the EDS server's streams (xds)."""

    def __init__(self) -> None:
        self.models_failures: Callable[[], dict[str, int]] = dict
        self.eds: Callable[[], EdsStats | None] = lambda: None
        self.ledger: Ledger | None = None
        self.pre_upstream: PlainHistogram | None = None

    def _ledger(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        led = self.ledger
        if led is None:
            return
        entries = {
            (kind, origin.value): led.entries.get((kind, origin), 0)
            for kind in ("placed", "ended")
            for origin in Origin
        }
        yield _labelled(
            "replication_entries",
            "Access-log entries matched to a decision, by kind (placed: the upstream stream "
            "was set up; ended) and origin (own: this replica decided; peer: another replica "
            "did, its pick is counted here too; unseen: ended, placement never received).",
            ["kind", "origin"],
            entries,
        )
        yield _labelled(
            "replication_ignored",
            "Access-log entries that changed nothing: duplicate, late (placed after its "
            "end), retry (a later attempt), no_request_id, bad_prefix.",
            ["reason"],
            {(why.value,): led.ignored.get(why, 0) for why in Ignored},
        )
        g = GaugeMetricFamily(
            f"{PREFIX}_replication_open",
            "Requests in flight this replica knows of, by whose decision.",
            labels=["origin"],
        )
        g.add_metric(["own"], len(led.own))
        g.add_metric(["peer"], len(led.peer))
        yield g

    def collect(
        self,
    ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield from self._ledger()
        if self.pre_upstream is not None:
            h = HistogramMetricFamily(
                f"{PREFIX}_envoy_pre_upstream_seconds",
                "Envoy's time from a request's start to its first byte sent upstream, from the "
                "access log (ext_proc exchanges, body buffering, upstream connect; with several "
                "replicas every replica counts every request). What routing costs a client, "
                "including the gRPC and scheduling time the decision histogram cannot see.",
            )
            h.add_metric([], _cumulative(self.pre_upstream), self.pre_upstream.sum)
            yield h
        mf = CounterMetricFamily(
            f"{PREFIX}_models_fetch_failures",
            "Failed GET /v1/models of pods, by reason (the last listing is kept).",
            labels=["reason"],
        )
        for reason, n in sorted(self.models_failures().items()):
            mf.add_metric([reason], n)
        yield mf
        eds = self.eds()
        if eds is None:
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_eds_streams_open",
            "Envoy EDS streams (gRPC) open now.",
            value=eds.streams_open,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_eds_responses", "EDS responses sent to Envoy.", value=eds.responses
        )
        yield CounterMetricFamily(
            f"{PREFIX}_eds_acks", "EDS versions Envoy accepted.", value=eds.acks
        )
        yield CounterMetricFamily(
            f"{PREFIX}_eds_nacks",
            "EDS versions Envoy rejected (logged once per version with Envoy's reason).",
            value=eds.nacks,
        )


_K = TypeVar("_K", bound=tuple[str, ...])


def _labelled(
    name: str, doc: str, labels: list[str], counts: Mapping[_K, int]
) -> CounterMetricFamily:
    """One counter family from a hot-path dict of label values -> count."""
    fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for key, n in sorted(counts.items()):
        fam.add_metric(list(key), n)
    return fam


def _cumulative(h: PlainHistogram) -> list[tuple[str, int]]:
    return [(_fmt(b), n) for b, n in h.cumulative()]


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
        # Per-pod state and metrics age are read from the current snapshot when Prometheus
        # scrapes, not set on every publish: at 2,000 pods that was ~6,000 label updates on the
        # serving loop per scrape round and per feedback mark. A pod that left discovery is
        # simply absent from the next scrape.
        self._snap: Snapshot | None = None
        r.register(_PodCollector(lambda: self._snap))
        #: Set by the server: where the fleet's own counts are read from.
        self.fleet = _FleetCollector()
        r.register(self.fleet)
        self._pod_error_reasons: dict[str, set[str]] = {}
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
            f"{PREFIX}_discovery_errors",
            "Discovery errors (a pods file that cannot be read or parsed), once per distinct "
            "error: the last good pod set stays in force meanwhile.",
            registry=r,
        )
        self.als_entries = Counter(
            f"{PREFIX}_access_log_entries",
            "Access-log entries received from Envoy.",
            registry=r,
        )
        self.streams_refused = Counter(
            f"{PREFIX}_grpc_streams_refused",
            "gRPC streams refused for a missing or wrong token, by service.",
            ["service"],
            registry=r,
        )
        self.feedback_corroborations = Counter(
            f"{PREFIX}_feedback_corroborations",
            "Feedback marks the router checked with its own connect attempt before acting "
            "(outcome: confirmed = pod down, marked; refuted = pod answered, mark ignored).",
            ["outcome"],
            registry=r,
        )
        self.als_unreachable = Counter(
            f"{PREFIX}_access_log_unreachable_marks",
            "Pods marked unreachable from Envoy access-log feedback.",
            ["pod"],
            registry=r,
        )
        # Streams cut after their 200 went out (pod crash mid-stream): Envoy cannot retry
        # them, so this is the only place they show. Labelled by reason only, never by pod
        # (a per-pod label would grow with every pod that ever crashed).
        self.streams_cut = Counter(
            f"{PREFIX}_streams_cut",
            "Responses whose headers reached the client but whose pod then reset or closed "
            "the stream (Envoy access log; not retryable).",
            ["reason"],
            registry=r,
        )
        self.als_rejected = Counter(
            f"{PREFIX}_access_log_entries_rejected",
            "Access-log entries ignored: stale (replayed), future, or naming an unknown pod.",
            ["reason"],
            registry=r,
        )
        # Every bounded label value exists from the start at 0, so the first increase is
        # visible to rate()/increase() and a dashboard shows 0 rather than "no data".
        for reason in CUT_REASONS:
            self.streams_cut.labels(reason)
        for reason in REJECT_REASONS:
            self.als_rejected.labels(reason)

    def on_stream_cut(self, reason: str) -> None:
        self.streams_cut.labels(reason).inc()

    def on_access_log_rejected(self, reason: str) -> None:
        self.als_rejected.labels(reason).inc()

    def on_snapshot(self, snap: Snapshot, counts: dict[PodState, int]) -> None:
        old_labels = set(self._pod_labels.values())
        self._pod_labels = {p.address: p.pod.label for p in snap.pods}
        self.snapshot_version.set(snap.version)
        for st, n in counts.items():
            self.pods_by_state.labels(st.value).set(n)
        self._snap = snap
        new_labels = set(self._pod_labels.values())
        for label in new_labels - old_labels:
            # Create the per-pod counter at 0 before its first mark: Prometheus cannot see
            # the increase of a series whose first sample is already 1.
            self.als_unreachable.labels(label)
        for label in old_labels - new_labels:
            # The pod left discovery: drop its series, so pod churn cannot grow the label set.
            with contextlib.suppress(KeyError):
                self.als_unreachable.remove(label)
            for reason in self._pod_error_reasons.pop(label, ()):
                with contextlib.suppress(KeyError):
                    self.scrape_errors.remove(label, reason)

    def on_scrape_round(self, results: Sequence[ScrapeResult], wall_s: float) -> None:
        self.scrape_round_duration.observe(wall_s)
        for r in results:
            self.scrape_duration.observe(r.duration_s)
            if not r.ok:
                label = self._pod_labels.get(r.address, r.address)
                self.scrape_errors.labels(label, r.reason).inc()
                self._pod_error_reasons.setdefault(label, set()).add(r.reason)

    def on_state_change(self, old: PodState, new: PodState) -> None:
        self.state_changes.labels(old.value, new.value).inc()
