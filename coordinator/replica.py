"""``coordinator.Replica``: one HA replica as a library object, and the owner of its lifecycle.

A replica is the embedded DERP relay plus its control plane (Postgres, pub/sub, registry, mesh,
latency monitor). Mount :meth:`Replica.routes` in a Starlette or FastAPI app and give the app
:meth:`Replica.lifespan`; ``coordinator server`` does exactly that under uvicorn::

    replica = Replica(load_settings())
    app = Starlette(routes=[*my_routes, *replica.routes()], lifespan=replica.lifespan)

Everything the replica starts runs in the lifespan's task group. Leaving the lifespan stops it
within ``settings.shutdown_timeout``: the replica records its stop (peers drop it at once), sends
every client DERP's Restarting frame before closing it, closes its mesh links and connections,
and abandons whatever is still hanging when the time is up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from coordinator.cluster.controlplane import ControlPlane
from coordinator.cluster.db import Database
from coordinator.cluster.latency import LatencyMonitor
from coordinator.cluster.mesh import Mesh
from coordinator.cluster.pubsub import PubSub
from coordinator.cluster.registry import ReplicaRegistry
from coordinator.cluster.tailnet.auth import AuthorizePeer
from coordinator.cluster.tailnet.endpoint import tailnet_routes
from coordinator.core.settings import Settings
from coordinator.edge.routes import relay_routes
from coordinator.ops.api import api_routes
from coordinator.ops.status import status_routes
from coordinator.relay.dataplane import DerpRelay
from coordinator.relay.derpmap import PublishedMap

log = logging.getLogger("coordinator.replica")

# Restarting frame: reconnect at once (the load balancer picks a survivor), keep trying a while.
RESTART_RECONNECT_IN_MS = 0
RESTART_TRY_FOR_MS = 5000
# Share of the shutdown timeout the graceful steps may use; the rest is the process's margin.
STOP_BUDGET = 0.8


class Replica:
    """One replica: settings in; ``routes()``, ``lifespan``, and its parts once running.

    ``pubsub`` exists from the start (subscriptions made before the database answers are LISTENed
    once it does); ``db``, ``registry``, ``mesh`` and ``monitor`` are None until the control plane
    has them. ``join_when_listening`` defers joining the replica set until :meth:`listening` is
    called (``coordinator server`` calls it once uvicorn has bound its socket).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pg_url: str | None = None,
        relay: DerpRelay | None = None,
        join_when_listening: bool = False,
        authorize_peer: AuthorizePeer | None = None,
    ):
        url = pg_url or settings.pg_url
        if not url:
            raise ValueError("a replica needs PostgreSQL: set COORDINATOR_PG_CONNECTION_URL (Settings.pg_url)")
        self.settings = settings
        self.relay = relay if relay is not None else DerpRelay.from_settings(settings)
        self.derp_map = PublishedMap.from_settings(settings)
        self.pubsub: PubSub = PubSub(url)
        # authorize_peer: async (connection, peer_id) -> PeerGrant for the peer coordinator
        # (docs/coordinator.md); by default peers present the deployment's tailnet token.
        self.control = ControlPlane(settings, self.relay, url, pubsub=self.pubsub, authorize_peer=authorize_peer)
        self.stop_clean: bool | None = None  # once stopped: whether the stop was clean
        self._join_when_listening = join_when_listening
        self._listening: anyio.Event | None = None
        self._stop_started: float | None = None  # time.monotonic() when the stop began
        self._stopped: anyio.Event | None = None
        self._running = False
        self._stop_running = False
        self._tg: TaskGroup | None = None  # the lifespan's: an early stop runs in it

    # -- parts -------------------------------------------------------------------------------

    @property
    def db(self) -> Database | None:
        return self.control.db

    @property
    def registry(self) -> ReplicaRegistry | None:
        return self.control.registry

    @property
    def mesh(self) -> Mesh | None:
        return self.control.mesh

    @property
    def monitor(self) -> LatencyMonitor | None:
        return self.control.monitor

    @property
    def failure(self) -> str | None:
        """Why the replica could not join (Postgres refused us, or ``--db-wait`` ran out)."""
        return self.control.failure

    @property
    def on_failure(self) -> Callable[[str], None] | None:
        """Called with :attr:`failure` when joining fails for good (``coordinator server`` then exits 1)."""
        return self.control.on_failure

    @on_failure.setter
    def on_failure(self, callback: Callable[[str], None] | None) -> None:
        self.control.on_failure = callback

    @property
    def stopping(self) -> bool:
        return self._stop_started is not None

    # -- HTTP ----------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """``/derp`` (and its probes), ``/derpmap/default``, ``/healthz``, ``/readyz``, the operator API,
        ``/metrics`` and the status page (``/status``)."""
        return [*relay_routes(), *api_routes(self.control, self.relay), *status_routes(self.control, self.relay),
                *tailnet_routes(self.control.tailnet, self.control.authorize_peer)]

    def app(self) -> Starlette:
        """A Starlette app serving this replica alone (what ``coordinator server`` runs)."""
        return Starlette(routes=self.routes(), lifespan=self.lifespan)

    # -- lifecycle -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette | None = None) -> AsyncIterator[None]:
        """Run the replica for the duration of the block (an ASGI lifespan); stop it on the way out.

        Startup returns at once: the replica connects to Postgres in the background (``/readyz``
        answers 503 meanwhile) and joins when the database answers.
        """
        if self._running:
            raise RuntimeError("this replica is already running")
        self._running = True
        if app is not None:
            app.state.derp_relay = self.relay  # the DERP upgrade and the WebSocket route find it here
            app.state.replica = self
            app.state.derp_map = self.derp_map
        self._listening, self._stopped = anyio.Event(), anyio.Event()
        if not self._join_when_listening:
            self._listening.set()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.relay.start()
            await self.pubsub.start(wait=False)  # subscribe at once; it connects in the background
            tg.start_soon(lambda: self.control.run(listening=self._listening), name="control plane")
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await self.stop()
                self._tg = None
                tg.cancel_scope.cancel()  # abandon whatever outlived the stop's deadline

    def listening(self) -> None:
        """The replica's relay URL answers now: join the replica set (with ``join_when_listening``)."""
        if self._listening is not None:
            self._listening.set()

    async def ready(self) -> None:
        """Wait until the replica has joined the replica set; raise RuntimeError if joining failed for good."""
        while self.control.joined is None or not self.control.joined.is_set():
            if self.failure is not None:
                raise RuntimeError(f"the replica could not join: {self.failure}")
            await anyio.sleep(0.02)

    def begin_stop(self) -> None:
        """Begin the stop now, from the event loop thread (``coordinator server`` calls it on a signal).

        Starts the shutdown clock and, while the HTTP server drains its requests, the stop itself:
        peers drop this replica and its clients get Restarting at once, not after the drain. The
        lifespan's exit then waits for that stop.
        """
        self._start_clock()
        self.control.tailnet.begin_stop()  # peers get 1001 and a reason before uvicorn's 1012
        if self._tg is not None and not self._stop_running:
            self._tg.start_soon(self.stop, name="stop")

    def _start_clock(self) -> None:
        """Start the shutdown clock and stop mesh links from redialling."""
        if self._stop_started is None:
            self._stop_started = time.monotonic()
        if self.mesh is not None:
            self.mesh.stopping = True

    async def stop(self) -> bool:
        """Stop within the shutdown timeout (counted from :meth:`begin_stop`); True if it was clean.

        Idempotent: a second caller waits for the first one's result.
        """
        self._start_clock()
        if self._stopped is None:  # never ran
            return True
        if self._stop_running:
            await self._stopped.wait()
            return bool(self.stop_clean)
        self._stop_running = True
        assert self._stop_started is not None
        budget = self.settings.shutdown_timeout * STOP_BUDGET - (time.monotonic() - self._stop_started)
        clean = False
        # Shielded (an early stop runs in the lifespan's task group, which may be cancelled) and
        # bounded by its own deadline, so it always ends, and those waiting for it are released.
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(0.0, budget)) as scope:
            async with anyio.create_task_group() as tg:

                async def leave() -> None:
                    nonlocal clean
                    clean = await self.control.stop(max(0.0, budget - 0.05))

                tg.start_soon(leave, name="leave the replica set")
                # Clients reconnect at once, through the load balancer, to a survivor.
                self.relay.close(restarting=(RESTART_RECONNECT_IN_MS, RESTART_TRY_FOR_MS))
        self.relay.close()
        elapsed = time.monotonic() - self._stop_started
        self.stop_clean = clean and not scope.cancelled_caught
        if self.stop_clean:
            log.info("replica stopped cleanly in %.2f s", elapsed)
        else:
            log.warning("replica stop was not clean (%.2f s; shutdown timeout %g s)", elapsed,
                        self.settings.shutdown_timeout)
        self._stopped.set()
        return self.stop_clean
