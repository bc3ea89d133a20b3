"""`router-ext demo`: simulator + router + a real Envoy on loopback, with live traffic.

Shows what a platform team would see: requests spread over pods by the router's strategy, a
live per-pod table (served, in flight, queue, KV use, router state), and on exit a summary
with failures and Envoy's retry counts. Fault flags kill a pod or the router mid-run, or add
a cold pod, so failover and cold start can be watched, not just read about.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from router_ext.config import STRATEGY_NAMES
from router_ext.fleet.engine_metrics import MetricsParseError, parse_engine_metrics
from router_ext.harness.loadgen import LoadSpec, Result, closed_loop, percentile
from router_ext.harness.stack import Stack, StackOptions


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=4, help="simulated pods (default 4)")
    p.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print one JSON summary, no live table")
    p.add_argument("--strategy", default="least-request", choices=STRATEGY_NAMES)
    p.add_argument("--concurrency", type=int, default=12, help="client concurrency (default 12)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per response")
    p.add_argument("--stream", action="store_true", help="streaming (SSE) chat requests")
    p.add_argument("--speeds", help="per-pod speed factors, e.g. 1,1,0.5,0.5")
    p.add_argument("--kill-pod-after", type=float, metavar="S", help="kill one pod after S s")
    p.add_argument("--revive-pod-after", type=float, metavar="S", help="bring it back after S s")
    p.add_argument("--kill-router-after", type=float, metavar="S", help="SIGKILL the router")
    p.add_argument(
        "--restart-router-after", type=float, metavar="S", help="start the router again at S s"
    )
    p.add_argument(
        "--add-cold-pod-after",
        type=float,
        metavar="S",
        help="add a pod whose metrics appear only after --cold-delay s",
    )
    p.add_argument("--cold-delay", type=float, default=10.0, help="metrics delay of that pod")
    p.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="show router/Envoy log lines")


class _Demo:
    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.results: list[Result] = []
        self.served: Counter[str] = Counter()
        self.failed = 0
        self.events: list[str] = []
        self.t0 = time.monotonic()
        self.killed_pod = ""

    def on_result(self, r: Result) -> None:
        self.results.append(r)
        if r.ok:
            self.served[r.served_by] += 1
        else:
            self.failed += 1

    def event(self, msg: str) -> None:
        self.events.append(f"[{time.monotonic() - self.t0:5.1f}s] {msg}")

    # --- faults ------------------------------------------------------------------------
    async def faults(self) -> None:
        a = self.args
        plan: list[tuple[float, str]] = []
        for t, what in (
            (a.kill_pod_after, "kill_pod"),
            (a.revive_pod_after, "revive_pod"),
            (a.kill_router_after, "kill_router"),
            (a.restart_router_after, "restart_router"),
            (a.add_cold_pod_after, "add_cold_pod"),
        ):
            if t is not None:
                plan.append((t, what))
        for t, what in sorted(plan):
            await asyncio.sleep(max(0.0, t - (time.monotonic() - self.t0)))
            await asyncio.to_thread(self._do, what)

    def _do(self, what: str) -> None:
        st = self.stack
        if what == "kill_pod":
            # The pod the router favours right now: the one that served most so far.
            name = self.served.most_common(1)[0][0] if self.served else next(iter(st.pods))
            st.control("POST", f"/pods/{name}/kill")
            self.killed_pod = name
            self.event(f"killed {name} ({st.pods.get(name, '?')})")
        elif what == "revive_pod" and self.killed_pod:
            st.control("POST", f"/pods/{self.killed_pod}/revive")
            self.event(f"revived {self.killed_pod}")
        elif what == "kill_router" and st.router is not None:
            st.router.signal(9)
            self.event("router killed (SIGKILL): Envoy fails open to its own balancer")
        elif what == "restart_router":
            st.start_router()
            self.event("router restarted")
        elif what == "add_cold_pod":
            name = f"pod-{len(st.pods)}"
            info = st.control(
                "POST", "/pods", {"name": name, "metrics_delay_s": self.args.cold_delay}
            )
            addr = info.get("address", "?") if isinstance(info, dict) else "?"
            st.pods[name] = addr
            self.event(f"added cold pod {name} ({addr}), metrics in {self.args.cold_delay:.0f}s")

    # --- live table --------------------------------------------------------------------
    def _pod_states(self) -> dict[str, str]:
        try:
            text = self.stack.router_metrics()
        except OSError:
            return {}
        out: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "router_ext_pod_state":
                for s in fam.samples:
                    if s.value == 1:
                        out[s.labels["pod"]] = s.labels["state"]
        return out

    @staticmethod
    def _pod_metrics(address: str) -> tuple[str, str, str]:
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=0.3) as resp:
                m = parse_engine_metrics(resp.read().decode())
        except (OSError, MetricsParseError):
            return "-", "-", "-"
        kv = f"{m.kv_cache_usage * 100:4.0f}%" if m.kv_cache_usage is not None else "-"
        return f"{m.running:.0f}", f"{m.waiting:.0f}", kv

    def table(self) -> str:
        states = self._pod_states()
        total = sum(self.served.values())
        lines = [
            f"router-ext demo: {self.args.strategy}, {len(self.stack.pods)} pods, "
            f"{self.args.concurrency} concurrent clients, t={time.monotonic() - self.t0:5.1f}s",
            f"{'pod':8} {'address':22} {'state':12} {'served':>7} {'share':>6} "
            f"{'running':>7} {'waiting':>7} {'kv':>5}",
        ]
        for name, addr in self.stack.pods.items():
            run, wait, kv = self._pod_metrics(addr)
            n = self.served.get(name, 0)
            share = f"{100 * n / total:5.1f}%" if total else "    -"
            lines.append(
                f"{name:8} {addr:22} {states.get(name, '?'):12} {n:7d} {share:>6} "
                f"{run:>7} {wait:>7} {kv:>5}"
            )
        lines.append(f"requests: {len(self.results)} ok: {total} failed: {self.failed}")
        lines.extend(self.events[-5:])
        return "\n".join(lines)

    async def live(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            text = await asyncio.to_thread(self.table)
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n(Ctrl-C to stop)\n")
            sys.stdout.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    # --- summary -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        lat = [r.latency_s for r in self.results if r.ok]
        stats: dict[str, float] = {}
        try:
            s = self.stack.envoy.stats("cluster.pods.")
            stats.update(s)
            stats.update(self.stack.envoy.stats("http.ingress.ext_proc."))
        except Exception:  # Envoy gone: the summary still reports what the clients saw
            pass
        errors = Counter(r.error or f"HTTP {r.status}" for r in self.results if not r.ok)
        return {
            "requests_total": len(self.results),
            "requests_ok": sum(1 for r in self.results if r.ok),
            "requests_failed": sum(1 for r in self.results if not r.ok),
            "per_pod": dict(sorted(self.served.items())),
            "strategy": self.args.strategy,
            "strategies_used": dict(Counter(r.strategy for r in self.results if r.ok)),
            "latency_p50_ms": round(percentile(lat, 50) * 1000, 2) if lat else None,
            "latency_p99_ms": round(percentile(lat, 99) * 1000, 2) if lat else None,
            "envoy_retries": int(stats.get("cluster.pods.upstream_rq_retry", 0)),
            "envoy_retry_success": int(stats.get("cluster.pods.upstream_rq_retry_success", 0)),
            "envoy_retry_overflow": int(stats.get("cluster.pods.upstream_rq_retry_overflow", 0)),
            "envoy_outlier_ejections": int(
                stats.get("cluster.pods.outlier_detection.ejections_enforced_total", 0)
            ),
            "ext_proc_failure_mode_allowed": int(
                stats.get("http.ingress.ext_proc.failure_mode_allowed", 0)
            ),
            "errors": dict(errors.most_common(5)),
            "events": self.events,
        }


async def _run(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    demo = _Demo(args, stack)
    spec = LoadSpec(
        url=stack.url + "/v1/chat/completions",
        max_tokens=args.max_tokens,
        stream=args.stream,
    )
    stop = asyncio.Event()
    # Ctrl-C ends the run cleanly: in-flight requests finish, then the summary prints.
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    tasks = [asyncio.create_task(demo.faults())]
    if not args.json:
        tasks.append(asyncio.create_task(demo.live(stop)))
    try:
        await closed_loop(
            spec,
            args.concurrency,
            duration_s=args.duration,
            stop=stop,
            on_result=demo.on_result,
        )
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return demo.summary()


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="router-ext-"))
    sim_args: list[str] = ["--seed", "7"]
    if args.speeds:
        sim_args += ["--speeds", args.speeds]
    stack = Stack(
        workdir,
        StackOptions(
            pods=args.pods,
            strategy=args.strategy,
            sim_args=sim_args,
            router_log_level="info" if args.verbose else "warning",
        ),
    )
    if not args.json:
        print(f"starting simulator, router-ext and Envoy (logs in {workdir}) ...", flush=True)
    try:
        stack.start()
        summary = asyncio.run(_run(args, stack))
    except KeyboardInterrupt:
        summary = {}
    finally:
        stack.stop()
    if args.json:
        print(json.dumps(summary))
    elif summary:
        print("\nsummary:")
        for k, v in summary.items():
            print(f"  {k}: {v}")
        print(f"logs and configs: {workdir}")
    if not args.workdir and args.json:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary else 130
