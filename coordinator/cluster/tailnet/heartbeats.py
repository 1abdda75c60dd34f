"""Coordinator heartbeats: write ours, judge the others', and know whether we are healthy.

Every interval we write our beat and read every coordinator's age on the database clock; a
coordinator is alive until it has missed :data:`MISSED_BEATS` of its own declared beats. A NOTIFY
of another's beat (the trigger's) revives it at once. Writing our own beat failing
:data:`MISSED_BEATS` times in a row makes us unhealthy; the next success (and ``on_recover``)
makes us healthy again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio

from coordinator.cluster.tailnet.store import TailnetStore

log = logging.getLogger("coordinator.tailnet")

MISSED_BEATS = 3  # beats a coordinator may miss before its peers are lost (Coder's MissedHeartbeats)
CHECK_EVERY = 0.1  # seconds between expiry checks (cheap: a dict of coordinators)


class Heartbeats:
    """Our beat, the live set of coordinators and our health. Run :meth:`run` in a task group."""

    def __init__(
        self,
        store: TailnetStore,
        coordinator: uuid.UUID,
        interval: float,
        *,
        on_change: Callable[[], None],
        on_unhealthy: Callable[[str], None],
        on_recover: Callable[[], Awaitable[None]],
    ):
        self.store = store
        self.id = coordinator
        self.interval = interval
        self.on_change = on_change        # the live set changed: re-filter every peer's mappings
        self.on_unhealthy = on_unhealthy  # our beats fail: close our peers
        self.on_recover = on_recover      # a beat worked again: tidy up before taking peers
        self.expires: dict[uuid.UUID, float] = {}  # coordinator -> time.monotonic() it dies at
        self.periods: dict[uuid.UUID, float] = {}  # coordinator -> its declared interval
        self.healthy = True
        self.failures = 0  # our consecutive failed beats
        self.last_error: str | None = None
        self.skew = 0.0  # database clock minus ours, seconds (for propagation times)
        self.first_beat = anyio.Event()
        self._alive: frozenset[uuid.UUID] = frozenset()

    def alive(self, coordinator: uuid.UUID) -> bool:
        return coordinator == self.id or coordinator in self._alive

    def live(self) -> frozenset[uuid.UUID]:
        return self._alive | {self.id}

    def received(self, payload: bytes) -> None:
        """A NOTIFY of some coordinator's beat."""
        try:
            other = uuid.UUID(payload.decode())
        except (ValueError, UnicodeDecodeError):
            log.warning("ignoring a malformed heartbeat notification %r", payload[:80])
            return
        if other == self.id:
            return
        period = self.periods.get(other, self.interval)
        self.expires[other] = max(self.expires.get(other, 0.0), time.monotonic() + MISSED_BEATS * period)
        self._check()

    def _check(self) -> None:
        now = time.monotonic()
        alive = frozenset(c for c, t in self.expires.items() if t > now)
        if alive != self._alive:
            gone, new = self._alive - alive, alive - self._alive
            self._alive = alive
            for c in gone:
                log.info("coordinator %s missed %d heartbeats: its peers are lost", c, MISSED_BEATS)
            for c in new:
                log.debug("coordinator %s is alive", c)
            self.on_change()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat_loop)
            while True:
                await anyio.sleep(CHECK_EVERY)
                self._check()

    async def _beat_loop(self) -> None:
        while True:
            started = anyio.current_time()
            await self.beat()
            await anyio.sleep(max(0.0, self.interval - (anyio.current_time() - started)))

    async def beat(self) -> None:
        """One heartbeat: write ours, read everyone's age; count failures and turn health."""
        timeout = min(max(self.interval, 0.5), 5.0)
        try:
            sent = time.time()
            db_now, ages = await self.store.beat(self.id, self.interval, timeout)
        except Exception as exc:  # psycopg errors, pool timeouts, our own timeout
            self.failures += 1
            self.last_error = " ".join(str(exc).split()) or type(exc).__name__
            log.debug("tailnet heartbeat %d failed: %s", self.failures, self.last_error)
            if self.failures >= MISSED_BEATS and self.healthy:
                self.healthy = False
                log.warning("tailnet coordinator unhealthy: %d heartbeats failed (%s); closing its peers",
                            self.failures, self.last_error)
                self.on_unhealthy(self.last_error)
            return
        self.skew = db_now - (sent + time.time()) / 2
        now = time.monotonic()
        for row in ages:
            if row.id == self.id:
                continue
            self.periods[row.id] = row.heartbeat
            self.expires[row.id] = now + MISSED_BEATS * row.heartbeat - row.age
        seen = {row.id for row in ages}
        for gone in [c for c, t in self.expires.items() if c not in seen and t < now]:
            del self.expires[gone]  # silent for an hour: forget it (bounded by recently live coordinators)
            self.periods.pop(gone, None)
        if not self.healthy:
            try:
                await self.on_recover()
            except Exception as exc:
                self.last_error = f"recovering: {' '.join(str(exc).split())}"
                return
            self.healthy = True
            log.warning("tailnet coordinator healthy again: heartbeats reach PostgreSQL")
        self.failures = 0
        self.last_error = None
        self.first_beat.set()
        self._check()
