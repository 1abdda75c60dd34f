"""The DERP mesh: one outgoing mesh link per live peer relay, feeding forwarders into the relay.

Each link dials a peer's ``/derp`` with this replica's own server key and the shared mesh key,
sends WatchConns, and turns PeerPresent / PeerGone into forwarder entries of the Cython routing
table; packets for those keys then leave as ForwardPacket on the link without Python per packet.
When a link breaks, every forwarder learned through it is removed at once and the link redials
with backoff for as long as the peer stays in the set. Every link runs in the mesh's task group
under its own cancel scope: a peer leaving cancels its link without waiting for it (its forwarders
go before ``set_peers`` returns), and once the mesh is stopping no link dials again.

Every connected link is pinged (a DERP Ping) every ``ping_interval``: a ping left unanswered for
``ping_timeout``, with nothing else heard from the peer meanwhile, marks the link down in the replica's row and as the finding EMESH01 (a partition
leaves a TCP connection looking open for minutes), and a second one in a row closes and redials it.
Redials after a failure are short and close together (``REDIAL_TIMEOUT``, ``MAX_BACKOFF``), so a
healed partition is bridged again within about a second and a half.

A link that stops draining pushes back on the senders that route to it (the relay stops reading
them) until it drains; one that stays stuck for ``stall_timeout`` (5 s, as Go's derper) is closed
and redialled, which resumes them.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterable

import anyio
import anyio.abc

from coordinator.core.errors import describe, dial_error
from coordinator.core.health import Finding
from coordinator.core.keys import short
from coordinator.core.urls import derp_url
from coordinator.relay.client import DerpClient, DerpError, PeerGone, PeerPresent, Restarting
from coordinator.relay.dataplane import DerpRelay, Forwarder

log = logging.getLogger("coordinator.mesh")

MAX_BACKOFF = 0.5  # a healed partition must be bridged again within 2 s: retry often
REDIAL_TIMEOUT = 1.0  # a dial after a failure: one SYN, no kernel retransmission seconds later
PINGS_MISSED = 2  # unanswered pings in a row that close the link (one only marks it down)
FINDING = "EMESH01"


class SelfConnection(Exception):
    """The URL leads back to this replica's own relay."""


class MeshLink:
    """The outgoing connection to one peer relay, redialled until :meth:`cancel` (or the mesh stops).

    Runs as :meth:`run` in the mesh's task group, inside its own cancel scope; the stall watch of a
    congested link runs in the link's own task group, so nothing it starts outlives it.
    """

    def __init__(self, mesh: Mesh, url: str):
        self.mesh = mesh
        self.url = url
        self.error: str | None = None
        self.connected = False
        self.keys: set[bytes] = set()
        self.client: DerpClient | None = None
        self.is_self = False
        self.restarting: Restarting | None = None  # the peer said it is restarting (graceful stop)
        self.last_frame = 0.0  # when the peer last sent us anything (anyio clock)
        self.done = anyio.Event()
        self._scope = anyio.CancelScope()
        self._tg: anyio.abc.TaskGroup | None = None
        self._forwarder: Forwarder | None = None
        self._drain_scope: anyio.CancelScope | None = None

    async def run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await self._redial()
                    tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._drop_routes()
            self.mesh._running.discard(self)
            self.done.set()

    def cancel(self) -> None:
        """Stop the link now: its forwarders leave the routing table before this returns."""
        self._scope.cancel()
        self._drop_routes()

    async def stop(self) -> None:
        self.cancel()
        await self.done.wait()

    async def _redial(self) -> None:
        failures = 0
        last_logged: str | None = None
        while not self.mesh.stopping:
            try:
                await self._session(self.mesh.dial_timeout if failures == 0 else min(self.mesh.dial_timeout, REDIAL_TIMEOUT))
                failures = 0
            except SelfConnection:
                self.is_self = True
                log.info("mesh: %s is this replica's own relay; not meshing with it", self.url)
                return
            except (TimeoutError, DerpError, OSError) as exc:
                failures += 1
                self.error = describe(exc)
                if self.restarting is not None:
                    log.info("mesh: link to %s closed: the peer is restarting", self.url)
                    last_logged = None
                elif self.error != last_logged:  # once per change, never a log line per retry
                    log.warning("mesh: link to %s failed: %s (retrying with backoff)", self.url, self.error,
                                extra={"peer": self.url, "code": FINDING})
                    last_logged = self.error
                self.mesh.notify_error()
            finally:
                self.connected = False
            delay = min(MAX_BACKOFF, 0.05 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
            if self.restarting is not None:
                delay = max(delay, min(MAX_BACKOFF, self.restarting.reconnect_in_ms / 1000))
                self.restarting = None
            await anyio.sleep(delay)

    async def _session(self, dial_timeout: float) -> None:
        relay = self.mesh.relay
        client = await DerpClient.connect(self.url, relay.key, mesh_key=self.mesh.mesh_key(), timeout=dial_timeout)
        self.client = client
        try:
            if client.server_key == relay.public_key:
                raise SelfConnection()
            if client.transport is None:
                raise DerpError("mesh links need a raw DERP connection")
            forwarder = self._forwarder = relay.forwarder(
                client.transport, self.url, lambda fwd: self._congested(client, fwd)
            )
            await client.watch_conns()
            if self.error is not None:
                log.info("mesh: link to %s restored", self.url, extra={"peer": self.url})
            self.error = None
            self.connected = True
            self.mesh.notify_error()
            if self._tg is not None and self.mesh.ping_interval:
                self._tg.start_soon(self._watch, client, name=f"mesh-ping {self.url}")
            while True:
                frame = await client.recv(timeout=self.mesh.read_timeout)
                self.last_frame = anyio.current_time()
                if isinstance(frame, PeerPresent):
                    if frame.key != relay.public_key:
                        relay.server.add_forwarder(frame.key, forwarder)
                        self.keys.add(frame.key)
                elif isinstance(frame, PeerGone):
                    relay.server.remove_forwarder(frame.key, forwarder)
                    self.keys.discard(frame.key)
                elif isinstance(frame, Restarting):
                    self.restarting = frame
        except TimeoutError:
            raise DerpError(f"no frame from {self.url} for {self.mesh.read_timeout:.0f} s") from None
        finally:
            if self._drain_scope is not None:
                self._drain_scope.cancel()
            self._drop_routes()
            self.client = None
            await client.close()

    async def _watch(self, client: DerpClient) -> None:
        """Ping the peer over this link; report it down when it stops answering, then close it."""
        missed = 0
        while self.client is client:
            await anyio.sleep(self.mesh.ping_interval)
            if self.client is not client:
                return
            sent = anyio.current_time()
            try:
                with anyio.fail_after(self.mesh.ping_timeout + 0.5):  # the ping's write may wait on a stuck link
                    await client.ping(self.mesh.ping_timeout)
            except (DerpError, OSError, TimeoutError):
                if self.client is not client:
                    return
                if self.last_frame > sent:
                    continue  # a late pong behind a busy link: the peer is sending, so it is reachable
                missed += 1
                if missed == 1:
                    self.error = f"no answer to a mesh ping within {self.mesh.ping_timeout:g} s"
                    self.connected = False
                    log.warning("mesh: link to %s stopped answering: %s", self.url, self.error,
                                extra={"peer": self.url, "code": FINDING})
                    self.mesh.notify_error()
                # A congested link is the stall watch's to close (after stall_timeout), not ours.
                if missed >= PINGS_MISSED and client.transport is not None and self._drain_scope is None:
                    client.transport.abort()  # the session's recv fails and the link redials
                    return
                continue
            if missed:
                missed = 0
                log.info("mesh: link to %s answers again", self.url, extra={"peer": self.url})
                self.error, self.connected = None, True
                self.mesh.notify_error()

    def _drop_routes(self) -> None:
        """Take this link's forwarder and every key learned through it out of the relay (idempotent)."""
        forwarder, self._forwarder = self._forwarder, None
        if forwarder is not None:
            forwarder.close()
            for key in self.keys:
                self.mesh.relay.server.remove_forwarder(key, forwarder)
        self.keys.clear()

    def _congested(self, client: DerpClient, forwarder) -> None:
        if self._drain_scope is not None or self._tg is None:
            return
        self._drain_scope = anyio.CancelScope()
        try:
            self._tg.start_soon(self._wait_drained, client, forwarder, self._drain_scope, name=f"mesh-drain {self.url}")
        except RuntimeError:  # the link is closing; the relay's ticker resumes the senders
            self._drain_scope = None

    async def _wait_drained(self, client: DerpClient, forwarder, scope: anyio.CancelScope) -> None:
        """Resume the paused senders once the link drains; close a link that stays stuck."""
        try:
            with scope, anyio.fail_after(self.mesh.stall_timeout):
                await client.drain()
        except TimeoutError:
            log.warning("mesh: link to %s did not drain for %.0f s (%d KiB waiting); reconnecting",
                        self.url, self.mesh.stall_timeout, forwarder.unsent() // 1024)
            forwarder.close()  # its senders are read again; their packets for this peer are dropped
            if client.transport is not None:
                client.transport.abort()  # the session's recv fails, and the link redials
        except (OSError, DerpError):
            pass  # the connection is going away: the session cleans up
        finally:
            if self._drain_scope is scope:
                self._drain_scope = None
            forwarder.resume()

    async def ping(self, timeout: float = 5.0) -> float | None:
        """DERP Ping round trip over the mesh link in seconds, or None while it is down."""
        client = self.client
        if client is None or not self.connected:
            return None
        return await client.ping(timeout)


class Mesh:
    """Reconciles mesh links with the set of live peer relay URLs.

    ``async with Mesh(relay) as mesh:`` owns one task group holding every link; leaving it (or
    :meth:`close`) stops them all, and no link dials again once the mesh is stopping.
    """

    def __init__(
        self,
        relay: DerpRelay,
        *,
        mesh_key: Callable[[], str | None] | None = None,
        on_error: Callable[[str | None], None] | None = None,
        dial_timeout: float = 5.0,
        read_timeout: float = 150.0,
        stall_timeout: float = 5.0,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        self_url: str = "",
    ):
        self.relay = relay
        self.mesh_key = mesh_key or (lambda: relay.mesh_key)
        self.on_error = on_error
        self.dial_timeout = dial_timeout
        self.read_timeout = read_timeout  # keepalives arrive every 60-65 s
        self.stall_timeout = stall_timeout  # a link that takes nothing this long is redialled
        self.ping_interval = ping_interval  # 0: links are not pinged
        self.ping_timeout = ping_timeout
        self.self_url = self_url  # this replica's relay URL, to name the pair in findings
        self.links: dict[str, MeshLink] = {}
        self.stopping = False
        self._last_error: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._running: set[MeshLink] = set()  # links whose task has not ended yet (cancelled ones too)

    async def __aenter__(self) -> Mesh:
        async with contextlib.AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        self.stop()
        stack, self._stack = self._stack, None
        try:
            return await stack.__aexit__(*exc_info) if stack is not None else None
        finally:
            self._tg = None

    async def set_peers(self, urls: Iterable[str]) -> None:
        """Dial every URL not yet linked, drop links to URLs no longer given. Never waits on a link."""
        if self.stopping:
            return
        if self._tg is None:
            raise RuntimeError("the mesh is not running: use `async with Mesh(relay) as mesh`")
        wanted: set[str] = set()
        for url in urls:
            norm = derp_url(url) if url else None
            if norm is None:
                log.warning("mesh: skipping a peer with an unusable relay URL %r", url)
                continue
            wanted.add(norm)
        for url in list(self.links):
            if url not in wanted:
                log.info("mesh: peer %s left; closing its link", url)
                self.links.pop(url).cancel()  # its forwarders are gone now; the task ends on its own
        for url in sorted(wanted - set(self.links)):
            log.info("mesh: dialling peer relay %s", url)
            link = self.links[url] = MeshLink(self, url)
            self._running.add(link)
            self._tg.start_soon(link.run, name=f"mesh-link {url}")
        self.notify_error()

    async def ping(self, relay_url: str) -> float | None:
        """DERP round trip to the peer at ``relay_url`` over its mesh link (None if not linked)."""
        link = self.links.get(derp_url(relay_url) or "")
        return await link.ping() if link is not None else None

    def error(self) -> str | None:
        """Coder's error string for the replicas table, or None when every peer is reachable."""
        failed = [f"{url}: {link.error}" for url, link in sorted(self.links.items()) if link.error]
        return dial_error(failed)

    def notify_error(self) -> None:
        err = self.error()
        if err != self._last_error:
            self._last_error = err
            if self.on_error is not None:
                self.on_error(err)

    def findings(self) -> list[Finding]:
        """EMESH01 for each peer relay this replica cannot reach over its mesh link (the pair named)."""
        me = self.self_url or f"relay {short(self.relay.public_key)}"
        return [
            Finding(FINDING, "error", f"mesh link down: {me} -> {url}: {link.error}")
            for url, link in sorted(self.links.items()) if link.error and not link.is_self
        ]

    def status(self) -> dict[str, dict]:
        return {
            url: {"connected": link.connected, "error": link.error, "self": link.is_self, "keys": len(link.keys)}
            for url, link in self.links.items()
        }

    def stop(self) -> None:
        """Stop dialling and cancel every link; their forwarders are gone when this returns."""
        self.stopping = True
        links, self.links = list(self.links.values()), {}
        for link in links:
            link.cancel()

    async def close(self) -> None:
        """:meth:`stop`, then wait until every link's task has ended."""
        self.stop()
        while self._running:
            await next(iter(self._running)).done.wait()

    def __repr__(self) -> str:
        return f"<Mesh {short(self.relay.public_key)} links={len(self.links)}>"
