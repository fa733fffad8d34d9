#!/usr/bin/env bash
# Side by side on one machine, in one run: a three-member etcd (fsync on, as
# shipped), Redis with `appendfsync always`, and a three-node idemkv, all on
# loopback, each loaded by `idemkv bench` with the same workloads, and the
# gRPC floor (`--target floor`: idemkv's API answered at once from memory, in
# the load generator's process) to show what any gRPC service reaches here,
# and the replicated floor (`--target replicated-floor`: the same server with
# two follower processes it starts, every write fdatasynced by the leader and
# one follower before it is answered, no Raft and no storage engine) to
# show what any three-copy, majority-durable gRPC service reaches here.
# Prints one markdown table with ratios and keeps every JSON report.
#
#   cluster/bench.sh [--duration 10s] [--warmup 2s] [--clients 64] [--rounds 1]
#                    [--only claim,lifecycle,...] [--quick] [--out DIR] [--keep]
#                    [--sweep]
#
# --rounds N runs the whole matrix N times, one round after another (each
# round interleaves the systems per workload), and the table shows each
# figure's median over the rounds.
#
# --sweep runs, instead of the matrix, the claim workload (or each workload
# of --only) at 1, 4, 16, 64 and 256 clients against every system, and draws
# throughput and p99 against clients into DIR/sweep-WORKLOAD.svg
# (`idemkv plot`).
#
# Installs etcd-server and redis-server (Debian) when missing and run as root.
# Ports are picked at run time; everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10s
WARMUP=2s
CLIENTS=64
ONLY=""
ROUNDS=1
SWEEP=0
OUT="cluster/out/$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --sweep) SWEEP=1; shift ;;
        --quick) DURATION=3s; WARMUP=1s; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --keep) export KEEP=1; shift ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
COMMAND="cluster/bench.sh --duration $DURATION --warmup $WARMUP --clients $CLIENTS --rounds $ROUNDS${ONLY:+ --only $ONLY}"
[ "$SWEEP" = 1 ] && COMMAND="$COMMAND --sweep"

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null || ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "etcd and redis-server are needed (Debian: etcd-server, redis-server); run as root to install them" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q etcd-server etcd-client redis-server >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q etcd-server etcd-client redis-server >/dev/null; }
fi

# shellcheck source=cluster/lib.sh
. cluster/lib.sh
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"

start_etcd() {
    local cluster="" id
    declare -ga ETCD_CLIENT=()
    declare -a etcd_peer=()
    for id in 1 2 3; do
        ETCD_CLIENT[$id]=$(free_port)
        etcd_peer[$id]=$(free_port)
        cluster+="${cluster:+,}e$id=http://127.0.0.1:${etcd_peer[$id]}"
    done
    for id in 1 2 3; do
        etcd --name "e$id" --data-dir "$TMP/etcd-$id" \
            --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$id]}" \
            --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$id]}" \
            --listen-peer-urls "http://127.0.0.1:${etcd_peer[$id]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer[$id]}" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token idemkv-bench >"$TMP/etcd-$id.log" 2>&1 &
        STARTED+=($!)
    done
    ETCD_ENDPOINTS="127.0.0.1:${ETCD_CLIENT[1]},127.0.0.1:${ETCD_CLIENT[2]},127.0.0.1:${ETCD_CLIENT[3]}"
    for _ in $(seq 100); do
        ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    tail -n 20 "$TMP"/etcd-*.log >&2
    echo "etcd did not become healthy" >&2
    return 1
}

start_redis() {
    REDIS_PORT=$(free_port)
    mkdir -p "$TMP/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --appendonly yes \
        --appendfsync always --save "" --dir "$TMP/redis" >"$TMP/redis.log" 2>&1 &
    STARTED+=($!)
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
        sleep 0.1
    done
    echo "redis did not start" >&2
    return 1
}

# run_one TARGET ENDPOINTS WORKLOAD CLIENTS [extra bench options...]
FAILED=0
run_one() {
    local target=$1 endpoints=$2 workload=$3 clients=$4
    shift 4
    echo "== $target $workload, $clients clients" >&2
    local line at=()
    # The floor runs its own in-process server: no endpoints.
    [ -n "$endpoints" ] && at=(--endpoints "$endpoints")
    if ! line=$("$BIN" bench --target "$target" "${at[@]}" --workload "$workload" \
        --clients "$clients" --duration "$DURATION" --warmup "$WARMUP" --json "$@"); then
        FAILED=1
    fi
    [ -n "$line" ] && echo "$line" >>"$RESULTS"
}

start_etcd
start_redis
start_idemkv
echo "etcd $ETCD_ENDPOINTS, redis 127.0.0.1:$REDIS_PORT, idemkv $IDEMKV_ENDPOINTS" >&2

ETCD_FIRST="${ETCD_ENDPOINTS%%,*}"
run_matrix() {
    local workload=$1 clients=$2
    shift 2
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$workload,"* ]]; then return 0; fi
    # Interleaved, so each system sees the same machine state.
    run_one idemkv "$IDEMKV_ENDPOINTS" "$workload" "$clients" "$@"
    run_one etcd "$ETCD_FIRST" "$workload" "$clients" "$@"
    run_one redis "127.0.0.1:$REDIS_PORT" "$workload" "$clients" "$@"
    # What gRPC alone reaches here (storm is the claim path; the floor
    # answers Claim, Complete and Get).
    run_one floor "" "$workload" "$clients" "$@"
    # What three copies, synced on a majority, cost on top of it.
    run_one replicated-floor "" "$workload" "$clients" "$@"
}
SWEPT="${ONLY:-claim}"
sweep() {
    local workload clients
    for workload in ${SWEPT//,/ }; do
        for clients in 1 4 16 64 256; do
            if [ "$workload" = batch ]; then
                run_matrix batch "$clients" --batch 100
            else
                run_matrix "$workload" "$clients"
            fi
        done
    done
}
for round in $(seq "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && echo "== round $round of $ROUNDS" >&2
    if [ "$SWEEP" = 1 ]; then
        sweep
        continue
    fi
    run_matrix claim 1
    run_matrix claim "$CLIENTS"
    run_matrix lifecycle "$CLIENTS"
    run_matrix storm "$CLIENTS" --keys 100
    run_matrix mixed "$CLIENTS"
    run_matrix get "$CLIENTS"
    # ClaimBatch: 16 clients, 100 keys per call (etcd: one Txn, Redis: one
    # pipeline); its rows count keys per second, not calls.
    run_matrix batch 16 --batch 100
done

write_table() {
    python3 - "$RESULTS" "$COMMAND" <<'PY'
import json, platform, subprocess, sys, datetime, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except Exception:
        return "?"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}; "
      f"{version(['etcd', '--version'])}; {version(['redis-server', '--version'])}; "
      f"{version(['target/release/idemkv', '--version'])}.")
print(f"Command: `{sys.argv[2]}`. ops/s and latency in ms (p50 / p99), each the median over the rounds; ratios: idemkv over the other.")
print()
print("| workload | clients | idemkv ops/s | p50 / p99 | etcd ops/s | p50 / p99 | redis ops/s | p50 / p99 | floor ops/s | p50 / p99 | replicated floor ops/s | p50 / p99 | ×etcd ops | etcd p99 ÷ idemkv p99 | ×redis ops | redis p99 ÷ idemkv p99 | share of floor | share of replicated floor |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
keys = []
for r in rows:
    k = (r["workload"], r["clients"])
    if k not in keys:
        keys.append(k)
# The batch workload's rate is keys per second (its latency is per call).
rate = lambda r: r.get("items_per_sec", r["ops_per_sec"])
def cell(r):
    if r is None:
        return "—", "—"
    mark = "" if r["check"]["passed"] and r["errors"] == 0 else " FAILED"
    l = r["latency_us"]
    return f"{rate(r):.0f}{mark}", f"{l['p50']/1000:.2f} / {l['p99']/1000:.2f}"
import statistics
def median_row(rs):
    """One report whose figures are the medians of `rs` (a failed check in
    any round marks it failed)."""
    out = dict(rs[0])
    for f in ("ops_per_sec", "items_per_sec"):
        if f in out:
            out[f] = statistics.median(r[f] for r in rs)
    out["latency_us"] = {q: statistics.median(r["latency_us"][q] for r in rs) for q in ("p50", "p99")}
    out["check"] = {"passed": all(r["check"]["passed"] for r in rs)}
    out["errors"] = sum(r["errors"] for r in rs)
    return out
for k in keys:
    by = {}
    for r in rows:
        if (r["workload"], r["clients"]) == k:
            by.setdefault(r["target"], []).append(r)
    by = {t: median_row(rs) for t, rs in by.items()}
    i, e, d, f, g = by.get("idemkv"), by.get("etcd"), by.get("redis"), by.get("floor"), by.get("replicated-floor")
    def ratio(a, b, f):
        return f"{f(a, b):.2f}" if a and b else "—"
    ops = lambda a, b: rate(a) / rate(b)
    p99 = lambda a, b: b["latency_us"]["p99"] / a["latency_us"]["p99"]
    name = f"{k[0]} ×{i.get('items_per_op', 1)} keys/s" if k[0] == "batch" and i else k[0]
    print(f"| {name} | {k[1]} | {' | '.join(cell(i))} | {' | '.join(cell(e))} | {' | '.join(cell(d))} | {' | '.join(cell(f))} | {' | '.join(cell(g))} | "
          f"{ratio(i, e, ops)} | {ratio(i, e, p99)} | {ratio(i, d, ops)} | {ratio(i, d, p99)} | {ratio(i, f, ops)} | {ratio(i, g, ops)} |")
PY
}
write_table | tee "$OUT/table.md"
if [ "$SWEEP" = 1 ]; then
    for workload in ${SWEPT//,/ }; do
        "$BIN" plot --input "$RESULTS" --workload "$workload" --out "$OUT/sweep-$workload.svg" \
            --subtitle "$COMMAND; medians of $ROUNDS round(s); $(nproc) CPUs; $(date +%Y-%m-%d)" >&2 || FAILED=1
    done
fi
echo "reports: $RESULTS" >&2
if [ "$FAILED" = 1 ]; then
    echo "a workload failed its checks (marked FAILED above)" >&2
    exit 1
fi
