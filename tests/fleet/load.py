#!/usr/bin/env python3
"""Load client of the fleet test (tests/fleet/run): counts every connection's result.

Short connections: connect from one of --sources (round robin), send a line at once (so that
it travels with, or right behind, the balancer's PROXY header), read the service's first line
(`host=h1 addr=A port=P proxy=B proxy_port=Q local=L local_port=M`), then the echo of ours,
half-close, and expect a clean end of stream. Long sessions (--long K): opened one after another before the short load
starts (so a round-robin balancer spreads them over the hosts), each echoes `ping N` every
--ping seconds until the short load ends, then half-closes and expects a clean end.

One JSON line per connection goes to --out: kind, src, sport (the client's own address and
port), t0/t1 (wall clock, comparable with `date +%s.%N`), ok, err (why it failed), the
service's fields, and for long sessions the number of pings echoed. A summary goes to stderr.
Exit status: 0 whatever the results (the caller judges them), 2 on bad usage.
"""

import argparse
import asyncio
import json
import os
import sys
import time


def parse_line(line):
    fields = {}
    for word in line.decode("ascii", "replace").split():
        key, _, value = word.partition("=")
        fields[key] = value
    return fields


def failure(exc):
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof before a line"
    return type(exc).__name__ + ": " + str(exc)


async def open_conn(args, src):
    return await asyncio.wait_for(
        asyncio.open_connection(args.host, args.port, local_addr=(src, 0)), args.timeout
    )


async def finish(reader, writer, args, rec):
    """Half-close, then expect the end of stream with nothing more in it."""
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), args.timeout)
    if rest:
        raise ValueError("unexpected data after the line: %r" % rest[:80])


async def short_conn(args, src):
    rec = {"kind": "short", "src": src, "t0": time.time(), "ok": False}
    writer = None
    try:
        reader, writer = await open_conn(args, src)
        rec["sport"] = writer.get_extra_info("sockname")[1]
        msg = b"hello %d\n" % rec["sport"]
        writer.write(msg)
        line = await asyncio.wait_for(reader.readuntil(b"\n"), args.timeout)
        rec.update(parse_line(line))
        echo = await asyncio.wait_for(reader.readuntil(b"\n"), args.timeout)
        if echo != msg:
            raise ValueError("echo %r for %r" % (echo[:80], msg))
        await finish(reader, writer, args, rec)
        rec["ok"] = True
    except Exception as exc:  # every outcome is a result, none is lost
        rec["err"] = failure(exc)
    finally:
        if writer is not None:
            writer.close()
    rec["t1"] = time.time()
    return rec


async def long_open(args, src):
    rec = {"kind": "long", "src": src, "t0": time.time(), "ok": False, "pings": 0}
    try:
        reader, writer = await open_conn(args, src)
        rec["sport"] = writer.get_extra_info("sockname")[1]
        line = await asyncio.wait_for(reader.readuntil(b"\n"), args.timeout)
        rec.update(parse_line(line))
        return rec, reader, writer
    except Exception as exc:
        rec["err"] = failure(exc)
        rec["t1"] = time.time()
        return rec, None, None


async def long_run(args, rec, reader, writer, stop):
    try:
        n = 0
        while True:
            n += 1
            msg = b"ping %d\n" % n
            writer.write(msg)
            await writer.drain()
            echo = await asyncio.wait_for(reader.readuntil(b"\n"), args.timeout)
            if echo != msg:
                raise ValueError("echo %r for %r" % (echo[:80], msg))
            rec["pings"] = n
            try:
                await asyncio.wait_for(stop.wait(), args.ping)
                break
            except asyncio.TimeoutError:
                pass
        await finish(reader, writer, args, rec)
        rec["ok"] = True
    except Exception as exc:
        rec["err"] = failure(exc)
    finally:
        writer.close()
    rec["t1"] = time.time()
    return rec


async def main(args):
    sources = args.sources.split(",")
    out = open(args.out, "w")
    results = []

    def record(rec):
        results.append(rec)
        out.write(json.dumps(rec) + "\n")

    stop = asyncio.Event()
    longs = []
    for i in range(args.long):
        rec, reader, writer = await long_open(args, sources[i % len(sources)])
        if reader is None:
            record(rec)
        else:
            longs.append(asyncio.create_task(long_run(args, rec, reader, writer, stop)))
    if args.ready:
        open(args.ready, "w").close()

    deadline = time.monotonic() + args.duration if args.duration else None
    started = 0

    def more():
        nonlocal started
        if args.count is not None and started >= args.count:
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if args.stop_file and os.path.exists(args.stop_file):
            return False
        started += 1
        return True

    async def worker(w):
        i = w
        while more():
            record(await short_conn(args, sources[i % len(sources)]))
            i += args.concurrency

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    stop.set()
    for rec in await asyncio.gather(*longs):
        record(rec)
    out.close()
    bad = [r for r in results if not r["ok"]]
    print(
        "load: %d connections (%d long), %d failed" % (len(results), args.long, len(bad)),
        file=sys.stderr,
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="HOST:PORT of the balancer (an IP address: no lookups)")
    p.add_argument("--sources", required=True, help="comma-separated client addresses to bind")
    p.add_argument("--out", required=True, help="JSON lines, one per connection")
    p.add_argument("--count", type=int, help="short connections in all")
    p.add_argument("--duration", type=float, help="or: seconds of short connections")
    p.add_argument("--stop-file", help="or: stop starting connections once this file exists")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--long", type=int, default=0, help="long sessions held across the load")
    p.add_argument("--ping", type=float, default=0.2, help="seconds between a long session's pings")
    p.add_argument("--ready", help="file created once the long sessions are open")
    p.add_argument("--timeout", type=float, default=10.0, help="per step of a connection")
    args = p.parse_args()
    if args.count is None and args.duration is None and args.stop_file is None:
        p.error("one of --count, --duration, --stop-file")
    host, _, port = args.target.rpartition(":")
    args.host, args.port = host, int(port)
    asyncio.run(main(args))
