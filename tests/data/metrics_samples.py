"""Realistic engine /metrics pages, rendered by prometheus_client itself.

vLLM and SGLang export through `prometheus_client`, so the most faithful way to fake their pages
is to build the same families (names, label sets, vLLM's real bucket lists) and let
`prometheus_client.exposition.generate_latest` render them: label order, `_total`/`_created`
munging, float formatting and the `_created` gauge families all come out exactly as a real pod
serves them. Values are fixed (seeded), so the checked-in pages are reproducible:

    python -m tests.data.metrics_samples        # rewrites tests/data/*.txt

The page generator is shared by the parser tests and `benchmarks/parse_cost.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CREATED = 1747049111.2846959  # a fixed process start (unix time) for `_created` samples

# --- vLLM's real bucket lists (vllm/v1/metrics/loggers.py) --------------------------------------
VLLM_TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
VLLM_TPOT_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
]  # fmt: skip
VLLM_REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip
VLLM_ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
VLLM_PARAMS_N_BUCKETS = [1, 2, 5, 10, 20]
SGLANG_TTFT_BUCKETS = [
    0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0,
    400.0,
]  # fmt: skip
SGLANG_E2E_BUCKETS = [
    0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0,
    400.0, 800.0,
]  # fmt: skip
TRTLLM_LATENCY_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
HTTP_HIGHR_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0,
    7.5, 10.0, 30.0, 60.0,
]  # fmt: skip


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    out: list[int] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exponent
            if v > max_value:
                return out
            out.append(v)
        exponent += 1


@dataclass(frozen=True)
class EngineLoad:
    """What one engine (one `engine` label value) reports; tests assert against these."""

    running: float
    waiting: float
    kv: float
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    ttft: Sequence[float] = field(default_factory=tuple)  # observations, seconds


def _lognormal(rng: random.Random, n: int, median: float, sigma: float) -> tuple[float, ...]:
    return tuple(rng.lognormvariate(0.0, sigma) * median for _ in range(n))


_RNG = random.Random(20250512)
#: The two data-parallel engines of the sample vLLM V1 pod.
V1_ENGINES = (
    EngineLoad(7, 2, 0.4125, 1_843_200, 1_105_920, _lognormal(_RNG, 180, 0.35, 0.8)),
    EngineLoad(5, 0, 0.2875, 1_720_320, 967_680, _lognormal(_RNG, 150, 0.30, 0.8)),
)
V0_ENGINE = EngineLoad(4, 1, 0.3, ttft=_lognormal(_RNG, 120, 0.25, 0.7))
V0_PREFIX_HIT_RATE = 0.42
SGLANG_ENGINE = EngineLoad(12, 3, 0.68, ttft=_lognormal(_RNG, 200, 0.5, 0.9))
SGLANG_CACHE_HIT_RATE = 0.5625
TRTLLM_ENGINE = EngineLoad(9, 4, 0.55)


# --- prometheus_client rendering ----------------------------------------------------------------


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def render(families: Iterable[Metric]) -> str:
    """Render metric families exactly as a prometheus_client exporter's /metrics would."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(families))
    return generate_latest(reg).decode()


def _gauge(
    name: str, doc: str, labelnames: Sequence[str], series: Iterable[tuple[Sequence[str], float]]
) -> Metric:
    m = GaugeMetricFamily(name, doc, labels=labelnames)
    for lv, v in series:
        m.add_metric(lv, v)
    return m


def _counter(
    name: str,
    doc: str,
    labelnames: Sequence[str],
    series: Iterable[tuple[Sequence[str], float]],
    created: float | None = CREATED,
) -> Metric:
    m = CounterMetricFamily(name, doc, labels=labelnames)
    for lv, v in series:
        m.add_metric(lv, v, created=created)
    return m


def _cumulative(buckets: Sequence[float], obs: Sequence[float]) -> list[tuple[str, float]]:
    out = [(_le(b), float(sum(1 for o in obs if o <= b))) for b in buckets]
    out.append(("+Inf", float(len(obs))))
    return out


def _le(b: float) -> str:
    # prometheus_client renders `le` with floatToGoString: 1 -> "1.0", 0.001 -> "0.001".
    return repr(float(b))


def _histogram(
    name: str,
    doc: str,
    labelnames: Sequence[str],
    buckets: Sequence[float],
    series: Iterable[tuple[Sequence[str], Sequence[float]]],
    created: float | None = CREATED,
) -> Metric:
    m = HistogramMetricFamily(name, doc, labels=labelnames)
    for lv, obs in series:
        m.add_metric(lv, _cumulative(buckets, obs), round(sum(obs), 6))
        if created is not None:
            m.samples.append(
                Sample(name + "_created", dict(zip(labelnames, lv, strict=True)), created)
            )
    return m


# --- vLLM V1 ------------------------------------------------------------------------------------


def vllm_v1_families(
    engines: Sequence[EngineLoad] = V1_ENGINES,
    model: str = DEFAULT_MODEL,
    max_model_len: int = 8192,
    seed: int = 7,
) -> list[Metric]:
    """Every family vLLM V1 (0.9/0.10) exports, one series per data-parallel engine."""
    rng = random.Random(seed)
    ln = ["model_name", "engine"]
    lvs = [[model, str(i)] for i in range(len(engines))]
    per = list(zip(lvs, engines, strict=True))
    n_done = [len(e.ttft) for e in engines]

    def obs(median: float, sigma: float, scale: int = 1) -> list[tuple[list[str], list[float]]]:
        return [
            (lv, [rng.lognormvariate(0.0, sigma) * median for _ in range(n * scale)])
            for lv, n in zip(lvs, n_done, strict=True)
        ]

    def tokens(median: float, sigma: float) -> list[tuple[list[str], list[float]]]:
        return [
            (lv, [float(int(rng.lognormvariate(0.0, sigma) * median) + 1) for _ in range(n)])
            for lv, n in zip(lvs, n_done, strict=True)
        ]

    tok_buckets = [float(b) for b in build_1_2_5_buckets(max_model_len)]
    lat = VLLM_REQUEST_LATENCY_BUCKETS
    fams: list[Metric] = [
        _gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            ln,
            [(lv, e.running) for lv, e in per],
        ),
        _gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            ln,
            [(lv, e.waiting) for lv, e in per],
        ),
        _gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage."
            "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            ln,
            [(lv, e.kv) for lv, e in per],
        ),
        _counter(
            "vllm:gpu_prefix_cache_queries",
            "GPU prefix cache queries, in terms of number of queried"
            "tokens. DEPRECATED: Use vllm:prefix_cache_queries instead.",
            ln,
            [(lv, e.prefix_queries) for lv, e in per],
        ),
        _counter(
            "vllm:gpu_prefix_cache_hits",
            "GPU prefix cache hits, in terms of number of cached "
            "tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.",
            ln,
            [(lv, e.prefix_hits) for lv, e in per],
        ),
        _gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            ln,
            [(lv, e.kv) for lv, e in per],
        ),
        _counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            ln,
            [(lv, e.prefix_queries) for lv, e in per],
        ),
        _counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            ln,
            [(lv, e.prefix_hits) for lv, e in per],
        ),
        _counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            ln,
            [(lv, float(i * 3)) for i, lv in enumerate(lvs)],
        ),
        _counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            ln,
            [(lv, e.prefix_queries) for lv, e in per],
        ),
        _counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            ln,
            [(lv, float(n * 212)) for lv, n in zip(lvs, n_done, strict=True)],
        ),
        _counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*ln, "finished_reason"],
            [
                ([*lv, reason], float(n * share))
                for lv, n in zip(lvs, n_done, strict=True)
                for reason, share in (("stop", 0.8), ("length", 0.2), ("abort", 0.0))
            ],
        ),
        _histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            ln,
            tok_buckets,
            tokens(900, 1.0),
        ),
        _histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            ln,
            tok_buckets,
            tokens(200, 0.8),
        ),
        _histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ln,
            [float(b) for b in VLLM_ITERATION_TOKENS_BUCKETS],
            tokens(60, 1.5),
        ),
        _histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            ln,
            tok_buckets,
            tokens(256, 0.5),
        ),
        _histogram(
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            ln,
            [float(b) for b in VLLM_PARAMS_N_BUCKETS],
            [(lv, [1.0] * n) for lv, n in zip(lvs, n_done, strict=True)],
        ),
        _histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            ln,
            tok_buckets,
            tokens(256, 0.5),
        ),
        _histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ln,
            VLLM_TTFT_BUCKETS,
            [(lv, list(e.ttft)) for lv, e in per],
        ),
        _histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            ln,
            VLLM_TPOT_BUCKETS,
            obs(0.03, 0.4),
        ),
        _histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ln,
            VLLM_TPOT_BUCKETS,
            obs(0.03, 0.4),
        ),
        _histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            ln,
            lat,
            obs(6.0, 0.7),
        ),
        _histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            ln,
            lat,
            obs(0.05, 1.2),
        ),
        _histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            ln,
            lat,
            obs(5.5, 0.7),
        ),
        _histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            ln,
            lat,
            obs(0.3, 0.8),
        ),
        _histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            ln,
            lat,
            obs(5.0, 0.7),
        ),
    ]
    info_ln = [
        "block_size", "cache_dtype", "calculate_kv_scales", "enable_prefix_caching", "engine",
        "gpu_memory_utilization", "is_attention_free", "num_cpu_blocks", "num_gpu_blocks",
        "prefix_caching_hash_algo", "swap_space_bytes",
    ]  # fmt: skip
    fams.append(
        _gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            info_ln,
            [
                (
                    [
                        "16",
                        "auto",
                        "False",
                        "True",
                        str(i),
                        "0.9",
                        "False",
                        "0",
                        "29127",
                        "builtin",
                        "4294967296",
                    ],
                    1.0,
                )
                for i in range(len(engines))
            ],
        )
    )
    fams.append(
        _gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            [(["4", "sql-lora,chat-lora", ""], 1747049412.5)],
        )
    )
    return fams


def process_families(
    handlers: Sequence[str] = ("/metrics", "/v1/chat/completions"),
) -> list[Metric]:
    """What else a vLLM API server exports: python/process collectors + the HTTP instrumentator."""
    rng = random.Random(3)
    fams: list[Metric] = [
        _counter(
            "python_gc_objects_collected",
            "Objects collected during gc",
            ["generation"],
            [([g], v) for g, v in (("0", 21744.0), ("1", 3712.0), ("2", 1180.0))],
            created=None,
        ),
        _counter(
            "python_gc_objects_uncollectable",
            "Uncollectable objects found during GC",
            ["generation"],
            [([g], 0.0) for g in "012"],
            created=None,
        ),
        _counter(
            "python_gc_collections",
            "Number of times this generation was collected",
            ["generation"],
            [([g], v) for g, v in (("0", 2391.0), ("1", 217.0), ("2", 13.0))],
            created=None,
        ),
        _gauge(
            "python_info",
            "Python platform information",
            ["implementation", "major", "minor", "patchlevel", "version"],
            [(["CPython", "3", "12", "9", "3.12.9"], 1.0)],
        ),
        _gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", [], [([], 7.3e10)]),
        _gauge(
            "process_resident_memory_bytes", "Resident memory size in bytes.", [], [([], 2.1e9)]
        ),
        _gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            [],
            [([], 1747049104.71)],
        ),
        _counter(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            [],
            [([], 1893.42)],
            created=None,
        ),
        _gauge("process_open_fds", "Number of open file descriptors.", [], [([], 87.0)]),
        _gauge(
            "process_max_fds", "Maximum number of open file descriptors.", [], [([], 1048576.0)]
        ),
        _counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            ["handler", "method", "status"],
            [
                ([h, m, s], float(rng.randint(100, 5000)))
                for h, m, s in (
                    ("/metrics", "GET", "2xx"),
                    ("/v1/chat/completions", "POST", "2xx"),
                    ("/v1/chat/completions", "POST", "4xx"),
                    ("/health", "GET", "2xx"),
                    ("/v1/models", "GET", "2xx"),
                )
            ],
        ),
    ]
    size_req = SummaryMetricFamily(
        "http_request_size_bytes",
        "Content length of incoming requests by handler. Only value of header is respected. "
        "Otherwise ignored. No percentile calculated. ",
        labels=["handler"],
    )
    size_resp = SummaryMetricFamily(
        "http_response_size_bytes",
        "Content length of outgoing responses by handler. Only value of header is respected. "
        "Otherwise ignored. No percentile calculated. ",
        labels=["handler"],
    )
    for h in handlers:
        size_req.add_metric([h], count_value=1000, sum_value=float(rng.randint(0, 10**7)))
        size_resp.add_metric([h], count_value=1000, sum_value=float(rng.randint(0, 10**8)))
        for fam in (size_req, size_resp):
            fam.samples.append(Sample(fam.name + "_created", {"handler": h}, CREATED))
    fams += [size_req, size_resp]
    fams.append(
        _histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate "
            "percentile calculations. ",
            [],
            HTTP_HIGHR_BUCKETS,
            [([], [rng.lognormvariate(0.0, 1.5) * 0.5 for _ in range(400)])],
        )
    )
    fams.append(
        _histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by "
            "handler is important. ",
            ["handler", "method"],
            [0.1, 0.5, 1.0],
            [
                (
                    [h, "GET" if h == "/metrics" else "POST"],
                    [rng.lognormvariate(0.0, 1.5) * 0.5 for _ in range(200)],
                )
                for h in handlers
            ],
        )
    )
    return fams


#: The vLLM V1 families BACKGROUND §3 lists (the rest are real, but extra).
BACKGROUND_V1_FAMILIES = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:num_preemptions",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:cache_config_info",
        "vllm:lora_requests_info",
    }
)


def vllm_v1_page(
    engines: Sequence[EngineLoad] = V1_ENGINES,
    model: str = DEFAULT_MODEL,
    extras: bool = True,
    full: bool = True,
) -> str:
    """A vLLM V1 /metrics page, python/process/HTTP families first as vLLM serves them.

    `full=True`: every family vLLM 0.10 exports (~840 lines with 2 engines); `full=False`: only
    the families BACKGROUND §3 lists (~600 lines with 2 engines).
    """
    fams = vllm_v1_families(engines, model)
    if not full:
        fams = [f for f in fams if f.name in BACKGROUND_V1_FAMILIES]
    return render((process_families() if extras else []) + fams)


# --- vLLM V0 ------------------------------------------------------------------------------------


def vllm_v0_page(e: EngineLoad = V0_ENGINE, model: str = DEFAULT_MODEL) -> str:
    """vLLM V0 (<= 0.8 with VLLM_USE_V1=0): one engine, no `engine` label, no `_created`."""
    ln = ["model_name"]
    lv = [model]
    fams: list[Metric] = [
        _gauge("vllm:num_requests_running", "Number of requests currently running on GPU.", ln,
               [(lv, e.running)]),
        _gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", ln, [(lv, 0.0)]),
        _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", ln,
               [(lv, e.waiting)]),
        _gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", ln,
               [(lv, e.kv)]),
        _gauge("vllm:cpu_cache_usage_perc", "CPU KV-cache usage. 1 means 100 percent usage.", ln,
               [(lv, 0.0)]),
        _gauge("vllm:cpu_prefix_cache_hit_rate", "CPU prefix cache block hit rate.", ln,
               [(lv, -1.0)]),
        _gauge("vllm:gpu_prefix_cache_hit_rate", "GPU prefix cache block hit rate.", ln,
               [(lv, V0_PREFIX_HIT_RATE)]),
        _counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", ln,
                 [(lv, 2.0)], created=None),
        _counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ln,
                 [(lv, 98123.0)], created=None),
        _counter("vllm:generation_tokens", "Number of generation tokens processed.", ln,
                 [(lv, 25123.0)], created=None),
        _histogram("vllm:time_to_first_token_seconds",
                   "Histogram of time to first token in seconds.", ln, VLLM_TTFT_BUCKETS,
                   [(lv, list(e.ttft))], created=None),
        _histogram("vllm:time_per_output_token_seconds",
                   "Histogram of time per output token in seconds.", ln, VLLM_TPOT_BUCKETS,
                   [(lv, [0.02 + 0.0001 * i for i in range(300)])], created=None),
        _histogram("vllm:e2e_request_latency_seconds",
                   "Histogram of end to end request latency in seconds.", ln,
                   VLLM_REQUEST_LATENCY_BUCKETS, [(lv, [2.0 + 0.05 * i for i in range(120)])],
                   created=None),
    ]  # fmt: skip
    return render(fams)


# --- SGLang -------------------------------------------------------------------------------------


def sglang_page(e: EngineLoad = SGLANG_ENGINE, model: str = DEFAULT_MODEL) -> str:
    """SGLang with --enable-metrics (labels model_name, engine_type, tp_rank, pp_rank)."""
    ln = ["model_name", "engine_type", "tp_rank", "pp_rank"]
    lv = [model, "unified", "0", "0"]
    fams: list[Metric] = [
        _gauge("sglang:num_running_reqs", "The number of running requests.", ln,
               [(lv, e.running)]),
        _gauge("sglang:num_used_tokens", "The number of used tokens.", ln, [(lv, 187213.0)]),
        _gauge("sglang:token_usage", "The token usage.", ln, [(lv, e.kv)]),
        _gauge("sglang:gen_throughput", "The generation throughput (token/s).", ln,
               [(lv, 1843.7)]),
        _gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", ln,
               [(lv, e.waiting)]),
        _gauge("sglang:num_grammar_queue_reqs",
               "The number of requests in the grammar waiting queue.", ln, [(lv, 0.0)]),
        _gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ln,
               [(lv, SGLANG_CACHE_HIT_RATE)]),
        _gauge("sglang:spec_accept_length",
               "The average acceptance length of speculative decoding.", ln, [(lv, 0.0)]),
        _gauge("sglang:utilization", "The utilization.", ln, [(lv, 0.71)]),
        _counter("sglang:prompt_tokens", "Number of prefill tokens processed.", ln,
                 [(lv, 2_731_002.0)]),
        _counter("sglang:generation_tokens", "Number of generation tokens processed.", ln,
                 [(lv, 402_331.0)]),
        _counter("sglang:num_requests", "Number of requests processed.", ln, [(lv, 1903.0)]),
        _histogram("sglang:time_to_first_token_seconds",
                   "Histogram of time to first token in seconds.", ln, SGLANG_TTFT_BUCKETS,
                   [(lv, list(e.ttft))]),
        _histogram("sglang:e2e_request_latency_seconds",
                   "Histogram of End-to-end request latency in seconds", ln, SGLANG_E2E_BUCKETS,
                   [(lv, [3.0 + 0.02 * i for i in range(200)])]),
        _histogram("sglang:inter_token_latency_seconds",
                   "Histogram of inter-token latency in seconds.", ln,
                   [0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04,
                    0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0],
                   [(lv, [0.01 + 0.0001 * i for i in range(500)])]),
    ]  # fmt: skip
    return render(process_families(handlers=("/metrics", "/generate")) + fams)


# --- TensorRT-LLM (trtllm-serve) ----------------------------------------------------------------


def trtllm_page(e: EngineLoad = TRTLLM_ENGINE, model: str = DEFAULT_MODEL) -> str:
    """trtllm-serve /prometheus/metrics: `trtllm_` names, labels model_name + engine_type."""
    ln = ["model_name", "engine_type"]
    lv = [model, "trtllm"]
    fams: list[Metric] = [
        _counter("trtllm_request_success", "Count of successfully processed requests.",
                 [*ln, "finished_reason"], [([*lv, "stop"], 812.0), ([*lv, "length"], 77.0)]),
        _histogram("trtllm_e2e_request_latency_seconds",
                   "Histogram of end to end request latency in seconds.", ln,
                   TRTLLM_LATENCY_BUCKETS, [(lv, [1.0 + 0.01 * i for i in range(300)])]),
        _histogram("trtllm_time_to_first_token_seconds",
                   "Histogram of time to first token in seconds.", ln, TRTLLM_LATENCY_BUCKETS,
                   [(lv, [0.05 + 0.001 * i for i in range(300)])]),
        _histogram("trtllm_request_queue_time_seconds",
                   "Histogram of time spent in WAITING phase for request.", ln,
                   TRTLLM_LATENCY_BUCKETS, [(lv, [0.001 * i for i in range(300)])]),
        _gauge("trtllm_kv_cache_hit_rate", "KV cache hit rate.", ln, [(lv, 0.31)]),
        _gauge("trtllm_kv_cache_utilization", "KV cache utilization.", ln, [(lv, e.kv)]),
        _gauge("trtllm_num_requests_running", "Number of requests currently running.", ln,
               [(lv, e.running)]),
        _gauge("trtllm_num_requests_waiting", "Number of requests waiting.", ln,
               [(lv, e.waiting)]),
    ]  # fmt: skip
    return render(fams)


SAMPLES: dict[str, Callable[[], str]] = {
    "vllm_v1.txt": vllm_v1_page,
    "vllm_v0.txt": vllm_v0_page,
    "sglang.txt": sglang_page,
    "trtllm.txt": trtllm_page,
}


def read_sample(name: str) -> str:
    return (DATA_DIR / name).read_text()


def main() -> None:
    for name, fn in SAMPLES.items():
        text = fn()
        (DATA_DIR / name).write_text(text)
        print(f"{name}: {text.count(chr(10))} lines, {len(text)} bytes")


if __name__ == "__main__":
    main()
