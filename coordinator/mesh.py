"""The DERP mesh: one outgoing mesh link per live peer relay, feeding forwarders into the relay.

Each link dials a peer's ``/derp`` with this replica's own server key and the shared mesh key,
sends WatchConns, and turns PeerPresent / PeerGone into forwarder entries of the Cython routing
table; packets for those keys then leave as ForwardPacket on the link without Python per packet.
When a link breaks, every forwarder learned through it is removed at once and the link redials
with backoff for as long as the peer stays in the set.

A link that stops draining pushes back on the senders that route to it (the relay stops reading
them) until it drains; one that stays stuck for ``stall_timeout`` (5 s, as Go's derper) is closed
and redialled, which resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable

from coordinator.client import DerpClient, DerpError, PeerGone, PeerPresent
from coordinator.derp import DerpRelay
from coordinator.errors import describe, dial_error
from coordinator.keys import short
from coordinator.urls import derp_url

log = logging.getLogger("coordinator.mesh")

MAX_BACKOFF = 5.0


def normalize_relay_url(url: str) -> str | None:
    """``<scheme>://<host:port>/derp`` for a peer's relay URL, or None if it is unusable."""
    return derp_url(url)


class SelfConnection(Exception):
    """The URL leads back to this replica's own relay."""


class MeshLink:
    """The outgoing connection to one peer relay, redialled until :meth:`stop`."""

    def __init__(self, mesh: Mesh, url: str):
        self.mesh = mesh
        self.url = url
        self.error: str | None = None
        self.connected = asyncio.Event()
        self.keys: set[bytes] = set()
        self.client: DerpClient | None = None
        self.is_self = False
        self._drain: asyncio.Task | None = None
        self._task = asyncio.create_task(self._run(), name=f"mesh-link {url}")

    async def _run(self) -> None:
        failures = 0
        last_logged: str | None = None
        while True:
            try:
                await self._session()
                failures = 0
            except SelfConnection:
                self.is_self = True
                log.info("mesh: %s is this replica's own relay; not meshing with it", self.url)
                return
            except asyncio.CancelledError:
                raise
            except (TimeoutError, DerpError, OSError) as exc:
                failures += 1
                self.error = describe(exc)
                if self.error != last_logged:  # once per change, never a log line per retry
                    log.warning("mesh: link to %s failed: %s (retrying with backoff)", self.url, self.error)
                    last_logged = self.error
                self.mesh.notify_error()
            finally:
                self.connected.clear()
            delay = min(MAX_BACKOFF, 0.05 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        relay = self.mesh.relay
        client = await DerpClient.connect(self.url, relay.key, mesh_key=self.mesh.mesh_key(), timeout=self.mesh.dial_timeout)
        forwarder = None
        self.client = client
        try:
            if client.server_key == relay.public_key:
                raise SelfConnection()
            if client.transport is None:
                raise DerpError("mesh links need a raw DERP connection")
            forwarder = relay.forwarder(client.transport, self.url, lambda fwd: self._congested(client, fwd))
            await client.watch_conns()
            if self.error is not None:
                log.info("mesh: link to %s restored", self.url)
            self.error = None
            self.connected.set()
            self.mesh.notify_error()
            while True:
                frame = await client.recv(timeout=self.mesh.read_timeout)
                if isinstance(frame, PeerPresent):
                    if frame.key != relay.public_key:
                        relay.server.add_forwarder(frame.key, forwarder)
                        self.keys.add(frame.key)
                elif isinstance(frame, PeerGone):
                    relay.server.remove_forwarder(frame.key, forwarder)
                    self.keys.discard(frame.key)
        except TimeoutError:
            raise DerpError(f"no frame from {self.url} for {self.mesh.read_timeout:.0f} s") from None
        finally:
            if self._drain is not None:
                self._drain.cancel()
                self._drain = None
            if forwarder is not None:
                forwarder.close()
                for key in self.keys:
                    relay.server.remove_forwarder(key, forwarder)
            self.keys.clear()
            self.client = None
            await client.close()

    def _congested(self, client: DerpClient, forwarder) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._wait_drained(client, forwarder), name=f"mesh-drain {self.url}")

    async def _wait_drained(self, client: DerpClient, forwarder) -> None:
        """Resume the paused senders once the link drains; close a link that stays stuck."""
        try:
            await asyncio.wait_for(client.drain(), self.mesh.stall_timeout)
        except TimeoutError:
            log.warning("mesh: link to %s did not drain for %.0f s (%d KiB waiting); reconnecting",
                        self.url, self.mesh.stall_timeout, forwarder.unsent() // 1024)
            forwarder.close()  # its senders are read again; their packets for this peer are dropped
            if client.transport is not None:
                client.transport.abort()  # the session's recv fails, and the link redials
        except (OSError, DerpError):
            pass  # the connection is going away: the session cleans up
        finally:
            forwarder.resume()

    async def ping(self, timeout: float = 5.0) -> float | None:
        """DERP Ping round trip over the mesh link in seconds, or None while it is down."""
        client = self.client
        if client is None or not self.connected.is_set():
            return None
        return await client.ping(timeout)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Mesh:
    """Reconciles mesh links with the set of live peer relay URLs."""

    def __init__(
        self,
        relay: DerpRelay,
        *,
        mesh_key: Callable[[], str | None] | None = None,
        on_error: Callable[[str | None], None] | None = None,
        dial_timeout: float = 5.0,
        read_timeout: float = 150.0,
        stall_timeout: float = 5.0,
    ):
        self.relay = relay
        self.mesh_key = mesh_key or (lambda: relay.mesh_key)
        self.on_error = on_error
        self.dial_timeout = dial_timeout
        self.read_timeout = read_timeout  # keepalives arrive every 60-65 s
        self.stall_timeout = stall_timeout  # a link that takes nothing this long is redialled
        self.links: dict[str, MeshLink] = {}
        self._last_error: str | None = None

    async def set_peers(self, urls: Iterable[str]) -> None:
        """Dial every URL not yet linked, close links to URLs no longer given."""
        wanted: set[str] = set()
        for url in urls:
            norm = normalize_relay_url(url) if url else None
            if norm is None:
                log.warning("mesh: skipping a peer with an unusable relay URL %r", url)
                continue
            wanted.add(norm)
        for url in list(self.links):
            if url not in wanted:
                link = self.links.pop(url)
                log.info("mesh: peer %s left; closing its link", url)
                await link.stop()
        for url in sorted(wanted - set(self.links)):
            log.info("mesh: dialling peer relay %s", url)
            self.links[url] = MeshLink(self, url)
        self.notify_error()

    async def ping(self, relay_url: str) -> float | None:
        """DERP round trip to the peer at ``relay_url`` over its mesh link (None if not linked)."""
        link = self.links.get(normalize_relay_url(relay_url) or "")
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

    def status(self) -> dict[str, dict]:
        return {
            url: {"connected": link.connected.is_set(), "error": link.error, "self": link.is_self, "keys": len(link.keys)}
            for url, link in self.links.items()
        }

    async def close(self) -> None:
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.stop() for link in links))

    def __repr__(self) -> str:
        return f"<Mesh {short(self.relay.public_key)} links={len(self.links)}>"
