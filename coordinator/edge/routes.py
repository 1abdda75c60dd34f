"""The relay's HTTP routes: ``/derp`` (WebSocket through ASGI), probes, the DERP map and health checks.

Raw ``Upgrade: DERP`` (and fast-path WebSocket) connections never reach these routes: the protocol
in :mod:`coordinator.edge.protocol` hands them to the relay before ASGI sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.relay.dataplane import DerpRelay
from coordinator.relay.derpconfig import DerpMaps
from coordinator.relay.derpmap import PublishedMap

log = logging.getLogger("coordinator.app")

_CHALLENGE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
PROBE_HEADERS = {"Access-Control-Allow-Origin": "*"}


def relay_off(app) -> str | None:
    """Why this replica serves no DERP (``app.state.derp_off``: its embedded relay is off), else None."""
    return getattr(app.state, "derp_off", None)


def _not_here(reason: str) -> Response:
    return PlainTextResponse(reason + "\n", status_code=404, headers=PROBE_HEADERS)


async def derp_plain(request: Request) -> Response:
    """``/derp`` without an upgrade the relay could take (raw upgrades never reach the app)."""
    if (off := relay_off(request.app)) is not None:
        return _not_here(off)
    upgrade = request.headers.get("upgrade", "").lower()
    if upgrade in ("derp", "websocket"):
        return PlainTextResponse(
            "DERP upgrade needs the relay protocol: run uvicorn with --http coordinator.edge:DerpHttpProtocol "
            "(coordinator server does this)",
            status_code=426,
        )
    return PlainTextResponse("DERP requires connection upgrade", status_code=426)


async def probe(request: Request) -> Response:
    if (off := relay_off(request.app)) is not None:
        return _not_here(off)
    if request.method not in ("GET", "HEAD"):
        return PlainTextResponse("bogus probe method", status_code=405, headers=PROBE_HEADERS)
    return Response(status_code=200, headers=PROBE_HEADERS)


async def generate_204(request: Request) -> Response:
    headers = {"Cache-Control": "no-cache, no-store, must-revalidate, no-transform, max-age=0"}
    challenge = request.headers.get("x-tailscale-challenge", "")
    if _CHALLENGE.match(challenge):
        headers["X-Tailscale-Response"] = "response " + challenge
    return Response(status_code=204, headers=headers)


async def derpmap_default(request: Request) -> Response:
    """The deployment's ``tailcfg.DERPMap`` (public and cacheable; the same on every replica)."""
    source: DerpMaps | PublishedMap | None = getattr(request.app.state, "derp_map", None)
    published = source.published if isinstance(source, DerpMaps) else source
    if published is None or not published.body:
        reason = published.missing if published else "this app was built without settings"
        return PlainTextResponse(f"no DERP map: {reason}\n", status_code=404)
    headers = {"Cache-Control": "public, max-age=300", "ETag": published.etag}
    if published.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(published.body, media_type="application/json", headers=headers)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("OK")


async def robots(request: Request) -> Response:
    return PlainTextResponse("User-agent: *\nDisallow: /\n")


class _WebSocketTransport(asyncio.Transport):
    """Carries the DERP stream of an ASGI WebSocket into the relay when the fast path is not in use."""

    def __init__(self, websocket: WebSocket):
        super().__init__()
        self._ws = websocket
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._protocol = None
        self._closing = False
        self._buffered = 0

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def write(self, data) -> None:
        if self._closing or not data:
            return
        data = bytes(data)
        for i in range(0, len(data), 32768):  # Go clients read WS messages of at most 32 KiB
            chunk = data[i : i + 32768]
            self._buffered += len(chunk)
            self._out.put_nowait(chunk)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._out.put_nowait(None)

    abort = close

    async def pump_out(self) -> None:
        with contextlib.suppress(Exception):  # the client went away: the receive loop sees it too
            while (chunk := await self._out.get()) is not None:
                self._buffered -= len(chunk)
                await self._ws.send_bytes(chunk)
            await self._ws.close()


async def derp_websocket(websocket: WebSocket) -> None:
    if (off := relay_off(websocket.app)) is not None:
        await websocket.close(code=1008, reason=off[:120])  # a close reason is at most 123 bytes
        return
    relay: DerpRelay = websocket.app.state.derp_relay
    if "derp" not in websocket.scope.get("subprotocols", []):
        await websocket.close(code=1008, reason="client must speak the derp subprotocol")
        return
    await websocket.accept(subprotocol="derp")
    transport = _WebSocketTransport(websocket)
    client = websocket.client
    conn = relay.accept(transport, remote=(client.host, client.port) if client else None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(transport.pump_out, name="derp websocket sender")
        try:
            while not transport.is_closing():
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    conn.data_received(message["bytes"])
                elif message.get("text") is not None:
                    conn.close("text WebSocket message (DERP needs binary)", True)
        except WebSocketDisconnect:
            pass
        finally:
            conn.connection_lost(None)
            transport.close()  # the sender sends what is queued, then closes the WebSocket
            tg.cancel_scope.deadline = anyio.current_time() + 5


def relay_routes() -> list[BaseRoute]:
    """The DERP endpoints and health checks; they find the relay in ``app.state.derp_relay``."""
    any_method = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    return [
        Route("/derp", derp_plain, methods=any_method),
        WebSocketRoute("/derp", derp_websocket),
        Route("/derp/probe", probe, methods=any_method),
        Route("/derp/latency-check", probe, methods=any_method),
        Route("/generate_204", generate_204),
        Route("/derpmap/default", derpmap_default, methods=["GET", "HEAD"]),
        Route("/healthz", healthz),
        Route("/robots.txt", robots),
    ]


def create_app(relay: DerpRelay, *, extra_routes: list | None = None, lifespan=None,
               derp_map: DerpMaps | PublishedMap | None = None) -> Starlette:
    """The Starlette app of one replica, serving ``relay`` (and ``derp_map`` at /derpmap/default)."""

    @contextlib.asynccontextmanager
    async def relay_lifespan(app: Starlette):
        relay.start()
        try:
            if lifespan is not None:
                async with lifespan(app):
                    yield
            else:
                yield
        finally:
            relay.close()

    app = Starlette(routes=[*relay_routes(), *(extra_routes or [])], lifespan=relay_lifespan)
    app.state.derp_relay = relay
    app.state.derp_map = derp_map
    return app
