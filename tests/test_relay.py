"""The relay end to end: real uvicorn on a free port (the ``relay`` fixture of conftest.py), real sockets,
the Python DERP client. Hostile input: test_relay_hostile.py."""

import asyncio
import os
import socket

import anyio
import pytest
import websockets

from _relay import codec
from coordinator.core.keys import NodeKey
from coordinator.relay.client import (
    DerpClient,
    DerpError,
    DerpRefused,
    KeepAlive,
    PeerGone,
    PeerPresent,
    RecvPacket,
)
from testkit.polling import wait_for
from testkit.relayfix import exchange, raw_socket, serve_relay

pytestmark = pytest.mark.anyio

DISCO = codec.DISCO_MAGIC + os.urandom(56)


@pytest.mark.parametrize(("ws_a", "ws_b"), [(False, False), (True, True), (False, True)], ids=["raw", "websocket", "mixed"])
async def test_packets_both_ways(relay, ws_a, ws_b):
    url, _ = relay
    async with await DerpClient.connect(url, websocket=ws_a) as a, await DerpClient.connect(url, websocket=ws_b) as b:
        assert a.server_info == {"version": 2}
        await exchange(a, b)


async def test_upgrade_response_headers(relay):
    url, r = relay
    async with await DerpClient.connect(url) as a:
        assert a.response_headers["derp-version"] == "2"
        assert a.response_headers["derp-public-key"] == r.public_key.hex()
        assert a.server_key == r.public_key


async def test_fast_start_sends_no_http_response(relay):
    url, r = relay
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
    with anyio.fail_after(5):
        first = await reader.readexactly(45)
    assert first == r.server.server_key_frame
    writer.close()


async def test_legacy_websocket_header_without_subprotocol_is_raw_derp(relay):
    url, r = relay
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n")
    with anyio.fail_after(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: DERP" in head
    with anyio.fail_after(5):
        assert await reader.readexactly(45) == r.server.server_key_frame
    writer.close()


async def test_split_and_coalesced_frames(relay):
    url, _ = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        sock = a.transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frame = codec.send_packet(b.public_key, b"split across many reads")
        for i in range(len(frame)):  # one byte per write: the server sees one-byte reads
            await a.send_raw(frame[i : i + 1])
            await asyncio.sleep(0.001)
        assert (await b.recv_packet(timeout=5)).data == b"split across many reads"
        payloads = [os.urandom(n) for n in range(0, 3000, 7)]
        await a.send_raw(b"".join(codec.send_packet(b.public_key, p) for p in payloads))  # coalesced
        for p in payloads:
            assert (await b.recv_packet(timeout=5)).data == p
        # frames straddling write boundaries at odd offsets
        blob = b"".join(codec.send_packet(b.public_key, bytes([i]) * 5000) for i in range(20))
        for i in range(0, len(blob), 4093):
            await a.send_raw(blob[i : i + 4093])
        for i in range(20):
            assert (await b.recv_packet(timeout=5)).data == bytes([i]) * 5000


async def test_websocket_messages_limited_to_32k_and_large_incoming_accepted(relay):
    url, _ = relay
    async with await DerpClient.connect(url) as a:
        ws = await websockets.connect(url.replace("http", "ws"), subprotocols=["derp"], compression=None, max_size=None)
        try:
            from coordinator.relay.handshake import client_info_payload

            reader = codec.FrameReader()
            frames = []
            while not frames:
                frames += reader.feed(await ws.recv())
            server_key = frames[0][1][8:40]
            key = NodeKey.generate()
            hello = codec.frame(codec.CLIENT_INFO, client_info_payload(key, server_key, {"version": 2}))
            # one 200 KB WebSocket message holding the ClientInfo and three 64 KiB packets
            big = hello + b"".join(codec.send_packet(a.public_key, bytes([i]) * 65536) for i in range(3))
            await ws.send(big)
            for i in range(3):
                assert (await a.recv_packet(timeout=5)).data == bytes([i]) * 65536
            await a.send_many(key.public, [os.urandom(65536) for _ in range(4)])
            got, sizes = 0, []
            while got < 4:
                with anyio.fail_after(5):
                    msg = await ws.recv()
                sizes.append(len(msg))
                got += sum(1 for t, _ in reader.feed(msg) if t == codec.RECV_PACKET)
            assert max(sizes) <= 32768
        finally:
            await ws.close()


async def test_duplicate_connections_last_sender_is_active(relay):
    url, r = relay
    key = NodeKey.generate()
    async with await DerpClient.connect(url) as sender:
        first = await DerpClient.connect(url, key)
        second = await DerpClient.connect(url, key)
        await wait_for(lambda: len(r.server.connections(key.public)) == 2)
        assert r.stats()["duplicate_keys"] == 1
        await sender.send(key.public, b"to-newest")
        assert (await second.recv_packet(timeout=5)).data == b"to-newest"
        await first.note_preferred(True)  # any frame makes its sender the active one
        await wait_for(lambda: r.server.connections(key.public)[-1].remote_port == first.transport.get_extra_info("sockname")[1])
        await sender.send(key.public, b"to-first")
        assert (await first.recv_packet(timeout=5)).data == b"to-first"
        await first.close()
        await wait_for(lambda: len(r.server.connections(key.public)) == 1)
        await sender.send(key.public, b"to-survivor")
        assert (await second.recv_packet(timeout=5)).data == b"to-survivor"
        await second.close()
        await wait_for(lambda: not r.server.connections(key.public))


async def test_ping_pong(relay):
    url, _ = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url, websocket=True) as b:
        assert 0 < await a.ping() < 5
        assert 0 < await b.ping() < 5
        await a.send_raw(codec.frame(codec.PING, b"12345678" + bytes(992)))  # 1000 B: allowed, 8 echoed
        frame = await a.recv(timeout=5)
        assert frame.data == b"12345678"


async def test_keepalive_sent_on_schedule():
    async with serve_relay(keepalive=0.2, keepalive_jitter=0.05) as (url, r):
        async with await DerpClient.connect(url) as a:
            for _ in range(2):
                assert isinstance(await a.recv(timeout=3), KeepAlive)
            assert r.stats()["keepalives"] >= 2


async def test_peer_gone_not_here_for_disco_to_unknown_key_rate_limited(relay):
    url, r = relay
    async with await DerpClient.connect(url) as a:
        nobody = NodeKey.generate().public
        for _ in range(10):
            await a.send(nobody, DISCO)
        await a.send(nobody, b"not disco")
        gone = []
        with pytest.raises(asyncio.TimeoutError):
            while True:
                gone.append(await a.recv(timeout=0.5))
        assert gone == [PeerGone(nobody, codec.PEER_GONE_NOT_HERE)] * 3  # burst 3, then 1/s
        assert r.stats()["drops"]["unknown_dest"] == 11


async def test_peer_gone_disconnected_to_those_who_heard_from_it(relay):
    url, _ = relay
    async with await DerpClient.connect(url) as a:
        b = await DerpClient.connect(url)
        await b.send(a.public_key, b"hi")
        assert (await a.recv_packet(timeout=5)).src == b.public_key
        await b.close()
        assert await a.recv(timeout=5) == PeerGone(b.public_key, codec.PEER_GONE_DISCONNECTED)


async def test_mesh_watch_forward_and_close_peer():
    mesh_key = "ab" * 32
    async with serve_relay(mesh_key=mesh_key) as (url, r):
        async with await DerpClient.connect(url) as a:
            watcher = await DerpClient.connect(url, mesh_key=mesh_key.upper())
            await watcher.watch_conns()
            present = await watcher.recv(timeout=5)
            assert isinstance(present, PeerPresent)
            assert present.key == a.public_key and present.ip == "127.0.0.1"
            assert present.port == a.transport.get_extra_info("sockname")[1]
            # flags are only parsed from a payload of >= 51 bytes: key, v4-mapped address, port, flags
            assert present.flags == codec.PEER_PRESENT_IS_REGULAR
            b = await DerpClient.connect(url)
            assert (await watcher.recv(timeout=5)).key == b.public_key
            remote = NodeKey.generate().public
            await watcher.forward(remote, a.public_key, b"via mesh")
            assert await a.recv_packet(timeout=5) == RecvPacket(remote, b"via mesh")
            assert r.stats()["forwarded_in"] == 1
            await watcher.close_peer(b.public_key)
            assert await watcher.recv(timeout=5) == PeerGone(b.public_key, codec.PEER_GONE_DISCONNECTED)
            with pytest.raises(DerpError):
                await b.recv(timeout=5)
            await b.close()
            await watcher.close()


async def test_wrong_mesh_key_served_as_ordinary_client():
    """As Go's derper: a well-formed wrong key is an ordinary client (its mesh frames refused); a malformed one is refused."""
    async with serve_relay(mesh_key="ab" * 32) as (url, r):
        async with await DerpClient.connect(url) as a, await DerpClient.connect(url, mesh_key="cd" * 32) as wrong:
            await wrong.send(a.public_key, b"ordinary")
            assert (await a.recv_packet(timeout=5)).data == b"ordinary"
            await wrong.watch_conns()
            with pytest.raises(DerpError):
                await wrong.recv(timeout=5)
        with pytest.raises(DerpRefused):
            await DerpClient.connect(url, mesh_key="wrong-key")


async def test_forwarder_sends_forward_packets(relay):
    url, r = relay
    # A plain TCP socket pair stands in for the mesh link's transport: we read what the relay writes.
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=left)
    fwd = r.forwarder(transport, "peer-1")
    remote = NodeKey.generate().public
    r.server.add_forwarder(remote, fwd)
    async with await DerpClient.connect(url) as a:
        await a.send(remote, b"over the mesh")
        right.setblocking(False)
        with anyio.fail_after(5):
            data = await loop.sock_recv(right, 4096)
        assert data == codec.forward_packet(a.public_key, remote, b"over the mesh")
        assert r.server.lookup(remote) is fwd
        # a local client always wins over a forwarder
        local = await DerpClient.connect(url, NodeKey.generate())
        r.server.add_forwarder(local.public_key, fwd)
        assert r.server.lookup(local.public_key) is not fwd
        await local.close()
        await wait_for(lambda: r.server.lookup(local.public_key) is fwd)
        assert r.server.remove_forwarder(remote, fwd)
        assert r.server.lookup(remote) is None
    transport.close()
    right.close()


async def test_congested_forwarder_pauses_its_sender_until_the_link_drains(relay):
    """Without an on_congested handler the relay's own ticker notices the drain and resumes."""
    url, r = relay
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    right.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=left)
    fwd = r.forwarder(transport, "slow-peer")
    remote = NodeKey.generate().public
    r.server.add_forwarder(remote, fwd)
    count, size = 200, 16384  # 3.3 MB against ~0.2 MB of socket buffer
    try:
        async with await DerpClient.connect(url) as a:
            sending = asyncio.create_task(a.send_many(remote, [bytes(size)] * count))
            await wait_for(lambda: r.stats()["senders_paused"] == 1)  # nobody reads `right`
            assert fwd.congested and r.stats()["mesh_links_congested"] == 1
            expected = count * (5 + 64 + size)
            received = 0
            while received < expected:  # drain the link: the ticker resumes `a` within a second
                with anyio.fail_after(5):
                    received += len(await loop.sock_recv(right, 1 << 20))
            with anyio.fail_after(5):
                await sending
            assert received == expected
            stats = r.stats()
            assert stats["forwarded_out"] == count and stats["drops"]["queue_tail"] == 0
            assert stats["senders_paused"] == 0 and not fwd.congested
    finally:
        fwd.close()
        transport.close()
        right.close()


async def test_multi_forwarder_rules(relay):
    _, r = relay
    loop = asyncio.get_running_loop()
    pairs = [socket.socketpair() for _ in range(3)]
    fwds = []
    for left, _ in pairs:
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=left)
        fwds.append(r.forwarder(transport))
    key = NodeKey.generate().public
    for f in fwds:
        r.server.add_forwarder(key, f)
    r.server.add_forwarder(key, fwds[0])  # same again: no-op
    assert r.server.forwarders(key) == fwds
    assert r.server.lookup(key) is fwds[0]  # first registered stays preferred
    assert r.server.remove_forwarder(key, fwds[0])
    assert r.server.lookup(key) is fwds[1]  # then the lowest index
    assert not r.server.remove_forwarder(key, fwds[0])
    r.server.remove_forwarder(key, fwds[1])
    r.server.remove_forwarder(key, fwds[2])
    assert r.server.lookup(key) is None
    for left, right in pairs:
        left.close()
        right.close()


# -- HTTP endpoints ---------------------------------------------------------------------------


async def http(url, request: bytes) -> bytes:
    reader, writer = await raw_socket(url)
    writer.write(request)
    with anyio.fail_after(5):
        data = await reader.read()
    writer.close()
    return data


async def test_plain_derp_request_gets_426(relay):
    url, _ = relay
    resp = await http(url, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 426 ") and resp.endswith(b"DERP requires connection upgrade")


async def test_probe_and_generate_204(relay):
    url, _ = relay
    for path in (b"/derp/probe", b"/derp/latency-check"):
        for method in (b"GET", b"HEAD"):
            resp = await http(url, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 200 ") and b"access-control-allow-origin: *" in resp.lower()
        resp = await http(url, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 405 ") and b"bogus probe method" in resp
    resp = await http(url, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc.123:x\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 204 ") and b"x-tailscale-response: response abc.123:x" in resp.lower()
    resp = await http(url, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: bad challenge!\r\nConnection: close\r\n\r\n")
    assert b"x-tailscale-response" not in resp.lower()
    resp = await http(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 ")


async def test_counters(relay):
    url, r = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        await a.note_preferred(True)
        await exchange(a, b, [10, 20])
        s = r.stats()
        assert s["packets_in"] == 4 and s["packets_out"] == 4
        assert s["bytes_in"] == 60 and s["bytes_out"] == 60
        assert s["current_connections"] == 2 and s["current_home_connections"] == 1
        assert s["accepts"] == 2


async def test_client_address_from_trusted_proxy_header():
    mesh_key = "cd" * 32
    async with serve_relay(mesh_key=mesh_key) as (url, r):
        async with await DerpClient.connect(url, headers={"X-Forwarded-For": "203.0.113.7:4242"}) as a:
            watcher = await DerpClient.connect(url, mesh_key=mesh_key)
            await watcher.watch_conns()
            present = await watcher.recv(timeout=5)
            assert (present.key, present.ip, present.port) == (a.public_key, "203.0.113.7", 4242)
            await watcher.close()


async def test_relay_sockets_get_derper_tcp_timers(relay):
    import psutil

    url, _ = relay
    async with await DerpClient.connect(url) as a:
        port = a.transport.get_extra_info("sockname")[1]
        # the relay runs in this process: find its end of our connection and read its options
        (server_side,) = [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port]
        sock = socket.socket(fileno=os.dup(server_side.fd))
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            os.close(sock.detach())


async def test_ping_while_another_task_waits_in_recv(relay):
    url, _ = relay
    async with await DerpClient.connect(url) as a:
        reader = asyncio.create_task(a.recv())  # blocks: nothing will arrive
        await asyncio.sleep(0.01)
        for _ in range(3):
            assert 0 < await a.ping(timeout=2) < 2  # each Pong is resolved by the waiting recv
        assert not reader.done()
        reader.cancel()
