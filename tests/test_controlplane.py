"""A replica's control plane in one process: mesh key from Postgres, peers discovered, relay URL warnings."""

import logging

import anyio
import pytest

from coordinator.core.settings import load_settings
from coordinator.core.urls import derp_url
from coordinator.replica import Replica
from testkit.polling import wait_for
from testkit.relayfix import serve_relay

pytestmark = pytest.mark.anyio


def settings(pg_url: str, relay_url: str = "", **extra):
    return load_settings({"pg_url": pg_url, "heartbeat": "300ms", "relay_url": relay_url, **extra}, environ={})


async def test_two_replicas_share_mesh_key_and_mesh(pg_url):
    async with serve_relay() as (url1, relay1), serve_relay() as (url2, relay2):
        r1 = Replica(settings(pg_url, url1.removesuffix("/derp")), relay=relay1)
        r2 = Replica(settings(pg_url, url2.removesuffix("/derp")), relay=relay2)
        async with r1.lifespan(), r2.lifespan():
            with anyio.fail_after(15):
                await r1.ready()
                await r2.ready()
            assert relay1.mesh_key and relay1.mesh_key == relay2.mesh_key  # created once, read by both
            await wait_for(lambda: r1.mesh.status().get(derp_url(url2), {}).get("connected"), 10)
            await wait_for(lambda: r2.mesh.status().get(derp_url(url1), {}).get("connected"), 10)
            status = r1.control.status()
            assert status["database"] and status["pubsub"] and status["peers"] == 1
        assert r1.stop_clean and r2.stop_clean


async def test_missing_relay_url_warns_when_peers_are_alive(pg_url, caplog):
    async with serve_relay() as (url1, relay1), serve_relay() as (_, relay2):
        r1 = Replica(settings(pg_url, url1.removesuffix("/derp")), relay=relay1)
        r2 = Replica(settings(pg_url), relay=relay2)
        async with r1.lifespan():
            await r1.ready()
            with caplog.at_level(logging.WARNING, logger="coordinator.controlplane"):
                async with r2.lifespan():
                    await wait_for(lambda: "COORDINATOR_DERP_SERVER_RELAY_URL is not set" in caplog.text, 10)
