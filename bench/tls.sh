#!/usr/bin/env bash
# HTTPS benchmark: portcullis vs nginx doing the same gateway job as bench/run.sh
# (API-key map, auth_request + proxy_cache on the token, keep-alive upstream), both
# terminating TLS with the same certificate (ECDSA P-256 from `portcullis dev-certs`).
#
#   bench/tls.sh                          # builds portcullis (scripts/build-pgo; BENCH_PGO=0: cargo build --release), runs all
#   PORTCULLIS_BIN=/path/to/portcullis bench/tls.sh
#
# Two parts:
#   1. HTTPS/1.1 keep-alive with wrk (TLS 1.3): req/s, p50/p99, proxy CPU µs per request.
#   2. HTTP/2 over TLS with h2load (Debian nghttp2-client): req/s and CPU µs per request.
#   3. Memory: RSS growth per idle HTTPS keep-alive connection (bench/idle_conns.py --tls-ca).
#
# Environment (all optional):
#   BENCH_TARGETS="nginx portcullis"   BENCH_CONNECTIONS="32 256"
#   BENCH_WARMUP=2s  BENCH_DURATION=8s          (wrk)
#   H2_CONNECTIONS=32  H2_STREAMS=10  H2_DURATION=8   (h2load -c, -m, -D seconds)
#   TLS_IDLE_CONNS=2000     idle HTTPS keep-alive connections held open for the memory
#                           figure (RSS growth per connection); 0 skips it
#   PROXY_CPU=1  BACKEND_CPU=0  PORTCULLIS_LOG=warn  BENCH_KEEP=1  BENCH_STRICT=1
#
# CPU per request = delta of utime+stime (/proc/PID/stat; nginx master + workers,
# portcullis's threads) over the measured run / requests completed in that run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TARGETS="${BENCH_TARGETS:-nginx portcullis}"
CONNECTIONS="${BENCH_CONNECTIONS:-32 256}"
WARMUP="${BENCH_WARMUP:-2s}"
DURATION="${BENCH_DURATION:-8s}"
H2_CONNECTIONS="${H2_CONNECTIONS:-32}"
H2_STREAMS="${H2_STREAMS:-10}"
H2_DURATION="${H2_DURATION:-8}"
TLS_IDLE_CONNS="${TLS_IDLE_CONNS:-2000}"
PROXY_CPU="${PROXY_CPU:-1}"
BACKEND_CPU="${BACKEND_CPU:-0}"

ensure_tools nginx:nginx wrk:wrk curl:curl taskset:util-linux getconf:libc-bin pgrep:procps \
    h2load:nghttp2-client
[ "$(nproc --all)" -ge 2 ] || die "needs 2 cores"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

bench_init
build_portcullis

# One certificate for both proxies.
"$PORTCULLIS_BIN" dev-certs --out "$WORK/certs" >/dev/null || die "dev-certs failed"
CERT="$WORK/certs/server.crt"
KEY="$WORK/certs/server.key"
export CURL_CA_BUNDLE="$WORK/certs/ca.crt"

alloc_port BACKEND_PORT
alloc_port NGINX_PORT
alloc_port PORTCULLIS_PORT
start_backend "$BACKEND_PORT" 1
log "backend nginx pid $BACKEND_PID on 127.0.0.1:$BACKEND_PORT (CPU $BACKEND_CPU)"

declare -A URL
for t in $TARGETS; do
    case $t in
    nginx)
        NGINX_GW_LISTEN_OPTS=" ssl http2" \
            NGINX_GW_SERVER_EXTRA="ssl_certificate $CERT; ssl_certificate_key $KEY; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; http2_max_concurrent_streams 128;" \
            start_nginx_gw "$NGINX_PORT" "$BACKEND_PORT"
        log "nginx gateway (TLS) pid $NGINX_GW_PID on 127.0.0.1:$NGINX_PORT (CPU $PROXY_CPU)"
        URL[nginx]="https://localhost:$NGINX_PORT/api/data"
        check_200 "nginx gateway" "${URL[nginx]}"
        ;;
    portcullis)
        PORTCULLIS_SERVER_EXTRA="tls = { cert = \"$CERT\", key = \"$KEY\" }" \
            start_portcullis "$PORTCULLIS_PORT" "$BACKEND_PORT"
        log "portcullis (TLS) pid $PORTCULLIS_PID on 127.0.0.1:$PORTCULLIS_PORT (CPU $PROXY_CPU): $PORTCULLIS_BIN"
        URL[portcullis]="https://localhost:$PORTCULLIS_PORT/api/data"
        check_200 portcullis "${URL[portcullis]}"
        ;;
    *) die "unknown target $t (nginx, portcullis)" ;;
    esac
done

proxy_pids() {
    case $1 in
    nginx) nginx_pids "$NGINX_GW_PID" ;;
    portcullis) echo "$PORTCULLIS_PID" ;;
    esac
}

cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("BENCHRESULT %d %d %.1f %.1f %.1f %d %d %d %d %d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.mean, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

run_wrk() { # URL CONNS DURATION OUTFILE
    taskset -c "$BACKEND_CPU" wrk -t1 -c"$2" -d"$3" --timeout 5s --latency \
        -H "Api-Key: $API_KEY" -H "User-Token: $TOKEN" -s "$WORK/report.lua" "$1" >"$4" 2>&1 \
        || die "wrk failed against $1: $(tail -5 "$4")"
    grep -q '^BENCHRESULT ' "$4" || die "wrk printed no result against $1: $(tail -5 "$4")"
}

RESULTS=() # "target conns rps p50 p99 proxy_us sockerr"
measure_h1() { # TARGET CONNS
    local t=$1 c=$2 url=${URL[$1]} out="$WORK/wrk-$1-$2" pids p0 p1
    run_wrk "$url" "$c" "$WARMUP" "$out.warmup"
    pids="$(proxy_pids "$t")"
    p0=$(cpu_ticks $pids)
    run_wrk "$url" "$c" "$DURATION" "$out"
    p1=$(cpu_ticks $pids)
    local req dur p50 p99 mean st ce re we to row
    read -r _ req dur p50 p99 mean st ce re we to < <(grep '^BENCHRESULT ' "$out")
    [ "$req" -gt 0 ] || die "$t: wrk completed no request"
    [ "$st" -eq 0 ] || die "$t answered $st non-2xx responses (of $req): see $out"
    row=$(awk -v t="$t" -v c="$c" -v req="$req" -v dur="$dur" -v p50="$p50" -v p99="$p99" \
        -v pt=$((p1 - p0)) -v hz="$CLK_TCK" -v se=$((ce + re + we + to)) 'BEGIN {
            printf "%s %s %.0f %.3f %.3f %.2f %d", t, c, req / (dur / 1e6), p50 / 1000, p99 / 1000, pt * 1e6 / hz / req, se
        }')
    RESULTS+=("$row")
    log "https/1.1 $row"
}

H2RESULTS=() # "target rps proxy_us failed"
measure_h2() { # TARGET
    local t=$1 url=${URL[$1]} out="$WORK/h2load-$1" pids p0 p1
    # warm-up: connections, sessions cached, allocator settled
    taskset -c "$BACKEND_CPU" h2load -t1 -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -D 2 \
        -H "Api-Key: $API_KEY" -H "User-Token: $TOKEN" "$url" >"$out.warmup" 2>&1 \
        || die "h2load warm-up failed against $url: $(tail -5 "$out.warmup")"
    pids="$(proxy_pids "$t")"
    p0=$(cpu_ticks $pids)
    taskset -c "$BACKEND_CPU" h2load -t1 -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -D "$H2_DURATION" \
        -H "Api-Key: $API_KEY" -H "User-Token: $TOKEN" "$url" >"$out" 2>&1 \
        || die "h2load failed against $url: $(tail -5 "$out")"
    p1=$(cpu_ticks $pids)
    grep -qi 'application protocol: h2' "$out" || die "$t did not negotiate h2: $(grep -i protocol "$out")"
    local ok failed s2xx rps row
    read -r ok failed < <(awk '/^requests:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^succeeded/) s = $i; if ($(i+1) ~ /^failed/) f = $i } } END { print s + 0, f + 0 }' "$out")
    s2xx=$(awk '/^status codes:/ { print $3 + 0 }' "$out")
    rps=$(awk '/^finished in/ { print $4 + 0 }' "$out")
    [ "$ok" -gt 0 ] || die "$t: h2load completed no request: $(tail -8 "$out")"
    [ "$s2xx" -eq "$ok" ] || die "$t: $((ok - s2xx)) non-2xx answers over h2 (see $out)"
    row=$(awk -v t="$t" -v ok="$ok" -v rps="$rps" -v pt=$((p1 - p0)) -v hz="$CLK_TCK" -v f="$failed" \
        'BEGIN { printf "%s %.0f %.2f %d", t, rps, pt * 1e6 / hz / ok, f }')
    H2RESULTS+=("$row")
    log "h2 $row"
}

LOAD_BEFORE="$(uptime)"
for c in $CONNECTIONS; do
    for t in $TARGETS; do measure_h1 "$t" "$c"; done
done
for t in $TARGETS; do measure_h2 "$t"; done
LOAD_AFTER="$(uptime)"

IDLERESULTS=() # "target conns kib_per_conn"
proxy_rss() { local t=0 p; for p in $(proxy_pids "$1"); do t=$((t + $(rss_kib "$p"))); done; echo "$t"; }
measure_idle() { # TARGET
    local t=$1 port r0 r1 out="$WORK/idle-$1" pid
    port="${URL[$1]#https://localhost:}"; port="${port%%/*}"
    r0=$(proxy_rss "$t")
    taskset -c "$BACKEND_CPU" python3 "$BENCH_DIR/idle_conns.py" --port "$port" --count "$TLS_IDLE_CONNS" \
        --tls-ca "$CURL_CA_BUNDLE" --hold 600 --header "Api-Key: $API_KEY" --header "User-Token: $TOKEN" >"$out" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do grep -q '^READY' "$out" && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    grep -q '^READY ok='"$TLS_IDLE_CONNS"' ' "$out" || { kill "$pid" 2>/dev/null; die "$t: idle connections not all served: $(tail -3 "$out")"; }
    sleep 1
    r1=$(proxy_rss "$t")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    IDLERESULTS+=("$t $TLS_IDLE_CONNS $(awk -v a="$r0" -v b="$r1" -v n="$TLS_IDLE_CONNS" 'BEGIN { printf "%.1f", (b - a) / n }')")
    log "idle ${IDLERESULTS[-1]}"
    sleep 1
}
if [ "$TLS_IDLE_CONNS" -gt 0 ]; then
    ensure_tools python3:python3
    for t in $TARGETS; do measure_idle "$t"; done
fi

echo
echo "## portcullis TLS benchmark — $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "Same gateway job as bench/run.sh, over TLS with one ECDSA P-256 certificate (portcullis dev-certs). Proxy pinned to CPU $PROXY_CPU; backend (nginx, 1 worker, plain HTTP) + load generator on CPU $BACKEND_CPU."
echo "portcullis: $PORTCULLIS_BIN ($(bin_rev)); $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $(h2load --version 2>&1 | head -1)"
echo
echo "### HTTPS/1.1 keep-alive (wrk 1 thread, warm-up $WARMUP, measured $DURATION)"
echo
echo "| target | conns | req/s | p50 ms | p99 ms | proxy CPU µs/req | socket errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for r in "${RESULTS[@]}"; do
    read -r t c rps p50 p99 pus se <<<"$r"
    echo "| $t | $c | $rps | $p50 | $p99 | $pus | $se |"
done
echo
echo "### HTTP/2 over TLS (h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS, ${H2_DURATION}s after a 2 s warm-up)"
echo
echo "| target | req/s | proxy CPU µs/req | failed |"
echo "| --- | ---: | ---: | ---: |"
for r in "${H2RESULTS[@]}"; do
    read -r t rps pus f <<<"$r"
    echo "| $t | $rps | $pus | $f |"
done
echo
if [ ${#IDLERESULTS[@]} -gt 0 ]; then
    echo "### Idle HTTPS keep-alive connections (one request each, then idle)"
    echo
    echo "| target | connections | RSS growth KiB/connection |"
    echo "| --- | ---: | ---: |"
    for r in "${IDLERESULTS[@]}"; do
        read -r t n k <<<"$r"
        echo "| $t | $n | $k |"
    done
    echo
fi
echo "load before: ${LOAD_BEFORE#*load average: } — after: ${LOAD_AFTER#*load average: }"
echo

FAILED=0
if [[ " $TARGETS " == *" nginx "* && " $TARGETS " == *" portcullis "* ]]; then
    echo "### Target verdicts (HTTPS/1.1: portcullis CPU/req ≤ 0.8× nginx; p99 reported)"
    echo
    for c in $CONNECTIONS; do
        ng="" pc=""
        for r in "${RESULTS[@]}"; do
            read -r t cc _ _ p99 pus _ <<<"$r"
            [ "$cc" = "$c" ] || continue
            [ "$t" = nginx ] && ng="$pus $p99"
            [ "$t" = portcullis ] && pc="$pus $p99"
        done
        read -r ngcpu ngp99 <<<"$ng"
        read -r pccpu pcp99 <<<"$pc"
        read -r ratio cpuv < <(awk -v a="$pccpu" -v b="$ngcpu" 'BEGIN { r = a / b; printf "%.2f %s\n", r, (r <= 0.8 ? "PASS" : "FAIL") }')
        echo "- $c connections: CPU/req portcullis $pccpu µs vs nginx $ngcpu µs = ${ratio}× (target ≤ 0.80×): **$cpuv**; p99 portcullis $pcp99 ms vs nginx $ngp99 ms"
        [ "$cpuv" = PASS ] || FAILED=1
    done
    echo
fi
if [ "$FAILED" = 1 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then
    exit 3
fi
exit 0
