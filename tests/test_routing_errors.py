"""A plugin that fails at run time costs its request the profile, never the answer; plugins
added through the registry get their hooks called.

The plugins here are registered the way a new one is: a class plus one registry line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from router_ext.config import RouterConfig
from router_ext.envoy_adapter.extproc import ExtProcServicer
from router_ext.fleet.snapshot import PodStatus, Snapshot
from router_ext.routing import Decision, PoolView, Prepared, RequestContext, Scorer, registry
from router_ext.routing.router import Router
from router_ext.routing.scorers import RequestsScorer
from router_ext.routing.stats import HotPathStats
from tests.helpers import lifecycle, ok, pods
from tests.test_extproc import headers, set_headers


class BoomScorer(Scorer[None]):
    """Judges fine on the first call of each request pair, raises on the second."""

    calls = 0

    def prepare(self, snap: Snapshot) -> Prepared[None]:
        return Prepared(None)

    def score(
        self, ctx: RequestContext, view: PoolView, state: None, candidates: Sequence[PodStatus]
    ) -> Sequence[float | None] | None:
        BoomScorer.calls += 1
        if BoomScorer.calls % 2 == 0:
            raise ZeroDivisionError("a bug in a scorer")
        return [1.0 / (1 + p.index) for p in candidates]


class BoomRankScorer(RequestsScorer):
    """A single-scorer profile takes the fast path (Scorer.rank): a bug there too."""

    def rank(self, ctx: RequestContext, view: PoolView, state: Any, candidates: Any) -> Any:
        raise KeyError("a bug in a fast path")


class CountingScorer(Scorer[None]):
    """Abstains for every pod; counts the hooks it gets."""

    picked: list[str] = []
    completed: list[str] = []

    def prepare(self, snap: Snapshot) -> Prepared[None]:
        return Prepared(None)

    def score(
        self, ctx: RequestContext, view: PoolView, state: None, candidates: Sequence[PodStatus]
    ) -> Sequence[float | None] | None:
        return [None] * len(candidates)

    def on_pick(self, ctx: RequestContext, view: PoolView, decision: Decision) -> None:
        CountingScorer.picked.append(decision.pods[0].address)

    def on_completion(self, address: str) -> None:
        CountingScorer.completed.append(address)


@pytest.fixture(autouse=True)
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry.PLUGINS, "boom", f"{__name__}:BoomScorer")
    monkeypatch.setitem(registry.PLUGINS, "counting", f"{__name__}:CountingScorer")
    monkeypatch.setitem(registry.PLUGINS, "boom-rank", f"{__name__}:BoomRankScorer")
    registry.plugin_class.cache_clear()
    yield
    registry.plugin_class.cache_clear()


def router(profile: dict[str, Any]) -> Router:
    cfg = RouterConfig.model_validate(
        {"routing": {"profiles": {"p": profile}, "default_strategy": "p"}}
    )
    lc, clk = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t, 1, 0, 0.1) for p in ps])
    r = Router(cfg, HotPathStats(), seed=1)
    r.publish(lc.build_snapshot())
    return r


def test_a_raising_scorer_degrades_that_request_counted_and_logged_once(caplog: Any) -> None:
    r = router({"scorers": [{"name": "boom"}, {"name": "requests"}]})
    servicer = ExtProcServicer(r)
    with caplog.at_level("WARNING"):
        answers = [set_headers(servicer.handle_request_headers(headers().request_headers))]
        answers += [
            set_headers(servicer.handle_request_headers(headers().request_headers))
            for _ in range(9)
        ]
    used = [a["x-routing-strategy"] for a in answers]
    assert used == [b"p", b"p>random"] * 5  # every other request hit the bug
    assert all(len(a["x-target-pod"].split(b",")) == 3 for a in answers)  # always an answer
    assert r.stats.degraded == {("p", "score_error"): 5}
    assert r.stats.decisions == {("p", "picked"): 5, ("p>random", "degraded"): 5}
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1 and "scorer boom raised" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # with the traceback, once
    # Not a state that toggles: no "degraded"/"again" lines per error.
    assert not [m for m in caplog.messages if "uses live metrics again" in m]


def test_a_raising_fast_path_scorer_degrades_too(caplog: Any) -> None:
    r = router({"scorers": [{"name": "boom-rank", "weight": 2}]})
    assert r.view.plans["p"].ranked is not None
    with caplog.at_level("ERROR"):
        ds = [r.route(RequestContext()) for _ in range(3)]
    assert {(d.used, d.degraded) for d in ds if isinstance(d, Decision)} == {
        ("p>random", "score_error")
    }
    assert [m for m in caplog.messages if "raised" in m] == [
        "profile p: scorer boom-rank raised; such decisions degrade to random (logged once per "
        "profile and plugin)"
    ]


def test_scorers_abstaining_for_every_candidate_degrade_with_a_reason() -> None:
    r = router({"scorers": [{"name": "counting"}]})
    d = r.route(RequestContext())
    assert isinstance(d, Decision) and (d.used, d.degraded) == ("p>random", "scorers_abstained")


def test_plugin_hooks_see_picks_and_completions() -> None:
    CountingScorer.picked.clear()
    CountingScorer.completed.clear()
    r = router({"scorers": [{"name": "counting"}, {"name": "requests"}]})
    d = r.route(RequestContext())
    assert isinstance(d, Decision) and d.used == "p"
    r.completed(d.pods[0].address)
    assert CountingScorer.picked == [d.pods[0].address]
    assert CountingScorer.completed == [d.pods[0].address]


def test_every_registry_entry_resolves_to_a_plugin_of_its_kind() -> None:
    kinds = {name: registry.plugin_class(name).kind for name in registry.PLUGINS}
    assert set(kinds.values()) == {"filter", "scorer", "picker"}
