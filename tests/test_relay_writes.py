"""The relay's direct socket writes (uvloop transports): order and integrity when the socket fills."""

import asyncio
import os

import pytest

from coordinator.relay.client import DerpClient
from testkit.relayfix import serve_relay

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
async def test_direct_socket_writes_keep_order_when_the_socket_fills(anyio_backend):
    """Under uvloop a flush goes straight to the socket until it fills, then through the transport:

    a receiver that stops reading for a while gets, once it reads again, an intact stream whose
    packets are in the order they were sent (the oldest may be dropped, never reordered).
    """
    async with serve_relay(queue_depth=1000, high_water=4 << 20) as (url, relay):
        async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
            assert type(b.transport).__module__ == "uvloop.loop"  # and so are the relay's, on this loop
            b.transport.pause_reading()
            body = os.urandom(16000)
            for i in range(400):  # 6.4 MB: far more than the sockets hold
                await a.send(b.public_key, i.to_bytes(4, "big") + body)
            await asyncio.sleep(0.3)
            b.transport.resume_reading()
            seen = []
            while len(seen) < 400:
                try:
                    frame = await b.recv_packet(timeout=2)
                except TimeoutError:
                    break
                assert frame.data[4:] == body
                seen.append(int.from_bytes(frame.data[:4], "big"))
            assert seen == sorted(seen) and len(set(seen)) == len(seen)
            assert seen[-1] == 399 and len(seen) > 100
            assert relay.stats()["packets_out"] >= len(seen)
