"""Built-in filters."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from router_ext.fleet.snapshot import PodStatus
from router_ext.routing.context import RequestContext
from router_ext.routing.plugins import Filter, PluginParams
from router_ext.routing.view import PoolView


class LowQueueFilter(Filter):
    """Keeps candidates whose queue (live, or the conservative estimate for cold and stale
    pods) is below `max_waiting`; pods nothing is known about are kept. Like llm-d's
    low-queue filter: let scorers choose among pods that are not already queueing."""

    class Params(PluginParams):
        max_waiting: float = Field(
            gt=0, allow_inf_nan=False, description="Drop candidates with this many waiting."
        )

    params: Params

    def filter(
        self, ctx: RequestContext, view: PoolView, candidates: Sequence[PodStatus]
    ) -> Sequence[PodStatus]:
        limit = self.params.max_waiting
        return [p for p in candidates if p.score_metrics is None or p.score_metrics.waiting < limit]
