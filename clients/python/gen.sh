#!/usr/bin/env bash
# Regenerate the Python stubs of the idemkv API from the proto (the contract)
# into the package: clients/python/idemkv/v1/api_pb2.py(i), api_pb2_grpc.py.
#
#   clients/python/gen.sh            write them into the package
#   clients/python/gen.sh --check    fail (exit 1) when the committed stubs
#                                    differ from what the proto gives now
#   clients/python/gen.sh OUT_ROOT   write them under OUT_ROOT/idemkv/v1/
#
# Needs the grpcio-tools pinned in requirements.txt (PYTHON names the
# interpreter, default python3): the stubs are generated with an older
# grpcio-tools on purpose, so that they run on every grpcio and protobuf the
# package accepts (Python 3.9 included). Another version writes other text.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"

want="$(sed -n 's/^grpcio-tools==//p' "$here/requirements.txt")"
have="$("$py" -c 'from importlib.metadata import version; print(version("grpcio-tools"))' 2>/dev/null || true)"
if [ -z "$have" ]; then
    echo "gen.sh: grpcio-tools is not installed for $py (pip install -r $here/requirements.txt)" >&2
    exit 2
fi
if [ "$have" != "$want" ]; then
    echo "gen.sh: grpcio-tools $have found, requirements.txt pins $want; the stubs would differ" >&2
    exit 2
fi

generate() {
    "$py" -m grpc_tools.protoc -I "$root/proto" \
        --python_out="$1" --grpc_python_out="$1" --pyi_out="$1" \
        "$root/proto/idemkv/v1/api.proto"
}

files="api_pb2.py api_pb2.pyi api_pb2_grpc.py"
case "${1:-}" in
--check)
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    generate "$tmp"
    drift=0
    for f in $files; do
        if ! cmp -s "$tmp/idemkv/v1/$f" "$here/idemkv/v1/$f"; then
            echo "gen.sh --check: clients/python/idemkv/v1/$f differs from proto/idemkv/v1/api.proto:" >&2
            diff -u "$here/idemkv/v1/$f" "$tmp/idemkv/v1/$f" | head -20 >&2 || true
            drift=1
        fi
    done
    if [ "$drift" = 1 ]; then
        echo "run clients/python/gen.sh and commit the result" >&2
        exit 1
    fi
    echo "stubs match proto/idemkv/v1/api.proto"
    ;;
*)
    out="${1:-$here}"
    mkdir -p "$out/idemkv/v1"
    generate "$out"
    echo "stubs in $out/idemkv/v1 ($files)"
    ;;
esac
