"""PubSub: the facade that wires limits, metrics, publisher, listener, liveness and subscriptions together."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from coordinator.cluster.pubsub.batch import BatchPublisher
from coordinator.cluster.pubsub.errors import InvalidChannel, PubSubError
from coordinator.cluster.pubsub.limits import QUEUE_SIZE, check_channel, check_payload
from coordinator.cluster.pubsub.listener import Listener
from coordinator.cluster.pubsub.liveness import Liveness
from coordinator.cluster.pubsub.metrics import Metrics
from coordinator.cluster.pubsub.pgconn import connection_kwargs
from coordinator.cluster.pubsub.publisher import Publisher
from coordinator.cluster.pubsub.queue import Subscriber
from coordinator.cluster.pubsub.tasks import TaskOwner
from coordinator.core.errors import describe

Handler = Callable[[bytes], Awaitable[None] | None]
ErrHandler = Callable[[bytes | None, Exception | None], Awaitable[None] | None]
Cancel = Callable[[], Awaitable[None]]


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
    Every task it starts (listener, check, one per subscription, batchers) ends in ``close``.
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
        listen_url: str | None = None,
    ):
        self.url = url
        self.listen_url = listen_url or url  # a direct URL when ``url`` goes through a transaction pooler
        self.instance_id = uuid.uuid4().hex
        self.registry = registry if registry is not None else CollectorRegistry()
        self.application_name = f"{application_name}-listen-{self.instance_id[:12]}"
        # Private channel for latency probes and pings; unique so replicas never answer each other.
        self.latency_channel = f"coordinator_pubsub_latency_{self.instance_id}"
        self._queue_size = queue_size
        backoff = (reconnect_min, reconnect_max)
        kwargs = connection_kwargs(connect_timeout, keepalive_idle, keepalive_interval, keepalive_count)
        self._batchers: set[BatchPublisher] = set()
        self._m = Metrics(
            self.registry,
            subscribers=lambda: sum(len(s) for s in self._listener.channels.values()),
            channels=lambda: len(self._listener.channels),
            batch_queue=lambda: sum(b.pending for b in self._batchers),
        )
        self._pub = Publisher(
            url,
            # No server-side prepared statements: a transaction pooler gives each NOTIFY another session.
            {**kwargs, "application_name": f"{application_name}-publish", "client_encoding": "UTF8",
             "prepare_threshold": None},
            size=publish_connections,
            timeout=publish_timeout,
            backoff=backoff,
            metrics=self._m,
            last_error=lambda: self._listener.last_error,
        )
        self._liveness = Liveness(
            self.latency_channel, interval=ping_interval, timeout=ping_timeout, metrics=self._m, publisher=self._pub
        )
        self._listener = Listener(
            self.listen_url,
            kwargs,
            application_name=self.application_name,
            internal_channel=self.latency_channel,
            on_internal=self._liveness.received,
            connect_timeout=connect_timeout,
            backoff=backoff,
            metrics=self._m,
            publisher=self._pub,
        )
        self._liveness.listener = self._listener
        self._liveness.own_listen_url = self.listen_url != url
        self._tasks = TaskOwner()
        self._started = False
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
        if self._started:
            return
        self._started = True
        first = self._listener.expect_first() if wait else None
        self._tasks.spawn(self._listener.run(), "pubsub-listener")
        if self._liveness.interval > 0:
            self._tasks.spawn(self._liveness.run(), "pubsub-ping")
        if first is not None:
            try:
                await asyncio.shield(first)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Flush batchers, stop the listener and handlers, close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        listener = self._listener
        listener.close()
        for batcher in list(self._batchers):
            await batcher.close()
        for group in listener.channels.values():
            for sub in group:
                sub.close()
        listener.channels.clear()
        await self._tasks.aclose()
        listener.cancel_calls()
        await self._pub.close()
        self._m.connected = False

    # public API

    @property
    def connected(self) -> bool:
        """True while the listener connection is up and LISTENing."""
        return self._listener.connected

    @property
    def last_error(self) -> str | None:
        """Why the listener last failed (connect, setup or lost connection), or None."""
        return self._listener.last_error

    @property
    def listen_problem(self) -> str | None:
        """The line saying why LISTEN does not deliver although the listener answers (cause and what to do), or None."""
        return self._liveness.broken

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the listener is connected; False on timeout."""
        return await self._listener.wait_connected(timeout)

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
            self._m.publish_fail += 1
            raise
        await self._pub.notify(channel, text, size, count=True)

    def batcher(self, **kwargs: Any) -> BatchPublisher:
        """A BatchPublisher on this PubSub's publish path (closed with it); see BatchPublisher for options."""
        if self._closed:
            raise PubSubError("PubSub is closed")
        batcher = BatchPublisher(self._pub, on_close=self._batchers.discard, **kwargs)
        self._batchers.add(batcher)
        return batcher

    async def listening_channels(self, *, include_internal: bool = False, timeout: float = 10.0) -> set[str]:
        """``pg_listening_channels()`` as seen by the listener connection itself."""
        rows = await self._listener.query("SELECT pg_listening_channels()", timeout)
        channels = {row[0] for row in rows}
        if not include_internal:
            channels.discard(self.latency_channel)
        return channels

    async def measure_latency(self, timeout: float = 10.0) -> tuple[float, float]:
        """Publish a probe on this instance's private channel; return (send, receive) seconds.

        send: until pg_notify returned; receive: until the listener got it. Raises NotConnected,
        PublishError or TimeoutError.
        """
        return await self._liveness.measure(timeout)

    @property
    def metrics(self) -> dict[str, Any]:
        """A snapshot of state and counters (the same numbers as the Prometheus registry)."""
        listener = self._listener
        down = listener.disconnected_at
        return {
            "connected": listener.connected,
            "disconnected_seconds": 0.0 if listener.connected or down is None else time.monotonic() - down,
            "last_error": listener.last_error,
            "listen_problem": self._liveness.broken,
            "channels": len(listener.channels),
            "subscribers": sum(len(s) for s in listener.channels.values()),
            **self._m.snapshot(),
        }

    # subscriptions

    async def _subscribe(self, channel: str, handler: Callable[..., Any], with_err: bool) -> Cancel:
        if self._closed or not self._started:
            raise PubSubError("PubSub is closed" if self._closed else "PubSub is not started")
        try:
            check_channel(channel)
            if channel == self.latency_channel:
                raise InvalidChannel(f"channel {channel!r} is reserved")
        except PubSubError:
            self._m.subscribe_fail += 1
            raise
        listener = self._listener
        sub = Subscriber(channel, handler, with_err, self._queue_size)
        self._tasks.spawn(sub.run(), f"pubsub-sub:{channel}")
        listener.channels.setdefault(channel, set()).add(sub)
        try:
            await listener.apply()
            if sub.error is not None:
                raise PubSubError(f"LISTEN {channel!r} failed: {describe(sub.error)}") from sub.error
        except BaseException:
            self._m.subscribe_fail += 1
            if listener.remove(sub):
                listener.request_pass()  # no waiting here: this may be a cancellation
            raise
        self._m.subscribe_ok += 1

        async def cancel() -> None:
            if listener.remove(sub):
                await listener.apply()

        return cancel
