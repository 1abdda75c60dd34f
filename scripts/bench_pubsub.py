#!/usr/bin/env python3
"""Throughput and latency of coordinator.cluster.pubsub against raw psycopg LISTEN/NOTIFY.

Four cases, each publishing for ``--seconds`` on its own channel from one task, all in one event
loop with the receiver:

* ``PubSub.publish``: one ``pg_notify`` per call, each awaited (commit) before the next;
* ``raw NOTIFY``: the same with a plain psycopg connection, one ``NOTIFY ch, '...'`` per statement;
* ``BatchPublisher``: ``publish`` queues, the batcher sends bursts as one statement / one commit;
* ``raw unnest``: a plain connection sending ``--batch`` messages per ``pg_notify ... unnest``
  statement, with binary parameters as BatchPublisher sends them and with psycopg's default text
  parameters (the statement as the issue wrote it).

Our cases are received through ``PubSub.subscribe`` (listener connection, per-subscriber queue and
task, handler); raw cases by a raw psycopg connection iterating ``conn.notifies()``. Each payload
carries its send time (``perf_counter_ns``, one process), so latency is publish call to handler.
Batched producers stop when ``--window`` messages are in flight so latency measures the path, not
an ever-growing backlog. Throughput is delivered messages / (first send .. last receipt).

Postgres is a throwaway ``testkit/pgcluster.py`` server unless ``--url`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path

import anyio
import psycopg

from coordinator.cluster.pubsub import BATCH_SQL, PubSub

ROOT = Path(__file__).resolve().parent.parent


class Tracker:
    """Counts receipts, records latencies, and lets a producer wait for the backlog to shrink."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.latencies: list[float] = []
        self.first_send = 0.0
        self.last_recv = 0.0
        self._waiter: tuple[int, asyncio.Event] | None = None

    def payload(self) -> str:
        if not self.sent:
            self.first_send = time.perf_counter()
        self.sent += 1
        return f"{self.sent}:{time.perf_counter_ns()}"

    def on_receive(self, payload: bytes | str) -> None:
        now = time.perf_counter_ns()
        sent_ns = int(payload.rsplit(b":" if isinstance(payload, bytes) else ":", 1)[1])
        self.latencies.append((now - sent_ns) / 1e9)
        self.received += 1
        self.last_recv = now / 1e9
        if self._waiter and self.received >= self._waiter[0]:
            self._waiter[1].set()
            self._waiter = None

    async def until_received(self, n: int, timeout: float | None = None) -> None:
        if self.received >= n:
            return
        event = asyncio.Event()
        self._waiter = (n, event)
        try:
            with anyio.fail_after(timeout):
                await event.wait()
        except TimeoutError:
            self._waiter = None

    async def throttle(self, window: int) -> None:
        if self.sent - self.received > window:
            await self.until_received(self.sent - window // 2, timeout=10)

    def result(self, name: str) -> dict:
        lat = sorted(self.latencies)
        span = max(self.last_recv - self.first_send, 1e-9)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

        return {
            "case": name,
            "sent": self.sent,
            "delivered": self.received,
            "rate": self.received / span if self.received else 0.0,
            "p50": pct(0.50),
            "p99": pct(0.99),
        }


async def raw_listener(
    url: str, channel: str, tracker: Tracker
) -> tuple[psycopg.AsyncConnection, asyncio.Task]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(f'LISTEN "{channel}"')

    async def pump() -> None:
        async for n in conn.notifies():
            tracker.on_receive(n.payload)

    return conn, asyncio.create_task(pump())


async def stop_listener(conn: psycopg.AsyncConnection, pump: asyncio.Task) -> None:
    pump.cancel()  # and let it unregister its socket from the loop before the socket is closed
    await asyncio.gather(pump, return_exceptions=True)
    await conn.close()


async def drain(tracker: Tracker, seconds: float) -> None:
    await tracker.until_received(tracker.sent, timeout=seconds)


async def case_ours_single(ps: PubSub, seconds: float) -> dict:
    tracker = Tracker()
    cancel = await ps.subscribe("bench_ours_single", tracker.on_receive)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await ps.publish("bench_ours_single", tracker.payload())
    await drain(tracker, 5)
    await cancel()
    return tracker.result("PubSub.publish (single)")


async def case_raw_single(url: str, seconds: float) -> dict:
    tracker = Tracker()
    lconn, pump = await raw_listener(url, "bench_raw_single", tracker)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            await conn.execute(f"NOTIFY bench_raw_single, '{tracker.payload()}'")
    await drain(tracker, 5)
    await stop_listener(lconn, pump)
    return tracker.result("raw NOTIFY (single)")


async def case_ours_batched(ps: PubSub, seconds: float, window: int, batch: int) -> dict:
    tracker = Tracker()
    cancel = await ps.subscribe("bench_ours_batch", tracker.on_receive)
    async with ps.batcher(max_batch=batch) as bp:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                await bp.publish("bench_ours_batch", tracker.payload())
            await tracker.throttle(window)
        await bp.flush()
    await drain(tracker, 5)
    await cancel()
    return tracker.result("BatchPublisher")


async def case_raw_batched(url: str, seconds: float, window: int, batch: int, binary: bool) -> dict:
    tracker = Tracker()
    channel = f"bench_raw_batch_{int(binary)}"
    sql = BATCH_SQL if binary else BATCH_SQL.replace("%b", "%s")
    lconn, pump = await raw_listener(url, channel, tracker)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            payloads = [tracker.payload() for _ in range(batch)]
            await conn.execute(sql, ([channel] * batch, payloads))
            await tracker.throttle(window)
    await drain(tracker, 5)
    await stop_listener(lconn, pump)
    return tracker.result(f"raw unnest, {'binary' if binary else 'text'} params")


def print_table(rows: list[dict], rounds: int) -> None:
    print(f"median of {rounds} interleaved rounds")
    print(f"{'case':<32}{'sent':>9}{'delivered':>11}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(
            f"{r['case']:<32}{r['sent']:>9}{r['delivered']:>11}{r['rate']:>10.0f}{r['p50']:>9.3f}{r['p99']:>9.3f}"
        )
    print()
    for ours, raw in ((rows[0], rows[1]), (rows[2], rows[3]), (rows[2], rows[4])):
        print(
            f"{ours['case']} / {raw['case']}: throughput x{ours['rate'] / max(raw['rate'], 1e-9):.2f},"
            f" p50 latency x{ours['p50'] / raw['p50']:.2f}, p99 latency x{ours['p99'] / raw['p99']:.2f}"
        )


def median_row(results: list[dict]) -> dict:
    row = {"case": results[0]["case"]}
    for key in ("sent", "delivered", "rate", "p50", "p99"):
        row[key] = statistics.median(r[key] for r in results)
    return row


async def run(url: str, seconds: float, window: int, batch: int, rounds: int) -> list[dict]:
    # Rounds interleave the cases, so a noisy neighbour skews all of them rather than one.
    results: list[list[dict]] = [[] for _ in range(5)]
    async with PubSub(url) as ps:
        for _ in range(rounds):
            cases = [
                case_ours_single(ps, seconds),
                case_raw_single(url, seconds),
                case_ours_batched(ps, seconds, window, batch),
                case_raw_batched(url, seconds, window, batch, binary=True),
                case_raw_batched(url, seconds, window, batch, binary=False),
            ]
            for i, case in enumerate(cases):
                results[i].append(await case)
        m = ps.metrics
        print(f"BatchPublisher sent {m['batched_messages']} messages in {m['batches']} commits")
    return [median_row(r) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="Postgres URL (default: start a throwaway server)")
    parser.add_argument("--seconds", type=float, default=2.0, help="publishing time per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--window", type=int, default=5000, help="max messages in flight (batched cases)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cluster = None
    url = args.url
    try:
        if url is None:
            from testkit.pgcluster import PgCluster

            cluster = PgCluster()
            cluster.start()
            url = cluster.url
        rows = asyncio.run(run(url, args.seconds, args.window, args.batch, args.rounds))
    finally:
        if cluster is not None:
            cluster.destroy()
    print_table(rows, args.rounds)


if __name__ == "__main__":
    main()
