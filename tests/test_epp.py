"""router.answer: epp, the Gateway API Inference Extension endpoint picker's answer and health.

Unit level on purpose: the Envoy that `router-ext envoy-config` renders routes on x-target-pod
(override_host reading the header), and no gateway config that reads `envoy.lb` metadata is
rendered here, so a real-Envoy test would only show Envoy ignoring these fields. What a gateway
reads (header, metadata, health names) is asserted over a real gRPC stream instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_ext.app.server import RouterApp
from router_ext.config import (
    EXT_PROC_SERVICE,
    STRATEGY_USED_HEADER,
    TARGET_POD_HEADER,
    RouterConfig,
)
from router_ext.envoy_adapter.extproc import (
    EPP_DESTINATION_HEADER,
    EPP_METADATA_NAMESPACE,
    ExtProcServicer,
    epp_decision_response,
)
from router_ext.harness.envoy_proc import free_port
from router_ext.routing import Decision
from router_ext.routing.router import Router
from router_ext.routing.stats import HotPathStats
from tests.helpers import lifecycle, ok, pods

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _cfg(answer: str) -> RouterConfig:
    return RouterConfig.model_validate(
        {"router": {"answer": answer}, "routing": {"default_strategy": "least-queue"}}
    )


def _router(answer: str, ready: bool = True) -> Router:
    lc, clk = lifecycle()
    ps = pods(3)
    lc.apply_discovery(ps)
    if ready:
        lc.apply_scrape([ok(p, clk.t, i, 0, 0.1 * i) for i, p in enumerate(ps)])
    r = Router(_cfg(answer), HotPathStats())
    r.publish(lc.build_snapshot())
    return r


def _headers() -> ep.ProcessingRequest:
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode())
                    for k, v in {":path": "/v1/chat/completions", ":method": "POST"}.items()
                ]
            )
        )
    )


@pytest.fixture
async def ask() -> AsyncIterator[Any]:
    servers: list[grpc.aio.Server] = []

    async def _ask(router: Router) -> ep.ProcessingResponse:
        server = grpc.aio.server()
        servers.append(server)
        ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(router), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ep_grpc.ExternalProcessorStub(ch).Process()
            await call.write(_headers())
            resp: ep.ProcessingResponse = await call.read()
            await call.done_writing()
            return resp

    yield _ask
    for s in servers:
        await s.stop(0)


def _set(common: ep.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


async def test_epp_answer_in_header_and_envoy_lb_metadata(ask: Any) -> None:
    resp = await ask(_router("epp"))
    got = _set(resp.request_headers.response)
    dest = got[EPP_DESTINATION_HEADER]
    entries = dest.split(",")
    # Primary first, then the fallbacks a gateway walks on retry; all distinct ip:port.
    assert len(entries) == 3 == len(set(entries))
    assert entries[0] == "127.0.0.1:9000"  # least-queue: pod-0 has the shortest queue
    assert all(e.rsplit(":", 1)[1].isdigit() for e in entries)
    assert TARGET_POD_HEADER not in got
    assert got[STRATEGY_USED_HEADER] == "least-queue"
    meta = json_format.MessageToDict(resp.dynamic_metadata)
    # Identical to the header: the protocol forbids the two from differing.
    assert meta == {EPP_METADATA_NAMESPACE: {EPP_DESTINATION_HEADER: dest}}


async def test_default_answer_is_unchanged(ask: Any) -> None:
    resp = await ask(_router("router-ext"))
    got = _set(resp.request_headers.response)
    assert len(got[TARGET_POD_HEADER].split(",")) == 3
    assert EPP_DESTINATION_HEADER not in got
    assert not resp.HasField("dynamic_metadata")


async def test_epp_mode_without_a_snapshot_is_a_503(ask: Any) -> None:
    resp = await ask(_router("epp", ready=False))
    assert resp.WhichOneof("response") == "immediate_response"
    assert resp.immediate_response.status.code == 503


async def test_router_ext_mode_without_a_snapshot_still_fails_open(ask: Any) -> None:
    resp = await ask(_router("router-ext", ready=False))
    assert resp.request_headers == ep.HeadersResponse()  # no target: Envoy balances


def test_epp_body_phase_answer_carries_the_same_fields() -> None:
    snap = _router("epp").snapshot
    d = Decision(pods=tuple(snap.routable[:2]), used="least-queue")
    resp = epp_decision_response(d, body_phase=True)
    assert resp.WhichOneof("response") == "request_body"
    assert _set(resp.request_body.response)[EPP_DESTINATION_HEADER] == d.header_value
    meta = json_format.MessageToDict(resp.dynamic_metadata)
    assert meta[EPP_METADATA_NAMESPACE][EPP_DESTINATION_HEADER] == d.header_value


async def _status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(resp.status)


async def _statuses(port: int) -> dict[str, int]:
    return {s: await _status(port, s) for s in ("liveness", "readiness", EXT_PROC_SERVICE)}


async def test_liveness_readiness_and_ext_proc_health_services(tmp_path: Path) -> None:
    cfg = RouterConfig.model_validate(
        {
            "base_dir": str(tmp_path),
            "router": {
                "answer": "epp",
                "grpc": {"port": free_port()},
                "admin": {"port": 0},
                "metrics": {"port": 0},
                "drain_seconds": 0.2,
            },
            "discovery": {"pods_file": str(tmp_path / "pods.yaml"), "poll_interval_s": 0.1},
            "scrape": {"in_process": True},
        }
    )
    app = RouterApp(cfg, write_eds=False)
    await app.start()
    try:
        port = app.grpc_port
        # Alive at once (it answers), not ready: no pods file, nothing scraped.
        assert await _statuses(port) == {
            "liveness": SERVING,
            "readiness": NOT_SERVING,
            EXT_PROC_SERVICE: NOT_SERVING,
        }
        lc = app.lifecycle
        ps = pods(1)
        lc.apply_discovery(ps)
        lc.apply_scrape([ok(ps[0], lc.clock(), 0, 0)])
        app.publish()
        deadline = asyncio.get_running_loop().time() + 5
        while (await _statuses(port))["readiness"] != SERVING:
            assert asyncio.get_running_loop().time() < deadline, "never ready"
            await asyncio.sleep(0.02)
        assert await _statuses(port) == dict.fromkeys(
            ("liveness", "readiness", EXT_PROC_SERVICE), SERVING
        )
        drain = asyncio.create_task(app.drain_and_stop())
        while (await _statuses(port))["readiness"] != NOT_SERVING:
            assert asyncio.get_running_loop().time() < deadline + 5, "still ready"
            await asyncio.sleep(0.02)
        await drain
    finally:
        await app.stop()
