#!/usr/bin/env python3
"""The peer coordinator under load: 3 replicas on one Postgres against the same load on one replica.

What is measured
----------------
For each ``--peers`` size (default 1,000 and 10,000), peers are opened from this one process
(asyncio, one WebSocket each, ``TailnetClient``) and paired: peer 2k tunnels to peer 2k+1. With 3
replicas the two ends of every pair sit on different replicas (pair k: replicas k mod 3 and
k+1 mod 3), so every update crosses replicas through PostgreSQL; the baseline puts every peer on
one replica (the other two are not started yet), the same load in the same run. Each node is a
realistic ~200-byte object (key, disco key, home region, endpoints, addresses) plus the sequence
number and send time the benchmark reads back.

* **set-up**: seconds until every peer is connected, and until every peer has its partner's node;
* **propagation** (open loop, ``--rate`` updates/s (50) for ``--seconds``, a random peer each time):
  from ``update`` sent to the partner's ``peer_update`` read, p50/p99/max, and updates never
  delivered (the coordinator coalesces per peer, so a peer updating twice quickly may skip one);
* **sustained updates/s** (closed loop for ``--seconds``): ``--window`` (100) senders each update a
  random peer, wait until its partner has it, and go again; delivered updates per second, with
  their p50/p99 under that load;
* **redials**: connections the peers had to open again during the case (a coordinator that
  turned unhealthy or refused them sends them back with 1013) + dials that failed (the most
  common last errors are in the JSON);
* **PostgreSQL per update** (both phases together): row writes to ``tailnet_peers`` and
  ``tailnet_tunnels`` (``pg_stat_user_tables`` inserts+updates+deletes; heartbeats excluded; read
  after the statistics are flushed), WAL bytes (``pg_current_wal_lsn``), and NOTIFYs on the peer,
  tunnel and handshake channels (counted by a LISTEN connection of this script);
* **CPU** of the replica processes, of PostgreSQL (postmaster and backends) and of this process
  (the peers), as a share of one core over both phases.

Ratios are 3 replicas over 1. Goal of the issue: p99 <= 100 ms at 1,000 peers on a 2-core machine.
Figures are printed, never asserted; this process runs all the peers and competes for the same two
cores, so its CPU is shown beside the servers'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

import anyio
import psutil
from bench import proc

from coordinator.cluster.tailnet.client import TailnetClient
from coordinator.cluster.tailnet.store import HANDSHAKE_CHANNEL, PEER_CHANNEL, TUNNEL_CHANNEL
from coordinator.cluster.tailnet.view import PeerUpdate, TailnetError
from testkit.cluster import HACluster

GOAL_P99_MS = 100.0
CONNECT_BATCH = 100
ROW_STATS = ("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables "
             "WHERE relname IN ('tailnet_peers', 'tailnet_tunnels')")
STATS_SETTLE = 11.0  # idle backends flush their statistics within 10 s (PGSTAT_IDLE_INTERVAL)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _node(i: int) -> dict[str, Any]:
    return {"key": "nodekey:" + random.randbytes(32).hex(), "disco": "discokey:" + random.randbytes(32).hex(),
            "preferred_derp": 999, "endpoints": [f"192.0.2.{i % 250 + 1}:41641"],
            "addresses": [f"fd7a:115c:a1e0::{i:x}/128"], "seq": 0, "t": 0.0}


class Fleet:
    """``n`` peers in pairs (2k tunnels to 2k+1) spread over ``urls``; records what arrives."""

    def __init__(self, urls: list[str], n: int, token: str):
        self.ids = [uuid.uuid4() for _ in range(n)]
        self.index = {pid: i for i, pid in enumerate(self.ids)}
        self.nodes = [_node(i) for i in range(n)]
        self.latencies: list[float] = []
        self.delivered: set[int] = set()
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.partner_known = 0
        self.seq = 0
        self.peers = []
        for i, pid in enumerate(self.ids):
            k = i // 2
            url = urls[(k + i % 2) % len(urls)]  # pair k: replicas k and k+1 (mod the replica count)
            self.peers.append(TailnetClient(url, pid, token, node=self.nodes[i], on_update=self._on_update,
                                            ping_interval=None, connect_timeout=60, backoff_max=2.0))

    def partner(self, i: int) -> int:
        return i ^ 1

    def _on_update(self, u: PeerUpdate) -> None:
        if u.kind != "node" or u.node is None:
            return
        seq = u.node.get("seq", 0)
        if seq == 0:
            self.partner_known += 1
            return
        if seq not in self.delivered:
            self.delivered.add(seq)
            self.latencies.append(u.received - u.node["t"])
            fut = self.waiting.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def connect(self, timeout: float) -> float:
        start = time.monotonic()
        for first in range(0, len(self.peers), CONNECT_BATCH):
            batch = self.peers[first:first + CONNECT_BATCH]
            for p in batch:
                p.start()
            await asyncio.gather(*(p.wait_connected(timeout) for p in batch))
            if (first + len(batch)) % 1000 == 0:
                progress(f"  {first + len(batch)} connected after {time.monotonic() - start:.1f} s")
        return time.monotonic() - start

    async def tunnel(self, timeout: float) -> float:
        start = time.monotonic()
        for i in range(0, len(self.peers), 2):
            await self.peers[i].add_tunnel(self.ids[i + 1])
        deadline = start + timeout
        while self.partner_known < len(self.peers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.partner_known} of {len(self.peers)} peers learned their partner's "
                                   f"node within {timeout:g} s")
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def send(self, i: int) -> int:
        self.seq += 1
        await self.peers[i].update({**self.nodes[i], "seq": self.seq, "t": time.monotonic()})
        return self.seq

    async def open_loop(self, rate: float, seconds: float) -> dict[str, Any]:
        self.latencies, self.delivered = [], set()
        sent, first = 0, self.seq + 1
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) + 1
            while sent < due:
                await self.send(random.randrange(len(self.peers)))
                sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        achieved = sent / (time.monotonic() - start)
        await asyncio.sleep(2.0)  # stragglers
        lat = [x * 1000 for x in self.latencies]
        return {"sent": sent, "rate_achieved": achieved, "delivered": len(self.delivered),
                "undelivered": sum(1 for s in range(first, first + sent) if s not in self.delivered),
                "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": max(lat, default=None)}

    async def closed_loop(self, seconds: float, window: int) -> dict[str, Any]:
        """``window`` updates in flight: each of that many senders updates one of its own peers, waits until
        the partner has it (at most 5 s), and goes again; delivered updates per second is the sustained rate."""
        self.latencies, self.delivered = [], set()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + seconds
        timeouts = sent = 0

        pairs = len(self.peers) // 2
        senders = min(window, pairs)

        async def sender(j: int) -> None:
            # Sender j owns pairs j, j + senders, ...: no two updates in flight from one peer, so none is
            # coalesced away by another and waited for in vain.
            nonlocal timeouts, sent
            mine = list(range(j, pairs, senders))
            while time.monotonic() < deadline:
                fut: asyncio.Future[None] = loop.create_future()
                i = 2 * random.choice(mine) + random.randrange(2)
                self.seq += 1
                self.waiting[self.seq] = fut
                await self.peers[i].update({**self.nodes[i], "seq": self.seq, "t": time.monotonic()})
                sent += 1
                try:
                    with anyio.fail_after(5.0):
                        await fut
                except TimeoutError:
                    timeouts += 1

        start = time.monotonic()
        await asyncio.gather(*(sender(j) for j in range(senders)))
        took = time.monotonic() - start
        self.waiting.clear()
        lat = [x * 1000 for x in self.latencies]
        return {"sent": sent, "delivered": len(self.delivered), "updates_per_s": len(self.delivered) / took,
                "timeouts": timeouts, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}

    async def close(self) -> None:
        """Close every peer at once (each within its close timeout)."""
        await asyncio.gather(*(p.close() for p in self.peers), return_exceptions=True)


class Postgres:
    """Counters read from PostgreSQL: row writes, WAL position, NOTIFYs heard."""

    def __init__(self, url: str, postmaster: int | None):
        self.url, self.postmaster = url, postmaster
        self.notifies = 0
        self._listen: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import psycopg

        self._listen = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        for channel in (PEER_CHANNEL, TUNNEL_CHANNEL, HANDSHAKE_CHANNEL):
            await self._listen.execute(f"LISTEN {channel}")
        self._task = asyncio.create_task(self._count())

    async def _count(self) -> None:
        async for _ in self._listen.notifies():
            self.notifies += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._listen is not None:
            await self._listen.close()

    async def counters(self) -> dict[str, float]:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = (await (await conn.execute(ROW_STATS)).fetchone())[0]
            wal = (await (await conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).fetchone())[0]
        return {"rows": float(rows), "wal": float(wal), "notifies": float(self.notifies), "cpu": self.cpu()}

    def pids(self) -> list[int]:
        if self.postmaster is None:
            return []
        try:
            return [self.postmaster, *(c.pid for c in psutil.Process(self.postmaster).children(recursive=True))]
        except psutil.Error:
            return []

    def cpu(self) -> float:
        """CPU seconds of the postmaster, its live backends and the backends that exited (reaped)."""
        if self.postmaster is None:
            return 0.0
        try:
            t = psutil.Process(self.postmaster).cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system + t.children_user + t.children_system + cpu_of(self.pids()[1:])


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc.cpu_seconds(pid)
        except OSError:
            pass
    return total


async def run_case(name: str, urls: list[str], pids: list[int], pg: Postgres, n: int, token: str,
                   args: argparse.Namespace) -> dict[str, Any]:
    progress(f"[{name}, {n} peers] connecting")
    fleet = Fleet(urls, n, token)
    out: dict[str, Any] = {"case": name, "peers": n, "replicas": len(urls)}
    try:
        out["connect_s"] = await fleet.connect(args.timeout)
        out["tunnels_s"] = await fleet.tunnel(args.timeout)
        progress(f"[{name}, {n} peers] connected in {out['connect_s']:.1f} s, every partner's node known "
                 f"{out['tunnels_s']:.1f} s later; settling the statistics")
        await asyncio.sleep(STATS_SETTLE)
        before = await pg.counters()
        r0, c0, t0 = cpu_of(pids), proc.self_cpu_seconds(), time.monotonic()
        progress(f"[{name}, {n} peers] open loop: {args.rate:g} updates/s for {args.seconds:g} s")
        out["open"] = await fleet.open_loop(args.rate, args.seconds)
        progress(f"[{name}, {n} peers] closed loop: {args.window} updates in flight for {args.seconds:g} s")
        out["closed"] = await fleet.closed_loop(args.seconds, args.window)
        r1, c1, elapsed = cpu_of(pids), proc.self_cpu_seconds(), time.monotonic() - t0
        await asyncio.sleep(STATS_SETTLE)
        after = await pg.counters()
        updates = out["open"]["sent"] + out["closed"]["sent"]
        out["per_update"] = {k: (after[k] - before[k]) / max(updates, 1) for k in ("rows", "wal", "notifies")}
        out["cpu"] = {"replicas": (r1 - r0) / elapsed, "postgres": (after["cpu"] - before["cpu"]) / (elapsed + STATS_SETTLE),
                      "peers_process": (c1 - c0) / elapsed}
    except (RuntimeError, TimeoutError, TailnetError) as exc:  # a case that cannot finish is reported, not fatal
        out["error"] = str(exc)
        progress(f"[{name}, {n} peers] FAILED: {exc}")
    finally:
        out["reconnects"] = sum(max(0, p.connections - 1) for p in fleet.peers)
        out["failed_dials"] = sum(p.failed_dials for p in fleet.peers)
        errors = Counter(p.last_error for p in fleet.peers if p.last_error)
        out["last_errors"] = dict(errors.most_common(3))
        await fleet.close()
    return out


def read_token(pg_url: str, timeout: float = 30.0) -> str:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute("SELECT value FROM site_config WHERE key = 'tailnet_token'").fetchone()
        if row:
            return str(row[0])
        time.sleep(0.2)
    raise RuntimeError("no tailnet token appeared in site_config")


async def bench(cluster: HACluster, pg: Postgres, args: argparse.Namespace) -> list[dict[str, Any]]:
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # cancel the run: every peer is closed on the way out
        loop.add_signal_handler(sig, main_task.cancel)
    await pg.start()
    try:
        results = []
        replica = cluster.add_replica()
        token = read_token(cluster.pg_url)
        for n in args.peers:
            results.append(await run_case("1 replica", [replica.url], [replica.proc.proc.pid], pg, n, token, args))
        progress("starting two more replicas")
        await asyncio.to_thread(cluster.add_replicas, 2)
        urls = [r.url for r in cluster.replicas]
        pids = [r.proc.proc.pid for r in cluster.replicas]
        for n in args.peers:
            results.append(await run_case("3 replicas", urls, pids, pg, n, token, args))
        return results
    finally:
        await pg.stop()


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    cols = ["case", "peers", "connect s", "nodes s", "redials", "p50 ms", "p99 ms", "max ms", "undelivered", "sustained/s",
            "sat p99 ms", "rows/upd", "WAL B/upd", "NOTIFY/upd", "replicas CPU", "PG CPU", "peers CPU"]
    rows = []
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    for r in results:
        o, c, u, cpu = r["open"], r["closed"], r["per_update"], r["cpu"]
        rows.append([r["case"], str(r["peers"]), fmt(r["connect_s"]), fmt(r["tunnels_s"]),
                     f"{r['reconnects']}+{r['failed_dials']}", fmt(o["p50_ms"]), fmt(o["p99_ms"]),
                     fmt(o["max_ms"]), f"{o['undelivered']}/{o['sent']}", fmt(c["updates_per_s"], 0), fmt(c["p99_ms"]),
                     fmt(u["rows"], 2), fmt(u["wal"], 0), fmt(u["notifies"], 2), f"{cpu['replicas']:.0%}",
                     f"{cpu['postgres']:.0%}", f"{cpu['peers_process']:.0%}"])
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(cols)]
    print(f"peer coordinator: open loop {args.rate:g} updates/s for {args.seconds:g} s, then closed loop ({args.window} "
          f"updates in flight) for {args.seconds:g} s; CPU as a share of one core")
    for line in [cols, *rows]:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    for r in failed:
        print(f"  {r['case']}, {r['peers']} peers: FAILED after {r['reconnects']} reconnects: {r['error']}")
    by = {(r["case"], r["peers"]): r for r in results}
    for n in args.peers:
        one, three = by.get(("1 replica", n)), by.get(("3 replicas", n))
        if one is None or three is None:
            continue
        print(f"  {n} peers, 3 replicas / 1 replica: p50 {ratio(three['open']['p50_ms'], one['open']['p50_ms'])}, "
              f"p99 {ratio(three['open']['p99_ms'], one['open']['p99_ms'])}, sustained updates/s "
              f"{ratio(three['closed']['updates_per_s'], one['closed']['updates_per_s'])}, rows/update "
              f"{ratio(three['per_update']['rows'], one['per_update']['rows'])}, NOTIFYs/update "
              f"{ratio(three['per_update']['notifies'], one['per_update']['notifies'])}, replicas CPU "
              f"{ratio(three['cpu']['replicas'], one['cpu']['replicas'])}, Postgres CPU "
              f"{ratio(three['cpu']['postgres'], one['cpu']['postgres'])}")
        p99 = three["open"]["p99_ms"]
        if n == 1000 and p99 is not None:
            print(f"  goal p99 <= {GOAL_P99_MS:g} ms at 1,000 peers across 3 replicas: {fmt(p99)} ms, "
                  f"{'MET' if p99 <= GOAL_P99_MS else 'NOT MET'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="1000,10000", help="comma-separated peer counts, even (default 1000,10000)")
    ap.add_argument("--rate", type=float, default=50.0,
                    help="open-loop updates per second, a random peer each (default 50: at 1,000 peers each updates every 20 s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each load phase (default 10)")
    ap.add_argument("--window", type=int, default=100, help="closed loop: updates in flight (default 100)")
    ap.add_argument("--heartbeat", default="2s", help="the replicas' heartbeat (default 2s, their default)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up on any set-up step after this (s)")
    ap.add_argument("--pg-url", help="Postgres URL (default: start a throwaway server)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    try:
        args.peers = [int(x) for x in args.peers.split(",")]
    except ValueError:
        ap.error("--peers: comma-separated integers")
    if any(n < 2 or n % 2 for n in args.peers):
        ap.error("--peers: each count must be even and at least 2 (peers come in pairs)")
    nofile = proc.raise_nofile()
    if nofile < max(args.peers) + 1000:
        ap.error(f"--peers {max(args.peers)} needs more open files than RLIMIT_NOFILE allows ({nofile})")
    pg_server = None
    cluster = None
    try:
        url = args.pg_url
        if url is None:
            from testkit.pgcluster import PgCluster

            pg_server = PgCluster()
            pg_server.start()
            url = pg_server.url
        per_replica = str(max(args.peers) + 100)
        cluster = HACluster(url, heartbeat=args.heartbeat,
                            extra_args=("--tailnet-max-peers", per_replica, "--log-level", "warning"))
        pg = Postgres(url, pg_server.proc.pid if pg_server and pg_server.proc else None)
        results = asyncio.run(bench(cluster, pg, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if cluster is not None:
            cluster.close(graceful=True)
        if pg_server is not None:
            pg_server.destroy()
    if args.json:
        json.dump({"rate": args.rate, "seconds": args.seconds, "results": results}, sys.stdout, indent=2)
        print()
    else:
        report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
