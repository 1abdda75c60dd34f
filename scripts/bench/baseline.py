"""The baseline: a minimal pure-Python asyncio DERP relay, measured in the same run as ours.

Per frame it parses the header, looks the destination up in a dict and ``transport.write``s the
rewritten frame; same event loop as ours; frames for a destination whose transport pushes back are
dropped. Raw upgrade and the NaCl handshake (``coordinator.relay.handshake``), ``GET /bench/stats`` for
its counters. Run as ``python -m bench baseline [--loop uvloop|asyncio]``.
"""

from __future__ import annotations

import asyncio
import json
import signal

from _relay.codec import (
    CLIENT_INFO,
    KEY_LEN,
    MAGIC,
    PING,
    PONG,
    PROTOCOL_VERSION,
    RECV_PACKET,
    SEND_PACKET,
    SERVER_INFO,
    SERVER_KEY,
)
from bench import proc
from bench.clients import HDR


def serve_baseline(loop_name: str) -> None:
    """A minimal pure-Python DERP relay: raw upgrade, NaCl handshake, per-frame dict routing."""
    from coordinator.core.keys import NodeKey
    from coordinator.relay.handshake import ServerHandshake

    key = NodeKey.generate()
    handshake = ServerHandshake(key)
    server_key_frame = HDR.pack(SERVER_KEY, len(MAGIC) + KEY_LEN) + MAGIC + key.public
    upgrade = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
               b"Derp-Version: %d\r\nDerp-Public-Key: " % PROTOCOL_VERSION + key.public.hex().encode() + b"\r\n\r\n")
    routes: dict[bytes, Conn] = {}
    conns: set[Conn] = set()
    counters = {"packets_in": 0, "packets_out": 0, "drops": {"unknown_dest": 0, "queue_full": 0}}
    pack = HDR.pack
    unpack_from = HDR.unpack_from

    class Conn(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = bytearray()
            self.state = 0  # 0 HTTP, 1 handshake, 2 active
            self.key = b""
            self.paused = False
            transport.set_write_buffer_limits(high=256 * 1024)
            conns.add(self)

        def connection_lost(self, exc):
            conns.discard(self)
            if self.key and routes.get(self.key) is self:
                del routes[self.key]

        def pause_writing(self):
            self.paused = True

        def resume_writing(self):
            self.paused = False

        def http(self) -> bool:
            buf = self.buf
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > 16384:
                    self.transport.close()
                return False
            head = bytes(buf[:i]).lower()
            del buf[: i + 4]
            if head.startswith(b"get /bench/stats"):
                body = json.dumps(counters).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                self.transport.close()
                return False
            if b"\r\nupgrade: derp" not in head:
                self.transport.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()
                return False
            self.transport.write(upgrade + server_key_frame)
            self.state = 1
            return True

        def data_received(self, data):
            buf = self.buf
            buf += data
            if self.state == 0 and not self.http():
                return
            pos, n = 0, len(buf)
            while n - pos >= 5:
                ftype, length = unpack_from(buf, pos)
                end = pos + 5 + length
                if end > n:
                    break
                if ftype == SEND_PACKET and self.state == 2:
                    counters["packets_in"] += 1
                    target = routes.get(bytes(buf[pos + 5 : pos + 5 + KEY_LEN]))
                    if target is None:
                        counters["drops"]["unknown_dest"] += 1
                    elif target.paused:
                        counters["drops"]["queue_full"] += 1
                    else:
                        target.transport.write(pack(RECV_PACKET, length) + self.key + buf[pos + 5 + KEY_LEN : end])
                        counters["packets_out"] += 1
                elif ftype == CLIENT_INFO and self.state == 1:
                    try:
                        client_key, _info, _mesh, server_info = handshake(bytes(buf[pos + 5 : end]))
                    except ValueError:
                        self.transport.abort()
                        return
                    self.key = client_key
                    self.transport.write(pack(SERVER_INFO, len(server_info)) + server_info)
                    routes[client_key] = self
                    self.state = 2
                elif ftype == PING and self.state == 2:
                    self.transport.write(pack(PONG, 8) + buf[pos + 5 : pos + 13])
                pos = end
            del buf[:pos]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = proc.listening_socket()
        server = await loop.create_server(Conn, sock=sock, backlog=4096)
        print(f"READY {sock.getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        for c in list(conns):
            c.transport.abort()

    proc.run(main(), loop_name)
