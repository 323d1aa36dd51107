#!/usr/bin/env bash
# Runner benchmark, on loopback:
#   1. round trip of POST /__manage__/true (a custom command running /bin/true,
#      answered inline) run locally by the gateway vs on one runner: p50/p99 over
#      BENCH_RUNS sequential runs on one keep-alive connection;
#   2. the gateway's cost of BENCH_RUNNERS idle connected runners: RSS before and
#      after they connect, and CPU (utime+stime) per second over BENCH_IDLE seconds.
# Plain http:// on loopback for both modes (TLS costs the same in both).
#
#   bench/runners.sh                                  # builds --release
#   PORTCULLIS_BIN=target/debug/portcullis bench/runners.sh
#   BENCH_RUNS=300 BENCH_RUNNERS=100 BENCH_IDLE=10 BENCH_LEASE=30s
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS="${BENCH_RUNS:-300}"
NRUNNERS="${BENCH_RUNNERS:-100}"
IDLE="${BENCH_IDLE:-10}"
LEASE="${BENCH_LEASE:-30s}"
if [[ -z "${PORTCULLIS_BIN:-}" ]]; then
  cargo build --release --quiet
  PORTCULLIS_BIN=target/release/portcullis
fi
BIN="$(realpath "$PORTCULLIS_BIN")"
DIR="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

gateway_config() { # FILE PORT EXECUTE NRUNNERS
  cat >"$1" <<CFG
[server]
listen = "127.0.0.1:$2"
[backend]
url = "http://127.0.0.1:9"
[[api_keys]]
name = "app"
key = "device-key"
[[operators]]
name = "bench"
token = "bench-token"
[commands]
state_dir = "$DIR/state-$3"
audit_log = "$DIR/audit-$3.jsonl"
sync_wait = "10s"
max_concurrent = 64
CFG
  if [[ "$3" == local ]]; then
    printf '[[commands.custom]]\nname = "true"\nargv = ["/bin/true"]\n' >>"$1"
  else
    printf 'execute = "runners"\nlease = "%s"\nallow = ["true"]\n' "$LEASE" >>"$1"
    for i in $(seq "$4"); do
      printf '[[runners]]\nname = "r%s"\ntoken = "sha256:%s"\ngroups = ["g"]\n' "$i" "$(hash "tok-$i")" >>"$1"
    done
  fi
}

runner() { # PORT I
  cat >"$DIR/runner-$2.toml" <<CFG
gateway = "http://127.0.0.1:$1"
name = "r$2"
token = "tok-$2"
groups = ["g"]
[commands]
allow = []
[[commands.custom]]
name = "true"
argv = ["/bin/true"]
CFG
  PORTCULLIS_LOG=warn "$BIN" runner --config "$DIR/runner-$2.toml" 2>>"$DIR/runners.log" &
  PIDS+=($!)
}

measure() { # PORT LABEL
  python3 - "$1" "$2" "$RUNS" <<'PY'
import http.client, json, sys, time
port, label, runs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
h = {"authorization": "Bearer bench-token", "content-type": "application/json"}
def once():
    t = time.perf_counter()
    c.request("POST", "/__manage__/true", body="{}", headers=h)
    r = c.getresponse(); body = r.read()
    dt = time.perf_counter() - t
    if r.status != 200 or json.loads(body).get("status") != "succeeded":
        sys.exit(f"{label}: unexpected answer {r.status} {body[:200]!r}")
    return dt
for _ in range(20): once()
xs = sorted(once() for _ in range(runs))
p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000
print(f"{label:8s} runs={runs} p50={p(0.50):.2f} ms p99={p(0.99):.2f} ms")
PY
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# 1. round trip, local vs one runner
P1="$(port)"; gateway_config "$DIR/local.toml" "$P1" local 0
PORTCULLIS_LOG=warn "$BIN" run --config "$DIR/local.toml" >/dev/null 2>>"$DIR/gateway.log" & PIDS+=($!); wait_port "$P1"
measure "$P1" local
P2="$(port)"; gateway_config "$DIR/remote.toml" "$P2" runners "$NRUNNERS"
PORTCULLIS_LOG=warn "$BIN" run --config "$DIR/remote.toml" >/dev/null 2>>"$DIR/gateway.log" & GW=$!; PIDS+=("$GW"); wait_port "$P2"
runner "$P2" 1
for _ in $(seq 100); do
  curl -s -H 'authorization: Bearer bench-token' "http://127.0.0.1:$P2/__manage__/runners" | grep -q '"connected":true' && break
  sleep 0.1
done
measure "$P2" runner

# 2. idle runners
sleep 1
RSS0="$(rss "$GW")"
for i in $(seq 2 "$NRUNNERS"); do runner "$P2" "$i"; done
for _ in $(seq 300); do
  n="$(curl -s -H 'authorization: Bearer bench-token' "http://127.0.0.1:$P2/__manage__/runners" | grep -o '"connected":true' | wc -l)"
  [[ "$n" -ge "$NRUNNERS" ]] && break
  sleep 0.2
done
echo "connected runners: $n of $NRUNNERS"
sleep 2
T0="$(ticks "$GW")"; sleep "$IDLE"; T1="$(ticks "$GW")"
RSS1="$(rss "$GW")"
HZ="$(getconf CLK_TCK)"
python3 -c "print(f'idle: gateway RSS {$RSS0} KiB -> {$RSS1} KiB (+{($RSS1-$RSS0)/$NRUNNERS:.1f} KiB per runner); CPU {($T1-$T0)/$HZ/$IDLE*1000:.2f} ms per second with $NRUNNERS idle runners (lease $LEASE)')"
