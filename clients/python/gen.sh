#!/usr/bin/env bash
# Generate Python stubs for the idemkv API from the proto (the contract).
# Usage: clients/python/gen.sh [OUT_DIR]   (default: clients/python/gen)
# Needs grpcio-tools: pip install -r clients/python/requirements.txt
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/clients/python/gen}"
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -I "$root/proto" \
    --python_out="$out" --grpc_python_out="$out" \
    "$root/proto/idemkv/v1/api.proto"
echo "stubs in $out (import idemkv.v1.api_pb2, idemkv.v1.api_pb2_grpc)"
