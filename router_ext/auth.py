"""Who may feed the router: a shared token that Envoy sends on every gRPC stream.

ext_proc answers and access-log feedback both change where traffic goes, so a process that can
reach the router's port must not be believed just for connecting (an outside probe turned
8,499 of 8,550 requests into 503s with forged access-log entries). Envoy sends the token as
gRPC initial metadata (`GrpcService.initial_metadata`, rendered by `router-ext envoy-config`);
this interceptor checks it on every stream of the protected services and refuses the rest
with UNAUTHENTICATED, counted and logged once a minute at most.

Why a token and not mTLS: a failed TLS handshake dies inside gRPC core, invisible to the
router, so it could be neither counted nor explained; a token check sees every refused stream.
The token file is generated on first use (0600) and never committed. grpc.health.v1 stays
open on purpose: kubelet gRPC probes cannot send metadata, and health changes nothing.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

__all__ = ["TOKEN_METADATA_KEY", "StreamAuthInterceptor", "TokenError", "load_or_create_token"]

log = logging.getLogger("router_ext.auth")

#: gRPC metadata key (lower case, as HTTP/2 requires) carrying the shared token.
TOKEN_METADATA_KEY = "x-router-ext-token"
_REFUSED_LOG_EVERY_S = 60.0
_MIN_TOKEN_CHARS = 16


class TokenError(ValueError):
    """The token file exists but cannot be used (unreadable, empty, too short)."""


def load_or_create_token(path: Path) -> str:
    """Read the shared token, creating it (32 random bytes, url-safe, mode 0600) if missing.

    Created complete in a temp file and published with link(), which fails if the name exists:
    a router and `router-ext envoy-config` starting together agree on one token, and neither
    can read a half-written one.
    """
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".router-token.", dir=path.parent)  # 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
                os.link(tmp, path)
                log.info("generated a new router token in %s (render Envoy with it)", path)
            except FileExistsError:
                pass  # someone else published one first: use theirs
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise TokenError(f"{path}: cannot create token file: {e.strerror or e}") from e
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise TokenError(f"{path}: cannot read token file: {e.strerror or e}") from e
    if len(token) < _MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenError(
            f"{path}: token must be one line of at least {_MIN_TOKEN_CHARS} non-space characters"
        )
    return token


def _service_of(method: str) -> str:
    # "/package.Service/Method" -> "package.Service"
    return method[1:].split("/", 1)[0] if method.startswith("/") else method


class StreamAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses streams of `protected` services that do not carry the token.

    `on_refused(service)` is called once per refused stream (a counter); logging is throttled
    here so a client hammering the port cannot flood the log.
    """

    def __init__(
        self,
        token: str,
        protected: frozenset[str],
        on_refused: Callable[[str], None],
    ) -> None:
        self._token = token.encode()
        self._protected = protected
        self._on_refused = on_refused
        self._logged_at = -_REFUSED_LOG_EVERY_S
        self._since_log = 0

    def _authorised(self, metadata: Any) -> bool:
        for item in metadata or ():
            key, value = item[0], item[1]
            if key == TOKEN_METADATA_KEY:
                raw = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(raw, self._token)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = _service_of(details.method)
        if handler is None or service not in self._protected:
            return handler
        if self._authorised(details.invocation_metadata):
            return handler
        self._refused(service, details)
        return _deny_like(handler)

    def _refused(self, service: str, details: grpc.HandlerCallDetails) -> None:
        self._on_refused(service)
        self._since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSED_LOG_EVERY_S:
            has_key = any(m[0] == TOKEN_METADATA_KEY for m in details.invocation_metadata or ())
            log.warning(
                "refused %d unauthenticated gRPC stream(s) to %s (%s); only Envoy rendered "
                "by `router-ext envoy-config` with this router's token may feed it "
                "(logged at most once a minute)",
                self._since_log,
                service,
                "wrong token" if has_key else f"no {TOKEN_METADATA_KEY} metadata",
                extra={"service": service},
            )
            self._logged_at = now
            self._since_log = 0


_DENY_DETAILS = "router-ext: missing or wrong token"


async def _abort(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENY_DETAILS)


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that aborts with UNAUTHENTICATED."""
    if handler.request_streaming and handler.response_streaming:

        async def bidi(_it: Any, context: Any) -> AsyncIterator[Any]:
            await _abort(context)
            yield None  # pragma: no cover - abort raises

        return grpc.stream_stream_rpc_method_handler(bidi)
    if handler.request_streaming:

        async def client_stream(_it: Any, context: Any) -> Any:
            await _abort(context)

        return grpc.stream_unary_rpc_method_handler(client_stream)
    if handler.response_streaming:

        async def server_stream(_req: Any, context: Any) -> AsyncIterator[Any]:
            await _abort(context)
            yield None  # pragma: no cover

        return grpc.unary_stream_rpc_method_handler(server_stream)

    async def unary(_req: Any, context: Any) -> Any:
        await _abort(context)

    return grpc.unary_unary_rpc_method_handler(unary)
