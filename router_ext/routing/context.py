"""The request as the router sees it: built once per request by the ext_proc adapter.

Every routing plugin, Explain and the benchmarks take this one object, so a plugin that needs a
new fact about the request reads a field here instead of growing a parameter through the
adapter, the router and every plugin in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from router_ext.config import REQUEST_ID_HEADER, STRATEGY_REQUEST_HEADER, TARGET_POD_HEADER


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What the body says that routing may use. Empty until the adapter reads bodies."""

    prompt_chars: int = 0
    max_tokens: int | None = None
    stream: bool = False


@dataclass(slots=True)
class RequestContext:
    """One request. Plugins read it; only the adapter fills it.

    Today Envoy sends the router request headers only (config.ROUTER_READS_HEADERS), so just
    the first three fields are ever set. The rest are typed slots for request-aware routing
    (model, body facts, prefix hashes, session key): a plugin written against them now keeps
    working when the adapter starts filling them.
    """

    #: Profile the client asked for (x-routing-strategy-request), None = the default.
    profile: str | None = None
    #: Envoy's x-request-id ("" if absent), for log lines.
    request_id: str = ""
    #: The request arrived with a client-set x-target-pod (Envoy should have stripped it).
    client_target_pod: bool = False
    model: str | None = None
    body: BodyFacts | None = None
    prefix_hashes: tuple[int, ...] = ()
    session_key: str | None = None

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, str]]) -> RequestContext:
        """From (name, value) pairs as an operator types them (Explain, tools).

        The ext_proc adapter has its own loop over Envoy's protobuf header list: that one is on
        the hot path and reads raw bytes. Both read the same three headers the same way.
        """
        ctx = cls()
        for k, v in headers:
            key = k.strip().lower()
            if key == STRATEGY_REQUEST_HEADER:
                ctx.profile = v.strip() or None
            elif key == REQUEST_ID_HEADER:
                ctx.request_id = v
            elif key == TARGET_POD_HEADER:
                ctx.client_target_pod = True
        return ctx
