"""Pod lifecycle: derives each pod's state from discovery, scrapes and Envoy feedback.

This is the one place states are decided (BACKGROUND §1B). It runs off the hot path (on each
scrape round, discovery change or access-log batch) and publishes an immutable `Snapshot`.
Every state change is logged once with its reason; nothing here logs per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from router_ext.config import RouterConfig
from router_ext.fleet.snapshot import (
    ROUTABLE_STATES,
    EngineMetrics,
    Pod,
    PodState,
    PodStatus,
    ScrapeResult,
    Snapshot,
    median_metrics,
)

log = logging.getLogger("router_ext.fleet.lifecycle")

#: Floor of the slow-start share, so a brand-new pod is never fully starved.
RAMP_FLOOR = 0.05


@dataclass
class _PodRecord:
    """Mutable per-pod bookkeeping, owned by the lifecycle (never read by the hot path)."""

    pod: Pod
    state: PodState = PodState.COLD
    reason: str = "discovered"
    metrics: EngineMetrics | None = None
    metrics_at: float | None = None
    last_error: str = ""
    last_reason: str = ""
    consecutive_timeouts: int = 0
    unreachable: bool = False
    unreachable_why: str = ""
    # Marked by Envoy's access log (not by our own scrape): counted for the share bound.
    feedback_marked: bool = False
    refuted_logged: bool = False
    # Last scrape-failure reason / page warning logged for this pod: once per pod and text.
    logged_failure: str = ""
    logged_warning: str = ""
    ready_since: float | None = None
    # First metrics after turning ready: for the cold-start histogram.
    coldstart_observed: bool = False
    # Slow start ends early once the pod is warm and keeping up.
    ramp_done: bool = False
    model_mismatch_logged: bool = False
    # The pod's last /v1/models listing. On the record, so it goes with the pod instance: a
    # pod that leaves discovery, or another pod at the same address, starts unlisted.
    listed_models: frozenset[str] | None = None
    listed_adapters: frozenset[str] = frozenset()
    adapter_parents: tuple[tuple[str, str], ...] = ()
    logged_models_failure: str = ""
    # (served, adapters) and the inputs they were derived from: rebuilt only when one of
    # them is another object (steady pods keep theirs across snapshots).
    served_inputs: tuple[object, ...] = ()
    served: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
    scraped_once: bool = False  # at least one scrape attempt finished (ok or not)
    warming: bool = False  # warm-up request in flight: not routable yet
    state_changes: int = 0
    history: list[tuple[float, PodState, str]] = field(default_factory=list)


StateListener = Callable[[Pod, PodState, PodState, str], None]


class PodLifecycle:
    """Holds pod records and builds snapshots. Single-threaded: called from the event loop."""

    def __init__(
        self,
        cfg: RouterConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self._records: dict[str, _PodRecord] = {}
        self._version = 0
        self.discovery_loaded = False
        self.rounds_done = 0
        # Latched: discovery loaded AND every ready pod scraped once (health turns SERVING).
        self.ready = False
        self._started_at = clock()
        self._listeners: list[StateListener] = []
        self.coldstart_listeners: list[Callable[[Pod, float], None]] = []
        #: Failed /v1/models fetches by reason token ("timeout", "http_500", "parse", ...),
        #: cumulative: what telemetry exports (a pod without the path, HTTP 404, is none).
        self.models_fetch_failures: dict[str, int] = {}

    # --- inputs --------------------------------------------------------------------------
    def on_state_change(self, fn: StateListener) -> None:
        self._listeners.append(fn)

    def apply_discovery(self, pods: Sequence[Pod]) -> None:
        now = self.clock()
        first = not self.discovery_loaded
        self.discovery_loaded = True
        new: dict[str, _PodRecord] = {}
        for pod in pods:
            rec = self._records.get(pod.address)
            if rec is not None and rec.pod.identity != pod.identity:
                log.info(
                    "pod %s (%s) replaced by %s at the same address: starting it cold",
                    rec.pod.label,
                    pod.address,
                    pod.label,
                )
                rec = None
            if rec is None:
                rec = _PodRecord(pod=pod)
                # Pods known at start-up are not slow-started: a router restart must not
                # throttle the whole fleet. Pods that appear later are.
                rec.ready_since = None if first else (now if pod.ready else None)
                rec.ramp_done = first
                rec.warming = pod.ready and not first and self.cfg.warmup.enabled
                rec.state, rec.reason = self.derive_state(rec, now)
                self._log_change(rec, None, rec.reason)
            else:
                if pod.ready and not rec.pod.ready:
                    rec.ready_since = now
                    rec.ramp_done = False
                    rec.coldstart_observed = False
                    rec.metrics = None
                    rec.metrics_at = None
                    rec.warming = self.cfg.warmup.enabled
                rec.pod = pod
            new[pod.address] = rec
        for addr, rec in self._records.items():
            if addr not in new:
                log.info("pod %s (%s) removed from discovery", rec.pod.label, addr)
        self._records = new
        self._rederive(now)

    def apply_scrape(self, results: Iterable[ScrapeResult]) -> None:
        now = self.clock()
        sc = self.cfg.scrape
        for r in results:
            rec = self._records.get(r.address)
            if rec is None:
                continue  # pod left discovery while we scraped it
            rec.scraped_once = True
            self._apply_listing(rec, r)
            if r.ok and r.metrics is not None:
                if rec.unreachable:
                    log.info("pod %s re-admitted: scrape succeeded", rec.pod.label)
                if rec.logged_failure:
                    log.info("pod %s metrics usable again", rec.pod.label)
                    rec.logged_failure = ""
                if r.warning and r.warning != rec.logged_warning:
                    rec.logged_warning = r.warning
                    log.warning(
                        "pod %s (%s) metrics repaired: %s (logged once per pod and text)",
                        rec.pod.label,
                        rec.pod.address,
                        r.warning,
                        extra={"pod": rec.pod.label, "reason": "metrics_repaired"},
                    )
                rec.unreachable = False
                rec.feedback_marked = False
                rec.refuted_logged = False
                rec.consecutive_timeouts = 0
                rec.metrics = r.metrics
                rec.metrics_at = r.fetched_at
                rec.last_error = ""
                rec.last_reason = ""
                self._check_model(rec, r.metrics)
                if not rec.coldstart_observed:
                    rec.coldstart_observed = True
                    if rec.ready_since is not None:
                        for fn in self.coldstart_listeners:
                            fn(rec.pod, max(0.0, r.fetched_at - rec.ready_since))
                continue
            rec.last_error = r.error
            rec.last_reason = r.reason
            self._log_scrape_failure(rec, r)
            if r.is_connection_failure:
                rec.unreachable = True
                rec.unreachable_why = f"scrape {r.reason}: {r.error}"
            elif r.reason == "timeout":
                rec.consecutive_timeouts += 1
                if rec.consecutive_timeouts >= sc.unreachable_after_timeouts:
                    rec.unreachable = True
                    rec.unreachable_why = f"{rec.consecutive_timeouts} consecutive scrape time-outs"
            # http_5xx / parse errors: the pod answers, its metrics are just unusable; it goes
            # stale (or stays cold) by age rather than being taken out of rotation.
        self.rounds_done += 1
        if self.discovery_loaded and not self.ready:
            self.ready = all(r.scraped_once for r in self._records.values() if r.pod.ready)
        self._rederive(now)

    def _apply_listing(self, rec: _PodRecord, r: ScrapeResult) -> None:
        """Keep the pod's /v1/models listing; count and explain (once per pod and reason) a
        failed fetch, which changes nothing else: the previous listing stays."""
        if r.identity and r.identity != rec.pod.identity:
            return  # fetched for the pod that had this address before
        if r.listed_models is not None:
            rec.listed_models = r.listed_models
            rec.listed_adapters = r.listed_adapters or frozenset()
            rec.adapter_parents = r.adapter_parents
            if rec.logged_models_failure:
                log.info("pod %s %s usable again", rec.pod.label, self.cfg.scrape.models_path)
                rec.logged_models_failure = ""
            return
        reason = r.models_reason
        if not reason:
            return
        self.models_fetch_failures[reason] = self.models_fetch_failures.get(reason, 0) + 1
        if reason != rec.logged_models_failure:
            rec.logged_models_failure = reason
            log.warning(
                "pod %s (%s) model list unusable (%s): %s; keeping its last listing (logged "
                "once per pod and reason)",
                rec.pod.label,
                rec.pod.address,
                reason,
                r.models_error,
                extra={"pod": rec.pod.label, "reason": f"models_{reason}"},
            )

    def _served(self, rec: _PodRecord) -> tuple[frozenset[str], frozenset[str]]:
        """(served, adapters) of one pod: see PodStatus.served."""
        m = rec.metrics
        inputs = (rec.pod, m, rec.listed_models, rec.listed_adapters)
        old = rec.served_inputs
        if len(old) == len(inputs) and all(a is b for a, b in zip(old, inputs, strict=True)):
            return rec.served
        adapters = rec.listed_adapters
        served = rec.pod.models | (rec.listed_models or frozenset()) | adapters
        if m is not None:
            adapters = adapters | m.lora_running | m.lora_waiting
            served = served | m.models | adapters
        rec.served_inputs = inputs
        rec.served = (served, adapters)
        return rec.served

    def needs_warmup(self, address: str) -> bool:
        rec = self._records.get(address)
        return rec is not None and rec.warming

    def warmup_done(self, address: str, ok: bool, detail: str) -> None:
        """The warm-up request finished: the pod may now take traffic (slow start from now).

        A failed warm-up admits the pod anyway: readiness comes from discovery, and a pod that
        really cannot serve is caught by scrapes, Envoy's health checks and feedback.
        """
        rec = self._records.get(address)
        if rec is None or not rec.warming:
            return
        rec.warming = False
        rec.ready_since = self.clock()
        lvl = logging.INFO if ok else logging.WARNING
        log.log(lvl, "pod %s warm-up %s: %s", rec.pod.label, "done" if ok else "failed", detail)
        self._rederive(self.clock())

    def _log_scrape_failure(self, rec: _PodRecord, r: ScrapeResult) -> None:
        """Explain a pod's unusable /metrics once per pod and reason.

        Connection failures and time-outs are logged by the state change they cause
        (-> unreachable). A pod that answers but whose page is unusable (HTTP 500, NaN only,
        garbage, over the size cap) changes no state while it is cold: without this line an
        operator would see a new pod that never warms up and no word why.
        """
        if r.is_connection_failure or r.reason == "timeout" or r.reason == rec.logged_failure:
            return
        rec.logged_failure = r.reason
        log.warning(
            "pod %s (%s) metrics unusable (%s): %s; state stays %s (logged once per pod and "
            "reason)",
            rec.pod.label,
            rec.pod.address,
            r.reason,
            r.error,
            rec.state.value,
            extra={"pod": rec.pod.label, "reason": r.reason},
        )

    def can_mark_unreachable(self, address: str) -> bool:
        rec = self._records.get(address)
        return rec is not None and not rec.unreachable

    def feedback_mark_needs_corroboration(self, address: str, max_share: float) -> bool:
        """Would marking `address` from feedback leave no routable pod, or leave more than
        `max_share` of the ready pods marked by feedback? Then feedback alone is not enough."""
        ready = [r for r in self._records.values() if r.pod.ready]
        routable_after = sum(
            1 for r in ready if r.state in ROUTABLE_STATES and r.pod.address != address
        )
        if routable_after == 0:
            return True
        marked_after = 1 + sum(1 for r in ready if r.feedback_marked and r.unreachable)
        return marked_after > max_share * len(ready)

    def note_refuted_feedback(self, address: str, why: str, detail: str) -> None:
        rec = self._records.get(address)
        if rec is None or rec.refuted_logged:
            return
        rec.refuted_logged = True
        log.warning(
            "ignored Envoy feedback on pod %s (%s): %s, but %s; it stays routable (logged once "
            "per pod until its next good scrape)",
            rec.pod.label,
            address,
            why,
            detail,
            extra={"pod": rec.pod.label, "reason": "feedback_refuted"},
        )

    def mark_unreachable(self, address: str, why: str, *, from_feedback: bool = False) -> bool:
        """Envoy saw a connect failure/reset to this pod: take it out now, not next scrape."""
        rec = self._records.get(address)
        if rec is None or rec.unreachable:
            return False
        rec.unreachable = True
        rec.unreachable_why = why
        rec.feedback_marked = from_feedback
        self._rederive(self.clock())
        return True

    # --- derivation ----------------------------------------------------------------------
    def derive_state(self, rec: _PodRecord, now: float) -> tuple[PodState, str]:
        """The single rule that maps facts to a state (order matters: first match wins)."""
        pod = rec.pod
        if not pod.ready:
            return PodState.NOT_READY, "discovery: not ready"
        if rec.warming:
            return PodState.NOT_READY, "warm-up request in flight"
        if pod.draining:
            return PodState.DRAINING, "discovery: draining"
        if rec.unreachable:
            return PodState.UNREACHABLE, rec.unreachable_why
        if rec.metrics is None or rec.metrics_at is None:
            why = f"no metrics yet ({rec.last_reason})" if rec.last_reason else "no metrics yet"
            return PodState.COLD, why
        age = now - rec.metrics_at
        if age > self.cfg.scrape.stale_after_s:
            why = f"metrics {age:.1f}s old"
            if rec.last_reason:
                why += f" (last scrape: {rec.last_reason})"
            return PodState.STALE, why
        return PodState.WARM, "fresh metrics"

    def _rederive(self, now: float) -> None:
        for rec in self._records.values():
            state, why = self.derive_state(rec, now)
            if state is not rec.state:
                old = rec.state
                rec.state = state
                rec.reason = why
                rec.state_changes += 1
                rec.history.append((now, state, why))
                del rec.history[:-20]
                self._log_change(rec, old, why)

    def _log_change(self, rec: _PodRecord, old: PodState | None, why: str) -> None:
        if old is None:
            log.info(
                "pod %s (%s) discovered: state %s (%s)",
                rec.pod.label,
                rec.pod.address,
                rec.state.value,
                why,
            )
            return
        lvl = logging.WARNING if rec.state is PodState.UNREACHABLE else logging.INFO
        log.log(
            lvl,
            "pod %s (%s) state %s -> %s: %s",
            rec.pod.label,
            rec.pod.address,
            old.value,
            rec.state.value,
            why,
            extra={
                "pod": rec.pod.label,
                "old_state": old.value,
                "new_state": rec.state.value,
                "reason": why,
            },
        )
        for fn in self._listeners:
            fn(rec.pod, old, rec.state, why)

    def _check_model(self, rec: _PodRecord, m: EngineMetrics) -> None:
        want = rec.pod.models
        if want and m.models and want.isdisjoint(m.models) and not rec.model_mismatch_logged:
            rec.model_mismatch_logged = True
            log.warning(
                "pod %s reports model(s) %s but discovery says %s; routing it for both",
                rec.pod.label,
                ",".join(sorted(m.models)),
                ",".join(sorted(want)),
            )

    def _ramp(self, rec: _PodRecord, now: float, median: EngineMetrics | None) -> float:
        window = self.cfg.routing.slow_start_s
        if rec.ramp_done or rec.ready_since is None or window <= 0:
            return 1.0
        frac = (now - rec.ready_since) / window
        if frac >= 1.0:
            rec.ramp_done = True
            return 1.0
        # "Until its metrics show it is keeping up": warm, carrying at least half the pool's
        # median load, and queueing no more than the pool. An idle-looking new pod does not
        # qualify (that is exactly the pod a metric strategy would flood).
        m = rec.metrics
        if (
            rec.state is PodState.WARM
            and m is not None
            and median is not None
            and m.running + m.waiting >= 0.5 * (median.running + median.waiting) > 0
            and m.waiting <= median.waiting
            and frac >= 0.5
        ):
            rec.ramp_done = True
            return 1.0
        return max(RAMP_FLOOR, frac)

    # --- output --------------------------------------------------------------------------
    def build_snapshot(self) -> Snapshot:
        now = self.clock()
        self._rederive(now)
        self._version += 1
        ready = self.ready
        statuses: list[PodStatus] = []
        recs = list(self._records.values())
        # The warm median feeds the cold/stale estimates and the slow-start check.
        median = median_metrics(
            [r.metrics for r in recs if r.state is PodState.WARM and r.metrics is not None]
        )
        for i, rec in enumerate(recs):
            served, adapters = self._served(rec)
            statuses.append(
                PodStatus(
                    pod=rec.pod,
                    state=rec.state,
                    index=i,
                    metrics=rec.metrics,
                    metrics_at=rec.metrics_at,
                    last_error=rec.last_error or (rec.unreachable_why if rec.unreachable else ""),
                    ready_since=rec.ready_since,
                    ramp=self._ramp(rec, now, median),
                    score_metrics=conservative_estimate(rec.state, rec.metrics, median),
                    served=served,
                    adapters=adapters,
                    adapter_parents=rec.adapter_parents,
                )
            )
        return Snapshot.build(
            self._version, now, tuple(statuses), ready, self.cfg.routing.saturation_queue
        )

    def state_counts(self) -> dict[PodState, int]:
        out = dict.fromkeys(PodState, 0)
        for rec in self._records.values():
            out[rec.state] += 1
        return out

    def records_view(self) -> list[tuple[Pod, PodState, str, int]]:
        """(pod, state, reason, number of state changes) for admin/status views."""
        return [(r.pod, r.state, r.reason, r.state_changes) for r in self._records.values()]


def conservative_estimate(
    state: PodState, last: EngineMetrics | None, median: EngineMetrics | None
) -> EngineMetrics | None:
    """What a metric strategy should believe about a pod's load.

    Warm: its live metrics. Cold (no metrics yet): the warm pool's median, so it neither
    looks idle (and wins every pick, AIBrix least-request / EPP #1497) nor unknown (and gets
    nothing): it competes as an average pod, and slow start caps its share on top. Stale: the
    worse of its last values and the median, so stale metrics that happen to look idle cannot
    attract a flood.
    """
    if state is PodState.WARM:
        return last
    if state not in (PodState.COLD, PodState.STALE):
        return None
    if median is None:
        return None
    if state is PodState.COLD or last is None:
        return median
    kv = (
        max(last.kv_cache_usage, median.kv_cache_usage)
        if last.kv_cache_usage is not None and median.kv_cache_usage is not None
        else (median.kv_cache_usage if median.kv_cache_usage is not None else last.kv_cache_usage)
    )
    # Load is pessimised; the pod's own facts (models, adapters, KV capacity, counters) are
    # kept: they were true at its last scrape and the median knows nothing about them.
    return EngineMetrics(
        running=max(last.running, median.running),
        waiting=max(last.waiting, median.waiting),
        kv_cache_usage=kv,
        ttft_p90_s=median.ttft_p90_s,
        engine=last.engine,
        models=last.models,
        num_engines=last.num_engines,
        lora_running=last.lora_running,
        lora_waiting=last.lora_waiting,
        max_lora=last.max_lora,
        cache_blocks=last.cache_blocks,
        block_size=last.block_size,
        prefix_hits=last.prefix_hits,
        prefix_queries=last.prefix_queries,
    )
