"""Built-in pickers: turn (candidates, scores) into an order, best first."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router_ext.fleet.snapshot import PodStatus
from router_ext.routing.context import RequestContext
from router_ext.routing.plugins import Picker
from router_ext.routing.view import PoolView

#: Entries a score-less picker returns beyond `want`: spares for the slow-start cap.
SPARE = 2


def uniform(candidates: Sequence[PodStatus], rng: random.Random, want: int) -> list[PodStatus]:
    """`want` pods plus the slow-start spares, uniformly: every picker's answer without scores."""
    return rng.sample(candidates, min(len(candidates), want + SPARE))


class RandomPicker(Picker):
    """Uniform, ignoring scores: O(want) whatever the number of candidates."""

    def pick(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        scores: list[float] | None,
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        return uniform(candidates, rng, want)


class RoundRobinPicker(Picker):
    """The next candidate after the last one picked, in snapshot order, ignoring scores."""

    def __init__(self, params: object = None) -> None:
        super().__init__(params)
        self._next = 0

    def pick(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        scores: list[float] | None,
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        n = len(candidates)
        i = self._next % n
        self._next = i + 1
        return [candidates[(i + j) % n] for j in range(min(n, want + SPARE))]


class MaxScorePicker(Picker):
    """Highest score first; a tie for first place is broken uniformly at random (the others
    keep the sample's order, itself random). Without scores: uniform, as `random`."""

    order_only = True

    def pick(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        scores: list[float] | None,
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        if scores is None:
            return uniform(candidates, rng, want)
        return self.pick_ranked(ctx, view, candidates, [-x for x in scores], rng, want)

    def pick_ranked(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        keys: Sequence[float],
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        n = len(keys)
        # sort() is stable: equal keys stay in sample order (itself random).
        idx = sorted(range(n), key=keys.__getitem__)
        best = keys[idx[0]]
        if n > 1 and keys[idx[1]] == best:  # a tie for first place: break it at random
            t = 2
            while t < n and keys[idx[t]] == best:
                t += 1
            j = int(rng.random() * t) % t
            idx[0], idx[j] = idx[j], idx[0]
        return [candidates[i] for i in idx]


class WeightedRandomPicker(Picker):
    """Random, with each candidate's chance proportional to its score (weighted sampling
    without replacement, Efraimidis-Spirakis): spreads load where max-score would herd.
    Candidates scoring 0 (or judged by no scorer) come last. Without scores: uniform."""

    def pick(
        self,
        ctx: RequestContext,
        view: PoolView,
        candidates: Sequence[PodStatus],
        scores: list[float] | None,
        rng: random.Random,
        want: int,
    ) -> list[PodStatus]:
        if scores is None:
            return uniform(candidates, rng, want)
        r = rng.random
        keys = [r() ** (1.0 / s) if s > 0.0 else -1.0 - r() for s in scores]
        idx = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)
        return [candidates[i] for i in idx]
