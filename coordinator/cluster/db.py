"""PostgreSQL access: a bounded-wait open, a version check, migrations under an advisory lock, a pool.

Every replica calls :meth:`Database.open` at start-up. It waits a bounded time for the server,
refuses servers older than PostgreSQL 13, and applies the SQL files in ``coordinator/cluster/migrations``
in order inside one transaction that holds an advisory lock, so replicas starting together migrate
exactly once. Error messages name the server but never carry the password.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote, urlsplit

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from coordinator.cluster.dberrors import DatabaseError, DatabaseRefused, DatabaseUnavailable
from coordinator.cluster.schema import Migration, check_server_version, load_migrations, migrate

log = logging.getLogger("coordinator.db")

MESH_KEY = "derp_mesh_key"

# Defaults added to the URL unless it sets them: a dead or black-holed server must fail a
# connect or query within seconds, not after the kernel's two-hour keepalive default.
_CONN_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "coordinator",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}
if psycopg.pq.version() >= 120000:
    _CONN_DEFAULTS["tcp_user_timeout"] = "10000"  # ms: unacknowledged writes fail after 10 s

# Start-up failures where retrying cannot help. libpq reports no SQLSTATE for a failed
# connection, so the server's (English) FATAL text is all there is to go on.
_FATAL_CONNECT_ERRORS = re.compile(
    r"password authentication failed|no pg_hba\.conf entry|role \".*\" does not exist"
    r"|database \".*\" does not exist|SSL is not enabled on the server",
)


class _PoolOutageFilter(logging.Filter):
    """Demote psycopg_pool's per-attempt connect warnings to DEBUG after the first, until it connects.

    During an outage the pool warns on every reconnect attempt; one warning per outage is enough.
    """

    _MESSAGES = ("error connecting in %r: %s", "reconnection attempt in pool %r failed after %s sec")

    def __init__(self) -> None:
        super().__init__()
        self.quiet: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self._MESSAGES and isinstance(record.args, tuple) and record.args:
            name = str(record.args[0])
            if name in self.quiet:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
            self.quiet.add(name)
        return True


def shut_socket(conn: psycopg.AsyncConnection) -> None:
    """Shut the connection's socket so whatever waits on it fails now (the connection is then unusable).

    The pending read returns EOF at once, where a server-side cancel would wait for a half-open or
    frozen server for many seconds.
    """
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class Connection(psycopg.AsyncConnection):
    """psycopg's connection, except that cancelling a task mid-query never blocks the process.

    psycopg answers a cancelled task by cancelling the query on the server. Without libpq 17's
    non-blocking cancel it calls ``PQcancel``, which holds the GIL until the server answers: against
    a frozen (black-holed) server the whole process froze, shutdown watchdog included. We shut the
    socket instead; the query fails at once and the pool discards the connection.
    """

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:
        if psycopg.capabilities.has_cancel_safe():
            await super().cancel_safe(timeout=timeout)
        else:
            shut_socket(self)


_pool_log_filter = _PoolOutageFilter()
logging.getLogger("psycopg.pool").addFilter(_pool_log_filter)
_pool_ids = itertools.count(1)


@dataclass(frozen=True)
class Probe:
    """One round trip: ``latency`` in seconds, ``skew`` = database clock minus local clock, seconds."""

    latency: float
    skew: float


def _password_of(url: str) -> str | None:
    """Best-effort password extraction that works even when libpq cannot parse ``url``."""
    try:
        if "://" in url:
            password = urlsplit(url).password
            return unquote(password) if password else None
        match = re.search(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url)
        return match.group(1).strip("'") if match else None
    except ValueError:
        return None


def redact(text: str, *secrets_: str | None) -> str:
    for secret in secrets_:
        if secret:
            text = text.replace(secret, "***")
    return text


def describe_target(params: dict) -> str:
    """``host:port/dbname`` (or the socket directory) for messages; never includes the password."""
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or params.get("user") or "postgres"
    if not host:
        where = "the default local socket"
    elif host.startswith("/") or host.startswith("@"):
        where = f"unix socket in {host}"
    else:
        where = ",".join(f"{h}:{port}" for h in host.split(","))
    return f"{where} (database {dbname!r})"


def prepare_conninfo(url: str) -> tuple[str, str, str | None]:
    """(connection string with our timeouts, description for messages, password to redact)."""
    password = _password_of(url)
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise DatabaseError(f"invalid PostgreSQL URL: {redact(str(exc), password)}") from None
    if params.get("password"):
        password = str(params["password"])
    for key, value in _CONN_DEFAULTS.items():
        params.setdefault(key, value)
    return make_conninfo("", **params), describe_target(params), password


def _fatal(exc: Exception) -> bool:
    return bool(_FATAL_CONNECT_ERRORS.search(str(exc)))


STILL_WAITING_EVERY = 60.0  # seconds between "still waiting" lines during an unbounded wait


async def _connect_with_retry(conninfo: str, target: str, password: str | None, wait: float) -> psycopg.AsyncConnection:
    """Connect, retrying with backoff for up to ``wait`` seconds (``math.inf``: until the server answers)."""
    started = time.monotonic()
    deadline = started + wait
    delay, attempts, next_note = 0.25, 0, started + STILL_WAITING_EVERY
    while True:
        attempts += 1
        try:
            # connect_timeout is per host and at least 2 s; this keeps the total within ``wait``.
            with anyio.fail_after(max(deadline - time.monotonic(), 1.0)):
                return await Connection.connect(conninfo, autocommit=True)
        except (psycopg.OperationalError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else redact(" ".join(str(exc).split()), password)
            if _fatal(exc):
                raise DatabaseRefused(f"PostgreSQL at {target} refused the connection: {reason}") from None
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"cannot connect to PostgreSQL at {target} after {wait:g} s ({attempts} attempts): {reason}"
                ) from None
            if attempts == 1 and math.isinf(wait):
                log.warning("PostgreSQL at %s is not answering (%s); retrying until it does "
                            "(--db-wait / COORDINATOR_PG_WAIT bounds the wait)", target, reason)
            elif attempts == 1:
                log.warning("waiting up to %g s for PostgreSQL at %s: %s", wait, target, reason)
            elif now >= next_note:
                next_note = now + STILL_WAITING_EVERY
                log.warning("still waiting for PostgreSQL at %s after %.0f s: %s", target, now - started, reason)
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


async def _probe(conn: psycopg.AsyncConnection) -> Probe:
    wall = time.time()
    t0 = time.perf_counter()
    cur = await conn.execute("SELECT clock_timestamp()")
    latency = time.perf_counter() - t0
    db_time: datetime = (await cur.fetchall())[0][0]  # the one row
    return Probe(latency, db_time.timestamp() - (wall + latency / 2))


class Database:
    """A connection pool to one PostgreSQL server. Build with :meth:`open`."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        target: str,
        server_version: int,
        migrations: list[Migration] | None = None,
        *,
        password: str | None = None,
    ):
        self.pool = pool
        self.target = target
        self.server_version = server_version
        self.migrations = load_migrations() if migrations is None else migrations
        self._password = password

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        wait: float = 30.0,
        min_size: int = 1,
        max_size: int = 10,
        statement_timeout: float = 15.0,
        migrations: list[Migration] | None = None,
    ) -> Database:
        """Connect (retrying for up to ``wait`` seconds, ``math.inf`` for ever), check the version, migrate, open the pool.

        Raises :class:`DatabaseUnavailable` (:class:`DatabaseRefused` if retrying cannot help),
        :class:`UnsupportedPostgres` or :class:`MigrationError`.
        """
        conninfo, target, password = prepare_conninfo(url)
        migrations = load_migrations() if migrations is None else migrations
        started = time.monotonic()
        conn = await _connect_with_retry(conninfo, target, password, wait)
        try:
            cur = await conn.execute("SELECT current_setting('server_version_num')::int")
            version = (await cur.fetchall())[0][0]  # the one row
            check_server_version(version, f"the server at {target}")
            applied = await migrate(conn, migrations)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"PostgreSQL at {target} failed during start-up: {redact(str(exc), password)}") from None
        finally:
            await conn.close()
        if applied:
            log.info("applied migrations %s to %s", applied, target)

        pool_name = f"coordinator-{next(_pool_ids)}"

        async def configure(c: psycopg.AsyncConnection) -> None:
            _pool_log_filter.quiet.discard(pool_name)  # connected: warn again on the next outage
            # SET rather than the "options" startup parameter, which PgBouncer rejects.
            await c.execute(f"SET statement_timeout = '{int(statement_timeout * 1000)}ms'")
            await c.execute("SET idle_in_transaction_session_timeout = '60s'")

        pool = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            connection_class=Connection,
            kwargs={"autocommit": True},
            configure=configure,
            check=AsyncConnectionPool.check_connection,  # hand out no connection that died in an outage
            timeout=10.0,
            # Give up a background reconnect quickly: the next request starts a fresh attempt, so
            # recovery after an outage does not wait out a long exponential backoff.
            reconnect_timeout=5.0,
            name=pool_name,
            open=False,
        )
        remaining = min(max(wait - (time.monotonic() - started), 5.0), 30.0)  # the caller may retry
        try:
            await pool.open(wait=True, timeout=remaining)
        except Exception as exc:
            await pool.close()
            raise DatabaseUnavailable(f"cannot open a connection pool to PostgreSQL at {target}: {redact(str(exc), password)}") from None
        return cls(pool, target, version, migrations, password=password)

    async def migrate(self) -> list[int]:
        """Apply pending migrations again, e.g. after the database was replaced by an empty one."""
        async with self.pool.connection() as conn:
            await conn.execute("SET statement_timeout = 0")
            try:
                applied = await migrate(conn, self.migrations)
            finally:
                await conn.execute("RESET statement_timeout")
        if applied:
            log.warning("re-applied migrations %s to %s", applied, self.target)
        return applied

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled autocommit connection; ``PoolTimeout`` if none is available within ``timeout``."""
        async with self.pool.connection(timeout=timeout) as conn:
            yield conn

    async def probe(self, timeout: float = 5.0, conn: psycopg.AsyncConnection | None = None) -> Probe:
        """Measure one round trip and the database clock's offset from ours (on ``conn`` if given)."""
        with anyio.fail_after(timeout):
            if conn is not None:
                return await _probe(conn)
            async with self.pool.connection(timeout=timeout) as conn:
                return await _probe(conn)

    async def diagnose(self, timeout: float = 5.0) -> str | None:
        """Why new connections fail right now (redacted), or None if one succeeds.

        A pool that cannot connect only says it timed out; this asks libpq directly.
        """
        try:
            with anyio.fail_after(timeout):
                conn = await Connection.connect(str(self.pool.conninfo), autocommit=True)
                try:
                    await conn.execute("SELECT 1")
                finally:
                    await conn.close()
        except TimeoutError:
            return f"no answer from {self.target} within {timeout:g} s"
        except psycopg.Error as exc:
            return redact(" ".join(str(exc).split()), self._password)
        return None

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of one trivial query, in seconds."""
        return (await self.probe(timeout)).latency

    async def get_or_create_site_config(self, key: str, generate: Callable[[], str | Awaitable[str]]) -> str:
        """The value stored under ``key``, creating it with ``generate()`` if absent; every caller gets the same."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT value FROM site_config WHERE key = %s", (key,))
            row = await cur.fetchone()
            if row:
                return row[0]
            value = generate()
            if inspect.isawaitable(value):
                value = await value
            cur = await conn.execute(
                "INSERT INTO site_config (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING RETURNING value",
                (key, value),
            )
            row = await cur.fetchone()
            if row:
                return row[0]
            # Lost the race: a new statement (and snapshot) sees the winner's committed row.
            cur = await conn.execute("SELECT value FROM site_config WHERE key = %s", (key,))
            row = await cur.fetchone()
            if not row:
                raise DatabaseError(f"site_config {key!r} vanished while being created")
            return row[0]

    async def derp_mesh_key(self, override: str | None = None) -> str:
        """The DERP mesh key: ``override`` if set, else the deployment's stored key (created once).

        A created key is 32 random bytes as 64 hex characters, Tailscale's mesh-key format.
        """
        if override and override.strip():
            return override.strip()
        key = await self.get_or_create_site_config(MESH_KEY, lambda: secrets.token_hex(32))
        if not key.strip():
            raise DatabaseError("the stored DERP mesh key is empty; delete it from site_config to regenerate")
        return key

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool, waiting at most ``timeout`` s for its background workers."""
        await self.pool.close(timeout)

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

