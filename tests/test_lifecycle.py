"""A replica's lifecycle: stops that always end, Restarting before the close, joining while Postgres is down.

Real `coordinator server` processes, real Postgres, real signals (SIGSTOP freezes a peer or the
database); figures are printed, bounds are generous.
"""

import contextlib
import signal
import time
import urllib.error
import urllib.request

import anyio
import psutil
import psycopg
import pytest

from coordinator.cli.server import EXIT_CLEAN, EXIT_FORCED, EXIT_UNCLEAN_STOP
from coordinator.core.settings import load_settings
from coordinator.core.urls import derp_url
from coordinator.relay.client import DerpClient, DerpError, Restarting
from coordinator.replica import RESTART_TRY_FOR_MS, Replica
from testkit.cluster import HACluster
from testkit.polling import wait_blocking, wait_for
from testkit.procs import Proc, free_port, python
from testkit.relayfix import serve_relay

pytestmark = pytest.mark.anyio
SHUTDOWN_TIMEOUT = 5.0  # the default


def meshed(replicas) -> bool:
    return all({derp_url(o.url) for o in replicas if o is not r} <= r.mesh_connected() for r in replicas)


def freeze(proc, sig=signal.SIGSTOP) -> None:
    """SIGSTOP (or SIGCONT) a process and all its descendants (Postgres backends run in sessions of their own)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)


async def frames_until_closed(client: DerpClient, timeout: float) -> list:
    got = []
    with anyio.fail_after(timeout):
        while True:
            try:
                got.append(await client.recv())
            except DerpError:
                return got


@pytest.fixture
def frozen_cluster(own_cluster, request):
    """Two replicas on a private Postgres; whatever a test froze is thawed before the clean-up."""
    c = HACluster(own_cluster.url, heartbeat="1s")
    try:
        c.add_replica()
        c.add_replica()
        wait_blocking(lambda: meshed(c.replicas), 30, "the two replicas to mesh", ignore=(OSError,))
        yield c
        if getattr(request.node, "report_call", None) is not None and request.node.report_call.failed:
            print(c.logs())
    finally:
        freeze(own_cluster.proc, signal.SIGCONT)
        for r in c.replicas:
            if r.proc is not None:
                freeze(r.proc.proc, signal.SIGCONT)
        c.close()


async def test_stop_ends_in_time_while_a_peer_and_postgres_are_frozen(frozen_cluster, own_cluster):
    a, b = frozen_cluster.replicas
    client = await DerpClient.connect(a.url + "/derp")
    try:
        freeze(b.proc.proc)
        freeze(own_cluster.proc)
        t0 = time.monotonic()
        a.proc.signal(signal.SIGTERM)
        frames = await frames_until_closed(client, 15)
        closed = time.monotonic() - t0
        rc = a.proc.wait(30)
        elapsed = time.monotonic() - t0
    finally:
        await client.close()
    print(f"\nfrozen peer and database: client closed after {closed:.2f} s, process exited after {elapsed:.2f} s "
          f"(shutdown timeout {SHUTDOWN_TIMEOUT:g} s), status {rc}")
    restarting = [f for f in frames if isinstance(f, Restarting)]
    assert restarting and frames[-1] == restarting[0], f"no Restarting frame before the close: {frames}"
    assert restarting[0] == Restarting(0, RESTART_TRY_FOR_MS)
    assert rc == EXIT_UNCLEAN_STOP  # the stop could not be recorded: the exit status says so
    assert elapsed < 3 * SHUTDOWN_TIMEOUT
    out = a.proc.output
    assert "could not record its stop" in out or "did not finish within the shutdown timeout" in out
    assert "Traceback" not in out


async def test_second_signal_exits_at_once(frozen_cluster, own_cluster):
    a, _ = frozen_cluster.replicas
    freeze(own_cluster.proc)  # the stop now waits on the database
    a.proc.signal(signal.SIGTERM)
    await anyio.sleep(0.3)
    t0 = time.monotonic()
    a.proc.signal(signal.SIGTERM)
    rc = a.proc.wait(30)
    elapsed = time.monotonic() - t0
    print(f"\nexited {elapsed * 1e3:.0f} ms after the second SIGTERM, status {rc}")
    assert rc == EXIT_FORCED and "second SIGTERM" in a.proc.output
    assert elapsed < SHUTDOWN_TIMEOUT


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


async def test_replica_started_while_postgres_is_down_joins_when_it_answers(own_cluster, tmp_path):
    own_cluster.stop()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(
        [python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
         "--relay-url", url, "--pg-url", own_cluster.url, "--heartbeat", "500ms"],
        log=tmp_path / "server.log",
    )
    try:
        wait_blocking(lambda: http_status(url + "/healthz") == 200, 30, "/healthz to answer")
        assert http_status(url + "/readyz") == 503
        wait_blocking(lambda: "retrying until it does" in proc.output, 10, "the log line saying it keeps retrying")
        await anyio.sleep(1.0)
        assert proc.proc.poll() is None and http_status(url + "/readyz") == 503
        t0 = time.monotonic()
        own_cluster.start()
        wait_blocking(lambda: http_status(url + "/readyz") == 200, 60, "the replica to join")
        print(f"\njoined {time.monotonic() - t0:.2f} s after Postgres started")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == EXIT_CLEAN
        assert "Traceback" not in proc.output
    finally:
        proc.stop()


def stop_times(url: str) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, extract(epoch FROM stopped_at) FROM replicas WHERE stopped_at IS NOT NULL")
        return {rid: float(t) for rid, t in rows}


async def test_many_peers_leaving_at_once_are_all_dropped(pg_url):
    """Half of six replicas stop together: every survivor drops each from registry, mesh and routes."""
    n = 6
    done = anyio.Event()
    async with anyio.create_task_group() as servers, anyio.create_task_group() as lives:
        relays = []

        async def serve(task_status=anyio.TASK_STATUS_IGNORED):
            async with serve_relay() as served:
                task_status.started(served)
                await done.wait()

        try:
            for _ in range(n):
                relays.append(await servers.start(serve))
            replicas = [
                Replica(load_settings({"pg_url": pg_url, "heartbeat": "1s", "relay_url": url.removesuffix("/derp")},
                                      environ={}), relay=relay)
                for url, relay in relays
            ]

            async def live(replica, task_status=anyio.TASK_STATUS_IGNORED):
                async with replica.lifespan():
                    task_status.started()
                    await done.wait()

            for r in replicas:
                await lives.start(live, r)
            leaving, staying = replicas[: n // 2], replicas[n // 2 :]

            def converged() -> bool:
                return all(r.registry and len(r.registry.peers()) == n - 1
                           and sum(link["connected"] for link in r.mesh.status().values()) == n - 1 for r in replicas)

            await wait_for(converged, 60, "six replicas to see and mesh with each other")
            clients = [await DerpClient.connect(url) for url, _ in relays[: n // 2]]
            await wait_for(lambda: all(s.relay.server.lookup(c.public_key) is not None for s in staying for c in clients),
                           15, "survivors to route to the leaving replicas' clients")
            gone_ids = {r.registry.id for r in leaving}
            gone_urls = {derp_url(url) for url, _ in relays[: n // 2]}
            dropped: dict = {}

            def all_dropped() -> bool:
                for s in staying:
                    if s not in dropped and not ({p.id for p in s.registry.peers()} & gone_ids
                                                 or set(s.mesh.links) & gone_urls
                                                 or any(s.relay.server.lookup(c.public_key) for c in clients)):
                        dropped[s] = time.time()
                return len(dropped) == len(staying)

            async with anyio.create_task_group() as stopping:
                for r in leaving:
                    stopping.start_soon(r.stop)
                await wait_for(all_dropped, 15, "every survivor to drop every leaving replica")
            recorded = stop_times(pg_url)
            lag = max(dropped.values()) - max(recorded[i] for i in gone_ids)
            print(f"\n{len(leaving)} of {n} replicas stopped at once: every survivor dropped all of them "
                  f"{lag * 1e3:.0f} ms after the last stop was recorded (target 500 ms; heartbeat 1 s)")
            assert all(r.stop_clean for r in leaving)
            assert lag < 2.5  # less than the 3 s a missed-heartbeat expiry would take
            for c in clients:
                await c.close()
            for r in staying:
                assert await r.stop()
        finally:
            done.set()


async def test_graceful_close_sends_restarting_to_raw_and_websocket_clients():
    async with serve_relay() as (url, relay):
        raw, ws = await DerpClient.connect(url), await DerpClient.connect(url, websocket=True)
        try:
            await wait_for(lambda: relay.stats()["current_connections"] == 2)
            relay.close(restarting=(250, RESTART_TRY_FOR_MS))
            for client in (raw, ws):
                frames = await frames_until_closed(client, 10)
                assert frames[-1:] == [Restarting(250, RESTART_TRY_FOR_MS)], frames
        finally:
            await raw.close()
            await ws.close()
