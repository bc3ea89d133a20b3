"""Kubernetes discovery: the real client (kubernetes-asyncio) against a fake API server.

The fake (router_ext/harness/kube_fake.py) stands in for a kube-apiserver, which cannot run
here (no registry reached has one; kind and k3s need Docker). It speaks the real list/watch
wire protocol: resourceVersion, chunked JSON-line watch events, bookmarks, 410 Gone as an
ERROR event, dropped streams, 403 Status objects. Its fidelity is checked once with `kubectl`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from router_ext.app.telemetry import Telemetry
from router_ext.config import KubernetesSection, RouterConfig
from router_ext.fleet.discovery import DiscoverySource, PodsFileDiscovery, make_discovery
from router_ext.fleet.kubernetes import MODELS_ANNOTATION, KubernetesDiscovery
from router_ext.fleet.lifecycle import PodLifecycle
from router_ext.fleet.snapshot import Pod
from router_ext.harness.kube_fake import (
    FakeKubeAPI,
    endpoint_slice,
    inference_pool,
    pod_object,
    slice_endpoint,
    write_kubeconfig,
)

LABELS = {"app": "vllm"}


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


class Running:
    """A discovery source running against the fake, with every published set recorded."""

    def __init__(self, api: FakeKubeAPI, src: KubernetesDiscovery, record: bool = True) -> None:
        self.api = api
        self.src = src
        self.sets: list[tuple[Pod, ...]] = []
        self.errors: list[str] = []
        if record:  # not under churn: the recording would be the leak
            src.subscribe(lambda pods: self.sets.append(tuple(pods)))
        src.error_listeners.append(self.errors.append)
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(src.run(self.stop))

    def addresses(self) -> set[str]:
        return {p.address for p in self.src.pods}

    def by_address(self) -> dict[str, Pod]:
        return {p.address: p for p in self.src.pods}

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    fake = FakeKubeAPI(bookmark_interval_s=0.2)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start(api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)

    async def _start(wait_loaded: bool = True, record: bool = True, **kw: Any) -> Running:
        kw.setdefault("kind", "endpointslices")
        if kw["kind"] == "endpointslices":
            kw.setdefault("service", "vllm")
        kw.setdefault("watch_timeout_s", 10)
        kw.setdefault("backoff_max_s", 0.5)
        src = KubernetesDiscovery(KubernetesSection(kubeconfig=kubeconfig, **kw))
        r = Running(api, src, record)
        running.append(r)
        if wait_loaded:
            await until(lambda: r.src.loaded, what="first list")
        return r

    yield _start
    for r in running:
        await r.close()


def ep(ip: str, n: int, **kw: Any) -> dict[str, Any]:
    return slice_endpoint(ip, f"pod-{n}", f"uid-{n}", **kw)


# --- the seam ------------------------------------------------------------------------------
def test_make_discovery_picks_the_source_the_config_names(tmp_path: Path) -> None:
    file_cfg = RouterConfig.model_validate({"discovery": {"pods_file": str(tmp_path / "p.yaml")}})
    kube_cfg = RouterConfig.model_validate(
        {"discovery": {"source": "kubernetes", "kubernetes": {"service": "vllm"}}}
    )
    f: DiscoverySource = make_discovery(file_cfg)
    k: DiscoverySource = make_discovery(kube_cfg)
    assert isinstance(f, PodsFileDiscovery) and f.status()["source"] == "file"
    assert isinstance(k, KubernetesDiscovery)
    assert k.status()["source"] == "kubernetes" and k.status()["service"] == "vllm"
    assert k.check() is False  # the watch pushes; nothing to poll, and no I/O here


# --- list + watch --------------------------------------------------------------------------
async def test_list_then_watch_maps_conditions_uids_and_ipv6(
    api: FakeKubeAPI, start: Callable[..., Any]
) -> None:
    api.put(
        "endpointslices",
        endpoint_slice(
            "vllm-a",
            "vllm",
            8000,
            [ep("10.0.0.1", 1), ep("10.0.0.2", 2, ready=False)],
            annotations={MODELS_ANNOTATION: "llama-3-8b, llama-lora"},
        ),
    )
    api.put("endpointslices", endpoint_slice("other", "not-ours", 8000, [ep("10.9.9.9", 9)]))
    r = await start()
    pods = r.by_address()
    assert set(pods) == {"10.0.0.1:8000", "10.0.0.2:8000"}  # the other Service is not ours
    assert pods["10.0.0.1:8000"].ready and pods["10.0.0.1:8000"].uid == "uid-1"
    assert pods["10.0.0.1:8000"].name == "pod-1"
    assert pods["10.0.0.1:8000"].model == "llama-3-8b"
    assert pods["10.0.0.1:8000"].models == {"llama-3-8b", "llama-lora"}
    assert not pods["10.0.0.2:8000"].ready
    watch = [q for q in api.requests if "watch=" in q]
    assert watch and "allowWatchBookmarks=True" in watch[0] and "timeoutSeconds=10" in watch[0]
    assert f"resourceVersion={api.rv}" in watch[0]  # from the list, not from scratch

    # terminating + serving = draining (last resort); terminating, not serving = not ready
    api.put(
        "endpointslices",
        endpoint_slice(
            "vllm-a",
            "vllm",
            8000,
            [
                ep("10.0.0.1", 1, ready=False, serving=True, terminating=True),
                ep("10.0.0.2", 2, ready=False, serving=False, terminating=True),
            ],
        ),
    )
    api.put(
        "endpointslices",
        endpoint_slice("vllm-v6", "vllm", 8000, [ep("fd00::7", 7)], address_type="IPv6"),
    )
    await until(lambda: "[fd00::7]:8000" in r.addresses(), what="IPv6 pod")
    pods = r.by_address()
    assert pods["10.0.0.1:8000"].ready and pods["10.0.0.1:8000"].draining
    assert not pods["10.0.0.2:8000"].ready and pods["10.0.0.2:8000"].draining
    assert pods["[fd00::7]:8000"].host == "fd00::7" and pods["[fd00::7]:8000"].ready

    api.delete("endpointslices", "default", "vllm-a")
    await until(lambda: r.addresses() == {"[fd00::7]:8000"}, what="delete")
    assert r.src.counters["lists"] == 1  # all of it over one watch
    assert r.src.status()["last_error"] == ""


async def test_bookmarks_move_the_resume_version(
    api: FakeKubeAPI, start: Callable[..., Any]
) -> None:
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    r = await start()
    listed = int(api.rv)
    # Changes to other objects advance the global version; only bookmarks tell us about it.
    for i in range(3):
        api.put("pods", pod_object(f"unrelated-{i}", "10.1.0.1", {"x": "y"}))
    await until(lambda: int(r.src.status()["resource_version"]) > listed, what="bookmark")
    assert r.src.counters["bookmarks"] >= 1
    seen = r.src.status()["resource_version"]
    api.drop_watches()
    await until(
        lambda: any(f"resourceVersion={seen}" in q and "watch=" in q for q in api.requests),
        what="resume from the bookmark's version",
    )
    assert r.src.counters["lists"] == 1


async def test_dropped_stream_resumes_without_relist_or_error(
    api: FakeKubeAPI, start: Callable[..., Any]
) -> None:
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    r = await start()
    assert api.drop_watches() == 1
    api.put("endpointslices", endpoint_slice("vllm-b", "vllm", 8000, [ep("10.0.0.2", 2)]))
    await until(lambda: "10.0.0.2:8000" in r.addresses(), what="event after the cut")
    assert r.src.counters["lists"] == 1 and r.src.counters["watches"] >= 2
    assert r.errors == [] and r.src.last_error == ""


async def test_410_relists_and_replaces_the_set_with_no_gap(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.kubernetes")
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    r = await start()
    # While the client is cut off, the pods change and the history is compacted: the resume
    # from the old version gets the ERROR event with a 410 Status.
    api.drop_watches()
    api.delete("endpointslices", "default", "vllm-a")
    api.put("endpointslices", endpoint_slice("vllm-b", "vllm", 8000, [ep("10.0.0.2", 2)]))
    api.compact()
    await until(lambda: r.addresses() == {"10.0.0.2:8000"}, what="relisted set")
    assert r.src.counters["relists_410"] == 1 and r.src.counters["lists"] == 2
    assert all(s for s in r.sets), "a published set was empty: routing gap"
    assert r.sets[-1] == tuple(r.src.pods)  # replaced in one step
    assert any("watch expired" in m and "too old" in m for m in caplog.messages)
    assert r.errors == []  # expected during normal operation: not an error


async def test_api_server_down_keeps_the_last_good_set_and_reports_it(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.kubernetes")
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    r = await start()
    await api.stop()
    await until(lambda: r.src.last_error != "", what="unreachable reported")
    # several retries at the capped back-off, one log line and one error-metric call
    await until(lambda: r.src.counters["watches"] + r.src.counters["lists"] >= 1)
    t0 = time.monotonic()
    await until(lambda: time.monotonic() - t0 > 1.5, timeout=3)
    st = r.src.status()
    assert st["error_kind"] == "unreachable" and st["pods"] == 1 and st["error_for_s"] > 1
    assert r.addresses() == {"10.0.0.1:8000"}
    assert len(r.errors) == 1
    assert sum("kubernetes discovery error" in m for m in caplog.messages) == 1

    api.put("endpointslices", endpoint_slice("vllm-b", "vllm", 8000, [ep("10.0.0.2", 2)]))
    await api.start()  # same port, same store: the client catches up
    await until(lambda: len(r.addresses()) == 2, what="catch up")
    assert r.src.status()["last_error"] == ""
    assert any("recovered after" in m for m in caplog.messages)


async def test_forbidden_is_a_clear_status_and_one_log_line(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.kubernetes")
    api.forbidden.add("endpointslices")
    r = await start(wait_loaded=False)
    await until(lambda: r.src.error_kind is not None, what="403")
    st = r.src.status()
    assert st["error_kind"] == "forbidden" and not st["loaded"] and st["pods"] == 0
    assert "cannot list resource" in st["last_error"] and "HTTP 403" in st["last_error"]
    await until(lambda: r.src.counters["lists"] == 0 and len(api.requests) >= 3, timeout=5)
    errors = [m for m in caplog.messages if "discovery error" in m]
    assert len(errors) == 1 and "forbidden" in errors[0] and "no pods yet" in errors[0]
    api.forbidden.clear()
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    await until(lambda: r.src.loaded and r.addresses() == {"10.0.0.1:8000"}, what="recovery")


async def test_selector_matching_nothing_is_an_empty_loaded_set(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.kubernetes")
    api.put("pods", pod_object("p1", "10.0.0.1", {"app": "other"}))
    r = await start(kind="pods", selector={"app": "nothing"}, target_port=8000)
    assert r.src.loaded and r.src.pods == () and r.src.last_error == ""
    assert any("matches no pods yet" in m and "app=nothing" in m for m in caplog.messages)


async def test_slices_without_addresses_or_ipv6_only(
    api: FakeKubeAPI, start: Callable[..., Any]
) -> None:
    api.put("endpointslices", endpoint_slice("vllm-empty", "vllm", 8000, []))
    api.put(
        "endpointslices",
        endpoint_slice("vllm-noaddr", "vllm", 8000, [{"conditions": {"ready": True}}]),
    )
    api.put(
        "endpointslices",
        endpoint_slice("vllm-v6", "vllm", 8000, [ep("2001:db8::1", 1)], address_type="IPv6"),
    )
    r = await start()
    assert r.addresses() == {"[2001:db8::1]:8000"}
    assert r.src.status()["skipped"] == {"endpoint without an IP address": 1}
    assert r.src.last_error == ""


async def test_pods_kind_skips_pods_without_ip_and_drains_deleted_ones(
    api: FakeKubeAPI, start: Callable[..., Any]
) -> None:
    api.put("pods", pod_object("p1", "10.0.0.1", LABELS, uid="u1"))
    api.put("pods", pod_object("p2", None, LABELS, phase="Pending", ready=False))
    api.put("pods", pod_object("p3", "10.0.0.3", LABELS, ready=False))
    r = await start(kind="pods", selector=LABELS, target_port=8000)
    pods = r.by_address()
    assert set(pods) == {"10.0.0.1:8000", "10.0.0.3:8000"}
    assert pods["10.0.0.1:8000"].ready and pods["10.0.0.1:8000"].uid == "u1"
    assert not pods["10.0.0.3:8000"].ready
    assert r.src.status()["skipped"] == {"no IP yet": 1}

    api.put("pods", pod_object("p2", "10.0.0.2", LABELS))
    api.put("pods", pod_object("p1", "10.0.0.1", LABELS, uid="u1", deleting=True))
    await until(lambda: "10.0.0.2:8000" in r.addresses(), what="pod got its IP")
    await until(lambda: r.by_address()["10.0.0.1:8000"].draining, what="deletion drains")
    assert r.src.status()["skipped"] == {}


async def test_inference_pool_without_target_ports_then_fixed(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.kubernetes")
    api.put("pods", pod_object("p1", "10.0.0.1", LABELS))
    api.put("inferencepools", inference_pool("pool", LABELS, []))
    r = await start(wait_loaded=False, kind="inferencepool", inference_pool="pool")
    await until(lambda: r.src.error_kind is not None, what="invalid pool")
    st = r.src.status()
    assert st["error_kind"] == "invalid" and "no usable spec.targetPorts" in st["last_error"]
    assert sum("discovery error" in m for m in caplog.messages) == 1

    api.put("inferencepools", inference_pool("pool", LABELS, [8000], failure_mode="FailClose"))
    await until(lambda: r.addresses() == {"10.0.0.1:8000"}, what="pool usable")
    st = r.src.status()
    assert st["target_ports"] == [8000] and st["failure_mode"] == "FailClose"
    assert st["last_error"] == ""

    # A change of the pool's ports relists its pods on the new ports (data-parallel ranks).
    api.put("inferencepools", inference_pool("pool", LABELS, [8000, 8001]))
    await until(
        lambda: r.addresses() == {"10.0.0.1:8000", "10.0.0.1:8001"}, what="new target ports"
    )
    # Deleting the pool keeps the last good set routable and says so.
    api.delete("inferencepools", "default", "pool")
    await until(lambda: r.src.error_kind is not None, what="pool deleted")
    assert r.src.status()["error_kind"] == "not_found" and len(r.src.pods) == 2


async def test_malformed_watch_line_keeps_the_set_and_recovers(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.kubernetes")
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    r = await start()
    api.malformed_lines = 1
    api.put("endpointslices", endpoint_slice("vllm-b", "vllm", 8000, [ep("10.0.0.2", 2)]))
    await until(lambda: r.src.error_kind is not None, what="malformed reported")
    assert r.src.status()["error_kind"] == "malformed"
    assert r.addresses() >= {"10.0.0.1:8000"}
    # the lost event is recovered by the relist that follows the back-off
    await until(lambda: r.addresses() == {"10.0.0.1:8000", "10.0.0.2:8000"}, what="relist")
    api.put("endpointslices", endpoint_slice("vllm-c", "vllm", 8000, [ep("10.0.0.3", 3)]))
    await until(lambda: r.src.last_error == "", what="a good event clears the error")
    assert sum("malformed event line" in m for m in caplog.messages) == 1
    assert not r.task.done()


async def test_reused_ip_with_a_new_uid_is_a_new_pod(
    api: FakeKubeAPI, start: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router_ext.fleet.lifecycle")
    lc = PodLifecycle(RouterConfig())
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    r = await start()
    r.src.subscribe(lc.apply_discovery)
    lc.apply_discovery(r.src.pods)
    api.put(
        "endpointslices",
        endpoint_slice(
            "vllm-a", "vllm", 8000, [slice_endpoint("10.0.0.1", "pod-1-new", "uid-new")]
        ),
    )
    await until(lambda: r.src.pods[0].uid == "uid-new", what="new pod at the old IP")
    assert r.src.pods[0].identity != r.sets[0][0].identity
    assert any("replaced by pod-1-new at the same address" in m for m in caplog.messages)


# --- configuration paths -------------------------------------------------------------------
def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "ca.crt", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=kubernetes",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed for a TLS cert")
async def test_in_cluster_config_uses_the_service_account(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    api = FakeKubeAPI(token="sa-token", ssl_context=ctx)
    await api.start()
    try:
        api.put("pods", pod_object("p1", "10.0.0.1", LABELS, namespace="inference"))
        sa = tmp_path / "sa"
        sa.mkdir()
        (sa / "token").write_text("sa-token")
        (sa / "ca.crt").write_bytes(cert.read_bytes())
        (sa / "namespace").write_text("inference")
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
        src = KubernetesDiscovery(
            KubernetesSection(kind="pods", selector=LABELS, target_port=8000),
            environ=env,
            service_account_dir=sa,
        )
        stop = asyncio.Event()
        task = asyncio.ensure_future(src.run(stop))
        await until(lambda: src.loaded, what="in-cluster list over TLS with the token")
        assert [p.address for p in src.pods] == ["10.0.0.1:8000"]
        assert src.status()["namespace"] == "inference"
        assert src.status()["server"] == f"https://127.0.0.1:{api.port}"
        stop.set()
        await task
    finally:
        await api.stop()


async def test_no_config_at_all_is_a_clear_error(tmp_path: Path) -> None:
    src = KubernetesDiscovery(
        KubernetesSection(service="vllm", kubeconfig=tmp_path / "missing", backoff_max_s=0.5),
        environ={},
    )
    stop = asyncio.Event()
    task = asyncio.ensure_future(src.run(stop))
    await until(lambda: src.error_kind is not None, what="config error")
    assert src.status()["error_kind"] == "config" and "kubeconfig" in src.last_error
    stop.set()
    await task


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
async def test_kubectl_lists_and_watches_the_fake(api: FakeKubeAPI) -> None:
    """Fidelity of the fake: client-go (kubectl) lists, then sees a watch event."""
    api.put("endpointslices", endpoint_slice("vllm-a", "vllm", 8000, [ep("10.0.0.1", 1)]))
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "--server", api.url, "--token", "t", "-n", "default",
        "get", "endpointslices", "-w", "-o", "name",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "KUBECONFIG": "/dev/null"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert first.strip() == b"endpointslice.discovery.k8s.io/vllm-a"
        await until(lambda: any("watch=true" in q for q in api.requests), timeout=10)
        api.put("endpointslices", endpoint_slice("vllm-b", "vllm", 8000, [ep("10.0.0.2", 2)]))
        second = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert second.strip() == b"endpointslice.discovery.k8s.io/vllm-b"
    finally:
        proc.terminate()
        await proc.wait()


# --- churn ---------------------------------------------------------------------------------
CHURN_S = float(os.environ.get("ROUTER_EXT_KUBE_CHURN_S", "60"))


async def test_churn_keeps_source_and_router_state_bounded(
    api: FakeKubeAPI, start: Callable[..., Any]
) -> None:
    """500 pods, 10 replaced per second for 60 s, as the issue asks (ROUTER_EXT_KUBE_CHURN_S
    shortens it): the source's objects, the lifecycle's records and the metric series stay at
    500 pods, and traced memory stops growing."""
    api.history_size = 200  # the fake's own memory is not under test
    # Traced from before the first 500 pods exist: the objects of replaced pods then replace
    # traced objects, so a bounded set shows as flat (started later, every replacement of an
    # untraced original would look like growth).
    tracemalloc.start()
    n, rate = 500, 10
    for i in range(n):
        api.put("pods", pod_object(f"p{i}", f"10.1.{i // 250}.{i % 250 + 1}", LABELS))
    lc = PodLifecycle(RouterConfig())
    tel = Telemetry()

    def apply(pods: Sequence[Pod]) -> None:
        lc.apply_discovery(pods)
        tel.on_snapshot(lc.build_snapshot(), lc.state_counts())

    r = await start(kind="pods", selector=LABELS, target_port=8000, record=False)
    r.src.subscribe(apply)
    apply(r.src.pods)
    assert len(r.src.pods) == n

    def series() -> int:
        from prometheus_client import generate_latest

        return sum(
            1
            for ln in generate_latest(tel.registry).decode().splitlines()
            if not ln.startswith("#")
        )

    base_series = series()
    gen = n
    t0 = time.monotonic()
    mem_mid = 0
    while (elapsed := time.monotonic() - t0) < CHURN_S:
        # One pod replaced: a new name, UID and IP (some IPs reused by the new pods).
        victim = gen - n
        api.delete("pods", "default", f"p{victim}")
        api.put("pods", pod_object(f"p{gen}", f"10.2.{(gen // 250) % 4}.{gen % 250 + 1}", LABELS))
        gen += 1
        if not mem_mid and elapsed > CHURN_S / 3:
            mem_mid = tracemalloc.get_traced_memory()[0]
            snap_mid = tracemalloc.take_snapshot()
        await asyncio.sleep(max(0.0, (gen - n) / rate - (time.monotonic() - t0)))
    await until(lambda: f"p{gen - 1}" in {p.name for p in r.src.pods}, what="caught up")
    mem_end = tracemalloc.get_traced_memory()[0]
    if os.environ.get("ROUTER_EXT_KUBE_CHURN_TOP"):  # where it grew, for a human reading
        for stat in tracemalloc.take_snapshot().compare_to(snap_mid, "lineno")[:12]:
            print(stat)
    tracemalloc.stop()
    replaced = gen - n
    assert replaced >= rate * CHURN_S * 0.9
    assert len(r.src.pods) == n
    assert r.src.status()["objects"] == n
    assert len(lc._records) == n  # no leftovers of replaced pods
    assert series() <= base_series + 5
    growth = mem_end - mem_mid
    print(f"churn: {replaced} pods replaced in {CHURN_S:.0f}s, traced growth {growth / 1e3:.0f} kB")
    assert growth < 2_000_000, f"memory grew {growth} bytes over two thirds of the churn"
