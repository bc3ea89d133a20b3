"""The ext_proc processing modes Envoy runs with, defined once for the renderer and the handler.

Why one module: Envoy honours a `mode_override` only if it equals one of the bootstrap's
`allowed_override_modes` *exactly* (protobuf equality over every field, measured: an override
that differs in one field is silently ignored and the request goes on header-only). The
bootstrap renders these constants (`processing_mode_dict`) and the ext_proc handler sends
`BODY_MODE_OVERRIDE` itself, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from google.protobuf.json_format import MessageToDict

__all__ = ["BODY_MODE_OVERRIDE", "DEFAULT_PROCESSING_MODE", "processing_mode_dict"]

_Header = ProcessingMode.HeaderSendMode
_Body = ProcessingMode.BodySendMode

#: What Envoy sends router-ext for every request: the request headers, nothing else. Every field
#: is set explicitly (SKIP rather than DEFAULT) so the rendered config says what happens.
DEFAULT_PROCESSING_MODE = ProcessingMode(
    request_header_mode=_Header.SEND,
    response_header_mode=_Header.SKIP,
    request_body_mode=_Body.NONE,
    response_body_mode=_Body.NONE,
    request_trailer_mode=_Header.SKIP,
    response_trailer_mode=_Header.SKIP,
)

#: The one override router-ext may ask for in its header answer: the default mode with the
#: request body BUFFERED (whole body in one message, so a header mutation in the body answer is
#: honoured; Envoy ignores header mutations in a body answer in streamed modes). Response
#: phases stay skipped, so streamed tokens are never held up.
BODY_MODE_OVERRIDE = ProcessingMode()
BODY_MODE_OVERRIDE.CopyFrom(DEFAULT_PROCESSING_MODE)
BODY_MODE_OVERRIDE.request_body_mode = _Body.BUFFERED


def processing_mode_dict(mode: ProcessingMode) -> dict[str, Any]:
    """A ProcessingMode as the bootstrap's YAML/JSON, every field named (NONE is enum zero)."""
    plain = MessageToDict(
        mode, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Field-number order, so the rendered YAML reads request headers -> ... -> trailers.
    return {f.name: plain[f.name] for f in ProcessingMode.DESCRIPTOR.fields if f.name in plain}
