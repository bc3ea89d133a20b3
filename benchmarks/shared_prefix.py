"""Shared-prefix routing: router-ext's prefix-aware profile against load-only routers and peers.

    python -m benchmarks.shared_prefix [--quick] [--workload shared-prefix|multi-turn]

Fleet: `router-ext sim`, 4 pods (SIM_ARGS). Workload: `router_ext.harness.workloads`,
`shared-prefix` (32 groups x 8 prompts, system 1,536 tokens, question 64, output 32: the
prefixes' working set is larger than one pod's KV cache and fits in the fleet) or `multi-turn`
(sessions with growing history and the session header), streamed with usage.

Routers, all in front of the same pods:
- router-ext through real Envoy, one Stack: `prefix-aware`, `least-request`, `random`,
  `round-robin` (and `session` for multi-turn), chosen per request with
  `x-routing-strategy-request`;
- vllm-router `cache_aware` and sglang-router `cache_aware`, each a proxy with its
  command-line defaults (benchmarks/peer_vllm_router.py, benchmarks/peer_sglang_router.py).

Capacity is measured on this workload first, without a router: every pod gets its own closed
loop of `max_running` concurrent requests drawn from the workload (so each pod sees every
prefix group, as under any prefix-oblivious router), all pods at once; each pod's throughput
is max_running / mean latency after a warm-up (Little's law), summed over pods. The cells run
at 50 / 70 / 90 % of it: a load-only router is near its saturation at 90 %, a prefix-aware one
is not, because its hits skip prefill.

Cells are interleaved: at each rate every router runs once, order rotated per rate. Every cell
at a rate sends the same plan (arrival offsets, group order, questions; drawn from one seed
before the first request) but its own prefix texts (the workload's `seed` is the cell's
index): the pods' prefix caches and the peers' trees still hold the previous cell's prefixes,
and a cell must not inherit them. Prefix hit rate is the pods' own
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, deltas over the cell.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    DOCS_DIR,
    RUN_DIR,
    BenchError,
    Child,
    loadavg,
    machine_markdown,
    md_table,
    median,
    write_result,
)
from benchmarks.peer_sglang_router import SGLANG_LABEL, sglang_version, start_sglang
from benchmarks.peer_vllm_router import PeerUnavailable, peer_version, start_peer
from router_ext.config import STRATEGY_REQUEST_HEADER
from router_ext.harness.envoy_proc import free_port
from router_ext.harness.loadgen import (
    LoadSpec,
    Result,
    closed_loop,
    open_loop_schedule,
    percentile,
    run_schedule,
)
from router_ext.harness.stack import Stack, StackOptions
from router_ext.harness.workloads import SharedPrefix, WorkItem, Workload, make_workload

PODS = 4
MAX_RUNNING = 8
#: 2,048 KV blocks x 16 tokens = 32k tokens per pod; the shared-prefix working set is 49k.
SIM_ARGS: tuple[str, ...] = (
    "--max-running", str(MAX_RUNNING),
    "--ttft-ms", "30",
    "--tpot-ms", "10",
    "--kv-blocks", "2048",
    "--seed", "7",
)  # fmt: skip
#: Simulator flags that are newer than some checkouts: passed only when `sim --help` has them.
SIM_OPTIONAL_ARGS: tuple[tuple[str, str], ...] = (("--max-batched-tokens", "2048"),)
RATE_FRACTIONS = (0.5, 0.7, 0.9)
VLLM_LABEL = "vllm-router cache_aware"
PEERS = (VLLM_LABEL, SGLANG_LABEL)
ROUTERS = {
    "shared-prefix": ("prefix-aware", "least-request", "random", "round-robin"),
    "multi-turn": ("session", "prefix-aware", "least-request", "random", "round-robin"),
}
#: The router-ext profile each workload's targets are about.
FOCUS = {"shared-prefix": "prefix-aware", "multi-turn": "session"}
#: --bound's cell: what TTFT is when no placement can go wrong (see `run`).
BOUND_LABEL = "bound: 1 group, round-robin"
RESULT_NAME = {"shared-prefix": "shared_prefix", "multi-turn": "multi_turn"}
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
FAIL_OPEN_STAT = "http.ingress.ext_proc.failure_mode_allowed"
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Cell:
    name: str
    rate: float
    n: int
    failed: int
    ttft: tuple[float, float, float]  # p50, p90, p99 seconds
    out_tps: float  # output tokens per second over the cell's wall time
    hit_rate: float  # pods' own prefix-cache hits / queries over the cell
    pods_per_group: float  # mean distinct pods that served one prefix group / session
    off_strategy: int = 0  # router-ext answers naming another (degraded) strategy
    fail_open: int = 0  # Envoy ext_proc failure_mode_allowed during the cell
    errors: list[str] = field(default_factory=list)
    # Requests the busiest pod served / the mean over pods that served any: 1.0 is an even
    # spread; at 90 % load a pod at 1.2 is past its capacity.
    busiest: float = math.nan
    # The round of a --rounds run: one arrival plan per (round, rate), shared by every router.
    round_no: int = 0
    # TTFT p50 (seconds) of the placements: each group's first request on each pod that
    # served it, the requests that find no cached prefix (compulsory misses and spills).
    placement_ttft: float = math.nan


# --- pure helpers (tested in tests/test_bench_harness.py) ---------------------------------


def prefix_counters(text: str) -> tuple[float, float]:
    """(hits, queries) summed over every engine series of one pod's /metrics page."""
    hits = queries = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == HITS:
                hits += s.value
            elif s.name == QUERIES:
                queries += s.value
    return hits, queries


def hit_rate(before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]) -> float:
    """Fleet hit rate from per-pod (hits, queries) before and after a cell."""
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return hits / queries if queries > 0 else float("nan")


def closed_loop_throughput(
    results: Sequence[Result], concurrency: int, t0: float, warmup_s: float
) -> float:
    """Requests/s of a closed loop from Little's law: concurrency / mean latency of the
    successful requests started after the warm-up. Counting completions in a window instead
    is quantised: a full batch finishes in waves, so a 3 s window of ~1 s requests is off by
    up to a third."""
    lat = [r.latency_s for r in results if r.ok and r.started >= t0 + warmup_s]
    if not lat:
        raise BenchError("no request completed after the warm-up: capacity unknown")
    return concurrency / (sum(lat) / len(lat))


def rates_for(capacity: float, fractions: Sequence[float] = RATE_FRACTIONS) -> list[float]:
    if not capacity > 0:
        raise BenchError(f"measured capacity is {capacity}: the pods served nothing")
    return [round(f * capacity, 2) for f in fractions]


def rotated(names: Sequence[str], i: int) -> list[str]:
    k = i % len(names) if names else 0
    return [*names[k:], *names[:k]]


def summarize(
    name: str,
    rate: float,
    rs: Sequence[Result],
    hits: float,
    *,
    strategy: str | None = None,
) -> Cell:
    """One cell from its results; `strategy`: the router-ext profile that must have answered."""
    ok = [r for r in rs if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    if ok:
        start = min(r.started for r in rs)
        end = max(r.started + r.latency_s for r in ok)
        tps = sum(r.output_tokens for r in ok) / max(end - start, 1e-9)
    else:
        tps = 0.0
    by_group: dict[str, set[str]] = {}
    placed: list[float] = []
    for r in sorted(ok, key=lambda r: r.started):
        if r.served_by:
            pods = by_group.setdefault(r.group, set())
            if r.served_by not in pods and r.ttft_s is not None:
                placed.append(r.ttft_s)
            pods.add(r.served_by)
    spread = sum(len(s) for s in by_group.values()) / len(by_group) if by_group else float("nan")
    per_pod = Counter(r.served_by for r in ok if r.served_by)
    busiest = max(per_pod.values()) * len(per_pod) / sum(per_pod.values()) if per_pod else math.nan
    errors = sorted({(r.error or f"HTTP {r.status}: {r.body[:120]}") for r in rs if not r.ok})
    return Cell(
        name=name,
        rate=rate,
        n=len(rs),
        failed=len(rs) - len(ok),
        ttft=(percentile(ttft, 50), percentile(ttft, 90), percentile(ttft, 99)),
        out_tps=tps,
        hit_rate=hits,
        pods_per_group=spread,
        off_strategy=sum(1 for r in ok if strategy is not None and r.strategy != strategy),
        errors=errors[:3],
        busiest=busiest,
        placement_ttft=percentile(placed, 50) if placed else math.nan,
    )


def median_cells(cells: Sequence[Cell]) -> list[Cell]:
    """Per (router, rate) the cell with the median TTFT p90 (the lower middle one of an even
    count)."""
    groups: dict[tuple[str, float], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.name, c.rate), []).append(c)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=_p90_key)
        out.append(ranked[(len(ranked) - 1) // 2])
    return out


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.0f}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.0f}%"


def _p90_key(c: Cell) -> float:
    # A cell with no successful request sorts last (NaN would leave the order undefined).
    return math.inf if math.isnan(c.ttft[1]) else c.ttft[1]


def table(cells: Sequence[Cell], rates: Sequence[float]) -> str:
    rows = []
    for rate in rates:
        for c in sorted((c for c in cells if c.rate == rate), key=_p90_key):
            rows.append(
                [
                    f"{rate:.1f}",
                    c.name,
                    c.n,
                    c.failed,
                    _ms(c.ttft[0]),
                    _ms(c.ttft[1]),
                    _ms(c.ttft[2]),
                    f"{c.out_tps:.0f}",
                    _pct(c.hit_rate),
                    "-" if math.isnan(c.pods_per_group) else f"{c.pods_per_group:.1f}",
                    "-" if math.isnan(c.busiest) else f"{c.busiest:.2f}",
                    _ms(c.placement_ttft),
                ]
            )
    header = [
        "rate req/s",
        "router",
        "requests",
        "failed",
        "TTFT p50 ms",
        "TTFT p90 ms",
        "TTFT p99 ms",
        "output tok/s",
        "prefix hit rate",
        "pods per group",
        "busiest pod",
        "placement TTFT p50 ms",
    ]
    return md_table(header, rows)


def _by_round(cells: Sequence[Cell], rate: float) -> dict[int, dict[str, Cell]]:
    out: dict[int, dict[str, Cell]] = {}
    for c in cells:
        if c.rate == rate:
            out.setdefault(c.round_no, {})[c.name] = c
    return out


def verdicts(
    cells: Sequence[Cell],
    top_rate: float,
    focus: str,
    target: bool,
    every: Sequence[Cell] = (),
) -> list[str]:
    """The issue's goals at the top rate: TTFT p90 <= 0.8 x the best peer's and <= 0.25 x
    least-request's, output tokens/s >= the best peer's, 0 failed.

    `cells`: one per router (with rounds, each router's median cell). `every`: all cells of
    a run of several rounds; the ratios are then taken per round, where both routers ran the
    same arrival plan, and their median decides. Comparing median cells of different rounds
    compares arrival plans as much as routers: output tokens/s, fixed by the plan in an
    open-loop run, would differ by the plan alone.
    """
    at = {c.name: c for c in cells if c.rate == top_rate}
    me = at.get(focus)
    if me is None:
        return [f"{focus} was not measured at {top_rate:.1f} req/s: no verdict."]
    rounds = _by_round(every, top_rate)
    paired = len(rounds) > 1

    def ratio(other: str, value: Callable[[Cell], float]) -> tuple[float, str]:
        if not paired:
            return value(me) / value(at[other]), ""
        rs = [
            value(r[focus]) / value(r[other])
            for _, r in sorted(rounds.items())
            if focus in r and other in r and value(r[other]) > 0
        ]
        per = ", ".join(f"{x:.3g}" for x in rs)
        return median(rs), f", median of {len(rs)} per-round ratios ({per}) on shared arrival plans"

    def p90(c: Cell) -> float:
        return c.ttft[1]

    def tps(c: Cell) -> float:
        return c.out_tps

    peers = [at[p] for p in PEERS if p in at]
    lr = at.get("least-request")
    lead = "**Target**" if target else "Comparison:"
    out = []
    if peers:
        best_ttft = min(peers, key=_p90_key)
        if paired:  # the peer with the most output per round, by its median over rounds
            best_tps = max(
                peers,
                key=lambda c: median([r[c.name].out_tps for r in rounds.values() if c.name in r]),
            )
        else:
            best_tps = max(peers, key=tps)
        r, how = ratio(best_ttft.name, p90)
        out.append(
            f"{lead} at {top_rate:.1f} req/s (90 % of capacity) {focus} TTFT p90 "
            f"{_ms(me.ttft[1])} ms vs the best peer's ({best_ttft.name}, "
            f"{_ms(best_ttft.ttft[1])} ms) = {r:.3f} x{how}; goal <= 0.8 x: "
            f"{'met' if r <= 0.8 else 'NOT met'}."
        )
        r, how = ratio(best_tps.name, tps)
        out.append(
            f"{lead} at {top_rate:.1f} req/s {focus} output {me.out_tps:.0f} tok/s vs the best "
            f"peer's {best_tps.out_tps:.0f} ({best_tps.name}) = {r:.3f} x{how}; goal >= 1: "
            f"{'met' if r >= 1.0 else 'NOT met'}."
        )
    else:
        out.append(f"No peer was measured at {top_rate:.1f} req/s: no peer comparison.")
    if lr is not None:
        r, how = ratio(lr.name, p90)
        out.append(
            f"{lead} at {top_rate:.1f} req/s {focus} TTFT p90 = {r:.3f} x least-request's "
            f"({_ms(lr.ttft[1])} ms){how}; goal <= 0.25 x: {'met' if r <= 0.25 else 'NOT met'}."
        )
    mine = [r[focus] for r in rounds.values() if focus in r] if paired else [me]
    failed, n = sum(c.failed for c in mine), sum(c.n for c in mine)
    out.append(
        f"{lead} at {top_rate:.1f} req/s {focus} failed {failed} of {n}"
        f"{f' over {len(mine)} rounds' if paired else ''}; goal 0: "
        f"{'met' if failed == 0 else 'NOT met'}."
    )
    return out


# --- the run --------------------------------------------------------------------------------


def sim_args() -> list[str]:
    """SIM_ARGS plus the optional flags this checkout's simulator knows."""
    out = list(SIM_ARGS)
    try:
        helptext = subprocess.run(
            [sys.executable, "-m", "router_ext.app.cli", "sim", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        helptext = ""
    for flag, value in SIM_OPTIONAL_ARGS:
        if flag in helptext:
            out += [flag, value]
    return out


def _workload(name: str, cell_seed: int) -> Workload:
    return make_workload(name, stream=True, seed=cell_seed)


def _texts_follow_seed(name: str) -> bool:
    """Whether the workload's prompt texts change with its `seed` (shared-prefix's do)."""
    a = _workload(name, 1).next_item(random.Random(0))
    b = _workload(name, 2).next_item(random.Random(0))
    return bool(_messages(a)[0]["content"] != _messages(b)[0]["content"])


def _messages(item: WorkItem) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = json.loads(item.body)["messages"]
    return msgs


def _salted(item: WorkItem, tag: str) -> WorkItem:
    """The item with `tag` opening its first message: a prefix no other cell has sent."""
    body = json.loads(item.body)
    first = body["messages"][0]
    first["content"] = f"[{tag}] {first['content']}"
    return replace(item, body=json.dumps(body).encode())


def plan_for(
    workload: str,
    rate: float,
    duration_s: float,
    arrival_seed: int,
    cell_seed: int,
    salt: bool,
    *,
    one_group: bool = False,
) -> list[tuple[float, WorkItem]]:
    """`one_group` (shared-prefix): every prompt in one group, the same number of prompts per
    round, so the plan draws the same arrivals and questions (BOUND_LABEL)."""
    wl = _workload(workload, cell_seed)
    if one_group and isinstance(wl, SharedPrefix):
        wl = make_workload(
            workload, stream=True, seed=cell_seed, groups=1, prompts=wl.groups * wl.prompts
        )
    plan = open_loop_schedule(wl, rate, duration_s, seed=arrival_seed)
    if salt:
        plan = [(t, _salted(item, f"cell {cell_seed}")) for t, item in plan]
    return plan


def _get(url: str, timeout: float = 2.0) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        text: str = r.read().decode()
        return text


def _pod_counters(pods: Sequence[str]) -> list[tuple[float, float]]:
    return [prefix_counters(_get(f"http://{p}/metrics")) for p in pods]


def _snapshot_version(stack: Stack) -> float:
    for fam in text_string_to_metric_families(stack.router_metrics()):
        for s in fam.samples:
            if s.name == "router_ext_snapshot_version":
                return s.value
    return -1.0


def _wait_rescraped(stack: Stack, timeout: float = 5.0) -> None:
    """Until the router has published two snapshots since now: its load view shows the pods
    idle again (the last cell's picks are forgotten), so cells do not see each other's load."""
    v0 = _snapshot_version(stack)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _snapshot_version(stack) >= v0 + 2:
            return
        time.sleep(0.05)


def measure_capacity(
    pods: Sequence[str], workload: str, seconds: float, warmup_s: float, salt: bool
) -> tuple[float, list[float]]:
    """Fleet completions/s at full batch with prefix-oblivious traffic (see the docstring)."""

    async def one(i: int, pod: str) -> float:
        wl = _workload(workload, 900 + i)
        if salt:
            inner = wl

            class Salted:
                name = inner.name

                def next_item(self, rng: random.Random) -> WorkItem:
                    return _salted(inner.next_item(rng), f"capacity {i}")

            wl = Salted()
        spec = LoadSpec(
            url=f"http://{pod}/v1/chat/completions", workload=wl, timeout_s=REQUEST_TIMEOUT_S
        )
        t0 = time.monotonic()
        rs = await closed_loop(spec, MAX_RUNNING, duration_s=seconds, seed=900 + i)
        return closed_loop_throughput(rs, MAX_RUNNING, t0, warmup_s)

    async def all_pods() -> list[float]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(pods))))

    per_pod = asyncio.run(all_pods())
    return sum(per_pod), per_pod


def run_cell(
    stack: Stack,
    pods: Sequence[str],
    name: str,
    rate: float,
    plan: Any,
    url: str,
    headers: dict[str, str],
    strategy: str | None,
) -> Cell:
    """One cell: the plan sent to `url`, summarised with the pods' hit rate over it and, for
    router-ext (`strategy` set), the requests Envoy failed open."""
    before = _pod_counters(pods)
    fo0 = stack.envoy_stat(FAIL_OPEN_STAT)
    rs = asyncio.run(run_schedule(url, plan, headers=headers, timeout_s=REQUEST_TIMEOUT_S))
    c = summarize(name, rate, rs, hit_rate(before, _pod_counters(pods)), strategy=strategy)
    if strategy is not None:
        c.fail_open = int(stack.envoy_stat(FAIL_OPEN_STAT) - fo0)
    return c


def _start_peers(
    pods: list[str], workdir: Path, notes: list[str]
) -> tuple[dict[str, str], list[Child]]:
    urls: dict[str, str] = {}
    children: list[Child] = []
    starters: dict[str, Callable[[int], Child]] = {
        VLLM_LABEL: lambda port: start_peer(
            pods, "cache_aware", port, free_port(), workdir / "vllm-router.log"
        ),
        SGLANG_LABEL: lambda port: start_sglang(
            pods, port, free_port(), workdir / "sglang-router.log"
        ),
    }
    for label, start in starters.items():
        port = free_port()
        try:
            children.append(start(port))
        except PeerUnavailable as e:
            notes.append(f"{label} not measured: {e}")
            print(f"{label} not measured: {e}", flush=True)
            continue
        urls[label] = f"http://127.0.0.1:{port}"
    return urls, children


def _available_profiles(wanted: Sequence[str], notes: list[str]) -> list[str]:
    import router_ext.config as rc

    known = getattr(rc, "BUILTIN_NAMES", rc.STRATEGY_NAMES)
    out = [n for n in wanted if n in known]
    for n in wanted:
        if n not in known:
            notes.append(
                f"router-ext profile `{n}` is not built in on this checkout: not measured."
            )
    return out


def run(
    quick: bool = False,
    workload: str = "shared-prefix",
    peers: bool = True,
    fractions: Sequence[float] = RATE_FRACTIONS,
    rounds: int = 1,
    scrape_interval_s: float | None = None,
    bound: bool = False,
) -> str:
    """`rounds` > 1: every cell that many times (rotated, a new arrival plan each round); the
    table shows each router's median cell by TTFT p90 and lists every cell after it, into
    `<result>_rounds.md` so the one-round result is kept.

    `bound` (shared-prefix): one more cell per round, BOUND_LABEL: the same arrival plan and
    request shapes with all prompts in one group, round-robin. Every request but each pod's
    first finds its prefix cached on any pod and the spread is even. A relaxed problem: it
    shows how fast the hits can be with nothing to place, not a TTFT a router placing 32
    groups could reach."""
    if workload not in ROUTERS:
        raise BenchError(f"workload {workload!r}: choose one of {', '.join(ROUTERS)}")
    duration = 4.0 if quick else 20.0
    cap_s, warm_s = (4.0, 1.0) if quick else (15.0, 3.0)
    load_start = loadavg()
    notes: list[str] = []
    if scrape_interval_s:
        notes.append(f"router-ext scrapes every {scrape_interval_s * 1000:g} ms (default 500).")
    workdir = RUN_DIR / RESULT_NAME[workload]
    profiles = _available_profiles(ROUTERS[workload], notes)
    salt = not _texts_follow_seed(workload)
    if salt:
        notes.append(
            f"`{workload}`'s prompt texts do not depend on its `seed`; each cell's first message "
            "opens with a cell tag instead, so no cell inherits another's cached prefixes."
        )
    args = sim_args()
    stack = Stack(
        workdir,
        StackOptions(
            pods=PODS,
            strategy="least-request",
            sim_args=args,
            router_overrides={
                "routing": {"client_selectable": profiles, "seed": 7},
                # A probe of how much a fresher view of each pod's queue is worth.
                **({"scrape": {"interval_s": scrape_interval_s}} if scrape_interval_s else {}),
            },
            router_log_level="warning",
        ),
    )
    cells: list[Cell] = []
    children: list[Child] = []
    versions = ""
    try:
        stack.start(timeout=90)
        pods = list(stack.pods.values())
        capacity, per_pod = measure_capacity(pods, workload, cap_s, warm_s, salt)
        rates = rates_for(capacity, fractions)
        print(
            f"capacity {capacity:.2f} req/s ({', '.join(f'{x:.2f}' for x in per_pod)} per pod); "
            f"rates {rates}",
            flush=True,
        )
        peer_urls: dict[str, str] = {}
        if peers:
            peer_urls, children = _start_peers(pods, workdir, notes)
            versions = (
                f"vllm-router {peer_version()}, sglang-router {sglang_version()} (PyPI), "
                "each with its command-line defaults"
            )
        names = [*profiles, *peer_urls]
        if bound and workload == "shared-prefix":
            names.append(BOUND_LABEL)
        cell_seed = 0
        schedule = [(rnd, ri, rate) for rnd in range(rounds) for ri, rate in enumerate(rates)]
        for rnd, ri, rate in schedule:
            for name in rotated(names, ri + rnd):
                cell_seed += 1
                plan = plan_for(
                    workload, rate, duration, 100 + ri + 1000 * rnd, 1000 + cell_seed, salt,
                    one_group=name == BOUND_LABEL,
                )  # fmt: skip
                if name == BOUND_LABEL:
                    url, headers, strategy = (
                        stack.url,
                        {STRATEGY_REQUEST_HEADER: "round-robin"},
                        None,
                    )
                elif name in peer_urls:
                    url, headers, strategy = peer_urls[name], {}, None
                else:
                    url, headers, strategy = stack.url, {STRATEGY_REQUEST_HEADER: name}, name
                t0 = time.monotonic()
                c = run_cell(stack, pods, name, rate, plan, url, headers, strategy)
                c.round_no = rnd
                cells.append(c)
                print(
                    f"rate {rate:6.2f} {name:26} n={c.n:4d} failed={c.failed} TTFT "
                    f"p50/p90/p99 {_ms(c.ttft[0])}/{_ms(c.ttft[1])}/{_ms(c.ttft[2])} ms "
                    f"{c.out_tps:.0f} tok/s hit {_pct(c.hit_rate)} pods/group "
                    f"{c.pods_per_group:.1f} busiest {c.busiest:.2f} "
                    f"({time.monotonic() - t0:.0f} s)"
                    + (f" errors: {c.errors}" if c.errors else ""),
                    flush=True,
                )
                _wait_rescraped(stack)
    finally:
        for ch in children:
            ch.stop()
        stack.stop()
    for c in cells:
        if c.off_strategy:
            notes.append(
                f"{c.name} at {c.rate:.1f} req/s: {c.off_strategy} answers named another "
                "strategy (degraded decisions)."
            )
        if c.fail_open:
            notes.append(
                f"{c.name} at {c.rate:.1f} req/s: {c.fail_open} requests failed open (Envoy "
                "routed them itself)."
            )
    if quick:
        notes.insert(
            0, "`--quick` smoke run (4 s cells): numbers show the harness works, not the result."
        )
    every = cells
    if rounds > 1:
        cells = median_cells(cells)
        notes.append(
            f"{rounds} rounds per cell; the table shows each router's median cell by TTFT p90. "
            "Every cell:\n\n" + table(every, rates)
        )
    md = _markdown(
        workload, cells, rates, capacity, per_pod, duration, cap_s, warm_s, args, versions,
        load_start, notes, every,
    )  # fmt: skip
    name = RESULT_NAME[workload] + ("_rounds" if rounds > 1 else "")
    if scrape_interval_s:
        name += f"_scrape{scrape_interval_s * 1000:g}ms"
    if BOUND_LABEL in names:
        name += "_bound"
    _plot(cells, rates, workload, name)
    title = "Shared-prefix routing" if workload == "shared-prefix" else "Multi-turn routing"
    write_result(name, f"# {title}\n\n" + machine_markdown() + "\n" + md)
    return md


def _markdown(
    workload: str,
    cells: list[Cell],
    rates: list[float],
    capacity: float,
    per_pod: list[float],
    duration: float,
    cap_s: float,
    warm_s: float,
    args: list[str],
    versions: str,
    load_start: str,
    notes: list[str],
    every: Sequence[Cell] = (),
) -> str:
    out = [
        f"{PODS} simulated pods (`router-ext sim {' '.join(args)}`); workload `{workload}` "
        "(router_ext/harness/workloads.py defaults, streamed); Poisson arrivals for "
        f"{duration:g} s per cell, the same plan for every router at a rate, fresh prefix "
        f"texts per cell; routers interleaved per rate. Load average at start {load_start}, at "
        f"end {loadavg()}.\n",
        f"Peers: {versions or 'not run'}.\n",
        f"Capacity (measured on this workload, no router): {capacity:.2f} req/s = the sum over "
        f"pods of a closed loop of {MAX_RUNNING} concurrent requests per pod for {cap_s:g} s, "
        f"every pod seeing every prefix group; per pod {MAX_RUNNING} / mean latency of the "
        f"requests started after the first {warm_s:g} s (Little's law) "
        f"({', '.join(f'{x:.2f}' for x in per_pod)} req/s). Rates = "
        f"{', '.join(f'{r / capacity:.0%}' for r in rates)} of it.\n",
        table(cells, rates),
        "`prefix hit rate`: the pods' own `vllm:prefix_cache_hits_total / "
        "queries_total` over the cell. `pods per group`: distinct pods that served one prefix "
        "group (multi-turn: one session), from the pods' `x-served-by`. `busiest pod`: "
        "requests the busiest pod served over the mean per pod (1.00: an even spread; at "
        "90 % load a pod at 1.11 or more is at or past its capacity). `placement TTFT p50`: "
        "the TTFT of each group's first request on each pod that served it (no cached "
        "prefix there: the workload's compulsory misses, and spills).\n",
    ]
    out += [
        line + "\n"
        for line in verdicts(cells, rates[-1], FOCUS[workload], workload == "shared-prefix", every)
    ]
    out.append(
        f"\n![TTFT p90 and prefix hit rate vs load](../../docs/{RESULT_NAME[workload]}.png)\n"
    )
    out += [f"\nNote: {n}\n" for n in notes]
    return "\n".join(out)


def _plot(cells: list[Cell], rates: list[float], workload: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    names: list[str] = []
    for c in cells:
        if c.name not in names:
            names.append(c.name)
    for n in names:
        pts = sorted((c.rate, c.ttft[1] * 1e3, c.hit_rate * 100) for c in cells if c.name == n)
        style: dict[str, Any] = {"marker": "o"}
        if n in PEERS:
            style = {"marker": "s", "linestyle": "--"}
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=n, **style)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], label=n, **style)
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT p90 (ms, log scale)")
    ax2.set_ylabel("prefix-cache hit rate (%, pods' counters)")
    ax2.set_ylim(0, 100)
    for ax in (ax1, ax2):
        ax.set_xlabel("arrival rate (req/s, Poisson)")
        ax.set_xticks(rates)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"{workload}: {PODS} pods, 50/70/90 % of measured capacity")
    fig.tight_layout()
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_DIR / f"{name}.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 s cells (under 3 minutes)")
    ap.add_argument("--workload", choices=tuple(ROUTERS), default="shared-prefix")
    ap.add_argument("--no-peer", action="store_true", help="skip vllm-router and sglang-router")
    ap.add_argument(
        "--fractions",
        default="",
        help="rates as fractions of capacity, e.g. 0.9 (default 0.5,0.7,0.9)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="cells per router and rate")
    ap.add_argument(
        "--bound",
        action="store_true",
        help="add a cell per round with every prompt in one group, round-robin (a floor)",
    )
    ap.add_argument(
        "--scrape-interval-ms",
        type=float,
        help="router-ext's scrape.interval_s for this run (default 500 ms; own result file)",
    )
    args = ap.parse_args()
    fr = tuple(float(x) for x in args.fractions.split(",")) if args.fractions else RATE_FRACTIONS
    t0 = time.monotonic()
    print(
        run(
            quick=args.quick,
            workload=args.workload,
            peers=not args.no_peer,
            fractions=fr,
            rounds=args.rounds,
            scrape_interval_s=args.scrape_interval_ms / 1000 if args.scrape_interval_ms else None,
            bound=args.bound,
        )
    )
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
