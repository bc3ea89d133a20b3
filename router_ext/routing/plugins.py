"""Plugin interfaces: filters narrow the candidates, scorers judge them, a picker orders them.

Modelled on the llm-d endpoint picker (filters -> weighted scorers -> picker), with router-ext's
rules on top:

- Scores are in [0, 1], higher is better, so scorers of different signals can be weighted and
  summed. `None` means "abstain": the scorer cannot judge that pod (or, for the whole answer,
  any candidate). When every scorer of a profile abstains for every candidate, the decision
  visibly degrades to random (`NAME>random`) instead of pretending.
- Anything derivable from the snapshot alone is computed in `Scorer.prepare`, once per
  snapshot, at publish time: `score` runs per request on at most `routing.sample_size`
  candidates and must do no I/O, take no lock and allocate nothing that grows with the pool.
- Plugins are built once at start-up from typed parameters (`Params`, pydantic). A plugin
  keeps per-request state only in what it returns; the one exception is a picker's cursor
  (round-robin), which Explain copies before using.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from router_ext.fleet.snapshot import PodStatus, Snapshot

if TYPE_CHECKING:
    from router_ext.routing.context import RequestContext
    from router_ext.routing.stats import HotPathStats
    from router_ext.routing.view import Decision, PoolView

S = TypeVar("S")


class PluginParams(BaseModel):
    """Base of every plugin's parameters: unknown keys are a start-up error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(PluginParams):
    """For plugins without parameters."""


class Plugin:
    """Common part: a registry name, typed parameters and two optional hooks."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[PluginParams]] = NoParams
    #: Set by the registry to the name the plugin is registered under (labels, Explain).
    name: str = ""
    #: Needs the request body (the prompt): profiles using it ask Envoy for the body of
    #: completion requests under routing.max_body_bytes; others never see a body.
    reads_body: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def on_pick(self, ctx: RequestContext, view: PoolView, decision: Decision) -> None:
        """Called after every decision of a profile that uses this plugin (hot path), with
        the request it decided (a prefix index learns where each prompt went)."""

    def on_completion(self, address: str) -> None:
        """Envoy's access log reported a request to `address` finished."""

    def on_placement(self, address: str, block_chars: int, hashes: tuple[int, ...]) -> None:
        """Envoy's access log reported a placement another replica made (or one this replica
        has no record of): the prompt with this prefix chain went to `address`."""

    def bind_stats(self, stats: HotPathStats) -> None:
        """Optional: the router's counters, for a plugin that reports its own (set once at
        start-up; Explain's copies are never bound)."""


def overrides(plugin: Plugin, method: str, base: type[Plugin] | None = None) -> bool:
    """Whether the plugin implements an optional method (a hook, a fast path), so the router
    calls only the ones that do."""
    return getattr(type(plugin), method) is not getattr(base or Plugin, method)


class Filter(Plugin):
    """Narrows the candidates. Runs on the sampled candidates, before scoring.

    A filter that would leave no candidate is ignored for that request (the candidates it got
    go on): a filter narrows the choice, it never turns a servable request into an error.
    """

    kind = "filter"

    def filter(
        self, ctx: RequestContext, view: PoolView, candidates: Sequence[PodStatus]
    ) -> Sequence[PodStatus]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Prepared(Generic[S]):
    """A scorer's per-snapshot state. `abstain` non-empty: it cannot judge any pod of this
    snapshot, and why (a short fixed token such as "no_fresh_metrics": it becomes a metric
    label and the degradation reason)."""

    state: S
    abstain: str = ""


class Scorer(Plugin, Generic[S]):
    """Judges candidates: one score in [0, 1] per candidate (higher is better) or None."""

    kind = "scorer"
    #: May return None for single pods. A scorer that never does says so, and the pipeline
    #: skips the check (a scan of every score on every request).
    partial: ClassVar[bool] = True

    def prepare(self, snap: Snapshot) -> Prepared[S]:
        """Once per snapshot, off the hot path: everything that does not depend on the
        request or on this router's picks since the scrape."""
        raise NotImplementedError

    def score(
        self, ctx: RequestContext, view: PoolView, state: S, candidates: Sequence[PodStatus]
    ) -> Sequence[float | None] | None:
        """Scores aligned with `candidates`; None for a pod it cannot judge, or None instead
        of the list when it can judge none of them."""
        raise NotImplementedError

    def hint(self, ctx: RequestContext, view: PoolView, state: S) -> Sequence[PodStatus]:
        """Optional: a few pods (at most 4) this scorer would rate highly for this request, so
        they are compared even when the uniform sample missed them (the pod that holds this
        prompt's prefix, a session's pod). Pods outside the request's model pool are dropped
        by the pipeline. O(1) per request, like `score`."""
        return ()

    def rank(
        self, ctx: RequestContext, view: PoolView, state: S, candidates: Sequence[PodStatus]
    ) -> Sequence[float] | None:
        """Optional fast path: one key per candidate, lower is better, such that `score` is a
        strictly decreasing function of the key over the same candidates (equal keys, equal
        scores). When it is a profile's only scorer and the picker needs only the order of
        the scores (max-score), the hot path uses this and skips mapping onto [0, 1]: the
        answer is the same. Explain still shows `score`. None: abstain for every candidate."""
        raise NotImplementedError


class Picker(Plugin):
    """Orders the candidates, best first; the router takes the primary and fallbacks from it.

    `scores` is aligned with `candidates` (weighted sums; pods no scorer judged score -1), or
    None for a profile without scorers. Return at least `want` pods when there are that many;
    a couple more lets the slow-start cap pass over a ramping pod without a second call.
    """

    kind = "picker"
    #: The order it returns depends only on the order of the scores, not their values: it
    #: implements `pick_ranked` and takes the scorer fast path (Scorer.rank).
    order_only: ClassVar[bool] = False

    def pick(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        scores: list[float] | None,
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        raise NotImplementedError

    def pick_ranked(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        keys: Sequence[float],
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        """As `pick` with `keys` from Scorer.rank (lower is better); order-only pickers."""
        raise NotImplementedError
