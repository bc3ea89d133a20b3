"""The ext_proc adapter over a real gRPC stream (grpc.aio server in this process).

Envoy 1.40 facts it must honour: header values come in `raw_value` and must be set through
`raw_value`; every message Envoy sends gets exactly one answer of the matching kind.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from router_ext.config import RouterConfig, RoutingSection
from router_ext.envoy_adapter.extproc import ExtProcServicer
from router_ext.routing import RequestContext
from router_ext.routing.router import Router
from router_ext.routing.stats import HotPathStats
from tests.helpers import lifecycle, ok, pods


def headers(**h: str) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
                    for k, v in {":path": "/v1/chat/completions", **h}.items()
                ]
            )
        )
    )


def make_router(n: int = 3, ready: bool = True) -> Router:
    lc, clk = lifecycle()
    ps = pods(n)
    lc.apply_discovery(ps)
    if ready:
        lc.apply_scrape([ok(p, clk.t, i, 0, 0.1 * i) for i, p in enumerate(ps)])
    r = Router(RouterConfig(routing=RoutingSection(default_strategy="least-queue")), HotPathStats())
    r.publish(lc.build_snapshot())
    return r


@pytest.fixture
async def stub_for() -> AsyncIterator[Any]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def _make(router: Router) -> ep_grpc.ExternalProcessorStub:
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(router), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(ch)
        return ep_grpc.ExternalProcessorStub(ch)

    yield _make
    for ch in channels:
        await ch.close()
    for s in servers:
        await s.stop(0)


async def exchange(stub: Any, msgs: list[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    async def gen() -> AsyncIterator[ep.ProcessingRequest]:
        for m in msgs:
            yield m

    return [r async for r in stub.Process(gen())]


def set_headers(resp: ep.ProcessingResponse) -> dict[str, bytes]:
    muts = resp.request_headers.response.header_mutation.set_headers
    for m in muts:
        assert m.header.value == ""  # value-only mutations arrive empty in Envoy 1.40
        assert m.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return {m.header.key: m.header.raw_value for m in muts}


async def test_headers_get_target_pod_via_raw_value(stub_for: Any) -> None:
    stub = await stub_for(make_router())
    (resp,) = await exchange(stub, [headers()])
    hs = set_headers(resp)
    assert hs["x-target-pod"] == b"127.0.0.1:9000,127.0.0.1:9001,127.0.0.1:9002"
    assert hs["x-routing-strategy"] == b"least-queue"


async def test_every_message_kind_is_answered_in_kind(stub_for: Any) -> None:
    stub = await stub_for(make_router())
    msgs = [
        headers(),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{}", end_of_stream=True)),
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"x")),
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
    ]
    resps = await exchange(stub, msgs)
    kinds = [r.WhichOneof("response") for r in resps]
    assert kinds == [
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
        "response_trailers",
    ]


async def test_client_set_target_pod_is_overwritten(stub_for: Any) -> None:
    router = make_router()
    stub = await stub_for(router)
    (resp,) = await exchange(stub, [headers(x_target_pod="6.6.6.6:1")])
    assert b"6.6.6.6" not in set_headers(resp)["x-target-pod"]
    assert router.stats.client_target_header == 1


async def test_unknown_strategy_is_an_immediate_400(stub_for: Any) -> None:
    stub = await stub_for(make_router())
    (resp,) = await exchange(stub, [headers(x_routing_strategy_request="bogus")])
    imm = resp.immediate_response
    assert imm.status.code == 400
    err = json.loads(imm.body)["error"]
    assert err["code"] == "unknown_routing_strategy" and "least-kv-cache" in err["message"]
    ct = {h.header.key: h.header.raw_value for h in imm.headers.set_headers}
    assert ct["content-type"] == b"application/json"


async def test_empty_pool_is_an_immediate_503(stub_for: Any) -> None:
    stub = await stub_for(make_router(n=0))
    (resp,) = await exchange(stub, [headers()])
    assert resp.immediate_response.status.code == 503
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "no_pod_available"


async def test_not_ready_sends_no_target_so_envoy_balances(stub_for: Any) -> None:
    stub = await stub_for(make_router(ready=False))
    (resp,) = await exchange(stub, [headers()])
    assert resp.WhichOneof("response") == "request_headers"
    assert set_headers(resp) == {}


async def test_a_routing_bug_does_not_break_the_stream(stub_for: Any, monkeypatch: Any) -> None:
    router = make_router()

    def boom(requested: str | None) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(router, "route", boom)
    stub = await stub_for(router)
    resps = await exchange(stub, [headers(), headers()])
    assert [set_headers(r) for r in resps] == [{}, {}]


def test_hot_path_does_no_io_and_takes_no_lock() -> None:
    """Profile every C call made while routing: no socket/file I/O, no lock acquire."""
    router = make_router(n=200)
    servicer = ExtProcServicer(router)
    msg = headers(x_request_id="abc").request_headers
    seen: set[str] = set()

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            seen.add(f"{getattr(arg, '__module__', '') or ''}.{getattr(arg, '__qualname__', '')}")

    audit: list[str] = []

    def hook(event: str, args: Any) -> None:
        if event.startswith(("socket.", "open", "os.", "subprocess.")):
            audit.append(event)

    sys.addaudithook(hook)
    sys.setprofile(prof)
    try:
        for strat in ("random", "round-robin", "least-request", "least-kv-cache", "least-queue"):
            m = headers(x_routing_strategy_request=strat).request_headers
            for _ in range(50):
                servicer.handle_request_headers(m)
        servicer.handle_request_headers(msg)
    finally:
        sys.setprofile(None)
    assert audit == []
    assert not [c for c in seen if "acquire" in c or "lock" in c.lower()], sorted(seen)


async def test_saturated_is_an_immediate_429_with_retry_after(stub_for: Any) -> None:
    lc, clk = lifecycle(RouterConfig(routing=RoutingSection(saturation_queue=2)))
    ps = pods(2)
    lc.apply_discovery(ps)
    lc.apply_scrape([ok(p, clk.t, 8, 5, 0.9) for p in ps])
    router = Router(RouterConfig(routing=RoutingSection(saturation_queue=2)), HotPathStats())
    router.publish(lc.build_snapshot())
    stub = await stub_for(router)
    (resp,) = await exchange(stub, [headers()])
    imm = resp.immediate_response
    assert imm.status.code == 429
    hs = {h.header.key: h.header.raw_value for h in imm.headers.set_headers}
    assert hs == {"content-type": b"application/json", "retry-after": b"1"}
    assert json.loads(imm.body)["error"]["type"] == "server_overloaded"


def test_the_adapter_builds_one_request_context_from_the_headers(monkeypatch: Any) -> None:
    router = make_router()
    seen: list[RequestContext] = []
    real = router.route

    def spy(ctx: RequestContext) -> Any:
        seen.append(ctx)
        return real(ctx)

    monkeypatch.setattr(router, "route", spy)
    servicer = ExtProcServicer(router)
    msg = headers(
        x_routing_strategy_request=" least-kv-cache ", x_request_id="r-1", x_target_pod="6.6.6.6:1"
    )
    servicer.handle_request_headers(msg.request_headers)
    servicer.handle_request_headers(headers(x_routing_strategy_request="").request_headers)
    assert [(c.profile, c.request_id, c.client_target_pod) for c in seen] == [
        ("least-kv-cache", "r-1", True),
        (None, "", False),  # an empty header asks for nothing: the default profile
    ]
