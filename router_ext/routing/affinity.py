"""Request-aware scorers: LoRA adapter, prompt prefix and session affinity.

They judge a pod by what it holds for *this* request (an adapter loaded, a prompt prefix in its
KV cache, a client session), so they abstain for a request that carries nothing to match
(a base-model request, no prompt read, no session header) and the profile's load scorers
decide alone. Each names its best pods through `hint`, so they are compared even when the
uniform sample of `routing.sample_size` pods missed them.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash
from pydantic import Field

from router_ext.fleet.snapshot import PodStatus, Snapshot
from router_ext.routing.context import RequestContext
from router_ext.routing.plugins import PluginParams, Prepared, Scorer
from router_ext.routing.stats import HotPathStats
from router_ext.routing.view import Decision, PoolView

_xxh = xxhash.xxh3_64_intdigest
_MAX_HINTS = 4
_UNSEEN: dict[str, None] = {}  # a block's holders not looked up yet (PrefixCacheScorer.score)


def _spilling(p: PodStatus, picks: Sequence[int], spill: float) -> bool:
    """Whether an affinity should let go of pod `p`: requests waiting there reached the
    plugin's spill_waiting. Waiting is the scrape's queue plus this router's picks since,
    but the picks only when the scrape showed a queue: a pod with none had free slots and
    admits them (vLLM runs up to max_num_seqs at once, 256 by default), so counting them as
    waiting would split every busy prefix between scrapes. A pod without metrics never
    spills."""
    m = p.score_metrics
    if m is None or m.waiting <= 0:
        return False
    return m.waiting + picks[p.index] >= spill


def _queue_floor(candidates: Sequence[PodStatus], picks: Sequence[int]) -> float:
    """The least waiting among candidates with metrics, as `_spilling` counts it (0 if one
    has no queue): spill_relative's base."""
    low = math.inf
    for p in candidates:
        m = p.score_metrics
        if m is None:
            continue
        w = m.waiting + picks[p.index] if m.waiting > 0 else 0.0
        if w < low:
            low = w
            if low <= 0:
                return 0.0
    return 0.0 if low == math.inf else low


#: Ring points per pod for placing prefixes nobody holds (as the session ring's default).
_MISS_VNODES = 32


# --- LoRA ---------------------------------------------------------------------------------


class LoraAffinityScorer(Scorer[None]):
    """For a request naming a LoRA adapter (llm-d's LoRA affinity semantics, BACKGROUND §6):

        adapter running on the pod           1.0   (no load, shares the batch)
        a free adapter slot (< max_lora)     0.8   (loads it without evicting)
        adapter waiting on the pod           0.6   (already queued there)
        otherwise                            0.0   (would wait for a slot)

    From the pod's newest `vllm:lora_requests_info` series. Abstains for a base-model request
    and for a pod without metrics (cold): its adapters are unknown.
    """

    def prepare(self, snap: Snapshot) -> Prepared[None]:
        return Prepared(None)

    def score(
        self, ctx: RequestContext, view: PoolView, state: None, candidates: Sequence[PodStatus]
    ) -> Sequence[float | None] | None:
        model = ctx.model
        if model is None:
            return None
        # An adapter request if any candidate knows the name as an adapter (the others may
        # just not list it yet): then every candidate with metrics is judged.
        if not any(model in p.adapters for p in candidates):
            return None
        out: list[float | None] = []
        for p in candidates:
            m = p.metrics
            if m is None:
                out.append(None)
            elif model in m.lora_running:
                out.append(1.0)
            elif m.max_lora is not None and len(m.lora_running | m.lora_waiting) < m.max_lora:
                out.append(0.8)
            elif model in m.lora_waiting:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


# --- hash rings (session keys, and prefixes nobody holds yet) ------------------------------


#: A ring point is one int: the high bits of the point's hash, the low bits its pod's slot.
#: Sorting plain ints is several times faster than sorting (hash, pod) pairs, and the 44 hash
#: bits left still spread a million points evenly. Slots are stable across memberships, so a
#: change of a few pods edits the points instead of rebuilding them (at 10,000 pods x 32
#: points, on the serving loop: a rebuild 0.16-0.21 s, an edit of 10 pods ~30 ms; measured).
_POD_BITS = 20
_POD_MASK = (1 << _POD_BITS) - 1
_MAX_RING_PODS = 1 << _POD_BITS


@dataclass(slots=True)
class _Ring:
    points: list[int]  # sorted: (hash high bits) | slot of the point's pod
    by_slot: list[PodStatus | None]  # this snapshot's pod in each slot (None: free slot)

    def owners(self, key: int, n: int = 3) -> list[PodStatus]:
        """The first `n` distinct pods clockwise from `key`: the same on every replica that
        sees the same pool (slots differ between replicas, identities do not), and only a
        departed pod's keys move."""
        points = self.points
        size = len(points)
        if not size:
            return []
        i = bisect.bisect_left(points, key & ~_POD_MASK)
        out: list[PodStatus] = []
        seen: set[int] = set()
        by_slot = self.by_slot
        for k in range(size):
            p = by_slot[points[(i + k) % size] & _POD_MASK]
            if p is not None and p.index not in seen:
                seen.add(p.index)
                out.append(p)
                if len(out) == n:
                    break
        return out


@dataclass(slots=True)
class _Points:
    points: list[int]
    slots: list[str | None]  # slot -> pod identity (None: free)
    slot_of: dict[str, int]  # pod identity -> slot


#: Ring points by (vnodes, the pool's pod identities), shared by every ring user (session and
#: prefix scorers with the same vnodes build identical rings): a scrape round that changes no
#: membership (the common case) reuses them. Only the pools of the newest snapshots stay.
_ring_points: dict[tuple[int, tuple[str, ...]], _Points] = {}
#: The newest points per (vnodes, pool name): what a membership change edits.
_ring_latest: dict[tuple[int, str | None], _Points] = {}
_RING_CACHE_MAX = 64


def _point_hashes(ident: str, slot: int, vnodes: int) -> list[int]:
    raw = ident.encode()
    hi = ~_POD_MASK
    return [(_xxh(raw, v) & hi) | slot for v in range(vnodes)]


def _build_points(idents: tuple[str, ...], vnodes: int) -> _Points:
    pts: list[int] = []
    for j, ident in enumerate(idents):
        pts.extend(_point_hashes(ident, j, vnodes))
    pts.sort()
    return _Points(pts, list(idents), {ident: j for j, ident in enumerate(idents)})


def _edit_points(base: _Points, idents: tuple[str, ...], vnodes: int) -> _Points | None:
    """`base` turned into the ring of `idents`: a departed pod's slot is emptied (its points
    stay, and `_Ring.owners` walks past them, so the owners are those of a fresh build) and
    each new pod gets a new slot and its points merged in. None when a rebuild is due: most
    pods changed, or empty slots would be over a quarter of all."""
    new = set(idents)
    slot_of = base.slot_of
    removed = [i for i in slot_of if i not in new]
    added = [i for i in idents if i not in slot_of]
    slots = base.slots
    live = len(idents)
    if 4 * (len(removed) + len(added)) > live or 4 * (len(slots) + len(added) - live) > live:
        return None
    if len(slots) + len(added) > _MAX_RING_PODS:
        return None
    slots = list(slots)
    slot_of = dict(slot_of)
    for ident in removed:
        slots[slot_of.pop(ident)] = None  # never reused before a rebuild: its points remain
    fresh: list[int] = []
    for ident in added:
        slot_of[ident] = len(slots)
        fresh.extend(_point_hashes(ident, len(slots), vnodes))
        slots.append(ident)
    points = base.points
    if fresh:
        fresh.sort()
        points = points + fresh
        points.sort()  # two sorted runs: timsort merges them in one pass
    return _Points(points, slots, slot_of)


class _RingCache:
    """Rings per model pool over the pods' identities, `vnodes` points per pod."""

    def __init__(self, vnodes: int) -> None:
        self.vnodes = vnodes

    def rings(self, snap: Snapshot) -> dict[str | None, _Ring]:
        rings: dict[str | None, _Ring] = {None: self._ring(None, snap.routable)}
        for name, pods in snap.by_model.items():
            rings[name] = self._ring(name, pods)
        return rings

    def _ring(self, pool: str | None, pods: Sequence[PodStatus]) -> _Ring:
        pods = pods[:_MAX_RING_PODS]
        idents = tuple(p.pod.identity for p in pods)
        key = (self.vnodes, idents)
        pts = _ring_points.get(key)
        if pts is None:
            base = _ring_latest.get((self.vnodes, pool))
            pts = _edit_points(base, idents, self.vnodes) if base is not None else None
            if pts is None:
                pts = _build_points(idents, self.vnodes)
            if len(_ring_points) >= _RING_CACHE_MAX:
                _ring_points.clear()
            _ring_points[key] = pts
        _ring_latest[(self.vnodes, pool)] = pts
        by_ident = dict(zip(idents, pods, strict=True))
        return _Ring(pts.points, [by_ident.get(i) if i is not None else None for i in pts.slots])


# --- prompt prefix ----------------------------------------------------------------------------


class PrefixParams(PluginParams):
    block_chars: int = Field(
        default=256,
        ge=16,
        le=4096,
        description="Characters per hashed block (~4 per token: 256 is ~64 tokens, llm-d's).",
    )
    max_blocks: int = Field(
        default=128,
        ge=1,
        le=1024,
        description=(
            "Blocks hashed per prompt (128 x 256 characters: the first ~8k tokens). Caps the "
            "per-request work; prefixes longer than that all look alike past it."
        ),
    )
    capacity_blocks: int = Field(
        default=8192,
        ge=16,
        le=1 << 20,
        description=(
            "Blocks remembered per pod when the engine does not export vllm:cache_config_info "
            "(with it: num_gpu_blocks x block_size tokens, in blocks of this size)."
        ),
    )
    miss_balance: float = Field(
        default=1.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "On a prefix no pod holds, the score of the candidate this router (and, through "
            "the access log, its peer replicas) sent the fewest prompts to lately (0 for the "
            "most; decayed with balance_half_life_s). A prefix stays where it is first "
            "placed, so where new prefixes go sets each pod's share of the traffic for as "
            "long as they are used: this balances that share, where the load scorers "
            "balance only what is running at the moment of the miss. With spill_waiting 4 it "
            "read 0.65-0.73x sglang-router's TTFT p90 against 0.70-0.80x for the ring alone "
            "on the tuning harness's plans, which flatter sglang-router (the shared-prefix "
            "benchmark reads it level; benchmarks/results/prefix_tuning_shared_prefix*.md). "
            "0: placed by load and miss_owner only, which makes replicas that have not heard "
            "of each other agree."
        ),
    )
    placement_weight: float = Field(
        default=1.0,
        ge=1,
        le=1000,
        allow_inf_nan=False,
        description=(
            "In miss_balance's recent count, a pick that places a prompt on a pod holding none "
            "of its blocks counts as this many prompts (any other pick as one): a prefix just "
            "placed brings requests the prompt count sees only as they arrive. 8 spread new "
            "groups more evenly (8-11 placements per pod instead of 8-13) and read a lower "
            "TTFT p90 in 3 of 3 paired rounds of one probe, then higher in 4 of 6 paired rounds "
            "of the tuning harness (median 1.09x; benchmarks/results/"
            "prefix_tuning_shared_prefix_placement.md): off (1) until it measures better."
        ),
    )
    balance_half_life_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Half-life of the recent-prompts count miss_balance compares.",
    )
    spill_waiting: float = Field(
        default=4.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "A pod with this many requests waiting (the scrape's queue, plus picks since when "
            "it had one) scores 0 for its prefix: a hot prefix spills to other pods instead "
            "of queueing on one. 4: at 90 % load it read 0.74-0.89x the TTFT p90 of 8 in "
            "three runs, at 86-89 % hits instead of 90 % (benchmarks/results/"
            "prefix_tuning_shared_prefix*.md)."
        ),
    )
    spill_relative: bool = Field(
        default=False,
        description=(
            "Count spill_waiting above the least-waiting candidate's queue, not from zero: "
            "when every candidate queues (a burst), a prefix stays on its pod rather than "
            "move to another queue and lose its cache there; with a candidate that has no "
            "queue it is the same rule. Off by default: at 90 % load it read 0.71-0.95x the "
            "absolute rule's TTFT p90 in 4 paired rounds of one run, 1.00-1.55x in the next, "
            "and the shared-prefix benchmark read no better (benchmarks/results/"
            "prefix_tuning_shared_prefix_relative*.md)."
        ),
    )
    miss_owner: float = Field(
        default=0.25,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "On a prefix no pod holds, the score of the pod its first block hashes to on a "
            "ring of the pool (the next pod on the ring gets half): replicas that have not yet "
            "heard of each other's placements still send a new prefix to the same pod when "
            "loads are alike. In prefix-aware (weight 3) 0.25 is 0.75 points: it decides "
            "between pods of similar load, never against a clearly idler one (the queue "
            "scorer spreads 2 points over the candidates); spill_waiting applies. 0 places a "
            "miss by load alone."
        ),
    )


@dataclass(slots=True)
class PrefixState:
    ident: list[str]  # pod identity by snapshot index
    by_ident: dict[str, PodStatus]
    rings: dict[str | None, _Ring]  # per model pool (None: every routable pod)


@dataclass(slots=True)
class _PodIndex:
    capacity: int
    lru: OrderedDict[int, None] = field(default_factory=OrderedDict)
    queries: float = -1.0  # last vllm:prefix_cache_queries_total seen (a drop = restart)


class PrefixCacheScorer(Scorer[PrefixState]):
    """Approximate prefix-cache affinity: score = the share of this prompt's blocks the pod is
    predicted to hold in its KV cache.

    The prediction is learned from this router's own picks (`on_pick`): the primary pod of a
    request is assumed to cache its prompt's blocks. Per pod an LRU of block hashes bounded by
    the pod's cache capacity; a global map block -> pods holding it answers "where is this
    prefix" in O(log blocks) (binary search on the chain: holding block i implies holding the
    blocks before it, as an engine's prefix cache does). A pod's entries are dropped when it
    leaves, changes identity, or restarts (its prefix-cache query counter went down).
    """

    Params = PrefixParams
    params: PrefixParams
    reads_body = True

    def __init__(self, params: PrefixParams | None = None) -> None:
        super().__init__(params)
        self._pods: dict[str, _PodIndex] = {}
        self._holders: dict[int, dict[str, None]] = {}
        self._stats: HotPathStats | None = None
        self._rings = _RingCache(_MISS_VNODES)
        # The last snapshot's pods by address: where a peer replica's placement is learned.
        self._by_address: dict[str, PodStatus] = {}
        # Per pod identity: prompts sent lately, each weighted exp(decay x (sent - epoch)).
        # Every count shares the factor exp(-decay x (now - epoch)), so a miss compares the
        # stored values with one exp() for all candidates, not one per pod; prepare moves
        # the epoch forward (off the hot path) before the weights could overflow.
        self._recent: dict[str, float] = {}
        self._decay = math.log(2) / self.params.balance_half_life_s
        self._epoch = time.monotonic()

    def bind_stats(self, stats: HotPathStats) -> None:
        self._stats = stats

    # --- publish time ---------------------------------------------------------------------
    def prepare(self, snap: Snapshot) -> Prepared[PrefixState]:
        present: set[str] = set()
        ident = [""] * len(snap.pods)
        by_ident: dict[str, PodStatus] = {}
        for p in snap.pods:
            key = p.pod.identity
            ident[p.index] = key
            by_ident[key] = p
            present.add(key)
            idx = self._pods.get(key)
            m = p.metrics
            if idx is not None and m is not None and m.prefix_queries is not None:
                if m.prefix_queries < idx.queries:
                    self._drop(key)  # restarted: its cache is empty
                    idx = None
                else:
                    idx.queries = m.prefix_queries
            if idx is not None:
                idx.capacity = self._capacity(p)
        for key in [k for k in self._pods if k not in present]:
            self._drop(key)
        self._rebase(present)
        self._by_address = {p.address: p for p in snap.pods}
        rings = self._rings.rings(snap) if self.params.miss_owner else {}
        return Prepared(PrefixState(ident, by_ident, rings))

    def _capacity(self, p: PodStatus) -> int:
        m = p.metrics
        if m is not None and m.cache_blocks and m.block_size:
            tokens = m.cache_blocks * m.block_size
            return max(16, tokens * 4 // self.params.block_chars)
        return self.params.capacity_blocks

    def _drop(self, key: str) -> None:
        idx = self._pods.pop(key, None)
        if idx is None:
            return
        holders = self._holders
        for h in idx.lru:
            d = holders.get(h)
            if d is not None:
                d.pop(key, None)
                if not d:
                    del holders[h]

    def holders(self, block: int) -> int:
        """How many pods the index says hold `block` (admin and benchmarks; not hot path)."""
        return len(self._holders.get(block, ()))

    # --- per request ----------------------------------------------------------------------
    def _matched(self, key: str, hashes: tuple[int, ...]) -> int:
        """Leading blocks of `hashes` pod `key` holds (binary search on the chain)."""
        holders = self._holders
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi) // 2
            d = holders.get(hashes[mid])
            if d is not None and key in d:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def hint(self, ctx: RequestContext, view: PoolView, state: PrefixState) -> Sequence[PodStatus]:
        hashes = ctx.prefix_hashes
        if not hashes:
            return ()
        holders = self._holders
        lo, hi = 0, len(hashes)  # deepest block any pod holds
        while lo < hi:
            mid = (lo + hi) // 2
            if hashes[mid] in holders:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return self._miss_owners(ctx, state)
        d = holders[hashes[lo - 1]]
        by_ident = state.by_ident
        out = []
        for key in reversed(d):  # most recently placed first
            p = by_ident.get(key)
            if p is not None:
                out.append(p)
                if len(out) == _MAX_HINTS:
                    break
        return out

    def score(
        self,
        ctx: RequestContext,
        view: PoolView,
        state: PrefixState,
        candidates: Sequence[PodStatus],
    ) -> Sequence[float | None] | None:
        hashes = ctx.prefix_hashes
        if not hashes:
            return None
        n = len(hashes)
        holders = self._holders
        first = holders.get(hashes[0])
        if first is None:
            return self._miss(ctx, view, state, candidates)
        picks = view.picks
        spill = self._spill_at(candidates, picks)
        ident = state.ident
        # The holders of each block, looked up once per request as the binary searches reach
        # them (not once per candidate and probe): a hot prefix's blocks can be held by
        # thousands of pods, and the index by then holds millions of blocks.
        held: list[dict[str, None] | None] = [_UNSEEN] * n
        held[0] = first
        out: list[float | None] = []
        for p in candidates:
            key = ident[p.index]
            if key not in first or _spilling(p, picks, spill):
                out.append(0.0)
                continue
            lo, hi = 1, n  # leading blocks held: binary search on the chain
            while lo < hi:
                mid = (lo + hi) // 2
                d = held[mid]
                if d is _UNSEEN:
                    d = held[mid] = holders.get(hashes[mid])
                if d is not None and key in d:
                    lo = mid + 1
                else:
                    hi = mid
            out.append(lo / n)
        return out

    def _miss_owners(self, ctx: RequestContext, state: PrefixState) -> list[PodStatus]:
        """The pods a prefix nobody holds belongs to: its first block on the pool's ring."""
        if not state.rings:
            return []
        ring = state.rings.get(ctx.model) or state.rings[None]
        return ring.owners(ctx.prefix_hashes[0], 2)

    def _miss(
        self,
        ctx: RequestContext,
        view: PoolView,
        state: PrefixState,
        candidates: Sequence[PodStatus],
    ) -> list[float | None]:
        """A prefix no pod holds: the candidates sent the fewest prompts lately
        (miss_balance) and its ring owner, then the next pod (miss_owner), unless spilling;
        all 0 with both off (load alone decides)."""
        p_ = self.params
        out = self._balance(candidates) if p_.miss_balance else [0.0] * len(candidates)
        owner = p_.miss_owner
        if owner:
            owners = self._miss_owners(ctx, state)
            ranks = {p.index: s for p, s in zip(owners, (owner, owner / 2), strict=False)}
            for k, p in enumerate(candidates):
                out[k] += ranks.get(p.index, 0.0)
        picks = view.picks
        spill = self._spill_at(candidates, picks)
        return [
            0.0 if x and _spilling(p, picks, spill) else min(1.0, x)
            for x, p in zip(out, candidates, strict=True)
        ]

    def _spill_at(self, candidates: Sequence[PodStatus], picks: Sequence[int]) -> float:
        """The waiting at which a candidate spills this request (hit or miss alike)."""
        p_ = self.params
        if p_.spill_relative:
            return p_.spill_waiting + _queue_floor(candidates, picks)
        return p_.spill_waiting

    def _rebase(self, present: set[str]) -> None:
        """Forget departed pods; every ~20 half-lives, move the epoch to now (weights stay
        far from overflow: 2**20 at most between rebases, plus the counts themselves)."""
        recent = self._recent
        now = time.monotonic()
        shift = math.exp(self._decay * (self._epoch - now))
        rebase = shift < 2.0**-20
        for key in list(recent):
            if key not in present:
                del recent[key]
            elif rebase:
                recent[key] *= shift
        if rebase:
            self._epoch = now

    def _balance(self, candidates: Sequence[PodStatus]) -> list[float]:
        """miss_balance's score per candidate: the fewest prompts sent lately scores
        miss_balance, the most 0, linearly between; spans under one prompt are scaled down
        (all equal: 0 each)."""
        if not candidates:
            return []
        recent = self._recent
        stored = [recent.get(p.pod.identity, 0.0) for p in candidates]
        hi, lo = max(stored), min(stored)
        # Stored weights to prompts as of now: one exp() for every candidate.
        now_scale = math.exp(self._decay * (self._epoch - time.monotonic()))
        # A span under one prompt says nothing (replicas that made the same choices differ
        # by microseconds of decay): then the ring owner decides, the same on every replica.
        scale = self.params.miss_balance / max((hi - lo) * now_scale, 1.0)
        return [(hi - x) * now_scale * scale for x in stored]

    def _count(self, key: str, matched: int) -> None:
        """One prompt sent to pod `key`, which held `matched` of its blocks before: a
        placement (none held) counts as placement_weight prompts."""
        prompts = 1.0 if matched else self.params.placement_weight
        recent = self._recent
        w = math.exp(self._decay * (time.monotonic() - self._epoch))
        recent[key] = recent.get(key, 0.0) + prompts * w

    def on_pick(self, ctx: RequestContext, view: PoolView, decision: Decision) -> None:
        hashes = ctx.prefix_hashes
        if not hashes:
            return
        p = decision.pods[0]
        key = p.pod.identity
        matched = self._matched(key, hashes)  # what the choice was predicted to hit
        stats = self._stats
        if stats is not None:
            stats.prefix_blocks += len(hashes)
            stats.prefix_blocks_matched += matched
        if self.params.miss_balance:
            self._count(key, matched)
        self._learn(p, hashes)

    def on_placement(self, address: str, block_chars: int, hashes: tuple[int, ...]) -> None:
        """A placement another replica made (from Envoy's access log): the pod at `address`
        now holds these blocks. Ignored for another block size (hashes would not match) or a
        pod this snapshot does not list."""
        if block_chars != self.params.block_chars or not hashes:
            return
        p = self._by_address.get(address)
        if p is not None:
            hashes = hashes[: self.params.max_blocks]
            if self.params.miss_balance:
                key = p.pod.identity
                self._count(key, self._matched(key, hashes))
            self._learn(p, hashes)

    def _learn(self, p: PodStatus, hashes: Sequence[int]) -> None:
        key = p.pod.identity
        idx = self._pods.get(key)
        if idx is None:
            idx = self._pods[key] = _PodIndex(self._capacity(p))
        lru = idx.lru
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                d = holders[h]
                del d[key]
                d[key] = None  # most recent holder last (hint order)
            else:
                lru[h] = None
                holders.setdefault(h, {})[key] = None
        while len(lru) > idx.capacity:
            old, _ = lru.popitem(last=False)
            gone = holders.get(old)
            if gone is not None:
                gone.pop(key, None)
                if not gone:
                    del holders[old]


# --- session ----------------------------------------------------------------------------------


class SessionParams(PluginParams):
    vnodes: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Points per pod on the hash ring (more: a more even spread of sessions).",
    )
    spill_waiting: float = Field(
        default=4.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "A session's pod with this many requests waiting scores 0 for it: the session "
            "moves rather than queue (its prefix cache is lost, but so is the wait). 4: at "
            "90 % load, 16 kept sessions put (76 % hits) but doubled TTFT p90 over "
            "least-request; 2-4 matched least-request (benchmarks/results/"
            "prefix_tuning_multi_turn.md)."
        ),
    )


@dataclass(slots=True)
class SessionState:
    rings: dict[str | None, _Ring]  # per model pool (None: every routable pod)


class SessionAffinityScorer(Scorer[SessionState]):
    """The same session (routing.session_header) on the same pod, with no stored state.

    Consistent hashing of the session key over the pods' identities, so the answer is the same
    on every router replica and after a restart, and only the sessions of a pod that leaves
    move (to the next pod on the ring). A ring with `vnodes` points per pod rather than
    rendezvous hashing: rendezvous scores every pod per request (O(pods)); the ring, built
    once per snapshot, answers in O(log pods) with the same two properties.

    The session's pod scores 1, the next two distinct pods on the ring 0.5 and 0.25 (where the
    session goes if its pod leaves: good fallbacks), every other pod 0.
    """

    Params = SessionParams
    params: SessionParams

    def __init__(self, params: SessionParams | None = None) -> None:
        super().__init__(params)
        self._rings = _RingCache(self.params.vnodes)

    def prepare(self, snap: Snapshot) -> Prepared[SessionState]:
        return Prepared(SessionState(self._rings.rings(snap)))

    def _owners(self, ctx: RequestContext, state: SessionState) -> list[PodStatus]:
        key = ctx.session_key
        if not key:
            return []
        ring = state.rings.get(ctx.model) or state.rings[None]
        return ring.owners(_xxh(key.encode()))

    def hint(self, ctx: RequestContext, view: PoolView, state: SessionState) -> Sequence[PodStatus]:
        return self._owners(ctx, state)

    def score(
        self,
        ctx: RequestContext,
        view: PoolView,
        state: SessionState,
        candidates: Sequence[PodStatus],
    ) -> Sequence[float | None] | None:
        owners = self._owners(ctx, state)
        if not owners:
            return None
        rank = {p.index: s for p, s in zip(owners, (1.0, 0.5, 0.25), strict=False)}
        spill = self.params.spill_waiting
        picks = view.picks
        out: list[float | None] = []
        for p in candidates:
            s = rank.get(p.index, 0.0)
            if s and _spilling(p, picks, spill):
                s = 0.0
            out.append(s)
        return out
