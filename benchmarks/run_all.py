"""Run every benchmark in one go and write docs/performance.md (what `make bench` runs).

    python -m benchmarks.run_all           # full run (~45 min on 2 cores)
    python -m benchmarks.run_all --quick   # smoke run: same code paths, short durations

One run produces every committed number: benchmarks/results/*.md, docs/quality_ttft_p90.png,
docs/shared_prefix.png, docs/multi_turn.png and docs/performance.md, so the tables in the docs
always come from the same machine state.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import (
    body_cost,
    decision_cost,
    overhead,
    quality,
    replicas,
    scrape_cost,
    scrape_load,
    shared_prefix,
    soak,
)
from benchmarks.common import DOCS_DIR, RESULTS_DIR, BenchError, machine_markdown, write_result
from benchmarks.peer_sglang_router import SGLANG_VENV, ensure_sglang, sglang_version
from benchmarks.peer_vllm_router import (
    PEER_VENV,
    PeerUnavailable,
    ensure_peer,
    peer_markdown,
    peer_version,
)


def _section(name: str) -> str:
    """A result file's body without its first heading line."""
    text = (RESULTS_DIR / f"{name}.md").read_text()
    return text.split("\n", 1)[1].lstrip() if text.startswith("# ") else text


def _targets() -> str:
    """The verdict lines (`**Target** ...`) of every result file, as one list."""
    lines = []
    for name in (
        "overhead",
        "decision_cost",
        "scrape_cost",
        "scrape_load",
        "quality",
        "shared_prefix",
        "replicas",
        "body_cost",
        "soak",
    ):
        for line in (RESULTS_DIR / f"{name}.md").read_text().splitlines():
            if line.startswith("**Target**"):
                lines.append("- " + line.removeprefix("**Target** "))
            elif line.startswith("Not reported:"):  # a benchmark that refused to measure
                lines.append(f"- {name}: {line}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    args = ap.parse_args()
    quick: bool = args.quick
    t0 = time.monotonic()
    machine = machine_markdown()
    try:
        ensure_peer()
        peer_status = (
            f"vllm-router {peer_version()} (PyPI), installed in benchmarks/{PEER_VENV.name}"
        )
    except PeerUnavailable as e:
        peer_status = f"vllm-router NOT AVAILABLE: {e}"
    try:
        ensure_sglang()
        peer_status += (
            f"; sglang-router {sglang_version()} (PyPI), installed in benchmarks/{SGLANG_VENV.name}"
        )
    except PeerUnavailable as e:
        peer_status += f"; sglang-router NOT AVAILABLE: {e}"
    print(peer_status, flush=True)
    timings: dict[str, float] = {}
    t = time.monotonic()
    ov = overhead.run(quick=quick, configs=("a", "b", "c", "e", "d"))
    timings["overhead"] = time.monotonic() - t
    t = time.monotonic()
    decision_cost.run(quick=quick)
    timings["decision cost"] = time.monotonic() - t
    t = time.monotonic()
    scrape_cost.run(quick=quick)
    timings["scrape cost"] = time.monotonic() - t
    t = time.monotonic()
    scrape_load.run(quick=quick)
    timings["scrape load"] = time.monotonic() - t
    t = time.monotonic()
    q = quality.run(quick=quick)
    timings["quality"] = time.monotonic() - t
    t = time.monotonic()
    shared_prefix.run(quick=quick, workload="shared-prefix")
    shared_prefix.run(quick=quick, workload="multi-turn")
    timings["shared prefix + multi-turn"] = time.monotonic() - t
    t = time.monotonic()
    replicas.run(quick=quick)  # router replicas active-active; benchmarks/results/replicas.md
    timings["replicas"] = time.monotonic() - t
    t = time.monotonic()
    try:
        body_cost.run(quick=quick)
    except BenchError as e:
        # Refusing is the benchmark's answer when the router did not read the bodies; the
        # rest of the run still stands. Same layout as a reported result (heading, machine
        # lines), which write_performance cuts by line count.
        write_result(
            "body_cost",
            f"# Body cost: prefix-aware vs header-only\n\n{machine}\nNot reported: {e}\n",
        )
    timings["body cost"] = time.monotonic() - t
    t = time.monotonic()
    soak.run(quick=quick)  # 1,000,000 requests (~7-10 min); benchmarks/results/soak.md
    timings["soak"] = time.monotonic() - t
    write_result("peer_vllm_router", peer_markdown(peer_status, ov, q))
    write_performance(time.monotonic() - t0, timings, quick, machine, peer_status)


def write_performance(
    total: float, timings: dict[str, float], quick: bool, machine: str, peer_status: str
) -> None:
    """docs/performance.md from the result files this run just wrote."""
    mode = " --quick" if quick else ""
    took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    doc = f"""# Performance

Every number below comes from one run of `python -m benchmarks.run_all{mode}` (`make bench`),
which took {total / 60:.1f} min ({took}). The machine is shared with other engineers' test
runs and has 2 cores, so absolute numbers move between runs; each benchmark therefore measures
its configurations **side by side in one run, with interleaved repetitions**, and the verdicts
use ratios from the same rounds.

{machine}
Reproduce everything: `make bench` (or `python -m benchmarks.run_all`; `--quick` for a smoke run).
Each part alone: `python -m benchmarks.overhead`, `python -m benchmarks.decision_cost`,
`python -m benchmarks.scrape_cost`, `python -m benchmarks.scrape_load`,
`python -m benchmarks.quality`, `python -m benchmarks.shared_prefix [--workload multi-turn]`,
`python -m benchmarks.replicas`, `python -m benchmarks.body_cost`,
`python -m benchmarks.peer_vllm_router` (all accept `--quick`).
Raw per-part results: `benchmarks/results/*.md`.

## Targets

{_targets()}
## Overhead (`python -m benchmarks.overhead`)

{_section("overhead").replace("../../docs/", "")}
## Decision cost vs pool size (`python -m benchmarks.decision_cost`)

{_section("decision_cost").split(chr(10), 4)[-1].replace("../../docs/", "")}
## Scrape cost (`python -m benchmarks.scrape_cost`)

{_section("scrape_cost").split(chr(10), 4)[-1]}
## Scrape load: in-process vs worker process (`python -m benchmarks.scrape_load`)

{_section("scrape_load").split(chr(10), 4)[-1]}
## Routing quality (`python -m benchmarks.quality`)

{_section("quality").split(chr(10), 4)[-1].replace("../../docs/", "")}
## Shared-prefix routing (`python -m benchmarks.shared_prefix`)

{_section("shared_prefix").split(chr(10), 4)[-1].replace("../../docs/", "")}
## Multi-turn routing (`python -m benchmarks.shared_prefix --workload multi-turn`)

{_section("multi_turn").split(chr(10), 4)[-1].replace("../../docs/", "")}
## Router replicas, active-active (`python -m benchmarks.replicas`)

{_section("replicas").split(chr(10), 4)[-1].replace(chr(10) + "## ", chr(10) + "### ")}
## Body cost: prefix-aware vs header-only (`python -m benchmarks.body_cost`)

{_section("body_cost").split(chr(10), 4)[-1]}
## Peers: vllm-router and sglang-router (`python -m benchmarks.peer_vllm_router`)

{peer_status}. A Rust proxy in the data path (no Envoy): its `round_robin` is row (d) of the
overhead table, its `power_of_two` and `cache_aware` policies are rows of the quality table,
measured in the same runs as router-ext. Both peers' `cache_aware` policies, with their
command-line defaults, are rows of the shared-prefix and multi-turn tables.
"""
    (DOCS_DIR / "performance.md").write_text(doc)
    print(f"wrote docs/performance.md; total {total / 60:.1f} min ({took})")


if __name__ == "__main__":
    main()
