"""vLLM V1 Prometheus exporter of one simulated pod.

Each pod owns a `CollectorRegistry` (never the process-global one: many pods share this process)
and renders it with `generate_latest`, so the text, including the `_created` samples and the
label order, is byte-for-byte what a real Python exporter such as vLLM's emits. Names, help
texts, label names and buckets follow vLLM V1 (`vllm/v1/metrics/loggers.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "EngineSeries", "PodMetrics", "observe_many"]

_LABELS = ("model_name", "engine")

# vLLM V1 bucket layouts.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(slots=True)
class EngineSeries:
    """The labelled children of one data-parallel engine, bound once so the hot path never
    pays for a `.labels()` lookup."""

    prompt_tokens: Counter
    generation_tokens: Counter
    preemptions: Counter
    prefix_queries: Counter
    prefix_hits: Counter
    success: dict[str, Counter]
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram
    prefill_time: Histogram
    decode_time: Histogram


class PodMetrics:
    """All series of one pod, in two registries so scrapes stay cheap and exact where it counts.

    - `live`: the three load gauges, callbacks into the load model's counters, rendered on
      every scrape (a handful of lines). These are what routers act on, so never stale.
    - `registry`: counters, histograms and info (~200 lines per engine, ~1 ms per engine to
      render with prometheus_client). Re-rendered only if something changed (`dirty`), and
      at most once per 10x its last render time (so a scraper hammering a busy pod costs it
      at most ~10% of a core, at the price of counters up to ~10 ms old). An idle pod costs
      nothing however often it is scraped.
    The answer is the two texts concatenated: still exactly prometheus_client's format.
    """

    def __init__(
        self,
        model: str,
        num_engines: int,
        block_size: int,
        kv_blocks: int,
        max_lora: int | None = None,
    ) -> None:
        self.live = CollectorRegistry()
        self.registry = CollectorRegistry()
        self.dirty = True
        self._cached = b""
        self._reuse_until = 0.0
        r = self.registry
        live = self.live
        self.model = model
        self.num_engines = num_engines
        # Each data-parallel engine owns an equal share of the pod's KV cache.
        self.blocks_per_engine = max(1, kv_blocks // num_engines)

        self._running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            _LABELS,
            registry=live,
        )
        self._waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            _LABELS,
            registry=live,
        )
        self._kv = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            _LABELS,
            registry=live,
        )

        def counter(name: str, doc: str, extra: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, (*_LABELS, *extra), registry=r)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=r)

        prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        generation = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        preempt = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        success = counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ("finished_reason",),
        )
        ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        decode = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        # vLLM exports every CacheConfig field as a label (`CacheConfig.metrics_info()`, values
        # str()-ed, unset ones as "None") plus `engine`. Real pods show them sorted by name
        # (prometheus_client's multiprocess mode, which vLLM's API server uses), so do we.
        cache_info = {
            "block_size": str(block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "cpu_offload_gb": "0",
            "enable_prefix_caching": "True",
            "engine": "",
            "gpu_memory_utilization": "0.9",
            "is_attention_free": "False",
            "kv_cache_size_tokens": str(self.blocks_per_engine * block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(self.blocks_per_engine),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
            "swap_space_bytes": "4294967296",
        }
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            tuple(cache_info),
            registry=r,
        )
        # Only a pod started with LoRA enabled has it, and a series appears at the first
        # engine step (vLLM's PrometheusStatLogger: created if lora_config, set in record()).
        self.lora_enabled = max_lora is not None
        self._max_lora = str(max_lora)
        self._lora = (
            Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
                registry=r,
            )
            if self.lora_enabled
            else None
        )

        self.engines: list[EngineSeries] = []
        for i in range(num_engines):
            e = str(i)
            info.labels(**{**cache_info, "engine": e}).set(1)
            self.engines.append(
                EngineSeries(
                    prompt_tokens=prompt.labels(model, e),
                    generation_tokens=generation.labels(model, e),
                    preemptions=preempt.labels(model, e),
                    prefix_queries=queries.labels(model, e),
                    prefix_hits=hits.labels(model, e),
                    # vLLM creates every finished_reason up front, so all appear at 0.
                    success={fr: success.labels(model, e, fr) for fr in FINISH_REASONS},
                    ttft=ttft.labels(model, e),
                    itl=itl.labels(model, e),
                    e2e=e2e.labels(model, e),
                    queue_time=queue.labels(model, e),
                    prefill_time=prefill.labels(model, e),
                    decode_time=decode.labels(model, e),
                )
            )
        # The python_gc_* / python_info families every Python exporter carries (cheap; the
        # process collector is left out: it lists /proc/self/fd on every scrape).
        GCCollector(registry=r)
        PlatformCollector(registry=r)

    def bind_load(self, running: Sequence[int], waiting: Sequence[int], kv: Sequence[int]) -> None:
        """Point the gauges at per-engine counters that the load model mutates in place."""
        per = float(self.blocks_per_engine)

        def value(counts: Sequence[int], i: int, scale: float = 1.0) -> Callable[[], float]:
            return lambda: min(1.0, counts[i] / scale) if scale != 1.0 else float(counts[i])

        for i in range(self.num_engines):
            e = str(i)
            self._running.labels(self.model, e).set_function(value(running, i))
            self._waiting.labels(self.model, e).set_function(value(waiting, i))
            self._kv.labels(self.model, e).set_function(value(kv, i, per))

    def record_lora(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        """One engine step's LoRA state, as vLLM records it each iteration: the series of this
        label combination is set to the wall-clock time; series of earlier combinations stay
        exported with their older timestamps, so a reader takes the newest by value."""
        if self._lora is None:
            return
        self.dirty = True
        self._lora.labels(self._max_lora, ",".join(waiting), ",".join(running)).set(time.time())

    @property
    def cached_until(self) -> float:
        """Monotonic time until which a scrape may still get the last rendered counters."""
        return self._reuse_until

    def render(self) -> bytes:
        now = time.monotonic()
        if self.dirty and now >= self._reuse_until:
            self.dirty = False
            self._cached = generate_latest(self.registry)
            done = time.monotonic()
            self._reuse_until = done + 10 * (done - now)
        return generate_latest(self.live) + self._cached


def observe_many(hist: Histogram, value: float, count: int) -> None:
    """Record `count` observations of the same value in O(1).

    A decode step gives every steadily decoding request the same inter-token latency; observing
    them one by one would cost one bucket scan per generated token. This touches the child's
    bucket counters directly (same cumulative semantics as `observe`) and falls back to a loop
    if a future prometheus_client changes those internals.
    """
    if count <= 0:
        return
    buckets = getattr(hist, "_buckets", None)
    bounds = getattr(hist, "_upper_bounds", None)
    total = getattr(hist, "_sum", None)
    if count == 1 or buckets is None or bounds is None or total is None:
        for _ in range(count):
            hist.observe(value)
        return
    total.inc(value * count)
    for i, bound in enumerate(bounds):
        if value <= bound:
            buckets[i].inc(count)
            break
