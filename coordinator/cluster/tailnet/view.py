"""What a tailnet client knows and says: peer updates as received, each peer's state, its errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID


class TailnetError(Exception):
    """The client cannot do what was asked (it is closed, or a wait timed out)."""


class TailnetRefused(TailnetError):
    """The coordinator refused this peer for good (bad token, policy violation): retrying cannot help."""


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """One ``peer_update`` as received: ``kind`` is node, disconnected, lost or ready_for_handshake."""

    peer: UUID
    kind: str
    node: dict[str, Any] | None
    received: float  # time.monotonic() when it arrived
    connection: int  # which of the client's connections carried it (1, 2, ...)


@dataclass(frozen=True, slots=True)
class PeerState:
    """What the client knows of one peer.

    ``kind`` is the last state reported (node, lost or disconnected); ``node`` is the newest node,
    kept while the peer is lost (its relay may still carry packets, as Coder keeps lost peers) and
    dropped once it disconnected. ``ready_for_handshake`` is when the peer last said it is ready.
    """

    kind: str
    node: dict[str, Any] | None
    updated: float
    connection: int
    ready_for_handshake: float | None = None


def apply(old: PeerState | None, update: PeerUpdate) -> PeerState | None:
    """A peer's state after ``update`` (``old``: None for a peer not seen before; so is the result for a
    handshake signal from a peer the client has no node of)."""
    if update.kind == "node":
        return PeerState("node", update.node, update.received, update.connection,
                         old.ready_for_handshake if old else None)
    if update.kind == "lost":
        return PeerState("lost", old.node if old else None, update.received, update.connection)
    if update.kind == "ready_for_handshake":
        return None if old is None else PeerState(old.kind, old.node, old.updated, old.connection, update.received)
    return PeerState(update.kind, None, update.received, update.connection)  # disconnected
