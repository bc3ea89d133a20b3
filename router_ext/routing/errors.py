"""OpenAI-style error bodies, so clients' SDKs surface a readable message, not an opaque 503."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from router_ext.config import STRATEGY_NAMES, STRATEGY_REQUEST_HEADER


@dataclass(frozen=True, slots=True)
class ClientError:
    status: int
    message: str
    type: str
    code: str
    details: str  # Envoy's response-code details (shows in access logs as %RESPONSE_CODE_DETAILS%)
    retry_after_s: int = 0  # sent as retry-after when > 0

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "code": self.code}}
        ).encode()


def unknown_strategy(name: str, valid: Sequence[str] = STRATEGY_NAMES) -> ClientError:
    """400 for a profile the client may not ask for. Unknown and not-allowed profiles get the
    same answer, naming only the allowed ones: a client learns nothing about the others."""
    shown = name if len(name) <= 64 else name[:61] + "..."
    return ClientError(
        status=400,
        message=(
            f"unknown routing strategy {shown!r} in header {STRATEGY_REQUEST_HEADER}; "
            f"valid strategies: {', '.join(valid)}"
        ),
        type="invalid_request_error",
        code="unknown_routing_strategy",
        details="router_ext_unknown_strategy",
    )


SATURATED = ClientError(
    status=429,
    message="every inference pod is saturated (request queues full); retry shortly",
    type="server_overloaded",
    code="all_pods_saturated",
    details="router_ext_saturated",
    retry_after_s=1,
)

NO_POD = ClientError(
    status=503,
    message="no inference pod is available to serve this request; retry later",
    type="service_unavailable",
    code="no_pod_available",
    details="router_ext_no_pod",
)


def model_not_found(model: str) -> ClientError:
    """404 for a model no pod serves, worded as vLLM words it (its clients match on that)."""
    shown = model if len(model) <= 128 else model[:125] + "..."
    return ClientError(
        status=404,
        message=f"The model `{shown}` does not exist.",
        type="NotFoundError",
        code="model_not_found",
        details="router_ext_model_not_found",
    )


MODEL_REQUIRED = ClientError(
    status=400,
    message=(
        "the request body names no model, and this endpoint serves several: set `model` "
        "(GET /v1/models lists them)"
    ),
    type="invalid_request_error",
    code="model_required",
    details="router_ext_model_required",
)

INVALID_BODY = ClientError(
    status=400,
    message=(
        "the request body is not JSON, so it names no model, and this endpoint serves several"
    ),
    type="invalid_request_error",
    code="invalid_request_body",
    details="router_ext_invalid_body",
)
