"""The request as the router sees it: built once per request by the ext_proc adapter.

Every routing plugin, Explain and the benchmarks take this one object, so a plugin that needs a
new fact about the request reads a field here instead of growing a parameter through the
adapter, the router and every plugin in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router_ext.config import (
    MODEL_HEADER,
    MODEL_NONE,
    MODEL_NOT_JSON,
    REQUEST_ID_HEADER,
    SESSION_HEADER,
    STRATEGY_REQUEST_HEADER,
    TARGET_POD_HEADER,
)

if TYPE_CHECKING:
    from router_ext.routing.prompt import PromptFacts

#: Paths whose bodies carry a prompt (the only ones a body-reading profile asks Envoy for).
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
#: Longest session key used: a longer one is cut (hashing it all buys nothing, and the key
#: comes from the client).
MAX_SESSION_KEY = 256


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What the body says that routing may use (set only when the adapter read the body)."""

    prompt_chars: int = 0
    max_tokens: int | None = None
    stream: bool = False


@dataclass(slots=True)
class RequestContext:
    """One request. Plugins read it; only the adapter fills it.

    Envoy sends the router only the headers in config.ROUTER_READS_HEADERS (plus the session
    header), and the body only when the profile has a body-reading plugin and asked for it.
    """

    #: Profile the client asked for (x-routing-strategy-request), None = the default.
    profile: str | None = None
    #: Envoy's x-request-id ("" if absent), for log lines.
    request_id: str = ""
    #: The request arrived with a client-set x-target-pod (Envoy should have stripped it).
    client_target_pod: bool = False
    #: The model the body names (from MODEL_HEADER, set by Envoy), None if it names none.
    model: str | None = None
    #: MODEL_HEADER as received: None (no body: GET), MODEL_NONE, MODEL_NOT_JSON or a model.
    model_header: str | None = None
    body: BodyFacts | None = None
    prefix_hashes: tuple[int, ...] = ()
    session_key: str | None = None
    method: str = ""
    path: str = ""
    #: None: no content-length (chunked upload, or no body).
    content_length: int | None = None
    content_encoding: str = ""

    def use_prompt(self, facts: PromptFacts) -> None:
        """What a parsed body adds (the ext_proc body phase, Explain)."""
        if self.model is None and self.model_header is None and facts.model:
            self.model = facts.model  # an Envoy without json_to_metadata: the body says it
        self.body = BodyFacts(facts.prompt_chars, facts.max_tokens, facts.stream)
        self.prefix_hashes = facts.hashes

    def set_model_header(self, value: str) -> None:
        self.model_header = value
        self.model = None if value in (MODEL_NONE, MODEL_NOT_JSON) or not value else value

    @classmethod
    def from_headers(
        cls, headers: Iterable[tuple[str, str]], session_header: str = SESSION_HEADER
    ) -> RequestContext:
        """From (name, value) pairs as an operator types them (Explain, tools).

        The ext_proc adapter has its own loop over Envoy's protobuf header list: that one is on
        the hot path and reads raw bytes. Both read the same headers the same way.
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
            elif key == MODEL_HEADER:
                ctx.set_model_header(v.strip())
            elif key == session_header:
                ctx.session_key = v[:MAX_SESSION_KEY] or None
            elif key == ":path":
                ctx.path = v
            elif key == ":method":
                ctx.method = v
        return ctx
