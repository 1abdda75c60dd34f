"""One subscription: a bounded FIFO of payloads and gap markers, drained by its own task."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from coordinator.cluster.pubsub.errors import DroppedMessages

log = logging.getLogger("coordinator.pubsub")


class Gap:
    """Queue marker: messages were lost here."""

    __slots__ = ("reason", "count")

    def __init__(self, reason: str, count: int | None):
        self.reason, self.count = reason, count


class Subscriber:
    """A full queue keeps the oldest ``limit`` messages and reports the gap once, where it happened."""

    def __init__(self, channel: str, handler: Callable[..., Any], with_err: bool, limit: int):
        self.channel, self.handler, self.with_err, self.limit = channel, handler, with_err, limit
        self.items: deque[bytes | Gap] = deque()
        self.unhandled = 0  # queued payloads plus the one being handled: the bound Coder's tests count
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, payload: bytes) -> bool:
        """Queue ``payload``; False if the queue is full (the loss is marked instead)."""
        if self.unhandled >= self.limit:
            tail = self.items[-1] if self.items else None
            if isinstance(tail, Gap):
                tail.count = (tail.count or 0) + 1
            else:  # a new overflow episode: one marker, placed where the loss happened
                self.items.append(Gap(f"subscriber queue full ({self.limit} unhandled)", 1))
                self._wake()
            return False
        self.unhandled += 1
        self.items.append(payload)
        self._wake()
        return True

    def gap(self, reason: str) -> None:
        """Mark that messages may have been lost (count unknown), e.g. across a reconnect."""
        tail = self.items[-1] if self.items else None
        if isinstance(tail, Gap):
            tail.reason = reason
        else:
            self.items.append(Gap(reason, None))
            self._wake()

    def close(self) -> None:
        self.closed = True
        self.items.clear()
        self.unhandled = 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        items, handler, with_err = self.items, self.handler, self.with_err
        while not self.closed:
            if not items:
                self._waiter = loop.create_future()
                await self._waiter
                self._waiter = None
                continue
            item = items.popleft()
            args: tuple[bytes | None, DroppedMessages | None] | tuple[bytes]
            if isinstance(item, Gap):
                err = DroppedMessages(self.channel, item.reason, item.count)
                if not with_err:
                    log.warning("pubsub: %s", err)
                    continue
                args = (None, err)
            else:
                args = (item, None) if with_err else (item,)
            try:  # inline rather than a helper coroutine: this is the per-message path
                result = handler(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("pubsub: handler for channel %r raised", self.channel)
            if args[0] is not None:
                self.unhandled -= 1  # only now: the message in the handler counts against the bound
