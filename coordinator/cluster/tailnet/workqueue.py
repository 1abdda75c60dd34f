"""A keyed work queue (Coder's ``workQ``): a key pending twice runs once, one job per key at a time.

Workers :meth:`acquire` a key, do the work, and :meth:`done` it. Bounded: past ``limit`` pending
keys the queue refuses more and tells the caller (who then schedules a full resync instead).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, limit: int):
        self.limit = limit
        self._pending: dict[K, None] = {}  # insertion-ordered set
        self._running: set[K] = set()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def enqueue(self, key: K) -> bool:
        """Schedule ``key``; False if the queue is full (nothing was added)."""
        if key in self._pending:
            return True
        if len(self._pending) >= self.limit:
            return False
        self._pending[key] = None
        self._wake.set()
        return True

    def clear(self) -> None:
        self._pending.clear()

    async def acquire(self) -> K:
        while True:
            for key in self._pending:
                if key not in self._running:
                    del self._pending[key]
                    self._running.add(key)
                    return key
            self._wake.clear()
            await self._wake.wait()

    def take_more(self, like: Callable[[K], bool], limit: int) -> list[K]:
        """Up to ``limit`` more pending keys that ``like`` accepts, now running (for one batched job)."""
        taken = [k for k in self._pending if like(k) and k not in self._running][:limit]
        for key in taken:
            del self._pending[key]
            self._running.add(key)
        return taken

    def done(self, key: K) -> None:
        self._running.discard(key)
        if key in self._pending:
            self._wake.set()
