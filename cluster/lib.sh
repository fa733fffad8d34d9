# Shared by the scripts in cluster/: the binary, free ports, a three-node
# idemkv cluster of `serve` processes, and stopping everything on exit.
# Source it after `set -euo pipefail` and `cd` to the repository root.

BIN="${IDEMKV_BIN:-$PWD/target/release/idemkv}"
[ -x "$BIN" ] || cargo build --release
TMP="$(mktemp -d)"
KEEP=${KEEP:-0}
declare -a STARTED=()
declare -A IDEMKV_PIDS=()

cleanup() {
    local pids=("${STARTED[@]}" "${IDEMKV_PIDS[@]}")
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ]; then echo "data kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

declare -a API PEER
for id in 1 2 3; do API[$id]=$(free_port); PEER[$id]=$(free_port); done
IDEMKV_PEERS="1=127.0.0.1:${API[1]}/127.0.0.1:${PEER[1]},2=127.0.0.1:${API[2]}/127.0.0.1:${PEER[2]},3=127.0.0.1:${API[3]}/127.0.0.1:${PEER[3]}"
IDEMKV_ENDPOINTS="127.0.0.1:${API[1]},127.0.0.1:${API[2]},127.0.0.1:${API[3]}"

start_idemkv_node() {
    local id=$1 init=()
    [ "$id" = 1 ] && init=(--init)
    "$BIN" serve --id "$id" --listen "127.0.0.1:${API[$id]}" --peer-listen "127.0.0.1:${PEER[$id]}" \
        --data-dir "$TMP/idemkv-$id" --peers "$IDEMKV_PEERS" "${init[@]}" \
        >>"$TMP/idemkv-$id.log" 2>&1 &
    IDEMKV_PIDS[$id]=$!
}

start_idemkv() {
    for id in 1 2 3; do start_idemkv_node "$id"; done
    for _ in $(seq 100); do
        "$BIN" ctl --endpoints "$IDEMKV_ENDPOINTS" status 2>/dev/null | grep -q leader && return 0
        sleep 0.2
    done
    tail -n 20 "$TMP"/idemkv-*.log >&2
    echo "idemkv did not elect a leader" >&2
    return 1
}
