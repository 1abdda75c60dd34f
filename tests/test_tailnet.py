"""The peer coordinator with real replica processes and a real PostgreSQL (named after Coder's
``TestPGCoordinator*`` cases): peers on different replicas learn each other, lost and disconnected
kinds, SIGKILL and SIGTERM of a replica, bad input."""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from cluster import HACluster, serve
from tailnetfix import RawPeer, tailnet_token

pytestmark = pytest.mark.anyio

HEARTBEAT = 0.5  # the replicas' --heartbeat: lost within 3 beats (+1 s) of a replica dying


@pytest.fixture
def two(pg_url, request):
    def setup(c: HACluster) -> None:
        c.add_replicas(2)

    yield from serve(HACluster(pg_url, heartbeat=f"{HEARTBEAT * 1000:g}ms"), request, setup=setup)


@contextlib.asynccontextmanager
async def peers(*made: RawPeer) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for p in made:
            await p.close()


async def joined(url: str, token: str, seq: int = 1, **node) -> RawPeer:
    peer = await RawPeer(url, token).connect()
    await peer.update({"key": f"nodekey:{peer.id.hex}", "seq": seq, **node})
    return peer


async def test_pgcoordinator_dual_mainline(two, pg_url):
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        started = time.monotonic()
        await a.add_tunnel(b.id)
        await a.wait_kind(b.id, "node", seq=1)
        await b.wait_kind(a.id, "node", seq=1)
        print(f"tunnel across replicas: both ends know each other after {time.monotonic() - started:.3f} s")
        for seq in range(2, 7):  # every later update, both ways
            await a.update({"key": f"nodekey:{a.id.hex}", "seq": seq})
            await b.update({"key": f"nodekey:{b.id.hex}", "seq": seq})
        await b.wait_kind(a.id, "node", seq=6)
        await a.wait_kind(b.id, "node", seq=6)
        await a.remove_tunnel(b.id)
        await a.wait_kind(b.id, "disconnected")
        await b.wait_kind(a.id, "disconnected")
        assert not a.errors and not b.errors
        status = r0.status()["tailnet"]
        assert status["peers"] == 1 and status["healthy"]
        assert status["updates_in"] >= 6 and status["updates_out"] >= 6


async def test_pgcoordinator_graceful_disconnect(two, pg_url):
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await b.add_tunnel(a.id)
        await b.wait_kind(a.id, "node")
        await a.send({"type": "disconnect"})
        assert await a.wait_closed() == 1000
        await b.wait_kind(a.id, "disconnected")
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM tailnet_peers WHERE id = %s", (a.id,)).fetchone()[0] == 0


async def test_pgcoordinator_lost(two, pg_url):
    """A peer whose connection breaks is lost to the others; back as node once it reconnects elsewhere."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=1)
        await a.abort()
        await b.wait_kind(a.id, "lost")
        await a.connect(r1.url)  # through "the load balancer": the other replica this time
        await a.update({"key": f"nodekey:{a.id.hex}", "seq": 2})
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=2)
        await a.wait_kind(b.id, "node", seq=1)


async def test_pgcoordinator_missed_heartbeats(two, pg_url):
    """SIGKILL of a replica: its peers are lost at the others within 3 beats + 1 s, then node again."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=1)
        killed = time.monotonic()
        r0.stop(signal.SIGKILL)
        await b.wait_kind(a.id, "lost", timeout=3 * HEARTBEAT + 1.0)
        print(f"SIGKILL -> lost at the other replica after {time.monotonic() - killed:.2f} s "
              f"(bound {3 * HEARTBEAT + 1.0:.1f} s)")
        assert b.kind_of(a.id) == "lost"
        await a.wait_closed()
        await a.connect(r1.url)
        await a.update({"key": f"nodekey:{a.id.hex}", "seq": 2})
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=2)


async def test_pgcoordinator_no_delete_on_close(two, pg_url):
    """SIGTERM: peers here get an error and close 1001; others see them lost; no row is deleted."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node")
        await a.wait_kind(b.id, "node")
        r0.stop(signal.SIGTERM)
        assert await a.wait_closed() == 1001
        assert a.errors and "stopping" in a.errors[-1]
        await b.wait_kind(a.id, "lost", timeout=3.0)
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT status FROM tailnet_peers WHERE id = %s", (a.id,)).fetchall()
            tunnels = conn.execute("SELECT count(*) FROM tailnet_tunnels WHERE src_id = %s", (a.id,)).fetchone()[0]
        assert rows == [("lost",)] and tunnels == 1


BAD_FRAMES = [
    ("not json", "not_json"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"type": "update", "node": {"pad": "' + "x" * 9000 + '"}}', "node_too_large"),
    ('{"type": "add_tunnel", "peer": "not-a-uuid"}', "bad_uuid"),
    ("SELF", "self_tunnel"),
]


async def test_pgcoordinator_bad_input(two, pg_url):
    """Each bad frame: an error, close 1008, counted; peers in a tunnel elsewhere notice nothing."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node")
        frames_before = (len(a.frames), len(b.frames))
        for frame, reason in BAD_FRAMES:
            bad = await RawPeer(r0.url, token).connect()
            async with peers(bad):
                await bad.send(f'{{"type": "add_tunnel", "peer": "{bad.id}"}}' if frame == "SELF" else frame)
                assert await bad.wait_closed() == 1008, reason
                assert len(bad.errors) == 1 and "\n" not in bad.errors[0], bad.errors
        refused = r0.status()["tailnet"]["refused"]
        for _, reason in BAD_FRAMES:
            assert refused.get(reason) == 1, (reason, refused)
        # no token, a wrong token, a bad peer ID: refused before anything happens
        for peer in (RawPeer(r0.url, None), RawPeer(r0.url, "wrong")):
            await peer.connect()
            assert await peer.wait_closed() == 1008
            assert "token" in peer.errors[0]
        await a.update({"key": "k", "seq": 9})  # the tunnel still works
        await b.wait_kind(a.id, "node", seq=9)
        assert (len(a.frames), len(b.frames)) == (frames_before[0], frames_before[1] + 1)
        metrics = r0.api("/api/v2/debug/status")["tailnet"]
        assert metrics["refused"]["unauthorized"] == 2


async def test_pgcoordinator_replaced_connection(two, pg_url):
    """A second connection with the same peer ID replaces the first, which is told why; others see no lost."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    a2 = RawPeer(r0.url, token, peer_id=a.id)
    async with peers(a, b, a2):
        await b.add_tunnel(a.id)
        await b.wait_kind(a.id, "node", seq=1)
        await a2.connect()
        assert await a.wait_closed() == 1008
        assert "replaced" in a.errors[-1]
        await a2.update({"key": "k", "seq": 2})
        await b.wait_kind(a.id, "node", seq=2)
        assert [f["kind"] for f in b.frames if f.get("peer") == str(a.id)] == ["node", "node"]


async def test_tailnet_token_cli(two, pg_url):
    import subprocess

    from procs import python

    out = subprocess.run([python(), "-m", "coordinator", "tailnet-token", "--pg-url", pg_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tailnet_token(pg_url)
    assert uuid.UUID  # keep the import honest
