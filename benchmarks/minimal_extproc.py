"""The floor for any Python ext_proc: answer every request-headers message with a fixed pod.

    python -m benchmarks.minimal_extproc --port 50099 --target 127.0.0.2:18000

Same transport as router-ext (grpc.aio, the server options of router_ext/app/server.py, a
grpc.health.v1 service reporting SERVING so Envoy's router-cluster health check passes), but
no routing at all: one prebuilt response object is yielded per message. Whatever router-ext
costs above this is our own code; whatever this costs is grpc.aio + protobuf + Envoy's
ext_proc round trip, which no Python ext_proc can avoid.

`--body-for STRATEGY`: a request whose x-routing-strategy-request header names STRATEGY is
answered as router-ext answers a body-reading profile (a header answer asking for the
buffered body, then the target in the body answer): the floor of the body path
(benchmarks/body_cost.py).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from router_ext.config import EXT_PROC_SERVICE, STRATEGY_REQUEST_HEADER, TARGET_POD_HEADER
from router_ext.envoy_adapter import wire
from router_ext.envoy_adapter.modes import BODY_MODE_OVERRIDE


def fixed_response(target: str) -> ep.ProcessingResponse:
    """The one answer: set x-target-pod (through raw_value: BACKGROUND §4)."""
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(
                                key=TARGET_POD_HEADER, raw_value=target.encode()
                            ),
                            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                        )
                    ]
                )
            )
        )
    )


class MinimalProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, target: str, body_for: str | None = None) -> None:
        self.answer = fixed_response(target)
        self.other = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        self.body_for = body_for.encode() if body_for else None
        self.ask_for_body = ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(), mode_override=BODY_MODE_OVERRIDE
        )
        self.body_answer = wire.set_headers_answer(
            [wire.header_option(TARGET_POD_HEADER, target.encode())], body_phase=True
        )

    def _wants_body(self, msg: ep.HttpHeaders) -> bool:
        return self.body_for is not None and any(
            h.key == STRATEGY_REQUEST_HEADER and h.raw_value == self.body_for
            for h in msg.headers.headers
        )

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for req in request_iterator:
            if req.HasField("request_headers"):
                yield self.ask_for_body if self._wants_body(req.request_headers) else self.answer
            elif req.HasField("request_body"):
                yield self.body_answer
            else:  # not configured to arrive; answer something valid anyway
                yield self.other


async def serve(host: str, port: int, target: str, body_for: str | None = None) -> None:
    server = grpc.aio.server(
        options=[  # identical to router_ext/app/server.py
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.so_reuseport", 0),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(MinimalProcessor(target, body_for), server)
    health = health_aio.HealthServicer()
    for svc in ("", EXT_PROC_SERVICE):
        await health.set(svc, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    print(f"minimal ext_proc on {host}:{port} -> {target}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True, help="ip:port put in x-target-pod")
    ap.add_argument(
        "--body-for", metavar="STRATEGY", help="ask for the body when the request names it"
    )
    args = ap.parse_args()
    asyncio.run(serve(args.host, args.port, args.target, args.body_for))


if __name__ == "__main__":
    main()
