"""The peer coordinator through real nginx (the example config): peers reach it through the load
balancer, and a peer whose replica dies reconnects through it to a survivor."""

from __future__ import annotations

import signal
import time
import uuid

import psycopg
import pytest
from test_tailnet_outage import connect_when_accepted

from coordinator.cli.nginx import nginx_binary
from testkit.cluster import HACluster, Replica, serve
from testkit.tailnetfix import RawPeer, joined, peers, tailnet_token

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed (COORDINATOR_WITH_NGINX=1 scripts/bootstrap.sh)"),
]
HEARTBEAT = 0.5


@pytest.fixture
def behind_nginx(pg_url, request):
    def setup(c: HACluster) -> None:
        c.add_replicas(3)
        c.start_nginx()

    yield from serve(HACluster(pg_url, heartbeat=f"{HEARTBEAT * 1000:g}ms"), request, setup=setup)


def replica_of(cluster: HACluster, pg_url: str, peer: uuid.UUID) -> Replica:
    """The running replica whose coordinator holds a row of ``peer`` (a killed one's rows stay behind)."""
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT coordinator_id FROM tailnet_peers WHERE id = %s AND status = 'ok'", (peer,)).fetchall()
    coordinators = {str(r[0]) for r in rows}
    for r in cluster.running():
        if r.status()["tailnet"]["coordinator_id"] in coordinators:
            return r
    raise AssertionError(f"no running replica holds {peer} (rows at {coordinators})")


async def test_pgcoordinator_through_nginx_failover(behind_nginx, pg_url):
    c = behind_nginx
    token = tailnet_token(pg_url)
    a = await joined(c.access_url, token)
    others: list[RawPeer] = []
    async with peers(a):
        await a.add_tunnel(uuid.uuid4())  # a tunnel to nobody yet: harmless
        from testkit.polling import wait_for

        await wait_for(lambda: _has_row(pg_url, a.id), 5, "a's row")
        home = replica_of(c, pg_url, a.id)
        for _ in range(6):  # round robin: a second peer soon lands elsewhere
            b = await joined(c.access_url, token)
            others.append(b)
            await wait_for(lambda b=b: _has_row(pg_url, b.id), 5, "b's row")
            if replica_of(c, pg_url, b.id) is not home:
                break
        async with peers(*others):
            b = others[-1]
            assert replica_of(c, pg_url, b.id) is not home
            await a.add_tunnel(b.id)
            await b.wait_kind(a.id, "node", seq=1)
            await a.wait_kind(b.id, "node", seq=1)
            killed = time.monotonic()
            home.stop(signal.SIGKILL)
            await b.wait_kind(a.id, "lost", timeout=3 * HEARTBEAT + 1.0)
            print(f"through nginx: SIGKILL -> lost after {time.monotonic() - killed:.2f} s")
            await a.wait_closed()
            await connect_when_accepted(a, c.access_url)
            await a.update({"key": "a", "seq": 2})
            await a.add_tunnel(b.id)
            await b.wait_kind(a.id, "node", seq=2)
            print(f"through nginx: reconnected and seen again after {time.monotonic() - killed:.2f} s")
            assert replica_of(c, pg_url, a.id) is not home


def _has_row(pg_url: str, peer: uuid.UUID) -> bool:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT 1 FROM tailnet_peers WHERE id = %s AND status = 'ok'", (peer,)).fetchone() is not None
