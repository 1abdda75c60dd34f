"""The ASGI entry point: ``uvicorn coordinator.app:app --http coordinator.edge:DerpHttpProtocol``.

Built from the environment on first use: with ``COORDINATOR_PG_CONNECTION_URL`` set, a whole replica
(:class:`coordinator.replica.Replica`, as ``coordinator server`` runs it); without it, the relay alone.
"""

from __future__ import annotations

from starlette.applications import Starlette

from coordinator.core.settings import load_settings
from coordinator.edge.routes import create_app
from coordinator.relay.dataplane import DerpRelay
from coordinator.relay.derpmap import PublishedMap
from coordinator.replica import Replica


class _LazyApp:
    """``coordinator.app:app`` for plain uvicorn: built from the environment on first use."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    def _build(self) -> Starlette:
        settings = load_settings()
        if settings.pg_url:  # a whole replica, as `coordinator server` (minus the embedded Postgres)
            return Replica(settings).app()
        return create_app(DerpRelay.from_settings(settings), derp_map=PublishedMap.from_settings(settings))

    async def __call__(self, scope, receive, send) -> None:
        if self.app is None:
            self.app = self._build()
        await self.app(scope, receive, send)


app = _LazyApp()
