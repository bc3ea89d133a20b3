"""Envoy's gRPC access-log stream as feedback: what really happened to each routed request.

The ext_proc stream closes right after our header answer (BACKGROUND §4), so it cannot tell
when a request ends or fails. Envoy's access-log service (envoy.service.accesslog.v3) can: one
entry per finished request with the upstream host, response flags, attempts and timings,
batched by Envoy (buffer_flush_interval). We use it to
  (a) mark a pod unreachable the moment Envoy fails to connect to it or is reset by it,
      without waiting for the next scrape (a later good scrape re-admits it);
  (b) end the in-flight count this router added for that pod;
  (c) keep a gateway-side view of each pod's latency and error rate.
Entries are handled on their own gRPC stream; routing never waits for them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from router_ext.config import TARGET_POD_HEADER

log = logging.getLogger("router_ext.feedback")

#: Exponential moving average weight for the gateway-side per-pod view.
EWMA_ALPHA = 0.2


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


def _seconds(d: Duration) -> float | None:
    # google.protobuf.Duration; unset (0) means "did not happen".
    secs: float = d.seconds + d.nanos * 1e-9
    return secs if secs > 0 else None


def _ewma(old: float | None, x: float) -> float:
    return x if old is None else old + EWMA_ALPHA * (x - old)


def _conn_failure(f: al.ResponseFlags) -> str:
    if f.upstream_connection_failure:
        return "connect failure"
    if f.upstream_remote_reset:
        return "reset by pod"
    if f.upstream_connection_termination:
        return "connection terminated"
    return ""


class FeedbackSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Receives access-log batches and applies them through callbacks owned by the server."""

    def __init__(
        self,
        mark_unreachable: Callable[[str, str], bool],
        completed: Callable[[str], None],
        on_entries: Callable[[int], None] | None = None,
    ) -> None:
        self._mark_unreachable = mark_unreachable
        self._completed = completed
        self._on_entries = on_entries
        self.pods: dict[str, PodFeedback] = {}
        self.streams = 0

    def apply(self, entries: list[al.HTTPAccessLogEntry]) -> None:
        for e in entries:
            c = e.common_properties
            if c.intermediate_log_entry:
                continue
            host = _addr(c)
            primary = ""
            hdrs = e.request.request_headers
            if TARGET_POD_HEADER in hdrs:
                primary = hdrs[TARGET_POD_HEADER].split(",", 1)[0].strip()
            failure = _conn_failure(c.response_flags)
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
            if primary:
                self._completed(primary)
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

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
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
