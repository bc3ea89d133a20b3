#!/usr/bin/env bash
# Regenerates the admin API's Python code (router_ext/api/v1) from proto/ with grpcio-tools.
#   scripts/gen-proto.sh            write into router_ext/api/v1 (commit the result)
#   scripts/gen-proto.sh OUT_DIR    write into OUT_DIR instead (the up-to-date test uses this)
# protoc names the Python package after the proto path (router_ext.v1); the code lives in
# router_ext.api.v1, so the generated cross-module import is rewritten to match. No .pyi:
# mypy always reads stubs, and the protobuf runtime has no types for them to check against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
out="${1:-router_ext/api/v1}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$tmp" --grpc_python_out="$tmp" \
  proto/router_ext/v1/admin.proto
mkdir -p "$out"
for f in admin_pb2.py admin_pb2_grpc.py; do
  sed -e 's/^from router_ext\.v1 import /from router_ext.api.v1 import /' \
    "$tmp/router_ext/v1/$f" > "$out/$f"
done
