#!/usr/bin/env bash
# Remote-operations benchmark: end-to-end latency of POST /__manage__/true (a custom
# command running /bin/true, answered inline) through the real gateway on loopback —
# p50/p99 over BENCH_RUNS sequential runs, runs/s with 4 concurrent operators, and
# /bin/true's own spawn time for comparison. Every run fsyncs two audit lines and
# commits two job-store transactions, so the figures depend on the disk under
# BENCH_DIR (default: a temp dir under $TMPDIR).
#
#   bench/manage.sh                    # BENCH_RUNS=1000
#   BENCH_RUNS=200 BENCH_DIR=/var/tmp/pc bench/manage.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo run --quiet --release --example manage_bench
