"""Replicas behind a real PgBouncer (Debian's), in both pooling modes.

Session pooling changes nothing. Transaction pooling works when the listener gets a direct URL
(``--pg-listen-url``) and no statement is prepared server-side (each transaction may run on another
server session). Without the direct URL, LISTEN cannot work through the pooler: the replica says
so in one line, raises ``EPS03`` and keeps serving (relay, mesh, heartbeats) without redialling
its pub/sub every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from testkit.cluster import HACluster, full_mesh, serve
from testkit.pgbouncer import PgBouncer, pgbouncer_binary
from testkit.polling import wait_until
from testkit.traffic import Traffic

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(pgbouncer_binary() is None, reason="pgbouncer not installed (sh scripts/bootstrap.sh test)"),
]

LISTEN_LINE = "LISTEN does not work through this PostgreSQL URL"


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture(params=["session", "transaction"])
def bouncer(request, pg_cluster):
    b = PgBouncer(pg_cluster, request.param)
    try:
        b.start()
        yield b
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(b.output()[-3000:])
    finally:
        b.destroy()


@pytest.fixture
def transaction_bouncer(pg_cluster, request):
    b = PgBouncer(pg_cluster, "transaction")
    try:
        b.start()
        yield b
    finally:
        b.destroy()


@pytest.fixture
def make_cluster(request):
    """``make_cluster(url, *flags)``: an HACluster closed (its logs printed on failure) after the test."""
    made = []

    def make(url: str, *extra: str) -> HACluster:
        gen = serve(HACluster(url, extra_args=extra), request)
        made.append(gen)
        return next(gen)

    yield make
    for gen in made:
        next(gen, None)


def findings(replica) -> list[dict]:
    return replica.api("/api/v2/debug/health")["findings"]


async def cross_traffic(replicas, seconds: float = 2.0) -> tuple[int, int]:
    """(sent, lost) of numbered packets between clients on different replicas."""
    traffic = Traffic(2, lambda k: replicas[(k // 2 + k % 2) % len(replicas)].url + "/derp")
    try:
        await traffic.start()
        await traffic.routed()
        traffic.run()
        await asyncio.sleep(seconds)
        until = await traffic.stop()
    finally:
        await traffic.close()
    return sum(len(f.sent) for f in traffic.flows), sum(len(f.lost(until)) for f in traffic.flows)


async def test_replicas_work_through_pgbouncer_with_a_direct_listen_url(bouncer, pg_url, make_cluster):
    """Both modes: the pooled URL for everything but LISTEN, which gets the direct one."""
    extra = ("--pg-listen-url", pg_url) if bouncer.mode == "transaction" else ()
    replicas = make_cluster(bouncer.url(_dbname(pg_url)), *extra).add_replicas(2)
    took = await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    sent, lost = await cross_traffic(replicas)
    await asyncio.sleep(4)  # a few listener checks and latency probes
    for r in replicas:
        assert r.ready()
        assert findings(r) == [] or all(f["code"] in ("EDB02", "EPS02", "EDERP02") for f in findings(r)), findings(r)
        assert "_pg3_" not in r.proc.output
        assert LISTEN_LINE not in r.proc.output
        assert "listener check failed" not in r.proc.output
    print(f"\nPgBouncer {bouncer.mode} pooling: full mesh {took:.1f} s after ready, {lost} of {sent} packets lost")
    assert lost == 0


async def test_transaction_pooling_without_a_listen_url_is_named_once_and_serving_goes_on(
        transaction_bouncer, pg_url, make_cluster):
    replicas = make_cluster(transaction_bouncer.url(_dbname(pg_url))).add_replicas(2)  # ready: heartbeats work through the pooler
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh (peers found at heartbeat pace)")
    await wait_until(lambda: all(LISTEN_LINE in r.proc.output for r in replicas), 20, "the one-line diagnosis")
    for r in replicas:
        codes = {f["code"] for f in findings(r)}
        assert "EPS03" in codes, findings(r)
        msg = next(f["message"] for f in findings(r) if f["code"] == "EPS03")
        assert "--pg-listen-url" in msg and "COORDINATOR_PG_LISTEN_URL" in msg
    sent, lost = await cross_traffic(replicas, seconds=12)  # also: several more listener checks
    for r in replicas:
        out = r.proc.output
        assert out.count(LISTEN_LINE) == 1, out[-3000:]
        assert "listener check failed, reconnecting" not in out
        assert "pubsub disconnected" not in out
        assert "Traceback" not in out
        assert r.ready() and r.running
        assert r.status()["database"] is True
    assert full_mesh(replicas)
    print(f"\nPgBouncer transaction pooling without a listen URL: {lost} of {sent} packets lost; "
          "EPS03 raised, one log line per replica")
    assert lost == 0


async def test_a_pgbouncer_restart_is_ridden_out(transaction_bouncer, pg_url, make_cluster):
    """The pooler restarts under traffic: heartbeats resume through it, relaying never notices."""
    replicas = make_cluster(transaction_bouncer.url(_dbname(pg_url)), "--pg-listen-url", pg_url).add_replicas(2)
    await wait_until(lambda: full_mesh(replicas), 30, "a full mesh")
    traffic = Traffic(2, lambda k: replicas[(k // 2 + k % 2) % len(replicas)].url + "/derp")
    try:
        await traffic.start()
        await traffic.routed()
        traffic.run()
        await asyncio.sleep(1)
        await asyncio.to_thread(transaction_bouncer.stop)
        await wait_until(lambda: not any(r.ready() for r in replicas), 15, "heartbeats to fail")
        await asyncio.sleep(5)  # down for longer than a heartbeat may take: heartbeats fail meanwhile
        await asyncio.to_thread(transaction_bouncer.start)
        back = time.monotonic()
        await wait_until(lambda: all(r.ready() and r.status()["database"] for r in replicas), 30,
                         "heartbeats through the restarted pooler", interval=0.1)
        recovered = time.monotonic() - back
        await asyncio.sleep(1)
        until = await traffic.stop()
    finally:
        await traffic.close()
    sent = sum(len(f.sent) for f in traffic.flows)
    lost = sum(len(f.lost(until)) for f in traffic.flows)
    print(f"\nPgBouncer restarted (down 5 s after heartbeats failed): heartbeating again {recovered:.1f} s after it was back; "
          f"{lost} of {sent} packets lost")
    assert lost == 0
    for r in replicas:
        assert "Traceback" not in r.proc.output and r.running
