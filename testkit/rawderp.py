"""A hostile peer's toolkit: raw sockets, hand-built HTTP, DERP frames and WebSocket frames.

Deliberately independent of ``coordinator.relay.client``: the front-door tests (tests/test_frontdoor.py)
and ``fuzz_relay.py`` attack a replica with bytes they build themselves, so a bug shared by our
client and our server cannot hide itself. Only PyNaCl is used, for the ClientInfo box.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct

import anyio
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = "DERP🔑".encode()
SERVER_KEY, CLIENT_INFO, SERVER_INFO, SEND_PACKET, RECV_PACKET = 0x01, 0x02, 0x03, 0x04, 0x05
KEEP_ALIVE, NOTE_PREFERRED, PEER_GONE, PEER_PRESENT, FORWARD_PACKET = 0x06, 0x07, 0x08, 0x09, 0x0A
WATCH_CONNS, CLOSE_PEER, PING, PONG = 0x10, 0x11, 0x12, 0x13
WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", ftype, len(payload)) + payload


def upgrade_request(host: str, *, websocket: bool = False, path: str = "/derp", fast_start: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: Upgrade"]
    if websocket:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += ["Upgrade: websocket", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Key: {key}",
                  "Sec-WebSocket-Protocol: derp"]
    else:
        lines.append("Upgrade: DERP")
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """A client WebSocket frame (masked unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n <= 0xFFFF:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def client_info(private: PrivateKey, server_public: bytes, info: dict) -> bytes:
    """The ClientInfo frame: our public key, then the sealed JSON."""
    sealed = Box(private, PublicKey(server_public)).encrypt(json.dumps(info).encode(), os.urandom(24))
    return frame(CLIENT_INFO, bytes(private.public_key) + bytes(sealed))


class RawPeer:
    """One TCP connection to a replica, driven byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.private = PrivateKey.generate()
        self.server_public = b""
        self.websocket = False

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawPeer:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    @property
    def public(self) -> bytes:
        return bytes(self.private.public_key)

    @property
    def is_open(self) -> bool:
        """False once the replica has closed or reset the connection (writes would go nowhere)."""
        return not self.writer.transport.is_closing()

    async def send(self, data: bytes) -> None:
        if not self.is_open:
            raise ConnectionResetError("the replica closed the connection")
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self, timeout: float = 10.0) -> bytes:
        """The HTTP response head (through the blank line)."""
        with anyio.fail_after(timeout):
            return await self.reader.readuntil(b"\r\n\r\n")

    async def read_all(self, timeout: float = 10.0) -> bytes:
        """Everything until the replica closes the connection."""
        with anyio.fail_after(timeout):
            return await self.reader.read(-1)

    async def upgrade(self, port: int, *, websocket: bool = False) -> bytes:
        """Upgrade to DERP and return the server's key (the ServerKey frame)."""
        self.websocket = websocket
        await self.send(upgrade_request(f"127.0.0.1:{port}", websocket=websocket))
        head = await self.read_head()
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"upgrade refused: {head[:200]!r}")
        ftype, payload = await self.read_frame()
        if ftype != SERVER_KEY or payload[: len(MAGIC)] != MAGIC:
            raise ConnectionError(f"expected ServerKey, got 0x{ftype:02x}")
        self.server_public = payload[len(MAGIC) : len(MAGIC) + 32]
        return self.server_public

    async def handshake(self, port: int, *, websocket: bool = False, mesh_key: str | None = None) -> None:
        await self.upgrade(port, websocket=websocket)
        info = {"version": 2, "CanAckPings": True, **({"meshKey": mesh_key} if mesh_key else {})}
        await self.send_derp(client_info(self.private, self.server_public, info))
        ftype, _ = await self.read_frame()
        if ftype != SERVER_INFO:
            raise ConnectionError(f"expected ServerInfo, got 0x{ftype:02x}")

    async def send_derp(self, data: bytes) -> None:
        """DERP stream bytes, wrapped in one binary WebSocket message on a WebSocket connection."""
        await self.send(ws_frame(WS_BINARY, data) if self.websocket else data)

    async def read_ws(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """One server WebSocket frame: (opcode, payload)."""
        with anyio.fail_after(timeout):
            head = await self.reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await self.reader.readexactly(8))[0]
        with anyio.fail_after(timeout):
            return head[0] & 0x0F, await self.reader.readexactly(n)

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """One DERP frame (on WebSocket: assumes each server message holds whole frames, as ours do)."""
        if self.websocket:
            if not hasattr(self, "_ws_buf"):
                self._ws_buf = b""
            while len(self._ws_buf) < 5 or len(self._ws_buf) < 5 + struct.unpack(">I", self._ws_buf[1:5])[0]:
                opcode, payload = await self.read_ws(timeout)
                if opcode == WS_BINARY:
                    self._ws_buf += payload
            ftype, n = struct.unpack(">BI", self._ws_buf[:5])
            payload, self._ws_buf = self._ws_buf[5 : 5 + n], self._ws_buf[5 + n :]
            return ftype, payload
        with anyio.fail_after(timeout):
            ftype, n = struct.unpack(">BI", await self.reader.readexactly(5))
        with anyio.fail_after(timeout):
            return ftype, await self.reader.readexactly(n)

    async def closed_within(self, timeout: float) -> bool:
        """True once the replica ends the connection (EOF or reset), False if it is still open after ``timeout``."""
        try:
            while True:
                with anyio.fail_after(timeout):
                    if not await self.reader.read(65536):
                        break
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            pass
        return True

    def close(self) -> None:
        self.writer.transport.abort()
