"""Strategies over in-memory snapshots: picks, fallbacks, degradation and the no-metrics case."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from router_ext.config import STRATEGY_NAMES, RouterConfig, RoutingSection
from router_ext.fleet.snapshot import PodState
from router_ext.routing import Decision, NoPodError, PoolView, RequestContext, build_profiles
from router_ext.routing.errors import ClientError
from router_ext.routing.router import NotReady, Router
from router_ext.routing.stats import HotPathStats
from tests.helpers import fail, lifecycle, ok, pods

METRIC = ("least-request", "least-kv-cache", "least-queue")
NO_HEADERS = RequestContext()


def snapshot_with(loads: list[tuple[float, float, float] | None], cfg: RouterConfig | None = None):  # type: ignore[no-untyped-def]
    """loads[i] = (running, waiting, kv) for a warm pod, or None for a cold pod."""
    lc, clk = lifecycle(cfg)
    ps = pods(len(loads))
    lc.apply_discovery(ps)
    # Cold pods answer /metrics with 503 (vLLM still starting): scraped, but no metrics yet.
    lc.apply_scrape(
        [
            ok(p, clk.t, *load) if load else fail(p, clk.t, "http_503")
            for p, load in zip(ps, loads, strict=True)
        ]
    )
    return lc.build_snapshot(), lc, clk, ps


def pick_many(name: str, snap, n: int, cfg: RoutingSection | None = None, seed: int = 1):  # type: ignore[no-untyped-def]
    profile = build_profiles(cfg or RoutingSection())[name]
    rng = random.Random(seed)
    out: list[Decision] = []
    view = PoolView(snap)
    for _ in range(n):
        out.append(profile.decide(NO_HEADERS, view, rng))
    return out


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_primary_and_distinct_fallbacks(name: str) -> None:
    snap, *_ = snapshot_with([(1, 0, 0.1)] * 5)
    for d in pick_many(name, snap, 50):
        assert len(d.pods) == 3
        assert len({p.address for p in d.pods}) == 3
        assert d.header_value.count(",") == 2
        assert d.used == name and not d.degraded


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_fewer_pods_fewer_entries(name: str) -> None:
    snap, *_ = snapshot_with([(1, 0, 0.1)] * 2)
    assert {len(d.pods) for d in pick_many(name, snap, 10)} == {2}
    snap1, *_ = snapshot_with([(1, 0, 0.1)])
    assert {len(d.pods) for d in pick_many(name, snap1, 10)} == {1}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_never_routes_to_dead_or_not_ready_and_draining_only_last(name: str) -> None:
    lc, clk = lifecycle()
    ps = pods(5)
    lc.apply_discovery(
        [ps[0], ps[1], replace(ps[2], draining=True), replace(ps[3], ready=False), ps[4]]
    )
    lc.apply_scrape([ok(p, clk.t, 1, 0, 0.1) for p in ps])
    lc.apply_scrape([fail(ps[4], clk.t, "refused")])
    snap = lc.build_snapshot()
    for d in pick_many(name, snap, 50):
        names = [p.pod.name for p in d.pods]
        assert names[0] in ("pod-0", "pod-1")
        assert "pod-3" not in names and "pod-4" not in names
        assert names == [n for n in names if n != "pod-2"] + (["pod-2"] if "pod-2" in names else [])


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_only_draining_left_still_serves(name: str) -> None:
    lc, clk = lifecycle()
    ps = pods(2)
    lc.apply_discovery([replace(p, draining=True) for p in ps])
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    d = pick_many(name, lc.build_snapshot(), 1)[0]
    assert {p.pod.name for p in d.pods} == {"pod-0", "pod-1"}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_empty_pool_raises(name: str) -> None:
    snap, *_ = snapshot_with([])
    with pytest.raises(NoPodError):
        pick_many(name, snap, 1)


@pytest.mark.parametrize(
    ("name", "loaded"),
    [
        ("least-queue", (8, 12, 0.8)),
        ("least-kv-cache", (8, 0, 0.8)),
        ("least-request", (8, 12, 0.8)),
    ],
)
def test_metric_strategies_pick_the_idle_pod(name: str, loaded: tuple[float, float, float]) -> None:
    snap, *_ = snapshot_with([loaded, (0, 0, 0.0)])
    for d in pick_many(name, snap, 5):
        assert d.pods[0].pod.name == "pod-1"
        assert d.pods[1].pod.name == "pod-0"  # the loaded pod is still the fallback


def test_least_queue_prefers_no_waiting_over_fewer_running() -> None:
    snap, *_ = snapshot_with([(2, 1, 0.1), (7, 0, 0.1)])
    assert pick_many("least-queue", snap, 1)[0].pods[0].pod.name == "pod-1"


def test_picks_since_scrape_spread_load() -> None:
    # Equal pods: without counting our own picks, one pod would take every request until the
    # next scrape. With them, 40 picks over 4 equal pods are spread evenly.
    snap, *_ = snapshot_with([(2, 0, 0.2)] * 4)
    for name in ("least-request", "least-queue"):
        c = Counter(d.pods[0].pod.name for d in pick_many(name, snap, 40))
        assert set(c.values()) == {10}, (name, c)
    c = Counter(d.pods[0].pod.name for d in pick_many("least-kv-cache", snap, 40))
    assert max(c.values()) - min(c.values()) <= 1


@pytest.mark.parametrize("name", METRIC)
def test_no_metrics_anywhere_degrades_to_random(name: str) -> None:
    snap, *_ = snapshot_with([None, None, None, None])
    ds = pick_many(name, snap, 400)
    assert {d.used for d in ds} == {f"{name}>random"}
    assert {d.degraded for d in ds} == {"no_fresh_metrics"}
    c = Counter(d.pods[0].pod.name for d in ds)
    assert len(c) == 4 and min(c.values()) > 60  # spread, not one "idle-looking" winner


@pytest.mark.parametrize("name", METRIC)
def test_cold_pod_is_neither_flooded_nor_starved(name: str) -> None:
    # Three warm pods under load and one cold pod. Cold = "looks idle" in peers (wins every
    # pick) or "unknown" (gets none). Here it competes as a median pod.
    cfg = RouterConfig()
    snap, *_ = snapshot_with([(4, 2, 0.5), (4, 2, 0.5), (5, 3, 0.6), None], cfg)
    cold = [p for p in snap.pods if p.state is PodState.COLD]
    assert len(cold) == 1
    ds = pick_many(name, snap, 60)
    share = sum(d.pods[0].pod.name == "pod-3" for d in ds) / len(ds)
    assert 0.05 < share < 0.5, share
    assert all(not d.degraded for d in ds)


@pytest.mark.parametrize("name", METRIC)
def test_stale_idle_pod_does_not_win_every_pick(name: str) -> None:
    lc, clk = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(ps[0], clk.t, 0, 0, 0.0)])  # looked idle, then went silent
    clk.advance(RouterConfig().scrape.stale_after_s + 1)
    lc.apply_scrape([ok(ps[1], clk.t, 4, 2, 0.5), ok(ps[2], clk.t, 4, 2, 0.5)])
    snap = lc.build_snapshot()
    assert snap.pods[0].state is PodState.STALE
    ds = pick_many(name, snap, 60)
    share = sum(d.pods[0].pod.name == "pod-0" for d in ds) / len(ds)
    assert share < 0.5, share


def test_least_kv_without_kv_metric_degrades() -> None:
    snap, *_ = snapshot_with([(1, 0, None), (2, 0, None)])
    d = pick_many("least-kv-cache", snap, 1)[0]
    assert d.used == "least-kv-cache>random" and d.degraded == "no_kv_metric"


def test_slow_start_share_ramps() -> None:
    cfg = RouterConfig(routing=RoutingSection(slow_start_s=10, seed=3))
    lc, clk = lifecycle(cfg)
    ps = pods(4)
    lc.apply_discovery(ps[:3])
    lc.apply_scrape([ok(p, clk.t, 2, 0, 0.2) for p in ps[:3]])
    lc.apply_discovery(ps)  # pod-3 joins: slow start
    shares = []
    for _ in range(4):
        lc.apply_scrape([ok(p, clk.t, 2, 0, 0.2) for p in ps])
        snap = lc.build_snapshot()
        ds = pick_many("round-robin", snap, 400, cfg.routing)
        shares.append(sum(d.pods[0].pod.name == "pod-3" for d in ds) / 400)
        clk.advance(3)
    assert 0 < shares[0] < 0.05
    assert shares == sorted(shares)
    assert shares[-1] > 0.15


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_idle_new_pods_cannot_flood_during_slow_start(name: str) -> None:
    # Four new pods that look idle join a loaded pool of four: a metric strategy ranks them
    # first, but the cap keeps each at or under its ramped fair share (+1 per window).
    cfg = RouterConfig(routing=RoutingSection(slow_start_s=10, seed=5))
    lc, clk = lifecycle(cfg)
    ps = pods(8)
    lc.apply_discovery(ps[:4])
    lc.apply_scrape([ok(p, clk.t, 8, 4, 0.8) for p in ps[:4]])
    lc.apply_discovery(ps)
    for step in range(1, 10):
        clk.advance(1)
        lc.apply_scrape([ok(p, clk.t, 8, 4, 0.8) for p in ps[:4]] + [ok(p, clk.t) for p in ps[4:]])
        snap = lc.build_snapshot()
        ramp = snap.pods[4].ramp
        assert ramp == pytest.approx(step / 10)
        ds = pick_many(name, snap, 200, cfg.routing)
        for p in ps[4:]:
            n = sum(d.pods[0].address == p.address for d in ds)
            assert n < ramp * 200 / 8 + 2, (name, step, n)


def test_sampling_keeps_large_pools_cheap_and_good() -> None:
    cfg = RoutingSection(sample_size=16)
    loads = [(8.0, 5.0, 0.9)] * 900 + [(0.0, 0.0, 0.0)] * 100
    snap, *_ = snapshot_with(loads)  # type: ignore[arg-type]
    ds = pick_many("least-queue", snap, 200, cfg)
    idle_share = sum(d.pods[0].metrics.waiting == 0 for d in ds if d.pods[0].metrics) / 200
    # 10% of pods idle; best-of-16 finds one with p = 1 - 0.9**16 = 0.81
    assert idle_share > 0.6


def _router(snap, strategy: str = "least-queue") -> Router:  # type: ignore[no-untyped-def]
    cfg = RouterConfig(routing=RoutingSection(default_strategy=strategy))
    r = Router(cfg, HotPathStats(), seed=1)
    r.publish(snap)
    return r


def test_router_unknown_strategy_is_400_naming_valid_ones() -> None:
    snap, *_ = snapshot_with([(0, 0, 0.0)])
    res = _router(snap).route(RequestContext(profile="fastest"))
    assert isinstance(res, ClientError) and res.status == 400
    body = res.body().decode()
    for n in STRATEGY_NAMES:
        assert n in body
    assert '"error"' in body and '"code"' in body


def test_router_empty_pool_is_503() -> None:
    lc, _ = lifecycle()
    lc.apply_discovery([])
    lc.apply_scrape([])
    res = _router(lc.build_snapshot()).route(NO_HEADERS)
    assert isinstance(res, ClientError) and res.status == 503


def test_router_not_ready_before_first_scrape() -> None:
    lc, _ = lifecycle()
    lc.apply_discovery(pods(2))
    assert isinstance(_router(lc.build_snapshot()).route(NO_HEADERS), NotReady)


def test_router_counts_degraded_and_cold_picks() -> None:
    snap, *_ = snapshot_with([None, None])
    r = _router(snap, "least-kv-cache")
    for _ in range(10):
        r.route(NO_HEADERS)
    assert r.stats.decisions == {("least-kv-cache>random", "degraded"): 10}
    assert r.stats.degraded == {("least-kv-cache", "no_fresh_metrics"): 10}
    assert sum(r.stats.cold_picks.values()) == 10


def test_completions_from_envoy_do_not_loosen_slow_start() -> None:
    # Access-log completions end the in-flight count (picks) but must not reopen the
    # slow-start cap, which limits the rate of new requests to a ramping pod.
    cfg = RouterConfig(routing=RoutingSection(slow_start_s=10, seed=2, default_strategy="random"))
    lc, clk = lifecycle(cfg)
    ps = pods(4)
    lc.apply_discovery(ps[:3])
    lc.apply_scrape([ok(p, clk.t, 2, 0, 0.2) for p in ps[:3]])
    lc.apply_discovery(ps)
    clk.advance(1)  # ramp 0.1
    lc.apply_scrape([ok(p, clk.t, 2, 0, 0.2) for p in ps])
    r = _router(lc.build_snapshot(), "random")
    new = 0
    for _ in range(400):
        d = r.route(NO_HEADERS)
        assert isinstance(d, Decision)
        new += d.pods[0].pod.name == "pod-3"
        r.completed(d.pods[0].address)  # every request finishes at once
    assert new < 0.1 * 400 / 4 + 2


def _saturation_router(waiting: list[float], cold: bool = False, threshold: int = 4) -> Router:
    cfg = RouterConfig(routing=RoutingSection(saturation_queue=threshold))
    lc, clk = lifecycle(cfg)
    ps = pods(len(waiting) + int(cold))
    lc.apply_discovery(ps)
    results = [ok(p, clk.t, 8, w, 0.9) for p, w in zip(ps, waiting, strict=False)]
    if cold:
        results.append(fail(ps[-1], clk.t, "http_503"))
    lc.apply_scrape(results)
    r = Router(cfg, HotPathStats(), seed=1)
    r.publish(lc.build_snapshot())
    return r


def test_saturated_fleet_sheds_with_429() -> None:
    res = _saturation_router([5, 9, 4]).route(NO_HEADERS)
    assert isinstance(res, ClientError) and res.status == 429 and res.retry_after_s == 1
    assert '"code": "all_pods_saturated"' in res.body().decode()


def test_one_pod_with_room_or_a_cold_pod_means_not_saturated() -> None:
    assert isinstance(_saturation_router([5, 3, 9]).route(NO_HEADERS), Decision)
    assert isinstance(_saturation_router([5, 9], cold=True).route(NO_HEADERS), Decision)
    assert isinstance(_saturation_router([50, 50], threshold=0).route(NO_HEADERS), Decision)


def test_explain_reports_saturation_without_routing() -> None:
    from router_ext.api.v1 import admin_pb2 as pb
    from router_ext.app.admin import explain

    r = _saturation_router([5, 9, 4])
    resp = explain(r, [])
    assert resp.outcome == pb.EXPLAIN_OUTCOME_SATURATED
    assert "saturated" in resp.error
    assert r.stats.decisions == {}  # explaining routed nothing


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_an_answer_of_unverified_pods_ends_with_a_warm_one(name: str) -> None:
    # 1 warm pod among many that never answered a scrape: however the profile ranks them,
    # Envoy's retries must reach a pod known to answer.
    snap, *_ = snapshot_with([(5, 5, 0.5)] + [None] * 40)
    warm = snap.pods[0].address
    decisions = pick_many(name, snap, 200)
    assert all(warm in d.header_value for d in decisions)
