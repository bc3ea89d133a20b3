"""Simulator realism a request-aware router depends on: models and LoRA adapters, vLLM's LoRA
and cache-config metrics, prefill that costs engine time, a KV-bounded prefix cache.

Real loopback sockets, ephemeral ports; timing assertions compare cases that differ by a
large factor by construction, so a loaded machine does not flip them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router_ext.harness.sim import ControlServer, SimFleet, SimPodConfig, add_sim_arguments
from router_ext.harness.sim.cli import _Plan

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[SimFleet]:
    f = SimFleet(pods_file=tmp_path / "pods.yaml", seed=3)
    yield f
    await f.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def url(fleet: SimFleet, name: str, path: str) -> str:
    return f"http://{fleet.pods[name].address}{path}"


async def families(http: aiohttp.ClientSession, fleet: SimFleet, name: str) -> dict[str, Any]:
    async with http.get(url(fleet, name, "/metrics")) as r:
        assert r.status == 200
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def counter(http: aiohttp.ClientSession, fleet: SimFleet, name: str, fam: str) -> float:
    """A counter summed over engines, from a render made after everything before this call
    (the pod reuses its last render of counters for up to ~10 ms)."""
    pm = fleet.pods[name].metrics
    assert pm is not None
    await until(lambda: asyncio.sleep(0, pm.cached_until <= time.monotonic()), "a fresh render")
    samples = (await families(http, fleet, name))[fam].samples
    return float(sum(s.value for s in samples if s.name.endswith("_total")))


async def ttft(
    http: aiohttp.ClientSession, fleet: SimFleet, name: str, body: dict[str, Any]
) -> float:
    """Seconds to the first content chunk of a streaming completion (read to the end)."""
    t0 = time.monotonic()
    first = None
    async with http.post(url(fleet, name, "/v1/completions"), json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic() - t0
    assert first is not None
    return first


def words(tag: str, n_chars: int) -> str:
    """A prompt of exactly n_chars characters, distinct per tag from its first chunk on."""
    base = f"{tag} " * (n_chars // (len(tag) + 1) + 1)
    return base[:n_chars]


async def lora_series(
    http: aiohttp.ClientSession, fleet: SimFleet, name: str
) -> list[tuple[float, dict[str, str]]]:
    fams = await families(http, fleet, name)
    fam = fams.get("vllm:lora_requests_info")
    return [] if fam is None else sorted((s.value, s.labels) for s in fam.samples)


async def until(pred: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- config -----------------------------------------------------------------------------------


def test_config_accepts_adapters_and_checks_them() -> None:
    cfg = SimPodConfig.from_mapping({"name": "p", "model": "m", "adapters": ["a", "b"]})
    assert cfg.adapters == ["a", "b"] and cfg.served_models == ["m", "a", "b"]
    assert cfg.max_lora == 2 and cfg.max_num_batched_tokens == 8192
    for bad, needle in (
        ({"adapters": "a"}, "adapters"),
        ({"adapters": ["a", 1]}, "list of strings"),
        ({"adapters": ["a,b"]}, "adapter name"),
        ({"adapters": ["m"]}, "base model"),
        ({"adapters": ["a", "a"]}, "unique"),
        ({"adapters": ["a"], "num_engines": 2}, "DP"),
        ({"max_lora": 0}, "max_lora"),
        ({"lora_load_ms": -1}, "lora_load_ms"),
        ({"max_num_batched_tokens": 4, "max_running": 8}, "max_num_batched_tokens"),
    ):
        with pytest.raises(ValueError, match=needle):
            SimPodConfig.from_mapping({"name": "p", "model": "m", **bad})


def test_cli_assigns_models_round_robin_with_their_adapters() -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    args = parser.parse_args(
        ["--pods", "3", "--models", "alpha,beta", "--adapters", "2", "--max-lora", "3",
         "--lora-load-ms", "7", "--max-batched-tokens", "512"]
    )  # fmt: skip
    plan = _Plan(args)
    assert [(c.model, c.adapters) for c in plan.configs] == [
        ("alpha", ["alpha-lora-0", "alpha-lora-1"]),
        ("beta", ["beta-lora-0", "beta-lora-1"]),
        ("alpha", ["alpha-lora-0", "alpha-lora-1"]),
    ]
    assert {(c.max_lora, c.lora_load_ms, c.max_num_batched_tokens) for c in plan.configs} == {
        (3, 7.0, 512)
    }
    assert plan.new_pod("x").model == "beta"  # pods added later continue the rotation
    assert plan.from_mapping({"name": "y", "model": "alpha"}).adapters == [
        "alpha-lora-0",
        "alpha-lora-1",
    ]
    default = _Plan(parser.parse_args(["--pods", "2"])).configs
    assert [(c.model, c.adapters) for c in default] == [("sim-model", [])] * 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--models", "a,a"])


# --- models, adapters, 404 --------------------------------------------------------------------


async def test_models_list_adapters_and_unknown_model_is_vllms_404(
    fleet: SimFleet, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await fleet.start([SimPodConfig(name="pod-0", model="base", adapters=["sql", "chat"])])
    async with http.get(url(fleet, "pod-0", "/v1/models")) as r:
        data = (await r.json())["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        ("base", None),
        ("sql", "base"),
        ("chat", "base"),
    ]
    assert data[0]["max_model_len"] and data[1]["max_model_len"] is None
    assert all(m["object"] == "model" and m["permission"] for m in data)

    body = {"model": "sql", "prompt": "hi", "max_tokens": 2}
    async with http.post(url(fleet, "pod-0", "/v1/completions"), json=body) as r:
        assert r.status == 200 and (await r.json())["model"] == "sql"
    async with http.post(url(fleet, "pod-0", "/v1/completions"), json={**body, "model": "x"}) as r:
        assert r.status == 404
        assert await r.json() == {
            "error": {
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
    entry = yaml.safe_load((tmp_path / "pods.yaml").read_text())["pods"][0]
    assert entry["model"] == "base" and entry["models"] == ["base", "sql", "chat"]


async def test_cache_config_info_reports_kv_capacity(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0", kv_blocks=1000, block_size=32, num_engines=2)])
    fam = (await families(http, fleet, "pod-0"))["vllm:cache_config_info"]
    assert fam.type == "gauge"
    got = {s.labels["engine"]: s for s in fam.samples}
    assert set(got) == {"0", "1"}
    for s in got.values():
        assert s.value == 1
        assert s.labels["block_size"] == "32" and s.labels["num_gpu_blocks"] == "500"
        assert s.labels["enable_prefix_caching"] == "True"
    # No LoRA configured: vLLM does not create the LoRA gauge at all.
    assert "vllm:lora_requests_info" not in await families(http, fleet, "pod-0")


# --- LoRA scheduling and vllm:lora_requests_info ----------------------------------------------


async def test_lora_info_newest_series_tracks_running_and_waiting(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    cfg = SimPodConfig(
        name="pod-0", model="base", adapters=["a", "b"], max_lora=1, tpot_ms=5, lora_load_ms=1
    )
    await fleet.start([cfg])
    pod = fleet.pods["pod-0"]
    assert await lora_series(http, fleet, "pod-0") == []  # absent until the first step

    long_a = asyncio.create_task(
        http.post(url(fleet, "pod-0", "/v1/completions"),
                  json={"model": "a", "prompt": "hi", "max_tokens": 120})
    )  # fmt: skip

    async def newest_running(v: str) -> bool:
        series = await lora_series(http, fleet, "pod-0")
        return bool(series) and series[-1][1]["running_lora_adapters"] == v

    await until(lambda: newest_running("a"), "adapter a running")
    # One slot, used by a running adapter: a request for b waits, but does not block a base
    # model request queued behind it (vLLM V1 skips it in the waiting queue).
    wait_b = asyncio.create_task(
        http.post(url(fleet, "pod-0", "/v1/completions"),
                  json={"model": "b", "prompt": "hi", "max_tokens": 2})
    )  # fmt: skip
    await until(lambda: asyncio.sleep(0, pod.waiting == 1), "b queued")
    async with http.post(
        url(fleet, "pod-0", "/v1/completions"), json={"prompt": "hi", "max_tokens": 2}
    ) as r:
        assert r.status == 200
    assert not wait_b.done() and pod.waiting == 1

    async def b_waits() -> bool:
        series = await lora_series(http, fleet, "pod-0")
        top = series[-1][1] if series else {}
        return top.get("waiting_lora_adapters") == "b" and top["running_lora_adapters"] == "a"

    await until(b_waits, "newest series: a running, b waiting")
    assert (await lora_series(http, fleet, "pod-0"))[-1][1]["max_lora"] == "1"

    for t in (long_a, wait_b):
        resp = await t
        assert resp.status == 200
        resp.release()
    await until(lambda: newest_running(""), "nothing running in the newest series")
    series = await lora_series(http, fleet, "pod-0")
    # Old label sets stay exported with older timestamps: only the value says which is current.
    assert len(series) >= 3
    assert {s[1]["running_lora_adapters"] for s in series} >= {"a", "b", ""}
    assert series[-1][0] > series[0][0] > 1e9  # wall-clock seconds


async def test_adapter_load_costs_time_and_idle_adapters_are_evicted_lru(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    cfg = SimPodConfig(
        name="pod-0", model="base", adapters=["a", "b"], max_lora=1, lora_load_ms=300
    )
    await fleet.start([cfg])
    pod = fleet.pods["pod-0"]
    body = {"prompt": "hi", "max_tokens": 2}
    cold = await ttft(http, fleet, "pod-0", {**body, "model": "a"})
    warm = await ttft(http, fleet, "pod-0", {**body, "model": "a"})
    assert cold >= 0.3 > 3 * warm
    assert pod.loaded_adapters == ["a"]
    assert await ttft(http, fleet, "pod-0", {**body, "model": "b"}) >= 0.3  # evicts idle a
    assert pod.loaded_adapters == ["b"]
    assert await ttft(http, fleet, "pod-0", {**body, "model": "a"}) >= 0.3  # reloaded
    assert await ttft(http, fleet, "pod-0", body) < 0.3  # the base model needs no slot


# --- prefill cost and prefix cache ------------------------------------------------------------


async def test_short_prompt_ttft_is_the_base_ttft_at_low_load(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])  # ttft_ms 30
    prompt = " ".join(["alpha", "beta", "gamma", "delta"] * 8)  # the load generator's shape
    t = await ttft(http, fleet, "pod-0", {"prompt": prompt, "max_tokens": 4})
    assert 0.03 <= t < 0.1


async def test_long_uncached_prompt_costs_engine_time_and_stalls_neighbours(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    # 6,000 prompt tokens at 40 us each: ~0.24 s of engine time that every request on the
    # pod waits through; a 1,024-token budget spreads it over steps, so decodes go on.
    await fleet.start(
        [
            SimPodConfig(name="whole", ttft_ms=5, max_num_batched_tokens=8192),
            SimPodConfig(name="chunked", ttft_ms=5, max_num_batched_tokens=1024),
        ]
    )
    long_body = {"prompt": words("doc", 24000), "max_tokens": 1}

    async def worst_gap(name: str) -> tuple[float, float]:
        gaps: list[float] = []
        body = {"prompt": "hi", "max_tokens": 200, "stream": True}
        async with http.post(url(fleet, name, "/v1/completions"), json=body) as r:
            last = time.monotonic()
            n = 0
            long_ttft: asyncio.Task[float] | None = None
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                n += 1
                if n == 20:
                    long_ttft = asyncio.create_task(ttft(http, fleet, name, long_body))
            assert long_ttft is not None
            return max(gaps[21:]), await long_ttft

    whole_gap, whole_ttft = await worst_gap("whole")
    chunked_gap, chunked_ttft = await worst_gap("chunked")
    assert whole_ttft >= 0.2 and chunked_ttft >= 0.2  # the prompt's own compute
    assert whole_gap >= 0.2  # one 6,000-token step: every decode waited for all of it
    assert chunked_gap < whole_gap / 2  # chunked prefill bounds the stall per step


async def test_a_host_stall_delays_tokens_but_costs_the_engine_no_capacity(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    # One Python process simulates every pod next to Envoy, routers and the load generator:
    # when the host is busy a step timer fires late. A GPU would not lose that time, so the
    # engine's next step starts when the late one was due to end. Here the loop is blocked
    # for 150 ms mid-decode (the host stall under test, not synchronisation): the stream's
    # remaining tokens must still finish on the engine's schedule, not 150 ms later.
    await fleet.start([SimPodConfig(name="pod-0", tpot_ms=10, ttft_ms=5)])
    load = fleet.pods["pod-0"].load
    step = 0.010 * (1 + 1 / 8)  # one sequence running: tpot * (1 + running / max_running)
    body = {"prompt": "hi", "max_tokens": 60, "stream": True}
    n = 0
    t10 = 0.0
    async with http.post(url(fleet, "pod-0", "/v1/completions"), json=body) as r:
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            n += 1
            if n == 10:
                t10 = time.monotonic()
                time.sleep(0.15)  # the host stall
        took = time.monotonic() - t10
    assert n == 60
    assert load.step_lag_s >= 0.14  # the stall did delay a step timer
    assert load.step_lost_s == 0.0
    # 50 more steps of engine time; without catching up it would be that + 0.15 s.
    assert took < 50 * step + 0.075, f"{took:.3f} s for 50 steps of {step * 1000:.2f} ms"


async def test_prefix_hit_skips_prefill_and_is_namespaced_by_adapter(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start(
        [SimPodConfig(name="pod-0", model="base", adapters=["a"], ttft_ms=5, lora_load_ms=0)]
    )
    doc = {"prompt": words("shared", 16000), "max_tokens": 1}  # 4,000 tokens
    cold = await ttft(http, fleet, "pod-0", doc)
    hits0 = await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits")
    warm = await ttft(http, fleet, "pod-0", doc)
    hits1 = await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits")
    assert cold >= 0.15 and warm < cold / 3
    assert 3900 <= hits1 - hits0 <= 3999  # in tokens, as vLLM counts; the last is recomputed
    queries = await counter(http, fleet, "pod-0", "vllm:prefix_cache_queries")
    assert queries == 2 * 4000
    # The same text under an adapter is another KV: no hit, full prefill.
    assert await ttft(http, fleet, "pod-0", {**doc, "model": "a"}) >= 0.15
    assert await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits") == hits1


async def test_flush_cache_makes_the_next_request_cold(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    # What the replica benchmark does between paired cells: empty caches, counters kept.
    await fleet.start([SimPodConfig(name="pod-0", model="base", ttft_ms=5)])
    doc = {"prompt": words("flush", 16000), "max_tokens": 1}
    await ttft(http, fleet, "pod-0", doc)
    hits0 = await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits")
    assert fleet.flush_cache("pod-0") > 0
    again = await ttft(http, fleet, "pod-0", doc)
    assert again >= 0.15  # a full prefill again
    assert await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits") == hits0


async def test_prefix_cache_is_bounded_by_kv_blocks_and_spares_running_requests(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    # 100 blocks x 16 tokens; each prompt is 40 blocks (640 tokens, 2,560 characters).
    await fleet.start([SimPodConfig(name="pod-0", kv_blocks=100, ttft_ms=1, tpot_ms=2)])
    pod = fleet.pods["pod-0"]
    p1, p2, p3 = (words(t, 2560) for t in ("one", "two", "three"))

    async def hits_of(prompt: str) -> float:
        before = await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits")
        async with http.post(
            url(fleet, "pod-0", "/v1/completions"), json={"prompt": prompt, "max_tokens": 1}
        ) as r:
            assert r.status == 200
        return await counter(http, fleet, "pod-0", "vllm:prefix_cache_hits") - before

    # p1 keeps running (its blocks pinned) while p2 runs and finishes (its blocks only cached).
    running = asyncio.create_task(
        http.post(url(fleet, "pod-0", "/v1/completions"),
                  json={"prompt": p1, "max_tokens": 150, "stream": True})
    )  # fmt: skip
    await until(lambda: asyncio.sleep(0, pod.running == 1), "p1 running")
    assert await hits_of(p2) == 0
    assert await hits_of(p3) == 0  # needs room: evicts p2's blocks, never p1's
    assert pod.load is not None and pod.load.cached_blocks() <= 100
    # Still cached, pinned by the running request (all but the last token, which vLLM
    # always recomputes).
    assert await hits_of(p1) == 639
    assert await hits_of(p2) == 0  # its leading blocks were the oldest free ones: evicted
    resp = await running
    assert resp.status == 200
    await resp.read()
    m = await families(http, fleet, "pod-0")
    assert sum(s.value for s in m["vllm:kv_cache_usage_perc"].samples) == 0  # cached != used


async def test_control_api_adds_a_pod_with_adapters(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    await fleet.start([SimPodConfig(name="pod-0")])
    control = ControlServer(fleet)
    await control.start()
    try:
        body = {"name": "pod-1", "model": "m2", "adapters": ["m2-lora-0"]}
        async with http.post(f"http://{control.address}/pods", json=body) as r:
            assert r.status == 201
        async with http.post(
            f"http://{control.address}/pods", json={"name": "pod-2", "adapters": "x"}
        ) as r:
            assert r.status == 400 and "adapters" in (await r.json())["error"]["message"]
        async with http.get(f"http://{control.address}/pods") as r:
            status = (await r.json())["pods"]["pod-1"]
        assert status["model"] == "m2" and status["adapters"] == ["m2-lora-0"]
        async with http.get(url(fleet, "pod-1", "/v1/models")) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["m2", "m2-lora-0"]
    finally:
        await control.stop()
