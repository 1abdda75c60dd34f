"""uvicorn protocol that hands ``/derp`` upgrades to the Cython relay, and keeps every client within budget.

Use it as ``uvicorn coordinator.app:app --http coordinator.edge:DerpHttpProtocol``. Requests
other than a DERP upgrade go to the ASGI app unchanged. After the upgrade the socket belongs to
the relay's protocol, so no ASGI machinery sits on the packet path.

Before that, on every path, the listener's :class:`~coordinator.edge.frontdoor.FrontDoor` applies: a
connection over the cap or the accept rate gets 503 at once; a request head larger than the limit
gets 431, a request (head and body) not complete within the header timeout 408 (a connection that
sends nothing too);
an upgrade pipelined behind requests still being answered gets 400. Each closes the connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import socket
import weakref

import httptools
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from coordinator.edge.frontdoor import FrontDoor

log = logging.getLogger("coordinator.http")

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# What a listener's connections share, kept by the listener's uvicorn Config (one per listener).
_front_doors: weakref.WeakKeyDictionary[Config, FrontDoor] = weakref.WeakKeyDictionary()
_trusted_hosts: weakref.WeakKeyDictionary[Config, _TrustedHosts] = weakref.WeakKeyDictionary()


def find_state(app, name: str):
    """``app.state.<name>`` of the app, looking through uvicorn's middleware wrappers; None if absent."""
    for _ in range(16):
        if app is None:
            return None
        state = getattr(app, "state", None)
        value = getattr(state, name, None) if state is not None else None
        if value is not None:
            return value
        app = getattr(app, "app", None)
    return None


def find_relay(app):
    """The DerpRelay of the app, looking through uvicorn's middleware wrappers."""
    return find_state(app, "derp_relay")


def front_door(protocol: HttpToolsProtocol) -> FrontDoor:
    """The listener's FrontDoor (``app.state.front_door``, else one with default limits), kept by its config."""
    door = _front_doors.get(protocol.config)
    if door is None:
        door = _front_doors[protocol.config] = find_state(protocol.app, "front_door") or FrontDoor()
    return door


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
    trusted = _trusted_hosts.get(config)
    if trusted is None:
        trusted = _trusted_hosts[config] = _TrustedHosts(config.forwarded_allow_ips)
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
    """uvicorn's httptools protocol, plus the DERP upgrade on ``/derp`` and the front door's limits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._derp_kind: str | None = None
        self.door = front_door(self)
        self._head_bytes: int | None = 0  # of the request head being read; None while a body is (or nothing is)
        self._head_timer = None
        self._upgrade_refused = False
        self._turned_away = False
        ssl_context = getattr(self.config, "ssl", None)
        if ssl_context is not None:
            # HTTP/2 cannot carry the Upgrade; DERP listeners offer http/1.1 only.
            ssl_context.set_alpn_protocols(["http/1.1"])

    # -- connection budget and header timeout ---------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        relay = find_relay(self.app)
        refused = self.door.admit(len(self.connections) - 1 + (relay.server.open_conns if relay is not None else 0))
        if refused is not None:
            self._turned_away = True
            self._plain_response(b"503 Service Unavailable", refused, b"retry-after: 1\r\n")
            return
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._end_request()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.door.limits.header_timeout, self._head_timed_out)

    def _end_head(self) -> None:
        """The request head is complete: return its bytes to the listener's budget."""
        if self._head_bytes:
            self.door.head_bytes -= self._head_bytes
        self._head_bytes = None

    def _end_request(self) -> None:
        """The request arrived whole (or the connection is gone or upgraded): stop its timer too."""
        self._end_head()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        # Head and body: a body trickling in would otherwise hold the connection forever, since
        # every byte cancels uvicorn's keep-alive timer.
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.door.count("head_timeout")
        if self._head_bytes is None and self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # its response is out already: a 408 would answer nothing
        else:
            self._refuse(b"408 Request Timeout", f"request not complete within {self.door.limits.header_timeout:g} s")

    def _refuse(self, status: bytes, text: str) -> None:
        """Answer ``status`` and close, unless an earlier response is still being written: then only close."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
        else:
            self._plain_response(status, text)

    # -- parsing ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_bytes is None:
            self._head_bytes = 0
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._end_head()
        self._derp_kind = None
        if self.parser.should_upgrade():
            if self.cycle is not None and not self.cycle.response_complete:
                # Upgrading now would hand the earlier request's response to the relay's stream.
                self._upgrade_refused = True
                self.door.count("pipelined_upgrade_refused")
                return
            if httptools.parse_url(self.url).path == b"/derp":
                self._derp_kind = upgrade_kind(self.headers)
                if self._derp_kind is not None:
                    self.scope["method"] = self.parser.get_method().decode("ascii")
                    return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._upgrade_refused:  # the refused request's bytes are not the earlier request's body
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._upgrade_refused:
            self._end_request()
            super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._upgrade_refused and not self.pipeline:
            self.server_state.total_requests += 1
            self._plain_response(b"400 Bad Request", "an upgrade must not be pipelined behind other requests")
            return
        super().on_response_complete()

    def _should_upgrade(self) -> bool:
        return self._derp_kind is not None or super()._should_upgrade()

    # A copy of uvicorn's HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py, same
    # steps from 0.45 to 0.54) with one branch added: a DERP upgrade hands the socket and the bytes
    # after the request head to the relay. uvicorn has no hook for that, so the method is repeated;
    # tests/test_uvicorn_contract.py fails, naming the step, if uvicorn's own version changes shape.
    def data_received(self, data: bytes) -> None:
        if self._turned_away or self._upgrade_refused or self.parser is None:
            return
        self._unset_keepalive_if_required()
        limits = self.door.limits
        while data:
            if self._head_bytes is None:
                piece, data = data, b""
            else:
                # Feed a head at most up to its limit, so a head that never ends is never buffered.
                room = limits.max_request_head - self._head_bytes
                if room <= 0:
                    self.door.count("head_too_large")
                    self._refuse(b"431 Request Header Fields Too Large",
                                 f"request head larger than {limits.max_request_head} bytes")
                    return
                if len(data) > room:
                    piece, data = data[:room], data[room:]
                else:
                    piece, data = data, b""
                if self.door.head_bytes + len(piece) > limits.head_memory:
                    self.door.count("head_memory_full")
                    self._refuse(b"503 Service Unavailable", "too many unfinished requests")
                    return
                self._head_bytes += len(piece)
                self.door.head_bytes += len(piece)
            if not self._feed(piece, data):
                return

    def _feed(self, piece: bytes, rest: bytes) -> bool:
        """Parse ``piece``; False once the connection is refused, closed or upgraded (``rest`` then went with it)."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade_refused:
                return False
            self._end_request()  # the connection is someone else's now, or its request is being answered
            if self._derp_kind is not None:
                self._hand_over((piece[exc.args[0] :] if exc.args else b"") + rest)
            elif super()._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return self.parser is not None and not self.transport.is_closing() and not self._upgrade_refused

    def _plain_response(self, status: bytes, text: str, extra_headers: bytes = b"") -> None:
        self._end_request()
        body = text.encode()
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n" + extra_headers +
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        self.transport.close()

    def _hand_over(self, pending: bytes) -> None:
        off = find_state(self.app, "derp_off")  # the embedded relay is off: say so, and why
        if off is not None:
            self._plain_response(b"404 Not Found", off + "\n")
            return
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
        self._end_request()
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
