#!/usr/bin/env bash
# Throughput / latency / CPU-per-request benchmark: direct backend vs nginx doing the
# gateway job vs portcullis, side by side in one run, on loopback.
#
#   bench/run.sh                       # builds portcullis (scripts/build-pgo; BENCH_PGO=0: cargo build --release), runs all
#   PORTCULLIS_BIN=/path/to/portcullis bench/run.sh    # use a prebuilt binary
#
# Environment (all optional):
#   BENCH_TARGETS="direct nginx portcullis"   which rows to measure; add `bare` for a bare
#                                             hyper forwarder (bench/bare_forwarder.rs:
#                                             no checks, the floor under portcullis's path)
#   BENCH_CONNECTIONS="32 256"                wrk connection counts
#   BENCH_WARMUP=2s  BENCH_DURATION=8s        wrk warm-up and measured run
#   PROXY_CPU=1  BACKEND_CPU=0                cores (proxy alone; backend + wrk together)
#   PORTCULLIS_LOG=warn                       RUST_LOG for portcullis diagnostics
#   BENCH_ACCESS_LOG=0                        1: both proxies write a JSON access line per
#                                             request to a file (default: both off)
#   BENCH_KEEP=1                              keep the temp dir (configs, logs, wrk output)
#   BENCH_STRICT=1                            exit 3 when a target verdict fails
#   BENCH_WAIT_QUIET=600                      first wait (at most that many seconds) until no
#                                             rustc/cargo and no other wrk runs on the machine
#
# The proxy's CPU per request is the delta of utime+stime (/proc/PID/stat, all of its
# processes: nginx master + workers; portcullis's threads) over the measured run, divided
# by the requests wrk completed in that run. It is the robust figure; req/s and latency
# move with whatever else the machine runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TARGETS="${BENCH_TARGETS:-direct nginx portcullis}"
CONNECTIONS="${BENCH_CONNECTIONS:-32 256}"
WARMUP="${BENCH_WARMUP:-2s}"
DURATION="${BENCH_DURATION:-8s}"
PROXY_CPU="${PROXY_CPU:-1}"
BACKEND_CPU="${BACKEND_CPU:-0}"

ensure_tools nginx:nginx wrk:wrk curl:curl taskset:util-linux getconf:libc-bin pgrep:procps
[ "$(nproc --all)" -ge 2 ] || die "needs 2 cores (proxy pinned to CPU $PROXY_CPU, load + backend to CPU $BACKEND_CPU)"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

if [ "${BENCH_WAIT_QUIET:-0}" -gt 0 ]; then
    quiet=0 deadline=$(( $(date +%s) + BENCH_WAIT_QUIET ))
    while [ "$quiet" -lt 3 ] && [ "$(date +%s)" -lt "$deadline" ]; do
        if pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null || pgrep -x wrk >/dev/null; then
            quiet=0
        else
            quiet=$((quiet + 1))
        fi
        sleep 5
    done
    [ "$quiet" -ge 3 ] && log "machine quiet (no build, no other wrk)" || log "machine still busy after ${BENCH_WAIT_QUIET}s; running anyway"
fi

bench_init
case " $TARGETS " in *" portcullis "*) build_portcullis ;; esac
case " $TARGETS " in *" bare "*) build_bare_forwarder ;; esac

alloc_port BACKEND_PORT
alloc_port NGINX_PORT
alloc_port PORTCULLIS_PORT
alloc_port BARE_PORT
start_backend "$BACKEND_PORT" 1
log "backend nginx pid $BACKEND_PID on 127.0.0.1:$BACKEND_PORT (CPU $BACKEND_CPU)"
check_200 backend "http://127.0.0.1:$BACKEND_PORT/api/data" 0

declare -A URL PIDS_OF
URL[direct]="http://127.0.0.1:$BACKEND_PORT/api/data"
for t in $TARGETS; do
    case $t in
    direct) ;;
    nginx)
        start_nginx_gw "$NGINX_PORT" "$BACKEND_PORT"
        log "nginx gateway pid $NGINX_GW_PID on 127.0.0.1:$NGINX_PORT (CPU $PROXY_CPU)"
        URL[nginx]="http://127.0.0.1:$NGINX_PORT/api/data"
        check_200 "nginx gateway" "${URL[nginx]}"
        ;;
    portcullis)
        start_portcullis "$PORTCULLIS_PORT" "$BACKEND_PORT"
        log "portcullis pid $PORTCULLIS_PID on 127.0.0.1:$PORTCULLIS_PORT (CPU $PROXY_CPU): $PORTCULLIS_BIN"
        URL[portcullis]="http://127.0.0.1:$PORTCULLIS_PORT/api/data"
        check_200 portcullis "${URL[portcullis]}"
        ;;
    bare)
        taskset -c "$PROXY_CPU" "$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$BACKEND_PORT" \
            >"$WORK/bare.log" 2>&1 &
        BARE_PID=$!
        STARTED_PIDS+=("$BARE_PID")
        wait_port "$BARE_PORT" "bare forwarder" "$BARE_PID"
        log "bare hyper forwarder pid $BARE_PID on 127.0.0.1:$BARE_PORT (CPU $PROXY_CPU): $BARE_BIN"
        URL[bare]="http://127.0.0.1:$BARE_PORT/api/data"
        check_200 "bare forwarder" "${URL[bare]}" 0
        ;;
    *) die "unknown target $t (direct, nginx, portcullis, bare)" ;;
    esac
done

proxy_pids() {
    case $1 in
    direct) echo "" ;;
    nginx) nginx_pids "$NGINX_GW_PID" ;;
    portcullis) echo "$PORTCULLIS_PID" ;;
    bare) echo "$BARE_PID" ;;
    esac
}

cat >"$WORK/report.lua" <<'EOF'
-- prints one machine-readable line; no request()/response() so wrk stays on its fast path
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("BENCHRESULT %d %d %.1f %.1f %.1f %d %d %d %d %d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.mean, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

# cpu_line N : "busy total" jiffies of cpuN from /proc/stat
cpu_line() {
    awk -v c="cpu$1" '$1 == c { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}

run_wrk() { # URL CONNS DURATION OUTFILE
    taskset -c "$BACKEND_CPU" wrk -t1 -c"$2" -d"$3" --timeout 5s --latency \
        -H "Api-Key: $API_KEY" -H "User-Token: $TOKEN" -s "$WORK/report.lua" "$1" >"$4" 2>&1 \
        || die "wrk failed against $1: $(tail -5 "$4")"
    grep -q '^BENCHRESULT ' "$4" || die "wrk printed no result against $1: $(tail -5 "$4")"
}

RESULTS=()   # "target conns rps p50 p99 proxy_us backend_us noise non2xx sockerr valcalls"
LOADS=()
measure() { # TARGET CONNS
    local t=$1 c=$2 url=${URL[$1]} out="$WORK/wrk-$1-$2"
    local pids p0 p1 b0 b1 v0 v1 n0 n1
    run_wrk "$url" "$c" "$WARMUP" "$out.warmup"
    read -r _ req _ _ _ _ st _ _ _ _ < <(grep '^BENCHRESULT ' "$out.warmup")
    [ "$st" -eq 0 ] || die "$t answered $st non-2xx responses during warm-up (of $req): see $out.warmup"
    pids="$(proxy_pids "$t")"
    v0=$(validation_calls)
    read -r n0 _ < <(cpu_line "$PROXY_CPU")
    p0=$(cpu_ticks $pids)
    b0=$(cpu_ticks $(nginx_pids "$BACKEND_PID"))
    run_wrk "$url" "$c" "$DURATION" "$out"
    p1=$(cpu_ticks $pids)
    b1=$(cpu_ticks $(nginx_pids "$BACKEND_PID"))
    read -r n1 _ < <(cpu_line "$PROXY_CPU")
    v1=$(validation_calls)
    LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
    local req dur p50 p99 mean st ce re we to
    read -r _ req dur p50 p99 mean st ce re we to < <(grep '^BENCHRESULT ' "$out")
    [ "$req" -gt 0 ] || die "$t: wrk completed no request"
    [ "$st" -eq 0 ] || die "$t answered $st non-2xx responses (of $req) in the measured run: see $out"
    local sockerr=$((ce + re + we + to))
    local row
    row=$(awk -v t="$t" -v c="$c" -v req="$req" -v dur="$dur" -v p50="$p50" -v p99="$p99" \
        -v pt=$((p1 - p0)) -v bt=$((b1 - b0)) -v nt=$((n1 - n0)) -v hz="$CLK_TCK" \
        -v st="$st" -v se="$sockerr" -v vc=$((v1 - v0)) -v hasproxy="${pids:+1}" 'BEGIN {
            rps = req / (dur / 1e6)
            pus = hasproxy ? sprintf("%.2f", pt * 1e6 / hz / req) : "-"
            bus = sprintf("%.2f", bt * 1e6 / hz / req)
            other = (nt - (hasproxy ? pt : 0)) * 100 / hz / (dur / 1e6)
            if (other < 0) other = 0
            printf "%s %s %.0f %.3f %.3f %s %s %.0f %d %d %d", t, c, rps, p50 / 1000, p99 / 1000, pus, bus, other, st, se, vc
        }')
    RESULTS+=("$row")
    log "$row"
}

log "machine load before: $(cut -d' ' -f1-3 /proc/loadavg)"
LOAD_BEFORE="$(uptime)"
for c in $CONNECTIONS; do
    for t in $TARGETS; do
        measure "$t" "$c"
    done
done
LOAD_AFTER="$(uptime)"

# ------------------------------------------------------------------ report
echo
echo "## portcullis benchmark — $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "wrk 1 thread, warm-up $WARMUP then $DURATION measured; proxy pinned to CPU $PROXY_CPU, backend (nginx, 1 worker) + wrk on CPU $BACKEND_CPU; headers Api-Key + User-Token (token cached after the first request); access logs $([ "${BENCH_ACCESS_LOG:-0}" = 1 ] && echo 'ON for both proxies (JSON lines to a file)' || echo 'off for both proxies')."
echo "portcullis: ${PORTCULLIS_BIN:-not run} ($(bin_rev)); $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
echo
echo "| target | conns | req/s | p50 ms | p99 ms | proxy CPU µs/req | backend CPU µs/req | other load on proxy core % | non-2xx | socket errors | validation calls in run |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for r in "${RESULTS[@]}"; do
    read -r t c rps p50 p99 pus bus other st se vc <<<"$r"
    case $t in direct) name="direct to backend" ;; nginx) name="nginx gateway" ;; bare) name="bare hyper forwarder (no checks)" ;; *) name=$t ;; esac
    echo "| $name | $c | $rps | $p50 | $p99 | $pus | $bus | $other | $st | $se | $vc |"
done
echo
echo "load before: ${LOAD_BEFORE#*load average: } — after: ${LOAD_AFTER#*load average: }"
# the load average lags and counts this script's own processes: judge by the share of the
# proxy's core that other processes took during each measured run instead
busy=$(for r in "${RESULTS[@]}"; do echo "$r"; done | awk '$8 + 0 > 10 { printf "%s%s/%s (%s %%)", sep, $1, $2, $8; sep = ", " }')
if [ -n "$busy" ]; then
    echo
    echo "**WARNING: other processes used more than 10 % of the proxy's core during: $busy.** Those rows' req/s and latency are noisy, and a proxy's CPU µs/req is inflated when it shared its core. Re-run on a quiet machine (BENCH_WAIT_QUIET=600) for figures to quote."
fi
echo

# verdicts: portcullis CPU/req <= 0.8 x nginx's, portcullis p99 <= nginx p99
FAILED=0
case " $TARGETS " in *" nginx "*) ;; *) TARGETS_NO_VERDICT=1 ;; esac
if [ -z "${TARGETS_NO_VERDICT:-}" ] && [[ " $TARGETS " == *" portcullis "* ]]; then
    echo "### Target verdicts"
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
        v=$(awk -v a="$pccpu" -v b="$ngcpu" 'BEGIN { r = a / b; printf "%.2f %s", r, (r <= 0.8 ? "PASS" : "FAIL") }')
        read -r ratio cpuv <<<"$v"
        p99v=$(awk -v a="$pcp99" -v b="$ngp99" 'BEGIN { print (a <= b ? "PASS" : "FAIL") }')
        echo "- $c connections: CPU/req portcullis $pccpu µs vs nginx $ngcpu µs = ${ratio}× (target ≤ 0.80×): **$cpuv**; p99 portcullis $pcp99 ms vs nginx $ngp99 ms (target ≤): **$p99v**"
        [ "$cpuv" = PASS ] && [ "$p99v" = PASS ] || FAILED=1
    done
    echo
fi
if [ "$FAILED" = 1 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then
    exit 3
fi
exit 0
