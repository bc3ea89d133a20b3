"""End-to-end, real Envoy 1.40 + router-ext + simulated vLLM pods: routing that sees the model.

A fleet of two models with one LoRA adapter each (4 pods). Envoy lifts the body's `model` into
a header (json_to_metadata + header mutation, rendered by router-ext); the router sends each
request only to pods serving that model or adapter, answers unknown models with vLLM's 404,
and answers GET /v1/models itself from what the pods report.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest

from router_ext.config import MODEL_HEADER, SERVED_BY_HEADER, STRATEGY_REQUEST_HEADER
from router_ext.harness.stack import Stack
from router_ext.harness.workloads import make_workload
from tests.conftest import requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]

MODELS = ["llama", "qwen"]
SIM = ["--models", ",".join(MODELS), "--adapters", "1"]


def served_by_pod(st: Stack) -> dict[str, set[str]]:
    """Pod name -> the model names it serves, from the simulator's control API."""
    out: dict[str, set[str]] = {}
    for name, p in st.control("GET", "/pods")["pods"].items():
        out[name] = {p["model"], *p["adapters"]}
    return out


async def wait_models_known(st: Stack, want: set[str], timeout: float = 20.0) -> list[Any]:
    """Until the router's GET /v1/models lists `want` (the pods' listings are scraped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    async with aiohttp.ClientSession() as s:
        while loop.time() < deadline:
            async with s.get(st.url + "/v1/models") as r:
                last = (r.status, await r.text())
                if r.status == 200 and {m["id"] for m in json.loads(last[1])["data"]} >= want:
                    return list(json.loads(last[1])["data"])
            await asyncio.sleep(0.1)  # polling an observable state with a deadline
    raise AssertionError(f"/v1/models never listed {want}: last {last}")


async def test_two_models_and_adapters_under_load_never_reach_the_wrong_pod(
    make_stack,  # type: ignore[no-untyped-def]
) -> None:
    st = make_stack(pods=4, sim_args=SIM)
    serves = served_by_pod(st)
    assert {m for ms in serves.values() for m in ms} == {
        "llama",
        "llama-lora-0",
        "qwen",
        "qwen-lora-0",
    }
    await wait_models_known(st, {"llama", "qwen", "llama-lora-0", "qwen-lora-0"})
    work = make_workload("multi-model", models=MODELS, adapters=1, max_tokens=4)
    rng = random.Random(11)
    items = [work.next_item(rng) for _ in range(400)]
    results: list[tuple[int, str, str]] = []  # (status, model, served by)
    sem = asyncio.Semaphore(16)

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        it = items[i]
        headers = {"content-type": "application/json"}
        if i % 2:
            headers[STRATEGY_REQUEST_HEADER] = "prefix-aware"  # the body-reading path too
        async with sem, s.post(st.url + it.path, data=it.body, headers=headers) as r:
            await r.read()
            results.append((r.status, it.model, r.headers.get(SERVED_BY_HEADER, "")))

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, i) for i in range(len(items))))
    failed = [r for r in results if r[0] != 200]
    assert failed == []
    wrong = [(m, pod) for _, m, pod in results if m not in serves[pod]]
    assert wrong == []
    per_model = Counter(m for _, m, _ in results)
    assert set(per_model) == {"llama", "qwen", "llama-lora-0", "qwen-lora-0"}
    # Both paths were taken: the prefix-aware half through the body phase.
    metrics = st.router_metrics()
    reads = [ln for ln in metrics.splitlines() if ln.startswith("router_ext_body_reads_total")]
    assert reads and float(reads[0].split()[-1]) >= 150


async def test_unknown_or_missing_model_get_openai_errors_not_a_pod(
    make_stack,  # type: ignore[no-untyped-def]
) -> None:
    st = make_stack(pods=2, sim_args=SIM)
    await wait_models_known(st, {"llama", "qwen"})
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
        # A client-sent copy of the model header changes nothing: Envoy overwrites it.
        hdr = {MODEL_HEADER: "llama"}
        async with s.post(st.url + "/v1/chat/completions", json=body, headers=hdr) as r:
            assert r.status == 404
            err = (await r.json())["error"]
            assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
            assert SERVED_BY_HEADER not in r.headers
        nomodel = {"messages": [{"role": "user", "content": "hi"}]}
        async with s.post(st.url + "/v1/chat/completions", json=nomodel) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "model_required"


async def test_v1_models_is_the_union_and_survives_a_dead_pod(
    make_stack,  # type: ignore[no-untyped-def]
) -> None:
    st = make_stack(pods=4, sim_args=SIM)
    data = await wait_models_known(st, {"llama", "qwen", "llama-lora-0", "qwen-lora-0"})
    parents = {m["id"]: m["parent"] for m in data}
    assert parents == {"llama": None, "qwen": None, "llama-lora-0": "llama", "qwen-lora-0": "qwen"}
    victim = sorted(st.pods)[0]
    st.control("POST", f"/pods/{victim}/kill")
    async with aiohttp.ClientSession() as s:
        for _ in range(20):  # every answer while the router notices, and after
            async with s.get(st.url + "/v1/models") as r:
                assert r.status == 200
                ids = {m["id"] for m in (await r.json())["data"]}
                assert ids == set(parents)  # each model still has a live pod


def skipped(st: Stack) -> dict[str, float]:
    out: dict[str, float] = {}
    for ln in st.router_metrics().splitlines():
        if ln.startswith("router_ext_body_skipped_total{"):
            reason = ln.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(ln.split()[-1])
    return out


async def test_bad_bodies_get_a_defined_outcome_and_reach_the_pod_byte_identical(
    make_stack,  # type: ignore[no-untyped-def]
) -> None:
    import gzip
    import hashlib

    from router_ext.harness.sim.pod import BODY_DIGEST_HEADER

    st = make_stack(
        pods=2,
        strategy="prefix-aware",
        router_overrides={"routing": {"max_body_bytes": 16384}},
    )
    good = json.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": "hi " * 200}]}
    ).encode()
    big = json.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": "x " * 10_000}]}
    ).encode()
    cases: list[tuple[str, bytes, dict[str, str], int, str | None]] = [
        # (case, body, headers, status the client gets, body_skipped reason counted)
        ("not json", b"{not json", {}, 400, "not_json"),
        ("invalid utf-8", b'{"model": "sim-model", "prompt": "\xff\xfe"}', {}, 400, "not_json"),
        ("messages of the wrong type", b'{"model": "sim-model", "messages": 7}', {}, 400,
         "bad_messages"),
        ("over the cap", big, {}, 200, "too_large"),
        ("client-sent model header", good, {MODEL_HEADER: "gpt-9"}, 200, None),
        ("huge session id", good, {"x-session-id": "s" * 6_000}, 200, None),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for case, body, extra, status, reason in cases:
            before = skipped(st)
            headers = {"content-type": "application/json", **extra}
            async with s.post(st.url + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                assert r.status == status, case
                assert r.headers.get(BODY_DIGEST_HEADER) == hashlib.sha256(body).hexdigest(), case
            if reason is not None:
                assert skipped(st)[reason] == before.get(reason, 0) + 1, case

        async def chunks() -> Any:
            for i in range(0, len(good), 1000):
                yield good[i : i + 1000]

        before = skipped(st)
        async with s.post(
            st.url + "/v1/chat/completions",
            data=chunks(),
            headers={"content-type": "application/json"},
        ) as r:
            await r.read()
            assert r.status == 200  # chunked: no length, routed from headers
            assert r.headers.get(BODY_DIGEST_HEADER) == hashlib.sha256(good).hexdigest()
        assert skipped(st)["no_length"] == before.get("no_length", 0) + 1

        before = skipped(st)
        gz = gzip.compress(good)
        async with s.post(
            st.url + "/v1/chat/completions",
            data=gz,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        ) as r:
            await r.read()
            assert r.status == 200  # the pod inflates it; the router never does
        assert skipped(st)["encoded"] == before.get("encoded", 0) + 1
