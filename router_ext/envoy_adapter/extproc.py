"""Envoy ext_proc adapter: turns a request's headers (and, when asked for, its body) into a
header mutation naming the pods.

Per stream (one HTTP request):
- headers only (every profile without a body-reading plugin, and every request a body would
  not help): route, answer `x-target-pod` in the header response. Nothing else arrives.
- body on demand: the profile reads the prompt, the path is a completion path and the body has
  a length under routing.max_body_bytes. The header response carries no target, only
  `mode_override=BODY_MODE_OVERRIDE` (the one override the bootstrap allows); Envoy then sends
  the whole body in one message, and the body response carries `x-target-pod` (a header
  mutation in a BUFFERED body response is honoured). The body itself is never mutated.
- `GET /v1/models` is answered here from the snapshot (the union over routable pods), so one
  dead pod never breaks it.
- router.answer epp: the same decision, said as a Gateway API Inference Extension endpoint
  picker says it (header `x-gateway-destination-endpoint` and dynamic metadata `envoy.lb`, the
  same ordered list), so a gateway built for an EPP can use router-ext (docs/epp.md).

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
from google.protobuf import struct_pb2

from router_ext.config import (
    EXT_PROC_SERVICE,
    MODEL_HEADER,
    MODEL_NONE,
    MODEL_NOT_JSON,
    PREFIX_HEADER,
    REQUEST_ID_HEADER,
    STRATEGY_REQUEST_HEADER,
    STRATEGY_USED_HEADER,
    TARGET_POD_HEADER,
)
from router_ext.envoy_adapter import wire
from router_ext.envoy_adapter.auth import StreamAuth
from router_ext.envoy_adapter.modes import BODY_MODE_OVERRIDE
from router_ext.routing import Decision, RequestContext
from router_ext.routing.context import COMPLETION_PATHS, MAX_SESSION_KEY
from router_ext.routing.errors import NO_POD, ClientError
from router_ext.routing.prompt import BodySkip
from router_ext.routing.router import NotReady, Router

log = logging.getLogger("router_ext.envoy_adapter.extproc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STRATEGY_REQ = STRATEGY_REQUEST_HEADER
_TARGET = TARGET_POD_HEADER
_REQ_ID = REQUEST_ID_HEADER

# Answers that carry nothing: the protocol wants one response per message Envoy sends.
_CONTINUE_HEADERS_REQ = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE_BODY_REQ = ep.ProcessingResponse(request_body=ep.BodyResponse())
#: Header answer that asks Envoy for the buffered body (and sets no target yet).
_ASK_FOR_BODY = ep.ProcessingResponse(
    request_headers=ep.HeadersResponse(), mode_override=BODY_MODE_OVERRIDE
)
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


#: Built answers by (x-target-pod, strategy used). A fleet of n pods has up to n(n-1)(n-2)
#: distinct answers per strategy with 2 fallbacks, so small fleets almost always hit and
#: large ones almost never do: a miss is encoded by `wire` (~2 µs), so the cache saves little
#: and the handler's cost does not grow with the pool. grpc only reads the object it is
#: given, so one instance can be sent many times. Bounded: cleared when full.
_RESPONSE_CACHE_MAX = 4096
#: One cache per phase: the same answer is a HeadersResponse or, after a mode override, a
#: BodyResponse.
_response_cache: dict[tuple[str, str], ep.ProcessingResponse] = {}
_body_response_cache: dict[tuple[str, str], ep.ProcessingResponse] = {}
#: The strategy header as encoded, per profile name used (a handful of values).
_used_options: dict[str, bytes] = {}


def decision_response(d: Decision) -> ep.ProcessingResponse:
    return _cached(_response_cache, d, body_phase=False)


def body_decision_response(d: Decision) -> ep.ProcessingResponse:
    """The same answer in the body phase (after a mode override)."""
    return _cached(_body_response_cache, d, body_phase=True)


def _cached(
    cache: dict[tuple[str, str], ep.ProcessingResponse], d: Decision, body_phase: bool
) -> ep.ProcessingResponse:
    key = (d.header_value, d.used)
    resp = cache.get(key)
    if resp is None:
        if len(cache) >= _RESPONSE_CACHE_MAX:
            cache.clear()
        resp = cache[key] = wire.set_headers_answer(_decision_options(*key), body_phase)
    return resp


def _decision_options(target: str, used: str) -> tuple[bytes, bytes]:
    opt = _used_options.get(used)
    if opt is None:
        if len(_used_options) >= _RESPONSE_CACHE_MAX:
            _used_options.clear()
        opt = _used_options[used] = wire.header_option(STRATEGY_USED_HEADER, used.encode())
    return wire.header_option(_TARGET, target.encode()), opt


def with_prefix_response(d: Decision, body_phase: bool, prefix: bytes) -> ep.ProcessingResponse:
    """The decision answer that also sets the prefix header (several replicas: the access
    log carries it to the others). Never cached: the prefix is per prompt."""
    options = (
        *_decision_options(d.header_value, d.used),
        wire.header_option(PREFIX_HEADER, prefix),
    )
    return wire.set_headers_answer(options, body_phase)


#: The endpoint picker protocol's names (gateway-api-inference-extension, proposal 004): the
#: destination header, and the dynamic-metadata namespace and key holding the same list.
EPP_DESTINATION_HEADER = "x-gateway-destination-endpoint"
EPP_METADATA_NAMESPACE = "envoy.lb"
_epp_response_cache: dict[tuple[str, str, bool], ep.ProcessingResponse] = {}


def epp_decision_response(d: Decision, body_phase: bool = False) -> ep.ProcessingResponse:
    """The decision as an EPP answers: header and `envoy.lb` metadata, primary first.

    Both carry the identical string (the protocol forbids them to differ), the same ordered
    `ip:port,ip:port,...` list x-target-pod carries, so a gateway that walks it on retry gets
    the fallbacks too. The strategy header stays: it is what logs and clients read.
    """
    key = (d.header_value, d.used, body_phase)
    resp = _epp_response_cache.get(key)
    if resp is None:
        if len(_epp_response_cache) >= _RESPONSE_CACHE_MAX:
            _epp_response_cache.clear()
        target, used = d.header_value, d.used
        common = ep.CommonResponse(
            header_mutation=ep.HeaderMutation(
                set_headers=[
                    _header(EPP_DESTINATION_HEADER, target.encode()),
                    _header(STRATEGY_USED_HEADER, used.encode()),
                ]
            )
        )
        metadata = struct_pb2.Struct()
        metadata.update({EPP_METADATA_NAMESPACE: {EPP_DESTINATION_HEADER: target}})
        if body_phase:
            resp = ep.ProcessingResponse(
                request_body=ep.BodyResponse(response=common), dynamic_metadata=metadata
            )
        else:
            resp = ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(response=common), dynamic_metadata=metadata
            )
        _epp_response_cache[key] = resp
    return resp


def models_response(body: bytes) -> ep.ProcessingResponse:
    """`GET /v1/models` answered by the router."""
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=200),  # type: ignore[arg-type]
            headers=ep.HeaderMutation(set_headers=[_header("content-type", b"application/json")]),
            body=body,
            details="router_ext_models",
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


_PATH = ":path"
_METHOD = ":method"
_MODEL = MODEL_HEADER
_LENGTH = "content-length"
_ENCODING = "content-encoding"
_IDENTITY = ("", "identity")
_NO_MODEL = (MODEL_NONE, MODEL_NOT_JSON)
#: Slots of request_context's header pass (the order its unpacking reads them in).
_SLOTS = {
    _PATH: 0,
    _METHOD: 1,
    _MODEL: 2,
    _REQ_ID: 3,
    _LENGTH: 4,
    _STRATEGY_REQ: 5,
    _ENCODING: 7,
    _TARGET: 8,
}
_SESSION_SLOT = 6
_NSLOTS = 9


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self.router = router
        self._spoof_logged = False
        self._session_header = router.cfg.routing.session_header
        # Header name -> its slot in request_context's one pass: one dict lookup per header
        # (measured: the same instructions as a chain of comparisons, one place to extend).
        self._slots = {**_SLOTS, self._session_header: _SESSION_SLOT}
        self._max_body = router.cfg.routing.max_body_bytes
        self._epp = router.cfg.router.answer == "epp"
        # Several replicas learn each other's placements from the access log, which carries
        # the prefix a decision used only if the answer sets it.
        self._share_prefix = len(router.cfg.replica_addresses) > 1
        #: Set by the server when router.auth.mode is token: every stream must carry it.
        self.auth: StreamAuth | None = None

    def request_context(self, msg: ep.HttpHeaders) -> RequestContext:
        """The headers the router reads, into one RequestContext. No I/O, no awaits.

        The hot path's biggest cost after routing itself: one pass, raw bytes kept until the
        end, each value decoded once, the context built in one call.
        """
        slots = self._slots
        v: list[bytes | None] = [None] * _NSLOTS
        for h in msg.headers.headers:
            i = slots.get(h.key)
            if i is not None:
                v[i] = h.raw_value or h.value.encode()
        path, method, model, request_id, length, profile, session, encoding, spoof = v
        if spoof is not None:
            self._client_target_header()
        model_header = model_name = None
        if model is not None:
            model_header = model.decode("utf-8", "replace").strip()
            if model_header and model_header not in _NO_MODEL:
                model_name = model_header
        return RequestContext(
            (profile.decode("utf-8", "replace").strip() or None) if profile else None,
            request_id.decode("utf-8", "replace") if request_id else "",
            spoof is not None,
            model_name,
            model_header,
            None,
            (),
            session[:MAX_SESSION_KEY].decode("utf-8", "replace") if session else None,
            method.decode("ascii", "replace") if method else "",
            path.decode("utf-8", "replace") if path else "",
            int(length) if length is not None and length.isdigit() else None,
            encoding.decode("ascii", "replace").strip().lower() if encoding else "",
        )

    def handle_request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        """The header answer alone (tests, benchmarks): see `headers_phase`."""
        return self.headers_phase(msg)[0]

    def headers_phase(
        self, msg: ep.HttpHeaders
    ) -> tuple[ep.ProcessingResponse, RequestContext | None]:
        """The hot path. Returns the answer, and the request when the answer asks for the
        body (the decision then waits for `handle_request_body`)."""
        ctx = self.request_context(msg)
        router = self.router
        if ctx.method == "GET" and ctx.path.partition("?")[0] == "/v1/models":
            body = router.models_body()
            if body is not None:
                return models_response(body), None
        if router.wants_body(ctx):
            why = self._body_skip(ctx)
            if why is None:
                return _ASK_FOR_BODY, ctx
            router.stats.body_skipped[why] += 1
        return self._answer(ctx, body_phase=False), None

    def _body_skip(self, ctx: RequestContext) -> str | None:
        """Why this request is routed without its body (None: ask for it)."""
        if ctx.method != "POST" or ctx.path.partition("?")[0] not in COMPLETION_PATHS:
            return "not_completion_path"
        if ctx.content_encoding not in _IDENTITY:
            return "encoded"
        n = ctx.content_length
        if n is None:
            return "no_length"
        if n > self._max_body:
            return "too_large"
        return None

    def handle_request_body(self, msg: ep.HttpBody, ctx: RequestContext) -> ep.ProcessingResponse:
        """The body asked for by the header answer: read the prompt, route, answer."""
        raw = msg.body
        stats = self.router.stats
        stats.body_reads += 1
        stats.body_bytes += len(raw)
        facts = self.router.read_prompt(ctx, raw)
        if isinstance(facts, BodySkip):
            stats.body_skipped[facts.value] += 1
        else:
            ctx.use_prompt(facts)
        return self._answer(ctx, body_phase=True)

    def _answer(self, ctx: RequestContext, body_phase: bool) -> ep.ProcessingResponse:
        result = self.router.route(ctx)
        if isinstance(result, Decision):
            if self._epp:
                return epp_decision_response(result, body_phase)
            if self._share_prefix and ctx.prefix_hashes:
                return with_prefix_response(result, body_phase, self.router.prefix_value(ctx))
            return body_decision_response(result) if body_phase else decision_response(result)
        if isinstance(result, NotReady) and self._epp:
            # The EPP protocol: no ready endpoint is a 503, never an answer without one (a
            # gateway may not have a balancer of its own to fall back to).
            result = NO_POD
        elif isinstance(result, NotReady):
            # No snapshot yet: send no x-target-pod, Envoy's fallback policy balances.
            return _CONTINUE_BODY_REQ if body_phase else _CONTINUE_HEADERS_REQ
        # Debug only: a client repeating a bad request must not flood the log; the decision
        # counters (outcome="bad_request" / "no_pod") carry the rate at default level.
        log.debug(
            "request %s answered %d: %s",
            ctx.request_id or "-",
            result.status,
            result.code,
            extra={"request_id": ctx.request_id} if ctx.request_id else None,
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
            # One stream per request: the check inline, no coroutine unless it fails.
            md = context.invocation_metadata()
            if not self.auth.authorised(md):
                await self.auth.refuse(context, EXT_PROC_SERVICE, md)  # aborts the stream
        stats = self.router.stats
        stats.streams_open += 1
        stats.streams_total += 1
        pending: RequestContext | None = None  # asked for the body; routed when it arrives
        try:
            async for req in request_iterator:
                which = req.WhichOneof("request")
                if which == "request_headers":
                    try:
                        resp, pending = self.headers_phase(req.request_headers)
                    except Exception:
                        # Never break the stream over a routing bug: Envoy then balances itself.
                        log.exception("routing failed; answering without a target")
                        resp, pending = _CONTINUE_HEADERS_REQ, None
                    yield resp
                elif which == "request_body" and pending is not None:
                    ctx, pending = pending, None
                    try:
                        yield self.handle_request_body(req.request_body, ctx)
                    except Exception:
                        log.exception("routing on the body failed; answering without a target")
                        yield _CONTINUE_BODY_REQ
                elif which in _CONTINUE:
                    yield _CONTINUE[which]
                # Anything else (unknown future variants) has no answer in the protocol.
        finally:
            stats.streams_open -= 1
