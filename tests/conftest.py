import asyncio
import uuid

import psycopg
import pytest

from testkit.pgcluster import PgCluster
from testkit.relayfix import serve_relay


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


@pytest.fixture(autouse=True)
def _no_leaked_asyncio_tasks(request):
    """Every async test: fail it if asyncio tasks it started outlive it (and its fixtures)."""
    if "anyio_backend" in request.fixturenames:
        request.getfixturevalue("_asyncio_tasks_end")  # set up first, so torn down after the rest


def _task_text(task: asyncio.Task) -> str:
    coro = task.get_coro()
    where = getattr(coro, "cr_frame", None)
    at = f" at {where.f_code.co_filename.rsplit('/', 1)[-1]}:{where.f_lineno}" if where else ""
    return f"{task.get_name()} ({getattr(coro, '__qualname__', coro)}{at})"


@pytest.fixture
async def _asyncio_tasks_end():
    before = asyncio.all_tasks()
    yield

    def running() -> list[asyncio.Task]:
        # anyio's test runner drives each fixture step from a task of its own: not the test's.
        return [t for t in asyncio.all_tasks() if t not in before and not t.done()
                and getattr(t.get_coro(), "__qualname__", "") != "TestRunner._call_in_runner_task"]

    for _ in range(200):  # a task that was cancelled, or is finishing, gets 2 s to end
        if not running():
            return
        await asyncio.sleep(0.01)
    left = running()
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    pytest.fail(f"the test left {len(left)} asyncio task(s) running: " + "; ".join(map(_task_text, left)))


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


@pytest.fixture
async def relay():
    """(url, DerpRelay): a relay served by uvicorn on a free port, handshakes bounded to 1 s."""
    async with serve_relay(handshake_timeout=1.0) as (url, served):
        yield url, served
