"""Scraper against real loopback servers: every failure class, concurrency, the run loop."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router_ext.config import ScrapeSection
from router_ext.fleet.scraper import ModelListError, Scraper, classify_error, parse_model_list
from router_ext.fleet.snapshot import Pod, ScrapeResult
from tests.data.metrics_samples import read_sample

pytestmark = pytest.mark.timeout(20)

PAGE = read_sample("vllm_v1.txt")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def http_server(handler: Handler, path: str = "/metrics") -> AsyncIterator[int]:
    """An aiohttp server on 127.0.0.1:<ephemeral>; yields the port."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_server(
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A bare TCP server (for peers that misbehave below HTTP); yields the port."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await on_connect(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


def free_port() -> int:
    """A port with nothing listening: bind, read the port, close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def pod(port: int, name: str = "") -> Pod:
    return Pod(host="127.0.0.1", port=port, name=name, model="meta-llama/Llama-3.1-8B-Instruct")


@pytest.fixture
async def scraper() -> AsyncIterator[Scraper]:
    s = Scraper(ScrapeSection(interval_s=0.05, timeout_s=0.3))
    yield s
    await s.close()


async def page_handler(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/plain")


# --- one pod ------------------------------------------------------------------------------------


async def test_ok(scraper: Scraper) -> None:
    async with http_server(page_handler) as port:
        before = time.monotonic()
        r = await scraper.scrape_one(pod(port))
    assert r.ok, r
    assert r.reason == "" and r.error == ""
    assert r.address == f"127.0.0.1:{port}"
    assert r.metrics is not None
    assert (r.metrics.running, r.metrics.waiting, r.metrics.num_engines) == (12, 2, 2)
    assert r.metrics.ttft_p90_s is not None
    assert before <= r.fetched_at <= time.monotonic()
    assert 0 < r.duration_s < 0.3


async def test_refused(scraper: Scraper) -> None:
    port = free_port()
    r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "refused")
    assert r.is_connection_failure
    assert f"127.0.0.1:{port}" in r.error
    assert r.metrics is None


async def test_hung_server_times_out_within_the_budget() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # accept, read nothing, never answer

    scraper = Scraper(ScrapeSection(timeout_s=0.3))
    try:
        async with raw_server(hang) as port:
            t0 = time.monotonic()
            r = await scraper.scrape_one(pod(port))
            elapsed = time.monotonic() - t0
    finally:
        await scraper.close()
    assert r.reason == "timeout", r
    assert not r.is_connection_failure
    assert 0.3 <= elapsed < 0.3 + 0.25
    assert "0.3 s" in r.error and str(port) in r.error


async def test_http_500(scraper: Scraper) -> None:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="engine dead")

    async with http_server(fail) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "http_500")
    assert "HTTP 500" in r.error and str(port) in r.error


async def test_wrong_path_is_http_404(scraper: Scraper) -> None:
    async with http_server(page_handler, path="/other") as port:
        r = await scraper.scrape_one(pod(port))
    assert r.reason == "http_404"


async def test_garbage_page_is_parse(scraper: Scraper) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text='vllm:num_requests_running{model_name="m"} lots\n')

    async with http_server(garbage) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "parse")
    assert "line 1" in r.error and str(port) in r.error


async def test_unrelated_page_is_no_known_metrics(scraper: Scraper) -> None:
    async def other(request: web.Request) -> web.Response:
        return web.Response(text="# TYPE up gauge\nup 1\n")

    async with http_server(other) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "no_known_metrics")
    assert "no known engine metrics" in r.error


async def test_connection_closed_mid_response_is_reset(scraper: Scraper) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
            + PAGE.encode()[:5000]
        )
        await writer.drain()
        writer.transport.abort()  # die mid-body

    async with raw_server(cut) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "reset"), r
    assert r.is_connection_failure


async def test_connection_closed_before_any_response_is_reset(scraper: Scraper) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    async with raw_server(drop) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "reset"), r


async def test_non_http_reply_is_error_not_connection_failure(scraper: Scraper) -> None:
    async def ssh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_server(ssh) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "error"), r
    assert not r.is_connection_failure
    assert "\n" not in r.error and str(port) in r.error


async def test_keep_alive_connection_is_reused_across_rounds(scraper: Scraper) -> None:
    peers: set[object] = set()

    async def track(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text=PAGE)

    async with http_server(track) as port:
        for _ in range(4):
            (r,) = await scraper.scrape_round([pod(port)])
            assert r.ok
    assert len(peers) == 1


async def test_ttft_is_carried_between_recomputations() -> None:
    pages = [PAGE]

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=pages[0])

    faster = PAGE.replace("vllm:time_to_first_token_seconds_bucket", "vllm:unused_bucket")
    faster += (
        'vllm:time_to_first_token_seconds_bucket{le="0.01",model_name="m"} 100\n'
        'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 100\n'
    )
    scraper = Scraper(ScrapeSection(timeout_s=1.0), ttft_every=3)
    try:
        async with http_server(serve) as port:
            first = await scraper.scrape_one(pod(port))
            assert first.metrics is not None and first.metrics.ttft_p90_s is not None
            pages[0] = faster
            seen = []
            for _ in range(4):
                r = await scraper.scrape_one(pod(port))
                assert r.metrics is not None
                seen.append(r.metrics.ttft_p90_s)
    finally:
        await scraper.close()
    # The old p90 is carried (never None) until the pod's countdown runs out, then the new one
    # shows up: at most ttft_every - 1 = 2 stale scrapes.
    old, new = first.metrics.ttft_p90_s, pytest.approx(0.009)
    k = next(i for i, v in enumerate(seen) if v == new)
    assert k <= 2
    assert seen[:k] == [old] * k
    assert all(v == new for v in seen[k:])


async def test_kv_capacity_is_carried_between_recomputations() -> None:
    # Read with the TTFT (a fixed engine config), never missing in between.
    scraper = Scraper(ScrapeSection(timeout_s=1.0), ttft_every=3)
    try:
        async with http_server(page_handler) as port:
            rs = [await scraper.scrape_one(pod(port)) for _ in range(7)]
    finally:
        await scraper.close()
    assert [(r.metrics.cache_blocks, r.metrics.block_size) for r in rs if r.metrics] == [
        (2 * 29127, 16)
    ] * 7
    assert all(r.metrics and r.metrics.lora_running == {"sql-lora", "chat-lora"} for r in rs)


async def test_lora_state_appears_within_a_ttft_period_then_tracks_every_scrape() -> None:
    # A pod's LoRA series appears at its first adapter step (BACKGROUND §6) and stays.
    no_lora = "\n".join(ln for ln in PAGE.split("\n") if "lora_requests_info" not in ln)
    newer = 'vllm:lora_requests_info{max_lora="4",running_lora_adapters="math",waiting_lora_adapters=""} 1.8e9\n'  # noqa: E501
    pages = [no_lora]

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=pages[0])

    scraper = Scraper(ScrapeSection(timeout_s=1.0), ttft_every=3)
    try:
        async with http_server(serve) as port:
            p = pod(port)
            before = [await scraper.scrape_one(p) for _ in range(3)]
            pages[0] = PAGE
            seen = []
            for _ in range(3):
                r = await scraper.scrape_one(p)
                assert r.metrics is not None
                seen.append(r.metrics.lora_running)
            pages[0] = PAGE + newer  # a later adapter step: seen on every scrape from now
            after = [await scraper.scrape_one(p) for _ in range(3)]
    finally:
        await scraper.close()
    assert all(r.metrics and r.metrics.max_lora is None for r in before)
    assert seen[-1] == {"sql-lora", "chat-lora"}  # within ttft_every scrapes
    assert [r.metrics.lora_running for r in after if r.metrics] == [{"math"}] * 3


# --- rounds -------------------------------------------------------------------------------------


async def delayed_page(request: web.Request) -> web.Response:
    await asyncio.sleep(0.2)
    return web.Response(text=PAGE)


async def test_round_is_concurrent() -> None:
    scraper = Scraper(ScrapeSection(timeout_s=1.0))
    try:
        async with http_server(delayed_page) as port:
            pods = [pod(port, name=f"p{i}") for i in range(10)]
            t0 = time.monotonic()
            results = await scraper.scrape_round(pods)
            elapsed = time.monotonic() - t0
    finally:
        await scraper.close()
    assert len(results) == 10 and all(r.ok for r in results)
    assert elapsed < 1.0  # 10 x 0.2 s one after the other would be 2 s


async def test_concurrency_cap_does_not_eat_the_timeout() -> None:
    # 6 pods, 2 at a time, 0.2 s each: three waves (~0.6 s) although timeout_s is 0.3 s,
    # because a pod's timeout starts when a worker takes it, not while it waits its turn.
    scraper = Scraper(ScrapeSection(timeout_s=0.3, max_concurrency=2))
    try:
        async with http_server(delayed_page) as port:
            t0 = time.monotonic()
            results = await scraper.scrape_round([pod(port, f"p{i}") for i in range(6)])
            elapsed = time.monotonic() - t0
    finally:
        await scraper.close()
    assert [r.reason for r in results] == [""] * 6
    assert elapsed >= 0.55


async def test_round_keeps_order_and_mixes_outcomes(scraper: Scraper) -> None:
    dead = free_port()
    async with http_server(page_handler) as port:
        results = await scraper.scrape_round([pod(port), pod(dead), pod(port, "again")])
    assert [r.address for r in results] == [
        f"127.0.0.1:{port}",
        f"127.0.0.1:{dead}",
        f"127.0.0.1:{port}",
    ]
    assert [r.reason for r in results] == ["", "refused", ""]


async def test_empty_round(scraper: Scraper) -> None:
    assert await scraper.scrape_round([]) == []


# --- the loop -----------------------------------------------------------------------------------


async def _run_until(
    scraper: Scraper,
    pods: list[Pod],
    on_round: Callable[[list[ScrapeResult]], None],
    stop: asyncio.Event,
) -> float:
    """Run the loop; return how long `run` took to return after `stop` was set."""
    task = asyncio.create_task(scraper.run(lambda: pods, on_round, stop))
    await asyncio.wait_for(stop.wait(), timeout=5)
    t0 = time.monotonic()
    await asyncio.wait_for(task, timeout=2)
    return time.monotonic() - t0


async def test_run_calls_on_round_repeatedly_and_stops(scraper: Scraper) -> None:
    rounds: list[list[ScrapeResult]] = []
    starts: list[float] = []
    stop = asyncio.Event()

    def on_round(results: list[ScrapeResult]) -> None:
        rounds.append(results)
        if len(rounds) == 4:
            stop.set()

    async with http_server(page_handler) as port:
        pods = [pod(port)]

        def get_pods() -> list[Pod]:
            starts.append(time.monotonic())
            return pods

        task = asyncio.create_task(scraper.run(get_pods, on_round, stop))
        await asyncio.wait_for(task, timeout=5)
    assert len(rounds) == 4
    assert all(len(r) == 1 and r[0].ok for r in rounds)
    # Fixed rate: 4 rounds at interval 0.05 s start within ~3 intervals of the first.
    assert starts[-1] - starts[0] == pytest.approx(0.15, abs=0.1)


async def test_on_round_exception_does_not_stop_the_loop(
    scraper: Scraper, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    stop = asyncio.Event()

    def on_round(results: list[ScrapeResult]) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            stop.set()
        raise RuntimeError("callback bug")

    caplog.set_level(logging.ERROR, logger="router_ext.fleet.scraper")
    async with http_server(page_handler) as port:
        await _run_until(scraper, [pod(port)], on_round, stop)
    assert calls == 4
    # The traceback is logged once, not once per round.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "callback bug" in caplog.text


async def test_get_pods_exception_does_not_stop_the_loop(scraper: Scraper) -> None:
    calls = 0
    stop = asyncio.Event()

    def get_pods() -> list[Pod]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("discovery hiccup")
        return []

    def on_round(results: list[ScrapeResult]) -> None:
        if calls >= 3:
            stop.set()

    await asyncio.wait_for(scraper.run(get_pods, on_round, stop), timeout=5)
    assert calls >= 3


async def test_stop_interrupts_a_round_in_flight() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    scraper = Scraper(ScrapeSection(interval_s=1.0, timeout_s=10.0))
    stop = asyncio.Event()
    rounds: list[list[ScrapeResult]] = []
    try:
        async with raw_server(hang) as port:
            task = asyncio.create_task(scraper.run(lambda: [pod(port)], rounds.append, stop))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            stop.set()
            await asyncio.wait_for(task, timeout=2)
            elapsed = time.monotonic() - t0
    finally:
        await scraper.close()
    assert elapsed < 0.2
    assert rounds == []  # the interrupted round is not reported


async def test_stop_during_the_wait_between_rounds(scraper: Scraper) -> None:
    slow = Scraper(ScrapeSection(interval_s=10.0, timeout_s=0.3))
    stop = asyncio.Event()
    rounds: list[list[ScrapeResult]] = []
    try:
        task = asyncio.create_task(slow.run(list, rounds.append, stop))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, timeout=1)
    finally:
        await slow.close()
    assert rounds == [[]]


async def test_overrun_round_starts_the_next_at_once() -> None:
    scraper = Scraper(ScrapeSection(interval_s=0.1, timeout_s=1.0))
    stop = asyncio.Event()
    starts: list[float] = []
    ends: list[float] = []

    def on_round(results: list[ScrapeResult]) -> None:
        ends.append(time.monotonic())
        if len(ends) == 3:
            stop.set()

    try:
        async with http_server(delayed_page) as port:  # each round takes ~0.2 s > interval

            def get_pods() -> list[Pod]:
                starts.append(time.monotonic())
                return [pod(port)]

            await asyncio.wait_for(scraper.run(get_pods, on_round, stop), timeout=5)
    finally:
        await scraper.close()
    # Never overlapping, and no idle gap after an overrun.
    for end, nxt in zip(ends, starts[1:], strict=False):
        assert 0 <= nxt - end < 0.05


async def test_close_is_idempotent_and_scraper_reusable() -> None:
    s = Scraper(ScrapeSection())
    await s.close()
    async with http_server(page_handler) as port:
        assert (await s.scrape_one(pod(port))).ok
        await s.close()
        await s.close()
        assert (await s.scrape_one(pod(port))).ok
    await s.close()


# --- classification of exceptions we cannot easily provoke on loopback ----------------------------


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (asyncio.TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("read"), "timeout"),
        (aiohttp.ServerDisconnectedError(), "reset"),
        (aiohttp.ClientPayloadError("cut"), "reset"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), "reset"),
        (ConnectionResetError(), "reset"),
        (aiohttp.ClientConnectionError("weird"), "connect"),
        (ValueError("?"), "error"),
    ],
)
def test_classify_error(exc: BaseException, reason: str) -> None:
    assert classify_error(exc) == reason


def test_classify_connector_errors() -> None:
    # Only host/port/ssl of the connection key are read; its constructor differs by version.
    key: Any = SimpleNamespace(host="10.0.0.1", port=80, ssl=True)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    unreachable = aiohttp.ClientConnectorError(key, OSError(113, "No route to host"))
    dns = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    assert classify_error(refused) == "refused"
    assert classify_error(unreachable) == "connect"
    assert classify_error(dns) == "connect"


# --- body cap (scrape.max_body_bytes) -----------------------------------------------------------

CAP = 64 * 1024


async def test_body_over_the_cap_with_content_length_is_too_large() -> None:
    big = PAGE * (2 * CAP // len(PAGE) + 1)  # > CAP, sent with a Content-Length

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=big)

    scraper = Scraper(ScrapeSection(timeout_s=2.0, max_body_bytes=CAP))
    roomy = Scraper(ScrapeSection(max_body_bytes=len(big.encode())))
    try:
        async with http_server(serve) as port:
            r = await scraper.scrape_one(pod(port))
            # The pod is not blamed beyond this scrape: a page under the cap still works.
            ok = await roomy.scrape_one(pod(port))
    finally:
        await scraper.close()
        await roomy.close()
    assert (r.ok, r.reason, r.metrics) == (False, "too_large", None), r
    assert not r.is_connection_failure
    assert f"127.0.0.1:{port}" in r.error
    assert f"{CAP:,}" in r.error and "max_body_bytes" in r.error
    assert f"Content-Length {len(big.encode()):,}" in r.error
    assert ok.ok


async def test_streamed_body_over_the_cap_stops_reading() -> None:
    # No Content-Length (chunked): the cap is enforced while reading, and reading stops
    # there: the server cannot push its whole (here 64 MiB) body through.
    chunk = b"# filler\n" * (64 * 1024 // 9)
    total = 1024 * len(chunk)
    sent = 0
    finished = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        await resp.prepare(request)  # no Content-Length set: chunked transfer encoding
        try:
            await resp.write(PAGE.encode())
            while sent < total:
                await resp.write(chunk)
                sent += len(chunk)
        finally:
            finished.set()
        return resp

    scraper = Scraper(ScrapeSection(timeout_s=5.0, max_body_bytes=CAP))
    try:
        async with http_server(stream) as port:
            r = await scraper.scrape_one(pod(port))
            await asyncio.wait_for(finished.wait(), timeout=5)
    finally:
        await scraper.close()
    assert (r.ok, r.reason) == (False, "too_large"), r
    assert "streamed" in r.error and f"{CAP:,}" in r.error
    # The client hung up: the server's writes failed long before the end of the body.
    assert sent < total // 2


async def test_streamed_body_under_the_cap_is_parsed() -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        data = PAGE.encode()
        for i in range(0, len(data), 4096):
            await resp.write(data[i : i + 4096])
        return resp

    scraper = Scraper(ScrapeSection(max_body_bytes=len(PAGE.encode())))
    try:
        async with http_server(stream) as port:
            r = await scraper.scrape_one(pod(port))
    finally:
        await scraper.close()
    assert r.ok, r
    assert r.metrics is not None and r.metrics.running == 12


def test_default_cap_is_far_above_a_real_page() -> None:
    cap = ScrapeSection().max_body_bytes
    assert cap == 4 << 20
    assert cap > 10 * len(read_sample("vllm_v1.txt").encode())


# --- repaired pages and distinct failure reasons -----------------------------------------------


async def test_negative_gauge_is_repaired_and_reported(scraper: Scraper) -> None:
    bad = PAGE.replace(
        'vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} ',
        'vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} -',
        1,
    )
    assert bad != PAGE

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=bad)

    async with http_server(serve) as port:
        r = await scraper.scrape_one(pod(port))
        clean = await scraper.scrape_one(pod(port, "x"))
    assert r.ok and r.metrics is not None, r
    assert r.reason == "" and r.error == ""
    assert r.warning == (f"127.0.0.1:{port}: negative vllm:num_requests_waiting clamped to 0"), (
        r.warning
    )
    assert clean.warning == r.warning  # every scrape says so; the lifecycle logs it once


async def test_clean_page_has_no_warning(scraper: Scraper) -> None:
    async with http_server(page_handler) as port:
        r = await scraper.scrape_one(pod(port))
    assert r.ok and r.warning == ""


@pytest.mark.parametrize(
    ("status", "body", "reason", "error_has"),
    [
        (500, "engine dead", "http_500", "HTTP 500"),
        (200, 'vllm:num_requests_running{model_name="m"} lots\n', "parse", "line 1"),
        (
            200,
            "vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n",
            "no_usable_values",
            "NaN or Inf",
        ),
        (200, "# TYPE up gauge\nup 1\n", "no_known_metrics", "no known engine metrics"),
        (200, "", "no_known_metrics", "no known engine metrics"),
    ],
    ids=["http_500", "garbage", "all_nan", "unrelated", "empty"],
)
async def test_unusable_pages_fail_with_distinct_reasons(
    scraper: Scraper, status: int, body: str, reason: str, error_has: str
) -> None:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    async with http_server(serve) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason, r.metrics, r.warning) == (False, reason, None, ""), r
    assert error_has in r.error and f"127.0.0.1:{port}" in r.error
    assert "\n" not in r.error


# --- /v1/models ---------------------------------------------------------------------------------

MODELS = (Path(__file__).parent / "data" / "vllm_models.json").read_text()
BASE = "meta-llama/Llama-3.1-8B-Instruct"


@asynccontextmanager
async def pod_server(routes: dict[str, Handler]) -> AsyncIterator[int]:
    """A pod with several paths (anything else is aiohttp's 404); yields the port."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def json_handler(body: str, status: int = 200, hits: list[str] | None = None) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        if hits is not None:
            hits.append(request.headers.get("Accept", ""))
        return web.Response(status=status, text=body, content_type="application/json")

    return serve


def test_vllm_model_list_names_adapters_and_their_parent() -> None:
    listing = parse_model_list(MODELS.encode())
    assert listing.ids == {BASE, "sql-lora", "chat-lora"}
    assert listing.adapters == {"sql-lora", "chat-lora"}
    assert listing.adapter_parents == (("chat-lora", BASE), ("sql-lora", BASE))


def test_model_list_without_parent_keys_is_all_base_models() -> None:
    # SGLang and most OpenAI-compatible servers send no `parent` at all.
    body = b'{"object":"list","data":[{"id":"qwen-7b","object":"model","owned_by":"sglang"}]}'
    listing = parse_model_list(body)
    assert (listing.ids, listing.adapters) == ({"qwen-7b"}, frozenset())


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"<html>hi</html>", "not JSON"),
        (b'{"models": []}', "no 'data' list"),
        (b'[{"id": "a"}]', "no 'data' list"),
        (b'{"data": [{"name": "a"}]}', "data[0] has no string 'id'"),
        (b'{"data": [{"id": 7}]}', "data[0] has no string 'id'"),
        (b'{"data": [{"id": "a", "parent": 3}]}', "'parent' is not a string"),
    ],
)
def test_model_list_of_another_shape_is_an_error(body: bytes, needle: str) -> None:
    with pytest.raises(ModelListError, match=re.escape(needle)):
        parse_model_list(body)


async def test_models_are_listed_on_the_first_scrape_then_every_interval() -> None:
    accepts: list[str] = []
    scraper = Scraper(ScrapeSection(timeout_s=0.5, models_interval_s=3600))
    try:
        routes = {"/metrics": page_handler, "/v1/models": json_handler(MODELS, hits=accepts)}
        async with pod_server(routes) as port:
            p = pod(port, name="vllm-a")
            first = await scraper.scrape_one(p)
            later = [await scraper.scrape_one(p) for _ in range(3)]
            # Another pod instance at the same address is listed at once, not in an hour.
            replaced = await scraper.scrape_one(replace(p, name="vllm-b"))
    finally:
        await scraper.close()
    assert first.ok and first.metrics is not None and first.metrics.running == 12
    assert first.listed_models == {BASE, "sql-lora", "chat-lora"}
    assert first.listed_adapters == {"sql-lora", "chat-lora"}
    assert first.adapter_parents == (("chat-lora", BASE), ("sql-lora", BASE))
    assert (first.identity, first.models_reason) == ("vllm-a", "")
    assert all(r.ok and r.listed_models is None for r in later)  # None: keep the last listing
    assert (replaced.identity, replaced.listed_models) == ("vllm-b", first.listed_models)
    assert accepts == ["application/json"] * 2


async def test_models_are_fetched_again_once_due() -> None:
    hits: list[str] = []
    scraper = Scraper(ScrapeSection(timeout_s=0.5, models_interval_s=0.05))
    try:
        routes = {"/metrics": page_handler, "/v1/models": json_handler(MODELS, hits=hits)}
        async with pod_server(routes) as port:
            p = pod(port)
            assert (await scraper.scrape_one(p)).listed_models is not None
            deadline = time.monotonic() + 5
            while (r := await scraper.scrape_one(p)).listed_models is None:
                assert time.monotonic() < deadline, "never listed again"
    finally:
        await scraper.close()
    assert r.listed_models == {BASE, "sql-lora", "chat-lora"} and len(hits) == 2


async def test_pod_without_the_models_path_is_fine(scraper: Scraper) -> None:
    async with http_server(page_handler) as port:  # /v1/models is a 404 here
        r = await scraper.scrape_one(pod(port))
    assert r.ok and r.metrics is not None
    assert (r.listed_models, r.listed_adapters, r.models_reason) == (None, None, "")


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, "engine dead", "http_500"),
        (200, "<html>not json</html>", "parse"),
        (200, '{"data": "nope"}', "parse"),
        (200, "x" * 8192, "too_large"),
    ],
)
async def test_failed_model_list_never_fails_the_metrics_scrape(
    status: int, body: str, reason: str
) -> None:
    small_page = 'vllm:num_requests_running{model_name="m"} 3\nvllm:num_requests_waiting 1\n'
    scraper = Scraper(ScrapeSection(timeout_s=0.5, max_body_bytes=4096))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=small_page)

    try:
        async with pod_server(
            {"/metrics": metrics, "/v1/models": json_handler(body, status)}
        ) as port:
            r = await scraper.scrape_one(pod(port))
    finally:
        await scraper.close()
    assert r.ok and r.metrics is not None and (r.metrics.running, r.metrics.waiting) == (3, 1)
    assert (r.reason, r.error) == ("", "")
    assert (r.listed_models, r.models_reason) == (None, reason)
    assert f"127.0.0.1:{port}" in r.models_error and "/v1/models" in r.models_error


async def test_hung_model_list_times_out_and_metrics_stand() -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text=MODELS)

    scraper = Scraper(ScrapeSection(timeout_s=0.2))
    try:
        async with pod_server({"/metrics": page_handler, "/v1/models": hang}) as port:
            t0 = time.monotonic()
            r = await scraper.scrape_one(pod(port))
            took = time.monotonic() - t0
            release.set()
    finally:
        await scraper.close()
    assert r.ok and r.metrics is not None
    assert r.models_reason == "timeout"
    assert took < 0.2 + 0.2 + 0.5  # the metrics fetch plus one more timeout, no more


async def test_model_list_is_read_even_when_the_metrics_page_is_unusable(
    scraper: Scraper,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="exporter crashed")

    async with pod_server({"/metrics": broken, "/v1/models": json_handler(MODELS)}) as port:
        r = await scraper.scrape_one(pod(port))
    assert (r.ok, r.reason) == (False, "http_500")
    assert r.listed_models == {BASE, "sql-lora", "chat-lora"}


async def test_no_model_list_request_to_a_pod_that_is_down(scraper: Scraper) -> None:
    r = await scraper.scrape_one(pod(free_port()))
    assert (r.reason, r.listed_models, r.models_reason) == ("refused", None, "")
