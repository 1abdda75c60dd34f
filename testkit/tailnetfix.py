"""A raw WebSocket peer of the peer coordinator for tests (the library client is tested on its own).

:class:`RawPeer` connects to ``/api/v2/tailnet/coordinate`` with the ``websockets`` library, sends
protocol frames and records every frame it receives: the latest update per peer, every error and
the close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import websockets
from websockets.asyncio.client import ClientConnection, connect

from coordinator.cluster.tailnet.messages import COORDINATE_PATH
from testkit.polling import wait_for


def tailnet_token(pg_url: str) -> str:
    """The deployment's generated tailnet token, as stored by the replicas."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT value FROM site_config WHERE key = 'tailnet_token'").fetchone()
    assert row, "no tailnet token stored yet (has a replica joined?)"
    return row[0]


def ws_url(http_url: str, peer: uuid.UUID | str) -> str:
    return http_url.replace("http://", "ws://", 1) + f"{COORDINATE_PATH}?peer_id={peer}"


class RawPeer:
    """One peer connection; ``frames`` is everything received, ``latest[peer]`` the last update about each."""

    def __init__(self, base_url: str, token: str | None, peer_id: uuid.UUID | None = None):
        self.base_url = base_url
        self.token = token
        self.id = peer_id or uuid.uuid4()
        self.ws: ClientConnection | None = None
        self.frames: list[dict[str, Any]] = []
        self.latest: dict[uuid.UUID, dict[str, Any]] = {}
        self.errors: list[str] = []
        self.close_code: int | None = None
        self._reader: asyncio.Task | None = None

    async def connect(self, base_url: str | None = None) -> RawPeer:
        if base_url is not None:
            self.base_url = base_url
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        self.close_code = None
        self.ws = await connect(ws_url(self.base_url, self.id), additional_headers=headers, open_timeout=10)
        self._reader = asyncio.create_task(self._read(self.ws), name=f"raw peer {self.id}")
        return self

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                msg = json.loads(frame)
                self.frames.append(msg)
                if msg["type"] == "peer_update":
                    self.latest[uuid.UUID(msg["peer"])] = msg
                elif msg["type"] == "error":
                    self.errors.append(msg["message"])
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code if ws.close_code is not None else 1006

    async def send(self, frame: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def update(self, node: dict[str, Any]) -> None:
        await self.send({"type": "update", "node": node})

    async def add_tunnel(self, other: uuid.UUID) -> None:
        await self.send({"type": "add_tunnel", "peer": str(other)})

    async def remove_tunnel(self, other: uuid.UUID) -> None:
        await self.send({"type": "remove_tunnel", "peer": str(other)})

    def kind_of(self, other: uuid.UUID) -> str | None:
        msg = self.latest.get(other)
        return msg["kind"] if msg else None

    def node_of(self, other: uuid.UUID) -> dict[str, Any] | None:
        msg = self.latest.get(other)
        return msg.get("node") if msg and msg["kind"] == "node" else None

    async def wait_kind(self, other: uuid.UUID, kind: str, timeout: float = 10.0, **node_fields: Any) -> None:
        def seen() -> bool:
            if self.kind_of(other) != kind:
                return False
            node = self.node_of(other) or {}
            return all(node.get(k) == v for k, v in node_fields.items())

        await wait_for(seen, timeout, lambda: f"{self.id} to see {other} as {kind} {node_fields or ''}; "
                                              f"last: {self.latest.get(other)}")

    async def wait_closed(self, timeout: float = 10.0) -> int:
        await wait_for(lambda: self.close_code is not None, timeout, f"{self.id}'s connection to close")
        assert self.close_code is not None
        return self.close_code

    async def abort(self) -> None:
        """Break the connection without a close handshake (a crashed or cut-off peer)."""
        if self.ws is not None:
            self.ws.transport.abort()
        await self._stop_reader()

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception), anyio.move_on_after(2):
                await self.ws.close()
        await self._stop_reader()

    async def _stop_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._reader}, timeout=2)
            if not self._reader.done():
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader


@contextlib.asynccontextmanager
async def peers(*made: RawPeer) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for p in made:
            await p.close()


async def joined(url: str, token: str, seq: int = 1, **node) -> RawPeer:
    peer = await RawPeer(url, token).connect()
    await peer.update({"key": f"nodekey:{peer.id.hex}", "seq": seq, **node})
    return peer
