"""The peer coordinator when PostgreSQL or the pub/sub fails: unhealthy coordinators send their peers
away and take them back once beats work again; a pub/sub gap is repaired by a resync."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
import websockets

from testkit.cluster import HACluster, serve
from testkit.polling import wait_for
from testkit.tailnetfix import RawPeer, joined, peers, tailnet_token

HEARTBEAT = 0.5

pytestmark = pytest.mark.anyio


@pytest.fixture
def two_own(own_cluster, request):
    def setup(c: HACluster) -> None:
        c.add_replicas(2)

    yield from serve(HACluster(own_cluster.url, heartbeat=f"{HEARTBEAT * 1000:g}ms"), request, setup=setup)


@pytest.fixture
def two(pg_url, request):
    def setup(c: HACluster) -> None:
        c.add_replicas(2)

    yield from serve(HACluster(pg_url, heartbeat=f"{HEARTBEAT * 1000:g}ms"), request, setup=setup)


async def connect_when_accepted(peer: RawPeer, url: str, timeout: float = 30.0) -> None:
    """Reconnect until the coordinator keeps the connection (it refuses with 1013 while unhealthy)."""

    async def attempt() -> bool:
        try:
            await peer.connect(url)
        except (OSError, websockets.InvalidHandshake, TimeoutError):
            return False
        await asyncio.sleep(0.2)
        if peer.close_code is None:
            return True
        await peer.close()
        return False

    await wait_for(attempt, timeout, f"{url} to accept {peer.id} again", interval=0.3)


async def test_pgcoordinator_unhealthy(two_own, own_cluster):
    """Postgres stopped: peers get 'coordinator unhealthy' and 1013, new ones are refused, the health
    report says ETAILNET01; once Postgres is back they reconnect and see each other again."""
    r0, r1 = two_own.replicas
    token = tailnet_token(own_cluster.url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=1)
        stopped = time.monotonic()
        own_cluster.stop()
        assert await a.wait_closed(timeout=15) == 1013
        assert await b.wait_closed(timeout=15) == 1013
        print(f"Postgres stopped -> peers sent away after {time.monotonic() - stopped:.2f} s")
        assert "unhealthy" in a.errors[-1] and "unhealthy" in b.errors[-1]
        health = r0.api("/api/v2/debug/health")
        assert not health["tailnet"]["healthy"]
        assert "ETAILNET01" in [f["code"] for f in health["findings"]]
        late = await RawPeer(r0.url, token).connect()
        async with peers(late):
            assert await late.wait_closed() == 1013 and "unhealthy" in late.errors[0]
        own_cluster.start()
        await connect_when_accepted(a, r1.url)
        await connect_when_accepted(b, r0.url)
        print(f"Postgres back -> peers accepted again after {time.monotonic() - stopped:.2f} s in all")
        await a.update({"key": "a", "seq": 2})
        await b.update({"key": "b", "seq": 2})
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=2)
        await a.wait_kind(b.id, "node", seq=2)
        assert r0.api("/api/v2/debug/health")["tailnet"]["healthy"]


def _database(pg_url: str) -> str:
    return pg_url.rsplit("/", 1)[1]


async def test_pgcoordinator_resync_after_pubsub_gap(two, pg_url, pg_cluster):
    """Notifications lost while the listeners are cut off: the dropped-messages signal makes every
    replica re-query its peers, so each ends with every peer's newest sequence number."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    others = [await joined(r1.url, token) for _ in range(3)]
    async with peers(a, *others):
        for o in others:
            await o.add_tunnel(a.id)
        for o in others:
            await a.wait_kind(o.id, "node", seq=1)
        resyncs = r0.status()["tailnet"]["resyncs"]
        db = _database(pg_url)
        with psycopg.connect(pg_cluster.url, autocommit=True) as admin:
            # New connections are refused, so the listeners we cut off stay off while updates happen.
            admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
            try:
                cut = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = %s AND application_name LIKE 'coordinator-pubsub-listen%%'", (db,)).fetchone()[0]
                assert cut == 2
                for seq in range(2, 6):
                    for o in others:
                        await o.update({"key": str(o.id), "seq": seq})
                await asyncio.sleep(1.0)
                assert all(a.node_of(o.id)["seq"] == 1 for o in others), "updates arrived although no listener was up"
            finally:
                admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        for o in others:
            await a.wait_kind(o.id, "node", timeout=20, seq=5)
        assert r0.status()["tailnet"]["resyncs"] > resyncs
        assert not a.errors
