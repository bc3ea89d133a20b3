"""Hostile input against the real request path (issue: hold under hostile and heavy conditions).

Each test reproduces one finding from an outside probe of the shipped router, against real
processes on loopback: the simulator, `router-ext serve` and Envoy 1.40.
- anyone who reached the router's gRPC port could forge Envoy's access log and take every pod
  out (8,499 of 8,550 requests answered 503);
- a 0-byte pods file emptied the pool;
- SIGHUP killed the router without a word; a port in use printed a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from router_ext.api.v1 import admin_pb2 as pb
from router_ext.api.v1 import admin_pb2_grpc as pb_grpc
from router_ext.envoy_adapter.auth import TOKEN_METADATA_KEY
from router_ext.harness.loadgen import LoadSpec, Result, closed_loop
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]


def spec(st: Stack) -> LoadSpec:
    return LoadSpec(url=st.url + "/v1/chat/completions", max_tokens=4, timeout_s=20)


def report(name: str, **numbers: object) -> None:
    # Shown with `pytest -s`; the README's numbers come from these lines.
    print(f"\n[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def failed(results: list[Result]) -> list[str]:
    return [f"{r.status} {r.error or r.body[:200]}" for r in results if not r.ok]


def metric(st: Stack, name: str, **labels: str) -> float:
    """Sum of the router's samples `name{labels...}` (0 when absent)."""
    total = 0.0
    for line in st.router_metrics().splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def forged_entries(st: Stack) -> als_pb2.StreamAccessLogsMessage:
    """One batch saying every pod refused its connection just now, as a forger would send."""
    now = Timestamp()
    now.GetCurrentTime()
    entries = []
    for address in st.pods.values():
        host, _, port = address.rpartition(":")
        e = al.HTTPAccessLogEntry()
        c = e.common_properties
        c.upstream_remote_address.socket_address.address = host
        c.upstream_remote_address.socket_address.port_value = int(port)
        c.response_flags.upstream_connection_failure = True
        c.start_time.CopyFrom(now)
        e.response.response_code.value = 503
        entries.append(e)
    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.log_name = "router-ext"
    msg.http_logs.log_entry.extend(entries)
    return msg


def send_forged(
    st: Stack, metadata: tuple[tuple[str, str], ...], batches: int, every_s: float
) -> grpc.RpcError | None:
    def gen() -> Iterator[als_pb2.StreamAccessLogsMessage]:
        for _ in range(batches):
            yield forged_entries(st)
            time.sleep(every_s)  # pacing the forger's traffic, not synchronisation

    with grpc.insecure_channel(st.router_grpc) as ch:
        stub = als_pb2_grpc.AccessLogServiceStub(ch)
        try:
            stub.StreamAccessLogs(gen(), metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            return e
    return None


def token(st: Stack) -> str:
    return st.config.token_file.read_text().strip()


async def test_unauthenticated_streams_are_refused_and_counted(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3)
    for md in ((), ((TOKEN_METADATA_KEY, "not-the-token-but-long-enough"),)):
        err = await asyncio.to_thread(send_forged, st, md, 5, 0.02)
        assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(st.router_grpc) as ch:
        stub = ep_grpc.ExternalProcessorStub(ch)
        req = ep.ProcessingRequest(request_headers=ep.HttpHeaders())
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Process(iter([req]), timeout=5))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused_als = metric(
        st,
        "router_ext_grpc_streams_refused_total",
        service="envoy.service.accesslog.v3.AccessLogService",
    )
    refused_ep = metric(
        st,
        "router_ext_grpc_streams_refused_total",
        service="envoy.service.ext_proc.v3.ExternalProcessor",
    )
    assert (refused_als, refused_ep) == (2, 1)
    # The forged batches never reached the feedback sink: no pod was marked, and Envoy's own
    # (authenticated) streams still route every request through the router.
    assert metric(st, "router_ext_access_log_unreachable_marks_total") == 0
    results = await closed_loop(spec(st), 8, total=200)
    assert failed(results) == []
    assert all(r.strategy == "least-request" for r in results), "requests failed open"
    log = st.router.log_path.read_text()
    assert log.count("refused") >= 1 and "no x-router-ext-token metadata" in log
    report(
        "unauthenticated streams",
        refused_access_log=refused_als,
        refused_ext_proc=refused_ep,
        marks=0,
        requests=len(results),
        failed=0,
    )


async def test_authenticated_forged_feedback_cannot_empty_the_pool(make_stack) -> None:  # type: ignore[no-untyped-def]
    # Worst case: the forger holds the token (a compromised Envoy). Feedback alone must still
    # not take the pool down: marks beyond half the pool need the router's own connect attempt,
    # and the pods answer it.
    st = make_stack(pods=4)
    md = ((TOKEN_METADATA_KEY, token(st)),)
    forger = asyncio.create_task(asyncio.to_thread(send_forged, st, md, 150, 0.02))
    results = await closed_loop(spec(st), 16, total=1200)
    assert await forger is None
    assert failed(results) == []
    assert metric(st, "router_ext_feedback_corroborations_total", outcome="refuted") > 0
    assert metric(st, "router_ext_feedback_corroborations_total", outcome="confirmed") == 0
    assert "ignored Envoy feedback on pod" in st.router.log_path.read_text()
    report(
        "forged authenticated feedback (every pod down, every 20 ms)",
        requests=len(results),
        failed=0,
        refuted=metric(st, "router_ext_feedback_corroborations_total", outcome="refuted"),
        marks=metric(st, "router_ext_access_log_unreachable_marks_total"),
    )


async def test_admin_api_is_not_on_the_port_envoy_reaches(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2)
    with grpc.insecure_channel(st.router_grpc) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.AdminServiceStub(ch).GetSnapshot(pb.GetSnapshotRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(st.router_admin) as ch:
        snap = pb_grpc.AdminServiceStub(ch).GetSnapshot(pb.GetSnapshotRequest(), timeout=5)
        assert len(snap.pods) == 2
    assert st.config.router.admin.host == "127.0.0.1"


async def test_truncated_pods_file_keeps_routing_on_last_good_set(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3)
    t0 = time.monotonic()

    async def truncate() -> None:
        await asyncio.sleep(max(0.0, t0 + 1.0 - time.monotonic()))  # mid-load, by the clock
        st.pods_file.write_text("")  # `: > pods.yaml`: a non-atomic writer caught halfway

    cut = asyncio.create_task(truncate())
    results = await closed_loop(spec(st), 16, total=1500)
    await cut
    assert time.monotonic() - t0 > 1.5, "load ended before the file was truncated"
    assert failed(results) == []
    assert {r.served_by for r in results if r.started > t0 + 1.5} == set(st.pods)
    st.wait_envoy_membership(3)  # Envoy's EDS was not emptied either
    log = st.router.log_path.read_text()
    assert log.count("file is empty") == 1
    report("pods file truncated to 0 bytes", requests=len(results), failed=0, log_lines=1)


async def test_sighup_rereads_pods_file_and_keeps_serving(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2)
    st.router.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "received SIGHUP" not in st.router.log_path.read_text():
        assert time.monotonic() < deadline, st.router.tail()
        await asyncio.sleep(0.05)
    assert st.router.alive()
    assert st.router_health() == 1  # SERVING
    results = await closed_loop(spec(st), 4, total=50)
    assert failed(results) == []


def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "pods.yaml").write_text("pods: []\n")
        cfg = tmp_path / "router.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "router": {"grpc": {"port": port}, "metrics": {"port": 0}},
                    "discovery": {"pods_file": "pods.yaml"},
                }
            )
        )
        proc = subprocess.run(
            [sys.executable, "-m", "router_ext.app.cli", "serve", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("router-ext:")]
    assert len(err_lines) == 1, proc.stderr
    assert "cannot listen for gRPC (ext_proc)" in err_lines[0]
    assert f"127.0.0.1:{port}" in err_lines[0]
    assert "Traceback" not in proc.stderr
    assert "Event loop is closed" not in proc.stderr


def _dead_ports(n: int) -> list[int]:
    """Loopback ports nothing listens on (bound once to learn a free number, then closed)."""
    out = []
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        out.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return out


async def test_mostly_dead_fleet_fails_open_onto_live_pods_only(make_stack) -> None:  # type: ignore[no-untyped-def]
    # 3 live pods among 200 listed. While the router runs, it answers only with pods it could
    # scrape. When it dies, Envoy's fallback balancer serves the requests that fail open: in
    # panic mode (the old 25% threshold; 3/200 is 1.5% healthy) it spread them over dead pods
    # and most failed. With panic off it uses the 3 pods its health checks passed.
    st = make_stack(pods=3)
    live = yaml.safe_load(st.pods_file.read_text())["pods"]
    dead = [
        {"name": f"dead-{i}", "address": "127.0.0.1", "port": p}
        for i, p in enumerate(_dead_ports(197))
    ]
    tmp = st.pods_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"pods": live + dead}))
    os.replace(tmp, st.pods_file)
    deadline = time.monotonic() + 30
    while not (
        st.envoy_stat("cluster.pods.membership_total") == 200
        and st.envoy_stat("cluster.pods.membership_healthy") == 3
    ):
        assert time.monotonic() < deadline, "Envoy never health-checked the 197 dead pods"
        await asyncio.sleep(0.1)
    routed = await closed_loop(spec(st), 16, total=600)
    assert failed(routed) == []
    assert {r.served_by for r in routed} <= set(st.pods)

    st.router.signal(signal.SIGKILL)
    while st.router_health() is not None:
        await asyncio.sleep(0.05)
    failed_open = await closed_loop(spec(st), 16, total=600)
    assert failed(failed_open) == []
    assert all(r.strategy == "" for r in failed_open), "the router was supposed to be down"
    assert st.envoy_stat("http.ingress.ext_proc.failure_mode_allowed") > 0
    report(
        "200 pods listed, 197 dead",
        routed=len(routed),
        routed_failed=0,
        failed_open=len(failed_open),
        failed_open_failed=0,
        envoy_failure_mode_allowed=st.envoy_stat("http.ingress.ext_proc.failure_mode_allowed"),
    )
