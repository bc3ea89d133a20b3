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

The floor, measured in the same rounds at the top concurrency: a second Envoy (the same
bootstrap without the access log) in front of benchmarks/minimal_extproc.py
`--body-for prefix-aware`, which does no work at all but answers that profile's requests the
way router-ext does (ask for the buffered body in the header answer, name the pod in the body
answer). Its body/header-only ratio is what the second message exchange costs any Python
grpc.aio ext_proc; router-ext's ratio below it is its own body-path work.

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
from benchmarks.overhead import PODS, _envoy_for, _pods_healthy, _strip_extproc
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
#: Messages Envoy sent its ext_proc server: 2 per body-reading request, 1 per header-only one.
MSGS_SENT_STAT = "http.ingress.ext_proc.stream_msgs_sent"
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
    floor: bool = False  # served by the minimal ext_proc, not router-ext
    results: dict[int, list[WrkResult]] = field(default_factory=dict)
    cpu_us: dict[int, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.size // 1024} KB {self.profile}" + (" (minimal)" if self.floor else "")

    @property
    def concurrencies(self) -> tuple[int, ...]:
        return CONCURRENCIES[-1:] if self.floor else CONCURRENCIES


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


def _probe_floor(url: str, env: EnvoyProcess, bodies: dict[int, bytes]) -> None:
    """The minimal ext_proc asks for the body exactly when router-ext does (Envoy's count of
    messages sent to it: two per body-reading request, one per header-only one)."""

    def sent() -> float:
        return float(env.stats(MSGS_SENT_STAT).get(MSGS_SENT_STAT, 0))

    for profile, per_request in ((BODY, 2), (HEADER_ONLY, 1)):
        before = sent()
        for body in bodies.values():
            _post(url, body, profile)
        moved = sent() - before
        if moved != per_request * len(bodies):
            raise BenchError(
                f"the floor's Envoy sent {moved:g} ext_proc messages for {len(bodies)} {profile} "
                f"requests, not {per_request * len(bodies)}: the minimal ext_proc is not "
                "answering that profile the way router-ext does"
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
            targets.append(Target(s, p, lua, floor=True))
    upstream = FastUpstream(workdir / "upstream", pod_hosts(PODS), free_port(), free_port())
    pods_file = workdir / "pods.yaml"
    env: EnvoyProcess | None = None
    floor_env: EnvoyProcess | None = None
    router: Child | None = None
    minimal: Child | None = None
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
        fcfg = load_config(_router_cfg(workdir / "floor", pods_file))
        fboot = _strip_extproc(
            render_bootstrap(fcfg, load_or_create_token(fcfg.token_file)), drop_filter=False
        )
        minimal = Child(
            "minimal-extproc",
            [
                sys.executable, "-m", "benchmarks.minimal_extproc",
                "--port", str(fcfg.router.grpc.port), "--target", upstream.addresses[0],
                "--body-for", BODY,
            ],
            workdir / "floor" / "extproc.log",
        )  # fmt: skip
        floor_env = _envoy_for(fcfg, fboot, workdir / "floor")
        floor_env.wait_ready(20)
        wait_until(
            lambda: _pods_healthy(floor_env, True), 30, "floor Envoy: 16 pods and the minimal"
        )
        lst, m = cfg.envoy.listener, cfg.router.metrics
        url = f"http://{lst.host}:{lst.port}/v1/chat/completions"
        flst = fcfg.envoy.listener
        floor_url = f"http://{flst.host}:{flst.port}/v1/chat/completions"
        metrics_url = f"http://{m.host}:{m.port}/metrics"
        _probe(url, metrics_url, bodies)
        _probe_floor(floor_url, floor_env, bodies)
        for t in targets:  # warm-up: connections, Envoy's and Python's caches
            run_wrk(floor_url if t.floor else url, 16, 1.0, t.lua)
        reads0 = _body_reads(metrics_url)
        sent_body = 0
        for r in range(rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for conc in CONCURRENCIES:
                for t in order:
                    if conc not in t.concurrencies:
                        continue
                    pid = minimal.pid if t.floor else router.pid
                    c0 = cpu_seconds(pid)
                    res = run_wrk(floor_url if t.floor else url, conc, duration_s, t.lua)
                    t.results.setdefault(conc, []).append(res)
                    used = cpu_seconds(pid) - c0
                    t.cpu_us.setdefault(conc, []).append(used / max(1, res.requests) * 1e6)
                    if res.errors:
                        raise BenchError(
                            f"{t.label} c={conc}: {res.errors} of {res.requests} requests failed; "
                            "a cost measured on errors says nothing about the body path"
                        )
                    if t.profile == BODY and not t.floor:
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
        for e in (env, floor_env):
            failed_open = float(e.stats(FAIL_OPEN_STAT).get(FAIL_OPEN_STAT, 0))
            if failed_open:
                raise BenchError(f"{failed_open:.0f} requests failed open during the run")
    finally:
        for e in (env, floor_env):
            if e is not None:
                e.stop()
        for ch in (router, minimal):
            if ch is not None:
                ch.stop()
        upstream.stop()
    md = _markdown(targets, rounds, duration_s, load_start)
    write_result(
        "body_cost", "# Body cost: prefix-aware vs header-only\n\n" + machine_markdown() + "\n" + md
    )
    return md


def ratios(targets: list[Target]) -> dict[int, tuple[float, float, float | None]]:
    """Per size: (median per-round throughput ratio body/header-only at the top concurrency,
    median per-round added p50 ms at concurrency 1, the same throughput ratio for the minimal
    ext_proc or None when it was not measured)."""
    by = {(t.size, t.profile, t.floor): t for t in targets}
    hi, lo = CONCURRENCIES[-1], CONCURRENCIES[0]

    def tput(b: Target, h: Target) -> float:
        return median([x.rps / y.rps for x, y in zip(b.results[hi], h.results[hi], strict=True)])

    out: dict[int, tuple[float, float, float | None]] = {}
    for size in SIZES:
        b, h = by[(size, BODY, False)], by[(size, HEADER_ONLY, False)]
        added = [x.p50_ms - y.p50_ms for x, y in zip(b.results[lo], h.results[lo], strict=True)]
        fb, fh = by.get((size, BODY, True)), by.get((size, HEADER_ONLY, True))
        floor = tput(fb, fh) if fb is not None and fh is not None else None
        out[size] = (tput(b, h), median(added), floor)
    return out


def _markdown(targets: list[Target], rounds: int, duration_s: float, load_start: str) -> str:
    rows = []
    for conc in CONCURRENCIES:
        for t in targets:
            if conc not in t.concurrencies:
                continue
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
    ratio_rows = [
        [f"{s // 1024} KB", f"{tp:.2f}", "-" if fl is None else f"{fl:.2f}", f"{ad:+.3f}"]
        for s, (tp, ad, fl) in rat.items()
    ]
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
                "the same for the minimal ext_proc (floor)",
                f"added p50 ms (c={CONCURRENCIES[0]})",
            ],
            ratio_rows,
        ),
    ]
    for size, goal in GOALS.items():
        tp, _, fl = rat[size]
        floor = "" if fl is None else f" (a minimal ext_proc doing no work: {fl:.2f}x)"
        out.append(
            f"\n**Target** {BODY} throughput at {size // 1024} KB bodies >= {goal:.2f}x "
            f"header-only: {tp:.2f}x -> {'met' if tp >= goal else 'NOT met'}{floor}.\n"
        )
    return "\n".join(out)


if __name__ == "__main__":
    run_main(__doc__, run)
