"""A small OpenAI-API load client used by the demo, the end-to-end tests and the benchmarks.

Closed loop (fixed concurrency) for failover tests, open loop (Poisson arrivals) for routing
quality: a closed loop slows down with the server and hides queueing, an open loop does not.
What is sent comes from a workload (`router_ext.harness.workloads`; default `uniform`, the
short prompts this client always sent). Every request is recorded (status, serving pod,
latency, time to first token, output tokens, model, workload group), bounded in count and time;
it only ever talks to the host it is given (loopback in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from router_ext.config import SERVED_BY_HEADER, STRATEGY_USED_HEADER
from router_ext.harness.workloads import Uniform, WorkItem, Workload


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
    output_tokens: int = 0  # from the response's usage; a stream without usage: its chunks
    model: str = ""  # the model (or adapter) the request asked for
    group: str = ""  # the workload's prefix group or session id


@dataclass
class LoadSpec:
    url: str  # e.g. http://127.0.0.1:10000/v1/chat/completions
    model: str = "sim-model"
    max_tokens: int = 16
    stream: bool = False
    prompt_words: int = 32
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0
    # None: `uniform` from the fields above, posted to `url` itself. A workload's requests go
    # to `url`'s scheme and host with each item's own path; its items carry model and stream.
    workload: Workload | None = None


def workload_of(spec: LoadSpec) -> Workload:
    if spec.workload is not None:
        return spec.workload
    return Uniform(
        (spec.model,),
        max_tokens=spec.max_tokens,
        prompt_words=spec.prompt_words,
        stream=spec.stream,
    )


def origin(url: str) -> str:
    """`http://host:port` of a URL, without its path."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def _target(spec: LoadSpec, item: WorkItem) -> str:
    return spec.url if spec.workload is None else origin(spec.url) + item.path


def _usage_tokens(obj: object) -> int | None:
    if isinstance(obj, dict):
        usage = obj.get("usage")
        if isinstance(usage, dict):
            n = usage.get("completion_tokens")
            if isinstance(n, int):
                return n
    return None


async def send_item(
    session: aiohttp.ClientSession,
    url: str,
    item: WorkItem,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Result:
    """POST one work item to `url`; never raises for a network or HTTP failure."""
    t0 = time.monotonic()
    h = {"content-type": "application/json", **dict(item.headers), **(headers or {})}
    try:
        async with session.post(
            url,
            data=item.body,
            headers=h,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            ttft: float | None = None
            tokens: int | None = None
            text = ""
            if resp.status == 200 and resp.content_type == "text/event-stream":
                chunks = 0
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    if line.startswith(b"data: [DONE]"):
                        continue
                    chunks += 1
                    if b'"usage"' in line:
                        with contextlib.suppress(ValueError):
                            n = _usage_tokens(json.loads(line[5:]))
                            if n is not None:
                                tokens = n
                                chunks -= 1
                ok = chunks > 0
                if tokens is None:
                    tokens = chunks
            else:
                raw = await resp.read()
                ttft = time.monotonic() - t0
                ok = resp.status == 200
                if ok:
                    with contextlib.suppress(ValueError):
                        tokens = _usage_tokens(json.loads(raw))
                else:
                    text = raw.decode(errors="replace")
            return Result(
                ok=ok,
                status=resp.status,
                served_by=resp.headers.get(SERVED_BY_HEADER, ""),
                latency_s=time.monotonic() - t0,
                started=t0,
                ttft_s=ttft,
                strategy=resp.headers.get(STRATEGY_USED_HEADER, ""),
                body=text,
                output_tokens=tokens or 0,
                model=item.model,
                group=item.group,
            )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return Result(
            ok=False,
            status=0,
            served_by="",
            latency_s=time.monotonic() - t0,
            started=t0,
            error=f"{type(e).__name__}: {e}",
            model=item.model,
            group=item.group,
        )


async def send_one(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    rng: random.Random,
    extra_headers: Mapping[str, str] | None = None,
    *,
    workload: Workload | None = None,
) -> Result:
    """The next item of `workload` (default: the spec's), sent as the spec says."""
    item = (workload or workload_of(spec)).next_item(rng)
    return await send_item(
        session,
        _target(spec, item),
        item,
        headers={**spec.headers, **(extra_headers or {})},
        timeout_s=spec.timeout_s,
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
    """`concurrency` workers send back-to-back until `total` requests or `duration_s`.

    Items are drawn in one sequence from `seed` (which worker sends which depends on timing).
    """
    if total is None and duration_s is None and stop is None:
        raise ValueError("closed_loop needs total, duration_s or stop")
    results: list[Result] = []
    deadline = time.monotonic() + duration_s if duration_s is not None else None
    sent = 0
    rng = random.Random(seed)
    workload = workload_of(spec)
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
                r = await send_one(session, spec, rng, workload=workload)
                results.append(r)
                if on_result is not None:
                    on_result(r)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def open_loop_schedule(
    workload: Workload, rate_per_s: float, duration_s: float, *, seed: int = 0
) -> list[tuple[float, WorkItem]]:
    """(offset in seconds, item) for Poisson arrivals at `rate_per_s` over `duration_s`.

    Arrival times and items come from two generators derived from `seed`, and the whole plan
    is drawn before the first request: two runs with one seed send the same requests at the
    same offsets, whatever the server does (the benchmarks' cells compare on equal traffic).
    """
    if not rate_per_s > 0 or not duration_s >= 0:
        raise ValueError("open loop needs rate_per_s > 0 and duration_s >= 0")
    arrivals = random.Random(seed)
    items = random.Random(f"items:{seed}")
    plan: list[tuple[float, WorkItem]] = []
    t = 0.0
    while True:
        t += arrivals.expovariate(rate_per_s)
        if t >= duration_s:
            return plan
        plan.append((t, workload.next_item(items)))


async def run_schedule(
    url: str,
    plan: Sequence[tuple[float, WorkItem]],
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 2048,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Send each item of `plan` at its offset to `url`'s host with the item's path.

    Waits for every request to finish. Past `max_in_flight` an arrival is recorded as a
    failure instead of sent (the client, not the server, would be the bottleneck).
    """
    base = origin(url)
    results: list[Result] = []
    tasks: set[asyncio.Task[None]] = set()

    def record(r: Result) -> None:
        results.append(r)
        if on_result is not None:
            on_result(r)

    conn = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(item: WorkItem) -> None:
            record(
                await send_item(
                    session, base + item.path, item, headers=headers, timeout_s=timeout_s
                )
            )

        start = time.monotonic()
        for offset, item in plan:
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                record(
                    Result(
                        False,
                        0,
                        "",
                        0.0,
                        time.monotonic(),
                        error="client in-flight cap",
                        model=item.model,
                        group=item.group,
                    )
                )
                continue
            task = asyncio.create_task(one(item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return results


async def run_open_loop(
    url: str,
    workload: Workload,
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int = 0,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 2048,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Open loop for the benchmarks: `workload` at `rate_per_s` for `duration_s`, from `seed`."""
    plan = open_loop_schedule(workload, rate_per_s, duration_s, seed=seed)
    return await run_schedule(
        url,
        plan,
        headers=headers,
        timeout_s=timeout_s,
        max_in_flight=max_in_flight,
        on_result=on_result,
    )


async def open_loop(
    spec: LoadSpec,
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int = 0,
    max_in_flight: int = 2048,
) -> list[Result]:
    """Poisson arrivals at `rate_per_s` for `duration_s`; waits for every request to finish."""
    plan = open_loop_schedule(workload_of(spec), rate_per_s, duration_s, seed=seed)
    if spec.workload is None:
        # A spec without a workload posts to its own URL's path, as it always did.
        path = urlsplit(spec.url).path or "/"
        plan = [(t, replace(item, path=path)) for t, item in plan]
    return await run_schedule(
        spec.url,
        plan,
        headers=spec.headers,
        timeout_s=spec.timeout_s,
        max_in_flight=max_in_flight,
    )


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def breakdown(results: Sequence[Result], key: Callable[[Result], str]) -> dict[str, dict[str, Any]]:
    """Per key (e.g. model, group): requests, failed, TTFT p50/p90 (ms), output tokens."""
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(key(r), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(by):
        rs = by[k]
        ttft = [r.ttft_s for r in rs if r.ok and r.ttft_s is not None]
        out[k] = {
            "requests": len(rs),
            "failed": sum(1 for r in rs if not r.ok),
            "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 2) if ttft else None,
            "ttft_p90_ms": round(percentile(ttft, 90) * 1000, 2) if ttft else None,
            "output_tokens": sum(r.output_tokens for r in rs if r.ok),
        }
    return out
