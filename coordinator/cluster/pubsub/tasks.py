"""The owner of the pub/sub's background tasks: every task it starts is cancelled and awaited on close.

Not an anyio task group: ``PubSub.start()`` and ``close()`` are separate calls (often from different
tasks, e.g. a Starlette lifespan), which a task group's ``async with`` cannot span.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("coordinator.pubsub")


class TaskOwner:
    """Starts named tasks, logs any that fail, and on ``aclose`` cancels and awaits all of them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._closed:
            coro.close()
            raise RuntimeError("task owner is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pubsub: task %s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        """Cancel every task (but the caller, if it is one of them) and wait for them to end."""
        self._closed = True
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
