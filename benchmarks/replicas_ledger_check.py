"""Diagnostic (issue 13): what differs for a request between 1 and 4 router replicas.

Runs the shared-prefix workload (benchmarks/replicas.py part 1's fleet, 31 req/s for 20 s,
the same arrival plan and prompt texts each time, caches emptied between) through 1 and then
4 replicas, `rounds` times alternating, and prints per run:
- each replica's replication counters: with a correct ledger every replica reports placed and
  ended, own = its decisions and peer = the others', for every request;
- Envoy's routing delay (router_ext_envoy_pre_upstream_seconds, from the access log: start of
  request to first byte sent upstream), p50/p90/p99 by bucket upper bound, and the clients'
  TTFT p50/p90;
- where the requests went: the (prefix group, pod) pairs served (each one's first request
  prefilled the group's system prompt on that pod, the rest could hit it: a decider that
  scatters a group shows more pairs), TTFT p90 of those first requests and of the rest, and
  the busiest pod's share of requests against an even share.

    python -m benchmarks.replicas_ledger_check [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import shared_prefix
from benchmarks.common import RUN_DIR, wait_until
from benchmarks.replicas import (
    PROFILE,
    SHARED,
    SimFleet,
    _ms,
    _stack,
    flush_caches,
    start_fleet,
    wait_all_rescraped,
)
from benchmarks.shared_prefix import plan_for
from router_ext.harness.loadgen import Result, percentile, run_schedule
from router_ext.harness.sim.engine import MAX_CATCH_UP_S

RATE = 31.0
DURATION_S = 20.0


def _samples(text: str, family: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for fam in text_string_to_metric_families(text)
        if fam.name == family
        for s in fam.samples
    ]


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile `q` (cumulative counts)."""
    total = buckets[-1][1]
    for bound, n in buckets:
        if n >= q * total:
            return bound
    return float("inf")


def spread(rs: list[Result]) -> str:
    """Where a run's requests went: (group, pod) pairs, first-on-pod vs later TTFT, busiest pod."""
    seen: set[tuple[str, str]] = set()
    cold: list[Result] = []  # each (group, pod) pair's first request: a cold prefill
    later: list[float] = []
    per_pod: Counter[str] = Counter()
    for r in sorted(rs, key=lambda r: r.started):
        if not r.ok or r.ttft_s is None:
            continue
        per_pod[r.served_by] += 1
        key = (r.group, r.served_by)
        if key in seen:
            later.append(r.ttft_s)
        else:
            cold.append(r)
            seen.add(key)
    first = [r.ttft_s or 0.0 for r in cold]
    even = sum(per_pod.values()) / max(1, len(per_pod))
    # Stacking: at each cold prefill's start, how many other cold prefills on the same pod had
    # started and not yet produced their first token.
    stacked = [
        sum(
            1
            for o in cold
            if o is not r
            and o.served_by == r.served_by
            and o.started <= r.started < o.started + (o.ttft_s or 0.0)
        )
        for r in cold
    ]
    return (
        f"{len(seen)} (group, pod) pairs over {len({g for g, _ in seen})} groups; TTFT p90 "
        f"first-on-pod {_ms(percentile(first, 90))} ms ({len(first)}), later "
        f"{_ms(percentile(later, 90))} ms ({len(later)}); busiest pod "
        f"{max(per_pod.values(), default=0) / max(even, 1.0):.2f} x an even share; cold prefills "
        f"already running on the pod at a cold one's start: mean "
        f"{sum(stacked) / max(1, len(stacked)):.2f}, max {max(stacked, default=0)}"
    )


def step_clock(fleet: SimFleet) -> tuple[float, float, float]:
    """(engine time scheduled, how late step timers fired, engine time lost to host stalls),
    summed over the fleet's pods."""
    with urllib.request.urlopen(f"http://{fleet.control}/pods", timeout=5) as resp:
        pods = json.loads(resp.read())["pods"].values()
    return (
        sum(p["step_s"] for p in pods),
        sum(p["step_lag_s"] for p in pods),
        sum(p["step_lost_s"] for p in pods),
    )


def one_run(fleet: SimFleet, replicas: int, rnd: int, flush_ms: float | None) -> None:
    flush_caches(fleet)
    cfg: dict[str, object] = {"routing": {"seed": 7}}
    if flush_ms is not None:
        cfg["envoy"] = {"placement_log_flush_ms": flush_ms}
    st = _stack(RUN_DIR / "replicas-ledger-check" / f"{replicas}-{rnd}", fleet, replicas,
                PROFILE[SHARED], cfg)  # fmt: skip
    try:
        st.start(timeout=90)
        wait_all_rescraped(st)
        plan = plan_for(SHARED, RATE, DURATION_S, 100, 5000, salt=False)
        busy0, lag0, lost0 = step_clock(fleet)
        rs = asyncio.run(run_schedule(st.url, plan, timeout_s=60))
        busy1, lag1, lost1 = step_clock(fleet)
        n = len(rs)

        def ended(i: int) -> float:
            return sum(
                v
                for name, labels, v in _samples(
                    st.router_metrics_of(i), "router_ext_replication_entries"
                )
                if labels.get("kind") == "ended" and name.endswith("_total")
            )

        def routed(i: int) -> float:
            return sum(
                v
                for name, _, v in _samples(
                    st.router_metrics_of(i), "router_ext_envoy_pre_upstream_seconds"
                )
                if name.endswith("_count")
            )

        # The last entries arrive within the access log's flush interval, not at once.
        wait_until(
            lambda: all(ended(i) >= n and routed(i) >= n for i in range(st.n_routers)),
            10,
            "every replica to receive every request's end",
            step=0.05,
        )
        ttft = [r.ttft_s for r in rs if r.ok and r.ttft_s is not None]
        pre = [
            (float(labels["le"]), v)
            for name, labels, v in _samples(
                st.router_metrics_of(0), "router_ext_envoy_pre_upstream_seconds"
            )
            if name.endswith("_bucket")
        ]
        print(
            f"round {rnd + 1}, {replicas} replica(s): {n} requests, "
            f"{sum(1 for r in rs if not r.ok)} failed; TTFT p50/p90 "
            f"{_ms(percentile(ttft, 50))}/{_ms(percentile(ttft, 90))} ms; Envoy routing delay "
            f"p50/p90/p99 <= {_ms(_quantile(pre, 0.5))}/{_ms(_quantile(pre, 0.9))}/"
            f"{_ms(_quantile(pre, 0.99))} ms",
            flush=True,
        )
        print("  " + spread(rs), flush=True)
        print(
            f"  simulated engines: {busy1 - busy0:.1f} s of steps, timers fired "
            f"{lag1 - lag0:.2f} s late in all ({(lag1 - lag0) / max(1e-9, busy1 - busy0):.1%}), "
            f"engine time lost to stalls over {MAX_CATCH_UP_S:g} s: {lost1 - lost0:.2f} s",
            flush=True,
        )
        for i in range(st.n_routers):
            counts = [
                f"{labels['kind']} {labels['origin']} {v:g}"
                for name, labels, v in _samples(
                    st.router_metrics_of(i), "router_ext_replication_entries"
                )
                if name.endswith("_total") and v
            ]
            print(f"  replica {i}: " + ", ".join(counts))
    finally:
        st.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--flush-ms", type=float, default=None, help="envoy.placement_log_flush_ms for every run"
    )
    args = ap.parse_args()
    fleet = start_fleet(
        RUN_DIR / "replicas-ledger-check" / "fleet", shared_prefix.PODS, shared_prefix.sim_args()
    )
    try:
        for rnd in range(max(1, args.rounds)):
            for k in (1, 4) if rnd % 2 == 0 else (4, 1):
                one_run(fleet, k, rnd, args.flush_ms)
    finally:
        fleet.child.stop()


if __name__ == "__main__":
    main()
