"""Measurements from where the probe runs: database, pub/sub, each relay's HTTP check and DERP ping, mesh pairs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from itertools import permutations
from typing import TYPE_CHECKING

import anyio

from coordinator.core.errors import describe
from coordinator.core.urls import relay_base
from coordinator.ops.probe.model import Figure, MeshPair, ReplicaInfo
from coordinator.relay.httpclient import KeepAliveHttp

if TYPE_CHECKING:  # imported when a relay is probed
    from coordinator.relay.client import DerpClient

_MAGIC = b"coordinator-probe\x00"  # mesh probe packets: _MAGIC + b"Q"|b"R" + 8-byte nonce
_PAIR_CONCURRENCY = 8  # mesh pairs sampled at once (more would measure the probe's own event loop)

# -- measurements from here --------------------------------------------------------------------------
#
# Three phases. Set-up, all targets at once: connections are opened and each figure's first
# round trip (which may pay for a handshake or a lazily dialled connection) is discarded. Then
# sampling, one round trip at a time, round-robin over the figures, so no measurement shares the
# event loop with another or with the CPU-heavy handshakes. Last the mesh pairs (each needs a
# probe client on both relays, and routes take a few ms to spread).


class _Check:
    """One figure measured from here: ``setup`` (connect, warm up), then ``once`` per sample."""

    def __init__(self, fig: Figure):
        self.fig = fig
        self.ready = False

    async def setup(self) -> None:
        await self.once()  # the warm-up round trip

    async def once(self) -> float:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _DatabaseCheck(_Check):
    def __init__(self, fig: Figure, conn):
        super().__init__(fig)
        self.conn = conn

    async def once(self) -> float:
        start = time.perf_counter()
        await self.conn.execute("SELECT 1")
        return time.perf_counter() - start


class _PubSubCheck(_Check):
    def __init__(self, fig: Figure, url: str, timeout: float):
        from coordinator.cluster.pubsub import PubSub

        super().__init__(fig)
        self.timeout = timeout
        self.ps = PubSub(url, application_name="coordinator-probe", ping_interval=0, connect_timeout=timeout,
                         publish_connections=1, publish_timeout=timeout)

    async def setup(self) -> None:
        try:
            await self.ps.start()
        except Exception as exc:
            raise ConnectionError(f"cannot open a LISTEN connection: {describe(exc)}") from None
        await self.once()  # also dials the publish connection

    async def once(self) -> float:
        return (await self.ps.measure_latency(timeout=self.timeout))[1]

    async def close(self) -> None:
        await self.ps.close()


class _HttpCheck(_Check):
    """``GET /derp/latency-check`` (a custom relay: ``/derp/probe``, as derpprobe asks) on one kept-alive connection."""

    def __init__(self, r: ReplicaInfo, timeout: float, insecure: bool, path: str = "/derp/latency-check"):
        super().__init__(r.http)
        self.path = path
        self.conn = KeepAliveHttp(r.relay_url, timeout, insecure)

    async def once(self) -> float:
        return await self.conn.round_trip(self.path)

    async def close(self) -> None:
        await self.conn.close()


class _DerpCheck(_Check):
    """The probe's DERP client on one replica's relay: DERP pings, then it echoes mesh probes.

    Pings are done before the echo reader starts: ``DerpClient.ping`` racing a ``recv`` for the
    read lock can stall until the next frame arrives.
    """

    def __init__(self, r: ReplicaInfo, timeout: float, insecure: bool, pending: dict[bytes, asyncio.Future]):
        super().__init__(r.derp)
        self.replica = r
        self.timeout, self.insecure = timeout, insecure
        self.pending = pending  # nonce -> future resolved with the arrival time of its echo (shared)
        self.client: DerpClient | None = None
        self.reader: asyncio.Task | None = None
        self.lost: str | None = None

    async def setup(self) -> None:
        from coordinator.relay.client import DerpClient

        base = relay_base(self.replica.relay_url)
        if base is None:
            raise ConnectionError("no usable relay URL")
        self.client = await DerpClient.connect(base + "/derp", timeout=self.timeout, insecure=self.insecure)
        self.replica.server_key = self.client.server_key
        await self.once()

    @property
    def connected(self) -> DerpClient:
        """The client ``setup`` connected."""
        if self.client is None:
            raise RuntimeError("the DERP check is not set up")
        return self.client

    async def once(self) -> float:
        return await self.connected.ping(self.timeout)

    def start_echo(self) -> None:
        self.reader = asyncio.create_task(self._read(), name=f"probe-reader {self.replica.short}")

    async def _read(self) -> None:
        from coordinator.relay.client import DerpError, RecvPacket

        client = self.connected
        try:
            while True:
                frame = await client.recv()
                if not isinstance(frame, RecvPacket) or not frame.data.startswith(_MAGIC):
                    continue
                kind, nonce = frame.data[len(_MAGIC):len(_MAGIC) + 1], frame.data[len(_MAGIC) + 1:]
                if kind == b"Q":
                    await client.send(frame.src, _MAGIC + b"R" + nonce)
                elif kind == b"R":
                    fut = self.pending.pop(nonce, None)
                    if fut is not None and not fut.done():
                        fut.set_result(time.perf_counter())
        except (DerpError, OSError) as exc:
            self.lost = describe(exc)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if self.client is not None:
            await self.client.close()


async def _setup(check: _Check, timeout: float) -> None:
    try:
        with anyio.fail_after(2 * timeout + 1):  # connect, then one round trip
            await check.setup()
        check.ready = True
    except Exception as exc:
        check.fig.error = describe(exc) if not isinstance(exc, TimeoutError) else f"no answer within {2 * timeout + 1:g} s"


async def _sample_round_robin(checks: list[_Check], samples: int, timeout: float) -> None:
    for _ in range(samples):
        for check in checks:
            if not check.ready:
                continue
            try:
                with anyio.fail_after(timeout):
                    check.fig.samples.append(await check.once())
            except Exception as exc:
                check.ready = False
                why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else describe(exc)
                check.fig.error = f"{why} (after {len(check.fig.samples)} good samples)" if check.fig.samples else why


async def _measure_mesh(pair: MeshPair, a: _DerpCheck, b: _DerpCheck, samples: int, timeout: float,
                        gate: asyncio.Semaphore) -> None:
    loop = asyncio.get_running_loop()
    pending = a.pending
    dst = b.connected.public_key

    async def send_probe(fut: asyncio.Future) -> None:
        nonce = os.urandom(8)
        pending[nonce] = fut
        await a.connected.send(dst, _MAGIC + b"Q" + nonce)

    # Routing first: B's key reaches A's relay (and A's reaches B's) over the mesh in a few ms.
    up = loop.create_future()
    deadline = loop.time() + timeout
    try:
        while not up.done():
            if a.lost or b.lost:
                raise ConnectionError(a.lost or b.lost)
            if loop.time() >= deadline:
                pair.rtt.error = (f"no probe crossed the mesh within {timeout:g} s: is {pair.a.short} meshed "
                                  f"with {pair.b.short}? (their errors: {pair.a.error or '-'} / {pair.b.error or '-'})")
                return
            await send_probe(up)
            await asyncio.wait({up}, timeout=min(0.02, max(0.0, deadline - loop.time())))
    except Exception as exc:
        pair.rtt.error = f"mesh probe failed: {describe(exc)}"
        return

    async with gate:
        for _ in range(samples):
            fut = loop.create_future()
            try:
                with anyio.fail_after(timeout):
                    start = time.perf_counter()
                    await send_probe(fut)
                    pair.rtt.samples.append(await fut - start)
            except Exception as exc:
                why = f"an echo did not come back within {timeout:g} s" if isinstance(exc, TimeoutError) else describe(exc)
                pair.rtt.error = f"{why} (after {len(pair.rtt.samples)} good samples)" if pair.rtt.samples else why
                return


async def measure(replicas: list[ReplicaInfo], conn, pg_url: str | None, samples: int, timeout: float,
                   insecure: bool, relays: Sequence[ReplicaInfo] = ()) -> tuple[Figure | None, Figure | None, list[MeshPair]]:
    """Everything measured from here; ``relays`` (custom relay nodes, as RelayInfo) get the replicas' HTTP and
    DERP checks, not the mesh's."""
    pending: dict[bytes, asyncio.Future] = {}
    database = pubsub = None
    checks: list[_Check] = []
    if conn is not None and pg_url is not None:  # (the probe connected to pg_url)
        database, pubsub = Figure(), Figure()
        checks += [_DatabaseCheck(database, conn), _PubSubCheck(pubsub, pg_url, timeout)]
    derps = {r.id: _DerpCheck(r, timeout, insecure, pending) for r in replicas if r.relay_url}
    checks += [_HttpCheck(r, timeout, insecure) for r in replicas if r.relay_url]
    checks += list(derps.values())
    for r in relays:
        own = insecure or getattr(r, "insecure", False)  # the map's InsecureForTests
        checks += [_HttpCheck(r, timeout, own, "/derp/probe"), _DerpCheck(r, timeout, own, pending)]
    pairs = [MeshPair(a, b) for a, b in permutations(replicas, 2)
             if a.region_id == b.region_id and a.relay_url and b.relay_url]
    try:
        await asyncio.gather(*(_setup(c, timeout) for c in checks))
        await _sample_round_robin(checks, samples, timeout)
        for d in derps.values():
            if d.client is not None:
                d.start_echo()
        gate = asyncio.Semaphore(_PAIR_CONCURRENCY)
        jobs = []
        for pair in pairs:
            a, b = derps[pair.a.id], derps[pair.b.id]
            down = [d.replica.short for d in (a, b) if d.client is None]
            if down:
                pair.rtt.error = "not measured: no DERP connection to " + " and ".join(down)
                continue
            jobs.append(_measure_mesh(pair, a, b, samples, timeout, gate))
        await asyncio.gather(*jobs)
    finally:
        await asyncio.gather(*(c.close() for c in checks), return_exceptions=True)
    return database, pubsub, pairs
