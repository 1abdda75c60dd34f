"""``TailnetClient``: one peer of the overlay network, talking to the peer coordinator.

The client dials ``/api/v2/tailnet/coordinate`` (normally through the load balancer, so any
replica will do), sends its node and its tunnels, and keeps a view of the peers it tunnels with
(or that tunnel with it)::

    async with TailnetClient("https://coder.example.com", my_id, token) as client:
        await client.update({"key": "nodekey:...", "preferred_derp": 1})
        await client.add_tunnel(other_id)
        node = await client.wait_for_node(other_id, timeout=10)
        async for update in client.updates():
            ...

The node and tunnels are *desired state*: calls record them and send them if connected. When the
connection closes (the replica stopped or died, the load balancer dropped it, the coordinator
turned unhealthy), the client redials with jittered, bounded backoff and, on every new
connection, sends its node and every tunnel again. The coordinator answers a new tunnel with the
other end's node, so after a reconnect the caller sees ``node`` again for each peer, as with the
server's own semantics. A refusal that retrying cannot mend (HTTP 401/403, WebSocket close 1008:
bad token, bad message, a peer ID it may not claim) stops the client: :attr:`failure` says why
and waiters raise :class:`TailnetRefused`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from coordinator.cluster.tailnet import messages as m
from coordinator.cluster.tailnet.backoff import Backoff
from coordinator.cluster.tailnet.subscription import PeerUpdates
from coordinator.cluster.tailnet.view import PeerState, PeerUpdate, TailnetError, TailnetRefused, apply
from coordinator.core import urls

log = logging.getLogger("coordinator.tailnet.client")

STABLE_AFTER = 2.0  # a connection that lived this long resets the backoff
FATAL_HTTP = (401, 403)
# Going away (the replica stops), and 1012 "service restart" (what an ASGI server sends its open
# WebSockets when it shuts down): the load balancer has a survivor, redial at once.
PROMPT_REDIAL = (m.CLOSE_GOING_AWAY, 1012)


def _check_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``node`` if it is a JSON object within the size limit (ValueError, one line, if not)."""
    if not isinstance(node, Mapping):
        raise ValueError("a node must be a JSON object (a dict)")
    return m.check_node(dict(node))


def _check_peer(me: UUID, peer: UUID) -> None:
    if not isinstance(peer, UUID):
        raise ValueError(f"a peer is named by a uuid.UUID, not {type(peer).__name__}")
    if peer == me:
        raise ValueError("a peer cannot tunnel to itself")


def coordinate_url(url: str, peer_id: UUID) -> str:
    """The WebSocket URL for ``peer_id`` from an access URL (http(s)://host, or ws(s)://, with or without the path)."""
    try:
        return urls.websocket_endpoint(url, m.COORDINATE_PATH, urlencode({m.PEER_ID_PARAM: str(peer_id)}))
    except ValueError as exc:
        raise ValueError(f"coordinator URL {exc}") from None


class TailnetClient:
    """A peer's connection to the coordinator, kept up until :meth:`close` (or the ``async with`` ends)."""

    def __init__(
        self,
        url: str,
        peer_id: UUID,
        token: str,
        *,
        node: Mapping[str, Any] | None = None,
        on_update: Callable[[PeerUpdate], None] | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        ping_interval: float | None = 20.0,
    ):
        self.url = coordinate_url(url, peer_id)
        self.peer_id = peer_id
        self.node: dict[str, Any] | None = None if node is None else _check_node(node)
        self.tunnels: set[UUID] = set()
        self.peers: dict[UUID, PeerState] = {}
        self.connected = False
        self.connections = 0  # successful opens so far
        self.failed_dials = 0  # attempts that did not open (refused, timed out, HTTP error)
        self.last_error: str | None = None  # why the last connection ended or could not open
        self.failure: str | None = None  # set once refused for good: the client has stopped
        self.on_update = on_update
        self._token = token
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._ping_interval = ping_interval
        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()  # one sender at a time: a resync is never interleaved
        self._changed = asyncio.Condition()
        self._subscriptions: set[PeerUpdates] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._server_error: str | None = None  # the coordinator's `error` message on this connection
        self._close_code: int | None = None  # the close code the coordinator sent on it, if any

    # -- life ----------------------------------------------------------------------------------

    async def __aenter__(self) -> TailnetClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Begin connecting (in a task of this client's own; :meth:`close` ends it)."""
        if self._task is not None:
            raise RuntimeError("this client was already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tailnet client {self.peer_id}")

    async def close(self, *, disconnect: bool = True) -> None:
        """Stop within ``close_timeout``: say ``disconnect`` (peers see ``disconnected``) unless told not
        to (then they see ``lost``, as after a crash), close the connection, end the task."""
        if self._closing:
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
            return
        self._closing = True
        ws = self._ws
        with anyio.move_on_after(self._close_timeout, shield=True):
            if ws is not None and disconnect and ws.state is State.OPEN:
                with contextlib.suppress(ConnectionClosed):
                    async with self._send_lock:
                        await ws.send(m.encode_request(m.Disconnect()))
            if ws is not None:
                await ws.close(1000, "client closed")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if ws is not None:
            ws.transport.abort()  # whatever the close handshake did not finish
        self._set_failure_waiters()

    # -- desired state -------------------------------------------------------------------------

    async def update(self, node: Mapping[str, Any]) -> None:
        """Set this peer's node (an opaque JSON object, at most 8 KiB encoded); sent now if connected."""
        checked = _check_node(node)
        async with self._send_lock:
            self.node = checked
            await self._send(m.encode_request(m.Update(checked)))

    async def add_tunnel(self, peer: UUID) -> None:
        """Tunnel to ``peer``: both ends see each other's node and every later update."""
        _check_peer(self.peer_id, peer)
        async with self._send_lock:
            self.tunnels.add(peer)
            await self._send(m.encode_request(m.AddTunnel(peer)))

    async def remove_tunnel(self, peer: UUID) -> None:
        """Remove the tunnel to ``peer`` and forget it (it comes back if ``peer`` still tunnels to us)."""
        _check_peer(self.peer_id, peer)
        async with self._send_lock:
            self.tunnels.discard(peer)
            self.peers.pop(peer, None)
            await self._send(m.encode_request(m.RemoveTunnel(peer)))

    async def ready_for_handshake(self, peer: UUID) -> None:
        """Tell ``peer`` this end has its node and is ready for a handshake (not kept across reconnects)."""
        _check_peer(self.peer_id, peer)
        async with self._send_lock:
            await self._send(m.encode_request(m.ReadyForHandshake(peer)))

    async def _send(self, text: str) -> None:
        """Send if connected (the caller holds the send lock); a closed connection is the run loop's to mend."""
        ws = self._ws
        if ws is None or not self.connected:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    # -- what the client learns ----------------------------------------------------------------

    def updates(self, limit: int = 4096) -> PeerUpdates:
        """An async iterator of every :class:`PeerUpdate` from now on, until the client closes.

        Bounded: a consumer that falls ``limit`` behind gets only the newest update per peer for
        the backlog (``PeerUpdates.coalesced`` counts what was merged away), never an unbounded queue.
        """
        sub = PeerUpdates(limit, self._subscriptions.discard)
        if self._closing or self.failure:
            sub.end(self.failure)
        self._subscriptions.add(sub)
        return sub

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "a condition") -> None:
        """Wait until ``predicate()`` holds (checked after each change); TailnetError after ``timeout`` s."""
        with anyio.move_on_after(timeout):
            async with self._changed:
                while not predicate():
                    if self.failure is not None:
                        raise TailnetRefused(self.failure)
                    if self._closing:
                        raise TailnetError("the client is closed")
                    await self._changed.wait()
                return
        raise TailnetError(f"timed out after {timeout:g} s waiting for {what}"
                           + (f" (last error: {self.last_error})" if self.last_error else ""))

    async def wait_for_node(self, peer: UUID, timeout: float, *, after_connection: int = 0) -> dict[str, Any]:
        """``peer``'s node once the coordinator has sent one (on a connection after ``after_connection``)."""

        def known() -> bool:
            state = self.peers.get(peer)
            return state is not None and state.kind == "node" and state.connection > after_connection

        await self.wait_for(known, timeout, f"the node of peer {peer}")
        node = self.peers[peer].node
        assert node is not None
        return node

    async def wait_connected(self, timeout: float, *, after_connection: int = 0) -> int:
        """Wait for a connection newer than ``after_connection``; its number."""
        await self.wait_for(lambda: self.connected and self.connections > after_connection, timeout,
                            "a connection to the coordinator")
        return self.connections

    # -- the connection loop -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                opened = time.monotonic()
                try:
                    soon = await self._connect_once()
                except Exception as exc:  # a bug or a surprise from a library: redial, never die silently
                    log.exception("peer %s: connection failed unexpectedly", self.peer_id)
                    self.last_error, soon = f"{type(exc).__name__}: {exc}", False
                if self.failure is not None or self._closing:
                    return
                if self._close_code == m.CLOSE_TRY_AGAIN:  # sent away with all its peers: never a reset
                    delay = self._backoff.later()
                else:
                    if time.monotonic() - opened >= STABLE_AFTER:
                        self._backoff.reset()
                    delay = self._backoff.soon() if soon else self._backoff.next()
                log.debug("peer %s: redialling in %.2f s (%s)", self.peer_id, delay, self.last_error)
                await asyncio.sleep(delay)
        finally:
            self.connected = False
            await self._notify_changed()

    async def _connect_once(self) -> bool:
        """One connection, from dial to close; True if the server asked for a prompt redial."""
        self._close_code = None
        try:
            with anyio.fail_after(self._connect_timeout):
                ws = await connect(self.url, additional_headers={"Authorization": f"Bearer {self._token}"},
                                   max_size=m.MAX_MESSAGE_BYTES, ping_interval=self._ping_interval,
                                   close_timeout=self._close_timeout, open_timeout=None)
        except InvalidStatus as exc:
            self.failed_dials += 1
            status = exc.response.status_code
            reason = exc.response.body.decode("utf-8", "replace").strip()[:200] if exc.response.body else ""
            self.last_error = f"HTTP {status}" + (f": {reason}" if reason else "")
            if status in FATAL_HTTP:
                await self._refused(self.last_error)
            return False
        except InvalidURI as exc:
            await self._refused(str(exc))
            return False
        except (OSError, TimeoutError, InvalidHandshake, asyncio.IncompleteReadError) as exc:
            self.failed_dials += 1
            self.last_error = f"cannot connect: {type(exc).__name__}: {exc}".rstrip(": ")
            return False
        self._ws = ws
        self._server_error = None
        try:
            async with self._send_lock:  # nothing else is sent until the full state is
                if self._closing:
                    return False
                self.connected = True
                self.connections += 1
                with contextlib.suppress(ConnectionClosed):  # what it said before closing is read below
                    await self._resend_state(ws)
            await self._notify_changed()
            await self._read(ws)
        except ConnectionClosed:
            pass
        finally:
            self.connected = False
            self._ws = None
            if not self._closing:
                await ws.close()
        return self._closed(ws)

    async def _resend_state(self, ws: ClientConnection) -> None:
        """The node, then every tunnel: the coordinator answers each tunnel with the other end's node."""
        if self.node is not None:
            await ws.send(m.encode_request(m.Update(self.node)))
        for peer in sorted(self.tunnels):
            await ws.send(m.encode_request(m.AddTunnel(peer)))

    async def _read(self, ws: ClientConnection) -> None:
        connection = self.connections
        async for raw in ws:
            try:
                msg = m.parse_response(raw)
            except m.ProtocolError as exc:  # a newer server's message, or a broken one: not fatal here
                log.warning("peer %s: ignoring a message from the coordinator: %s", self.peer_id, exc)
                continue
            if isinstance(msg, m.Error):
                self._server_error = msg.message
                continue
            self._apply(PeerUpdate(msg.peer, msg.kind, msg.node, time.monotonic(), connection))
            await self._notify_changed()

    def _apply(self, update: PeerUpdate) -> None:
        state = apply(self.peers.get(update.peer), update)
        if state is not None:
            self.peers[update.peer] = state
        for sub in list(self._subscriptions):
            sub.put(update)
        if self.on_update is not None:
            try:
                self.on_update(update)
            except Exception:  # the caller's bug must not take the connection down
                log.exception("peer %s: on_update callback failed", self.peer_id)

    def _closed(self, ws: ClientConnection) -> bool:
        """Judge how the connection ended: record why; refuse for good on 1008; True for a prompt redial."""
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            self.last_error = "connection lost" + (f" after the coordinator's error: {self._server_error}"
                                                   if self._server_error else "")
            return False
        self._close_code = rcvd.code
        said = self._server_error or rcvd.reason
        reason = f"closed by the coordinator ({rcvd.code}{': ' + said if said else ''})"
        self.last_error = reason
        if rcvd.code == m.CLOSE_POLICY:
            self.failure = reason
            self._set_failure_waiters()
            return False
        return bool(rcvd.code in PROMPT_REDIAL)  # the replica is going away: the load balancer has a survivor for us

    async def _refused(self, why: str) -> None:
        self.failure = why
        log.warning("peer %s: the coordinator refused it: %s", self.peer_id, why)
        self._set_failure_waiters()
        await self._notify_changed()

    def _set_failure_waiters(self) -> None:
        for sub in list(self._subscriptions):
            sub.end(self.failure)

    async def _notify_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

