"""Immutable data the hot path reads: pods, their engine metrics and their state.

The scraper/lifecycle side builds a new `Snapshot` and swaps one attribute; the ext_proc handler
reads that attribute once per request. Nothing here is mutated after construction, so the hot
path needs no lock and never sees a half-updated pool.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PodState(str, enum.Enum):
    """Lifecycle of a pod as the router sees it (BACKGROUND §1B)."""

    NOT_READY = "not_ready"  # discovery says not ready: never routed
    COLD = "cold"  # ready, no metrics yet: routed with conservative estimates + slow start
    WARM = "warm"  # fresh metrics: scored from them
    STALE = "stale"  # metrics older than the staleness threshold: not trusted as live load
    UNREACHABLE = "unreachable"  # scrape refused/reset, repeated time-outs, or Envoy saw it fail
    DRAINING = "draining"  # going away: no new primary picks, last-resort fallback only


#: States whose pods may be a primary pick.
ROUTABLE_STATES = frozenset({PodState.COLD, PodState.WARM, PodState.STALE})


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as discovery lists it. `address` ("ip:port") is its identity everywhere."""

    host: str
    port: int
    name: str = ""
    model: str = ""
    # Base models and adapters discovery says the pod serves; always includes `model` (if set).
    # Empty: discovery does not say (the pod's own reports may still tell, see PodStatus.served).
    # Stored as that union, so `dataclasses.replace(pod, model=new)` keeps the old model in it:
    # pass `models=` too when changing the model.
    models: frozenset[str] = frozenset()
    ready: bool = True
    draining: bool = False
    # Discovery's unique id for this pod instance (Kubernetes: metadata.uid); optional.
    uid: str = ""
    # "ip:port" ("[v6]:port"), formatted once: the hot path reads it on every request.
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")
        if self.model and self.model not in self.models:
            object.__setattr__(self, "models", frozenset(self.models) | {self.model})
        elif not isinstance(self.models, frozenset):
            object.__setattr__(self, "models", frozenset(self.models))

    @property
    def label(self) -> str:
        """Human/metric label: the discovery name if given, else the address."""
        return self.name or self.address

    @property
    def identity(self) -> str:
        """Which pod instance this is: uid, else name, else the address. A new pod that reuses
        an old pod's IP (a restart elsewhere, a reschedule) has another identity and must start
        cold instead of inheriting the old pod's metrics and state."""
        return self.uid or self.name or self.address


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """Load signals normalised across vLLM V1/V0, SGLang and TensorRT-LLM.

    Values are per pod (summed over data-parallel `engine` labels; KV use is averaged).
    `None` means the engine does not export that signal.
    """

    running: float
    waiting: float
    kv_cache_usage: float | None = None  # 0..1
    ttft_p90_s: float | None = None  # from the TTFT histogram, cumulative since start
    prefix_cache_hit_rate: float | None = None
    engine: str = "vllm"  # "vllm", "vllm-v0", "sglang", "trtllm"
    models: frozenset[str] = frozenset()  # the pages' `model_name` labels
    num_engines: int = 1
    # LoRA adapters from the newest `vllm:lora_requests_info` series (BACKGROUND §6): empty
    # sets and None when the engine exports no such series (no adapter loaded yet, or no LoRA).
    lora_running: frozenset[str] = frozenset()
    lora_waiting: frozenset[str] = frozenset()
    max_lora: int | None = None  # adapter slots
    # KV capacity from `vllm:cache_config_info` (`sglang:cache_config_info` page_size /
    # num_pages): blocks summed over data-parallel engines (each owns its cache), tokens per
    # block. Capacity in tokens = cache_blocks * block_size.
    cache_blocks: int | None = None
    block_size: int | None = None
    # Raw cumulative prefix-cache counters in tokens, summed over engines (vLLM V1 only): a
    # rate over a window is the achieved hit rate; a counter that went down means a restart.
    prefix_hits: float | None = None
    prefix_queries: float | None = None


@dataclass(frozen=True, slots=True)
class ScrapeResult:
    """Outcome of one fetch+parse of one pod's /metrics."""

    address: str
    ok: bool
    fetched_at: float  # time.monotonic() when the fetch finished
    duration_s: float
    metrics: EngineMetrics | None = None
    # Short machine reason for metrics/logs: "refused", "reset", "timeout", "http_500",
    # "parse", "no_known_metrics", ...; with a human message in `error`.
    reason: str = ""
    error: str = ""
    # Set on a good scrape whose page needed repair (negative gauges clamped to 0, NaN/Inf
    # series skipped): the metrics are usable, but the operator is told once per pod and text.
    warning: str = ""
    # The pod's /v1/models, fetched every scrape.models_interval_s (not every scrape): None
    # when not fetched this time (keep the previous listing) or not served (HTTP 404); else
    # every listed id, and the subset that are adapters (entries with a `parent`).
    listed_models: frozenset[str] | None = None
    listed_adapters: frozenset[str] | None = None
    # (adapter, parent) for each listed adapter, sorted: what GET /v1/models answers.
    adapter_parents: tuple[tuple[str, str], ...] = ()
    # Short token when the /v1/models fetch failed ("timeout", "http_500", "parse", ...; see
    # scraper.classify_error): counted, never a failure of the metrics scrape.
    models_reason: str = ""
    models_error: str = ""  # the human message for models_reason
    # Pod.identity of the pod the fetch was made for: a listing that was in flight while
    # another pod took over the address is not credited to the newcomer.
    identity: str = ""

    @property
    def is_connection_failure(self) -> bool:
        return self.reason in ("refused", "reset", "connect")


@dataclass(frozen=True, slots=True)
class PodStatus:
    """One pod in a snapshot: discovery facts + derived state + last good metrics."""

    pod: Pod
    state: PodState
    index: int  # position in Snapshot.pods; per-snapshot counters are indexed by it
    metrics: EngineMetrics | None = None  # last good metrics (may be stale)
    metrics_at: float | None = None  # monotonic time of the last good scrape
    last_error: str = ""
    ready_since: float | None = None  # monotonic time the pod turned ready (slow start)
    # 0..1 share multiplier for slow start (1 = full share).
    ramp: float = 1.0
    # What metric strategies score this pod by: live metrics when warm, a conservative
    # estimate when cold or stale (see lifecycle.conservative_estimate). None: no estimate.
    score_metrics: EngineMetrics | None = None
    # Every model name the pod is known to serve: discovery's models, the pages' model_name
    # labels, its /v1/models listing and the LoRA adapters running or waiting on it. Empty:
    # nothing known yet (see Snapshot.by_model for how routing treats such a pod).
    served: frozenset[str] = frozenset()
    # The subset of `served` that are LoRA adapters (listed with a parent, or seen in
    # vllm:lora_requests_info); the rest are base models, as far as the pod tells.
    adapters: frozenset[str] = frozenset()
    # (adapter, parent) pairs from the pod's /v1/models listing.
    adapter_parents: tuple[tuple[str, str], ...] = ()

    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", self.pod.address)


@dataclass(frozen=True, slots=True)
class ModelCard:
    """One entry of the router's own `GET /v1/models` answer."""

    id: str
    parent: str | None  # the base model of an adapter; None for a base model (or unknown)
    pods: int  # routable pods serving it


@dataclass(frozen=True)
class Snapshot:
    """The pool as of one scrape round. Built off the hot path; read-only afterwards."""

    version: int
    created_at: float  # monotonic
    pods: tuple[PodStatus, ...]
    # True once discovery loaded a pod file and one scrape round finished (health SERVING).
    ready: bool = False
    # Precomputed views so a pick never filters the whole pool.
    routable: tuple[PodStatus, ...] = field(default=())
    warm: tuple[PodStatus, ...] = field(default=())
    draining: tuple[PodStatus, ...] = field(default=())
    # Median of warm pods' metrics: the conservative estimate for cold/stale pods.
    warm_median: EngineMetrics | None = None
    # Typical KV-cache share of one running request (median over warm pods): what one more
    # pick adds to a pod's KV estimate before the next scrape can show it.
    kv_per_request: float = 0.02
    # address -> index into `pods` (for feedback that names a pod by address).
    index_of: dict[str, int] = field(default_factory=dict)
    # Every routable pod is warm and queues at least routing.saturation_queue requests.
    saturated: bool = False
    # Served model name (base model or adapter) -> the routable pods serving it, in `pods`
    # order. A routable pod with an empty `served` set (nothing known about its models yet:
    # no discovery model, no page, no listing) is under no name. A model filter should treat
    # such pods as candidates only when no routable pod has model information at all (then
    # `by_model` is empty and the pool is effectively single-model); as soon as any pod tells
    # what it serves, route a model's requests to `by_model[model]` alone, so a request never
    # reaches a pod that may serve something else.
    by_model: dict[str, tuple[PodStatus, ...]] = field(default_factory=dict)
    # Union over routable pods, sorted by id: what the router answers to GET /v1/models.
    models: tuple[ModelCard, ...] = ()
    # More than one base model among routable pods: a request that names no model is then
    # ambiguous (400) instead of routed.
    multi_model: bool = False

    @staticmethod
    def build(
        version: int,
        created_at: float,
        pods: tuple[PodStatus, ...],
        ready: bool,
        saturation_queue: int = 0,
    ) -> Snapshot:
        routable = tuple(p for p in pods if p.state in ROUTABLE_STATES)
        warm = tuple(p for p in pods if p.state is PodState.WARM and p.metrics is not None)
        draining = tuple(p for p in pods if p.state is PodState.DRAINING)
        per_req = [
            m.kv_cache_usage / m.running
            for m in (p.metrics for p in warm)
            if m is not None and m.kv_cache_usage is not None and m.running > 0
        ]
        by_model, cards, multi = _model_views(routable)
        return Snapshot(
            version=version,
            created_at=created_at,
            pods=pods,
            ready=ready,
            routable=routable,
            warm=warm,
            draining=draining,
            warm_median=median_metrics([p.metrics for p in warm if p.metrics is not None]),
            kv_per_request=max(0.001, _median(per_req)) if per_req else 0.02,
            index_of={p.address: p.index for p in pods},
            saturated=saturation_queue > 0
            and bool(routable)
            and all(
                p.state is PodState.WARM
                and p.metrics is not None
                and p.metrics.waiting >= saturation_queue
                for p in routable
            ),
            by_model=by_model,
            models=cards,
            multi_model=multi,
        )

    def get(self, address: str) -> PodStatus | None:
        i = self.index_of.get(address)
        return None if i is None else self.pods[i]


EMPTY_SNAPSHOT = Snapshot(version=0, created_at=0.0, pods=())


def _model_views(
    routable: tuple[PodStatus, ...],
) -> tuple[dict[str, tuple[PodStatus, ...]], tuple[ModelCard, ...], bool]:
    """by_model, the /v1/models cards and multi_model, in one pass over the routable pods.

    A name counts as an adapter pool-wide if any pod reports it as one: discovery lists names
    without saying which are adapters, and one pod's listing tells for all. An adapter whose
    parent no listing names gets its pod's base model as parent when that pod has exactly one.
    """
    members: dict[str, list[PodStatus]] = {}
    adapters: set[str] = set()
    parents: dict[str, set[str]] = {}
    for p in routable:
        for name in p.served:
            members.setdefault(name, []).append(p)
        if p.adapters:
            adapters |= p.adapters
            for a, parent in p.adapter_parents:
                parents.setdefault(a, set()).add(parent)
    for p in routable:
        missing = [a for a in p.adapters if a not in parents]
        if missing:
            bases = p.served - adapters
            if len(bases) == 1:
                (base,) = bases
                for a in missing:
                    parents.setdefault(a, set()).add(base)
    cards = tuple(
        ModelCard(
            id=name,
            parent=min(parents[name]) if name in adapters and name in parents else None,
            pods=len(members[name]),
        )
        for name in sorted(members)
    )
    base_models = sum(1 for name in members if name not in adapters)
    return {k: tuple(v) for k, v in members.items()}, cards, base_models > 1


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def median_metrics(ms: list[EngineMetrics]) -> EngineMetrics | None:
    if not ms:
        return None
    kv = [m.kv_cache_usage for m in ms if m.kv_cache_usage is not None]
    ttft = [m.ttft_p90_s for m in ms if m.ttft_p90_s is not None]
    return EngineMetrics(
        running=_median([m.running for m in ms]),
        waiting=_median([m.waiting for m in ms]),
        kv_cache_usage=_median(kv) if kv else None,
        ttft_p90_s=_median(ttft) if ttft else None,
        engine="median",
    )
