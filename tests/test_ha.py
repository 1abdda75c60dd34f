"""High availability end to end: three `coordinator server` processes, real Postgres, real nginx."""

import asyncio
import signal
import time

import pytest

from coordinator.cli.nginx import nginx_binary
from coordinator.core.urls import derp_url
from coordinator.relay.client import DerpClient, DerpError, RecvPacket
from testkit.cluster import HACluster, serve
from testkit.cluster import full_mesh as cluster_full_mesh
from testkit.polling import wait_for, wait_until
from testkit.procs import free_port
from testkit.relayfix import routed

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed (COORDINATOR_WITH_NGINX=1 scripts/bootstrap.sh)"),
]


def full_mesh(cluster: HACluster, replicas=None) -> bool:
    return cluster_full_mesh(replicas or cluster.running())


def three_behind_nginx(c: HACluster) -> None:
    for _ in range(3):
        c.add_replica()
    c.start_nginx()


@pytest.fixture
def cluster(pg_url, request):
    yield from serve(HACluster(pg_url), request, setup=three_behind_nginx)


async def clients_on_distinct_replicas(cluster: HACluster, n: int = 2, **kwargs) -> list[DerpClient]:
    """Connect through nginx until ``n`` clients sit on ``n`` different replicas."""
    by_server: dict[bytes, DerpClient] = {}
    extra = []
    for _ in range(12):
        c = await DerpClient.connect(cluster.access_url + "/derp", **kwargs)
        if c.server_key in by_server:
            extra.append(c)
        else:
            by_server[c.server_key] = c
        if len(by_server) == n:
            break
    for c in extra:
        await c.close()
    assert len(by_server) == n, "nginx did not spread clients over the replicas"
    return list(by_server.values())


async def test_packets_cross_replicas_through_nginx(cluster):
    await wait_until(lambda: full_mesh(cluster), 15)
    for websocket in (False, True):
        a, b = await clients_on_distinct_replicas(cluster, websocket=websocket)
        try:
            await routed(a, b)
            await routed(b, a)
            for n in (0, 1200, 65536):
                await a.send(b.public_key, bytes([1]) * n)
                assert await b.recv_packet(timeout=5) == RecvPacket(a.public_key, bytes([1]) * n)
                await b.send(a.public_key, bytes([2]) * n)
                assert await a.recv_packet(timeout=5) == RecvPacket(b.public_key, bytes([2]) * n)
        finally:
            await a.close()
            await b.close()
    # mixed transports across replicas
    a, b = await clients_on_distinct_replicas(cluster)
    ws = await DerpClient.connect(cluster.access_url + "/derp", websocket=True)
    try:
        for other in (a, b):
            await routed(ws, other)
    finally:
        for c in (a, b, ws):
            await c.close()


async def test_sigkill_failover_client_reconnects_through_nginx(cluster):
    await wait_until(lambda: full_mesh(cluster), 15)
    a, b = await clients_on_distinct_replicas(cluster)
    key_a = a.key
    victim = next(r for r in cluster.replicas if r.server_key == a.server_key)
    victim_server_key = a.server_key
    stop = asyncio.Event()

    async def keep_sending():
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                await b.send(key_a.public, seq.to_bytes(8, "big"))
            except DerpError:
                return
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(keep_sending())
    try:
        assert (await a.recv_packet(timeout=5)).src == b.public_key
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        with pytest.raises(DerpError):
            while True:
                await a.recv(timeout=5)
        await a.close()
        # reconnect like a real client: same node key, through the load balancer, with backoff
        for attempt in range(50):
            try:
                a = await DerpClient.connect(cluster.access_url + "/derp", key_a, timeout=2)
                break
            except DerpError:
                await asyncio.sleep(min(0.01 * attempt * attempt, 0.5))
        assert a.server_key != victim_server_key
        await a.recv_packet(timeout=15)
        elapsed = time.monotonic() - killed_at
        print(f"\nSIGKILL failover: first packet delivered again {elapsed * 1000:.0f} ms after the kill (target <= 2000 ms)")
    finally:
        stop.set()
        await sender
        await a.close()
        await b.close()


async def test_sigterm_peers_drop_it_and_new_replica_joins_mesh(cluster):
    await wait_until(lambda: full_mesh(cluster), 15)
    leaving = cluster.replicas[2]
    stayers = cluster.replicas[:2]
    url = derp_url(leaving.url)
    t0 = time.monotonic()
    leaving.proc.signal(signal.SIGTERM)
    dropped = await wait_until(lambda: all(url not in r.status()["mesh"] for r in stayers), 10)
    assert leaving.proc.wait() == 0
    print(f"\nSIGTERM: peers dropped the replica from their mesh {dropped * 1000:.0f} ms after the signal (target <= 500 ms)")
    assert time.monotonic() - t0 < 10

    newcomer = cluster.add_replica(start=False)
    newcomer.start()  # returns once /readyz answers: listening and registered
    joined = await wait_until(lambda: full_mesh(cluster, [*stayers, newcomer]), 10)
    print(f"new replica: every peer has a mesh link to it {joined * 1000:.0f} ms after it came up (target <= 1000 ms)")


async def test_unreachable_peer_shows_in_error_column_and_does_not_block_others(cluster):
    import uuid

    import psycopg

    await wait_until(lambda: full_mesh(cluster), 15)
    ghost = uuid.uuid4()
    dead_url = f"http://127.0.0.1:{free_port()}"
    async with await psycopg.AsyncConnection.connect(cluster.pg_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO replicas (id, hostname, region_id, relay_url, heartbeat_ms) VALUES (%s, 'ghost', 999, %s, 60000)",
            (ghost, dead_url),
        )
        await conn.execute("SELECT pg_notify('replica', %s)", (str(ghost),))

        async def errors():
            cur = await conn.execute("SELECT error FROM replicas WHERE id <> %s AND stopped_at IS NULL", (ghost,))
            return [row[0] for row in await cur.fetchall()]

        seen: list[str] = []

        def reported(e: str) -> bool:
            return e.startswith("Failed to dial peers: " + derp_url(dead_url)) and (
                f"ping sibling replica ghost ({dead_url}): " in e)

        async def all_reported() -> bool:
            seen[:] = await errors()
            return all(reported(e) for e in seen)

        await wait_for(all_reported, 15, lambda: f"every replica to report the dead peer: {seen}", 0.1)
        assert full_mesh(cluster)  # the live replicas stay meshed with each other
        a, b = await clients_on_distinct_replicas(cluster)
        try:
            await routed(a, b)
        finally:
            await a.close()
            await b.close()
        await conn.execute("UPDATE replicas SET stopped_at = now() WHERE id = %s", (ghost,))
        await conn.execute("SELECT pg_notify('replica', %s)", (str(ghost),))
        async def all_clear() -> bool:
            seen[:] = await errors()
            return not any(seen)

        await wait_for(all_clear, 15, lambda: f"the errors to clear: {seen}", 0.1)
