"""Fetch and parse every pod's /metrics on a fixed-rate schedule.

One `aiohttp.ClientSession` lives across rounds, so each pod keeps a warm keep-alive connection
and a round costs no TCP handshakes. A round is a fixed pool of worker coroutines pulling pods
from one shared iterator: at most `max_concurrency` fetches are in flight, a 10,000-pod fleet
costs 10,000 coroutine calls rather than 10,000 tasks, and a pod's `timeout_s` only starts when a
worker picks it up, so a pod queued behind a slow batch is not timed out for waiting its turn.

Every `scrape.models_interval_s` a pod's scrape also fetches its `/v1/models` (the base model
and the LoRA adapters it can serve), after its /metrics, with the same timeout and body cap.
That fetch is best effort: its failure is a token in `ScrapeResult.models_reason`, never a
failed scrape, and a pod that does not serve the path (HTTP 404) is simply not listed.

Nothing here logs per pod: every outcome, good or bad, is returned as a `ScrapeResult` with a
short `reason`, and the lifecycle layer logs once per state change.

In the router this class runs inside the scrape worker process (`router_ext.fleet.scrape_worker`),
not on the serving loop: fetching and parsing are CPU-bound Python, and a big fleet or one
runaway page must not delay an ext_proc answer. Bodies are capped at `max_body_bytes` while
streaming, so a runaway page costs neither memory nor parse time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson

from router_ext.config import ScrapeSection
from router_ext.fleet.engine_metrics import (
    MetricsParseError,
    NoKnownMetricsError,
    NoUsableValuesError,
    parse_engine_page,
)
from router_ext.fleet.snapshot import Pod, ScrapeResult

__all__ = [
    "DEFAULT_TTFT_EVERY",
    "ModelListError",
    "ModelListing",
    "Scraper",
    "classify_error",
    "parse_model_list",
]

log = logging.getLogger(__name__)

#: Recompute a pod's TTFT p90 every this many successful scrapes (see `Scraper`).
DEFAULT_TTFT_EVERY = 10
# Client-side idle limit for pooled connections. Below uvicorn's default keep-alive (5 s, which
# vLLM and SGLang use), so the pod never closes a connection we are about to reuse; at the
# default 0.5 s interval every connection is reused long before this.
_KEEPALIVE_S = 4.0
_USER_AGENT = "router-ext-scraper"
# Plain Prometheus text, no compression: on a LAN gzip costs the pod and us more CPU than the
# bytes it saves.
_HEADERS = {"Accept": "text/plain;version=0.0.4", "User-Agent": _USER_AGENT}
_ON_ROUND_LOG_EVERY_S = 60.0
_MODELS_HEADERS = {"Accept": "application/json"}


def classify_error(exc: BaseException) -> str:
    """Map a fetch exception to the short `ScrapeResult.reason`.

    `refused`: nothing listens (pod gone or not started). `reset`: the peer dropped the
    connection or closed it mid-response (process died or restarted). `connect`: any other
    failure to connect (no route, DNS, unreachable). `timeout`: no complete answer within
    `timeout_s`. `error`: anything else (e.g. a reply that is not HTTP).
    Refused/reset/connect are what `ScrapeResult.is_connection_failure` treats as "down now".
    """
    # TimeoutError is an OSError subclass, and aiohttp's timeouts are also ClientErrors:
    # check it first.
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
            return "refused"
        if isinstance(exc.os_error, ConnectionResetError) or exc.errno == errno.ECONNRESET:
            return "reset"
        return "connect"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return "reset"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connect"
    return "error"


def _describe(exc: BaseException, limit: int = 200) -> str:
    """One short line: aiohttp's messages can span lines (e.g. a bad status line dump)."""
    text = " ".join(str(exc).split())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


@dataclass(slots=True)
class _TtftMemo:
    value: float | None
    countdown: int  # successful scrapes left before the next TTFT recomputation
    # The engine's fixed KV-cache config, read with the TTFT and carried in between.
    cache_blocks: int | None = None
    block_size: int | None = None
    # The page had a LoRA series last time it was looked for: look on every scrape (the
    # adapter state changes by the second), else only with the TTFT (no scan of the page
    # for a family a pod without LoRA never has; vLLM keeps it once it appeared).
    has_lora: bool = False


@dataclass(frozen=True, slots=True)
class ModelListing:
    """A pod's `/v1/models` answer: every listed id, and each adapter's parent."""

    ids: frozenset[str]
    adapter_parents: tuple[tuple[str, str], ...]  # sorted (adapter, parent)

    @property
    def adapters(self) -> frozenset[str]:
        return frozenset(a for a, _ in self.adapter_parents)


class ModelListError(ValueError):
    """A /v1/models body that is not the OpenAI list shape."""


def parse_model_list(body: bytes) -> ModelListing:
    """Parse an OpenAI-style model list (`{"object": "list", "data": [{"id": ...}, ...]}`).

    vLLM lists each LoRA adapter as its own entry with `parent` set to the base model; base
    models have `parent: null` (or no such key, as SGLang and most servers send). Raises
    `ModelListError` for a body of another shape: a half-understood listing would tell the
    router a pod serves less than it does.
    """
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ModelListError(f"not JSON: {e}") from e
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ModelListError("no 'data' list")
    ids: set[str] = set()
    parents: dict[str, str] = {}
    for i, item in enumerate(data):
        mid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(mid, str) or not mid:
            raise ModelListError(f"data[{i}] has no string 'id'")
        parent = item.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ModelListError(f"data[{i}] ({mid!r}): 'parent' is not a string")
        ids.add(mid)
        if parent and parent != mid:
            parents[mid] = parent
    return ModelListing(frozenset(ids), tuple(sorted(parents.items())))


class Scraper:
    """Scrapes pods' engine metrics; see the module docstring for the round structure.

    `session_factory` builds the `aiohttp.ClientSession` on first use (inside the running
    loop); the scraper owns that session and closes it in `close()`. The default is a session
    over `TCPConnector(limit=cfg.max_concurrency)` with keep-alive.

    Parsing runs inline on this object's event loop: it is CPU-bound, and after the pre-filter
    in `engine_metrics` it costs a few hundred µs per pod, less than handing it to a thread
    would (the GIL would serialise it anyway). That is why the router runs this loop in its
    own process (`router_ext.fleet.scrape_worker`): there the stall is harmless.

    TTFT: the p90 comes from a histogram that is cumulative since the engine started, so it
    moves slowly, and its buckets are most of the parse cost (~14 µs per bucket line, ~23
    lines per engine). Each pod's p90 is therefore recomputed every `ttft_every` successful
    scrapes and carried forward in between; pods get different phases (a hash of the address),
    so the extra cost is spread over rounds instead of landing on one. `ttft_every=1` computes
    it on every scrape.
    """

    def __init__(
        self,
        cfg: ScrapeSection,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        ttft_every: int = DEFAULT_TTFT_EVERY,
    ) -> None:
        self.cfg = cfg
        self._session_factory = session_factory or self._default_session
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        self._ttft_every = max(1, ttft_every)
        self._ttft: dict[str, _TtftMemo] = {}
        # address -> (pod identity, monotonic time its /v1/models is next due). A new pod, or
        # a new pod instance at a known address, is listed on its first scrape.
        self._models_due: dict[str, tuple[str, float]] = {}
        self._on_round_error: tuple[str, float, int] | None = None  # (what, logged_at, repeats)

    # --- session ---------------------------------------------------------------------------

    def _default_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_concurrency,
            limit_per_host=0,
            keepalive_timeout=_KEEPALIVE_S,
            # Pods are listed by IP; a DNS name still gets a short cache, not a lookup a scrape.
            ttl_dns_cache=10,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=_HEADERS,
            skip_auto_headers=("Accept-Encoding",),
            raise_for_status=False,
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._session_factory()
        return self._session

    async def close(self) -> None:
        """Close the session and its pooled connections (idempotent)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # --- one pod ---------------------------------------------------------------------------

    async def scrape_one(self, pod: Pod) -> ScrapeResult:
        """Fetch and parse one pod's /metrics, and its /v1/models when due; never raises
        (except on cancellation).

        The listing is fetched when due, unless the metrics fetch could not connect or timed
        out (the pod is down or hung: a second request would only double the wait); it is
        then fetched on the pod's next answered scrape. The listing's outcome never changes
        the metrics outcome.
        """
        r = await self._scrape_metrics(pod)
        if r.is_connection_failure or r.reason == "timeout":
            return r
        identity = pod.identity
        due = self._models_due.get(pod.address)
        if due is not None and due[0] == identity and r.fetched_at < due[1]:
            return r
        self._models_due[pod.address] = (identity, r.fetched_at + self.cfg.models_interval_s)
        listing, reason, message = await self.fetch_models(pod)
        if listing is None:
            if not reason:
                return r
            return replace(r, models_reason=reason, models_error=message, identity=identity)
        return replace(
            r,
            listed_models=listing.ids,
            listed_adapters=listing.adapters,
            adapter_parents=listing.adapter_parents,
            identity=identity,
        )

    async def fetch_models(self, pod: Pod) -> tuple[ModelListing | None, str, str]:
        """GET the pod's `scrape.models_path`: (listing, reason, message).

        (listing, "", "") on success; (None, "", "") when the pod does not serve the path
        (HTTP 404: not every server has it, and that is no fault); else (None, reason, a
        human message) with reason a `classify_error` token, `http_<status>`, `too_large`
        (over `scrape.max_body_bytes`) or `parse`. Same timeout as a metrics fetch.
        """
        address = pod.address
        try:
            async with self._get_session().get(
                f"http://{address}{self.cfg.models_path}",
                timeout=self._timeout,
                allow_redirects=False,
                headers=_MODELS_HEADERS,
            ) as resp:
                if resp.status == 404:
                    return None, "", ""
                if resp.status != 200:
                    why = f"{address}: {self.cfg.models_path}: HTTP {resp.status}"
                    return None, f"http_{resp.status}", why
                body = await self._read_capped(resp)
                if body is None:
                    resp.close()
                    cap = self.cfg.max_body_bytes
                    why = f"{address}: {self.cfg.models_path} body over {cap:,} bytes"
                    return None, "too_large", why
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return None, classify_error(e), f"{address}: {self.cfg.models_path}: {_describe(e)}"
        try:
            return parse_model_list(body), "", ""
        except ModelListError as e:
            return None, "parse", f"{address}: {self.cfg.models_path}: {e}"

    async def _scrape_metrics(self, pod: Pod) -> ScrapeResult:
        """Fetch and parse one pod's /metrics; never raises (except on cancellation).

        The whole fetch (connect, request, body) is bounded by `cfg.timeout_s`. `duration_s`
        covers fetch + parse; `fetched_at` is `time.monotonic()` when it finished. aiohttp
        retries a GET once when a pooled keep-alive connection turns out to be dead, so a
        restarted pod is not reported as `reset` because of a stale socket.

        A body over `cfg.max_body_bytes` is `too_large`: refused on its Content-Length before
        any byte is read, else when the streamed (decoded) body passes the cap; the
        connection is then dropped rather than drained.
        """
        address = pod.address
        t0 = time.monotonic()
        session = self._get_session()
        try:
            async with session.get(
                f"http://{address}{self.cfg.path}",
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    return self._fail(
                        address, t0, f"http_{resp.status}",
                        f"{address}: HTTP {resp.status} {resp.reason or ''}".rstrip(),
                    )  # fmt: skip
                body = await self._read_capped(resp)
                if body is None:
                    resp.close()  # do not drain a runaway body to reuse the connection
                    return self._too_large(address, t0, resp.content_length)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = classify_error(e)
            if reason == "timeout":
                msg = f"{address}: no answer within {self.cfg.timeout_s:g} s"
            else:
                msg = f"{address}: {_describe(e)}"
            return self._fail(address, t0, reason, msg)

        text = body.decode("utf-8", errors="replace")
        memo = self._ttft.get(address)
        want_ttft = memo is None or memo.countdown <= 0
        try:
            want_lora = want_ttft or (memo is not None and memo.has_lora)
            metrics, warning = parse_engine_page(
                text, pod.model or None, ttft=want_ttft, cache_config=want_ttft, lora=want_lora
            )
        except NoUsableValuesError as e:
            return self._fail(address, t0, "no_usable_values", f"{address}: {e}")
        except NoKnownMetricsError as e:
            return self._fail(address, t0, "no_known_metrics", f"{address}: {e}")
        except MetricsParseError as e:
            return self._fail(address, t0, "parse", f"{address}: {e}")

        if want_ttft:
            # First sight: spread the pods' recomputations over `ttft_every` scrapes.
            every = self._ttft_every
            countdown = (zlib.crc32(address.encode()) % every) if memo is None else every - 1
            self._ttft[address] = _TtftMemo(
                metrics.ttft_p90_s,
                countdown,
                metrics.cache_blocks,
                metrics.block_size,
                metrics.max_lora is not None or bool(metrics.lora_running | metrics.lora_waiting),
            )
        elif memo is not None:
            memo.countdown -= 1
            if memo.value is not None or memo.cache_blocks is not None:
                metrics = replace(
                    metrics,
                    ttft_p90_s=memo.value,
                    cache_blocks=memo.cache_blocks,
                    block_size=memo.block_size,
                )

        now = time.monotonic()
        return ScrapeResult(
            address=address,
            ok=True,
            fetched_at=now,
            duration_s=now - t0,
            metrics=metrics,
            warning=f"{address}: {warning}" if warning else "",
        )

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed the cap.

        Content-Length is checked first (nothing read). The body is then read chunk by chunk
        as it arrives and counted after aiohttp's decoding, so neither a missing/false length
        nor a compressed body (we never ask for one, a server may send one anyway) can make us
        buffer more than the cap plus one chunk.
        """
        cap = self.cfg.max_body_bytes
        length = resp.content_length
        if length is not None and length > cap:
            return None
        chunks: list[bytes] = []
        size = 0
        while chunk := await resp.content.readany():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, address: str, t0: float, length: int | None) -> ScrapeResult:
        cap = self.cfg.max_body_bytes
        seen = f"Content-Length {length:,}" if length is not None and length > cap else "streamed"
        return self._fail(
            address, t0, "too_large",
            f"{address}: /metrics body over scrape.max_body_bytes = {cap:,} bytes ({seen}); "
            "not read further, not parsed",
        )  # fmt: skip

    @staticmethod
    def _fail(address: str, t0: float, reason: str, error: str) -> ScrapeResult:
        now = time.monotonic()
        return ScrapeResult(
            address=address,
            ok=False,
            fetched_at=now,
            duration_s=now - t0,
            reason=reason,
            error=error,
        )

    # --- one round -------------------------------------------------------------------------

    async def scrape_round(self, pods: Sequence[Pod]) -> list[ScrapeResult]:
        """Scrape all pods concurrently (at most `cfg.max_concurrency` at once); results are
        in the order of `pods`. `pods` may be a subset of the fleet (the router scrapes
        brand-new pods at once): the TTFT memo of pods left out is kept, only `run`'s full
        rounds forget pods that left discovery."""
        pods = list(pods)
        results: list[ScrapeResult | None] = [None] * len(pods)
        work = iter(enumerate(pods))

        async def worker() -> None:
            # All workers share one iterator: each pod is taken exactly once.
            for i, pod in work:
                results[i] = await self.scrape_one(pod)

        n = min(self.cfg.max_concurrency, len(pods))
        if n:
            await asyncio.gather(*(worker() for _ in range(n)))
        return [r for r in results if r is not None]

    def _forget_departed(self, pods: Sequence[Pod]) -> None:
        """Drop the memos of pods no longer scraped (after a full round)."""
        for memo in (self._ttft, self._models_due):
            if len(memo) > len(pods):
                live = {p.address for p in pods}
                for address in [a for a in memo if a not in live]:
                    del memo[address]

    # --- the loop --------------------------------------------------------------------------

    async def run(
        self,
        get_pods: Callable[[], Sequence[Pod]],
        on_round: Callable[[list[ScrapeResult]], None],
        stop: asyncio.Event,
    ) -> None:
        """Scrape `get_pods()` every `cfg.interval_s` until `stop` is set.

        Fixed-rate: rounds start at t0, t0 + interval, t0 + 2*interval, ... regardless of how
        long each took, so the schedule does not drift. Rounds never overlap: if one overran
        its slot the next starts at once and the schedule is re-anchored there (no burst of
        catch-up rounds). `on_round` is called synchronously after each round; an exception in
        it (or in `get_pods`) is logged and the loop goes on. Setting `stop` ends the loop
        promptly, cancelling a round in flight.
        """
        loop = asyncio.get_running_loop()
        interval = self.cfg.interval_s
        next_start = loop.time()
        while not stop.is_set():
            try:
                pods = get_pods()
            except Exception:
                log.exception("scraper: get_pods() failed; skipping this round")
                pods = ()
            results = await self._round_unless_stopped(pods, stop)
            if results is None:
                return
            self._forget_departed(pods)
            try:
                on_round(results)
            except Exception as e:
                self._log_on_round_error(e)
            next_start += interval
            delay = next_start - loop.time()
            if delay <= 0:
                next_start = loop.time()  # overran: go now, re-anchor the schedule
                continue
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _round_unless_stopped(
        self, pods: Sequence[Pod], stop: asyncio.Event
    ) -> list[ScrapeResult] | None:
        round_task = asyncio.ensure_future(self.scrape_round(pods))
        stop_task = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((round_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            if not round_task.done():
                round_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await round_task
        if round_task.cancelled():
            return None
        return round_task.result()

    def _log_on_round_error(self, e: Exception) -> None:
        """Full traceback the first time (and when the error changes), then at most one line a
        minute with a repeat count: a broken callback must not flood the log at 2 rounds/s."""
        what = _describe(e)
        now = time.monotonic()
        last = self._on_round_error
        if last is None or last[0] != what:
            log.exception("scraper: on_round callback failed (scraping continues)")
            self._on_round_error = (what, now, 0)
        elif now - last[1] >= _ON_ROUND_LOG_EVERY_S:
            log.error(
                "scraper: on_round callback still failing (%d more times): %s", last[2] + 1, what
            )
            self._on_round_error = (what, now, 0)
        else:
            self._on_round_error = (what, last[1], last[2] + 1)
