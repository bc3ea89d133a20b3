"""What reading the body costs: the body-reading `prefix-aware` profile vs header-only.

    python -m benchmarks.body_cost [--quick]

One Envoy + one `router-ext serve` (the production bootstrap, 16 pods) in front of the fast
upstream of benchmarks/overhead.py (an Envoy direct_response, never the bottleneck). Each wrk
run POSTs one JSON chat body of 1 KB, 16 KB or 128 KB, asking per request with
`x-routing-strategy-request` for `least-request` (the router answers from the headers; the
body never leaves Envoy) or `prefix-aware` (Envoy buffers the body and sends it to the router,
which parses the prompt, hashes its blocks and answers in the body phase). Same router, same
Envoy, same run; runs interleaved (order rotated every round) at concurrency 1 (added p50) and
16 (throughput ratio), so machine noise lands on both alike. Ratios are per round, medians
reported. Goals (issue 11): >= 0.85x throughput at 16 KB, >= 0.7x at 128 KB.

It refuses to report a number that is not about the body path: before and after the runs it
reads `router_ext_body_reads_total` on the router's /metrics and requires one body read per
prefix-aware request and none for least-request (BenchError otherwise, also when the counter
does not exist), and no request may fail open.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    RUN_DIR,
    BenchError,
    Child,
    WrkResult,
    cpu_seconds,
    loadavg,
    machine_markdown,
    md_table,
    median,
    run_main,
    run_wrk,
    wait_until,
    write_result,
)
from benchmarks.fast_upstream import SERVED_MODEL, FastUpstream, pod_hosts
from benchmarks.overhead import PODS, _envoy_for, _pods_healthy
from router_ext.config import STRATEGY_REQUEST_HEADER, STRATEGY_USED_HEADER, load_config
from router_ext.envoy_adapter.auth import load_or_create_token
from router_ext.envoy_adapter.envoy_config import render_bootstrap
from router_ext.harness.envoy_proc import EnvoyProcess, free_port
from router_ext.harness.workloads import generated_text

SIZES = (1024, 16 * 1024, 128 * 1024)
CONCURRENCIES = (1, 16)
HEADER_ONLY = "least-request"
BODY = "prefix-aware"
PROFILES = (HEADER_ONLY, BODY)
GOALS = {16 * 1024: 0.85, 128 * 1024: 0.7}
BODY_READS = "router_ext_body_reads_total"
BODY_SKIPPED = "router_ext_body_skipped_total"
FAIL_OPEN_STAT = "http.ingress.ext_proc.failure_mode_allowed"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _served_model() -> str:
    """The model the fast upstream's pods report: the router routes only requests for a
    model some pod serves."""
    return SERVED_MODEL


MODEL = _served_model()


@dataclass
class Target:
    size: int
    profile: str
    lua: Path
    results: dict[int, list[WrkResult]] = field(default_factory=dict)
    cpu_us: dict[int, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.size // 1024} KB {self.profile}"


def chat_body(size: int) -> bytes:
    """A chat request of exactly `size` bytes: a long system prompt of pseudo-words."""

    def encode(text: str) -> bytes:
        return json.dumps(
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": text},
                    {"role": "user", "content": "What does the document say?"},
                ],
                "max_tokens": 16,
            }
        ).encode()

    overhead = len(encode(""))
    if size <= overhead:
        raise ValueError(f"body size {size} below the JSON envelope ({overhead} bytes)")
    body = encode(generated_text(random.Random(size), size - overhead))
    assert len(body) == size, (len(body), size)
    return body


def wrk_lua(body_file: Path, profile: str) -> str:
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["{STRATEGY_REQUEST_HEADER}"] = "{profile}"\n'
        f'local f = assert(io.open("{body_file}", "rb"))\n'
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
    )


def counters(metrics_text: str) -> tuple[float | None, dict[str, float]]:
    """(body reads, skipped by reason) from the router's /metrics; reads None if absent."""
    reads: float | None = None
    skipped: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name == BODY_READS:
                reads = (reads or 0.0) + s.value
            elif s.name == BODY_SKIPPED:
                reason = s.labels.get("reason", "")
                skipped[reason] = skipped.get(reason, 0.0) + s.value
    return reads, skipped


def _router_cfg(workdir: Path, pods_file: Path) -> Path:
    raw: dict[str, Any] = {
        "router": {
            "grpc": {"port": free_port()},
            "metrics": {"port": free_port()},
            "admin": {"port": free_port()},
        },
        "discovery": {"pods_file": str(pods_file)},
        "routing": {"default_strategy": HEADER_ONLY, "client_selectable": list(PROFILES)},
        "envoy": {"listener": {"port": free_port()}, "admin": {"port": free_port()}},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "router-ext.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _get(url: str) -> str:
    with _NO_PROXY.open(url, timeout=5) as r:
        text: str = r.read().decode()
        return text


def _post(url: str, body: bytes, profile: str) -> dict[str, str]:
    req = urllib.request.Request(
        url,
        data=body,
        headers={"content-type": "application/json", STRATEGY_REQUEST_HEADER: profile},
        method="POST",
    )
    with _NO_PROXY.open(req, timeout=5) as r:
        if r.status != 200:
            raise BenchError(f"{url} answered {r.status} for {profile}")
        return {k.lower(): v for k, v in r.headers.items()}


def _body_reads(metrics_url: str) -> float:
    reads, _ = counters(_get(metrics_url))
    if reads is None:
        raise BenchError(
            f"{BODY_READS} is not on the router's /metrics: this router does not read bodies "
            "(the body path has not landed), so there is no body cost to report"
        )
    return reads


def _wait_reads(metrics_url: str, at_least: float, timeout: float = 5.0) -> float:
    """The body-read counter once it reaches `at_least` (the exporter may lag the requests),
    or its value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        reads = _body_reads(metrics_url)
        if reads >= at_least or time.monotonic() >= deadline:
            return reads
        time.sleep(0.05)


def _probe(url: str, metrics_url: str, bodies: dict[int, bytes]) -> None:
    """Each (size, profile) answers 200 with its own strategy; only prefix-aware reads."""
    r0 = _body_reads(metrics_url)
    for size, body in bodies.items():
        for profile in PROFILES:
            h = _post(url, body, profile)
            used = h.get(STRATEGY_USED_HEADER, "")
            if used != profile:
                raise BenchError(f"{size} B {profile}: answered by strategy {used!r} ({h})")
    delta = _wait_reads(metrics_url, r0 + len(bodies)) - r0
    if delta != len(bodies):
        _, skipped = counters(_get(metrics_url))
        raise BenchError(
            f"{len(bodies)} {BODY} and {len(bodies)} {HEADER_ONLY} requests moved {BODY_READS} "
            f"by {delta:g}, not {len(bodies)} ({BODY_SKIPPED}: {skipped}): the router did not "
            "read exactly the bodies of the body-reading profile"
        )


def run(quick: bool = False, rounds: int | None = None, duration_s: float | None = None) -> str:
    rounds = rounds or (1 if quick else 3)
    duration_s = duration_s or (2.0 if quick else 8.0)
    workdir = RUN_DIR / "body_cost"
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    bodies = {s: chat_body(s) for s in SIZES}
    targets: list[Target] = []
    for s, body in bodies.items():
        f = workdir / f"body-{s}.json"
        f.write_bytes(body)
        for p in PROFILES:
            lua = workdir / f"post-{s}-{p}.lua"
            lua.write_text(wrk_lua(f, p))
            targets.append(Target(s, p, lua))
    upstream = FastUpstream(workdir / "upstream", pod_hosts(PODS), free_port(), free_port())
    pods_file = workdir / "pods.yaml"
    env: EnvoyProcess | None = None
    router: Child | None = None
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
        cfg = load_config(_router_cfg(workdir, pods_file))
        boot = render_bootstrap(cfg, load_or_create_token(cfg.token_file))
        router = Child(
            "router-ext",
            [
                sys.executable, "-m", "router_ext.app.cli", "serve",
                "--config", str(workdir / "router-ext.yaml"), "--log-level", "warning",
            ],
            workdir / "router.log",
        )  # fmt: skip
        env = _envoy_for(cfg, boot, workdir)
        env.wait_ready(20)
        wait_until(lambda: _pods_healthy(env, True), 30, "Envoy: 16 healthy pods and the router")
        lst, m = cfg.envoy.listener, cfg.router.metrics
        url = f"http://{lst.host}:{lst.port}/v1/chat/completions"
        metrics_url = f"http://{m.host}:{m.port}/metrics"
        _probe(url, metrics_url, bodies)
        for t in targets:  # warm-up: connections, Envoy's and Python's caches
            run_wrk(url, 16, 1.0, t.lua)
        reads0 = _body_reads(metrics_url)
        sent_body = 0
        for r in range(rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for conc in CONCURRENCIES:
                for t in order:
                    c0 = cpu_seconds(router.pid)
                    res = run_wrk(url, conc, duration_s, t.lua)
                    t.results.setdefault(conc, []).append(res)
                    used = cpu_seconds(router.pid) - c0
                    t.cpu_us.setdefault(conc, []).append(used / max(1, res.requests) * 1e6)
                    if res.errors:
                        raise BenchError(
                            f"{t.label} c={conc}: {res.errors} of {res.requests} requests failed; "
                            "a cost measured on errors says nothing about the body path"
                        )
                    if t.profile == BODY:
                        sent_body += res.requests
                    print(
                        f"round {r + 1} c={conc:<2} {t.label:20} {res.rps:8.0f} req/s "
                        f"p50 {res.p50_ms:.3f} ms p99 {res.p99_ms:.3f} ms errors {res.errors}",
                        flush=True,
                    )
        reads = _wait_reads(metrics_url, reads0 + sent_body) - reads0
        # wrk counts completed requests only; a few more may have been sent at each run's end.
        if reads < sent_body:
            _, skipped = counters(_get(metrics_url))
            raise BenchError(
                f"the router read {reads:.0f} bodies for {sent_body} {BODY} requests "
                f"({BODY_SKIPPED} {skipped}): not a measurement of the body path"
            )
        failed_open = float(env.stats(FAIL_OPEN_STAT).get(FAIL_OPEN_STAT, 0))
        if failed_open:
            raise BenchError(f"{failed_open:.0f} requests failed open during the run")
    finally:
        if env is not None:
            env.stop()
        if router is not None:
            router.stop()
        upstream.stop()
    md = _markdown(targets, rounds, duration_s, load_start)
    write_result(
        "body_cost", "# Body cost: prefix-aware vs header-only\n\n" + machine_markdown() + "\n" + md
    )
    return md


def ratios(targets: list[Target]) -> dict[int, tuple[float, float]]:
    """Per size: (median per-round throughput ratio body/header-only at the top concurrency,
    median per-round added p50 ms at concurrency 1)."""
    by = {(t.size, t.profile): t for t in targets}
    hi, lo = CONCURRENCIES[-1], CONCURRENCIES[0]
    out: dict[int, tuple[float, float]] = {}
    for size in SIZES:
        b, h = by[(size, BODY)], by[(size, HEADER_ONLY)]
        tput = [x.rps / y.rps for x, y in zip(b.results[hi], h.results[hi], strict=True)]
        added = [x.p50_ms - y.p50_ms for x, y in zip(b.results[lo], h.results[lo], strict=True)]
        out[size] = (median(tput), median(added))
    return out


def _markdown(targets: list[Target], rounds: int, duration_s: float, load_start: str) -> str:
    rows = []
    for conc in CONCURRENCIES:
        for t in targets:
            rs = t.results[conc]
            rows.append(
                [
                    conc,
                    t.label,
                    f"{median([x.rps for x in rs]):,.0f}",
                    f"{median([x.p50_ms for x in rs]):.3f}",
                    f"{median([x.p99_ms for x in rs]):.3f}",
                    sum(x.errors for x in rs),
                    f"{median(t.cpu_us[conc]):.0f}",
                ]
            )
    rat = ratios(targets)
    ratio_rows = [[f"{s // 1024} KB", f"{tp:.2f}", f"{ad:+.3f}"] for s, (tp, ad) in rat.items()]
    out = [
        f"wrk `-t1 -c{{{','.join(map(str, CONCURRENCIES))}}} -d{duration_s:g}s --latency`, POST "
        f"/v1/chat/completions with one JSON body per run, {PODS} pods behind Envoy's "
        f"direct_response; {rounds} interleaved rounds, medians. Load average at start "
        f"{load_start}, at end {loadavg()}.\n",
        md_table(
            ["conc.", "body, profile", "req/s", "p50 ms", "p99 ms", "errors", "router CPU µs/req"],
            rows,
        ),
        f"\n{BODY} vs {HEADER_ONLY} (median of per-round ratios / differences):\n",
        md_table(
            [
                "body",
                f"throughput ratio (c={CONCURRENCIES[-1]})",
                f"added p50 ms (c={CONCURRENCIES[0]})",
            ],
            ratio_rows,
        ),
    ]
    for size, goal in GOALS.items():
        tp = rat[size][0]
        out.append(
            f"\n**Target** {BODY} throughput at {size // 1024} KB bodies >= {goal:.2f}x "
            f"header-only: {tp:.2f}x -> {'met' if tp >= goal else 'NOT met'}.\n"
        )
    return "\n".join(out)


if __name__ == "__main__":
    run_main(__doc__, run)
