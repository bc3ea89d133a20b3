"""The hand-encoded decision answer is the message the protobuf API builds, field for field.

`router_ext.envoy_adapter.wire` encodes the per-request answer directly (the API's nested
constructors cost most of an uncached answer); these tests compare its output with what
`ProcessingResponse(...)` builds, including values long enough to need multi-byte lengths.
"""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from router_ext.config import PREFIX_HEADER, STRATEGY_USED_HEADER, TARGET_POD_HEADER
from router_ext.envoy_adapter.extproc import (
    body_decision_response,
    decision_response,
    with_prefix_response,
)
from router_ext.envoy_adapter.wire import header_option, set_headers_answer
from router_ext.fleet.snapshot import Pod, PodState, PodStatus
from router_ext.routing import Decision

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def api_answer(headers: list[tuple[str, bytes]], body_phase: bool) -> ep.ProcessingResponse:
    common = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=k, raw_value=v), append_action=_OVERWRITE
                )
                for k, v in headers
            ]
        )
    )
    if body_phase:
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))


@pytest.mark.parametrize("body_phase", [False, True])
@pytest.mark.parametrize(
    "headers",
    [
        [("x-target-pod", b"10.0.0.1:8000")],
        [("x-target-pod", b"10.0.0.1:8000,10.0.0.2:8000"), ("x-strategy", b"least-request")],
        # lengths over 127 and over 16,383: two- and three-byte varints at every level
        [("x-target-pod", b",".join([b"[fd00::%x]:8000" % i for i in range(40)]))],
        [("a", b"v" * 20_000), ("b", b""), ("c" * 300, b"\xff\x00")],
    ],
)
def test_encoded_answer_equals_the_api_built_one(
    headers: list[tuple[str, bytes]], body_phase: bool
) -> None:
    ours = set_headers_answer([header_option(k, v) for k, v in headers], body_phase)
    theirs = api_answer(headers, body_phase)
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )
    assert ours.WhichOneof("response") == ("request_body" if body_phase else "request_headers")


def _decision(n: int) -> Decision:
    pods = tuple(
        PodStatus(
            pod=Pod(host=f"10.0.{i // 256}.{i % 256}", port=8000), state=PodState.WARM, index=i
        )
        for i in range(n)
    )
    return Decision(pods=pods, used="least-kv-cache>random")


def test_decision_answers_carry_target_and_strategy() -> None:
    d = _decision(3)
    want = [
        (TARGET_POD_HEADER, d.header_value.encode()),
        (STRATEGY_USED_HEADER, b"least-kv-cache>random"),
    ]
    assert decision_response(d) == api_answer(want, body_phase=False)
    assert body_decision_response(d) == api_answer(want, body_phase=True)
    assert decision_response(d) is decision_response(d)  # cached: one object per answer
    assert with_prefix_response(d, True, b"256.AAAA") == api_answer(
        [*want, (PREFIX_HEADER, b"256.AAAA")], body_phase=True
    )
