"""parse_engine_metrics: the four engine dialects, data-parallel aggregation, bad values, errors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest

from router_ext.fleet.engine_metrics import (
    NO_KNOWN_METRICS,
    MetricsParseError,
    NoKnownMetricsError,
    NoUsableValuesError,
    histogram_quantile,
    parse_engine_metrics,
    parse_engine_page,
)
from router_ext.fleet.snapshot import EngineMetrics
from tests.data.metrics_samples import (
    DEFAULT_MODEL,
    SAMPLES,
    SGLANG_CACHE_HIT_RATE,
    SGLANG_ENGINE,
    SGLANG_TTFT_BUCKETS,
    TRTLLM_ENGINE,
    V0_ENGINE,
    V0_PREFIX_HIT_RATE,
    V1_ENGINES,
    VLLM_TTFT_BUCKETS,
    process_families,
    read_sample,
    render,
)

M = 'model_name="m"'


def _no_nan(m: EngineMetrics) -> None:
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        if isinstance(v, float):
            assert not math.isnan(v), f.name


def _expected_p90(bucket_list: list[float], *observation_sets: Sequence[float]) -> float:
    """Independent re-derivation: cumulative counts straight from the observations, then
    Prometheus' linear interpolation inside the bucket that holds rank 0.9 * total."""
    obs = sorted(o for s in observation_sets for o in s)
    total = len(obs)
    rank = 0.9 * total
    lower, below = 0.0, 0
    for le in bucket_list:
        c = sum(1 for o in obs if o <= le)
        if c >= rank:
            return lower + (le - lower) * (rank - below) / (c - below)
        lower, below = le, c
    return bucket_list[-1]


# --- checked-in samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_files_match_generator(name: str) -> None:
    # tests/data/*.txt are what `python -m tests.data.metrics_samples` writes; keep them in step.
    assert read_sample(name) == SAMPLES[name]()


def test_vllm_v1_two_engines() -> None:
    text = read_sample("vllm_v1.txt")
    assert "_created{" in text and 'engine="1"' in text  # the page is what the test claims
    m = parse_engine_metrics(text)
    e0, e1 = V1_ENGINES
    assert m.engine == "vllm"
    assert m.num_engines == 2
    assert m.models == frozenset({DEFAULT_MODEL})
    assert m.running == e0.running + e1.running
    assert m.waiting == e0.waiting + e1.waiting
    assert m.kv_cache_usage == pytest.approx((e0.kv + e1.kv) / 2)
    assert m.prefix_cache_hit_rate == pytest.approx(
        (e0.prefix_hits + e1.prefix_hits) / (e0.prefix_queries + e1.prefix_queries)
    )
    assert m.ttft_p90_s == pytest.approx(_expected_p90(VLLM_TTFT_BUCKETS, e0.ttft, e1.ttft))
    _no_nan(m)


def test_vllm_v0() -> None:
    m = parse_engine_metrics(read_sample("vllm_v0.txt"))
    assert m.engine == "vllm-v0"
    assert m.num_engines == 1
    assert (m.running, m.waiting) == (V0_ENGINE.running, V0_ENGINE.waiting)
    assert m.kv_cache_usage == pytest.approx(V0_ENGINE.kv)
    # The gauge, not cpu_prefix_cache_hit_rate (-1 = CPU cache off) next to it.
    assert m.prefix_cache_hit_rate == pytest.approx(V0_PREFIX_HIT_RATE)
    assert m.ttft_p90_s == pytest.approx(_expected_p90(VLLM_TTFT_BUCKETS, V0_ENGINE.ttft))
    assert m.models == frozenset({DEFAULT_MODEL})


def test_sglang() -> None:
    m = parse_engine_metrics(read_sample("sglang.txt"))
    assert m.engine == "sglang"
    assert (m.running, m.waiting) == (SGLANG_ENGINE.running, SGLANG_ENGINE.waiting)
    assert m.kv_cache_usage == pytest.approx(SGLANG_ENGINE.kv)
    assert m.prefix_cache_hit_rate == pytest.approx(SGLANG_CACHE_HIT_RATE)
    assert m.ttft_p90_s == pytest.approx(_expected_p90(SGLANG_TTFT_BUCKETS, SGLANG_ENGINE.ttft))
    assert m.num_engines == 1
    assert m.models == frozenset({DEFAULT_MODEL})


def test_trtllm() -> None:
    m = parse_engine_metrics(read_sample("trtllm.txt"))
    assert m.engine == "trtllm"
    assert (m.running, m.waiting) == (TRTLLM_ENGINE.running, TRTLLM_ENGINE.waiting)
    assert m.kv_cache_usage == pytest.approx(TRTLLM_ENGINE.kv)
    assert m.prefix_cache_hit_rate == pytest.approx(0.31)
    assert m.ttft_p90_s is not None and 0.05 < m.ttft_p90_s < 0.5
    assert m.models == frozenset({DEFAULT_MODEL})


def test_ttft_can_be_skipped() -> None:
    m = parse_engine_metrics(read_sample("vllm_v1.txt"), ttft=False)
    assert m.ttft_p90_s is None
    assert m.running == 12


# --- aggregation details -------------------------------------------------------------------------


def test_created_samples_are_ignored() -> None:
    text = f"""# HELP vllm:num_requests_running x
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{M}}} 2.0
# HELP vllm:prefix_cache_hits_total x
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",{M}}} 30.0
# HELP vllm:prefix_cache_hits_created x
# TYPE vllm:prefix_cache_hits_created gauge
vllm:prefix_cache_hits_created{{engine="0",{M}}} 1.7470491112846959e+09
# HELP vllm:prefix_cache_queries_total x
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",{M}}} 120.0
# HELP vllm:prefix_cache_queries_created x
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{{engine="0",{M}}} 1.7470491112846959e+09
"""
    m = parse_engine_metrics(text)
    assert m.prefix_cache_hit_rate == pytest.approx(0.25)
    assert m.waiting == 0.0  # not exported here: counts as 0 because running is there
    assert m.engine == "vllm"


def test_prefix_counters_without_queries_yet() -> None:
    text = f"""vllm:num_requests_running{{{M}}} 0
vllm:prefix_cache_hits_total{{{M}}} 0
vllm:prefix_cache_queries_total{{{M}}} 0
"""
    assert parse_engine_metrics(text).prefix_cache_hit_rate is None


def test_sglang_data_parallel_uses_dp_rank() -> None:
    lines = []
    for rank, (run, queue, usage) in enumerate([(3, 1, 0.2), (5, 0, 0.4)]):
        labels = f'dp_rank="{rank}",engine_type="unified",{M},tp_rank="0"'
        lines += [
            f"sglang:num_running_reqs{{{labels}}} {run}",
            f"sglang:num_queue_reqs{{{labels}}} {queue}",
            f"sglang:token_usage{{{labels}}} {usage}",
        ]
    m = parse_engine_metrics("\n".join(lines) + "\n")
    assert (m.running, m.waiting, m.num_engines) == (8, 1, 2)
    assert m.kv_cache_usage == pytest.approx(0.3)


def test_unlabelled_page_without_comments() -> None:
    # A hand-written exporter: no HELP/TYPE, no labels, a timestamp, CRLF line ends.
    text = "trtllm_num_requests_running 3 1747049111000\r\ntrtllm_num_requests_waiting 1\r\n"
    m = parse_engine_metrics(text)
    assert (m.running, m.waiting, m.engine) == (3, 1, "trtllm")
    assert m.models == frozenset()
    assert m.num_engines == 1
    assert m.kv_cache_usage is None and m.ttft_p90_s is None and m.prefix_cache_hit_rate is None


def test_model_mismatch_still_returns_what_the_pod_reports() -> None:
    m = parse_engine_metrics(read_sample("vllm_v1.txt"), model="Qwen/Qwen2.5-7B-Instruct")
    assert m.models == frozenset({DEFAULT_MODEL})
    assert m.running == 12


def test_family_names_must_match_exactly() -> None:
    # `vllm:num_requests_running_total_x` is not `vllm:num_requests_running`.
    text = "vllm:num_requests_running_extra 99\nvllm:num_requests_running 2\n"
    assert parse_engine_metrics(text).running == 2


# --- bad values: never NaN, clamped or missing ---------------------------------------------------


def _v1(run0: str, run1: str, kv0: str = "0.5", kv1: str = "0.5", wait: str = "1") -> str:
    out = []
    for e, run, kv in (("0", run0, kv0), ("1", run1, kv1)):
        lab = f'engine="{e}",{M}'
        out += [
            f"vllm:num_requests_running{{{lab}}} {run}",
            f"vllm:num_requests_waiting{{{lab}}} {wait}",
            f"vllm:kv_cache_usage_perc{{{lab}}} {kv}",
        ]
    return "\n".join(out) + "\n"


def test_nan_gauge_is_missing_not_zero_and_not_nan() -> None:
    m = parse_engine_metrics(_v1("NaN", "4", kv0="NaN", kv1="0.25"))
    assert m.running == 4  # the engine that can count
    assert m.kv_cache_usage == 0.25  # average over engines that report it
    assert m.num_engines == 2
    _no_nan(m)


def test_all_kv_nan_gives_none() -> None:
    m = parse_engine_metrics(_v1("1", "1", kv0="NaN", kv1="+Inf"))
    assert m.kv_cache_usage is None
    _no_nan(m)


def test_running_and_waiting_all_nan_is_not_an_idle_pod() -> None:
    with pytest.raises(NoKnownMetricsError, match="NaN"):
        parse_engine_metrics(_v1("NaN", "+Inf", wait="NaN"))


def test_negative_counts_clamp_to_zero() -> None:
    m = parse_engine_metrics(_v1("-3", "2", wait="-1"))
    assert (m.running, m.waiting) == (2, 0)


def test_kv_is_clamped_to_unit_interval() -> None:
    assert parse_engine_metrics(_v1("1", "1", kv0="1.7", kv1="1.0")).kv_cache_usage == 1.0
    assert parse_engine_metrics(_v1("1", "1", kv0="-0.2", kv1="0.0")).kv_cache_usage == 0.0


def test_negative_hit_rate_gauge_means_no_signal() -> None:
    text = f"vllm:num_requests_running{{{M}}} 1\nvllm:gpu_prefix_cache_hit_rate{{{M}}} -1\n"
    m = parse_engine_metrics(text)
    assert m.prefix_cache_hit_rate is None
    assert m.engine == "vllm-v0"


def test_nan_bucket_count_drops_the_ttft_estimate_only() -> None:
    text = f"""vllm:num_requests_running{{{M}}} 1
vllm:time_to_first_token_seconds_bucket{{le="0.5",{M}}} NaN
vllm:time_to_first_token_seconds_bucket{{le="+Inf",{M}}} 4
"""
    m = parse_engine_metrics(text)
    assert m.ttft_p90_s is None and m.running == 1


# --- p90 from buckets ----------------------------------------------------------------------------


def test_histogram_quantile_hand_checked() -> None:
    # 100 observations; rank 0.9 * 100 = 90 falls in (1.0, 2.5], which holds 80..100:
    # 1.0 + (2.5 - 1.0) * (90 - 80) / (100 - 80) = 1.75.
    b = {0.1: 10.0, 0.5: 40.0, 1.0: 80.0, 2.5: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.9, b) == pytest.approx(1.75)
    # rank 50 in (0.5, 1.0]: 0.5 + 0.5 * (50 - 40) / 40 = 0.625
    assert histogram_quantile(0.5, b) == pytest.approx(0.625)
    # first bucket interpolates from 0: rank 9 of 10 in (0, 0.5] -> 0.45
    assert histogram_quantile(0.9, {0.5: 10.0, math.inf: 10.0}) == pytest.approx(0.45)
    # rank in the +Inf bucket -> the highest finite bound (Prometheus saturates there)
    assert histogram_quantile(0.9, {0.5: 1.0, 1.0: 2.0, math.inf: 10.0}) == 1.0
    # no observations / no +Inf bucket -> no estimate
    assert histogram_quantile(0.9, {0.5: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.9, {0.5: 3.0}) is None


def test_p90_merges_engines_by_summing_buckets() -> None:
    # engine 0 + engine 1 == the hand-checked histogram above -> 1.75
    per_engine = {
        "0": {"0.1": 4, "0.5": 15, "1.0": 30, "2.5": 40, "+Inf": 40},
        "1": {"0.1": 6, "0.5": 25, "1.0": 50, "2.5": 60, "+Inf": 60},
    }
    lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
    for e, buckets in per_engine.items():
        lines += [
            f'vllm:time_to_first_token_seconds_bucket{{engine="{e}",le="{le}",{M}}} {c}'
            for le, c in buckets.items()
        ]
        lines.append(
            f'vllm:time_to_first_token_seconds_count{{engine="{e}",{M}}} {buckets["+Inf"]}'
        )
        lines.append(f'vllm:num_requests_running{{engine="{e}",{M}}} 1')
    m = parse_engine_metrics("\n".join(lines) + "\n")
    assert m.ttft_p90_s == pytest.approx(1.75)
    assert m.num_engines == 2


# --- errors --------------------------------------------------------------------------------------


def test_only_unrelated_families_is_a_clear_error() -> None:
    text = render(process_families())
    with pytest.raises(NoKnownMetricsError) as ei:
        parse_engine_metrics(text)
    assert str(ei.value) == NO_KNOWN_METRICS
    assert isinstance(ei.value, MetricsParseError)


@pytest.mark.parametrize("text", ["", "\n", "   \n\n", "# just a comment\n"])
def test_empty_page(text: str) -> None:
    with pytest.raises(NoKnownMetricsError, match="no known engine metrics"):
        parse_engine_metrics(text)


def test_garbage_line_names_line_number_and_text() -> None:
    text = read_sample("vllm_v1.txt")
    lines = text.split("\n")
    i = next(
        k for k, ln in enumerate(lines) if ln.startswith('vllm:num_requests_waiting{engine="1"')
    )
    lines[i] = 'vllm:num_requests_waiting{engine="1",model_name="m"} not-a-number'
    with pytest.raises(MetricsParseError) as ei:
        parse_engine_metrics("\n".join(lines))
    assert not isinstance(ei.value, NoKnownMetricsError)
    msg = str(ei.value)
    assert f"line {i + 1}:" in msg
    assert "not-a-number" in msg


def test_broken_label_syntax_in_a_kept_family() -> None:
    text = 'vllm:num_requests_running 1\nvllm:kv_cache_usage_perc{engine="0" 0.5\n'
    with pytest.raises(MetricsParseError, match=r"line 2: .*kv_cache_usage_perc"):
        parse_engine_metrics(text)


def test_long_garbage_line_is_truncated_in_the_message() -> None:
    junk = "x" * 500
    text = f'vllm:num_requests_running{{model_name="{junk}" 1\n'
    with pytest.raises(MetricsParseError) as ei:
        parse_engine_metrics(text)
    msg = str(ei.value)
    assert "line 1:" in msg and "..." in msg
    assert junk not in msg
    assert len(msg) < 400


def test_html_error_page_is_no_known_metrics() -> None:
    text = "<html><body><h1>502 Bad Gateway</h1></body></html>\n"
    with pytest.raises(NoKnownMetricsError):
        parse_engine_metrics(text)


def test_garbage_in_a_dropped_family_is_not_validated() -> None:
    # Documented trade-off of the pre-filter: lines of families we never read are not parsed.
    text = read_sample("vllm_v1.txt").replace(
        'http_requests_total{handler="/metrics"', 'http_requests_total{handler=/metrics" ###', 1
    )
    assert parse_engine_metrics(text).running == 12


# --- repairs are reported ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_clean_samples_need_no_repair(name: str) -> None:
    metrics, warning = parse_engine_page(read_sample(name))
    assert warning == ""
    assert metrics == parse_engine_metrics(read_sample(name))


def test_negative_counts_are_clamped_and_reported() -> None:
    m, warning = parse_engine_page(_v1("-3", "2", wait="-1"))
    assert (m.running, m.waiting) == (2, 0)  # the repair itself is unchanged
    assert warning == (
        "negative vllm:num_requests_running clamped to 0; "
        "negative vllm:num_requests_waiting clamped to 0 (2 series)"
    )


def test_nan_and_inf_series_are_skipped_and_reported() -> None:
    m, warning = parse_engine_page(_v1("NaN", "4", kv0="+Inf", kv1="0.25"))
    assert (m.running, m.kv_cache_usage) == (4, 0.25)
    assert warning == (
        "NaN vllm:num_requests_running skipped; +Inf vllm:kv_cache_usage_perc skipped"
    )


def test_negative_kv_is_reported_but_kv_over_one_is_not() -> None:
    assert parse_engine_page(_v1("1", "1", kv0="-0.2"))[1] == (
        "negative vllm:kv_cache_usage_perc clamped to 0"
    )
    # > 1 is a documented transient (preemption / over-allocation), not a broken exporter.
    assert parse_engine_page(_v1("1", "1", kv0="1.7"))[1] == ""


def test_v0_hit_rate_minus_one_is_not_a_repair() -> None:
    text = f"vllm:num_requests_running{{{M}}} 1\nvllm:gpu_prefix_cache_hit_rate{{{M}}} -1\n"
    assert parse_engine_page(text)[1] == ""


def test_bad_prefix_counter_is_reported() -> None:
    text = (
        f"vllm:num_requests_running{{{M}}} 1\n"
        f"vllm:prefix_cache_hits_total{{{M}}} NaN\n"
        f"vllm:prefix_cache_queries_total{{{M}}} 10\n"
    )
    m, warning = parse_engine_page(text)
    assert m.prefix_cache_hit_rate == 0.0
    assert warning == "NaN vllm:prefix_cache_hits_total skipped"


def test_bad_ttft_bucket_is_reported_once() -> None:
    text = f"""vllm:num_requests_running{{{M}}} 1
vllm:time_to_first_token_seconds_bucket{{le="0.5",{M}}} NaN
vllm:time_to_first_token_seconds_bucket{{le="1.0",{M}}} -2
vllm:time_to_first_token_seconds_bucket{{le="+Inf",{M}}} 4
"""
    m, warning = parse_engine_page(text)
    assert m.ttft_p90_s is None
    assert warning == (
        "bad vllm:time_to_first_token_seconds_bucket (NaN/negative count or le): no TTFT p90"
    )


def test_long_repair_list_is_cut_to_one_short_line() -> None:
    lines = [f'vllm:num_requests_running{{engine="{i}",{M}}} -1' for i in range(3)]
    lines += [f'vllm:kv_cache_usage_perc{{engine="{i}",{M}}} NaN' for i in range(3)]
    lines += [f'vllm:prefix_cache_hits_total{{engine="{i}",{M}}} -5' for i in range(3)]
    lines += [f'vllm:prefix_cache_queries_total{{engine="{i}",{M}}} +Inf' for i in range(3)]
    lines += [
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",{M}}} NaN',
        f'vllm:num_requests_waiting{{engine="0",{M}}} -Inf',
    ]
    warning = parse_engine_page("\n".join(lines) + "\n")[1]
    assert "\n" not in warning and len(warning) <= 300
    assert warning.startswith("negative vllm:num_requests_running clamped to 0 (3 series); ")


def test_all_nan_is_its_own_error() -> None:
    with pytest.raises(NoUsableValuesError, match="every vllm:num_requests_running") as ei:
        parse_engine_metrics(_v1("NaN", "+Inf", wait="NaN"))
    assert isinstance(ei.value, NoKnownMetricsError)  # still "the pod must not look idle"
    with pytest.raises(NoKnownMetricsError) as ei2:
        parse_engine_metrics("# TYPE up gauge\nup 1\n")
    assert not isinstance(ei2.value, NoUsableValuesError)


# --- model facts: LoRA state, KV capacity, raw prefix counters ------------------------------------


def _lines_of(text: str, name: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.startswith(name + "{")]


def test_vllm_v1_lora_cache_config_and_prefix_counters() -> None:
    text = read_sample("vllm_v1.txt")
    m = parse_engine_metrics(text)
    assert (m.lora_running, m.lora_waiting, m.max_lora) == (
        frozenset({"sql-lora", "chat-lora"}),
        frozenset(),
        4,
    )
    # Each data-parallel engine owns its own KV cache: the pod holds both.
    assert len(_lines_of(text, "vllm:cache_config_info")) == 2
    assert (m.cache_blocks, m.block_size) == (2 * 29127, 16)
    e0, e1 = V1_ENGINES
    assert m.prefix_hits == e0.prefix_hits + e1.prefix_hits
    assert m.prefix_queries == e0.prefix_queries + e1.prefix_queries


def _sim_page(records: Sequence[tuple[Sequence[str], Sequence[str]]], max_lora: int = 2) -> str:
    """A page rendered by the simulator's exporter (prometheus_client, vLLM's label order)."""
    from router_ext.harness.sim.metrics import PodMetrics

    pm = PodMetrics("base-8b", num_engines=2, block_size=32, kv_blocks=1000, max_lora=max_lora)
    pm.bind_load([1, 2], [0, 1], [10, 20])
    for running, waiting in records:
        pm.record_lora(running, waiting)
    return pm.render().decode()


def test_newest_lora_series_wins_over_older_label_sets_still_exported() -> None:
    page = _sim_page([(["sql-lora"], []), (["chat-lora"], ["sql-lora"]), ([], ["math-lora"])])
    series = _lines_of(page, "vllm:lora_requests_info")
    assert len(series) == 3  # the old combinations stay on the page, as vLLM leaves them
    m = parse_engine_metrics(page)
    assert (m.lora_running, m.lora_waiting, m.max_lora) == (frozenset(), {"math-lora"}, 2)
    assert (m.cache_blocks, m.block_size) == (1000, 32)
    assert (m.running, m.waiting) == (3, 1)


def test_newest_lora_series_is_picked_by_value_not_position() -> None:
    text = (
        "vllm:num_requests_running 1\n"
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="old",'
        'waiting_lora_adapters=""} 1.7e9\n'
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="a, b",'
        'waiting_lora_adapters="c"} 1.9e9\n'
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="nan-one",'
        'waiting_lora_adapters=""} NaN\n'
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="older",'
        'waiting_lora_adapters=""} 1.8e9\n'
    )
    m = parse_engine_metrics(text)
    assert (m.lora_running, m.lora_waiting, m.max_lora) == ({"a", "b"}, {"c"}, 3)


def test_no_lora_family_means_no_adapter_facts() -> None:
    page = _sim_page([])  # LoRA enabled, no engine step yet: vLLM has no series either
    assert "vllm:lora_requests_info{" not in page
    m = parse_engine_metrics(page)
    assert (m.lora_running, m.lora_waiting, m.max_lora) == (frozenset(), frozenset(), None)


def test_bad_max_lora_is_unknown_and_reported() -> None:
    text = (
        "vllm:num_requests_running 1\n"
        'vllm:lora_requests_info{max_lora="many",running_lora_adapters="a",'
        'waiting_lora_adapters=""} 1.9e9\n'
    )
    m, warning = parse_engine_page(text)
    assert (m.lora_running, m.max_lora) == ({"a"}, None)
    assert "bad max_lora in vllm:lora_requests_info" in warning


def test_lora_line_with_a_broken_value_names_the_line() -> None:
    text = (
        "vllm:num_requests_running 1\n"
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="a",'
        'waiting_lora_adapters=""} 1.9e9\n'
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="b",'
        'waiting_lora_adapters=""} soon\n'
    )
    with pytest.raises(MetricsParseError, match=r"line 3: .*soon"):
        parse_engine_metrics(text)


def test_cache_config_can_be_skipped_and_lora_is_still_read() -> None:
    m = parse_engine_metrics(read_sample("vllm_v1.txt"), ttft=False, cache_config=False)
    assert (m.cache_blocks, m.block_size) == (None, None)
    assert m.lora_running == {"sql-lora", "chat-lora"}


@pytest.mark.parametrize("blocks", ["None", "0", "-5", "lots", ""])
def test_unprofiled_or_bad_block_count_is_unknown(blocks: str) -> None:
    text = (
        "vllm:num_requests_running 1\n"
        f'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="{blocks}"}} 1.0\n'
    )
    m = parse_engine_metrics(text)
    assert (m.cache_blocks, m.block_size) == (None, None)


def test_broken_cache_config_labels_name_the_line() -> None:
    text = 'vllm:num_requests_running 1\nvllm:cache_config_info{block_size="16,engine="0"} 1.0\n'
    with pytest.raises(MetricsParseError, match=r"line 2: .*cache_config_info"):
        parse_engine_metrics(text)


def test_sglang_cache_config_uses_pages() -> None:
    text = read_sample("sglang.txt") + (
        'sglang:cache_config_info{dp_rank="0",num_pages="41000",page_size="1"} 1.0\n'
        'sglang:cache_config_info{dp_rank="1",num_pages="41000",page_size="1"} 1.0\n'
    )
    m = parse_engine_metrics(text)
    assert (m.cache_blocks, m.block_size) == (82000, 1)
    # SGLang has no LoRA-state family and exports a hit-rate gauge, not token counters.
    assert (m.max_lora, m.prefix_hits, m.prefix_queries) == (None, None, None)


@pytest.mark.parametrize("name", ["vllm_v0.txt", "trtllm.txt"])
def test_engines_without_the_families_leave_them_unknown(name: str) -> None:
    m = parse_engine_metrics(read_sample(name))
    assert (m.max_lora, m.cache_blocks, m.block_size) == (None, None, None)
    assert (m.prefix_hits, m.prefix_queries) == (None, None)
    assert m.lora_running == m.lora_waiting == frozenset()


def test_prefix_counters_are_raw_and_skip_bad_series() -> None:
    text = (
        "vllm:num_requests_running 1\n"
        'vllm:prefix_cache_hits_total{engine="0"} 100\n'
        'vllm:prefix_cache_hits_total{engine="1"} NaN\n'
        'vllm:prefix_cache_queries_total{engine="0"} 400\n'
        'vllm:prefix_cache_queries_total{engine="1"} 600\n'
    )
    m = parse_engine_metrics(text)
    assert (m.prefix_hits, m.prefix_queries) == (100.0, 1000.0)
