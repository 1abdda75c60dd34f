"""The ``replicas`` table: its liveness rule, the statements the registry runs, and one row as a value.

Liveness is judged in SQL by database time only, each row by the heartbeat interval it declares:
:data:`ALIVE_SQL` is the one rule, also what ``coordinator probe`` and the status page call alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

MISSED_BEATS = 3  # a peer is dead once it missed this many heartbeats
# Our own beat is overdue (writes stalling for everyone?) after this many intervals without one:
# before a peer that beat just ahead of us can expire (MISSED_BEATS after its last write).
OVERDUE_BEATS = 1.5

ALIVE_SQL = f"(stopped_at IS NULL AND updated_at > now() - {MISSED_BEATS} * heartbeat_ms * interval '1 millisecond')"
# Every column but the latency matrix (peer_latencies): N rows of N entries, read by every replica at
# every heartbeat, were most of a 50-replica fleet's idle CPU. The operator API reads it on demand.
_COLUMNS = ("id, created_at, started_at, updated_at, stopped_at, hostname, region_id, relay_url, version, "
            "database_latency, error, heartbeat_ms, pubsub_latency")
_SELECT_ALL = f"""
    SELECT {_COLUMNS}, {ALIVE_SQL} AS alive,
           extract(epoch FROM updated_at + {MISSED_BEATS} * heartbeat_ms * interval '1 millisecond' - now())::float8
               AS expires_in
    FROM replicas"""
# What the operator's views read on demand: the latency matrix and each heartbeat's age (database time).
_SELECT_VIEW = """
    SELECT id, peer_latencies, extract(epoch FROM now() - updated_at)::float8 AS heartbeat_age FROM replicas"""
_UPDATE_SELF = """
    UPDATE replicas
    SET updated_at = clock_timestamp(), stopped_at = NULL, hostname = %(hostname)s, region_id = %(region_id)s,
        relay_url = %(relay_url)s, version = %(version)s, database_latency = %(latency)s,
        error = %(error)s, heartbeat_ms = %(heartbeat_ms)s,
        peer_latencies = %(peer_latencies)s, pubsub_latency = %(pubsub_latency)s
    WHERE id = %(id)s
    RETURNING *"""
# updated_at is clock_timestamp(), not now() (the transaction's start): a beat that waited on a
# lock must not write a time that is already stale, or its peers would judge it dead at once.
# started_at/created_at come back from our previous row (database time) when re-inserting.
_INSERT_SELF = """
    INSERT INTO replicas (id, hostname, region_id, relay_url, version, database_latency, error,
                          heartbeat_ms, created_at, started_at, updated_at)
    VALUES (%(id)s, %(hostname)s, %(region_id)s, %(relay_url)s, %(version)s, %(latency)s, %(error)s,
            %(heartbeat_ms)s, coalesce(%(created_at)s, now()), coalesce(%(started_at)s, now()), clock_timestamp())
    ON CONFLICT (id) DO UPDATE
    SET updated_at = clock_timestamp(), stopped_at = NULL, database_latency = excluded.database_latency,
        error = excluded.error
    RETURNING *"""
_STOP_SELF = """
    UPDATE replicas SET stopped_at = now(), updated_at = now(), database_latency = 0
    WHERE id = %s RETURNING *"""
_CLEANUP = f"""
    DELETE FROM replicas
    WHERE id <> %(id)s AND NOT {ALIVE_SQL} AND updated_at < now() - %(after)s * interval '1 second'"""


@dataclass(frozen=True)
class ReplicaInfo:
    """One row of ``replicas``. ``alive`` was judged by the database when the row was read."""

    id: UUID
    hostname: str
    region_id: int
    relay_url: str
    version: str
    database_latency: int  # microseconds
    error: str  # '' when healthy
    heartbeat: float  # seconds, as declared by that replica
    created_at: datetime
    started_at: datetime
    updated_at: datetime
    stopped_at: datetime | None
    alive: bool
    peer_latencies: dict = field(default_factory=dict)  # what this replica measured to each peer
    pubsub_latency: int = 0  # microseconds


    @classmethod
    def from_row(cls, row: dict, alive: bool | None = None) -> ReplicaInfo:
        return cls(
            id=row["id"], hostname=row["hostname"], region_id=row["region_id"], relay_url=row["relay_url"],
            version=row["version"], database_latency=row["database_latency"], error=row["error"],
            heartbeat=row["heartbeat_ms"] / 1000.0, created_at=row["created_at"], started_at=row["started_at"],
            updated_at=row["updated_at"], stopped_at=row["stopped_at"],
            alive=row["alive"] if alive is None else alive,
            peer_latencies=row.get("peer_latencies") or {}, pubsub_latency=row.get("pubsub_latency") or 0,
        )
