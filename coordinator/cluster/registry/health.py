"""Whether this replica's heartbeats reach the database: the state, its log lines, the recovery grace."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from psycopg_pool import PoolTimeout

from coordinator.cluster.registry.table import MISSED_BEATS, ReplicaInfo
from coordinator.core.errors import describe

log = logging.getLogger("coordinator.replicas")


class BeatHealth:
    """The heartbeat's outcome over time, logged once per change.

    After an outage long enough for peers to have dropped us, their rows went stale during the
    same outage: :meth:`in_grace` then says to keep last known peers while they beat again.
    """

    def __init__(self, replica_id: UUID, heartbeat: float, recovery_grace: float):
        self.replica_id = replica_id
        self.heartbeat = heartbeat
        self.recovery_grace = recovery_grace
        self.healthy = False
        self.last_error: str | None = None  # why the last heartbeat failed, None while healthy
        self.clock_skew = 0.0  # database clock minus ours, seconds
        self.grace_until = 0.0
        self._down_since: float | None = None
        self._last_beat_ok = math.inf  # monotonic time of our last successful write
        self._skew_warned = False

    def beat_ok(self) -> bool:
        """Record a successful beat; True if it ends a gap long enough for peers to have dropped us."""
        now = time.monotonic()
        gap = now - self._last_beat_ok
        self._last_beat_ok = now
        resumed = gap > MISSED_BEATS * self.heartbeat
        if resumed:
            # Peers' rows went stale during the same outage; let them beat again before judging.
            self.grace_until = now + MISSED_BEATS * self.heartbeat + self.recovery_grace
        if not self.healthy and self._down_since is not None:
            log.info("replica %s: database reachable again after %.1f s; heartbeating", self.replica_id,
                     now - self._down_since)
        self.healthy = True
        self.last_error = None
        self._down_since = None
        return resumed

    async def beat_failed(self, exc: BaseException, diagnose: Callable[[], Awaitable[str | None]]) -> None:
        """Record a failed beat; ``diagnose`` is asked (once per outage) what a bare timeout hides."""
        reason = describe(exc)
        timed_out = isinstance(exc, TimeoutError | PoolTimeout)
        if not self.healthy:
            if not timed_out:  # else keep the diagnosed cause from the start of the outage
                self.last_error = reason
            log.debug("replica %s: heartbeat still failing: %s", self.replica_id, reason)
            return
        self.healthy = False
        self._down_since = time.monotonic()
        if timed_out:
            # The pool only knows it waited; once per outage, ask for the real cause.
            cause = await diagnose()
            if cause:
                reason = f"{reason}: {cause}"
        self.last_error = reason
        log.warning("replica %s: heartbeat failed (%s); keeping last known peers and retrying", self.replica_id, reason)

    def in_grace(self, now: float) -> bool:
        """True while our own heartbeat is overdue or just resumed: staleness then says more about
        the database than about peers."""
        return now < self.grace_until or now - self._last_beat_ok > MISSED_BEATS * self.heartbeat

    def check_skew(self, skew: float) -> None:
        self.clock_skew = skew
        off = abs(skew) > max(1.0, self.heartbeat)
        if off != self._skew_warned:
            self._skew_warned = off
            if off:
                log.warning("local clock is %+.2f s off the database clock; liveness uses database time only", -skew)


def kept_in_grace(previous: list[ReplicaInfo], live: list[ReplicaInfo], replicas: list[ReplicaInfo]) -> list[ReplicaInfo]:
    """Of the ``previous`` live peers, those that look stale only because of the outage we just left:
    not live now, but still in the table and not stopped (their rows as read now)."""
    live_ids = {p.id for p in live}
    current = {r.id: r for r in replicas}
    return [row for old in previous
            if old.id not in live_ids and (row := current.get(old.id)) is not None and row.stopped_at is None]
