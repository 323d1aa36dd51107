#!/usr/bin/env python3
"""Open N keep-alive connections to a gateway, make one request on each, then hold them idle.

Prints "READY ok=<n> failed=<n> statuses=<json>" once every connection has made its request
(or failed), then keeps the sockets open for --hold seconds (or until killed), then prints
how many the server had closed meanwhile. Loopback only; standard library only.

    python3 bench/idle_conns.py --port 18482 --count 10000 --header 'Api-Key: k' --header 'User-Token: t'
"""
import argparse
import asyncio
import collections
import json
import resource
import sys


async def one(host, port, request, sem, statuses, conns, ssl_ctx=None):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None), 10)
        except Exception as e:  # noqa: BLE001 - counted and reported
            statuses["connect-error:" + type(e).__name__] += 1
            return
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            status = lines[0].split(" ")[1]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            if headers.get("connection", "").lower() == "close":
                statuses["server-closed"] += 1
            statuses[status] += 1
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - counted and reported
            statuses["request-error:" + type(e).__name__] += 1
            writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/api/data")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=256, help="connections being opened at once")
    ap.add_argument("--hold", type=float, default=300.0, help="seconds to hold at most")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--tls-ca", default=None, help="HTTPS: CA file to verify the server (name: localhost)")
    a = ap.parse_args()
    ssl_ctx = None
    if a.tls_ca:
        import ssl
        ssl_ctx = ssl.create_default_context(cafile=a.tls_ca)
        ssl_ctx.set_alpn_protocols(["http/1.1"])
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        sys.exit("loopback addresses only")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        if min(want, hard) < want:
            sys.exit(f"RLIMIT_NOFILE hard limit {hard} is below {want}")

    req = f"GET {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n"
    for h in a.header:
        req += h + "\r\n"
    req = (req + "\r\n").encode()

    statuses = collections.Counter()
    conns = []
    sem = asyncio.Semaphore(a.parallel)
    await asyncio.gather(*(one(a.host, a.port, req, sem, statuses, conns, ssl_ctx) for _ in range(a.count)))
    ok = statuses.get("200", 0)
    print(f"READY ok={ok} failed={a.count - ok} statuses={json.dumps(dict(statuses))}", flush=True)

    await asyncio.sleep(a.hold)
    alive = sum(1 for r, _ in conns if not r.at_eof())
    print(f"CLOSING alive={alive}", flush=True)
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
