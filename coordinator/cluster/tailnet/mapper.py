"""What one local peer is told: the best mapping of each tunnel peer, diffed against what it was sent.

Pure logic, no I/O: :class:`Mapper` turns the rows of ``tailnet_peers`` (``Binding``) and the set
of live coordinators into ``peer_update`` frames, and :class:`SendQueue` holds them until the
peer's writer takes them, coalescing per peer so it never grows past its bound.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.cluster.tailnet.messages import (
    DISCONNECTED,
    LOST,
    NODE,
    SEND_QUEUE_SIZE,
    Kind,
    encode_peer_update,
)
from coordinator.cluster.tailnet.store import Binding


@dataclass(frozen=True)
class Mapping:
    peer: uuid.UUID
    kind: Kind  # NODE or LOST
    node: str
    updated_at: float


def best_mappings(bindings: Iterable[Binding], alive: Callable[[uuid.UUID], bool]) -> dict[uuid.UUID, Mapping]:
    """Per peer: a node beats a lost row (the peer reconnected elsewhere); among nodes the newest wins.

    A row of a coordinator that is not alive counts as lost, whatever its status says.
    """
    best: dict[uuid.UUID, Mapping] = {}
    for b in bindings:
        kind: Kind = LOST if b.lost or not alive(b.coordinator) else NODE
        m = Mapping(b.peer, kind, b.node, b.updated_at)
        current = best.get(b.peer)
        if current is None or (kind == NODE and (current.kind == LOST or b.updated_at > current.updated_at)):
            best[b.peer] = m
        elif kind == LOST and current.kind == LOST and b.updated_at > current.updated_at:
            best[b.peer] = m
    return best


@dataclass(frozen=True)
class Outgoing:
    """One frame for a peer; ``updated_at`` (database clock) times its propagation, 0 when not a node."""

    peer: uuid.UUID
    kind: Kind
    frame: str
    updated_at: float = 0.0


class Mapper:
    """One local peer's view: the rows of the peers it shares a tunnel with, and what it was sent.

    Rows arrive from two kinds of query: a full one (every tunnel peer's rows) and a partial one
    (one peer's rows, after that peer changed). Each carries a stamp taken when it was issued; a
    result older than what is already applied for a peer is ignored, so a slow query never
    overwrites a newer node with an older one.
    """

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, list[Binding]] = {}
        self.sent: dict[uuid.UUID, tuple[Kind, str]] = {}
        self._floor = -1  # stamp of the last full result applied
        self._fresh: dict[uuid.UUID, int] = {}  # stamps of partial results applied since

    def apply_full(self, bindings: list[Binding], stamp: int) -> None:
        if stamp <= self._floor:
            return
        fresh: dict[uuid.UUID, list[Binding]] = {}
        for b in bindings:
            fresh.setdefault(b.peer, []).append(b)
        for peer in set(self.rows) | set(fresh):
            if stamp > self._fresh.get(peer, -1):
                if peer in fresh:
                    self.rows[peer] = fresh[peer]
                else:
                    self.rows.pop(peer, None)
        self._floor = stamp
        self._fresh = {p: s for p, s in self._fresh.items() if s > stamp}

    def apply_peer(self, peer: uuid.UUID, rows: list[Binding], stamp: int) -> None:
        if stamp <= max(self._floor, self._fresh.get(peer, -1)):
            return
        self._fresh[peer] = stamp
        if rows:
            self.rows[peer] = rows
        else:
            self.rows.pop(peer, None)

    def update(self, alive: Callable[[uuid.UUID], bool], *, timed: bool = False) -> list[Outgoing]:
        """Frames that bring the peer's view in line with the rows applied, judged by ``alive`` now.

        ``timed``: the frames answer a node change, so their trip from the database commit is timed
        (a new tunnel or a resync delivers nodes written long before: not a propagation time).
        """
        best = best_mappings((b for rows in self.rows.values() for b in rows), alive)
        out: list[Outgoing] = []
        for peer, m in best.items():
            sent = self.sent.get(peer)
            if m.kind == LOST and (sent is None or sent[0] == LOST):
                continue  # never told of it, or already told it is lost
            if m.kind == NODE and sent == (NODE, m.node):
                continue  # unchanged
            self.sent[peer] = (m.kind, m.node)
            out.append(Outgoing(peer, m.kind, encode_peer_update(peer, m.kind, m.node if m.kind == NODE else None),
                                m.updated_at if timed and m.kind == NODE else 0.0))
        for peer in [p for p in self.sent if p not in best]:
            del self.sent[peer]
            out.append(Outgoing(peer, DISCONNECTED, encode_peer_update(peer, DISCONNECTED)))
        return out

    def knows(self, peer: uuid.UUID) -> bool:
        """Whether ``peer`` is on the other end of one of this peer's tunnels (as last queried)."""
        return peer in self.rows


class QueueFull(Exception):
    """The peer is too slow: more distinct updates are pending than the queue holds."""


class SendQueue:
    """Frames waiting for one peer's writer: one per (peer, kind class), newest wins, at most ``size``."""

    def __init__(self, size: int = SEND_QUEUE_SIZE):
        self.size = size
        self._items: OrderedDict[tuple[uuid.UUID, bool], Outgoing] = OrderedDict()
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Outgoing) -> None:
        """Queue ``item``, replacing a pending update about the same peer; QueueFull past the bound."""
        key = (item.peer, item.kind == "ready_for_handshake")
        if key in self._items:
            self._items[key] = item
            self.coalesced += 1
            return
        if len(self._items) >= self.size:
            raise QueueFull(f"more than {self.size} updates pending: the peer reads too slowly")
        self._items[key] = item

    def pop(self) -> Outgoing | None:
        if not self._items:
            return None
        return self._items.popitem(last=False)[1]
