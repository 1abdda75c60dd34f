import uuid

import psycopg
import pytest

from pgcluster import PgCluster


def _running_cluster():
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def pg_cluster():
    """One real Postgres server for the whole run; tests that kill it use ``own_cluster``."""
    yield from _running_cluster()


@pytest.fixture
def own_cluster():
    """A private Postgres this test may crash and restart; destroyed whatever happens."""
    yield from _running_cluster()


@pytest.fixture
def pg_url(pg_cluster):
    """A fresh, empty database on the shared server; dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{name}"
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
