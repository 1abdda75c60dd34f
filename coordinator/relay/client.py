"""An asyncio DERP client: raw ``Upgrade: DERP`` or WebSocket, over http:// or https:// URLs.

Used by the mesh, the latency probe, the benchmarks and the tests::

    client = await DerpClient.connect("http://127.0.0.1:3000/derp")
    await client.send(peer_public_key, b"hello")
    frame = await client.recv()        # RecvPacket(src=..., data=b"...")

Timeouts are anyio scopes, never ``asyncio.wait_for``: on Python 3.11 that swallows a cancellation
arriving in the loop turn its read completes (a peer closing as we stop), and the cancelled task
then runs on, e.g. a stopping replica's mesh link redialling for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio

from _relay import codec
from coordinator.core.keys import NodeKey
from coordinator.core.urls import endpoint, websocket_url
from coordinator.relay.handshake import client_info_payload, open_server_info, parse_server_key
from coordinator.relay.httpclient import ssl_context

if TYPE_CHECKING:  # websockets is imported when a WebSocket connection is made
    from websockets.asyncio.client import ClientConnection


class DerpError(Exception):
    """The DERP connection failed or the server broke the protocol."""


class DerpRefused(DerpError):
    """The server closed the connection during the handshake (bad key, wrong mesh key, ...)."""


# -- frames as the client sees them ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerInfo:
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class PeerGone:
    key: bytes
    reason: int


@dataclass(frozen=True, slots=True)
class PeerPresent:
    key: bytes
    ip: str | None = None
    port: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    type: int
    payload: bytes


Frame: TypeAlias = (
    ServerInfo | RecvPacket | KeepAlive | PeerGone | PeerPresent | Ping | Pong | Health | Restarting | UnknownFrame
)


def parse_frame(ftype: int, payload: bytes) -> Frame:
    """Decode one server-to-client frame; short frames of known types raise DerpError."""
    try:
        if ftype == codec.RECV_PACKET:
            if len(payload) < codec.KEY_LEN:
                raise DerpError("short RecvPacket")
            return RecvPacket(payload[: codec.KEY_LEN], payload[codec.KEY_LEN :])
        if ftype == codec.KEEP_ALIVE:
            return KeepAlive()
        if ftype == codec.PEER_GONE:
            if len(payload) < codec.KEY_LEN:
                raise DerpError("short PeerGone")
            reason = payload[codec.KEY_LEN] if len(payload) > codec.KEY_LEN else codec.PEER_GONE_DISCONNECTED
            return PeerGone(payload[: codec.KEY_LEN], reason)
        if ftype == codec.PEER_PRESENT:
            if len(payload) < codec.KEY_LEN:
                raise DerpError("short PeerPresent")
            ip, port, flags = None, 0, 0
            if len(payload) >= codec.KEY_LEN + 18:
                addr = ipaddress.IPv6Address(payload[32:48])
                ip = str(addr.ipv4_mapped or addr)
                port = int.from_bytes(payload[48:50], "big")
            if len(payload) >= codec.KEY_LEN + 19:
                flags = payload[50]
            return PeerPresent(payload[: codec.KEY_LEN], ip, port, flags)
        if ftype == codec.PING:
            return Ping(payload[:8])
        if ftype == codec.PONG:
            return Pong(payload[:8])
        if ftype == codec.HEALTH:
            return Health(payload.decode("utf-8", "replace"))
        if ftype == codec.RESTARTING:
            if len(payload) < 8:
                raise DerpError("short Restarting")
            return Restarting(int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big"))
    except ValueError as exc:
        raise DerpError(f"malformed {codec.FRAME_NAMES.get(ftype, ftype)} frame: {exc}") from None
    return UnknownFrame(ftype, payload)


# -- transports ----------------------------------------------------------------------------


class _RawStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @property
    def transport(self) -> asyncio.Transport:
        return self.writer.transport  # type: ignore[return-value]

    async def read(self) -> bytes:
        return await self.reader.read(1 << 18)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception), anyio.move_on_after(2):
            await self.writer.wait_closed()


class _WebSocketStream:
    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    async def read(self) -> bytes:
        import websockets

        try:
            msg = await self.ws.recv()
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 1008:  # policy: e.g. refused by admission control
                raise DerpRefused(f"WebSocket closed by the server: {exc.rcvd.reason}") from None
            return b""
        if isinstance(msg, str):
            raise DerpError("server sent a text WebSocket message")
        return msg

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    async def drain(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            await self.ws.send(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception), anyio.move_on_after(2):
            await self.ws.close()


async def _open_raw(url: str, *, timeout: float, insecure: bool, headers: dict[str, str] | None,
                    fast_start: bool = False) -> tuple[_RawStream, dict[str, str]]:
    where = endpoint(url)
    ctx = ssl_context(insecure) if where.tls else None
    with anyio.fail_after(timeout):
        reader, writer = await asyncio.open_connection(
            where.host, where.port, ssl=ctx, server_hostname=where.host if ctx else None, limit=1 << 20
        )
    lines = [
        f"GET {where.path or '/derp'} HTTP/1.1",
        f"Host: {where.netloc}",
        "User-Agent: coordinator-derp-client",
        "Connection: Upgrade",
        "Upgrade: DERP",
    ]
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    stream = _RawStream(reader, writer)
    if fast_start:
        return stream, {}
    try:
        with anyio.fail_after(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        await stream.close()
        raise DerpError(f"{url}: no HTTP response to the DERP upgrade") from exc
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    resp_headers = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            resp_headers[k.strip().lower()] = v.strip()
    if len(fields) < 2 or fields[1] != "101":
        body = b""
        with contextlib.suppress(Exception), anyio.move_on_after(1):
            body = await reader.read(512)
        await stream.close()
        raise DerpError(f"{url}: upgrade refused: {status_line} {body.decode('utf-8', 'replace').strip()}".strip())
    return stream, resp_headers


async def _open_websocket(
    url: str, *, timeout: float, insecure: bool, headers: dict[str, str] | None
) -> _WebSocketStream:
    import websockets
    from websockets.typing import Subprotocol

    ctx = ssl_context(insecure) if endpoint(url).tls else None
    try:
        ws = await websockets.connect(
            websocket_url(url), subprotocols=[Subprotocol("derp")], compression=None, max_size=None, ssl=ctx,
            open_timeout=timeout, ping_interval=None, additional_headers=headers or None,
        )
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        raise DerpError(f"{url}: WebSocket upgrade failed: {exc}") from exc
    if ws.subprotocol != "derp":
        await ws.close(1008)
        raise DerpError(f"{url}: server did not accept the derp subprotocol")
    return _WebSocketStream(ws)


# -- the client ------------------------------------------------------------------------------


class DerpClient:
    """One DERP connection. Not safe for concurrent ``recv`` calls from several tasks."""

    def __init__(self, stream: _RawStream | _WebSocketStream, key: NodeKey, server_key: bytes, url: str):
        self._stream = stream
        self.key = key
        self.server_key = server_key
        self.url = url
        self.server_info: dict[str, Any] | None = None
        self.response_headers: dict[str, str] = {}
        self._reader = codec.FrameReader()
        self._backlog: deque[tuple[int, bytes]] = deque()
        self._held: deque[tuple[int, bytes]] = deque()  # frames a ping read on behalf of recv
        self._read_lock = asyncio.Lock()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._receivers = 0  # recv calls in progress: ping then leaves the reading to them
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        key: NodeKey | None = None,
        *,
        mesh_key: str | None = None,
        websocket: bool = False,
        timeout: float = 10.0,
        insecure: bool = False,
        headers: dict[str, str] | None = None,
        info: dict[str, Any] | None = None,
        wait_server_info: bool = True,
    ) -> DerpClient:
        """Dial ``url`` (``http(s)://host[:port]/derp``) and complete the DERP handshake."""
        key = key or NodeKey.generate()
        stream: _RawStream | _WebSocketStream
        resp_headers: dict[str, str]
        try:
            if websocket:
                stream, resp_headers = await _open_websocket(url, timeout=timeout, insecure=insecure, headers=headers), {}
            else:
                stream, resp_headers = await _open_raw(url, timeout=timeout, insecure=insecure, headers=headers)
        except (TimeoutError, OSError, ValueError) as exc:
            raise DerpError(f"{url}: cannot connect: {exc or type(exc).__name__}") from exc
        self = cls(stream, key, b"", url)
        self.response_headers = resp_headers
        try:
            with anyio.fail_after(timeout):
                await self._handshake(mesh_key, info, wait_server_info)
        except BaseException:
            await self.close()
            raise
        return self

    async def _handshake(self, mesh_key: str | None, info: dict[str, Any] | None, wait_server_info: bool) -> None:
        ftype, payload = await self._read_frame()
        if ftype != codec.SERVER_KEY or not 40 <= len(payload) <= 1024:
            raise DerpError(f"{self.url}: expected ServerKey, got frame type 0x{ftype:02x} ({len(payload)} bytes)")
        self.server_key = parse_server_key(payload)
        client_info: dict[str, Any] = {}
        if mesh_key:
            client_info["meshKey"] = mesh_key
        client_info.update({"version": codec.PROTOCOL_VERSION, "CanAckPings": True})
        client_info.update(info or {})
        self._stream.write(codec.frame(codec.CLIENT_INFO, client_info_payload(self.key, self.server_key, client_info)))
        await self._stream.drain()
        if wait_server_info:
            ftype, payload = await self._read_frame()
            if ftype == codec.HEALTH:  # why the server is about to close (e.g. admission refused)
                raise DerpRefused(f"{self.url}: {payload.decode(errors='replace')}")
            if ftype != codec.SERVER_INFO:
                raise DerpError(f"{self.url}: expected ServerInfo, got frame type 0x{ftype:02x}")
            self.server_info = open_server_info(self.key, self.server_key, payload)

    async def _read_frame(self) -> tuple[int, bytes]:
        """The next raw frame; raises DerpRefused/DerpError when the stream ends."""
        while not self._backlog:
            try:
                data = await self._stream.read()
            except OSError as exc:
                raise DerpError(f"{self.url}: connection lost: {exc}") from exc
            if not data:
                if self.server_info is None:
                    raise DerpRefused(f"{self.url}: server closed the connection during the handshake")
                raise DerpError(f"{self.url}: connection closed by server")
            try:
                self._backlog.extend(self._reader.feed(data))
            except codec.FrameError as exc:
                raise DerpError(f"{self.url}: {exc}") from None
        return self._backlog.popleft()

    @property
    def transport(self) -> asyncio.Transport | None:
        """The raw transport (None for WebSocket connections), e.g. for a mesh Forwarder."""
        return self._stream.transport

    @property
    def public_key(self) -> bytes:
        return self.key.public

    # -- receiving ---------------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Frame:
        """The next frame from the server, decoded (RecvPacket, PeerGone, KeepAlive, ...)."""
        self._receivers += 1
        try:
            return await self._recv(timeout)
        finally:
            self._receivers -= 1

    async def _recv(self, timeout: float | None) -> Frame:
        async with self._read_lock:
            while True:
                if self._held:
                    ftype, payload = self._held.popleft()
                else:
                    with anyio.fail_after(timeout):
                        ftype, payload = await self._read_frame()
                frame = parse_frame(ftype, payload)
                if isinstance(frame, Pong) and frame.data in self._pings:
                    fut = self._pings.pop(frame.data)
                    if not fut.done():
                        fut.set_result(time.perf_counter())
                    continue
                if isinstance(frame, Ping):
                    self._stream.write(codec.frame(codec.PONG, frame.data))
                    await self._stream.drain()
                return frame

    async def recv_packet(self, timeout: float | None = None) -> RecvPacket:
        """The next RecvPacket, skipping keepalives and other control frames."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            frame = await self.recv(left)
            if isinstance(frame, RecvPacket):
                return frame

    # -- sending -----------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until the connection's write buffer is below its low-water mark."""
        await self._stream.drain()

    async def send(self, dst: bytes, data: bytes) -> None:
        """Send one packet to the client with public key ``dst``."""
        self._stream.write(codec.send_packet(dst, data))
        await self._stream.drain()

    async def send_many(self, dst: bytes, packets: Iterable[bytes]) -> None:
        """Send several packets in one write."""
        self._stream.write(b"".join(codec.send_packet(dst, p) for p in packets))
        await self._stream.drain()

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests use this to send malformed frames)."""
        self._stream.write(data)
        await self._stream.drain()

    async def note_preferred(self, preferred: bool = True) -> None:
        await self.send_raw(codec.frame(codec.NOTE_PREFERRED, b"\x01" if preferred else b"\x00"))

    async def watch_conns(self) -> None:
        """Ask for PeerPresent/PeerGone updates (mesh key required)."""
        await self.send_raw(codec.frame(codec.WATCH_CONNS))

    async def close_peer(self, key: bytes) -> None:
        await self.send_raw(codec.frame(codec.CLOSE_PEER, key))

    async def forward(self, src: bytes, dst: bytes, data: bytes) -> None:
        """Send a ForwardPacket as a mesh peer would."""
        await self.send_raw(codec.forward_packet(src, dst, data))

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds of a DERP Ping; works alongside a task blocked in ``recv``."""
        data = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        start = time.perf_counter()
        await self.send_raw(codec.frame(codec.PING, data))
        deadline = time.monotonic() + timeout
        try:
            while not fut.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                if self._receivers or self._read_lock.locked():
                    # a recv call reads (or is about to): it resolves our future when the Pong arrives
                    await asyncio.wait({fut}, timeout=min(left, 0.05))
                    continue
                async with self._read_lock:
                    with anyio.fail_after(left):
                        ftype, payload = await self._read_frame()
                    frame = parse_frame(ftype, payload)
                    if isinstance(frame, Pong) and frame.data in self._pings:
                        self._pings.pop(frame.data).set_result(time.perf_counter())
                    else:
                        self._held.append((ftype, payload))  # recv gets it next, in order
            return fut.result() - start
        except TimeoutError:
            raise DerpError(f"{self.url}: no Pong within {timeout:.1f} s") from None
        finally:
            self._pings.pop(data, None)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.close()

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
