"""Admin API (router_ext.v1.AdminService) against a running router, and its CLI.

What an operator sees: GetSnapshot lists every pod with state, reason, metrics and their age;
Explain says where a request would go and why, with every pod's score, and routing nothing
(the pick counters the hot path uses do not move).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import grpc
import pytest

from router_ext.api.v1 import admin_pb2 as pb
from router_ext.api.v1 import admin_pb2_grpc as pb_grpc
from router_ext.config import STRATEGY_REQUEST_HEADER, TARGET_POD_HEADER
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy
from tests.test_e2e_core import load_pod, post, wait_scrapes

pytestmark = [pytest.mark.e2e, requires_envoy]


def _stub(st: Stack) -> tuple[grpc.Channel, pb_grpc.AdminServiceStub]:
    ch = grpc.insecure_channel(st.router_admin)
    return ch, pb_grpc.AdminServiceStub(ch)


def _snapshot(st: Stack) -> pb.GetSnapshotResponse:
    ch, stub = _stub(st)
    with ch:
        return stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=3)


def _explain(st: Stack, **headers: str) -> pb.ExplainResponse:
    ch, stub = _stub(st)
    with ch:
        req = pb.ExplainRequest(headers=[pb.Header(name=k, value=v) for k, v in headers.items()])
        return stub.Explain(req, timeout=3)


def _cli(st: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", *args, "--router", st.router_admin],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_get_snapshot_lists_pods_states_metrics_and_picks(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2, strategy="round-robin")
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            assert (await post(s, st.url))[0] == 200
    await wait_scrapes(st, 2)
    snap = _snapshot(st)
    assert snap.ready and snap.serving and snap.version > 0
    assert snap.default_strategy == "round-robin"
    by_name = {p.name: p for p in snap.pods}
    assert set(by_name) == set(st.pods)
    for name, p in by_name.items():
        assert p.address == st.pods[name]
        assert p.state == pb.POD_STATE_WARM and p.reason == "fresh metrics" and p.routable
        assert p.HasField("metrics") and p.metrics.engine == "vllm"
        assert 0 <= p.metrics_age_seconds < 3 * st.config.scrape.interval_s
        assert p.picks_total == 3  # round robin over 2 pods, 6 requests
        assert p.ramp == 1.0 and p.last_error == ""

    # Kill a pod: the next snapshot says unreachable, why, and keeps its last error.
    st.control("POST", "/pods/pod-1/kill")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        p1 = next(p for p in _snapshot(st).pods if p.name == "pod-1")
        if p1.state == pb.POD_STATE_UNREACHABLE:
            break
        await asyncio.sleep(0.1)
    assert p1.state == pb.POD_STATE_UNREACHABLE and not p1.routable
    assert "refused" in p1.reason or "reset" in p1.reason or "connect" in p1.reason.lower()
    assert p1.last_error and p1.state_changes >= 1

    out = _cli(st, "status", "--once")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("snapshot v") and "SERVING" in lines[0]
    row0 = next(line for line in lines if line.startswith("pod-0 "))
    row1 = next(line for line in lines if line.startswith("pod-1 "))
    assert st.pods["pod-0"] in row0 and " warm " in row0
    assert st.pods["pod-1"] in row1 and " unreachable " in row1


async def test_explain_names_the_idle_pod_without_routing(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2, strategy="round-robin")
    busy = await load_pod(st, "pod-0")
    try:
        await wait_scrapes(st)
        before = _snapshot(st)
        e = _explain(st, **{STRATEGY_REQUEST_HEADER: "least-queue"})
        after = _snapshot(st)
        # Nothing was routed: per-pod pick counters are exactly as before.
        assert [(p.picks_total, p.picks_since_snapshot) for p in before.pods] == [
            (p.picks_total, p.picks_since_snapshot) for p in after.pods
        ]
        assert e.outcome == pb.EXPLAIN_OUTCOME_PICKED and e.strategy_used == "least-queue"
        assert e.target_pod_header.split(",") == [st.pods["pod-1"], st.pods["pod-0"]]
        cands = {c.name: c for c in e.candidates}
        assert set(cands) == {"pod-0", "pod-1"}
        assert cands["pod-1"].position == 0 and cands["pod-0"].position == 1
        assert cands["pod-1"].score < cands["pod-0"].score
        assert {c.score_basis for c in e.candidates} == {"live"}

        # The same request really goes where Explain said.
        async with aiohttp.ClientSession() as s:
            status, h, _ = await post(s, st.url, {STRATEGY_REQUEST_HEADER: "least-queue"})
        assert status == 200 and h[TARGET_POD_HEADER].split(",")[0] == st.pods["pod-1"]

        # CLI, text: names the idle pod as primary and shows both pods' scores.
        out = _cli(st, "explain", "-H", f"{STRATEGY_REQUEST_HEADER}: least-queue")
        assert out.returncode == 0, out.stderr
        assert f"primary: pod-1 ({st.pods['pod-1']})" in out.stdout
        rows = {ln.split()[1]: ln.split() for ln in out.stdout.splitlines() if "warm" in ln}
        assert rows["pod-1"][0] == "primary" and rows["pod-0"][0] == "fallback1"
        assert float(rows["pod-1"][4]) < float(rows["pod-0"][4])

        # CLI, JSON: the same facts, machine-readable.
        out = _cli(st, "explain", "-H", f"{STRATEGY_REQUEST_HEADER}: least-queue", "--json")
        doc = json.loads(out.stdout)
        assert doc["target_pod_header"].startswith(st.pods["pod-1"])
        assert {c["name"] for c in doc["candidates"]} == {"pod-0", "pod-1"}
        assert all("score" in c for c in doc["candidates"])
    finally:
        for t in busy:
            t.cancel()


async def test_explain_reports_bad_strategy_and_filters(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, strategy="least-request")
    e = _explain(st, **{STRATEGY_REQUEST_HEADER: "fastest-please"})
    assert e.outcome == pb.EXPLAIN_OUTCOME_BAD_REQUEST and "fastest-please" in e.error
    assert e.target_pod_header == ""

    st.control("POST", "/pods/pod-2/kill")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        e = _explain(st)
        if any(x.filter == "unreachable" for x in e.exclusions):
            break
        await asyncio.sleep(0.1)
    assert e.requested_strategy == "least-request" and e.outcome == pb.EXPLAIN_OUTCOME_PICKED
    assert [(x.name, x.filter) for x in e.exclusions] == [("pod-2", "unreachable")]
    assert st.pods["pod-2"] not in e.target_pod_header
    assert {c.name for c in e.candidates} == {"pod-0", "pod-1"}
