"""Envoy access-log feedback: which entries take a pod out, end in-flight counts, feed latency."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2 as al

from router_ext.feedback import FeedbackSink


def entry(
    host: str,
    primary: str = "",
    code: int = 200,
    attempts: int = 1,
    ms: int = 100,
    **flags: bool,
) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    c = e.common_properties
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
        self.done: list[str] = []

    def mark(self, addr: str, why: str) -> bool:
        if any(a == addr for a, _ in self.marked):
            return False
        self.marked.append((addr, why))
        return True

    def sink(self) -> FeedbackSink:
        return FeedbackSink(self.mark, self.done.append)


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
