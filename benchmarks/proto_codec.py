"""xds-protos (upb, C) vs envoy-data-plane (betterproto2, pure-Python dataclasses) on the hot path.

The design named envoy-data-plane; router-ext uses xds-protos for the ext_proc messages. This
measures the part of a request the choice affects: decode Envoy's ProcessingRequest (request
headers, realistic header set), find two headers, build the ProcessingResponse with the header
mutation, encode it. Both run on the same bytes in one invocation, interleaved, so the ratio
is meaningful on a noisy machine. envoy-data-plane is installed into its own virtualenv
(benchmarks/.venv-edp) because both packages are not meant to share one environment.

    python -m benchmarks.proto_codec            # prints a Markdown table
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDP_VENV = HERE / ".venv-edp"
EDP_VERSION = "envoy-data-plane==2.2.0"
N = 20000
ROUNDS = 5

_EDP_CHILD = r"""
import sys, time, json
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    ProcessingRequest, ProcessingResponse, HeadersResponse, CommonResponse, HeaderMutation)
from envoy_data_plane.envoy.config.core.v3 import (
    HeaderValueOption, HeaderValue, HeaderValueOptionHeaderAppendAction)
OVER = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
data = bytes.fromhex(sys.argv[1]); n = int(sys.argv[2])
def one():
    req = ProcessingRequest().parse(data)
    strat = b""
    for h in req.request_headers.headers.headers:
        if h.key == "x-routing-strategy-request":
            strat = h.raw_value
    resp = ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(
        header_mutation=HeaderMutation(set_headers=[
            HeaderValueOption(header=HeaderValue(key="x-target-pod",
                raw_value=b"10.0.0.1:8000,10.0.0.2:8000,10.0.0.3:8000"), append_action=OVER),
            HeaderValueOption(header=HeaderValue(key="x-routing-strategy",
                raw_value=strat or b"least-request"), append_action=OVER)]))))
    return bytes(resp)
out = one()
t = time.perf_counter()
for _ in range(n):
    one()
print(json.dumps({"us": (time.perf_counter() - t) / n * 1e6, "size": len(out)}))
"""


def request_bytes() -> bytes:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    hdrs = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        ":authority": "inference.example",
        ":scheme": "http",
        "content-type": "application/json",
        "content-length": "182",
        "user-agent": "openai-python/1.54.0",
        "accept": "application/json",
        "authorization": "Bearer sk-" + "x" * 40,
        "x-request-id": "0b7e3a58-8d1e-4d1f-9f3c-0e2b6f1c9a77",
        "x-forwarded-proto": "http",
        "x-routing-strategy-request": "least-kv-cache",
    }
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hdrs.items()]
            )
        )
    )
    return msg.SerializeToString()


def xds_protos_us(data: bytes, n: int) -> float:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    over = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

    def one() -> bytes:
        req = ep.ProcessingRequest.FromString(data)
        strat = b""
        for h in req.request_headers.headers.headers:
            if h.key == "x-routing-strategy-request":
                strat = h.raw_value
        resp = ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(
                response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(
                        set_headers=[
                            base_pb2.HeaderValueOption(
                                header=base_pb2.HeaderValue(
                                    key="x-target-pod",
                                    raw_value=b"10.0.0.1:8000,10.0.0.2:8000,10.0.0.3:8000",
                                ),
                                append_action=over,
                            ),
                            base_pb2.HeaderValueOption(
                                header=base_pb2.HeaderValue(
                                    key="x-routing-strategy", raw_value=strat or b"least-request"
                                ),
                                append_action=over,
                            ),
                        ]
                    )
                )
            )
        )
        out: bytes = resp.SerializeToString()
        return out

    one()
    t = time.perf_counter()
    for _ in range(n):
        one()
    return (time.perf_counter() - t) / n * 1e6


def ensure_edp() -> Path:
    py = EDP_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(EDP_VENV)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", EDP_VERSION],
            check=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    return py


def main() -> int:
    data = request_bytes()
    py = ensure_edp()
    upb: list[float] = []
    edp: list[float] = []
    for _ in range(ROUNDS):  # interleaved: both see the same machine noise
        upb.append(xds_protos_us(data, N))
        out = subprocess.run(
            [str(py), "-c", _EDP_CHILD, data.hex(), str(N // 10)],
            check=True,
            capture_output=True,
            text=True,
        )
        edp.append(json.loads(out.stdout)["us"])
    u, e = statistics.median(upb), statistics.median(edp)
    print("| library | µs per request (decode + build + encode), median of 5 | ratio |")
    print("|---|---|---|")
    print(f"| xds-protos (upb) | {u:.1f} | 1.0 |")
    print(f"| envoy-data-plane 2.2.0 (betterproto2) | {e:.1f} | {e / u:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
