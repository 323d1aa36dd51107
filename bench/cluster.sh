#!/usr/bin/env bash
# Cluster mode benchmark, on demand; prints its figures (docs/cluster.md, "Cost").
#
#   bench/cluster.sh                        # builds portcullis (see bench/run.sh), runs both parts
#   PORTCULLIS_BIN=target/release/portcullis bench/cluster.sh
#
# 1. CPU per request on the cached-token path: one instance without [cluster] and one
#    with [cluster] (a local redis-server), measured in alternating rounds of the same
#    run; then the same pair with a per-API-key rate limit that never refuses (in
#    cluster mode: one Redis call per request, the cost of cluster-wide limits).
#    CPU per request = utime+stime of the gateway over the measured run / requests.
# 2. Revocation propagation across three instances (bench/cluster_revocation.py): a
#    logout on gw-1, then the time until gw-2 and gw-3 refuse the token, from the
#    logout's 204, while wrk keeps both followers busy on the cached path; and the
#    portcullis_cluster_revocation_lag_seconds histograms of gw-2 and gw-3.
#
# Environment (all optional):
#   BENCH_PARTS="cpu revocation"   which parts to run
#   BENCH_ROUNDS=3                 alternating rounds per pair (the median ratio is reported)
#   BENCH_CONNECTIONS=32  BENCH_WARMUP=2s  BENCH_DURATION=5s
#   BENCH_REVOCATIONS=200          logouts measured
#   BENCH_REVOCATION_LOAD=1        0: no wrk load on the followers while measuring
#   PROXY_CPU=1  BACKEND_CPU=0     cores (gateways; backend, Redis and wrk)
#   BENCH_KEEP=1                   keep the temp dir (configs, logs)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PARTS="${BENCH_PARTS:-cpu revocation}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
WARMUP="${BENCH_WARMUP:-2s}"
DURATION="${BENCH_DURATION:-5s}"
REVOCATIONS="${BENCH_REVOCATIONS:-200}"
PROXY_CPU="${PROXY_CPU:-1}"
BACKEND_CPU="${BACKEND_CPU:-0}"
CLUSTER_SECRET="bench-cluster-secret-0123456789-0123456789"

ensure_tools nginx:nginx wrk:wrk curl:curl taskset:util-linux redis-server:redis-server python3:python3
[ "$(nproc --all)" -ge 2 ] || die "needs 2 cores (gateways on CPU $PROXY_CPU, the rest on CPU $BACKEND_CPU)"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

bench_init
build_portcullis
alloc_port REDIS_PORT
mkdir -p "$WORK/redis"
taskset -c "$BACKEND_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
    --appendonly no --dir "$WORK/redis" >"$WORK/redis/log" 2>&1 &
REDIS_PID=$!
STARTED_PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" "redis-server" "$REDIS_PID"
log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT; portcullis: $PORTCULLIS_BIN ($(bin_rev))"

# cluster_toml INSTANCE : the [cluster] table of one instance
cluster_toml() {
    printf '[cluster]\nredis = "redis://127.0.0.1:%s/0"\nname = "bench"\nsecret = "%s"\ninstance = "%s"\n' \
        "$REDIS_PORT" "$CLUSTER_SECRET" "$1"
}

cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
   io.write(string.format("BENCHRESULT %d %d %.1f %.1f\n", summary.requests, summary.errors.status,
      latency:percentile(50), latency:percentile(99)))
end
EOF

# cpu_per_request NAME PID URL : runs wrk (warm-up, then measured) and prints
# "µs_per_request requests p50_us p99_us"
cpu_per_request() {
    local name=$1 pid=$2 url=$3 out="$WORK/wrk-$1" p0 p1 req st p50 p99
    taskset -c "$BACKEND_CPU" wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" -H "Api-Key: $API_KEY" \
        -H "User-Token: $TOKEN" -s "$WORK/report.lua" "$url" >"$out.warmup" 2>&1 || die "wrk failed: $(tail -3 "$out.warmup")"
    p0=$(cpu_ticks "$pid")
    taskset -c "$BACKEND_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -H "Api-Key: $API_KEY" \
        -H "User-Token: $TOKEN" -s "$WORK/report.lua" "$url" >"$out" 2>&1 || die "wrk failed: $(tail -3 "$out")"
    p1=$(cpu_ticks "$pid")
    read -r _ req st p50 p99 < <(grep '^BENCHRESULT ' "$out")
    [ "$st" -eq 0 ] || die "$name answered $st non-2xx responses (of $req): see $out"
    awk -v t=$((p1 - p0)) -v hz="$CLK_TCK" -v n="$req" -v a="$p50" -v b="$p99" \
        'BEGIN { printf "%.2f %d %.0f %.0f\n", t / hz * 1e6 / n, n, a, b }'
}

# compare LABEL EXTRA_TOML : single vs cluster, ROUNDS alternating rounds
compare() {
    local label=$1 extra=$2 sp cp r s c ratios=() slug
    slug="$(tr -c 'a-z0-9\n' '-' <<<"$label")"
    alloc_port sp
    alloc_port cp
    start_portcullis "$sp" "$BACKEND_PORT" 100000 "$extra" "single-$slug"
    local single_pid=$PORTCULLIS_PID
    start_portcullis "$cp" "$BACKEND_PORT" 100000 "$extra
$(cluster_toml gw-1)" "cluster-$slug"
    local cluster_pid=$PORTCULLIS_PID
    check_200 "single ($label)" "http://127.0.0.1:$sp/api/data"
    check_200 "cluster ($label)" "http://127.0.0.1:$cp/api/data"
    printf '%s, %s connections, %s per run:\n' "$label" "$CONNECTIONS" "$DURATION"
    for r in $(seq 1 "$ROUNDS"); do
        s="$(cpu_per_request "single-$slug-$r" "$single_pid" "http://127.0.0.1:$sp/api/data")"
        c="$(cpu_per_request "cluster-$slug-$r" "$cluster_pid" "http://127.0.0.1:$cp/api/data")"
        read -r su sn sp50 sp99 <<<"$s"
        read -r cu cn cp50 cp99 <<<"$c"
        ratios+=("$(awk -v a="$cu" -v b="$su" 'BEGIN { printf "%.3f", a / b }')")
        printf '  round %d: single %6.2f µs/req (%d req, p50 %s µs, p99 %s µs) | cluster %6.2f µs/req (%d req, p50 %s µs, p99 %s µs) | ratio %s\n' \
            "$r" "$su" "$sn" "$sp50" "$sp99" "$cu" "$cn" "$cp50" "$cp99" "${ratios[-1]}"
    done
    local median
    median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
    printf '  median CPU per request, cluster / single: %sx\n' "$median"
    kill -TERM "$single_pid" "$cluster_pid" 2>/dev/null || true
}

case " $PARTS " in *" cpu "*)
    alloc_port BACKEND_PORT
    start_backend "$BACKEND_PORT" 0
    compare "cached token" ""
    compare "cached token + per-API-key limit" $'[rate_limits]\nper_api_key = "100000000/s"'
    ;;
esac

case " $PARTS " in *" revocation "*)
    alloc_port PY_PORT
    python3 "$BENCH_DIR/cluster_revocation.py" backend "$PY_PORT" >"$WORK/pybackend.log" 2>&1 &
    STARTED_PIDS+=("$!")
    wait_port "$PY_PORT" "revocation backend" "$!"
    gws=() admins=()
    for i in 1 2 3; do
        alloc_port gp
        alloc_port ap
        PORTCULLIS_SERVER_EXTRA="admin_listen = \"127.0.0.1:$ap\"" \
            start_portcullis "$gp" "$PY_PORT" 100000 "$(cluster_toml "gw-$i")" "gw-$i"
        gws+=("127.0.0.1:$gp")
        admins+=("127.0.0.1:$ap")
    done
    for gw in "${gws[@]}"; do check_200 "$gw" "http://$gw/api/data"; done
    if [ "${BENCH_REVOCATION_LOAD:-1}" = 1 ]; then
        for gw in "${gws[1]}" "${gws[2]}"; do
            taskset -c "$BACKEND_CPU" wrk -t1 -c4 -d600s -H "Api-Key: $API_KEY" -H "User-Token: $TOKEN" \
                "http://$gw/api/data" >"$WORK/load-$gw.log" 2>&1 &
            STARTED_PIDS+=("$!")
        done
        log "wrk load (4 connections each) on ${gws[1]} and ${gws[2]} while measuring"
        sleep 1
    fi
    python3 "$BENCH_DIR/cluster_revocation.py" measure --origin "${gws[0]}" \
        --followers "${gws[1]},${gws[2]}" --backend "127.0.0.1:$PY_PORT" --api-key "$API_KEY" \
        --count "$REVOCATIONS" --admin "${admins[1]},${admins[2]}"
    ;;
esac
