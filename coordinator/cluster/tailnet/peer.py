"""One peer's WebSocket: read and apply its requests, write it its updates, tidy up when it goes.

The reader applies each request in order (a write to Postgres, whose trigger wakes every replica);
the writer drains the peer's coalescing :class:`SendQueue`. Anything that ends the connection —
the peer leaving, bad input, a slow reader, the coordinator turning unhealthy or stopping — goes
through :meth:`PeerConnection.kick`, so the error frame and the close are sent from one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
from starlette.websockets import WebSocket

from coordinator.cluster.tailnet.auth import PeerGrant
from coordinator.cluster.tailnet.mapper import Mapper, Outgoing, QueueFull, SendQueue
from coordinator.cluster.tailnet.messages import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    MAX_TUNNELS_PER_PEER,
    NODE,
    UPDATE_BURST,
    UPDATES_PER_SECOND,
    AddTunnel,
    Disconnect,
    ProtocolError,
    ReadyForHandshake,
    RemoveTunnel,
    Request,
    Update,
    encode_error,
    json_text,
    parse_request,
)

if TYPE_CHECKING:
    from coordinator.cluster.tailnet.core import TailnetCoordinator

log = logging.getLogger("coordinator.tailnet")

SEND_TIMEOUT = 10.0    # a peer that takes no frame for this long is closed (it reads too slowly)
CLOSE_TIMEOUT = 1.0    # sending the error and the close frame
WRITE_ATTEMPTS = 3     # tries of one database write before the peer is sent elsewhere
WARN_EVERY = 10.0      # seconds between warnings about failed writes (an outage fails thousands at once)
_warned = {"at": 0.0, "quiet": 0}


class PeerConnection:
    def __init__(self, coordinator: TailnetCoordinator, websocket: WebSocket, grant: PeerGrant):
        self.coordinator = coordinator
        self.ws = websocket
        self.grant = grant
        self.id = grant.peer_id
        self.tunnels: set[uuid.UUID] = set()
        self.mapper = Mapper()
        self.queue = SendQueue()
        self.wrote_node = False
        self.left = False  # sent disconnect
        self.close_code: int | None = None
        self.close_message: str | None = None
        self.write_on_close = True  # mark the peer lost when it goes (not when unhealthy or stopping)
        self._wake = asyncio.Event()
        self._scope = anyio.CancelScope()
        self._tokens = float(UPDATE_BURST)
        self._stamp = time.monotonic()

    # -- called by the coordinator ------------------------------------------------------------------

    def kick(self, code: int, message: str | None, *, write: bool = True) -> None:
        """End the connection with ``message`` (an error frame, unless None) and close ``code``."""
        if self.close_code is None:
            self.close_code, self.close_message = code, message
        if not write:
            self.write_on_close = False
        self._scope.cancel()

    def deliver(self, items: list[Outgoing]) -> None:
        try:
            for item in items:
                self.queue.put(item)
        except QueueFull as exc:
            self.coordinator.refused["slow_reader"] += 1
            self.kick(CLOSE_TRY_AGAIN, str(exc))
        if items:
            self._wake.set()

    # -- the connection ------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until the peer leaves or is kicked; always ends with the close frame sent (or the peer gone)."""
        c = self.coordinator
        c.register(self)
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._writer)
                    await self._reader()
                    tg.cancel_scope.cancel()
        finally:
            c.unregister(self)
            with anyio.CancelScope(shield=True):
                await self._finish()

    async def _finish(self) -> None:
        c = self.coordinator
        if self.close_code is not None:  # we end it: the reason first, the bookkeeping after
            with anyio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
                if self.close_message is not None:
                    await self.ws.send_text(encode_error(self.close_message))
                await self.ws.close(self.close_code)
        if (self.write_on_close and not self.left and self.wrote_node and c.binder is not None
                and c.healthy and not c.stopping and c.peers.get(self.id) is None):
            c.binder.mark_lost(self.id)  # batched with others' (a mass disconnect is a few statements)

    async def _reader(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self._throttle()
            raw = message.get("text")
            try:
                request = parse_request(raw if raw is not None else message.get("bytes") or b"", self.id)
                await self._apply(request)
            except ProtocolError as exc:
                self.coordinator.refused[exc.reason] += 1
                log.info("tailnet peer %s refused: %s", self.id, exc)
                self.kick(CLOSE_POLICY, str(exc))
                return
            if self.left:
                self.kick(CLOSE_NORMAL, None)
                return

    async def _throttle(self) -> None:
        """Read no faster than the peer's message budget (backpressure, not a close)."""
        now = time.monotonic()
        self._tokens = min(float(UPDATE_BURST), self._tokens + (now - self._stamp) * UPDATES_PER_SECOND)
        self._stamp = now
        if self._tokens < 1.0:
            self.coordinator.counts["throttled"] += 1
            await anyio.sleep((1.0 - self._tokens) / UPDATES_PER_SECOND)
            self._tokens, self._stamp = 1.0, time.monotonic()
        self._tokens -= 1.0

    async def _apply(self, request: Request) -> None:
        c = self.coordinator
        store = c.store
        assert store is not None
        if isinstance(request, Update):
            c.counts["updates_in"] += 1
            node = json_text(request.node)
            binder = c.binder
            assert binder is not None
            await self._write(lambda: binder.upsert(self.id, node))
            self.wrote_node = True
        elif isinstance(request, AddTunnel):
            dst = request.peer
            if dst not in self.tunnels:
                if len(self.tunnels) >= MAX_TUNNELS_PER_PEER:
                    raise ProtocolError("too_many_tunnels", f"add_tunnel: at most {MAX_TUNNELS_PER_PEER} tunnels per peer")
                if not self.grant.may_tunnel(dst):
                    raise ProtocolError("tunnel_forbidden", f"add_tunnel: this peer may not open a tunnel to {dst}")
            await self._write(lambda: store.add_tunnel(c.id, self.id, dst))
            self.tunnels.add(dst)
        elif isinstance(request, RemoveTunnel):
            await self._write(lambda: store.remove_tunnel(c.id, self.id, request.peer))
            self.tunnels.discard(request.peer)
        elif isinstance(request, ReadyForHandshake):
            await self._write(lambda: c.publish_handshake(self.id, request.peer))
        elif isinstance(request, Disconnect):
            await self._write(lambda: store.delete_peer(self.id, c.id))
            self.tunnels.clear()
            self.left = True

    async def _write(self, op: Callable[[], Awaitable[None]]) -> None:
        """Run one database write, retrying briefly; if it keeps failing, send the peer elsewhere."""
        delay = 0.1
        for attempt in range(WRITE_ATTEMPTS):
            try:
                await op()
                return
            except Exception as exc:
                if attempt == WRITE_ATTEMPTS - 1:
                    self.coordinator.refused["database_write"] += 1
                    now = time.monotonic()
                    if now - _warned["at"] >= WARN_EVERY:
                        log.warning("tailnet peer %s: database write failed %d times (%s); closing it "
                                    "(%d more peers closed so since the last warning)", self.id, WRITE_ATTEMPTS,
                                    " ".join(str(exc).split()), _warned["quiet"])
                        _warned["at"], _warned["quiet"] = now, 0
                    else:
                        _warned["quiet"] += 1
                    self.kick(CLOSE_TRY_AGAIN, "coordinator cannot write to PostgreSQL; reconnect", write=False)
                    await anyio.sleep_forever()  # the kick cancels us
                await anyio.sleep(delay)
                delay *= 2

    async def _writer(self) -> None:
        c = self.coordinator
        while True:
            item = self.queue.pop()
            if item is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                with anyio.fail_after(SEND_TIMEOUT):
                    await self.ws.send_text(item.frame)
            except TimeoutError:
                c.refused["slow_reader"] += 1
                self.kick(CLOSE_TRY_AGAIN, f"peer took no update for {SEND_TIMEOUT:g} s")
                return
            except Exception:  # the connection is gone; the reader sees the disconnect too
                self._scope.cancel()
                return
            if item.kind == NODE:
                c.sent(item.updated_at)
            else:
                c.counts["updates_out"] += 1
