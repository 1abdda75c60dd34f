"""Peers' node writes, batched (Coder's binder): one upsert statement for every node pending.

A peer's reader hands its node to :meth:`Binder.upsert` and waits until the row is written (so its
next request sees it). While one batch is being written the next one gathers, so a replica's round
trips stay flat however many peers update at once. One writer task keeps each peer's writes in
order; a peer never has two nodes pending (its reader waits for the first).
"""

from __future__ import annotations

import asyncio
import uuid

from coordinator.cluster.tailnet.store import TailnetStore

MAX_BATCH = 512  # nodes per statement


class Binder:
    def __init__(self, store: TailnetStore, coordinator: uuid.UUID):
        self.store = store
        self.coordinator = coordinator
        self._pending: dict[uuid.UUID, tuple[str, asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self.batches = 0
        self.written = 0

    async def upsert(self, peer: uuid.UUID, node: str) -> None:
        """Write ``peer``'s node (JSON text); raises what the batch's statement raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous = self._pending.get(peer)
        if previous is not None and not previous[1].done():
            previous[1].set_result(None)  # superseded before it was written (a replaced connection): newest wins
        self._pending[peer] = (node, future)
        self._wake.set()
        await future

    async def run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = dict(list(self._pending.items())[:MAX_BATCH])
            for peer in batch:
                del self._pending[peer]
            try:
                await self.store.upsert_peers(self.coordinator, [(p, node) for p, (node, _) in batch.items()])
            except Exception as exc:
                for _, future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.batches += 1
            self.written += len(batch)
            for _, future in batch.values():
                if not future.done():
                    future.set_result(None)
