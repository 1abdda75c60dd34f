"""``coordinator server``: one :class:`~coordinator.replica.Replica` under uvicorn, and its process.

A thin CLI: it picks the database (embedded if no URL is given), serves the replica's app with the
raw DERP upgrade, and owns the process's fate on signals. The first SIGTERM/SIGINT starts a
graceful stop that ends within ``--shutdown-timeout`` whatever peers, mesh or Postgres do (a
watchdog thread exits the process if the event loop cannot); a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import sys
import threading

import anyio
import uvicorn

from coordinator.core.settings import Settings, ensure_data_dir
from coordinator.edge.frontdoor import FrontDoor, Limits, open_listener
from coordinator.edge.protocol import DerpHttpProtocol
from coordinator.ops.prometheus import start_prometheus
from coordinator.replica import Replica

log = logging.getLogger("coordinator.server")

# Exit statuses: the stop was clean; the replica could not start (or join); the stop was not clean
# (a part did not close in time, or the stop could not be recorded); a second signal cut it short.
EXIT_CLEAN = 0
EXIT_FAILED = 1
EXIT_UNCLEAN_STOP = 3
EXIT_FORCED = 4
# uvicorn's wait for open HTTP requests, as a share of the shutdown timeout (DERP connections
# are the relay's and are not waited for).
HTTP_DRAIN_SHARE = 0.3
WS_MAX_MESSAGE = 128 * 1024  # bytes: above DERP's largest frame (64 KiB + header) and the coordinator's 16 KiB
WS_MAX_QUEUE = 8  # received messages uvicorn buffers per WebSocket before it stops reading


def uvicorn_config(settings: Settings, app) -> uvicorn.Config:
    host, port = settings.listen
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=DerpHttpProtocol,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        ssl_certfile=settings.tls_cert_file or None,
        ssl_keyfile=settings.tls_key_file or None,
        timeout_graceful_shutdown=max(0.1, settings.shutdown_timeout * HTTP_DRAIN_SHARE),
        # ASGI WebSockets (the peer coordinator, DERP's fallback path): no message past one DERP frame
        # and a short queue, instead of uvicorn's 16 MiB x 32 per connection.
        ws_max_size=WS_MAX_MESSAGE,
        ws_max_queue=WS_MAX_QUEUE,
    )


def _say(text: str) -> None:
    print("coordinator: " + " ".join(text.split()), file=sys.stderr, flush=True)


class ReplicaServer(uvicorn.Server):
    """uvicorn's server with the replica's signal policy: one signal stops, a second one exits."""

    def __init__(self, config: uvicorn.Config, replica: Replica):
        super().__init__(config)
        self.replica = replica
        self.loop = None
        self._signalled = False
        self._watchdog: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._signalled:
            _say(f"second {signal.Signals(sig).name}: exiting now, without a clean stop")
            os._exit(EXIT_FORCED)
        self._signalled = True
        self.should_exit = True
        self.arm_watchdog()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.replica.begin_stop)

    def arm_watchdog(self) -> None:
        """Exit the process once the shutdown timeout is over, even if the event loop is stuck."""
        if self._watchdog is None:
            self._watchdog = threading.Timer(self.replica.settings.shutdown_timeout, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self) -> None:
        _say(f"stop did not finish within the shutdown timeout ({self.replica.settings.shutdown_timeout:g} s, "
             "--shutdown-timeout); exiting now")
        os._exit(EXIT_UNCLEAN_STOP)


def run_server(settings: Settings) -> int:
    data = ensure_data_dir(settings)
    listener = open_listener(settings)
    embedded = None
    pg_url = settings.pg_url
    if not pg_url:
        from coordinator.cluster.embedded import EmbeddedPostgresError, start_embedded

        try:
            embedded = start_embedded(data)
        except EmbeddedPostgresError as exc:
            listener.close()
            _say(f"cannot start: {exc}")
            return EXIT_FAILED
        pg_url = embedded.url
        embedded.supervise()  # restarted with backoff if its postmaster dies
        how = "started" if embedded.started else "shared with another local replica"
        _say(f"no COORDINATOR_PG_CONNECTION_URL; using embedded PostgreSQL in {embedded.pgdata} ({how})")
    try:
        return _serve(settings, pg_url, listener)
    finally:
        listener.close()
        if embedded is not None:
            embedded.stop()


def _serve(settings: Settings, pg_url: str, listener) -> int:
    replica = Replica(settings, pg_url=pg_url, join_when_listening=True)
    app = replica.app()
    app.state.front_door = FrontDoor(Limits.from_settings(settings))
    server = ReplicaServer(uvicorn_config(settings, app), replica)

    def failed(reason: str) -> None:
        server.should_exit = True

    replica.on_failure = failed

    async def main() -> int:
        server.loop = asyncio.get_running_loop()
        try:
            metrics = await start_prometheus(settings, replica.control, replica.relay, app.state.front_door)
        except OSError as exc:
            _say(f"cannot start: {exc}")
            return EXIT_FAILED
        try:
            return await serve()
        finally:
            if metrics is not None:
                await metrics.close()

    async def serve() -> int:
        async with anyio.create_task_group() as tg:

            async def announce() -> None:
                while not server.started:
                    await anyio.sleep(0.01)
                replica.listening()

            tg.start_soon(announce, name="join once listening")
            try:
                await server.serve(sockets=[listener])
            except SystemExit as exc:  # uvicorn could not start (e.g. the port is taken); it said why
                return exc.code if isinstance(exc.code, int) and exc.code else EXIT_FAILED
            finally:
                tg.cancel_scope.cancel()
        if replica.failure:
            _say(f"cannot start: {replica.failure}")
            return EXIT_FAILED
        if not server.started:
            return EXIT_FAILED
        return EXIT_CLEAN if replica.stop_clean else EXIT_UNCLEAN_STOP

    return anyio.run(main, backend_options={"loop_factory": server.config.get_loop_factory()})
