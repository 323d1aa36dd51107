#!/usr/bin/env python3
"""Legitimate-client latency while a slowloris attack runs.

Opens --attackers connections that each send a request head one byte every
--drip seconds and never finish it (reconnecting when the server drops them),
and meanwhile a legitimate client sends one GET at a time, each on a fresh
connection, for --duration seconds. Prints the client's p50/p99/max latency
and how many attack connections the server dropped. Loopback only; standard
library only.

    python3 bench/slowloris_p99.py --port 18480 --path /api/ping --header 'Api-Key: k'
"""
import argparse
import asyncio
import random
import resource
import sys
import time


def quantile(samples, q):
    s = sorted(samples)
    if not s:
        return 0.0
    return s[min(len(s) - 1, round((len(s) - 1) * q))]


async def attacker(host, port, drip, stop, stats):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n"
    filler = b"X-Slow: " + b"a" * 20 + b"\r\n"
    await asyncio.sleep(random.random() * drip)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except Exception:  # noqa: BLE001 - counted, retried
            stats["connect_errors"] += 1
            await asyncio.sleep(0.2)
            continue
        stats["opened"] += 1
        stats["open"] += 1
        try:
            writer.write(head)
            await writer.drain()
            i = 0
            while not stop.is_set():
                await asyncio.sleep(drip)
                if reader.at_eof():
                    break
                writer.write(filler[i % len(filler):][:1])
                await writer.drain()
                i += 1
                # A closed peer shows up as EOF (or an error on write).
                try:
                    data = await asyncio.wait_for(reader.read(1024), 0.001)
                    if not data:
                        break
                except asyncio.TimeoutError:
                    pass
            if not stop.is_set():
                stats["dropped_by_server"] += 1
        except (ConnectionError, OSError):
            stats["dropped_by_server"] += 1
        finally:
            stats["open"] -= 1
            writer.close()


async def client(host, port, path, headers, duration, latencies, failures):
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode()
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/") else b"?"
            if status != b"200":
                failures.append(status.decode("latin-1"))
        except Exception as e:  # noqa: BLE001 - counted
            failures.append(type(e).__name__)
        latencies.append(time.monotonic() - t)
        await asyncio.sleep(0.02)


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--attackers", type=int, default=500)
    p.add_argument("--drip", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    a = p.parse_args()
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < a.attackers + 100:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.attackers + 1000), hard))
        except (ValueError, OSError):
            sys.exit(f"open-file limit {soft} too low for {a.attackers} attackers")
    headers = "".join(h + "\r\n" for h in a.header)

    base_lat, base_fail = [], []
    await client(a.host, a.port, a.path, headers, 2.0, base_lat, base_fail)

    stop = asyncio.Event()
    stats = {"opened": 0, "open": 0, "dropped_by_server": 0, "connect_errors": 0}
    tasks = [asyncio.create_task(attacker(a.host, a.port, a.drip, stop, stats)) for _ in range(a.attackers)]
    await asyncio.sleep(a.warmup)
    open_at_start = stats["open"]
    lat, fail = [], []
    await client(a.host, a.port, a.path, headers, a.duration, lat, fail)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"baseline: {len(base_lat)} requests, {len(base_fail)} failed, p50 {ms(quantile(base_lat, 0.5))}, p99 {ms(quantile(base_lat, 0.99))}")
    print(
        f"under slowloris ({a.attackers} connections, 1 byte every {a.drip:g} s, {open_at_start} open when measuring started): "
        f"{len(lat)} requests, {len(fail)} failed, p50 {ms(quantile(lat, 0.5))}, p99 {ms(quantile(lat, 0.99))}, max {ms(max(lat) if lat else 0)}"
    )
    print(
        f"attack connections: {stats['opened']} opened, {stats['dropped_by_server']} dropped by the server, "
        f"{stats['connect_errors']} connect errors"
    )
    if fail:
        print(f"failures: {sorted(set(fail))}")
    print(f"P99_MS={quantile(lat, 0.99) * 1000:.1f} FAILED={len(fail)}")


if __name__ == "__main__":
    asyncio.run(main())
