"""End to end with Kubernetes discovery: sim pods, the fake API server, router-ext, real Envoy.

The fake API server (router_ext/harness/kube_fake.py) stands in for a kube-apiserver, which
cannot run here (no registry reached has one; kind and k3s need Docker); it speaks the real
list/watch protocol to the router's real client (kubernetes-asyncio). Each sim pod is an
EndpointSlice of Service `vllm`, written as the EndpointSlice controller would.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router_ext.envoy_adapter.envoy_config import CLUSTER_PODS
from router_ext.harness.kube_stack import KubeStack
from router_ext.harness.loadgen import LoadSpec, Result, closed_loop
from tests.conftest import options, requires_envoy

pytestmark = [pytest.mark.e2e, requires_envoy]


@pytest.fixture
def kube_stack(tmp_path: Path) -> Iterator[Callable[..., KubeStack]]:
    stacks: list[KubeStack] = []

    def _make(**kw: Any) -> KubeStack:
        st = KubeStack(tmp_path / f"stack{len(stacks)}", options(**kw))
        stacks.append(st)
        return st.start()

    yield _make
    for st in stacks:
        st.stop()


def spec(st: KubeStack) -> LoadSpec:
    return LoadSpec(url=st.url + "/v1/chat/completions", max_tokens=8, timeout_s=20)


def failures(results: list[Result]) -> list[str]:
    return [f"{r.status} {r.error} via {r.served_by}" for r in results if not r.ok]


def envoy_pods(st: KubeStack) -> set[str]:
    return set(st.envoy.cluster_hosts(CLUSTER_PODS))


def pod_state(st: KubeStack, name: str) -> str:
    """The state the router reports for pod `name` (router_ext_pod_state), "" if absent."""
    head = f'router_ext_pod_state{{pod="{name}",state="'
    for line in st.router_metrics().splitlines():
        if line.startswith(head):
            return line[len(head) :].split('"', 1)[0]
    return ""


async def more_served(served: Counter[str], n: int, what: str) -> None:
    """Until `n` more requests have been answered: the window a "never routed to" check covers."""
    target = sum(served.values()) + n
    await until(lambda: sum(served.values()) >= target, 15, what)


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_pods_added_drained_deleted_and_recreated_under_load(kube_stack) -> None:  # type: ignore[no-untyped-def]
    st = kube_stack(pods=3)
    served: Counter[str] = Counter()
    seen: list[Result] = []

    def on_result(r: Result) -> None:
        served.update([r.served_by])
        seen.append(r)

    stop = asyncio.Event()
    load = asyncio.create_task(closed_loop(spec(st), 8, stop=stop, on_result=on_result))
    try:
        # added not ready, then made ready: gets traffic
        info = await asyncio.to_thread(st.control, "POST", "/pods", {"name": "pod-3"})
        st.pods["pod-3"] = info["address"]
        await asyncio.to_thread(st.register, "pod-3", info["address"], ready=False)
        await until(lambda: pod_state(st, "pod-3") == "not_ready", 10, "pod-3 seen not ready")
        await more_served(served, 100, "100 requests while pod-3 is not ready")
        assert served["pod-3"] == 0, "a not-ready pod was routed to"
        await asyncio.to_thread(st.register, "pod-3", info["address"])
        await until(lambda: served["pod-3"] > 5, 10, "traffic to the new ready pod")

        # pod-0 terminating (still serving: draining), then not serving, then gone
        addr0 = st.pods["pod-0"]
        await asyncio.to_thread(
            st.register, "pod-0", addr0, ready=False, serving=True, terminating=True
        )
        await until(lambda: pod_state(st, "pod-0") == "draining", 10, "pod-0 seen draining")
        await asyncio.to_thread(
            st.register, "pod-0", addr0, ready=False, serving=False, terminating=True
        )
        await until(lambda: addr0 not in envoy_pods(st), 10, "pod-0 out of Envoy")
        # Requests sent before this moment may still be running on pod-0 and finish after it
        # (it was draining, not dead): only a request *sent* after pod-0 left Envoy counts.
        gone_at = time.monotonic()
        await more_served(served, 100, "100 requests after pod-0 left Envoy")
        late = [r for r in seen if r.started > gone_at and r.served_by == "pod-0"]
        assert late == [], "a terminated pod got requests sent after it left Envoy"
        await asyncio.to_thread(st.unregister, "pod-0")
        await asyncio.to_thread(st.control, "DELETE", "/pods/pod-0?grace=2")

        # a new pod at the same IP and port, with a new UID: starts cold, then serves
        port = int(addr0.rpartition(":")[2])
        await asyncio.to_thread(st.control, "POST", "/pods", {"name": "pod-0b", "port": port})
        st.pods["pod-0b"] = addr0
        await asyncio.to_thread(st.register, "pod-0b", addr0, new_uid=True)
        await until(lambda: served["pod-0b"] > 5, 10, "traffic to the re-created pod")
    finally:
        stop.set()
        results = await load
    assert results and failures(results) == []
    log = (st.workdir / "router.log").read_text()
    assert "kubernetes discovery" in log
    print(f"\n[measure] kubernetes pod lifecycle: requests={len(results)} failed=0 {dict(served)}")


async def test_api_server_outage_and_410_keep_routing(kube_stack) -> None:  # type: ignore[no-untyped-def]
    st = kube_stack(pods=3)
    served: Counter[str] = Counter()
    stop = asyncio.Event()
    load = asyncio.create_task(
        closed_loop(spec(st), 8, stop=stop, on_result=lambda r: served.update([r.served_by]))
    )
    try:
        await more_served(served, 50, "load running")
        # API server killed for 10 s: routing goes on with the last set
        await asyncio.to_thread(st.fake.kill)
        t_kill = time.monotonic()
        info = await asyncio.to_thread(st.control, "POST", "/pods", {"name": "pod-3"})
        st.pods["pod-3"] = info["address"]
        await asyncio.to_thread(st.register, "pod-3", info["address"])  # written while down
        at_kill = sum(served.values())
        await asyncio.sleep(10.0)  # the outage's length is the behaviour under test
        assert sum(served.values()) - at_kill > 100, "routing stalled while the API was down"
        assert served["pod-3"] == 0
        await asyncio.to_thread(st.fake.revive)
        await until(lambda: served["pod-3"] > 5, 15, "catch-up after the outage")
        catch_up = time.monotonic() - t_kill - 10.0

        # 410: the watch resumes from a compacted version; relist, no routing gap
        addr1 = st.pods["pod-1"]
        await asyncio.to_thread(st.drop_watches)
        await asyncio.to_thread(st.unregister, "pod-1")
        await asyncio.to_thread(st.compact)
        await until(lambda: addr1 not in envoy_pods(st), 10, "relisted set without pod-1")
    finally:
        stop.set()
        results = await load
    assert results and failures(results) == []
    log = (st.workdir / "router.log").read_text()
    assert "unreachable" in log and "recovered after" in log and "watch expired" in log
    print(
        f"\n[measure] kubernetes API outage: requests={len(results)} failed=0 "
        f"catch_up_after_revive_s={catch_up:.1f}"
    )
