"""Pure helpers of the shared-prefix and body-cost benchmarks: the arithmetic their verdicts
rest on (capacity, hit rate, ratios) and the tables they write. No process is started."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import body_cost, prefix_tuning, shared_prefix
from benchmarks.common import BenchError, WrkResult
from benchmarks.peer_sglang_router import SGLANG_LABEL
from router_ext.harness.loadgen import Result


def _r(
    ok: bool = True, started: float = 0.0, latency: float = 1.0, served_by: str = "", **kw: Any
) -> Result:
    return Result(ok, 200 if ok else 0, served_by, latency, started, **kw)


POD_PAGE = """# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 50.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 30.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 10.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_prefix_counters_sum_engines_and_ignore_other_series() -> None:
    assert shared_prefix.prefix_counters(POD_PAGE) == (40.0, 150.0)
    assert shared_prefix.prefix_counters("") == (0.0, 0.0)


def test_hit_rate_is_the_fleet_delta_not_the_mean_of_pods() -> None:
    before = [(10.0, 100.0), (0.0, 0.0)]
    after = [(20.0, 200.0), (90.0, 100.0)]
    # (10 + 90) / (100 + 100), not mean(0.1, 0.9) weighted wrongly
    assert shared_prefix.hit_rate(before, after) == pytest.approx(0.5)
    assert math.isnan(shared_prefix.hit_rate(before, before))
    with pytest.raises(ValueError):
        shared_prefix.hit_rate(before, after[:1])


def test_closed_loop_throughput_is_littles_law_after_warmup() -> None:
    rs = [_r(started=0.0, latency=5.0)]  # warm-up: ignored
    rs += [_r(started=1.0 + i, latency=0.5) for i in range(4)]
    rs += [_r(ok=False, started=2.0, latency=0.01)]  # failures do not count
    assert shared_prefix.closed_loop_throughput(rs, 8, t0=0.0, warmup_s=1.0) == pytest.approx(16)
    with pytest.raises(BenchError):
        shared_prefix.closed_loop_throughput(rs[:1], 8, t0=0.0, warmup_s=1.0)


def test_rates_are_fractions_of_capacity() -> None:
    assert shared_prefix.rates_for(40.0) == [20.0, 28.0, 36.0]
    with pytest.raises(BenchError):
        shared_prefix.rates_for(0.0)


def test_rotation_gives_every_router_every_slot() -> None:
    names = ["a", "b", "c"]
    firsts = {shared_prefix.rotated(names, i)[0] for i in range(3)}
    assert firsts == set(names)
    assert sorted(shared_prefix.rotated(names, 4)) == names


def test_summarize_counts_failures_tokens_spread_and_degraded_answers() -> None:
    rs = [
        _r(started=0.0, latency=1.0, ttft_s=0.1, output_tokens=10, served_by="p0", group="g0",
           strategy="prefix-aware"),
        _r(started=0.5, latency=1.5, ttft_s=0.3, output_tokens=10, served_by="p1", group="g0",
           strategy="prefix-aware>random"),
        _r(started=1.0, latency=1.0, ttft_s=0.2, output_tokens=20, served_by="p1", group="g1",
           strategy="prefix-aware"),
        _r(ok=False, started=1.0, latency=0.1, error="ClientError: boom"),
    ]  # fmt: skip
    c = shared_prefix.summarize("prefix-aware", 10.0, rs, 0.25, strategy="prefix-aware")
    assert (c.n, c.failed) == (4, 1)
    assert c.ttft == (0.2, 0.3, 0.3)
    assert c.out_tps == pytest.approx(40 / 2.0)  # tokens over first send .. last completion
    assert c.pods_per_group == pytest.approx(1.5)  # g0 on 2 pods, g1 on 1
    assert c.busiest == pytest.approx(2 / 1.5)  # p1 served 2 of 3, the mean is 1.5
    assert c.off_strategy == 1
    assert c.errors == ["ClientError: boom"]


def test_summarize_times_each_groups_first_request_on_each_pod() -> None:
    # The placements find nothing cached on their pod; the repeats after them do.
    rs = [
        _r(started=0.0, latency=1.0, ttft_s=0.4, served_by="p0", group="g0"),
        _r(started=0.1, latency=1.0, ttft_s=0.05, served_by="p0", group="g0"),
        _r(started=0.2, latency=1.0, ttft_s=0.05, served_by="p0", group="g0"),
        _r(started=0.3, latency=1.0, ttft_s=0.6, served_by="p1", group="g0"),
        _r(started=0.4, latency=1.0, ttft_s=0.05, served_by="p1", group="g0"),
    ]
    c = shared_prefix.summarize("prefix-aware", 10.0, rs, 0.5)
    assert c.placement_ttft == pytest.approx(0.4)  # p50 of the two placements (0.4, 0.6)
    assert c.ttft[0] == pytest.approx(0.05)


def test_the_bound_plan_is_the_same_plan_with_one_group() -> None:
    real = shared_prefix.plan_for("shared-prefix", 20.0, 3.0, 100, 7, False)
    bound = shared_prefix.plan_for("shared-prefix", 20.0, 3.0, 100, 7, False, one_group=True)
    assert [t for t, _ in bound] == [t for t, _ in real]  # the same arrivals
    assert len({i.group for _, i in real}) > 1
    assert {i.group for _, i in bound} == {"group-0"}
    # The same questions after the shared system prompt: only the grouping differs.
    questions = [json.loads(i.body)["messages"][1]["content"] for _, i in real]
    assert [json.loads(i.body)["messages"][1]["content"] for _, i in bound] == questions


def _cell(name: str, rate: float, p90: float, tps: float, failed: int = 0) -> shared_prefix.Cell:
    return shared_prefix.Cell(name, rate, 100, failed, (p90 / 2, p90, p90 * 2), tps, 0.5, 1.0)


def test_table_sorts_each_rate_by_ttft_p90_and_formats_missing_values() -> None:
    cells = [_cell("slow", 1.0, 0.5, 10), _cell("fast", 1.0, 0.1, 10)]
    cells.append(shared_prefix.Cell("none", 1.0, 3, 3, (math.nan,) * 3, 0.0, math.nan, math.nan))
    md = shared_prefix.table(cells, [1.0])
    lines = [ln for ln in md.splitlines() if ln.startswith("| 1.0")]
    assert [ln.split(" | ")[1] for ln in lines] == ["fast", "slow", "none"]
    assert "| - | - | - | 0 | - | - |" in lines[2]


def test_verdicts_compare_with_the_best_peer_and_least_request() -> None:
    top = 9.0
    cells = [
        _cell("prefix-aware", top, 0.1, 1000),
        _cell("least-request", top, 1.0, 900),
        _cell(shared_prefix.VLLM_LABEL, top, 0.5, 950),
        _cell(SGLANG_LABEL, top, 0.2, 990),
        _cell("prefix-aware", 5.0, 9.9, 1),  # another rate: ignored
    ]
    v = shared_prefix.verdicts(cells, top, "prefix-aware", target=True)
    assert all(line.startswith("**Target**") for line in v)
    assert "best peer's (sglang-router cache_aware, 200 ms) = 0.500 x;" in v[0]
    assert v[0].endswith(": met.")
    assert "1000 tok/s vs the best peer's 990" in v[1] and v[1].endswith(": met.")
    assert "0.100 x least-request's" in v[2] and v[2].endswith(": met.")
    assert v[3].endswith(": met.")
    other = shared_prefix.verdicts(cells, top, "session", target=False)
    assert other == ["session was not measured at 9.0 req/s: no verdict."]


def test_with_rounds_verdicts_pair_routers_on_each_rounds_arrival_plan() -> None:
    """Each router's median cell can come from a different round; output tokens/s, fixed by
    the arrival plan in an open-loop run, then differs by the plan alone. With rounds the
    ratios are taken per round and their median decides."""
    top = 9.0
    # (prefix-aware p90, tps), (sglang p90, tps), least-request p90, per round
    plan = [
        ((0.10, 960), (0.30, 950), 1.0),
        ((0.30, 1000), (0.10, 990), 1.2),
        ((0.05, 1040), (0.20, 1030), 0.9),
    ]
    every = []
    for rnd, ((p, pt), (g, gt), lr) in enumerate(plan):
        every += [
            replace(_cell("prefix-aware", top, p, pt), round_no=rnd),
            replace(_cell(SGLANG_LABEL, top, g, gt), round_no=rnd),
            replace(_cell("least-request", top, lr, 900), round_no=rnd),
        ]
    medians = shared_prefix.median_cells(every)
    mine = next(c for c in medians if c.name == "prefix-aware")
    peer = next(c for c in medians if c.name == SGLANG_LABEL)
    assert (mine.round_no, peer.round_no) == (0, 2)  # median cells from different plans
    assert mine.out_tps < peer.out_tps  # which alone would read as less output
    v = shared_prefix.verdicts(medians, top, "prefix-aware", target=True, every=every)
    assert "= 0.333 x, median of 3 per-round ratios (0.333, 3, 0.25)" in v[0], v[0]
    assert v[0].endswith(": met.")
    assert "= 1.010 x, median of 3 per-round ratios" in v[1] and v[1].endswith(": met."), v[1]
    assert "= 0.100 x least-request's" in v[2], v[2]  # 0.1/1.0, 0.3/1.2, 0.05/0.9
    assert v[3].endswith("failed 0 of 300 over 3 rounds; goal 0: met.")
    # One round only: the cells themselves are compared, as before.
    one = [c for c in every if c.round_no == 0]
    assert "= 0.333 x;" in shared_prefix.verdicts(one, top, "prefix-aware", True, every=one)[0]


def test_salting_changes_only_the_first_message() -> None:
    wl = shared_prefix._workload("multi-turn", 3)
    item = wl.next_item(random.Random(0))
    salted = shared_prefix._salted(item, "cell 7")
    a, b = json.loads(item.body), json.loads(salted.body)
    assert b["messages"][0]["content"] == "[cell 7] " + a["messages"][0]["content"]
    assert b["messages"][1:] == a["messages"][1:]
    assert salted.headers == item.headers


@pytest.mark.parametrize("size", body_cost.SIZES)
def test_body_cost_bodies_have_the_exact_size_and_the_served_model(size: int) -> None:
    body = body_cost.chat_body(size)
    assert len(body) == size
    assert json.loads(body)["model"] == body_cost.MODEL


def test_body_cost_counters_absent_vs_present() -> None:
    assert body_cost.counters("") == (None, {})
    page = (
        "# TYPE router_ext_body_reads counter\nrouter_ext_body_reads_total 7.0\n"
        "# TYPE router_ext_body_skipped counter\n"
        'router_ext_body_skipped_total{reason="too_large"} 2.0\n'
    )
    assert body_cost.counters(page) == (7.0, {"too_large": 2.0})


def test_body_cost_ratios_are_per_round_medians() -> None:
    def w(rps: float, p50: float) -> WrkResult:
        return WrkResult(rps, p50, p50, p50, int(rps), 0)

    targets = []
    for size in body_cost.SIZES:
        for profile, (rps, p50) in (
            (body_cost.HEADER_ONLY, (100, 1.0)),
            (body_cost.BODY, (80, 1.5)),
        ):
            t = body_cost.Target(size, profile, Path("x.lua"))
            t.results = {1: [w(rps, p50)] * 3, 16: [w(rps, p50), w(rps, p50), w(rps / 2, p50)]}
            targets.append(t)
    # The minimal ext_proc's floor, measured for 16 KB only and at the top concurrency only.
    for profile, rps in ((body_cost.HEADER_ONLY, 100), (body_cost.BODY, 90)):
        t = body_cost.Target(16 * 1024, profile, Path("x.lua"), floor=True)
        t.results = {16: [w(rps, 1.0)] * 3}
        targets.append(t)
    r = body_cost.ratios(targets)
    tput, added, floor = r[16 * 1024]
    assert tput == pytest.approx(0.8)
    assert added == pytest.approx(0.5)
    assert floor == pytest.approx(0.9)
    assert r[1024][2] is None  # no floor measured for that size


def test_prefix_tuning_refuses_an_unknown_variant_before_starting_anything() -> None:
    with pytest.raises(BenchError, match="unknown shared-prefix variants \\['bal-spill9'\\]"):
        prefix_tuning.run(only=("bal-spill4", "bal-spill9"))
    # Every default names a variant the benchmark defines.
    for workload, names in prefix_tuning.DEFAULT_VARIANTS.items():
        assert set(names) <= set(prefix_tuning.VARIANTS[workload])
