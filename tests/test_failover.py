"""Postgres failover under traffic: a real primary and streaming standby, replicas on the multi-host URL.

The primary is SIGKILLed and the standby promoted while numbered packets cross the replicas: no
replica exits, no packet is lost (the relay never needs the database), every replica is ready and
heartbeating on the new primary soon after, and each got the dropped-messages signal of its
pub/sub (its notifications may have been lost while the listener reconnected, so it resynced).
"""

from __future__ import annotations

import asyncio
import signal
import time

import psycopg
import pytest

from testkit.cluster import HACluster, full_mesh, serve
from testkit.pgcluster import PgCluster
from testkit.polling import wait_blocking, wait_until
from testkit.traffic import Traffic

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_pair():
    primary = PgCluster()
    standby = None
    try:
        primary.start()
        standby = PgCluster.standby_of(primary)
        standby.start()
        yield primary, standby
    finally:
        primary.destroy()
        if standby is not None:
            standby.destroy()


@pytest.fixture
def cluster(pg_pair, request):
    primary, standby = pg_pair
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
           "?target_session_attrs=read-write")
    yield from serve(HACluster(url, heartbeat="1s"), request)


def heartbeating(pg: PgCluster, ids: set[str], within: float = 2.0) -> bool:
    """Every replica in ``ids`` wrote its heartbeat to ``pg`` in the last ``within`` seconds."""
    try:
        with psycopg.connect(pg.url, autocommit=True, connect_timeout=2) as conn:
            rows = conn.execute("SELECT id::text FROM replicas WHERE stopped_at IS NULL "
                                "AND updated_at > now() - %s * interval '1 second'", (within,)).fetchall()
    except psycopg.Error:
        return False
    return ids <= {r[0] for r in rows}


async def test_primary_killed_and_standby_promoted_under_traffic(pg_pair, cluster):
    primary, standby = pg_pair
    replicas = cluster.add_replicas(3)
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    ids = {r.status()["replica_id"] for r in replicas}
    # Pair i: a client on replica i % 3 sends to one on the next replica, so every packet crosses the mesh.
    traffic = Traffic(12, lambda k: replicas[(k // 2 + k % 2) % 3].url + "/derp")
    try:
        await traffic.start()
        await traffic.routed()
        traffic.run()
        await asyncio.sleep(1)
        wait_blocking(lambda: standby.caught_up(primary), 30, "the standby to replay the primary's WAL")
        primary.kill(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.sleep(2)  # the time a failover takes to decide; packets keep flowing meanwhile
        standby.promote()
        promoted = time.monotonic()
        await wait_until(lambda: all(r.ready() for r in replicas) and heartbeating(standby, ids), 60,
                         "every replica ready and heartbeating on the new primary", interval=0.1)
        recovered = time.monotonic() - promoted
        await asyncio.sleep(1)
        until = await traffic.stop()
    finally:
        await traffic.close()
    sent = sum(len(f.sent) for f in traffic.flows)
    lost = sum(len(f.lost(until)) for f in traffic.flows)
    print(f"\nPostgres failover (primary SIGKILLed, standby promoted {promoted - killed:.1f} s later): "
          f"{lost} of {sent} cross-replica packets lost (target 0); every replica ready and heartbeating on the new "
          f"primary {recovered:.1f} s after the promotion (target <= 10 s); longest gap of any pair "
          f"{max(f.longest_gap() for f in traffic.flows) * 1000:.0f} ms")
    assert [r for r in replicas if not r.running] == []
    assert lost == 0
    assert sum(e.reconnects for e in traffic.endpoints) == 0
    assert full_mesh(replicas)
    for r in replicas:
        assert "replica notifications may have been lost" in r.proc.output, f"replica {r.index}: no dropped-messages signal"
