"""grpc.health.v1 on the router's port: NOT_SERVING until discovery loaded and one scrape
round finished, SERVING after; NOT_SERVING again at once on shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_ext.config import EXT_PROC_SERVICE, RouterConfig
from router_ext.envoy_proc import free_port
from router_ext.server import RouterApp

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(port: int, service: str = EXT_PROC_SERVICE) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(resp.status)


async def test_not_serving_until_discovery_and_first_scrape(tmp_path: Path) -> None:
    # A pod that accepts TCP but never answers: the first scrape round ends only at timeout.
    hung = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    hung_port = hung.sockets[0].getsockname()[1]
    pods_file = tmp_path / "pods.yaml"
    cfg = RouterConfig.model_validate(
        {
            "router": {"grpc": {"port": free_port()}, "metrics": {"port": 0}, "drain_seconds": 0.2},
            "discovery": {"pods_file": str(pods_file), "poll_interval_s": 0.1},
            "scrape": {"interval_s": 5, "timeout_s": 1.5},
        }
    )
    app = RouterApp(cfg, write_eds=False)
    await app.start()
    try:
        port = app.grpc_port
        # no pods file yet: discovery not loaded
        assert await status(port) == NOT_SERVING
        assert await status(port, "") == NOT_SERVING
        await asyncio.sleep(0.3)
        assert await status(port) == NOT_SERVING
        pods_file.write_text(f"pods:\n  - {{address: 127.0.0.1, port: {hung_port}}}\n")
        await asyncio.sleep(0.6)  # discovery loaded, first scrape round still waiting
        assert app.discovery.loaded
        assert await status(port) == NOT_SERVING
        await asyncio.sleep(1.6)  # the round ends (timeout) -> SERVING
        assert await status(port) == SERVING
        assert await status(port, "") == SERVING
        task = asyncio.create_task(app.drain_and_stop())
        await asyncio.sleep(0.05)
        assert await status(port) == NOT_SERVING  # at once, while still answering
        await task
    finally:
        await app.stop()
        hung.close()
