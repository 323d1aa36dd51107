#!/usr/bin/env bash
# TLS hardening check: runs testssl.sh (Debian package `testssl.sh`, installed when
# missing) against portcullis serving HTTPS with development certificates on loopback,
# and prints a summary: protocols offered, cipher categories, and every finding rated
# LOW or worse.
#
#   bench/testssl.sh                          # builds portcullis (cargo build --release)
#   PORTCULLIS_BIN=/path/to/portcullis bench/testssl.sh
#   TESTSSL_ARGS="--fast" bench/testssl.sh    # extra testssl options
#   BENCH_KEEP=1                              # keep the work dir (full testssl log + CSV)
#
# Exit status: 0 when nothing below TLS 1.2 is offered, no weak cipher category is
# offered and no finding about the server is rated MEDIUM, HIGH or CRITICAL; 4
# otherwise. Findings about the certificate itself (cert_*: revocation info, chain,
# validity; DNS_CAArecord) are listed but not judged: they describe the throw-away
# development certificate and the loopback name, not the gateway.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_tools testssl:testssl.sh openssl:openssl curl:curl taskset:util-linux getconf:libc-bin
bench_init
# A functional check: the plain release build will do (no profile-guided build).
BENCH_PGO="${BENCH_PGO:-0}" build_portcullis

"$PORTCULLIS_BIN" dev-certs --out "$WORK/certs" >/dev/null || die "dev-certs failed"
alloc_port BACKEND_PORT   # nothing listens there: testssl's requests never reach a route
alloc_port PORTCULLIS_PORT
PORTCULLIS_SERVER_EXTRA="tls = { cert = \"$WORK/certs/server.crt\", key = \"$WORK/certs/server.key\" }" \
    start_portcullis "$PORTCULLIS_PORT" "$BACKEND_PORT"
log "portcullis (TLS) pid $PORTCULLIS_PID on 127.0.0.1:$PORTCULLIS_PORT"

CSV="$WORK/testssl.csv"
log "running testssl against https://localhost:$PORTCULLIS_PORT (a few minutes)"
# shellcheck disable=SC2086
testssl --quiet --color 0 --warnings batch --ip one --add-ca "$WORK/certs/ca.crt" \
    --csvfile "$CSV" ${TESTSSL_ARGS:-} "https://localhost:$PORTCULLIS_PORT" >"$WORK/testssl.log" 2>&1 || true
[ -s "$CSV" ] || die "testssl produced no results: $(tail -20 "$WORK/testssl.log")"

# CSV columns: "id","fqdn/ip","port","severity","finding","cve","cwe"
field() { # ID -> finding
    awk -F'","' -v id="$1" '{ gsub(/^"/, "", $1) } $1 == id { print $5; exit }' "$CSV"
}
echo
echo "## testssl.sh against portcullis — $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "testssl.sh $(dpkg-query -W -f='${Version}' testssl.sh 2>/dev/null || echo "(version unknown)"); $(openssl version); portcullis $(bin_rev); certificate: portcullis dev-certs (ECDSA P-256)"
echo
echo "| check | result |"
echo "| --- | --- |"
for id in SSLv2 SSLv3 TLS1 TLS1_1 TLS1_2 TLS1_3 ALPN_HTTP2 \
    cipherlist_NULL cipherlist_aNULL cipherlist_EXPORT cipherlist_LOW cipherlist_3DES_IDEA \
    cipherlist_AVERAGE cipherlist_STRONG FS; do
    f="$(field "$id")"
    [ -n "$f" ] && echo "| $id | $f |"
done
echo
echo "Severity counts: $(awk -F'","' 'NR > 1 { c[$4]++ } END { for (s in c) printf "%s=%d ", s, c[s] }' "$CSV")"
echo
echo "Findings rated LOW or worse (id: finding):"
awk -F'","' 'NR > 1 && ($4 == "LOW" || $4 == "MEDIUM" || $4 == "HIGH" || $4 == "CRITICAL") { gsub(/^"/, "", $1); printf "- %s [%s]: %s\n", $1, $4, $5 }' "$CSV" | sort -u
echo

BAD=0
for id in SSLv2 SSLv3 TLS1 TLS1_1; do
    f="$(field "$id")"
    case "$f" in "not offered"*) ;; *) echo "FAIL: $id: $f"; BAD=1 ;; esac
done
for id in cipherlist_NULL cipherlist_aNULL cipherlist_EXPORT cipherlist_LOW cipherlist_3DES_IDEA cipherlist_AVERAGE; do
    f="$(field "$id")"
    case "$f" in "not offered"*) ;; *) echo "FAIL: $id: $f"; BAD=1 ;; esac
done
SERVER_BAD="$(awk -F'","' 'NR > 1 && ($4 == "MEDIUM" || $4 == "HIGH" || $4 == "CRITICAL") { gsub(/^"/, "", $1); if ($1 !~ /^cert_/ && $1 != "DNS_CAArecord") print $1 }' "$CSV" | sort -u | tr '\n' ' ')"
if [ -n "$SERVER_BAD" ]; then
    echo "FAIL: server findings rated MEDIUM or worse: $SERVER_BAD"
    BAD=1
fi
CERT_NOTES="$(awk -F'","' 'NR > 1 && ($4 == "LOW" || $4 == "MEDIUM" || $4 == "HIGH" || $4 == "CRITICAL") { gsub(/^"/, "", $1); if ($1 ~ /^cert_/ || $1 == "DNS_CAArecord") print $1 }' "$CSV" | sort -u | tr '\n' ' ')"
[ -z "$CERT_NOTES" ] || echo "note: about the development certificate / loopback name, not judged: $CERT_NOTES"
[ "$BAD" = 0 ] && echo "PASS: nothing below TLS 1.2, no weak cipher category, no server finding rated MEDIUM or worse"
[ "$BAD" = 0 ] || exit 4
