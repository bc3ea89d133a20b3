"""The command line as an operator meets it: config errors are clear, envoy-config renders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from router_ext.app.cli import build_parser
from router_ext.envoy_adapter.envoy_config import validate
from router_ext.harness.demo import (
    DemoError,
    PrefixCounters,
    demo_models,
    demo_sim_args,
    known_strategies,
    read_pod_metrics,
    resolve_strategy,
)
from tests.conftest import requires_envoy


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("routing: {default_strategy: fastest}", "unknown strategy 'fastest'; valid: random"),
        ("scrape: {interval_s: -1}", "scrape.interval_s"),
        ("scrape: {intervall_s: 1}", "intervall_s"),
        ("routing: [", "cannot read config"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(
    tmp_path: Path, config: str, needle: str
) -> None:
    (tmp_path / "bad.yaml").write_text(config)
    p = run("serve", "-c", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr


@requires_envoy
def test_envoy_config_renders_a_valid_bootstrap_next_to_its_eds_file(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text("pods:\n  - {address: 127.0.0.1, port: 8001}\n")
    (tmp_path / "router-ext.yaml").write_text("routing: {default_strategy: least-queue}\n")
    p = run("envoy-config", "-c", "router-ext.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "run" / "envoy"
    assert (out / "envoy.yaml").exists() and (out / "eds" / "pods.yaml").exists()
    assert "127.0.0.1" in (out / "eds" / "pods.yaml").read_text()
    validate(out / "envoy.yaml")


def test_envoy_config_rejects_a_broken_pods_file(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text("pods: [ {address: ")
    (tmp_path / "router-ext.yaml").write_text("{}\n")
    p = run("envoy-config", "-c", "router-ext.yaml", cwd=tmp_path)
    assert p.returncode == 2 and "not valid YAML" in p.stderr


# --- demo ------------------------------------------------------------------------------------


def test_demo_refuses_an_unknown_strategy_naming_the_known_ones(tmp_path: Path) -> None:
    p = run("demo", "--strategy", "prefix-awar", "--duration", "1", "--json", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown strategy 'prefix-awar'; known: random, round-robin" in p.stderr
    assert p.stdout == ""  # refused before anything started


def test_demo_refuses_a_fault_timed_after_the_run_ends(tmp_path: Path) -> None:
    # --json alone runs 20 s: a kill at 25 s would never happen, and the summary would say
    # nothing failed for the wrong reason.
    p = run("demo", "--routers", "2", "--kill-router-after", "25", "--json", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--kill-router-after 25 is not before the run ends (--duration 20)" in p.stderr
    assert p.stdout == ""


def test_demo_strategy_comes_from_the_router_config() -> None:
    mine = {"routing": {"profiles": {"mine": {"scorers": [{"name": "queue"}]}}}}
    assert "mine" in known_strategies(mine)
    assert resolve_strategy("mine", "uniform", mine) == "mine"
    with pytest.raises(DemoError, match="unknown strategy 'mine'"):
        resolve_strategy("mine", "uniform", {})
    typo = {"routing": {"profiles": {"mine": {"scorers": [{"name": "queu"}]}}}}
    with pytest.raises(DemoError, match=r"routing\.profiles"):
        resolve_strategy("mine", "uniform", typo)
    # No --strategy: the config's default, else the profile the workload is meant to show.
    assert resolve_strategy(None, "uniform", {"routing": {"default_strategy": "random"}}) == (
        "random"
    )
    assert resolve_strategy(None, "uniform", {}) == "least-request"
    assert resolve_strategy(None, "shared-prefix", {}) == "prefix-aware"
    assert resolve_strategy(None, "multi-turn", {}) == "session"


def test_demo_models_and_sim_flags() -> None:
    assert demo_models(1) == ["sim-model"]
    assert demo_models(3) == ["sim-model-0", "sim-model-1", "sim-model-2"]
    args = build_parser(harness=True).parse_args(
        ["demo", "--models", "2", "--workload", "multi-model"]
    )
    sim = demo_sim_args(args, demo_models(args.models))
    assert sim[sim.index("--models") + 1] == "sim-model-0,sim-model-1"
    assert sim[sim.index("--adapters") + 1] == "2"
    one = build_parser(harness=True).parse_args(["demo"])
    assert "--models" not in demo_sim_args(one, demo_models(one.models))


POD_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 600.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 700.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 100.0
"""


def lora_series(running: str, waiting: str, updated_at: float) -> str:
    labels = f'max_lora="2",running_lora_adapters="{running}",waiting_lora_adapters="{waiting}"'
    return f"vllm:lora_requests_info{{{labels}}} {updated_at}\n"


# Newest (largest value) in the middle: the current series is not the last one listed.
POD_METRICS += (
    "# TYPE vllm:lora_requests_info gauge\n"
    + lora_series("m-lora-0", "", 1.7e9)
    + lora_series("m-lora-1,m-lora-0", "m-lora-2", 1.7000001e9)
    + lora_series("", "", 1.6e9)
)


def test_demo_reads_prefix_counters_and_the_newest_lora_series() -> None:
    r = read_pod_metrics(POD_METRICS)
    assert (r.running, r.waiting, r.kv_usage) == (3, 1, 0.25)
    assert (r.prefix_hits, r.prefix_queries) == (800, 1600)
    assert r.running_adapters == ("m-lora-1", "m-lora-0")
    assert r.waiting_adapters == ("m-lora-2",)


def test_demo_prefix_hit_rate_is_over_the_run_across_restarts() -> None:
    c = PrefixCounters()
    c.baseline("pod-0", 500, 1000)  # before the run: not counted
    c.update("pod-0", 800, 1400)
    assert c.rate("pod-0") == 300 / 400
    c.update("pod-0", 50, 100)  # restarted: counters began again at 0
    assert c.rate("pod-0") == 350 / 500
    c.update("pod-9", 0, 500)  # added during the run: counts from zero
    assert c.rate("pod-9") == 0.0 and c.rate() == 350 / 1000
    assert c.rate("never-seen") is None


@requires_envoy
def test_demo_shared_prefix_json_reports_hit_rate_and_per_model(tmp_path: Path) -> None:
    p = run(
        "demo", "--pods", "4", "--duration", "8", "--workload", "shared-prefix", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["requests_failed"] == 0, summary
    assert summary["workload"] == "shared-prefix" and summary["requests_total"] > 20
    # Groups repeat their system prompt, so the pods' own counters show cache hits.
    assert 0 < summary["prefix_cache_hit_rate"] <= 1
    assert sorted(summary["prefix_cache_hit_rate_per_pod"]) == [f"pod-{i}" for i in range(4)]
    (model, row), *_ = summary["per_model"].items()
    assert len(summary["per_model"]) == 1 and model == "sim-model"
    assert row["requests"] == summary["requests_total"] and row["failed"] == 0
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p90_ms"]
