"""Server-side bounds on the registry's statements, so a lock or a slow server ends them cleanly.

A client-side timeout alone shuts the socket, but a backend waiting on a lock does not notice its
client left: every abandoned heartbeat would keep a connection slot until the lock is released.
``lock_timeout`` and ``statement_timeout`` make the server give up first, the connection stays
usable, and the error names the cause (SQLSTATE 55P03 or 57014).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

_SET = "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)"


def limits(op_timeout: float) -> tuple[int, int]:
    """(statement, lock) timeouts in ms for an operation the client gives up on after ``op_timeout`` s."""
    return max(1, int(op_timeout * 750)), max(1, int(op_timeout * 500))


@asynccontextmanager
async def bounded(conn: psycopg.AsyncConnection, op_timeout: float) -> AsyncIterator[None]:
    """A transaction whose statements the server ends before the client's own ``op_timeout``.

    ``SET LOCAL`` semantics (``set_config(..., true)``) hold for this transaction only, so they also
    work through a transaction-pooling PgBouncer and never leak to the pool's next user.
    """
    statement_ms, lock_ms = limits(op_timeout)
    async with conn.transaction():
        await conn.execute(_SET, (f"{statement_ms}ms", f"{lock_ms}ms"))
        yield
