"""Envoy access-log feedback: which entries take a pod out, end in-flight counts, feed latency."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from prometheus_client import generate_latest

from router_ext.app.telemetry import Telemetry
from router_ext.fleet.feedback import CUT_REASONS, FeedbackSink, LogEntry

NOW = 1_800_000_000.0  # the sink's wall clock in these tests (entries are relative to it)


def entry(
    host: str,
    primary: str = "",
    code: int = 200,
    attempts: int = 1,
    ms: int = 100,
    details: str = "",
    started_ago_s: float | None = None,
    **flags: bool,
) -> al.HTTPAccessLogEntry:
    """An entry as Envoy sends it: by default the request ended just now (start = now - ms)."""
    e = al.HTTPAccessLogEntry()
    c = e.common_properties
    ago = ms / 1000 if started_ago_s is None else started_ago_s
    c.start_time.FromNanoseconds(int((NOW - ago) * 1e9))
    c.duration.FromMilliseconds(ms)
    if details:
        e.response.response_code_details = details
    ip, port = host.rsplit(":", 1)
    c.upstream_remote_address.socket_address.address = ip
    c.upstream_remote_address.socket_address.port_value = int(port)
    c.upstream_request_attempt_count = attempts
    c.time_to_last_downstream_tx_byte.FromMilliseconds(ms)
    for k, v in flags.items():
        setattr(c.response_flags, k, v)
    e.response.response_code.value = code
    if primary:
        e.request.request_headers["x-target-pod"] = primary + ",10.0.0.9:80"
    return e


class Spy:
    def __init__(self) -> None:
        self.marked: list[tuple[str, str]] = []
        self.done: list[str] = []  # primaries of ended requests (the ledger ends their pick)
        self.entries: list[LogEntry] = []

    def record(self, e: LogEntry) -> None:
        self.entries.append(e)
        if not e.placed and e.primary:
            self.done.append(e.primary)

    def mark(self, addr: str, why: str) -> bool:
        if any(a == addr for a, _ in self.marked):
            return False
        self.marked.append((addr, why))
        return True

    def sink(self, **kw: Any) -> FeedbackSink:
        return FeedbackSink(self.mark, self.record, clock=lambda: NOW, **kw)


def test_connect_failure_marks_the_pod_at_once() -> None:
    spy = Spy()
    spy.sink().apply([entry("10.0.0.1:80", "10.0.0.1:80", 503, upstream_connection_failure=True)])
    assert spy.marked == [("10.0.0.1:80", "envoy: connect failure")]


def test_retried_away_from_primary_marks_the_primary() -> None:
    spy = Spy()
    spy.sink().apply([entry("10.0.0.2:80", primary="10.0.0.1:80", attempts=2)])
    assert spy.marked == [("10.0.0.1:80", "envoy: retried away from it")]
    assert spy.done == ["10.0.0.1:80"]  # the primary's in-flight pick ends


def test_success_on_primary_marks_nothing_and_ends_in_flight() -> None:
    spy = Spy()
    sink = spy.sink()
    sink.apply([entry("10.0.0.1:80", primary="10.0.0.1:80") for _ in range(3)])
    assert spy.marked == []
    assert spy.done == ["10.0.0.1:80"] * 3
    fb = sink.pods["10.0.0.1:80"]
    assert fb.requests == 3 and fb.errors == 0
    assert fb.latency_ewma_s is not None and abs(fb.latency_ewma_s - 0.1) < 1e-6


def test_http_5xx_from_the_pod_counts_as_error_but_does_not_eject() -> None:
    spy = Spy()
    sink = spy.sink()
    sink.apply([entry("10.0.0.1:80", primary="10.0.0.1:80", code=500)])
    assert spy.marked == []
    assert sink.pods["10.0.0.1:80"].errors == 1


def test_intermediate_entries_and_unknown_hosts_are_harmless() -> None:
    spy = Spy()
    e = entry("10.0.0.1:80", "10.0.0.1:80", upstream_remote_reset=True)
    e.common_properties.intermediate_log_entry = True
    no_host = al.HTTPAccessLogEntry()
    no_host.common_properties.response_flags.no_healthy_upstream = True
    spy.sink().apply([e, no_host])
    assert spy.marked == [] and spy.done == []


# --- streams cut after their headers went out (issue 9, item 5) ---------------------------

# What Envoy 1.40 wrote in front of an HTTP/1.1 simulator pod, measured (see feedback.py):
CUT = "upstream_reset_after_response_started{protocol_error}"
CLIENT_GONE = "downstream_remote_disconnect"


def test_stream_cut_after_headers_is_counted_and_takes_the_pod_out() -> None:
    spy = Spy()
    cuts: list[str] = []
    sink = spy.sink(on_cut=cuts.append)
    sink.apply(
        [entry("10.0.0.1:80", "10.0.0.1:80", 200, details=CUT, upstream_protocol_error=True)]
    )
    assert cuts == ["protocol_error"] and sink.cut == {"protocol_error": 1}
    assert spy.marked == [("10.0.0.1:80", "envoy: stream cut (protocol_error)")]
    assert spy.done == ["10.0.0.1:80"]  # the request ended: its in-flight pick ends too
    assert sink.pods["10.0.0.1:80"].errors == 1


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        ("upstream_reset_after_response_started{remote_reset}", "remote_reset"),
        ("upstream_reset_after_response_started{connection_termination}", "connection_termination"),
        ("upstream_reset_after_response_started{remote_refused_stream_reset}", "remote_reset"),
        # A transport failure reason rides after "|": the label stays the reset reason.
        (
            "upstream_reset_after_response_started{connection_termination|tls_error}",
            "connection_termination",
        ),
        # Anything Envoy may invent later stays one bounded label value.
        ("upstream_reset_after_response_started{overload_manager_reset}", "other"),
    ],
)
def test_cut_reasons_are_bounded(details: str, reason: str) -> None:
    sink = Spy().sink()
    sink.apply([entry("10.0.0.1:80", "10.0.0.1:80", 200, details=details)])
    assert sink.cut == {reason: 1}
    assert set(sink.cut) <= set(CUT_REASONS)


def test_client_disconnect_is_not_a_cut_stream() -> None:
    spy = Spy()
    sink = spy.sink()
    gone = entry("10.0.0.1:80", "10.0.0.1:80", 200, details=CLIENT_GONE)
    gone.common_properties.response_flags.downstream_connection_termination = True
    # Even with the upstream details, a downstream flag means the client left first.
    both = entry("10.0.0.1:80", "10.0.0.1:80", 200, details=CUT, upstream_protocol_error=True)
    both.common_properties.response_flags.downstream_remote_reset = True
    sink.apply([gone, both])
    assert sink.cut == {} and spy.marked == []


def test_failures_before_headers_and_retried_successes_are_not_cut() -> None:
    sink = Spy().sink()
    sink.apply(
        [
            # Reset before any response byte: Envoy retried or answered its own 503.
            entry(
                "10.0.0.1:80",
                "10.0.0.1:80",
                503,
                details="upstream_reset_before_response_started{remote_reset}",
                upstream_remote_reset=True,
            ),
            # A retry that succeeded keeps the flag of the failed first attempt.
            entry(
                "10.0.0.2:80",
                "10.0.0.1:80",
                200,
                attempts=2,
                details="via_upstream",
                upstream_connection_failure=True,
            ),
        ]
    )
    assert sink.cut == {}


def test_without_details_flags_decide_and_envoy_local_5xx_does_not_count() -> None:
    sink = Spy().sink()
    sink.apply(
        [
            entry("10.0.0.1:80", "10.0.0.1:80", 200, upstream_protocol_error=True),
            entry("10.0.0.1:80", "10.0.0.1:80", 200, upstream_connection_termination=True),
            entry("10.0.0.1:80", "10.0.0.1:80", 503, upstream_remote_reset=True),
        ]
    )
    assert sink.cut == {"protocol_error": 1, "connection_termination": 1}


def test_cut_counter_is_exported_per_reason_and_starts_at_zero() -> None:
    tel = Telemetry()
    text = generate_latest(tel.registry).decode()
    for reason in CUT_REASONS:
        assert f'router_ext_streams_cut_total{{reason="{reason}"}} 0.0' in text
    sink = FeedbackSink(
        lambda a, w: True, lambda a: None, clock=lambda: NOW, on_cut=tel.on_stream_cut
    )
    sink.apply([entry("10.0.0.1:80", "10.0.0.1:80", 200, details=CUT)] * 3)
    text = generate_latest(tel.registry).decode()
    assert 'router_ext_streams_cut_total{reason="protocol_error"} 3.0' in text
    assert "pod=" not in [ln for ln in text.splitlines() if "streams_cut" in ln][-1]


# --- replay / forgery containment ---------------------------------------------------------


def test_replayed_entries_are_ignored_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spy = Spy()
    rejected: list[str] = []
    sink = spy.sink(on_rejected=rejected.append)
    old = [
        entry("10.0.0.1:80", "10.0.0.1:80", 503, started_ago_s=61, upstream_connection_failure=True)
        for _ in range(50)
    ]
    with caplog.at_level(logging.WARNING, logger="router_ext.fleet.feedback"):
        sink.apply(old)
        sink.apply(old)
    assert spy.marked == [] and spy.done == [] and sink.pods == {}
    assert rejected == ["stale"] * 100 and sink.rejected == {"stale": 100}
    lines = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and "stale" in lines[0].getMessage()


def test_entry_without_start_time_is_stale() -> None:
    spy = Spy()
    e = entry("10.0.0.1:80", "10.0.0.1:80", 503, upstream_connection_failure=True)
    e.common_properties.ClearField("start_time")
    sink = spy.sink()
    sink.apply([e])
    assert spy.marked == [] and sink.rejected == {"stale": 1}


def test_long_stream_that_just_ended_is_not_stale() -> None:
    # A 5-minute generation starts long before its entry is sent: age counts from its end.
    spy = Spy()
    sink = spy.sink()
    sink.apply([entry("10.0.0.1:80", "10.0.0.1:80", ms=300_000)])
    assert sink.rejected == {} and spy.done == ["10.0.0.1:80"]


def test_future_entries_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    spy = Spy()
    sink = spy.sink()
    ok = entry("10.0.0.1:80", "10.0.0.1:80", started_ago_s=-2)  # clock skew within bounds
    ahead = entry(
        "10.0.0.1:80", "10.0.0.1:80", 503, started_ago_s=-30, upstream_connection_failure=True
    )
    with caplog.at_level(logging.WARNING, logger="router_ext.fleet.feedback"):
        sink.apply([ok, ahead, ahead])
    assert spy.marked == [] and spy.done == ["10.0.0.1:80"]
    assert sink.rejected == {"future": 2}
    assert sum("future" in r.getMessage() for r in caplog.records) == 1


def test_entries_naming_unknown_pods_are_ignored() -> None:
    spy = Spy()
    known = {"10.0.0.1:80", "10.0.0.2:80"}
    sink = spy.sink(known=known.__contains__)
    sink.apply(
        [
            entry("10.9.9.9:80", "10.9.9.9:80", 503, upstream_connection_failure=True),
            # A known upstream host but a forged primary: nothing of it is applied.
            entry("10.0.0.2:80", primary="10.9.9.9:80", attempts=2),
            entry("10.0.0.1:80", "10.0.0.1:80", 200, details=CUT),
        ]
    )
    assert sink.rejected == {"unknown_host": 2}
    assert set(sink.pods) == {"10.0.0.1:80"}  # the per-pod view cannot be grown by forgery
    assert spy.done == ["10.0.0.1:80"] and sink.cut == {"protocol_error": 1}
    # An Envoy local reply (no upstream host at all) is still fine.
    no_host = entry("10.0.0.1:80")
    no_host.common_properties.ClearField("upstream_remote_address")
    sink.apply([no_host])
    assert sink.rejected == {"unknown_host": 2}


def test_rejections_are_exported_per_reason() -> None:
    tel = Telemetry()
    sink = FeedbackSink(
        lambda a, w: True,
        lambda a: None,
        known={"10.0.0.1:80"}.__contains__,
        clock=lambda: NOW,
        on_rejected=tel.on_access_log_rejected,
    )
    sink.apply(
        [
            entry("10.0.0.1:80", started_ago_s=3600),
            entry("10.0.0.1:80", started_ago_s=-3600),
            entry("10.0.0.7:80"),
        ]
    )
    text = generate_latest(tel.registry).decode()
    for reason in ("stale", "future", "unknown_host"):
        assert f'router_ext_access_log_entries_rejected_total{{reason="{reason}"}} 1.0' in text


def test_default_clock_is_wall_time() -> None:
    # Envoy's start_time is wall-clock time: an entry made now is fresh for a default sink.
    spy = Spy()
    sink = FeedbackSink(spy.mark, spy.record)
    e = entry("10.0.0.1:80", "10.0.0.1:80")
    e.common_properties.start_time.FromNanoseconds(time.time_ns())
    sink.apply([e])
    assert sink.rejected == {} and spy.done == ["10.0.0.1:80"]
