"""``coordinator server``: one replica under uvicorn, with the raw DERP upgrade on /derp."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import sys

import uvicorn

from coordinator.api import api_routes
from coordinator.app import create_app
from coordinator.config import Settings
from coordinator.controlplane import ControlPlane
from coordinator.db import DatabaseError
from coordinator.derp import DerpRelay
from coordinator.http import DerpHttpProtocol

log = logging.getLogger("coordinator.server")


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
        timeout_graceful_shutdown=5,
    )


class ReplicaServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM shutdown that went well exits with status 0."""

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def run_server(settings: Settings) -> int:
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True)
    relay = DerpRelay.from_data_dir(data, mesh_key=settings.mesh_key or None, keepalive=settings.keepalive)
    embedded = None
    pg_url = settings.pg_url
    if not pg_url:
        from coordinator.embedded import EmbeddedPostgresError, start_embedded

        try:
            embedded = start_embedded(data)
        except EmbeddedPostgresError as exc:
            print(f"coordinator: cannot start: {exc}", file=sys.stderr, flush=True)
            return 1
        pg_url = embedded.url
        embedded.supervise()  # restarted with backoff if its postmaster dies
        how = "started" if embedded.started else "shared with another local replica"
        print(f"coordinator: no COORDINATOR_PG_CONNECTION_URL; using embedded PostgreSQL in {embedded.pgdata} ({how})",
              file=sys.stderr, flush=True)
    control = ControlPlane(settings, relay, pg_url)

    app = create_app(relay, extra_routes=api_routes(control, relay))
    app.state.control = control
    server = ReplicaServer(uvicorn_config(settings, app))

    async def main() -> int:
        try:
            await control.start(db_wait=settings.db_wait, join=False)
        except DatabaseError as exc:
            await control.stop()
            print(f"coordinator: cannot start: {exc}", file=sys.stderr, flush=True)
            return 1
        serving = asyncio.create_task(server.serve())
        failed = None
        try:
            # Join the replica set only once we listen: peers dial our relay URL as soon as they see us.
            while not server.started and not serving.done():
                await asyncio.sleep(0.01)
            if server.started:
                try:
                    await control.join()
                except DatabaseError as exc:
                    failed = f"coordinator: cannot join the replica set: {exc}"
                    server.should_exit = True
            await serving
        finally:
            await control.stop()
        if failed:
            print(failed, file=sys.stderr, flush=True)
            return 1
        return 0 if server.started else 1

    try:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            return runner.run(main())
    finally:
        if embedded is not None:
            embedded.stop()
