"""Small builders shared by unit tests (no processes, no sockets)."""

from __future__ import annotations

from router_ext.config import RouterConfig
from router_ext.fleet.lifecycle import PodLifecycle
from router_ext.fleet.snapshot import EngineMetrics, Pod, ScrapeResult


class FakeClock:
    """Manual monotonic clock, so lifecycle tests control time instead of sleeping."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def pods(n: int, base_port: int = 9000) -> list[Pod]:
    return [Pod("127.0.0.1", base_port + i, name=f"pod-{i}") for i in range(n)]


def ok(
    pod: Pod, t: float, running: float = 0, waiting: float = 0, kv: float | None = 0.0
) -> ScrapeResult:
    return ScrapeResult(
        address=pod.address,
        ok=True,
        fetched_at=t,
        duration_s=0.001,
        metrics=EngineMetrics(running=running, waiting=waiting, kv_cache_usage=kv),
    )


def fail(pod: Pod, t: float, reason: str) -> ScrapeResult:
    return ScrapeResult(
        address=pod.address, ok=False, fetched_at=t, duration_s=0.001, reason=reason, error=reason
    )


def lifecycle(
    cfg: RouterConfig | None = None, clock: FakeClock | None = None
) -> tuple[PodLifecycle, FakeClock]:
    c = clock or FakeClock()
    return PodLifecycle(cfg or RouterConfig(), clock=c), c
