"""Publishing a snapshot that brings no new metrics must not forget this router's own picks.

The picks since a pod's last scrape are load its metrics cannot show yet. Many publishes bring
no new metrics (an Envoy feedback mark, a warm-up finishing, a discovery touch, a scrape of
only new pods): if each one reset the counters, every pod would look as loaded as its last
scrape again and a metric strategy would send everything to the pod that looked idle then.
"""

from __future__ import annotations

from collections import Counter

from router_ext.config import RouterConfig, RoutingSection
from router_ext.routing import Decision, RequestContext
from router_ext.routing.router import Router
from router_ext.routing.stats import HotPathStats
from tests.helpers import lifecycle, ok, pods


def _router(strategy: str = "least-request") -> Router:
    return Router(
        RouterConfig(routing=RoutingSection(default_strategy=strategy)), HotPathStats(), seed=1
    )


def test_republishing_without_new_metrics_does_not_herd_onto_one_pod() -> None:
    lc, clk = lifecycle()
    ps = pods(4)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(ps[0], clk.t, 0, 0, 0.0)] + [ok(p, clk.t, 5, 0, 0.5) for p in ps[1:]])
    r = _router()
    served: Counter[str] = Counter()
    for i in range(200):
        if i % 5 == 0:
            r.publish(lc.build_snapshot())  # same metrics, e.g. after a feedback mark
        d = r.route(RequestContext())
        assert isinstance(d, Decision)
        served[d.pods[0].pod.name] += 1
    # 200 picks on top of loads 0/5/5/5 level out at ~54 each; pod-0 takes its 5 head start.
    assert served["pod-0"] <= 60, served
    assert min(served.values()) >= 45, served


def test_a_scrape_of_only_new_pods_keeps_the_other_pods_counters() -> None:
    lc, clk = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps[:2])
    lc.apply_scrape([ok(p, clk.t, 1, 0, 0.1) for p in ps[:2]])
    r = _router()
    r.publish(lc.build_snapshot())
    for _ in range(10):
        assert isinstance(r.route(RequestContext()), Decision)
    before = {p.address: r.view.picks[p.index] for p in r.snapshot.pods}
    assert sum(before.values()) == 10
    lc.apply_discovery(ps)  # pod-2 joins and is scraped at once
    lc.apply_scrape([ok(ps[2], clk.t, 1, 0, 0.1)])
    r.publish(lc.build_snapshot())
    after = {p.address: r.view.picks[p.index] for p in r.snapshot.pods}
    assert after == {**before, ps[2].address: 0}


def test_new_metrics_for_a_pod_reset_only_that_pods_counter() -> None:
    lc, clk = lifecycle()
    ps = pods(2)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t, 1, 0, 0.1) for p in ps])
    r = _router("round-robin")
    r.publish(lc.build_snapshot())
    for _ in range(6):
        assert isinstance(r.route(RequestContext()), Decision)
    clk.advance(0.5)
    lc.apply_scrape([ok(ps[0], clk.t, 4, 0, 0.4)])  # the new metrics include those requests
    r.publish(lc.build_snapshot())
    assert [r.view.picks[p.index] for p in r.snapshot.pods] == [0, 3]
