#!/usr/bin/env bash
# One million completed records (100-byte results) on a three-node idemkv
# cluster on loopback: resident memory and data size per node, then how long
# a restarted node takes to serve again. Prints one markdown table.
#
#   cluster/million.sh [--records N] [--clients N] [--keep]
#
# Uses target/release/idemkv (built if missing). Ports are picked at run
# time; everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

RECORDS=1000000
CLIENTS=64
while [ $# -gt 0 ]; do
    case "$1" in
        --records) RECORDS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --keep) export KEEP=1; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

# shellcheck source=cluster/lib.sh
. cluster/lib.sh
start_idemkv
ENDPOINTS="$IDEMKV_ENDPOINTS"

echo "loading $RECORDS completed records with $CLIENTS clients..." >&2
"$BIN" bench --endpoints "$ENDPOINTS" --workload lifecycle --clients "$CLIENTS" \
    --ops "$RECORDS" --warmup 0 --value-size 100 --json >"$TMP/load.json"

# A record written last, to look for after the restart.
TOKEN=$("$BIN" ctl --endpoints "$ENDPOINTS" --json claim million probe --owner script |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
"$BIN" ctl --endpoints "$ENDPOINTS" complete million probe --token "$TOKEN" --result done >/dev/null
sleep 2

rss_mib() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }
du_mib() { du -sm "$1" | cut -f1; }
declare -a RSS DU
for id in 1 2 3; do RSS[$id]=$(rss_mib "${IDEMKV_PIDS[$id]}"); DU[$id]=$(du_mib "$TMP/idemkv-$id"); done

# Restart node 2 (SIGKILL: no clean shutdown) and time until it answers a
# read of the probe record from its own replica.
kill -9 "${IDEMKV_PIDS[2]}"; wait "${IDEMKV_PIDS[2]}" 2>/dev/null || true
T0=$(date +%s.%N)
start_idemkv_node 2
until "$BIN" ctl --endpoints "127.0.0.1:${API[2]}" --retry-for 0 get million probe --serializable 2>/dev/null | grep -q COMPLETED; do
    sleep 0.05
done
T1=$(date +%s.%N)
RESTART=$(python3 -c "print(f'{$T1 - $T0:.2f}')")
RSS2=$(rss_mib "${IDEMKV_PIDS[2]}")

LOAD=$(python3 - "$TMP/load.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ok = "passed" if d["check"]["passed"] else "FAILED"
print(f"{d['ops']} lifecycles in {d['elapsed_s']:.0f} s ({d['ops_per_sec']:.0f}/s), check {ok}")
PY
)
echo
echo "| node | resident memory (MiB) | data dir (MiB) |"
echo "|---|---|---|"
for id in 1 2 3; do echo "| $id | ${RSS[$id]} | ${DU[$id]} |"; done
echo
echo "- load: $LOAD"
echo "- node 2 after kill -9 and restart: serving its replica in ${RESTART} s, then ${RSS2} MiB resident"
