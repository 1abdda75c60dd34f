"""One replica's control plane: Postgres, pub/sub, the replica registry and the DERP mesh, wired.

Started by the app's lifespan; it never stops the process because Postgres went away: every part
retries on its own and reports its state for the health endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket

from coordinator import __version__
from coordinator.config import Settings
from coordinator.db import Database
from coordinator.derp import SERVER_KEY_FILE, DerpRelay
from coordinator.dupkey import DuplicateKeyCheck
from coordinator.latency import Finding, LatencyMonitor
from coordinator.mesh import Mesh
from coordinator.pubsub import PubSub
from coordinator.replicas import Replica, ReplicaRegistry

log = logging.getLogger("coordinator.controlplane")

DIAL_ERROR = "Failed to dial peers: "


def merge_dial_errors(*errors: str | None) -> str | None:
    """One ``Failed to dial peers: a; b`` string from several such strings."""
    parts = [e.removeprefix(DIAL_ERROR) for e in errors if e]
    return DIAL_ERROR + "; ".join(parts) if parts else None


class ControlPlane:
    """Everything a replica does besides serving HTTP and relaying packets."""

    def __init__(self, settings: Settings, relay: DerpRelay, pg_url: str):
        self.settings = settings
        self.relay = relay
        self.pg_url = pg_url
        self.db: Database | None = None
        self.pubsub: PubSub | None = None
        self.registry: ReplicaRegistry | None = None
        self.mesh: Mesh | None = None
        self.monitor: LatencyMonitor | None = None
        self.api_token: str = settings.api_token
        self._warned_no_relay_url = False
        self._monitor_task: asyncio.Task | None = None
        self.duplicate_keys = DuplicateKeyCheck(settings.relay_url, str(settings.data_path / SERVER_KEY_FILE))

    async def start(self, *, db_wait: float = 30.0, join: bool = True) -> None:
        """Open the database (bounded wait), install the mesh key; with ``join``, also :meth:`join`."""
        s = self.settings
        self.db = await Database.open(self.pg_url, wait=db_wait)
        self.relay.set_mesh_key(await self.db.derp_mesh_key(s.mesh_key or None))
        if not self.api_token:
            self.api_token = await self.db.get_or_create_site_config("api_token", lambda: secrets.token_urlsafe(32))
        self.pubsub = PubSub(self.pg_url)
        await self.pubsub.start()
        self.mesh = Mesh(self.relay, on_error=self._on_dial_error)
        self.monitor = LatencyMonitor(
            threshold=s.latency_threshold, peer_timeout=s.peer_timeout, pubsub=self.pubsub, derp_ping=self.mesh.ping,
        )
        self.registry = ReplicaRegistry(
            self.db,
            self.pubsub,
            hostname=socket.gethostname(),
            region_id=s.region_id,
            relay_url=s.relay_url,
            version=__version__,
            heartbeat=s.heartbeat,
            on_change=self._on_peers,
            on_probe=self.monitor.database_sample,
        )
        if join:
            await self.join()

    async def join(self) -> None:
        """Register in the replica set: call once this replica's relay URL answers, or peers dial in vain."""
        assert self.registry is not None
        s = self.settings
        await self.registry.start()
        self._monitor_task = asyncio.create_task(self._measure_loop(), name="latency monitor")
        log.info(
            "replica %s joined (region %d, relay URL %s, %d live peers)",
            self.registry.id, s.region_id, s.relay_url or "(none)", len(self.registry.peers()),
        )

    def _on_dial_error(self, _: str | None = None) -> None:
        if self.registry is not None and self.mesh is not None and self.monitor is not None:
            self.registry.set_error(merge_dial_errors(self.mesh.error(), self.monitor.peer_error()))

    async def _measure_loop(self) -> None:
        """Once per heartbeat: peers, pub/sub; the results ride on our next heartbeat write."""
        assert self.registry is not None and self.monitor is not None
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await self.monitor.measure(self.registry.regional_peers())
                self.registry.set_measurements(
                    self.monitor.matrix_row(), self.monitor.pubsub_median, self.monitor.database.median,
                )
                self._on_dial_error()
                self.duplicate_keys.check(self.mesh)  # logs a newly found one
            except Exception:  # never let a measuring bug take the replica down
                log.exception("latency measurement failed")
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.05, self.settings.heartbeat - elapsed))

    def findings(self) -> list[Finding]:
        """Coded problems for the health report."""
        if self.monitor is None or self.registry is None:
            return [Finding("EDB01", "error", "control plane not started")]
        if not self.registry.healthy:
            self.monitor.database_failed(self.registry.last_error or "heartbeats failing")
        return self.monitor.findings(
            database_ok=self.registry.healthy, pubsub_connected=bool(self.pubsub and self.pubsub.connected),
        ) + self.duplicate_keys.check(self.mesh)

    async def _on_peers(self, peers: list[Replica]) -> None:
        regional = [p for p in peers if p.region_id == self.settings.region_id]
        if regional and not self.settings.relay_url and not self._warned_no_relay_url:
            self._warned_no_relay_url = True
            log.warning(
                "%d other replicas are alive but COORDINATOR_DERP_SERVER_RELAY_URL is not set: they cannot reach "
                "this replica's relay, so clients connected here are unreachable from theirs. Set it to this "
                "replica's own address (e.g. http://$(POD_IP):3000).",
                len(regional),
            )
        if self.mesh is not None:
            await self.mesh.set_peers(p.relay_url for p in regional if p.relay_url)

    def status(self) -> dict:
        """State for health endpoints."""
        reg = self.registry
        return {
            "database": bool(reg and reg.healthy),
            "database_error": reg.last_error if reg else "not started",
            "pubsub": bool(self.pubsub and self.pubsub.connected),
            "peers": len(reg.peers()) if reg else 0,
            "mesh": self.mesh.status() if self.mesh else {},
            "mesh_error": self.mesh.error() if self.mesh else None,
        }

    async def stop(self) -> None:
        """Leave gracefully: peers drop this replica at once; then close every connection."""
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        if self.monitor is not None:
            self.monitor.close()
        if self.registry is not None:
            try:
                await self.registry.stop()
            except Exception as exc:  # the database may be gone; peers then expire us by heartbeat
                log.warning("could not mark this replica stopped: %s", exc)
        if self.mesh is not None:
            await self.mesh.close()
        if self.pubsub is not None:
            await self.pubsub.close()
        if self.db is not None:
            await self.db.close()
