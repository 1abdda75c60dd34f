#!/usr/bin/env python3
"""Memory cost of idle DERP connections on the relay server.

What is measured
----------------
The relay runs in its own process (``python -m bench relay``: ``create_app(DerpRelay(...))`` under
uvicorn with uvloop and ``DerpHttpProtocol``, as ``coordinator server`` runs it). This script opens
``--conns`` (default 5,000) raw ``Upgrade: DERP`` connections to it, each with the full handshake
(ServerKey, sealed ClientInfo, ServerInfo), ``--concurrency`` (default 200) at a time, and leaves
them idle. It reads the server process's resident set size (VmRSS from /proc/<pid>/status):

* ``fresh``: right after start-up;
* ``before``: after one connection was opened and closed again, so code paths that import or
  allocate lazily on the first connection are not charged to the idle connections;
* ``connected``: as soon as the last handshake completed;
* ``settled``: ``--settle`` seconds later (the relay frees idle connections' output buffers on its
  once-a-second tick);
* ``closed``: after every connection was closed (what the allocator gives back).

The per-connection figure is (settled - before) / conns; the issue's target is a total increase
under 20 MB for 5,000 connections. The server's own heap figures (glibc mallinfo2, CPython's
allocated blocks, GC-tracked objects) are printed beside RSS to show where the memory sits.
RLIMIT_NOFILE is raised in both processes. Kernel socket memory is not part of any RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import warnings

from bench import proc
from bench.clients import connect_raw

TARGET_MB = 20.0


async def open_idle(url: str, n: int, concurrency: int, progress) -> tuple[list, float]:
    sem = asyncio.Semaphore(concurrency)
    clients: list = []
    failures: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                client, _left = await connect_raw(url, timeout=60)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            clients.append(client)
            if len(clients) % 1000 == 0:
                progress(f"  {len(clients):,} connected")

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - start
    if failures:
        for client in clients:
            client.transport.abort()
        raise RuntimeError(f"{len(failures)} of {n} connections failed, e.g. {failures[0]}")
    return clients, elapsed


async def close_all(clients: list) -> None:
    for client in clients:
        t = client.transport
        if t is not None:
            t.close()
    await asyncio.sleep(0.2)


async def measure(server: proc.ServerProcess, args, progress) -> dict:
    loop = asyncio.get_running_loop()

    async def snapshot(label: str) -> dict:
        mem = await loop.run_in_executor(None, lambda: server.stats(path="/bench/mem"))
        stats = await loop.run_in_executor(None, server.stats)
        snap = {"label": label, "rss": server.rss(), "connections": stats.get("current_connections"), **mem}
        progress(f"  {label:9}: RSS {snap['rss'] / 2**20:8.1f} MiB, {snap['connections']} connections")
        return snap

    await asyncio.sleep(0.5)
    snaps = [await snapshot("fresh")]
    warm, _ = await open_idle(server.url, 1, 1, progress)
    await close_all(warm)
    await asyncio.sleep(1.5)  # one relay tick
    snaps.append(await snapshot("before"))
    if args.trace:
        await loop.run_in_executor(None, lambda: server.stats(path="/bench/trace?take=before"))
    clients, connect_s = await open_idle(server.url, args.conns, args.concurrency, progress)
    try:
        snaps.append(await snapshot("connected"))
        await asyncio.sleep(args.settle)
        snaps.append(await snapshot("settled"))
        top = []
        if args.trace:
            top = await loop.run_in_executor(None, lambda: server.stats(
                timeout=60, path=f"/bench/trace?diff=before&top={args.trace}"))
    finally:
        await close_all(clients)
    await asyncio.sleep(1.5)
    snaps.append(await snapshot("closed"))
    return {"connect_seconds": connect_s, "snapshots": snaps, "trace": top}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=5000, help="idle connections to open (default 5000)")
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes in progress at once (default 200)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before the settled reading (default 3)")
    ap.add_argument("--keepalive", type=float, default=60.0, help="the relay's keepalive interval, s (default 60)")
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--relay-path", metavar="DIR",
                    help="serve a modified relay: import _relay from DIR/_relay (built there with "
                         "'python setup.py build_ext --inplace') instead of the installed one")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="run the server under tracemalloc and list the N Python allocation sites that grew "
                         "most (tracing costs memory itself: RSS figures are then not the real ones)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    if args.conns < 1 or args.concurrency < 1:
        ap.error("--conns and --concurrency must be positive")
    proc.sigterm_as_interrupt()
    need = args.conns + 256
    have = proc.raise_nofile(need)
    if have < need:
        print(f"RLIMIT_NOFILE is {have}, {need} needed for {args.conns} connections", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    argv = proc.server_argv("relay", "--keepalive", str(args.keepalive))
    if args.trace:
        argv += ["--tracemalloc", "1"]
    if args.relay_path:
        argv += ["--relay-path", args.relay_path]
    try:
        with proc.ServerProcess(argv, "relay") as server:
            progress(f"relay pid {server.pid} port {server.port}; opening {args.conns:,} connections, "
                     f"{args.concurrency} at a time")
            result = proc.run(measure(server, args, progress), args.client_loop)
    except KeyboardInterrupt:
        warnings.filterwarnings("ignore", "coroutine .* was never awaited")
        print("interrupted", file=sys.stderr)
        return 130

    snaps = {s["label"]: s for s in result["snapshots"]}
    growth = snaps["settled"]["rss"] - snaps["before"]["rss"]
    growth_connected = snaps["connected"]["rss"] - snaps["before"]["rss"]
    summary = {
        "conns": args.conns,
        "connect_seconds": result["connect_seconds"],
        "handshakes_per_s": args.conns / result["connect_seconds"],
        "rss_increase_mb": growth / 1e6,
        "rss_increase_connected_mb": growth_connected / 1e6,
        "rss_per_conn_bytes": growth / args.conns,
        "target_mb": TARGET_MB,
        "target_met": growth / 1e6 < TARGET_MB,
        "retained_after_close_mb": (snaps["closed"]["rss"] - snaps["before"]["rss"]) / 1e6,
    }
    if args.json:
        json.dump({"args": vars(args), "summary": summary, "snapshots": result["snapshots"],
                   "trace": result["trace"]}, sys.stdout, indent=2)
        print()
        return 0

    def mib(v) -> str:
        return "-" if v is None else f"{v / 2**20:,.1f}"

    cols = ("state", "conns", "VmRSS MiB", "malloc in use MiB", "malloc heap MiB", "malloc mmap MiB",
            "py blocks", "gc objects")
    rows = [(s["label"], str(s["connections"]), mib(s["rss"]), mib(s.get("malloc_in_use")),
             mib(s.get("malloc_heap")), mib(s.get("malloc_mmap")), f"{s['python_blocks']:,}",
             f"{s['gc_objects']:,}") for s in result["snapshots"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    b, s = snaps["before"], snaps["settled"]
    per = lambda k: (s[k] - b[k]) / args.conns  # noqa: E731
    print()
    print(f"{args.conns:,} idle connections opened in {result['connect_seconds']:.1f} s "
          f"({summary['handshakes_per_s']:,.0f} handshakes/s, {args.concurrency} at a time)")
    print(f"RSS increase: {growth / 1e6:.1f} MB settled ({growth_connected / 1e6:.1f} MB right after connecting) "
          f"= {growth / args.conns:,.0f} bytes per connection; target < {TARGET_MB:.0f} MB: "
          f"{'MET' if summary['target_met'] else 'NOT MET'}")
    if "malloc_in_use" in s:
        print(f"per connection: malloc in use {per('malloc_in_use'):,.0f} B, CPython blocks "
              f"{per('python_blocks'):.1f}, GC objects {per('gc_objects'):.1f}")
    print(f"after closing all: {summary['retained_after_close_mb']:.1f} MB above 'before' still resident")
    if result["trace"]:
        print(f"\nPython allocations that grew most, per connection (tracemalloc, {args.conns:,} connections):")
        for t in result["trace"]:
            print(f"  {t['size_diff'] / args.conns:8,.0f} B  {t['count_diff'] / args.conns:6.2f} blocks  {t['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
