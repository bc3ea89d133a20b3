"""Placement-log flush interval with router replicas (issue 13): 100 ms (the default) vs shorter.

A replica learns the other replicas' placements from Envoy's upstream access log, which Envoy
batches and flushes every `envoy.placement_log_flush_ms`. Until a peer's entry arrives the
replica counts that pod as idler than it is. This measures, on benchmarks/replicas.py part 1's
shared-prefix cells (same fleet, same paired prompt texts per round, rotated order), TTFT p90
and prefix hit rate with 1 replica and with 4 replicas at each flush interval.

    python -m benchmarks.replicas_flush [--rounds 3] [--cell-s 40] [--replicas 4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from benchmarks import shared_prefix
from benchmarks.common import RUN_DIR, machine_markdown, md_table, median, write_result
from benchmarks.replicas import (
    FRACTION,
    SHARED,
    QCell,
    _f,
    _ms,
    _pct,
    _quality_cell,
    _ratio,
    flush_caches,
    rotated,
    start_fleet,
)

_CELL_COLUMNS = [
    "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
    "prefix hit rate", "pods per group", "decisions per replica",
]  # fmt: skip


def _variants(replicas: int, flushes: Sequence[int]) -> list[tuple[str, int, int | None]]:
    """(label, replicas, placement_log_flush_ms; None for one replica: no placement log)."""
    return [("1 replica", 1, None)] + [
        (f"{replicas} replicas, flush {ms} ms", replicas, ms) for ms in flushes
    ]


def run(rounds: int, cell_s: float, replicas: int, flushes: Sequence[int]) -> str:
    workdir = RUN_DIR / "replicas-flush"
    fleet = start_fleet(workdir / "fleet-shared", shared_prefix.PODS, shared_prefix.sim_args())
    cells: list[tuple[str, QCell]] = []
    try:
        cap, per_pod = shared_prefix.measure_capacity(fleet.addresses, SHARED, 15.0, 3.0, False)
        rate = round(FRACTION * cap, 2)
        print(f"capacity {cap:.2f} req/s; rate {rate}", flush=True)
        variants = _variants(replicas, flushes)
        for rnd in range(rounds):
            for label, k, ms in rotated(variants, rnd):
                flush_caches(fleet)
                t0 = time.monotonic()
                envoy = {} if ms is None else {"placement_log_flush_ms": ms}
                qc = _quality_cell(
                    workdir, fleet, SHARED, k, rnd, rate, cell_s, 5000 + rnd, k, envoy,
                    f"-{ms}ms" if ms else "",
                )  # fmt: skip
                cells.append((label, qc))
                c = qc.cell
                print(
                    f"round {rnd + 1} {label:24} n={c.n} failed={c.failed} TTFT p50/p90/p99 "
                    f"{_ms(c.ttft[0])}/{_ms(c.ttft[1])}/{_ms(c.ttft[2])} ms hit "
                    f"{_pct(c.hit_rate)} pods/group {c.pods_per_group:.1f} decided {qc.decided} "
                    f"({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    finally:
        fleet.child.stop()
    return _markdown(cells, variants, rounds, cell_s, rate, cap, per_pod)


def _markdown(
    cells: list[tuple[str, QCell]],
    variants: list[tuple[str, int, int | None]],
    rounds: int,
    cell_s: float,
    rate: float,
    cap: float,
    per_pod: Sequence[float],
) -> str:
    by = {(label, qc.round): qc.cell for label, qc in cells}
    base = variants[0][0]
    rows = []
    for label, _, _ in variants:
        mine = [by[(label, r)] for r in range(rounds) if (label, r) in by]
        ttft_r = median(
            [_ratio(by[(label, r)].ttft[1], by[(base, r)].ttft[1]) for r in range(rounds)]
        )
        hit_r = median(
            [_ratio(by[(label, r)].hit_rate, by[(base, r)].hit_rate) for r in range(rounds)]
        )
        rows.append(
            [
                label, _ms(median([c.ttft[0] for c in mine])),
                _ms(median([c.ttft[1] for c in mine])), _ms(median([c.ttft[2] for c in mine])),
                _pct(median([c.hit_rate for c in mine])),
                _f(median([c.pods_per_group for c in mine]), "{:.1f}"),
                sum(c.failed for c in mine), _f(ttft_r), _f(hit_r),
            ]
        )  # fmt: skip
    every = [
        [
            qc.round + 1, label, c.n, c.failed, _ms(c.ttft[0]), _ms(c.ttft[1]), _ms(c.ttft[2]),
            _pct(c.hit_rate), _f(c.pods_per_group, "{:.1f}"),
            "/".join(_f(d, "{:.0f}") for d in qc.decided),
        ]
        for label, qc in cells
        for c in [qc.cell]
    ]  # fmt: skip
    return "\n".join(
        [
            f"Shared-prefix workload (benchmarks/replicas.py part 1's fleet: 4 sim pods), "
            f"`prefix-aware`, Poisson arrivals at {rate} req/s = {FRACTION:.0%} of the measured "
            f"{cap:.2f} req/s ({', '.join(f'{x:.2f}' for x in per_pod)} per pod), {cell_s:g} s "
            f"per cell, {rounds} rounds, variants rotated per round, every variant of a round "
            "on the same arrival plan and prompt texts, caches emptied before each cell.\n",
            md_table(
                [
                    "variant",
                    *_CELL_COLUMNS[:5],
                    "failed",
                    "TTFT p90 / 1 replica",
                    "hit rate / 1 replica",
                ],
                rows,
            ),
            "\nMedians over rounds; ratios per round (same plan), then the median.\n",
            "Every cell:\n",
            md_table(
                ["round", "variant", "requests", "failed", *_CELL_COLUMNS],
                every,
            ),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cell-s", type=float, default=40.0)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--flush-ms", default="100,20", help="comma-separated intervals to compare")
    args = ap.parse_args()
    t0 = time.monotonic()
    flushes = [int(x) for x in args.flush_ms.split(",")]
    md = run(max(1, args.rounds), args.cell_s, args.replicas, flushes)
    write_result(
        "replicas_flush",
        "# Placement-log flush interval with router replicas\n\n"
        + machine_markdown()
        + "\n"
        + f"Command: `python -m benchmarks.replicas_flush --rounds {args.rounds} --cell-s "
        f"{args.cell_s:g} --replicas {args.replicas} --flush-ms {args.flush_ms}` "
        f"({(time.monotonic() - t0) / 60:.0f} min).\n\n" + md,
    )
    print(md)


if __name__ == "__main__":
    main()
