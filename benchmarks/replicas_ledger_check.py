"""Diagnostic (issue 13): does every replica count every placement and completion?

Runs the shared-prefix workload (benchmarks/replicas.py part 1's fleet, 31 req/s for 20 s)
through 4 router replicas and prints each replica's replication counters. With a correct
ledger every replica reports placed/ended own = its decisions and peer = the others'.

    python -m benchmarks.replicas_ledger_check
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import shared_prefix
from benchmarks.common import RUN_DIR, wait_until
from benchmarks.replicas import PROFILE, SHARED, _stack, start_fleet, wait_all_rescraped
from benchmarks.shared_prefix import plan_for
from router_ext.harness.loadgen import run_schedule


def main() -> None:
    wd = RUN_DIR / "replicas-ledger-check"
    fleet = start_fleet(wd / "fleet", shared_prefix.PODS, shared_prefix.sim_args())
    try:
        st = _stack(wd / "stack", fleet, 4, PROFILE[SHARED], {"routing": {"seed": 7}})
        try:
            st.start(timeout=90)
            wait_all_rescraped(st)
            plan = plan_for(SHARED, 31.0, 20, 100, 5000, salt=False)
            rs = asyncio.run(run_schedule(st.url, plan, timeout_s=60))
            print(f"requests {len(rs)}, failed {sum(1 for r in rs if not r.ok)}")

            def ended(i: int) -> float:
                return sum(
                    s.value
                    for fam in text_string_to_metric_families(st.router_metrics_of(i))
                    if fam.name == "router_ext_replication_entries"
                    for s in fam.samples
                    if s.labels.get("kind") == "ended"
                )

            # The last entries arrive within the access log's flush interval, not at once.
            wait_until(
                lambda: all(ended(i) >= len(rs) for i in range(st.n_routers)),
                10,
                "every replica to receive every request's end",
                step=0.05,
            )
            for i in range(st.n_routers):
                out = [
                    f"{s.name}{dict(s.labels)}={s.value:g}"
                    for fam in text_string_to_metric_families(st.router_metrics_of(i))
                    if fam.name.startswith("router_ext_replication")
                    for s in fam.samples
                    if s.value
                ]
                print(f"replica {i}: " + ", ".join(out))
        finally:
            st.stop()
    finally:
        fleet.child.stop()


if __name__ == "__main__":
    main()
