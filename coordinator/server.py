"""``coordinator server``: one replica under uvicorn, with the raw DERP upgrade on /derp."""

from __future__ import annotations

import importlib.util
import logging
import signal

import uvicorn

from coordinator.app import create_app
from coordinator.config import Settings
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
        forwarded_allow_ips="127.0.0.1",
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
    app = create_app(relay)
    host, port = settings.listen
    scheme = "https" if settings.tls_cert_file else "http"
    log.info("replica listening on %s://%s:%d (DERP relay at /derp)", scheme, host, port)
    ReplicaServer(uvicorn_config(settings, app)).run()
    return 0
