"""The schema: the server version it needs, the migration files and applying them exactly once.

Migrations are the ``NNNN_name.sql`` files in ``coordinator/cluster/migrations``, applied in order in
one transaction under an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from coordinator.cluster.dberrors import MigrationError, UnsupportedPostgres

log = logging.getLogger("coordinator.db")

MIN_SERVER_VERSION = 130000
# Arbitrary constant shared by every replica ("coordmig" in ASCII); one lock per deployment.
MIGRATION_LOCK_ID = 0x636F6F72646D6967


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def format_server_version(version_num: int) -> str:
    """``150004`` -> ``15.4``; ``90624`` -> ``9.6.24``."""
    if version_num >= 100000:
        return f"{version_num // 10000}.{version_num % 10000}"
    return f"{version_num // 10000}.{version_num // 100 % 100}.{version_num % 100}"


def check_server_version(version_num: int, where: str = "the server") -> None:
    """Raise :class:`UnsupportedPostgres` unless ``server_version_num`` is 13 or newer."""
    if version_num < MIN_SERVER_VERSION:
        raise UnsupportedPostgres(
            f"PostgreSQL 13 or newer is required, but {where} runs PostgreSQL "
            f"{format_server_version(version_num)} (server_version_num {version_num}); upgrade the server"
        )


def load_migrations(package: str = "coordinator.cluster", directory: str = "migrations") -> list[Migration]:
    """The ``NNNN_name.sql`` files in ``package/directory``, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files(package).joinpath(directory).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if not match:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations share version {version:04d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(conn: psycopg.AsyncConnection, migrations: list[Migration], lock_timeout: float = 300.0) -> list[int]:
    """Apply pending migrations in one transaction under the migration advisory lock.

    Returns the versions applied by this call (empty if another replica got there first).
    """
    applied_now: list[int] = []
    async with conn.transaction():
        # The lock comes first, before CREATE TABLE IF NOT EXISTS, which itself races.
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer     PRIMARY KEY,
                   name       text        NOT NULL,
                   checksum   text        NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
        done = {version: checksum for version, checksum in await cur.fetchall()}
        known = {m.version for m in migrations}
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.checksum:
                    log.warning("migration %04d_%s changed after it was applied; not re-applying", m.version, m.name)
                continue
            try:
                await conn.execute(m.sql)
            except psycopg.Error as exc:
                raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
            applied_now.append(m.version)
        newer = sorted(set(done) - known)
        if newer:
            # A newer release migrated already (rolling upgrade); migrations must stay backward compatible.
            log.warning("database has migrations this version does not know: %s", newer)
    return applied_now
