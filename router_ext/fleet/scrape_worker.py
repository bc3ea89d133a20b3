"""Scraping in a separate OS process, so the serving loop never pays for it.

Why a process: fetching and parsing /metrics is CPU-bound Python (~0.4 ms per pod; one
runaway 20 MB page measured 3.7 s). On the event loop that serves Envoy's ext_proc streams and
grpc health checks, that time is a stall every request and every health check waits behind:
measured, 699 of 729 requests failed open with one 20 MB pod, 1,077 of 1,989 with 2,000
pods. A thread is no answer (the GIL serialises it with the serving loop).

Shape: `ScrapeProcess` (parent side) has the `Scraper` interface the router uses -- `run`,
`scrape_round`, `close` -- and runs `python -m router_ext.fleet.scrape_worker` (this module's
`main`) as a child: a fresh interpreter via `asyncio.create_subprocess_exec` (fork+exec, never
a fork of the gRPC-holding parent that keeps running Python). They talk over the child's
stdin/stdout with length-prefixed frames (4-byte big-endian length, then a `marshal`-ed tuple
of primitives: both ends are the same interpreter binary, and marshal is the cheapest decoder
CPython has for tuples of str/float/int).

Parent -> child frames:
  ("config", {ScrapeSection fields}, ttft_every, targets)  first frame, once per child
  ("targets", (target, ...))                           whenever the pod list changes
  ("scrape", request_id, (target, ...))                on-demand scrape of brand-new pods
with a target (host, port, model, name, uid): the pod's identity travels too, so the child
lists a new pod instance at a known address at once and tags its listing with it.
Child -> parent frames:
  ("round", (result, ...))                             one per fixed-rate round
  ("scraped", request_id, (result, ...))               the answer to a "scrape"
with a result either (address, fetched_at, duration_s, warning, running, waiting, kv,
ttft_p90, hit_rate, engine, models, num_engines, lora_running, lora_waiting, max_lora,
cache_blocks, block_size, prefix_hits, prefix_queries, listing) when ok, or (address,
fetched_at, duration_s, reason, error, listing) when not; `listing` is None when the round
fetched no /v1/models for the pod, else (listed_models, listed_adapters, adapter_parents,
models_reason, models_error, identity) (frozensets travel as marshal frozensets).
`fetched_at` is `time.monotonic()` in the child: CLOCK_MONOTONIC is
system-wide on Linux, so it is directly comparable with the parent's clock.

The child runs the unchanged fixed-rate `Scraper.run` loop. Its life is tied to the parent:
it exits on stdin EOF (the parent closed it or died) and asks the kernel for SIGKILL when the
parent dies (PR_SET_PDEATHSIG); it ignores SIGINT/SIGTERM, which a terminal or a process-group
kill aimed at the router also delivers to it, so a router draining on SIGTERM keeps its
scraper until it exits. It runs at nice +5: when the machine is short of CPU, the serving
process wins it and scrape rounds stretch instead (pods then go stale by age, which the
lifecycle handles).

If the child dies, the parent logs one line (with the child's last stderr line), restarts it
with exponential back-off, and meanwhile keeps routing on its last snapshot: every interval
without a round it reports an empty round, so the lifecycle re-derives states by age and
pods go stale rather than staying "warm" forever. A child that sends no round for
`hung_after_s` is killed and restarted the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import marshal
import os
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from router_ext.config import ScrapeSection
from router_ext.fleet.scraper import DEFAULT_TTFT_EVERY, Scraper
from router_ext.fleet.snapshot import EngineMetrics, Pod, ScrapeResult

__all__ = ["ScrapeProcess", "ScrapeRunner", "decode_results", "encode_results", "make_scraper"]

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
#: Refuse a frame longer than this (a corrupt length prefix must not allocate gigabytes).
#: A 10,000-pod round is ~1.5 MB.
MAX_FRAME = 256 << 20
# Rebuild ScrapeResults in slices of this many pods, yielding to the loop between slices, so
# a request arriving mid-decode waits for one slice (~0.5 ms), not a whole 2,000-pod round.
_DECODE_SLICE = 256
_RESTART_MIN_S = 0.2
_RESTART_MAX_S = 5.0
# A child that lived this long before dying was healthy: restart it at the minimum back-off.
_HEALTHY_LIFE_S = 30.0
# Crash lines after this many consecutive crashes are rate-limited to one a minute.
_CRASH_LOG_BURST = 3
_CRASH_LOG_EVERY_S = 60.0
# Child stderr lines forwarded to the router's log per child (then suppressed): the child has
# almost nothing to say, and a broken one must not flood the router's log.
_STDERR_FORWARD = 10
# A fresh interpreter imports aiohttp, pydantic and prometheus_client before its first round:
# ~0.4 s of CPU, seconds on a loaded machine. It is not "hung" for that.
_STARTUP_GRACE_S = 15.0
_WORKER_NICE = 5
_PR_SET_PDEATHSIG = 1
_PARENT_ENV = "ROUTER_EXT_SCRAPE_PARENT"

_Target = tuple[str, int, str, str, str]


class ScrapeRunner(Protocol):
    """What the router needs from a scraper: `Scraper` (in-process) or `ScrapeProcess`."""

    async def run(
        self,
        get_pods: Callable[[], Sequence[Pod]],
        on_round: Callable[[list[ScrapeResult]], None],
        stop: asyncio.Event,
    ) -> None: ...

    async def scrape_round(self, pods: Sequence[Pod]) -> list[ScrapeResult]: ...

    async def close(self) -> None: ...


def make_scraper(cfg: ScrapeSection) -> ScrapeRunner:
    """The router's scraper: a worker process unless `scrape.in_process` is set."""
    return Scraper(cfg) if cfg.in_process else ScrapeProcess(cfg)


# --- frames and compact results (both ends) -----------------------------------------------------


def encode_frame(msg: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps(msg)
    return _LEN.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None on a clean EOF between frames."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return marshal.loads(await reader.readexactly(n))


def _targets(pods: Sequence[Pod]) -> tuple[_Target, ...]:
    return tuple((p.host, p.port, p.model, p.name, p.uid) for p in pods)


def _pods(targets: Sequence[_Target]) -> list[Pod]:
    return [Pod(host=h, port=p, model=m, name=n, uid=u) for h, p, m, n, u in targets]


def _listing(r: ScrapeResult) -> tuple[Any, ...] | None:
    if r.listed_models is None and not r.models_reason:
        return None
    return (
        r.listed_models, r.listed_adapters, r.adapter_parents, r.models_reason, r.models_error,
        r.identity,
    )  # fmt: skip


def encode_results(results: Sequence[ScrapeResult]) -> tuple[tuple[Any, ...], ...]:
    out: list[tuple[Any, ...]] = []
    for r in results:
        m = r.metrics
        if r.ok and m is not None:
            out.append(
                (
                    r.address, r.fetched_at, r.duration_s, r.warning, m.running, m.waiting,
                    m.kv_cache_usage, m.ttft_p90_s, m.prefix_cache_hit_rate, m.engine,
                    tuple(sorted(m.models)), m.num_engines, m.lora_running, m.lora_waiting,
                    m.max_lora, m.cache_blocks, m.block_size, m.prefix_hits, m.prefix_queries,
                    _listing(r),
                )
            )  # fmt: skip
        else:
            out.append((r.address, r.fetched_at, r.duration_s, r.reason, r.error, _listing(r)))
    return tuple(out)


class _MetricsCache:
    """address -> (the metric values last decoded, the EngineMetrics built from them).

    Idle or steady pods report the same values round after round; reusing the object skips
    the dataclass construction (the bulk of the decode cost) when nothing changed.
    """

    def __init__(self) -> None:
        self.by_address: dict[str, tuple[tuple[Any, ...], EngineMetrics]] = {}

    def get(self, address: str, values: tuple[Any, ...]) -> EngineMetrics:
        hit = self.by_address.get(address)
        if hit is not None and hit[0] == values:
            return hit[1]
        (
            running, waiting, kv, ttft, hit_rate, engine, models, num_engines, lora_running,
            lora_waiting, max_lora, cache_blocks, block_size, prefix_hits, prefix_queries,
        ) = values  # fmt: skip
        m = EngineMetrics(
            running=running,
            waiting=waiting,
            kv_cache_usage=kv,
            ttft_p90_s=ttft,
            prefix_cache_hit_rate=hit_rate,
            engine=engine,
            models=frozenset(models),
            num_engines=num_engines,
            lora_running=lora_running,
            lora_waiting=lora_waiting,
            max_lora=max_lora,
            cache_blocks=cache_blocks,
            block_size=block_size,
            prefix_hits=prefix_hits,
            prefix_queries=prefix_queries,
        )
        self.by_address[address] = (values, m)
        return m


def decode_results(
    rows: Sequence[tuple[Any, ...]], cache: _MetricsCache | None = None
) -> list[ScrapeResult]:
    """Rebuild `ScrapeResult`s from `encode_results` rows (synchronously)."""
    cache = cache or _MetricsCache()
    out: list[ScrapeResult] = []
    for row in rows:
        if len(row) == 6:
            address, fetched_at, duration_s, reason, error, listing = row
            r = ScrapeResult(
                address=address,
                ok=False,
                fetched_at=fetched_at,
                duration_s=duration_s,
                reason=reason,
                error=error,
            )
        else:
            address, fetched_at, duration_s, warning = row[:4]
            listing = row[-1]
            r = ScrapeResult(
                address=address,
                ok=True,
                fetched_at=fetched_at,
                duration_s=duration_s,
                metrics=cache.get(address, row[4:-1]),
                warning=warning,
            )
        if listing is not None:
            # Rare (once per pod per models_interval_s): the second construction is cheap.
            listed, adapters, parents, reason, error, identity = listing
            r = replace(
                r,
                listed_models=listed,
                listed_adapters=adapters,
                adapter_parents=parents,
                models_reason=reason,
                models_error=error,
                identity=identity,
            )
        out.append(r)
    return out


# --- parent side --------------------------------------------------------------------------------


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


class ScrapeProcess:
    """Parent side of the scrape worker; see the module docstring.

    Observable state (tests, benchmarks, admin): `pid` of the live child (None while down),
    `starts` (children started so far), `rounds` (rounds received), `decode_us_per_pod` (the
    parent-loop cost of the last round's frame, decoding included).
    """

    def __init__(
        self,
        cfg: ScrapeSection,
        *,
        ttft_every: int = DEFAULT_TTFT_EVERY,
        restart_min_s: float = _RESTART_MIN_S,
        restart_max_s: float = _RESTART_MAX_S,
        hung_after_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self._ttft_every = ttft_every
        self._restart_min_s = restart_min_s
        self._restart_max_s = restart_max_s
        self._hung_after_s = hung_after_s or max(10.0, 10 * cfg.interval_s + cfg.timeout_s)
        self._proc: asyncio.subprocess.Process | None = None
        self._sent_targets: tuple[_Target, ...] | None = None
        self._pending: dict[int, asyncio.Future[list[ScrapeResult]]] = {}
        self._next_id = 0
        self._cache = _MetricsCache()
        self._stderr_tail: deque[str] = deque(maxlen=3)
        self._last_round_at = 0.0
        self._rounds_this_child = 0
        self._crashes = 0  # consecutive
        self._crash_logged_at = 0.0
        self._crash_unlogged = 0
        self._closed = False
        self.starts = 0
        self.rounds = 0
        self.decode_us_per_pod = 0.0

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    # --- child process ---------------------------------------------------------------------

    async def _start(self, get_pods: Callable[[], Sequence[Pod]]) -> asyncio.subprocess.Process:
        import router_ext

        # The child must run the same router_ext as this process (a patched copy in an A/B
        # benchmark, a checkout in tests), whatever the cwd or the installed package.
        pkg_root = str(Path(router_ext.__file__).resolve().parent.parent)
        pypath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pypath, _PARENT_ENV: str(os.getpid())}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router_ext.fleet.scrape_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            limit=1 << 20,  # a 2,000-pod round is ~300 KB: read it without flow-control stalls
        )  # fmt: skip
        self._proc = proc
        self._stderr_tail.clear()
        self.starts += 1
        assert proc.stdin is not None
        # The pods travel with the config, so the child's first round already scrapes them.
        targets = self._current_targets(get_pods) or ()
        cfg = self.cfg.model_dump(mode="json")
        proc.stdin.write(encode_frame(("config", cfg, self._ttft_every, targets)))
        self._sent_targets = targets
        return proc

    def _send(self, msg: tuple[Any, ...]) -> bool:
        p = self._proc
        if p is None or p.returncode is not None or p.stdin is None or p.stdin.is_closing():
            return False
        p.stdin.write(encode_frame(msg))
        return True

    @staticmethod
    def _current_targets(get_pods: Callable[[], Sequence[Pod]]) -> tuple[_Target, ...] | None:
        try:
            return _targets(get_pods())
        except Exception:
            log.exception("scrape worker: get_pods() failed; keeping the previous pod list")
            return None

    def _sync_targets(self, get_pods: Callable[[], Sequence[Pod]]) -> None:
        targets = self._current_targets(get_pods)
        # One tuple comparison at C speed (~50 µs at 2,000 pods) decides whether to send.
        if (
            targets is not None
            and targets != self._sent_targets
            and self._send(("targets", targets))
        ):
            self._sent_targets = targets

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=5)

    # --- the loop --------------------------------------------------------------------------

    async def run(
        self,
        get_pods: Callable[[], Sequence[Pod]],
        on_round: Callable[[list[ScrapeResult]], None],
        stop: asyncio.Event,
    ) -> None:
        """Keep a worker running and feed its rounds to `on_round` until `stop` is set."""
        backoff = self._restart_min_s
        try:
            while not stop.is_set() and not self._closed:
                t0 = time.monotonic()
                pid: int | None = None
                try:
                    proc = await self._start(get_pods)
                except OSError as e:
                    why = f"could not start: {e}"
                else:
                    pid = proc.pid
                    why = await self._session(proc, get_pods, on_round, stop)
                if stop.is_set() or self._closed:
                    return
                if time.monotonic() - t0 >= _HEALTHY_LIFE_S:
                    backoff, self._crashes = self._restart_min_s, 0
                self._crashes += 1
                self._log_crash(pid, why, backoff)
                await self._down_for(backoff, on_round, stop)
                backoff = min(backoff * 2, self._restart_max_s)
        finally:
            await self.close()

    async def _session(
        self,
        proc: asyncio.subprocess.Process,
        get_pods: Callable[[], Sequence[Pod]],
        on_round: Callable[[list[ScrapeResult]], None],
        stop: asyncio.Event,
    ) -> str:
        """Serve one child until it exits, hangs or `stop` is set; returns why it ended."""
        self._last_round_at = time.monotonic()
        self._rounds_this_child = 0
        reader = asyncio.ensure_future(self._read_rounds(proc, on_round))
        errs = asyncio.ensure_future(self._read_stderr(proc))
        ticker = asyncio.ensure_future(self._tick(get_pods, on_round))
        stopper = asyncio.ensure_future(stop.wait())
        why = ""
        try:
            done, _ = await asyncio.wait(
                (reader, ticker, stopper), return_when=asyncio.FIRST_COMPLETED
            )
            if reader in done and not reader.cancelled() and reader.exception() is not None:
                why = f"sent a bad frame ({reader.exception()!r})"
            elif ticker in done:
                why = f"sent no round for {self._hung_after_s:g} s"
        finally:
            for t in (reader, ticker, stopper):
                t.cancel()
            await self._kill(proc)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(errs, timeout=1)
            self._fail_pending()
            if self._proc is proc:
                self._proc = None
        return why or _describe_exit(proc.returncode)

    async def _read_rounds(
        self, proc: asyncio.subprocess.Process, on_round: Callable[[list[ScrapeResult]], None]
    ) -> None:
        assert proc.stdout is not None
        while (msg := await read_frame(proc.stdout)) is not None:
            kind = msg[0]
            if kind == "round":
                results = await self._decode(msg[1])
                self._last_round_at = time.monotonic()
                self.rounds += 1
                self._rounds_this_child += 1
                try:
                    on_round(results)
                except Exception:
                    log.exception("scrape worker: on_round callback failed (scraping continues)")
            elif kind == "scraped":
                fut = self._pending.pop(msg[1], None)
                results = await self._decode(msg[2])
                if fut is not None and not fut.done():
                    fut.set_result(results)

    async def _decode(self, rows: Sequence[tuple[Any, ...]]) -> list[ScrapeResult]:
        out: list[ScrapeResult] = []
        busy = 0.0
        for i in range(0, len(rows), _DECODE_SLICE):
            if i:
                await asyncio.sleep(0)  # let a waiting ext_proc request in between slices
            t0 = time.perf_counter()
            out += decode_results(rows[i : i + _DECODE_SLICE], self._cache)
            busy += time.perf_counter() - t0
        if rows:  # the parent-loop cost we promise to keep small (benchmarks report it)
            self.decode_us_per_pod = busy * 1e6 / len(rows)
        return out

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        forwarded = 0
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self._stderr_tail.append(line)
            if forwarded < _STDERR_FORWARD:
                forwarded += 1
                suffix = (
                    " (further stderr lines suppressed)" if forwarded == _STDERR_FORWARD else ""
                )
                log.warning("scrape worker (pid %d): %s%s", proc.pid, line, suffix)

    async def _tick(
        self, get_pods: Callable[[], Sequence[Pod]], on_round: Callable[[list[ScrapeResult]], None]
    ) -> None:
        """Every interval: push target changes; report an empty round when rounds stall (so
        pods age); return when the child looks hung."""
        interval = self.cfg.interval_s
        while True:
            await asyncio.sleep(interval)
            self._sync_targets(get_pods)
            silent = time.monotonic() - self._last_round_at
            hung = self._hung_after_s if self._rounds_this_child else _STARTUP_GRACE_S
            if silent >= max(hung, self._hung_after_s):
                return
            if silent >= 2 * interval:
                self._empty_round(on_round)

    async def _down_for(
        self, seconds: float, on_round: Callable[[list[ScrapeResult]], None], stop: asyncio.Event
    ) -> None:
        """The back-off before a restart, reporting empty rounds so pods go stale by age."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(left, self.cfg.interval_s))
            self._empty_round(on_round)

    @staticmethod
    def _empty_round(on_round: Callable[[list[ScrapeResult]], None]) -> None:
        try:
            on_round([])
        except Exception:
            log.exception("scrape worker: on_round callback failed (scraping continues)")

    def _log_crash(self, pid: int | None, why: str, backoff: float) -> None:
        now = time.monotonic()
        if self._crashes > _CRASH_LOG_BURST and now - self._crash_logged_at < _CRASH_LOG_EVERY_S:
            self._crash_unlogged += 1
            return
        more = f" ({self._crash_unlogged} more crashes not logged)" if self._crash_unlogged else ""
        tail = f"; last stderr: {self._stderr_tail[-1]}" if self._stderr_tail else ""
        log.error(
            "scrape worker (pid %s) %s; restarting in %.1f s, routing on the last metrics "
            "meanwhile (pods go stale by age)%s%s",
            pid if pid is not None else "-", why, backoff, tail, more,
        )  # fmt: skip
        self._crash_logged_at = now
        self._crash_unlogged = 0

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result([])
        self._pending.clear()

    # --- on demand -------------------------------------------------------------------------

    async def scrape_round(self, pods: Sequence[Pod]) -> list[ScrapeResult]:
        """Scrape `pods` now (brand-new pods), through the worker.

        Returns [] when no worker is up or it does not answer in time: those pods are then
        scraped by the next regular round, which is all an on-demand scrape speeds up.
        """
        if not pods:
            return []
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[list[ScrapeResult]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if not self._send(("scrape", rid, _targets(pods))):
            self._pending.pop(rid, None)
            return []
        # The child may be mid-round; allow a few fetch waves before giving up.
        waves = -(-len(pods) // self.cfg.max_concurrency)
        try:
            return await asyncio.wait_for(fut, timeout=2.0 + 2 * waves * self.cfg.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return []
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        """Stop the worker: close its stdin (it exits on EOF), SIGKILL it if it lingers."""
        self._closed = True
        proc, self._proc = self._proc, None
        self._fail_pending()
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout=1.0)
        except (asyncio.TimeoutError, TimeoutError):
            await self._kill(proc)


# --- child side ---------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL from the kernel when the parent dies; exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl ran: we were then re-parented.
    if parent and os.getppid() != parent:
        os._exit(0)


async def _child(frames_in: int, frames_out: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(frames_in, "rb", 0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(frames_out, "wb", 0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    first = await read_frame(reader)
    if first is None:
        return
    if first[0] != "config":
        raise ValueError(f"first frame must be config, got {first[0]!r}")
    cfg = ScrapeSection.model_validate(first[1])
    scraper = Scraper(cfg, ttft_every=int(first[2]))
    pods = _pods(first[3])
    stop = asyncio.Event()
    side: set[asyncio.Task[None]] = set()

    def send(msg: tuple[Any, ...]) -> None:
        writer.write(encode_frame(msg))

    async def on_demand(rid: int, wanted: list[Pod]) -> None:
        send(("scraped", rid, encode_results(await scraper.scrape_round(wanted))))

    async def read_loop() -> None:
        nonlocal pods
        try:
            while (msg := await read_frame(reader)) is not None:
                if msg[0] == "targets":
                    pods = _pods(msg[1])
                elif msg[0] == "scrape":
                    wanted = _pods(msg[2])
                    t = asyncio.create_task(on_demand(msg[1], wanted))
                    side.add(t)
                    t.add_done_callback(side.discard)
        finally:
            stop.set()  # stdin EOF: the parent closed it or died

    reading = asyncio.create_task(read_loop())
    try:
        await scraper.run(lambda: pods, lambda rs: send(("round", encode_results(rs))), stop)
    finally:
        reading.cancel()
        for t in side:
            t.cancel()
        await scraper.close()
    if reading.done() and not reading.cancelled() and reading.exception() is not None:
        raise reading.exception()  # type: ignore[misc]


def main() -> None:
    """Entry point of `python -m router_ext.fleet.scrape_worker` (started by `ScrapeProcess`)."""
    parent = int(os.environ.get(_PARENT_ENV, "0") or 0)
    _die_with_parent(parent)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(_WORKER_NICE)
    # Frames own the real stdout; anything else printing to fd 1 lands on stderr instead.
    frames_out = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        asyncio.run(_child(0, frames_out))
    except Exception as e:
        # One line: the parent puts the last stderr line in its single crash log line.
        print(f"scrape worker failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
