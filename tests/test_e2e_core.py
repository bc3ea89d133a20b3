"""End-to-end: real Envoy 1.40 + router-ext + simulated vLLM pods, all on loopback.

Checks what a client sees: which pod served (x-served-by from the pod), the router's answer
(x-target-pod, echoed by Envoy in this test setup), status codes and OpenAI-style errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from router_ext.config import (
    SERVED_BY_HEADER,
    STRATEGY_NAMES,
    STRATEGY_REQUEST_HEADER,
    STRATEGY_USED_HEADER,
    TARGET_POD_HEADER,
)
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def post(
    s: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    body: dict | None = None,  # type: ignore[type-arg]
) -> tuple[int, CIMultiDict[str], str]:
    async with s.post(url + "/v1/chat/completions", json=body or CHAT, headers=headers or {}) as r:
        return r.status, CIMultiDict(r.headers), await r.text()


async def load_pod(
    st: Stack, name: str, n: int = 24, tokens: int = 600
) -> list[asyncio.Task[None]]:
    """Queue long requests directly on one pod (bypassing Envoy) so it looks busy."""
    url = f"http://{st.pods[name]}/v1/chat/completions"
    body = {**CHAT, "max_tokens": tokens}
    session = aiohttp.ClientSession()

    async def one() -> None:
        try:
            async with session.post(url, json=body) as r:
                await r.read()
        except aiohttp.ClientError:
            pass

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    closer = asyncio.create_task(_close_after(session, tasks))
    return [*tasks, closer]


async def _close_after(session: aiohttp.ClientSession, tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()


def metric_sum(st: Stack, name: str) -> float:
    """Sum of every sample of the router's metric `name` (all label values)."""
    total = 0.0
    for line in st.router_metrics().splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_metric(
    st: Stack, name: str, ok: Callable[[float], bool], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not ok(metric_sum(st, name)):
        assert time.monotonic() < deadline, f"{name} never reached the expected value"
        await asyncio.sleep(0.05)


def scrape_rounds(st: Stack) -> float:
    for line in st.router_metrics().splitlines():
        if line.startswith("router_ext_scrape_round_duration_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_scrapes(st: Stack, n: int = 3, timeout: float = 15.0) -> None:
    """Until the router finished `n` scrape rounds that all started after this call (observed
    through its own round counter, not a guess at the interval): the load a test just put on a
    pod is then in the router's snapshot."""
    target = scrape_rounds(st) + n + 1  # +1: a round already running when we were called
    deadline = time.monotonic() + timeout
    while scrape_rounds(st) < target:
        assert time.monotonic() < deadline, f"router finished no {n} scrape rounds in {timeout}s"
        await asyncio.sleep(0.05)


async def test_requests_reach_the_pod_the_router_chose(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, strategy="round-robin")
    async with aiohttp.ClientSession() as s:
        results = [await post(s, st.url) for _ in range(30)]
    served = Counter()
    for status, h, _ in results:
        assert status == 200
        chosen = h[TARGET_POD_HEADER].split(",")
        assert len(chosen) == 3 and len(set(chosen)) == 3  # primary + 2 distinct fallbacks
        assert st.pods[h[SERVED_BY_HEADER]] == chosen[0]  # the primary served it
        assert h[STRATEGY_USED_HEADER] == "round-robin"
        served[h[SERVED_BY_HEADER]] += 1
    assert set(served) == set(st.pods) and min(served.values()) == 10


@pytest.mark.parametrize("strategy", ["least-queue", "least-kv-cache"])
async def test_metric_strategies_send_new_requests_to_the_idle_pod(
    make_stack, strategy: str
) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2, strategy="round-robin")
    busy = await load_pod(st, "pod-0")
    try:
        await wait_scrapes(st)
        async with aiohttp.ClientSession() as s:
            hdr = {STRATEGY_REQUEST_HEADER: strategy}
            results = [await post(s, st.url, hdr) for _ in range(8)]
    finally:
        for t in busy:
            t.cancel()
    assert [r[0] for r in results] == [200] * 8
    assert {r[1][SERVED_BY_HEADER] for r in results} == {"pod-1"}
    assert {r[1][STRATEGY_USED_HEADER] for r in results} == {strategy}
    # the loaded pod is still offered as the fallback
    assert all(r[1][TARGET_POD_HEADER].split(",")[1] == st.pods["pod-0"] for r in results)


async def test_client_sent_target_pod_is_ignored(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2, strategy="least-queue")
    busy = await load_pod(st, "pod-0")
    try:
        await wait_scrapes(st)
        async with aiohttp.ClientSession() as s:
            spoof = {TARGET_POD_HEADER: st.pods["pod-0"]}
            results = [await post(s, st.url, spoof) for _ in range(8)]
    finally:
        for t in busy:
            t.cancel()
    assert {r[1][SERVED_BY_HEADER] for r in results} == {"pod-1"}
    # Envoy stripped it before ext_proc: the router never even saw the client's header.
    assert "router_ext_client_target_header_total 0.0" in st.router_metrics()


async def test_client_cannot_route_to_an_address_outside_discovery(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2, strategy="round-robin")
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            status, h, _ = await post(s, st.url, {TARGET_POD_HEADER: "127.0.0.1:1"})
            assert status == 200 and h[SERVED_BY_HEADER] in st.pods


async def test_unknown_strategy_is_400_with_openai_error(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2)
    async with aiohttp.ClientSession() as s:
        status, h, text = await post(s, st.url, {STRATEGY_REQUEST_HEADER: "fastest-please"})
    assert status == 400
    assert h["content-type"].startswith("application/json")
    err = json.loads(text)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "unknown_routing_strategy"
    assert "fastest-please" in err["message"]
    for name in STRATEGY_NAMES:
        assert name in err["message"]
    assert SERVED_BY_HEADER not in h  # no pod was bothered


async def test_envoy_reports_how_long_routing_held_each_routed_request(make_stack) -> None:  # type: ignore[no-untyped-def]
    # Envoy's own timing (start of request -> first byte sent upstream), from its access log:
    # one observation per request that reached a pod, none for one the router answered itself.
    st = make_stack(pods=2, strategy="least-request")
    count = "router_ext_envoy_pre_upstream_seconds_count"
    entries = "router_ext_access_log_entries_total"
    held_s = "router_ext_envoy_pre_upstream_seconds_sum"
    c0, e0, h0 = metric_sum(st, count), metric_sum(st, entries), metric_sum(st, held_s)
    async with aiohttp.ClientSession() as s:
        statuses = [(await post(s, st.url))[0] for _ in range(20)]
        refused, _, _ = await post(s, st.url, {STRATEGY_REQUEST_HEADER: "fastest-please"})
    assert statuses == [200] * 20 and refused == 400
    await wait_metric(st, entries, lambda v: v >= e0 + 21)  # every entry, the 400's included
    assert metric_sum(st, count) == c0 + 20
    held = metric_sum(st, held_s) - h0
    assert 0 < held < 20 * 1.0  # a real duration per request, under a second each here


async def test_empty_pool_is_503_with_openai_error(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=2)
    good = st.pods_file.read_text()
    tmp = st.pods_file.with_suffix(".tmp")
    tmp.write_text("pods: []\n")
    os.replace(tmp, st.pods_file)
    await wait_metric(st, "router_ext_pods", lambda v: v == 0)  # the router saw the empty pool
    async with aiohttp.ClientSession() as s:
        status, _, text = await post(s, st.url)
        assert status == 503
        err = json.loads(text)["error"]
        assert err["code"] == "no_pod_available" and err["type"] == "service_unavailable"
        # A broken pods file keeps the last good (empty) set and the router keeps answering.
        errors = metric_sum(st, "router_ext_discovery_errors_total")
        tmp.write_text("pods: [ {address: ")
        os.replace(tmp, st.pods_file)
        await wait_metric(st, "router_ext_discovery_errors_total", lambda v: v > errors)
        assert (await post(s, st.url))[0] == 503
        tmp.write_text(good)
        os.replace(tmp, st.pods_file)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (await post(s, st.url))[0] == 200:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("router did not recover after the pods file came back")
    log = (st.workdir / "router.log").read_text()
    assert "not valid YAML" in log and "keeping last good set of 0 pods" in log


def test_demo_json_acceptance(tmp_path: Path) -> None:
    """`router-ext demo --pods 4 --duration 15 --json`: 0 failures, every pod served."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "router_ext.app.cli",
            "demo",
            "--pods",
            "4",
            "--duration",
            "15",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["requests_failed"] == 0, summary
    assert summary["requests_total"] == summary["requests_ok"] > 100
    assert sorted(summary["per_pod"]) == ["pod-0", "pod-1", "pod-2", "pod-3"]
    assert all(n > 0 for n in summary["per_pod"].values())
    assert summary["strategy"] == "least-request"


async def test_saturated_fleet_gets_429_with_retry_after(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(
        pods=2,
        sim_args=["--max-running", "1"],
        router_overrides={"routing": {"saturation_queue": 3}},
    )
    busy = [*(await load_pod(st, "pod-0", n=6)), *(await load_pod(st, "pod-1", n=6))]
    try:
        await wait_scrapes(st)
        async with aiohttp.ClientSession() as s:
            status, h, text = await post(s, st.url)
    finally:
        for t in busy:
            t.cancel()
    assert status == 429
    assert h["retry-after"] == "1"
    assert json.loads(text)["error"]["code"] == "all_pods_saturated"
    assert 'outcome="saturated"' in st.router_metrics()
