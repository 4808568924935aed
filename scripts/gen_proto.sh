#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf stubs under common/ispf/v1 from proto/.
# Usage: scripts/gen_proto.sh [OUTDIR]   (default: common)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-common}"
py="${PYTHON:-python}"
# protoc finds the mypy plugins on PATH, next to the interpreter.
export PATH="$(dirname "$(command -v "$py")"):$PATH"
mkdir -p "$out/ispf/v1"
"$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  proto/ispf/v1/*.proto
touch "$out/ispf/v1/__init__.py"
