"""How the prefix-aware profile's spill threshold and weights were chosen (measured, not guessed).

    python -m benchmarks.prefix_tuning [--quick] [--workload shared-prefix|multi-turn]
                                       [--rounds N] [--no-peer]
                                       [--variants A,B,...] [--tag TAG]

The shared-prefix benchmark's fleet and workload (benchmarks/shared_prefix.py), at 90 % of the
measured capacity, one Stack: variants of the built-in `prefix-aware` (or `session`) profile
configured side by side and chosen per request by header, interleaved over rounds with
sglang-router in front of the same pods, each cell with fresh prefix texts. The variants
differ in how a prefix nobody holds is placed (`miss_balance`, `miss_owner`) and in
`spill_waiting` (requests waiting on the holder before its prefix stops counting), so the
table shows what each costs in TTFT and what it buys in hit rate, each round paired with the
peer on the same arrival plan (one round's TTFT p90 swings 2-3x with the plan).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from benchmarks.common import (
    RUN_DIR,
    BenchError,
    Child,
    loadavg,
    machine_markdown,
    md_table,
    median,
    write_result,
)
from benchmarks.peer_sglang_router import SGLANG_LABEL, start_sglang
from benchmarks.peer_vllm_router import PeerUnavailable
from benchmarks.shared_prefix import (
    PODS,
    Cell,
    _texts_follow_seed,
    _wait_rescraped,
    measure_capacity,
    plan_for,
    rotated,
    run_cell,
    sim_args,
)
from router_ext.config import STRATEGY_REQUEST_HEADER
from router_ext.harness.envoy_proc import free_port
from router_ext.harness.stack import Stack, StackOptions

LOAD = (
    {"name": "queue", "weight": 2.0, "params": {"running_tie_break": True}},
    {"name": "kv-cache", "weight": 1.0},
    {"name": "lora-affinity", "weight": 1.0},
)


def _prefix(**params: Any) -> dict[str, Any]:
    """The built-in prefix-aware profile's scorers with these prefix-cache parameters."""
    return {"scorers": [{"name": "prefix-cache", "weight": 3.0, "params": params}, *LOAD]}


def _session(spill: float, weight: float) -> dict[str, Any]:
    return {
        "scorers": [
            {"name": "session-affinity", "weight": weight, "params": {"spill_waiting": spill}},
            {"name": "requests", "weight": 1.0},
        ]
    }


VARIANTS = {
    "shared-prefix": {
        # The profile before miss_balance: a miss by load and its ring owner, spill at 8.
        # `spill`: spill_waiting counted from zero (spill_relative off: the default rule).
        "ring-spill8": _prefix(miss_balance=0.0, spill_waiting=8, spill_relative=False),
        **{
            f"ring-spill{s:g}": _prefix(miss_balance=0.0, spill_waiting=s, spill_relative=False)
            for s in (6, 4)
        },
        # 3 and 2: `--variants bal-spill4,bal-spill3,bal-spill2 --tag spill_low`, lost to 4.
        # `bal-`: a placement counts as one prompt (placement_weight 1, the rule they measured).
        **{
            f"bal-spill{s:g}": _prefix(
                miss_balance=1.0, spill_waiting=s, spill_relative=False, placement_weight=1.0
            )
            for s in (6, 4, 3, 2)
        },
        # `pwW`: spill at 4, a placement counted as W prompts (placement_weight; default 1:
        # `--variants bal-spill4,bal-pw8 --rounds 6 --seed 800 --tag placement` read 8 worse).
        **{
            f"bal-pw{w:g}": _prefix(
                miss_balance=1.0, spill_waiting=4, spill_relative=False, placement_weight=w
            )
            for w in (4, 8, 16)
        },
        # spill_waiting counted above the least-waiting candidate's queue (spill_relative,
        # off by default: `--variants bal-spill4,bal-rel4,bal-rel2 --tag relative` and
        # `--variants bal-spill4,bal-rel4 --tag relative2` disagreed).
        **{
            f"bal-rel{s:g}": _prefix(
                miss_balance=1.0, spill_waiting=s, spill_relative=True, placement_weight=1.0
            )
            for s in (4, 2)
        },
    },
    "multi-turn": {
        f"s-spill{s:g}-w{w:g}": _session(s, w) for s, w in ((1, 4), (2, 4), (4, 4), (16, 4))
    },
}
#: What a run measures without --variants (the lower spills and the relative rule were
#: measured with --variants and --tag; see the comments above).
DEFAULT_VARIANTS = {
    "shared-prefix": ("ring-spill4", "bal-spill4", "bal-pw4", "bal-pw8", "bal-pw16"),
    "multi-turn": tuple(VARIANTS["multi-turn"]),
}
LEGEND = {
    "shared-prefix": (
        "Every variant is the built-in `prefix-aware` (prefix-cache x3, queue x2 with "
        "running tie-break, kv-cache x1, lora-affinity x1) with other prefix-cache "
        "parameters: `ring-`: a miss placed by load and its ring owner (miss_owner 0.25), "
        "miss_balance 0; `bal-`: miss_balance 1 (a miss goes to the pod sent the fewest "
        "prompts lately) plus the ring; `spillS`: spill_waiting S counted from zero; `relS`: "
        "spill_waiting S above the least-waiting candidate's queue (spill_relative); "
        "`bal-` a new placement counts as one prompt, `bal-pwW` as W (placement_weight), "
        "spill at 4. "
        "`vs sglang`: the variant's TTFT p90 over sglang-router's in the same round (same "
        "arrival plan), median and geometric mean over rounds."
    ),
    "multi-turn": (
        "`s-spillS-wW`: session-affinity weight W with spill_waiting S, plus requests x1."
    ),
}


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def run(
    quick: bool = False,
    workload: str = "shared-prefix",
    rounds: int = 2,
    peer: bool = True,
    only: tuple[str, ...] = (),
    tag: str = "",
    seed: int = 300,
) -> str:
    """`seed`: round r's arrival plan is drawn from seed + r (the same for every variant and
    sglang-router in the round). Runs with one seed replay the same plans: their rounds are
    not new samples, so a second run that should count takes another seed."""
    unknown = [v for v in only if v not in VARIANTS[workload]]
    if unknown:
        raise BenchError(
            f"unknown {workload} variants {unknown}; known: {list(VARIANTS[workload])}"
        )
    variants = {v: VARIANTS[workload][v] for v in only or DEFAULT_VARIANTS[workload]}
    names = [*variants, "least-request"]
    duration = 5.0 if quick else 20.0
    salt = not _texts_follow_seed(workload)
    load_start = loadavg()
    workdir = RUN_DIR / f"prefix_tuning_{workload}"
    stack = Stack(
        workdir,
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
    cells: list[tuple[int, Cell]] = []
    children: list[Child] = []
    sglang = ""
    try:
        stack.start(timeout=90)
        pods = list(stack.pods.values())
        capacity, _ = measure_capacity(pods, workload, 4.0 if quick else 12.0, 2.0, salt)
        rate = 0.9 * capacity
        print(f"capacity {capacity:.1f} req/s; cells at {rate:.1f}", flush=True)
        if peer:
            try:
                children.append(
                    start_sglang(pods, port := free_port(), free_port(), workdir / "sglang.log")
                )
                sglang = f"http://127.0.0.1:{port}"
            except PeerUnavailable as e:
                print(f"{SGLANG_LABEL} not measured: {e}", flush=True)
        everyone = [*names, *([SGLANG_LABEL] if sglang else [])]
        plan_seed, seed = seed, 5000
        for r in range(rounds):
            for name in rotated(everyone, r):
                seed += 1
                plan = plan_for(workload, rate, duration, plan_seed + r, seed, salt)
                if name == SGLANG_LABEL:
                    url, headers, strategy = sglang, {}, None
                else:
                    url, headers, strategy = stack.url, {STRATEGY_REQUEST_HEADER: name}, name
                c = run_cell(stack, pods, name, rate, plan, url, headers, strategy)
                cells.append((r, c))
                print(
                    f"round {r + 1} {name:26} n={c.n} failed={c.failed} TTFT p50/p90/p99 "
                    f"{c.ttft[0] * 1e3:.0f}/{c.ttft[1] * 1e3:.0f}/{c.ttft[2] * 1e3:.0f} ms "
                    f"hit {c.hit_rate * 100:.0f}% pods/group {c.pods_per_group:.1f} "
                    f"busiest {c.busiest:.2f}",
                    flush=True,
                )
                _wait_rescraped(stack)
    finally:
        for ch in children:
            ch.stop()
        stack.stop()
    peer_p90 = {r: c.ttft[1] for r, c in cells if c.name == SGLANG_LABEL}
    rows = []
    for name in everyone:
        mine = [c for _, c in cells if c.name == name]
        med = sorted(mine, key=lambda c: c.ttft[1])[(len(mine) - 1) // 2]
        ratios = [c.ttft[1] / peer_p90[r] for r, c in cells if c.name == name and r in peer_p90]
        rows.append(
            [
                name,
                f"{med.ttft[0] * 1e3:.0f}",
                f"{med.ttft[1] * 1e3:.0f}",
                f"{med.ttft[2] * 1e3:.0f}",
                f"{median(ratios):.2f} / {_geomean(ratios):.2f}" if ratios else "-",
                f"{med.hit_rate * 100:.0f}%",
                f"{med.pods_per_group:.1f}",
                f"{med.busiest:.2f}",
                str(sum(c.failed for c in mine)),
            ]
        )
    log = "\n".join(
        f"round {r + 1} {c.name:26} n={c.n} failed={c.failed} TTFT p50/p90/p99 "
        f"{c.ttft[0] * 1e3:.0f}/{c.ttft[1] * 1e3:.0f}/{c.ttft[2] * 1e3:.0f} ms hit "
        f"{c.hit_rate * 100:.0f}% pods/group {c.pods_per_group:.1f} busiest {c.busiest:.2f}"
        for r, c in cells
    )
    md = (
        f"Workload `{workload}`, {PODS} sim pods, cells of {duration:.0f} s at 90 % of the "
        f"measured capacity ({capacity:.1f} req/s), {rounds} interleaved rounds, one arrival "
        f"plan per round shared by every router (round r's drawn from seed {plan_seed} + r; "
        f"the cell with the median TTFT p90 shown). "
        f"Load average at start {load_start}, at end {loadavg()}.\n\n"
        + md_table(
            [
                "variant",
                "TTFT p50 ms",
                "p90 ms",
                "p99 ms",
                "p90 vs sglang (median / geomean)",
                "prefix hit",
                "pods/group",
                "busiest pod",
                "failed",
            ],
            rows,
        )
        + f"\n\n{LEGEND[workload]} `busiest pod`: requests on the busiest pod over the mean.\n"
        + f"\nEvery cell:\n\n```\n{log}\n```\n"
    )
    write_result(
        f"prefix_tuning_{workload.replace('-', '_')}" + (f"_{tag}" if tag else ""),
        f"# Tuning the {workload} profile\n\n" + machine_markdown() + "\n" + md,
    )
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workload", choices=tuple(VARIANTS), default="shared-prefix")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-peer", action="store_true", help="skip sglang-router")
    ap.add_argument("--variants", default="", help="comma-separated subset of VARIANTS")
    ap.add_argument("--tag", default="", help="suffix of the results file's name")
    ap.add_argument(
        "--seed", type=int, default=300, help="arrival plans: round r draws from SEED + r"
    )
    a = ap.parse_args()
    t0 = time.monotonic()
    only = tuple(v for v in a.variants.split(",") if v)
    print(run(a.quick, a.workload, a.rounds, peer=not a.no_peer, only=only, tag=a.tag, seed=a.seed))
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
