"""The peer coordinator's part of the status page: this replica's figures and every coordinator's rows.

This replica's figures come from its coordinator's ``stats()`` (peers, tunnels, updates, propagation,
resyncs, refusals, health). The deployment's view comes from the tables, on the database clock:
each coordinator's heartbeat age, its peers (``ok`` and ``lost``) and its tunnels, so an operator
sees where the peers are and which coordinator died with peers still marked lost.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from coordinator.cluster.db import Database
from coordinator.cluster.tailnet.core import TailnetCoordinator
from coordinator.cluster.tailnet.heartbeats import MISSED_BEATS

log = logging.getLogger("coordinator.status")

MAX_COORDINATORS = 50  # rows shown (dead coordinators are kept 24 h: a long tail is not useful here)
COORDINATORS_QUERY = """
    SELECT c.id::text, extract(epoch FROM now() - c.heartbeat_at)::float8, c.heartbeat_ms,
           (SELECT count(*) FROM tailnet_peers p WHERE p.coordinator_id = c.id AND p.status = 'ok'),
           (SELECT count(*) FROM tailnet_peers p WHERE p.coordinator_id = c.id AND p.status = 'lost'),
           (SELECT count(*) FROM tailnet_tunnels t WHERE t.coordinator_id = c.id)
    FROM tailnet_coordinators c ORDER BY c.heartbeat_at DESC LIMIT %s"""


def _ms(seconds: Any) -> float | None:
    return None if not isinstance(seconds, int | float) else round(seconds * 1000.0, 3)


async def coordinator_rows(db: Database | None, own_id: str) -> list[dict[str, Any]]:
    """Every coordinator's row with its peer and tunnel counts (empty if the database does not answer)."""
    if db is None:
        return []
    try:
        with anyio.fail_after(1.0):
            async with db.connection(timeout=1.0) as conn:
                rows = await (await conn.execute(COORDINATORS_QUERY, (MAX_COORDINATORS,))).fetchall()
    except Exception as exc:  # the page then shows no rows; the findings say why the database is away
        log.debug("tailnet coordinators unavailable: %s", exc)
        return []
    out = []
    for cid, age, beat_ms, peers, lost, tunnels in rows:
        alive = age is not None and age <= MISSED_BEATS * beat_ms / 1000.0
        # A dead coordinator could not mark its peers lost: the others judge them lost, and so does the page.
        out.append({"id": cid, "self": cid == own_id, "heartbeat_age_s": age, "alive": alive,
                    "peers": peers if alive else 0, "lost": lost if alive else lost + peers, "tunnels": tunnels})
    return out


async def tailnet_snapshot(coordinator: TailnetCoordinator | None, db: Database | None) -> dict[str, Any] | None:
    """The ``tailnet`` part of ``/status/data``; None when this replica runs no coordinator."""
    if coordinator is None:
        return None
    s = coordinator.stats()
    refused = s.get("refused") or {}
    return {
        "coordinator_id": s["coordinator_id"], "healthy": s["healthy"], "ready": s["ready"],
        "peers": s["peers"], "tunnels": s["tunnels"], "live_coordinators": s["live_coordinators"],
        "updates_in": s["updates_in"], "updates_out": s["updates_out"],
        "propagation_p50_ms": _ms(s.get("propagation_p50_seconds")),
        "propagation_p99_ms": _ms(s.get("propagation_p99_seconds")),
        "propagation_samples": s.get("propagation_samples", 0),
        "resyncs": s["resyncs"], "throttled": s.get("throttled", 0), "replaced": s.get("replaced", 0),
        "refused": dict(refused), "refused_total": sum(refused.values()),
        "heartbeat_failures": s.get("heartbeat_failures", 0), "last_error": s.get("last_error"),
        "coordinators": await coordinator_rows(db, s["coordinator_id"]),
    }
