"""Routing profiles from config: weighted scorers, filters, pickers, the client allowlist,
Explain's per-scorer view and the per-plugin cost histogram."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from router_ext.api.v1 import admin_pb2 as pb
from router_ext.app.admin import explain
from router_ext.app.telemetry import Telemetry
from router_ext.config import (
    BUILTIN_NAMES,
    STRATEGY_REQUEST_HEADER,
    ConfigError,
    RouterConfig,
    load_config,
)
from router_ext.fleet.snapshot import Snapshot
from router_ext.routing import Decision, RequestContext
from router_ext.routing.errors import ClientError
from router_ext.routing.router import Router
from router_ext.routing.stats import HotPathStats
from tests.helpers import lifecycle, ok, pods

BALANCED = {
    "scorers": [
        {"name": "queue", "weight": 2},
        {"name": "kv-cache", "weight": 2},
        {"name": "running", "weight": 1},
    ]
}


def cfg_with(**routing: Any) -> RouterConfig:
    return RouterConfig.model_validate({"routing": routing})


def snap_of(loads: list[tuple[float, float, float | None]]) -> Snapshot:
    lc, clk = lifecycle()
    ps = pods(len(loads))
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t, *load) for p, load in zip(ps, loads, strict=True)])
    return lc.build_snapshot()


def router_for(snap: Snapshot, cfg: RouterConfig, stats: HotPathStats | None = None) -> Router:
    r = Router(cfg, stats or HotPathStats(), seed=1)
    r.publish(snap)
    return r


def ask(name: str | None = None) -> RequestContext:
    return RequestContext(profile=name)


def test_a_weighted_combination_is_one_config_entry() -> None:
    # pod-0: idle queue but a full KV cache; pod-1: one waiting, KV nearly empty; pod-2: worst.
    # queue 2 + kv 2 + running 1: pod-1 = 2*0.67 + 2*0.9 + 1*1.0 beats pod-0 = 2 + 2*0.1 + 0.
    snap = snap_of([(6, 0, 0.9), (2, 1, 0.1), (6, 3, 0.5)])
    r = router_for(snap, cfg_with(profiles={"balanced": BALANCED}, default_strategy="balanced"))
    d = r.route(ask())
    assert isinstance(d, Decision) and d.used == "balanced" and not d.degraded
    assert [p.pod.name for p in d.pods] == ["pod-1", "pod-0", "pod-2"]
    # Each built-in alone ranks differently: that is what the weights trade off.
    r2 = router_for(snap, cfg_with())
    first = {n: r2.route(ask(n)) for n in ("least-queue", "least-kv-cache")}
    assert {n: d.pods[0].pod.name for n, d in first.items() if isinstance(d, Decision)} == {
        "least-queue": "pod-0",
        "least-kv-cache": "pod-1",
    }


def test_configured_profiles_are_not_client_selectable_unless_listed() -> None:
    snap = snap_of([(0, 0, 0.1), (1, 0, 0.2)])
    r = router_for(snap, cfg_with(profiles={"balanced": BALANCED}))
    res = r.route(ask("balanced"))
    assert isinstance(res, ClientError) and res.status == 400
    assert "balanced" in res.message  # the name it was asked for, and only the allowed ones:
    assert res.message.endswith("valid strategies: " + ", ".join(BUILTIN_NAMES))
    assert r.stats.decisions == {("invalid", "bad_request"): 1}

    listed = router_for(
        snap,
        cfg_with(profiles={"balanced": BALANCED}, client_selectable=["balanced", "random"]),
    )
    d = listed.route(ask("balanced"))
    assert isinstance(d, Decision) and d.used == "balanced"
    res = listed.route(ask("least-queue"))  # a built-in left off the list is refused too
    assert isinstance(res, ClientError) and res.status == 400

    # The default profile is always allowed: asking for it by name gets what not asking gets.
    default = router_for(snap, cfg_with(default_strategy="least-queue", client_selectable=[]))
    assert isinstance(default.route(ask("least-queue")), Decision)
    assert isinstance(default.route(ask("random")), ClientError)


def test_the_scorer_fast_path_answers_exactly_like_full_scoring() -> None:
    # Built-ins with one scorer and max-score skip mapping loads onto [0, 1] on the hot path.
    # Forcing full scoring must give the same answers, pick for pick.
    rng = random.Random(7)
    loads = [(rng.randint(0, 9), rng.choice((0, 0, 1, 4)), rng.random()) for _ in range(40)]
    snap = snap_of(loads)  # type: ignore[arg-type]
    for name in ("least-request", "least-queue", "least-kv-cache"):
        fast = router_for(snap, cfg_with())
        full = router_for(snap, cfg_with())
        full.view.plans = {
            n: dataclasses.replace(p, ranked=None) for n, p in full.view.plans.items()
        }
        assert fast.view.plans[name].ranked is not None
        for _ in range(300):
            a, b = fast.route(ask(name)), full.route(ask(name))
            assert isinstance(a, Decision) and isinstance(b, Decision)
            assert a.header_value == b.header_value, name


def test_low_queue_filter_narrows_but_never_empties() -> None:
    prof = {"filters": [{"name": "low-queue", "params": {"max_waiting": 2}}], **BALANCED}
    cfg = cfg_with(profiles={"lq": prof}, default_strategy="lq")
    r = router_for(snap_of([(1, 5, 0.0), (8, 0, 0.9), (1, 4, 0.0)]), cfg)
    for _ in range(20):
        d = r.route(ask())
        assert isinstance(d, Decision) and d.pods[0].pod.name == "pod-1"
    everyone_queues = router_for(snap_of([(1, 5, 0.0), (1, 9, 0.9)]), cfg)
    d = everyone_queues.route(ask())
    assert isinstance(d, Decision) and d.used == "lq" and d.pods[0].pod.name == "pod-0"


def test_weighted_random_spreads_by_score() -> None:
    prof = {"scorers": [{"name": "requests"}], "picker": {"name": "weighted-random"}}
    r = router_for(
        snap_of([(0, 0, 0.0), (40, 0, 0.0), (80, 0, 0.0)]),
        cfg_with(profiles={"wr": prof}, default_strategy="wr"),
    )
    c: Counter[str] = Counter()
    for _ in range(300):
        d = r.route(ask())
        assert isinstance(d, Decision)
        c[d.pods[0].pod.name] += 1
        r.completed(d.pods[0].address)  # keep the loads where they are
    # Scores 1, 0.5, 0: the busiest pod (score 0) is never primary; the others share.
    assert c["pod-2"] == 0 and c["pod-0"] > c["pod-1"] > 40, c


def test_every_scorer_abstaining_degrades_visibly_and_logs_once(caplog: Any) -> None:
    kv_only = {"scorers": [{"name": "kv-cache", "weight": 3}]}
    cfg = cfg_with(
        profiles={"kv3": kv_only, "balanced": BALANCED},
        default_strategy="kv3",
        client_selectable=["balanced"],
    )
    r = router_for(snap_of([(1, 0, None), (2, 0, None)]), cfg)  # engines export no KV use
    with caplog.at_level("WARNING", logger="router_ext.routing.router"):
        ds = [r.route(ask()) for _ in range(20)]
    assert {(d.used, d.degraded) for d in ds if isinstance(d, Decision)} == {
        ("kv3>random", "no_kv_metric")
    }
    assert r.stats.degraded == {("kv3", "no_kv_metric"): 20}
    assert len([m for m in caplog.messages if "degraded" in m]) == 1
    # A profile with another scorer that can judge the pool goes on without the KV one.
    d = r.route(ask("balanced"))
    assert isinstance(d, Decision) and d.used == "balanced" and not d.degraded


def test_explain_shows_each_scorers_score_per_pod() -> None:
    cfg = cfg_with(profiles={"balanced": BALANCED}, client_selectable=["balanced"])
    r = router_for(snap_of([(6, 0, 0.9), (2, 1, 0.1), (6, 3, 0.5)]), cfg)
    e = explain(r, [(STRATEGY_REQUEST_HEADER, "balanced")])
    assert e.outcome == pb.EXPLAIN_OUTCOME_PICKED and e.strategy_used == "balanced"
    assert [c.name for c in e.candidates] == ["pod-1", "pod-0", "pod-2"]
    assert [c.position for c in e.candidates] == [0, 1, 2]
    for c in e.candidates:
        assert [(s.scorer, s.weight) for s in c.scores] == [
            ("queue", 2.0),
            ("kv-cache", 2.0),
            ("running", 1.0),
        ]
        assert all(0.0 <= s.score <= 1.0 for s in c.scores)
        assert c.total == pytest.approx(sum(s.weight * s.score for s in c.scores))
        assert c.score == pytest.approx(5.0 - c.total)  # shortfall: lower is better
        assert c.score_basis == "live"
    kv = {c.name: c.scores[1].score for c in e.candidates}
    assert kv == pytest.approx({"pod-0": 0.1, "pod-1": 0.9, "pod-2": 0.5})
    assert r.stats.decisions == {} and sum(r.view.picks) == 0  # explaining routed nothing


def test_plugin_costs_are_a_histogram_by_plugin_and_phase() -> None:
    tel = Telemetry()
    r = router_for(
        snap_of([(1, 0, 0.1), (2, 0, 0.2)]),
        cfg_with(profiles={"balanced": BALANCED}, client_selectable=["balanced"]),
        tel.hot,
    )
    for _ in range(64):
        assert isinstance(r.route(ask("balanced")), Decision)
    text = generate_latest(tel.registry).decode()
    for plugin, phase in (
        ("queue", "prepare"),
        ("queue", "score"),
        ("kv-cache", "score"),
        ("running", "score"),
        ("max-score", "pick"),
    ):
        line = f'router_ext_plugin_duration_seconds_count{{phase="{phase}",plugin="{plugin}"}}'
        assert line in text, (plugin, phase)
    assert "router_ext_decision_duration_seconds_count 64.0" in text


def test_per_pod_pick_series_go_when_the_pod_leaves() -> None:
    tel = Telemetry()
    lc, clk = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t, 1, 0, 0.1) for p in ps])
    r = router_for(lc.build_snapshot(), cfg_with(default_strategy="round-robin"), tel.hot)
    for _ in range(6):
        r.route(ask())
    assert set(tel.hot.picks) == {p.address for p in ps}
    lc.apply_discovery(ps[:2])  # pod-2 leaves discovery
    r.publish(lc.build_snapshot())
    assert set(tel.hot.picks) == {p.address for p in ps[:2]}
    text = generate_latest(tel.registry).decode()
    assert ps[2].address not in text and ps[0].address in text


@pytest.mark.parametrize(
    ("routing", "needle"),
    [
        ("profiles: {p: {scorers: [{name: queu}]}}", "routing.profiles.p.scorers.0"),
        ("profiles: {p: {scorers: [{name: queu}]}}", "unknown scorer 'queu'"),
        (
            "profiles: {p: {filters: [{name: low-queue, params: {max_wait: 1}}], "
            "picker: {name: random}}}",
            "params.max_wait",
        ),
        ("profiles: {p: {picker: {name: queue}}}", "unknown picker 'queue'"),
        (
            "profiles: {p: {filters: [{name: low-queue, params: {max_waiting: 1}}]}}",
            "routing.profiles.p",
        ),
        ("profiles: {p: {filters: []}}", "needs at least one scorer or a picker"),
        ("profiles: {p: {scorers: [{name: queue, weight: 0}]}}", "scorers.0.weight"),
        ("profiles: {p: {scorers: [{name: queue, weight: -1}]}}", "greater than 0"),
        ("profiles: {p: {scorers: [{name: queue, foo: 1}]}}", "scorers.0.foo"),
        ("profiles: {random: {picker: {name: random}}}", "'random' is a built-in profile"),
        ("client_selectable: [nope]", "routing.client_selectable"),
        ("default_strategy: balanced", "unknown strategy 'balanced'"),
    ],
)
def test_bad_profiles_are_refused_at_start_with_the_field_named(
    tmp_path: Path, routing: str, needle: str
) -> None:
    f = tmp_path / "router-ext.yaml"
    f.write_text("routing:\n  " + routing + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value)


def test_a_good_profiles_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "router-ext.yaml"
    f.write_text(
        "routing:\n"
        "  default_strategy: balanced\n"
        "  client_selectable: [balanced, least-request]\n"
        "  profiles:\n"
        "    balanced:\n"
        "      filters: [{name: low-queue, params: {max_waiting: 8}}]\n"
        "      scorers:\n"
        "        - {name: queue, weight: 2}\n"
        "        - {name: kv-cache, weight: 2}\n"
        "        - {name: running, weight: 1}\n"
        "      picker: {name: max-score}\n"
    )
    cfg = load_config(f)
    r = Router(cfg, HotPathStats())
    assert r.profiles["balanced"].scorers[0][1] == 2.0
    assert set(r.selectable) == {"balanced", "least-request"}
