"""How one replica's Postgres connections are shared out under ``--pg-max-conns``.

A replica holds a pool (heartbeats, peer reads, the operator API), the pub/sub's listener and a
few publish connections, plus one spare for short-lived extras (the start-up connection that
migrates, the diagnosis of a failing pool). Their sum never exceeds the budget, so an operator
can size the server's ``max_connections`` (or a pooler's) as replicas x budget + headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.core.settings import MIN_PG_CONNS

LISTENER = 1  # the pub/sub's LISTEN session
SPARE = 1  # start-up migration / pool diagnosis: one at a time, never alongside a full pool for long
MAX_PUBLISHERS = 4


@dataclass(frozen=True)
class Budget:
    """Connections per part; ``total`` is what the operator set."""

    total: int
    pool: int
    publishers: int
    listener: int = LISTENER
    spare: int = SPARE


def split(total: int) -> Budget:
    """Share ``total`` out: a quarter (1-4) to publishing, one each to the listener and a spare, the rest to the pool."""
    if total < MIN_PG_CONNS:
        raise ValueError(f"a replica needs at least {MIN_PG_CONNS} Postgres connections, not {total}")
    publishers = max(1, min(MAX_PUBLISHERS, total // 4))
    pool = total - LISTENER - SPARE - publishers
    return Budget(total=total, pool=pool, publishers=publishers)
