"""The listener: one task owns the LISTEN connection, so LISTEN/UNLISTEN and reads never interleave.

Subscribers change the wanted channel set and bump a generation; the owning task reconciles the
connection's LISTENs with it between reads, so subscribe/cancel races converge and can never deadlock
against incoming notifications. A lost connection is redialled with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

from coordinator.cluster.db import Connection, shut_socket
from coordinator.cluster.pgerrors import CauseChanges, explain
from coordinator.cluster.pubsub.errors import NotConnected, PubSubError
from coordinator.cluster.pubsub.metrics import Metrics
from coordinator.cluster.pubsub.publisher import Publisher
from coordinator.cluster.pubsub.queue import Subscriber
from coordinator.core.errors import describe

log = logging.getLogger("coordinator.pubsub")

_LISTEN_CHUNK = 200  # LISTEN statements per round trip when (re)subscribing many channels


def _listen_sql(verb: bytes, channel: str) -> bytes:
    # Bytes, not str: psycopg would encode str with the connection's encoding, which for a
    # SQL_ASCII database is ASCII and cannot carry every valid channel name.
    return verb + b' "' + channel.encode().replace(b'"', b'""') + b'"'


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Listener:
    """The LISTEN connection, the channel → subscribers table it feeds, and its state."""

    def __init__(
        self,
        url: str,
        conn_kwargs: dict[str, Any],
        *,
        application_name: str,
        internal_channel: str,
        on_internal: Callable[[bytes], None],
        connect_timeout: float,
        backoff: tuple[float, float],
        metrics: Metrics,
        publisher: Publisher,
    ):
        self._url, self._conn_kwargs, self._application_name = url, conn_kwargs, application_name
        self._internal, self._on_internal = internal_channel, on_internal
        self._connect_timeout = connect_timeout
        self._reconnect_min, self._reconnect_max = backoff
        self._m, self._pub = metrics, publisher
        self.channels: dict[str, set[Subscriber]] = {}
        self.connected = False
        self.session_id = 0
        self.last_error: str | None = None
        self.disconnected_at: float | None = time.monotonic()
        self.closed = False
        self._calls: deque[tuple[str, asyncio.Future[list[tuple[Any, ...]]]]] = deque()
        self._listening: set[str] = set()
        self._want_gen = 0  # bumped on every change to the wanted channel set
        self._applied_gen = 0  # the listener connection reflects all changes up to this
        self._pass_event = asyncio.Event()
        self._wakeup: asyncio.Future[None] | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._idle = False
        self._teardown_reason: str | None = None
        self._quiet_teardown = False  # a planned redial: log it at DEBUG only
        self._causes = CauseChanges()  # a failure with a newly known cause is logged whatever the attempt
        self._first: asyncio.Future[None] | None = None

    # what the facade and the liveness check ask of it

    def expect_first(self) -> asyncio.Future[None]:
        """A future that the first connection attempt resolves (or fails with NotConnected)."""
        self._first = asyncio.get_running_loop().create_future()
        return self._first

    def close(self) -> None:
        """Stop taking work; cut a statement in progress so the owning task can be cancelled at once."""
        self.closed = True
        if self._first is not None and not self._first.done():  # a start() is still waiting
            self._first.set_exception(PubSubError("PubSub closed while starting"))
        if self._conn is not None and not self._idle:
            shut_socket(self._conn)  # don't let a hung statement hold up close

    def cancel_calls(self) -> None:
        for _, fut in self._calls:
            fut.cancel()

    def tear_down(self, session: int, reason: str, *, quiet: bool = False) -> bool:
        """Cut connection ``session`` (if it is still the current one) so it is redialled; True if cut.

        ``quiet``: a planned redial whose cause was already logged; its disconnect and reconnect go to DEBUG.
        """
        if self.session_id != session or self._conn is None:
            return False
        self._teardown_reason = reason
        self._quiet_teardown = quiet
        shut_socket(self._conn)
        return True

    async def query(self, sql: str, timeout: float) -> list[tuple[Any, ...]]:
        """Run ``sql`` on the listener connection itself, between reads."""
        if not self.connected:
            raise NotConnected("listener is not connected")
        fut: asyncio.Future[list[tuple[Any, ...]]] = asyncio.get_running_loop().create_future()
        self._calls.append((sql, fut))
        self._wake()
        async with asyncio.timeout(timeout):
            return await fut

    def remove(self, sub: Subscriber) -> bool:
        """Drop ``sub``; True if that emptied its channel (an UNLISTEN is then due)."""
        if sub.closed:
            return False
        sub.close()
        group = self.channels.get(sub.channel)
        if group is None or sub not in group:
            return False
        group.discard(sub)
        if group:
            return False
        del self.channels[sub.channel]
        return True

    def request_pass(self) -> int:
        self._want_gen += 1
        self._wake()
        return self._want_gen

    async def apply(self) -> None:
        """Have the listener reconcile LISTENs; wait for it unless it is down (then reconnect does it)."""
        gen = self.request_pass()
        while self._applied_gen < gen and self.connected and not self.closed:
            await self._pass_event.wait()

    async def wait_connected(self, timeout: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await self._pass_event.wait()
        except TimeoutError:
            return False
        return True

    def _signal_pass(self) -> None:
        event, self._pass_event = self._pass_event, asyncio.Event()
        event.set()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail_first(self, exc: Exception) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)

    # the owning task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        ever_up = False
        while True:
            began = loop.time()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    conn = await Connection.connect(
                        self._url,
                        application_name=self._application_name,
                        prepare_threshold=None,
                        **self._conn_kwargs,
                    )
            except Exception as exc:
                attempt += 1
                self.last_error = f"connect: {describe(exc)}"
                self._fail_first(NotConnected(f"cannot connect to Postgres: {describe(exc)}"))
                new_cause = self._causes.new(exc)
                level = logging.ERROR if attempt == 1 or attempt % 10 == 0 or new_cause else logging.DEBUG
                log.log(level, "pubsub failed to connect to postgres (attempt %d): %s; retrying with backoff", attempt,
                        explain(exc, self._url))
            else:
                reason = "closed"
                quiet, self._quiet_teardown = self._quiet_teardown, False
                try:
                    await self._session(conn, reconnect=ever_up, quiet=quiet)
                except (psycopg.Error, OSError) as exc:
                    reason = self._teardown_reason or describe(exc)
                except Exception as exc:  # a bug here must not end the listener for good
                    log.exception("pubsub: listener failed")
                    reason = f"internal error: {exc!r}"
                finally:
                    was_up = await self._end_session(conn)
                attempt += 1
                self.last_error = reason
                if not was_up:
                    self._fail_first(NotConnected(f"listener setup failed: {reason}"))
                    new_cause = self._causes.new(reason)
                    level = logging.ERROR if attempt == 1 or attempt % 10 == 0 or new_cause else logging.DEBUG
                    log.log(level, "pubsub listener setup failed (attempt %d): %s; retrying with backoff", attempt,
                            explain(reason, self._url))
                if was_up:
                    ever_up = True
                    self._m.disconnections += 1
                    level = logging.DEBUG if self._quiet_teardown else logging.ERROR
                    log.log(level, "pubsub disconnected from postgres: %s", reason)
                    if loop.time() - began >= self._reconnect_max:
                        attempt = 1  # it was stable: start the backoff over
            # Jitter, so replicas that lost Postgres together do not all come back in the same instant.
            delay = min(self._reconnect_max, self._reconnect_min * 2 ** (attempt - 1))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self, conn: psycopg.AsyncConnection, *, reconnect: bool, quiet: bool = False) -> None:
        loop = asyncio.get_running_loop()
        pg = conn.pgconn
        # Take libpq's notifications raw: psycopg's own handler decodes strictly with the connection
        # encoding, and a payload that doesn't decode (e.g. a SQL_ASCII database) would raise mid-read.
        pg.notify_handler = self._on_notify
        # In a SQL_ASCII database any bytes can be NOTIFYed, and converting them to another client
        # encoding makes the server end the connection (FATAL): there, take them as stored.
        server_enc = conn.info.parameter_status("server_encoding")
        want_enc = "SQL_ASCII" if server_enc == "SQL_ASCII" else "UTF8"
        self._conn = conn
        self.session_id += 1
        self._teardown_reason = None
        self._listening = set()
        # Pings start once connected; until then a stalled server is cut off by this timer.
        setup_timer = loop.call_later(self._connect_timeout, shut_socket, conn)
        try:
            if conn.info.parameter_status("client_encoding") != want_enc:
                await conn.execute(f"SET client_encoding TO '{want_enc}'".encode())
            # A standby refuses LISTEN channel by channel, which would drop every subscriber: refuse it whole.
            cur = await conn.execute(b"SELECT pg_is_in_recovery()")
            if (await cur.fetchone() or (False,))[0]:
                raise psycopg.OperationalError("the server is a read-only standby (in recovery); LISTEN needs the primary")
            await self._sync_listens(conn)
        finally:
            setup_timer.cancel()
        self.connected = True
        self.disconnected_at = None
        self.last_error = None
        self._causes.reset()
        self._m.connected = True
        self._signal_pass()
        if reconnect:
            self._m.reconnects += 1
            told = 0
            for group in self.channels.values():
                for sub in group:
                    if sub.with_err:
                        sub.gap("listener reconnected; notifications sent while it was down are lost")
                        told += 1
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "pubsub reconnected to postgres; %d subscribers told to resync, plain subscribers may have missed messages",
                told,
            )
        else:
            log.info("pubsub connected to postgres")
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        fd = pg.socket
        while True:
            if self._applied_gen != self._want_gen:
                await self._sync_listens(conn)
                continue
            if self._calls:
                await self._run_call(conn)
                continue
            # libpq may hold notifications read along with the last reply: parse them before sleeping.
            pg.consume_input()
            while (n := pg.notifies()) is not None:
                self._on_notify(n)
            if pg.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("listener connection lost")
            self._wakeup = fut = loop.create_future()
            loop.add_reader(fd, _resolve, fut)
            self._idle = True
            try:
                await fut
            finally:
                self._idle = False
                self._wakeup = None
                loop.remove_reader(fd)

    async def _end_session(self, conn: psycopg.AsyncConnection) -> bool:
        was_up = self.connected
        self.connected = False
        self._conn = None
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        self._m.connected = False
        while self._calls:
            _, fut = self._calls.popleft()
            if not fut.done():
                fut.set_exception(NotConnected("listener connection lost"))
        self._signal_pass()
        try:
            conn.pgconn.notify_handler = None
            await conn.close()
            await self._pub.discard_idle()  # they most likely died with the listener: redial
        except Exception:  # never let cleanup stop the reconnect loop
            log.exception("pubsub: error while closing a lost connection")
        return was_up

    async def _sync_listens(self, conn: psycopg.AsyncConnection) -> None:
        target = self._want_gen
        wanted = set(self.channels)
        wanted.add(self._internal)
        stmts = [(c, _listen_sql(b"LISTEN", c)) for c in wanted - self._listening]
        stmts += [(c, _listen_sql(b"UNLISTEN", c)) for c in self._listening - wanted]
        for i in range(0, len(stmts), _LISTEN_CHUNK):
            chunk = stmts[i : i + _LISTEN_CHUNK]
            try:
                await conn.execute(b"; ".join(sql for _, sql in chunk))
            except psycopg.Error:
                if conn.broken or conn.closed:
                    raise
                await self._listen_singly(conn, chunk)
        self._listening = wanted
        self._applied_gen = target
        self._signal_pass()

    async def _listen_singly(self, conn: psycopg.AsyncConnection, stmts: list[tuple[str, bytes]]) -> None:
        """The server refused a chunk (e.g. a name its encoding can't hold): isolate the culprit."""
        for channel, sql in stmts:
            try:
                await conn.execute(sql)
            except psycopg.Error as exc:
                if conn.broken or conn.closed:
                    raise
                log.error("pubsub: %s failed, dropping its subscribers: %s", sql.decode(), describe(exc))
                for sub in self.channels.pop(channel, ()):
                    sub.error = exc
                    sub.close()

    async def _run_call(self, conn: psycopg.AsyncConnection) -> None:
        sql, fut = self._calls.popleft()
        if fut.done():
            return
        try:
            cur = await conn.execute(sql)
            rows = await cur.fetchall() if cur.description else []
        except Exception as exc:
            if not fut.done():
                fut.set_exception(PubSubError(f"listener query failed: {describe(exc)}"))
            if conn.broken or conn.closed:
                raise
            return
        if not fut.done():
            fut.set_result(rows)

    def _on_notify(self, n: pq.PGnotify) -> None:
        # Runs inside psycopg's read loop: it must never raise.
        try:
            channel = n.relname.decode("utf-8", "surrogateescape")
            payload = n.extra
            if channel == self._internal:
                self._on_internal(payload)
                return
            m = self._m
            m.received(len(payload))
            for sub in self.channels.get(channel, ()):
                if not sub.put(payload):
                    m.dropped += 1
        except Exception:
            log.exception("pubsub: failed to dispatch a notification")
