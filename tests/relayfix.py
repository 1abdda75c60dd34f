"""Test helpers: a real uvicorn serving the relay on a free port, in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import uvicorn

from coordinator.app import create_app
from coordinator.client import DerpClient
from coordinator.derp import DerpRelay
from coordinator.http import DerpHttpProtocol
from coordinator.keys import NodeKey


@contextlib.asynccontextmanager
async def serve_relay(*, ssl_certfile: str | None = None, ssl_keyfile: str | None = None, **tuning):
    """Yield ``(url, relay)`` for a relay served by uvicorn on 127.0.0.1:<free port>."""
    relay = DerpRelay(NodeKey.generate(), **tuning)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(relay), http=DerpHttpProtocol, lifespan="on", log_level="warning",
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # older uvicorn
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        scheme = "https" if ssl_certfile else "http"
        yield f"{scheme}://127.0.0.1:{port}/derp", relay
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()


async def routed(a: DerpClient, b: DerpClient, timeout: float = 10.0) -> None:
    """Wait until a's packets reach b: b's PeerPresent travels to a's replica over the mesh."""
    deadline = time.monotonic() + timeout
    while True:
        await a.send(b.public_key, b"probe")
        try:
            if (await b.recv_packet(timeout=0.05)).data == b"probe":
                return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError("packets never crossed the mesh") from None
