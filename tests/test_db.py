"""Database layer against a real PostgreSQL: bounded open, version check, migrations, mesh key, outages."""

import re
import socket
import subprocess
import time

import anyio
import psycopg
import pytest

from coordinator.cluster.db import Database
from coordinator.cluster.dberrors import (
    DatabaseError,
    DatabaseUnavailable,
    MigrationError,
    UnsupportedPostgres,
)
from coordinator.cluster.schema import Migration, check_server_version, format_server_version, load_migrations
from testkit.pgcluster import free_port, pg_bindir
from testkit.polling import wait_for

pytestmark = pytest.mark.anyio



def test_the_server_is_the_postgres_build_under_test(pg_cluster):
    """The suite runs on the embedded mode's Postgres, and (make test) on $COORDINATOR_TEST_PG_BINDIR's too."""
    version = subprocess.run([str(pg_bindir() / "postgres"), "--version"], capture_output=True, text=True,
                             check=True).stdout  # "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    built = re.search(r"\(PostgreSQL\) (\S+)", version).group(1)
    with psycopg.connect(pg_cluster.url) as conn:
        running = conn.execute("SHOW server_version").fetchone()[0].split()[0]
    print(f"\nPostgreSQL under test: {running} from {pg_bindir()}")
    assert running == built


def test_version_check_is_a_pure_function():
    with pytest.raises(UnsupportedPostgres) as info:
        check_server_version(120005, "the server at db:5432")
    message = str(info.value)
    assert "PostgreSQL 13 or newer is required" in message
    assert "12.5" in message and "db:5432" in message
    with pytest.raises(UnsupportedPostgres, match=r"9\.6\.24"):
        check_server_version(90624)
    check_server_version(130000)
    check_server_version(180004)
    assert format_server_version(150004) == "15.4"


def test_migration_files_are_ordered_and_named():
    migrations = load_migrations()
    assert migrations[0].version == 1 and migrations[0].name == "initial"
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)


async def test_open_migrates_and_pings(pg_url):
    async with await Database.open(pg_url) as db:
        assert db.server_version >= 130000
        latency = await db.ping()
        print(f"\ndatabase ping: {latency * 1e6:.0f} µs")
        assert 0 < latency < 5
        async with db.connection() as conn:
            cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
            assert [r[0] for r in await cur.fetchall()] == [m.version for m in load_migrations()]
            cur = await conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('replicas', 'site_config')"
            )
            assert (await cur.fetchone())[0] == 2


async def test_ten_concurrent_opens_migrate_once(pg_url):
    dbs: list[Database] = []

    async def opener():
        dbs.append(await Database.open(pg_url))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(opener)
        assert len(dbs) == 10
        async with dbs[0].connection() as conn:
            cur = await conn.execute("SELECT version, count(*) FROM schema_migrations GROUP BY version")
            rows = await cur.fetchall()
        assert sorted(v for v, _ in rows) == [m.version for m in load_migrations()]
        assert all(n == 1 for _, n in rows)
    finally:
        for db in dbs:
            await db.close()


async def test_failed_migration_applies_nothing(pg_url):
    bad = [
        Migration(1, "ok", "CREATE TABLE t1 (x int);"),
        Migration(2, "broken", "CREATE TABLE t2 (x int); SELEC 1;"),
    ]
    with pytest.raises(MigrationError, match="0002_broken"):
        await Database.open(pg_url, migrations=bad)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('t1'), to_regclass('schema_migrations')").fetchone() == (None, None)


async def test_unreachable_server_fails_after_bounded_wait():
    port = free_port()  # nothing listens here
    url = f"postgresql://app:s3cret-pw@127.0.0.1:{port}/coord"
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        await Database.open(url, wait=1.0)
    elapsed = time.monotonic() - t0
    print(f"\ngave up after {elapsed:.2f} s")
    assert elapsed < 10
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "'coord'" in message
    assert "s3cret" not in message and "s3cret" not in repr(info.value.__cause__ or "")


async def test_silent_server_fails_after_bounded_wait():
    # Accepts TCP connections (the kernel does) but never answers: a hung or black-holed server.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="timed out"):
            await Database.open(f"postgresql://app@127.0.0.1:{port}/coord", wait=1.0)
        elapsed = time.monotonic() - t0
    print(f"\ngave up on a silent server after {elapsed:.2f} s")
    assert elapsed < 5


async def test_missing_database_fails_fast(pg_cluster):
    url = f"postgresql://postgres:pw@127.0.0.1:{pg_cluster.port}/no_such_db"
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="no_such_db"):
        await Database.open(url, wait=20.0)
    assert time.monotonic() - t0 < 10  # not retried until the deadline


async def test_invalid_url_message_hides_password():
    with pytest.raises(DatabaseError) as info:
        await Database.open("host=db bogus=1 password=s3cret")
    assert "s3cret" not in str(info.value)
    with pytest.raises(DatabaseError) as info:
        await Database.open("postgresql://u:s3cret@db/x?bogus=1")
    assert "s3cret" not in str(info.value)


async def test_mesh_key_created_once(pg_url):
    async with await Database.open(pg_url) as db1, await Database.open(pg_url) as db2:
        keys: list[str] = []

        async def get(db):
            keys.append(await db.derp_mesh_key())

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(get, (db1, db2)[i % 2])
        assert len(set(keys)) == 1, keys
        assert re.fullmatch(r"[0-9a-f]{64}", keys[0])
        assert await db1.derp_mesh_key(None) == keys[0]
        assert await db1.derp_mesh_key("  operator-key ") == "operator-key"
        assert await db1.derp_mesh_key("") == keys[0]
        async with db1.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM site_config WHERE key = 'derp_mesh_key'")
            assert (await cur.fetchone())[0] == 1


async def test_site_config_generate_called_only_when_missing(pg_url):
    calls = []

    async def generate():
        calls.append(1)
        return "v1"

    async with await Database.open(pg_url) as db:
        assert await db.get_or_create_site_config("k", generate) == "v1"
        assert await db.get_or_create_site_config("k", generate) == "v1"
    assert len(calls) == 1


async def test_statement_timeout_bounds_queries(pg_url):
    async with await Database.open(pg_url, statement_timeout=0.2) as db:
        async with db.connection() as conn:
            with pytest.raises(psycopg.errors.QueryCanceled):
                await conn.execute("SELECT pg_sleep(5)")


async def test_server_crash_mid_query_raises_then_recovers(own_cluster):
    async with await Database.open(own_cluster.url) as db:
        errors: list[BaseException] = []

        async def long_query():
            try:
                async with db.connection() as conn:
                    await conn.execute("SELECT pg_sleep(20)")
            except Exception as exc:  # the caller sees an ordinary, catchable error
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_query)
            await anyio.sleep(0.3)
            own_cluster.kill()
            await wait_for(lambda: errors, 10, "the query to fail with the server gone", 0.05)
        assert isinstance(errors[0], psycopg.OperationalError), errors

        t0 = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - PoolTimeout or OperationalError, both fine
            await db.ping(timeout=2.0)
        assert time.monotonic() - t0 < 5

        own_cluster.start()
        async def answers() -> bool:
            await db.ping(timeout=2.0)
            return True

        await wait_for(answers, 20, "the database to answer again", 0.2, ignore=(Exception,))
        print(f"\nrecovered {time.monotonic() - t0:.2f} s after the first failed ping")
