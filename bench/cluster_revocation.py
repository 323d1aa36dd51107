#!/usr/bin/env python3
"""Revocation propagation across cluster instances (used by bench/cluster.sh).

backend PORT
    A small backend that knows which sessions ended: POST /renew_session
    answers 200 (expiry far away) unless the token was revoked (403);
    POST /revoke ends a token's session (what the application's logout does);
    anything else answers a small JSON body.

measure --origin HOST:PORT --followers HOST:PORT,... --backend HOST:PORT
        --api-key KEY --count N [--admin HOST:PORT,...]
    N times: a fresh token is used once on every instance (one validation,
    shared through Redis), the backend ends its session, POST /logout goes to
    the origin instance; from the moment its 204 arrives, one thread per
    follower polls the token over a keep-alive connection until the follower
    answers 403. Prints p50/p99/max of that delay per follower and overall,
    then the followers' portcullis_cluster_revocation_lag_seconds histograms
    (publisher clock to receiver clock) read from their admin listeners.

Loopback only; everything it starts stops with it.
"""

import argparse
import http.client
import http.server
import json
import secrets
import sys
import threading
import time

REVOKED = set()
REVOKED_LOCK = threading.Lock()


class Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        token = self.headers.get("user-token", "")
        if self.path == "/revoke":
            with REVOKED_LOCK:
                REVOKED.add(token)
            return self.answer(200, {"ok": True})
        if self.path == "/renew_session":
            with REVOKED_LOCK:
                gone = token in REVOKED
            if gone:
                return self.answer(403, {"error": {"code": 403, "type": "SessionError", "message": "gone"}})
            return self.answer(200, {"user-token": token, "expiration-date": "2099-12-31 23:59:59"})
        return self.answer(200, {"id": 42, "name": "bench", "ok": True})

    do_GET = do_POST


def serve_backend(port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Backend)
    server.daemon_threads = True
    server.serve_forever()


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def request(conn, method, path, headers):
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def quantile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round((len(values) - 1) * q))]


def histogram(admin):
    """(count, [(le, cumulative)]) of the revocation lag histogram."""
    conn = http.client.HTTPConnection(*split(admin), timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    buckets, count = [], 0
    for line in text.splitlines():
        if line.startswith("portcullis_cluster_revocation_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), int(float(line.rsplit(" ", 1)[1]))))
        elif line.startswith("portcullis_cluster_revocation_lag_seconds_count"):
            count = int(float(line.rsplit(" ", 1)[1]))
    return count, buckets


def bucket_quantile(count, buckets, q):
    want = q * count
    for le, cum in buckets:
        if cum >= want:
            return le
    return float("inf")


def measure(args):
    headers = {"Api-Key": args.api_key}
    origin = http.client.HTTPConnection(*split(args.origin), timeout=10)
    backend = http.client.HTTPConnection(*split(args.backend), timeout=10)
    followers = args.followers.split(",")
    conns = {f: http.client.HTTPConnection(*split(f), timeout=10) for f in followers}
    delays = {f: [] for f in followers}
    deadline_s = 5.0
    for i in range(args.count):
        token = "rev-%d-%s" % (i, secrets.token_hex(16))
        h = dict(headers, **{"User-Token": token})
        for conn in [origin] + list(conns.values()):
            status = request(conn, "GET", "/api/data", h)
            if status != 200:
                sys.exit("a fresh token was answered %d" % status)
        request(backend, "POST", "/revoke", {"User-Token": token})
        go = threading.Event()
        results = {}

        def poll(f):
            conn = conns[f]
            go.wait()
            start = started[0]
            while True:
                status = request(conn, "GET", "/api/data", h)
                now = time.perf_counter()
                if status == 403:
                    results[f] = now - start
                    return
                if status != 200:
                    sys.exit("%s answered %d while polling" % (f, status))
                if now - start > deadline_s:
                    results[f] = float("inf")
                    return

        started = [0.0]
        threads = [threading.Thread(target=poll, args=(f,)) for f in followers]
        for t in threads:
            t.start()
        status = request(origin, "POST", "/logout", h)
        started[0] = time.perf_counter()
        go.set()
        if status != 204:
            sys.exit("logout answered %d" % status)
        for t in threads:
            t.join()
        for f in followers:
            delays[f].append(results[f])
    every = []
    print("revocation propagation, %d logouts on %s (client-measured from the 204 to the first 403):" % (args.count, args.origin))
    for f in followers:
        d = delays[f]
        every += d
        print("  %-21s p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms" % (f, quantile(d, 0.5) * 1e3, quantile(d, 0.99) * 1e3, max(d) * 1e3))
    p99 = quantile(every, 0.99)
    print("  %-21s p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  (target p99 <= 100 ms: %s)" % (
        "all followers", quantile(every, 0.5) * 1e3, p99 * 1e3, max(every) * 1e3, "met" if p99 <= 0.1 else "MISSED"))
    if args.admin:
        print("portcullis_cluster_revocation_lag_seconds (publish -> arrival, bucket upper bounds):")
        for admin in args.admin.split(","):
            count, buckets = histogram(admin)
            print("  %-21s n %5d  p50 <= %.4f s  p99 <= %.4f s" % (
                admin, count, bucket_quantile(count, buckets, 0.5), bucket_quantile(count, buckets, 0.99)))
    print("RESULT revocation_p50_ms=%.2f revocation_p99_ms=%.2f" % (quantile(every, 0.5) * 1e3, p99 * 1e3))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("port", type=int)
    m = sub.add_parser("measure")
    m.add_argument("--origin", required=True)
    m.add_argument("--followers", required=True)
    m.add_argument("--backend", required=True)
    m.add_argument("--api-key", required=True)
    m.add_argument("--count", type=int, default=200)
    m.add_argument("--admin", default="")
    args = parser.parse_args()
    if args.cmd == "backend":
        serve_backend(args.port)
    else:
        measure(args)


if __name__ == "__main__":
    main()
