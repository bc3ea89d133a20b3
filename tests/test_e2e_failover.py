"""Failover end-to-end (BACKGROUND §1A): a pod dies or hangs, the router dies, hangs, drains or
restarts, under load through a real Envoy. Clients must see no errors wherever another pod
could have served the request.

The simulator's `kill` closes the pod's listening socket and resets every open connection,
which is what the network sees when a process is killed with SIGKILL (the pods of the
simulator share one process, so the test cannot SIGKILL just one of them). The router, a
real process of its own, is killed, stopped and terminated with real signals.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from router_ext.config import TARGET_POD_HEADER
from router_ext.harness.loadgen import LoadSpec, Result, closed_loop, percentile
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]


def spec(st: Stack, max_tokens: int = 8) -> LoadSpec:
    return LoadSpec(url=st.url + "/v1/chat/completions", max_tokens=max_tokens, timeout_s=20)


def failures(results: list[Result]) -> list[str]:
    return [f"{r.status} {r.error or r.body[:200]}" for r in results if not r.ok]


async def at(t0: float, delay: float) -> None:
    await asyncio.sleep(max(0.0, t0 + delay - time.monotonic()))


def report(name: str, **numbers: object) -> None:
    # Shown with `pytest -s`; the numbers quoted in the closing note come from these lines.
    print(f"\n[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


async def test_pod_killed_under_load_no_failures(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=4, strategy="least-request")
    served: Counter[str] = Counter()
    t0 = time.monotonic()

    async def kill_favoured() -> str:
        await at(t0, 1.5)
        name = served.most_common(1)[0][0]
        await asyncio.to_thread(st.control, "POST", f"/pods/{name}/kill")
        return name

    killer = asyncio.create_task(kill_favoured())
    results = await closed_loop(
        spec(st), 32, total=1500, on_result=lambda r: served.update([r.served_by])
    )
    killed = await killer
    kill_t = t0 + 1.5
    assert len(results) == 1500
    assert failures(results) == []
    after = [r for r in results if r.started > kill_t + 1.0]
    assert after, "the kill happened after the load ended"
    assert all(r.served_by != killed for r in after)
    retries = st.envoy_stat("cluster.pods.upstream_rq_retry")
    report(
        "pod killed",
        requests=len(results),
        failed=0,
        after_kill=len(after),
        envoy_retries=retries,
        retry_success=st.envoy_stat("cluster.pods.upstream_rq_retry_success"),
        retry_overflow=st.envoy_stat("cluster.pods.upstream_rq_retry_overflow"),
    )


async def test_pod_hung_affects_only_requests_before_detection(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(
        pods=3, strategy="least-request", router_overrides={"envoy": {"route_timeout_s": 4}}
    )
    t0 = time.monotonic()
    hang_at = 1.5

    async def hang() -> None:
        await at(t0, hang_at)
        await asyncio.to_thread(st.control, "POST", "/pods/pod-1/hang")

    task = asyncio.create_task(hang())
    results = await closed_loop(spec(st), 16, duration_s=9)
    await task
    hang_t = t0 + hang_at
    bad = [r for r in results if not r.ok]
    # Requests already on the hung pod, or sent before the router noticed, wait for the route
    # timeout (4 s here). Nothing sent after detection (2 s budget) may be affected.
    assert all(r.started < hang_t + 2.0 for r in bad), [r.started - hang_t for r in bad]
    assert all(r.status == 504 for r in bad), failures(results)
    late = [r for r in results if r.started > hang_t + 2.0]
    assert len(late) > 100 and all(r.ok and r.served_by != "pod-1" for r in late)
    log = (st.workdir / "router.log").read_text()
    assert "pod-1" in log and "-> unreachable" in log
    report(
        "pod hung",
        requests=len(results),
        affected=len(bad),
        last_affected_started_after_hang_s=round(
            max((r.started - hang_t for r in bad), default=0), 3
        ),
    )


async def test_router_killed_fails_open(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3)
    t0 = time.monotonic()

    async def kill() -> None:
        await at(t0, 2.0)
        assert st.router is not None
        st.router.signal(signal.SIGKILL)

    task = asyncio.create_task(kill())
    results = await closed_loop(spec(st), 16, duration_s=6)
    await task
    assert failures(results) == []
    kill_t = t0 + 2.0
    before = [r.latency_s for r in results if r.started < kill_t - 0.2]
    after = [r for r in results if r.started > kill_t + 1.0]
    assert after and all(r.strategy == "" for r in after)  # Envoy's own balancer served them
    assert len({r.served_by for r in after}) == 3
    p50_b, p50_a = percentile(before, 50), percentile([r.latency_s for r in after], 50)
    report(
        "router killed",
        requests=len(results),
        failed=0,
        p50_before_ms=round(p50_b * 1000, 2),
        p50_after_ms=round(p50_a * 1000, 2),
        fail_open=st.envoy_stat("http.ingress.ext_proc.failure_mode_allowed"),
    )


async def test_router_hung_slowdown_stops_within_2s(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3)
    t0 = time.monotonic()
    assert st.router is not None
    stat = "http.ingress.ext_proc.message_timeouts"
    timeline: list[tuple[float, float]] = []  # (time, Envoy's message-timeout count)
    done = asyncio.Event()

    async def stop() -> None:
        await at(t0, 2.0)
        assert st.router is not None
        st.router.signal(signal.SIGSTOP)

    async def watch() -> None:
        while not done.is_set():
            value = await asyncio.to_thread(st.envoy_stat, stat)
            timeline.append((time.monotonic(), value))
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(stop()), asyncio.create_task(watch())]
    try:
        results = await closed_loop(spec(st), 16, duration_s=7)
    finally:
        done.set()
        await asyncio.gather(*tasks)
        st.router.signal(signal.SIGCONT)
    assert failures(results) == []
    hang_t = t0 + 2.0
    # Requests that waited out message_timeout are counted by Envoy; the count must stop
    # rising once the gRPC health check has taken the hung router out (< 2 s).
    rises = [t for (t, v), (_, prev) in zip(timeline[1:], timeline, strict=False) if v > prev]
    assert rises, "the hang slowed nothing: message_timeout was never hit"
    last = max(rises) - hang_t
    assert last < 2.0, f"requests still waited for the hung router {last:.2f}s after the hang"
    report(
        "router hung",
        requests=len(results),
        failed=0,
        message_timeouts=timeline[-1][1],
        last_timeout_seen_after_hang_s=round(last, 2),
        fail_open=st.envoy_stat("http.ingress.ext_proc.failure_mode_allowed"),
    )


async def test_router_sigterm_drains_and_exits_0(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3)
    drain = st.config.router.drain_seconds
    t0 = time.monotonic()
    exit_info: dict[str, float] = {}

    async def term() -> None:
        await at(t0, 1.5)
        assert st.router is not None
        sent = time.monotonic()
        st.router.signal(signal.SIGTERM)
        rc = await asyncio.to_thread(st.router.proc.wait, drain + 5)
        exit_info.update(rc=rc, took=time.monotonic() - sent)

    task = asyncio.create_task(term())
    results = await closed_loop(spec(st), 16, duration_s=6)
    await task
    assert failures(results) == []
    assert exit_info["rc"] == 0
    assert exit_info["took"] <= drain + 1.0
    report("router SIGTERM", requests=len(results), failed=0, exit_s=round(exit_info["took"], 2))


async def test_router_restart_serves_only_when_ready(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3)
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    async def restart() -> None:
        await at(t0, 1.0)
        assert st.router is not None
        st.router.signal(signal.SIGKILL)
        await asyncio.to_thread(st.router.proc.wait, 5)
        await asyncio.sleep(1.0)
        st.start_router()
        await asyncio.to_thread(st.wait_router_serving, 15)
        marks["serving"] = time.monotonic()

    task = asyncio.create_task(restart())
    results = await closed_loop(spec(st), 16, duration_s=7)
    await task
    assert failures(results) == []
    serving = marks["serving"]
    routed_again = [r for r in results if r.strategy and r.started > t0 + 1.2]
    assert routed_again, "the restarted router never routed"
    # The first request routed by the new process cannot predate its SERVING (plus the
    # health-check delay Envoy needs to see it, which only makes it later).
    assert min(r.started for r in routed_again) > serving - 0.5
    text = st.router_metrics()
    assert 'outcome="not_ready"' not in text or 'outcome="not_ready"} 0.0' in text
    report("router restart", requests=len(results), failed=0)


async def test_envoy_feedback_removes_killed_pod_within_1s(make_stack) -> None:  # type: ignore[no-untyped-def]
    # Scraping every 5 s cannot notice the kill within 1 s: only Envoy's access log can.
    st = make_stack(
        pods=3,
        strategy="round-robin",
        router_overrides={"scrape": {"interval_s": 5.0, "stale_after_s": 30}},
    )
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    victim = st.pods["pod-2"]
    seen: list[tuple[float, str]] = []
    results: list[Result] = []

    async def kill() -> None:
        await at(t0, 1.0)
        await asyncio.to_thread(st.control, "POST", "/pods/pod-2/kill")

    task = asyncio.create_task(kill())
    import aiohttp

    async with aiohttp.ClientSession() as s:

        async def worker() -> None:
            while time.monotonic() < t0 + 4.0:
                started = time.monotonic()
                async with s.post(
                    st.url + "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
                ) as r:
                    await r.read()
                    results.append(Result(r.status == 200, r.status, "", 0, started))
                    seen.append((started, r.headers.get(TARGET_POD_HEADER, "")))

        await asyncio.gather(*(worker() for _ in range(8)))
    await task
    kill_t = t0 + 1.0
    assert all(r.ok for r in results)
    late = [hdr for started, hdr in seen if started > kill_t + 1.0]
    assert late and all(victim not in hdr for hdr in late), "killed pod still in answers"
    first_clean = min(
        (started for started, hdr in seen if started > kill_t and victim not in hdr), default=0
    )
    log = (st.workdir / "router.log").read_text()
    assert "Envoy" in log and "unreachable" in log
    report("envoy feedback", removed_after_s=round(first_clean - kill_t, 3), requests=len(seen))


async def test_killed_pod_returns_and_gets_traffic(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, strategy="round-robin")
    await asyncio.to_thread(st.control, "POST", "/pods/pod-0/kill")
    r1 = await closed_loop(spec(st), 8, duration_s=2)
    assert failures(r1) == [] and not any(r.served_by == "pod-0" for r in r1[len(r1) // 2 :])
    await asyncio.to_thread(st.control, "POST", "/pods/pod-0/revive")
    await asyncio.sleep(3 * st.config.scrape.interval_s + 0.5)
    r2 = await closed_loop(spec(st), 8, duration_s=2)
    assert failures(r2) == []
    share = sum(r.served_by == "pod-0" for r in r2) / len(r2)
    assert share > 0.2, share
    log = (st.workdir / "router.log").read_text()
    assert "re-admitted" in log


def test_demo_with_pod_kill_json(tmp_path: Path) -> None:
    cmd = ["demo", "--pods", "4", "--duration", "20", "--kill-pod-after", "5", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["requests_failed"] == 0, summary
    assert summary["requests_total"] > 500
    assert any("killed" in e for e in summary["events"])
    report(
        "demo --kill-pod-after 5",
        requests=summary["requests_total"],
        failed=summary["requests_failed"],
        envoy_retries=summary["envoy_retries"],
    )


async def test_pod_process_sigkill_under_load(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A literal kill -9: the favoured pod runs in its own simulator process.

    Three slow pods share the stack's simulator; one fast pod runs alone in a second simulator
    process, so least-request favours it. SIGKILL of that process mid-load must cost nothing.
    """
    import os

    import yaml

    from router_ext.harness.stack import ChildProcess

    st = make_stack(
        pods=3,
        strategy="least-request",
        sim_args=["--speeds", "0.4,0.4,0.4"],
        # The fast pod joins after start; no slow start here, this test is about the kill.
        router_overrides={"routing": {"slow_start_s": 0}},
    )
    solo_cmd = ["sim", "--pods", "1", "--names-prefix", "fast-", "--base-port", "0"]
    solo = ChildProcess(
        "solo",
        [sys.executable, "-m", "router_ext.app.cli", *solo_cmd, "--control-port", "0"],
        tmp_path / "solo.log",
        stdout_pipe=True,
    )
    try:
        ready = json.loads(Stack._read_line(solo, time.monotonic() + 15))
        fast_addr = ready["pods"]["fast-0"]
        host, port = fast_addr.rsplit(":", 1)
        doc = yaml.safe_load(st.pods_file.read_text())
        doc["pods"].append({"name": "fast-0", "address": host, "port": int(port)})
        tmp = st.pods_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        os.replace(tmp, st.pods_file)
        st.pods["fast-0"] = fast_addr
        await asyncio.to_thread(st.wait_envoy_membership, 4, 10)
        await asyncio.sleep(2 * st.config.scrape.interval_s)
        served: Counter[str] = Counter()
        t0 = time.monotonic()

        async def kill() -> None:
            await at(t0, 1.5)
            solo.signal(signal.SIGKILL)

        task = asyncio.create_task(kill())
        results = await closed_loop(
            spec(st), 32, total=1200, on_result=lambda r: served.update([r.served_by])
        )
        await task
    finally:
        solo.stop()
    assert failures(results) == []
    before = Counter(r.served_by for r in results if r.started < t0 + 1.4)
    assert before.most_common(1)[0][0] == "fast-0", before  # it was the favoured pod
    after = [r for r in results if r.started > t0 + 2.5]
    assert after and all(r.served_by != "fast-0" for r in after)
    report(
        "pod process SIGKILL",
        requests=len(results),
        failed=0,
        favoured_share_before=round(before["fast-0"] / sum(before.values()), 2),
        envoy_retries=st.envoy_stat("cluster.pods.upstream_rq_retry"),
    )
