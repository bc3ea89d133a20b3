"""The fast upstream for the overhead benchmark: a second Envoy answering with direct_response.

Why Envoy and not a Python server: the quantity measured is what the proxy path adds, so the
upstream must not be the bottleneck. On this machine Envoy alone moves ~13-18k req/s
(BACKGROUND §4); an aiohttp server tops out at a few thousand req/s per core and would cap
configuration (a) long before Envoy does. An Envoy `direct_response` costs a few µs of C++
per request and no Python at all.

It listens on 16 loopback addresses (127.0.0.2 .. 127.0.0.17, same port), so router-ext sees
16 distinct pods that Envoy's EDS knows and that answer `/metrics` (a static vLLM V1 page,
2 data-parallel engines, rendered from vLLM's real family list) and `/health`; every other
path gets a small fixed 200 JSON body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from router_ext.harness.envoy_proc import EnvoyProcess
from tests.data.metrics_samples import vllm_v1_page

#: The model every fast-upstream pod reports and the benchmarks' request bodies name.
SERVED_MODEL = "sim-model"

#: A small chat-completion-shaped reply (what a non-streaming request gets back).
REPLY = (
    '{"id":"bench","object":"chat.completion","model":"sim-model","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}'
)


def pod_hosts(n: int) -> list[str]:
    """127.0.0.2 .. 127.0.0.(n+1): all of 127/8 is loopback on Linux, no setup needed."""
    if not 1 <= n <= 250:
        raise ValueError("1..250 pods")
    return [f"127.0.0.{i + 2}" for i in range(n)]


def _direct(path: str, body: dict[str, str], content_type: str) -> dict[str, Any]:
    return {
        "match": {"prefix": path} if path != "/" else {"prefix": "/"},
        "direct_response": {"status": 200, "body": body},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": content_type},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def upstream_bootstrap(hosts: list[str], port: int, admin_port: int, page: Path) -> dict[str, Any]:
    routes = [
        _direct("/metrics", {"filename": str(page)}, "text/plain; version=0.0.4; charset=utf-8"),
        _direct("/health", {"inline_string": ""}, "text/plain"),
        _direct("/", {"inline_string": REPLY}, "application/json"),
    ]
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "upstream",
            "codec_type": "AUTO",
            "route_config": {
                "name": "direct",
                # The metrics page is ~85 KiB; the default cap for direct_response is 4 KiB.
                "max_direct_response_body_size_bytes": 1 << 20,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                        "Router"
                    },
                }
            ],
        },
    }
    listeners = [
        {
            "name": f"pod-{i}",
            "address": {"socket_address": {"address": h, "port_value": port}},
            "filter_chains": [{"filters": [hcm]}],
        }
        for i, h in enumerate(hosts)
    ]
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": listeners},
    }


class FastUpstream:
    """Start/stop the upstream Envoy (concurrency 1: one core is plenty for direct_response,
    and the other core is left to the proxy under test)."""

    def __init__(self, workdir: Path, hosts: list[str], port: int, admin_port: int) -> None:
        self.workdir = workdir
        self.hosts = hosts
        self.port = port
        self.admin_port = admin_port
        self.envoy = EnvoyProcess()

    def start(self) -> FastUpstream:
        self.workdir.mkdir(parents=True, exist_ok=True)
        page = self.workdir / "metrics.txt"
        # The model the load generators ask for (common.WRK_POST_LUA): the router routes a
        # request only to pods reporting its model.
        page.write_text(vllm_v1_page(model=SERVED_MODEL))
        cfg = self.workdir / "upstream.yaml"
        cfg.write_text(
            yaml.safe_dump(upstream_bootstrap(self.hosts, self.port, self.admin_port, page))
        )
        self.envoy.start(cfg, self.workdir / "upstream.log", concurrency=1, log_level="warning")
        self.envoy.wait_ready(15)
        return self

    @property
    def pid(self) -> int | None:
        return self.envoy.pid

    def stop(self) -> None:
        self.envoy.stop()

    @property
    def addresses(self) -> list[str]:
        return [f"{h}:{self.port}" for h in self.hosts]
