"""Replica registry: register this process in ``replicas``, heartbeat, discover live peers, leave.

Modelled on Coder's replicasync, with these changes:

- Liveness is judged in SQL by database time only (``updated_at > now() - 3 x heartbeat``), with
  each row judged by the heartbeat interval it declares, so skewed clocks or a rolling change
  of the interval do not make replicas look dead. Peers are re-checked the moment the
  earliest one would expire, not one tick later.
- A database outage never ends the process: heartbeats fail, ``healthy`` turns False (logged
  once per state change), retries back off, and on recovery the row is rewritten (re-inserted
  if it was cleaned away) and everything resynced. For a grace period after our own recovery,
  stale peers are kept rather than dropped, so the mesh does not churn while they catch up.
- Dead rows are kept for ``cleanup_after`` (a day) for the operator API instead of 15 s; live
  rows are never cleaned.
- Notifications are only kicks: any ``replica`` notification (or a dropped-messages signal)
  triggers a full re-read, and bursts coalesce into at most one extra sync.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from uuid import UUID, uuid4

import anyio
import anyio.abc
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from coordinator.cluster.db import Database
from coordinator.cluster.dberrors import DatabaseUnavailable
from coordinator.cluster.registry.health import BeatHealth, kept_in_grace
from coordinator.cluster.registry.table import (
    _CLEANUP,
    _INSERT_SELF,
    _SELECT_ALL,
    _STOP_SELF,
    _UPDATE_SELF,
    MISSED_BEATS,
    ReplicaInfo,
)
from coordinator.cluster.registry.view import OperatorView, read_view
from coordinator.core.errors import describe

log = logging.getLogger("coordinator.replicas")

CHANNEL = "replica"
STOP_TIMEOUT = 5.0
RETRY_CAP = 5.0  # longest pause between heartbeat attempts while the database is down
RECOVERY_GRACE = 10.0
DEFAULT_CLEANUP_AFTER = 24 * 3600.0


class PubSubLike(Protocol):
    """The part of :class:`coordinator.cluster.pubsub.PubSub` the registry uses."""

    async def subscribe_with_err(
        self, channel: str, handler: Callable[[bytes | None, Exception | None], Any]
    ) -> Callable[[], Awaitable[None]]: ...

    async def publish(self, channel: str, payload: bytes | str) -> None: ...


OnChange = Callable[[list[ReplicaInfo]], Awaitable[None] | None]


class ReplicaRegistry:
    """This process's row in ``replicas`` plus the live peers it can see.

    Use ``async with ReplicaRegistry(...)``, or ``await start(task_group)`` ... ``await stop()``:
    the heartbeat and discovery loops run in that task group (see :meth:`run`).
    """

    def __init__(
        self,
        db: Database,
        pubsub: PubSubLike | None,
        *,
        hostname: str | None = None,
        region_id: int = 999,
        relay_url: str = "",
        version: str = "",
        heartbeat: float = 2.0,
        cleanup_after: float = DEFAULT_CLEANUP_AFTER,
        recovery_grace: float = RECOVERY_GRACE,
        on_change: OnChange | None = None,
        on_probe: Callable[[float], None] | None = None,
    ):
        if heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        self.db = db
        self.pubsub = pubsub
        self.id: UUID = uuid4()
        self.hostname = hostname or socket.gethostname()
        self.region_id = region_id
        self.relay_url = relay_url
        self.version = version
        self.heartbeat = heartbeat
        self.cleanup_after = cleanup_after
        self.recovery_grace = recovery_grace
        self.on_change = on_change
        self.on_probe = on_probe  # called with each heartbeat's database round trip (seconds)
        self._measurements: dict = {"peer_latencies": Jsonb({}), "pubsub_latency": 0}
        self._database_median: float | None = None
        self.health = BeatHealth(self.id, heartbeat, recovery_grace)

        self._self_row: ReplicaInfo | None = None
        self._rows: list[ReplicaInfo] = []
        self._peers: list[ReplicaInfo] = []
        self._peer_key: tuple | None = None
        self._next_expiry: float | None = None
        self._row_error = ""
        self._written_error = ""
        self._written_error_changed = False
        self._malformed = 0
        self._malformed_logged_at = -math.inf
        # One-slot buffer: kicks arriving during a sync collapse into a single follow-up sync.
        self._kick_send, self._kick_recv = anyio.create_memory_object_stream[None](1)
        self._sync_lock = anyio.Lock()
        self._unsubscribe: Callable[[], Awaitable[None]] | None = None
        self._state = "new"
        self._scope = anyio.CancelScope()  # run() lives in it; stop() cancels it
        self._stopped = anyio.Event()
        self._stop_recorded = False
        self._leave_timeout = STOP_TIMEOUT
        self._stack: contextlib.AsyncExitStack | None = None
        # A beat must finish well inside the liveness window, and never hang.
        self._op_timeout = max(2 * heartbeat, 3.0)

    # -- accessors -----------------------------------------------------------------------------

    @property
    def self_row(self) -> ReplicaInfo | None:
        return self._self_row

    @property
    def healthy(self) -> bool:
        """True while heartbeats reach the database."""
        return self.health.healthy

    @property
    def last_error(self) -> str | None:
        """Why the last heartbeat failed, or None while healthy."""
        return self.health.last_error

    @property
    def clock_skew(self) -> float:
        """The database clock minus ours, seconds (as of the last heartbeat)."""
        return self.health.clock_skew

    def peers(self) -> list[ReplicaInfo]:
        """Live replicas in every region, excluding this one."""
        return list(self._peers)

    def regional_peers(self) -> list[ReplicaInfo]:
        """Live replicas in this replica's region (the ones to mesh with), excluding this one."""
        return [p for p in self._peers if p.region_id == self.region_id]

    def all_replicas(self) -> list[ReplicaInfo]:
        """Every row as of the last sync, dead ones and this one included (for the operator API)."""
        rows = [r for r in self._rows if r.id != self.id]
        return ([self._self_row] if self._self_row else []) + rows

    def set_measurements(self, peer_latencies: dict, pubsub_latency: float | None,
                         database_latency: float | None = None) -> None:
        """Latencies this replica measured (matrix row; pub/sub and database medians in seconds).

        Written at the next heartbeat; a database median replaces the heartbeat's single sample.
        """
        self._measurements = {
            "peer_latencies": Jsonb(peer_latencies),
            "pubsub_latency": min(int((pubsub_latency or 0) * 1e6), 2**31 - 1),
        }
        self._database_median = database_latency

    def set_error(self, text: str | None) -> None:
        """Record an error (e.g. "Failed to dial peers: ...") written to our row at the next heartbeat."""
        self._row_error = text or ""

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Register, then heartbeat and follow peers until cancelled or :meth:`stop`; then leave.

        ``await task_group.start(registry.run)`` returns once registered, or raises
        :class:`DatabaseUnavailable` if the first heartbeat fails. However it ends, the task
        records our stop (bounded by the timeout :meth:`stop` was given), so peers drop us at once.
        """
        if self._state == "stopped" and self._self_row is None:  # stop() came first: nothing to do
            task_status.started()
            return
        if self._state != "new":
            raise RuntimeError(f"registry already {self._state}")
        self._state = "starting"
        try:
            with self._scope:
                await self._register()
                self._state = "running"
                task_status.started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._heartbeat_loop, name=f"replica {self.id} heartbeat")
                    tg.start_soon(self._sync_loop, name=f"replica {self.id} sync")
        finally:
            self._state = "stopping"
            with anyio.CancelScope(shield=True):
                await self._leave()
            self._state = "stopped"
            self._stopped.set()

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """:meth:`run` in ``task_group`` (which then owns the heartbeat); returns once registered."""
        await task_group.start(self.run, name=f"replica {self.id}")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Leave gracefully within ``timeout`` s; False if we had registered and could not record it. Idempotent.

        Cancels the heartbeat first (so none can clear ``stopped_at`` again), then marks our row
        stopped and announces it, so peers drop us at once, then unsubscribes.
        """
        if self._state == "new":
            self._state = "stopped"
            self._stopped.set()
        self._leave_timeout = min(self._leave_timeout, timeout)
        self._scope.cancel()
        await self._stopped.wait()
        return self._stop_recorded or self._self_row is None

    async def operator_view(self) -> OperatorView:
        """Each replica's latency matrix row and heartbeat age, read now; empty while the database is away."""
        return await read_view(self.db, self._op_timeout)

    async def refresh(self) -> None:
        """Re-read the table now (Coder's UpdateNow, without the write)."""
        await self._sync()

    async def __aenter__(self) -> ReplicaRegistry:
        async with contextlib.AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            await self.start(tg)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _register(self) -> None:
        if self.pubsub is not None:
            self._unsubscribe = await self.pubsub.subscribe_with_err(CHANNEL, self._on_notify)
        try:
            with anyio.fail_after(max(self._op_timeout, 10.0)):
                await self._beat()
            self.health.beat_ok()
            await self._publish()
            await self._sync()
        except Exception as exc:
            raise DatabaseUnavailable(f"cannot register replica {self.id}: {describe(exc)}") from exc
        log.info(
            "replica %s registered (host %s, region %d, relay %s, heartbeat %gs)",
            self.id, self.hostname, self.region_id, self.relay_url or "-", self.heartbeat,
        )

    async def _leave(self) -> None:
        """Record our stop if we registered, then unsubscribe; all within ``_leave_timeout``."""
        deadline = anyio.current_time() + self._leave_timeout
        if self._self_row is not None:
            # With the database already down, don't hold up the stop hoping for it.
            timeout = self._leave_timeout if self.health.healthy else min(1.0, self._leave_timeout)
            try:
                with anyio.fail_after(timeout):
                    async with self.db.connection(timeout=timeout) as conn:
                        cur = await conn.cursor(row_factory=dict_row).execute(_STOP_SELF, (self.id,))
                        row = await cur.fetchone()
                    if row:
                        self._self_row = ReplicaInfo.from_row(row, alive=False)
                        self._stop_recorded = True
                    await self._publish()
                log.info("replica %s stopped", self.id)
            except Exception as exc:
                log.warning(
                    "replica %s could not record its stop (%s); peers drop it after %g s",
                    self.id, describe(exc), MISSED_BEATS * self.heartbeat,
                )
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                try:
                    await unsubscribe()
                except Exception as exc:
                    log.debug("unsubscribe from %r failed: %s", CHANNEL, describe(exc))
        self.health.healthy = False
        self._kick_send.close()
        self._kick_recv.close()

    # -- heartbeat -----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        failures = 0
        cleanup_every = max(min(self.cleanup_after, 1800.0), self.heartbeat)
        next_cleanup = time.monotonic() + cleanup_every
        last = time.monotonic()
        while True:
            if failures:
                delay = min(self.heartbeat * 2**failures, max(RETRY_CAP, self.heartbeat))
            else:  # a fixed rate: a slow beat must not push every later one back
                delay = max(0.0, last + self.heartbeat - time.monotonic())
            await anyio.sleep(delay)
            last = time.monotonic()
            try:
                # Not shielded: a stop may abandon the beat half-way (the pool discards that
                # connection); waiting for a hung database would hold up the stop.
                with anyio.fail_after(self._op_timeout):
                    reinserted = await self._beat()
            except Exception as exc:  # whatever the database does, keep beating
                failures += 1
                await self.health.beat_failed(exc, self._diagnose)
                if isinstance(exc, psycopg.errors.UndefinedTable):
                    await self._remigrate()
                continue
            failures = 0
            resumed = self.health.beat_ok()
            if reinserted or resumed or self._written_error_changed:
                await self._publish()
            self._kick()
            if time.monotonic() >= next_cleanup:
                next_cleanup = time.monotonic() + cleanup_every
                await self._cleanup()

    async def _beat(self) -> bool:
        """Write our row (re-inserting it if it is gone); True if it had to be re-inserted."""
        error = self._row_error
        previous = self._self_row
        async with self.db.connection(timeout=self._op_timeout) as conn:
            probe = await self.db.probe(timeout=self._op_timeout, conn=conn)
            params = {
                "id": self.id, "hostname": self.hostname, "region_id": self.region_id,
                "relay_url": self.relay_url, "version": self.version, "error": error,
                "latency": min(int((self._database_median or probe.latency) * 1e6), 2**31 - 1),
                "heartbeat_ms": max(1, round(self.heartbeat * 1000)),
                "created_at": previous.created_at if previous else None,
                "started_at": previous.started_at if previous else None,
                **self._measurements,
            }
            cur = conn.cursor(row_factory=dict_row)
            row = None
            if previous is not None:
                await cur.execute(_UPDATE_SELF, params)
                row = await cur.fetchone()
            reinserted = row is None and previous is not None
            if row is None:
                await cur.execute(_INSERT_SELF, params)
                row = await cur.fetchone()
        self.health.check_skew(probe.skew)
        if self.on_probe is not None:
            self.on_probe(probe.latency)
        if reinserted:
            log.warning("replica %s: our row was deleted externally; re-inserted it", self.id)
        assert row is not None  # INSERT ... RETURNING returns the row it wrote
        self._self_row = ReplicaInfo.from_row(row, alive=True)
        self._written_error_changed = error != self._written_error
        self._written_error = error
        return reinserted

    async def _diagnose(self) -> str | None:
        return await self.db.diagnose(timeout=min(self._op_timeout, 5.0))

    async def _remigrate(self) -> None:
        # The schema is gone: the database was replaced (restored, or a failover lost recent
        # commits). Recreate it rather than fail until someone restarts us.
        try:
            with anyio.fail_after(max(self._op_timeout, 30.0)):
                await self.db.migrate()
        except Exception as exc:
            log.debug("re-applying migrations failed: %s", describe(exc))

    async def _cleanup(self) -> None:
        try:
            with anyio.fail_after(self._op_timeout):
                async with self.db.connection(timeout=self._op_timeout) as conn:
                    cur = await conn.execute(_CLEANUP, {"id": self.id, "after": self.cleanup_after})
            if cur.rowcount:
                log.info("deleted %d replica rows dead for over %g s", cur.rowcount, self.cleanup_after)
        except Exception as exc:
            log.debug("replica cleanup failed: %s", describe(exc))

    # -- discovery -----------------------------------------------------------------------------

    def _kick(self) -> None:
        try:
            self._kick_send.send_nowait(None)
        except anyio.WouldBlock:
            pass  # a sync is already pending; it will see this change too
        except anyio.ClosedResourceError:
            pass  # stopped

    def _on_notify(self, payload: bytes | None, err: Exception | None) -> None:
        if err is not None:
            log.info("replica notifications may have been lost (%s); resyncing", describe(err))
            self._kick()
            return
        try:
            text = payload.decode("ascii").strip() if isinstance(payload, bytes) else str(payload)
            replica_id = UUID(text)
        except (ValueError, UnicodeDecodeError, AttributeError):
            self._log_malformed(payload)
            return
        if replica_id != self.id:
            self._kick()

    def _log_malformed(self, payload: object) -> None:
        # Rate-limited: a misbehaving publisher must not flood the log.
        self._malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged_at >= 60.0:
            log.warning(
                "ignoring %d malformed %r notification(s), latest %.80r", self._malformed, CHANNEL, payload
            )
            self._malformed, self._malformed_logged_at = 0, now

    async def _sync_loop(self) -> None:
        while True:
            wait = math.inf if self._next_expiry is None else max(0.0, self._next_expiry - time.monotonic())
            with anyio.move_on_after(wait):
                await self._kick_recv.receive()
            try:
                await self._sync()
            except Exception as exc:  # the heartbeat reports outages; just wait for the next kick
                self._next_expiry = None
                log.debug("replica sync failed: %s", describe(exc))

    async def _sync(self) -> None:
        async with self._sync_lock:  # also keeps on_change calls in order
            with anyio.fail_after(self._op_timeout):
                changed = await self._read()
            if changed is not None:
                await self._notify(changed)

    async def _read(self) -> list[ReplicaInfo] | None:
        """Re-read every row; the new peer list if it changed, else None."""
        async with self.db.connection(timeout=self._op_timeout) as conn:
            cur = await conn.cursor(row_factory=dict_row).execute(_SELECT_ALL)
            rows = await cur.fetchall()
        now = time.monotonic()
        replicas = [ReplicaInfo.from_row(r) for r in rows]
        peers = [r for r in replicas if r.alive and r.id != self.id]
        expiries = [r["expires_in"] for r in rows if r["alive"] and r["id"] != self.id]
        self._next_expiry = now + min(expiries) + 0.01 if expiries else None
        # Keep last known peers unless they left or were removed.
        if self.health.in_grace(now):
            peers += kept_in_grace(self._peers, peers, replicas)
            if now < self.health.grace_until:
                self._next_expiry = min(self._next_expiry or math.inf, self.health.grace_until)
        peers.sort(key=lambda r: str(r.id))
        self._rows = replicas
        self._peers = peers
        key = tuple((p.id, p.relay_url, p.region_id) for p in peers)
        if key == self._peer_key:
            return None
        self._peer_key = key
        log.debug("replica %s: %d live peers", self.id, len(peers))
        return peers

    async def _notify(self, peers: list[ReplicaInfo]) -> None:
        if self.on_change is None:
            return
        try:
            result = self.on_change(list(peers))
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("replica on_change callback failed")

    async def _publish(self) -> None:
        if self.pubsub is None:
            return
        try:
            with anyio.fail_after(self._op_timeout):
                await self.pubsub.publish(CHANNEL, str(self.id))
        except Exception as exc:  # peers still find us at their next heartbeat sync
            log.debug("publish on %r failed: %s", CHANNEL, describe(exc))
