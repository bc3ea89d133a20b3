"""How the prefix-aware profile's spill threshold and weights were chosen (measured, not guessed).

    python -m benchmarks.prefix_tuning [--quick] [--workload shared-prefix|multi-turn]

The shared-prefix benchmark's fleet and workload (benchmarks/shared_prefix.py), at 90 % of the
measured capacity, one Stack: variants of the built-in `prefix-aware` (or `session`) profile
configured side by side and chosen per request by header, interleaved over rounds, each
cell with fresh prefix texts. The variants differ only in `spill_waiting` (requests waiting on
the holder before its prefix stops counting) and in the prefix weight, so the table shows
what each costs in TTFT and what it buys in hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from benchmarks.common import RUN_DIR, loadavg, machine_markdown, md_table, write_result
from benchmarks.shared_prefix import (
    FAIL_OPEN_STAT,
    PODS,
    REQUEST_TIMEOUT_S,
    _pod_counters,
    _texts_follow_seed,
    _wait_rescraped,
    hit_rate,
    measure_capacity,
    plan_for,
    rotated,
    sim_args,
    summarize,
)
from router_ext.config import STRATEGY_REQUEST_HEADER
from router_ext.harness.stack import Stack, StackOptions

LOAD = ({"name": "queue", "weight": 2.0, "params": {"running_tie_break": True}},)


REQUESTS = ({"name": "requests", "weight": 2.0},)


def _prefix(
    spill: float, weight: float, load: tuple[dict[str, Any], ...] = LOAD, spread: float = 0.3
) -> dict[str, Any]:
    params = {"spill_waiting": spill, "miss_spread": spread}
    return {
        "scorers": [
            {"name": "prefix-cache", "weight": weight, "params": params},
            *load,
            {"name": "kv-cache", "weight": 1.0},
        ]
    }


def _session(spill: float, weight: float) -> dict[str, Any]:
    return {
        "scorers": [
            {"name": "session-affinity", "weight": weight, "params": {"spill_waiting": spill}},
            {"name": "requests", "weight": 1.0},
        ]
    }


VARIANTS = {
    "shared-prefix": {
        **{f"p-spill{s:g}-w{w:g}": _prefix(s, w) for s, w in ((1, 3), (2, 3), (4, 3), (8, 3))},
        **{f"p-req-spill{s:g}-w{w:g}": _prefix(s, w, REQUESTS) for s, w in ((4, 3),)},
        "p-spill8-w3-nospread": _prefix(8, 3, spread=0.0),
    },
    "multi-turn": {
        f"s-spill{s:g}-w{w:g}": _session(s, w) for s, w in ((1, 4), (2, 4), (4, 4), (16, 4))
    },
}


def run(quick: bool = False, workload: str = "shared-prefix", rounds: int = 2) -> str:
    variants = VARIANTS[workload]
    names = [*variants, "least-request"]
    duration = 5.0 if quick else 20.0
    salt = not _texts_follow_seed(workload)
    load_start = loadavg()
    stack = Stack(
        RUN_DIR / f"prefix_tuning_{workload}",
        StackOptions(
            pods=PODS,
            strategy="least-request",
            sim_args=sim_args(),
            router_overrides={
                "routing": {"profiles": variants, "client_selectable": names, "seed": 7}
            },
            router_log_level="warning",
        ),
    )
    cells = []
    try:
        stack.start(timeout=90)
        pods = list(stack.pods.values())
        capacity, _ = measure_capacity(pods, workload, 4.0 if quick else 12.0, 2.0, salt)
        rate = 0.9 * capacity
        print(f"capacity {capacity:.1f} req/s; cells at {rate:.1f}", flush=True)
        seed = 5000
        for r in range(rounds):
            for name in rotated(names, r):
                seed += 1
                plan = plan_for(workload, rate, duration, 300 + r, seed, salt)
                before = _pod_counters(pods)
                fo0 = stack.envoy_stat(FAIL_OPEN_STAT)
                rs = asyncio.run(run_schedule_headers(stack.url, plan, name))
                c = summarize(name, rate, rs, hit_rate(before, _pod_counters(pods)), strategy=name)
                c.fail_open = int(stack.envoy_stat(FAIL_OPEN_STAT) - fo0)
                cells.append(c)
                print(
                    f"round {r + 1} {name:18} n={c.n} failed={c.failed} TTFT p50/p90/p99 "
                    f"{c.ttft[0] * 1e3:.0f}/{c.ttft[1] * 1e3:.0f}/{c.ttft[2] * 1e3:.0f} ms "
                    f"hit {c.hit_rate * 100:.0f}% pods/group {c.pods_per_group:.1f}",
                    flush=True,
                )
                _wait_rescraped(stack)
    finally:
        stack.stop()
    rows = []
    for name in names:
        mine = [c for c in cells if c.name == name]
        med = sorted(mine, key=lambda c: c.ttft[1])[len(mine) // 2]
        rows.append(
            [
                name,
                f"{med.ttft[0] * 1e3:.0f}",
                f"{med.ttft[1] * 1e3:.0f}",
                f"{med.ttft[2] * 1e3:.0f}",
                f"{med.hit_rate * 100:.0f}%",
                f"{med.pods_per_group:.1f}",
                str(sum(c.failed for c in mine)),
            ]
        )
    md = (
        f"Workload `{workload}`, {PODS} sim pods, cells of {duration:.0f} s at 90 % of the "
        f"measured capacity ({capacity:.1f} req/s), {rounds} interleaved rounds (the cell with "
        f"the median TTFT p90 shown). Load average at start {load_start}, at end {loadavg()}.\n\n"
        + md_table(
            ["variant", "TTFT p50 ms", "p90 ms", "p99 ms", "prefix hit", "pods/group", "failed"],
            rows,
        )
        + "\n\n`p-spillS-wW`: prefix-cache weight W with spill_waiting S, plus queue x2 and "
        "kv-cache x1 (the built-in's load scorers); `p-req-…`: the same with requests x2 "
        "(running + waiting + picks) instead of queue; `nospread`: miss_spread 0 (a new prefix "
        "placed by load alone); the others miss_spread 0.3 (the built-in uses 0). "
        "`s-spillS-wW`: "
        "session-affinity weight W with spill_waiting S, plus requests x1.\n"
    )
    write_result(
        f"prefix_tuning_{workload.replace('-', '_')}",
        f"# Tuning the {workload} profile\n\n" + machine_markdown() + "\n" + md,
    )
    return md


async def run_schedule_headers(url: str, plan: Any, name: str) -> Any:
    from router_ext.harness.loadgen import run_schedule

    return await run_schedule(
        url, plan, headers={STRATEGY_REQUEST_HEADER: name}, timeout_s=REQUEST_TIMEOUT_S
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workload", choices=tuple(VARIANTS), default="shared-prefix")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    t0 = time.monotonic()
    print(run(a.quick, a.workload, a.rounds))
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
