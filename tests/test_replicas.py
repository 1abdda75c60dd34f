"""Replica registry against a real PostgreSQL and the LISTEN/NOTIFY pubsub (Coder's replicasync scenarios)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import AsyncExitStack
from pathlib import Path
from uuid import UUID, uuid4

import anyio
import psycopg
import pytest

from coordinator.cluster.db import Database
from coordinator.cluster.pubsub import PubSub
from coordinator.cluster.registry import CHANNEL, ReplicaInfo, ReplicaRegistry
from testkit.polling import wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
HB = 0.3  # heartbeat used by most tests


class Changes:
    """An on_change callback that records every peer list it is given."""

    def __init__(self):
        self.calls: list[list[ReplicaInfo]] = []

    def __call__(self, peers: list[ReplicaInfo]) -> None:
        self.calls.append(peers)

    @property
    def last_ids(self) -> set[UUID]:
        return {p.id for p in self.calls[-1]} if self.calls else set()


@pytest.fixture
async def db(pg_url):
    database = await Database.open(pg_url)
    yield database
    await database.close()


@pytest.fixture
async def ps(pg_url):
    async with PubSub(pg_url) as pubsub:
        yield pubsub


def registry(db, ps, **kw) -> ReplicaRegistry:
    kw.setdefault("heartbeat", HB)
    return ReplicaRegistry(db, ps, **kw)


def fetch(url: str, sql: str, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(url: str, sql: str, *params) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql, params)


async def test_start_inserts_row_and_announces_it(db, ps, pg_url):
    heard: list[bytes] = []
    cancel = await ps.subscribe(CHANNEL, heard.append)
    changes = Changes()
    async with registry(db, ps, hostname="host-a", region_id=7, relay_url="http://10.0.0.1:8080",
                        version="1.2.3", on_change=changes) as reg:
        await wait_until(lambda: str(reg.id).encode() in heard, 5, "the start notification")
        (row,) = fetch(pg_url, "SELECT hostname, region_id, relay_url, version, database_latency, error,"
                               " heartbeat_ms, stopped_at, created_at = started_at FROM replicas WHERE id = %s", reg.id)
        assert row == ("host-a", 7, "http://10.0.0.1:8080", "1.2.3", row[4], "", 300, None, True)
        assert row[4] > 0  # database latency in µs
        assert reg.healthy and reg.last_error is None
        assert reg.self_row.id == reg.id and reg.self_row.alive
        assert abs(reg.clock_skew) < 1.0  # same host, same clock
        assert changes.calls == [[]]  # told once, at start: no peers yet
        print(f"\ndatabase latency {row[4]} µs, clock skew {reg.clock_skew * 1e3:+.2f} ms")
    await cancel()


async def test_twenty_registries_see_each_other(db, ps):
    changes = [Changes() for _ in range(20)]
    regs = [registry(db, ps, relay_url=f"http://10.0.0.{i}:8080", on_change=changes[i]) for i in range(20)]
    async with anyio.create_task_group() as tg:
        try:
            t0 = time.monotonic()
            async with anyio.create_task_group() as starting:
                for reg in regs:
                    starting.start_soon(reg.start, tg)
            await wait_until(lambda: all(len(r.peers()) == 19 for r in regs), 10, "20 replicas to see 19 peers each")
            print(f"\n20 replicas converged in {time.monotonic() - t0:.2f} s")
            ids = {r.id for r in regs}
            for reg, change in zip(regs, changes, strict=True):
                assert {p.id for p in reg.peers()} == ids - {reg.id}
                assert change.last_ids == ids - {reg.id}
                assert reg.self_row is not None and reg.self_row.id == reg.id
                assert len(reg.regional_peers()) == 19
                assert {r.id for r in reg.all_replicas() if r.alive} == ids
        finally:
            for reg in regs:
                await reg.stop()


class AsyncChanges(Changes):
    async def __call__(self, peers: list[ReplicaInfo]) -> None:
        await anyio.sleep(0)
        self.calls.append(peers)


async def test_graceful_stop_is_seen_at_once(db, ps, pg_url):
    # A long heartbeat, so only the notification can explain a fast drop.
    changes = AsyncChanges()
    async with registry(db, ps, heartbeat=2.0, on_change=changes) as a, registry(db, ps, heartbeat=2.0) as b:
        await wait_until(lambda: changes.last_ids == {b.id}, 5, "A to see B")
        t0 = time.monotonic()
        assert await b.stop()
        await wait_until(lambda: changes.last_ids == set(), 2, "A to drop B")
        elapsed = time.monotonic() - t0
        print(f"\ngraceful stop seen by the peer {elapsed * 1e3:.0f} ms after stop() was called")
        assert elapsed < 0.5
        (row,) = fetch(pg_url, "SELECT stopped_at IS NOT NULL, database_latency FROM replicas WHERE id = %s", b.id)
        assert row == (True, 0)
        assert [r.alive for r in a.all_replicas() if r.id == b.id] == [False]
        assert await b.stop()  # idempotent


CHILD = textwrap.dedent(
    """
    import sys, anyio
    from coordinator.cluster.db import Database
    from coordinator.cluster.pubsub import PubSub
    from coordinator.cluster.registry import ReplicaRegistry

    async def main(url, heartbeat):
        db = await Database.open(url)
        async with PubSub(url) as ps:
            reg = ReplicaRegistry(db, ps, heartbeat=heartbeat, hostname="child")
            async with anyio.create_task_group() as tg:
                await reg.start(tg)
                print(reg.id, flush=True)
                await anyio.sleep_forever()

    anyio.run(main, sys.argv[1], float(sys.argv[2]))
    """
)


async def test_killed_replica_is_dropped_within_three_heartbeats(db, ps, pg_url):
    changes = Changes()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, pg_url, str(HB)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
    )
    try:
        async with registry(db, ps, on_change=changes):
            with anyio.fail_after(30):
                line = await anyio.to_thread.run_sync(proc.stdout.readline)
            child_id = UUID(line.strip())
            await wait_until(lambda: child_id in changes.last_ids, 5, "the child replica to be seen")
            await anyio.sleep(HB * 1.5)  # somewhere between two of its heartbeats
            proc.send_signal(signal.SIGKILL)
            elapsed = await wait_until(lambda: child_id not in changes.last_ids, 10, "the killed replica to drop")
            print(f"\nSIGKILLed replica dropped after {elapsed:.2f} s (heartbeat {HB} s, bound {3 * HB:.1f} s)")
            assert elapsed <= 3 * HB + 0.3
            (row,) = fetch(pg_url, "SELECT stopped_at FROM replicas WHERE id = %s", child_id)
            assert row == (None,)  # it never said goodbye; time alone killed it
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


async def test_deleted_row_is_reinserted(db, ps, pg_url, caplog):
    caplog.set_level(logging.WARNING, logger="coordinator.replicas")
    async with registry(db, ps, heartbeat=0.2) as reg:
        (before,) = fetch(pg_url, "SELECT created_at, started_at FROM replicas WHERE id = %s", reg.id)
        execute(pg_url, "DELETE FROM replicas WHERE id = %s", reg.id)
        elapsed = await wait_until(
            lambda: fetch(pg_url, "SELECT 1 FROM replicas WHERE id = %s", reg.id) != [], 3, "the row to return"
        )
        print(f"\nrow re-inserted after {elapsed:.2f} s")
        # The row is visible as soon as it commits; the registry logs a moment later.
        await wait_until(lambda: "re-inserted" in caplog.text, 2, "the re-insert to be logged")
        (after,) = fetch(pg_url, "SELECT created_at, started_at FROM replicas WHERE id = %s", reg.id)
        assert after == before  # same replica, same start time
        assert reg.healthy


async def test_malformed_notifications_are_ignored(db, ps, pg_url, caplog):
    caplog.set_level(logging.WARNING, logger="coordinator.replicas")
    changes = Changes()
    async with registry(db, ps, heartbeat=5.0, on_change=changes) as a:
        for payload in ("not-a-uuid", "", "'; DROP TABLE replicas; --", "\u00e9" * 40, str(uuid4())):
            await ps.publish(CHANNEL, payload)
        execute(pg_url, "SELECT pg_notify('replica', 'from a foreign publisher')")
        await wait_until(lambda: "malformed" in caplog.text, 5, "the malformed payloads to be logged")
        assert a.healthy and changes.calls == [[]]
        # The pipeline still works: a new replica is seen through its notification, well before a heartbeat.
        async with registry(db, ps, heartbeat=5.0) as b:
            await wait_until(lambda: changes.last_ids == {b.id}, 2, "A to see B after the garbage")
    assert fetch(pg_url, "SELECT count(*) FROM replicas") == [(2,)]


async def test_failing_callback_does_not_stop_the_registry(db, ps, caplog):
    calls = []

    def broken(peers):
        calls.append(len(peers))
        raise RuntimeError("mesh exploded")

    async with registry(db, ps, on_change=broken) as a, registry(db, ps) as b:
        await wait_until(lambda: calls[-1:] == [1], 3, "the callback to be called with B")
        await b.stop()
        await wait_until(lambda: calls[-1:] == [0], 3, "the callback to be called without B")
        assert a.healthy and "on_change callback failed" in caplog.text


async def test_foreign_rows_and_coalesced_notifications(db, ps, pg_url):
    changes = Changes()
    async with registry(db, ps, heartbeat=5.0, region_id=1, on_change=changes) as reg:
        other = uuid4()
        # A row written by someone else: another region, no relay URL, its own 60 s heartbeat,
        # last seen 10 s ago, so it is alive by its own promise though stale by ours.
        execute(pg_url, "INSERT INTO replicas (id, hostname, region_id, heartbeat_ms, updated_at)"
                        " VALUES (%s, 'foreign', 2, 60000, now() - interval '10 seconds')", other)
        for _ in range(5):
            await ps.publish(CHANNEL, str(other))
        await wait_until(lambda: changes.last_ids == {other}, 2, "the foreign row to be seen")
        assert [p.hostname for p in reg.peers()] == ["foreign"]
        assert reg.regional_peers() == []
        await anyio.sleep(0.3)
        assert len(changes.calls) == 2  # [] at start, then one change however many kicks


async def test_dead_rows_are_cleaned_up_but_live_ones_kept(db, ps, pg_url):
    dead = uuid4()
    execute(pg_url, "INSERT INTO replicas (id, hostname, region_id, heartbeat_ms, updated_at)"
                    " VALUES (%s, 'old', 999, 1000, now() - interval '1 hour')", dead)
    async with registry(db, ps, heartbeat=0.2, cleanup_after=0.5) as a:
        assert [r.alive for r in a.all_replicas() if r.id == dead] == [False]  # listed for operators, not a peer
        assert a.peers() == []
        async with registry(db, ps, heartbeat=0.2, cleanup_after=0.5) as b:
            await wait_until(lambda: fetch(pg_url, "SELECT 1 FROM replicas WHERE id = %s", dead) == [], 5,
                             "the dead row to be deleted")
            await anyio.sleep(1.0)
            assert {p.id for p in a.peers()} == {b.id}
            ids = {r[0] for r in fetch(pg_url, "SELECT id FROM replicas")}
            assert ids == {a.id, b.id}


async def test_set_error_is_written_and_published(db, ps, pg_url):
    async with registry(db, ps, heartbeat=0.2) as a, registry(db, ps, heartbeat=5.0) as b:
        await wait_until(lambda: [p.id for p in b.peers()] == [a.id], 3, "B to see A")
        a.set_error("Failed to dial peers: ping sibling replica x (http://10.9.9.9): timeout")

        def error_seen_by_b():
            return [r.error for r in b.all_replicas() if r.id == a.id] == [
                "Failed to dial peers: ping sibling replica x (http://10.9.9.9): timeout"
            ]

        # B's own heartbeat is 5 s: only A's notification can make B re-read this quickly.
        await wait_until(error_seen_by_b, 2, "B to see A's error")
        a.set_error(None)
        await wait_until(lambda: fetch(pg_url, "SELECT error FROM replicas WHERE id = %s", a.id) == [("",)], 2,
                         "the error to clear")


async def test_schema_recreated_if_the_database_is_replaced(db, ps, pg_url, caplog):
    async with registry(db, ps, heartbeat=0.2) as a:
        execute(pg_url, "DROP TABLE replicas, site_config, schema_migrations")
        await wait_until(lambda: fetch(pg_url, "SELECT to_regclass('replicas') IS NOT NULL")[0][0], 5,
                         "the schema to be re-created")
        await wait_until(lambda: a.healthy and fetch(pg_url, "SELECT id FROM replicas") == [(a.id,)], 5,
                         "the row to be re-inserted")
        await wait_until(lambda: "re-applied migrations" in caplog.text, 2, "the re-applied migrations to be logged")



async def test_postgres_crash_and_restart(own_cluster, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.replicas")
    url = own_cluster.url
    n, hb = 3, 0.2
    changes = [Changes() for _ in range(n)]
    async with AsyncExitStack() as stack:
        regs = []
        for i in range(n):
            database = await Database.open(url)
            stack.push_async_callback(database.close)
            pubsub = await stack.enter_async_context(PubSub(url))
            reg = ReplicaRegistry(database, pubsub, heartbeat=hb, hostname=f"r{i}", on_change=changes[i])
            await stack.enter_async_context(reg)
            regs.append(reg)
        await wait_until(lambda: all(len(r.peers()) == n - 1 for r in regs), 5, "the replicas to converge")
        converged = [len(c.calls) for c in changes]

        # The test server runs with synchronous_commit=off: flush, or the crash may take the schema with it.
        execute(url, "CHECKPOINT")
        own_cluster.kill()
        t0 = time.monotonic()
        elapsed = await wait_until(lambda: not any(r.healthy for r in regs), 15, "every replica to report unhealthy")
        print(f"\nunhealthy {elapsed:.2f} s after the crash; last_error: {regs[0].last_error}")
        assert all("refused" in r.last_error for r in regs)  # the cause, not just "timed out"
        await anyio.sleep(1.0)  # long enough for every row to look stale
        assert all(len(r.peers()) == n - 1 for r in regs)  # last known peers are kept

        own_cluster.start()
        t1 = time.monotonic()
        elapsed = await wait_until(
            lambda: all(r.healthy and len(r.peers()) == n - 1 for r in regs), 30, "recovery and resync"
        )
        print(f"recovered {elapsed:.2f} s after the restart (outage {t1 - t0:.1f} s)")
        await anyio.sleep(4 * hb)
        for change, since in zip(changes, converged, strict=True):
            assert all(len(peers) == n - 1 for peers in change.calls[since:]), "peers flapped during the outage"
        # The pubsub listener reconnects on its own backoff, possibly after the heartbeats recovered.
        await wait_until(lambda: "may have been lost" in caplog.text, 15, "the pubsub reconnect to make registries resync")
        failures = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
        assert len(failures) == n  # one warning per replica per outage, not one per retry
        assert all(r.healthy for r in regs)
    rows = fetch(url, "SELECT id, stopped_at IS NOT NULL FROM replicas")
    assert {r[0] for r in rows} == {reg.id for reg in regs} and all(r[1] for r in rows)  # all left gracefully


async def test_stop_during_an_outage_is_prompt(own_cluster):
    async with await Database.open(own_cluster.url) as database, PubSub(own_cluster.url) as pubsub:
        reg = ReplicaRegistry(database, pubsub, heartbeat=0.2)
        async with anyio.create_task_group() as tg:
            await reg.start(tg)
            try:
                own_cluster.kill()
                await wait_until(lambda: not reg.healthy, 15, "the registry to notice")
            finally:
                t0 = time.monotonic()
                await reg.stop()
        elapsed = time.monotonic() - t0
        print(f"\nstop() with the database down took {elapsed:.2f} s")
        assert elapsed < 10
