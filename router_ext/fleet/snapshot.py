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
    ready: bool = True
    draining: bool = False
    # Discovery's unique id for this pod instance (Kubernetes: metadata.uid); optional.
    uid: str = ""
    # "ip:port" ("[v6]:port"), formatted once: the hot path reads it on every request.
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")

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
    models: frozenset[str] = frozenset()
    num_engines: int = 1


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

    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", self.pod.address)


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
        )

    def get(self, address: str) -> PodStatus | None:
        i = self.index_of.get(address)
        return None if i is None else self.pods[i]


EMPTY_SNAPSHOT = Snapshot(version=0, created_at=0.0, pods=())


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
