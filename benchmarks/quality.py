"""Routing quality: TTFT under open-loop load on a fleet with two slow pods.

    python -m benchmarks.quality [--quick] [--no-peer]

Fleet: `router-ext sim`, 8 pods, speeds 1,1,1,1,1,1,0.4,0.4, max_running 8, TTFT 30 ms,
TPOT 20 ms; streaming chat requests of 64 output tokens. One Stack (sim + router-ext + real
Envoy); the strategy is chosen per request with `x-routing-strategy-request`, so every strategy
runs through the same router and Envoy, one after another at each rate (order rotated per
rate), each with the same seed (the load generator's one rng also draws the prompt words,
so the arrival sequences match closely, not exactly). The peer vllm-router (its load-aware
policies) sits in front of the same pods and is measured in the same loop.

Saturation: from the sim's load model (router_ext/harness/sim/engine.py) a request at full
batch takes
ttft*(1.5 + prompt/2048)/speed + 64 * 2*tpot/speed; capacity = sum over pods of
max_running / that time. It is also measured: a closed loop of max_running concurrent requests
sent straight to a fast and a slow pod (no router) gives each pod's real throughput at full
batch. The rates are fractions of the measured capacity, the highest near saturation.
Round robin ignores speed, so it overloads the slow pods from ~40% of capacity on; a
load-aware strategy should not.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    DOCS_DIR,
    RUN_DIR,
    Child,
    loadavg,
    machine_markdown,
    md_table,
    write_result,
)
from benchmarks.peer_vllm_router import PeerUnavailable, start_peer
from router_ext.config import STRATEGY_REQUEST_HEADER
from router_ext.harness.envoy_proc import free_port
from router_ext.harness.loadgen import LoadSpec, Result, closed_loop, open_loop, percentile
from router_ext.harness.stack import Stack, StackOptions

SPEEDS = (1, 1, 1, 1, 1, 1, 0.4, 0.4)
MAX_RUNNING = 8
TTFT_MS = 30.0
TPOT_MS = 20.0
MAX_TOKENS = 64
PROMPT_WORDS = 32
STRATEGIES = ("random", "round-robin", "least-request", "least-queue", "least-kv-cache")
METRIC_STRATEGIES = ("least-request", "least-queue", "least-kv-cache")
PEER_POLICIES = ("power_of_two", "cache_aware")
RATE_FRACTIONS = (0.5, 0.7, 0.9)


@dataclass
class Cell:
    name: str
    rate: float
    n: int
    failed: int
    ttft: tuple[float, float, float]  # p50, p90, p99 seconds
    e2e_p90: float
    slow_share: float  # fraction of ok requests served by the slow pods


def model_capacity(prompt_tokens: int = 45) -> float:
    """Requests/s the fleet completes at full batch, from the simulator's formulas."""
    total = 0.0
    for s in SPEEDS:
        t = TTFT_MS / 1e3 * (1.5 + prompt_tokens / 2048) / s + MAX_TOKENS * 2 * TPOT_MS / 1e3 / s
        total += MAX_RUNNING / t
    return total


def _spec(url: str, headers: dict[str, str] | None = None) -> LoadSpec:
    return LoadSpec(
        url=url + "/v1/chat/completions",
        max_tokens=MAX_TOKENS,
        stream=True,
        prompt_words=PROMPT_WORDS,
        headers=headers or {},
        timeout_s=300.0,
    )


async def _measure_capacity(pods: dict[str, str], seconds: float) -> tuple[float, float]:
    """Throughput (req/s) of one fast and one slow pod at full batch, measured together."""

    async def one(name: str) -> float:
        t0 = time.monotonic()
        rs = await closed_loop(_spec(f"http://{pods[name]}"), MAX_RUNNING, duration_s=seconds)
        return sum(r.ok for r in rs) / (time.monotonic() - t0)

    fast, slow = await asyncio.gather(one("pod-0"), one(f"pod-{len(SPEEDS) - 1}"))
    return fast, slow


def _cell(name: str, rate: float, rs: list[Result], slow: set[str]) -> Cell:
    ok = [r for r in rs if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    served = [r.served_by for r in ok if r.served_by]
    return Cell(
        name=name,
        rate=rate,
        n=len(rs),
        failed=len(rs) - len(ok),
        ttft=(percentile(ttft, 50), percentile(ttft, 90), percentile(ttft, 99)),
        e2e_p90=percentile([r.latency_s for r in ok], 90),
        slow_share=sum(s in slow for s in served) / len(served) if served else float("nan"),
    )


def run(
    quick: bool = False,
    strategies: tuple[str, ...] = STRATEGIES,
    peer_policies: tuple[str, ...] = PEER_POLICIES,
) -> str:
    duration = 4.0 if quick else 30.0
    load_start = loadavg()
    sim_args = [
        "--speeds", ",".join(str(s) for s in SPEEDS),
        "--max-running", str(MAX_RUNNING),
        "--ttft-ms", str(TTFT_MS),
        "--tpot-ms", str(TPOT_MS),
        "--seed", "7",
    ]  # fmt: skip
    stack = Stack(
        RUN_DIR / "quality",
        StackOptions(pods=len(SPEEDS), strategy="least-request", sim_args=sim_args),
    )
    peers: dict[str, str] = {}
    peer_children: list[Child] = []
    notes: list[str] = []
    cells: list[Cell] = []
    try:
        stack.start(timeout=60)
        slow = {f"pod-{i}" for i, s in enumerate(SPEEDS) if s < 1}
        fast_rps, slow_rps = asyncio.run(_measure_capacity(stack.pods, 3.0 if quick else 10.0))
        n_fast = sum(1 for s in SPEEDS if s >= 1)
        capacity = n_fast * fast_rps + (len(SPEEDS) - n_fast) * slow_rps
        rates = [round(f * capacity, 1) for f in RATE_FRACTIONS]
        print(f"capacity: model {model_capacity():.1f} req/s, measured {capacity:.1f}", flush=True)
        for policy in peer_policies:
            port = free_port()
            try:
                ch = start_peer(
                    list(stack.pods.values()),
                    policy,
                    port,
                    free_port(),
                    RUN_DIR / "quality" / f"peer-{policy}.log",
                )
            except PeerUnavailable as e:
                notes.append(f"vllm-router {policy} not measured: {e}")
                continue
            peer_children.append(ch)
            peers[f"vllm-router {policy}"] = f"http://127.0.0.1:{port}"
        names = [*strategies, *peers]
        for ri, rate in enumerate(rates):
            order = names[ri % len(names) :] + names[: ri % len(names)]
            for name in order:
                if name in peers:
                    spec = _spec(peers[name])
                else:
                    spec = _spec(stack.url, {STRATEGY_REQUEST_HEADER: name})
                t0 = time.monotonic()
                rs = asyncio.run(open_loop(spec, rate, duration, seed=100 + ri))
                c = _cell(name, rate, rs, slow)
                cells.append(c)
                print(
                    f"rate {rate:5.1f} {name:26} n={c.n:4d} failed={c.failed} "
                    f"TTFT p50/p90/p99 {c.ttft[0] * 1e3:.0f}/{c.ttft[1] * 1e3:.0f}/"
                    f"{c.ttft[2] * 1e3:.0f} ms slow-share {c.slow_share:.2f} "
                    f"({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
                time.sleep(1.0)  # let the last scrape show idle pods
    finally:
        for ch in peer_children:
            ch.stop()
        stack.stop()
    md = _markdown(cells, rates, capacity, fast_rps, slow_rps, duration, load_start, notes)
    if strategies:
        _plot(cells, rates)
        write_result("quality", "# Routing quality\n\n" + machine_markdown() + "\n" + md)
    return md


def _markdown(
    cells: list[Cell],
    rates: list[float],
    capacity: float,
    fast_rps: float,
    slow_rps: float,
    duration: float,
    load_start: str,
    notes: list[str],
) -> str:
    rows = []
    for rate in rates:
        for c in sorted((c for c in cells if c.rate == rate), key=lambda c: c.ttft[1]):
            rows.append(
                [
                    f"{rate:.1f}",
                    c.name,
                    c.n,
                    c.failed,
                    f"{c.ttft[0] * 1e3:.0f}",
                    f"{c.ttft[1] * 1e3:.0f}",
                    f"{c.ttft[2] * 1e3:.0f}",
                    f"{c.e2e_p90:.2f}",
                    f"{c.slow_share * 100:.0f}%",
                ]
            )
    out = [
        f"8 simulated pods, speeds {','.join(str(s) for s in SPEEDS)}, max_running "
        f"{MAX_RUNNING}, TTFT {TTFT_MS:g} ms, TPOT {TPOT_MS:g} ms; streaming chat, "
        f"{MAX_TOKENS} output tokens; Poisson arrivals for {duration:g} s per cell (same seed "
        f"for every strategy at a rate), strategies interleaved per rate. Load average at start "
        f"{load_start}, at end {loadavg()}.\n",
        f"Capacity: model {model_capacity():.1f} req/s; measured {capacity:.1f} req/s "
        f"(fast pod {fast_rps:.2f}, slow pod {slow_rps:.2f} req/s at full batch). Rates = "
        f"{', '.join(f'{f:.0%}' for f in RATE_FRACTIONS)} of measured capacity. The slow pods "
        f"hold 2 of 8 pods but only {2 * slow_rps / capacity:.0%} of capacity.\n",
        md_table(
            [
                "rate req/s",
                "strategy",
                "requests",
                "failed",
                "TTFT p50 ms",
                "TTFT p90 ms",
                "TTFT p99 ms",
                "e2e p90 s",
                "to slow pods",
            ],
            rows,
        ),
    ]
    top = rates[-1]
    at_top = {c.name: c for c in cells if c.rate == top}
    rr = at_top.get("round-robin")
    best = min(
        (at_top[n] for n in METRIC_STRATEGIES if n in at_top),
        key=lambda c: c.ttft[1],
        default=None,
    )
    if rr and best:
        ratio = best.ttft[1] / rr.ttft[1]
        ok = ratio <= 0.5 and best.failed == 0
        out.append(
            f"\n**Target** at {top:.1f} req/s the best metric-driven strategy is "
            f"**{best.name}**: TTFT p90 "
            f"{best.ttft[1] * 1e3:.0f} ms = {ratio:.2f} x round-robin's "
            f"{rr.ttft[1] * 1e3:.0f} ms, {best.failed} failed (target <= 0.5 x with 0 failed: "
            f"{'met' if ok else 'NOT met'}).\n"
        )
    out.append("\n![TTFT p90 vs arrival rate](../../docs/quality_ttft_p90.png)\n")
    out += [f"\nNote: {n}\n" for n in notes]
    return "\n".join(out)


def _plot(cells: list[Cell], rates: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    names: list[str] = []
    for c in cells:
        if c.name not in names:
            names.append(c.name)
    for name in names:
        pts = sorted((c.rate, c.ttft[1] * 1e3) for c in cells if c.name == name)
        style: dict[str, Any] = {"marker": "o"}
        if name.startswith("vllm-router"):
            style = {"marker": "s", "linestyle": "--"}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("arrival rate (req/s, Poisson)")
    ax.set_ylabel("TTFT p90 (ms, log scale)")
    ax.set_title("TTFT p90 vs load: 8 pods, two at 0.4x speed")
    ax.set_xticks(rates)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_DIR / "quality_ttft_p90.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="skip vllm-router")
    args = ap.parse_args()
    t0 = time.monotonic()
    md = run(quick=args.quick, peer_policies=() if args.no_peer else PEER_POLICIES)
    print(md)
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
