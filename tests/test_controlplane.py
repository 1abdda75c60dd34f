"""The control plane in one process: mesh key from Postgres, peers discovered, relay URL warnings."""

import logging

import pytest

from coordinator.config import load_settings
from coordinator.controlplane import ControlPlane
from coordinator.mesh import normalize_relay_url
from polling import wait_for
from relayfix import serve_relay

pytestmark = pytest.mark.anyio


async def test_two_replicas_share_mesh_key_and_mesh(pg_url, caplog):
    async with serve_relay() as (url1, relay1), serve_relay() as (url2, relay2):
        base = {"pg_url": pg_url, "heartbeat": "300ms"}
        s1 = load_settings({**base, "relay_url": url1.removesuffix("/derp")}, environ={})
        s2 = load_settings({**base, "relay_url": url2.removesuffix("/derp")}, environ={})
        c1, c2 = ControlPlane(s1, relay1, pg_url), ControlPlane(s2, relay2, pg_url)
        try:
            await c1.start()
            await c2.start()
            assert relay1.mesh_key and relay1.mesh_key == relay2.mesh_key  # created once, read by both
            await wait_for(lambda: c1.mesh.status().get(normalize_relay_url(url2), {}).get("connected"), 10)
            await wait_for(lambda: c2.mesh.status().get(normalize_relay_url(url1), {}).get("connected"), 10)
            assert c1.status()["database"] and c1.status()["pubsub"] and c1.status()["peers"] == 1
        finally:
            await c2.stop()
            await c1.stop()


async def test_missing_relay_url_warns_when_peers_are_alive(pg_url, caplog):
    async with serve_relay() as (url1, relay1), serve_relay() as (_, relay2):
        base = {"pg_url": pg_url, "heartbeat": "300ms"}
        c1 = ControlPlane(load_settings({**base, "relay_url": url1.removesuffix("/derp")}, environ={}), relay1, pg_url)
        c2 = ControlPlane(load_settings(base, environ={}), relay2, pg_url)
        try:
            await c1.start()
            with caplog.at_level(logging.WARNING, logger="coordinator.controlplane"):
                await c2.start()
                await wait_for(lambda: "COORDINATOR_DERP_SERVER_RELAY_URL is not set" in caplog.text, 10)
        finally:
            await c2.stop()
            await c1.stop()
