"""Router replicas active-active behind one Envoy (issue 13), against a real Envoy.

Two `router-ext serve` processes, each an ext_proc endpoint of Envoy's router cluster with its
own access logger: each must receive every request's access-log entry, and SIGKILL of one under
load must cost no request (its streams fail open for the moment until Envoy's gRPC health check
takes it out; from then on the survivor routes everything). Waits are on observable state
(metrics, Envoy's cluster view, results), each with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_ext.envoy_adapter.envoy_config import CLUSTER_ROUTER
from router_ext.harness.loadgen import LoadSpec, Result, closed_loop
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]

ENTRIES = "router_ext_access_log_entries"
DECISIONS = "router_ext_decisions"


def spec(st: Stack, max_tokens: int = 8) -> LoadSpec:
    return LoadSpec(url=st.url + "/v1/chat/completions", max_tokens=max_tokens, timeout_s=20)


def failures(results: list[Result]) -> list[str]:
    return [f"{r.status} {r.error or r.body[:200]}" for r in results if not r.ok]


def counter(text: str, family: str) -> float:
    """Sum of a counter family's samples (every label value) in Prometheus text."""
    return _labelled_text(text, family)


def replica_counter(st: Stack, i: int, family: str) -> float:
    return counter(st.router_metrics_of(i), family)


async def until(what: str, pred: Callable[[], bool], timeout: float) -> float:
    """Poll `pred` (in a thread: it may do I/O) until true; the time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def report(name: str, **numbers: object) -> None:
    print(f"\n[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


async def test_every_replica_receives_every_access_log_entry(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, routers=2)
    before = [replica_counter(st, i, ENTRIES) for i in range(2)]
    decided0 = [replica_counter(st, i, DECISIONS) for i in range(2)]
    results = await closed_loop(spec(st), 4, total=60)
    assert failures(results) == []
    n = len(results)

    def all_logged() -> bool:
        return all(replica_counter(st, i, ENTRIES) - before[i] >= n for i in range(2))

    try:
        await until(f"{n} access-log entries on both replicas", all_logged, 5.0)
    finally:
        got = [replica_counter(st, i, ENTRIES) - before[i] for i in range(2)]
        decided = [replica_counter(st, i, DECISIONS) - decided0[i] for i in range(2)]
        report("replicas access log", requests=n, entries=got, decided=decided)
    # Envoy spreads the ext_proc streams over both: each replica decided some of them.
    assert all(d > 0 for d in decided), decided


async def test_one_of_two_replicas_sigkilled_under_load_no_failures(make_stack) -> None:  # type: ignore[no-untyped-def]
    st = make_stack(pods=3, routers=2)
    victim, survivor = st.router_grpc_of(0), st.router_grpc_of(1)
    done: list[Result] = []
    warm = asyncio.Event()

    def on_result(r: Result) -> None:
        done.append(r)
        if len(done) >= 150:
            warm.set()

    def victim_out() -> bool:
        flags = st.envoy.cluster_hosts(CLUSTER_ROUTER).get(victim, {}).get("health_flags", "")
        return "/failed_active_hc" in flags

    marks: dict[str, float] = {}

    async def kill() -> None:
        await warm.wait()  # both replicas are routing under load
        marks["decided_before"] = await asyncio.to_thread(replica_counter, st, 1, DECISIONS)
        marks["kill"] = time.monotonic()
        await asyncio.to_thread(st.kill_router, 0)
        marks["out"] = await until("Envoy to mark the killed replica unhealthy", victim_out, 3.0)

    task = asyncio.create_task(kill())
    results = await closed_loop(spec(st), 16, duration_s=5, on_result=on_result)
    await task
    assert failures(results) == []
    assert "kill" in marks and marks["kill"] < results[-1].started, "load ended before the kill"
    # Once Envoy has taken the dead replica out, the survivor routes every request.
    after = [r for r in results if r.started > marks["out"] + 0.2]
    assert len(after) > 50, len(after)
    assert all(r.strategy for r in after), sum(not r.strategy for r in after)
    assert replica_counter(st, 1, DECISIONS) - marks["decided_before"] >= len(after)
    healthy = st.envoy.cluster_hosts(CLUSTER_ROUTER)[survivor]["health_flags"]
    assert "/failed_active_hc" not in healthy
    report(
        "replica SIGKILL",
        requests=len(results),
        failed=0,
        out_after_s=round(marks["out"] - marks["kill"], 3),
        failed_open=sum(1 for r in results if not r.strategy),
        after_out=len(after),
    )


def test_demo_two_routers_kill_one_json(tmp_path: Path) -> None:
    # The acceptance command as a user types it: no --duration, so --json runs its default 20 s
    # and ends by itself.
    cmd = ["demo", "--routers", "2", "--kill-router-after", "5", "--json"]
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
    assert summary["routers"] == 2 and summary["routers_killed"] == 1
    assert any("replica 0" in e and "killed" in e for e in summary["events"])
    alive = [r["alive"] for r in summary["per_router"]]
    assert alive == [False, True], summary["per_router"]
    assert summary["per_router"][1]["decided"] > 0
    report(
        "demo --routers 2 --kill-router-after 5 --json",
        requests=summary["requests_total"],
        failed=summary["requests_failed"],
        per_router=summary["per_router"],
        fail_open=summary["ext_proc_failure_mode_allowed"],
    )


async def test_two_replicas_keep_each_prefix_on_one_pod(make_stack) -> None:  # type: ignore[no-untyped-def]
    # Prefix groups sent through Envoy, whose ext_proc streams alternate between the two
    # replicas: each replica decides about half of every group, and still every group stays on
    # one pod, because each learns the other's placements from the access log (and a group
    # neither has seen yet goes to its first block's ring owner on both).
    import aiohttp

    from router_ext.harness.loadgen import send_item
    from router_ext.harness.workloads import CHAT_PATH, WorkItem

    st = make_stack(pods=4, routers=2, strategy="prefix-aware")

    def item(g: int, q: int) -> WorkItem:
        doc = f"group {g} reference document. " * 120  # ~3,600 characters: 14 blocks
        body = json.dumps(
            {
                "model": "sim-model",
                "messages": [
                    {"role": "system", "content": doc},
                    {"role": "user", "content": f"q{q}"},
                ],
                "max_tokens": 2,
            }
        ).encode()
        return WorkItem(CHAT_PATH, body, (), "sim-model", f"g{g}", 2)

    served: dict[int, set[str]] = {}
    async with aiohttp.ClientSession() as http:
        for q in range(8):
            rs = await asyncio.gather(
                *(send_item(http, st.url + CHAT_PATH, item(g, q)) for g in range(6))
            )
            for g, r in enumerate(rs):
                assert r.ok, (r.status, r.body[:200])
                served.setdefault(g, set()).add(r.served_by)
    decided = [replica_counter(st, i, DECISIONS) for i in range(2)]

    def peers_learned() -> bool:
        return all(
            _labelled(st, i, "router_ext_replication_entries", kind="placed", origin="peer") > 0
            for i in range(2)
        )

    await until("each replica to count the other's placements", peers_learned, 5.0)
    report(
        "replica prefix agreement",
        pods_per_group=[len(s) for s in served.values()],
        decided=decided,
    )
    assert all(d > 0 for d in decided), decided
    assert all(len(s) == 1 for s in served.values()), served
    for i in range(2):
        text = st.router_metrics_of(i)
        assert _labelled_text(text, "router_ext_replication_ignored", reason="duplicate") == 0
        assert _labelled_text(text, "router_ext_replication_ignored", reason="bad_prefix") == 0


def _labelled_text(text: str, family: str, **labels: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == family
        for s in fam.samples
        if s.name == f"{family}_total" and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _labelled(st: Stack, i: int, family: str, **labels: str) -> float:
    return _labelled_text(st.router_metrics_of(i), family, **labels)
