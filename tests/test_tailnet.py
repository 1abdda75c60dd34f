"""The peer coordinator with real replica processes and a real PostgreSQL (named after Coder's
``TestPGCoordinator*`` cases): peers on different replicas learn each other, lost and disconnected
kinds, SIGKILL and SIGTERM of a replica, bad input."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import psycopg
import pytest

from testkit.cluster import HACluster, serve
from testkit.procs import python
from testkit.tailnetfix import RawPeer, joined, peers, tailnet_token

pytestmark = pytest.mark.anyio

HEARTBEAT = 0.5  # the replicas' --heartbeat: lost within 3 beats (+1 s) of a replica dying


@pytest.fixture
def two(pg_url, request):
    def setup(c: HACluster) -> None:
        c.add_replicas(2)

    yield from serve(HACluster(pg_url, heartbeat=f"{HEARTBEAT * 1000:g}ms"), request, setup=setup)


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
        assert status["updates_in"] >= 6 and status["updates_out"] >= 3  # coalescing may skip some


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
        # leaving now also takes the dead replica's row: b sees disconnected, not that old row as lost
        await a.send({"type": "disconnect"})
        await b.wait_kind(a.id, "disconnected")
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM tailnet_peers WHERE id = %s", (a.id,)).fetchone()[0] == 0


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
        code = await a.wait_closed()
        assert code == 1001 and a.errors and "stopping" in a.errors[-1], (code, a.errors)
        await b.wait_kind(a.id, "lost", timeout=3.0)
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT status FROM tailnet_peers WHERE id = %s", (a.id,)).fetchall()
            tunnels = conn.execute("SELECT count(*) FROM tailnet_tunnels WHERE src_id = %s", (a.id,)).fetchone()[0]
        assert rows == [("lost",)] and tunnels == 1
        await a.connect(r1.url)  # what a client does after 1001: reconnect at once, elsewhere
        await a.update({"key": "a", "seq": 2})
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=2)


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
        await a.wait_kind(b.id, "node")
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

    out = subprocess.run([python(), "-m", "coordinator", "tailnet-token", "--pg-url", pg_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tailnet_token(pg_url)
    assert uuid.UUID  # keep the import honest


@pytest.fixture
def hook_app(pg_url, tmp_path):
    """Two replicas of an embedder's app whose authorization hook replaces the deployment token."""
    from testkit.polling import wait_blocking
    from testkit.procs import ROOT, Proc, free_port, http_status

    procs, urls = [], []
    allowed = [uuid.uuid5(uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8"), u) for u in ("bob",)]
    try:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            procs.append(Proc(
                [python(), "-m", "uvicorn", "tailnet_hook_app:app", "--app-dir", str(ROOT / "tests"), "--port", str(port),
                 "--http", "coordinator.edge:DerpHttpProtocol", "--log-level", "info"],
                env={"COORDINATOR_PG_CONNECTION_URL": pg_url, "COORDINATOR_DATA_DIR": str(tmp_path / f"r{i}"),
                     "COORDINATOR_DERP_SERVER_RELAY_URL": url, "COORDINATOR_REPLICA_HEARTBEAT": "500ms",
                     "TAILNET_HOOK_ALLOWED": ",".join(map(str, allowed))},
                log=tmp_path / f"hook{i}.log",
            ))
            urls.append(url)
        for url in urls:
            wait_blocking(lambda url=url: http_status(url + "/readyz") == 200, 60, f"{url}/readyz")
        yield urls
    finally:
        for proc in procs:
            proc.stop()


class _UserPeer(RawPeer):
    def __init__(self, url: str, user: str, peer_id: uuid.UUID | None = None):
        self.user = user
        super().__init__(url, None, peer_id or uuid.uuid5(uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8"), user))

    async def connect(self, base_url: str | None = None) -> RawPeer:
        from websockets.asyncio.client import connect

        from testkit.tailnetfix import ws_url

        self.ws = await connect(ws_url(base_url or self.base_url, self.id), additional_headers={"X-User": self.user})
        self.close_code = None
        self._reader = asyncio.create_task(self._read(self.ws))
        return self


async def test_pgcoordinator_authorization_hook(hook_app):
    """The embedder's hook decides who a connection is and which tunnels it may open."""
    u0, u1 = hook_app
    alice, bob = _UserPeer(u0, "alice"), _UserPeer(u1, "bob")
    impostor = _UserPeer(u0, "mallory", peer_id=alice.id)  # claims alice's peer ID
    carol = _UserPeer(u1, "carol")
    async with peers(alice, bob, impostor, carol):
        for p in (alice, bob):
            await p.connect()
            await p.update({"key": p.user, "seq": 1})
        await alice.add_tunnel(bob.id)  # allowed
        await bob.wait_kind(alice.id, "node", seq=1)
        await alice.wait_kind(bob.id, "node", seq=1)
        await impostor.connect()
        assert await impostor.wait_closed() == 1008 and "may not claim" in impostor.errors[0]
        assert alice.close_code is None  # not replaced
        await carol.connect()
        await carol.add_tunnel(alice.id)  # not in the allowed list
        assert await carol.wait_closed() == 1008 and "may not open a tunnel" in carol.errors[0]
        assert alice.kind_of(carol.id) is None  # alice never heard of carol


async def test_pgcoordinator_ready_for_handshake_and_metrics(two, pg_url):
    """ready_for_handshake reaches the other end of a tunnel only; /metrics exports the coordinator's figures."""
    import urllib.request

    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    stranger = await joined(r1.url, token)
    async with peers(a, b, stranger):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node")
        await a.wait_kind(b.id, "node")
        await b.update({"key": "b", "seq": 2})  # a node change: timed into the propagation figure
        await a.wait_kind(b.id, "node", seq=2)
        await a.send({"type": "ready_for_handshake", "peer": str(b.id)})
        await b.wait_kind(a.id, "ready_for_handshake")
        await stranger.send({"type": "ready_for_handshake", "peer": str(a.id)})  # no tunnel: dropped
        await b.send({"type": "ready_for_handshake", "peer": str(a.id)})
        await a.wait_kind(b.id, "ready_for_handshake")
        assert a.kind_of(stranger.id) is None
        request = urllib.request.Request(r0.url + "/metrics", headers={"Authorization": f"Bearer {two.api_token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            text = resp.read().decode()
        for name in ("coordinator_tailnet_peers 1.0", "coordinator_tailnet_healthy 1.0", "coordinator_tailnet_updates_in_total",
                     "coordinator_tailnet_updates_out_total", "coordinator_tailnet_resyncs_total",
                     'coordinator_tailnet_propagation_seconds{quantile="0.99"}', "coordinator_tailnet_tunnels 1.0"):
            assert name in text, name


async def test_pgcoordinator_rate_is_backpressure_not_loss(two, pg_url):
    """A burst far over the per-peer rate is read more slowly, not refused: the newest node arrives."""
    from coordinator.cluster.tailnet.messages import UPDATE_BURST

    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    a = await joined(r0.url, token)
    b = await joined(r1.url, token)
    async with peers(a, b):
        await a.add_tunnel(b.id)
        await b.wait_kind(a.id, "node", seq=1)
        last = UPDATE_BURST + 30
        for seq in range(2, last + 1):
            await a.update({"key": "a", "seq": seq})
        await b.wait_kind(a.id, "node", timeout=20, seq=last)
        assert a.close_code is None and not a.errors
        assert r0.status()["tailnet"]["throttled"] > 0


@pytest.fixture
def one_small(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat="500ms", extra_args=("--tailnet-max-peers", "2")), request,
                     setup=lambda c: c.add_replicas(1))


async def test_pgcoordinator_peer_budget(one_small, pg_url):
    (r0,) = one_small.replicas
    token = tailnet_token(pg_url)
    a, b = await joined(r0.url, token), await joined(r0.url, token)
    c = await RawPeer(r0.url, token).connect()
    async with peers(a, b, c):
        assert await c.wait_closed() == 1013 and "at most 2 peers" in c.errors[0]
        assert r0.status()["tailnet"]["refused"]["peer_budget"] == 1
        assert a.close_code is None and b.close_code is None


async def test_pgcoordinator_disconnect_then_close_reads_as_disconnected(two, pg_url):
    """A peer that sends disconnect and drops the connection at once (while updates are on their way
    to it) is disconnected to the others, never lost: the server applies what arrived before the close."""
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    b = await joined(r1.url, token)
    async with peers(b):
        for _ in range(5):
            a = await joined(r0.url, token)
            async with peers(a):
                await b.add_tunnel(a.id)  # b's node is on its way to a as a leaves
                await b.wait_kind(a.id, "node")
                await b.update({"key": "b", "seq": 2})
                await a.send({"type": "disconnect"})
                await asyncio.sleep(0.02)  # the frame leaves this process (an abort drops unsent bytes)
                await a.abort()
                await b.wait_kind(a.id, "disconnected")
