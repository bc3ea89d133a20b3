"""Scrape cost: CPU per pod to fetch and parse vLLM /metrics, and the pool one core keeps fresh.

    python -m benchmarks.scrape_cost [--quick]

Three measurements, all CPU time of the scraping process (time.process_time), so other load
on this shared machine does not inflate them:

1. parse only (benchmarks/parse_cost.py's tables): prometheus_client vs our filtered parser on
   realistic vLLM V1 pages (tests/data/metrics_samples.py);
2. fetch + parse of a static 2-engine vLLM page served by aiohttp on 64 ports in another
   process (parse_cost.fetch_table: keep-alive, TTFT amortisation as in production);
3. fetch + parse of a real simulated fleet: `router-ext sim --pods 200` in another process,
   scraped by router_ext.fleet.scraper.Scraper with the router's default settings.

Pods kept fresh at a 1 s interval by one core = 1 s / (CPU per pod scrape).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from benchmarks import parse_cost
from benchmarks.common import (
    RUN_DIR,
    BenchError,
    Child,
    loadavg,
    machine_markdown,
    run_main,
    write_result,
)
from router_ext.config import ScrapeSection
from router_ext.fleet.scraper import Scraper
from router_ext.fleet.snapshot import Pod


async def _scrape_fleet(addresses: list[str], rounds: int) -> tuple[float, float, int, float]:
    """(process_time µs/pod, getrusage µs/pod, ok scrapes, mean round wall s)."""
    scraper = Scraper(ScrapeSection())  # router defaults: max_concurrency 256, timeout 0.3 s
    pods = [Pod(host=a.rsplit(":", 1)[0], port=int(a.rsplit(":", 1)[1])) for a in addresses]
    try:
        for _ in range(3):  # warm connections, first-sight TTFT parses
            await scraper.scrape_round(pods)
        ok = 0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, w0 = time.process_time(), time.monotonic()
        for _ in range(rounds):
            ok += sum(r.ok for r in await scraper.scrape_round(pods))
        cpu = time.process_time() - c0
        wall = (time.monotonic() - w0) / rounds
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await scraper.close()
    ru = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    n = len(pods) * rounds
    return cpu / n * 1e6, ru / n * 1e6, ok, wall


def fleet_table(pods: int, rounds: int) -> tuple[str, float]:
    sim = Child(
        "sim",
        [
            sys.executable,
            "-m",
            "router_ext.app.cli",
            "sim",
            "--pods",
            str(pods),
            "--engines",
            "2",
            "--log-level",
            "warning",
        ],
        RUN_DIR / "scrape_cost" / "sim.log",
        stdout_pipe=True,
    )
    try:
        assert sim.proc.stdout is not None
        line = sim.proc.stdout.readline().decode()
        try:
            ready = json.loads(line)
        except ValueError as e:
            raise BenchError(f"simulator did not start: {line!r}\n{sim.tail()}") from e
        addresses = list(ready["pods"].values())
        us, ru_us, ok, wall = asyncio.run(_scrape_fleet(addresses, rounds))
    finally:
        sim.stop()
    text = (
        f"Scraper (router defaults) against `router-ext sim --pods {pods} --engines 2` in another "
        f"process, {rounds} rounds, {ok}/{pods * rounds} ok, round wall time {wall * 1e3:.0f} ms:\n"
        f"  {us:.0f} µs of client CPU per pod scrape (getrusage: {ru_us:.0f} µs)  ->  "
        f"~{1e6 / us:,.0f} pods kept fresh at 1 s per core"
    )
    return text, us


def run(quick: bool = False) -> str:
    load_start = loadavg()
    parse = parse_cost.parse_table()
    static = parse_cost.fetch_table(pods=64, rounds=10 if quick else 40)
    fleet, fleet_us = fleet_table(200, 5 if quick else 20)
    static_us = float(static.split("\n")[1].split("µs")[0])
    worst = max(static_us, fleet_us)
    verdict = "met" if 1e6 / worst >= 1000 else "NOT met"
    md = (
        f"Load average at start {load_start}, at end {loadavg()}. All numbers are CPU time of "
        "the scraping process.\n\n"
        "### Parse only\n\n```\n" + parse + "\n```\n\n"
        "### Fetch + parse, static page (aiohttp server on 64 ports, other process)\n\n```\n"
        + static
        + "\n```\n\n### Fetch + parse, simulated fleet\n\n```\n"
        + fleet
        + "\n```\n\n"
        f"**Target** worst case {worst:.0f} µs per pod scrape -> one core keeps "
        f"**{1e6 / worst:,.0f} pods** fresh at a 1 s interval (target >= 1,000: {verdict}).\n"
    )
    write_result("scrape_cost", "# Scrape cost\n\n" + machine_markdown() + "\n" + md)
    return md


def main() -> None:
    run_main(__doc__, run)


if __name__ == "__main__":
    main()
