# Shared helpers for bench/run.sh and bench/memory.sh. Sourced, not run.
# Everything listens on 127.0.0.1 only; every process started here is recorded and
# stopped by the EXIT trap installed by bench_init.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"

# Credentials used by every configuration (loopback-only, throwaway values).
API_KEY="bench-api-key-0123456789abcdef"
API_KEY_NAME="bench-client"
BACKEND_KEY="bench-backend-credential"
TOKEN="0123456789abcdef0123456789abcdef01234567"   # 40 chars, like a Django token

STARTED_PIDS=()

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ensure_tools CMD:PACKAGE ... : installs the Debian packages of missing commands
# (apt-get update at most once).
ensure_tools() {
    local missing=() spec
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing missing packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

cleanup() {
    local rc=$? pid i
    # stop in reverse start order: proxies before the backend
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ "${BENCH_KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then
            log "work dir kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit $rc
}

bench_init() {
    WORK="$(mktemp -d /tmp/portcullis-bench.XXXXXX)"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    CLK_TCK="$(getconf CLK_TCK)"
    NEXT_PORT="${BENCH_BASE_PORT:-18480}"
    # nginx's workers would drop to "nobody", who cannot enter the private temp dir
    NGINX_USER=""
    [ "$(id -u)" -eq 0 ] && NGINX_USER="user root;"
    return 0
}

# alloc_port VAR: sets VAR to a loopback TCP port nothing listens on (from BENCH_BASE_PORT up).
alloc_port() {
    while (exec 3<>"/dev/tcp/127.0.0.1/$NEXT_PORT") 2>/dev/null; do
        NEXT_PORT=$((NEXT_PORT + 1))
    done
    printf -v "$1" '%s' "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT + 1))
}

wait_port() { # PORT NAME PID
    local i
    for i in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || die "$2 exited during start-up (see $WORK)"
        sleep 0.1
    done
    die "$2 did not listen on 127.0.0.1:$1 within 10 s"
}

# cpu_ticks PID... : utime+stime (clock ticks) of the given processes, summed.
# /proc/PID/stat's comm may contain spaces, so fields are counted after the last ')'.
cpu_ticks() {
    local total=0 pid rest
    for pid in "$@"; do
        rest="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        [ -n "$rest" ] || continue
        # after ')': state(3) ppid(4) ... utime(14) stime(15) -> positions 12 and 13
        total=$((total + $(awk '{print $12 + $13}' <<<"$rest")))
    done
    echo "$total"
}

# nginx_pids MASTER_PID : the master and all its children (workers, cache manager/loader)
nginx_pids() {
    echo "$1" $(pgrep -P "$1" 2>/dev/null)
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ------------------------------------------------------------------ backend (nginx)
# start_backend PORT [LOG_VALIDATIONS=0|1]
# Serves GET /api/data (small JSON), POST /renew_session (echoes the user-token header
# with a far-future expiry: accepts any token) and POST /login.
start_backend() {
    local port=$1 logval=${2:-1} dir="$WORK/backend"
    mkdir -p "$dir/logs" "$dir/tmp"
    local vlog="access_log off;"
    [ "$logval" = 1 ] && vlog="access_log $dir/logs/validations.log validation;"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
$NGINX_USER
worker_rlimit_nofile $(ulimit -n);
events { worker_connections 16384; multi_accept on; }
http {
    access_log off;
    log_format validation '\$msec \$http_user_token';
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    default_type application/json;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /api/data {
            return 200 '{"id": 42, "name": "bench", "items": [1, 2, 3], "ok": true}\n';
        }
        location = /renew_session {
            $vlog
            return 200 '{"user-token": "\$http_user_token", "expiration-date": "2099-12-31 23:59:59", "response": {"email": "bench@example.com", "name": "bench", "is_active": true, "is_staff": false, "is_superuser": false}}\n';
        }
        location = /login {
            return 200 '{"user-token": "$TOKEN", "expiration-date": "2099-12-31 23:59:59", "response": {"email": "bench@example.com", "name": "bench", "is_active": true, "is_staff": false, "is_superuser": false}}\n';
        }
        location / { return 404 '{"error": {"code": 404, "type": "NotFound", "message": "no such backend path"}}\n'; }
    }
}
EOF
    taskset -c "${BACKEND_CPU:-0}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
        >"$dir/logs/stdout.log" 2>&1 &
    BACKEND_PID=$!
    STARTED_PIDS+=("$BACKEND_PID")
    wait_port "$port" "backend nginx" "$BACKEND_PID"
    BACKEND_VLOG="$dir/logs/validations.log"
    touch "$BACKEND_VLOG"
}

validation_calls() { wc -l <"$BACKEND_VLOG" | tr -d ' '; }

# ------------------------------------------------------------------ nginx as gateway
# start_nginx_gw PORT BACKEND_PORT
start_nginx_gw() {
    local port=$1 bport=$2 dir="$WORK/nginx-gw"
    mkdir -p "$dir/logs" "$dir/tmp" "$dir/cache"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
$NGINX_USER
worker_rlimit_nofile $(ulimit -n);
events { worker_connections 16384; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    default_type application/json;

    # API key -> client name; unknown keys map to "" (403 below)
    map \$http_api_key \$api_client {
        default        "";
        "$API_KEY"     "$API_KEY_NAME";
    }

    # validation answers cached per user token
    proxy_cache_path $dir/cache levels=1:2 keys_zone=sessions:64m max_size=1g inactive=12h use_temp_path=off;

    upstream backend {
        server 127.0.0.1:$bport;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }

    server {
        # NGINX_GW_LISTEN_OPTS / NGINX_GW_SERVER_EXTRA: set by bench/tls.sh (ssl, http2, certificates)
        listen 127.0.0.1:$port${NGINX_GW_LISTEN_OPTS:-} backlog=4096;
        ${NGINX_GW_SERVER_EXTRA:-}

        location = /api/data {
            if (\$api_client = "") {
                return 403 '{"error": {"code": 403, "type": "ProxyServerError", "message": "Received API KEY not found in server API KEYS set"}}\n';
            }
            if (\$http_user_token = "") {
                return 400 '{"error": {"code": 400, "type": "ProxyServerError", "message": "A private service requires a user token"}}\n';
            }
            auth_request /_validate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Api-Key "$BACKEND_KEY";
            proxy_set_header Api-Client \$api_client;
            proxy_set_header User-Token \$http_user_token;
            proxy_set_header Client-Ip \$remote_addr;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_pass http://backend;
        }

        location = /_validate {
            internal;
            proxy_method POST;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Api-Key "$BACKEND_KEY";
            proxy_set_header User-Token \$http_user_token;
            proxy_cache sessions;
            proxy_cache_key \$http_user_token;
            proxy_cache_valid 200 12h;
            proxy_cache_valid 401 403 30s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_pass http://backend/renew_session;
        }
    }
}
EOF
    # access log: off (like portcullis below) unless BENCH_ACCESS_LOG=1, then one JSON
    # line per request to a buffered file, as portcullis writes its own
    if [ "${BENCH_ACCESS_LOG:-0}" = 1 ]; then
        sed -i "0,/^    access_log off;/s||    log_format gw escape=json '{\"time\":\"\$time_iso8601\",\"request_id\":\"\$request_id\",\"client\":\"\$remote_addr\",\"api_client\":\"\$api_client\",\"method\":\"\$request_method\",\"path\":\"\$uri\",\"status\":\$status,\"bytes\":\$body_bytes_sent,\"duration_ms\":\$request_time,\"upstream_ms\":\"\$upstream_response_time\"}';\n    access_log $dir/logs/access.jsonl gw buffer=64k flush=1s;|" "$dir/nginx.conf"
    fi
    taskset -c "${PROXY_CPU:-1}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
        >"$dir/logs/stdout.log" 2>&1 &
    NGINX_GW_PID=$!
    STARTED_PIDS+=("$NGINX_GW_PID")
    wait_port "$port" "nginx gateway" "$NGINX_GW_PID"
}

# ------------------------------------------------------------------ portcullis
# build_portcullis: sets PORTCULLIS_BIN (builds unless PORTCULLIS_BIN is given): the
# profile-guided build of scripts/build-pgo by default, a plain `cargo build --release`
# with BENCH_PGO=0.
build_portcullis() {
    if [ -n "${PORTCULLIS_BIN:-}" ]; then
        [ -x "$PORTCULLIS_BIN" ] || die "PORTCULLIS_BIN=$PORTCULLIS_BIN is not an executable"
        log "using PORTCULLIS_BIN=$PORTCULLIS_BIN (not rebuilt)"
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust, or set PORTCULLIS_BIN"
    if [ "${BENCH_PGO:-1}" = 1 ]; then
        log "profile-guided build: scripts/build-pgo (BENCH_PGO=0 for a plain release build)"
        PORTCULLIS_BIN="$("$REPO_ROOT/scripts/build-pgo" | tail -1)" \
            || die "scripts/build-pgo failed (BENCH_PGO=0 measures a plain release build instead)"
        [ -x "$PORTCULLIS_BIN" ] || die "no binary at $PORTCULLIS_BIN after scripts/build-pgo"
        return 0
    fi
    log "cargo build --release in $REPO_ROOT"
    (cd "$REPO_ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    local target="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
    PORTCULLIS_BIN="$target/release/portcullis"
    [ -x "$PORTCULLIS_BIN" ] || die "no binary at $PORTCULLIS_BIN after the build"
}

# build_bare_forwarder: sets BARE_BIN (bench/bare_forwarder.rs, release profile)
build_bare_forwarder() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: the bare target builds an example"
    log "cargo build --release --example bare_forwarder in $REPO_ROOT"
    (cd "$REPO_ROOT" && cargo build --release --quiet --example bare_forwarder) \
        || die "cargo build --release --example bare_forwarder failed"
    local target="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
    BARE_BIN="$target/release/examples/bare_forwarder"
    [ -x "$BARE_BIN" ] || die "no binary at $BARE_BIN after the build"
}

# bin_rev: the commit the portcullis binary was built from, as far as can be told
bin_rev() {
    [ -n "${PORTCULLIS_BIN:-}" ] || { echo "not built"; return; }
    local r
    r="$(git -C "$(dirname "$PORTCULLIS_BIN")" log -1 --format='%h %s' 2>/dev/null | cut -c1-60)" || true
    echo "${r:-unknown commit}"
}

# start_portcullis PORT BACKEND_PORT [MAX_ENTRIES] [EXTRA_TOML] [NAME]
# (NAME: its directory under $WORK, for several instances; default portcullis)
start_portcullis() {
    local port=$1 bport=$2 max_entries=${3:-100000} extra=${4:-} dir="$WORK/${5:-portcullis}"
    mkdir -p "$dir"
    cat >"$dir/portcullis.toml" <<EOF
# generated by bench/ for one benchmark run
[server]
listen = "127.0.0.1:$port"
${PORTCULLIS_SERVER_EXTRA:-}

[backend]
url = "http://127.0.0.1:$bport"
api_key = "$BACKEND_KEY"
${PORTCULLIS_BACKEND_EXTRA:-}

[[api_keys]]
name = "$API_KEY_NAME"
key = "$API_KEY"

[sessions]
validate_method = "POST"
validate_path = "/renew_session"
login_path = "/login"
max_entries = $max_entries
max_ttl = "12h"
negative_ttl = "30s"

[limits]
idle_timeout = "600s"
max_connections = 20000

[[routes]]
path = "/api/data"
methods = ["GET"]
public = false
$extra
EOF
    # access log off, as nginx's (portcullis's default is a JSON line per request on
    # stdout); BENCH_ACCESS_LOG=1 turns both on, to a file
    local alog='"off"'
    [ "${BENCH_ACCESS_LOG:-0}" = 1 ] && alog="\"$dir/access.jsonl\""
    sed -i "0,/^\[server\]$/s||[server]\naccess_log = $alog|" "$dir/portcullis.toml"
    RUST_LOG="${PORTCULLIS_LOG:-warn}" taskset -c "${PROXY_CPU:-1}" \
        "$PORTCULLIS_BIN" --config "$dir/portcullis.toml" >"$dir/stdout.log" 2>"$dir/stderr.log" &
    PORTCULLIS_PID=$!
    STARTED_PIDS+=("$PORTCULLIS_PID")
    wait_port "$port" "portcullis" "$PORTCULLIS_PID"
}

# check_200 NAME URL [CHECK_403=1] : one request with the bench key and token must
# answer 200 with the backend's body, and (for gateways) one with an unknown key must be
# refused with 403 (a benchmark of 403s is worthless, and so is one of a gateway that
# lets everything through).
check_200() {
    local name=$1 url=$2 check403=${3:-1} code body
    body="$(curl -s -o "$WORK/check.body" -w '%{http_code}' -H "Api-Key: $API_KEY" -H "User-Token: $TOKEN" "$url")" || true
    code=$body
    [ "$code" = 200 ] || die "$name answered $code (not 200) to $url: $(head -c 300 "$WORK/check.body" 2>/dev/null)"
    grep -q '"name": "bench"' "$WORK/check.body" || die "$name: 200 but not the backend's body: $(head -c 300 "$WORK/check.body")"
    [ "$check403" = 1 ] || return 0
    code="$(curl -s -o /dev/null -w '%{http_code}' -H "Api-Key: wrong-key" -H "User-Token: $TOKEN" "$url")" || true
    [ "$code" = 403 ] || die "$name answered $code (expected 403) to an unknown API key"
}
