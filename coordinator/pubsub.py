"""Postgres LISTEN/NOTIFY pub/sub for the control plane (asyncio; psycopg's async API is asyncio-only).

Modelled on Coder's ``coderd/database/pubsub``: one dedicated LISTEN connection per ``PubSub``, one
LISTEN per channel fanned out to bounded per-subscriber queues, and a ``DroppedMessages`` signal so
subscribers can resync. Where Coder hurt its users this differs:

- The listener is checked actively (TCP keepalives plus a NOTIFY round trip every few seconds) and
  reconnects by itself with capped backoff. Nothing here ever exits the process: state is exposed
  through ``connected``, ``metrics`` and Prometheus instead of a watchdog that restarts every replica.
- LISTEN/UNLISTEN are applied by the task that owns the listener connection, reconciling the wanted
  channel set; subscribe/cancel races converge and can never deadlock against incoming notifications.
- A full subscriber queue keeps the oldest 2048 messages and reports the gap once, in order.
- Publishing while Postgres is down fails within ``publish_timeout``; publish connections are dialled
  on demand, so they recover as soon as Postgres does.
- ``BatchPublisher`` sends bursts as one statement (one commit) instead of one commit per message.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from psycopg import pq

from coordinator.db import Connection, shut_socket  # cancelling mid-query must never block the process

log = logging.getLogger("coordinator.pubsub")

MAX_PAYLOAD_BYTES = 8000  # Postgres rejects NOTIFY payloads of 8000 bytes or more (default build)
MAX_CHANNEL_BYTES = 63  # NAMEDATALEN - 1: LISTEN would silently truncate a longer name
QUEUE_SIZE = 2048  # unhandled messages buffered per subscriber (Coder's BufferSize)
COLOSSAL_BYTES = 7600  # 95% of the limit, labelled so operators notice payloads creeping up on it
# Binary parameters: psycopg dumps text arrays about twice as fast in binary as in text format.
BATCH_SQL = "SELECT pg_notify(c, p) FROM unnest(%b::text[], %b::text[]) AS t(c, p)"
_NOTIFY_SQL = "SELECT pg_notify(%s, %s)"
_LATENCY_BUCKETS = tuple(0.0005 * 2**i for i in range(16))  # 0.5 ms .. ~16 s, as Coder
_LISTEN_CHUNK = 200  # LISTEN statements per round trip when (re)subscribing many channels

Handler = Callable[[bytes], Awaitable[None] | None]
ErrHandler = Callable[[bytes | None, Exception | None], Awaitable[None] | None]
Cancel = Callable[[], Awaitable[None]]


class PubSubError(Exception):
    """Base class of this module's errors."""


class InvalidChannel(PubSubError, ValueError):
    """Channel name empty, longer than 63 bytes, containing NUL, or reserved."""


class InvalidPayload(PubSubError, ValueError):
    """Payload that Postgres cannot carry as NOTIFY text (not UTF-8, or containing NUL)."""


class PayloadTooLarge(InvalidPayload):
    """Payload of 8000 bytes or more: send an id and let the receiver query."""


class PublishError(PubSubError):
    """The message was not sent (Postgres unreachable, timeout, rejected); ``__cause__`` has details."""


class QueueFull(PublishError):
    """The batch queue stayed full for ``publish_timeout``; the message was not queued."""


class NotConnected(PubSubError):
    """The listener connection is down, or could not be opened at start."""


class DroppedMessages(Exception):  # noqa: N818 - named after Coder's ErrDroppedMessages
    """Given to ``subscribe_with_err`` handlers when messages may have been lost: resync from the database."""

    def __init__(self, channel: str, reason: str, count: int | None = None):
        self.channel, self.reason, self.count = channel, reason, count
        what = f"{count} message{'s' if count != 1 else ''}" if count else "messages"
        super().__init__(f"dropped {what} on channel {channel!r}: {reason}")


def check_channel(channel: str) -> str:
    """Return ``channel`` if Postgres can LISTEN on it exactly, else raise InvalidChannel."""
    if not isinstance(channel, str):
        raise InvalidChannel(f"channel must be str, not {type(channel).__name__}")
    return _check_channel_name(channel)


@functools.lru_cache(maxsize=4096)  # publishers reuse a few names, and this is on the per-message path
def _check_channel_name(channel: str) -> str:
    size = len(channel.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_CHANNEL_BYTES or "\x00" in channel:
        raise InvalidChannel(
            f"channel name must be 1-{MAX_CHANNEL_BYTES} bytes without NUL; got {size} bytes: {channel[:70]!r}"
        )
    return channel


def check_payload(payload: bytes | str) -> tuple[str, int]:
    """Return the payload as text and its size in bytes, or raise InvalidPayload / PayloadTooLarge."""
    if isinstance(payload, str):
        text = payload
        try:
            size = len(text) if text.isascii() else len(text.encode())
        except UnicodeEncodeError as exc:
            raise InvalidPayload(f"payload is not encodable as UTF-8: {exc}") from None
    elif isinstance(payload, bytes | bytearray | memoryview):
        raw = bytes(payload)
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise InvalidPayload(f"payload is not UTF-8 text: {exc}") from None
        size = len(raw)
    else:
        raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")
    if size >= MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload is {size} bytes; Postgres NOTIFY payloads must be under {MAX_PAYLOAD_BYTES} bytes"
            " (send ids and let the receiver query)"
        )
    if "\x00" in text:
        raise InvalidPayload("payload contains a NUL character, which Postgres text cannot hold")
    return text, size


def _listen_sql(verb: bytes, channel: str) -> bytes:
    # Bytes, not str: psycopg would encode str with the connection's encoding, which for a
    # SQL_ASCII database is ASCII and cannot carry every valid channel name.
    return verb + b' "' + channel.encode().replace(b'"', b'""') + b'"'


_abort = shut_socket  # a hung statement must not hold up close: its read returns EOF at once


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _describe(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Metrics:
    """Prometheus metrics of one PubSub.

    The per-message receive counters are plain ints exported by ``collect``: a prometheus_client
    ``inc`` costs a few microseconds, a sizeable share of delivering one notification.
    """

    def __init__(self, registry: CollectorRegistry):
        self.rx_normal = self.rx_colossal = self.rx_bytes = self.dropped = 0
        registry.register(self)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter("coordinator_pubsub_" + name, doc, labels, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge("coordinator_pubsub_" + name, doc, registry=registry)

        def hist(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram("coordinator_pubsub_" + name, doc, buckets=buckets, registry=registry)

        publishes = counter("publishes", "PubSub.publish calls by outcome.", ("success",))
        self.publish_ok, self.publish_fail = publishes.labels("true"), publishes.labels("false")
        subscribes = counter("subscribes", "subscribe calls by outcome.", ("success",))
        self.subscribe_ok, self.subscribe_fail = subscribes.labels("true"), subscribes.labels("false")
        self.published_bytes = counter("published_bytes", "Payload bytes published successfully.")
        self.reconnects = counter("reconnects", "Listener connections re-established after a loss.")
        self.disconnections = counter("disconnections", "Listener connections lost.")
        self.connected = gauge("connected", "1 if the listener is connected.")
        self.ping_failures = counter(
            "ping_failures", "Active listener checks that failed (listener torn down)."
        )
        self.send_latency = hist("send_latency_seconds", "Time for a latency probe's pg_notify to return.")
        self.recv_latency = hist(
            "receive_latency_seconds", "Time from a latency probe's publish to its receipt."
        )
        self.latency_measures = counter("latency_measures", "Latency measurements attempted.")
        self.latency_errs = counter("latency_measure_errs", "Latency measurements that failed.")
        flushes = counter(
            "batch_flushes", "Batches sent by BatchPublisher (one commit each), by outcome.", ("success",)
        )
        self.batch_ok, self.batch_fail = flushes.labels("true"), flushes.labels("false")
        self.batch_messages = counter("batch_messages", "Messages sent through BatchPublisher.")
        self.batch_lost = counter(
            "batch_lost_messages", "Queued messages BatchPublisher gave up on (logged)."
        )
        self.batch_size = hist(
            "batch_size", "Messages per batch.", (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
        )
        self.subscribers = gauge("current_subscribers", "Subscriptions.")
        self.events = gauge("current_events", "Channels LISTENed for subscribers.")
        self.batch_queue = gauge("batch_queue_depth", "Messages waiting in batch queues.")

    def collect(self) -> Iterator[CounterMetricFamily]:
        p = "coordinator_pubsub_"
        messages = CounterMetricFamily(
            p + "messages", "Notifications received, by size (colossal: >= 7600 bytes).", labels=("size",)
        )
        messages.add_metric(("normal",), self.rx_normal)
        messages.add_metric(("colossal",), self.rx_colossal)
        yield messages
        yield CounterMetricFamily(p + "received_bytes", "Payload bytes received.", value=self.rx_bytes)
        yield CounterMetricFamily(
            p + "dropped_messages",
            "Messages dropped because a subscriber's queue was full.",
            value=self.dropped,
        )


class _Gap:
    """Queue marker: messages were lost here."""

    __slots__ = ("reason", "count")

    def __init__(self, reason: str, count: int | None):
        self.reason, self.count = reason, count


class _Subscriber:
    """One subscription: a bounded FIFO of payloads and gap markers, drained by its own task."""

    def __init__(self, channel: str, handler: Callable[..., Any], with_err: bool, limit: int):
        self.channel, self.handler, self.with_err, self.limit = channel, handler, with_err, limit
        self.items: deque[bytes | _Gap] = deque()
        self.unhandled = 0  # queued payloads plus the one being handled: the bound Coder's tests count
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, payload: bytes) -> bool:
        if self.unhandled >= self.limit:
            tail = self.items[-1] if self.items else None
            if isinstance(tail, _Gap):
                tail.count = (tail.count or 0) + 1
            else:  # a new overflow episode: one marker, placed where the loss happened
                self.items.append(_Gap(f"subscriber queue full ({self.limit} unhandled)", 1))
                self._wake()
            return False
        self.unhandled += 1
        self.items.append(payload)
        self._wake()
        return True

    def gap(self, reason: str) -> None:
        tail = self.items[-1] if self.items else None
        if isinstance(tail, _Gap):
            tail.reason = reason
        else:
            self.items.append(_Gap(reason, None))
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
            args: tuple
            if isinstance(item, _Gap):
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


class _Publisher:
    """A few autocommit publish connections, dialled on demand.

    Not psycopg_pool: its reconnect backoff grows to minutes, so publishes would keep failing long
    after Postgres is back. Here a publish that finds no idle connection dials at once, bounded by
    the publish deadline, and a stuck statement is cut off by shutting its socket at the deadline.
    """

    def __init__(self, connect: Callable[[], Awaitable[psycopg.AsyncConnection]], size: int):
        self._connect = connect
        self._idle: list[psycopg.AsyncConnection] = []
        self._sem = asyncio.Semaphore(size)
        self._closed = False

    async def execute(self, query: str, params: tuple, timeout: float) -> None:
        loop = asyncio.get_running_loop()
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
                        conn = await self._connect()
                except TimeoutError:
                    raise TimeoutError(f"connecting took over {timeout:g}s") from None
            fired: list[bool] = []
            timer = loop.call_at(deadline, lambda: (fired.append(True), _abort(conn)))
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


class PubSub:
    """Postgres LISTEN/NOTIFY pub/sub: ``async with PubSub(url) as ps:`` or ``start()``/``close()``.

    Handlers run on the event loop, one task per subscription, in FIFO order. A plain function must
    not block (do slow work in a coroutine handler). While the listener is down, ``subscribe``
    returns at once and the channel is LISTENed when the connection is back; after every reconnect
    each ``subscribe_with_err`` handler gets ``(None, DroppedMessages)`` because notifications sent
    meanwhile are lost. Messages on one channel from one publishing task arrive in publish order.

    Options: ``publish_timeout`` bounds every publish; ``ping_interval``/``ping_timeout`` pace the
    active listener check (0 disables it); ``reconnect_min``/``reconnect_max`` bound the jittered
    reconnect backoff; ``keepalive_*`` are libpq's TCP keepalive settings; ``registry`` receives the
    ``coordinator_pubsub_*`` metrics (a private registry by default; one PubSub per registry).
    """

    def __init__(
        self,
        url: str,
        *,
        registry: CollectorRegistry | None = None,
        application_name: str = "coordinator-pubsub",
        queue_size: int = QUEUE_SIZE,
        publish_timeout: float = 5.0,
        publish_connections: int = 4,
        connect_timeout: float = 5.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        ping_interval: float = 3.0,
        ping_timeout: float = 3.0,
        keepalive_idle: int = 5,
        keepalive_interval: int = 2,
        keepalive_count: int = 3,
    ):
        self.url = url
        self.instance_id = uuid.uuid4().hex
        self.registry = registry if registry is not None else CollectorRegistry()
        self.application_name = f"{application_name}-listen-{self.instance_id[:12]}"
        # Private channel for latency probes and pings; unique so replicas never answer each other.
        self.latency_channel = f"coordinator_pubsub_latency_{self.instance_id}"
        self._queue_size = queue_size
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_min, self._reconnect_max = reconnect_min, reconnect_max
        self._ping_interval, self._ping_timeout = ping_interval, ping_timeout
        self._conn_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": keepalive_idle,
            "keepalives_interval": keepalive_interval,
            "keepalives_count": keepalive_count,
            # Also bound how long sent data may stay unacknowledged (the kernel then drops the connection).
            "tcp_user_timeout": (keepalive_idle + keepalive_interval * keepalive_count) * 1000,
        }
        self._publish_app = f"{application_name}-publish"
        self._m = _Metrics(self.registry)
        self._m.subscribers.set_function(lambda: sum(len(s) for s in self._channels.values()))
        self._m.events.set_function(lambda: len(self._channels))
        self._m.batch_queue.set_function(lambda: sum(b.pending for b in self._batchers))
        self._pub = _Publisher(self._connect_publisher, publish_connections)
        self._channels: dict[str, set[_Subscriber]] = {}
        self._batchers: set[BatchPublisher] = set()
        self._tasks: set[asyncio.Task] = set()
        self._probes: dict[bytes, asyncio.Future] = {}
        self._calls: deque[tuple[str, asyncio.Future]] = deque()
        self._listening: set[str] = set()
        self._want_gen = 0  # bumped on every change to the wanted channel set
        self._applied_gen = 0  # the listener connection reflects all changes up to this
        self._pass_event = asyncio.Event()
        self._wakeup: asyncio.Future | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._connected = False
        self._idle = False
        self._session_id = 0
        self._teardown_reason: str | None = None
        self._last_error: str | None = None
        self._disconnected_at: float | None = None
        self._first: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener_task: asyncio.Task | None = None
        self._ping_task: asyncio.Task | None = None
        self._closed = False

    # lifecycle

    async def __aenter__(self) -> PubSub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait: bool = True) -> None:
        """Start the listener. With ``wait``, return once it is connected, or raise NotConnected
        (and close) if the first attempt fails; without, keep trying in the background."""
        if self._closed:
            raise PubSubError("PubSub is closed")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._disconnected_at = time.monotonic()
        if wait:
            self._first = self._loop.create_future()
        self._listener_task = self._loop.create_task(self._run_listener(), name="pubsub-listener")
        if self._ping_interval > 0:
            self._ping_task = self._loop.create_task(self._run_pings(), name="pubsub-ping")
        if self._first is not None:
            try:
                await asyncio.shield(self._first)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Flush batchers, stop the listener and handlers, close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._first is not None and not self._first.done():  # a start() is still waiting
            self._first.set_exception(PubSubError("PubSub closed while starting"))
        for batcher in list(self._batchers):
            await batcher.close()
        if self._conn is not None and not self._idle:
            _abort(self._conn)  # don't let a hung statement hold up close
        me = asyncio.current_task()
        subs = [s for group in self._channels.values() for s in group]
        for sub in subs:
            sub.close()
        self._channels.clear()
        tasks = [
            t for t in (self._listener_task, self._ping_task, *self._tasks) if t is not None and t is not me
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, fut in self._calls:
            fut.cancel()
        await self._pub.close()
        self._m.connected.set(0)

    # public API

    @property
    def connected(self) -> bool:
        """True while the listener connection is up and LISTENing."""
        return self._connected

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the listener is connected; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while not self._connected:
                    await self._next_pass()
        except TimeoutError:
            return False
        return True

    async def subscribe(self, channel: str, handler: Handler) -> Cancel:
        """Call ``handler(payload: bytes)`` for each message on ``channel``; return an async cancel."""
        return await self._subscribe(channel, handler, with_err=False)

    async def subscribe_with_err(self, channel: str, handler: ErrHandler) -> Cancel:
        """Like ``subscribe``, but ``handler(payload, err)`` also gets ``(None, DroppedMessages)``
        when messages may have been lost (queue overflow, listener reconnect)."""
        return await self._subscribe(channel, handler, with_err=True)

    async def publish(self, channel: str, payload: bytes | str) -> None:
        """NOTIFY ``channel``; raise PublishError if not sent within ``publish_timeout``."""
        if self._closed:
            raise PubSubError("PubSub is closed")
        try:
            check_channel(channel)
            text, size = check_payload(payload)
        except PubSubError:
            self._m.publish_fail.inc()
            raise
        await self._notify(channel, text, size, count=True)

    def batcher(self, **kwargs: Any) -> BatchPublisher:
        """A BatchPublisher on this PubSub (closed with it); see BatchPublisher for options."""
        return BatchPublisher(self, **kwargs)

    async def listening_channels(self, *, include_internal: bool = False, timeout: float = 10.0) -> set[str]:
        """``pg_listening_channels()`` as seen by the listener connection itself."""
        rows = await self._listener_query("SELECT pg_listening_channels()", timeout)
        channels = {row[0] for row in rows}
        if not include_internal:
            channels.discard(self.latency_channel)
        return channels

    async def measure_latency(self, timeout: float = 10.0) -> tuple[float, float]:
        """Publish a probe on this instance's private channel; return (send, receive) seconds.

        send: until pg_notify returned; receive: until the listener got it. Raises NotConnected,
        PublishError or TimeoutError.
        """
        self._m.latency_measures.inc()
        try:
            if self._loop is None or not self._connected:
                raise NotConnected("listener is not connected")
            key, fut = self._new_probe()
            try:
                start = time.perf_counter()
                await self._notify(self.latency_channel, key.decode(), len(key), count=False)
                send = time.perf_counter() - start
                async with asyncio.timeout(max(0.0, timeout - send)):
                    await fut
                recv = time.perf_counter() - start
            finally:
                self._probes.pop(key, None)
        except BaseException:
            self._m.latency_errs.inc()
            raise
        self._m.send_latency.observe(send)
        self._m.recv_latency.observe(recv)
        return send, recv

    @property
    def metrics(self) -> dict[str, Any]:
        """A snapshot of state and counters (the same numbers as the Prometheus registry)."""

        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.registry.collect()
            if family.name.startswith("coordinator_pubsub_")
            for s in family.samples
        }

        def v(name: str, **labels: str) -> int:
            return int(samples.get(("coordinator_pubsub_" + name, tuple(sorted(labels.items()))), 0))

        down = self._disconnected_at
        return {
            "connected": self._connected,
            "disconnected_seconds": 0.0 if self._connected or down is None else time.monotonic() - down,
            "last_error": self._last_error,
            "channels": len(self._channels),
            "subscribers": sum(len(s) for s in self._channels.values()),
            "publishes": v("publishes_total", success="true"),
            "publish_errors": v("publishes_total", success="false"),
            "subscribes": v("subscribes_total", success="true"),
            "subscribe_errors": v("subscribes_total", success="false"),
            "messages_received": v("messages_total", size="normal") + v("messages_total", size="colossal"),
            "colossal_messages_received": v("messages_total", size="colossal"),
            "bytes_published": v("published_bytes_total"),
            "bytes_received": v("received_bytes_total"),
            "reconnects": v("reconnects_total"),
            "disconnections": v("disconnections_total"),
            "dropped_messages": v("dropped_messages_total"),
            "ping_failures": v("ping_failures_total"),
            "latency_measures": v("latency_measures_total"),
            "latency_measure_errors": v("latency_measure_errs_total"),
            "batches": v("batch_flushes_total", success="true"),
            "batch_errors": v("batch_flushes_total", success="false"),
            "batched_messages": v("batch_messages_total"),
            "batch_lost_messages": v("batch_lost_messages_total"),
        }

    # subscriptions

    async def _subscribe(self, channel: str, handler: Callable[..., Any], with_err: bool) -> Cancel:
        if self._closed or self._loop is None:
            raise PubSubError("PubSub is closed" if self._closed else "PubSub is not started")
        try:
            check_channel(channel)
            if channel == self.latency_channel:
                raise InvalidChannel(f"channel {channel!r} is reserved")
        except PubSubError:
            self._m.subscribe_fail.inc()
            raise
        sub = _Subscriber(channel, handler, with_err, self._queue_size)
        task = self._loop.create_task(sub.run(), name=f"pubsub-sub:{channel}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._channels.setdefault(channel, set()).add(sub)
        try:
            await self._apply()
            if sub.error is not None:
                raise PubSubError(f"LISTEN {channel!r} failed: {_describe(sub.error)}") from sub.error
        except BaseException:
            self._m.subscribe_fail.inc()
            if self._remove(sub):
                self._request_pass()  # no waiting here: this may be a cancellation
            raise
        self._m.subscribe_ok.inc()

        async def cancel() -> None:
            if self._remove(sub):
                await self._apply()

        return cancel

    def _remove(self, sub: _Subscriber) -> bool:
        """Drop ``sub``; True if that emptied its channel (an UNLISTEN is then due)."""
        if sub.closed:
            return False
        sub.close()
        group = self._channels.get(sub.channel)
        if group is None or sub not in group:
            return False
        group.discard(sub)
        if group:
            return False
        del self._channels[sub.channel]
        return True

    def _request_pass(self) -> int:
        self._want_gen += 1
        self._wake()
        return self._want_gen

    async def _apply(self) -> None:
        """Have the listener reconcile LISTENs; wait for it unless it is down (then reconnect does it)."""
        gen = self._request_pass()
        while self._applied_gen < gen and self._connected and not self._closed:
            await self._next_pass()

    async def _next_pass(self) -> None:
        await self._pass_event.wait()

    def _signal_pass(self) -> None:
        event, self._pass_event = self._pass_event, asyncio.Event()
        event.set()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # publishing

    async def _connect_publisher(self) -> psycopg.AsyncConnection:
        return await Connection.connect(
            self.url, application_name=self._publish_app, client_encoding="UTF8", **self._conn_kwargs
        )

    async def _notify(self, channel: str, text: str, size: int, *, count: bool) -> None:
        try:
            await self._pub.execute(_NOTIFY_SQL, (channel, text), self._publish_timeout)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if count:
                self._m.publish_fail.inc()
            raise PublishError(f"publish to {channel!r} failed: {_describe(exc)}") from exc
        if count:
            self._m.publish_ok.inc()
            self._m.published_bytes.inc(size)

    # the listener: one task owns the connection, so LISTEN/UNLISTEN and reads never interleave

    async def _run_listener(self) -> None:
        assert self._loop is not None
        attempt = 0
        ever_up = False
        while True:
            began = self._loop.time()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    conn = await Connection.connect(
                        self.url,
                        application_name=self.application_name,
                        prepare_threshold=None,
                        **self._conn_kwargs,
                    )
            except Exception as exc:
                attempt += 1
                self._last_error = f"connect: {_describe(exc)}"
                if self._first is not None and not self._first.done():
                    self._first.set_exception(NotConnected(f"cannot connect to Postgres: {_describe(exc)}"))
                if attempt == 1 or attempt % 10 == 0:
                    log.error(
                        "pubsub failed to connect to postgres (attempt %d): %s", attempt, _describe(exc)
                    )
                else:
                    log.debug(
                        "pubsub failed to connect to postgres (attempt %d): %s", attempt, _describe(exc)
                    )
            else:
                reason = "closed"
                try:
                    await self._session(conn, reconnect=ever_up)
                except (psycopg.Error, OSError) as exc:
                    reason = self._teardown_reason or _describe(exc)
                except Exception as exc:  # a bug here must not end the listener for good
                    log.exception("pubsub: listener failed")
                    reason = f"internal error: {exc!r}"
                finally:
                    was_up = await self._end_session(conn)
                attempt += 1
                self._last_error = reason
                if not was_up and self._first is not None and not self._first.done():
                    self._first.set_exception(NotConnected(f"listener setup failed: {reason}"))
                if was_up:
                    ever_up = True
                    self._m.disconnections.inc()
                    log.error("pubsub disconnected from postgres: %s", reason)
                    if self._loop.time() - began >= self._reconnect_max:
                        attempt = 1  # it was stable: start the backoff over
            # Jitter, so replicas that lost Postgres together do not all come back in the same instant.
            delay = min(self._reconnect_max, self._reconnect_min * 2 ** (attempt - 1))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self, conn: psycopg.AsyncConnection, *, reconnect: bool) -> None:
        assert self._loop is not None
        pg = conn.pgconn
        # Take libpq's notifications raw: psycopg's own handler decodes strictly with the connection
        # encoding, and a payload that doesn't decode (e.g. a SQL_ASCII database) would raise mid-read.
        pg.notify_handler = self._on_notify
        # In a SQL_ASCII database any bytes can be NOTIFYed, and converting them to another client
        # encoding makes the server end the connection (FATAL): there, take them as stored.
        server_enc = conn.info.parameter_status("server_encoding")
        want_enc = "SQL_ASCII" if server_enc == "SQL_ASCII" else "UTF8"
        self._conn = conn
        self._session_id += 1
        self._teardown_reason = None
        self._listening = set()
        # Pings start once connected; until then a stalled server is cut off by this timer.
        setup_timer = self._loop.call_later(self._connect_timeout, _abort, conn)
        try:
            if conn.info.parameter_status("client_encoding") != want_enc:
                await conn.execute(f"SET client_encoding TO '{want_enc}'".encode())
            await self._sync_listens(conn)
        finally:
            setup_timer.cancel()
        self._connected = True
        self._disconnected_at = None
        self._last_error = None
        self._m.connected.set(1)
        self._signal_pass()
        if reconnect:
            self._m.reconnects.inc()
            told = 0
            for group in self._channels.values():
                for sub in group:
                    if sub.with_err:
                        sub.gap("listener reconnected; notifications sent while it was down are lost")
                        told += 1
            log.warning(
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
            self._drain(pg)
            if pg.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("listener connection lost")
            self._wakeup = fut = self._loop.create_future()
            self._loop.add_reader(fd, _resolve, fut)
            self._idle = True
            try:
                await fut
            finally:
                self._idle = False
                self._wakeup = None
                self._loop.remove_reader(fd)

    async def _end_session(self, conn: psycopg.AsyncConnection) -> bool:
        was_up = self._connected
        self._connected = False
        self._conn = None
        if self._disconnected_at is None:
            self._disconnected_at = time.monotonic()
        self._m.connected.set(0)
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
        wanted = set(self._channels)
        wanted.add(self.latency_channel)
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
                log.error("pubsub: %s failed, dropping its subscribers: %s", sql.decode(), _describe(exc))
                for sub in self._channels.pop(channel, ()):
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
                fut.set_exception(PubSubError(f"listener query failed: {_describe(exc)}"))
            if conn.broken or conn.closed:
                raise
            return
        if not fut.done():
            fut.set_result(rows)

    async def _listener_query(self, sql: str, timeout: float) -> list[tuple]:
        if self._loop is None or not self._connected:
            raise NotConnected("listener is not connected")
        fut = self._loop.create_future()
        self._calls.append((sql, fut))
        self._wake()
        async with asyncio.timeout(timeout):
            return await fut

    def _drain(self, pg: pq.abc.PGconn) -> None:
        while (n := pg.notifies()) is not None:
            self._on_notify(n)

    def _on_notify(self, n: pq.PGnotify) -> None:
        # Runs inside psycopg's read loop: it must never raise.
        try:
            channel = n.relname.decode("utf-8", "surrogateescape")
            payload = n.extra
            if channel == self.latency_channel:
                fut = self._probes.get(payload)
                if fut is None:
                    log.warning("pubsub: received unexpected message on latency channel: %r", payload[:64])
                elif not fut.done():
                    fut.set_result(None)
                return
            size = len(payload)
            m = self._m
            if size < COLOSSAL_BYTES:
                m.rx_normal += 1
            else:
                m.rx_colossal += 1
            m.rx_bytes += size
            for sub in self._channels.get(channel, ()):
                if not sub.put(payload):
                    m.dropped += 1
        except Exception:
            log.exception("pubsub: failed to dispatch a notification")

    # active check: a NOTIFY round trip through the publish path, then an in-band probe

    def _new_probe(self) -> tuple[bytes, asyncio.Future]:
        assert self._loop is not None
        key = uuid.uuid4().hex.encode()
        fut = self._loop.create_future()
        self._probes[key] = fut
        return key, fut

    async def _run_pings(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval)
            if self._connected:
                try:
                    await self._ping()
                except Exception:
                    log.exception("pubsub: listener check failed unexpectedly")

    async def _ping(self) -> None:
        session = self._session_id
        key, fut = self._new_probe()
        try:
            start = time.perf_counter()
            try:
                await self._notify(self.latency_channel, key.decode(), len(key), count=False)
                published = True
                send = time.perf_counter() - start
            except PublishError as exc:
                published, why = False, f"ping publish failed ({_describe(exc)})"
            if published:
                if await _wait(fut, self._ping_timeout):
                    self._m.send_latency.observe(send)
                    self._m.recv_latency.observe(time.perf_counter() - start)
                    return
                why = f"ping not received within {self._ping_timeout:g}s"
            # No pong (or the publish path is down): is the listener connection itself answering?
            # Its reply also flushes any notification already on the wire.
            try:
                await self._listener_query("SELECT 1", self._ping_timeout)
            except (PubSubError, TimeoutError):
                why += f"; listener did not answer within {self._ping_timeout:g}s"
            else:
                if not published:
                    log.warning("pubsub: %s; the listener itself answers", why)
                    return
                if await _wait(fut, self._ping_timeout):
                    log.warning("pubsub: slow round trip (%s) but the listener answers", why)
                    return
                why += " although the listener answers"
        finally:
            self._probes.pop(key, None)
        if self._session_id == session and self._conn is not None:
            self._m.ping_failures.inc()
            self._teardown_reason = f"listener check failed: {why}"
            log.error("pubsub: listener check failed, reconnecting: %s", why)
            _abort(self._conn)


async def _wait(fut: asyncio.Future, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(fut)
    except TimeoutError:
        return False
    return True


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
    """

    def __init__(
        self,
        pubsub: PubSub,
        *,
        max_queue: int = 8192,
        max_batch: int = 1000,
        flush_interval: float = 0.005,
        close_timeout: float = 15.0,
    ):
        self._ps = pubsub
        self._max_queue, self._max_batch = max_queue, max_batch
        self._flush_interval, self._close_timeout = flush_interval, close_timeout
        self._items: deque[tuple[str, str, int]] = deque()
        self._inflight = 0
        self._queued = 0  # messages ever queued
        self._done = 0  # messages sent or given up on
        self._failed = 0  # given up on since the last flush()
        self._flushing = 0
        self._kick = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task | None = None
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
        if self._task is None:
            if self._closed or self._ps._closed:
                raise PubSubError("BatchPublisher is closed")
            self._ps._batchers.add(self)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pubsub-batcher")

    async def publish(self, channel: str, payload: bytes | str) -> None:
        """Queue a message; raise InvalidChannel/InvalidPayload at once, QueueFull if no room in time."""
        check_channel(channel)
        text, size = check_payload(payload)
        if self._task is None:
            await self.start()
        if len(self._items) >= self._max_queue and not self._closed:
            try:
                async with asyncio.timeout(self._ps._publish_timeout):
                    while len(self._items) >= self._max_queue and not self._closed:
                        self._kick.set()
                        await self._progress.wait()
            except TimeoutError:
                raise QueueFull(
                    f"batch queue full ({self._max_queue} messages) for {self._ps._publish_timeout:g}s;"
                    f" is Postgres reachable? last error: {self._ps._last_error}"
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
            if self._task is not None:
                await self.flush(self._close_timeout)
        except (TimeoutError, PublishError) as exc:
            log.error("pubsub: batch publisher close: %s", _describe(exc) or "flush timed out")
        finally:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            lost = self.pending
            if lost:
                self._ps._m.batch_lost.inc(lost)
                log.error("pubsub: batch publisher closed with %d unsent messages", lost)
            self._items.clear()
            self._inflight = 0
            self._ps._batchers.discard(self)

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
        ps, m = self._ps, self._ps._m
        params = ([c for c, _, _ in batch], [t for _, t, _ in batch])
        delay = ps._reconnect_min
        failures = 0
        while True:
            try:
                await ps._pub.execute(BATCH_SQL, params, ps._publish_timeout)
            except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                # Connection-level trouble: keep the batch, retry until sent or closed.
                m.batch_fail.inc()
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "pubsub: batch of %d not sent (attempt %d), retrying: %s",
                        len(batch),
                        failures,
                        _describe(exc),
                    )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(ps._reconnect_max, delay * 2)
                continue
            except psycopg.Error as exc:
                # The server refused something in it: send one by one so only the culprit is lost.
                m.batch_fail.inc()
                log.warning("pubsub: batch of %d refused (%s); sending singly", len(batch), _describe(exc))
                for channel, text, size in batch:
                    try:
                        await ps._notify(channel, text, size, count=False)
                        m.batch_messages.inc()
                        m.published_bytes.inc(size)
                    except PublishError as err:
                        self._failed += 1
                        m.batch_lost.inc()
                        log.error("pubsub: batched message on %r lost: %s", channel, _describe(err))
                return
            m.batch_ok.inc()
            m.batch_messages.inc(len(batch))
            m.batch_size.observe(len(batch))
            m.published_bytes.inc(sum(size for _, _, size in batch))
            return
