"""One hostile client against a real replica process: it must not hurt the replica or its healthy clients.

The attacker is raw-socket code of its own (testkit/rawderp.py); the healthy pair uses the project's
client. Every test prints what it measured (RSS before and after, close times, refusals); bounds
are generous, the machine is shared.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import struct
import threading
import time
import uuid
from pathlib import Path

import anyio
import psutil
import psycopg
import pytest

from coordinator.relay.client import DerpClient
from testkit import rawderp
from testkit.polling import wait_for
from testkit.procs import Proc, free_port, python
from testkit.rawderp import RawPeer

pytestmark = pytest.mark.anyio
MESH_KEY = "5a" * 32
HEADER_TIMEOUT = 3.0
MAX_CONNECTIONS = 400
MiB = 1 << 20


class Replica:
    """``coordinator server`` in its own process, with tight front-door limits."""

    def __init__(self, pg_url: str, data: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{self.port}", "--data-dir", str(data),
             "--relay-url", self.url, "--access-url", "http://lb.invalid", "--pg-url", pg_url,
             "--header-timeout", f"{HEADER_TIMEOUT}s", "--max-connections", str(MAX_CONNECTIONS),
             "--preauth-memory", "8MiB", "--log-level", "info"],
            env={"COORDINATOR_API_TOKEN": "t", "COORDINATOR_DERP_MESH_KEY": MESH_KEY}, log=data / "server.log",
        )
        self.proc.wait_http(self.url + "/readyz")
        self.ps = psutil.Process(self.proc.proc.pid)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def fds(self) -> int:
        return self.ps.num_fds()

    def alive(self) -> bool:
        return self.proc.proc.poll() is None


@pytest.fixture(scope="module")
def replica(pg_cluster, tmp_path_factory):
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    r = None
    try:
        r = Replica(f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{name}", tmp_path_factory.mktemp("frontdoor"))
        yield r
        assert r.alive(), r.proc.output[-3000:]
        assert "Traceback" not in r.proc.output, r.proc.output[-3000:]
    finally:
        if r is not None:
            r.proc.stop()
        with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class HealthyPair:
    """Two real clients exchanging numbered packets through the replica for as long as the attack lasts."""

    def __init__(self, a: DerpClient, b: DerpClient):
        self.a, self.b = a, b
        self.sent = self.received = 0

    @classmethod
    async def open(cls, url: str) -> HealthyPair:
        return cls(await DerpClient.connect(url + "/derp"), await DerpClient.connect(url + "/derp"))

    async def exchange(self, n: int = 5) -> None:
        for _ in range(n):
            self.sent += 1
            await self.a.send(self.b.public_key, self.sent.to_bytes(8, "big"))
            got = await self.b.recv_packet(timeout=10)
            assert int.from_bytes(got.data, "big") == self.sent, "healthy pair lost or reordered a packet"
            self.received += 1

    async def keep_exchanging(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.exchange(1)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()


def ready(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/readyz")
    resp = conn.getresponse()
    resp.read()
    return resp.status


@pytest.mark.parametrize("path", ["/derp", "/healthz"])
@pytest.mark.parametrize("shape", ["many header lines", "one endless line"])
async def test_header_bomb_gets_431_and_costs_no_memory(replica, path, shape):
    rss0 = replica.rss()
    peer = await RawPeer.connect(replica.port)
    await peer.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())
    chunk = (b"X-Bomb: " + b"a" * 1000 + b"\r\n") * 64 if shape == "many header lines" else b"a" * 65536
    sent, start = 0, time.monotonic()
    try:
        while sent < 256 * MiB and time.monotonic() - start < 30:
            with anyio.fail_after(5):
                await peer.send(chunk)
            sent += len(chunk)
    except (ConnectionError, OSError, TimeoutError):
        pass
    reply = b""
    try:
        reply = await peer.read_all(timeout=5)
    except (ConnectionError, OSError, TimeoutError):
        pass
    peer.close()
    rss1 = replica.rss()
    print(f"\nheader bomb ({shape}, {path}): sent {sent / MiB:.1f} MiB before the replica hung up; "
          f"RSS {rss0 / MiB:.0f} -> {rss1 / MiB:.0f} MiB; reply {reply[:40]!r}")
    assert replica.alive()
    assert sent < 64 * MiB, "the replica kept reading an endless request head"
    assert rss1 - rss0 < 64 * MiB
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431")


async def test_a_big_head_gets_431_and_a_slow_one_408(replica):
    big = await RawPeer.connect(replica.port)
    await big.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (70 * 1024))
    slow = await RawPeer.connect(replica.port)
    await slow.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    big_reply, slow_reply = await big.read_all(), await slow.read_all()
    took = time.monotonic() - start
    big.close()
    slow.close()
    print(f"\n70 KiB head: {big_reply.splitlines()[0]!r}; half-sent head: {slow_reply.splitlines()[0]!r} after {took:.2f} s")
    assert big_reply.startswith(b"HTTP/1.1 431")
    assert slow_reply.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT + 10


async def test_a_trickling_body_is_closed_at_the_timeout(replica):
    peer = await RawPeer.connect(replica.port)
    await peer.send(b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    start = time.monotonic()
    for _ in range(int(HEADER_TIMEOUT * 4)):
        try:
            await peer.send(b"x")  # each byte would cancel uvicorn's keep-alive timer
        except (ConnectionError, OSError):
            break
        await asyncio.sleep(0.5)
    closed = await peer.closed_within(HEADER_TIMEOUT + 10)
    took = time.monotonic() - start
    peer.close()
    print(f"\nbody trickling 2 B/s: closed after {took:.2f} s")
    assert closed and took < 2 * HEADER_TIMEOUT + 10


async def test_partial_requests_closed_at_header_timeout_while_healthy_pair_relays(replica):
    pair = await HealthyPair.open(replica.url)
    stop = asyncio.Event()
    relaying = asyncio.create_task(pair.keep_exchanging(stop))
    fds0, rss0 = replica.fds(), replica.rss()
    try:
        peers = [await RawPeer.connect(replica.port) for _ in range(300)]
        start = time.monotonic()
        for i, p in enumerate(peers):
            await p.send(b"GET /derp HTTP/1.1\r\nHost: x\r\nX-Partial: " if i % 2 else b"GET /healthz HTT")
        fds_peak = replica.fds()
        closed = await asyncio.gather(*(p.closed_within(HEADER_TIMEOUT + 10) for p in peers))
        took = time.monotonic() - start
        print(f"\n300 partial requests: all closed after {took:.2f} s (header timeout {HEADER_TIMEOUT} s); "
              f"replica fds {fds0} -> {fds_peak} -> {replica.fds()}; RSS {rss0 / MiB:.0f} -> {replica.rss() / MiB:.0f} MiB; "
              f"healthy pair relayed {pair.received} packets meanwhile")
        assert all(closed), f"{closed.count(False)} partial requests still open"
        for p in peers:
            p.close()
    finally:
        stop.set()
        await relaying
        await pair.close()
    assert pair.received == pair.sent > 0


async def test_connections_over_the_cap_get_503_while_the_replica_keeps_serving(replica):
    pair = await HealthyPair.open(replica.url)
    probe = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=10)
    statuses: list[int] = []
    stop = threading.Event()

    def poll_readyz() -> None:  # one keep-alive connection, opened before the flood, polled throughout
        while not stop.is_set():
            statuses.append(ready(probe))
            stop.wait(0.5)

    poller = threading.Thread(target=poll_readyz)
    poller.start()
    peers: list[RawPeer] = []
    replies: set[str] = set()

    async def hold_one() -> bool:
        """A finished DERP handshake (it stays open however long the test takes); False if refused."""
        p = await RawPeer.connect(replica.port)
        peers.append(p)
        try:
            await p.handshake(replica.port)
            return True
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            replies.add(str(exc).split("\\r\\n")[0].removeprefix("upgrade refused: b'"))
            return "503" not in str(exc)

    try:
        served = []
        for _ in range((MAX_CONNECTIONS + 100) // 50):
            served += await asyncio.gather(*(hold_one() for _ in range(50)))
        refused = served.count(False)
        await pair.exchange(20)
        stop.set()
        poller.join()
        print(f"\ncap {MAX_CONNECTIONS}: {len(peers)} connections opened, {refused} refused at once; "
              f"a refused client sees {sorted(replies)}; /readyz {sorted(set(statuses))} ({len(statuses)} polls); "
              f"healthy pair relayed {pair.received}")
        assert refused >= 100 - 10, "connections beyond the cap were not refused"
        assert statuses and set(statuses) == {200}
    finally:
        stop.set()
        poller.join()
        for p in peers:
            p.close()
        probe.close()
        await pair.close()
    # Once the flood is gone, new connections are served again.
    fresh = await HealthyPair.open(replica.url)
    await fresh.exchange(3)
    await fresh.close()


@pytest.mark.parametrize("websocket", [False, True], ids=["derp-ping", "websocket-ping"])
async def test_ping_flood_from_a_client_that_never_reads(replica, websocket):
    rss0 = replica.rss()
    peer = await RawPeer.connect(replica.port)
    await peer.handshake(replica.port, websocket=websocket)
    if websocket:
        batch = b"".join(rawderp.ws_frame(rawderp.WS_PING, os.urandom(8)) for _ in range(4096))
    else:
        batch = rawderp.frame(rawderp.PING, os.urandom(8)) * 8192
    sent, peak, start = 0, rss0, time.monotonic()
    try:
        while time.monotonic() - start < 8:
            with anyio.fail_after(5):
                await peer.send(batch)
            sent += len(batch)
            peak = max(peak, replica.rss())
    except (ConnectionError, OSError, TimeoutError):
        pass
    peer.close()
    peak = max(peak, replica.rss())
    print(f"\nping flood ({'WebSocket' if websocket else 'DERP'}): {sent / MiB:.0f} MiB of pings sent; "
          f"RSS {rss0 / MiB:.0f} -> peak {peak / MiB:.0f} MiB")
    assert replica.alive()
    assert peak - rss0 < 64 * MiB


async def test_upgrade_pipelined_behind_a_request_is_refused(replica):
    peer = await RawPeer.connect(replica.port)
    await peer.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + rawderp.upgrade_request("x"))
    reply = await peer.read_all(timeout=10)
    peer.close()
    print(f"\npipelined upgrade: {reply!r}")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 400" in reply and b"101" not in reply and rawderp.MAGIC not in reply


async def test_handshakes_holding_client_info_stay_within_the_preauth_budget(replica):
    rss0 = replica.rss()
    peers, refused = [], 0
    partial = rawderp.frame(rawderp.CLIENT_INFO, b"")[:1] + struct.pack(">I", 256 * 1024 - 1)
    for _ in range(120):
        p = await RawPeer.connect(replica.port)
        await p.upgrade(replica.port)
        try:
            await p.send(partial + os.urandom(256 * 1024 - 2))
        except (ConnectionError, OSError):
            pass
        peers.append(p)
    rss1 = replica.rss()
    for p in peers:
        refused += await p.closed_within(0.01)
        p.close()
    print(f"\n120 x (256 KiB - 1) ClientInfo: RSS {rss0 / MiB:.0f} -> {rss1 / MiB:.0f} MiB; "
          f"{refused} refused by the 8 MiB pre-auth budget")
    assert rss1 - rss0 < 64 * MiB
    assert refused >= 80


CLOSE_CASES = {
    "one-byte payload": (b"\x03", 1002),
    "code 1005": (struct.pack(">H", 1005), 1002),
    "code 1006": (struct.pack(">H", 1006), 1002),
    "code 999": (struct.pack(">H", 999), 1002),
    "code 2000": (struct.pack(">H", 2000), 1002),
    "bad utf-8 reason": (struct.pack(">H", 1000) + b"\xff", 1007),
    "no payload": (b"", 1000),
    "code 1001": (struct.pack(">H", 1001) + b"bye", 1001),
    "code 4000": (struct.pack(">H", 4000), 4000),
}


@pytest.mark.parametrize("case", [*CLOSE_CASES, "rsv bits", "continuation without start", "text message"])
async def test_websocket_close_handshake(replica, case):
    peer = await RawPeer.connect(replica.port)
    await peer.handshake(replica.port, websocket=True)
    if case in CLOSE_CASES:
        payload, expected = CLOSE_CASES[case]
        await peer.send(rawderp.ws_frame(rawderp.WS_CLOSE, payload))
    elif case == "rsv bits":
        await peer.send(rawderp.ws_frame(rawderp.WS_BINARY, rawderp.frame(rawderp.PING, bytes(8)), rsv=4))
        expected = 1002
    elif case == "continuation without start":
        await peer.send(rawderp.ws_frame(rawderp.WS_CONT, b"x"))
        expected = 1002
    else:
        await peer.send(rawderp.ws_frame(rawderp.WS_TEXT, b"hello"))
        expected = 1003
    while True:
        opcode, body = await peer.read_ws()
        if opcode == rawderp.WS_CLOSE:
            break
    code = struct.unpack(">H", body[:2])[0]
    assert await peer.closed_within(10)
    peer.close()
    assert code == expected, f"{case}: close code {code}, expected {expected}"


async def test_wrong_mesh_key_is_an_ordinary_client_whose_mesh_frames_are_refused(replica):
    async with await DerpClient.connect(replica.url + "/derp") as healthy:
        wrong = await RawPeer.connect(replica.port)
        await wrong.handshake(replica.port, mesh_key="c3" * 32)
        await wrong.send(rawderp.frame(rawderp.SEND_PACKET, healthy.public_key + b"from a misconfigured peer"))
        got = await healthy.recv_packet(timeout=10)
        assert got.src == wrong.public and got.data == b"from a misconfigured peer"
        await wrong.send(rawderp.frame(rawderp.WATCH_CONNS))
        assert await wrong.closed_within(10)
        wrong.close()
        for mesh_frame in (rawderp.frame(rawderp.CLOSE_PEER, healthy.public_key),
                           rawderp.frame(rawderp.FORWARD_PACKET, bytes(32) + healthy.public_key + b"x")):
            p = await RawPeer.connect(replica.port)
            await p.handshake(replica.port, mesh_key="c3" * 32)
            await p.send(mesh_frame)
            assert await p.closed_within(10)
            p.close()
        await healthy.send(healthy.public_key, b"still here")  # ClosePeer did not close us
        assert (await healthy.recv_packet(timeout=10)).data == b"still here"
    right = await RawPeer.connect(replica.port)
    await right.handshake(replica.port, mesh_key=MESH_KEY)
    await right.send(rawderp.frame(rawderp.WATCH_CONNS))
    await wait_for(lambda: True)
    assert not await right.closed_within(0.5)
    right.close()
