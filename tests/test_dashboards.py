"""The Grafana dashboards, checked for real.

1. The committed JSON is exactly what grafana/generate.py writes (edit the generator, not JSON).
2. The JSON is what Grafana provisioning can load: unique uids and panel ids, every datasource
   reference goes through the $datasource variable, gridPos present and non-overlapping.
3. Every PromQL expression of every panel, with the variables substituted as Grafana would,
   runs against a real Prometheus that scraped a real router, a real Envoy and the simulated
   pods during an end-to-end run with a cold pod, a pod killed under load and a fleet-wide
   metrics outage, and returns data. A panel that is legitimately empty in that run is listed
   in LEGITIMATELY_EMPTY with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import yaml

from router_ext.config import STRATEGY_REQUEST_HEADER
from router_ext.harness.envoy_proc import free_port
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"

#: (dashboard uid, panel title, refId) -> why it has no data in the end-to-end run.
LEGITIMATELY_EMPTY: dict[tuple[str, str, str], str] = {}

#: Grafana's built-in intervals, as the test substitutes them. One minute covers the whole
#: run, so a counter that moved at any point of it (the kill, the outage) shows a rate.
BUILTINS = {"$__rate_interval": "1m", "$__range": "1m", "$__interval": "1s"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_generate", ROOT / "grafana/generate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _committed() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _targets(dash: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in dash["panels"] for t in p.get("targets", [])]


# --- 1 + 2: static checks ------------------------------------------------------------------
def test_committed_dashboards_equal_generator_output() -> None:
    gen = _generator().render()
    on_disk = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert set(on_disk) == set(gen), "run: python grafana/generate.py"
    stale = [n for n in gen if on_disk[n] != gen[n]]
    assert not stale, f"{stale} differ from grafana/generate.py output; regenerate"


def test_dashboards_are_loadable_by_grafana_provisioning() -> None:
    dashes = _committed()
    assert set(dashes) == {
        "router-ext-overview.json",
        "router-ext-failover.json",
        "router-ext-fleet.json",
        "router-ext-requests.json",
    }
    uids = [d["uid"] for d in dashes.values()]
    assert len(set(uids)) == len(uids)
    for name, d in dashes.items():
        assert d["title"] and d["schemaVersion"] >= 36, name
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["pod"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ids = [p["id"] for p in d["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        cells: dict[tuple[int, int], int] = {}
        for p in d["panels"]:
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            g = p["gridPos"]
            assert {"x", "y", "w", "h"} <= set(g) and g["w"] > 0 and g["h"] > 0, p["title"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    other = cells.setdefault((x, y), p["id"])
                    assert other == p["id"], f"{name}: panels {other} and {p['id']} overlap"
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(set(refs)) == len(refs)
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"] and t["expr"].strip()
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "router-ext.yaml").read_text())
    provider = prov["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


# --- 3: every expression against a real Prometheus ----------------------------------------
class _Prometheus:
    """A throw-away Prometheus on loopback, in its own session, stopped by the fixture."""

    def __init__(self, workdir: Path, st: Stack, extra_pods: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sd_file = workdir / "vllm-targets.json"
        self.write_targets({**st.pods, **extra_pods})
        m = st.config.router.metrics
        a = st.config.envoy.admin
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                {"job_name": "router-ext", "static_configs": [{"targets": [m.address]}]},
                {
                    "job_name": "envoy",
                    "metrics_path": "/stats/prometheus",
                    "static_configs": [{"targets": [a.address]}],
                },
                {
                    "job_name": "vllm",
                    "file_sd_configs": [{"files": [str(self.sd_file)], "refresh_interval": "1s"}],
                },
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self._log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )

    def write_targets(self, pods: dict[str, str]) -> None:
        groups = [{"targets": [addr], "labels": {"pod": name}} for name, addr in pods.items()]
        tmp = self.sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.sd_file)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r,
            ):
                if r.status == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready: {self.tail()}")

    def wait_scraping(self, jobs: set[str], timeout: float = 20.0) -> None:
        """Until every job has been scraped once: Prometheus applies discovered targets only
        every 5 s, so a run that starts at "ready" would miss its first seconds."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            res = self.api("query", query="max by (job) (up)")
            seen = {r["metric"]["job"] for r in res.get("data", {}).get("result", [])}
            if jobs <= seen:
                return
            time.sleep(0.25)
        raise RuntimeError(f"prometheus scraped only {seen} of {jobs}: {self.tail()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 = bad expression: report Prometheus's words
            return json.loads(e.read())

    def tail(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def substitute(expr: str, pods: list[str]) -> str:
    """Variables as Grafana expands them: multi-value/All regex, built-in intervals."""
    out = expr.replace("$pod", "(" + "|".join(sorted(pods)) + ")")
    for k, v in BUILTINS.items():
        out = out.replace(k, v)
    assert "$" not in out, f"unsubstituted variable in {out}"
    return out


async def _load(url: str, stop: asyncio.Event, stats: dict[str, int]) -> None:
    """Closed-loop clients through Envoy, rotating strategies so every strategy is used."""
    strategies = ["least-request", "least-kv-cache", "least-queue", "round-robin", "random"]
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
    body["max_tokens"] = 8  # type: ignore[assignment]

    async def client(i: int, s: aiohttp.ClientSession) -> None:
        n = i
        while not stop.is_set():
            n += 1
            hdr = {STRATEGY_REQUEST_HEADER: strategies[n % len(strategies)]}
            try:
                async with s.post(url + "/v1/chat/completions", json=body, headers=hdr) as r:
                    await r.read()
                    key = "ok" if r.status == 200 else f"http_{r.status}"
            except aiohttp.ClientError:
                key = "error"
            stats[key] = stats.get(key, 0) + 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(i, s) for i in range(8)))


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):  # CI installs it (make tools): missing there is a failure
            pytest.fail("prometheus not on PATH (scripts/install-tools.sh installs it)")
        pytest.skip("prometheus not on PATH (scripts/install-tools.sh installs it)")
    return path


async def until(what: str, pred: Any, timeout: float = 20.0) -> None:
    """Poll an observable condition; fail naming it after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.1)


def router_sum(st: Stack, name: str) -> float:
    total = 0.0
    for line in st.router_metrics().splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def router_state(st: Stack, pod: str) -> str:
    for line in st.router_metrics().splitlines():
        if line.startswith(f'router_ext_pod_state{{pod="{pod}"'):
            return line.split('state="', 1)[1].split('"', 1)[0]
    return ""


def prom_sum(prom: _Prometheus, name: str) -> float:
    res = prom.api("query", query=f"sum({name})").get("data", {}).get("result", [])
    return float(res[0]["value"][1]) if res else 0.0


@pytest.mark.e2e
@requires_envoy
async def test_every_dashboard_expression_returns_data(
    make_stack: Any, prometheus_bin: str, tmp_path: Path
) -> None:
    st: Stack = make_stack(
        pods=3,
        strategy="least-request",
        router_overrides={"routing": {"slow_start_s": 3.0}},
    )
    prom = _Prometheus(tmp_path, st, {})
    try:
        prom.wait_ready()
        prom.wait_scraping({"router-ext", "envoy", "vllm"})
        stop = asyncio.Event()
        stats: dict[str, int] = {}
        load = asyncio.create_task(_load(st.url, stop, stats))
        try:
            # Each phase waits for the state it exists to produce (seen in the router's or
            # Prometheus's own numbers), never a fixed time.
            await until(
                "Prometheus sees routed requests",
                lambda: prom_sum(prom, "router_ext_decisions_total") > 50,
            )
            # A pod added under load: cold (no metrics for 2.5 s), slow-started.
            added = st.control("POST", "/pods", {"name": "pod-3", "metrics_delay_s": 2.5})
            prom.write_targets({**st.pods, "pod-3": added["address"]})
            await until("pod-3 cold, then warm", lambda: router_state(st, "pod-3") == "warm")
            # Failover: a pod dies under load (retries, ejection, health-check failures).
            st.control("POST", "/pods/pod-1/kill")
            await until(
                "pod-1 unreachable and an Envoy ejection",
                lambda: (
                    router_state(st, "pod-1") == "unreachable"
                    and st.envoy_stat("cluster.pods.outlier_detection.ejections_enforced_total")
                    + st.envoy_stat("cluster.pods.health_check.failure")
                    > 0
                ),
            )
            # Fleet-wide /metrics outage past stale_after_s: metric strategies degrade.
            st.control("POST", "/metrics-outage?on=true")
            await until(
                "degraded decisions in Prometheus",
                lambda: prom_sum(prom, "router_ext_degraded_decisions_total") > 0,
            )
            st.control("POST", "/metrics-outage?on=false")
            await until(
                "metrics back: pods warm again", lambda: router_state(st, "pod-0") == "warm"
            )
        finally:
            stop.set()
            await asyncio.wait_for(load, 15)
        # Prometheus's last scrapes must see the final counts: wait until its copy of the
        # router's decision counter equals the router's own.
        final = router_sum(st, "router_ext_decisions_total")
        await until(
            "Prometheus has the final counts",
            lambda: prom_sum(prom, "router_ext_decisions_total") >= final,
        )
        assert stats.get("ok", 0) > 200, stats

        pods = [*st.pods, "pod-3"]
        values = prom.api("label/pod/values", **{"match[]": "router_ext_pod_state"})
        assert sorted(values["data"]) == sorted(pods), "the $pod variable's query"

        at = str(time.time())
        problems: list[str] = []
        checked = 0
        dump: dict[str, Any] = {}
        for fname, dash in _committed().items():
            for panel, target in _targets(dash):
                key = (dash["uid"], panel["title"], target["refId"])
                expr = substitute(target["expr"], pods)
                res = prom.api("query", query=expr, time=at)
                checked += 1
                if res.get("status") != "success":
                    problems.append(f"{fname} / {panel['title']} / {expr}: {res.get('error')}")
                    continue
                finite = [
                    r
                    for r in res["data"]["result"]
                    if not math.isnan(float(r["value"][1])) and not math.isinf(float(r["value"][1]))
                ]
                if not finite and key not in LEGITIMATELY_EMPTY:
                    problems.append(
                        f"{fname} / {panel['title']} [{target['refId']}]: no data: {expr}"
                    )
                if os.environ.get("ROUTER_EXT_DASHBOARD_DUMP"):
                    rng = prom.api(
                        "query_range",
                        query=expr,
                        start=str(float(at) - 25),
                        end=at,
                        step="1",
                    )
                    dump[f"{dash['uid']}|{panel['title']}|{target['refId']}"] = {
                        "legend": target["legendFormat"],
                        "unit": panel["fieldConfig"]["defaults"]["unit"],
                        "result": rng.get("data", {}).get("result", []),
                    }
        if dump:
            Path(os.environ["ROUTER_EXT_DASHBOARD_DUMP"]).write_text(json.dumps(dump))
        assert checked >= 50
        assert not problems, "\n".join(problems) + f"\nload: {stats}"
    finally:
        prom.stop()
