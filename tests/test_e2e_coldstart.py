"""Cold pods end-to-end (BACKGROUND §1B): pods join without metrics, several join at once, the
whole fleet's /metrics fails. Through a real Envoy with the simulator; the numbers printed
with `[measure]` are the ones quoted in the closing note."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_ext.harness.loadgen import LoadSpec, Result, closed_loop
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]


def spec(st: Stack) -> LoadSpec:
    return LoadSpec(url=st.url + "/v1/chat/completions", max_tokens=16, timeout_s=20)


def report(name: str, **numbers: object) -> None:
    print(f"\n[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def router_samples(st: Stack, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for fam in text_string_to_metric_families(st.router_metrics()):
        for s in fam.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


def pod_state(st: Stack, pod: str) -> str:
    for labels, v in router_samples(st, "router_ext_pod_state"):
        if labels["pod"] == pod and v == 1:
            return labels["state"]
    return ""


async def add_pod(st: Stack, name: str, **cfg: Any) -> float:
    info = await asyncio.to_thread(st.control, "POST", "/pods", {"name": name, **cfg})
    st.pods[name] = info["address"]
    return time.monotonic()


def shares(results: list[Result], pod: str, start: float, end: float, width: float) -> list[float]:
    out = []
    t = start
    while t + width <= end + 1e-9:
        window = [r for r in results if t <= r.started < t + width and r.ok]
        out.append(sum(r.served_by == pod for r in window) / max(1, len(window)))
        t += width
    return out


async def test_cold_pod_ramps_then_is_scored_from_its_metrics(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, strategy="least-kv-cache")
    interval = st.config.scrape.interval_s
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    async def join_and_watch() -> None:
        await asyncio.sleep(1.0)
        marks["join"] = await add_pod(st, "pod-3", metrics_delay_s=10)
        marks["metrics"] = marks["join"] + 10.0
        while time.monotonic() < marks["join"] + 14:
            if await asyncio.to_thread(pod_state, st, "pod-3") == "warm":
                marks["warm"] = time.monotonic()
                return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(join_and_watch())
    results = await closed_loop(spec(st), 24, duration_s=14)
    await watcher
    assert [r for r in results if not r.ok] == []
    join, metrics_at = marks["join"], marks["metrics"]
    # Cold window: from discovery (+0.5 s for the pods file and EDS to land) to first metrics.
    cold = shares(results, "pod-3", join + 0.5, metrics_at - 0.5, 2.0)
    assert sum(cold) > 0, cold  # not starved
    assert max(cold) < 0.5, cold  # never the majority
    assert cold[-1] > cold[0], cold  # ramps
    # Scored from its own metrics within two scrape intervals of them appearing.
    assert "warm" in marks, "pod-3 never turned warm"
    assert marks["warm"] - metrics_at <= 2 * interval + 0.2
    log = (st.workdir / "router.log").read_text()
    changes = re.findall(r"pod pod-3 \(\S+\) state (\w+) -> (\w+)", log)
    assert changes == [("cold", "warm")], changes  # once each, no flapping, no per-request log
    assert "discovered: state cold" in log
    cold_hist = {
        labels.get("le", ""): v
        for labels, v in router_samples(st, "router_ext_pod_coldstart_duration_seconds_bucket")
    }
    assert cold_hist["5.0"] == 0 and cold_hist["20.0"] == 1  # one pod, ~10 s from Ready
    cold_picks = dict(
        (lab["pod"], v) for lab, v in router_samples(st, "router_ext_cold_pod_requests_total")
    )
    assert cold_picks.get("pod-3", 0) > 0
    report(
        "cold pod",
        cold_shares_2s=[round(x, 3) for x in cold],
        fair_share=0.25,
        warm_after_metrics_s=round(marks["warm"] - metrics_at, 3),
        requests=len(results),
        failed=0,
        started_at_s=round(join - t0, 2),
    )


async def test_four_pods_joining_together_get_at_most_twice_fair_share(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=4, strategy="least-kv-cache")
    slow_start = st.config.routing.slow_start_s
    marks: dict[str, float] = {}

    async def join() -> None:
        await asyncio.sleep(2.0)
        joined = await asyncio.gather(*(add_pod(st, f"pod-{i}") for i in range(4, 8)))
        marks["join"] = max(joined)

    task = asyncio.create_task(join())
    results = await closed_loop(spec(st), 32, duration_s=2.0 + slow_start + 1.0)
    await task
    assert [r for r in results if not r.ok] == []
    j = marks["join"] + 0.5
    worst = 0.0
    for t in range(int(slow_start) - 1):
        window = [r for r in results if j + t <= r.started < j + t + 1]
        counts = Counter(r.served_by for r in window)
        fair = len(window) / 8
        for p in ("pod-4", "pod-5", "pod-6", "pod-7"):
            worst = max(worst, counts[p] / fair)
    assert worst <= 2.0, worst
    new_total = sum(r.served_by in ("pod-4", "pod-5", "pod-6", "pod-7") for r in results)
    assert new_total > 0
    report(
        "four pods join", window_s=1.0, worst_share_over_fair=round(worst, 2), requests=len(results)
    )


async def test_fleet_metrics_outage_falls_back_visibly_and_recovers(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, strategy="least-kv-cache")
    stale = st.config.scrape.stale_after_s
    t0 = time.monotonic()

    async def outage() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(st.control, "POST", "/metrics-outage?on=1")
        await asyncio.sleep(5.0)
        await asyncio.to_thread(st.control, "POST", "/metrics-outage?on=0")

    task = asyncio.create_task(outage())
    results = await closed_loop(spec(st), 16, duration_s=10)
    await task
    assert [r for r in results if not r.ok] == []
    during = [r for r in results if t0 + 1.0 + stale + 1.0 < r.started < t0 + 6.0]
    after = [r for r in results if r.started > t0 + 6.0 + 2.0]
    before = [r for r in results if r.started < t0 + 1.0]
    assert before and {r.strategy for r in before} == {"least-kv-cache"}
    assert during and {r.strategy for r in during} == {"least-kv-cache>random"}
    assert after and {r.strategy for r in after} == {"least-kv-cache"}
    assert len({r.served_by for r in during}) == 3  # random over every ready pod
    degraded = {
        (lab["strategy"], lab["reason"]): v
        for lab, v in router_samples(st, "router_ext_degraded_decisions_total")
    }
    assert degraded[("least-kv-cache", "no_fresh_metrics")] >= len(during)
    log = (st.workdir / "router.log").read_text()
    assert log.count("degraded to random") == 1  # once per state change, not per request
    assert log.count("uses live metrics again") == 1
    report(
        "metrics outage",
        requests=len(results),
        failed=0,
        degraded_decisions=int(degraded[("least-kv-cache", "no_fresh_metrics")]),
    )
