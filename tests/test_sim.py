"""Simulator behaviour as a client, a scraper or a test harness sees it (real loopback sockets).

Every test binds ephemeral ports on 127.0.0.1 and bounds its loops, so the file runs in a few
seconds and in parallel with other suites.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router_ext.config import SERVED_BY_HEADER
from router_ext.harness.sim import (
    ControlServer,
    SimFleet,
    SimPodConfig,
    SimStateError,
    UnknownPodError,
    add_sim_arguments,
    parse_fault,
)
from router_ext.harness.sim.faults import FaultStep, check_targets, run_schedule
from router_ext.harness.sim.metrics import observe_many

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[SimFleet]:
    f = SimFleet(pods_file=tmp_path / "pods.yaml", seed=7)
    yield f
    await f.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def url(fleet: SimFleet, name: str, path: str) -> str:
    return f"http://{fleet.pods[name].address}{path}"


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """Parse an SSE body strictly: every event is one `data: ...` line plus a blank line."""
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events: list[Any] = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def scrape(http: aiohttp.ClientSession, fleet: SimFleet, name: str) -> dict[str, float]:
    """/metrics as {sample name + sorted labels: value}, via the official parser."""
    async with http.get(url(fleet, name, "/metrics")) as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{", 1)[0] == name)


async def first_token_time(http: aiohttp.ClientSession, address: str) -> float:
    """Seconds until the first content chunk of a streaming completion arrives."""
    t0 = time.monotonic()
    body = {"prompt": "hi", "max_tokens": 2, "stream": True}
    async with http.post(f"http://{address}/v1/completions", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: {"):
                return time.monotonic() - t0
    raise AssertionError("stream had no token")


# --- OpenAI API ------------------------------------------------------------------------------


async def test_chat_and_completions_json(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200
        assert r.headers[SERVED_BY_HEADER] == "pod-0"
        body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "sim-model"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens"] >= 3

    req = {"model": "sim-model", "prompt": "x" * 400, "max_tokens": 3}
    async with http.post(url(fleet, "pod-0", "/v1/completions"), json=req) as r:
        assert r.status == 200 and r.headers[SERVED_BY_HEADER] == "pod-0"
        body = await r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].strip()
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}
    assert fleet.pods["pod-0"].served == 2


async def test_streaming_sse(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=req) as r:
        assert r.status == 200
        assert r.headers[SERVED_BY_HEADER] == "pod-0"
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(content) == 5 and all(content)
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:]] == [None] * 4 + ["length"]
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 5

    req = {"prompt": "hi", "max_tokens": 4, "stream": True}
    async with http.post(url(fleet, "pod-0", "/v1/completions"), json=req) as r:
        assert r.headers[SERVED_BY_HEADER] == "pod-0"
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    assert [e["object"] for e in events[:-1]] == ["text_completion"] * 4
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_models_health_and_errors(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0", model="m1")])
    async with http.get(url(fleet, "pod-0", "/v1/models")) as r:
        assert (await r.json())["data"][0]["id"] == "m1"
    async with http.get(url(fleet, "pod-0", "/health")) as r:
        assert r.status == 200 and await r.read() == b""

    async with http.post(
        url(fleet, "pod-0", "/v1/chat/completions"), json={**CHAT, "model": "nope"}
    ) as r:
        assert r.status == 404
        assert r.headers[SERVED_BY_HEADER] == "pod-0"
        err = (await r.json())["error"]
    assert err["code"] == 404 and err["type"] == "NotFoundError" and "nope" in err["message"]

    async with http.post(url(fleet, "pod-0", "/v1/completions"), data=b"{not json") as r:
        assert r.status == 400 and r.headers[SERVED_BY_HEADER] == "pod-0"
        assert (await r.json())["error"]["type"] == "BadRequestError"
    async with http.post(url(fleet, "pod-0", "/v1/completions"), json={"max_tokens": 2}) as r:
        assert r.status == 400  # no prompt
    async with http.post(
        url(fleet, "pod-0", "/v1/completions"), json={"prompt": "a", "max_tokens": 0}
    ) as r:
        assert r.status == 400

    fleet.set_ready("pod-0", False)
    async with http.get(url(fleet, "pod-0", "/health")) as r:
        assert r.status == 503
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200  # not ready is a discovery/health flag only


# --- metrics and load model -----------------------------------------------------------------


async def test_metrics_are_vllm_v1(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0", num_engines=2)])
    for _ in range(3):
        async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
            assert r.status == 200
    async with http.get(url(fleet, "pod-0", "/metrics")) as r:
        assert r.headers[SERVED_BY_HEADER] == "pod-0"
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for gauge in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert families[gauge].type == "gauge"
        assert {s.labels["engine"] for s in families[gauge].samples} == {"0", "1"}
        assert all(s.labels["model_name"] == "sim-model" for s in families[gauge].samples)
    for counter in (
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:num_preemptions",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
    ):
        assert families[counter].type == "counter"
        assert f"{counter}_total" in text and f"{counter}_created" in text
    for hist in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:inter_token_latency_seconds",
    ):
        assert families[hist].type == "histogram"
    assert 'vllm:cache_config_info{block_size="16"' in text
    m = await scrape(http, fleet, "pod-0")
    assert total(m, "vllm:request_success_total") == 3
    assert (
        m["vllm:request_success_total{engine=0,finished_reason=length,model_name=sim-model}"]
        + (m["vllm:request_success_total{engine=1,finished_reason=length,model_name=sim-model}"])
        == 3
    )
    assert total(m, "vllm:generation_tokens_total") == 15
    assert total(m, "vllm:time_to_first_token_seconds_count") == 3
    assert total(m, "vllm:inter_token_latency_seconds_count") == 12  # 4 gaps x 3


async def test_load_queues_and_slows_down(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    cfg = SimPodConfig(name="pod-0", max_running=2, ttft_ms=20, tpot_ms=5, kv_blocks=64)
    await fleet.start([cfg])
    pod = fleet.pods["pod-0"]
    idle_ttft = await first_token_time(http, pod.address)

    body = {"prompt": "y" * 800, "max_tokens": 40}
    load = [
        asyncio.create_task(http.post(url(fleet, "pod-0", "/v1/completions"), json=body))
        for _ in range(8)
    ]
    for _ in range(100):  # until all 8 arrived
        if pod.running + pod.waiting == 8:
            break
        await asyncio.sleep(0.01)
    m = await scrape(http, fleet, "pod-0")
    assert total(m, "vllm:num_requests_running") == 2
    assert total(m, "vllm:num_requests_waiting") == 6
    assert total(m, "vllm:kv_cache_usage_perc") > 0
    loaded_ttft = await first_token_time(http, pod.address)  # queues behind the 6
    assert loaded_ttft > 3 * idle_ttft
    for resp in await asyncio.gather(*load):
        assert resp.status == 200
        resp.release()
    m = await scrape(http, fleet, "pod-0")
    assert total(m, "vllm:num_requests_waiting") == 0
    assert total(m, "vllm:kv_cache_usage_perc") == 0
    assert total(m, "vllm:request_queue_time_seconds_sum") > 0
    # Every token after a request's first is one inter-token latency observation.
    assert total(m, "vllm:inter_token_latency_seconds_count") == total(
        m, "vllm:generation_tokens_total"
    ) - total(m, "vllm:time_to_first_token_seconds_count")
    assert total(m, "vllm:request_success_total") == 10  # 8 "length" + 2 "abort" (closed early)


async def test_speed_and_slow_fault(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="fast"), SimPodConfig(name="half", speed=0.5)])

    async def e2e(name: str) -> float:
        t0 = time.monotonic()
        body = {"prompt": "hi", "max_tokens": 10}
        async with http.post(url(fleet, name, "/v1/completions"), json=body) as r:
            assert r.status == 200
        return time.monotonic() - t0

    fast = await e2e("fast")
    assert await e2e("half") > 1.5 * fast
    fleet.slow("fast", 4)
    assert await e2e("fast") > 2.5 * fast


async def test_kv_pressure_preempts_but_finishes(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0", max_running=4, kv_blocks=6, tpot_ms=1)])
    body = {"prompt": "z" * 60, "max_tokens": 40}  # 15 prompt tokens, grows to 4 blocks
    rs = await asyncio.gather(
        *(http.post(url(fleet, "pod-0", "/v1/completions"), json=body) for _ in range(4))
    )
    for r in rs:
        assert r.status == 200
        assert (await r.json())["usage"]["completion_tokens"] == 40
    m = await scrape(http, fleet, "pod-0")
    assert total(m, "vllm:num_preemptions_total") > 0
    assert total(m, "vllm:kv_cache_usage_perc") == 0
    assert total(m, "vllm:generation_tokens_total") == 160
    assert total(m, "vllm:inter_token_latency_seconds_count") == 4 * 39  # one per later token


async def test_prefix_cache_hits_on_repeated_prompt(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])
    body = {"prompt": "shared system prompt " * 40, "max_tokens": 1}
    for _ in range(2):
        async with http.post(url(fleet, "pod-0", "/v1/completions"), json=body) as r:
            assert r.status == 200
    m = await scrape(http, fleet, "pod-0")
    assert total(m, "vllm:prefix_cache_queries_total") == 2 * 210
    assert total(m, "vllm:prefix_cache_hits_total") >= 192


def test_observe_many_matches_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    texts = []
    for batch in (True, False):
        reg = CollectorRegistry()
        h = Histogram("h", "h", buckets=(0.1, 1.0), registry=reg)
        if batch:
            observe_many(h, 0.5, 7)
        else:
            for _ in range(7):
                h.observe(0.5)
        texts.append(
            b"\n".join(x for x in generate_latest(reg).split(b"\n") if b"_created" not in x)
        )
    assert texts[0] == texts[1]


# --- faults ---------------------------------------------------------------------------------


async def test_metrics_cold_start_delay(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0", metrics_delay_s=0.3)])
    async with http.get(url(fleet, "pod-0", "/metrics")) as r:
        assert r.status == 503
        assert "metrics not ready" in await r.text()
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200  # serving before its metrics exist: the cold-start window
    await asyncio.sleep(0.35)
    async with http.get(url(fleet, "pod-0", "/metrics")) as r:
        assert r.status == 200


async def test_kill_resets_inflight_and_refuses_then_revive(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0"), SimPodConfig(name="pod-1")])
    pod = fleet.pods["pod-1"]
    port = pod.port
    body = {"prompt": "hi", "max_tokens": 2000, "stream": True}
    resp = await http.post(url(fleet, "pod-1", "/v1/completions"), json=body)
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # a token arrived: the stream is in flight
    await fleet.kill("pod-1")
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        while True:  # bounded by the session timeout
            if not await resp.content.read(65536):
                pytest.fail("stream ended cleanly after kill")
    resp.release()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.post(url(fleet, "pod-1", "/v1/chat/completions"), json=CHAT)
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200  # the rest of the fleet is unaffected

    with pytest.raises(SimStateError):
        await fleet.kill("pod-1")
    await fleet.revive("pod-1")
    assert pod.port == port and pod.state == "up"
    async with http.post(url(fleet, "pod-1", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200 and r.headers[SERVED_BY_HEADER] == "pod-1"
    m = await scrape(http, fleet, "pod-1")
    assert total(m, "vllm:request_success_total") == 1  # fresh process, fresh counters


async def test_hang_accepts_but_never_answers(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])
    pod = fleet.pods["pod-0"]
    async with http.get(url(fleet, "pod-0", "/health")) as r:  # leaves a keep-alive connection
        assert r.status == 200
    await fleet.hang("pod-0")
    assert pod.state == "hung"

    reader, writer = await asyncio.open_connection("127.0.0.1", pod.port)  # connect succeeds
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)

    short = aiohttp.ClientTimeout(total=0.5)
    for path in ("/metrics", "/health"):
        with pytest.raises(asyncio.TimeoutError):
            await http.get(url(fleet, "pod-0", path), timeout=short)
    async with aiohttp.ClientSession(timeout=short) as fresh:
        with pytest.raises(asyncio.TimeoutError):
            await fresh.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT)

    # A request sent while hung is answered once the pod resumes.
    pending = asyncio.create_task(http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT))
    await asyncio.sleep(0.1)
    assert not pending.done()
    await fleet.unhang("pod-0")
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 200
    resp.release()
    assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 5) == b"HTTP/1.1 200 OK\r\n"
    writer.close()


async def test_metrics_outage_and_fail_rate(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    fleet = SimFleet(seed=3)
    try:
        await fleet.start([SimPodConfig(name="a"), SimPodConfig(name="b", metrics_fail_rate=0.5)])
        fleet.set_metrics_outage(True)
        for name in ("a", "b"):
            async with http.get(url(fleet, name, "/metrics")) as r:
                assert r.status == 500
            async with http.post(url(fleet, name, "/v1/chat/completions"), json=CHAT) as r:
                assert r.status == 200
        fleet.set_metrics_outage(False)
        async with http.get(url(fleet, "a", "/metrics")) as r:
            assert r.status == 200
        statuses = []
        for _ in range(40):
            async with http.get(url(fleet, "b", "/metrics")) as r:
                statuses.append(r.status)
        assert set(statuses) == {200, 500}
    finally:
        await fleet.stop()


async def test_fail5xx(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])
    fleet.fail5xx("pod-0", 1.0)
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 500
        assert r.headers[SERVED_BY_HEADER] == "pod-0"
        err = (await r.json())["error"]
    assert err["code"] == 500 and err["message"]
    async with http.get(url(fleet, "pod-0", "/metrics")) as r:
        assert r.status == 200  # only inference fails
    fleet.fail5xx("pod-0", 0)
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200
    assert fleet.pods["pod-0"].errors == 1


async def test_seeded_fail_pattern_is_deterministic(http: aiohttp.ClientSession) -> None:
    patterns = []
    for _ in range(2):
        fleet = SimFleet(seed=42)
        await fleet.start([SimPodConfig(name="pod-0")])
        fleet.fail5xx("pod-0", 0.5)
        got = []
        for _ in range(16):
            async with http.post(
                url(fleet, "pod-0", "/v1/completions"), json={"prompt": "a", "max_tokens": 1}
            ) as r:
                got.append(r.status)
        await fleet.stop()
        patterns.append(got)
    assert patterns[0] == patterns[1] and set(patterns[0]) == {200, 500}


async def test_pods_file_follows_membership_and_flags(
    fleet: SimFleet, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    path = tmp_path / "pods.yaml"
    await fleet.start([SimPodConfig(name="pod-0"), SimPodConfig(name="pod-1")])

    def entries() -> dict[str, dict[str, Any]]:
        doc = yaml.safe_load(path.read_text())
        return {e["name"]: e for e in doc["pods"]}

    e = entries()
    assert list(e) == ["pod-0", "pod-1"]
    assert e["pod-0"] == {
        "name": "pod-0",
        "address": "127.0.0.1",
        "port": fleet.pods["pod-0"].port,
        "model": "sim-model",
        "models": ["sim-model"],
    }
    new = await fleet.add_pod(SimPodConfig(name="pod-9", metrics_delay_s=5))
    assert entries()["pod-9"]["port"] == new.port
    async with http.post(f"http://{new.address}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200 and r.headers[SERVED_BY_HEADER] == "pod-9"
    fleet.set_draining("pod-1", True)
    fleet.set_ready("pod-0", False)
    e = entries()
    assert e["pod-1"]["draining"] is True and e["pod-0"]["ready"] is False
    await fleet.kill("pod-1")
    assert "pod-1" in entries()  # discovery lags a crash: the router must notice on its own
    await fleet.remove_pod("pod-9")
    assert set(entries()) == {"pod-0", "pod-1"}
    with pytest.raises(UnknownPodError):
        await fleet.remove_pod("pod-9")
    assert not list(tmp_path.glob(".pods.yaml.*"))  # no temp files left behind


async def test_remove_pod_with_grace_finishes_inflight(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0", tpot_ms=2)])
    body = {"prompt": "hi", "max_tokens": 60}
    pending = asyncio.create_task(http.post(url(fleet, "pod-0", "/v1/completions"), json=body))
    await asyncio.sleep(0.05)
    await fleet.remove_pod("pod-0", grace_s=3)
    resp = await pending
    assert resp.status == 200
    assert (await resp.json())["usage"]["completion_tokens"] == 60


# --- control API, schedule, CLI -------------------------------------------------------------


async def test_control_api(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0"), SimPodConfig(name="pod-1")])
    control = ControlServer(fleet)
    port = await control.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with http.get(f"{base}/pods") as r:
            status = await r.json()
        assert status["pods"]["pod-0"]["state"] == "up"
        assert status["pods"]["pod-0"]["address"] == fleet.pods["pod-0"].address

        async with http.post(f"{base}/pods/pod-1/kill") as r:
            assert r.status == 200 and (await r.json())["state"] == "killed"
        async with http.post(f"{base}/pods/pod-1/kill") as r:
            assert r.status == 409
        async with http.post(f"{base}/pods/pod-1/revive") as r:
            assert (await r.json())["state"] == "up"
        async with http.post(f"{base}/pods/pod-0/slow?factor=3") as r:
            assert (await r.json())["slow_factor"] == 3
        async with http.post(f"{base}/pods/pod-0/fail5xx?rate=1") as r:
            assert r.status == 200
        async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
            assert r.status == 500
        async with http.post(f"{base}/pods/pod-0/draining?on=1") as r:
            assert (await r.json())["draining"] is True
        async with http.post(f"{base}/pods/pod-0/ready?on=0") as r:
            assert (await r.json())["ready"] is False
        async with http.post(f"{base}/metrics-outage?on=1") as r:
            assert (await r.json()) == {"metrics_outage": True}
        assert fleet.metrics_outage
        async with http.post(f"{base}/pods/pod-1/hang") as r:
            assert (await r.json())["state"] == "hung"
        async with http.post(f"{base}/pods/pod-1/unhang") as r:
            assert (await r.json())["state"] == "up"

        async with http.post(f"{base}/pods", json={"name": "pod-5", "max_running": 2}) as r:
            assert r.status == 201
            added = await r.json()
        async with http.post(f"http://{added['address']}/v1/chat/completions", json=CHAT) as r:
            assert r.headers[SERVED_BY_HEADER] == "pod-5"
        async with http.post(f"{base}/pods", json={"name": "pod-6", "ttft": 1}) as r:
            assert r.status == 400 and "ttft" in (await r.json())["error"]["message"]
        async with http.delete(f"{base}/pods/pod-5") as r:
            assert r.status == 200
        assert "pod-5" not in fleet.pods

        for method, path in (
            ("POST", "/pods/ghost/kill"),
            ("DELETE", "/pods/ghost"),
            ("POST", "/pods/ghost/slow?factor=2"),
        ):
            async with http.request(method, f"{base}{path}") as r:
                assert r.status == 404
                assert "ghost" in (await r.json())["error"]["message"]
        async with http.post(f"{base}/pods/pod-0/slow?factor=abc") as r:
            assert r.status == 400
    finally:
        await control.stop()


def test_fault_spec_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_fault("kill:pod-1@5") == FaultStep(5.0, "kill", "pod-1")
    assert parse_fault("revive:pod-1@12.5") == FaultStep(12.5, "revive", "pod-1")
    assert parse_fault("hang:pod-2@3") == FaultStep(3.0, "hang", "pod-2")
    assert parse_fault("outage:on@4") == FaultStep(4.0, "outage", "on")
    assert parse_fault("outage:off@9").target == "off"
    assert parse_fault("add:pod-9@6") == FaultStep(6.0, "add", "pod-9")
    assert parse_fault("slow:pod-0=3@2").value == 3.0
    assert parse_fault("fail5xx:pod-0@2").value == 1.0
    assert parse_fault("ready:pod-1=0@4").value == 0.0
    assert parse_fault("draining:pod-1=on@4").value == 1.0
    for bad in (
        "kill:pod-1",
        "explode:pod-1@3",
        "kill:pod-1@soon",
        "kill:pod-1@-1",
        "kill:pod-1=3@1",
        "outage:maybe@1",
        "slow:pod-0=0@1",
        "fail5xx:pod-0=2@1",
        "",
    ):
        with pytest.raises(ValueError):
            parse_fault(bad)

    parser = argparse.ArgumentParser(prog="sim")
    add_sim_arguments(parser)
    args = parser.parse_args(["--fault", "kill:pod-1@5", "--fault", "outage:on@1"])
    assert [s.action for s in args.fault] == ["kill", "outage"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault", "kill:pod-1"])
    err = capsys.readouterr().err
    assert "argument --fault" in err and "ACTION:TARGET" in err
    assert check_targets([parse_fault("kill:pod-7@1")], ["pod-0"]) == ["kill:pod-7@1"]
    assert check_targets([parse_fault("add:x@1"), parse_fault("kill:x@2")], []) == []


async def test_schedule_runs_in_order(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    await fleet.start([SimPodConfig(name="pod-0"), SimPodConfig(name="pod-1")])
    steps = [
        parse_fault(s)
        for s in ("revive:pod-1@0.2", "kill:pod-1@0", "add:pod-2@0.1", "outage:on@0.1")
    ]
    await asyncio.wait_for(run_schedule(fleet, steps, lambda n: SimPodConfig(name=n)), 5)
    assert fleet.pods["pod-1"].state == "up"
    assert fleet.pods["pod-2"].state == "up"
    assert fleet.metrics_outage


async def test_cli_subprocess_ready_line_faults_and_sigterm(tmp_path: Path) -> None:
    pods_file = tmp_path / "pods.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router_ext.harness.sim",
        "--pods", "2", "--pods-file", str(pods_file), "--seed", "1",
        "--fault", "kill:pod-1@0.3", "--fault", "add:pod-2@0.3",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        ready = json.loads(line)
        assert ready["event"] == "sim_ready"
        assert set(ready["pods"]) == {"pod-0", "pod-1"}
        assert ready["control"].startswith("127.0.0.1:")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.post(
                f"http://{ready['pods']['pod-0']}/v1/chat/completions", json=CHAT
            ) as r:
                assert r.status == 200
            for _ in range(100):
                async with http.get(f"http://{ready['control']}/pods") as r:
                    pods = (await r.json())["pods"]
                if pods["pod-1"]["state"] == "killed" and "pod-2" in pods:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"scheduled faults did not happen: {pods}")
        names = [e["name"] for e in yaml.safe_load(pods_file.read_text())["pods"]]
        assert names == ["pod-0", "pod-1", "pod-2"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = (await proc.stderr.read()).decode()
        assert "pod pod-1 killed" in log and "pod pod-2 added" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_unknown_fault_target() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router_ext.harness.sim", "--pods", "1", "--fault", "kill:pod-7@1",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"pod-7" in err


# --- planned shutdown (SIGTERM as vLLM handles it) -------------------------------------------


async def read_stream(resp: aiohttp.ClientResponse) -> bytes:
    """The whole SSE body; raises if the connection is cut before the chunked body ends."""
    return await resp.read()


async def refused(host: str, port: int) -> bool:
    """True once nothing accepts on host:port. A connect racing the listener's close lands in
    its backlog and is reset instead of refused: that is "not accepting" too."""
    try:
        _, w = await asyncio.open_connection(host, port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    w.close()
    return False


async def test_term_stops_accepting_and_finishes_inflight_streams(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0", tpot_ms=5), SimPodConfig(name="pod-1")])
    pod = fleet.pods["pod-0"]
    async with http.get(url(fleet, "pod-0", "/health")) as r:  # leaves an idle keep-alive
        assert r.status == 200
    body = {"prompt": "hi", "max_tokens": 100, "stream": True}  # ~0.5 s of tokens
    streams = [await http.post(url(fleet, "pod-0", "/v1/completions"), json=body) for _ in range(3)]
    for s in streams:
        assert s.status == 200
        await s.content.readuntil(b"\n\n")  # a token arrived: in flight
    await fleet.terminate("pod-0", grace_s=10)
    assert pod.state == "terminating"
    # At once: new connects refused, so /health fails like a closed uvicorn socket.
    assert await refused(pod.host, pod.port)
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(url(fleet, "pod-0", "/health"))
    # ...while the streams already running finish, every one with its [DONE].
    bodies = await asyncio.gather(*(read_stream(s) for s in streams))
    assert all(b.rstrip().endswith(b"data: [DONE]") for b in bodies)
    assert all(b.count(b"data: ") >= 100 for b in bodies)
    for _ in range(200):  # bounded: the drain task ends right after the last response
        if pod.state == "terminated":
            break
        await asyncio.sleep(0.01)
    assert pod.state == "terminated" and pod.drained >= 3 and pod.cut_at_grace == 0
    assert fleet.status()["pods"]["pod-0"]["in_flight"] == 0
    # Discovery lags behind a shutdown too: the pod stays listed, as after a kill.
    names = [e["name"] for e in yaml.safe_load(fleet.pods_file.read_text())["pods"]]  # type: ignore[union-attr]
    assert names == ["pod-0", "pod-1"]
    with pytest.raises(SimStateError):
        pod.terminate(1.0)
    await fleet.revive("pod-0")
    async with http.post(url(fleet, "pod-0", "/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200


async def test_term_cuts_what_outlives_the_grace_period(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0", tpot_ms=5)])
    pod = fleet.pods["pod-0"]
    body = {"prompt": "hi", "max_tokens": 2000, "stream": True}  # ~10 s: longer than grace
    resp = await http.post(url(fleet, "pod-0", "/v1/completions"), json=body)
    await resp.content.readuntil(b"\n\n")
    t0 = time.monotonic()
    await fleet.terminate("pod-0", grace_s=0.3)
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await read_stream(resp)
    assert time.monotonic() - t0 < 3
    for _ in range(200):
        if pod.state == "terminated":
            break
        await asyncio.sleep(0.01)
    assert pod.state == "terminated" and pod.cut_at_grace == 1


async def test_term_via_control_api_and_fault_spec(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    assert parse_fault("term:pod-1@5") == FaultStep(5.0, "term", "pod-1", 30.0)
    assert parse_fault("term:pod-1=2.5@5") == FaultStep(5.0, "term", "pod-1", 2.5)
    with pytest.raises(ValueError, match="grace"):
        parse_fault("term:pod-1=-1@5")
    await fleet.start([SimPodConfig(name="pod-0"), SimPodConfig(name="pod-1")])
    control = ControlServer(fleet)
    await control.start()
    try:
        base = f"http://{control.address}"
        async with http.post(f"{base}/pods/pod-1/term?grace=5") as r:
            assert r.status == 200
            assert (await r.json())["state"] in ("terminating", "terminated")
        async with http.post(f"{base}/pods/pod-1/term") as r:
            assert r.status == 409  # only an up pod can be terminated
        async with http.post(f"{base}/pods/pod-0/term?grace=x") as r:
            assert r.status == 400
    finally:
        await control.stop()


async def test_cli_sigterm_drains_streams_then_exits(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router_ext.harness.sim",
        "--pods", "1", "--tpot-ms", "10", "--grace", "10",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15))
        addr = ready["pods"]["pod-0"]
        host, port = addr.rsplit(":", 1)
        body = {"prompt": "hi", "max_tokens": 100, "stream": True}  # ~1 s of tokens
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            streams = [
                await http.post(f"http://{addr}/v1/completions", json=body) for _ in range(2)
            ]
            for s in streams:
                await s.content.readuntil(b"\n\n")
            proc.send_signal(signal.SIGTERM)
            for _ in range(200):  # bounded: the listener closes right after the signal
                if await refused(host, int(port)):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the pod still accepts connections after SIGTERM")
            assert proc.returncode is None  # still draining, not dead
            bodies = await asyncio.gather(*(read_stream(s) for s in streams))
        assert all(b.rstrip().endswith(b"data: [DONE]") for b in bodies)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = (await proc.stderr.read()).decode()
        assert "2 requests in flight" in log and "0 requests cut" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
