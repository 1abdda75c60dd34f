"""Postgres as operators run it, faulty: every fault ends in one line naming the cause and what to
do, a coded finding on /api/v2/debug/health, recovery without a restart, and relaying that never
waits for the database.

Real parts only: a Postgres whose connection slots are all taken, a streaming standby, TLS with a
CA made by openssl here, and a real session holding ``LOCK TABLE replicas``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from testkit.cluster import HACluster, full_mesh, serve
from testkit.pgcluster import PgCluster
from testkit.pgfaults import backends, conns_of, hog_all_slots, make_ca, make_server_cert
from testkit.polling import wait_until
from testkit.traffic import Traffic

pytestmark = pytest.mark.anyio

SLOTS_LINE = "PostgreSQL has no connection slots left"
STANDBY_LINE = "the PostgreSQL URL leads to a read-only standby"
TLS_LINE = "TLS to PostgreSQL failed"
LOCK_LINE = "a heartbeat statement timed out waiting in PostgreSQL"


@pytest.fixture
def make_pg():
    """``make_pg(**server_settings)``: a private, started Postgres; destroyed after the test."""
    made: list[PgCluster] = []

    def make(prepare=None, bindir: Path | None = None, **settings: str) -> PgCluster:
        with pytest.MonkeyPatch.context() as mp:
            if bindir is not None:
                mp.setenv("COORDINATOR_TEST_PG_BINDIR", str(bindir))
            pg = PgCluster()
        made.append(pg)
        pg.settings.update(settings)
        if prepare is not None:
            prepare(pg)
        pg.start()
        return pg

    yield make
    for pg in made:
        pg.destroy()


@pytest.fixture
def make_cluster(request):
    """``make_cluster(url, *flags)``: an HACluster closed (its logs printed on failure) after the test."""
    made = []

    def make(url: str, *extra: str, heartbeat: str = "500ms") -> HACluster:
        gen = serve(HACluster(url, heartbeat=heartbeat, extra_args=extra), request)
        made.append(gen)
        return next(gen)

    yield make
    for gen in made:
        next(gen, None)


def codes(replica) -> set[str]:
    try:
        return {f["code"] for f in replica.api("/api/v2/debug/health")["findings"]}
    except OSError:
        return set()


def finding(replica, code: str) -> str:
    return next(f["message"] for f in replica.api("/api/v2/debug/health")["findings"] if f["code"] == code)


def healthz_ms(replica) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(replica.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    return (time.monotonic() - t0) * 1000


def no_traceback(replica) -> None:
    out = replica.proc.output
    assert "Traceback" not in out, out[-4000:]
    assert replica.running


@contextlib.asynccontextmanager
async def cross_traffic(replicas, pairs: int = 2):
    """Numbered packets between clients on different replicas, for as long as the block runs."""
    traffic = Traffic(pairs, lambda k: replicas[(k // 2 + k % 2) % len(replicas)].url + "/derp")
    try:
        await traffic.start()
        await traffic.routed()
        traffic.run()
        yield traffic
    finally:
        await traffic.close()


def lost(traffic: Traffic, until: float) -> tuple[int, int]:
    return sum(len(f.sent) for f in traffic.flows), sum(len(f.lost(until)) for f in traffic.flows)


# -- 2. connection limit -----------------------------------------------------------------------


def _load(replicas, seconds: float, token: str) -> None:
    """Operator API calls from 16 threads (each /api/v2/replicas reads the database)."""
    stop = time.monotonic() + seconds

    def worker(r) -> None:
        while time.monotonic() < stop:
            req = urllib.request.Request(r.url + "/api/v2/replicas", headers={"Authorization": f"Bearer {token}"})
            with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=5):
                pass

    threads = [threading.Thread(target=worker, args=(replicas[i % len(replicas)],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def test_connection_limit_reached_names_the_cause_keeps_relaying_and_recovers(make_pg, make_cluster):
    pg = make_pg(max_connections="24")
    cluster = make_cluster(pg.url)
    replicas = cluster.add_replicas(2)
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    with psycopg.connect(pg.url, autocommit=True, application_name="admin") as admin:
        await asyncio.sleep(3)
        idle = [conns_of(admin, r.proc.proc.pid) for r in replicas]
        peak = [0, 0]
        loader = asyncio.create_task(asyncio.to_thread(_load, replicas, 5.0, cluster.api_token))
        while not loader.done():
            for i, r in enumerate(replicas):
                peak[i] = max(peak[i], conns_of(admin, r.proc.proc.pid))
            await asyncio.sleep(0.05)
        await loader
        print(f"\nPostgres connections per replica (--pg-max-conns 8): idle {idle}, under API load {peak}")
        assert max(peak) <= 8

        hogs: list[psycopg.Connection] = []
        try:
            async with cross_traffic(replicas) as traffic:
                await asyncio.to_thread(hog_all_slots, pg, admin, hogs)
                full_at = time.monotonic()
                await wait_until(lambda: all(SLOTS_LINE in r.proc.output for r in replicas), 30,
                                 "the replicas to name the cause")
                await wait_until(lambda: all("EDB03" in codes(r) for r in replicas), 15, "finding EDB03")
                named = time.monotonic() - full_at
                message = finding(replicas[0], "EDB03")
                assert "--pg-max-conns" in message and "max_connections" in message
                await asyncio.sleep(5)  # slots stay full: retries back off
                for r in replicas:
                    assert healthz_ms(r) < 5000
                    no_traceback(r)
                    lines = [ln for ln in r.proc.output.splitlines() if SLOTS_LINE in ln]
                    assert len(lines) <= 4, lines  # heartbeat, pub/sub: said once each, not per retry
                for h in hogs:
                    h.close()
                hogs.clear()
                freed = time.monotonic()
                await wait_until(lambda: all(r.ready() and "EDB03" not in codes(r) for r in replicas), 30,
                                 "recovery once slots are free", interval=0.1)
                recovered = time.monotonic() - freed
                until = await traffic.stop()
        finally:
            for h in hogs:
                h.close()
    sent, dropped = lost(traffic, until)
    print(f"connection slots exhausted: cause named after {named:.1f} s; ready again {recovered:.1f} s after slots "
          f"freed; {dropped} of {sent} cross-replica packets lost")
    assert dropped == 0
    assert full_mesh(replicas)


# -- 3. read-only standby ----------------------------------------------------------------------


@pytest.mark.parametrize("multi_host", [False, True], ids=["one-host", "multi-host"])
async def test_url_on_a_read_only_standby_is_named_backs_off_and_joins_once_promoted(make_pg, make_cluster, multi_host):
    primary = make_pg()
    standby = PgCluster.standby_of(primary)
    try:
        standby.settings["log_connections"] = "on"
        standby.start()
        host = f"127.0.0.1:{standby.port}"
        url = f"postgresql://postgres@{host},{host}/postgres" if multi_host else standby.url
        cluster = make_cluster(url)
        r = cluster.add_replica(start=False)
        r.start(wait=False)
        await wait_until(lambda: STANDBY_LINE in r.proc.output, 30, "the replica to name the standby")
        await wait_until(lambda: "EDB04" in codes(r), 15, "finding EDB04")
        assert ("target_session_attrs=read-write" in finding(r, "EDB04")) == multi_host
        log = standby.base / "postgres.log"
        before = log.read_text(errors="replace").count("connection authorized")
        await asyncio.sleep(10)
        attempts = log.read_text(errors="replace").count("connection authorized") - before
        print(f"\nreplica on a standby ({'multi-host' if multi_host else 'one host'} URL): {attempts} connections "
              "in 10 s (backoff)")
        assert attempts <= 30  # at most 5 s apart per part (join loop, listener), not a storm
        assert not r.ready()
        assert healthz_ms(r) < 5000
        no_traceback(r)
        assert sum(STANDBY_LINE in ln for ln in r.proc.output.splitlines()) <= 3
        primary.kill()
        standby.promote()
        promoted = time.monotonic()
        await wait_until(r.ready, 30, "the replica to join the promoted standby", interval=0.1)
        print(f"joined {time.monotonic() - promoted:.1f} s after the promotion")
        await wait_until(lambda: "EDB04" not in codes(r), 10, "EDB04 to clear")
    finally:
        standby.destroy()


async def test_an_endpoint_that_moves_to_a_standby_while_running_is_named_and_left(make_pg, make_cluster):
    """The URL's endpoint (a proxy here, a VIP or DNS name in life) leads to the standby for a while."""
    from testkit.delayproxy import DelayProxy

    primary = make_pg()
    standby = PgCluster.standby_of(primary)
    try:
        standby.start()
        with DelayProxy("127.0.0.1", primary.port) as proxy:
            replicas = make_cluster(f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres").add_replicas(2)
            await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
            async with cross_traffic(replicas) as traffic:
                proxy.target_port = standby.port
                proxy.drop_connections()
                await wait_until(lambda: all("EDB04" in codes(r) for r in replicas), 30, "finding EDB04")
                for r in replicas:
                    assert STANDBY_LINE in r.proc.output
                await asyncio.sleep(3)
                proxy.target_port = primary.port
                proxy.drop_connections()
                back = time.monotonic()
                await wait_until(lambda: all(r.ready() and "EDB04" not in codes(r) for r in replicas), 30,
                                 "recovery on the primary", interval=0.1)
                recovered = time.monotonic() - back
                until = await traffic.stop()
            sent, dropped = lost(traffic, until)
            print(f"\nendpoint on a standby for a while: {dropped} of {sent} packets lost, ready "
                  f"{recovered:.1f} s after it led to the primary again")
            assert dropped == 0
            for r in replicas:
                no_traceback(r)
                named = [ln for ln in r.proc.output.splitlines() if STANDBY_LINE in ln]
                assert 1 <= len(named) <= 3, named  # once per part (heartbeat, listener), not per retry
            print("\n".join(ln[:240] for ln in named))
    finally:
        standby.destroy()


# -- 4. TLS ------------------------------------------------------------------------------------


def ssl_bindir() -> Path:
    """A Postgres build with SSL: Debian's (the embedded mode's pgserver build has none)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        pytest.skip("no Postgres build with SSL (Debian's postgresql; sh scripts/bootstrap.sh test)")
    return found[-1].parent


def _tls_server(base_dir):
    def prepare(pg: PgCluster) -> None:
        ca = make_ca(pg.base, "ca")
        cert, key = make_server_cert(pg.base, ca, "IP:127.0.0.1")
        for f in (cert, key):
            shutil.copy(f, pg.data / f.name)
            pg._chown(pg.data / f.name)
            (pg.data / f.name).chmod(0o600)
        shutil.copy(ca[0], base_dir / "ca.crt")
        make_ca(base_dir, "other-ca")
        pg.settings.update(ssl="on", ssl_cert_file="server.crt", ssl_key_file="server.key")
    return prepare


async def test_tls_verify_full_with_a_ca_covers_every_connection(make_pg, make_cluster, tmp_path):
    pg = make_pg(_tls_server(tmp_path), bindir=ssl_bindir())
    url = (f"postgresql://postgres@127.0.0.1:{pg.port}/postgres?sslmode=verify-full"
           f"&sslrootcert={tmp_path / 'ca.crt'}")
    replicas = make_cluster(url).add_replicas(2)
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    with psycopg.connect(pg.url, autocommit=True, sslmode="disable") as admin:
        rows = admin.execute(
            "SELECT a.application_name, s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.application_name LIKE 'coordinator%'").fetchall()
    apps = {app.split("-listen-")[0] + ("-listen" if "-listen-" in app else "") for app, _, _ in rows}
    print(f"\nTLS connections: {len(rows)} ({sorted(apps)}), {sorted({v for _, _, v in rows})}")
    assert rows and all(ssl for _, ssl, _ in rows), rows
    assert "coordinator-pubsub-listen" in apps  # the listener too
    for r in replicas:
        assert r.ready() and codes(r) <= {"EDB02", "EPS02", "EDERP02"}


@pytest.mark.parametrize("fault", ["wrong-ca", "wrong-host"])
async def test_tls_wrong_ca_or_host_name_is_one_line_and_a_finding(make_pg, make_cluster, tmp_path, fault):
    pg = make_pg(_tls_server(tmp_path), bindir=ssl_bindir())
    ca = tmp_path / ("other-ca.crt" if fault == "wrong-ca" else "ca.crt")
    host = "127.0.0.1" if fault == "wrong-ca" else "localhost"  # the certificate names IP:127.0.0.1 only
    url = f"postgresql://postgres@{host}:{pg.port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    r = make_cluster(url).add_replica(start=False)
    r.start(wait=False)
    await wait_until(lambda: TLS_LINE in r.proc.output, 30, "the one line naming TLS")
    await wait_until(lambda: "EDB05" in codes(r), 15, "finding EDB05")
    assert "sslrootcert" in finding(r, "EDB05")
    await asyncio.sleep(3)
    no_traceback(r)
    lines = [ln for ln in r.proc.output.splitlines() if TLS_LINE in ln]
    print(f"\n{fault}: {lines[0][-300:]}")
    assert len(lines) <= 3, lines  # the join loop and the listener, once each


# -- 5. a lock on replicas ---------------------------------------------------------------------


def _hold_lock(url: str, seconds: float, held: threading.Event) -> None:
    with psycopg.connect(url, application_name="locker") as conn:
        conn.execute("LOCK TABLE replicas")  # ACCESS EXCLUSIVE: no reads, no writes
        held.set()
        time.sleep(seconds)
        conn.rollback()


async def test_lock_table_replicas_for_30s_stalls_nothing_and_nobody_is_declared_dead(pg_url, make_cluster):
    cluster = make_cluster(pg_url)
    replicas = cluster.add_replicas(2)
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    held = threading.Event()
    peers_min, healthz_max, waiting_max, page_max, edb06, on_page = 99, 0.0, 0, 0.0, set(), set()
    with psycopg.connect(pg_url, autocommit=True, application_name="admin") as admin:
        async with cross_traffic(replicas) as traffic:
            locker = asyncio.create_task(asyncio.to_thread(_hold_lock, pg_url, 30.0, held))
            await asyncio.to_thread(held.wait, 10)
            locked = time.monotonic()

            def look(r) -> tuple[float, int, bool, float, bool]:
                """(/healthz ms, peers, EDB06 on health, /status/data s, EDB06 on the status page)."""
                t0 = time.monotonic()
                page = r.api("/status/data")  # the status page's document: answers, names the lock
                took = time.monotonic() - t0
                on = "EDB06" in {f["code"] for f in page["findings"]}
                return healthz_ms(r), r.status()["peers"], "EDB06" in codes(r), took, on

            while not locker.done():
                for r in replicas:  # in a thread: the test's own clients must never wait on these calls
                    ms, peers, named, took, on = await asyncio.to_thread(look, r)
                    healthz_max, peers_min, page_max = max(healthz_max, ms), min(peers_min, peers), max(page_max, took)
                    if named:
                        edb06.add(r.index)
                    if on:
                        on_page.add(r.index)
                waiting_max = max(waiting_max, sum(1 for *_, wait in backends(admin) if wait == "Lock"))
                await asyncio.sleep(0.2)
            await locker
            released = time.monotonic()
            assert full_mesh(replicas)
            ids = {r.status()["replica_id"] for r in replicas}

            def beating() -> bool:
                rows = admin.execute("SELECT id::text FROM replicas WHERE updated_at > now() - interval '1 second'")
                return ids <= {row[0] for row in rows.fetchall()}

            await wait_until(lambda: beating() and all(r.ready() for r in replicas), 20,
                             "heartbeats to catch up", interval=0.1)
            caught_up = time.monotonic() - released
            for _ in range(20):  # a while after: still each other's peer
                peers_min = min(peers_min, *(r.status()["peers"] for r in replicas))
                await asyncio.sleep(0.25)
            until = await traffic.stop()
    sent, dropped = lost(traffic, until)
    gap = max(f.longest_gap() for f in traffic.flows)
    print(f"\nLOCK TABLE replicas held {released - locked:.0f} s: {dropped} of {sent} packets lost, longest gap "
          f"{gap * 1000:.0f} ms, slowest /healthz {healthz_max:.0f} ms, slowest /status/data {page_max * 1000:.0f} ms, "
          f"fewest peers seen {peers_min}, at most "
          f"{waiting_max} backends waiting on the lock, heartbeats caught up {caught_up:.1f} s after release")
    assert dropped == 0
    assert peers_min == 1  # nobody was declared dead
    assert edb06 == {0, 1} and on_page == {0, 1}
    assert waiting_max <= 6  # server-side lock_timeout: abandoned heartbeats do not pile up
    for r in replicas:
        no_traceback(r)
        assert LOCK_LINE in r.proc.output
        assert "EDB06" not in codes(r)


async def test_slow_heartbeat_statements_time_out_server_side_and_catch_up(pg_url, make_cluster):
    """A storm of slow statements: every write to replicas takes 4 s (a trigger sleeps) for 15 s."""
    cluster = make_cluster(pg_url)
    replicas = cluster.add_replicas(2)
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    with psycopg.connect(pg_url, autocommit=True, application_name="admin") as admin:
        admin.execute("CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN PERFORM pg_sleep(4); RETURN NEW; END $$")
        async with cross_traffic(replicas) as traffic:
            admin.execute("CREATE TRIGGER slow BEFORE UPDATE ON replicas FOR EACH ROW EXECUTE FUNCTION slow()")
            slow_at, peers_min = time.monotonic(), 99
            while time.monotonic() < slow_at + 12:  # reads still work: peers are re-read, none may drop
                for r in replicas:
                    assert healthz_ms(r) < 5000
                    peers_min = min(peers_min, r.status()["peers"])
                await asyncio.sleep(0.1)
            for r in replicas:
                assert "statement timeout" in finding(r, "EDB06")
            await asyncio.to_thread(admin.execute, "DROP TRIGGER slow ON replicas")
            dropped_at = time.monotonic()
            await wait_until(lambda: all(r.ready() and "EDB06" not in codes(r) for r in replicas), 20,
                             "heartbeats to catch up", interval=0.1)
            caught_up = time.monotonic() - dropped_at
            until = await traffic.stop()
    sent, dropped = lost(traffic, until)
    print(f"\nslow heartbeat writes (4 s each) for 12 s: {dropped} of {sent} packets lost; fewest peers seen "
          f"{peers_min}; ready again {caught_up:.1f} s after they were fast again")
    assert dropped == 0
    assert peers_min == 1  # reads went on and saw stale rows: nobody was declared dead
    assert full_mesh(replicas)
    for r in replicas:
        no_traceback(r)
        assert LOCK_LINE in r.proc.output


async def test_a_listen_url_on_another_database_is_named_and_not_redialled(pg_cluster, pg_url, caplog):
    """--pg-listen-url leading elsewhere than --pg-url: the publishers' pings can never arrive."""
    from coordinator.cluster.pubsub import PubSub

    async with PubSub(pg_url, listen_url=pg_cluster.url, ping_interval=0.5, ping_timeout=0.5) as ps:
        await wait_until(lambda: ps.listen_problem is not None, 10, "the listener check to name it")
        assert "the same database as --pg-url" in ps.listen_problem
        await asyncio.sleep(3)  # several more checks
        assert ps.connected and ps.metrics["reconnects"] == 0
    lines = [r.getMessage() for r in caplog.records if "LISTEN does not deliver" in r.getMessage()]
    assert len(lines) == 1, lines
