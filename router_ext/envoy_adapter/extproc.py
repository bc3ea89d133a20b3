"""Envoy ext_proc adapter: turns a request-headers message into a header mutation.

Envoy 1.40 facts this code relies on (BACKGROUND §4): header values arrive in `raw_value`
(bytes) and must be set through `raw_value` too; with only request headers processed, Envoy
half-closes the stream right after our answer, so nothing here can observe the request's end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2

from router_ext.config import (
    EXT_PROC_SERVICE,
    REQUEST_ID_HEADER,
    STRATEGY_REQUEST_HEADER,
    STRATEGY_USED_HEADER,
    TARGET_POD_HEADER,
)
from router_ext.envoy_adapter.auth import StreamAuth
from router_ext.routing import Decision, RequestContext
from router_ext.routing.errors import ClientError
from router_ext.routing.router import NotReady, Router

log = logging.getLogger("router_ext.envoy_adapter.extproc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STRATEGY_REQ = STRATEGY_REQUEST_HEADER
_TARGET = TARGET_POD_HEADER
_REQ_ID = REQUEST_ID_HEADER

# Answers that carry nothing: the protocol wants one response per message Envoy sends.
_CONTINUE_HEADERS_REQ = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE = {
    "request_headers": _CONTINUE_HEADERS_REQ,
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


def _header(key: str, value: bytes) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value), append_action=_OVERWRITE
    )


#: Built answers by (x-target-pod, strategy used). Building the nested protobuf is most of a
#: request's encode cost; a fleet of n pods has at most n(n-1)(n-2) distinct answers per
#: strategy with 2 fallbacks, so small and medium fleets almost always hit. grpc only reads
#: the object it is given, so one instance can be sent many times. Bounded: cleared when full.
_RESPONSE_CACHE_MAX = 4096
_response_cache: dict[tuple[str, str], ep.ProcessingResponse] = {}


def decision_response(d: Decision) -> ep.ProcessingResponse:
    key = (d.header_value, d.used)
    resp = _response_cache.get(key)
    if resp is None:
        if len(_response_cache) >= _RESPONSE_CACHE_MAX:
            _response_cache.clear()
        resp = _response_cache[key] = _build_decision_response(*key)
    return resp


def _build_decision_response(target: str, used: str) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(
                    set_headers=[
                        _header(_TARGET, target.encode()),
                        _header(STRATEGY_USED_HEADER, used.encode()),
                    ]
                )
            )
        )
    )


def error_response(err: ClientError) -> ep.ProcessingResponse:
    headers = [_header("content-type", b"application/json")]
    if err.retry_after_s:
        headers.append(_header("retry-after", str(err.retry_after_s).encode()))
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=err.status),  # type: ignore[arg-type]
            headers=ep.HeaderMutation(set_headers=headers),
            body=err.body(),
            details=err.details,
        )
    )


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self.router = router
        self._spoof_logged = False
        #: Set by the server when router.auth.mode is token: every stream must carry it.
        self.auth: StreamAuth | None = None

    def handle_request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        """The hot path: read the three headers the router uses into one RequestContext,
        route, encode. No I/O, no awaits, no locks."""
        requested: str | None = None
        request_id = ""
        spoofed = False
        for h in msg.headers.headers:
            k = h.key
            if k == _STRATEGY_REQ:
                requested = (h.raw_value or h.value.encode()).decode("utf-8", "replace").strip()
            elif k == _TARGET:
                spoofed = True
                self._client_target_header()
            elif k == _REQ_ID:
                request_id = (h.raw_value or h.value.encode()).decode("utf-8", "replace")
        ctx = RequestContext(requested or None, request_id, spoofed)
        result = self.router.route(ctx)
        if isinstance(result, Decision):
            return decision_response(result)
        if isinstance(result, NotReady):
            # No snapshot yet: send no x-target-pod, Envoy's fallback policy balances.
            return _CONTINUE_HEADERS_REQ
        # Debug only: a client repeating a bad request must not flood the log; the decision
        # counters (outcome="bad_request" / "no_pod") carry the rate at default level.
        log.debug(
            "request %s answered %d: %s",
            request_id or "-",
            result.status,
            result.code,
            extra={"request_id": request_id} if request_id else None,
        )
        return error_response(result)

    def _client_target_header(self) -> None:
        self.router.stats.client_target_header += 1
        if not self._spoof_logged:
            self._spoof_logged = True
            log.warning(
                "a request reached the router with a client-set %s header: Envoy's "
                "early_header_mutation should strip it. Overwriting it (logged once).",
                _TARGET,
            )

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        if self.auth is not None:
            await self.auth.admit(context, EXT_PROC_SERVICE)  # aborts the stream if not
        stats = self.router.stats
        stats.streams_open += 1
        stats.streams_total += 1
        try:
            async for req in request_iterator:
                which = req.WhichOneof("request")
                if which == "request_headers":
                    try:
                        yield self.handle_request_headers(req.request_headers)
                    except Exception:
                        # Never break the stream over a routing bug: Envoy then balances itself.
                        log.exception("routing failed; answering without a target")
                        yield _CONTINUE_HEADERS_REQ
                elif which in _CONTINUE:
                    yield _CONTINUE[which]
                # Anything else (unknown future variants) has no answer in the protocol.
        finally:
            stats.streams_open -= 1
