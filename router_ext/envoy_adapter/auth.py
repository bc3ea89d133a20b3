"""Who may feed the router: a shared token that Envoy sends on every gRPC stream.

ext_proc answers and access-log feedback both change where traffic goes, so a process that can
reach the router's port must not be believed just for connecting (an outside probe turned
8,499 of 8,550 requests into 503s with forged access-log entries). Envoy sends the token as
gRPC initial metadata (`GrpcService.initial_metadata`, rendered by `router-ext envoy-config`);
the protected servicers check it at the start of every stream and refuse the rest with
UNAUTHENTICATED, counted and logged once a minute at most.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

__all__ = ["TOKEN_METADATA_KEY", "StreamAuth", "TokenError", "load_or_create_token"]

log = logging.getLogger("router_ext.envoy_adapter.auth")

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


class StreamAuth:
    """Checks the token at the start of every stream of a protected service.

    Called by the two servicers themselves (ext_proc, access log) rather than from a gRPC
    server interceptor: in grpc.aio any interceptor routes every call through an extra chain
    of Python coroutines, which cost the ext_proc path ~10% of its throughput here; one
    metadata scan per stream costs ~1 µs. `on_refused(service)` is called once per refused
    stream (a counter); logging is throttled here so a client hammering the port cannot
    flood the log.
    """

    def __init__(self, token: str, on_refused: Callable[[str], None]) -> None:
        self._token = token.encode()
        self._on_refused = on_refused
        self._logged_at = -_REFUSED_LOG_EVERY_S
        self._since_log = 0

    def authorised(self, metadata: Any) -> bool:
        for item in metadata or ():
            key, value = item[0], item[1]
            if key == TOKEN_METADATA_KEY:
                raw = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(raw, self._token)
        return False

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any], service: str) -> None:
        """Return if the stream carries the token; else count, log and abort it."""
        metadata = context.invocation_metadata()
        if self.authorised(metadata):
            return
        await self.refuse(context, service, metadata)

    async def refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], service: str, metadata: Any
    ) -> None:
        """Count, log and abort a stream that failed `authorised` (raises)."""
        self._refused(service, metadata)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENY_DETAILS)

    def _refused(self, service: str, metadata: Any) -> None:
        self._on_refused(service)
        self._since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSED_LOG_EVERY_S:
            has_key = any(m[0] == TOKEN_METADATA_KEY for m in metadata or ())
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
