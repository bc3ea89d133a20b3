"""A small OpenAI-API load client used by the demo, the end-to-end tests and the benchmarks.

Closed loop (fixed concurrency) for failover tests, open loop (Poisson arrivals) for routing
quality: a closed loop slows down with the server and hides queueing, an open loop does not.
Every request is recorded (status, serving pod, latency, time to first token), bounded in
count and time; it only ever talks to the URL it is given (loopback in tests).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from router_ext.config import SERVED_BY_HEADER, STRATEGY_USED_HEADER


@dataclass(slots=True)
class Result:
    ok: bool
    status: int
    served_by: str
    latency_s: float
    started: float  # monotonic
    ttft_s: float | None = None
    strategy: str = ""
    error: str = ""
    body: str = ""


@dataclass
class LoadSpec:
    url: str  # e.g. http://127.0.0.1:10000/v1/chat/completions
    model: str = "sim-model"
    max_tokens: int = 16
    stream: bool = False
    prompt_words: int = 32
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0


def _body(spec: LoadSpec, rng: random.Random) -> bytes:
    words = " ".join(
        rng.choice(("alpha", "beta", "gamma", "delta")) for _ in range(spec.prompt_words)
    )
    return json.dumps(
        {
            "model": spec.model,
            "messages": [{"role": "user", "content": words}],
            "max_tokens": spec.max_tokens,
            "stream": spec.stream,
        }
    ).encode()


async def send_one(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    rng: random.Random,
    extra_headers: Mapping[str, str] | None = None,
) -> Result:
    t0 = time.monotonic()
    headers = {"content-type": "application/json", **spec.headers, **(extra_headers or {})}
    try:
        async with session.post(
            spec.url,
            data=_body(spec, rng),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
        ) as resp:
            ttft: float | None = None
            if spec.stream and resp.status == 200:
                chunks = 0
                async for line in resp.content:
                    if line.startswith(b"data:") and ttft is None:
                        ttft = time.monotonic() - t0
                    chunks += line.startswith(b"data:")
                text = ""
                ok = chunks > 0
            else:
                text = await resp.text()
                ttft = time.monotonic() - t0
                ok = resp.status == 200
            return Result(
                ok=ok,
                status=resp.status,
                served_by=resp.headers.get(SERVED_BY_HEADER, ""),
                latency_s=time.monotonic() - t0,
                started=t0,
                ttft_s=ttft,
                strategy=resp.headers.get(STRATEGY_USED_HEADER, ""),
                body=text if resp.status != 200 else "",
            )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return Result(
            ok=False,
            status=0,
            served_by="",
            latency_s=time.monotonic() - t0,
            started=t0,
            error=f"{type(e).__name__}: {e}",
        )


async def closed_loop(
    spec: LoadSpec,
    concurrency: int,
    *,
    total: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    on_result: Callable[[Result], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[Result]:
    """`concurrency` workers send back-to-back until `total` requests or `duration_s`."""
    if total is None and duration_s is None and stop is None:
        raise ValueError("closed_loop needs total, duration_s or stop")
    results: list[Result] = []
    deadline = time.monotonic() + duration_s if duration_s is not None else None
    sent = 0
    rng = random.Random(seed)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal sent
            while True:
                if total is not None and sent >= total:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if stop is not None and stop.is_set():
                    return
                sent += 1
                r = await send_one(session, spec, rng)
                results.append(r)
                if on_result is not None:
                    on_result(r)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def open_loop(
    spec: LoadSpec,
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int = 0,
    max_in_flight: int = 2048,
) -> list[Result]:
    """Poisson arrivals at `rate_per_s` for `duration_s`; waits for every request to finish."""
    rng = random.Random(seed)
    results: list[Result] = []
    tasks: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one() -> None:
            results.append(await send_one(session, spec, rng))

        start = time.monotonic()
        t = start
        while True:
            t += rng.expovariate(rate_per_s)
            if t - start >= duration_s:
                break
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                results.append(
                    Result(False, 0, "", 0.0, time.monotonic(), error="client in-flight cap")
                )
                continue
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return results


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]
