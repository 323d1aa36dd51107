#!/usr/bin/env python3
"""Open N keep-alive connections to a gateway, make one request on each, then hold them idle.

Prints "READY ok=<n> failed=<n> statuses=<json>" once every connection has made its request
(or failed), then keeps the sockets open for --hold seconds (or until killed), then prints
how many the server had closed meanwhile. Loopback only; standard library only.

HTTP/1.1 (plain, or HTTPS with --tls-ca), or HTTP/2 over TLS with --h2 (a minimal client
written here: the preface, one GET on stream 1, then SETTINGS and PING acknowledged while
the connection idles).

    python3 bench/idle_conns.py --port 18482 --count 10000 --header 'Api-Key: k' --header 'User-Token: t'
    python3 bench/idle_conns.py --port 18483 --tls-ca ca.crt --h2 --header 'Api-Key: k'
"""
import argparse
import asyncio
import collections
import json
import resource
import struct
import sys

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HPACK static table entries for :status (RFC 7541, Appendix A)
H2_STATUS = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}


def hpack_int(value, prefix_bits, first):
    """An HPACK integer with an N-bit prefix, `first` holding the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_str(text):
    raw = text.encode("latin-1")
    return hpack_int(len(raw), 7, 0) + raw


def h2_request(host, port, path, headers):
    """HEADERS for GET path (END_STREAM | END_HEADERS, stream 1), literals without indexing."""
    block = b"\x82\x87"  # :method GET, :scheme https
    block += hpack_int(4, 4, 0) + hpack_str(path)  # :path (name from the static table)
    block += hpack_int(1, 4, 0) + hpack_str(f"{host}:{port}")  # :authority
    for h in headers:
        name, value = h.split(":", 1)
        block += b"\x00" + hpack_str(name.strip().lower()) + hpack_str(value.strip())
    return h2_frame(1, 0x5, 1, block)


def h2_frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


async def h2_read_frame(reader):
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    kind, flags = head[3], head[4]
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return kind, flags, stream, await reader.readexactly(length)


async def h2_answer(reader, writer, frame):
    """Acknowledges SETTINGS and PING; returns False on GOAWAY."""
    kind, flags, _, payload = frame
    if kind == 0x4 and not flags & 0x1:
        writer.write(h2_frame(0x4, 0x1, 0))
    elif kind == 0x6 and not flags & 0x1:
        writer.write(h2_frame(0x6, 0x1, 0, payload))
    elif kind == 0x7:
        return False
    return True


def h2_status(payload):
    if payload and payload[0] & 0x80:
        return H2_STATUS.get(payload[0] & 0x7F, "h2-indexed-%d" % (payload[0] & 0x7F))
    if len(payload) > 2 and payload[0] & 0x0F == 8 and not payload[1] & 0x80:
        return payload[2:2 + payload[1]].decode("latin-1")
    return "h2-unparsed-status"


async def h2_exchange(reader, writer, request):
    """One GET on stream 1: its status once the stream ended."""
    writer.write(H2_PREFACE + h2_frame(0x4, 0, 0) + request)
    status = None
    while True:
        frame = await h2_read_frame(reader)
        kind, flags, stream, payload = frame
        if not await h2_answer(reader, writer, frame):
            return "h2-goaway"
        if stream == 1 and kind == 0x3:
            return "h2-reset"
        if stream == 1 and kind == 0x1 and status is None:
            status = h2_status(payload)
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return status or "h2-no-status"


async def h2_idle(reader, writer):
    """While idle: keeps acknowledging the server's SETTINGS and PINGs."""
    try:
        while await h2_answer(reader, writer, await h2_read_frame(reader)):
            pass
    except Exception:  # noqa: BLE001 - the server closed; counted at the end
        pass


async def one(host, port, request, sem, statuses, conns, ssl_ctx=None, h2=False):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None), 10)
        except Exception as e:  # noqa: BLE001 - counted and reported
            statuses["connect-error:" + type(e).__name__] += 1
            return
        try:
            if h2:
                status = await asyncio.wait_for(h2_exchange(reader, writer, request), 10)
                statuses[status] += 1
                conns.append((reader, writer, asyncio.ensure_future(h2_idle(reader, writer))))
                return
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
            conns.append((reader, writer, None))
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
    ap.add_argument("--h2", action="store_true", help="HTTP/2 over TLS (needs --tls-ca)")
    a = ap.parse_args()
    ssl_ctx = None
    if a.h2 and not a.tls_ca:
        sys.exit("--h2 needs --tls-ca")
    if a.tls_ca:
        import ssl
        ssl_ctx = ssl.create_default_context(cafile=a.tls_ca)
        ssl_ctx.set_alpn_protocols(["h2"] if a.h2 else ["http/1.1"])
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
    if a.h2:
        req = h2_request(a.host, a.port, a.path, a.header)

    statuses = collections.Counter()
    conns = []
    sem = asyncio.Semaphore(a.parallel)
    await asyncio.gather(*(one(a.host, a.port, req, sem, statuses, conns, ssl_ctx, a.h2) for _ in range(a.count)))
    ok = statuses.get("200", 0)
    print(f"READY ok={ok} failed={a.count - ok} statuses={json.dumps(dict(statuses))}", flush=True)

    await asyncio.sleep(a.hold)
    alive = sum(1 for r, _, _ in conns if not r.at_eof())
    print(f"CLOSING alive={alive}", flush=True)
    for _, w, idle in conns:
        if idle is not None:
            idle.cancel()
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
