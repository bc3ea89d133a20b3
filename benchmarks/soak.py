"""Soak: does router-ext's memory plateau under sustained load, and does Envoy ever give up on it?

    python -m benchmarks.soak [--quick] [--requests N] [--minutes M] [--ab]

The real request path as in configuration (c) of benchmarks/overhead.py: `router-ext serve`
(its production bootstrap rendered by router_ext.envoy_adapter.envoy_config: ext_proc +
gRPC access log +
gRPC health checks of the router cluster), a real Envoy, and the fast upstream
(benchmarks/fast_upstream.py, 16 pods). wrk drives it at concurrency 16 in bounded chunks
until `--requests` requests have completed (default 1,000,000, ~6-8 min on this machine), or
for `--minutes` minutes if given (item 8: the 30-minute no-fault run); every run is also capped
in wall time.

Every few seconds a sampler records the router's VmRSS (/proc/PID/status) against the number
of requests Envoy has completed (its `http.ingress.downstream_rq_completed` counter, read from
Envoy's admin port, so counting costs the router nothing). The result is the RSS slope after
warm-up, in bytes per request (least squares), and the growth in MB from the end of warm-up to
the end of the run; the curve is plotted to docs/soak_rss.png.

With no fault injected, two Envoy counters must stay at 0 for the whole run, and are printed
and written with the result:
- `http.ingress.ext_proc.failure_mode_allowed`: requests that failed open because the ext_proc
  stream to the router failed or timed out (also `streams_failed`, `message_timeouts`);
- `cluster.router_ext.health_check.failure` (and `network_failure`): gRPC health checks of
  the router that Envoy counted as failed (a slow or blocked router loop shows up here first).

`--ab` runs the same soak a second time with Envoy's default ext_proc stream close (runtime
flag `envoy.reloadable_features.ext_proc_graceful_grpc_close` forced false: Envoy half-closes
and at once resets every stream) and plots both curves: the evidence for the flag
router_ext.envoy_adapter.envoy_config sets (grpc.aio leaks native memory on every reset stream).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.common import (
    DOCS_DIR,
    RUN_DIR,
    WRK_POST_LUA,
    BenchError,
    Child,
    WrkResult,
    loadavg,
    machine_markdown,
    md_table,
    run_wrk,
    wait_until,
    write_result,
)
from benchmarks.fast_upstream import FastUpstream, pod_hosts
from benchmarks.overhead import PODS, _envoy_for, _pods_healthy, _probe, _router_cfg
from router_ext.config import load_config
from router_ext.envoy_adapter.auth import load_or_create_token
from router_ext.envoy_adapter.envoy_config import CLUSTER_ROUTER, render_bootstrap
from router_ext.harness.envoy_proc import EnvoyProcess, free_port

CONCURRENCY = 16
CHUNK_S = 30.0  # one wrk run; the loop stops at the first chunk boundary past the goal
SAMPLE_S = 3.0
#: Requests before the slope is measured: connections, caches, allocator pools and the
#: router's per-pod state all fill during the first requests.
WARMUP_FRACTION = 0.1
GOAL_MB = 10.0

#: Envoy counters that must stay 0 with no fault injected (name -> what it means).
EXTPROC = "http.ingress.ext_proc."
HC = f"cluster.{CLUSTER_ROUTER}.health_check."
ZERO_COUNTERS = {
    EXTPROC + "failure_mode_allowed": "requests failed open (ext_proc stream failed)",
    EXTPROC + "streams_failed": "ext_proc streams that failed",
    EXTPROC + "message_timeouts": "ext_proc answers later than message_timeout",
    HC + "failure": "router gRPC health checks failed",
    HC + "network_failure": "router health checks failed at the network level",
}
INFO_COUNTERS = {
    EXTPROC + "streams_started": "ext_proc streams opened",
    HC + "attempt": "router health checks made",
    HC + "success": "router health checks passed",
    "http.ingress.downstream_rq_completed": "requests completed by Envoy",
}


@dataclass
class Sample:
    t_s: float
    requests: int  # completed by Envoy
    router_rss: int  # bytes
    envoy_rss: int
    fail_open: int  # Envoy's ext_proc failure_mode_allowed so far


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    wrk: list[WrkResult] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    counters_start: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0

    def delta(self, counter: str) -> float:
        """How much an Envoy counter grew during the load (0 if Envoy never reported it)."""
        return self.counters.get(counter, 0) - self.counters_start.get(counter, 0)


def rss_bytes(pid: int | None) -> int:
    """VmRSS of a process (0 if it is gone)."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx (nan with fewer than 2 distinct x)."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in points) / sxx


class Sampler(threading.Thread):
    """Samples RSS and Envoy's completed-request count every SAMPLE_S seconds until stopped."""

    def __init__(self, router_pid: int, envoy: EnvoyProcess, out: list[Sample]) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.router_pid = router_pid
        self.envoy = envoy
        self.out = out
        self.t0 = time.monotonic()
        self.stop_event = threading.Event()

    def sample(self) -> None:
        try:
            stats = self.envoy.stats("http.ingress.")
        except Exception:  # admin busy for a moment: skip this sample, not the run
            return
        self.out.append(
            Sample(
                time.monotonic() - self.t0,
                int(stats.get("http.ingress.downstream_rq_completed", 0)),
                rss_bytes(self.router_pid),
                rss_bytes(self.envoy.pid),
                int(stats.get(EXTPROC + "failure_mode_allowed", 0)),
            )
        )

    def run(self) -> None:
        while not self.stop_event.wait(SAMPLE_S):
            self.sample()


def _counters(env: EnvoyProcess) -> dict[str, float]:
    stats: dict[str, float] = {}
    for prefix in (EXTPROC, HC, "http.ingress.downstream_rq_completed"):
        stats.update(env.stats(prefix))
    return {k: float(stats.get(k, 0)) for k in (*ZERO_COUNTERS, *INFO_COUNTERS)}


def soak(
    requests: int,
    minutes: float | None,
    workdir: Path,
    envoy_runtime: dict[str, bool] | None = None,
) -> SoakResult:
    """Run the stack, load it, return samples and counters (everything started is stopped).

    `envoy_runtime`: runtime flags to override in the rendered bootstrap (the --ab run).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "post.lua"
    lua.write_text(WRK_POST_LUA)
    upstream = FastUpstream(workdir / "upstream", pod_hosts(PODS), free_port(), free_port())
    pods_file = workdir / "pods.yaml"
    res = SoakResult()
    env: EnvoyProcess | None = None
    router: Child | None = None
    sampler: Sampler | None = None
    try:
        upstream.start()
        pods_file.write_text(
            yaml.safe_dump(
                {
                    "pods": [
                        {"address": a, "name": f"pod-{i}"} for i, a in enumerate(upstream.addresses)
                    ]
                }
            )
        )
        cfg = load_config(_router_cfg(workdir / "router", pods_file, free_port()))
        router = Child(
            "router-ext",
            [
                sys.executable,
                "-m",
                "router_ext.app.cli",
                "serve",
                "--config",
                str(workdir / "router" / "router-ext.yaml"),
                "--log-level",
                "warning",
            ],
            workdir / "router.log",
        )
        # The router refuses ext_proc/access-log streams without its shared token (auth mode
        # "token", the default): render Envoy with the token file the router reads.
        token = load_or_create_token(cfg.token_file) if cfg.router.auth.mode == "token" else None
        boot = render_bootstrap(cfg, token)
        if envoy_runtime:  # a later layer overrides an earlier one
            layers = boot.setdefault("layered_runtime", {}).setdefault("layers", [])
            layers.append({"name": "soak-ab", "static_layer": dict(envoy_runtime)})
        env = _envoy_for(cfg, boot, workdir)
        env.wait_ready(20)
        wait_until(lambda: _pods_healthy(env, True), 30, "Envoy: 16 healthy pods + router")
        lst = cfg.envoy.listener
        url = f"http://{lst.host}:{lst.port}/v1/chat/completions"
        h = _probe(url)
        if h.get("x-routing-strategy") != "least-request":
            raise BenchError(f"requests do not go through router-ext: headers {h}")
        res.counters_start = _counters(env)
        sampler = Sampler(router.pid, env, res.samples)
        sampler.sample()
        sampler.start()
        t0 = time.monotonic()
        # Bounded in count and time: stop at the goal, at --minutes, or at a hard cap
        # (a 10x slower machine than expected must not run for hours).
        limit_s = minutes * 60 if minutes else max(120.0, requests / 200)
        done = 0
        while time.monotonic() - t0 < limit_s and (minutes or done < requests):
            left = limit_s - (time.monotonic() - t0)
            r = run_wrk(url, CONCURRENCY, max(1.0, min(CHUNK_S, left)), lua)
            res.wrk.append(r)
            done += r.requests
            if not router.alive():
                raise BenchError("router-ext exited during the soak; see " + str(router.log_path))
            last = res.samples[-1] if res.samples else None
            print(
                f"{time.monotonic() - t0:6.0f} s {done:>10,} requests {r.rps:6.0f} req/s "
                f"errors {r.errors} router RSS "
                f"{(last.router_rss / 2**20 if last else 0):.1f} MB",
                flush=True,
            )
        res.duration_s = time.monotonic() - t0
        time.sleep(SAMPLE_S + 1)  # the access-log stream drains; one more sample after load
        sampler.stop_event.set()
        sampler.join(10)
        sampler.sample()
        res.counters = _counters(env)
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        if env is not None:
            env.stop()
        if router is not None:
            router.stop()
        upstream.stop()
    return res


@dataclass(frozen=True)
class Verdict:
    warm_requests: int
    warm_mb: float
    end_mb: float
    growth_mb: float
    slope_b_per_req: float
    slope_late_b_per_req: float
    total_requests: int


def analyse(res: SoakResult) -> Verdict:
    s = res.samples
    if len(s) < 4:
        raise BenchError(f"too few RSS samples ({len(s)})")
    total = s[-1].requests - s[0].requests
    warm_at = s[0].requests + int(total * WARMUP_FRACTION)
    after = [x for x in s if x.requests >= warm_at] or s[-2:]
    late = [x for x in s if x.requests >= s[0].requests + total // 2] or s[-2:]
    return Verdict(
        warm_requests=after[0].requests - s[0].requests,
        warm_mb=after[0].router_rss / 2**20,
        end_mb=s[-1].router_rss / 2**20,
        growth_mb=(s[-1].router_rss - after[0].router_rss) / 2**20,
        slope_b_per_req=slope([(x.requests, x.router_rss) for x in after]),
        slope_late_b_per_req=slope([(x.requests, x.router_rss) for x in late]),
        total_requests=total,
    )


#: The A/B run: Envoy's default ext_proc close (half-close, then reset at once).
GRACEFUL_FLAG = "envoy.reloadable_features.ext_proc_graceful_grpc_close"
AB_LABEL = "Envoy default close (reset), --ab"
MAIN_LABEL = "as rendered (graceful close)"


def plot(runs: list[tuple[str, SoakResult, Verdict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    colors = ["#4c72b0", "#c44e52"]
    for (label, res, v), color in zip(runs, colors, strict=False):
        s = res.samples
        base = s[0].requests
        xs = [(x.requests - base) / 1e6 for x in s]
        ax.plot(
            xs,
            [x.router_rss / 2**20 for x in s],
            color=color,
            label=f"router-ext, {label}: {v.growth_mb:+.1f} MB, {v.slope_b_per_req:.1f} B/req",
        )
    label, res, v = runs[0]
    s = res.samples
    ax.plot(
        [(x.requests - s[0].requests) / 1e6 for x in s],
        [x.envoy_rss / 2**20 for x in s],
        color="#dd8452",
        alpha=0.6,
        lw=0.8,
        label="Envoy",
    )
    ax.axvline(v.warm_requests / 1e6, color="grey", ls="--", lw=0.8, label="end of warm-up")
    ax.set_xlabel("requests completed (millions)")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        "RSS under load (wrk -c16 through Envoy); growth and slope after warm-up", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _summary_row(label: str, res: SoakResult, v: Verdict) -> list[object]:
    reqs = sum(w.requests for w in res.wrk)
    return [
        label,
        f"{reqs:,}",
        f"{res.duration_s / 60:.1f}",
        f"{reqs / res.duration_s:,.0f}" if res.duration_s else "-",
        sum(w.errors for w in res.wrk),
        f"{v.warm_mb:.1f}",
        f"{v.end_mb:.1f}",
        f"{v.growth_mb:+.1f}",
        f"{v.slope_b_per_req:.1f}",
        f"{v.slope_late_b_per_req:.1f}",
        f"{res.delta(EXTPROC + 'failure_mode_allowed'):.0f}",
        f"{res.delta(HC + 'failure'):.0f}",
    ]


def _fail_open_times(res: SoakResult) -> str:
    """When the fail-open counter moved: 't=123 s (+16)' for every sample where it grew."""
    out = []
    for a, b in zip(res.samples, res.samples[1:], strict=False):
        if b.fail_open > a.fail_open:
            out.append(
                f"t={b.t_s:.0f} s, after {b.requests - res.samples[0].requests:,} requests "
                f"(+{b.fail_open - a.fail_open})"
            )
    return "; ".join(out)


def markdown(runs: list[tuple[str, SoakResult, Verdict]], cmd: str, load_start: str) -> str:
    label, res, v = runs[0]
    s = res.samples
    rows = []
    step = max(1, v.total_requests // 10)
    next_at = 0
    for x in s:
        if x.requests - s[0].requests >= next_at or x is s[-1]:
            rows.append(
                [
                    f"{x.t_s:.0f}",
                    f"{x.requests - s[0].requests:,}",
                    f"{x.router_rss / 2**20:.1f}",
                    f"{x.envoy_rss / 2**20:.1f}",
                    x.fail_open - s[0].fail_open,
                ]
            )
            next_at = x.requests - s[0].requests + step
    ctr = [
        [f"`{k}`", what, f"{res.delta(k):,.0f}"]
        for k, what in {**ZERO_COUNTERS, **INFO_COUNTERS}.items()
    ]
    zero_ok = all(res.delta(k) == 0 for k in ZERO_COUNTERS)
    met = v.growth_mb <= GOAL_MB
    when = _fail_open_times(res)
    summary = md_table(
        [
            "run",
            "requests",
            "min",
            "req/s",
            "wrk errors",
            "RSS after warm-up MB",
            "RSS at end MB",
            "growth MB",
            "slope B/req",
            "slope, 2nd half B/req",
            "failure_mode_allowed",
            "health_check.failure",
        ],
        [_summary_row(*r) for r in runs],
    )
    return (
        f"`{cmd}`: real `router-ext serve` + Envoy (production bootstrap from "
        f"router_ext.envoy_adapter.envoy_config) + fast upstream ({PODS} pods), "
        f"wrk `-t1 -c{CONCURRENCY}` in "
        f"{CHUNK_S:g} s chunks, POST /v1/chat/completions. Router RSS (VmRSS) sampled every "
        f"{SAMPLE_S:g} s against Envoy's completed-request count; warm-up = the first "
        f"{WARMUP_FRACTION:.0%} of requests; slopes are least squares over the samples after "
        f"warm-up. Load average at start {load_start}, at end {loadavg()}: the machine (2 "
        f"cores) is shared, other engineers' tests and benchmarks ran at the same time, so "
        f"req/s and latency-driven counters are noisy; bytes per request are not.\n\n"
        + summary
        + f'\nRun "{label}", router RSS every ~{step:,} requests:\n\n'
        + md_table(["t s", "requests", "router RSS MB", "Envoy RSS MB", "failed open so far"], rows)
        + "\nEnvoy counters over that run (the first "
        f"{len(ZERO_COUNTERS)} must be 0 with no fault injected):\n\n"
        + md_table(["counter", "meaning", "delta"], ctr)
        + (f"\nFail-open events: {when}.\n" if when else "")
        + f"\n**Target** router RSS after warm-up <= +{GOAL_MB:g} MB over "
        f"{v.total_requests:,} requests: {v.growth_mb:+.1f} MB ({v.slope_b_per_req:.1f} "
        f"B/request) -> {'met' if met else 'NOT met'}.\n\n"
        f"**Target** no fault injected -> ext_proc failure_mode_allowed and router "
        f"health-check failures 0: "
        f"{res.delta(EXTPROC + 'failure_mode_allowed'):.0f} and {res.delta(HC + 'failure'):.0f}"
        f" -> {'met' if zero_ok else 'NOT met'}.\n\n"
        "![router-ext RSS during the soak](../../docs/soak_rss.png)\n"
    )


def run(
    quick: bool = False,
    requests: int | None = None,
    minutes: float | None = None,
    ab: bool = False,
) -> str:
    """Run the soak, write benchmarks/results/soak.md and docs/soak_rss.png, return Markdown."""
    default_n = 60_000 if quick else 1_000_000
    requests = requests or default_n
    cmd = "python -m benchmarks.soak" + (" --quick" if quick else "")
    if minutes:
        cmd += f" --minutes {minutes:g}"
    elif requests != default_n:
        cmd += f" --requests {requests}"
    cmd += " --ab" if ab else ""
    load_start = loadavg()
    machine = machine_markdown()  # now: it records the load average at the start
    runs: list[tuple[str, SoakResult, Verdict]] = []
    res = soak(requests, minutes, RUN_DIR / "soak")
    runs.append((MAIN_LABEL, res, analyse(res)))
    if ab:
        res_ab = soak(requests, minutes, RUN_DIR / "soak-ab", {GRACEFUL_FLAG: False})
        runs.append((AB_LABEL, res_ab, analyse(res_ab)))
    plot(runs, DOCS_DIR / "soak_rss.png")
    md = markdown(runs, cmd, load_start)
    write_result(
        "soak",
        "# Soak: router RSS and Envoy's fail-open counters under load\n\n" + machine + "\n" + md,
    )
    for label, r, v in runs:
        print(f"[{label}] growth {v.growth_mb:+.1f} MB, slope {v.slope_b_per_req:.1f} B/req")
        for k in ZERO_COUNTERS:
            print(f"[{label}] {k} = {r.delta(k):.0f}")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (60,000 requests)")
    ap.add_argument("--requests", type=int, help="requests to complete (default 1,000,000)")
    ap.add_argument("--minutes", type=float, help="run this long instead (e.g. 30 for item 8)")
    ap.add_argument(
        "--ab", action="store_true", help="also run with Envoy's default (resetting) close"
    )
    args = ap.parse_args()
    t0 = time.monotonic()
    print(run(quick=args.quick, requests=args.requests, minutes=args.minutes, ab=args.ab))
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
