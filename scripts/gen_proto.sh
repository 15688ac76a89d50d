#!/usr/bin/env bash
# Regenerates gateway/pb/ from proto/sgw/v1/*.proto and proto/sparkplug/spb.proto. The generated files are committed and never edited;
# tests/test_proto_regen.py fails when they drift from proto/.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default gateway/pb)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/gateway/pb}"
py="${PYTHON:-$here/.venv/bin/python}"
mkdir -p "$out"
# -I at the v1 folder keeps the modules flat (gateway/pb/envelope_pb2.py) with no cross-imports.
PATH="$(dirname "$py"):$PATH" "$py" -m grpc_tools.protoc -I "$here/proto/sgw/v1" --python_out="$out" --mypy_out="$out" \
    "$here/proto/sgw/v1/envelope.proto" "$here/proto/sgw/v1/messages.proto" "$here/proto/sgw/v1/downlink.proto"
# The Sparkplug B payload (the gateway's optional SCADA output) lives apart: it is not sgw's own wire format.
PATH="$(dirname "$py"):$PATH" "$py" -m grpc_tools.protoc -I "$here/proto/sparkplug" --python_out="$out" \
    --mypy_out="$out" "$here/proto/sparkplug/spb.proto"
