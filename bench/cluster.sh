#!/usr/bin/env bash
# Cluster mode benchmark, on demand; prints its figures (docs/cluster.md, "Cost").
#
#   bench/cluster.sh                        # builds portcullis (see bench/run.sh), runs every part
#   PORTCULLIS_BIN=target/release/portcullis bench/cluster.sh
#
# 1. CPU per request on the cached-token path: one instance without [cluster] and one
#    with [cluster] (a local redis-server), measured in alternating rounds of the same
#    run; then the same pair with a per-API-key rate limit that never refuses (in
#    cluster mode: one Redis call per request, the cost of cluster-wide limits).
#    CPU per request = utime+stime of the gateway over the measured run / requests.
# 2. An L1 miss served from Redis: instance gw-a validates many distinct tokens (each
#    one validation call, its session stored in Redis); then wrk sends instance gw-b
#    requests each for a token gw-b has never seen, so every one is a Redis GET and an
#    unseal with no validation call (checked: the backend's validation count does not
#    move, and gw-b's portcullis_cluster_shared_hits_total grows by the number of
#    requests, plus at most the few still in flight when wrk stopped). Compared in alternating rounds with L1 hits (one cached token) on
#    gw-b at the same concurrency: p50/p99 latency and CPU per request of the gateway,
#    plus redis-server's CPU per miss.
# 3. Revocation propagation across three instances (bench/cluster_revocation.py): a
#    logout on gw-1, then the time until gw-2 and gw-3 refuse the token, from the
#    logout's 204, while wrk keeps both followers busy on the cached path; and the
#    portcullis_cluster_revocation_lag_seconds histograms of gw-2 and gw-3.
#
# Environment (all optional):
#   BENCH_PARTS="cpu miss revocation"   which parts to run
#   BENCH_MISS_CONNECTIONS=8  BENCH_MISS_DURATION=3s   the L1-miss part's wrk runs
#   BENCH_MISS_TOKENS=1500000      distinct tokens gw-a validates first (the part stops
#                                  with a hint when gw-b's runs need more)
#   BENCH_ROUNDS=3                 alternating rounds per pair (the median ratio is reported)
#   BENCH_CONNECTIONS=32  BENCH_WARMUP=2s  BENCH_DURATION=5s
#   BENCH_REVOCATIONS=200          logouts measured
#   BENCH_REVOCATION_LOAD=1        0: no wrk load on the followers while measuring
#   PROXY_CPU=1  BACKEND_CPU=0     cores (gateways; backend, Redis and wrk)
#   BENCH_KEEP=1                   keep the temp dir (configs, logs)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PARTS="${BENCH_PARTS:-cpu miss revocation}"
MISS_CONNECTIONS="${BENCH_MISS_CONNECTIONS:-8}"
MISS_DURATION="${BENCH_MISS_DURATION:-3s}"
MISS_TOKENS="${BENCH_MISS_TOKENS:-1500000}"
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

case " $PARTS " in *" cpu "* | *" miss "*)
    alloc_port BACKEND_PORT
    # validation calls are logged (the miss part counts them; the cached path makes none)
    start_backend "$BACKEND_PORT" 1
    ;;
esac

case " $PARTS " in *" cpu "*)
    compare "cached token" ""
    compare "cached token + per-API-key limit" $'[rate_limits]\nper_api_key = "100000000/s"'
    ;;
esac

# metric ADMIN NAME : a metric's value from an admin listener's /metrics (0 when absent)
metric() {
    curl -s "http://$1/metrics" | awk -v n="$2" '$1 == n { v = $2 } END { print v + 0 }'
}

# median VALUE... : the middle value (the upper one of an even count)
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# miss_run NAME FIRST URL DURATION : wrk with one new token per request (bench-miss-<FIRST>,
# <FIRST+1>, ...); prints "requests non2xx p50_us p99_us gateway_ticks redis_ticks" (the
# gateway is MISS_PID)
miss_run() {
    local out="$WORK/wrk-$1" p0 r0 p1 r1 req st p50 p99
    p0=$(cpu_ticks "$MISS_PID")
    r0=$(cpu_ticks "$REDIS_PID")
    MISS_FIRST=$2 MISS_API_KEY="$API_KEY" taskset -c "$BACKEND_CPU" wrk -t1 -c"$MISS_CONNECTIONS" \
        -d"$4" -s "$WORK/miss.lua" "$3" >"$out" 2>&1 || die "wrk failed: $(tail -3 "$out")"
    p1=$(cpu_ticks "$MISS_PID")
    r1=$(cpu_ticks "$REDIS_PID")
    read -r _ req st p50 p99 < <(grep '^BENCHRESULT ' "$out")
    printf '%d %d %.0f %.0f %d %d\n' "$req" "$st" "$p50" "$p99" $((p1 - p0)) $((r1 - r0))
}

case " $PARTS " in *" miss "*)
    cat >"$WORK/miss.lua" <<'LUA'
-- one request per token, never repeated: bench-miss-<n> (40 characters), n from MISS_FIRST
local n = tonumber(os.getenv("MISS_FIRST") or "0")
local key = os.getenv("MISS_API_KEY")
request = function()
   local token = string.format("bench-miss-%029d", n)
   n = n + 1
   return wrk.format("GET", nil, {["Api-Key"] = key, ["User-Token"] = token})
end
LUA
    cat "$WORK/report.lua" >>"$WORK/miss.lua"
    alloc_port ma
    alloc_port mb
    alloc_port mbadmin
    start_portcullis "$ma" "$BACKEND_PORT" 100000 "$(cluster_toml gw-a)" "miss-a"
    seed_pid=$PORTCULLIS_PID
    PORTCULLIS_SERVER_EXTRA="admin_listen = \"127.0.0.1:$mbadmin\"" \
        start_portcullis "$mb" "$BACKEND_PORT" 100000 "$(cluster_toml gw-b)" "miss-b"
    MISS_PID=$PORTCULLIS_PID
    check_200 "gw-a" "http://127.0.0.1:$ma/api/data"
    check_200 "gw-b" "http://127.0.0.1:$mb/api/data"
    # gw-a validates at least MISS_TOKENS distinct tokens (one validation call each)
    seeded=0
    v0=$(validation_calls)
    while [ "$seeded" -lt "$MISS_TOKENS" ]; do
        read -r req st _ <<<"$(MISS_CONNECTIONS=$CONNECTIONS MISS_PID=$seed_pid \
            miss_run "seed-$seeded" "$seeded" "http://127.0.0.1:$ma/api/data" 2s)"
        [ "$st" -eq 0 ] || die "gw-a answered $st non-2xx responses while validating tokens"
        seeded=$((seeded + req))
    done
    v1=$(validation_calls)
    # every answered request was a 200, so tokens 0..seeded-1 were validated; requests
    # still in flight when a wrk run ended were validated too, uncounted
    [ $((v1 - v0)) -ge "$seeded" ] || die "gw-a made $((v1 - v0)) validation calls for $seeded new tokens"
    log "gw-a validated $seeded distinct tokens (their sessions are in Redis)"
    printf 'L1 miss served from Redis (gw-b, tokens only gw-a validated), %s connections, %s per run:\n' \
        "$MISS_CONNECTIONS" "$MISS_DURATION"
    # warm-up on gw-b (misses), then alternating rounds: L1 hits, L1 misses
    # (each run's first token skips MISS_CONNECTIONS past the previous run's last: the
    # requests still in flight when wrk stopped were answered, and cached, uncounted)
    read -r next _ <<<"$(miss_run miss-warmup 0 "http://127.0.0.1:$mb/api/data" "$WARMUP")"
    next=$((next + MISS_CONNECTIONS))
    added=() added50=() cpu_ratio=()
    for r in $(seq 1 "$ROUNDS"); do
        read -r hu hn hp50 hp99 <<<"$(CONNECTIONS=$MISS_CONNECTIONS DURATION=$MISS_DURATION \
            cpu_per_request "miss-hit-$r" "$MISS_PID" "http://127.0.0.1:$mb/api/data")"
        v0=$(validation_calls)
        s0=$(metric "127.0.0.1:$mbadmin" portcullis_cluster_shared_hits_total)
        read -r mn mst mp50 mp99 mt rt <<<"$(miss_run "miss-$r" "$next" "http://127.0.0.1:$mb/api/data" "$MISS_DURATION")"
        next=$((next + mn + MISS_CONNECTIONS))
        sleep 0.2
        s1=$(metric "127.0.0.1:$mbadmin" portcullis_cluster_shared_hits_total)
        v1=$(validation_calls)
        [ "$mst" -eq 0 ] || die "gw-b answered $mst non-2xx responses (of $mn) to tokens from Redis"
        [ "$next" -le "$seeded" ] || die "gw-b needed more tokens than gw-a validated: raise BENCH_MISS_TOKENS above $next"
        [ "$v1" -eq "$v0" ] || die "the backend saw $((v1 - v0)) validation calls while gw-b served tokens from Redis"
        [ "$((s1 - s0))" -ge "$mn" ] && [ "$((s1 - s0))" -le "$((mn + MISS_CONNECTIONS))" ] \
            || die "gw-b answered $((s1 - s0)) of $mn requests from Redis (expected all)"
        read -r mu ru <<<"$(awk -v t="$mt" -v r="$rt" -v hz="$CLK_TCK" -v n="$mn" \
            'BEGIN { printf "%.2f %.2f\n", t / hz * 1e6 / n, r / hz * 1e6 / n }')"
        added+=("$((mp99 - hp99))")
        added50+=("$((mp50 - hp50))")
        cpu_ratio+=("$(awk -v a="$mu" -v b="$hu" 'BEGIN { printf "%.2f", a / b }')")
        printf '  round %d: L1 hit %6.2f µs/req (%d req, p50 %s µs, p99 %s µs) | L1 miss from Redis %6.2f µs/req + redis-server %5.2f µs/req (%d req, p50 %s µs, p99 %s µs, 0 validation calls) | added: p50 %s µs, p99 %s µs, CPU %sx\n' \
            "$r" "$hu" "$hn" "$hp50" "$hp99" "$mu" "$ru" "$mn" "$mp50" "$mp99" "${added50[-1]}" "${added[-1]}" "${cpu_ratio[-1]}"
    done
    printf '  median latency added by an L1 miss served from Redis: p50 %s µs, p99 %s µs; median gateway CPU per request, miss / hit: %sx\n' \
        "$(median "${added50[@]}")" "$(median "${added[@]}")" "$(median "${cpu_ratio[@]}")"
    kill -TERM "$seed_pid" "$MISS_PID" 2>/dev/null || true
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
