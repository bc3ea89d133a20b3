"""Load model of one simulated vLLM pod: FIFO admission, prefill, continuous-batch decode, KV.

Why it is shaped like this:
- vLLM runs at most `max_running` sequences and queues the rest first-come-first-served; that
  queue is exactly what `vllm:num_requests_waiting` reports and what a router must see grow.
- Decoding is continuous batching: one engine step produces one token for *every* running
  sequence, and a step gets slower as the batch grows. So the pod has one step timer (not one
  timer per request per token), which keeps thousands of req/s feasible in one process.
- Everything is driven by `loop.call_later` callbacks; request handlers only await a future
  when they need to wake (streaming: per step; non-streaming: once at the end).

Delays (seconds, `load = running / max_running` at the moment they are computed):
    ttft      = ttft_ms * (1 + 0.5*load + uncached_prompt_tokens/2048) / speed
    per token = tpot_ms * (1 + load) / speed
`uncached_prompt_tokens` is the prompt minus what the prefix cache already holds (equal to the
prompt when nothing repeats), because a prefix-cache hit skips that part of the prefill.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

from router_ext.harness.sim.metrics import PodMetrics, observe_many
from router_ext.harness.sim.podconfig import SimPodConfig

# Request phases (ints: compared on the hot path).
WAITING, PREFILL, DECODE, DONE, ABORTED = range(5)


class SimRequest:
    """One inference request inside the engine. Plain slots object: created once per request,
    mutated in place per token, no per-token allocation."""

    __slots__ = (
        "arrival",
        "blocks",
        "cached_tokens",
        "engine",
        "finish_reason",
        "first_token_at",
        "generated",
        "last_token_at",
        "max_tokens",
        "out_tokens",
        "phase",
        "prompt_tokens",
        "scheduled_at",
        "seq",
        "stream",
        "timer",
        "waiter",
    )

    def __init__(
        self,
        seq: int,
        engine: int,
        prompt_tokens: int,
        out_tokens: int,
        max_tokens: int,
        stream: bool,
        arrival: float,
    ) -> None:
        self.seq = seq
        self.engine = engine
        self.prompt_tokens = prompt_tokens
        self.out_tokens = out_tokens  # tokens this request will really produce
        self.max_tokens = max_tokens  # what the client allowed ("length" if reached)
        self.stream = stream
        self.arrival = arrival
        self.phase = WAITING
        self.generated = 0
        self.blocks = 0  # KV blocks currently held
        self.cached_tokens = 0
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finish_reason = ""
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None


class PrefixCache:
    """LRU of chained hashes of fixed-size prompt chunks (~one KV block of text each).

    A hit is the run of leading chunks already seen, exactly like vLLM's automatic prefix
    caching only reuses a *prefix*. This makes `vllm:prefix_cache_hits_total` meaningful and
    lets prefix-aware routing show a real TTFT win in benchmarks.
    """

    def __init__(self, capacity_blocks: int, chunk_chars: int) -> None:
        self._capacity = capacity_blocks
        self._chunk = chunk_chars
        self._lru: OrderedDict[int, None] = OrderedDict()

    def match_and_insert(self, text: str) -> int:
        """Return how many leading chunks were cached, then remember all of this prompt's."""
        lru = self._lru
        chunk = self._chunk
        h = 0
        hits = 0
        matching = True
        for i in range(0, len(text) - chunk + 1, chunk):
            h = hash((h, text[i : i + chunk]))
            if matching and h in lru:
                hits += 1
                lru.move_to_end(h)
            else:
                matching = False
                lru[h] = None
        while len(lru) > self._capacity:
            lru.popitem(last=False)
        return hits


class LoadModel:
    """Scheduler + token clock of one pod. Single-threaded (event loop only), no locks."""

    def __init__(self, cfg: SimPodConfig, metrics: PodMetrics) -> None:
        self._loop = asyncio.get_running_loop()
        self._ttft_s = cfg.ttft_ms / 1000.0
        self._tpot_s = cfg.tpot_ms / 1000.0
        self.speed = cfg.speed  # the pod divides it by its `slow` factor
        self.max_running = cfg.max_running
        self.kv_blocks = cfg.kv_blocks
        self._bs = cfg.block_size
        self._n = cfg.num_engines
        self.running = 0
        self.waiting = 0
        self.kv_used = 0
        # Per data-parallel engine; mutated in place (the metrics gauges hold references).
        self.engine_running = [0] * self._n
        self.engine_waiting = [0] * self._n
        self.engine_kv = [0] * self._n
        self._queue: deque[SimRequest] = deque()
        self._prefilling: dict[SimRequest, None] = {}
        self._decoding: dict[SimRequest, None] = {}  # insertion order = admission order
        self._step_handle: asyncio.TimerHandle | None = None
        self._last_step_at = -1.0
        self._frozen = False
        self._thaw_pending: list[SimRequest] = []
        self._seq = 0
        self.closed = False
        self._pm = metrics  # `dirty` tells it counters moved since its last render
        self._m = metrics.engines
        self._prefix = PrefixCache(cfg.kv_blocks, cfg.block_size * 4)  # ~4 chars per token
        metrics.bind_load(self.engine_running, self.engine_waiting, self.engine_kv)

    # --- request API (used by the HTTP handlers) ---------------------------------------------

    def submit(
        self, prompt_text: str, prompt_tokens: int, out_tokens: int, max_tokens: int, stream: bool
    ) -> SimRequest:
        """Enqueue a request (FIFO); it starts at once if a slot and KV space are free."""
        self._seq += 1
        engine = self._seq % self._n
        req = SimRequest(
            self._seq, engine, prompt_tokens, out_tokens, max_tokens, stream, self._loop.time()
        )
        hit_blocks = self._prefix.match_and_insert(prompt_text)
        # vLLM always recomputes the last prompt token, so at most prompt-1 tokens hit.
        req.cached_tokens = min(hit_blocks * self._bs, max(0, prompt_tokens - 1))
        m = self._m[engine]
        self._pm.dirty = True
        m.prefix_queries.inc(prompt_tokens)
        if req.cached_tokens:
            m.prefix_hits.inc(req.cached_tokens)
        if not self._queue and self._fits(req):
            self._schedule(req)
        else:
            self._enqueue(req, front=False)
        return req

    async def wait(self, req: SimRequest, have: int) -> None:
        """Return once `req` has more than `have` tokens or is finished.

        Non-streaming requests are only woken when they finish, so they cost one wake-up each.
        """
        if req.generated > have or req.phase >= DONE:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        req.waiter = fut
        await fut

    def abort(self, req: SimRequest) -> None:
        """Drop a request whose client went away (or any request not finished). Idempotent."""
        phase = req.phase
        if phase >= DONE:
            return
        e = req.engine
        if phase == WAITING:
            # Left in the deque and skipped when popped: O(1) instead of a deque scan.
            self.waiting -= 1
            self.engine_waiting[e] -= 1
        else:
            if phase == PREFILL:
                self._prefilling.pop(req, None)
                if req.timer is not None:
                    req.timer.cancel()
                    req.timer = None
                elif req in self._thaw_pending:
                    self._thaw_pending.remove(req)
            else:
                self._decoding.pop(req, None)
            self._release_slot(req)
        req.phase = ABORTED
        req.finish_reason = "abort"
        if not self.closed:
            self._pm.dirty = True
            self._m[e].success["abort"].inc()
            self._admit_waiters()

    # --- faults -------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Hung pod: no step, no first token, until `thaw`."""
        self._frozen = True
        if self._step_handle is not None:
            self._step_handle.cancel()
            self._step_handle = None

    def thaw(self) -> None:
        self._frozen = False
        pending, self._thaw_pending = self._thaw_pending, []
        for req in pending:
            self._prefill_done(req)
        self._ensure_stepping()

    def close(self) -> None:
        """Killed pod: stop every timer and wake every waiter with cancellation."""
        self.closed = True
        self.freeze()
        for req in (*self._queue, *self._prefilling, *self._decoding, *self._thaw_pending):
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            if req.waiter is not None and not req.waiter.done():
                req.waiter.cancel()
        self._queue.clear()
        self._prefilling.clear()
        self._decoding.clear()
        self._thaw_pending.clear()

    # --- internals ----------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return (tokens + self._bs - 1) // self._bs

    def _fits(self, req: SimRequest) -> bool:
        if self.running >= self.max_running:
            return False
        if self.running == 0:
            return True  # never starve a lone request, however long
        need = self._blocks_for(req.prompt_tokens + req.generated + 1)
        return self.kv_used + need <= self.kv_blocks

    def _enqueue(self, req: SimRequest, front: bool) -> None:
        req.phase = WAITING
        if front:
            self._queue.appendleft(req)
        else:
            self._queue.append(req)
        self.waiting += 1
        self.engine_waiting[req.engine] += 1

    def _schedule(self, req: SimRequest) -> None:
        now = self._loop.time()
        e = req.engine
        m = self._m[e]
        if req.scheduled_at is None:
            req.scheduled_at = now
            m.queue_time.observe(now - req.arrival)
        load = self.running / self.max_running
        uncached = req.prompt_tokens + req.generated - req.cached_tokens
        delay = self._ttft_s * (1.0 + 0.5 * load + uncached / 2048.0) / self.speed
        self.running += 1
        self.engine_running[e] += 1
        blocks = self._blocks_for(req.prompt_tokens + req.generated)
        req.blocks = blocks
        self.kv_used += blocks
        self.engine_kv[e] += blocks
        req.phase = PREFILL
        self._prefilling[req] = None
        req.timer = self._loop.call_later(delay, self._prefill_done, req)

    def _prefill_done(self, req: SimRequest) -> None:
        req.timer = None
        if self._frozen:
            self._thaw_pending.append(req)
            return
        self._prefilling.pop(req, None)
        self._pm.dirty = True
        now = self._loop.time()
        m = self._m[req.engine]
        if req.first_token_at is None:
            req.first_token_at = now
            m.ttft.observe(now - req.arrival)
            m.prefill_time.observe(now - (req.scheduled_at or now))
            m.prompt_tokens.inc(req.prompt_tokens)
        else:  # resumed after a preemption: the gap since its last token is one long ITL
            m.itl.observe(now - req.last_token_at)
        # Prefill (or the recompute after a preemption) emits the next token.
        req.generated += 1
        req.last_token_at = now
        m.generation_tokens.inc()
        self._grow(req)
        if req.generated >= req.out_tokens:
            self._finish(req, now)
            self._admit_waiters()
            return
        req.phase = DECODE
        self._decoding[req] = None
        if req.stream:
            _wake(req)
        self._preempt_if_full()
        self._ensure_stepping()

    def _grow(self, req: SimRequest) -> None:
        need = self._blocks_for(req.prompt_tokens + req.generated)
        if need != req.blocks:
            d = need - req.blocks
            req.blocks = need
            self.kv_used += d
            self.engine_kv[req.engine] += d

    def _ensure_stepping(self) -> None:
        if self._step_handle is None and self._decoding and not self._frozen:
            self._step_handle = self._loop.call_later(self._step_delay(), self._step)

    def _step_delay(self) -> float:
        return self._tpot_s * (1.0 + self.running / self.max_running) / self.speed

    def _step(self) -> None:
        """One continuous-batching decode step: +1 token for every decoding request."""
        self._step_handle = None
        if self._frozen:
            return
        self._pm.dirty = True
        now = self._loop.time()
        prev = self._last_step_at
        self._last_step_at = now
        n = self._n
        gen = [0] * n
        steady = [0] * n  # requests whose previous token came from the previous step
        finished: list[SimRequest] = []
        bs = self._bs
        engine_kv = self.engine_kv
        metrics = self._m
        kv_delta = 0
        for r in self._decoding:
            r.generated += 1
            e = r.engine
            gen[e] += 1
            if r.last_token_at == prev:
                steady[e] += 1
            else:
                metrics[e].itl.observe(now - r.last_token_at)
            r.last_token_at = now
            need = (r.prompt_tokens + r.generated + bs - 1) // bs
            if need != r.blocks:
                kv_delta += need - r.blocks
                engine_kv[e] += need - r.blocks
                r.blocks = need
            if r.generated >= r.out_tokens:
                finished.append(r)
            elif r.stream:
                _wake(r)
        self.kv_used += kv_delta
        for e in range(n):
            if gen[e]:
                metrics[e].generation_tokens.inc(gen[e])
                observe_many(metrics[e].itl, now - prev, steady[e])
        for r in finished:
            del self._decoding[r]
            self._finish(r, now)
        self._preempt_if_full()
        if finished:
            self._admit_waiters()
        self._ensure_stepping()

    def _preempt_if_full(self) -> None:
        """KV cache exhausted: push the newest sequence back to the head of the queue; it
        recomputes its prefill when readmitted (vLLM V1's recompute preemption)."""
        while self.kv_used > self.kv_blocks and len(self._decoding) > 1:
            victim = next(reversed(self._decoding))
            del self._decoding[victim]
            self._release_slot(victim)
            victim.cached_tokens = 0
            self._m[victim.engine].preemptions.inc()
            self._enqueue(victim, front=True)

    def _release_slot(self, req: SimRequest) -> None:
        e = req.engine
        self.running -= 1
        self.engine_running[e] -= 1
        self.kv_used -= req.blocks
        self.engine_kv[e] -= req.blocks
        req.blocks = 0

    def _finish(self, req: SimRequest, now: float) -> None:
        self._release_slot(req)
        req.phase = DONE
        req.finish_reason = "length" if req.generated >= req.max_tokens else "stop"
        m = self._m[req.engine]
        m.success[req.finish_reason].inc()
        m.e2e.observe(now - req.arrival)
        m.decode_time.observe(now - (req.first_token_at or now))
        _wake(req)

    def _admit_waiters(self) -> None:
        q = self._queue
        while q:
            req = q[0]
            if req.phase != WAITING:  # aborted while queued
                q.popleft()
                continue
            if not self._fits(req):
                return
            q.popleft()
            self.waiting -= 1
            self.engine_waiting[req.engine] -= 1
            self._schedule(req)


def _wake(req: SimRequest) -> None:
    w = req.waiter
    if w is not None:
        req.waiter = None
        if not w.done():
            w.set_result(None)
