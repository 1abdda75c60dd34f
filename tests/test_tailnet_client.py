"""The library's TailnetClient against real replica processes, a real PostgreSQL and real nginx:
peers on different replicas learn each other; a replica SIGKILLed or stopped → the client redials
through nginx to a survivor and both ends see ``node`` again; a refused token stops the client;
``coordinator demo`` shows two peers finding each other and exchanging packets over DERP."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from coordinator.cli.nginx import nginx_binary
from coordinator.cluster.tailnet.client import TailnetClient
from coordinator.cluster.tailnet.view import TailnetRefused
from testkit.cluster import HACluster, Replica, serve
from testkit.polling import wait_for
from testkit.procs import python
from testkit.tailnetfix import tailnet_token

pytestmark = pytest.mark.anyio
needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed (scripts/bootstrap.sh)")

HEARTBEAT = 0.5  # the replicas' --heartbeat


@pytest.fixture
def two(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat=f"{HEARTBEAT * 1000:g}ms"), request,
                     setup=lambda c: c.add_replicas(2))


@pytest.fixture
def behind_nginx(pg_url, request):
    def setup(c: HACluster) -> None:
        c.add_replicas(3)
        c.start_nginx()

    yield from serve(HACluster(pg_url, heartbeat=f"{HEARTBEAT * 1000:g}ms", extra_args=("--shutdown-timeout", "5s")),
                     request, setup=setup)


def node(pid: uuid.UUID, seq: int = 1) -> dict:
    return {"key": f"nodekey:{pid.hex * 2}", "preferred_derp": 999, "seq": seq}


@contextlib.asynccontextmanager
async def client(url: str, token: str, **kw) -> AsyncIterator[TailnetClient]:
    pid = uuid.uuid4()
    c = TailnetClient(url, pid, token, node=node(pid), backoff_initial=0.05, backoff_max=1.0, **kw)
    async with c:
        yield c


def _serving(cluster: HACluster, peer: uuid.UUID, pg_url: str) -> Replica | None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT coordinator_id::text FROM tailnet_peers WHERE id = %s AND status = 'ok'",
                            (peer,)).fetchall()
    by_coordinator = {r.status()["tailnet"]["coordinator_id"]: r for r in cluster.running()}
    serving = [by_coordinator[cid] for (cid,) in rows if cid in by_coordinator]
    assert len(serving) <= 1, (rows, list(by_coordinator))
    return serving[0] if serving else None


async def replica_of(cluster: HACluster, peer: uuid.UUID, pg_url: str) -> Replica:
    """The running replica whose coordinator serves ``peer`` (a dead one's rows may linger)."""
    return await wait_for(lambda: asyncio.to_thread(_serving, cluster, peer, pg_url), 10, f"{peer}'s row")


async def seq_seen(c: TailnetClient, peer: uuid.UUID, seq: int, timeout: float = 10.0) -> None:
    def seen() -> bool:
        s = c.peers.get(peer)
        return s is not None and s.kind == "node" and s.node is not None and s.node.get("seq") == seq

    await c.wait_for(seen, timeout, f"{peer}'s node {seq}")


async def test_clients_on_different_replicas_learn_each_other(two, pg_url):
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    async with client(r0.url, token) as a, client(r1.url, token) as b:
        started = time.monotonic()
        await a.add_tunnel(b.peer_id)
        assert (await a.wait_for_node(b.peer_id, 10))["key"] == f"nodekey:{b.peer_id.hex * 2}"
        assert (await b.wait_for_node(a.peer_id, 10))["key"] == f"nodekey:{a.peer_id.hex * 2}"
        print(f"\nboth ends know each other {time.monotonic() - started:.3f} s after add_tunnel")
        stream = b.updates()
        for seq in range(2, 6):
            await a.update(node(a.peer_id, seq))
        await seq_seen(b, a.peer_id, 5)
        seqs = []
        async for u in stream:
            seqs.append(u.node["seq"] if u.node else u.kind)
            if seqs[-1] == 5:
                break
        stream.close()
        assert seqs == sorted(seqs) and seqs[-1] == 5, seqs  # coalescing may skip, never reorder
        await b.ready_for_handshake(a.peer_id)
        await a.wait_for(lambda: a.peers[b.peer_id].ready_for_handshake is not None, 10, "ready_for_handshake")
        await a.remove_tunnel(b.peer_id)
        assert b.peer_id not in a.peers
        await b.wait_for(lambda: b.peers[a.peer_id].kind == "disconnected", 10, "disconnected after remove_tunnel")
        assert b.peers[a.peer_id].node is None
        # (a replica answers /readyz a moment before its coordinator's first beat: a peer may first get 1013)
        assert a.failure is None and b.failure is None, (a.last_error, b.last_error)


async def test_disconnect_on_close_and_lost_without(two, pg_url):
    r0, r1 = two.replicas
    token = tailnet_token(pg_url)
    async with client(r1.url, token) as b:
        for disconnect, kind in ((True, "disconnected"), (False, "lost")):
            async with client(r0.url, token) as a:
                await b.add_tunnel(a.peer_id)
                await b.wait_for_node(a.peer_id, 10)
                await a.close(disconnect=disconnect)
            await b.wait_for(lambda a=a, kind=kind: b.peers[a.peer_id].kind == kind, 10, kind)
            assert (b.peers[a.peer_id].node is None) == (kind == "disconnected")  # a lost peer keeps its node


async def test_refused_token_stops_the_client(two):
    async with client(two.replicas[0].url, "not-the-token") as c:
        with pytest.raises(TailnetRefused, match="invalid tailnet token"):  # accepted, then error and 1008
            async for _ in c.updates():
                pass
        assert c.failure and not c.connected
        await asyncio.sleep(0.3)
        assert c.connections <= 1, "a refused client does not loop"


async def _kill_and_reconnect(cluster: HACluster, pg_url: str, sig: int) -> None:
    """A on nginx, B on another replica; ``sig`` to A's replica: A redials through nginx, both see node again."""
    token = tailnet_token(pg_url)
    async with client(cluster.access_url, token) as a:
        await a.wait_connected(10)
        victim = await replica_of(cluster, a.peer_id, pg_url)
        other = next(r for r in cluster.replicas if r is not victim)
        async with client(other.url, token) as b:
            await a.add_tunnel(b.peer_id)
            await a.wait_for_node(b.peer_id, 10)
            await b.wait_for_node(a.peer_id, 10)
            kinds: list[str] = []
            stream = b.updates()
            a_before, b_before = a.connections, b.connections
            signalled = time.monotonic()
            victim.stop(sig)
            # A: a new connection (through nginx, to a survivor) and B's node on it.
            await a.wait_for_node(b.peer_id, 15, after_connection=a_before)
            reconnected = time.monotonic() - signalled
            assert a.failure is None
            now = await replica_of(cluster, a.peer_id, pg_url)
            assert now is not victim and now.running
            # B: node again for A; and A's next update reaches B.
            await a.update(node(a.peer_id, 2))
            await seq_seen(b, a.peer_id, 2, 15)
            seen = time.monotonic() - signalled
            stream.end()  # what arrived so far, then the iteration stops
            async for u in stream:
                kinds.append(u.kind)
            assert kinds and kinds[-1] == "node", kinds
            assert b.connections == b_before, "B's replica kept running: B never reconnected"
            print(f"\n{signal.Signals(sig).name} of A's replica: A redialled through nginx and had B's node "
                  f"{reconnected:.2f} s later ({a.last_error}); B saw A's next update after {seen:.2f} s; "
                  f"B saw kinds {kinds}")


@needs_nginx
async def test_replica_sigkill_client_reconnects_through_nginx(behind_nginx, pg_url):
    await _kill_and_reconnect(behind_nginx, pg_url, signal.SIGKILL)


@needs_nginx
async def test_replica_sigterm_client_reconnects_through_nginx(behind_nginx, pg_url):
    await _kill_and_reconnect(behind_nginx, pg_url, signal.SIGTERM)


def test_demo_peers_find_each_other_and_exchange_packets():
    out = subprocess.run([python(), "-m", "coordinator", "demo", "--once", "--replicas", "2"], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "peer A (on replica 1) learned peer B's node: key nodekey:" in out.stdout, out.stdout
    assert "peer B (on replica 2) learned peer A's node: key nodekey:" in out.stdout, out.stdout
    assert "home region 999" in out.stdout
    assert "packets exchanged over DERP with the learned keys" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr


async def test_probe_times_an_update_across_replicas(two, pg_url):
    from coordinator.ops.probe import run_probe
    from coordinator.ops.probe.render import render_text

    report = await run_probe(pg_url=pg_url, samples=5, timeout=3.0)  # the token: the deployment's stored one
    t = report["tailnet"]
    print("\n" + render_text(report).split("Peer coordinator")[1].split("\n\n")[0])
    assert t["measured"] and t["code"] is None and len(t["samples_ms"]) == 5, t
    assert sorted(t["replicas"]) == sorted(r["id"] for r in report["replicas"])
    assert not [p for p in report["problems"] if p["subject"] == "tailnet"]

    bad = await run_probe(pg_url=pg_url, samples=2, timeout=3.0, tailnet_token="wrong")
    problems = [p for p in bad["problems"] if p["subject"] == "tailnet"]
    assert bad["tailnet"]["code"] == "ETAILNET11" and not bad["ok"], bad["tailnet"]
    assert len(problems) == 1 and "invalid tailnet token" in problems[0]["message"], problems

    slow = await run_probe(pg_url=pg_url, samples=2, timeout=3.0, tailnet_threshold=1e-6)
    assert slow["tailnet"]["code"] == "ETAILNET13", slow["tailnet"]

    two.replicas[1].stop()
    alone = await run_probe(pg_url=pg_url, samples=1, timeout=3.0)
    assert not alone["tailnet"]["measured"] and "two live replicas" in alone["tailnet"]["note"]
