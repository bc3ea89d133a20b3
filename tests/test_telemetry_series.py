"""Per-pod metric series follow discovery: a pod that leaves takes its series with it, so pod
churn cannot grow the router's /metrics without bound."""

from __future__ import annotations

from prometheus_client import generate_latest

from router_ext.app.telemetry import Telemetry
from router_ext.fleet.snapshot import Pod
from tests.helpers import fail, lifecycle, ok, pods


def exposition(t: Telemetry) -> str:
    return generate_latest(t.registry).decode()


def test_departed_pods_leave_no_series() -> None:
    t = Telemetry()
    lc, clock = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps)
    results = [ok(ps[0], clock.t), ok(ps[1], clock.t), fail(ps[2], clock.t, "http_500")]
    lc.apply_scrape(results)
    t.on_snapshot(lc.build_snapshot(), lc.state_counts())
    t.on_scrape_round(results, 0.01)
    text = exposition(t)
    for name in ("pod-0", "pod-1", "pod-2"):
        assert f'router_ext_pod_state{{pod="{name}"' in text
    assert 'router_ext_scrape_errors_total{pod="pod-2",reason="http_500"} 1.0' in text
    assert 'router_ext_pod_metrics_age_seconds{pod="pod-0"}' in text

    lc.apply_discovery(ps[:1])  # pods 1 and 2 scaled away
    t.on_snapshot(lc.build_snapshot(), lc.state_counts())
    text = exposition(t)
    assert 'pod="pod-0"' in text
    for gone in ("pod-1", "pod-2"):
        assert f'pod="{gone}"' not in text, gone


def test_churn_keeps_series_count_bounded() -> None:
    t = Telemetry()
    lc, clock = lifecycle()
    counts = []
    for wave in range(20):
        # Ten new pods (new names, new addresses) replace the last ten.
        ps = [Pod("127.0.0.1", 9000 + 10 * wave + i, name=f"w{wave}-{i}") for i in range(10)]
        lc.apply_discovery(ps)
        rs = [fail(p, clock.t, "refused") for p in ps]
        lc.apply_scrape(rs)
        t.on_snapshot(lc.build_snapshot(), lc.state_counts())
        t.on_scrape_round(rs, 0.01)
        counts.append(sum(1 for ln in exposition(t).splitlines() if 'pod="' in ln))
    assert counts[-1] == counts[0] > 0
