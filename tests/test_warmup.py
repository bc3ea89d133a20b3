"""Warm-up (off by default): a pod that joins gets one small request before any traffic.

In-process RouterApp with real sockets: the pods are small aiohttp servers that record what
they receive and answer /metrics with real vLLM V1 text.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from router_ext.app.server import RouterApp
from router_ext.config import RouterConfig
from router_ext.fleet.snapshot import PodState
from router_ext.harness.envoy_proc import free_port

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1
"""


async def start_pod(seen: list[tuple[str, Any]]) -> tuple[web.AppRunner, int]:
    async def completions(req: web.Request) -> web.Response:
        seen.append((req.path, await req.json()))
        await asyncio.sleep(0.3)  # a slow first request, as after a cold engine start
        return web.json_response({"choices": [{"text": "ok"}]})

    async def metrics(_req: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def write_pods(path: Path, ports: list[int]) -> None:
    tmp = path.with_suffix(".tmp")
    pods = [{"address": "127.0.0.1", "port": p, "model": "m"} for p in ports]
    tmp.write_text(json.dumps({"pods": pods}))  # JSON is YAML
    os.replace(tmp, path)


async def test_joining_pod_is_warmed_up_before_it_is_routable(tmp_path: Path) -> None:
    seen_a: list[tuple[str, Any]] = []
    seen_b: list[tuple[str, Any]] = []
    (ra, pa), (rb, pb) = await start_pod(seen_a), await start_pod(seen_b)
    pods_file = tmp_path / "pods.yaml"
    write_pods(pods_file, [pa])
    cfg = RouterConfig.model_validate(
        {
            "base_dir": str(tmp_path),
            "router": {"grpc": {"port": free_port()}, "admin": {"port": 0}, "metrics": {"port": 0}},
            "discovery": {"pods_file": str(pods_file), "poll_interval_s": 0.05},
            "scrape": {"interval_s": 0.2},
            "warmup": {"enabled": True, "body": {"prompt": "hi", "max_tokens": 1}},
        }
    )
    app = RouterApp(cfg, write_eds=False)
    await app.start()
    loop = asyncio.get_running_loop()

    async def until(what: str, pred: Any) -> None:
        deadline = loop.time() + 10
        while not pred():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    def pod_b() -> Any:
        return next((p for p in app.router.snapshot.pods if p.pod.port == pb), None)

    try:
        await until("the first scrape round (SERVING)", lambda: app.serving)
        assert seen_a == []  # pods known at start-up are not warmed up
        write_pods(pods_file, [pa, pb])
        # The pod has the warm-up request and is still answering it (it takes 0.3 s): the
        # router must not route to it yet.
        await until("pod B to receive its warm-up request", lambda: seen_b)
        b = pod_b()
        assert b is not None
        assert b.state is PodState.NOT_READY and b not in app.router.snapshot.routable
        await until(
            "pod B routable after its warm-up", lambda: pod_b() in app.router.snapshot.routable
        )
        assert seen_b == [("/v1/completions", {"prompt": "hi", "max_tokens": 1, "model": "m"})]
        assert pod_b().state in (PodState.COLD, PodState.WARM)  # type: ignore[union-attr]
    finally:
        await app.stop()
        await ra.cleanup()
        await rb.cleanup()
