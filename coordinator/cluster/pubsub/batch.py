"""BatchPublisher: bursts sent as one statement (one transaction, one commit) instead of one per message.

It sees the pub/sub only through ``Sink`` (what ``Publisher`` offers): send a batch, send one message,
the publish deadline and backoff, the counters, and the listener's last error for messages.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Protocol

import psycopg

from coordinator.cluster.pubsub.errors import PublishError, PubSubError, QueueFull
from coordinator.cluster.pubsub.limits import check_channel, check_payload
from coordinator.cluster.pubsub.metrics import Metrics
from coordinator.cluster.pubsub.tasks import TaskOwner
from coordinator.core.errors import describe

log = logging.getLogger("coordinator.pubsub")


class Sink(Protocol):
    """What a BatchPublisher needs of the publish path."""

    timeout: float
    backoff: tuple[float, float]
    metrics: Metrics

    def last_error(self) -> str | None: ...
    async def send_batch(self, channels: list[str], texts: list[str]) -> None: ...
    async def notify(self, channel: str, text: str, size: int, *, count: bool) -> None: ...


class BatchPublisher:
    """Queue publishes and send each burst as one statement: one transaction, one commit.

    ``publish`` validates and queues; a background task sends what is queued, lingering
    ``flush_interval`` for more unless ``max_batch`` are already waiting. One sender, so messages
    leave (and arrive) in queue order; nothing is promised against ``PubSub.publish``.

    Nothing is lost silently. When the queue holds ``max_queue`` messages, ``publish`` waits for
    room up to the PubSub's ``publish_timeout`` and then raises QueueFull (the message was not
    queued). Queued messages are retried with backoff while Postgres is unreachable; ``close``
    waits up to ``close_timeout`` and logs and counts whatever it must give up. Postgres folds
    identical (channel, payload) pairs within one transaction, so a batch ends before a repeat.
    Made by ``PubSub.batcher()``, which closes it with the PubSub.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        max_queue: int = 8192,
        max_batch: int = 1000,
        flush_interval: float = 0.005,
        close_timeout: float = 15.0,
        on_close: Callable[[BatchPublisher], None] = lambda _: None,
    ):
        self._sink = sink
        self._max_queue, self._max_batch = max_queue, max_batch
        self._flush_interval, self._close_timeout = flush_interval, close_timeout
        self._on_close = on_close
        self._items: deque[tuple[str, str, int]] = deque()
        self._inflight = 0
        self._queued = 0  # messages ever queued
        self._done = 0  # messages sent or given up on
        self._failed = 0  # given up on since the last flush()
        self._flushing = 0
        self._kick = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks = TaskOwner()
        self._started = False
        self._closed = False

    @property
    def pending(self) -> int:
        """Messages queued or in flight."""
        return len(self._items) + self._inflight

    async def __aenter__(self) -> BatchPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the sender (``publish`` does this on first use)."""
        if not self._started:
            if self._closed:
                raise PubSubError("BatchPublisher is closed")
            self._tasks.spawn(self._run(), "pubsub-batcher")
            self._started = True

    async def publish(self, channel: str, payload: bytes | str) -> None:
        """Queue a message; raise InvalidChannel/InvalidPayload at once, QueueFull if no room in time."""
        check_channel(channel)
        text, size = check_payload(payload)
        if not self._started:
            await self.start()
        timeout = self._sink.timeout
        if len(self._items) >= self._max_queue and not self._closed:
            try:
                async with asyncio.timeout(timeout):
                    while len(self._items) >= self._max_queue and not self._closed:
                        self._kick.set()
                        await self._progress.wait()
            except TimeoutError:
                raise QueueFull(
                    f"batch queue full ({self._max_queue} messages) for {timeout:g}s;"
                    f" is Postgres reachable? last error: {self._sink.last_error()}"
                ) from None
        if self._closed:
            raise PubSubError("BatchPublisher is closed")
        self._items.append((channel, text, size))
        self._queued += 1
        self._kick.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued before this call is sent; raise PublishError if messages
        were given up on since the last flush, TimeoutError after ``timeout``."""
        target = self._queued
        self._flushing += 1
        self._kick.set()
        try:
            async with asyncio.timeout(timeout):
                while self._done < target:
                    await self._progress.wait()
        finally:
            self._flushing -= 1
        if self._failed:
            failed, self._failed = self._failed, 0
            raise PublishError(f"{failed} batched messages could not be sent (see log)")

    async def close(self) -> None:
        """Send what is queued (up to ``close_timeout``), then stop; unsent messages are logged."""
        if self._closed:
            return
        self._closed = True
        self._progress.set()  # wake publishers waiting for room: they now raise
        self._progress = asyncio.Event()
        try:
            if self._started:
                await self.flush(self._close_timeout)
        except (TimeoutError, PublishError) as exc:
            log.error("pubsub: batch publisher close: %s", describe(exc) or "flush timed out")
        finally:
            await self._tasks.aclose()
            lost = self.pending
            if lost:
                self._sink.metrics.batch_lost += lost
                log.error("pubsub: batch publisher closed with %d unsent messages", lost)
            self._items.clear()
            self._inflight = 0
            self._on_close(self)

    def _advance(self, n: int) -> None:
        self._done += n
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _take(self) -> list[tuple[str, str, int]]:
        batch: list[tuple[str, str, int]] = []
        seen: set[tuple[str, str, int]] = set()  # size follows from text: the item is the key
        items = self._items
        while items and len(batch) < self._max_batch:
            if items[0] in seen:
                break  # Postgres would deliver the repeat only once
            seen.add(items[0])
            batch.append(items.popleft())
        return batch

    async def _run(self) -> None:
        while True:
            while not self._items:
                self._kick.clear()
                await self._kick.wait()
            if self._flush_interval > 0 and len(self._items) < self._max_batch and not self._flushing:
                await asyncio.sleep(self._flush_interval)  # linger: let the burst gather
            batch = self._take()
            self._inflight = len(batch)
            try:
                await self._send(batch)
            finally:
                self._inflight = 0
            self._advance(len(batch))

    async def _send(self, batch: list[tuple[str, str, int]]) -> None:
        sink, m = self._sink, self._sink.metrics
        channels, texts = [c for c, _, _ in batch], [t for _, t, _ in batch]
        delay, most = sink.backoff
        failures = 0
        while True:
            try:
                await sink.send_batch(channels, texts)
            except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                # Connection-level trouble: keep the batch, retry until sent or closed.
                m.batch_fail += 1
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "pubsub: batch of %d not sent (attempt %d), retrying: %s", len(batch), failures, describe(exc)
                    )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(most, delay * 2)
                continue
            except psycopg.Error as exc:
                # The server refused something in it: send one by one so only the culprit is lost.
                m.batch_fail += 1
                log.warning("pubsub: batch of %d refused (%s); sending singly", len(batch), describe(exc))
                for channel, text, size in batch:
                    try:
                        await sink.notify(channel, text, size, count=False)
                        m.batch_messages += 1
                        m.published_bytes += size
                    except PublishError as err:
                        self._failed += 1
                        m.batch_lost += 1
                        log.error("pubsub: batched message on %r lost: %s", channel, describe(err))
                return
            m.batch_ok += 1
            m.batch_messages += len(batch)
            m.batch_size.observe(len(batch))
            m.published_bytes += sum(size for _, _, size in batch)
            return
