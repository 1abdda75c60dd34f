"""Mesh links between relays (in one process here; across processes and nginx in test_ha)."""

import asyncio
import signal

import anyio
import pytest

from coordinator.cluster.mesh import Mesh
from coordinator.core.urls import derp_url
from coordinator.relay.client import DerpClient, RecvPacket
from testkit.pgcluster import free_port
from testkit.polling import wait_for
from testkit.procs import Proc, python
from testkit.relayfix import serve_relay

pytestmark = pytest.mark.anyio
KEY = "ef" * 32


def test_derp_url():
    assert derp_url("http://10.0.0.1:80") == "http://10.0.0.1:80/derp"
    assert derp_url("https://a.example/derp/") == "https://a.example/derp"
    assert derp_url("10.0.0.1:80") is None
    assert derp_url("") is None


async def test_packets_cross_meshed_relays_and_links_break_cleanly():
    async with serve_relay(mesh_key=KEY) as (url1, r1), serve_relay(mesh_key=KEY) as (url2, r2):
        async with Mesh(r1) as m1, Mesh(r2) as m2:
            await m1.set_peers([url2, url1])  # our own URL in the list is detected and skipped
            await m2.set_peers([url1])
            async with await DerpClient.connect(url1) as a, await DerpClient.connect(url2) as b:
                await wait_for(lambda: r1.server.lookup(b.public_key) is not None and r2.server.lookup(a.public_key) is not None)
                for n in (0, 1000, 65536):
                    await a.send(b.public_key, bytes([7]) * n)
                    assert await b.recv_packet(timeout=5) == RecvPacket(a.public_key, bytes([7]) * n)
                    await b.send(a.public_key, bytes([9]) * n)
                    assert await a.recv_packet(timeout=5) == RecvPacket(b.public_key, bytes([9]) * n)
                assert m1.links[derp_url(url1)].is_self
                assert r1.stats()["forwarded_out"] >= 3 and r2.stats()["forwarded_in"] >= 3
                await m1.set_peers([])  # peer removed: its forwarders go at once
                assert r1.server.lookup(b.public_key) is None


async def test_wrong_mesh_key_reported_as_dial_error():
    errors = []
    async with serve_relay(mesh_key=KEY) as (url1, r1), serve_relay(mesh_key="01" * 32) as (url2, _):
        async with Mesh(r1, on_error=errors.append) as m1:
            await m1.set_peers([url2])
            await wait_for(lambda: m1.error() is not None)
            assert m1.error().startswith("Failed to dial peers: " + derp_url(url2))
            assert errors[-1] == m1.error()


@pytest.fixture
def stoppable_relay(tmp_path):
    """A relay in its own process (plain uvicorn), so a test can SIGSTOP it; yields (url, proc)."""
    port = free_port()
    proc = Proc(
        [python(), "-m", "uvicorn", "coordinator.app:app", "--http", "coordinator.edge:DerpHttpProtocol",
         "--port", str(port), "--log-level", "warning"],
        env={"COORDINATOR_DATA_DIR": str(tmp_path), "COORDINATOR_DERP_MESH_KEY": KEY}, log=tmp_path / "peer.log",
    )
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}/derp", proc
    finally:
        proc.signal(signal.SIGCONT)
        proc.stop()


async def flood(sender: DerpClient, dst: bytes, count: int, size: int) -> None:
    for i in range(count):
        await sender.send(dst, i.to_bytes(4, "big") + bytes(size - 4))


async def test_stuck_mesh_link_pushes_back_on_its_sender_instead_of_dropping(stoppable_relay):
    url2, peer = stoppable_relay
    count, size = 2000, 16384  # 33 MB: more than every socket buffer on the way (~10 MB at most)
    async with serve_relay(mesh_key=KEY) as (url1, r1):
        async with Mesh(r1, stall_timeout=60) as m1:
            await m1.set_peers([url2])
            async with await DerpClient.connect(url1) as a, await DerpClient.connect(url2) as b, \
                    await DerpClient.connect(url1) as c, await DerpClient.connect(url1) as d:
                await wait_for(lambda: r1.server.lookup(b.public_key) is not None)
                got: list[int] = []

                async def receive():
                    while not got or got[-1] != count - 1:
                        got.append(int.from_bytes((await b.recv_packet(timeout=30)).data[:4], "big"))

                peer.signal(signal.SIGSTOP)
                sending = asyncio.create_task(flood(a, b.public_key, count, size))
                await wait_for(lambda: r1.stats()["senders_paused"] == 1, timeout=20)
                stats = r1.stats()
                assert stats["mesh_links_congested"] == 1 and stats["mesh_pushbacks"] >= 1
                assert stats["drops"]["queue_tail"] == 0
                await asyncio.sleep(0.3)
                assert not sending.done()  # TCP pushed back all the way to the sender

                # Everyone else keeps working while `a` waits.
                await d.send(c.public_key, b"local")
                assert await c.recv_packet(timeout=5) == RecvPacket(d.public_key, b"local")

                receiving = asyncio.create_task(receive())
                peer.signal(signal.SIGCONT)
                with anyio.fail_after(60):
                    await sending
                with anyio.fail_after(60):
                    await receiving
                # This relay forwarded every packet, in order. (The peer may still shed some for b, a
                # Python client slower than the relay: local delivery drops the oldest, as in Go.)
                stats = r1.stats()
                assert stats["forwarded_out"] == count and stats["drops"]["queue_tail"] == 0
                assert got == sorted(set(got)) and got[-1] == count - 1
                await wait_for(lambda: r1.stats()["senders_paused"] == 0)


async def test_mesh_link_stuck_past_the_stall_timeout_is_redialled(stoppable_relay):
    url2, peer = stoppable_relay
    async with serve_relay(mesh_key=KEY) as (url1, r1):
        async with Mesh(r1, stall_timeout=1.0) as m1:
            await m1.set_peers([url2])
            async with await DerpClient.connect(url1) as a, await DerpClient.connect(url2) as b, \
                    await DerpClient.connect(url1) as c:
                await wait_for(lambda: r1.server.lookup(b.public_key) is not None)
                link = m1.links[derp_url(url2)]
                peer.signal(signal.SIGSTOP)
                sending = asyncio.create_task(flood(a, b.public_key, 600, 16384))
                await wait_for(lambda: r1.stats()["senders_paused"] == 1, timeout=20)
                # After the stall timeout the link is closed: `a` is read again (its packets for b are
                # dropped while b is unreachable) and the link redials.
                await wait_for(lambda: r1.stats()["senders_paused"] == 0, timeout=10)
                await wait_for(lambda: not link.connected, timeout=5)
                with anyio.fail_after(30):
                    await sending
                await a.send(c.public_key, b"still here")
                assert await c.recv_packet(timeout=5) == RecvPacket(a.public_key, b"still here")
                peer.signal(signal.SIGCONT)
                await wait_for(lambda: link.connected, timeout=15)
                await wait_for(lambda: r1.server.lookup(b.public_key) is not None, timeout=15)


async def test_stopping_mesh_ends_links_whose_read_completes_as_they_are_cancelled():
    """The peer closes the link in the very loop turns the mesh stops: the link must end, not redial.

    (Python 3.11's ``asyncio.wait_for`` swallowed that cancellation: stopping replicas hung for ever.)
    """
    async with serve_relay(mesh_key=KEY) as (url1, r1), serve_relay(mesh_key=KEY) as (url2, r2):
        for turns in range(10):
            async with Mesh(r1) as m1:
                await m1.set_peers([url2])
                link = m1.links[derp_url(url2)]
                await wait_for(lambda link=link: link.connected, 10)
                accepts = r2.stats()["accepts"]
                r2.close()  # the peer drops every connection: the link's pending read completes ...
                for _ in range(turns):
                    await asyncio.sleep(0)
                with anyio.fail_after(5):
                    await m1.close()  # ... while the mesh stops
                assert link.done.is_set() and not link.connected
            assert r2.stats()["accepts"] == accepts, "a link dialled again after the mesh stopped"
            r2.start()


async def test_links_do_not_redial_once_the_mesh_is_stopping():
    async with serve_relay(mesh_key=KEY) as (url1, r1), serve_relay(mesh_key=KEY) as (url2, r2):
        async with Mesh(r1) as m1:
            await m1.set_peers([url2])
            link = m1.links[derp_url(url2)]
            await wait_for(lambda: link.connected, 10)
            accepts = r2.stats()["accepts"]
            m1.stopping = True  # what a replica does the moment its stop begins
            r2.close()  # the link breaks ...
            with anyio.fail_after(5):
                await link.done.wait()  # ... and ends instead of redialling
            assert r2.stats()["accepts"] == accepts
            r2.start()
