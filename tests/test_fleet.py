"""The fleet's lifecycle with real processes and real signals: many replicas stopping at once, a replica started
while Postgres is down, the embedded Postgres dying under a replica, two replicas on one data
directory, and ``coordinator demo`` stopped by a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from coordinator.core.urls import derp_url
from coordinator.relay.client import DerpClient, DerpError, Restarting
from testkit.cluster import HACluster, full_mesh, serve
from testkit.polling import wait_blocking, wait_until
from testkit.procs import ROOT, http_status

SHUTDOWN_TIMEOUT = 5.0


@pytest.fixture
def cluster(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat="1s", extra_args=("--shutdown-timeout", f"{SHUTDOWN_TIMEOUT:g}s")),
                     request)


async def frames_until_closed(client: DerpClient) -> list:
    """Every frame the server sends until it closes the connection."""
    frames = []
    with contextlib.suppress(DerpError, OSError):
        while True:
            frames.append(await client.recv(timeout=60))
    return frames


@pytest.mark.anyio
async def test_half_of_ten_replicas_stop_at_once(cluster):
    replicas = cluster.add_replicas(10)
    meshed = await wait_until(lambda: full_mesh(replicas), 90, "a full mesh of 10 replicas", interval=0.2)
    print(f"\n10 replicas fully meshed {meshed:.1f} s after the last was ready")
    leaving, staying = replicas[::2], replicas[1::2]
    clients = [await DerpClient.connect(r.url + "/derp") for r in leaving]
    readers = [asyncio.create_task(frames_until_closed(c)) for c in clients]
    gone = {derp_url(r.url) for r in leaving}
    try:
        t0 = time.monotonic()
        for r in leaving:
            r.proc.signal(signal.SIGTERM)
        exited: dict[int, float] = {}

        def all_exited() -> bool:
            for r in leaving:
                if r.index not in exited and not r.running:
                    exited[r.index] = time.monotonic() - t0
            return len(exited) == len(leaving)

        def survivors_dropped() -> bool:
            for r in staying:
                status = r.status()
                if gone & set(status["mesh"]) or status["peers"] != len(staying) - 1:
                    return False
            return True

        dropped = await wait_until(survivors_dropped, 30, "the survivors to drop the stopped replicas", interval=0.02)
        await wait_until(all_exited, 3 * SHUTDOWN_TIMEOUT, "every stopped replica to exit", interval=0.02)
        print(f"5 of 10 SIGTERMed at once: survivors dropped all of them {dropped * 1000:.0f} ms after the signals "
              f"(target <= 500 ms after each stop is recorded); exits after "
              f"{', '.join(f'{v:.2f}' for v in sorted(exited.values()))} s (shutdown timeout {SHUTDOWN_TIMEOUT:g} s)")
        assert [r.proc.proc.returncode for r in leaving] == [0] * len(leaving), "a clean stop exits with status 0"
        assert full_mesh(staying)
        for r, frames in zip(leaving, await asyncio.gather(*readers), strict=True):
            assert any(isinstance(f, Restarting) for f in frames), f"replica {r.index} closed its client without Restarting"
    finally:
        for c in clients:
            await c.close()


@pytest.fixture
def db_cluster(own_cluster, request):
    yield from serve(HACluster(own_cluster.url, heartbeat="1s"), request)


@pytest.mark.anyio
async def test_replica_started_while_postgres_is_down_joins_when_it_returns(own_cluster, db_cluster):
    first = db_cluster.add_replica()
    own_cluster.stop()
    late = db_cluster.add_replica(start=False)
    late.start(wait=False)
    # Up, but not ready, and not giving up: it waits for the database however long the outage lasts.
    await wait_until(lambda: http_status(late.url + "/healthz") == 200, 30, "/healthz of the late replica", interval=0.1)
    assert http_status(late.url + "/readyz") == 503
    await asyncio.sleep(3)
    assert late.running, late.proc.output[-3000:]
    assert http_status(late.url + "/readyz") == 503
    back = time.monotonic()
    own_cluster.start()
    joined = await wait_until(lambda: late.ready() and first.ready() and full_mesh([first, late]), 60,
                              "the late replica to join once Postgres is back", interval=0.1)
    print(f"\nreplica started during a database outage: ready and meshed {joined:.1f} s after Postgres came back "
          f"({time.monotonic() - back:.1f} s)")


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def embedded_cluster(request):
    c = HACluster("", heartbeat="1s")  # no URL: each replica starts the embedded Postgres in its data dir
    try:
        yield from serve(c, request)
    finally:
        for r in c.replicas:  # SIGKILLed replicas leave their embedded server behind
            pid = postmaster_pid(r.data / "postgres")
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()


def test_embedded_postgres_killed_under_a_running_replica_comes_back(embedded_cluster):
    r = embedded_cluster.add_replica(start=False)
    r.start(timeout=90)
    pgdata = r.data / "postgres"
    old = postmaster_pid(pgdata)
    assert old is not None
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    wait_blocking(lambda: postmaster_pid(pgdata) not in (None, old), 60, "a new postmaster")
    wait_blocking(r.ready, 60, "the replica to be ready again")
    print(f"\nembedded Postgres SIGKILLed: replica ready again {time.monotonic() - killed:.1f} s later")
    assert r.running
    assert "is gone; restarting it" in r.proc.output
    r.stop()  # releases its handle: the embedded server stops with it
    assert r.proc.proc.returncode == 0
    wait_blocking(lambda: postmaster_pid(pgdata) is None, 30, "the embedded server to stop with the replica")


def test_two_replicas_on_one_data_directory_are_a_finding(cluster):
    a = cluster.add_replica()
    b = cluster.add_replica(start=False)
    b.data = a.data  # the same derper.key
    b.start()
    for me, other in ((a, b), (b, a)):
        def finding(me=me, other=other):
            found = [f for f in me.api("/api/v2/debug/health")["findings"] if f["code"] == "EDERP03"]
            return found if found and derp_url(other.url) in found[0]["message"] else None

        assert wait_blocking(finding, 30, "the duplicate server key finding")[0]["severity"] == "error"
        wait_blocking(lambda me=me: "has this replica's DERP server key" in me.proc.output, 10, "the log line")
    assert "--data-dir" in a.proc.output


# -- coordinator demo ------------------------------------------------------------------------------


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job


@pytest.mark.parametrize(("sig", "background"), [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["sigterm", "sigint", "sigint-background"])
def test_demo_stopped_by_a_signal_leaves_no_process_behind(sig, background):
    base = Path(tempfile.mkdtemp(prefix="coordtest-demo-"))
    base.chmod(0o755)  # as root, the embedded Postgres's own user must traverse it (never widened for it)
    out = base / "demo.out"
    started: list[psutil.Process] = []
    with open(out, "wb") as log:
        demo = subprocess.Popen([sys.executable, "-m", "coordinator", "demo", "--replicas", "2", "--data-dir", str(base)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True, preexec_fn=_ignore_sigint if background else None)
    try:
        wait_blocking(lambda: "running;" in out.read_text() or demo.poll() is not None, 180, "the demo to be running")
        assert demo.poll() is None, out.read_text()
        started = psutil.Process(demo.pid).children(recursive=True)
        pg = postmaster_pid(base / "shared" / "postgres")
        assert pg is not None
        started += [psutil.Process(pg), *psutil.Process(pg).children(recursive=True)]
        names = " ".join(p.name() for p in started)
        assert "nginx" in names and "postgres" in names and len([p for p in started if "python" in p.name()]) >= 2
        t0 = time.monotonic()
        demo.send_signal(sig)
        assert demo.wait(60) == 0, out.read_text()
        _, alive = psutil.wait_procs(started, timeout=10)
        print(f"\ndemo stopped by {signal.Signals(sig).name}{' (SIGINT ignored at start)' if background else ''}: "
              f"exited {time.monotonic() - t0:.1f} s after the signal, {len(started)} processes gone")
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], out.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(base, ignore_errors=True)
