"""Envoy's gRPC access-log stream as feedback: what really happened to each routed request.

The ext_proc stream closes right after our header answer (BACKGROUND §4), so it cannot tell
when a request ends or fails. Envoy's access-log service (envoy.service.accesslog.v3) can: one
entry per finished request with the upstream host, response flags, attempts and timings,
batched by Envoy (buffer_flush_interval). We use it to
  (a) mark a pod unreachable the moment Envoy fails to connect to it or is reset by it,
      without waiting for the next scrape (a later good scrape re-admits it);
  (b) hand each entry to the router's ledger (router_ext.routing.ledger), which ends the
      in-flight count of the decision it reports and, with several router replicas (each
      gets every entry), counts and learns the placements the other replicas made;
  (c) keep a gateway-side view of each pod's latency and error rate;
  (d) count streams cut after their response headers went out (a pod crash under streaming
      load): Envoy cannot retry those, so the client sees a truncated 200 and only this
      counter shows it. A cut also takes the pod out, like a reset: it is the first sign of
      a crash, before any connect to the pod has failed.
Entries are handled on their own gRPC stream; routing never waits for them.

Containment: anything that can reach the router's gRPC port can send entries. An entry can
take a pod out (for at most one scrape interval) and end in-flight counts, so entries that
Envoy cannot have sent just now are dropped and counted by reason: ended more than
`max_age_s` ago (a replay: Envoy flushes every 100 ms), starting more than `max_future_s`
ahead of our clock (forged, or a badly skewed clock), or naming a pod discovery does not know.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from router_ext.config import ACCESS_LOG_SERVICE, PREFIX_HEADER, TARGET_POD_HEADER
from router_ext.fleet.histogram import PlainHistogram

log = logging.getLogger("router_ext.fleet.feedback")

#: Exponential moving average weight for the gateway-side per-pod view.
EWMA_ALPHA = 0.2

#: An entry that ended longer ago than this is a replay. Envoy sends each entry within one
#: buffer_flush_interval (100 ms) of the request ending, so 60 s leaves room for a stalled
#: gRPC stream and clock steps without ever accepting yesterday's capture.
MAX_ENTRY_AGE_S = 60.0
#: Envoy and router clocks may differ by NTP jitter, not by this much.
MAX_ENTRY_FUTURE_S = 5.0

#: Label values of router_ext_streams_cut_total (bounded: anything else is "other").
CUT_REASONS = ("protocol_error", "remote_reset", "connection_termination", "other")
#: Label values of router_ext_access_log_entries_rejected_total.
REJECT_REASONS = ("stale", "future", "unknown_host")

# Envoy's response_code_details when the upstream failed after the response headers went
# downstream, e.g. "upstream_reset_after_response_started{protocol_error}". Measured with
# Envoy 1.40 in front of an HTTP/1.1 pod: both SIGKILL (kernel FIN mid-chunk) and an RST
# mid-stream give {protocol_error} with flag UPE; neither UR nor UC is set. A client that
# disconnects gives "downstream_remote_disconnect" with flag DC instead.
_CUT_DETAILS = "upstream_reset_after_response_started"
_CUT_REASON_MAP = {
    "protocol_error": "protocol_error",
    "remote_reset": "remote_reset",
    "remote_refused_stream_reset": "remote_reset",
    "connection_termination": "connection_termination",
}


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One request as the router's ledger needs it (router_ext.routing.ledger): whose
    decision, sent where, with which prefix. Parsed here, matched there."""

    placed: bool  # True: the upstream stream was just set up; False: the request ended
    request_id: str
    primary: str  # first address of x-target-pod ("" if Envoy balanced it itself)
    prefix: str = ""  # PREFIX_HEADER as logged
    attempt: int = 1


_PLACED = al.AccessLogType.UpstreamPoolReady
#: Upstream-log entries other than the placement: each attempt's end. The downstream entry
#: reports the request's end once, whatever the attempts.
_SKIPPED = frozenset({al.AccessLogType.UpstreamPeriodic, al.AccessLogType.UpstreamEnd})


@dataclass
class PodFeedback:
    """Gateway-side view of one pod, from Envoy's access log (not from the engine)."""

    requests: int = 0
    errors: int = 0  # 5xx or connection-level failures
    latency_ewma_s: float | None = None  # downstream request duration
    ttfb_ewma_s: float | None = None  # time to first upstream byte (approximates TTFT)
    error_rate_ewma: float = 0.0


def _addr(sa: al.AccessLogCommon) -> str:
    s = sa.upstream_remote_address.socket_address
    if not s.address:
        return ""
    host = f"[{s.address}]" if ":" in s.address else s.address
    return f"{host}:{s.port_value}"


#: Buckets (seconds) of FeedbackSink.pre_upstream: 0.5 ms (a header-only answer on a quiet
#: router) .. 1 s (a large body uploaded slowly).
PRE_UPSTREAM_BUCKETS = (
    0.5e-3, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 15e-3, 20e-3, 30e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0
)  # fmt: skip


def _seconds(d: Duration) -> float | None:
    # google.protobuf.Duration; unset (0) means "did not happen".
    secs: float = d.seconds + d.nanos * 1e-9
    return secs if secs > 0 else None


def _ewma(old: float | None, x: float) -> float:
    return x if old is None else old + EWMA_ALPHA * (x - old)


def _downstream_failed(f: al.ResponseFlags) -> bool:
    # The client went away or broke the protocol: whatever happened upstream afterwards was
    # Envoy tearing down a request nobody waited for, not a cut stream.
    return bool(
        f.downstream_connection_termination
        or f.downstream_remote_reset
        or f.downstream_protocol_error
    )


def cut_reason(e: al.HTTPAccessLogEntry) -> str:
    """Why a stream was cut after its headers went out, or "" if it was not.

    `response_code_details` is the precise signal: Envoy writes it with the reset reason once
    the response has started. Without details (an Envoy that does not send them) fall back to
    flags: a status the pod sent (not one of Envoy's own 5xx local replies) plus an upstream
    reset, termination or protocol error.
    """
    c = e.common_properties
    f = c.response_flags
    if _downstream_failed(f):
        return ""
    details = e.response.response_code_details
    if details:
        if not details.startswith(_CUT_DETAILS):
            return ""
        inner = details[len(_CUT_DETAILS) :].strip("{}").split("|", 1)[0]
        return _CUT_REASON_MAP.get(inner, "other")
    code = e.response.response_code.value
    if not 0 < code < 500:
        return ""
    if f.upstream_protocol_error:
        return "protocol_error"
    if f.upstream_remote_reset:
        return "remote_reset"
    if f.upstream_connection_termination:
        return "connection_termination"
    return ""


def _end_time(c: al.AccessLogCommon) -> float:
    """Wall-clock second the request ended (start + the longest duration Envoy reported)."""
    start: float = c.start_time.seconds + c.start_time.nanos * 1e-9
    took = max(
        (_seconds(d) or 0.0 for d in (c.duration, c.time_to_last_downstream_tx_byte)),
        default=0.0,
    )
    return start + took


def _conn_failure(f: al.ResponseFlags) -> str:
    if f.upstream_connection_failure:
        return "connect failure"
    if f.upstream_remote_reset:
        return "reset by pod"
    if f.upstream_connection_termination:
        return "connection terminated"
    return ""


class StreamAdmission(Protocol):
    """Who may open this stream (router_ext.envoy_adapter.auth.StreamAuth); a Protocol so the
    fleet layer
    does not import the Envoy adapter."""

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any], service: str) -> None: ...


class FeedbackSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Receives access-log batches and applies them through callbacks owned by the server."""

    def __init__(
        self,
        mark_unreachable: Callable[[str, str], bool],
        record: Callable[[LogEntry], None],
        on_entries: Callable[[int], None] | None = None,
        *,
        known: Callable[[str], bool] | None = None,
        on_cut: Callable[[str], None] | None = None,
        on_rejected: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_age_s: float = MAX_ENTRY_AGE_S,
        max_future_s: float = MAX_ENTRY_FUTURE_S,
    ) -> None:
        self._mark_unreachable = mark_unreachable
        self._record = record  # the router's ledger
        self._on_entries = on_entries
        self._known = known  # None: accept any host (unit tests, no discovery)
        self._on_cut = on_cut
        self._on_rejected = on_rejected
        self._clock = clock  # wall clock: Envoy's start_time is wall-clock time
        self.max_age_s = max_age_s
        self.max_future_s = max_future_s
        self.pods: dict[str, PodFeedback] = {}
        self.streams = 0
        #: Set by the server when router.auth.mode is token: every stream must carry it.
        self.auth: StreamAdmission | None = None
        self.cut: dict[str, int] = {}  # reason -> streams cut after their headers went out
        self.rejected: dict[str, int] = {}  # reason -> entries dropped by containment
        self._reject_logged: set[str] = set()
        #: Envoy's time from a request's start to its first byte sent upstream (every routed
        #: request's entry; with several replicas, every replica's): ext_proc exchanges, body
        #: buffering, upstream connect. What routing costs a client, which the router's own
        #: decision histogram cannot see (gRPC, scheduling, Envoy's side).
        self.pre_upstream = PlainHistogram(PRE_UPSTREAM_BUCKETS)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._on_rejected is not None:
            self._on_rejected(reason)
        # Once per reason for the process: a replay or forgery sends many entries, and one
        # line per entry would let the sender flood our log as well.
        if reason not in self._reject_logged:
            self._reject_logged.add(reason)
            log.warning(
                "access-log entry ignored (%s): %s; further %s entries are only counted in "
                "router_ext_access_log_entries_rejected_total",
                reason,
                detail,
                reason,
            )

    def _admissible(self, c: al.AccessLogCommon, host: str, primary: str, now: float) -> bool:
        start: float = c.start_time.seconds + c.start_time.nanos * 1e-9
        if start > now + self.max_future_s:
            self._reject("future", f"started {start - now:.1f}s ahead of this router's clock")
            return False
        age = now - _end_time(c)
        if age > self.max_age_s:
            self._reject("stale", f"ended {age:.0f}s ago (limit {self.max_age_s:g}s)")
            return False
        if self._known is not None:
            for addr in (host, primary):
                if addr and not self._known(addr):
                    self._reject("unknown_host", f"names {addr}, which discovery does not list")
                    return False
        return True

    def apply(self, entries: list[al.HTTPAccessLogEntry]) -> None:
        now = self._clock()
        for e in entries:
            c = e.common_properties
            kind = c.access_log_type
            placed = kind == _PLACED
            if kind in _SKIPPED or (c.intermediate_log_entry and not placed):
                continue
            host = _addr(c)
            primary = ""
            hdrs = e.request.request_headers
            if TARGET_POD_HEADER in hdrs:
                primary = hdrs[TARGET_POD_HEADER].split(",", 1)[0].strip()
            if not self._admissible(c, host, primary, now):
                continue
            rid = e.request.request_id
            prefix = hdrs.get(PREFIX_HEADER, "")
            if placed:
                # The request is under way: only who decided it and where it went matter.
                attempt = c.upstream_request_attempt_count or 1
                self._record(LogEntry(True, rid, primary, prefix, attempt))
                continue
            cut = cut_reason(e)
            if cut:
                self.cut[cut] = self.cut.get(cut, 0) + 1
                if self._on_cut is not None:
                    self._on_cut(cut)
            failure = _conn_failure(c.response_flags) or (f"stream cut ({cut})" if cut else "")
            if host and failure and self._mark_unreachable(host, f"envoy: {failure}"):
                log.warning("pod %s marked unreachable from Envoy feedback: %s", host, failure)
            # Envoy retried away from our primary: the primary refused, reset or 5xx'd. A good
            # scrape re-admits it, so a false positive costs at most one scrape interval.
            retried_away = c.upstream_request_attempt_count > 1 and host and host != primary
            if (
                primary
                and retried_away
                and self._mark_unreachable(primary, "envoy: retried away from it")
            ):
                log.warning(
                    "pod %s marked unreachable: Envoy retried the request on %s", primary, host
                )
            self._record(LogEntry(False, rid, primary, prefix))
            if host:
                self._observe(host, e, bool(failure))
        if self._on_entries is not None:
            self._on_entries(len(entries))

    def _observe(self, host: str, e: al.HTTPAccessLogEntry, failed: bool) -> None:
        fb = self.pods.get(host)
        if fb is None:
            if len(self.pods) > 100_000:  # bounded: hosts come from Envoy's cluster only
                return
            fb = self.pods[host] = PodFeedback()
        fb.requests += 1
        code = e.response.response_code.value
        err = failed or code >= 500
        fb.errors += int(err)
        fb.error_rate_ewma = _ewma(fb.error_rate_ewma, 1.0 if err else 0.0)
        c = e.common_properties
        dur = _seconds(c.time_to_last_downstream_tx_byte)
        if dur is not None:
            fb.latency_ewma_s = _ewma(fb.latency_ewma_s, dur)
        ttfb = _seconds(c.time_to_first_upstream_rx_byte)
        if ttfb is not None:
            fb.ttfb_ewma_s = _ewma(fb.ttfb_ewma_s, ttfb)
        pre = _seconds(c.time_to_first_upstream_tx_byte)
        if pre is not None:
            self.pre_upstream.observe(pre)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        if self.auth is not None:
            await self.auth.admit(context, ACCESS_LOG_SERVICE)  # aborts the stream if not
        self.streams += 1
        try:
            async for msg in request_iterator:
                if msg.HasField("http_logs"):
                    try:
                        self.apply(list(msg.http_logs.log_entry))
                    except Exception:  # feedback must never take the router down
                        log.exception("bad access-log batch ignored")
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()
