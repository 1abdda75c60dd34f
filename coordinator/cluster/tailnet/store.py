"""The peer coordinator's SQL: every statement on the tables of migration 0003, in one place.

Each call takes one pooled connection for one short statement (autocommit); the triggers NOTIFY the
change. Times are the database's: ``updated_at`` comes back as seconds since the epoch on its clock.

The store has its own small pool, without the replica pool's check of every connection handed out:
that check is a second round trip per statement, half the database work of an update. A connection
that died in an outage fails its statement once (the pool then discards it) and callers retry.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import anyio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from coordinator.cluster.db import Connection, Database

PEER_CHANNEL = "tailnet_peer_update"              # payload: peer id
TUNNEL_CHANNEL = "tailnet_tunnel_update"          # payload: "src,dst"
HEARTBEAT_CHANNEL = "tailnet_coordinator_heartbeat"  # payload: coordinator id
HANDSHAKE_CHANNEL = "tailnet_ready_for_handshake"  # payload: "dst,src" (the application NOTIFYs it)
RETENTION = "24 hours"  # what cleanup keeps of dead coordinators, lost peers and orphaned tunnels
STATEMENT_TIMEOUT = 5.0  # seconds one statement may run (the server's statement_timeout)
POOL_WAIT = 30.0  # seconds a call may wait for a connection: under a storm writes queue, they do not fail
POOL_SIZE = 8  # connections of the store's own pool (workers and peers' writes share it)


@dataclass(frozen=True)
class Binding:
    """One row of ``tailnet_peers`` as a mapping: where a peer is connected and its node there."""

    peer: uuid.UUID
    coordinator: uuid.UUID
    updated_at: float  # database clock, seconds since the epoch
    node: str          # JSON text
    lost: bool


@dataclass(frozen=True)
class CoordinatorAge:
    """A coordinator's heartbeat as the database sees it: seconds since its last beat, and its interval."""

    id: uuid.UUID
    age: float
    heartbeat: float


class TailnetStore:
    """The coordinator's statements over a :class:`Database` pool."""

    def __init__(self, db: Database, timeout: float = STATEMENT_TIMEOUT, pool_size: int = POOL_SIZE):
        self.db = db
        self.timeout = timeout

        async def configure(conn: AsyncConnection) -> None:
            await conn.execute(f"SET statement_timeout = '{int(timeout * 1000)}ms'")

        self.pool: AsyncConnectionPool = AsyncConnectionPool(
            db.pool.conninfo, min_size=1, max_size=pool_size, connection_class=Connection,
            kwargs={"autocommit": True}, configure=configure, timeout=POOL_WAIT, reconnect_timeout=5.0,
            name="coordinator-tailnet", open=False,
        )

    async def open(self) -> None:
        """Open the pool (its connections are made in the background; statements wait for one)."""
        await self.pool.open(wait=False)

    async def close(self, timeout: float = 2.0) -> None:
        await self.pool.close(timeout)

    async def _execute(self, sql: str, params: tuple | dict = ()) -> list[tuple]:
        with anyio.fail_after(POOL_WAIT + self.timeout):
            async with self.pool.connection(timeout=POOL_WAIT) as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall() if cur.description else []

    # -- coordinators -------------------------------------------------------------------------

    async def beat(self, coordinator: uuid.UUID, heartbeat: float, timeout: float) -> tuple[float, list[CoordinatorAge]]:
        """Write our heartbeat; return the database's clock and every recently beating coordinator's age."""
        # On the replica's pool, not ours: a backlog of peers' writes (a reconnect storm) must not
        # delay our heartbeat into looking unhealthy, which would close every peer: a worse storm.
        with anyio.fail_after(timeout):
            async with self.db.connection(timeout=timeout) as conn:
                await conn.execute(
                    "INSERT INTO tailnet_coordinators (id, heartbeat_at, heartbeat_ms) VALUES (%s, now(), %s)"
                    " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), heartbeat_ms = EXCLUDED.heartbeat_ms",
                    (coordinator, max(1, round(heartbeat * 1000))),
                )
                cur = await conn.execute(
                    "SELECT id, extract(epoch FROM now() - heartbeat_at)::float8, heartbeat_ms,"
                    " extract(epoch FROM now())::float8 FROM tailnet_coordinators"
                    " WHERE heartbeat_at > now() - interval '1 hour'"
                )
                rows = await cur.fetchall()
        now = rows[0][3] if rows else 0.0
        return now, [CoordinatorAge(r[0], r[1], r[2] / 1000) for r in rows]

    async def mark_coordinator_lost(self, coordinator: uuid.UUID) -> int:
        """Every peer of ``coordinator`` becomes ``lost`` (one statement); returns how many."""
        rows = await self._execute(
            "UPDATE tailnet_peers SET status = 'lost', updated_at = now()"
            " WHERE coordinator_id = %s AND status = 'ok' RETURNING id", (coordinator,))
        return len(rows)

    # -- peers ----------------------------------------------------------------------------------

    async def upsert_peer(self, peer: uuid.UUID, coordinator: uuid.UUID, node: str) -> None:
        await self._execute(
            "INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at) VALUES (%s, %s, %s::jsonb, 'ok', now())"
            " ON CONFLICT (id, coordinator_id) DO UPDATE SET node = EXCLUDED.node, status = 'ok', updated_at = now()",
            (peer, coordinator, node),
        )

    async def upsert_peers(self, coordinator: uuid.UUID, nodes: list[tuple[uuid.UUID, str]]) -> None:
        """Many peers' nodes in one statement (each peer at most once)."""
        await self._execute(
            "INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at)"
            " SELECT u.id, %(c)s, u.node::jsonb, 'ok', now() FROM unnest(%(ids)s::uuid[], %(nodes)s::text[]) AS u(id, node)"
            " ON CONFLICT (id, coordinator_id) DO UPDATE SET node = EXCLUDED.node, status = 'ok', updated_at = now()",
            {"c": coordinator, "ids": [p for p, _ in nodes], "nodes": [n for _, n in nodes]},
        )

    async def mark_peers_lost(self, coordinator: uuid.UUID, peers: list[uuid.UUID]) -> None:
        await self._execute(
            "UPDATE tailnet_peers SET status = 'lost', updated_at = now()"
            " WHERE coordinator_id = %s AND id = ANY(%s) AND status = 'ok'", (coordinator, peers))

    async def mark_peer_lost(self, peer: uuid.UUID, coordinator: uuid.UUID) -> None:
        await self._execute(
            "UPDATE tailnet_peers SET status = 'lost', updated_at = now() WHERE id = %s AND coordinator_id = %s",
            (peer, coordinator),
        )

    async def delete_peer(self, peer: uuid.UUID, coordinator: uuid.UUID) -> None:
        """A graceful leave: the peer's row here, its rows left lost elsewhere (earlier connections, dead
        coordinators), and the tunnels it opened at each, so that its tunnel peers see it disconnected."""
        await self._execute(
            "WITH gone AS (DELETE FROM tailnet_peers p WHERE p.id = %(p)s AND (p.coordinator_id = %(c)s"
            "   OR p.status = 'lost' OR EXISTS (SELECT 1 FROM tailnet_coordinators k WHERE k.id = p.coordinator_id"
            "     AND k.heartbeat_at < now() - 3 * k.heartbeat_ms * interval '1 millisecond'))"
            "   RETURNING p.coordinator_id)"
            " DELETE FROM tailnet_tunnels WHERE src_id = %(p)s"
            "   AND coordinator_id IN (SELECT coordinator_id FROM gone UNION SELECT %(c)s::uuid)",
            {"p": peer, "c": coordinator},
        )

    # -- tunnels --------------------------------------------------------------------------------

    async def add_tunnel(self, coordinator: uuid.UUID, src: uuid.UUID, dst: uuid.UUID) -> None:
        await self._execute(
            "INSERT INTO tailnet_tunnels (coordinator_id, src_id, dst_id, updated_at) VALUES (%s, %s, %s, now())"
            " ON CONFLICT (coordinator_id, src_id, dst_id) DO UPDATE SET updated_at = now()",
            (coordinator, src, dst),
        )

    async def remove_tunnel(self, coordinator: uuid.UUID, src: uuid.UUID, dst: uuid.UUID) -> None:
        await self._execute(
            "DELETE FROM tailnet_tunnels WHERE coordinator_id = %s AND src_id = %s AND dst_id = %s",
            (coordinator, src, dst),
        )

    # -- what peers are told ----------------------------------------------------------------------

    async def tunnel_peers(self, peer: uuid.UUID) -> set[uuid.UUID]:
        """Every peer on the other end of a tunnel with ``peer`` (either direction, any coordinator)."""
        rows = await self._execute(
            "SELECT dst_id FROM tailnet_tunnels WHERE src_id = %(p)s"
            " UNION SELECT src_id FROM tailnet_tunnels WHERE dst_id = %(p)s", {"p": peer})
        return {r[0] for r in rows}

    async def peer_changes(self, peers: list[uuid.UUID]) -> dict[uuid.UUID, tuple[set[uuid.UUID], list[Binding]]]:
        """After these peers' rows changed: for each, the peers it shares a tunnel with and its rows.

        One round trip for the whole batch.
        """
        rows = await self._execute(
            "SELECT true, p.id, p.id, p.coordinator_id, extract(epoch FROM p.updated_at)::float8, p.node::text,"
            " p.status FROM tailnet_peers p WHERE p.id = ANY(%(p)s)"
            " UNION ALL SELECT false, t.subject, t.other, NULL::uuid, NULL::float8, NULL::text, NULL::text FROM ("
            "   SELECT src_id AS subject, dst_id AS other FROM tailnet_tunnels WHERE src_id = ANY(%(p)s)"
            "   UNION SELECT dst_id, src_id FROM tailnet_tunnels WHERE dst_id = ANY(%(p)s)) t",
            {"p": peers},
        )
        out: dict[uuid.UUID, tuple[set[uuid.UUID], list[Binding]]] = {p: (set(), []) for p in peers}
        for is_row, subject, peer, coordinator, updated_at, node, status in rows:
            partners, bindings = out[subject]
            if is_row:
                bindings.append(Binding(peer, coordinator, updated_at, node, status == "lost"))
            else:
                partners.add(peer)
        return out

    async def bindings(self, peer: uuid.UUID) -> list[Binding]:
        """Every row of every peer ``peer`` shares a tunnel with."""
        return (await self.bindings_of([peer]))[peer]

    async def bindings_of(self, peers: list[uuid.UUID]) -> dict[uuid.UUID, list[Binding]]:
        """For each of ``peers``: every row of every peer it shares a tunnel with (one round trip)."""
        rows = await self._execute(
            "SELECT t.subject, p.id, p.coordinator_id, extract(epoch FROM p.updated_at)::float8, p.node::text, p.status"
            " FROM (SELECT src_id AS subject, dst_id AS other FROM tailnet_tunnels WHERE src_id = ANY(%(p)s)"
            "       UNION SELECT dst_id, src_id FROM tailnet_tunnels WHERE dst_id = ANY(%(p)s)) t"
            " JOIN tailnet_peers p ON p.id = t.other",
            {"p": peers},
        )
        out: dict[uuid.UUID, list[Binding]] = {p: [] for p in peers}
        for subject, peer, coordinator, updated_at, node, status in rows:
            out[subject].append(Binding(peer, coordinator, updated_at, node, status == "lost"))
        return out

    # -- housekeeping ---------------------------------------------------------------------------

    async def cleanup(self) -> tuple[int, int, int]:
        """Delete coordinators silent, lost peers unchanged, and orphaned tunnels older than 24 h.

        Idempotent; any replica may run it. Returns (coordinators, peers, tunnels) deleted.
        """
        coordinators = await self._execute(
            f"DELETE FROM tailnet_coordinators WHERE heartbeat_at < now() - interval '{RETENTION}' RETURNING id")
        peers = await self._execute(
            f"DELETE FROM tailnet_peers WHERE status = 'lost' AND updated_at < now() - interval '{RETENTION}' RETURNING id")
        tunnels = await self._execute(
            f"DELETE FROM tailnet_tunnels t WHERE updated_at < now() - interval '{RETENTION}' AND NOT EXISTS ("
            " SELECT 1 FROM tailnet_peers p WHERE p.id = t.src_id AND p.coordinator_id = t.coordinator_id)"
            " RETURNING src_id")
        return len(coordinators), len(peers), len(tunnels)
