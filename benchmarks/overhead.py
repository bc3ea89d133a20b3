"""What router-ext adds to a request: Envoy alone vs a minimal Python ext_proc vs router-ext.

    python -m benchmarks.overhead [--quick]

Configurations, all in front of the same fast upstream (benchmarks/fast_upstream.py: an Envoy
direct_response on 16 loopback addresses, so the upstream is never the bottleneck):

- (a) Envoy alone: router-ext's own rendered bootstrap
  (router_ext.envoy_adapter.envoy_config) with the
  ext_proc filter, the gRPC access log and the router cluster removed; the pods cluster's
  fallback policy (least request) picks the pod.
- (b) Envoy + benchmarks/minimal_extproc.py: answers a fixed x-target-pod; the floor for any
  Python ext_proc. The gRPC access log is removed too (it has no sink there).
- (c) Envoy + a real `router-ext serve` process, the production bootstrap unchanged (ext_proc
  + gRPC access log feedback), 16 pods in the snapshot scraped every 0.5 s, least-request.
- (d) vllm-router (Rust proxy, its round_robin), if benchmarks/peer_vllm_router.py can install
  it: a peer proxy compared to (a).

All processes run for the whole benchmark; wrk runs are interleaved (a, b, c, d, a, b, ...,
the order rotated every round) at concurrency 1 and 32, so machine noise (this 2-core box is
shared) lands on every configuration alike. The tables give medians over rounds; the ratios
are computed per round and their median reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    DOCS_DIR,
    RUN_DIR,
    WRK_POST_LUA,
    BenchError,
    Child,
    WrkResult,
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
from benchmarks.peer_vllm_router import PeerUnavailable, start_peer
from router_ext.config import RouterConfig, load_config
from router_ext.envoy_adapter.auth import load_or_create_token
from router_ext.envoy_adapter.envoy_config import (
    CLUSTER_PODS,
    CLUSTER_ROUTER,
    render_bootstrap,
    write_eds_file,
)
from router_ext.fleet.discovery import parse_pods
from router_ext.harness.envoy_proc import EnvoyProcess, free_port

PODS = 16
CONCURRENCIES = (1, 32)
LABELS = {
    "a": "(a) Envoy alone",
    "b": "(b) Envoy + minimal Python ext_proc",
    "c": "(c) Envoy + router-ext (16 pods, least-request)",
    "d": "(d) vllm-router (Rust proxy, round_robin)",
    "e": "(e) = (c) without the gRPC access log (diagnostic)",
    "f": "(f) = (c) with a patched router_ext (A/B of a proposed change)",
}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Target:
    key: str
    url: str
    cpu_pid: int | None = None  # the Python process whose CPU per request we report
    results: dict[int, list[WrkResult]] = field(default_factory=dict)
    cpu_us: dict[int, list[float]] = field(default_factory=dict)


def _router_cfg(
    workdir: Path,
    pods_file: Path,
    router_port: int,
    legacy: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """`legacy`: a config the pre-framework router (the (f) copy) accepts: no admin listener of
    its own (its admin API shared the gRPC port) and no auth section (it ignores the token).
    `extra`: deep-merged on top (an A/B of a configuration change)."""
    router: dict[str, Any] = {"grpc": {"port": router_port}, "metrics": {"port": free_port()}}
    if not legacy:
        router["admin"] = {"port": free_port()}  # several routers run at once here
    raw = {
        "router": router,
        "discovery": {"pods_file": str(pods_file)},
        "routing": {"default_strategy": "least-request"},
        "envoy": {"listener": {"port": free_port()}, "admin": {"port": free_port()}},
    }
    _merge(raw, extra or {})
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "router-ext.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _cli_module(tree: Path | None) -> str:
    """The CLI module of the router under test: a copy from before the layout move
    (ab97480 and older) has it at router_ext/cli.py."""
    if tree is not None and not (tree / "router_ext" / "app" / "cli.py").exists():
        return "router_ext.cli"
    return "router_ext.app.cli"


def _strip_extproc(boot: dict[str, Any], *, drop_filter: bool) -> dict[str, Any]:
    """Remove the gRPC access log (and, for (a), the ext_proc filter and router cluster)."""
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    tc = hcm["typed_config"]
    tc["access_log"] = [
        a for a in tc["access_log"] if a["name"] != "envoy.access_loggers.http_grpc"
    ]
    if drop_filter:
        tc["http_filters"] = [
            f for f in tc["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
        ]
        clusters = boot["static_resources"]["clusters"]
        boot["static_resources"]["clusters"] = [c for c in clusters if c["name"] != CLUSTER_ROUTER]
    return boot


def _envoy_for(cfg: RouterConfig, boot: dict[str, Any], workdir: Path) -> EnvoyProcess:
    pods = parse_pods(cfg.pods_file.read_text(), str(cfg.pods_file))
    write_eds_file(cfg, pods)
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    env = EnvoyProcess()
    env.start(path, workdir / "envoy.log", concurrency=2, log_level="warning")
    return env


def _pods_healthy(env: EnvoyProcess, with_router: bool) -> bool:
    hosts = env.cluster_hosts(CLUSTER_PODS)
    ok = len(hosts) == PODS and all(h.get("health_flags") == "healthy" for h in hosts.values())
    if with_router:
        routers = env.cluster_hosts(CLUSTER_ROUTER)
        ok = ok and all(h.get("health_flags") == "healthy" for h in routers.values())
    return ok


def _probe(url: str) -> dict[str, str]:
    req = urllib.request.Request(
        url,
        data=json.dumps({"model": "sim-model", "messages": []}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with _NO_PROXY.open(req, timeout=5) as r:
        if r.status != 200:
            raise BenchError(f"{url} answered {r.status}")
        return {k.lower(): v for k, v in r.headers.items()}


def run(
    quick: bool = False,
    configs: Sequence[str] = ("a", "b", "c", "d"),
    rounds: int | None = None,
    duration_s: float | None = None,
    ab_router: Path | None = None,
    ab_config: dict[str, Any] | None = None,
) -> str:
    """Run the benchmark, write benchmarks/results/overhead.md, return its Markdown body.

    `ab_router`: a directory holding a patched copy of the `router_ext` package; adds
    configuration (f), the same as (c) but running that copy, interleaved with the others,
    so a proposed router change can be measured against the current code in one run.
    `ab_config`: router config merged into (f)'s (with the current code when `ab_router` is
    not given): an A/B of a configuration change.
    """
    if (ab_router is not None or ab_config) and "f" not in configs:
        configs = (*configs, "f")
    rounds = rounds or (2 if quick else 3)
    duration_s = duration_s or (3.0 if quick else 10.0)
    workdir = RUN_DIR / "overhead"
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "post.lua"
    lua.write_text(WRK_POST_LUA)
    load_start = loadavg()
    port = free_port()
    upstream = FastUpstream(workdir / "upstream", pod_hosts(PODS), port, free_port())
    pods_file = workdir / "pods.yaml"
    pods_file.write_text(
        yaml.safe_dump(
            {"pods": [{"address": a, "name": f"pod-{i}"} for i, a in enumerate(upstream.addresses)]}
        )
    )
    envoys: list[EnvoyProcess] = []
    routed_by: dict[str, EnvoyProcess] = {}
    children: list[Child] = []
    targets: list[Target] = []
    notes: list[str] = []
    try:
        upstream.start()
        for key in configs:
            sub = workdir / key
            if key in ("a", "b", "c", "e", "f"):
                rport = free_port()
                legacy = key == "f" and ab_router is not None and not ab_config
                extra = ab_config if key == "f" else None
                cfg = load_config(_router_cfg(sub, pods_file, rport, legacy=legacy, extra=extra))
                # Envoy must carry the router's token, or every stream is refused and the
                # benchmark would measure failing open (the probe below would catch it).
                boot = render_bootstrap(cfg, load_or_create_token(cfg.token_file))
                pid: int | None = None
                if key == "a":
                    boot = _strip_extproc(boot, drop_filter=True)
                elif key == "b":
                    boot = _strip_extproc(boot, drop_filter=False)
                    ch = Child(
                        "minimal-extproc",
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.minimal_extproc",
                            "--port",
                            str(rport),
                            "--target",
                            upstream.addresses[0],
                        ],
                        sub / "extproc.log",
                    )
                    children.append(ch)
                    pid = ch.pid
                else:
                    if key == "e":
                        boot = _strip_extproc(boot, drop_filter=False)
                    ch = Child(
                        f"router-ext-{key}",
                        [
                            sys.executable,
                            "-m",
                            _cli_module(ab_router if key == "f" else None),
                            "serve",
                            "--config",
                            str(sub / "router-ext.yaml"),
                            "--log-level",
                            "warning",
                        ],
                        sub / "router.log",
                        # python -m puts the cwd first on sys.path: (f) imports the copy.
                        cwd=ab_router if key == "f" else None,
                    )
                    children.append(ch)
                    pid = ch.pid
                env = _envoy_for(cfg, boot, sub)
                envoys.append(env)
                routed_by[key] = env
                env.wait_ready(20)
                wait_until(
                    lambda env=env, key=key: _pods_healthy(env, key != "a"),
                    30,
                    f"Envoy {key}: 16 healthy pods",
                )
                lst = cfg.envoy.listener
                url = f"http://{lst.host}:{lst.port}/v1/chat/completions"
                targets.append(Target(key, url, pid))
            else:
                dport = free_port()
                try:
                    ch = start_peer(
                        upstream.addresses, "round_robin", dport, free_port(), sub / "peer.log"
                    )
                except PeerUnavailable as e:
                    notes.append(f"(d) vllm-router not measured: {e}")
                    continue
                children.append(ch)
                targets.append(Target(key, f"http://127.0.0.1:{dport}/v1/chat/completions"))
        # Sanity: each path really answers 200, and (c) really routed with least-request.
        for t in targets:
            h = _probe(t.url)
            if t.key in ("c", "e", "f") and h.get("x-routing-strategy") != "least-request":
                raise BenchError(f"(c) did not route through router-ext: headers {h}")
            if t.key == "b" and h.get("x-routed-to") != upstream.addresses[0]:
                raise BenchError(f"(b) did not honour x-target-pod: headers {h}")
        for t in targets:  # warm-up: connections, Envoy's and Python's caches
            run_wrk(t.url, 32, 1.0, lua)
        for r in range(rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for conc in CONCURRENCIES:
                for t in order:
                    c0 = cpu_seconds(t.cpu_pid) if t.cpu_pid else 0.0
                    res = run_wrk(t.url, conc, duration_s, lua)
                    t.results.setdefault(conc, []).append(res)
                    if t.cpu_pid:
                        used = cpu_seconds(t.cpu_pid) - c0
                        t.cpu_us.setdefault(conc, []).append(used / max(1, res.requests) * 1e6)
                    print(
                        f"round {r + 1} c={conc:<2} {t.key}: {res.rps:8.0f} req/s "
                        f"p50 {res.p50_ms:.3f} ms p99 {res.p99_ms:.3f} ms errors {res.errors}",
                        flush=True,
                    )
        # A cell in which requests failed open measured Envoy's fallback, not the router.
        for key, env in routed_by.items():
            if key in ("c", "e", "f"):
                stat = "http.ingress.ext_proc.failure_mode_allowed"
                n = float(env.stats(stat).get(stat, 0))
                if n:
                    raise BenchError(f"({key}): {n:.0f} requests failed open during the run")
    finally:
        for env in envoys:
            env.stop()
        for ch in children:
            ch.stop()
        upstream.stop()
    md = _markdown(targets, rounds, duration_s, load_start, notes)
    if set(configs) >= {"a", "b", "c"}:
        _plot(targets)
        md += "\n![Overhead](../../docs/overhead.png)\n"
        write_result("overhead", "# Overhead: what the ext_proc path adds\n\n" + md)
    return md


def _plot(targets: list[Target]) -> None:
    """Two panels: req/s at concurrency 32, p50 latency at concurrency 1 (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [t.key for t in targets]
    rps = [median([x.rps for x in t.results.get(32, [])]) for t in targets]
    p50 = [median([x.p50_ms for x in t.results.get(1, [])]) for t in targets]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860"][: len(keys)]
    ax1.bar(keys, rps, color=colors)
    ax1.set_title("throughput, 32 connections (req/s)")
    ax2.bar(keys, p50, color=colors)
    ax2.set_title("p50 latency, 1 connection (ms)")
    for ax in (ax1, ax2):
        ax.grid(True, axis="y", alpha=0.3)
    fig.text(
        0.5,
        0.01,
        "  ".join(f"{k}: {LABELS[k].split(') ', 1)[1]}" for k in keys),
        ha="center",
        fontsize=6.5,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_DIR / "overhead.png")
    plt.close(fig)


def _markdown(
    targets: list[Target], rounds: int, duration_s: float, load_start: str, notes: list[str]
) -> str:
    by = {t.key: t for t in targets}
    rows = []
    for conc in CONCURRENCIES:
        for t in targets:
            rs = t.results.get(conc, [])
            cpu = median(t.cpu_us.get(conc, [])) if t.cpu_us.get(conc) else None
            rows.append(
                [
                    conc,
                    LABELS[t.key],
                    f"{median([x.rps for x in rs]):,.0f}",
                    f"{median([x.p50_ms for x in rs]):.3f}",
                    f"{median([x.p99_ms for x in rs]):.3f}",
                    sum(x.errors for x in rs),
                    f"{cpu:.0f}" if cpu is not None else "-",
                ]
            )
    out = [
        f"wrk `-t1 -c{{1,32}} -d{duration_s:g}s --latency`, POST /v1/chat/completions; "
        f"{rounds} interleaved rounds; medians over rounds. Load average at start "
        f"{load_start}, at end {loadavg()}.\n",
        md_table(
            [
                "conc.",
                "configuration",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "ext_proc CPU µs/req",
            ],
            rows,
        ),
    ]
    ratio_rows = []

    def per_round(key_x: str, key_y: str, conc: int, attr: str) -> list[float]:
        xs, ys = by[key_x].results.get(conc, []), by[key_y].results.get(conc, [])
        return [getattr(x, attr) / getattr(y, attr) for x, y in zip(xs, ys, strict=False)]

    for conc in CONCURRENCIES:
        for x, y in (
            ("c", "b"),
            ("c", "a"),
            ("b", "a"),
            ("e", "b"),
            ("f", "b"),
            ("f", "c"),
            ("d", "a"),
        ):
            if x in by and y in by:
                ratio_rows.append([conc, f"{x}/{y}", f"{median(per_round(x, y, conc, 'rps')):.2f}"])
    if ratio_rows:
        out.append(
            "\nThroughput ratios (median of per-round ratios):\n\n"
            + md_table(["conc.", "ratio", "req/s ratio"], ratio_rows)
        )
    if "a" in by:
        added = []
        for k in ("b", "c", "e", "f", "d"):
            if k in by:
                diffs = [
                    x.p50_ms - y.p50_ms
                    for x, y in zip(
                        by[k].results.get(1, []), by["a"].results.get(1, []), strict=False
                    )
                ]
                added.append([f"{k} - a", f"{median(diffs):.3f}"])
        out.append(
            "\nAdded p50 latency over Envoy alone at concurrency 1 (median of per-round "
            "differences):\n\n" + md_table(["", "added p50 ms"], added)
        )
    if {"a", "b", "c"} <= set(by):
        cb = {c: median(per_round("c", "b", c, "rps")) for c in CONCURRENCIES}
        worst = min(cb.values())
        added_c = median(
            [
                x.p50_ms - y.p50_ms
                for x, y in zip(
                    by["c"].results.get(1, []), by["a"].results.get(1, []), strict=False
                )
            ]
        )
        out.append(
            "\n**Target** throughput of (c) >= 85% of (b): c/b = "
            + ", ".join(f"{v:.2f} at concurrency {c}" for c, v in cb.items())
            + f" -> {'met' if worst >= 0.85 else 'NOT met'}.\n\n"
            f"**Target** added p50 of (c) over (a) at concurrency 1 <= 1 ms: {added_c:.3f} ms -> "
            f"{'met' if added_c <= 1.0 else 'NOT met'}.\n"
        )
    out.append(
        "\n`ext_proc CPU µs/req`: CPU time of the Python ext_proc process during the run "
        "divided by requests served (for (c) this includes its 0.5 s scrape rounds of 16 "
        "pods and the gRPC access-log entries it receives).\n"
    )
    out += [f"\nNote: {n}\n" for n in notes]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    ap.add_argument("--no-peer", action="store_true", help="skip (d) vllm-router")
    ap.add_argument(
        "--ab-router",
        type=Path,
        metavar="DIR",
        help="also run (f): router-ext from DIR/router_ext (a patched copy), interleaved",
    )
    ap.add_argument(
        "--ab-config",
        metavar="YAML",
        help="also run (f) with this router config merged in, e.g. "
        "'{envoy: {model_from_body: false}}' (with --ab-router: that copy with it)",
    )
    ap.add_argument(
        "--configs",
        metavar="KEYS",
        help="only these configurations, e.g. 'c' for an A/B of (c) against (f) alone "
        "(results then go to stdout only, not to benchmarks/results/overhead.md)",
    )
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    ap.add_argument("--duration", type=float, help="seconds per wrk cell (default 10)")
    args = ap.parse_args()
    configs: tuple[str, ...] = ("a", "b", "c", "e") if args.no_peer else ("a", "b", "c", "e", "d")
    if args.configs:
        configs = tuple(args.configs)
    t0 = time.monotonic()
    ab_config = yaml.safe_load(args.ab_config) if args.ab_config else None
    md = run(
        quick=args.quick,
        configs=configs,
        ab_router=args.ab_router,
        ab_config=ab_config,
        rounds=args.rounds,
        duration_s=args.duration,
    )
    print(machine_markdown())
    print(md)
    print(f"took {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
