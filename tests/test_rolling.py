"""Rolling restart end to end: three replicas behind real nginx, 50 client pairs relaying numbered packets.

Each replica in turn gets SIGTERM and is started again on the same data directory (same server
key), as a Kubernetes rollout does it. Clients of the stopping replica get ``Restarting``, redial
through nginx with the same node key and land on a survivor; pairs with neither end on the
restarting replica must not lose a packet.
"""

from __future__ import annotations

import asyncio
import signal
import time

import anyio
import pytest

from coordinator.cli.nginx import nginx_binary
from testkit.cluster import HACluster, full_mesh, serve
from testkit.polling import wait_until
from testkit.traffic import Flow, Traffic

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed (COORDINATOR_WITH_NGINX=1 scripts/bootstrap.sh)"),
]

PAIRS = 50


@pytest.fixture
def cluster(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat="1s", extra_args=("--shutdown-timeout", "5s")), request)


async def poll(predicate, timeout: float, what: str) -> float:
    """Seconds until ``predicate`` (blocking: HTTP calls) holds, run off the event loop so traffic flows."""
    return await wait_until(lambda: asyncio.to_thread(predicate), timeout, what, interval=0.02)


async def restart_each(replicas, traffic: Traffic, server_keys: dict[int, bytes]):
    """SIGTERM and restart each replica in turn; (phases, figures) for the report."""
    # (start, end, flows touching the victim): phases are contiguous, so a packet that a pair on the
    # restarting replica sent just before the SIGTERM, and lost in the stop, counts as theirs.
    phases: list[tuple[float, float, set[int]]] = []
    figures = []
    start = time.monotonic()
    for victim in replicas:
        await asyncio.sleep(1)
        key = server_keys[victim.index]
        touched = {i for i, f in enumerate(traffic.flows) if key in (f.src.server_key, f.dst.server_key)}
        signalled = time.monotonic()
        victim.proc.signal(signal.SIGTERM)
        status = await asyncio.to_thread(victim.proc.wait, 30)
        exited = time.monotonic() - signalled
        spawned = time.monotonic()
        await asyncio.to_thread(victim.start)  # returns once /readyz answers
        ready = time.monotonic() - spawned
        meshed = await poll(lambda: full_mesh(replicas), 30, f"replica {victim.index} to mesh with both others")
        await asyncio.sleep(1)  # packets sent just before the phase ends have time to arrive
        phases.append((start, time.monotonic(), touched))
        start = phases[-1][1]
        figures.append((victim.index, len(touched), status, exited, ready, ready + meshed))
    return phases, figures


async def test_rolling_restart_behind_nginx(cluster):
    replicas = cluster.add_replicas(3)
    cluster.start_nginx()
    await poll(lambda: full_mesh(replicas), 30, "a full mesh")
    server_keys = {r.index: r.server_key for r in replicas}  # kept across restarts: same data directory
    traffic = Traffic(PAIRS, lambda _: cluster.access_url + "/derp")
    try:
        await traffic.start()
        await traffic.routed(60)
        traffic.run()
        # A bound of its own: a hang fails with the await it hung in.
        with anyio.fail_after(240):
            phases, figures = await restart_each(replicas, traffic, server_keys)
        until = await traffic.stop()
    finally:
        await traffic.close()

    def touched_when(i: int, sent_at: float) -> bool:
        return any(start <= sent_at <= end and i in touched for start, end, touched in phases)

    lost = [(i, seq, t) for i, f in enumerate(traffic.flows) for seq, t in f.lost(until)]
    untouched_lost = [x for x in lost if not touched_when(x[0], x[2])]
    sent = sum(len(f.sent) for f in traffic.flows)
    print(f"\nrolling restart of 3 replicas behind nginx, {PAIRS} pairs, {sent} numbered packets:")
    for index, n, status, exited, ready, meshed in figures:
        print(f"  replica {index}: {n} pairs touched it; exited {exited:.2f} s after SIGTERM (status {status}); "
              f"restarted: ready after {ready:.2f} s, meshed with both others {meshed:.2f} s after it was started")
    print(f"  lost by pairs not on the restarting replica: {len(untouched_lost)} (target 0); total lost {len(lost)} "
          f"({len(lost) / max(sent, 1):.2%}); longest gap of any pair {max(Flow.longest_gap(f) for f in traffic.flows):.2f} s; "
          f"Restarting frames received {sum(len(e.restarting) for e in traffic.endpoints)}, "
          f"reconnects {sum(e.reconnects for e in traffic.endpoints)}")
    assert [f[2] for f in figures] == [0, 0, 0], "every graceful stop exits with status 0"
    assert untouched_lost == [], [
        (i, seq, [round(t - a, 3) for a, _, _ in phases], traffic.flows[i].src.reconnects, traffic.flows[i].dst.reconnects)
        for i, seq, t in untouched_lost]
    assert all(f[1] > 0 for f in figures), "nginx put no client on some replica: the test proved nothing there"
    touched_endpoints = [e for e in traffic.endpoints if e.reconnects]
    assert touched_endpoints and all(e.restarting for e in touched_endpoints), "clients were closed without Restarting"
