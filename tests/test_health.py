"""grpc.health.v1 on the router's port: NOT_SERVING until discovery loaded and one scrape
round finished, SERVING after; NOT_SERVING again at once on shutdown. Waits poll observable
state; nothing here sleeps a fixed time to synchronise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_ext.app.server import RouterApp
from router_ext.config import EXT_PROC_SERVICE, RouterConfig
from router_ext.harness.envoy_proc import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(port: int, service: str = EXT_PROC_SERVICE) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(resp.status)


async def wait_until(what: str, pred, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Poll an observable condition (never a fixed sleep); fail naming it after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await pred()
        if value:
            return value
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_not_serving_until_discovery_and_first_scrape(tmp_path: Path) -> None:
    # A pod that accepts TCP but never answers: the first scrape round ends only at timeout.
    hung = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    hung_port = hung.sockets[0].getsockname()[1]
    pods_file = tmp_path / "pods.yaml"
    timeout_s = 1.5
    cfg = RouterConfig.model_validate(
        {
            "base_dir": str(tmp_path),
            "router": {
                "grpc": {"port": free_port()},
                "admin": {"port": 0},
                "metrics": {"port": 0},
                "drain_seconds": 0.5,
            },
            "discovery": {"pods_file": str(pods_file), "poll_interval_s": 0.1},
            "scrape": {"interval_s": 5, "timeout_s": timeout_s},
        }
    )
    app = RouterApp(cfg, write_eds=False)
    await app.start()
    loop = asyncio.get_running_loop()
    try:
        port = app.grpc_port
        # no pods file yet: discovery not loaded
        assert await status(port) == NOT_SERVING
        assert await status(port, "") == NOT_SERVING
        assert not app.discovery.loaded
        pods_file.write_text(f"pods:\n  - {{address: 127.0.0.1, port: {hung_port}}}\n")

        async def loaded() -> bool:
            return app.discovery.loaded

        await wait_until("discovery to load the pods file", loaded)
        loaded_at = loop.time()
        assert await status(port) == NOT_SERVING  # the first round is still waiting

        async def serving() -> bool:
            return await status(port) == SERVING

        await wait_until("SERVING after the first round", serving)
        # It waited for the round (the hung pod's time-out), not just for discovery.
        assert loop.time() - loaded_at >= timeout_s * 0.8
        assert await status(port, "") == SERVING
        task = asyncio.create_task(app.drain_and_stop())

        async def not_serving() -> bool:
            return await status(port) == NOT_SERVING

        await wait_until("NOT_SERVING once draining", not_serving, timeout=0.4)
        assert not task.done()  # NOT_SERVING at once, while still answering through the drain
        await task
    finally:
        await app.stop()
        hung.close()
