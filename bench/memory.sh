#!/usr/bin/env bash
# Memory benchmark of portcullis, on loopback:
#  (a) RSS with 1,000,000 cached sessions (target <= 400 MiB), filled through the real
#      path: wrk sends one request per distinct User-Token to the private route, the
#      backend's /renew_session accepts every token, portcullis validates and caches each.
#  (b) RSS per idle keep-alive connection, portcullis and nginx (the same gateway config as
#      bench/run.sh) side by side: a Python asyncio client (bench/idle_conns.py) opens
#      MEM_CONNS connections, makes one request on each, then idles; the growth of the
#      proxy's RSS (nginx: master + worker) over its RSS before, divided by the connections,
#      is the figure. Over plain HTTP/1.1 (goal <= 2 KiB), HTTPS/1.1 (TLS 1.3; goal <= nginx's
#      figure of the same run) and HTTP/2 over TLS (measured), with the same certificate
#      (`portcullis dev-certs`) for both proxies. Both keep at most 64 idle backend
#      connections (portcullis `backend.max_idle = 64`, nginx `keepalive 64`): the backend
#      pool filled by the burst of first requests is part of the growth measured.
#
#   bench/memory.sh
#   PORTCULLIS_BIN=/path/to/portcullis MEM_PARTS="conns tls-conns h2-conns" bench/memory.sh
#
# Environment (all optional):
#   MEM_SESSIONS=1000000       sessions to cache in (a)
#   MEM_MAX_ENTRIES=1100000    sessions.max_entries (>= MEM_SESSIONS so nothing is evicted)
#   MEM_CONNS=10000            idle connections in (b), for each protocol and proxy
#   MEM_PARTS="sessions conns tls-conns h2-conns"   which parts to run
#   MEM_TARGETS="nginx portcullis"                  which proxies (b) measures
#   MEM_IDLE_SETTLE=3          seconds the connections idle before RSS is read
#   MEM_FILL_TIMEOUT=900       seconds (a)'s fill may take at most
#   BENCH_KEEP=1  BENCH_STRICT=1 (exit 3 when a target is missed)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SESSIONS="${MEM_SESSIONS:-1000000}"
MAX_ENTRIES="${MEM_MAX_ENTRIES:-1100000}"
CONNS="${MEM_CONNS:-10000}"
PARTS="${MEM_PARTS:-sessions conns tls-conns h2-conns}"
TARGETS="${MEM_TARGETS:-nginx portcullis}"
SETTLE="${MEM_IDLE_SETTLE:-3}"
FILL_TIMEOUT="${MEM_FILL_TIMEOUT:-900}"
PROXY_CPU="${PROXY_CPU:-1}"
BACKEND_CPU="${BACKEND_CPU:-0}"

ensure_tools nginx:nginx wrk:wrk curl:curl taskset:util-linux python3:python3 ss:iproute2 pgrep:procps
[ "$(nproc --all)" -ge 2 ] || die "needs 2 cores"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge $((CONNS + 512)) ] || die "open-file limit $(ulimit -n) is too low for $CONNS connections (raise ulimit -n)"

bench_init
build_portcullis
alloc_port BACKEND_PORT
alloc_port PORTCULLIS_PORT
alloc_port NGINX_PORT
start_backend "$BACKEND_PORT" 1
log "backend nginx pid $BACKEND_PID on 127.0.0.1:$BACKEND_PORT"

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v <= t ? "PASS" : "FAIL") }'; }
ROWS=()
FAILED=0

stop_pid() { # PID: stop one process this script started and wait for it
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# ------------------------------------------------------------------ (a) 1M cached sessions
if [[ " $PARTS " == *" sessions "* ]]; then
    start_portcullis "$PORTCULLIS_PORT" "$BACKEND_PORT" "$MAX_ENTRIES"
    log "portcullis pid $PORTCULLIS_PID (sessions.max_entries = $MAX_ENTRIES)"
    check_200 portcullis "http://127.0.0.1:$PORTCULLIS_PORT/api/data"
    sleep 1
    rss0=$(rss_kib "$PORTCULLIS_PID")
    v0=$(validation_calls)

    cat >"$WORK/fill.lua" <<'EOF'
-- one request per distinct 40-character token; after `target` responses, touches the
-- marker file (wrk's main thread only ends at -d or on SIGINT, which memory.sh sends then)
local target, marker, sent, got = 1000000, nil, 0, 0
function init(args) target = tonumber(args[1]); marker = args[2] end
function request()
   sent = sent + 1
   wrk.headers["User-Token"] = string.format("fill%036d", sent)
   return wrk.format()
end
function response(status, headers, body)
   got = got + 1
   if got == target then
      local f = io.open(marker, "w"); f:write("done\n"); f:close()
      wrk.thread:stop()
   end
end
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("FILLRESULT %d %d %d %d %d %d %d\n", summary.requests,
      summary.duration, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF
    log "filling $SESSIONS sessions through GET /api/data (one distinct token each) ..."
    t0=$(date +%s)
    taskset -c "$BACKEND_CPU" wrk -t1 -c64 -d"${FILL_TIMEOUT}s" --timeout 10s \
        -H "Api-Key: $API_KEY" -s "$WORK/fill.lua" \
        "http://127.0.0.1:$PORTCULLIS_PORT/api/data" -- "$SESSIONS" "$WORK/fill.done" >"$WORK/fill.out" 2>&1 &
    wpid=$!
    STARTED_PIDS+=("$wpid")
    while kill -0 "$wpid" 2>/dev/null && [ ! -e "$WORK/fill.done" ]; do sleep 0.5; done
    kill -INT "$wpid" 2>/dev/null || true
    wait "$wpid" || die "wrk fill failed: $(tail -5 "$WORK/fill.out")"
    t1=$(date +%s)
    read -r _ req dur st ce re we to < <(grep '^FILLRESULT ' "$WORK/fill.out") \
        || die "wrk fill printed no result: $(tail -5 "$WORK/fill.out")"
    [ "$st" -eq 0 ] || die "portcullis answered $st non-2xx responses while filling (of $req): see $WORK/fill.out"
    [ "$req" -ge "$SESSIONS" ] || die "fill stopped after $req responses (< $SESSIONS) within ${FILL_TIMEOUT}s"
    sleep 2   # let the backend flush its validation log and moka settle
    v1=$(validation_calls)
    vcalls=$((v1 - v0))
    log "fill: $req responses in $((t1 - t0)) s, $vcalls validation calls reached the backend"
    [ "$vcalls" -ge "$SESSIONS" ] || die "only $vcalls validation calls for $SESSIONS distinct tokens: the fill did not go through the validation path"
    rss1=$(rss_kib "$PORTCULLIS_PID")
    hwm1=$(awk '/^VmHWM:/ {print $2}' "/proc/$PORTCULLIS_PID/status")

    # are the sessions still cached? re-use 100 tokens spread over the fill: no validation call expected
    v2=$(validation_calls)
    samples=100
    for i in $(seq 1 $samples); do
        n=$(( (SESSIONS * i) / samples ))
        tok=$(printf 'fill%036d' "$n")
        code=$(curl -s -o /dev/null -w '%{http_code}' -H "Api-Key: $API_KEY" -H "User-Token: $tok" \
            "http://127.0.0.1:$PORTCULLIS_PORT/api/data")
        [ "$code" = 200 ] || die "token #$n answered $code after the fill"
    done
    sleep 1.5
    recheck=$(( $(validation_calls) - v2 ))
    cached_note="$((samples - recheck)) of $samples sampled tokens (spread over the fill) were still cached, $recheck had been evicted and were re-validated"
    per=$(awk -v a="$rss0" -v b="$rss1" -v n="$SESSIONS" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }')
    v=$(verdict "$(mib "$rss1")" 400)
    [ "$v" = PASS ] || FAILED=1
    ROWS+=("| portcullis, $SESSIONS cached sessions | $(mib "$rss0") | $(mib "$rss1") (peak $(mib "$hwm1")) | $per B/session | ≤ 400 MiB | **$v** |")
    SESSION_NOTE="fill: $req requests in $((t1 - t0)) s ($vcalls validation calls); $cached_note"
    stop_pid "$PORTCULLIS_PID"
fi

# ------------------------------------------------------------------ (b) idle connections
# idle_rss NAME PORT PIDS... : opens $CONNS connections (IDLE_ARGS: idle_conns.py's TLS and
# HTTP/2 flags), each makes one request and idles; sets IDLE_BASE and IDLE_LOADED (summed
# VmRSS of PIDS, KiB) and IDLE_EST (connections open)
IDLE_ARGS=()
idle_rss() {
    local name=$1 port=$2
    shift 2
    local pids="$*" p base loaded out="$WORK/idle-$name.out" cpid established ready=""
    base=0
    for p in $pids; do base=$((base + $(rss_kib "$p"))); done
    taskset -c "$BACKEND_CPU" python3 "$BENCH_DIR/idle_conns.py" --port "$port" --count "$CONNS" \
        --hold 600 "${IDLE_ARGS[@]}" --header "Api-Key: $API_KEY" --header "User-Token: $TOKEN" >"$out" 2>&1 &
    cpid=$!
    STARTED_PIDS+=("$cpid")
    for _ in $(seq 1 3000); do
        grep -q '^READY ' "$out" 2>/dev/null && { ready=1; break; }
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$ready" ] || die "idle-connection client for $name did not get ready: $(tail -5 "$out")"
    grep -q "^READY ok=$CONNS failed=0 " "$out" || die "$name: not every idle connection got a 200: $(grep '^READY' "$out")"
    sleep "$SETTLE"   # idle for a moment, so the measure is of idle connections
    established=$(ss -Htn state established "( sport = :$port )" | wc -l)
    loaded=0
    for p in $pids; do loaded=$((loaded + $(rss_kib "$p"))); done
    [ -n "${METRICS_URL:-}" ] && IDLE_PARKED=$(curl -s "$METRICS_URL" | awk '/^portcullis_parked_connections / {print $2}')
    stop_pid "$cpid"
    [ "$established" -ge "$CONNS" ] || die "$name: only $established of $CONNS connections were still open when measured"
    IDLE_BASE=$base IDLE_LOADED=$loaded IDLE_EST=$established
}

CERTS=""
certs() { # one certificate for both proxies
    [ -n "$CERTS" ] && return 0
    "$PORTCULLIS_BIN" dev-certs --out "$WORK/certs" >/dev/null || die "dev-certs failed"
    CERTS="$WORK/certs"
    export CURL_CA_BUNDLE="$CERTS/ca.crt"
}

declare -A PER   # "proto target" -> KiB per connection
IDLE_NOTES=()
# idle_part PROTO TARGET : PROTO is http (plain HTTP/1.1), https (HTTPS/1.1) or h2 (HTTP/2 over TLS)
idle_part() {
    local proto=$1 t=$2 scheme=http listen="" pids base loaded est per
    IDLE_ARGS=()
    METRICS_URL="" IDLE_PARKED=""
    if [ "$proto" != http ]; then
        certs
        scheme=https
        IDLE_ARGS=(--tls-ca "$CERTS/ca.crt")
        [ "$proto" = h2 ] && IDLE_ARGS+=(--h2)
    fi
    # fresh ports for each part: the previous part's closed connections may still hold its own
    alloc_port PORTCULLIS_PORT
    alloc_port NGINX_PORT
    case $t in
    portcullis)
        alloc_port ADMIN_PORT
        local extra="admin_listen = \"127.0.0.1:$ADMIN_PORT\""
        [ "$proto" != http ] && extra+=$'\n'"tls = { cert = \"$CERTS/server.crt\", key = \"$CERTS/server.key\" }"
        # idle backend connections kept: 64, as nginx's `keepalive 64` (default 256)
        PORTCULLIS_BACKEND_EXTRA="max_idle = 64" PORTCULLIS_SERVER_EXTRA="$extra" \
            start_portcullis "$PORTCULLIS_PORT" "$BACKEND_PORT"
        check_200 portcullis "$scheme://localhost:$PORTCULLIS_PORT/api/data"
        METRICS_URL="http://127.0.0.1:$ADMIN_PORT/metrics"
        sleep 1
        idle_rss "portcullis-$proto" "$PORTCULLIS_PORT" "$PORTCULLIS_PID"
        stop_pid "$PORTCULLIS_PID"
        ;;
    nginx)
        case $proto in
        https) listen=" ssl" ;;
        h2) listen=" ssl http2" ;;
        esac
        local server_extra=""
        [ "$proto" != http ] && server_extra="ssl_certificate $CERTS/server.crt; ssl_certificate_key $CERTS/server.key; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; http2_max_concurrent_streams 128;"
        NGINX_GW_LISTEN_OPTS="$listen" NGINX_GW_SERVER_EXTRA="$server_extra" start_nginx_gw "$NGINX_PORT" "$BACKEND_PORT"
        check_200 "nginx gateway" "$scheme://localhost:$NGINX_PORT/api/data"
        sleep 1
        idle_rss "nginx-$proto" "$NGINX_PORT" $(nginx_pids "$NGINX_GW_PID")
        stop_pid "$NGINX_GW_PID"
        ;;
    *) die "unknown target $t (nginx, portcullis)" ;;
    esac
    base=$IDLE_BASE loaded=$IDLE_LOADED est=$IDLE_EST
    per=$(awk -v a="$base" -v b="$loaded" -v n="$CONNS" 'BEGIN { printf "%.2f", (b - a) / n }')
    PER["$proto $t"]=$per
    ROWS+=("| $t, $CONNS idle $proto connections ($est open when measured) | $(mib "$base") | $(mib "$loaded") | $per KiB/conn | | |")
    [ -n "$IDLE_PARKED" ] && IDLE_NOTES+=("portcullis $proto: $IDLE_PARKED of $CONNS connections parked when measured")
    log "$t $proto: $per KiB per idle connection"
}

for part in conns tls-conns h2-conns; do
    [[ " $PARTS " == *" $part "* ]] || continue
    case $part in conns) proto=http ;; tls-conns) proto=https ;; h2-conns) proto=h2 ;; esac
    for t in $TARGETS; do idle_part "$proto" "$t"; done
done

# per-protocol comparison and goals
COMPARE=()
for proto in http https h2; do
    n=${PER["$proto nginx"]:-} p=${PER["$proto portcullis"]:-}
    [ -n "$n$p" ] || continue
    ratio="" goal="(measured)" v=""
    [ -n "$n" ] && [ -n "$p" ] && ratio=$(awk -v a="$p" -v b="$n" 'BEGIN { if (b > 0) printf "%.2f×", a / b }')
    case $proto in
    http) goal="≤ 2 KiB"; [ -n "$p" ] && v=$(verdict "$p" 2) ;;
    https) goal="≤ nginx"; [ -n "$p" ] && [ -n "$n" ] && v=$(verdict "$p" "$n") ;;
    esac
    [ "$v" = FAIL ] && FAILED=1
    COMPARE+=("| $proto | ${n:-–} | ${p:-–} | ${ratio:-–} | $goal | ${v:+**$v**} |")
done

echo
echo "## portcullis memory — $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "portcullis: ${PORTCULLIS_BIN:-not run} ($(bin_rev)); VmRSS from /proc/PID/status"
echo
echo "| measure | RSS before (MiB) | RSS loaded (MiB) | per item | target | verdict |"
echo "| --- | ---: | ---: | ---: | --- | --- |"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
if [ ${#COMPARE[@]} -gt 0 ]; then
    echo "Idle keep-alive connections, $CONNS per proxy and protocol, KiB of RSS per connection:"
    echo
    echo "| protocol | nginx | portcullis | portcullis ÷ nginx | goal | verdict |"
    echo "| --- | ---: | ---: | ---: | --- | --- |"
    for r in "${COMPARE[@]}"; do echo "$r"; done
    echo
    for r in "${IDLE_NOTES[@]}"; do echo "$r"; done
fi
[ -n "${SESSION_NOTE:-}" ] && echo "$SESSION_NOTE"
echo "load: $(uptime | sed 's/.*load average: //') (2 cores)"
if [ "$FAILED" = 1 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then exit 3; fi
exit 0
