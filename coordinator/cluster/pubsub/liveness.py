"""The active listener check and latency probes: NOTIFYs on a private channel that must come back.

TCP keepalives catch a dead peer, not a listener that no longer delivers. Every ``interval`` a probe
goes out through the publish path; if it is not received in time, the listener connection itself is
asked ``SELECT 1`` (which also flushes notifications already on the wire), and a listener that stays
silent is torn down so it is redialled. Nothing here exits the process.

A listener that answers queries but has not received one of its own pings since it connected is
not broken but behind something that cannot LISTEN (a transaction pooler, or a listen URL that leads
to another database than the publishers'): redialling cannot help, so that is said once, reported
as ``broken``, and the connection is only redialled every ``BROKEN_REDIAL`` seconds in case the
path changed (e.g. the pooler was reconfigured).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from coordinator.cluster.pgerrors import LISTEN_ELSEWHERE, LISTEN_UNSUPPORTED
from coordinator.cluster.pubsub.errors import NotConnected, PublishError, PubSubError
from coordinator.cluster.pubsub.listener import Listener
from coordinator.cluster.pubsub.metrics import Metrics
from coordinator.cluster.pubsub.publisher import Publisher
from coordinator.core.errors import describe

log = logging.getLogger("coordinator.pubsub")

# The listener's own session holds its LISTENs; a session without any is not ours (a pooler's).
_CHANNELS = "SELECT count(*) FROM pg_listening_channels()"
BROKEN_REDIAL = 60.0  # seconds between quiet redials while LISTEN does not deliver through this URL


async def _wait(fut: asyncio.Future[None], timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(fut)
    except TimeoutError:
        return False
    return True


class Liveness:
    """Probes on ``channel`` (unique per PubSub, so replicas never answer each other)."""

    def __init__(
        self, channel: str, *, interval: float, timeout: float, metrics: Metrics, publisher: Publisher
    ):
        self.channel, self.interval, self.timeout = channel, interval, timeout
        self._m, self._pub = metrics, publisher
        self._probes: dict[bytes, asyncio.Future[None]] = {}
        self.listener: Listener | None = None  # set by the facade: the two refer to each other
        self.broken: str | None = None  # the line saying why LISTEN does not deliver, while it doesn't
        self.own_listen_url = False  # the listener has a URL of its own (set by the facade)
        self._heard_session = 0  # the listener session that last delivered one of our pings
        self._redial_at = 0.0

    def received(self, payload: bytes) -> None:
        """A notification on the private channel (called by the listener; must not raise)."""
        fut = self._probes.get(payload)
        if fut is None:
            log.warning("pubsub: received unexpected message on latency channel: %r", payload[:64])
        else:
            if self.listener is not None:
                self._heard_session = self.listener.session_id
            if not fut.done():
                fut.set_result(None)

    def _new_probe(self) -> tuple[bytes, asyncio.Future[None]]:
        key = uuid.uuid4().hex.encode()
        fut = asyncio.get_running_loop().create_future()
        self._probes[key] = fut
        return key, fut

    async def _send(self, key: bytes) -> None:
        await self._pub.notify(self.channel, key.decode(), len(key), count=False)

    async def measure(self, timeout: float) -> tuple[float, float]:
        """(send, receive) seconds of one probe; raises NotConnected, PublishError or TimeoutError."""
        m = self._m
        m.latency_measures += 1
        try:
            if self.listener is None or not self.listener.connected:
                raise NotConnected("listener is not connected")
            key, fut = self._new_probe()
            try:
                start = time.perf_counter()
                await self._send(key)
                send = time.perf_counter() - start
                async with asyncio.timeout(max(0.0, timeout - send)):
                    await fut
                recv = time.perf_counter() - start
            finally:
                self._probes.pop(key, None)
        except BaseException:
            m.latency_errs += 1
            raise
        m.send_latency.observe(send)
        m.recv_latency.observe(recv)
        return send, recv

    async def run(self) -> None:
        """Check the listener every ``interval`` while it is connected."""
        while True:
            await asyncio.sleep(self.interval)
            if self.listener is not None and self.listener.connected:
                try:
                    await self.check(self.listener)
                except Exception:
                    log.exception("pubsub: listener check failed unexpectedly")

    async def check(self, listener: Listener) -> None:
        session = listener.session_id
        timeout = self.timeout
        key, fut = self._new_probe()
        try:
            start = time.perf_counter()
            try:
                await self._send(key)
                published = True
                send = time.perf_counter() - start
            except PublishError as exc:
                published, why = False, f"ping publish failed ({describe(exc)})"
            if published:
                if await _wait(fut, timeout):
                    self._m.send_latency.observe(send)
                    self._m.recv_latency.observe(time.perf_counter() - start)
                    self._delivering()
                    return
                why = f"ping not received within {timeout:g}s"
            # No pong (or the publish path is down): is the listener connection itself answering?
            # Its reply also flushes any notification already on the wire. Behind a transaction
            # pooler the statement may land on a server session that never ran our LISTEN.
            try:
                rows = await listener.query(_CHANNELS, timeout)
            except (PubSubError, TimeoutError):
                why += f"; listener did not answer within {timeout:g}s"
            else:
                if not published:
                    log.warning("pubsub: %s; the listener itself answers", why)
                    return
                if await _wait(fut, timeout):
                    log.warning("pubsub: slow round trip (%s) but the listener answers", why)
                    self._delivering()
                    return
                why += " although the listener answers"
                multiplexed = bool(rows) and rows[0][0] == 0  # our LISTENs are not on this server session
                if multiplexed or self._heard_session != session:  # or not one ping came through on it
                    self._not_delivering(listener, session, why)
                    return
        finally:
            self._probes.pop(key, None)
        if listener.tear_down(session, f"listener check failed: {why}"):
            self._m.ping_failures += 1
            log.error("pubsub: listener check failed, reconnecting: %s", why)

    def _delivering(self) -> None:
        if self.broken is not None:
            self.broken = None
            log.warning("pubsub: LISTEN delivers notifications again")

    def _not_delivering(self, listener: Listener, session: int, why: str) -> None:
        now = time.monotonic()
        if self.broken is None:
            cause = LISTEN_ELSEWHERE if self.own_listen_url else LISTEN_UNSUPPORTED
            self.broken = cause.line(why)
            self._redial_at = now + BROKEN_REDIAL
            self._m.ping_failures += 1
            log.error("pubsub: %s", self.broken)
        elif now >= self._redial_at:
            self._redial_at = now + BROKEN_REDIAL
            listener.tear_down(session, f"LISTEN still not delivering: {why}", quiet=True)
