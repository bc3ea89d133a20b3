"""Turn an engine's Prometheus /metrics page into `EngineMetrics`.

One parser for vLLM V1, vLLM V0, SGLang and TensorRT-LLM (`trtllm-serve`). The text format is
parsed by `prometheus_client.parser` (a maintained parser, not ours), but only after a cheap
pre-filter has cut the page down to the few families we read:

* A real vLLM page is 600-900 lines (python/process/HTTP families, ~15 histograms per engine).
  prometheus_client's parser is pure Python and costs ~10-14 µs per sample line, so the full
  page costs ~9 ms, while the scraper has ~1 ms of CPU per pod (1,000 pods per core per
  second). The families we need are ~60 of those lines.
* The pre-filter finds the sample lines of each wanted name with `str.find` (C speed, ~70 µs
  for an 85 KB page, half of what splitting it into lines and testing prefixes costs). Lines
  outside the kept families are never looked at, so **dropped lines are not validated**:
  garbage in an unrelated family goes unnoticed (by design: it cannot change the load
  signals). Every kept line goes through prometheus_client, and a line it rejects raises
  `MetricsParseError` naming the line number and text. A sample line is matched at column 0
  only (the format has no indentation).
* `# HELP`/`# TYPE` lines are not fed to the parser: the sample names and their types are fixed
  by the engines, so the comments add parse cost (~4 µs a line, measured) and nothing we use.
  Without them every sample comes back untyped under the exact name it was written with, so
  no `_total` munging can hide a counter from the name lookup.

Aggregation over data-parallel engines (several `engine` label values in vLLM, `dp_rank` in
SGLang): running/waiting are summed, KV use is averaged, prefix-cache counters are summed before
dividing, TTFT histograms are merged by summing the bucket counts per `le`.

Repairs are reported, not silent: `parse_engine_page` returns, next to the metrics, a short
human warning naming what it had to fix (a negative gauge clamped to 0, a NaN/Inf series
skipped, a broken TTFT bucket), which the scraper puts in `ScrapeResult.warning` so the
operator hears about a broken exporter once per pod instead of never.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from router_ext.fleet.snapshot import EngineMetrics

__all__ = [
    "NO_KNOWN_METRICS",
    "TTFT_QUANTILE",
    "MetricsParseError",
    "NoKnownMetricsError",
    "NoUsableValuesError",
    "histogram_quantile",
    "parse_engine_metrics",
    "parse_engine_page",
]

NO_KNOWN_METRICS = "no known engine metrics (looked for vllm:, sglang:, trtllm_ names)"
TTFT_QUANTILE = 0.9
_MAX_LINE_IN_ERROR = 120
# A warning is one log line: past this, the remaining repairs are summarised as "...".
_MAX_WARNING = 300


class MetricsParseError(ValueError):
    """The page is not usable Prometheus text (the message names the offending line)."""


class NoKnownMetricsError(MetricsParseError):
    """The page parsed, but carries no usable running/waiting signal of a known engine.

    A subclass so callers that only care about "unusable page" catch `MetricsParseError`, while
    the scraper can still report `no_known_metrics` (wrong port, exporter not enabled) apart
    from `parse` (a broken exporter).
    """


class NoUsableValuesError(NoKnownMetricsError):
    """The engine's running/waiting families are there, but every value is NaN or Inf.

    A subclass of `NoKnownMetricsError` (the pod must not look idle either way), told apart so
    the scraper reports `no_usable_values` (the engine exports, but cannot count) rather than
    `no_known_metrics` (wrong port, exporter off).
    """


@dataclass(frozen=True, slots=True)
class _Dialect:
    """The sample names one engine family uses; in each tuple the first name present wins."""

    engine: str
    running: str
    waiting: str
    kv: tuple[str, ...]
    # (hits, queries) counter pairs: the hit rate is sum(hits) / sum(queries).
    hit_counters: tuple[tuple[str, str], ...]
    # Ready-made hit-rate gauges, used only when no counter pair is present.
    hit_gauges: tuple[str, ...]
    ttft: str  # histogram base name; its `_bucket` samples are read
    # Info-style gauge of adapter state ("" = the engine has none); only its newest series
    # (largest value) is parsed, see `_take_newest`.
    lora_info: str = ""
    # Info-style gauge whose labels give the KV capacity ("" = none), and those label names.
    cache_info: str = ""
    cache_blocks_label: str = ""
    block_size_label: str = ""


_VLLM = _Dialect(
    engine="vllm",
    running="vllm:num_requests_running",
    waiting="vllm:num_requests_waiting",
    # V1 (0.9+) exports both; the first is the current name, the second V0's (and V1 <= 0.8's).
    kv=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    hit_counters=(
        ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
        ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
    ),
    hit_gauges=("vllm:gpu_prefix_cache_hit_rate",),
    ttft="vllm:time_to_first_token_seconds",
    lora_info="vllm:lora_requests_info",
    cache_info="vllm:cache_config_info",
    cache_blocks_label="num_gpu_blocks",
    block_size_label="block_size",
)
_SGLANG = _Dialect(
    engine="sglang",
    running="sglang:num_running_reqs",
    waiting="sglang:num_queue_reqs",
    kv=("sglang:token_usage",),
    hit_counters=(),
    hit_gauges=("sglang:cache_hit_rate",),
    ttft="sglang:time_to_first_token_seconds",
    # SGLang has no LoRA-state family and no prefix counters (only the hit-rate gauge); its
    # KV capacity is `sglang:cache_config_info{page_size, num_pages}` (BACKGROUND §6, the
    # names llm-d's SGLang mapping reads).
    cache_info="sglang:cache_config_info",
    cache_blocks_label="num_pages",
    block_size_label="page_size",
)
_TRTLLM = _Dialect(
    engine="trtllm",
    running="trtllm_num_requests_running",
    waiting="trtllm_num_requests_waiting",
    kv=("trtllm_kv_cache_utilization",),
    hit_counters=(),
    hit_gauges=("trtllm_kv_cache_hit_rate",),
    ttft="trtllm_time_to_first_token_seconds",
)
_DIALECTS = (_VLLM, _SGLANG, _TRTLLM)
#: Names only V1 exports; a vLLM page with none of them and a V0 name is "vllm-v0".
_VLLM_V1_ONLY = frozenset(
    {
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_queries_total",
    }
)
_VLLM_V0_ONLY = frozenset({"vllm:gpu_cache_usage_perc", "vllm:gpu_prefix_cache_hit_rate"})

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")

# Roles of the selected sample names.
_RUNNING, _WAITING, _KV, _HITS, _QUERIES, _HIT_RATE, _TTFT, _LORA, _CACHE = range(9)


# --- pre-filter ---------------------------------------------------------------------------------


def _ends_name(text: str, j: int) -> bool:
    """True if a metric name that runs up to index j stops there (so `foo` does not match
    `foo_bar`)."""
    return j >= len(text) or text[j] not in _NAME_CHARS


def _take_lines(text: str, sample: str, lines: list[str], offsets: list[int]) -> bool:
    """Append every line that starts (at column 0) with the sample name `sample`.

    One `str.find` per kept line plus one final scan to the end of the page: the search runs at
    C speed, and it does not assume a family's lines form one group (the text format requires
    that, but a hand-rolled exporter writing one block per engine must not lose engines).
    """
    k = len(sample)
    key = "\n" + sample
    before = len(lines)
    if text.startswith(sample):
        pos = 0
    else:
        i = text.find(key)
        pos = i + 1 if i >= 0 else -1
    while pos >= 0:
        end = text.find("\n", pos)
        if end < 0:
            end = len(text)
        if _ends_name(text, pos + k):  # not a longer name (`foo_bar` when looking for `foo`)
            lines.append(text[pos:end])
            offsets.append(pos)
        i = text.find(key, end)
        pos = i + 1 if i >= 0 else -1
    return len(lines) > before


def _sample_value(line: str) -> float | None:
    """The value of one sample line without parsing its labels; None if it is no float.

    The value follows the last `}` (label values may contain `}`, the value never does), or
    the name when there are no labels; an optional timestamp may follow it.
    """
    brace = line.rfind("}")
    rest = line[brace + 1 :] if brace >= 0 else line.partition(" ")[2]
    parts = rest.split(None, 1)
    try:
        return float(parts[0]) if parts else None
    except ValueError:
        return None


def _newest(found: list[str]) -> int:
    """Index of the line with the largest value (-1: none usable).

    vLLM sets `vllm:lora_requests_info` to the current time on every update under the current
    label set, and never removes the old label sets: a long-lived pod exports one series per
    adapter combination it ever had, and only the newest tells the state now (BACKGROUND §6).
    A line whose value is no float wins outright, so the parser gets to name it; NaN series
    are passed over. One newest series per page, not per engine: vLLM does not support LoRA
    with data parallelism, and the family has no `engine` label.
    """
    best = -1
    best_v = -math.inf
    for i, line in enumerate(found):
        v = _sample_value(line)
        if v is None:
            return i
        if v >= best_v:  # NaN compares False: never chosen
            best, best_v = i, v
    return best


@dataclass(slots=True)
class _Selection:
    dialect: _Dialect
    lines: list[str]
    offsets: list[int]
    roles: dict[str, int]
    # Info-style lines (role, line, offset) whose labels are read through `_info_labels`.
    info: list[tuple[int, str, int]]


def _select(
    text: str, ttft: bool, cache_config: bool = True, lora: bool = True
) -> _Selection | None:
    """Pick the engine dialect and cut out the lines of the families we read."""
    for d in _DIALECTS:
        lines: list[str] = []
        offsets: list[int] = []
        roles: dict[str, int] = {}
        for name, role in ((d.running, _RUNNING), (d.waiting, _WAITING)):
            if _take_lines(text, name, lines, offsets):
                roles[name] = role
        if not roles:
            continue
        for name in d.kv:
            if _take_lines(text, name, lines, offsets):
                roles[name] = _KV
                break
        for hits, queries in d.hit_counters:
            if _take_lines(text, hits, lines, offsets):
                roles[hits] = _HITS
                if _take_lines(text, queries, lines, offsets):
                    roles[queries] = _QUERIES
                break
        else:
            for name in d.hit_gauges:
                if _take_lines(text, name, lines, offsets):
                    roles[name] = _HIT_RATE
                    break
        bucket = d.ttft + "_bucket"
        if ttft and _take_lines(text, bucket, lines, offsets):
            roles[bucket] = _TTFT
        info: list[tuple[int, str, int]] = []
        wanted = (
            (d.lora_info if lora else "", _LORA),
            (d.cache_info if cache_config else "", _CACHE),
        )
        for name, role in wanted:
            found: list[str] = []
            at: list[int] = []
            if not name or not _take_lines(text, name, found, at):
                continue
            picks = range(len(found)) if role == _CACHE else [_newest(found)]
            for i in picks:
                if i < 0:
                    continue
                if _sample_value(found[i]) is None:
                    # Not a sample line the format allows: the parser rejects it with the
                    # line number, as for every other kept family.
                    lines.append(found[i])
                    offsets.append(at[i])
                    roles[name] = role
                else:
                    info.append((role, found[i], at[i]))
        return _Selection(d, lines, offsets, roles, info)
    return None


# Parsed labels of info-style series, keyed by the line up to its closing brace. Their label
# sets are fixed per engine config (and shared by every pod of a fleet), but prometheus_client
# needs ~70 µs for one 11-label `vllm:cache_config_info` line: parsed on every scrape they would
# double the cost of a page. Bounded: cleared when full (a fleet has a handful of distinct ones).
_INFO_MEMO: dict[str, dict[str, str]] = {}
_INFO_MEMO_MAX = 4096


def _info_labels(line: str) -> dict[str, str]:
    """The labels of one info-style sample line, parsed by prometheus_client once per distinct
    label text. Raises what the parser raises for a malformed line."""
    brace = line.rfind("}")
    key = line[: brace + 1] if brace >= 0 else line.partition(" ")[0]
    labels = _INFO_MEMO.get(key)
    if labels is None:
        labels = {}
        for fam in text_string_to_metric_families(key + " 1"):
            for sample in fam.samples:
                labels = dict(sample.labels)
        if len(_INFO_MEMO) >= _INFO_MEMO_MAX:
            _INFO_MEMO.clear()
        _INFO_MEMO[key] = labels
    return labels


# --- parse --------------------------------------------------------------------------------------


def _shorten(line: str) -> str:
    line = line.rstrip("\r")
    return line if len(line) <= _MAX_LINE_IN_ERROR else line[: _MAX_LINE_IN_ERROR - 3] + "..."


def _parse_error(text: str, sel: _Selection, exc: Exception) -> MetricsParseError:
    """Name the first kept line (in page order) that prometheus_client rejects on its own.

    Error path only, so re-parsing line by line costs nothing on the happy path; an error that
    only shows in context (none known for this parser) falls back to the parser's message.
    """
    for off, line in sorted(zip(sel.offsets, sel.lines, strict=True)):
        try:
            for _ in text_string_to_metric_families(line):
                pass
        except Exception as e:  # the parser raises ValueError, but also IndexError/TypeError
            lineno = text.count("\n", 0, off) + 1
            return MetricsParseError(f"line {lineno}: {_shorten(line)!r}: {_detail(e)}")
    return MetricsParseError(f"unparsable metrics page: {_detail(exc)}")


def _detail(e: Exception) -> str:
    # prometheus_client's messages embed the whole label string: keep them short too.
    return _shorten(str(e) or type(e).__name__)


class _Repairs:
    """What the parser had to fix on one page, keyed by (what was done, sample name).

    Only created on the first repair (the happy path allocates nothing): see `_note`.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, what: str, name: str) -> None:
        key = (what, name)
        self.counts[key] = self.counts.get(key, 0) + 1

    def text(self) -> str:
        parts = []
        for (what, name), n in self.counts.items():
            # "negative vllm:num_requests_waiting clamped to 0 (2 series)"
            part = what.format(name)  # metric names never contain braces
            parts.append(part if n == 1 else f"{part} ({n} series)")
        out = "; ".join(parts)
        return out if len(out) <= _MAX_WARNING else out[: _MAX_WARNING - 3] + "..."


def _kind(v: float) -> str:
    return "NaN" if math.isnan(v) else "+Inf" if v > 0 else "-Inf"


def _count(v: float) -> float | None:
    """running/waiting: NaN/±Inf are missing (an engine that cannot count is no evidence of an
    idle pod); negatives are clamped to 0 (a counting glitch, still 'nothing there')."""
    if not math.isfinite(v):
        return None
    return v if v > 0.0 else 0.0


def _fraction(v: float) -> float | None:
    """KV use: NaN/±Inf are missing; clamped to 0..1 (> 1 happens transiently with
    preemption/over-allocation and means 'full')."""
    if not math.isfinite(v):
        return None
    return 0.0 if v < 0.0 else 1.0 if v > 1.0 else v


def _rate(v: float) -> float | None:
    """Hit-rate gauges: NaN/±Inf are missing, and so are negatives: vLLM V0 reports -1 when
    prefix caching is off, which is 'no signal', not a 0% hit rate. > 1 is clamped to 1."""
    if not math.isfinite(v) or v < 0.0:
        return None
    return 1.0 if v > 1.0 else v


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative `{le: count}` buckets.

    Linear interpolation inside the bucket holding the rank, the first bucket starting at 0,
    and a rank in the +Inf bucket answering the highest finite bound (as Prometheus does: the
    estimate saturates there). Counts are made monotonic with a running max first, the same
    fix-up Prometheus applies, because merged engines may use different bucket layouts. None
    when there is no +Inf bucket, no observation, or no finite bucket to answer with.
    """
    if math.inf not in buckets:
        return None
    les = sorted(buckets)
    counts: list[float] = []
    top = 0.0
    for le in les:
        top = max(top, buckets[le])
        counts.append(top)
    total = counts[-1]
    if total <= 0.0 or len(les) < 2:
        return None
    rank = q * total
    i = next(k for k, c in enumerate(counts) if c >= rank)
    if i == len(les) - 1:
        return les[-2]
    upper = les[i]
    if i == 0:
        lower, below = 0.0, 0.0
        if upper <= 0.0:
            return upper
    else:
        lower, below = les[i - 1], counts[i - 1]
    return lower + (upper - lower) * (rank - below) / (counts[i] - below)


def parse_engine_metrics(
    text: str,
    model: str | None = None,
    *,
    ttft: bool = True,
    cache_config: bool = True,
    lora: bool = True,
) -> EngineMetrics:
    """`parse_engine_page` without the repair warning."""
    return parse_engine_page(text, model, ttft=ttft, cache_config=cache_config, lora=lora)[0]


def parse_engine_page(
    text: str,
    model: str | None = None,
    *,
    ttft: bool = True,
    cache_config: bool = True,
    lora: bool = True,
) -> tuple[EngineMetrics, str]:
    """Parse one /metrics page into per-pod load signals and a repair warning ("" if none).

    `model` is what discovery expects the pod to serve. It does not filter anything: load is a
    property of the whole pod (all its models share the GPUs), and a pod that reports other
    models still gets metrics, with `models` set to what the pod reports, so the caller can log
    the mismatch once.

    Missing or broken values never become NaN in the result (a NaN compares False both ways and
    would silently break every strategy's ordering):

    * running/waiting: see `_count`; series with NaN/Inf are skipped, the rest are summed. If
      only one of the two has a usable value the other counts as 0 (some builds export only
      one); if neither has, `NoUsableValuesError` (the pod must not look idle).
    * KV use: see `_fraction`; averaged over the engines that report it, else None.
    * Prefix hit rate: sum(hits)/sum(queries) over the counters (cumulative since start),
      None if no queries yet; else a hit-rate gauge (see `_rate`), averaged.
    * TTFT p90: from the merged cumulative buckets (see `histogram_quantile`); None if any
      bucket count is NaN/Inf/negative or there are no observations.

    `_created` samples are never selected. Raises `MetricsParseError` for a kept line the
    parser rejects, `NoKnownMetricsError` when no known running/waiting family is present.

    The warning names every repair above that points at a broken exporter: negative
    running/waiting/KV clamped to 0, NaN/Inf or negative series skipped, a bad TTFT bucket.
    Not warned: KV > 1 (a documented transient) and a negative hit-rate gauge (V0's "prefix
    caching off"). E.g. "negative vllm:num_requests_waiting clamped to 0 (2 series)".

    `ttft=False` skips the TTFT histogram (`ttft_p90_s` is then None). Its bucket lines are
    ~80% of the parse cost: for a 2-engine vLLM 0.10 page (840 lines) ~0.9 ms with TTFT,
    ~0.2 ms without, against ~9 ms for prometheus_client on the whole page (measured by
    benchmarks/parse_cost.py). The scraper uses it to recompute the slow-moving, cumulative
    p90 only every few scrapes.

    LoRA state (`lora_*`, `max_lora`) comes from the newest `vllm:lora_requests_info` series,
    KV capacity (`cache_blocks`, `block_size`) from the cache-config info series; both are
    None/empty when the engine exports none. `cache_config=False` skips the latter (they are
    then None): the config is fixed for the life of the engine, and finding it is one more
    scan of the whole page (~17 µs for 85 KB), so the scraper reads it with the TTFT.
    `lora=False` skips the LoRA family the same way (empty/None): the scraper looks for it on
    every scrape of a pod that has it and with the TTFT on others, since a pod without LoRA
    never has it and one with LoRA keeps it once it appeared.
    """
    sel = _select(text, ttft, cache_config, lora)
    if sel is None:
        raise NoKnownMetricsError(NO_KNOWN_METRICS)
    try:
        samples = [
            s for fam in text_string_to_metric_families("\n".join(sel.lines)) for s in fam.samples
        ]
    except Exception as e:  # any parser failure is a parse error of this page
        raise _parse_error(text, sel, e) from e

    roles = sel.roles
    repairs: _Repairs | None = None
    running = waiting = 0.0
    have_running = have_waiting = False
    kv: list[float] = []
    hits = queries = 0.0
    have_hits = have_queries = False
    adapters: tuple[frozenset[str], frozenset[str], int | None] | None = None
    # engine label -> (blocks, block size): one info series per data-parallel engine.
    cache: dict[str, tuple[int, int]] = {}
    gauge_rates: list[float] = []
    buckets: dict[float, float] = {}
    buckets_ok = True
    engines: set[str] = set()
    models: set[str] = set()

    for s in samples:
        role = roles.get(s.name)
        if role is None:  # defensive: only selected names are fed to the parser
            continue
        labels = s.labels
        name = labels.get("model_name") or labels.get("model")
        if name:
            models.add(name)
        v = float(s.value)
        if role in (_RUNNING, _WAITING):
            engines.add(labels.get("engine", labels.get("dp_rank", "")))
            c = _count(v)
            if c is None or v < 0.0:
                repairs = repairs or _Repairs()
                if c is None:
                    repairs.add(f"{_kind(v)} {{}} skipped", s.name)
                    continue
                repairs.add("negative {} clamped to 0", s.name)
            if role == _RUNNING:
                running += c
                have_running = True
            else:
                waiting += c
                have_waiting = True
        elif role == _KV:
            f = _fraction(v)
            if f is not None:
                kv.append(f)
                if v < 0.0:  # > 1 is a documented transient ("full"), not a broken exporter
                    repairs = repairs or _Repairs()
                    repairs.add("negative {} clamped to 0", s.name)
            else:
                repairs = repairs or _Repairs()
                repairs.add(f"{_kind(v)} {{}} skipped", s.name)
        elif role in (_HITS, _QUERIES):
            if math.isfinite(v) and v >= 0.0:
                if role == _HITS:
                    hits += v
                    have_hits = True
                else:
                    queries += v
                    have_queries = True
            else:
                repairs = repairs or _Repairs()
                bad = _kind(v) if not math.isfinite(v) else "negative"
                repairs.add(f"{bad} {{}} skipped", s.name)
        elif role == _HIT_RATE:
            r = _rate(v)
            if r is not None:
                gauge_rates.append(r)
            elif not math.isfinite(v):  # negative = "prefix caching off" (V0), not a repair
                repairs = repairs or _Repairs()
                repairs.add(f"{_kind(v)} {{}} skipped", s.name)
        else:  # _TTFT
            try:
                le = float(labels["le"])
            except (KeyError, ValueError):
                le = math.nan
            if not math.isfinite(v) or v < 0.0 or math.isnan(le):
                if buckets_ok:
                    repairs = repairs or _Repairs()
                    repairs.add("bad {} (NaN/negative count or le): no TTFT p90", s.name)
                buckets_ok = False
                continue
            buckets[le] = buckets.get(le, 0.0) + v

    for role, line, off in sel.info:
        try:
            labels = _info_labels(line)
        except Exception as e:  # the parser raises ValueError, but also IndexError/TypeError
            lineno = text.count("\n", 0, off) + 1
            raise MetricsParseError(f"line {lineno}: {_shorten(line)!r}: {_detail(e)}") from e
        if role == _LORA:
            adapters = _lora_state(labels)
            if adapters[2] is None and labels.get("max_lora"):
                repairs = repairs or _Repairs()
                repairs.add("bad max_lora in {}: no adapter slot count", sel.dialect.lora_info)
        else:  # _CACHE
            d = sel.dialect
            blocks = _positive_int(labels.get(d.cache_blocks_label))
            size = _positive_int(labels.get(d.block_size_label))
            if blocks is not None and size is not None:
                cache[labels.get("engine", labels.get("dp_rank", ""))] = (blocks, size)

    if not (have_running or have_waiting):
        d = sel.dialect
        raise NoUsableValuesError(
            f"no usable {d.engine} running/waiting values: every {d.running} / {d.waiting} "
            "series is NaN or Inf"
        )

    hit_rate: float | None = None
    if have_queries:
        hit_rate = min(1.0, hits / queries) if queries > 0.0 else None
    elif gauge_rates:
        hit_rate = sum(gauge_rates) / len(gauge_rates)

    engine = sel.dialect.engine
    if engine == "vllm" and not (_VLLM_V1_ONLY & roles.keys()) and _VLLM_V0_ONLY & roles.keys():
        engine = "vllm-v0"

    metrics = EngineMetrics(
        running=running,
        waiting=waiting,
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
        ttft_p90_s=histogram_quantile(TTFT_QUANTILE, buckets) if buckets_ok and buckets else None,
        prefix_cache_hit_rate=hit_rate,
        engine=engine,
        models=frozenset(models),
        num_engines=max(1, len(engines)),
        lora_running=adapters[0] if adapters is not None else frozenset(),
        lora_waiting=adapters[1] if adapters is not None else frozenset(),
        max_lora=adapters[2] if adapters is not None else None,
        cache_blocks=sum(b for b, _ in cache.values()) if cache else None,
        block_size=max(bs for _, bs in cache.values()) if cache else None,
        prefix_hits=hits if have_hits else None,
        prefix_queries=queries if have_queries else None,
    )
    return metrics, (repairs.text() if repairs is not None else "")


def _names(joined: str | None) -> frozenset[str]:
    """vLLM joins adapter names with commas; "" is no adapter."""
    if not joined:
        return frozenset()
    return frozenset(n for n in (x.strip() for x in joined.split(",")) if n)


def _positive_int(raw: str | None) -> int | None:
    """An integer label such as num_gpu_blocks: None when absent, not an integer or < 1 (vLLM
    writes "None" before its KV cache is profiled)."""
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n > 0 else None


def _lora_state(labels: dict[str, str]) -> tuple[frozenset[str], frozenset[str], int | None]:
    raw = labels.get("max_lora")
    slots: int | None
    try:
        slots = int(raw) if raw else None
    except ValueError:
        slots = None
    if slots is not None and slots < 0:
        slots = None
    return (
        _names(labels.get("running_lora_adapters")),
        _names(labels.get("waiting_lora_adapters")),
        slots,
    )
