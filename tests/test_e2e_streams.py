"""Streams and pod shutdown through the real request path (simulator, router-ext, Envoy 1.40).

Envoy can retry a request only until the pod's response headers have gone to the client. A
streaming request gets its 200 as soon as the engine accepts it (vLLM does this, and so does
the simulator), so a crash cuts every stream on that pod: some mid-way, some with nothing but
headers. The client sees a truncated 200; Envoy sees `upstream_reset_after_response_started`,
and router-ext counts it in `router_ext_streams_cut_total` from the access log.

A planned shutdown (SIGTERM, as vLLM handles it: stop accepting, finish in-flight, exit) must
cut nothing: new requests are refused at connect time, which Envoy retries on a fallback.

The busiest pod runs alone in its own simulator process, so the test sends it a real SIGKILL
or SIGTERM; the stack's other pods are slower, so least-request favours the lone one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router_ext.config import SERVED_BY_HEADER
from router_ext.harness.stack import ChildProcess, Stack
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy, pytest.mark.timeout(120)]

SOLO = "solo-0"
CONCURRENCY = 64
REQUESTS = 800
MAX_TOKENS = 24  # ~0.12 s of tokens at 5 ms each: long enough that a pod holds many streams


def report(name: str, **numbers: object) -> None:
    # Shown with `pytest -s`; the numbers quoted in the report come from these lines.
    print(f"\n[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@dataclass
class StreamResult:
    status: int  # 0: no response headers at all
    served_by: str
    done: bool  # saw `data: [DONE]` and the chunked body ended cleanly
    started: float
    chunks: int = 0  # SSE data events received
    error: str = ""

    @property
    def cut(self) -> bool:
        """Headers arrived (200) but the stream did not finish: what a crash does."""
        return self.status == 200 and not self.done

    @property
    def failed(self) -> bool:
        """Anything but a complete stream (cut, or an error before/instead of a 200)."""
        return not (self.status == 200 and self.done)


class StreamLoad:
    """Closed loop of streaming chat requests; tracks which pod holds how many open streams."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[StreamResult] = []
        self.open_by_pod: dict[str, int] = {}

    async def one(self, session: aiohttp.ClientSession) -> StreamResult:
        body = {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
        }
        t0 = time.monotonic()
        status, pod, done, chunks = 0, "", False, 0
        try:
            async with session.post(self.url, json=body) as resp:
                status, pod = resp.status, resp.headers.get(SERVED_BY_HEADER, "")
                self.open_by_pod[pod] = self.open_by_pod.get(pod, 0) + 1
                try:
                    async for line in resp.content:
                        chunks += line.startswith(b"data: ")
                        if line.startswith(b"data: [DONE]"):
                            done = True
                finally:
                    self.open_by_pod[pod] -= 1
            return StreamResult(status, pod, done and status == 200, t0, chunks)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return StreamResult(status, pod, False, t0, chunks, f"{type(e).__name__}: {e}")

    async def run(self, total: int, concurrency: int) -> list[StreamResult]:
        sent = 0
        conn = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=30)  # bounds every request in time
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

            async def worker() -> None:
                nonlocal sent
                while sent < total:  # bounded in count
                    sent += 1
                    self.results.append(await self.one(session))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return self.results


def metric_sum(text: str, family: str) -> float:
    """Sum of every sample of a counter family (all label values) in Prometheus text."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            total += sum(s.value for s in fam.samples if s.name == f"{family}_total")
    return total


def cut_by_reason(text: str) -> dict[str, float]:
    for fam in text_string_to_metric_families(text):
        if fam.name == "router_ext_streams_cut":
            return {s.labels["reason"]: s.value for s in fam.samples if s.name.endswith("_total")}
    return {}


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def entries_arrived(st: Stack, before: float, n: int) -> str:
    """Router metrics once Envoy's access log has delivered an entry for each of `n` requests
    (flushed every 100 ms): only then can the cut counter be compared with the client."""
    deadline = time.monotonic() + 15
    while True:
        text = await asyncio.to_thread(st.router_metrics)
        got = metric_sum(text, "router_ext_access_log_entries") - before
        if got >= n:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"only {got:.0f} of {n} access-log entries reached the router")
        await asyncio.sleep(0.05)


def start_solo(st: Stack, workdir: Path) -> ChildProcess:
    """The favoured pod in a simulator process of its own, added to the stack's pods file."""
    cmd = [
        sys.executable, "-m", "router_ext.app.cli", "sim",
        "--pods", "1", "--names-prefix", "solo-", "--base-port", "0", "--control-port", "0",
        "--max-running", "16",
        "--grace", "30",
    ]  # fmt: skip
    solo = ChildProcess("solo", cmd, workdir / "solo.log", stdout_pipe=True)
    ready = json.loads(Stack._read_line(solo, time.monotonic() + 15))
    addr = ready["pods"][SOLO]
    host, port = addr.rsplit(":", 1)
    doc = yaml.safe_load(st.pods_file.read_text())
    doc["pods"].append({"name": SOLO, "address": host, "port": int(port)})
    tmp = st.pods_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, st.pods_file)  # atomic: the router never reads half a file
    st.pods[SOLO] = addr
    st.wait_envoy_membership(4, 10)
    return solo


async def solo_under_load(
    make_stack: Callable[..., Stack], tmp_path: Path, sig: signal.Signals
) -> tuple[Stack, ChildProcess, list[StreamResult], dict[str, float], float]:
    """Load the stack, send `sig` to the solo pod while it holds many open streams."""
    st = make_stack(
        pods=3,
        strategy="least-request",
        sim_args=["--speeds", "0.4,0.4,0.4"],
        # The solo pod joins after start; no slow start, this test is about its shutdown.
        router_overrides={"routing": {"slow_start_s": 0}},
    )
    solo = start_solo(st, tmp_path)
    # Its first good scrape, so the router routes to it as a warm pod.
    await wait_for(lambda: f'pod="{SOLO}",state="warm"' in st.router_metrics(), 10, "solo pod warm")
    before = metric_sum(await asyncio.to_thread(st.router_metrics), "router_ext_access_log_entries")
    cut_before = sum(cut_by_reason(await asyncio.to_thread(st.router_metrics)).values())
    load = StreamLoad(st.url + "/v1/chat/completions")
    task = asyncio.create_task(load.run(REQUESTS, CONCURRENCY))
    # Signal only once the pod is busy: at least a second of load and many streams open on it.
    t_start = time.monotonic()
    await wait_for(
        lambda: time.monotonic() - t_start > 1.0 and load.open_by_pod.get(SOLO, 0) >= 8,
        20,
        "open streams on the solo pod",
    )
    open_at_signal = load.open_by_pod.get(SOLO, 0)
    t_sig = time.monotonic()
    solo.signal(sig)
    results = await task
    text = await entries_arrived(st, before, len(results))
    cut_after = cut_by_reason(text)
    assert len(results) == REQUESTS
    info = {
        "cut_metric": sum(cut_after.values()) - cut_before,
        "open_at_signal": float(open_at_signal),
        "t_sig": t_sig,
    }
    return st, solo, results, {**info, **{f"reason_{k}": v for k, v in cut_after.items()}}, t_sig


async def test_sigkill_cut_streams_match_the_counter(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    st, solo, results, info, t_kill = await solo_under_load(make_stack, tmp_path, signal.SIGKILL)
    try:
        await asyncio.to_thread(solo.proc.wait, 5)
    finally:
        solo.stop()
    cut = [r for r in results if r.cut]
    other = [r for r in results if r.failed and not r.cut]
    # The kill cut streams the pod had already answered with 200: Envoy could not retry them.
    assert cut, "the kill cut no stream: it happened while the pod held none"
    assert all(r.served_by == SOLO and r.started < t_kill for r in cut), cut[:5]
    # Every cut the client saw is in the router's counter, and nothing else is.
    assert info["cut_metric"] == len(cut), (info, len(cut))
    before = [r for r in results if r.started < t_kill]
    report(
        "SIGKILL of the busiest pod, streaming",
        requests=len(results),
        concurrency=CONCURRENCY,
        solo_share_before=round(sum(r.served_by == SOLO for r in before) / len(before), 2),
        open_on_pod_at_kill=int(info["open_at_signal"]),
        client_cut=len(cut),
        client_cut_headers_only=sum(r.chunks == 0 for r in cut),
        client_other_failures=len(other),
        metric_cut=int(info["cut_metric"]),
        reasons={k[7:]: int(v) for k, v in info.items() if k.startswith("reason_") and v},
        envoy_retries=st.envoy_stat("cluster.pods.upstream_rq_retry"),
    )
    # A request the pod had not answered yet was retried on another pod (before headers).
    assert other == [], [f"{r.status} {r.error}" for r in other[:5]]


async def test_sigterm_drains_streams_without_cutting_any(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    st, solo, results, info, t_term = await solo_under_load(make_stack, tmp_path, signal.SIGTERM)
    try:
        # Planned shutdown: the process exits on its own once its streams are done.
        rc = await asyncio.to_thread(solo.proc.wait, 35)
    finally:
        solo.stop()
    log = solo.log_path.read_text()
    failed = [r for r in results if r.failed]
    assert failed == [], [f"{r.status} {r.served_by} {r.error}" for r in failed[:5]]
    assert info["cut_metric"] == 0
    assert rc == 0
    assert "0 requests cut" in log
    late = [r for r in results if r.started > t_term + 1.0]
    assert late and all(r.served_by != SOLO for r in late)
    report(
        "SIGTERM of the busiest pod, streaming",
        requests=len(results),
        concurrency=CONCURRENCY,
        open_on_pod_at_term=int(info["open_at_signal"]),
        failed=len(failed),
        cut=sum(r.cut for r in results),
        metric_cut=int(info["cut_metric"]),
        envoy_retries=st.envoy_stat("cluster.pods.upstream_rq_retry"),
        drained_line=next((ln for ln in log.splitlines() if "requests in flight" in ln), "")[-60:],
    )
