"""Load model of one simulated vLLM pod: scheduler, chunked prefill, continuous batching, KV.

Why it is shaped like this:
- vLLM runs at most `max_running` sequences and queues the rest first-come-first-served; that
  queue is exactly what `vllm:num_requests_waiting` reports and what a router must see grow.
- One engine step serves the whole batch under a token budget (`max_num_batched_tokens`,
  vLLM's chunked prefill): every decoding sequence gets its one token first (vLLM's docs:
  the scheduler "batches all pending decode requests before scheduling any prefill"), the
  rest of the budget goes to prefill chunks in admission order. A step lasts longer the more
  tokens it computes, so a long uncached prompt stretches every step of that pod and delays
  every request on it; that is the cost a prefix- or load-aware router avoids.
- The prefix cache is vLLM's automatic prefix caching in miniature: the KV blocks of full
  prompt blocks are registered under chained hashes (namespaced by model or adapter) once
  computed; a new request reuses the leading run of them and computes only the rest. Cached
  blocks of running requests are pinned; blocks no request holds stay cached but are free
  and are evicted least-recently-released first when a request needs room, so the cache is
  bounded by the KV blocks (a shared-prefix workload that fits keeps hitting, one that does
  not fit thrashes).
- LoRA as vLLM V1 schedules it: a waiting request whose adapter is not in the running batch
  is skipped (not blocking the queue) while all `max_lora` slots hold adapters with running
  requests; the step that first runs an adapter not loaded pays `lora_load_ms`; idle
  adapters stay loaded until the least recently used one makes room.
- Everything is driven by event-loop timers: one step timer per engine pod, plus one timer
  per request only while it waits for its first-token floor (below). A busy engine keeps its
  own schedule: each step starts when the previous one was due to end, not when its timer
  fired, so a host busy with other processes delays tokens but does not take capacity from
  the simulated GPU (which, on a real fleet, the router's CPU cannot touch).

Step time (seconds, speed = the pod's speed / its slow factor):
    step = (tpot_ms * (1 + running/max_running) + prefill_tokens * prefill_us_per_token/1000)
           / 1000 / speed  +  lora_load_ms/1000 per adapter loaded in that step
A request's first token comes at the end of the step that computes the last of its prompt,
but never before its floor `ttft_ms * (1 + 0.5*load) / speed` after admission (API server,
tokenisation and scheduling overheads), so a short prompt at low load sees the same TTFT as
before this model had prefill costs (~ttft_ms), while a long one pays for its tokens.

Calibration (Llama-3.1-8B in BF16 on one H100 SXM, vLLM): a decode step is bound by reading
the weights, 16 GB / 3.35 TB/s (H100 SXM HBM3 bandwidth) ~ 4.8 ms, hence `tpot_ms` 5; a
prefill token costs ~2 x 8e9 FLOP = 16 GFLOP, which at 989 dense BF16 TFLOPS and ~40% MFU is
~40 us, hence `prefill_us_per_token` 40 (~25k prompt tokens/s; a 2,048-token system prompt
costs ~80 ms of engine time, a 32-word chat prompt ~2 ms). `max_num_batched_tokens` 8192 is
vLLM's API-server default on GPUs with >= 70 GiB (H100, MI300X). All three scale with speed.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

from router_ext.harness.sim.metrics import PodMetrics, observe_many
from router_ext.harness.sim.podconfig import SimPodConfig

#: Longest a step timer may fire late and still have the engine keep its own schedule (the
#: next step starts at the late one's scheduled end); a longer host stall is engine time lost.
MAX_CATCH_UP_S = 0.2

# Request phases (ints: compared on the hot path).
WAITING, PREFILL, DECODE, DONE, ABORTED = range(5)


class SimRequest:
    """One inference request inside the engine. Plain slots object: created once per request,
    mutated in place per token, no per-token allocation."""

    __slots__ = (
        "adapter",
        "arrival",
        "blocks",
        "cached_tokens",
        "chunk",
        "computed",
        "counted",
        "engine",
        "finish_reason",
        "first_token_at",
        "floor_at",
        "generated",
        "hashes",
        "hit",
        "last_token_at",
        "max_tokens",
        "out_tokens",
        "phase",
        "pinned",
        "private",
        "prompt_tokens",
        "scheduled_at",
        "seq",
        "stream",
        "target",
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
        adapter: str | None = None,
    ) -> None:
        self.seq = seq
        self.engine = engine
        self.adapter = adapter  # LoRA adapter name, None = base model
        self.prompt_tokens = prompt_tokens
        self.out_tokens = out_tokens  # tokens this request will really produce
        self.max_tokens = max_tokens  # what the client allowed ("length" if reached)
        self.stream = stream
        self.arrival = arrival
        self.phase = WAITING
        self.generated = 0
        self.blocks = 0  # KV blocks this request's tokens span (shared ones included)
        self.private = 0  # of those, blocks only this request holds
        self.hashes: list[int] = []  # chained hashes of its full prompt blocks
        self.pinned: list[int] = []  # leading hashes it holds a reference to
        self.hit = 0  # leading cached blocks found by the last admission check
        self.cached_tokens = 0
        self.computed = 0  # tokens whose KV exists (cache hits included)
        self.target = 0  # tokens to compute before the next token (prompt + generated)
        self.chunk = 0  # prefill tokens assigned in the step in flight
        self.counted = False  # prefix-cache counters record a request once, not per resume
        self.floor_at = 0.0
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finish_reason = ""
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None


class PrefixCache:
    """Prompt blocks with known KV: pinned by running requests, or free and evictable (LRU).

    A hit is the run of *leading* blocks present, as vLLM only reuses a prefix, so
    `vllm:prefix_cache_hits_total` means what it means on a real pod. Capacity is not a
    number of entries: the owner evicts free entries whenever the engine's KV blocks are
    needed (`evict_to`), so what stays cached is exactly what the KV cache could hold.
    """

    def __init__(self, chunk_chars: int) -> None:
        self._chunk = chunk_chars
        self._refs: dict[int, int] = {}  # pinned: hash -> running requests holding it
        self._free: OrderedDict[int, None] = OrderedDict()  # evictable, oldest first

    @property
    def free(self) -> int:
        """Cached blocks no running request holds (not counted as KV in use, as in vLLM)."""
        return len(self._free)

    def __len__(self) -> int:
        return len(self._refs) + len(self._free)

    def hashes(self, namespace: str, text: str, limit: int) -> list[int]:
        """Chained hashes of the first `limit` full chunks of `text`; the chain starts from
        the namespace, so the same prompt under another model or adapter never matches."""
        chunk = self._chunk
        n = min(limit, len(text) // chunk)
        h = hash(namespace)
        out = []
        for i in range(0, n * chunk, chunk):
            h = hash((h, text[i : i + chunk]))
            out.append(h)
        return out

    def match(self, hashes: list[int]) -> tuple[int, int]:
        """(leading blocks cached, how many of those are free) for an admission check."""
        refs, free = self._refs, self._free
        hits = n_free = 0
        for h in hashes:
            if h in refs:
                hits += 1
            elif h in free:
                hits += 1
                n_free += 1
            else:
                break
        return hits, n_free

    def pin(self, h: int) -> int:
        """Take a reference; returns how many blocks became in use: 1 if the entry was free
        or new, 0 if another running request already held it."""
        refs = self._refs
        n = refs.get(h)
        if n is not None:
            refs[h] = n + 1
            return 0
        self._free.pop(h, None)
        refs[h] = 1
        return 1

    def unpin(self, h: int) -> int:
        """Drop a reference; returns 1 if the block is no longer in use (it stays cached)."""
        refs = self._refs
        n = refs.get(h, 0)
        if n > 1:
            refs[h] = n - 1
            return 0
        if n == 1:
            del refs[h]
            self._free[h] = None  # most recently released: evicted last
            return 1
        return 0

    def contains(self, h: int) -> bool:
        return h in self._refs or h in self._free

    def evict_to(self, room: int) -> None:
        """Evict free entries, least recently released first, until at most `room` remain."""
        free = self._free
        while len(free) > max(0, room):
            free.popitem(last=False)


class LoadModel:
    """Scheduler + step clock of one pod. Single-threaded (event loop only), no locks."""

    def __init__(self, cfg: SimPodConfig, metrics: PodMetrics) -> None:
        self._loop = asyncio.get_running_loop()
        self._ttft_s = cfg.ttft_ms / 1000.0
        self._tpot_s = cfg.tpot_ms / 1000.0
        self._prefill_s = cfg.prefill_us_per_token / 1e6
        self._budget = cfg.max_num_batched_tokens
        self.speed = cfg.speed  # the pod divides it by its `slow` factor
        self.max_running = cfg.max_running
        self.kv_blocks = cfg.kv_blocks
        self._bs = cfg.block_size
        self._n = cfg.num_engines
        self._model = cfg.model
        self.blocks_per_engine = max(1, cfg.kv_blocks // cfg.num_engines)
        self.running = 0
        self.waiting = 0
        self.kv_used = 0
        # Per data-parallel engine; mutated in place (the metrics gauges hold references).
        self.engine_running = [0] * self._n
        self.engine_waiting = [0] * self._n
        self.engine_kv = [0] * self._n  # blocks in use: pinned cache entries + private
        self._caches = [PrefixCache(cfg.block_size * 4) for _ in range(self._n)]  # ~4 chars/token
        self._queue: deque[SimRequest] = deque()
        self._prefilling: dict[SimRequest, None] = {}  # insertion order = admission order
        self._decoding: dict[SimRequest, None] = {}
        self._chunks: list[SimRequest] = []  # prefill chunks of the step in flight
        self._step_handle: asyncio.Handle | None = None
        self._in_step = False
        self._last_step_at = -1.0
        #: Scheduled end of the running step (loop time). The next step of a busy engine
        #: starts there, not when the timer fired: see _begin_step.
        self._step_due = 0.0
        self._chained = False  # _begin_step called at the end of a step (engine busy)
        self.step_s = 0.0  # engine time scheduled, summed over steps
        self.step_lag_s = 0.0  # how late step timers fired, summed
        self.step_lost_s = 0.0  # lateness beyond MAX_CATCH_UP_S, dropped (engine time lost)
        self._frozen = False
        self._thaw_pending: list[SimRequest] = []
        self._seq = 0
        self.closed = False
        # LoRA: adapters with running / waiting requests (insertion-ordered, like vLLM's
        # per-adapter stats dicts), and the adapters loaded in the GPU slots (LRU order).
        self.max_lora = cfg.max_lora
        self._lora_load_s = cfg.lora_load_ms / 1000.0
        self.lora_running: dict[str, int] = {}
        self.lora_waiting: dict[str, int] = {}
        self.lora_loaded: OrderedDict[str, None] = OrderedDict()
        self.lora_loads = 0
        self._pending_load_s = 0.0
        self._pm = metrics  # `dirty` tells it counters moved since its last render
        self._m = metrics.engines
        metrics.bind_load(self.engine_running, self.engine_waiting, self.engine_kv)

    # --- request API (used by the HTTP handlers) ---------------------------------------------

    def submit(
        self,
        prompt_text: str,
        prompt_tokens: int,
        out_tokens: int,
        max_tokens: int,
        stream: bool,
        adapter: str | None = None,
    ) -> SimRequest:
        """Enqueue a request (FIFO); it starts at once if a slot, KV space and (for an
        adapter) a LoRA slot are free."""
        self._seq += 1
        engine = self._seq % self._n
        req = SimRequest(
            self._seq,
            engine,
            prompt_tokens,
            out_tokens,
            max_tokens,
            stream,
            self._loop.time(),
            adapter,
        )
        req.hashes = self._caches[engine].hashes(
            adapter or self._model, prompt_text, prompt_tokens // self._bs
        )
        self._pm.dirty = True
        self._enqueue(req, front=False)
        self._admit_waiters()
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
            self._dequeued(req)
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
        for r in self._chunks:  # the step never ran: its chunks are composed again on thaw
            r.chunk = 0
        self._chunks.clear()

    def thaw(self) -> None:
        self._frozen = False
        pending, self._thaw_pending = self._thaw_pending, []
        now = self._loop.time()
        for req in pending:
            if self._first_token(req, now):
                self._admit_waiters()
        self._preempt_if_full()
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

    # --- introspection (control API, tests) --------------------------------------------------

    def flush_prefix_cache(self) -> int:
        """Drop every cached block no running request holds (benchmarks start cells cold).
        Returns how many were dropped."""
        dropped = 0
        for c in self._caches:
            dropped += c.free
            c.evict_to(0)
        return dropped

    def cached_blocks(self) -> int:
        """Prompt blocks the prefix caches hold, pinned or free."""
        return sum(len(c) for c in self._caches)

    # --- internals ----------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return (tokens + self._bs - 1) // self._bs

    def _lora_fits(self, adapter: str) -> bool:
        running = self.lora_running
        return adapter in running or len(running) < self.max_lora

    def _fits(self, req: SimRequest) -> bool:
        e = req.engine
        hits, n_free = self._caches[e].match(req.hashes)
        req.hit = hits
        if self.engine_running[e] == 0:
            return True  # never starve a lone request, however long
        # Blocks that become in use: the uncached rest (+1 for the next token) and the
        # cached-but-free hits it pins. Free entries outside its hit can be evicted for it.
        need = self._blocks_for(req.prompt_tokens + req.generated + 1) - hits + n_free
        return self.engine_kv[e] + need <= self.blocks_per_engine

    def _enqueue(self, req: SimRequest, front: bool) -> None:
        req.phase = WAITING
        if front:
            self._queue.appendleft(req)
        else:
            self._queue.append(req)
        self.waiting += 1
        self.engine_waiting[req.engine] += 1
        a = req.adapter
        if a is not None:
            self.lora_waiting[a] = self.lora_waiting.get(a, 0) + 1

    def _dequeued(self, req: SimRequest) -> None:
        self.waiting -= 1
        self.engine_waiting[req.engine] -= 1
        a = req.adapter
        if a is not None:
            n = self.lora_waiting[a] - 1
            if n:
                self.lora_waiting[a] = n
            else:
                del self.lora_waiting[a]

    def _kv(self, e: int, d: int) -> None:
        self.engine_kv[e] += d
        self.kv_used += d

    def _make_room(self, e: int) -> None:
        self._caches[e].evict_to(self.blocks_per_engine - self.engine_kv[e])

    def _schedule(self, req: SimRequest) -> None:
        now = self._loop.time()
        e = req.engine
        m = self._m[e]
        if req.scheduled_at is None:
            req.scheduled_at = now
            m.queue_time.observe(now - req.arrival)
        cache = self._caches[e]
        total = req.prompt_tokens + req.generated
        hits = req.hit
        # vLLM always recomputes the last token, so at most total-1 tokens come from cache.
        req.cached_tokens = min(hits * self._bs, max(0, total - 1))
        if not req.counted:
            req.counted = True
            self._pm.dirty = True
            m.prefix_queries.inc(req.prompt_tokens)
            if req.cached_tokens:
                m.prefix_hits.inc(req.cached_tokens)
        pinned = req.hashes[:hits]
        for h in pinned:
            self._kv(e, cache.pin(h))
        req.pinned = pinned
        req.blocks = self._blocks_for(total)
        req.private = req.blocks - hits
        self._kv(e, req.private)
        self._make_room(e)
        req.computed = req.cached_tokens
        req.target = total
        req.chunk = 0
        load = self.running / self.max_running
        if req.first_token_at is None:
            req.floor_at = now + self._ttft_s * (1.0 + 0.5 * load) / self.speed
        else:
            req.floor_at = now  # a resumed request only recomputes: no front-end overhead
        self.running += 1
        self.engine_running[e] += 1
        a = req.adapter
        if a is not None:
            self.lora_running[a] = self.lora_running.get(a, 0) + 1
            self._load_adapter(a)
        req.phase = PREFILL
        self._prefilling[req] = None
        self._ensure_stepping()

    def _load_adapter(self, adapter: str) -> None:
        loaded = self.lora_loaded
        if adapter in loaded:
            loaded.move_to_end(adapter)
            return
        if len(loaded) >= self.max_lora:
            # The scheduler admitted it, so fewer than max_lora adapters run: one loaded
            # adapter is idle; evict the least recently used idle one.
            for name in loaded:
                if name not in self.lora_running:
                    del loaded[name]
                    break
        loaded[adapter] = None
        self.lora_loads += 1
        self._pending_load_s += self._lora_load_s

    def _ensure_stepping(self) -> None:
        # From idle, start on the next loop turn so requests arriving together share a step.
        if self._step_handle is None and not self._frozen and not self._in_step:
            self._step_handle = self._loop.call_soon(self._begin_step)

    def _begin_step(self) -> None:
        """Compose one step: a decode token for every decoding sequence, then prefill chunks
        in admission order until the token budget is spent; time it by its tokens."""
        self._step_handle = None
        chained, self._chained = self._chained, False
        if self._frozen or self.closed:
            return
        budget = self._budget - len(self._decoding)
        chunks = self._chunks
        prefill = 0
        if budget > 0:
            for r in self._prefilling:
                rest = r.target - r.computed
                if rest <= 0:
                    continue  # computed, waiting for its first-token floor
                n = rest if rest < budget else budget
                r.chunk = n
                chunks.append(r)
                prefill += n
                budget -= n
                if budget <= 0:
                    break
        if not chunks and not self._decoding:
            return
        delay = (
            self._tpot_s * (1.0 + self.running / self.max_running) + prefill * self._prefill_s
        ) / self.speed + self._pending_load_s
        self._pending_load_s = 0.0
        self.step_s += delay
        start = now = self._loop.time()
        if chained:
            # A busy GPU starts its next step when the last one ended, whatever the host was
            # doing: a timer that fired late (this one Python process simulates every pod and
            # shares the cores with Envoy, the routers and the load generator) must not cost
            # the pod capacity, or the benchmarks would measure the harness's CPU contention
            # (measured: 6 % of engine time with 1 router, 9 % with 4, which at 90 % load is
            # most of the difference between them). A stall past MAX_CATCH_UP_S is dropped
            # rather than caught up in a burst.
            behind = now - self._step_due
            if behind <= MAX_CATCH_UP_S:
                start = self._step_due
            else:
                self.step_lost_s += behind
        self._step_due = start + delay
        self._step_handle = self._loop.call_at(self._step_due, self._step)

    def _step(self) -> None:
        """End of one engine step: +1 token for every decoding request, prefill chunks
        credited (their prompt blocks enter the prefix cache), then the next step."""
        self._step_handle = None
        self.step_lag_s += self._loop.time() - self._step_due
        if self._frozen:
            return
        self._in_step = True
        try:
            self._finish_step()
        finally:
            self._in_step = False
        self._chained = True
        self._begin_step()

    def _finish_step(self) -> None:
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
                d = need - r.blocks
                kv_delta += d
                engine_kv[e] += d
                r.blocks = need
                r.private += d
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
        freed = bool(finished)
        chunks = self._chunks
        for r in chunks:
            if r.phase != PREFILL or not r.chunk:
                continue  # aborted or preempted during the step
            r.computed += r.chunk
            r.chunk = 0
            self._register_blocks(r)
            if r.computed >= r.target:
                if now >= r.floor_at:
                    freed |= self._first_token(r, now)
                else:
                    r.timer = self._loop.call_at(r.floor_at, self._floor_done, r)
        chunks.clear()
        if kv_delta > 0:
            for e in range(n):
                self._make_room(e)
        self._preempt_if_full()
        if freed:
            self._admit_waiters()
        self._record_lora()

    def _register_blocks(self, r: SimRequest) -> None:
        """Full prompt blocks this request has now computed become prefix-cache entries. A
        block another request computed meanwhile is shared instead (one copy in use)."""
        upto = min(r.computed // self._bs, len(r.hashes))
        pinned = r.pinned
        if len(pinned) >= upto:
            return
        e = r.engine
        cache = self._caches[e]
        for i in range(len(pinned), upto):
            h = r.hashes[i]
            # Its private block becomes the entry, or is dropped for the existing copy.
            self._kv(e, cache.pin(h) - 1)
            r.private -= 1
            pinned.append(h)

    def _floor_done(self, req: SimRequest) -> None:
        req.timer = None
        if self._frozen:
            self._thaw_pending.append(req)
            return
        if self._first_token(req, self._loop.time()):
            self._admit_waiters()
        self._preempt_if_full()
        self._ensure_stepping()

    def _first_token(self, req: SimRequest, now: float) -> bool:
        """Prefill (or the recompute after a preemption) emits the next token. Returns True
        if that finished the request (its slot is free)."""
        self._prefilling.pop(req, None)
        self._pm.dirty = True
        m = self._m[req.engine]
        if req.first_token_at is None:
            req.first_token_at = now
            m.ttft.observe(now - req.arrival)
            m.prefill_time.observe(now - (req.scheduled_at or now))
            m.prompt_tokens.inc(req.prompt_tokens)
        else:  # resumed after a preemption: the gap since its last token is one long ITL
            m.itl.observe(now - req.last_token_at)
        req.generated += 1
        req.last_token_at = now
        m.generation_tokens.inc()
        self._grow(req)
        if req.generated >= req.out_tokens:
            self._finish(req, now)
            return True
        req.phase = DECODE
        self._decoding[req] = None
        if req.stream:
            _wake(req)
        return False

    def _grow(self, req: SimRequest) -> None:
        need = self._blocks_for(req.prompt_tokens + req.generated)
        if need != req.blocks:
            d = need - req.blocks
            req.blocks = need
            req.private += d
            self._kv(req.engine, d)
            self._make_room(req.engine)

    def _preempt_if_full(self) -> None:
        """KV cache exhausted: push the newest sequence of that engine back to the head of
        the queue; it recomputes when readmitted (vLLM V1's recompute preemption), finding
        whatever of its blocks is still cached."""
        for e in range(self._n):
            while self.engine_kv[e] > self.blocks_per_engine:
                victim = None
                others = 0
                for r in reversed(self._decoding):
                    if r.engine == e:
                        if victim is None:
                            victim = r
                        else:
                            others += 1
                            break
                if victim is None or not others:
                    break  # a lone sequence is never preempted
                del self._decoding[victim]
                self._release_slot(victim)
                victim.cached_tokens = 0
                self._m[e].preemptions.inc()
                self._enqueue(victim, front=True)

    def _release_slot(self, req: SimRequest) -> None:
        e = req.engine
        self.running -= 1
        self.engine_running[e] -= 1
        cache = self._caches[e]
        freed = req.private
        for h in req.pinned:
            freed += cache.unpin(h)
        self._kv(e, -freed)
        req.pinned = []
        req.private = 0
        req.blocks = 0
        req.chunk = 0
        a = req.adapter
        if a is not None:
            left = self.lora_running[a] - 1
            if left:
                self.lora_running[a] = left
            else:
                del self.lora_running[a]

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
        """vLLM V1's waiting-queue pass: FIFO, stop at the first request without a slot or
        KV room, but skip (and keep in place) one whose adapter would exceed max_lora."""
        q = self._queue
        skipped: list[SimRequest] = []
        while q:
            req = q[0]
            if req.phase != WAITING:  # aborted while queued
                q.popleft()
                continue
            if self.running >= self.max_running:
                break
            a = req.adapter
            if a is not None and not self._lora_fits(a):
                skipped.append(q.popleft())
                continue
            if not self._fits(req):
                break
            q.popleft()
            self._dequeued(req)
            self._schedule(req)
        if skipped:
            q.extendleft(reversed(skipped))

    def _record_lora(self) -> None:
        pm = self._pm
        if pm.lora_enabled:
            pm.record_lora(self.lora_running, self.lora_waiting)


def _wake(req: SimRequest) -> None:
    w = req.waiter
    if w is not None:
        req.waiter = None
        if not w.done():
            w.set_result(None)
