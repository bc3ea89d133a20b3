"""Pod lifecycle: every state transition, logged once, and the conservative estimates."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from router_ext.config import RouterConfig, RoutingSection, ScrapeSection
from router_ext.fleet.lifecycle import RAMP_FLOOR, PodLifecycle, conservative_estimate
from router_ext.fleet.snapshot import (
    EngineMetrics,
    ModelCard,
    Pod,
    PodState,
    PodStatus,
    ScrapeResult,
    Snapshot,
)
from tests.helpers import FakeClock, fail, lifecycle, ok, pods


def states(lc) -> dict[str, PodState]:  # type: ignore[no-untyped-def]
    return {p.pod.name: p.state for p in lc.build_snapshot().pods}


def test_cold_warm_stale_warm() -> None:
    lc, clk = lifecycle()
    ps = pods(1)
    lc.apply_discovery(ps)
    assert states(lc) == {"pod-0": PodState.COLD}
    lc.apply_scrape([ok(ps[0], clk.t, running=1)])
    assert states(lc) == {"pod-0": PodState.WARM}
    clk.advance(RouterConfig().scrape.stale_after_s + 0.1)
    assert states(lc) == {"pod-0": PodState.STALE}
    lc.apply_scrape([ok(ps[0], clk.t)])
    assert states(lc) == {"pod-0": PodState.WARM}


def test_metrics_http_error_goes_stale_not_unreachable() -> None:
    lc, clk = lifecycle()
    ps = pods(1)
    lc.apply_discovery(ps)
    lc.apply_scrape([fail(ps[0], clk.t, "http_503")])
    snap = lc.build_snapshot()
    assert snap.pods[0].state is PodState.COLD  # answers, but no metrics yet
    lc.apply_scrape([ok(ps[0], clk.t)])
    for _ in range(5):
        clk.advance(0.5)
        lc.apply_scrape([fail(ps[0], clk.t, "http_500")])
    assert states(lc) == {"pod-0": PodState.STALE}


def test_refused_is_unreachable_at_once_and_readmitted() -> None:
    lc, clk = lifecycle()
    ps = pods(2)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    lc.apply_scrape([fail(ps[0], clk.t, "refused"), ok(ps[1], clk.t)])
    snap = lc.build_snapshot()
    assert snap.pods[0].state is PodState.UNREACHABLE
    assert [p.pod.name for p in snap.routable] == ["pod-1"]
    lc.apply_scrape([ok(ps[0], clk.t), ok(ps[1], clk.t)])
    assert states(lc)["pod-0"] is PodState.WARM


def test_timeouts_need_threshold() -> None:
    cfg = RouterConfig(scrape=ScrapeSection(unreachable_after_timeouts=2))
    lc, clk = lifecycle(cfg)
    ps = pods(1)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(ps[0], clk.t)])
    lc.apply_scrape([fail(ps[0], clk.t, "timeout")])
    assert states(lc)["pod-0"] is PodState.WARM
    lc.apply_scrape([fail(ps[0], clk.t, "timeout")])
    assert states(lc)["pod-0"] is PodState.UNREACHABLE


def test_envoy_feedback_marks_unreachable() -> None:
    lc, clk = lifecycle()
    ps = pods(2)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    assert lc.mark_unreachable(ps[1].address, "envoy: connect failure")
    assert not lc.mark_unreachable(ps[1].address, "again")  # already out: no new event
    assert not lc.mark_unreachable("10.9.9.9:1", "not a pod")
    assert states(lc)["pod-1"] is PodState.UNREACHABLE


def test_draining_and_not_ready_from_discovery() -> None:
    lc, clk = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    lc.apply_discovery([ps[0], replace(ps[1], draining=True), replace(ps[2], ready=False)])
    snap = lc.build_snapshot()
    assert [p.state for p in snap.pods] == [PodState.WARM, PodState.DRAINING, PodState.NOT_READY]
    assert [p.pod.name for p in snap.routable] == ["pod-0"]
    assert [p.pod.name for p in snap.draining] == ["pod-1"]


def test_ready_again_restarts_cold_and_slow_start() -> None:
    cfg = RouterConfig(routing=RoutingSection(slow_start_s=10))
    lc, clk = lifecycle(cfg)
    ps = pods(2)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    lc.apply_discovery([ps[0], replace(ps[1], ready=False)])
    clk.advance(1)
    lc.apply_discovery(ps)
    snap = lc.build_snapshot()
    assert snap.pods[1].state is PodState.COLD  # old metrics are not trusted after a restart
    assert snap.pods[1].ramp == pytest.approx(RAMP_FLOOR)
    clk.advance(5)
    assert lc.build_snapshot().pods[1].ramp == pytest.approx(0.5)
    clk.advance(6)
    assert lc.build_snapshot().pods[1].ramp == 1.0


def test_pods_known_at_start_are_not_slow_started() -> None:
    lc, _ = lifecycle()
    lc.apply_discovery(pods(2))
    assert all(p.ramp == 1.0 for p in lc.build_snapshot().pods)


def test_new_pod_ramp_ends_early_only_when_keeping_up() -> None:
    cfg = RouterConfig(routing=RoutingSection(slow_start_s=10))
    lc, clk = lifecycle(cfg)
    ps = pods(3)
    lc.apply_discovery(ps[:2])
    lc.apply_scrape([ok(p, clk.t, running=4, waiting=3) for p in ps[:2]])
    lc.apply_discovery(ps)
    clk.advance(6)
    # Idle-looking new pod: the one a metric strategy would flood. The ramp goes on.
    lc.apply_scrape([ok(p, clk.t, running=4, waiting=3) for p in ps[:2]] + [ok(ps[2], clk.t)])
    assert lc.build_snapshot().pods[2].ramp == pytest.approx(0.6)
    # Carrying a real share and not queueing more than the pool: keeping up, ramp ends.
    lc.apply_scrape(
        [ok(p, clk.t, running=4, waiting=3) for p in ps[:2]]
        + [ok(ps[2], clk.t, running=4, waiting=1)]
    )
    assert lc.build_snapshot().pods[2].ramp == 1.0


def test_each_state_change_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router_ext.fleet.lifecycle")
    lc, clk = lifecycle()
    ps = pods(1)
    lc.apply_discovery(ps)
    for _ in range(10):
        lc.apply_scrape([fail(ps[0], clk.t, "refused")])
        lc.build_snapshot()
    lines = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert len(lines) == 1
    assert "cold -> unreachable" in lines[0]
    assert "refused" in lines[0]


def test_coldstart_duration_reported_once() -> None:
    lc, clk = lifecycle()
    seen: list[float] = []
    lc.coldstart_listeners.append(lambda pod, s: seen.append(s))
    ps = pods(2)
    lc.apply_discovery(ps[:1])
    lc.apply_discovery(ps)  # pod-1 joins later: its Ready time is known
    clk.advance(7)
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    assert seen == [pytest.approx(7.0)]


def test_model_mismatch_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    lc, clk = lifecycle()
    p = replace(pods(1)[0], model="llama")
    lc.apply_discovery([p])
    r = ok(p, clk.t)
    assert r.metrics is not None
    r = replace(r, metrics=replace(r.metrics, models=frozenset({"qwen"})))
    lc.apply_scrape([r])
    lc.apply_scrape([r])
    msgs = [x.getMessage() for x in caplog.records if "reports model" in x.getMessage()]
    assert len(msgs) == 1
    assert states(lc)["pod-0"] is PodState.WARM  # still routed


def test_flapping_ready_does_not_crash_and_never_routes_not_ready() -> None:
    lc, clk = lifecycle()
    ps = pods(2)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t) for p in ps])
    for i in range(20):
        clk.advance(1)
        flag = i % 2 == 0
        lc.apply_discovery([ps[0], replace(ps[1], ready=not flag)])
        snap = lc.build_snapshot()
        names = {p.pod.name for p in snap.routable}
        assert ("pod-1" in names) == (not flag)


def test_conservative_estimates() -> None:
    median = EngineMetrics(running=4, waiting=2, kv_cache_usage=0.5)
    idle = EngineMetrics(running=0, waiting=0, kv_cache_usage=0.0)
    busy = EngineMetrics(running=8, waiting=9, kv_cache_usage=0.9)
    assert conservative_estimate(PodState.WARM, idle, median) is idle
    assert conservative_estimate(PodState.COLD, None, median) == median
    stale_idle = conservative_estimate(PodState.STALE, idle, median)
    assert stale_idle is not None
    assert (stale_idle.running, stale_idle.waiting, stale_idle.kv_cache_usage) == (4, 2, 0.5)
    stale_busy = conservative_estimate(PodState.STALE, busy, median)
    assert stale_busy is not None and stale_busy.waiting == 9
    assert conservative_estimate(PodState.COLD, None, None) is None
    assert conservative_estimate(PodState.UNREACHABLE, idle, median) is None


def test_warmup_keeps_a_new_pod_out_until_its_request_finished() -> None:
    cfg = RouterConfig.model_validate(
        {"warmup": {"enabled": True}, "routing": {"slow_start_s": 10}}
    )
    lc, clk = lifecycle(cfg)
    ps = pods(2)
    lc.apply_discovery(ps[:1])
    assert not lc.needs_warmup(ps[0].address)  # known at start-up: no warm-up
    lc.apply_discovery(ps)
    assert lc.needs_warmup(ps[1].address)
    snap = lc.build_snapshot()
    assert snap.pods[1].state is PodState.NOT_READY
    assert [p.pod.name for p in snap.routable] == ["pod-0"]
    clk.advance(3)
    lc.warmup_done(ps[1].address, ok=False, detail="HTTP 500 in 0.1s")  # admitted anyway
    snap = lc.build_snapshot()
    assert snap.pods[1].state is PodState.COLD
    assert snap.pods[1].ramp == pytest.approx(RAMP_FLOOR)  # slow start counts from warm-up end


def test_warmup_is_off_by_default() -> None:
    lc, _ = lifecycle()
    ps = pods(2)
    lc.apply_discovery(ps[:1])
    lc.apply_discovery(ps)
    assert not lc.needs_warmup(ps[1].address)
    assert lc.build_snapshot().pods[1].state is PodState.COLD


# --- feedback bounds and once-per-reason explanations (hostile-conditions issue) -------------


def _warm_pool(n: int) -> tuple[PodLifecycle, FakeClock, list[Pod]]:
    lc, clock = lifecycle()
    ps = pods(n)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clock.t) for p in ps])
    return lc, clock, ps


def test_feedback_alone_cannot_mark_more_than_the_share_or_the_last_pod() -> None:
    lc, _clock, ps = _warm_pool(4)
    share = 0.5
    assert not lc.feedback_mark_needs_corroboration(ps[0].address, share)
    assert lc.mark_unreachable(ps[0].address, "envoy: connect failure", from_feedback=True)
    assert not lc.feedback_mark_needs_corroboration(ps[1].address, share)  # 2/4 = the share
    assert lc.mark_unreachable(ps[1].address, "envoy: connect failure", from_feedback=True)
    assert lc.feedback_mark_needs_corroboration(ps[2].address, share)  # 3/4 > 0.5


def test_marking_the_last_routable_pod_always_needs_corroboration() -> None:
    lc, _clock, ps = _warm_pool(1)
    assert lc.feedback_mark_needs_corroboration(ps[0].address, 1.0)


def test_scrape_marks_do_not_use_up_the_feedback_share() -> None:
    # Pods the router itself saw refuse are facts, not feedback: a real outage of half the
    # fleet must not make the next feedback mark wait for a probe.
    lc, clock, ps = _warm_pool(4)
    lc.apply_scrape([fail(ps[0], clock.t, "refused"), fail(ps[1], clock.t, "refused")])
    assert not lc.feedback_mark_needs_corroboration(ps[2].address, 0.5)


def test_good_scrape_clears_a_feedback_mark() -> None:
    lc, clock, ps = _warm_pool(2)
    lc.mark_unreachable(ps[0].address, "envoy: reset", from_feedback=True)
    clock.advance(0.5)
    lc.apply_scrape([ok(p, clock.t) for p in ps])
    assert lc.build_snapshot().get(ps[0].address).state is PodState.WARM  # type: ignore[union-attr]
    assert not lc.feedback_mark_needs_corroboration(ps[1].address, 0.5)


def test_cold_pod_with_unusable_metrics_is_explained_once_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc, clock = lifecycle()
    ps = pods(1)
    lc.apply_discovery(ps)
    caplog.set_level(logging.INFO, logger="router_ext.fleet.lifecycle")
    caplog.clear()
    for reason in ("http_500", "http_500", "parse", "parse", "http_500"):
        clock.advance(0.5)
        lc.apply_scrape([fail(ps[0], clock.t, reason)])
    lines = [r.getMessage() for r in caplog.records if "metrics unusable" in r.getMessage()]
    assert [ln.split("(")[2].split(")")[0] for ln in lines] == ["http_500", "parse", "http_500"]
    assert all("state stays cold" in ln for ln in lines)
    assert lc.build_snapshot().pods[0].state is PodState.COLD


def test_repaired_page_is_logged_once_per_pod_and_text(caplog: pytest.LogCaptureFixture) -> None:
    lc, clock = lifecycle()
    ps = pods(1)
    lc.apply_discovery(ps)
    caplog.set_level(logging.WARNING, logger="router_ext.fleet.lifecycle")
    repaired = ScrapeResult(
        address=ps[0].address,
        ok=True,
        fetched_at=clock.t,
        duration_s=0.001,
        metrics=EngineMetrics(running=0, waiting=0),
        warning="negative vllm:num_requests_waiting clamped to 0",
    )
    for _ in range(3):
        lc.apply_scrape([repaired])
    assert caplog.text.count("metrics repaired: negative vllm:num_requests_waiting") == 1


def test_new_pod_reusing_an_address_starts_cold() -> None:
    lc, clock = lifecycle()
    old = Pod("10.0.0.1", 8000, name="vllm-a")
    lc.apply_discovery([old])
    lc.apply_scrape([ok(old, clock.t, running=7)])
    assert lc.build_snapshot().pods[0].state is PodState.WARM
    new = Pod("10.0.0.1", 8000, name="vllm-b")  # rescheduled pod, same IP:port
    lc.apply_discovery([new])
    p = lc.build_snapshot().pods[0]
    assert (p.pod.name, p.state, p.metrics) == ("vllm-b", PodState.COLD, None)
    assert p.ramp < 1.0  # and it is slow-started like any new pod
    same = Pod("10.0.0.1", 8000, name="vllm-b", ready=True)
    lc.apply_scrape([ok(same, clock.t, running=1)])
    lc.apply_discovery([same])  # the same pod listed again keeps its record
    assert lc.build_snapshot().pods[0].state is PodState.WARM


# --- served models ------------------------------------------------------------------------------

BASE = "llama-8b"


def listed(
    pod: Pod, t: float, ids: set[str], parents: dict[str, str] | None = None, **kw: float
) -> ScrapeResult:
    parents = parents or {}
    return replace(
        ok(pod, t, **kw),
        listed_models=frozenset(ids),
        listed_adapters=frozenset(parents),
        adapter_parents=tuple(sorted(parents.items())),
        identity=pod.identity,
    )


def with_lora(
    r: ScrapeResult, running: set[str], waiting: set[str] | frozenset[str] = frozenset()
) -> ScrapeResult:
    assert r.metrics is not None
    m = replace(
        r.metrics,
        models=frozenset({BASE}),
        lora_running=frozenset(running),
        lora_waiting=frozenset(waiting),
        max_lora=4,
    )
    return replace(r, metrics=m)


def by_name(snap: Snapshot) -> dict[str, PodStatus]:
    return {p.pod.name: p for p in snap.pods}


def test_served_is_every_source_and_adapters_are_the_lora_part() -> None:
    lc, clk = lifecycle()
    p = Pod("10.0.0.1", 8000, name="a", models=frozenset({"from-discovery"}))
    lc.apply_discovery([p])
    lc.apply_scrape([with_lora(listed(p, clk.t, {BASE, "sql"}, {"sql": BASE}), {"chat"}, {"math"})])
    (s,) = lc.build_snapshot().pods
    assert s.served == {"from-discovery", BASE, "sql", "chat", "math"}
    assert s.adapters == {"sql", "chat", "math"}
    # A later round that did not list again keeps the listing; the LoRA state is live.
    lc.apply_scrape([with_lora(ok(p, clk.t), set())])
    (s,) = lc.build_snapshot().pods
    assert s.served == {"from-discovery", BASE, "sql"} and s.adapters == {"sql"}


def test_failed_listing_keeps_the_last_and_is_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    lc, clk = lifecycle()
    (p,) = pods(1)
    lc.apply_discovery([p])
    lc.apply_scrape([listed(p, clk.t, {BASE})])
    timeout = replace(ok(p, clk.t), models_reason="timeout", models_error="no answer in 0.3 s")
    for _ in range(3):
        lc.apply_scrape([timeout])
    lc.apply_scrape([replace(timeout, models_reason="http_500", models_error="HTTP 500")])
    (s,) = lc.build_snapshot().pods
    assert s.served == {BASE} and s.state is PodState.WARM  # the metrics scrape stands
    assert lc.models_fetch_failures == {"timeout": 3, "http_500": 1}
    msgs = [r.getMessage() for r in caplog.records if "model list unusable" in r.getMessage()]
    assert len(msgs) == 2
    assert "(timeout): no answer in 0.3 s" in msgs[0] and "(http_500)" in msgs[1]


def test_listing_goes_with_the_pod_instance() -> None:
    lc, clk = lifecycle()
    old = Pod("10.0.0.1", 8000, name="vllm-a")
    lc.apply_discovery([old])
    lc.apply_scrape([listed(old, clk.t, {BASE})])
    assert lc.build_snapshot().pods[0].served == {BASE}
    new = Pod("10.0.0.1", 8000, name="vllm-b")  # another pod took the address
    lc.apply_discovery([new])
    assert lc.build_snapshot().pods[0].served == frozenset()
    # A listing fetched for the old pod, arriving late, is not the newcomer's.
    lc.apply_scrape([listed(old, clk.t, {BASE})])
    assert lc.build_snapshot().pods[0].served == frozenset()
    lc.apply_scrape([listed(new, clk.t, {"qwen-7b"})])
    assert lc.build_snapshot().pods[0].served == {"qwen-7b"}
    # Gone from discovery and back: listed afresh, nothing remembered.
    lc.apply_discovery([])
    lc.apply_discovery([new])
    assert lc.build_snapshot().pods[0].served == frozenset()


def test_snapshot_model_views_cover_routable_pods_only() -> None:
    lc, clk = lifecycle()
    a, b, c, dead, unknown = (
        Pod("10.0.0.1", 8000, name="a", model=BASE),
        Pod("10.0.0.2", 8000, name="b"),
        Pod("10.0.0.3", 8000, name="c", model="qwen-7b"),
        Pod("10.0.0.4", 8000, name="dead", model="mistral-7b"),
        Pod("10.0.0.5", 8000, name="unknown"),
    )
    lc.apply_discovery([a, b, c, dead, unknown])
    lc.apply_scrape(
        [
            listed(a, clk.t, {BASE, "sql"}, {"sql": BASE}),
            # b lists nothing; its engine reports the base model and runs an unlisted adapter.
            with_lora(ok(b, clk.t), {"chat"}),
            ok(c, clk.t),
            fail(dead, clk.t, "refused"),
            ok(unknown, clk.t),
        ]
    )
    snap = lc.build_snapshot()
    pods_ = by_name(snap)
    assert {k: [p.pod.name for p in v] for k, v in snap.by_model.items()} == {
        BASE: ["a", "b"],
        "sql": ["a"],
        "chat": ["b"],
        "qwen-7b": ["c"],
    }
    assert pods_["unknown"].served == frozenset()
    assert all(isinstance(p, PodStatus) for v in snap.by_model.values() for p in v)
    assert snap.models == (
        ModelCard(id="chat", parent=BASE, pods=1),  # its pod's only base model
        ModelCard(id=BASE, parent=None, pods=2),
        ModelCard(id="qwen-7b", parent=None, pods=1),
        ModelCard(id="sql", parent=BASE, pods=1),
    )
    assert snap.multi_model  # llama-8b and qwen-7b; mistral-7b's pod is down


def test_one_base_model_with_adapters_is_not_multi_model() -> None:
    lc, clk = lifecycle()
    a, b = pods(2)
    lc.apply_discovery([a, b])
    lc.apply_scrape(
        [listed(a, clk.t, {BASE, "sql"}, {"sql": BASE}), with_lora(ok(b, clk.t), {"sql", "chat"})]
    )
    snap = lc.build_snapshot()
    assert not snap.multi_model
    assert set(snap.by_model) == {BASE, "sql", "chat"}


def test_pool_without_any_model_information() -> None:
    lc, clk = lifecycle()
    a, b = pods(2)
    lc.apply_discovery([a, b])
    lc.apply_scrape([ok(a, clk.t), ok(b, clk.t)])
    snap = lc.build_snapshot()
    assert (snap.by_model, snap.models, snap.multi_model) == ({}, (), False)
    assert len(snap.routable) == 2


def test_stale_estimate_keeps_the_pods_own_facts() -> None:
    last = EngineMetrics(
        running=1, waiting=0, lora_running=frozenset({"sql"}), max_lora=2, cache_blocks=100,
        block_size=16, prefix_hits=5.0, prefix_queries=9.0, models=frozenset({BASE}),
    )  # fmt: skip
    median = EngineMetrics(running=6, waiting=2)
    est = conservative_estimate(PodState.STALE, last, median)
    assert est is not None and (est.running, est.waiting) == (6, 2)
    assert (est.lora_running, est.max_lora, est.cache_blocks, est.block_size) == (
        {"sql"},
        2,
        100,
        16,
    )
    assert (est.prefix_hits, est.prefix_queries, est.models) == (5.0, 9.0, {BASE})
