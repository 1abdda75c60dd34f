"""One replica's control plane: Postgres, pub/sub, the replica registry and the DERP mesh, wired.

:meth:`ControlPlane.run` is its whole life, in one task group: it connects (retrying while
Postgres is down; ``--db-wait`` bounds that), joins the replica set once the replica listens, then
follows peers and measures latency until :meth:`ControlPlane.stop`. Nothing it starts outlives
``run``; Postgres going away later never stops it: every part retries on its own and reports its
state for the health endpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import socket
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import psycopg
from psycopg_pool import PoolTimeout

from coordinator.cluster.db import Database
from coordinator.cluster.dberrors import DatabaseError, DatabaseRefused, MigrationError, UnsupportedPostgres
from coordinator.cluster.dupkey import DuplicateKeyCheck
from coordinator.cluster.latency import LatencyMonitor
from coordinator.cluster.mesh import Mesh
from coordinator.cluster.pgbudget import split
from coordinator.cluster.pgerrors import explain
from coordinator.cluster.pgfindings import postgres_findings
from coordinator.cluster.pubsub import PubSub
from coordinator.cluster.registry import ReplicaInfo, ReplicaRegistry
from coordinator.cluster.tailnet.auth import TOKEN_KEY as TAILNET_TOKEN_KEY
from coordinator.cluster.tailnet.auth import AuthorizePeer, token_authorizer
from coordinator.cluster.tailnet.core import TailnetCoordinator
from coordinator.core import logformat
from coordinator.core.errors import merge_dial_errors
from coordinator.core.health import Finding
from coordinator.core.settings import Settings
from coordinator.core.version import __version__
from coordinator.relay.dataplane import SERVER_KEY_FILE, DerpRelay
from coordinator.relay.derpconfig import DerpMaps
from coordinator.relay.relaycheck import RelayChecks

log = logging.getLogger("coordinator.controlplane")

API_TOKEN_KEY = "api_token"  # the site_config row holding the operator API's bearer token
RETRY_CAP = 5.0  # longest pause between attempts to join while Postgres is down
# Start-up failures that retrying cannot mend: the replica exits instead.
_FATAL = (DatabaseRefused, UnsupportedPostgres, MigrationError)
_TRANSIENT = (DatabaseError, psycopg.Error, PoolTimeout, TimeoutError, OSError)


def _first_cause(exc: BaseException) -> BaseException:
    """The first real error inside (nested) task-group exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class ControlPlane:
    """Everything a replica does besides serving HTTP and relaying packets."""

    def __init__(self, settings: Settings, relay: DerpRelay, pg_url: str, *, pubsub: PubSub | None = None,
                 authorize_peer: AuthorizePeer | None = None):
        self.settings = settings
        self.relay = relay
        self.pg_url = pg_url
        self.pubsub = pubsub if pubsub is not None else PubSub(
            pg_url, listen_url=settings.pg_listen_url or None, publish_connections=split(settings.pg_max_conns).publishers,
        )
        self.db: Database | None = None
        self.registry: ReplicaRegistry | None = None
        self.mesh: Mesh | None = None
        self.monitor: LatencyMonitor | None = None
        self.api_token: str = settings.api_token
        self.failure: str | None = None  # why joining failed for good (the replica then exits)
        self.joined: anyio.Event | None = None  # set once registered (created by run())
        self.on_failure: Callable[[str], None] | None = None
        self._warned_no_relay_url = False
        self.duplicate_keys = DuplicateKeyCheck(settings.relay_url, str(settings.data_path / SERVER_KEY_FILE))
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._stop_requested = False
        self._deadline = math.inf  # when closing must be over (set by stop())
        self._unclean: list[str] = []  # what did not stop as it should
        self.derp_maps: DerpMaps | None = None  # the DERP map served (set by the replica)
        self.relay_checks: RelayChecks | None = None  # the custom relays' last checks (set by the replica)
        self.join_error: str | None = None  # why the last attempt to join failed, while retrying
        # The peer coordinator (docs/coordinator.md): serves peers once the database answers.
        self.tailnet = TailnetCoordinator(settings.heartbeat, settings.tailnet_max_peers)
        self.tailnet_token: str = settings.tailnet_token
        self.authorize_peer: AuthorizePeer = authorize_peer or token_authorizer(lambda: self.tailnet_token)

    # -- life ----------------------------------------------------------------------------------

    async def run(self, *, listening: anyio.Event | None = None) -> None:
        """Connect, join once ``listening`` is set, follow peers until :meth:`stop`. Never raises.

        A start-up failure that retrying cannot mend (or that outlasts ``--db-wait``) ends the
        run, is kept in :attr:`failure` and is reported to :attr:`on_failure`.
        """
        self._scope, self._done = anyio.CancelScope(), anyio.Event()
        self.joined = anyio.Event()
        if self._stop_requested:
            self._scope.cancel()
        try:
            with self._scope:
                async with contextlib.AsyncExitStack() as stack:
                    stack.push_async_callback(self._close, "the pub/sub", self.pubsub.close)
                    await self.pubsub.start(wait=False)  # it retries on its own meanwhile
                    stack.push_async_callback(self._close, "the database", self._close_db)
                    s = self.settings
                    if s.derp_server_enable:  # else no relay to mesh: Postgres is the only rendezvous
                        self.mesh = await stack.enter_async_context(Mesh(
                            self.relay, on_error=self._on_dial_error, self_url=s.relay_url,
                            ping_interval=s.heartbeat / 2, ping_timeout=s.heartbeat / 2,
                        ))
                    self.monitor = LatencyMonitor(
                        threshold=s.latency_threshold, peer_timeout=s.peer_timeout, pubsub=self.pubsub,
                        derp_ping=self.mesh.ping if self.mesh is not None else None,
                    )
                    stack.push_async_callback(self._close, "the latency checks", self.monitor.close)
                    async with anyio.create_task_group() as tg:
                        await self._join(tg, listening)
                        tg.start_soon(self._measure_loop, name="latency monitor")
        except Exception as group:
            exc = _first_cause(group)
            self.failure = str(exc) or type(exc).__name__
            if not isinstance(exc, DatabaseError):
                log.error("control plane failed", exc_info=exc)
            if self.on_failure is not None:
                self.on_failure(self.failure)
        finally:
            self._done.set()

    async def stop(self, timeout: float = 5.0) -> bool:
        """Leave the replica set, then close every link and connection, within ``timeout`` s.

        Returns True if the stop was clean: our stop recorded (or we never joined) and everything
        closed in time. Mesh links stop redialling at once.
        """
        self._deadline = anyio.current_time() + timeout
        if self.mesh is not None:
            self.mesh.stopping = True
        recorded = True
        async with anyio.create_task_group() as tg:
            # Beside the registry's stop: tailnet peers are marked lost and closed with a reason.
            tg.start_soon(self.tailnet.stop, max(0.1, 0.5 * timeout))
            if self.registry is not None:
                # Most of the budget: peers drop us the moment this is recorded.
                recorded = await self.registry.stop(max(0.1, 0.6 * timeout))
        self._stop_requested = True
        if self._scope is not None:
            self._scope.cancel()
        if self._done is not None:
            with anyio.move_on_after(max(0.0, self._deadline - anyio.current_time())):
                await self._done.wait()
            if not self._done.is_set():
                self._unclean.append("the control plane")
        if not recorded:
            self._unclean.append("recording the stop")
        if self._unclean:
            log.warning("control plane stop not clean: %s", ", ".join(self._unclean))
        return not self._unclean

    async def _join(self, tg: anyio.abc.TaskGroup, listening: anyio.Event | None) -> None:
        """Open the database, install the mesh key and register, retrying until it works.

        With ``--db-wait`` set, give up (raise) once that long has passed without success.
        """
        wait = self.settings.db_wait or math.inf
        deadline = anyio.current_time() + wait
        delay, last_reason = 0.25, None
        while True:
            try:
                await self._connect(tg, listening, deadline - anyio.current_time())
                return
            except _FATAL:
                raise
            except _TRANSIENT as exc:
                reason = str(exc).strip() or type(exc).__name__
                await self._close("the database", self._close_db)
                self.registry = None
                if anyio.current_time() >= deadline:
                    if isinstance(exc, DatabaseError):
                        raise
                    raise DatabaseError(f"cannot join the replica set within {wait:g} s: {reason}") from None
                self.join_error = reason
                if reason != last_reason:
                    log.warning("cannot join the replica set yet: %s; retrying", explain(exc, self.pg_url))
                    last_reason = reason
                await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
                delay = min(2 * delay, RETRY_CAP)

    async def _connect(self, tg: anyio.abc.TaskGroup, listening: anyio.Event | None, wait: float) -> None:
        s = self.settings
        self.db = await Database.open(self.pg_url, wait=wait, max_size=split(s.pg_max_conns).pool)
        self.relay.set_mesh_key(await self.db.derp_mesh_key(s.mesh_key or None))
        if not self.api_token:
            self.api_token = await self.db.get_or_create_site_config(API_TOKEN_KEY, lambda: secrets.token_urlsafe(32))
        if not self.tailnet_token:
            self.tailnet_token = await self.db.get_or_create_site_config(TAILNET_TOKEN_KEY, lambda: secrets.token_urlsafe(32))
        if listening is not None:
            # Join only once we listen: peers dial our relay URL as soon as they see us.
            await listening.wait()
        assert self.monitor is not None
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
        await self.registry.start(tg)
        tg.start_soon(self.tailnet.run, self.db, self.pubsub, name="tailnet coordinator")
        assert self.joined is not None
        self.join_error = None
        self.joined.set()
        logformat.set_context(replica=str(self.registry.id))  # every JSON log line names this replica from now on
        log.info(
            "replica %s joined (region %d, relay URL %s, %d live peers)",
            self.registry.id, s.region_id, s.relay_url or "(none)", len(self.registry.peers()),
        )

    async def _close_db(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            # Leave time for the pub/sub, closed next: a hung server must not take the whole budget.
            await db.close(timeout=max(0.1, min(5.0, (self._deadline - anyio.current_time()) / 2)))

    async def _close(self, what: str, close: Callable[[], Awaitable[None]]) -> None:
        """Run ``close`` even though we are being cancelled, but never past the stop's deadline."""
        with anyio.CancelScope(shield=True):
            budget = min(5.0, max(0.0, self._deadline - anyio.current_time()))
            with anyio.move_on_after(budget) as scope:
                try:
                    await close()
                except Exception as exc:
                    log.warning("closing %s failed: %s", what, exc)
                    self._unclean.append(f"closing {what}")
            if scope.cancelled_caught:
                log.warning("closing %s took over %.1f s; abandoned it", what, budget)
                self._unclean.append(f"closing {what}")

    # -- peers and measurements ------------------------------------------------------------------

    def _on_dial_error(self, _: str | None = None) -> None:
        if self.registry is not None and self.mesh is not None and self.monitor is not None:
            self.registry.set_error(merge_dial_errors(self.mesh.error(), self.monitor.peer_error()))

    async def _measure_loop(self) -> None:
        """Once per heartbeat: peers, pub/sub; the results ride on our next heartbeat write."""
        assert self.registry is not None and self.monitor is not None
        while True:
            started = anyio.current_time()
            try:
                await self.monitor.measure(self.registry.regional_peers())
                self.registry.set_measurements(
                    self.monitor.matrix_row(), self.monitor.pubsub_median, self.monitor.database.median,
                )
                self._on_dial_error()
                self.duplicate_keys.check(self.mesh)  # logs a newly found one
            except Exception:  # never let a measuring bug take the replica down
                log.exception("latency measurement failed")
            elapsed = anyio.current_time() - started
            await anyio.sleep(max(0.05, self.settings.heartbeat - elapsed))

    async def _on_peers(self, peers: list[ReplicaInfo]) -> None:
        regional = [p for p in peers if p.region_id == self.settings.region_id]
        if regional and self.mesh is not None and not self.settings.relay_url and not self._warned_no_relay_url:
            self._warned_no_relay_url = True
            log.warning(
                "%d other replicas are alive but COORDINATOR_DERP_SERVER_RELAY_URL is not set: they cannot reach "
                "this replica's relay, so clients connected here are unreachable from theirs. Set it to this "
                "replica's own address (e.g. http://$(POD_IP):3000).",
                len(regional),
            )
        if self.mesh is not None:
            await self.mesh.set_peers(p.relay_url for p in regional if p.relay_url)

    # -- reports -------------------------------------------------------------------------------

    def findings(self) -> list[Finding]:
        """Coded problems for the health report."""
        relays = [Finding(*p) for part in (self.derp_maps, self.relay_checks) if part is not None for p in part.problems()]
        pg = postgres_findings(self.pg_url, self.registry, self.pubsub, self.join_error)
        if self.monitor is None or self.registry is None:
            return [Finding("EDB01", "error", "control plane not started"), *pg, *relays]
        if not self.registry.healthy:
            self.monitor.database_failed(self.registry.last_error or "heartbeats failing")
        return self.monitor.findings(
            database_ok=self.registry.healthy, pubsub_connected=bool(self.pubsub and self.pubsub.connected),
        ) + pg + self.duplicate_keys.check(self.mesh) + (self.mesh.findings() if self.mesh else []) + relays \
            + self.tailnet_findings()

    def tailnet_findings(self) -> list[Finding]:
        """ETAILNET01 while the peer coordinator cannot write its heartbeat (its peers were sent elsewhere)."""
        if self.tailnet.healthy:
            return []
        return [Finding("ETAILNET01", "error", f"peer coordinator unhealthy, refusing peers: {self.tailnet.health()['error']}")]

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
            "tailnet": self.tailnet.stats(),
        }
