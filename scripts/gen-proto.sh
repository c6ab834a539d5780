#!/usr/bin/env bash
# Regenerates the CRI stubs in src/moorage/cri/v1 from proto/ (the only way they are made).
# tests/unit/test_generated.py runs this into a temp dir and fails when the committed copy differs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/src}
python=${PYTHON:-python3}
"$python" -m grpc_tools.protoc -I"$here/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here/proto/moorage/cri/v1/api.proto"
