"""Peers' node writes and lost marks, batched (Coder's binder): one statement for everything pending.

A peer's reader hands its node to :meth:`Binder.upsert` and waits until the row is written (so its
next request sees it). A peer whose connection broke is handed to :meth:`Binder.mark_lost`, which
does not wait. While one batch is being written the next one gathers, so a replica's round trips
stay flat however many peers update, or vanish, at once. One writer task keeps each peer's writes
in order: a node written after a lost mark cancels the mark, so a quick reconnect is never
overwritten by its old connection's mark.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from coordinator.cluster.tailnet.store import TailnetStore

log = logging.getLogger("coordinator.tailnet")

MAX_BATCH = 512  # nodes (or lost marks) per statement
RETRY_MAX = 5.0  # longest pause before retrying failed lost marks


class Binder:
    def __init__(self, store: TailnetStore, coordinator: uuid.UUID):
        self.store = store
        self.coordinator = coordinator
        self._pending: dict[uuid.UUID, tuple[str, asyncio.Future[None]]] = {}
        self._lost: dict[uuid.UUID, None] = {}  # insertion-ordered set of peers to mark lost
        self._wake = asyncio.Event()
        self.batches = 0
        self.written = 0
        self.marked_lost = 0

    async def upsert(self, peer: uuid.UUID, node: str) -> None:
        """Write ``peer``'s node (JSON text); raises what the batch's statement raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous = self._pending.get(peer)
        if previous is not None and not previous[1].done():
            previous[1].set_result(None)  # superseded before it was written (a replaced connection): newest wins
        self._pending[peer] = (node, future)
        self._lost.pop(peer, None)
        self._wake.set()
        await future

    def mark_lost(self, peer: uuid.UUID) -> None:
        """Mark ``peer``'s row here lost, soon (at most one pending mark per peer: bounded by the peers)."""
        self._lost[peer] = None
        self._wake.set()

    async def run(self) -> None:
        delay = 0.1
        while True:
            if not self._pending and not self._lost:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._pending:
                lost = list(self._lost)[:MAX_BATCH]
                try:
                    await self.store.mark_peers_lost(self.coordinator, lost)
                except Exception as exc:  # kept: retried after a pause (new nodes still go first)
                    log.debug("marking %d peers lost failed (%s); retrying", len(lost), exc)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX)
                    continue
                delay = 0.1
                for peer in lost:
                    self._lost.pop(peer, None)
                self.marked_lost += len(lost)
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
