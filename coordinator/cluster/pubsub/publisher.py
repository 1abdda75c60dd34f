"""The publish path: a few autocommit connections dialled on demand, and NOTIFY through them.

Not psycopg_pool: its reconnect backoff grows to minutes, so publishes would keep failing long
after Postgres is back. Here a publish that finds no idle connection dials at once, bounded by
the publish deadline, and a stuck statement is cut off by shutting its socket at the deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

from coordinator.cluster.db import Connection, shut_socket
from coordinator.cluster.pubsub.errors import PublishError
from coordinator.cluster.pubsub.metrics import Metrics
from coordinator.core.errors import describe

# Binary parameters: psycopg dumps text arrays about twice as fast in binary as in text format.
BATCH_SQL = "SELECT pg_notify(c, p) FROM unnest(%b::text[], %b::text[]) AS t(c, p)"
_NOTIFY_SQL = "SELECT pg_notify(%s, %s)"


class Publisher:
    """Sends NOTIFYs within ``timeout``; also what a BatchPublisher sends through (see ``batch.Sink``)."""

    def __init__(
        self,
        url: str,
        conn_kwargs: dict[str, Any],
        *,
        size: int,
        timeout: float,
        backoff: tuple[float, float],
        metrics: Metrics,
        last_error: Callable[[], str | None],
    ):
        self._url, self._conn_kwargs = url, conn_kwargs
        self.timeout, self.backoff, self.metrics, self.last_error = timeout, backoff, metrics, last_error
        self._idle: list[psycopg.AsyncConnection] = []
        self._sem = asyncio.Semaphore(size)
        self._closed = False

    async def notify(self, channel: str, text: str, size: int, *, count: bool) -> None:
        """NOTIFY one already checked message; PublishError if not sent in time. ``count``: a user's publish."""
        m = self.metrics
        try:
            await self.execute(_NOTIFY_SQL, (channel, text))
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if count:
                m.publish_fail += 1
            raise PublishError(f"publish to {channel!r} failed: {describe(exc)}") from exc
        if count:
            m.publish_ok += 1
            m.published_bytes += size

    async def send_batch(self, channels: list[str], texts: list[str]) -> None:
        """NOTIFY all pairs in one statement (one commit); psycopg and socket errors are raised as such."""
        await self.execute(BATCH_SQL, (channels, texts))

    async def execute(self, query: str, params: tuple[object, ...]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.timeout
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._sem.acquire()
        except TimeoutError:
            raise TimeoutError(f"no publish connection free within {timeout:g}s") from None
        try:
            if self._idle:
                conn = self._idle.pop()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        conn = await Connection.connect(self._url, **self._conn_kwargs)
                except TimeoutError:
                    raise TimeoutError(f"connecting took over {timeout:g}s") from None
            fired: list[bool] = []

            def expire() -> None:
                fired.append(True)
                shut_socket(conn)

            timer = loop.call_at(deadline, expire)
            error: psycopg.Error | None = None
            try:
                await conn.execute(query, params)
            except psycopg.Error as exc:
                error = exc
            except BaseException:
                timer.cancel()
                await conn.close()  # cancelled mid-statement: state unknown
                raise
            timer.cancel()
            if fired:  # shut at the deadline: never reuse it, even if the reply won the race
                await conn.close()
                if error is not None:
                    raise TimeoutError(f"no reply within {timeout:g}s") from error
            else:
                await self._release(conn, failed=error is not None)
                if error is not None:
                    raise error
        finally:
            self._sem.release()

    async def _release(self, conn: psycopg.AsyncConnection, failed: bool) -> None:
        if conn.closed or conn.broken:
            await conn.close()
            if failed:  # its siblings probably died the same way; redial rather than fail on each
                await self.discard_idle()
        elif self._closed or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            await conn.close()
        else:
            self._idle.append(conn)

    async def discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        await self.discard_idle()
