"""uvicorn protocol that hands ``/derp`` upgrades to the Cython relay.

Use it as ``uvicorn coordinator.app:app --http coordinator.http:DerpHttpProtocol``. Requests
other than a DERP upgrade go to the ASGI app unchanged. After the upgrade the socket belongs to
the relay's protocol, so no ASGI machinery sits on the packet path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import socket

import httptools
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("coordinator.http")

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def find_relay(app):
    """The DerpRelay of the app, looking through uvicorn's middleware wrappers."""
    for _ in range(16):
        if app is None:
            return None
        state = getattr(app, "state", None)
        relay = getattr(state, "derp_relay", None) if state is not None else None
        if relay is not None:
            return relay
        app = getattr(app, "app", None)
    return None


def upgrade_kind(headers: list[tuple[bytes, bytes]]) -> str | None:
    """'raw' or 'websocket' for a DERP upgrade request, None otherwise."""
    upgrade = b""
    protocols: list[bytes] = []
    for name, value in headers:
        if name == b"upgrade":
            upgrade = value.strip().lower()
        elif name == b"sec-websocket-protocol":
            protocols += [p.strip().lower() for p in value.split(b",")]
    if upgrade == b"derp":
        return "raw"
    if upgrade == b"websocket":
        # Legacy clients send "Upgrade: WebSocket" but speak raw DERP; only the subprotocol tells.
        return "websocket" if b"derp" in protocols else "raw"
    return None


def websocket_accept(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The 101 response for a WebSocket upgrade with subprotocol derp, or None if the request is bad."""
    h = {name: value for name, value in headers}
    key = h.get(b"sec-websocket-key", b"").strip()
    if h.get(b"sec-websocket-version", b"").strip() != b"13" or len(key) != 24:
        return None
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n\r\n"
    )


def client_address(protocol: HttpToolsProtocol, headers: dict[bytes, bytes]) -> tuple[str, int] | None:
    """The client's address: the socket peer, or X-Forwarded-For when the peer is a trusted proxy."""
    peer = protocol.client
    config = protocol.config
    forwarded = headers.get(b"x-forwarded-for")
    if not (config.proxy_headers and forwarded and peer):
        return peer
    trusted = getattr(config, "_derp_trusted_hosts", None)
    if trusted is None:
        trusted = config._derp_trusted_hosts = _TrustedHosts(config.forwarded_allow_ips)
    if peer[0] not in trusted:
        return peer
    host, port = trusted.get_trusted_client_address(forwarded.decode("latin-1"))
    return (host, port) if host else peer


def tune_socket(transport) -> None:
    """derper's TCP timers: unacknowledged data fails the connection after 15 s; keepalive after 10 min."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 600)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 15000)


class DerpHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the DERP upgrade on ``/derp``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._derp_kind: str | None = None
        ssl_context = getattr(self.config, "ssl", None)
        if ssl_context is not None:
            # HTTP/2 cannot carry the Upgrade; DERP listeners offer http/1.1 only.
            ssl_context.set_alpn_protocols(["http/1.1"])

    def on_headers_complete(self) -> None:
        self._derp_kind = None
        if self.parser.should_upgrade() and httptools.parse_url(self.url).path == b"/derp":
            self._derp_kind = upgrade_kind(self.headers)
            if self._derp_kind is not None:
                self.scope["method"] = self.parser.get_method().decode("ascii")
                return
        super().on_headers_complete()

    def _should_upgrade(self) -> bool:
        return self._derp_kind is not None or super()._should_upgrade()

    # A copy of uvicorn's HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py, same
    # steps from 0.45 to 0.54) with one branch added: a DERP upgrade hands the socket and the bytes
    # after the request head to the relay. uvicorn has no hook for that, so the method is repeated;
    # tests/test_uvicorn_contract.py fails, naming the step, if uvicorn's own version changes shape.
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade as exc:
            if self._derp_kind is not None:
                self._hand_over(data[exc.args[0] :] if exc.args else b"")
            elif super()._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _plain_response(self, status: bytes, text: str) -> None:
        body = text.encode()
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        self.transport.close()

    def _hand_over(self, pending: bytes) -> None:
        relay = find_relay(self.app)
        if relay is None:
            self._plain_response(b"503 Service Unavailable", "DERP relay is not running")
            return
        headers = {name: value for name, value in self.headers}
        websocket = self._derp_kind == "websocket"
        if websocket:
            prefix = websocket_accept(self.headers)
            if prefix is None:
                self._plain_response(b"400 Bad Request", "bad WebSocket upgrade (needs Sec-WebSocket-Key, version 13)")
                return
        elif headers.get(b"derp-fast-start", b"").strip() == b"1":
            prefix = b""  # fast start: the client already knows our key; no HTTP response at all
        else:
            prefix = relay.upgrade_response()
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        tune_socket(self.transport)
        relay.accept(
            self.transport,
            prefix,
            pending,
            websocket=websocket,
            remote=client_address(self, headers),
            not_ideal=bool(headers.get(b"ideal-node", b"").strip()),
        )
        self.parser = None  # type: ignore[assignment]
