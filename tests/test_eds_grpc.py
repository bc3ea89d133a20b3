"""router-ext as Envoy's EDS server (envoy.eds: grpc): the protocol, then real Envoy.

The protocol tests talk to `EdsServer` over a real gRPC connection with the generated stubs,
as Envoy does; the end-to-end tests start a real Envoy rendered with `eds: grpc`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2 as disc
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.protobuf import json_format

from router_ext.config import EnvoySection, Listen, RouterConfig
from router_ext.envoy_adapter.auth import TOKEN_METADATA_KEY, StreamAuth
from router_ext.envoy_adapter.envoy_config import (
    CLA_TYPE,
    CLUSTER_PODS,
    render_eds,
    write_envoy_files,
)
from router_ext.envoy_adapter.xds import EDS_SERVICE, EdsServer
from router_ext.fleet.snapshot import Pod
from router_ext.harness.envoy_proc import EnvoyProcess, free_port
from router_ext.harness.loadgen import LoadSpec, closed_loop
from router_ext.harness.stack import Stack
from tests.conftest import requires_envoy

TOKEN = "t" * 32
PODS = [Pod("10.0.0.2", 8000, name="b"), Pod("10.0.0.1", 8000, name="a")]


def report(name: str, **numbers: object) -> None:
    print(f"\n[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def _request(
    nonce: str = "", version: str = "", error: str | None = None, node: str = ""
) -> disc.DiscoveryRequest:
    req = disc.DiscoveryRequest(
        type_url=CLA_TYPE, resource_names=[CLUSTER_PODS], version_info=version
    )
    req.response_nonce = nonce
    if node:
        req.node.id = node
    if error is not None:
        req.error_detail.code = 3
        req.error_detail.message = error
    return req


def _cla(resp: disc.DiscoveryResponse) -> dict[str, Any]:
    (res,) = resp.resources
    msg = endpoint_pb2.ClusterLoadAssignment()
    assert res.Unpack(msg)
    out: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return out


class _Served:
    def __init__(self, eds: EdsServer, server: grpc.aio.Server, address: str) -> None:
        self.eds, self.server, self.address = eds, server, address


async def _serve(eds: EdsServer) -> _Served:
    server = grpc.aio.server()
    eds_pb2_grpc.add_EndpointDiscoveryServiceServicer_to_server(eds, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return _Served(eds, server, f"127.0.0.1:{port}")


@pytest.fixture
async def served() -> AsyncIterator[Callable[..., Any]]:
    started: list[_Served] = []

    async def make(eds: EdsServer | None = None) -> _Served:
        s = await _serve(eds or EdsServer())
        started.append(s)
        return s

    yield make
    for s in started:
        await s.server.stop(0)


async def _counted(what: str, pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until the server has taken in what the client wrote (its counters say so): a publish
    before that would make the client's ACK or NACK stale, and the server ignores stale ones."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _read(call: Any, timeout: float = 5.0) -> disc.DiscoveryResponse:
    resp: disc.DiscoveryResponse = await asyncio.wait_for(call.read(), timeout)
    return resp


# --- protocol --------------------------------------------------------------------------------


async def test_subscribe_ack_and_push_on_change(served: Callable[..., Any]) -> None:
    s = await served()
    s.eds.publish(PODS)
    async with grpc.aio.insecure_channel(s.address) as ch:
        call = eds_pb2_grpc.EndpointDiscoveryServiceStub(ch).StreamEndpoints()
        await call.write(_request(node="envoy-1"))
        first = await _read(call)
        # The same assignment and version the file EDS writes: both paths say the same thing.
        file_doc = render_eds(RouterConfig(), PODS)
        assert first.version_info == file_doc["version_info"] == s.eds.version
        assert first.type_url == CLA_TYPE and first.nonce
        expected = {k: v for k, v in file_doc["resources"][0].items() if k != "@type"}
        assert _cla(first) == expected
        await call.write(_request(first.nonce, first.version_info))  # ACK
        await _counted("the ACK", lambda: s.eds.stats.acks == 1)
        assert s.eds.stats.last_acked == first.version_info

        grown = [*PODS, Pod("10.0.0.3", 8000, draining=True)]
        assert s.eds.publish(grown)
        assert not s.eds.publish(grown)  # same membership: no new version, no push
        pushed = await _read(call)
        assert pushed.version_info == render_eds(RouterConfig(), grown)["version_info"]
        assert pushed.nonce != first.nonce
        eps = _cla(pushed)["endpoints"][0]["lb_endpoints"]
        assert [e["endpoint"]["address"]["socket_address"]["address"] for e in eps] == [
            "10.0.0.1",
            "10.0.0.2",
            "10.0.0.3",
        ]
        assert eps[2]["health_status"] == "DRAINING"
        await call.write(_request(pushed.nonce, pushed.version_info))
        await _counted("the second ACK", lambda: s.eds.stats.acks == 2)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    assert s.eds.stats.streams_open == 0


async def test_nothing_is_sent_before_the_first_publish(served: Callable[..., Any]) -> None:
    s = await served()
    async with grpc.aio.insecure_channel(s.address) as ch:
        call = eds_pb2_grpc.EndpointDiscoveryServiceStub(ch).StreamEndpoints()
        await call.write(_request())
        read = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({read}, timeout=0.3)
        assert not done  # an empty set would make Envoy drop every pod it knows
        s.eds.publish(PODS)
        resp = await asyncio.wait_for(read, 5)
        assert len(_cla(resp)["endpoints"][0]["lb_endpoints"]) == 2
        call.cancel()


async def test_nack_logged_once_with_envoys_detail_and_not_resent(
    served: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    s = await served()
    s.eds.publish(PODS)
    caplog.set_level(logging.ERROR, logger="router_ext.envoy_adapter.xds")
    async with grpc.aio.insecure_channel(s.address) as ch:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(ch)
        for n in (1, 2):  # a reconnecting Envoy NACKs the same version again
            call = stub.StreamEndpoints()
            await call.write(_request(node="envoy-1"))
            resp = await _read(call)
            await call.write(_request("stale-nonce", "", error="ignored"))  # superseded
            await call.write(_request(resp.nonce, "", error="malformed endpoint: boom"))
            await _counted("the NACK", lambda n=n: s.eds.stats.nacks == n)  # type: ignore[misc]
            # Not re-sent: the next response is the next version.
            s.eds.publish([*PODS, Pod("10.0.0.9", 8000)])
            nxt = await _read(call)
            assert nxt.version_info != resp.version_info
            s.eds.publish(PODS)
            await _read(call)
            call.cancel()
    assert s.eds.stats.nacks == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "malformed endpoint: boom" in lines[0] and "envoy-1" in lines[0]


async def test_stream_without_token_is_refused(served: Callable[..., Any]) -> None:
    refused: list[str] = []
    eds = EdsServer()
    eds.auth = StreamAuth(TOKEN, refused.append)
    s = await served(eds)
    eds.publish(PODS)
    async with grpc.aio.insecure_channel(s.address) as ch:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(ch)
        for metadata in ((), ((TOKEN_METADATA_KEY, "wrong" * 8),)):
            call = stub.StreamEndpoints(metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                # The refusal may come before the write completes: either call raises it.
                await call.write(_request())
                await _read(call)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.StreamEndpoints(metadata=((TOKEN_METADATA_KEY, TOKEN),))
        await call.write(_request())
        assert (await _read(call)).version_info == eds.version
        call.cancel()
    assert refused == [EDS_SERVICE, EDS_SERVICE]


async def test_replicas_with_identical_membership_send_identical_versions(
    served: Callable[..., Any],
) -> None:
    a, b = await served(), await served()
    a.eds.publish(PODS)
    b.eds.publish(list(reversed(PODS)))  # another discovery order, same pods
    got = []
    for s in (a, b):
        async with grpc.aio.insecure_channel(s.address) as ch:
            call = eds_pb2_grpc.EndpointDiscoveryServiceStub(ch).StreamEndpoints()
            await call.write(_request())
            got.append(await _read(call))
            call.cancel()
    assert got[0].version_info == got[1].version_info
    assert got[0].resources[0].SerializeToString() == got[1].resources[0].SerializeToString()


# --- real Envoy ------------------------------------------------------------------------------


def _sim_pods(n: int, base: int = 7000) -> list[Pod]:
    return [Pod("127.0.0.1", base + i, name=f"p{i}") for i in range(n)]


async def _until(what: str, pred: Callable[[], bool], timeout: float) -> float:
    """Poll `pred` (in a thread: it may call Envoy's admin API) until true; the time it took."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(pred):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return time.monotonic() - t0


def _hosts(envoy: EnvoyProcess) -> set[str]:
    try:
        return set(envoy.cluster_hosts(CLUSTER_PODS))
    except Exception:
        return set()


@pytest.mark.e2e
@requires_envoy
async def test_envoy_takes_membership_from_the_eds_server(tmp_path: Path) -> None:
    """Envoy rendered with eds: grpc, pointed at an EDS server in this process (with the token):
    how long after a publish `/clusters` shows the change."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    eds = EdsServer()
    eds.auth = StreamAuth(TOKEN, lambda _svc: None)
    s = await _serve(eds)
    envoy = EnvoyProcess()
    try:
        cfg = RouterConfig.model_validate(
            {
                "base_dir": str(tmp_path),
                "router": {"auth": {"token_file": str(token_file)}},
                "envoy": EnvoySection(
                    eds="grpc",
                    listener=Listen(port=free_port()),
                    admin=Listen(port=free_port()),
                    router_address=s.address,
                    access_log_path=str(tmp_path / "access.log"),
                ).model_dump(),
            }
        )
        files = write_envoy_files(cfg, [], tmp_path)
        assert set(files) == {"envoy"}  # no EDS file with gRPC EDS
        eds.publish(_sim_pods(2))
        envoy.start(files["envoy"], tmp_path / "envoy.log")
        await asyncio.to_thread(envoy.wait_ready, 15)
        await _until("2 pods", lambda: len(_hosts(envoy)) == 2, 10)
        delays: list[float] = []
        for n in (3, 4, 1, 5, 2, 6, 3, 2):
            want = {p.address for p in _sim_pods(n)}
            eds.publish(_sim_pods(n))
            delays.append(await _until(f"{n} pods", lambda w=want: _hosts(envoy) == w, 5))  # type: ignore[misc]
        # Envoy ACKs the last version (the ACK may land just after /clusters shows it).
        await _until("the last ACK", lambda: eds.stats.last_acked == eds.version, 5)
        assert eds.stats.nacks == 0
        report(
            "gRPC EDS publish -> /clusters",
            changes=len(delays),
            median_ms=round(statistics.median(delays) * 1000, 1),
            max_ms=round(max(delays) * 1000, 1),
        )
        assert max(delays) < 1.0
    finally:
        envoy.stop()
        await s.server.stop(0)


def _spec(st: Stack) -> LoadSpec:
    return LoadSpec(url=st.url + "/v1/chat/completions", max_tokens=4, timeout_s=20)


@pytest.mark.e2e
@requires_envoy
async def test_eds_server_killed_then_restarted(make_stack: Callable[..., Stack]) -> None:
    """router-ext (the EDS server) SIGKILLed: Envoy keeps its endpoints and keeps serving;
    restarted: Envoy reconnects within ~1 s of the router listening and takes the new set."""
    st = make_stack(pods=3, router_overrides={"envoy": {"eds": "grpc"}})
    assert not (st.workdir / "envoy" / "eds").exists()  # membership came over gRPC
    all_pods = set(st.pods.values())
    assert _hosts(st.envoy) == all_pods
    routed = await closed_loop(_spec(st), 4, duration_s=1.0)
    assert routed and all(r.ok and r.strategy for r in routed)  # the router answered

    assert st.router is not None
    st.router.signal(signal.SIGKILL)
    await asyncio.to_thread(st.router.proc.wait, 5)
    results = await closed_loop(_spec(st), 8, duration_s=2.5)
    assert [r for r in results if not r.ok] == []
    assert results and all(r.strategy == "" for r in results[-8:])  # failed open, no router
    assert _hosts(st.envoy) == all_pods  # Envoy kept its last endpoints

    # Membership changes while the EDS server is down: only a new server can tell Envoy.
    gone = st.pods["pod-2"]
    st.control("DELETE", "/pods/pod-2")
    st.start_router()
    t_start = time.monotonic()
    await _until("router listening", lambda: st.router_health() is not None, 20)
    t_listen = time.monotonic()
    await _until("new membership", lambda: _hosts(st.envoy) == all_pods - {gone}, 10)
    after_listen = time.monotonic() - t_listen
    report(
        "EDS server restart -> Envoy membership",
        after_listening_s=round(after_listen, 3),
        after_process_start_s=round(time.monotonic() - t_start, 3),
    )
    assert after_listen < 2.0
    results = await closed_loop(_spec(st), 4, duration_s=1.0)
    assert [r for r in results if not r.ok] == []
    assert "pod-2" not in {r.served_by for r in results}
