"""A bounded stream of peer updates for one consumer of a tailnet client.

A consumer that falls behind is never given an unbounded queue: once ``limit`` updates wait, the
backlog is compacted to the newest update per peer (what the coordinator's own send queues do),
so the consumer still ends in the right state, only without the intermediate steps.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any
from uuid import UUID

from coordinator.cluster.tailnet.view import PeerUpdate, TailnetRefused


class PeerUpdates:
    """``async for update in client.updates()``; ends when the client closes (raises if it was refused)."""

    def __init__(self, limit: int, on_close: Callable[[PeerUpdates], Any]):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.coalesced = 0  # updates merged away because the consumer fell behind
        self._pending: deque[PeerUpdate] = deque()
        self._wakeup = asyncio.Event()
        self._ended = False
        self._failure: str | None = None
        self._on_close = on_close

    def put(self, update: PeerUpdate) -> None:
        if self._ended:
            return
        self._pending.append(update)
        if len(self._pending) > self.limit:
            self._compact()
        self._wakeup.set()

    def _compact(self) -> None:
        newest: dict[UUID, PeerUpdate] = {}
        for update in self._pending:
            newest.pop(update.peer, None)  # re-inserted last: the order is that of each peer's newest
            newest[update.peer] = update
        self.coalesced += len(self._pending) - len(newest)
        self._pending = deque(newest.values())
        self.limit = max(self.limit, 2 * len(self._pending))  # more peers than the limit: grow with them

    def end(self, failure: str | None = None) -> None:
        """No more updates: the iterator drains what is pending, then stops (or raises the failure)."""
        self._ended = True
        self._failure = failure
        self._wakeup.set()

    def close(self) -> None:
        """The consumer is done: stop collecting."""
        self.end()
        self._pending.clear()
        self._on_close(self)

    def __aiter__(self) -> PeerUpdates:
        return self

    async def __anext__(self) -> PeerUpdate:
        while not self._pending:
            if self._ended:
                self._on_close(self)
                if self._failure is not None:
                    raise TailnetRefused(self._failure)
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._pending.popleft()
