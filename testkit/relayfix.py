"""Test helpers: a real uvicorn serving the relay (or any ASGI app) on a free port, in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import anyio
import uvicorn

from coordinator.core.keys import NodeKey
from coordinator.edge.protocol import DerpHttpProtocol
from coordinator.edge.routes import create_app
from coordinator.relay.client import DerpClient, RecvPacket
from coordinator.relay.dataplane import DerpRelay
from testkit.polling import wait_for


@contextlib.asynccontextmanager
async def serve_app(app, *, port: int = 0, **config):
    """Yield the port of ``app`` served by uvicorn on 127.0.0.1 (``port`` 0: a free one)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=1,
                                           **config))
    server.install_signal_handlers = lambda: None  # older uvicorn
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started or task.done(), 10, "uvicorn to start")
        if task.done():
            task.result()
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            with anyio.fail_after(10):
                await task
        sock.close()


@contextlib.asynccontextmanager
async def serve_relay(*, ssl_certfile: str | None = None, ssl_keyfile: str | None = None, **tuning):
    """Yield ``(url, relay)`` for a relay served by uvicorn on 127.0.0.1:<free port>."""
    relay = DerpRelay(NodeKey.generate(), **tuning)
    async with serve_app(create_app(relay), http=DerpHttpProtocol, ssl_certfile=ssl_certfile,
                         ssl_keyfile=ssl_keyfile) as port:
        scheme = "https" if ssl_certfile else "http"
        yield f"{scheme}://127.0.0.1:{port}/derp", relay


async def routed(a: DerpClient, b: DerpClient, timeout: float = 10.0) -> None:
    """Wait until a's packets reach b: b's PeerPresent travels to a's replica over the mesh."""
    async def crossed() -> bool:
        await a.send(b.public_key, b"probe")
        return (await b.recv_packet(timeout=0.05)).data == b"probe"

    await wait_for(crossed, timeout, "packets to cross the mesh", 0, ignore=(TimeoutError,))


SIZES = [0, 1, 100, 1000, 16000, 32767, 32768, 40000, 65536]  # around the 32 KiB WebSocket message limit


async def exchange(a: DerpClient, b: DerpClient, sizes: list[int] = SIZES) -> None:
    """Send every size a->b and b->a and check content and source key."""
    for src, dst in ((a, b), (b, a)):
        payloads = [os.urandom(n) for n in sizes]
        for p in payloads:
            await src.send(dst.public_key, p)
        for p in payloads:
            frame = await dst.recv_packet(timeout=5)
            assert frame == RecvPacket(src.public_key, p)


async def raw_socket(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the relay at ``url`` (http://127.0.0.1:PORT/...), for hand-made bytes."""
    port = int(url.split(":")[2].split("/")[0])
    return await asyncio.open_connection("127.0.0.1", port)
