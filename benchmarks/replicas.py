"""Router replicas active-active behind one Envoy (issue 13): quality, failover and cost.

    python -m benchmarks.replicas [--quick] [--rounds N] [--parts 1,2,3]

N `router-ext serve` processes, each an ext_proc endpoint of Envoy's router cluster and each
with its own gRPC access logger (every replica receives every request's entry and learns the
others' prefix placements from it); no shared store. Measured side by side in one run:

1. Routing quality with 1, 2 and 4 replicas, on the same simulated fleet with the same seeds:
   - benchmarks/quality.py's fleet and workload (8 pods, two at 0.4x speed, streaming chat,
     64 output tokens), `least-request`, Poisson arrivals at 90 % of the capacity measured
     the way quality.py measures it;
   - benchmarks/shared_prefix.py's fleet and workload (4 pods, `shared-prefix`),
     `prefix-aware`, at 90 % of the capacity measured the way shared_prefix.py measures it.
   One simulator process per fleet serves every cell; each cell starts a fresh Stack (its N
   routers and an Envoy) on it, so no idle replica set runs beside the one measured. At a round
   every replica count gets the same arrival plan (shared-prefix: fresh prefix texts per cell,
   as in shared_prefix.py); the order of replica counts rotates between rounds. TTFT p90 and
   the pods' own prefix hit rate per cell; ratios vs 1 replica per round, median over rounds.
2. SIGKILL of one of 2 replicas under a closed loop of 64 (shared-prefix, prefix-aware):
   failed requests, and the prefix hit rate (pods' counters, sampled every 0.5 s) in a window
   before the kill vs after it, and whether each prefix group stays on its pod.
3. Throughput and CPU per request through Envoy with 1 and 2 router processes, wrk closed loop
   at concurrency 32 and 64, in front of benchmarks/fast_upstream.py (16 pods, Envoy
   direct_response, never the bottleneck), as benchmarks/overhead.py measures (c).
   Router CPU = utime + stime from /proc of every router process (and, separately, with their
   scrape workers), Envoy CPU likewise, each divided by wrk's requests.
4. The cost of the every-replica access log, from the same runs as 3 plus a diagnostic: the
   same 2 replicas with Envoy's bootstrap edited to the single-router logging (one logger whose
   streams Envoy balances over the replicas, no upstream log), so each entry reaches one
   replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import quality, shared_prefix
from benchmarks.common import (
    RUN_DIR,
    WRK_POST_LUA,
    BenchError,
    Child,
    cpu_seconds,
    loadavg,
    machine_markdown,
    md_table,
    median,
    run_wrk,
    wait_until,
    write_result,
)
from benchmarks.fast_upstream import FastUpstream, pod_hosts
from benchmarks.shared_prefix import (
    FAIL_OPEN_STAT,
    REQUEST_TIMEOUT_S,
    Cell,
    hit_rate,
    plan_for,
    summarize,
)
from router_ext.envoy_adapter.envoy_config import CLUSTER_PODS, CLUSTER_ROUTER
from router_ext.harness.envoy_proc import free_port
from router_ext.harness.loadgen import (
    LoadSpec,
    Result,
    closed_loop,
    open_loop_schedule,
    run_schedule,
    workload_of,
)
from router_ext.harness.stack import Stack, StackOptions
from router_ext.harness.workloads import make_workload

REPLICAS = (1, 2, 4)
FRACTION = 0.9
TTFT_TARGET = 1.1  # TTFT p90 with N replicas <= this x one replica's
HIT_TARGET = 0.95  # prefix hit rate with N replicas >= this x one replica's
KILL_CONCURRENCY = 64
CPU_CONCURRENCIES = (32, 64)
FAST_PODS = 16
ENTRIES = "router_ext_access_log_entries"
DECISIONS = "router_ext_decisions"
QUALITY = "quality"
SHARED = "shared-prefix"
PROFILE = {QUALITY: "least-request", SHARED: "prefix-aware"}
#: Part 3/4 configurations: (label, router processes, every-replica access log).
CPU_CONFIGS = (
    ("1 router", 1, True),
    ("2 routers", 2, True),
    ("2 routers, one shared logger (diagnostic)", 2, False),
)
_GRPC_LOGGER = "envoy.access_loggers.http_grpc"
T = TypeVar("T")


# --- the fleet under several stacks ----------------------------------------------------------


@dataclass
class SimFleet:
    """One `router-ext sim` process that every cell's Stack routes to."""

    pods: dict[str, str]
    control: str
    pods_text: str
    child: Child

    @property
    def addresses(self) -> list[str]:
        return list(self.pods.values())


def flush_caches(fleet: SimFleet) -> None:
    """Empty every sim pod's prefix cache, so a cell starts cold whatever ran before."""
    for name in fleet.pods:
        req = urllib.request.Request(
            f"http://{fleet.control}/pods/{name}/flush-cache", data=b"", method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()


def start_fleet(workdir: Path, n_pods: int, sim_args: Sequence[str]) -> SimFleet:
    workdir.mkdir(parents=True, exist_ok=True)
    pods_file = workdir / "pods.yaml"
    cmd = [
        sys.executable, "-m", "router_ext.app.cli", "sim",
        "--pods", str(n_pods), "--base-port", "0", "--pods-file", str(pods_file),
        "--control-port", "0", *sim_args,
    ]  # fmt: skip
    child = Child("sim", cmd, workdir / "sim.log", stdout_pipe=True)
    try:
        ready = json.loads(Stack._read_line(child, time.monotonic() + 60))
        if ready.get("event") != "sim_ready":
            raise BenchError(f"simulator did not start: {ready}")
    except (ValueError, RuntimeError) as e:
        child.stop()
        raise BenchError(f"simulator did not start: {e}\n{child.tail()}") from e
    return SimFleet(dict(ready["pods"]), ready["control"], pods_file.read_text(), child)


class FleetStack(Stack):
    """A Stack (its routers and Envoy) on pods that run elsewhere: a shared simulator or the
    fast upstream. Stopping it leaves the pods running."""

    def __init__(
        self,
        workdir: Path,
        options: StackOptions,
        pods: Mapping[str, str],
        pods_text: str,
        control: str = "",
        shared_logger: bool = False,
        active: int | None = None,
    ) -> None:
        super().__init__(workdir, options)
        self._fleet = (dict(pods), pods_text, control)
        self.shared_logger = shared_logger
        # Equal-load cells: only the first `active` replicas answer ext_proc; the others run
        # as replicas do (scrape every pod, receive every access-log entry) but decide nothing.
        self.active = active

    def _start_sim(self, deadline: float) -> None:
        pods, text, control = self._fleet
        self.pods = dict(pods)
        self.sim_control = control
        self.pods_file.write_text(text)

    def _start_envoy(self, deadline: float) -> None:
        path = self.workdir / "envoy" / "envoy.yaml"
        if self.shared_logger:
            boot = single_logger(yaml.safe_load(path.read_text()))
            path.write_text(yaml.safe_dump(boot, sort_keys=False))
        if self.active is not None:
            boot = yaml.safe_load(path.read_text())
            for c in boot["static_resources"]["clusters"]:
                if c["name"] == CLUSTER_ROUTER:
                    group = c["load_assignment"]["endpoints"][0]
                    group["lb_endpoints"] = group["lb_endpoints"][: self.active]
            path.write_text(yaml.safe_dump(boot, sort_keys=False))
        super()._start_envoy(deadline)

    @property
    def router_grpcs(self) -> list[str]:
        every = super().router_grpcs
        return every if self.active is None else every[: self.active]


def single_logger(boot: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap with single-router logging: the per-replica gRPC access loggers replaced
    by one on the router cluster (each entry reaches one replica; Envoy may keep the stream
    on one of them), and the router filter's upstream log removed."""
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    tc = hcm["typed_config"]
    grpc_logs = [a for a in tc["access_log"] if a["name"] == _GRPC_LOGGER]
    if not grpc_logs:
        raise BenchError("the rendered bootstrap has no gRPC access logger")
    one = json.loads(json.dumps(grpc_logs[0]))
    common = one["typed_config"]["common_config"]
    common["log_name"] = "router-ext"
    common["grpc_service"]["envoy_grpc"] = {"cluster_name": CLUSTER_ROUTER}
    tc["access_log"] = [one, *(a for a in tc["access_log"] if a["name"] != _GRPC_LOGGER)]
    for f in tc["http_filters"]:
        if f["name"] == "envoy.filters.http.router":
            f.get("typed_config", {}).pop("upstream_log", None)
            f.get("typed_config", {}).pop("upstream_log_options", None)
    return boot


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants (a router's scrape worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        c = cpu_seconds(p)
        total += 0.0 if math.isnan(c) else c
        todo += children.get(p, [])
    return total


def counter(text: str, family: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == family
        for s in fam.samples
        if s.name == f"{family}_total"
    )


def replica_counters(st: Stack, family: str) -> list[float]:
    """`family`'s total on each replica (NaN for one that does not answer)."""
    out = []
    for i in range(st.n_routers):
        try:
            out.append(counter(st.router_metrics_of(i), family))
        except OSError:
            out.append(float("nan"))
    return out


def wait_all_rescraped(st: Stack, timeout: float = 5.0) -> None:
    """Until every replica has published two snapshots since now (pods idle in its view)."""

    def version(i: int) -> float:
        for fam in text_string_to_metric_families(st.router_metrics_of(i)):
            for s in fam.samples:
                if s.name == "router_ext_snapshot_version":
                    return s.value
        return -1.0

    v0 = [version(i) for i in range(st.n_routers)]
    wait_until(
        lambda: all(version(i) >= v0[i] + 2 for i in range(st.n_routers)),
        timeout,
        "every replica to rescrape",
        step=0.05,
    )


def _stack(
    workdir: Path,
    fleet: SimFleet,
    replicas: int,
    strategy: str,
    overrides: Mapping[str, Any] | None = None,
) -> FleetStack:
    return FleetStack(
        workdir,
        StackOptions(
            pods=len(fleet.pods),
            strategy=strategy,
            router_overrides=dict(overrides or {}),
            router_log_level="warning",
            routers=replicas,
        ),
        fleet.pods,
        fleet.pods_text,
        fleet.control,
    )


def rotated(items: Sequence[T], i: int) -> list[T]:
    k = i % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else float("nan")


def _f(x: float, fmt: str = "{:.2f}") -> str:
    return "-" if math.isnan(x) else fmt.format(x)


def _ms(x: float) -> str:
    return _f(x * 1e3, "{:.0f}")


def _pct(x: float) -> str:
    return _f(x * 100, "{:.0f}%")


# --- part 1: routing quality vs replica count -----------------------------------------------


@dataclass
class QCell:
    workload: str
    replicas: int
    round: int
    cell: Cell
    decided: list[float]  # decisions per replica during the cell
    sim_cpu_s: float = float("nan")  # the simulator process during the cell
    routers_cpu_s: float = float("nan")  # every router process and scrape worker
    processes: int = 0  # router processes running (equal-load cells: more than `replicas`)


def _quality_cell(
    workdir: Path,
    fleet: SimFleet,
    workload: str,
    replicas: int,
    rnd: int,
    rate: float,
    duration: float,
    cell_seed: int,
    processes: int | None = None,
    envoy: Mapping[str, Any] | None = None,
    tag: str = "",
) -> QCell:
    overrides: dict[str, Any] = {"routing": {"seed": 7}, "envoy": dict(envoy or {})}
    procs = processes or replicas
    st = _stack(
        workdir / f"{workload}-{replicas}-of-{procs}{tag}",
        fleet,
        procs,
        PROFILE[workload],
        overrides,
    )
    if procs != replicas:
        st.active = replicas
    try:
        st.start(timeout=90)
        wait_all_rescraped(st)
        d0 = replica_counters(st, DECISIONS)
        before = shared_prefix._pod_counters(fleet.addresses)
        fo0 = st.envoy_stat(FAIL_OPEN_STAT)
        pids = [p.pid for p in st.routers]
        cpu0 = (cpu_seconds(fleet.child.pid), sum(tree_cpu_seconds(p) for p in pids))
        if workload == QUALITY:
            # The same plan for every replica count at a round, each cell's prompts tagged:
            # the shared pods' caches must not give a later cell the earlier one's prompts.
            wl = workload_of(quality._spec(st.url))
            plan = [
                (t, shared_prefix._salted(item, f"cell {cell_seed}"))
                for t, item in open_loop_schedule(wl, rate, duration, seed=100 + rnd)
            ]
        else:
            plan = plan_for(SHARED, rate, duration, 100 + 1000 * rnd, cell_seed, salt=False)
        rs = asyncio.run(run_schedule(st.url, plan, timeout_s=REQUEST_TIMEOUT_S))
        sim_cpu = cpu_seconds(fleet.child.pid) - cpu0[0]
        routers_cpu = sum(tree_cpu_seconds(p) for p in pids) - cpu0[1]
        hits = hit_rate(before, shared_prefix._pod_counters(fleet.addresses))
        c = summarize(str(replicas), rate, rs, hits, strategy=PROFILE[workload])
        c.fail_open = int(st.envoy_stat(FAIL_OPEN_STAT) - fo0)
        decided = [b - a for a, b in zip(d0, replica_counters(st, DECISIONS), strict=True)]
    finally:
        st.stop()
    return QCell(workload, replicas, rnd, c, decided, sim_cpu, routers_cpu, procs)


def run_quality(
    quick: bool,
    rounds: int,
    notes: list[str],
    cell_s: float | None = None,
    workloads: Sequence[str] = (QUALITY, SHARED),
) -> tuple[str, list[str]]:
    duration = cell_s or (4.0 if quick else 20.0)
    workdir = RUN_DIR / "replicas"
    q_args = [
        "--speeds", ",".join(str(s) for s in quality.SPEEDS),
        "--max-running", str(quality.MAX_RUNNING),
        "--ttft-ms", str(quality.TTFT_MS),
        "--tpot-ms", str(quality.TPOT_MS),
        "--seed", "7",
    ]  # fmt: skip
    s_args = shared_prefix.sim_args()
    if not shared_prefix._texts_follow_seed(SHARED):
        raise BenchError("shared-prefix prompt texts no longer follow the workload seed")
    fleets: dict[str, SimFleet] = {}
    cells: list[QCell] = []
    rates: dict[str, float] = {}
    caps: dict[str, str] = {}
    try:
        fleets[QUALITY] = start_fleet(workdir / "fleet-quality", len(quality.SPEEDS), q_args)
        fleets[SHARED] = start_fleet(workdir / "fleet-shared", shared_prefix.PODS, s_args)
        fast, slow = asyncio.run(
            quality._measure_capacity(fleets[QUALITY].pods, 3.0 if quick else 10.0)
        )
        n_fast = sum(1 for s in quality.SPEEDS if s >= 1)
        cap_q = n_fast * fast + (len(quality.SPEEDS) - n_fast) * slow
        cap_s_s, warm_s = (4.0, 1.0) if quick else (15.0, 3.0)
        cap_s, per_pod = shared_prefix.measure_capacity(
            fleets[SHARED].addresses, SHARED, cap_s_s, warm_s, False
        )
        rates = {QUALITY: round(FRACTION * cap_q, 1), SHARED: round(FRACTION * cap_s, 2)}
        caps = {
            QUALITY: f"{cap_q:.1f} req/s (fast pod {fast:.2f}, slow pod {slow:.2f} at full batch, "
            "as benchmarks/quality.py measures it)",
            SHARED: f"{cap_s:.2f} req/s ({', '.join(f'{x:.2f}' for x in per_pod)} per pod, as "
            "benchmarks/shared_prefix.py measures it)",
        }
        print(f"capacity: quality {cap_q:.1f}, shared-prefix {cap_s:.2f}; rates {rates}")
        for rnd in range(rounds):
            for workload in workloads:
                # Paired cells: every replica count of a round gets the same prompt texts (so
                # the same prefix groups, hashed alike) and starts on empty caches. Which pod
                # a group lands on is a lottery that moves TTFT p90 by +-30 % from one text
                # set to the next (measured); pairing keeps it out of the ratios.
                cell_seed = 5000 + rnd
                # Equal-load cells (k of MAX processes answer ext_proc, the rest scrape and
                # receive the access log as replicas do): the simulator runs every pod in one
                # Python process, so each replica's scrapes cost every pod's engine loop time,
                # which a real engine (metrics served apart from the engine core) never pays.
                # Holding the process count at MAX isolates what replication does to routing.
                most = max(REPLICAS)
                plan = [(k, k) for k in REPLICAS] + [(k, most) for k in REPLICAS if k != most]
                for k, procs in rotated(plan, rnd):
                    flush_caches(fleets[workload])
                    t0 = time.monotonic()
                    qc = _quality_cell(
                        workdir, fleets[workload], workload, k, rnd, rates[workload], duration,
                        cell_seed, procs,
                    )  # fmt: skip
                    cells.append(qc)
                    c = qc.cell
                    print(
                        f"round {rnd + 1} {workload:13} {k} replicas of {procs} processes "
                        f"n={c.n} failed={c.failed} "
                        f"TTFT p50/p90/p99 {_ms(c.ttft[0])}/{_ms(c.ttft[1])}/{_ms(c.ttft[2])} ms"
                        f" hit {_pct(c.hit_rate)} pods/group {c.pods_per_group:.1f} fail-open "
                        f"{c.fail_open} decided {qc.decided} "
                        f"({time.monotonic() - t0:.0f} s)"
                        + (f" errors: {c.errors}" if c.errors else ""),
                        flush=True,
                    )
    finally:
        for f in fleets.values():
            f.child.stop()
    return _quality_markdown(cells, rates, caps, duration, rounds, notes)


def _groups(workload: str, c: Cell) -> str:
    """Pods per prefix group; the quality workload has no groups."""
    return "-" if workload == QUALITY else _f(c.pods_per_group, "{:.1f}")


def _quality_markdown(
    cells: list[QCell],
    rates: Mapping[str, float],
    caps: Mapping[str, str],
    duration: float,
    rounds: int,
    notes: list[str],
) -> tuple[str, list[str]]:
    targets: list[str] = []
    rows_all = []
    for qc in cells:
        c = qc.cell
        rows_all.append(
            [
                qc.round + 1, qc.workload, qc.replicas, qc.processes, c.n, c.failed, _ms(c.ttft[0]),
                _ms(c.ttft[1]), _ms(c.ttft[2]), _pct(c.hit_rate), _groups(qc.workload, c),
                c.fail_open, c.off_strategy, "/".join(_f(d, "{:.0f}") for d in qc.decided),
                _f(qc.sim_cpu_s, "{:.1f}"), _f(qc.routers_cpu_s, "{:.1f}"),
            ]
        )  # fmt: skip
    summary = []
    most = max(REPLICAS)
    for workload in (QUALITY, SHARED):
        for equal in (False, True):
            by = {
                (qc.replicas, qc.round): qc.cell
                for qc in cells
                if qc.workload == workload and qc.processes == (most if equal else qc.replicas)
            }
            for k in REPLICAS:
                mine = [by[(k, r)] for r in range(rounds) if (k, r) in by]
                if not mine:
                    continue
                pairs = [r for r in range(rounds) if (k, r) in by and (1, r) in by]
                ttft_r = median([_ratio(by[(k, r)].ttft[1], by[(1, r)].ttft[1]) for r in pairs])
                hit_r = median([_ratio(by[(k, r)].hit_rate, by[(1, r)].hit_rate) for r in pairs])
                p90 = median([c.ttft[1] for c in mine])
                hit = median([c.hit_rate for c in mine])
                failed = sum(c.failed for c in mine)
                procs = most if equal else k
                summary.append(
                    [
                        workload, PROFILE[workload], k, procs, _ms(p90), _pct(hit),
                        _groups(workload, mine[0]) if workload == QUALITY
                        else _f(median([c.pods_per_group for c in mine]), "{:.1f}"), failed,
                        "1.00" if k == 1 else _f(ttft_r),
                        "-" if workload == QUALITY else "1.00" if k == 1 else _f(hit_r),
                    ]
                )  # fmt: skip
                if k == 1:
                    continue
                ok_t = ttft_r <= TTFT_TARGET
                how = (
                    f"{k} of {most} router processes answering (equal load on the simulator)"
                    if equal
                    else f"{k} replicas ({k} processes)"
                )
                line = (
                    f"**Target** {workload} ({PROFILE[workload]}, {FRACTION:.0%} of capacity), "
                    f"{how}: TTFT p90 {_ms(p90)} ms = {_f(ttft_r)} x one replica's (goal <= "
                    f"{TTFT_TARGET} x: {'met' if ok_t else 'NOT met'})"
                )
                if workload == SHARED:
                    ok_h = hit_r >= HIT_TARGET
                    line += (
                        f"; prefix hit rate {_pct(hit)} = {_f(hit_r)} x one replica's (goal >= "
                        f"{HIT_TARGET} x: {'met' if ok_h else 'NOT met'})"
                    )
                targets.append(line + f"; {failed} failed.")
    out = [
        "## 1. Routing quality with 1, 2 and 4 replicas\n",
        f"Poisson arrivals for {duration:g} s per cell at {FRACTION:.0%} of measured capacity; "
        f"{rounds} round(s), the order of replica counts rotated per round; every replica count "
        "at a round gets the same arrival plan. One simulator process per fleet; each cell "
        "starts its own routers and Envoy on it (so pods known at start are not slow-started, "
        "and no other stack runs meanwhile). `routing.seed` 7 (replica i: 7 + i).\n",
        f"- `{QUALITY}`: benchmarks/quality.py's fleet (8 pods, speeds "
        f"{','.join(str(s) for s in quality.SPEEDS)}) and workload, `least-request`, "
        f"{rates.get(QUALITY, float('nan')):.1f} req/s; capacity {caps.get(QUALITY, '-')}.\n"
        f"- `{SHARED}`: benchmarks/shared_prefix.py's fleet (4 pods) and workload, "
        f"`prefix-aware`, {rates.get(SHARED, float('nan')):.2f} req/s; capacity "
        f"{caps.get(SHARED, '-')}.\n",
        md_table(
            [
                "workload",
                "profile",
                "replicas",
                "router processes",
                "TTFT p90 ms",
                "prefix hit rate",
                "pods per group",
                "failed",
                "TTFT p90 / 1 replica",
                "hit rate / 1 replica",
            ],
            summary,
        ),
        "Medians over rounds; ratios are per round (same arrival plan), then the median. "
        "`prefix hit rate`: the pods' own hits / queries over the cell (the quality workload's "
        "prompts are random words, so its hit rate is not a routing signal). `pods per group`: "
        "distinct pods that served one prefix group. `sim CPU s` / `routers CPU s`: CPU the "
        "simulator process (one Python process simulating every pod, on the same 2 cores) and "
        "all router processes with their scrape workers used during the cell; every replica "
        "scrapes every pod, so the simulator's scrape work grows with the replica count, which "
        "real engines on their own GPUs would not notice. Rows with more router processes "
        f"than replicas are the equal-load cells: {max(REPLICAS)} router processes run in every "
        "one of them (all scrape every pod and receive every access-log entry), and only the "
        "first `replicas` are ext_proc endpoints; their ratios are against the 1-of-"
        f"{max(REPLICAS)} cell of the same round.\n",
        "Every cell:\n",
        md_table(
            [
                "round",
                "workload",
                "replicas",
                "router processes",
                "requests",
                "failed",
                "TTFT p50 ms",
                "TTFT p90 ms",
                "TTFT p99 ms",
                "prefix hit rate",
                "pods per group",
                "failed open",
                "off-profile answers",
                "decisions per replica",
                "sim CPU s",
                "routers CPU s",
            ],
            rows_all,
        ),
    ]
    return "\n".join(out), targets


# --- part 2: one of two replicas killed under load -------------------------------------------


@dataclass
class KillRun:
    n: int
    failed: int
    failed_open: int
    out_after_s: float
    window_s: float
    hit_before: float
    hit_after: float
    affinity_kept: float  # after-window requests of a group served by its pod from before
    groups: int
    # The same between the two windows before the kill: how much groups move without one.
    control_kept: float
    on_main_before: float  # requests on their group's most used pod, within the window
    on_main_after: float
    rps_before: float
    rps_after: float
    decided: list[float]
    errors: list[str] = field(default_factory=list)


def _window_rate(
    samples: Sequence[tuple[float, list[tuple[float, float]]]], a: float, b: float
) -> float:
    """Fleet hit rate between the samples nearest to times a and b."""
    if not samples:
        return float("nan")
    sa = min(samples, key=lambda s: abs(s[0] - a))
    sb = min(samples, key=lambda s: abs(s[0] - b))
    if sb[0] <= sa[0]:
        return float("nan")
    return hit_rate(sa[1], sb[1])


def affinity_kept(before: Sequence[Result], after: Sequence[Result]) -> tuple[float, int]:
    """Share of `after`'s requests served by the pod that served most of their group in
    `before`, over groups seen in both; and how many groups that is."""
    home: dict[str, str] = {}
    votes: dict[str, Counter[str]] = {}
    for r in before:
        if r.ok and r.served_by:
            votes.setdefault(r.group, Counter())[r.served_by] += 1
    for g, c in votes.items():
        home[g] = c.most_common(1)[0][0]
    hits = total = 0
    groups: set[str] = set()
    for r in after:
        if r.ok and r.served_by and r.group in home:
            total += 1
            hits += r.served_by == home[r.group]
            groups.add(r.group)
    return (hits / total if total else float("nan")), len(groups)


def on_main_pod(rs: Sequence[Result]) -> float:
    """Share of `rs` served by their group's most used pod within `rs` (1.0: perfect
    affinity; 1 / pods: none)."""
    votes: dict[str, Counter[str]] = {}
    for r in rs:
        if r.ok and r.served_by:
            votes.setdefault(r.group, Counter())[r.served_by] += 1
    total = sum(sum(c.values()) for c in votes.values())
    top = sum(c.most_common(1)[0][1] for c in votes.values())
    return top / total if total else float("nan")


def run_kill(quick: bool) -> tuple[str, list[str]]:
    """The kill run, and a control run identical but for the kill (a fresh fleet each): the
    hit rate drifts as the caches fill under overload, so "after" is also compared with the
    same window of a run where nothing was killed."""
    window = 3.0 if quick else 8.0
    settle = 1.5
    kill_at = 3.0 + 2 * window
    duration = kill_at + settle + window + 0.5
    killed = _kill_run(window, settle, kill_at, duration, do_kill=True)
    control = _kill_run(window, settle, kill_at, duration, do_kill=False)
    return _kill_markdown(killed, control, duration, kill_at, settle)


def _kill_run(
    window: float, settle: float, kill_at: float, duration: float, *, do_kill: bool
) -> KillRun:
    # Windows: [k - 2w, k - w) and [k - w, k) before the kill (a control: how far groups move
    # between two windows anyway), [k + settle, k + settle + w) after it.
    workdir = RUN_DIR / "replicas"
    name = "kill" if do_kill else "kill-control"
    fleet = start_fleet(workdir / f"fleet-{name}", shared_prefix.PODS, shared_prefix.sim_args())
    st = _stack(workdir / name, fleet, 2, "prefix-aware", {"routing": {"seed": 7}})
    samples: list[tuple[float, list[tuple[float, float]]]] = []
    marks: dict[str, float] = {}
    stop = threading.Event()
    try:
        st.start(timeout=90)
        wait_all_rescraped(st)
        victim = st.router_grpc_of(0)
        d0 = replica_counters(st, DECISIONS)
        fo0 = st.envoy_stat(FAIL_OPEN_STAT)

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    samples.append((time.monotonic(), shared_prefix._pod_counters(fleet.addresses)))
                stop.wait(0.5)

        def out() -> bool:
            h = st.envoy.cluster_hosts(CLUSTER_ROUTER).get(victim, {})
            return "/failed_active_hc" in h.get("health_flags", "")

        async def main() -> list[Result]:
            async def kill() -> None:
                await asyncio.sleep(kill_at)
                last = await asyncio.to_thread(replica_counters, st, DECISIONS)
                marks["victim_decided"] = last[0] - d0[0]
                marks["kill"] = time.monotonic()
                if not do_kill:
                    return
                await asyncio.to_thread(st.kill_router, 0)
                await asyncio.to_thread(wait_until, out, 5.0, "Envoy to take replica 0 out", 0.02)
                marks["out"] = time.monotonic()

            wl = make_workload(SHARED, stream=True, seed=9001)  # prefixes no cell has sent
            spec = LoadSpec(
                url=st.url + "/v1/chat/completions", workload=wl, timeout_s=REQUEST_TIMEOUT_S
            )
            task = asyncio.create_task(kill())
            rs = await closed_loop(spec, KILL_CONCURRENCY, duration_s=duration, seed=9001)
            await task
            return rs

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rs = asyncio.run(main())
        stop.set()
        sampler.join(5)
        failed_open = int(st.envoy_stat(FAIL_OPEN_STAT) - fo0)
        decided = [b - a for a, b in zip(d0, replica_counters(st, DECISIONS), strict=True)]
        if do_kill:
            decided[0] = marks["victim_decided"]  # its last reading, just before the kill
    finally:
        stop.set()
        st.stop()
        fleet.child.stop()
    k = marks["kill"]
    b0, b1 = k - window, k
    a0, a1 = k + settle, k + settle + window
    before = [r for r in rs if b0 <= r.started < b1]
    after = [r for r in rs if a0 <= r.started < a1]
    kept, groups = affinity_kept(before, after)
    earlier = [r for r in rs if b0 - window <= r.started < b0]
    control, _ = affinity_kept(earlier, before)
    run = KillRun(
        n=len(rs),
        failed=sum(1 for r in rs if not r.ok),
        failed_open=failed_open,
        out_after_s=marks.get("out", float("nan")) - k,
        window_s=window,
        hit_before=_window_rate(samples, b0, b1),
        hit_after=_window_rate(samples, a0, a1),
        affinity_kept=kept,
        groups=groups,
        control_kept=control,
        on_main_before=on_main_pod(before),
        on_main_after=on_main_pod(after),
        rps_before=sum(r.ok for r in before) / window,
        rps_after=sum(r.ok for r in after) / window,
        decided=decided,
        errors=sorted({r.error or f"HTTP {r.status}" for r in rs if not r.ok})[:3],
    )
    print(f"{name}: {run}", flush=True)
    return run


def _kill_markdown(
    run: KillRun, control: KillRun, duration: float, kill_at: float, settle: float
) -> tuple[str, list[str]]:
    ok_hit = run.hit_after >= HIT_TARGET * run.hit_before
    ok_vs_control = run.hit_after >= HIT_TARGET * control.hit_after
    targets = [
        f"**Target** one of 2 replicas SIGKILLed under a closed loop of {KILL_CONCURRENCY} "
        f"(shared-prefix, prefix-aware): {run.failed} of {run.n} requests failed (goal 0: "
        f"{'met' if run.failed == 0 else 'NOT met'}); prefix hit rate {_pct(run.hit_before)} "
        f"before, {_pct(run.hit_after)} after ({'kept' if ok_hit else 'NOT kept'} within "
        f"{HIT_TARGET} x); the same windows of a run with no kill: {_pct(control.hit_before)} "
        f"and {_pct(control.hit_after)}, so after the kill "
        f"{_ratio(run.hit_after, control.hit_after):.2f} x the control "
        f"({'kept' if ok_vs_control else 'NOT kept'} within {HIT_TARGET} x)."
    ]
    rows: list[list[object]] = [
        ["requests", run.n],
        ["failed", run.failed],
        ["failed open (Envoy routed them itself)", run.failed_open],
        ["Envoy took the dead replica out after", f"{run.out_after_s:.2f} s"],
        [f"prefix hit rate, {run.window_s:g} s before the kill", _pct(run.hit_before)],
        [
            f"prefix hit rate, {run.window_s:g} s from {settle:g} s after the kill",
            _pct(run.hit_after),
        ],
        [
            "requests on their group's most used pod, before / after (within each window)",
            f"{_pct(run.on_main_before)} / {_pct(run.on_main_after)}",
        ],
        [
            "after-kill requests on their group's most used pod from before",
            f"{_pct(run.affinity_kept)} ({run.groups} groups)",
        ],
        [
            "control, no kill: requests of the last window before on the pod from the one "
            "before it",
            _pct(run.control_kept),
        ],
        ["completed req/s before / after", f"{run.rps_before:.1f} / {run.rps_after:.1f}"],
        [
            "control run (no kill): prefix hit rate in the same two windows",
            f"{_pct(control.hit_before)} / {_pct(control.hit_after)}",
        ],
        [
            "control run: completed req/s in the same two windows",
            f"{control.rps_before:.1f} / {control.rps_after:.1f}",
        ],
        ["control run: requests / failed", f"{control.n} / {control.failed}"],
        [
            "decisions per replica (0 killed, 1 survived)",
            "/".join(_f(d, "{:.0f}") for d in run.decided),
        ],
    ]
    out = [
        "## 2. One of 2 replicas killed (SIGKILL) under load\n",
        f"benchmarks/shared_prefix.py's fleet (4 pods) and `shared-prefix` workload, "
        f"`prefix-aware`, a closed loop of {KILL_CONCURRENCY} for {duration:g} s (far above "
        f"capacity: requests queue at the pods); replica 0 SIGKILLed at {kill_at:g} s. Hit rate "
        "from the pods' counters sampled every 0.5 s. Affinity rows: a group's pod is the one that "
        "served most of its requests in a window; with 4 pods, 25 % is what no affinity gives.\n",
        md_table(["", "value"], rows),
    ]
    if run.errors:
        out.append(f"Errors: {run.errors}\n")
    return "\n".join(out), targets


# --- parts 3 and 4: throughput and CPU per request -------------------------------------------


@dataclass
class CpuCell:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    router_us: float  # router processes (main)
    router_tree_us: float  # router processes and their scrape workers
    envoy_us: float
    entries_per_req: list[float]  # access-log entries received per request, per replica
    decided_share: list[float]  # share of decisions per replica
    fail_open: int


@dataclass
class CpuConfig:
    label: str
    replicas: int
    every_replica_log: bool
    stack: FleetStack | None = None
    cells: dict[int, list[CpuCell]] = field(default_factory=dict)


def _probe_routed(url: str) -> None:
    import urllib.request

    req = urllib.request.Request(
        url,
        data=json.dumps({"model": "sim-model", "messages": []}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as r:
        if r.headers.get("x-routing-strategy") != "least-request":
            raise BenchError(f"{url} was not routed by router-ext: {dict(r.headers)}")


def _pods_healthy(st: Stack) -> bool:
    hosts = st.envoy.cluster_hosts(CLUSTER_PODS)
    routers = st.envoy.cluster_hosts(CLUSTER_ROUTER)
    return (
        len(hosts) == FAST_PODS
        and all(h.get("health_flags") == "healthy" for h in hosts.values())
        and len(routers) >= 1
        and all(h.get("health_flags") == "healthy" for h in routers.values())
    )


def run_cpu(quick: bool) -> tuple[str, list[str]]:
    rounds = 2 if quick else 3
    duration = 3.0 if quick else 10.0
    workdir = RUN_DIR / "replicas" / "cpu"
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "post.lua"
    lua.write_text(WRK_POST_LUA)
    upstream = FastUpstream(workdir / "upstream", pod_hosts(FAST_PODS), free_port(), free_port())
    pods = {f"pod-{i}": a for i, a in enumerate(upstream.addresses)}
    pods_text = yaml.safe_dump(
        {"pods": [{"address": a, "name": n} for n, a in pods.items()]}, sort_keys=False
    )
    configs = [CpuConfig(label, n, every) for label, n, every in CPU_CONFIGS]
    load_start = loadavg()
    try:
        upstream.start()
        for i, cfg in enumerate(configs):
            st = FleetStack(
                workdir / f"cfg{i}",
                StackOptions(
                    pods=FAST_PODS,
                    strategy="least-request",
                    # Envoy's file log costs Envoy CPU per request: /dev/null, as overhead.py.
                    router_overrides={"envoy": {"access_log_path": "/dev/null"}},
                    router_log_level="warning",
                    routers=cfg.replicas,
                ),
                pods,
                pods_text,
                shared_logger=not cfg.every_replica_log,
            )
            cfg.stack = st
            st.start(timeout=90)
            wait_until(lambda st=st: _pods_healthy(st), 30, f"{cfg.label}: 16 healthy pods")
        for cfg in configs:
            assert cfg.stack is not None
            url = cfg.stack.url + "/v1/chat/completions"
            _probe_routed(url)
            run_wrk(url, 32, 1.0, lua)  # warm-up
        for r in range(rounds):
            for conc in CPU_CONCURRENCIES:
                for cfg in rotated(configs, r):
                    assert cfg.stack is not None and cfg.stack.envoy.pid is not None
                    st = cfg.stack
                    url = st.url + "/v1/chat/completions"
                    pids = [p.pid for p in st.routers]
                    envoy_pid = cfg.stack.envoy.pid
                    e0 = replica_counters(st, ENTRIES)
                    d0 = replica_counters(st, DECISIONS)
                    fo0 = st.envoy_stat(FAIL_OPEN_STAT)
                    c0 = sum(cpu_seconds(p) for p in pids)
                    t0 = sum(tree_cpu_seconds(p) for p in pids)
                    v0 = cpu_seconds(envoy_pid)
                    res = run_wrk(url, conc, duration, lua)
                    c1 = sum(cpu_seconds(p) for p in pids)
                    t1 = sum(tree_cpu_seconds(p) for p in pids)
                    v1 = cpu_seconds(envoy_pid)
                    # The access log is flushed every 100 ms: let the last entries arrive.
                    time.sleep(0.3)
                    e1 = replica_counters(st, ENTRIES)
                    d1 = replica_counters(st, DECISIONS)
                    n = max(1, res.requests)
                    dd = [b - a for a, b in zip(d0, d1, strict=True)]
                    cell = CpuCell(
                        rps=res.rps,
                        p50_ms=res.p50_ms,
                        p99_ms=res.p99_ms,
                        errors=res.errors,
                        router_us=(c1 - c0) / n * 1e6,
                        router_tree_us=(t1 - t0) / n * 1e6,
                        envoy_us=(v1 - v0) / n * 1e6,
                        entries_per_req=[(b - a) / n for a, b in zip(e0, e1, strict=True)],
                        decided_share=[d / max(1.0, sum(dd)) for d in dd],
                        fail_open=int(st.envoy_stat(FAIL_OPEN_STAT) - fo0),
                    )
                    cfg.cells.setdefault(conc, []).append(cell)
                    print(
                        f"round {r + 1} c={conc} {cfg.label}: {cell.rps:.0f} req/s p50 "
                        f"{cell.p50_ms:.2f} ms router {cell.router_us:.0f} µs/req (with scrape "
                        f"workers {cell.router_tree_us:.0f}) Envoy {cell.envoy_us:.0f} µs/req "
                        f"entries/req {[round(x, 2) for x in cell.entries_per_req]} "
                        f"fail-open {cell.fail_open} errors {cell.errors}",
                        flush=True,
                    )
    finally:
        for cfg in configs:
            if cfg.stack is not None:
                cfg.stack.stop()
        upstream.stop()
    return _cpu_markdown(configs, rounds, duration, load_start)


def _med(cells: Sequence[CpuCell], attr: str) -> float:
    return median([float(getattr(c, attr)) for c in cells])


def _cpu_markdown(
    configs: list[CpuConfig], rounds: int, duration: float, load_start: str
) -> tuple[str, list[str]]:
    rows = []
    for conc in CPU_CONCURRENCIES:
        for cfg in configs:
            cs = cfg.cells.get(conc, [])
            if not cs:
                continue
            entries = [median([c.entries_per_req[i] for c in cs]) for i in range(cfg.replicas)]
            shares = [median([c.decided_share[i] for c in cs]) for i in range(cfg.replicas)]
            rows.append(
                [
                    conc, cfg.label, f"{_med(cs, 'rps'):,.0f}", f"{_med(cs, 'p50_ms'):.2f}",
                    f"{_med(cs, 'p99_ms'):.2f}", sum(c.errors for c in cs),
                    sum(c.fail_open for c in cs), f"{_med(cs, 'router_us'):.0f}",
                    f"{_med(cs, 'router_tree_us'):.0f}", f"{_med(cs, 'envoy_us'):.0f}",
                    "/".join(f"{x:.2f}" for x in entries),
                    "/".join(f"{x:.0%}" for x in shares),
                ]
            )  # fmt: skip
    by = {cfg.label: cfg for cfg in configs}
    one, two, diag = (by[label] for label, _, _ in CPU_CONFIGS)
    sizing = []
    for conc in CPU_CONCURRENCIES:
        for cfg in (one, two):
            cs = cfg.cells.get(conc, [])
            if not cs:
                continue
            us = _med(cs, "router_tree_us")
            cores = us * 1000 / 1e6
            sizing.append(
                [
                    conc, cfg.label, f"{us:.0f}", f"{cores:.2f}", f"{cores * 2:.2f}",
                    f"{_med(cs, 'envoy_us') * 1000 / 1e6:.2f}",
                ]
            )  # fmt: skip
    cost_rows = []
    for conc in CPU_CONCURRENCIES:
        c1, c2, cd = (cfg.cells.get(conc, []) for cfg in (one, two, diag))
        if not (c1 and c2 and cd):
            continue
        r1, r2, rd = (_med(c, "router_us") for c in (c1, c2, cd))
        v1, v2, vd = (_med(c, "envoy_us") for c in (c1, c2, cd))
        cost_rows.append(
            [
                conc, f"{r1:.0f}", f"{r2:.0f}", f"{rd:.0f}", f"{r2 - r1:+.0f}", f"{r2 - rd:+.0f}",
                f"{v1:.0f}", f"{v2:.0f}", f"{vd:.0f}", f"{v2 - v1:+.0f}", f"{v2 - vd:+.0f}",
            ]
        )  # fmt: skip
    out = [
        "## 3. Throughput and CPU per request, 1 vs 2 router processes\n",
        f"wrk `-t1 -c{{{','.join(str(c) for c in CPU_CONCURRENCIES)}}} -d{duration:g}s`, POST "
        f"/v1/chat/completions through Envoy (concurrency 2) to {FAST_PODS} fast-upstream pods "
        "(benchmarks/fast_upstream.py), `least-request`, scrape every 0.5 s; every configuration "
        f"runs for the whole part, {rounds} interleaved rounds (order rotated), medians. Load "
        f"average at start {load_start}, at end {loadavg()}. All of it shares 2 cores: wrk, "
        "Envoy, the upstream Envoy and every router process.\n",
        md_table(
            [
                "conc.",
                "configuration",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "failed open",
                "router CPU µs/req",
                "incl. scrape workers",
                "Envoy CPU µs/req",
                "access-log entries/req per replica",
                "decisions per replica",
            ],
            rows,
        ),
        "`router CPU µs/req`: utime + stime of every router process during the wrk run "
        "(/proc/<pid>/stat), summed, divided by wrk's requests; `incl. scrape workers` adds "
        "each router's scrape worker process (it scrapes 16 pods every 0.5 s whatever the "
        "load, so its share per request shrinks as traffic grows).\n",
        "**Sizing.** Router cores per 1,000 req/s = router CPU µs/req x 1,000 / 10^6 (scrape "
        "workers included). Plan for 2x that (50 % utilisation per router core): a Python "
        "process's latency climbs steeply as its core saturates, bursts are not averages, and a "
        "replica must be able to absorb a dead peer's share. Several replicas are ~N x one "
        "replica's decisions spread over N cores, plus the access-log entries every replica "
        "reads for every request (part 4), so size from the 2-router row.\n",
        md_table(
            [
                "conc.",
                "configuration",
                "router CPU µs/req",
                "router cores per 1,000 req/s",
                "with 2x headroom",
                "Envoy cores per 1,000 req/s",
            ],
            sizing,
        ),
        "## 4. What the every-replica access log costs\n",
        "Same runs as part 3. `2 routers` is the shipped rendering: one gRPC access logger per "
        "replica (plus the router filter's upstream log), so every replica reads every entry. "
        "The diagnostic edits that bootstrap back to single-router logging (one logger on the "
        "router cluster, no upstream log), so each entry reaches exactly one replica (Envoy may "
        "keep that logger's stream on one of them): the difference is what replication costs. "
        "The column `access-log entries/req per replica` above shows how many entries each "
        "replica received per request.\n",
        md_table(
            [
                "conc.",
                "router µs/req, 1 router",
                "2 routers",
                "2, shared logger",
                "2 - 1",
                "2 - shared (replication)",
                "Envoy µs/req, 1 router",
                "2 routers",
                "2, shared logger",
                "2 - 1",
                "2 - shared (replication)",
            ],
            cost_rows,
        ),
    ]
    targets: list[str] = []
    for conc in CPU_CONCURRENCIES:
        c1, c2 = one.cells.get(conc, []), two.cells.get(conc, [])
        if c1 and c2:
            targets.append(
                f"Measured at concurrency {conc}: 2 router processes {_med(c2, 'rps'):,.0f} "
                f"req/s vs 1 router {_med(c1, 'rps'):,.0f} req/s "
                f"({_med(c2, 'rps') / _med(c1, 'rps'):.2f} x); router CPU "
                f"{_med(c2, 'router_us'):.0f} vs {_med(c1, 'router_us'):.0f} µs/req, Envoy CPU "
                f"{_med(c2, 'envoy_us'):.0f} vs {_med(c1, 'envoy_us'):.0f} µs/req."
            )
    return "\n".join(out), targets


# --- the run ------------------------------------------------------------------------------------


def run(
    quick: bool = False,
    rounds: int = 1,
    parts: Sequence[int] = (1, 2, 3),
    cell_s: float | None = None,
    workloads: Sequence[str] = (QUALITY, SHARED),
) -> str:
    t0 = time.monotonic()
    load_start = loadavg()
    notes: list[str] = []
    sections: list[str] = []
    targets: list[str] = []
    if 1 in parts:
        md, tg = run_quality(quick, rounds, notes, cell_s, workloads)
        sections.append(md)
        targets += tg
    if 2 in parts:
        md, tg = run_kill(quick)
        sections.append(md)
        targets += tg
    if 3 in parts:
        md, tg = run_cpu(quick)
        sections.append(md)
        targets += tg
    if quick:
        notes.insert(
            0, "`--quick` smoke run (short cells): numbers show the harness works, not the result."
        )
    cmd = "python -m benchmarks.replicas" + (" --quick" if quick else "")
    cmd += f" --rounds {rounds}" if rounds != 1 else ""
    cmd += f" --cell-s {cell_s:g}" if cell_s else ""
    cmd += f" --parts {','.join(str(p) for p in parts)}" if tuple(parts) != (1, 2, 3) else ""
    cmd += f" --workloads {','.join(workloads)}" if tuple(workloads) != (QUALITY, SHARED) else ""
    head = [
        f"Command: `{cmd}` ({(time.monotonic() - t0) / 60:.1f} min). Load average at start "
        f"{load_start}, at end {loadavg()}.\n",
        "Replicas: separate `router-ext serve` processes (router_ext/harness/stack.py, "
        "`StackOptions.routers`), each its own gRPC/metrics/admin ports, the same pods file "
        "and token, every one listed in `envoy.router_addresses` of the config Envoy's "
        "bootstrap is rendered from.\n",
        *(t + "\n" for t in targets),
    ]
    md = "\n".join([*head, *sections, *(f"\nNote: {n}\n" for n in notes)])
    if tuple(parts) == (1, 2, 3) and tuple(workloads) == (QUALITY, SHARED):
        write_result(
            "replicas", "# Router replicas, active-active\n\n" + machine_markdown() + "\n" + md
        )
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short cells (a few minutes)")
    ap.add_argument("--rounds", type=int, default=1, help="part 1 cells per replica count")
    ap.add_argument(
        "--parts",
        default="1,2,3",
        help="which parts to run (3 includes 4); the result file is written only for all",
    )
    ap.add_argument("--cell-s", type=float, help="seconds per part 1 cell (default 20)")
    ap.add_argument(
        "--workloads",
        default=f"{QUALITY},{SHARED}",
        help="part 1's workloads; the result file is written only for both",
    )
    args = ap.parse_args()
    parts = tuple(int(x) for x in args.parts.split(","))
    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = [w for w in workloads if w not in PROFILE]
    if unknown or not workloads:
        ap.error(
            f"--workloads: unknown {', '.join(unknown) or '(none)'}; known: {', '.join(PROFILE)}"
        )
    t0 = time.monotonic()
    print(
        run(
            quick=args.quick,
            rounds=max(1, args.rounds),
            parts=parts,
            cell_s=args.cell_s,
            workloads=workloads,
        )
    )
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
