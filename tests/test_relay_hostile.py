"""The relay against hostile input: the offender is disconnected, everyone else keeps working.

Real uvicorn on a free port (the ``relay`` fixture of conftest.py), real sockets: malformed handshakes and frames, slow handshakes, bad
WebSocket input and a receiver that stops reading.
"""

import os

import anyio
import pytest
import websockets

from _relay import codec
from coordinator.core.keys import NodeKey
from coordinator.relay.client import DerpClient, DerpError
from testkit.polling import wait_for
from testkit.relayfix import exchange, raw_socket, serve_relay

pytestmark = pytest.mark.anyio


async def upgraded(url, server_key_frame):
    reader, writer = await raw_socket(url)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(45) == server_key_frame
    return reader, writer


async def assert_closed(reader, timeout=5.0):
    """The relay closes the connection without sending one more byte (no ServerInfo, no other frame)."""
    try:
        with anyio.fail_after(timeout):
            data = await reader.read()
    except ConnectionResetError:
        return  # closed while our bytes were still unread: a reset, after which nothing can arrive
    assert data == b"", f"expected the relay to close without a reply, got {len(data)} bytes: {data[:40].hex()}"


def client_info(key: NodeKey, server_key: bytes, info=None) -> bytes:
    from coordinator.relay.handshake import client_info_payload

    return codec.frame(codec.CLIENT_INFO, client_info_payload(key, server_key, info or {"version": 2}))


BAD_HANDSHAKES = {
    "garbage": lambda sk: b"\xde\xad\xbe\xef" * 50,
    "wrong first frame": lambda sk: codec.frame(codec.PING, bytes(8)),
    "oversized ClientInfo": lambda sk: codec.header(codec.CLIENT_INFO, 300000),
    "short ClientInfo": lambda sk: codec.frame(codec.CLIENT_INFO, bytes(40)),
    "bad box": lambda sk: codec.frame(codec.CLIENT_INFO, NodeKey.generate().public + os.urandom(80)),
    "not JSON": lambda sk: codec.frame(
        codec.CLIENT_INFO, __import__("coordinator.relay.handshake").relay.handshake.client_info_payload(NodeKey.generate(), sk, [1])
    ),
    "zero key": lambda sk: codec.frame(codec.CLIENT_INFO, bytes(32) + os.urandom(80)),
}


@pytest.mark.parametrize("case", list(BAD_HANDSHAKES))
async def test_bad_handshakes_disconnected(relay, case):
    url, r = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        reader, writer = await upgraded(url, r.server.server_key_frame)
        writer.write(BAD_HANDSHAKES[case](r.public_key))
        await assert_closed(reader)
        writer.close()
        await exchange(a, b, [0, 1000])
        assert r.stats()["current_connections"] == 2


async def test_truncated_and_slow_handshakes_time_out(relay):
    url, r = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        slow_reader, slow_writer = await upgraded(url, r.server.server_key_frame)
        cut_reader, cut_writer = await upgraded(url, r.server.server_key_frame)
        cut_writer.write(client_info(NodeKey.generate(), r.public_key)[:30])  # truncated, then silence
        await assert_closed(slow_reader, 5)  # handshake_timeout is 1 s in this fixture
        await assert_closed(cut_reader, 5)
        slow_writer.close()
        cut_writer.close()
        await exchange(a, b, [10])
        assert r.stats()["handshake_failures"] >= 2


BAD_FRAMES = {
    "oversized packet": lambda k: codec.header(codec.SEND_PACKET, 32 + 65537) + k + bytes(65537),
    "short SendPacket": lambda k: codec.frame(codec.SEND_PACKET, bytes(10)),
    "bad NotePreferred": lambda k: codec.frame(codec.NOTE_PREFERRED, b"\x01\x01"),
    "short Ping": lambda k: codec.frame(codec.PING, b"1234"),
    "WatchConns without mesh key": lambda k: codec.frame(codec.WATCH_CONNS),
    "ForwardPacket without mesh key": lambda k: codec.forward_packet(k, k, b"x"),
    "ClosePeer without mesh key": lambda k: codec.frame(codec.CLOSE_PEER, k),
    "huge length": lambda k: b"\x04\xff\xff\xff\xff" + k,
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frames_disconnect_only_the_offender(relay, case):
    url, r = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        bad = await DerpClient.connect(url)
        await bad.send_raw(BAD_FRAMES[case](a.public_key))
        with pytest.raises(DerpError):
            while True:
                await bad.recv(timeout=5)
        await bad.close()
        await exchange(a, b, [0, 1000, 65536])
        await wait_for(lambda: r.stats()["current_connections"] == 2)
        assert r.stats()["protocol_errors"] >= 1


async def test_unknown_frame_types_skipped(relay):
    url, _ = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        await a.send_raw(codec.frame(0x7F, os.urandom(100000)) + codec.frame(codec.KEEP_ALIVE) + codec.frame(codec.PONG, bytes(8)))
        await exchange(a, b, [5])


async def test_bad_websocket_input(relay):
    url, r = relay
    async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
        ws = await websockets.connect(url.replace("http", "ws"), subprotocols=["derp"])
        await ws.recv()
        await ws.send("text is not allowed")
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                with anyio.fail_after(5):
                    await ws.recv()
        assert info.value.rcvd is not None, "the relay closed without a WebSocket close frame"
        assert info.value.rcvd.code == 1003, info.value.rcvd  # unsupported data: DERP is binary only
        await exchange(a, b, [100])
        await wait_for(lambda: r.stats()["current_connections"] == 2)


async def test_slow_receiver_drops_oldest_and_write_timeout_sheds_it():
    async with serve_relay(queue_depth=4, write_timeout=0.5, high_water=64 * 1024) as (url, r):
        async with await DerpClient.connect(url) as sender, await DerpClient.connect(url) as other:
            stuck = await DerpClient.connect(url)
            stuck.transport.pause_reading()  # never reads: its socket buffers fill up
            for _ in range(40):
                await sender.send_many(stuck.public_key, [bytes(60000)] * 10)
            drops = r.stats()["drops"]
            assert drops["queue_head"] > 0
            await wait_for(lambda: not r.server.connections(stuck.public_key), timeout=10)
            assert r.stats()["drops"]["write_error"] >= 1
            await exchange(sender, other, [0, 1000])  # the sender's reader was never blocked
            stuck.transport.abort()


