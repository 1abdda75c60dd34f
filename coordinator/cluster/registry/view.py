"""What the operator's views (API, status page) read from ``replicas`` on demand, beside the registry's sync."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from uuid import UUID

import anyio

from coordinator.cluster.db import Database
from coordinator.cluster.registry.bounded import bounded
from coordinator.cluster.registry.table import _SELECT_VIEW

log = logging.getLogger("coordinator.replicas")


@dataclass(frozen=True)
class OperatorView:
    """The columns the registry's sync leaves out (the N x N latency matrix) and heartbeat ages."""

    matrix: dict[UUID, dict] = field(default_factory=dict)  # each replica's peer_latencies
    ages: dict[UUID, float] = field(default_factory=dict)  # seconds since each one's last heartbeat


async def read_view(db: Database | None, timeout: float) -> OperatorView:
    """One read of :data:`_SELECT_VIEW`; an empty view when it fails (the rows as last synced still show)."""
    if db is None:
        return OperatorView()
    try:
        with anyio.fail_after(timeout):
            # bounded: a lock on replicas must not leave a waiting backend behind per page refresh
            async with db.connection(timeout=timeout) as conn, bounded(conn, timeout):
                rows = await (await conn.execute(_SELECT_VIEW)).fetchall()
    except Exception as exc:  # the health findings say why the database is away
        log.debug("operator view unavailable: %s", exc)
        return OperatorView()
    return OperatorView({rid: latencies or {} for rid, latencies, _ in rows}, {rid: age for rid, _, age in rows})
