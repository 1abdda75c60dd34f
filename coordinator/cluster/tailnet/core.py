"""The peer coordinator of one replica: its local peers, its heartbeats, and the work that tells them news.

Wake-ups come from NOTIFY (the tables' triggers): a peer's row changed → find who shares a tunnel
with it (a query) → re-query the mappings of those that are connected here. A tunnel changed →
re-query both ends if connected here. A coordinator died or came back → re-judge every local
peer's last mappings. A pub/sub gap → re-query every local peer (Coder #11950).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.abc

from coordinator.cluster.db import Database
from coordinator.cluster.pubsub import Cancel, DroppedMessages, PubSub
from coordinator.cluster.tailnet.binder import Binder
from coordinator.cluster.tailnet.heartbeats import MISSED_BEATS, Heartbeats
from coordinator.cluster.tailnet.mapper import Mapper, Outgoing
from coordinator.cluster.tailnet.messages import (
    CLOSE_GOING_AWAY,
    CLOSE_TRY_AGAIN,
    READY_FOR_HANDSHAKE,
    encode_peer_update,
)
from coordinator.cluster.tailnet.store import (
    HANDSHAKE_CHANNEL,
    HEARTBEAT_CHANNEL,
    PEER_CHANNEL,
    TUNNEL_CHANNEL,
    TailnetStore,
)
from coordinator.cluster.tailnet.workqueue import WorkQueue

log = logging.getLogger("coordinator.tailnet")

WORKERS = 8              # concurrent mapping queries (Coder runs 10 queriers)
BATCH = 256              # peers looked up by one query
WORK_LIMIT = 100_000     # pending work keys; past it the work is dropped for one full resync
CLEANUP_EVERY = 3600.0   # seconds between cleanups (Coder: hourly)
RETRY_MAX = 5.0          # longest pause before retrying failed work
PROPAGATION_SAMPLES = 4096
UNHEALTHY = "coordinator unhealthy: this replica cannot write its heartbeat to PostgreSQL; reconnect"
STOPPING = "replica stopping; reconnect (the load balancer picks another replica)"


class LocalPeer(Protocol):
    """What the coordinator needs of a connected peer (``peer.PeerConnection``)."""

    id: uuid.UUID
    tunnels: set[uuid.UUID]
    mapper: Mapper

    def kick(self, code: int, message: str | None, *, write: bool = True) -> None: ...
    def deliver(self, items: list[Outgoing]) -> None: ...


WorkKey = tuple[str, uuid.UUID]  # ("map", local peer): all its tunnel peers; ("peer", any peer): that peer changed


class TailnetCoordinator:
    """Created with the control plane; :meth:`run` once the database is open; :meth:`stop` first when stopping."""

    def __init__(self, heartbeat: float, max_peers: int = 0):
        self.id = uuid.uuid4()
        self.heartbeat = heartbeat
        self.max_peers = max_peers  # 0: the endpoint derives it from the replica's connection budget
        self.peers: dict[uuid.UUID, LocalPeer] = {}
        self.store: TailnetStore | None = None
        self.binder: Binder | None = None
        self.beats: Heartbeats | None = None
        self.pubsub: PubSub | None = None
        self.stopping = False
        self.work: WorkQueue[WorkKey] = WorkQueue(WORK_LIMIT)
        self.counts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.propagation: deque[float] = deque(maxlen=PROPAGATION_SAMPLES)
        self._scope: anyio.CancelScope | None = None
        self._stamps = itertools.count()  # orders query results (Mapper ignores older ones)

    # -- state -----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.beats is not None and self.beats.first_beat.is_set()

    @property
    def healthy(self) -> bool:
        return self.beats is None or self.beats.healthy

    def refusal(self) -> tuple[int, str] | None:
        """Why a new peer cannot be served now (close code, message), or None."""
        if self.stopping:
            return CLOSE_GOING_AWAY, STOPPING
        if self.beats is not None and not self.beats.healthy:
            return CLOSE_TRY_AGAIN, UNHEALTHY
        if not self.ready:
            return CLOSE_TRY_AGAIN, "coordinator starting (waiting for PostgreSQL); try again shortly"
        return None

    # -- life ------------------------------------------------------------------------------------

    async def run(self, db: Database, pubsub: PubSub) -> None:
        """Beat, listen and work until cancelled (by :meth:`stop` or the control plane's end)."""
        self.store = TailnetStore(db)
        await self.store.open()
        self.binder = Binder(self.store, self.id)
        self.pubsub = pubsub
        self.beats = Heartbeats(self.store, self.id, self.heartbeat, on_change=self.refilter_all,
                                on_unhealthy=self._unhealthy, on_recover=self._recover)
        cancels: list[Cancel] = []
        self._scope = anyio.CancelScope()
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.beats.run, name="tailnet heartbeats")
                    tg.start_soon(self.binder.run, name="tailnet binder")
                    for channel, handler in ((PEER_CHANNEL, self._on_peer), (TUNNEL_CHANNEL, self._on_tunnel),
                                             (HEARTBEAT_CHANNEL, self._on_beat), (HANDSHAKE_CHANNEL, self._on_handshake)):
                        cancels.append(await self._subscribe(channel, handler))
                    for i in range(WORKERS):
                        tg.start_soon(self._worker, name=f"tailnet worker {i}")
                    tg.start_soon(self._cleanup_loop, name="tailnet cleanup")
                    log.info("tailnet coordinator %s running", self.id)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                for cancel in cancels:
                    await cancel()
                await self.store.close(1.0)

    async def _subscribe(self, channel: str, handler: Any) -> Cancel:
        """Subscribe, retrying with backoff (Coder does the same); only a stop ends the wait."""
        assert self.pubsub is not None
        delay = 0.1
        while True:
            try:
                return await self.pubsub.subscribe_with_err(channel, handler)
            except Exception as exc:
                log.warning("cannot subscribe to %s yet (%s); retrying", channel, exc)
                await anyio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX)

    def begin_stop(self) -> None:
        """Refuse new peers and close ours with 1001 and a reason, now (from the signal's loop callback:
        the HTTP server's own shutdown would close their WebSockets with 1012 a moment later)."""
        self.stopping = True
        for conn in list(self.peers.values()):
            conn.kick(CLOSE_GOING_AWAY, STOPPING, write=False)

    async def stop(self, timeout: float) -> None:
        """Graceful stop: close our peers with a reason, mark them lost (deleting nothing), stop."""
        self.begin_stop()  # closed first; then all marked lost in one statement: rows stay
        with anyio.move_on_after(max(0.05, timeout * 0.7)):
            if self.store is not None and self.ready and self.healthy:
                try:
                    n = await self.store.mark_coordinator_lost(self.id)
                    log.info("tailnet coordinator stopping: %d peers marked lost", n)
                except Exception as exc:
                    log.warning("tailnet coordinator could not mark its peers lost: %s", exc)
        with anyio.move_on_after(max(0.05, timeout * 0.3)):
            while self.peers:
                await anyio.sleep(0.02)
        if self._scope is not None:
            self._scope.cancel()

    # -- peers -----------------------------------------------------------------------------------

    def register(self, conn: LocalPeer) -> None:
        old = self.peers.get(conn.id)
        if old is not None:
            self.counts["replaced"] += 1
            old.kick(1008, "replaced by a newer connection for this peer ID", write=False)
        self.peers[conn.id] = conn
        self.schedule(conn.id)

    def unregister(self, conn: LocalPeer) -> None:
        if self.peers.get(conn.id) is conn:
            del self.peers[conn.id]

    def schedule(self, peer: uuid.UUID) -> None:
        """Re-query what the local ``peer`` should know."""
        if not self.work.enqueue(("map", peer)):
            self._overflow()

    def resync(self, why: str) -> None:
        """Re-query every local peer (after a pub/sub gap, or when the work queue overflowed)."""
        self.counts["resyncs"] += 1
        log.info("tailnet resync of %d local peers: %s", len(self.peers), why)
        for peer in list(self.peers):
            self.schedule(peer)

    def _overflow(self) -> None:
        self.work.clear()
        self.resync("work queue overflowed")

    def refilter_all(self) -> None:
        """The live coordinators changed: re-judge every local peer's last mappings (no queries)."""
        assert self.beats is not None
        for conn in list(self.peers.values()):
            conn.deliver(conn.mapper.update(self.beats.alive))

    def _unhealthy(self, reason: str) -> None:
        # No per-peer writes now (Coder #12923): the rows are tidied in one statement on recovery.
        for conn in list(self.peers.values()):
            conn.kick(CLOSE_TRY_AGAIN, UNHEALTHY, write=False)

    async def _recover(self) -> None:
        assert self.store is not None
        n = await self.store.mark_coordinator_lost(self.id)
        log.info("tailnet coordinator recovering: %d peers left from before marked lost", n)

    # -- notifications -------------------------------------------------------------------------------

    def _gap(self, err: Exception | None, channel: str) -> bool:
        if isinstance(err, DroppedMessages):
            self.resync(f"pub/sub may have dropped {channel} messages")
            return True
        if err is not None:
            log.warning("pub/sub error on %s: %s", channel, err)
            return True
        return False

    def _on_peer(self, payload: bytes | None, err: Exception | None) -> None:
        if self._gap(err, PEER_CHANNEL) or payload is None:
            return
        peer = _uuid(payload)
        if peer is not None and self.peers and not self.work.enqueue(("peer", peer)):
            self._overflow()

    def _on_tunnel(self, payload: bytes | None, err: Exception | None) -> None:
        if self._gap(err, TUNNEL_CHANNEL) or payload is None:
            return
        for part in payload.split(b",", 1):
            peer = _uuid(part)
            if peer is not None and peer in self.peers:
                self.schedule(peer)

    def _on_beat(self, payload: bytes | None, err: Exception | None) -> None:
        if err is None and payload is not None and self.beats is not None:
            self.beats.received(payload)

    def _on_handshake(self, payload: bytes | None, err: Exception | None) -> None:
        if err is not None or payload is None:
            return
        dst, _, src = payload.partition(b",")
        dst_id, src_id = _uuid(dst), _uuid(src)
        conn = self.peers.get(dst_id) if dst_id is not None else None
        if conn is None or src_id is None:
            return
        if conn.mapper.knows(src_id):  # only across a tunnel
            conn.deliver([Outgoing(src_id, READY_FOR_HANDSHAKE, encode_peer_update(src_id, READY_FOR_HANDSHAKE))])

    async def publish_handshake(self, src: uuid.UUID, dst: uuid.UUID) -> None:
        assert self.pubsub is not None
        await self.pubsub.publish(HANDSHAKE_CHANNEL, f"{dst},{src}")

    # -- work ----------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        delay = 0.1
        while True:
            keys = [await self.work.acquire()]
            keys += self.work.take_more(_same_kind(keys[0][0]), BATCH - 1)  # one query for the batch
            try:
                await self._do(keys)
                delay = 0.1
            except Exception as exc:
                log.debug("tailnet work %s failed (%s); retrying in %.1f s", keys[0], exc, delay)
                self.counts["work_failures"] += 1
                for key in keys:
                    self.work.done(key)
                await anyio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX)
                for key in keys:
                    if key[0] == "peer" or key[1] in self.peers:
                        self.work.enqueue(key)
                continue
            for key in keys:
                self.work.done(key)

    async def _do(self, keys: list[WorkKey]) -> None:
        assert self.store is not None and self.beats is not None
        stamp = next(self._stamps)
        what, peer = keys[0]
        if what == "peer":  # one round trip: who shares a tunnel with each, and their rows
            if not self.peers:
                return
            changes = await self.store.peer_changes([k[1] for k in keys])
            touched: dict[uuid.UUID, LocalPeer] = {}
            for changed, (partners, rows) in changes.items():
                for other in partners:
                    conn = self.peers.get(other)
                    if conn is not None:
                        conn.mapper.apply_peer(changed, rows, stamp)
                        touched[other] = conn
            for conn in touched.values():
                conn.deliver(conn.mapper.update(self.beats.alive, timed=True))
            return
        local = [k[1] for k in keys if k[1] in self.peers]
        if not local:
            return
        for peer, bindings in (await self.store.bindings_of(local)).items():
            conn = self.peers.get(peer)
            if conn is not None:
                conn.mapper.apply_full(bindings, stamp)
                conn.deliver(conn.mapper.update(self.beats.alive))

    def sent(self, updated_at: float) -> None:
        """A node frame went out: count it and time its trip from the database commit."""
        self.counts["updates_out"] += 1
        if updated_at and self.beats is not None:
            self.propagation.append(max(0.0, time.time() + self.beats.skew - updated_at))

    async def _cleanup_loop(self) -> None:
        assert self.store is not None and self.beats is not None
        await self.beats.first_beat.wait()
        while True:
            try:
                deleted = await self.store.cleanup()
                if any(deleted):
                    log.info("tailnet cleanup deleted %d coordinators, %d lost peers, %d tunnels", *deleted)
            except Exception as exc:
                log.debug("tailnet cleanup failed: %s", exc)
            await anyio.sleep(CLEANUP_EVERY)

    # -- reports -------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        samples = sorted(self.propagation)

        def quantile(q: float) -> float | None:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else None

        beats = self.beats
        return {
            "coordinator_id": str(self.id),
            "healthy": self.healthy,
            "ready": self.ready,
            "peers": len(self.peers),
            "tunnels": sum(len(c.tunnels) for c in self.peers.values()),
            "live_coordinators": len(beats.live()) if beats else 0,
            "heartbeat_failures": beats.failures if beats else 0,
            "last_error": beats.last_error if beats else None,
            "updates_in": self.counts["updates_in"],
            "updates_out": self.counts["updates_out"],
            "propagation_p50_seconds": quantile(0.5),
            "propagation_p99_seconds": quantile(0.99),
            "propagation_samples": len(samples),
            "resyncs": self.counts["resyncs"],
            "replaced": self.counts["replaced"],
            "throttled": self.counts["throttled"],
            "work_pending": len(self.work),
            "node_writes": self.binder.written if self.binder else 0,
            "node_write_batches": self.binder.batches if self.binder else 0,
            "marked_lost": self.binder.marked_lost if self.binder else 0,
            "refused": dict(self.refused),
        }

    def health(self) -> dict[str, Any]:
        """The ``tailnet`` entry of the health report."""
        beats = self.beats
        return {
            "healthy": self.healthy,
            "coordinator_id": str(self.id),
            "peers": len(self.peers),
            "live_coordinators": len(beats.live()) if beats else 0,
            "error": None if self.healthy else f"{MISSED_BEATS} heartbeats failed: {beats.last_error if beats else ''}",
        }


def _same_kind(kind: str) -> Callable[[WorkKey], bool]:
    return lambda key: key[0] == kind


def _uuid(text: bytes) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.decode())
    except (ValueError, UnicodeDecodeError):
        return None
