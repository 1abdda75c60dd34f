"""Mesh links between relays (in one process here; across processes and nginx in test_ha)."""

import pytest

from coordinator.client import DerpClient, RecvPacket
from coordinator.mesh import Mesh, normalize_relay_url
from relayfix import serve_relay, wait_for

pytestmark = pytest.mark.anyio
KEY = "ef" * 32


def test_normalize_relay_url():
    assert normalize_relay_url("http://10.0.0.1:80") == "http://10.0.0.1:80/derp"
    assert normalize_relay_url("https://a.example/derp/") == "https://a.example/derp"
    assert normalize_relay_url("10.0.0.1:80") is None
    assert normalize_relay_url("") is None


async def test_packets_cross_meshed_relays_and_links_break_cleanly():
    async with serve_relay(mesh_key=KEY) as (url1, r1), serve_relay(mesh_key=KEY) as (url2, r2):
        m1, m2 = Mesh(r1), Mesh(r2)
        try:
            await m1.set_peers([url2, url1])  # our own URL in the list is detected and skipped
            await m2.set_peers([url1])
            async with await DerpClient.connect(url1) as a, await DerpClient.connect(url2) as b:
                await wait_for(lambda: r1.server.lookup(b.public_key) is not None and r2.server.lookup(a.public_key) is not None)
                for n in (0, 1000, 65536):
                    await a.send(b.public_key, bytes([7]) * n)
                    assert await b.recv_packet(timeout=5) == RecvPacket(a.public_key, bytes([7]) * n)
                    await b.send(a.public_key, bytes([9]) * n)
                    assert await a.recv_packet(timeout=5) == RecvPacket(b.public_key, bytes([9]) * n)
                assert m1.links[normalize_relay_url(url1)].is_self
                assert r1.stats()["forwarded_out"] >= 3 and r2.stats()["forwarded_in"] >= 3
                await m1.set_peers([])  # peer removed: its forwarders go at once
                assert r1.server.lookup(b.public_key) is None
        finally:
            await m1.close()
            await m2.close()


async def test_wrong_mesh_key_reported_as_dial_error():
    errors = []
    async with serve_relay(mesh_key=KEY) as (url1, r1), serve_relay(mesh_key="other") as (url2, _):
        m1 = Mesh(r1, on_error=errors.append)
        try:
            await m1.set_peers([url2])
            await wait_for(lambda: m1.error() is not None)
            assert m1.error().startswith("Failed to dial peers: " + normalize_relay_url(url2))
            assert errors[-1] == m1.error()
        finally:
            await m1.close()
