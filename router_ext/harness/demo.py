"""`router-ext demo`: simulator + router + a real Envoy on loopback, with live traffic.

Shows what a platform team would see: requests spread over pods by the router's strategy, a
live per-pod table (served, in flight, queue, KV use, prefix-cache hit rate, loaded LoRA
adapters, router state), and on exit a summary with failures and Envoy's retry counts. Fault
flags kill a pod or the router mid-run, or add a cold pod, so failover and cold start can be
watched, not just read about. `--workload` picks the traffic (`router_ext.harness.workloads`);
`--models N` runs N models in the simulated fleet; `--routers N` runs N router replicas
active-active behind the one Envoy (`--kill-router-after` then kills replica 0 only).
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
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from router_ext.config import ConfigError, RouterConfig
from router_ext.fleet.engine_metrics import MetricsParseError, parse_engine_metrics
from router_ext.harness.kube_stack import KubeStack
from router_ext.harness.loadgen import LoadSpec, Result, breakdown, closed_loop, percentile
from router_ext.harness.stack import Stack, StackOptions
from router_ext.harness.workloads import WORKLOADS, Workload, make_workload
from router_ext.routing.profiles import BUILTIN_PROFILES

#: LoRA adapters per model with `--workload multi-model` (served and asked for).
DEMO_ADAPTERS = 2
#: The profile a workload is meant to show, when the router has it; else least-request.
WORKLOAD_STRATEGY = {"shared-prefix": "prefix-aware", "multi-turn": "session"}
FALLBACK_STRATEGY = "least-request"


#: Run length of `demo --json` without --duration.
JSON_DURATION_S = 20.0
#: Timed faults: the argument holding each one's time (seconds into the run) and its action.
FAULTS = (
    ("kill_pod_after", "kill_pod"),
    ("revive_pod_after", "revive_pod"),
    ("kill_router_after", "kill_router"),
    ("restart_router_after", "restart_router"),
    ("add_cold_pod_after", "add_cold_pod"),
)


class DemoError(Exception):
    """A demo flag that cannot be honoured; the message is shown to the user as is."""


def demo_models(n: int) -> list[str]:
    """`sim-model` alone (what a one-model fleet always served), else sim-model-0..n-1."""
    if n < 1:
        raise DemoError("--models must be >= 1")
    return ["sim-model"] if n == 1 else [f"sim-model-{i}" for i in range(n)]


def load_router_overrides(path: str | None) -> dict[str, Any]:
    """The `--router-config` YAML as a mapping (checked as a whole router config)."""
    if path is None:
        return {}
    try:
        raw: Any = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DemoError(f"--router-config {path}: cannot read: {e}") from e
    if not isinstance(raw, dict):
        raise DemoError(f"--router-config {path}: top level must be a mapping")
    return raw


def _routing(overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    routing = overrides.get("routing")
    return routing if isinstance(routing, Mapping) else {}


def known_strategies(overrides: Mapping[str, Any]) -> tuple[str, ...]:
    """Every profile the router will know: its built-ins, then the configured ones."""
    configured = _routing(overrides).get("profiles")
    if not isinstance(configured, Mapping):
        configured = {}
    return (*BUILTIN_PROFILES, *(n for n in configured if n not in BUILTIN_PROFILES))


def resolve_strategy(requested: str | None, workload: str, overrides: Mapping[str, Any]) -> str:
    """The profile to run: the one asked for; else the config's default_strategy; else the
    workload's own profile if the router has it; else least-request. The whole router config
    is checked with it in place, so a bad profile is refused here, with its field named, and
    not as a router that never starts."""
    known = known_strategies(overrides)
    if requested is None:
        configured = _routing(overrides).get("default_strategy")
        wanted = configured or WORKLOAD_STRATEGY.get(workload, FALLBACK_STRATEGY)
        requested = wanted if wanted in known else FALLBACK_STRATEGY
    if requested not in known:
        raise DemoError(f"unknown strategy {requested!r}; known: {', '.join(known)}")
    raw = {**overrides, "routing": {**_routing(overrides), "default_strategy": requested}}
    try:
        RouterConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise DemoError(f"router config: {problems}") from e
    return requested


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=4, help="simulated pods (default 4)")
    p.add_argument(
        "--duration",
        type=float,
        help=f"seconds to run (default: until Ctrl-C; with --json, {JSON_DURATION_S:g})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary at the end, no live table",
    )
    p.add_argument(
        "--strategy",
        help="routing profile: a built-in or one in --router-config (default: prefix-aware for "
        "shared-prefix, session for multi-turn, when the router has them; else least-request)",
    )
    p.add_argument(
        "--workload",
        default="uniform",
        choices=WORKLOADS,
        help="traffic shape (default uniform: short random prompts)",
    )
    p.add_argument(
        "--models",
        type=int,
        default=1,
        metavar="N",
        help="models in the simulated fleet: sim-model, or sim-model-0..N-1 (with "
        f"--workload multi-model also {DEMO_ADAPTERS} LoRA adapters each)",
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument(
        "--router-config",
        metavar="YAML",
        help="router config merged into the demo's (e.g. routing.profiles to try)",
    )
    p.add_argument("--concurrency", type=int, default=12, help="client concurrency (default 12)")
    p.add_argument(
        "--max-tokens",
        type=int,
        help="tokens per response (default 24; the workload's own for shared-prefix and "
        "multi-turn)",
    )
    p.add_argument("--stream", action="store_true", help="streaming (SSE) chat requests")
    p.add_argument("--speeds", help="per-pod speed factors, e.g. 1,1,0.5,0.5")
    p.add_argument("--kill-pod-after", type=float, metavar="S", help="kill one pod after S s")
    p.add_argument("--revive-pod-after", type=float, metavar="S", help="bring it back after S s")
    p.add_argument(
        "--routers",
        type=int,
        default=1,
        metavar="N",
        help="router replicas, each its own process and ext_proc endpoint of the one Envoy "
        "(default 1)",
    )
    p.add_argument(
        "--kill-router-after",
        type=float,
        metavar="S",
        help="SIGKILL the router (with --routers >= 2: replica 0 only; the others carry on)",
    )
    p.add_argument(
        "--restart-router-after",
        type=float,
        metavar="S",
        help="start the router (replica 0) again at S s",
    )
    p.add_argument(
        "--add-cold-pod-after",
        type=float,
        metavar="S",
        help="add a pod whose metrics appear only after --cold-delay s",
    )
    p.add_argument("--cold-delay", type=float, default=10.0, help="metrics delay of that pod")
    p.add_argument(
        "--discovery",
        choices=("file", "kubernetes"),
        default="file",
        help="file: the pods file; kubernetes: a fake Kubernetes API server with the sim pods "
        "as EndpointSlices, the router discovering them from it (list + watch)",
    )
    p.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="show router/Envoy log lines")


@dataclass(frozen=True, slots=True)
class PodReading:
    """What the table shows of one pod, read from the pod's own /metrics."""

    running: float
    waiting: float
    kv_usage: float | None
    prefix_hits: float  # tokens, summed over engines and models
    prefix_queries: float
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()


def _names(value: str) -> tuple[str, ...]:
    return tuple(n for n in (x.strip() for x in value.split(",")) if n)


def read_pod_metrics(text: str) -> PodReading:
    """A pod's load, prefix-cache counters and adapters from its Prometheus text.

    `vllm:lora_requests_info` gets a new series each time its adapters change, valued with the
    time of the change: the series with the largest value is the current one.
    """
    m = parse_engine_metrics(text)
    hits = queries = 0.0
    lora: tuple[float, Mapping[str, str]] | None = None
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "vllm:prefix_cache_hits_total":
                hits += smp.value
            elif smp.name == "vllm:prefix_cache_queries_total":
                queries += smp.value
            elif smp.name == "vllm:lora_requests_info" and (lora is None or smp.value > lora[0]):
                lora = (smp.value, smp.labels)
    labels = lora[1] if lora is not None else {}
    return PodReading(
        running=m.running,
        waiting=m.waiting,
        kv_usage=m.kv_cache_usage,
        prefix_hits=hits,
        prefix_queries=queries,
        running_adapters=_names(labels.get("running_lora_adapters", "")),
        waiting_adapters=_names(labels.get("waiting_lora_adapters", "")),
    )


class PrefixCounters:
    """Per-pod prefix-cache hits and queries accumulated over the run.

    The first reading of a pod present at the start is its baseline; a pod first seen later
    (added, or unreachable at the start) counts from zero, as its counters did. A counter that
    went down means the pod restarted: its new value is all new.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}
        self.hits: defaultdict[str, float] = defaultdict(float)
        self.queries: defaultdict[str, float] = defaultdict(float)

    def baseline(self, pod: str, hits: float, queries: float) -> None:
        self._last[pod] = (hits, queries)

    def update(self, pod: str, hits: float, queries: float) -> None:
        last_h, last_q = self._last.get(pod, (0.0, 0.0))
        if hits < last_h or queries < last_q:
            last_h = last_q = 0.0
        self.hits[pod] += hits - last_h
        self.queries[pod] += queries - last_q
        self._last[pod] = (hits, queries)

    def rate(self, pod: str | None = None) -> float | None:
        """Hits / queries for one pod, or the fleet; None before any query."""
        if pod is None:
            h, q = sum(self.hits.values()), sum(self.queries.values())
        else:
            h, q = self.hits.get(pod, 0.0), self.queries.get(pod, 0.0)
        return h / q if q > 0 else None


class _Demo:
    def __init__(self, args: argparse.Namespace, stack: Stack, models: list[str]) -> None:
        self.args = args
        self.stack = stack
        self.models = models
        self.readings: dict[str, PodReading] = {}
        self.prefix = PrefixCounters()
        # A cancelled poll's thread may still be reading when the summary's final poll runs.
        self._poll_lock = threading.Lock()
        self.results: list[Result] = []
        self.served: Counter[str] = Counter()
        self.failed = 0
        self.events: list[str] = []
        self.t0 = time.monotonic()
        self.killed_pod = ""
        self.routers_killed = 0
        # Per router replica, its last readable counters (a killed replica keeps its last).
        self.router_counts: list[dict[str, float]] = [{} for _ in range(stack.n_routers)]

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
        for flag, what in FAULTS:
            t = getattr(a, flag, None)
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
            self.poll_routers()  # replica 0's last counts, before it goes
            st.kill_router(0)
            self.routers_killed += 1
            if st.n_routers == 1:
                self.event("router killed (SIGKILL): Envoy fails open to its own balancer")
            else:
                self.event(
                    f"router replica 0 of {st.n_routers} killed (SIGKILL): Envoy's health check "
                    "takes it out, the other replicas route"
                )
        elif what == "restart_router":
            st.start_router()
            self.event("router restarted" if st.n_routers == 1 else "router replica 0 restarted")
        elif what == "add_cold_pod":
            name = f"pod-{len(st.pods)}"
            info = st.control(
                "POST", "/pods", {"name": name, "metrics_delay_s": self.args.cold_delay}
            )
            addr = info.get("address", "?") if isinstance(info, dict) else "?"
            st.pods[name] = addr
            if isinstance(st, KubeStack):
                st.register(name, addr)
            self.event(f"added cold pod {name} ({addr}), metrics in {self.args.cold_delay:.0f}s")

    # --- live table --------------------------------------------------------------------
    def _router_text(self) -> str | None:
        """The first live replica's /metrics (replica 0 when there is one router)."""
        for i in range(self.stack.n_routers):
            try:
                return self.stack.router_metrics_of(i)
            except OSError:
                continue
        return None

    def poll_routers(self) -> None:
        """Each replica's decisions and access-log entries, while it answers."""
        for i in range(self.stack.n_routers):
            try:
                text = self.stack.router_metrics_of(i)
            except OSError:
                continue
            self.router_counts[i] = router_counts(text)

    def _pod_states(self) -> dict[str, str]:
        text = self._router_text()
        if text is None:
            return {}
        out: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "router_ext_pod_state":
                for s in fam.samples:
                    if s.value == 1:
                        out[s.labels["pod"]] = s.labels["state"]
        return out

    @staticmethod
    def _read_pod(address: str) -> PodReading | None:
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=0.3) as resp:
                return read_pod_metrics(resp.read().decode())
        except (OSError, ValueError, MetricsParseError):
            return None

    def poll_pods(self, *, baseline: bool = False) -> None:
        """Read every pod's /metrics; the first call (baseline) marks the start of the run."""
        with self._poll_lock:
            readings: dict[str, PodReading] = {}
            for name, addr in list(self.stack.pods.items()):
                r = self._read_pod(addr)
                if r is None:
                    continue
                readings[name] = r
                if baseline:
                    self.prefix.baseline(name, r.prefix_hits, r.prefix_queries)
                else:
                    self.prefix.update(name, r.prefix_hits, r.prefix_queries)
            self.readings = readings

    async def poll(self, stop: asyncio.Event) -> None:
        # In --json mode too: a pod restarted mid-run resets its counters, and only readings
        # taken along the way can tell a reset from a quiet pod.
        while not stop.is_set():
            await asyncio.to_thread(self.poll_pods)
            if self.stack.n_routers > 1:
                await asyncio.to_thread(self.poll_routers)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def table(self) -> str:
        states = self._pod_states()
        total = sum(self.served.values())
        routers = f"{self.stack.n_routers} router replicas, " if self.stack.n_routers > 1 else ""
        lines = [
            f"router-ext demo: {self.args.strategy}, workload {self.args.workload}, "
            f"{len(self.stack.pods)} pods, {routers}{self.args.concurrency} concurrent clients, "
            f"t={time.monotonic() - self.t0:5.1f}s",
            f"{'pod':8} {'address':22} {'state':12} {'served':>7} {'share':>6} "
            f"{'running':>7} {'waiting':>7} {'kv':>5} {'prefix':>6}  adapters",
        ]
        for name, addr in self.stack.pods.items():
            r = self.readings.get(name)
            run = wait = kv = "-"
            adapters = ""
            if r is not None:
                run, wait = f"{r.running:.0f}", f"{r.waiting:.0f}"
                kv = f"{r.kv_usage * 100:4.0f}%" if r.kv_usage is not None else "-"
                adapters = ",".join(r.running_adapters)
                if r.waiting_adapters:
                    adapters += f" (waiting: {','.join(r.waiting_adapters)})"
            hit = self.prefix.rate(name)
            prefix = f"{hit * 100:5.1f}%" if hit is not None else "-"
            n = self.served.get(name, 0)
            share = f"{100 * n / total:5.1f}%" if total else "    -"
            lines.append(
                f"{name:8} {addr:22} {states.get(name, '?'):12} {n:7d} {share:>6} "
                f"{run:>7} {wait:>7} {kv:>5} {prefix:>6}  {adapters or '-'}"
            )
        fleet = self.prefix.rate()
        if fleet is not None:
            lines.append(f"prefix-cache hit rate (fleet, tokens): {fleet * 100:.1f}%")
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
        self.poll_pods()
        self.poll_routers()
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
            "workload": self.args.workload,
            "models": self.models,
            "stream": self.args.stream,
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
            "prefix_cache_hit_rate": _round(self.prefix.rate()),
            "prefix_cache_hit_rate_per_pod": {
                name: _round(self.prefix.rate(name)) for name in sorted(self.prefix.queries)
            },
            # TTFT is the first SSE chunk with --stream, the whole response without it.
            "per_model": breakdown(self.results, lambda r: r.model),
            "errors": dict(errors.most_common(5)),
            "events": self.events,
            "routers": self.stack.n_routers,
            "routers_killed": self.routers_killed,
            # Per replica: decisions it made and access-log entries it received (its last
            # reading for a killed one).
            "per_router": [
                {
                    "replica": i,
                    "alive": i < len(self.stack.routers) and self.stack.routers[i].alive(),
                    "decided": int(c.get("decided", 0)),
                    "access_log_entries": int(c.get("access_log_entries", 0)),
                }
                for i, c in enumerate(self.router_counts)
            ],
        }


def router_counts(text: str) -> dict[str, float]:
    """A router's decisions (every outcome) and access-log entries from its /metrics text."""
    out = {"decided": 0.0, "access_log_entries": 0.0}
    for fam in text_string_to_metric_families(text):
        key = {
            "router_ext_decisions": "decided",
            "router_ext_access_log_entries": "access_log_entries",
        }.get(fam.name)
        if key is not None:
            out[key] += sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return out


def _round(x: float | None) -> float | None:
    return round(x, 4) if x is not None else None


def demo_workload(args: argparse.Namespace, models: Sequence[str]) -> Workload:
    params: dict[str, Any] = {"stream": args.stream}
    if args.workload in ("uniform", "multi-model"):
        params["max_tokens"] = args.max_tokens or 24
    else:
        params["seed"] = args.seed
        if args.max_tokens:
            params["output_tokens"] = args.max_tokens
    if args.workload == "multi-model":
        params["adapters"] = DEMO_ADAPTERS
    return make_workload(args.workload, models=models, **params)


def demo_sim_args(args: argparse.Namespace, models: Sequence[str]) -> list[str]:
    sim_args: list[str] = ["--seed", "7"]
    if args.speeds:
        sim_args += ["--speeds", args.speeds]
    if len(models) > 1:
        sim_args += ["--models", ",".join(models)]
    if args.workload == "multi-model":
        sim_args += ["--adapters", str(DEMO_ADAPTERS)]
    return sim_args


async def _run(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    models = demo_models(args.models)
    demo = _Demo(args, stack, models)
    spec = LoadSpec(url=stack.url, workload=demo_workload(args, models))
    stop = asyncio.Event()
    # Ctrl-C ends the run cleanly: in-flight requests finish, then the summary prints.
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    await asyncio.to_thread(demo.poll_pods, baseline=True)
    tasks = [asyncio.create_task(demo.faults()), asyncio.create_task(demo.poll(stop))]
    if not args.json:
        tasks.append(asyncio.create_task(demo.live(stop)))
    try:
        await closed_loop(
            spec,
            args.concurrency,
            duration_s=args.duration,
            seed=args.seed,
            stop=stop,
            on_result=demo.on_result,
        )
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return demo.summary()


def _check_fault_times(args: argparse.Namespace) -> None:
    """A fault timed at or after the end of the run would silently never happen."""
    if args.duration is None:
        return
    for name, _ in FAULTS:
        t = getattr(args, name, None)
        if t is not None and t >= args.duration:
            flag = "--" + name.replace("_", "-")
            raise DemoError(
                f"{flag} {t:g} is not before the run ends (--duration {args.duration:g})"
            )


def run_demo(args: argparse.Namespace) -> int:
    if args.json and args.duration is None:
        # A script waiting for the one JSON summary would otherwise wait for a Ctrl-C it
        # never sends.
        args.duration = JSON_DURATION_S
    try:
        models = demo_models(args.models)
        overrides = load_router_overrides(args.router_config)
        args.strategy = resolve_strategy(args.strategy, args.workload, overrides)
        demo_workload(args, models)  # bad workload parameters fail before anything starts
        if not 1 <= args.routers <= 16:
            raise DemoError("--routers must be between 1 and 16")
        _check_fault_times(args)
    except (DemoError, ConfigError, ValueError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="router-ext-"))
    stack_class = KubeStack if getattr(args, "discovery", "file") == "kubernetes" else Stack
    stack = stack_class(
        workdir,
        StackOptions(
            pods=args.pods,
            strategy=args.strategy,
            sim_args=demo_sim_args(args, models),
            router_overrides=overrides,
            router_log_level="info" if args.verbose else "warning",
            routers=args.routers,
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
